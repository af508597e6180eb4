"""The two refinement optimizers, both batched over B hypotheses of one object in one crop.

- ``baseline`` (:class:`AdamConfig`): the paper's recipe (Simpsi et al. 2022, section 3.3): Adam
  on a rotation parametrization (6D by default) and the translation, back-propagating the eq.-3
  loss through the differentiable renderer at one resolution for a fixed number of iterations;
  the soft renderer's sigma is annealed from blurry to sharp.
- ``default`` (:class:`LevenbergMarquardtConfig`): Levenberg-Marquardt on the 6 parameters of a
  local pose increment, coarse to fine. Residuals are Gaussian-blurred difference images of a
  sharp (supersampled) render and the observation: silhouette, plus colour when weighted. Their
  Jacobian is the blurred render's image gradient times the analytic image motion of the 3D
  point behind each pixel (the outline moves with its rim points, the colour with the surface):
  forward-compositional image alignment. The renderer thus runs forward only, once per
  iteration, with no gradient; any backend works. A step is kept only when it lowers the
  residual, else the damping grows and the step is solved again; a level ends when the residual
  stalls. Sharp renders matter: the soft renderer's outward bias (its coverage grows past the
  outline) moved the optimum by 0.2-0.5 deg at sigma 0.06-0.2 px^2, and the blur, applied to
  render and observation alike, widens the basin without moving the optimum.

Poses: object-to-camera R (B, 3, 3), t (B, 3) metres; images as in :mod:`.losses`.
"""
import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pose_node.refine.losses import (LossConfig, Observation, colour_gain, refine_loss,
                                     resampled_intrinsics, resized_observation, soft_iou)
from pose_node.refine.parametrization import (TranslationScale, apply_increment,
                                              check_rotation, check_translation,
                                              params_to_rotation, params_to_translation,
                                              rotation_to_params, translation_to_params)
from pose_node.render.base import Renderer, RenderMesh, RenderOutput, Shading


@dataclass(frozen=True)
class Problem:
    """One refinement: ``renderer`` draws ``mesh`` to compare with ``observation`` (full
    resolution) under ``loss``; ``shading`` of the colour render; ``radius`` (metres) of the mesh
    about its origin (the unit of lateral steps)."""

    renderer: Renderer
    mesh: RenderMesh
    observation: Observation
    loss: LossConfig
    shading: Shading
    radius: float

    def at_size(self, size: int) -> Observation:
        return resized_observation(self.observation, size)


@dataclass
class Trajectory:
    """An optimizer's result: final poses R (B, 3, 3), t (B, 3); curves (B, n) its own objective
    per iteration (the eq.-3 loss for Adam, the residual cost for Levenberg-Marquardt, whose levels
    differ in resolution); iterations run."""

    R: torch.Tensor
    t: torch.Tensor
    curves: torch.Tensor
    iterations: int


# ----------------------------------------------------------------------------------- rendering

def renderer_takes_sigma(renderer: Renderer) -> bool:
    """Whether ``renderer.render`` has a ``sigma`` (softness, px^2) argument (the soft backend)."""
    return 'sigma' in inspect.signature(renderer.render).parameters


def render(problem: Problem, R: torch.Tensor, t: torch.Tensor, observation: Observation,
           sigma: float | None) -> RenderOutput:
    """Render B poses into ``observation``'s crop; ``sigma`` is used where the backend has one."""
    extra = {'sigma': sigma} if sigma is not None and renderer_takes_sigma(problem.renderer) else {}
    K = observation.K.expand(R.shape[0], 3, 3)
    return problem.renderer.render(problem.mesh, R, t, K, observation.width, observation.height,
                                   problem.shading, **extra)


@torch.no_grad()
def sharp_render(problem: Problem, R: torch.Tensor, t: torch.Tensor, observation: Observation,
                 supersample: int = 1) -> RenderOutput:
    """Render B poses without softness or gradient: with the backend's exact mode where it has one
    (``render_hard``), each pixel the mean of ``supersample`` x ``supersample`` point samples
    (silhouette = covered fraction, rgb premultiplied, depth = mean over covered samples); else the
    backend's own render (``supersample`` unused), whose silhouette is already a pixel-area
    coverage."""
    hard = getattr(problem.renderer, 'render_hard', None)
    if hard is None:
        return render(problem, R, t, observation, None)
    size = (observation.width, observation.height)
    width, height = observation.width * supersample, observation.height * supersample
    K = resampled_intrinsics(observation.K, size, (width, height)).expand(R.shape[0], 3, 3)
    out = hard(problem.mesh, R, t, K, width, height, problem.shading)
    if supersample == 1:
        return out
    planes = torch.cat([out.silhouette[:, None], out.rgb.permute(0, 3, 1, 2), out.depth[:, None]],
                       dim=1)
    pooled = F.avg_pool2d(planes, supersample)
    silhouette = pooled[:, 0]
    depth = pooled[:, 4] / silhouette.clamp(min=1e-6)
    return RenderOutput(silhouette=silhouette, rgb=pooled[:, 1:4].permute(0, 2, 3, 1),
                        depth=torch.where(silhouette > 0, depth, 0.0))


@torch.no_grad()
def evaluate_loss(problem: Problem, R: torch.Tensor, t: torch.Tensor, observation: Observation,
                  supersample: int) -> torch.Tensor:
    """(B,) eq.-3 loss of poses against ``observation`` with sharp renders (no gradient)."""
    out = sharp_render(problem, R, t, observation, supersample)
    return refine_loss(out.silhouette, out.rgb, observation, problem.loss)


@torch.no_grad()
def hard_iou(problem: Problem, R: torch.Tensor, t: torch.Tensor, observation: Observation,
             supersample: int) -> torch.Tensor:
    """(B,) IoU 0..1 of the sharp silhouettes with the observed mask, ignored pixels left out."""
    return soft_iou(sharp_render(problem, R, t, observation, supersample).silhouette,
                    observation.mask, observation.weight)


# ------------------------------------------------------------------------------------ baseline

@dataclass(frozen=True)
class SigmaSchedule:
    """Soft-renderer softness (px^2 at the rendered resolution), geometric from ``start`` to
    ``end`` over the iterations; ignored by backends without one."""

    start: float = 0.4
    end: float = 0.01

    def at(self, fraction: float) -> float:
        """Sigma at ``fraction`` (0..1) of the run."""
        return self.start * (self.end / self.start) ** min(max(fraction, 0.0), 1.0)


@dataclass(frozen=True)
class AdamConfig:
    """``baseline``: Adam at one resolution.

    iterations: fixed count (unless ``stall_tolerance``); lr: Adam's step size; size: the crop's
    longer side in pixels while optimising; rotation / translation: parametrizations (see
    :mod:`.parametrization`); sigma: the soft renderer's annealing; stall_tolerance: stop early
    when no hypothesis' loss fell by more than this over ``patience`` iterations (None: never).
    """

    iterations: int = 100
    lr: float = 0.01
    size: int = 128
    rotation: str = '6d'
    translation: str = 'metric'
    sigma: SigmaSchedule = field(default_factory=SigmaSchedule)
    stall_tolerance: float | None = None
    patience: int = 10

    def __post_init__(self):
        check_rotation(self.rotation)
        check_translation(self.translation)

    @property
    def final_size(self) -> int:
        return self.size


def adam_refine(problem: Problem, R: torch.Tensor, t: torch.Tensor,
                config: AdamConfig) -> Trajectory:
    """Refine poses R (B, 3, 3), t (B, 3) with Adam (see :class:`AdamConfig`)."""
    observation = problem.at_size(config.size)
    scale = TranslationScale(radius=problem.radius, depth=t[:, 2].detach().clone())
    rotation = rotation_to_params(R.detach(), config.rotation).clone().requires_grad_(True)
    translation = translation_to_params(t.detach(), config.translation,
                                        scale).requires_grad_(True)
    optimizer = torch.optim.Adam([rotation, translation], lr=config.lr)
    curves = []
    for iteration in range(config.iterations):
        sigma = config.sigma.at(iteration / max(config.iterations - 1, 1))
        out = render(problem, params_to_rotation(rotation, config.rotation),
                     params_to_translation(translation, config.translation, scale),
                     observation, sigma)
        loss = refine_loss(out.silhouette, out.rgb, observation, problem.loss)
        optimizer.zero_grad()
        loss.sum().backward()  # the sum keeps the hypotheses' gradients independent
        optimizer.step()
        curves.append(loss.detach())
        if _stalled(curves, config.stall_tolerance, config.patience):
            break
    with torch.no_grad():
        return Trajectory(R=params_to_rotation(rotation, config.rotation).detach(),
                          t=params_to_translation(translation, config.translation,
                                                  scale).detach(),
                          curves=torch.stack(curves, dim=1), iterations=len(curves))


def _stalled(curves: list[torch.Tensor], tolerance: float | None, patience: int) -> bool:
    """Whether no hypothesis' best loss fell by more than ``tolerance`` in ``patience`` steps."""
    if tolerance is None or len(curves) <= patience:
        return False
    history = torch.stack(curves, dim=1)
    before = history[:, :-patience].amin(dim=1)
    recent = history[:, -patience:].amin(dim=1)
    return bool(((before - recent) <= tolerance).all())


# -------------------------------------------------------------------------------------- default

@dataclass(frozen=True)
class Level:
    """One resolution of the coarse-to-fine schedule: the crop's longer side ``size`` (px), the
    Gaussian ``blur`` (px at that size) of the residual images, and the point samples per pixel
    (``supersample`` squared) of the sharp render."""

    size: int
    blur: float
    supersample: int = 1


@dataclass(frozen=True)
class LevenbergMarquardtConfig:
    """``default``: Levenberg-Marquardt, coarse to fine (see the module docstring).

    levels: the schedule, coarse first; iterations: at most this many renders per level;
    keep: after each level but the last, only this many hypotheses (the lowest costs) go on to
    the next (None: all);
    damping: initial Marquardt lambda (relative to the diagonal of J^T J); damping_up /
    damping_down: its factor after a rejected / accepted step; a level ends for a hypothesis when
    an accepted step lowers its cost by less than the fraction ``tolerance``, or after
    ``max_rejections`` rejected steps in a row.
    """

    levels: tuple[Level, ...] = (Level(48, 2.0), Level(96, 1.0), Level(128, 0.7, 3))
    iterations: int = 12
    damping: float = 1e-3
    damping_up: float = 8.0
    damping_down: float = 0.25
    tolerance: float = 0.01
    max_rejections: int = 2
    keep: int | None = None

    @property
    def final_size(self) -> int:
        return self.levels[-1].size


@dataclass
class Linearization:
    """Residuals r (B, N) and Jacobian J (B, N, 6) with respect to the local increment of
    :func:`apply_increment`, and the cost (B,) = |r|^2."""

    residual: torch.Tensor
    jacobian: torch.Tensor
    cost: torch.Tensor

    def select(self, index: torch.Tensor) -> 'Linearization':
        """The hypotheses ``index`` (b,) (int64 or bool)."""
        return Linearization(self.residual[index], self.jacobian[index], self.cost[index])

    def assign(self, index: torch.Tensor, other: 'Linearization') -> None:
        """Overwrite hypotheses ``index`` (b,) int64 with ``other`` (b hypotheses)."""
        self.residual[index] = other.residual
        self.jacobian[index] = other.jacobian
        self.cost[index] = other.cost


@torch.no_grad()
def levenberg_marquardt_refine(problem: Problem, R: torch.Tensor, t: torch.Tensor,
                        config: LevenbergMarquardtConfig) -> Trajectory:
    """Refine poses R (B, 3, 3), t (B, 3) by Levenberg-Marquardt (see
    :class:`LevenbergMarquardtConfig`).
    Curves hold NaN for hypotheses no longer refined (``keep``)."""
    R, t = R.detach().clone(), t.detach().clone()
    live = torch.arange(R.shape[0], device=R.device)
    costs = []
    for number, level in enumerate(config.levels):
        observation = problem.at_size(level.size)
        R[live], t[live], level_costs = _levenberg_marquardt_level(problem, observation, level,
                                                                   R[live], t[live], config)
        for cost in level_costs:
            costs.append(torch.full((R.shape[0],), math.nan, dtype=R.dtype,
                                    device=R.device).index_copy(0, live, cost))
        if config.keep is not None and number < len(config.levels) - 1:
            live = live[torch.argsort(level_costs[-1])[:config.keep]]
    return Trajectory(R=R, t=t, curves=torch.stack(costs, dim=1), iterations=len(costs))


def _levenberg_marquardt_level(problem: Problem, observation: Observation, level: Level,
                               R: torch.Tensor, t: torch.Tensor, config: LevenbergMarquardtConfig
                               ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Iterate at one level; returns the poses and the cost (B,) after each pass. Hypotheses that
    have stopped are no longer rendered."""
    R, t = R.clone(), t.clone()
    batch = R.shape[0]
    current = linearize(problem, observation, level, R, t)
    costs = [current.cost.clone()]
    damping = torch.full((batch,), config.damping, dtype=R.dtype, device=R.device)
    rejections = torch.zeros(batch, dtype=torch.long, device=R.device)
    active = torch.ones(batch, dtype=torch.bool, device=R.device)
    for _ in range(config.iterations - 1):
        index = active.nonzero().squeeze(1)
        if len(index) == 0:
            break
        before = current.select(index)
        R_try, t_try = apply_increment(R[index], t[index], _damped_step(before, damping[index]),
                                       problem.radius)
        trial = linearize(problem, observation, level, R_try, t_try)
        accept = trial.cost < before.cost
        gain = (before.cost - trial.cost) / before.cost.clamp(min=1e-12)
        R[index[accept]], t[index[accept]] = R_try[accept], t_try[accept]
        current.assign(index[accept], trial.select(accept))
        damping[index] *= torch.where(accept, config.damping_down, config.damping_up)
        rejections[index] = torch.where(accept, 0, rejections[index] + 1)
        stop = (accept & (gain < config.tolerance)) | (rejections[index] >= config.max_rejections)
        active[index[stop]] = False
        costs.append(current.cost.clone())
    return R, t, costs


def _damped_step(current: Linearization, damping: torch.Tensor) -> torch.Tensor:
    """(B, 6) Levenberg-Marquardt step: (J^T J + lambda diag(J^T J)) delta = -J^T r."""
    J, r = current.jacobian, current.residual
    JtJ = J.transpose(1, 2) @ J
    diagonal = torch.diagonal(JtJ, dim1=1, dim2=2)
    # A floor on the diagonal keeps directions the residual cannot see (no gradient) fixed.
    floor = 1e-9 * diagonal.amax(dim=1, keepdim=True).clamp(min=1e-12)
    system = JtJ + torch.diag_embed(damping[:, None] * diagonal + floor)
    return -torch.linalg.solve(system, (J.transpose(1, 2) @ r[..., None]))[..., 0]


def linearize(problem: Problem, observation: Observation, level: Level, R: torch.Tensor,
              t: torch.Tensor) -> Linearization:
    """Render poses R (B, 3, 3), t (B, 3) once; blurred residuals and their Jacobian."""
    out = sharp_render(problem, R, t, observation, level.supersample)
    silhouette = out.silhouette
    weight, mask = observation.weight, observation.mask
    # Ignored pixels take the render's own value, so that blurring does not carry the
    # occluder's absence of mask into the pixels around it.
    filled_mask = weight * mask + (1.0 - weight) * silhouette
    blurred, gradient = _blur_with_gradient(silhouette[:, None], level.blur)
    target, _ = _blur_with_gradient(filled_mask[:, None], level.blur)
    reach = math.ceil(3 * level.blur) + 1
    # The outline moves as its rim points do, not as the nearer surface seen just inside it.
    rim_motion = _pixel_motion(_rim_depth(out.depth, silhouette, reach), observation.K, t,
                               problem.radius)
    area = (weight * mask).sum().clamp(min=1.0)
    scale = (weight / area.sqrt())[None]
    residuals = [(scale * (blurred - target)[:, 0]).flatten(1)]
    jacobians = [_image_jacobian(gradient[:, :, 0], rim_motion, scale)]
    if problem.loss.colour_weight > 0:
        surface_motion = _pixel_motion(_grow_depth(out.depth, reach), observation.K, t,
                                       problem.radius)
        residual, jacobian = _colour_terms(out, observation, level, surface_motion, rim_motion,
                                           problem.loss)
        residuals.append(residual)
        jacobians.append(jacobian)
    residual = torch.cat(residuals, dim=1)
    return Linearization(residual=residual, jacobian=torch.cat(jacobians, dim=1),
                         cost=(residual * residual).sum(dim=1))


def _colour_terms(out: RenderOutput, observation: Observation, level: Level,
                  surface_motion: torch.Tensor, rim_motion: torch.Tensor, loss: LossConfig
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour residuals (B, 3N) and Jacobian (B, 3N, 6): blurred ``gain * rgb - silhouette *
    image`` over the observed mask, reweighted so that their squares sum to about the
    ``colour_weight``-weighted mean absolute error (iteratively reweighted least squares).
    The render moves with ``surface_motion``, the silhouette factor with ``rim_motion``
    (B, 2, 6, H, W)."""
    silhouette, rgb = out.silhouette, out.rgb
    overlap = observation.weight * observation.mask
    gain = (colour_gain(rgb, silhouette, observation.image, overlap * silhouette)
            if loss.colour_gain else torch.ones_like(rgb[:, 0, 0]))
    rendered = (gain[:, None, None, :] * rgb).permute(0, 3, 1, 2)                  # (B, 3, H, W)
    observed = (silhouette[..., None] * observation.image).permute(0, 3, 1, 2)
    rendered_blur, rendered_gradient = _blur_with_gradient(rendered, level.blur)
    observed_blur, _ = _blur_with_gradient(observed, level.blur)
    _, silhouette_gradient = _blur_with_gradient(silhouette[:, None], level.blur)
    difference = rendered_blur - observed_blur
    count = 3.0 * (overlap * silhouette).sum(dim=(1, 2)).clamp(min=1.0)
    robust = torch.rsqrt(difference.abs() + 1e-3)
    scale = (math.sqrt(loss.colour_weight) * overlap[None, None] * robust
             / count.sqrt()[:, None, None, None])                                 # (B,3,H,W)
    residual = (scale * difference).flatten(1)
    # The observed term changes where the coverage does: d(s * image) = image * ds.
    jacobian = torch.cat([
        _image_jacobian(rendered_gradient[:, :, c], surface_motion, scale[:, c])
        - _image_jacobian(observation.image[:, :, c] * silhouette_gradient[:, :, 0], rim_motion,
                          scale[:, c])
        for c in range(3)], dim=1)
    return residual, jacobian


def _image_jacobian(gradient: torch.Tensor, motion: torch.Tensor,
                    scale: torch.Tensor) -> torch.Tensor:
    """(B, N, 6) Jacobian of ``scale`` (B or 1, H, W) times an image whose spatial gradient is
    ``gradient`` (B, 2, H, W) when its content moves by ``motion`` (B, 2, 6, H, W) px per unit
    increment: dI = -grad(I) . motion."""
    jacobian = -(gradient[:, :, None] * motion).sum(dim=1) * scale[:, None]       # (B, 6, H, W)
    return jacobian.flatten(2).transpose(1, 2)


def _blur_with_gradient(images: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blur (B, C, H, W) of ``images`` (B, C, H, W) with ``sigma`` px, and its spatial
    gradient (B, 2, C, H, W) (d/du, d/dv) by derivative-of-Gaussian filters; zero padding."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    derivative = -x / sigma ** 2 * kernel  # the derivative of the normalised Gaussian
    batch, channels, height, width = images.shape
    flat = images.reshape(batch * channels, 1, height, width)

    def filtered(along_u: torch.Tensor, along_v: torch.Tensor) -> torch.Tensor:
        # conv2d correlates; the flipped derivative kernel turns that into a convolution.
        rows = F.conv2d(flat, along_u.flip(0).view(1, 1, 1, -1), padding=(0, radius))
        return F.conv2d(rows, along_v.flip(0).view(1, 1, -1, 1), padding=(radius, 0))

    blurred = filtered(kernel, kernel).view(batch, channels, height, width)
    gradient = torch.stack([filtered(derivative, kernel), filtered(kernel, derivative)], dim=1)
    return blurred, gradient.view(batch, channels, 2, height, width).transpose(1, 2)


def _pixel_motion(depth: torch.Tensor, K: torch.Tensor, t: torch.Tensor,
                  radius: float) -> torch.Tensor:
    """(B, 2, 6, H, W) image motion (px per unit of each increment component) of the point at
    depth (B, H, W) metres on each pixel's ray, K (3, 3); 0 where the depth is 0."""
    batch, height, width = depth.shape
    v, u = torch.meshgrid(torch.arange(height, dtype=depth.dtype, device=depth.device),
                          torch.arange(width, dtype=depth.dtype, device=depth.device),
                          indexing='ij')
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    z = depth.clamp(min=1e-6)
    x = (u - cx) / fx * depth
    y = (v - cy) / fy * depth
    relative = torch.stack([x, y, depth], dim=1) - t[:, :, None, None]            # (B, 3, H, W)
    zeros = torch.zeros_like(depth)
    # d(point) / d(omega_k) = e_k x relative: the increment rotates about the object's origin.
    px, py, pz = relative.unbind(1)
    d_omega = torch.stack([torch.stack([zeros, -pz, py], dim=1),
                           torch.stack([pz, zeros, -px], dim=1),
                           torch.stack([-py, px, zeros], dim=1)], dim=2)           # (B, 3, 3, H, W)
    d_nu = torch.stack([torch.stack([torch.full_like(depth, radius), zeros, zeros], dim=1),
                        torch.stack([zeros, torch.full_like(depth, radius), zeros], dim=1),
                        t[:, :, None, None].expand(-1, -1, height, width)], dim=2)
    d_point = torch.cat([d_omega, d_nu], dim=2)                                    # (B, 3, 6, H, W)
    du = (fx * d_point[:, 0] - (u - cx) * d_point[:, 2]) / z[:, None]
    dv = (fy * d_point[:, 1] - (v - cy) * d_point[:, 2]) / z[:, None]
    seen = (depth > 0)[:, None]
    return torch.stack([torch.where(seen, du, 0.0), torch.where(seen, dv, 0.0)], dim=1)


def _rim_depth(depth: torch.Tensor, silhouette: torch.Tensor, reach: int) -> torch.Tensor:
    """(B, H, W) depth of the nearest outline pixel within ``reach`` px, 0 farther away: the
    depths (B, H, W) of the silhouette's (B, H, W) border pixels grown inward and outward."""
    inside = (silhouette >= 0.5).to(depth.dtype)[:, None]
    eroded = -F.max_pool2d(-inside, kernel_size=3, stride=1, padding=1)
    border = (inside - eroded)[:, 0] > 0
    return _grow_depth(torch.where(border, depth, 0.0), reach)


def _grow_depth(depth: torch.Tensor, steps: int) -> torch.Tensor:
    """depth (B, H, W) with its 0 pixels filled from their 3 x 3 neighbours, ``steps`` times (the
    largest neighbouring depth)."""
    grown = depth[:, None]
    for _ in range(steps):
        neighbours = F.max_pool2d(grown, kernel_size=3, stride=1, padding=1)
        grown = torch.where(grown > 0, grown, neighbours)
    return grown[:, 0]

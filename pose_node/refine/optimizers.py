"""The two refinement optimizers, both batched over B hypotheses, each of one object in one crop
(several objects and crops may share a batch, see :class:`Problem`).

- ``baseline`` (:class:`AdamConfig`): the paper's recipe (Simpsi et al. 2022, section 3.3): Adam
  on a rotation parametrization (6D by default) and the translation, back-propagating the eq.-3
  loss through the differentiable renderer at one resolution for a fixed number of iterations;
  the soft renderer's sigma is annealed from blurry to sharp.
- ``default`` (:class:`LevenbergMarquardtConfig`): Levenberg-Marquardt on the 6 parameters of a
  local pose increment, coarse to fine. Residuals are Gaussian-blurred difference images of a
  sharp (supersampled) render and the observation: silhouette, plus colour when weighted. Their
  Jacobian is the render's image gradient times the analytic image motion of the 3D point behind
  each pixel (the outline moves with the mesh's rim, the colour with the surface), blurred like
  the residuals: forward-compositional image alignment. The renderer thus runs forward only,
  once per iteration, without gradient; any backend works. A step is kept only when it lowers
  the residual, else the damping grows and the step is solved again; a level ends when the
  residual stalls. On the coarsest level each start also runs as 4 copies turned out of the
  image plane (silhouettes change little under such turns); the best 2 of the 5 go through the
  middle level and the better of those enters the last.
  Measured (15 deg / 10 % starts, 128 px; synthetic: 60 cases; LM-O: the first 120 dev
  instances with the pixels that ``bbox_visib`` clips off the rendered mask ignored, so that the
  truth scores IoU ~1; cost relative to the previous 8 deg / best-1 design, interleaved on the
  same 45 cases):
  - 4 copies at 8 deg, best 1 goes on (previous): synthetic 98.3 %, LM-O ADD(-S) 95.0 %;
  - 8 directions at 8 deg: fixed 1 of the 2 synthetic local minima, none on LM-O;
  - two angles, 8 and 16 deg (9 copies): synthetic 100 %, LM-O 95.0 %, 1.13-1.24x the time;
  - 8 and 16 deg, best 2 through every level: LM-O 96.7 %, but about 1.4x the time (not
    interleaved); narrowing to the best one before the last level kept that accuracy;
  - 8 and 16 deg, best 2 (narrowed): synthetic 100 %, LM-O 96.7 %, 1.24x (1.07x with the last
    level's supersampling 2 instead of 3, but median 0.051 instead of 0.037 deg);
  - 16 deg only, best 2 (narrowed), the default: synthetic 100 %, LM-O 95.8 %, 1.00-1.05x;
  - 12 deg only, best 2: left one synthetic local minimum (3.2 deg) and an ape flip;
  - 8 and 16 deg plus a restart from copies turned by 20 deg when the winner's IoU is below
    0.95: no further case fixed on LM-O (its local minima score 0.95-0.98, as correct poses of
    small or occluded objects do), so not kept; 10 instead of 12 iterations per level saved nothing (levels stop
    earlier anyway).
  Schedule 32 / 64 / 128 px instead of 48 / 96 / 128 px (with the silhouette-only sharp render,
  same accuracy, about a quarter less time): synthetic n=100 99 % instead of 100 % (one case
  ends at 4 deg), 274 instead of about 390 ms per object; LM-O dev (all 356 instances, clipped
  pixels ignored) ADD(-S) 96.1 % instead of 97.5 %. Most of the saving is on the first level,
  where every start runs as 5 copies.
  Sharp renders matter: the soft renderer's outward bias (its coverage grows past the outline)
  moved the optimum by 0.2-0.5 deg at sigma 0.06-0.2 px^2. The blur, applied to render and
  observation alike, widens the basin without moving the optimum.

Poses: object-to-camera R (B, 3, 3), t (B, 3) metres; images as in :mod:`.losses`.
"""
import inspect
import math
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch
import torch.nn.functional as F

from pose_node.geometry import axis_angle_to_matrix
from pose_node.refine.losses import (LossConfig, Observation, lit_colours, loss_terms,
                                     refine_loss, resampled_intrinsics, resized_observation)
from pose_node.refine.motion import grown_depth, pixel_motion, rim_depth
from pose_node.refine.parametrization import (TranslationScale, apply_increment,
                                              check_rotation, check_translation,
                                              params_to_rotation, params_to_translation,
                                              rotation_to_params, translation_to_params)
from pose_node.render.base import Renderer, RenderMesh, RenderOutput, Shading


@dataclass(frozen=True)
class Problem:
    """Hypotheses to refine, of one or more objects: ``renderer`` draws hypothesis b's mesh
    ``meshes[owner[b]]`` to compare with crop ``owner[b]`` of ``crops`` (N crops, at the
    working resolution; ``full``: at full resolution) under ``loss``; owner (B,) int64, or None
    when there is one mesh and crop for any number of hypotheses; ``shading`` of the colour
    render (with normals where the loss fits a lighting model; with a backend that renders
    none, the loss fits a colour gain instead); ``radii`` (N,) metres: each mesh's radius about
    its origin (the unit of lateral steps)."""

    renderer: Renderer
    meshes: tuple[RenderMesh, ...]
    crops: Observation
    owner: torch.Tensor | None
    loss: LossConfig
    shading: Shading
    radii: torch.Tensor
    full: Observation

    @classmethod
    def create(cls, renderer: Renderer, meshes: RenderMesh | list[RenderMesh],
               crops: Observation, owner: torch.Tensor | None = None,
               loss: LossConfig = LossConfig(), shading: Shading = Shading()) -> 'Problem':
        """A problem at full resolution (see the class docstring for ``owner``)."""
        meshes = (meshes,) if isinstance(meshes, RenderMesh) else tuple(meshes)
        if len(meshes) != crops.crops or (owner is None and len(meshes) != 1):
            raise ValueError(f'{len(meshes)} meshes for {crops.crops} crops'
                             + ('' if owner is not None else ' without owners'))
        device = crops.mask.device
        if owner is not None:
            owner = torch.as_tensor(owner, dtype=torch.long, device=device)
        radii = torch.tensor([float(mesh.vertices.norm(dim=1).max()) for mesh in meshes],
                             dtype=crops.mask.dtype, device=device)
        if loss.needs_normals and renderer.renders_normals:
            shading = replace(shading, normals=True)
        elif loss.needs_normals:
            loss = replace(loss, colour_fit='gain')
        return cls(renderer=renderer, meshes=meshes, crops=crops, owner=owner, loss=loss,
                   shading=shading, radii=radii, full=crops)

    def at_size(self, size: int) -> 'Problem':
        """The problem with its crops resampled from full resolution to a longer side of ``size``
        px, never enlarged."""
        longer = max(self.full.width, self.full.height)
        return replace(self, crops=resized_observation(self.full, min(size, longer)))

    def select(self, index: torch.Tensor) -> 'Problem':
        """The hypotheses ``index`` (b,) (int64 or bool; hypothesis index[i] as i)."""
        return self if self.owner is None else replace(self, owner=self.owner[index])

    def repeat(self, copies: int) -> 'Problem':
        """Each hypothesis followed by ``copies - 1`` more of itself."""
        return self if self.owner is None else replace(
            self, owner=self.owner.repeat_interleave(copies))

    @cached_property
    def observation(self) -> Observation:
        """The crops per hypothesis: one crop for all (N = 1) when there is one, else (B, ...)."""
        return self.crops if self.crops.crops == 1 else self.crops.select(self.owner)

    @cached_property
    def radius(self) -> torch.Tensor:
        """(B,) metres: each hypothesis' mesh radius ((1,) for all when owner is None)."""
        return self.radii if self.owner is None else self.radii[self.owner]

    def per_mesh(self, draw, R: torch.Tensor, t: torch.Tensor, K: torch.Tensor, *args, **kwargs):
        """``draw(mesh, R, t, K, *args, **kwargs)`` (a renderer's method, or any function
        returning (b, ...) tensors or a RenderOutput of them) for the B hypotheses' poses
        R (B, 3, 3), t (B, 3) and intrinsics K (B, 3, 3), one call per mesh, the results in
        hypothesis order."""
        if len(self.meshes) == 1:
            return draw(self.meshes[0], R, t, K, *args, **kwargs)
        groups = [(self.owner == crop).nonzero().squeeze(1) for crop in range(len(self.meshes))]
        groups = [(crop, index) for crop, index in enumerate(groups) if len(index)]
        parts = [draw(self.meshes[crop], R[index], t[index], K[index], *args, **kwargs)
                 for crop, index in groups]
        order = torch.argsort(torch.cat([index for _, index in groups]))
        if isinstance(parts[0], RenderOutput):
            planes = [(part.silhouette, part.rgb, part.depth, part.normal) for part in parts]
            return RenderOutput(*(None if plane[0] is None else torch.cat(plane)[order]
                                  for plane in zip(*planes)))
        return torch.cat(parts)[order]


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


def render(problem: Problem, R: torch.Tensor, t: torch.Tensor, sigma: float | None
           ) -> RenderOutput:
    """Render the B hypotheses' poses into their crops; ``sigma`` is used where the backend has
    one."""
    renderer, observation = problem.renderer, problem.observation
    extra = {'sigma': sigma} if sigma is not None and renderer_takes_sigma(renderer) else {}
    K = observation.K.expand(R.shape[0], 3, 3)
    return problem.per_mesh(renderer.render, R, t, K, observation.width, observation.height,
                            problem.shading, **extra)


@torch.no_grad()
def sharp_render(problem: Problem, R: torch.Tensor, t: torch.Tensor,
                 supersample: int = 1) -> RenderOutput:
    """Render the B hypotheses' poses without softness or gradient: with the backend's exact mode
    where it has one (``render_hard``), each pixel the mean of ``supersample`` x ``supersample``
    point samples (silhouette = covered fraction, rgb premultiplied, depth = mean over covered
    samples); else the backend's own render (``supersample`` unused), whose silhouette is
    already a pixel-area coverage. Without a colour term in ``problem.loss`` only the silhouette
    is rendered where the backend can (``render_silhouette``); rgb and depth are then None."""
    hard = getattr(problem.renderer, 'render_hard', None)
    if hard is None:
        return render(problem, R, t, None)
    observation = problem.observation
    size = (observation.width, observation.height)
    width, height = observation.width * supersample, observation.height * supersample
    K = resampled_intrinsics(observation.K, size, (width, height)).expand(R.shape[0], 3, 3)
    silhouette_only = getattr(problem.renderer, 'render_silhouette', None)
    if problem.loss.colour_weight == 0 and silhouette_only is not None:
        silhouette = problem.per_mesh(silhouette_only, R, t, K, width, height)
        if supersample > 1:
            silhouette = F.avg_pool2d(silhouette[:, None], supersample)[:, 0]
        return RenderOutput(silhouette=silhouette, rgb=None, depth=None)
    out = problem.per_mesh(hard, R, t, K, width, height, problem.shading)
    if supersample == 1:
        return out
    surface = [out.rgb] if out.normal is None else [out.rgb, out.normal]
    planes = torch.cat([out.silhouette[:, None], out.depth[:, None]]
                       + [plane.permute(0, 3, 1, 2) for plane in surface], dim=1)
    pooled = F.avg_pool2d(planes, supersample)
    silhouette = pooled[:, 0]
    depth = pooled[:, 1] / silhouette.clamp(min=1e-6)
    return RenderOutput(silhouette=silhouette, rgb=pooled[:, 2:5].permute(0, 2, 3, 1),
                        depth=torch.where(silhouette > 0, depth, 0.0),
                        normal=None if out.normal is None else pooled[:, 5:8].permute(0, 2, 3, 1))


@torch.no_grad()
def evaluate(problem: Problem, R: torch.Tensor, t: torch.Tensor,
             supersample: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The eq.-3 terms (:func:`loss_terms`: IoUs (B,) of the silhouettes with the observed masks,
    ignored pixels left out, and mean colour errors (B,)) of the B hypotheses' poses
    R (B, 3, 3), t (B, 3) against their crops, from one sharp render (no gradient)."""
    out = sharp_render(problem, R, t, supersample)
    return loss_terms(out, problem.observation, problem.loss)


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
    """Refine the B hypotheses' poses R (B, 3, 3), t (B, 3) with Adam (see
    :class:`AdamConfig`)."""
    problem = problem.at_size(config.size)
    scale = TranslationScale(radius=problem.radius, depth=t[:, 2].detach().clone())
    rotation = rotation_to_params(R.detach(), config.rotation).clone().requires_grad_(True)
    translation = translation_to_params(t.detach(), config.translation,
                                        scale).requires_grad_(True)
    optimizer = torch.optim.Adam([rotation, translation], lr=config.lr)
    curves = []
    for iteration in range(config.iterations):
        sigma = config.sigma.at(iteration / max(config.iterations - 1, 1))
        out = render(problem, params_to_rotation(rotation, config.rotation),
                     params_to_translation(translation, config.translation, scale), sigma)
        loss = refine_loss(out, problem.observation, problem.loss)
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
    spread_deg: on the first level each start is joined by copies turned by each of these angles
    (degrees; a float: one angle; 0: no copies) about ``spread_directions`` axes evenly spaced in
    the image plane (out-of-plane turns, under which silhouettes change least); survivors: the
    best this many copies of each start (lowest costs) go on through the middle levels, and the
    best of them enters the last; keep: after each level but the last, only this many
    hypotheses (the lowest costs) go on to the next (None: all); damping: initial Marquardt
    lambda (relative to the diagonal of J^T J); damping_up /
    damping_down: its factor after a rejected / accepted step; a level ends for a hypothesis when
    an accepted step lowers its cost by less than the fraction ``tolerance``, or after
    ``max_rejections`` rejected steps in a row.
    """

    levels: tuple[Level, ...] = (Level(32, 1.5), Level(64, 1.0), Level(128, 0.7, 3))
    iterations: int = 12
    damping: float = 1e-3
    damping_up: float = 8.0
    damping_down: float = 0.25
    tolerance: float = 0.01
    max_rejections: int = 2
    spread_deg: float | tuple[float, ...] = 16.0
    spread_directions: int = 4
    survivors: int = 2
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
    """Refine the B hypotheses' poses R (B, 3, 3), t (B, 3) by Levenberg-Marquardt (see
    :class:`LevenbergMarquardtConfig`); curves hold NaN where a hypothesis was no longer refined
    (``keep``, or a survivor left out of the last level)."""
    batch = R.shape[0]
    R, t = spread_starts(R.detach(), t.detach(), config.spread_deg, config.spread_directions)
    copies = R.shape[0] // batch
    spread = problem.repeat(copies)
    R, t, first_costs = _levenberg_marquardt_level(
        spread.at_size(config.levels[0].size), config.levels[0], R, t, config)
    survivors = min(config.survivors, copies)
    best = first_costs[-1].view(batch, copies).argsort(dim=1)[:, :survivors]
    chosen = (torch.arange(batch, device=R.device)[:, None] * copies + best).flatten()
    R, t, problem = R[chosen], t[chosen], spread.select(chosen)
    costs = [cost[chosen] for cost in first_costs]
    live = torch.arange(batch * survivors, device=R.device)
    for number, level in enumerate(config.levels[1:], start=2):
        if number == len(config.levels):
            live = live[_best_of_each(costs[-1], survivors)[live]]
        if config.keep is not None:
            live = live[torch.argsort(costs[-1][live])[:config.keep]]
        R[live], t[live], level_costs = _levenberg_marquardt_level(
            problem.at_size(level.size).select(live), level, R[live], t[live], config)
        for cost in level_costs:
            costs.append(torch.full((len(chosen),), math.nan, dtype=R.dtype,
                                    device=R.device).index_copy(0, live, cost))
    curves = torch.stack(costs, dim=1)
    winners = _best_of_each(curves[:, -1], survivors).nonzero().squeeze(1)
    return Trajectory(R=R[winners], t=t[winners], curves=curves[winners],
                      iterations=len(costs))


def _best_of_each(costs: torch.Tensor, group: int) -> torch.Tensor:
    """(N,) bool: the lowest of ``costs`` (N,) within each run of ``group`` (NaN counts as
    highest; the first of a group where all are NaN)."""
    lowest = torch.nan_to_num(costs, nan=math.inf).view(-1, group).argmin(dim=1)
    best = torch.zeros(costs.shape[0] // group, group, dtype=torch.bool, device=costs.device)
    best[torch.arange(best.shape[0], device=costs.device), lowest] = True
    return best.flatten()


def spread_starts(R: torch.Tensor, t: torch.Tensor, degrees: float | tuple[float, ...],
                  directions: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Each pose of R (B, 3, 3), t (B, 3) followed by copies turned by each of ``degrees`` about
    ``directions`` axes through the object's origin, evenly spaced in the camera's x-y plane
    from +x: (B * C, 3, 3), (B * C, 3) with C = 1 + len(degrees) * directions; the poses
    themselves where no angle is positive."""
    angles = [math.radians(d) for d in ((degrees,) if isinstance(degrees, (int, float))
                                        else degrees) if d > 0]
    if not angles:
        return R, t
    headings = torch.arange(directions, dtype=R.dtype, device=R.device) * (2 * math.pi
                                                                          / directions)
    axes = torch.stack([headings.cos(), headings.sin(), torch.zeros_like(headings)], dim=1)
    turns = torch.cat([torch.zeros(1, 3, dtype=R.dtype, device=R.device)]
                      + [angle * axes for angle in angles])
    rotations = axis_angle_to_matrix(turns)                                        # (C, 3, 3)
    return ((rotations[None] @ R[:, None]).flatten(0, 1),
            t.repeat_interleave(len(turns), dim=0))


def _levenberg_marquardt_level(problem: Problem, level: Level, R: torch.Tensor, t: torch.Tensor,
                               config: LevenbergMarquardtConfig
                               ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Iterate at one level (``problem`` at its size); returns the poses and the cost (B,) after
    each pass. Hypotheses that have stopped are no longer rendered."""
    R, t = R.clone(), t.clone()
    batch = R.shape[0]
    current = linearize(problem, level, R, t)
    costs = [current.cost.clone()]
    damping = torch.full((batch,), config.damping, dtype=R.dtype, device=R.device)
    rejections = torch.zeros(batch, dtype=torch.long, device=R.device)
    active = torch.ones(batch, dtype=torch.bool, device=R.device)
    for step in range(1, config.iterations):
        index = active.nonzero().squeeze(1)
        if len(index) == 0:
            break
        before, active_problem = current.select(index), problem.select(index)
        R_try, t_try = apply_increment(R[index], t[index], _damped_step(before, damping[index]),
                                       active_problem.radius)
        trial = residuals(active_problem, level, R_try, t_try)
        accept = trial.cost < before.cost
        gain = (before.cost - trial.cost) / before.cost.clamp(min=1e-12)
        R[index[accept]], t[index[accept]] = R_try[accept], t_try[accept]
        current.cost[index[accept]] = trial.cost[accept]
        damping[index] *= torch.where(accept, config.damping_down, config.damping_up)
        rejections[index] = torch.where(accept, 0, rejections[index] + 1)
        stop = (accept & (gain < config.tolerance)) | (rejections[index] >= config.max_rejections)
        active[index[stop]] = False
        # Only hypotheses that take another step need the Jacobian at their new pose.
        going_on = accept & ~stop
        if step < config.iterations - 1 and going_on.any():
            moved = trial.select(going_on)
            current.assign(index[going_on], Linearization(
                residual=moved.residual, cost=moved.cost,
                jacobian=jacobian(active_problem.select(going_on), level, R_try[going_on],
                                  t_try[going_on], moved)))
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


@dataclass
class Residuals:
    """One sharp render ``out`` of B poses, its residuals r (B, N) and cost (B,) = |r|^2, and,
    with a colour term, what their Jacobian shares: the per-pixel scales of the colour residuals
    (B, 3, H, W) and the render's colours under the fitted lighting, ``lit`` (B, 3, H, W)
    (both None without)."""

    out: RenderOutput
    residual: torch.Tensor
    cost: torch.Tensor
    colour_scale: torch.Tensor | None
    lit: torch.Tensor | None

    def select(self, index: torch.Tensor) -> 'Residuals':
        """The hypotheses ``index`` (b,) (int64 or bool)."""
        out = RenderOutput(*(None if plane is None else plane[index]
                             for plane in (self.out.silhouette, self.out.rgb, self.out.depth,
                                           self.out.normal)))
        return Residuals(out, self.residual[index], self.cost[index],
                         *(None if plane is None else plane[index]
                           for plane in (self.colour_scale, self.lit)))


def residuals(problem: Problem, level: Level, R: torch.Tensor, t: torch.Tensor) -> Residuals:
    """Render the B hypotheses' poses R (B, 3, 3), t (B, 3) once; their blurred, weighted
    residuals."""
    observation = problem.observation
    out = sharp_render(problem, R, t, level.supersample)
    silhouette = out.silhouette[:, None]                                           # (B, 1, H, W)
    weight, mask = observation.weight[:, None], observation.mask[:, None]         # (N, 1, H, W)
    # Ignored pixels take the render's own value, so that blurring does not carry the
    # occluder's absence of mask into the pixels around it.
    filled_mask = weight * mask + (1.0 - weight) * silhouette
    parts = [_silhouette_scale(observation) * _gaussian_blur(silhouette - filled_mask,
                                                             level.blur)]
    colour_scale = lit = None
    if problem.loss.colour_weight > 0:
        lit = lit_colours(out, observation, problem.loss.colour_fit).permute(0, 3, 1, 2)
        residual, colour_scale = _colour_residuals(out, lit, observation, level, problem.loss)
        parts.append(residual)
    residual = torch.cat([part.reshape(R.shape[0], -1) for part in parts], dim=1)
    return Residuals(out=out, residual=residual, cost=(residual * residual).sum(dim=1),
                     colour_scale=colour_scale, lit=lit)


def jacobian(problem: Problem, level: Level, R: torch.Tensor, t: torch.Tensor,
             rendered: Residuals) -> torch.Tensor:
    """(B, M, 6) derivatives of ``rendered``'s M residuals (of the B hypotheses' poses
    R (B, 3, 3), t (B, 3)) with respect to the local increment of :func:`apply_increment`."""
    observation = problem.observation
    reach = math.ceil(3 * level.blur) + 1
    K = observation.K.expand(R.shape[0], 3, 3)
    rim = problem.per_mesh(rim_depth, R, t, K, observation.width, observation.height)
    rim_motion = pixel_motion(grown_depth(rim, reach), K, t, problem.radius)
    silhouette_change = _content_change(rendered.out.silhouette[:, None], rim_motion)
    parts = [_silhouette_scale(observation)[:, :, None]
             * _blurred_change(silhouette_change, level.blur)]
    if rendered.colour_scale is not None:
        surface_motion = pixel_motion(grown_depth(rendered.out.depth, reach), K, t,
                                      problem.radius)
        parts.append(_colour_jacobian(rendered, observation, level, surface_motion,
                                      silhouette_change))
    return torch.cat([part.movedim(2, -1).reshape(R.shape[0], -1, 6) for part in parts], dim=1)


def linearize(problem: Problem, level: Level, R: torch.Tensor, t: torch.Tensor) -> Linearization:
    """Render the B hypotheses' poses R (B, 3, 3), t (B, 3) once; blurred residuals and their
    Jacobian."""
    rendered = residuals(problem, level, R, t)
    return Linearization(residual=rendered.residual, cost=rendered.cost,
                         jacobian=jacobian(problem, level, R, t, rendered))


def _silhouette_scale(observation: Observation) -> torch.Tensor:
    """(N, 1, H, W) weights of the silhouette residuals: ignored pixels 0, the others normalised
    by the observed mask's size."""
    weight = observation.weight[:, None]
    size = (weight * observation.mask[:, None]).sum(dim=(2, 3), keepdim=True)
    return weight / size.clamp(min=1.0).sqrt()


def _colour_residuals(out: RenderOutput, lit: torch.Tensor, observation: Observation,
                      level: Level, loss: LossConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Colour residuals (B, 3, H, W) and their scales (B, 3, H, W): blurred ``lit - silhouette *
    image`` (``lit`` (B, 3, H, W): :func:`lit_colours` of ``out``) over the observed mask,
    reweighted so that their squares sum to about the ``colour_weight``-weighted mean absolute
    error (iteratively reweighted least squares)."""
    silhouette = out.silhouette
    overlap = observation.weight * observation.mask                                # (N, H, W)
    image = observation.image.permute(0, 3, 1, 2)                                  # (N, 3, H, W)
    difference = _gaussian_blur(lit - silhouette[:, None] * image, level.blur)
    count = 3.0 * (overlap * silhouette).sum(dim=(1, 2)).clamp(min=1.0)
    robust = torch.rsqrt(difference.abs() + 1e-3)
    scale = (math.sqrt(loss.colour_weight) * overlap[:, None] * robust
             / count.sqrt()[:, None, None, None])
    return scale * difference, scale


def _colour_jacobian(rendered: Residuals, observation: Observation, level: Level,
                     surface_motion: torch.Tensor, silhouette_change: torch.Tensor
                     ) -> torch.Tensor:
    """(B, 3, 6, H, W) derivatives of the colour residuals: the render moves with
    ``surface_motion`` (B, 2, 6, H, W); ``silhouette_change`` (B, 1, 6, H, W) is the unblurred
    silhouette's derivative (the fitted lighting and the scales are held fixed)."""
    image = observation.image.permute(0, 3, 1, 2)                                  # (N, 3, H, W)
    # The observed term changes where the coverage does: d(s * image) = image * ds.
    change = (_content_change(rendered.lit, surface_motion)
              - image[:, :, None] * silhouette_change)
    return rendered.colour_scale[:, :, None] * _blurred_change(change, level.blur)


FINE_GRADIENT_SIGMA = 0.5
"""Gaussian sigma (px) of the image gradient that moves content before the residuals' blur."""


def _content_change(images: torch.Tensor, motion: torch.Tensor) -> torch.Tensor:
    """(B, C, 6, H, W) change of images (B, C, H, W) per unit increment when their content moves
    by ``motion`` (B, 2, 6, H, W) px: -grad(I) . motion, with a fine Gaussian gradient (the
    images are sharp renders)."""
    gradient = _gaussian_gradient(images, FINE_GRADIENT_SIGMA)                     # (B,2,C,H,W)
    return -(gradient[:, :, :, None] * motion[:, :, None]).sum(dim=1)


def _blurred_change(change: torch.Tensor, blur: float) -> torch.Tensor:
    """The derivative (B, C, 6, H, W) of blurred residuals from ``change`` (B, C, 6, H, W):
    blurring after multiplying by the motion, which varies along the outline, keeps the
    Jacobian close to the finite differences of the blurred residuals."""
    remaining = math.sqrt(max(blur ** 2 - FINE_GRADIENT_SIGMA ** 2, 0.0))
    if remaining < 0.1:
        return change
    batch, channels, _, height, width = change.shape
    return _gaussian_blur(change.reshape(batch, channels * 6, height, width),
                          remaining).view(change.shape)


def _gaussian_kernels(sigma: float, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A normalised 1D Gaussian of ``sigma`` px and its derivative, radius ceil(3 sigma)."""
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=like.dtype, device=like.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    # Scaled by the sampled kernel's variance rather than sigma^2 (14 % apart at 0.5 px), so
    # that the derivative of a linear ramp comes out exact.
    return kernel, -x * kernel / (x * x * kernel).sum()


def _separable(images: torch.Tensor, along_u: torch.Tensor, along_v: torch.Tensor
               ) -> torch.Tensor:
    """images (B, C, H, W) convolved with along_u (k,) along rows and along_v (k,) along columns;
    zero padding."""
    batch, channels, height, width = images.shape
    planes, radius = batch * channels, (len(along_u) - 1) // 2
    # One depthwise convolution over all planes: 3-4x faster on CPU than the same planes as a
    # batch of single-channel images. conv2d correlates; flipped kernels make it a convolution.
    flat = images.reshape(1, planes, height, width)
    rows = F.conv2d(flat, along_u.flip(0).view(1, 1, 1, -1).expand(planes, 1, 1, -1),
                    padding=(0, radius), groups=planes)
    return F.conv2d(rows, along_v.flip(0).view(1, 1, -1, 1).expand(planes, 1, -1, 1),
                    padding=(radius, 0), groups=planes).view(batch, channels, height, width)


def _gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur (B, C, H, W) of ``images`` (B, C, H, W) with ``sigma`` px."""
    kernel, _ = _gaussian_kernels(sigma, images)
    return _separable(images, kernel, kernel)


def _gaussian_gradient(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Spatial gradient (B, 2, C, H, W) (d/du, d/dv) of ``images`` (B, C, H, W) blurred with
    ``sigma`` px, by derivative-of-Gaussian filters."""
    kernel, derivative = _gaussian_kernels(sigma, images)
    return torch.stack([_separable(images, derivative, kernel),
                        _separable(images, kernel, derivative)], dim=1)

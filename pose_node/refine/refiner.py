"""Render-and-compare refinement of K_h pose hypotheses of one object in one crop.

Order of work in :func:`refine`:
1. re-centre each start laterally so that its rendered silhouette's centroid (over the pixels
   that count) lies on the observed mask's (without it a 10 %-of-distance start often leaves a
   tight crop, where the IoU has no gradient);
2. refine all hypotheses as one batch with the chosen optimizer;
3. score every start and every result with the eq.-3 loss of sharp (supersampled, not soft)
   renders at the optimizer's final resolution; a result not better than its start is replaced
   by the start (divergence guard);
4. the hypothesis with the lowest loss wins; its score is the IoU of its sharp silhouette, taken
   from the render of step 3 (no second render of the winner).

Poses are object-to-camera (4, 4) with translations in metres, on the mesh's device and dtype.
"""
import time
from dataclasses import dataclass

import torch

from pose_node.geometry import make_pose
from pose_node.refine.losses import LossConfig, Observation
from pose_node.refine.optimizers import (AdamConfig, LevenbergMarquardtConfig, Problem,
                                         adam_refine, evaluate, levenberg_marquardt_refine,
                                         sharp_render)
from pose_node.render.base import Renderer, RenderMesh, Shading

OPTIMIZERS = ('baseline', 'default')

OptimizerConfig = AdamConfig | LevenbergMarquardtConfig


def make_optimizer(name: str, **overrides) -> OptimizerConfig:
    """The configuration of optimizer ``name`` ('baseline': Adam, the paper's recipe; 'default':
    coarse-to-fine Levenberg-Marquardt) with fields replaced by ``overrides``."""
    if name == 'baseline':
        return AdamConfig(**overrides)
    if name == 'default':
        return LevenbergMarquardtConfig(**overrides)
    raise ValueError(f'unknown optimizer {name!r}; choose one of {", ".join(OPTIMIZERS)}')


@dataclass
class RefineResult:
    """The outcome of :func:`refine` for K_h hypotheses.

    pose (4, 4): the winner, metres; score: IoU 0..1 of its sharp silhouette with the observed
    mask (ignored pixels left out); hypothesis: the winner's index; diverged: the winner's
    refinement ended worse than its start, so ``pose`` is that start unchanged.
    poses (K_h, 4, 4): every hypothesis' result after the guard; start_losses, final_losses
    (K_h,): eq.-3 losses of the given starts and of the optimizer's results (before the guard),
    at the final resolution; loss_curve (n,): the winner's objective per iteration (see
    ``Trajectory``); iterations: iterations run; elapsed_ms: wall time of the whole call.
    """

    pose: torch.Tensor
    score: float
    hypothesis: int
    diverged: bool
    poses: torch.Tensor
    start_losses: torch.Tensor
    final_losses: torch.Tensor
    loss_curve: torch.Tensor
    iterations: int
    elapsed_ms: float

    @property
    def R(self) -> torch.Tensor:
        return self.pose[:3, :3]

    @property
    def t(self) -> torch.Tensor:
        return self.pose[:3, 3]


def refine(observation: Observation, mesh: RenderMesh, poses, renderer: Renderer,
           optimizer: OptimizerConfig = LevenbergMarquardtConfig(), loss: LossConfig = LossConfig(),
           shading: Shading = Shading(), recentre: bool = True,
           score_supersample: int = 2) -> RefineResult:
    """Refine hypotheses ``poses`` ((K_h, 4, 4), or a pair (R (K_h, 3, 3), t (K_h, 3))) of ``mesh``
    against ``observation`` with ``renderer``; see the module docstring. Losses and the score use
    sharp renders with ``score_supersample`` squared point samples per pixel."""
    started = time.perf_counter()
    R_start, t_start = _pose_batch(poses, mesh)
    problem = Problem.create(renderer, mesh, observation, loss, shading)
    t_init = t_start
    if recentre:
        t_init = recentred_translations(problem, R_start, t_start,
                                        problem.at_size(_first_size(optimizer)))
    if isinstance(optimizer, AdamConfig):
        trajectory = adam_refine(problem, R_start, t_init, optimizer)
    else:
        trajectory = levenberg_marquardt_refine(problem, R_start, t_init, optimizer)
    losses, ious = evaluate(problem, torch.cat([R_start, trajectory.R]),
                            torch.cat([t_start, trajectory.t]),
                            problem.at_size(optimizer.final_size), score_supersample)
    start_losses, final_losses = losses.chunk(2)
    kept, losses = guarded(final_losses, start_losses)
    R = torch.where(kept[:, None, None], trajectory.R, R_start)
    t = torch.where(kept[:, None], trajectory.t, t_start)
    winner = int(torch.argmin(losses))
    start_ious, final_ious = ious.chunk(2)
    score = float(final_ious[winner] if kept[winner] else start_ious[winner])
    all_poses = make_pose(R, t)
    return RefineResult(pose=all_poses[winner], score=score, hypothesis=winner,
                        diverged=not bool(kept[winner]), poses=all_poses,
                        start_losses=start_losses, final_losses=final_losses,
                        loss_curve=trajectory.curves[winner], iterations=trajectory.iterations,
                        elapsed_ms=1e3 * (time.perf_counter() - started))


def guarded(final_losses: torch.Tensor, start_losses: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Divergence guard: which results (K_h,) bool are kept (strictly better than their starts,
    and finite) and the losses (K_h,) of what is returned (the start's where not kept)."""
    kept = torch.isfinite(final_losses) & (final_losses < start_losses)
    return kept, torch.where(kept, final_losses, start_losses)


def _first_size(optimizer: OptimizerConfig) -> int:
    return optimizer.size if isinstance(optimizer, AdamConfig) else optimizer.levels[0].size


def _pose_batch(poses, mesh: RenderMesh) -> tuple[torch.Tensor, torch.Tensor]:
    """(R (K_h, 3, 3), t (K_h, 3)) in the mesh's dtype and device from (K_h, 4, 4) or (R, t)."""
    like = dict(dtype=mesh.vertices.dtype, device=mesh.device)
    if isinstance(poses, tuple):
        R, t = (torch.as_tensor(p, **like) for p in poses)
    else:
        T = torch.as_tensor(poses, **like)
        R, t = T[..., :3, :3], T[..., :3, 3]
    R, t = R.reshape(-1, 3, 3), t.reshape(-1, 3)
    if R.shape[0] != t.shape[0] or R.shape[0] == 0:
        raise ValueError(f'expected K_h >= 1 rotations and translations, got {R.shape[0]} and '
                         f'{t.shape[0]}')
    return R, t


@torch.no_grad()
def recentred_translations(problem: Problem, R: torch.Tensor, t: torch.Tensor,
                           observation: Observation, passes: int = 2) -> torch.Tensor:
    """Translations (B, 3) moved parallel to the image plane (depth kept) so that the sharp
    silhouettes of poses R (B, 3, 3), t (B, 3) have their centroid on the observed mask's, both
    over the pixels that count (weight); a silhouette outside the crop uses the projection of the
    mesh's centroid instead. Unchanged when the observed mask is empty."""
    weights = observation.weight * observation.mask
    if weights.sum() <= 0:
        return t
    target = _centroid(weights[None])[0]
    fx, fy = observation.K[0, 0], observation.K[1, 1]
    for _ in range(passes):
        rendered = sharp_render(problem, R, t, observation).silhouette * observation.weight
        centroid = _centroid(rendered)
        projected = _projected_mesh_centre(problem.mesh, R, t, observation.K)
        empty = rendered.sum(dim=(1, 2)) <= 0
        centroid = torch.where(empty[:, None], projected, centroid)
        shift = target[None] - centroid                                               # (B, 2) px
        t = t + torch.stack([shift[:, 0] / fx, shift[:, 1] / fy,
                             torch.zeros_like(shift[:, 0])], dim=1) * t[:, 2:]
    return t


def _centroid(images: torch.Tensor) -> torch.Tensor:
    """(B, 2) weighted mean pixel (u, v) of images (B, H, W); NaN-free (0, 0) for empty ones."""
    _, height, width = images.shape
    v = torch.arange(height, dtype=images.dtype, device=images.device)
    u = torch.arange(width, dtype=images.dtype, device=images.device)
    total = images.sum(dim=(1, 2)).clamp(min=1e-12)
    return torch.stack([(images.sum(dim=1) * u).sum(dim=1) / total,
                        (images.sum(dim=2) * v).sum(dim=1) / total], dim=1)


def _projected_mesh_centre(mesh: RenderMesh, R: torch.Tensor, t: torch.Tensor,
                           K: torch.Tensor) -> torch.Tensor:
    """(B, 2) pixel of the mesh's vertex centroid at poses R (B, 3, 3), t (B, 3)."""
    centre = R @ mesh.vertices.mean(dim=0) + t
    image = centre @ K.T
    return image[:, :2] / image[:, 2:].clamp(min=1e-6)

"""Render-and-compare refinement of K_h pose hypotheses of one object in one crop
(:func:`refine`), or of several objects, each with its hypotheses and crop, in one batch
(:func:`refine_objects`: one render per iteration for all of them, which saves the per-call
overhead that dominates small crops on a CPU and keeps a GPU busy).

Order of work:
1. re-centre each start laterally so that its rendered silhouette's centroid (over the pixels
   that count) lies on the observed mask's (without it a 10 %-of-distance start often leaves a
   tight crop, where the IoU has no gradient);
2. refine all hypotheses as one batch with the chosen optimizer;
3. score every start and every result with the eq.-3 loss of sharp (supersampled, not soft)
   renders at the optimizer's final resolution; a result not better than its start is replaced
   by the start (divergence guard);
4. the hypothesis with the lowest loss wins, colour weighed by the loss's
   ``selection_colour_weight`` here; its score is the IoU of its sharp silhouette, taken from
   the render of step 3 (no second render of the winner).

Poses are object-to-camera (4, 4) with translations in metres, on the mesh's device and dtype.
"""
import itertools
import time
from dataclasses import dataclass

import torch

from pose_node.geometry import make_pose
from pose_node.refine.losses import LossConfig, Observation, eq3_loss, stacked_observations
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
    against ``observation`` (one crop) with ``renderer``; see the module docstring. Losses and the
    score use sharp renders with ``score_supersample`` squared point samples per pixel."""
    (result,) = refine_objects([observation], [mesh], [poses], renderer, optimizer, loss, shading,
                               recentre, score_supersample)
    return result


def refine_objects(observations: list[Observation], meshes: list[RenderMesh], poses: list,
                   renderer: Renderer, optimizer: OptimizerConfig = LevenbergMarquardtConfig(),
                   loss: LossConfig = LossConfig(), shading: Shading = Shading(),
                   recentre: bool = True, score_supersample: int = 2) -> list[RefineResult]:
    """:func:`refine` for several objects at once, all their hypotheses in one batch: object i's
    hypotheses ``poses[i]`` of ``meshes[i]`` against ``observations[i]`` (one crop each, all of
    one size). One result per object; ``elapsed_ms`` and ``iterations`` are the whole batch's."""
    started = time.perf_counter()
    if not len(observations) == len(meshes) == len(poses) or not observations:
        raise ValueError(f'expected one observation, mesh and set of poses per object, got '
                         f'{len(observations)}, {len(meshes)} and {len(poses)}')
    starts = [_pose_batch(pose, mesh) for pose, mesh in zip(poses, meshes)]
    counts = [len(R) for R, _ in starts]
    R_start = torch.cat([R for R, _ in starts])
    t_start = torch.cat([t for _, t in starts])
    owner = torch.repeat_interleave(torch.arange(len(counts), device=R_start.device),
                                    torch.as_tensor(counts, device=R_start.device))
    problem = Problem.create(renderer, meshes, stacked_observations(observations),
                             owner if len(meshes) > 1 else None, loss, shading)
    t_init = t_start
    if recentre:
        t_init = recentred_translations(problem.at_size(_first_size(optimizer)), R_start, t_start)
    if isinstance(optimizer, AdamConfig):
        trajectory = adam_refine(problem, R_start, t_init, optimizer)
    else:
        trajectory = levenberg_marquardt_refine(problem, R_start, t_init, optimizer)
    batch = len(owner)
    both = torch.arange(batch, device=owner.device).repeat(2)
    ious, colour = evaluate(problem.at_size(optimizer.final_size).select(both),
                            torch.cat([R_start, trajectory.R]),
                            torch.cat([t_start, trajectory.t]), score_supersample)
    start_losses, final_losses = eq3_loss(ious, colour, loss.colour_weight).chunk(2)
    kept = guarded(final_losses, start_losses)
    R = torch.where(kept[:, None, None], trajectory.R, R_start)
    t = torch.where(kept[:, None], trajectory.t, t_start)
    start_ious, final_ious = ious.chunk(2)
    start_selection, final_selection = eq3_loss(ious, colour,
                                                loss.selection_colour_weight).chunk(2)
    selection = torch.where(kept, final_selection, start_selection)
    all_poses = make_pose(R, t)
    elapsed_ms = 1e3 * (time.perf_counter() - started)
    results = []
    for first, count in zip(itertools.accumulate([0] + counts[:-1]), counts):
        own = slice(first, first + count)
        winner = int(torch.argmin(selection[own]))
        best = first + winner
        results.append(RefineResult(
            pose=all_poses[best], score=float(final_ious[best] if kept[best] else start_ious[best]),
            hypothesis=winner, diverged=not bool(kept[best]), poses=all_poses[own],
            start_losses=start_losses[own], final_losses=final_losses[own],
            loss_curve=trajectory.curves[best], iterations=trajectory.iterations,
            elapsed_ms=elapsed_ms))
    return results


def guarded(final_losses: torch.Tensor, start_losses: torch.Tensor) -> torch.Tensor:
    """Divergence guard: which results (K_h,) bool are kept (strictly better than their starts,
    and finite); the start is returned where not."""
    return torch.isfinite(final_losses) & (final_losses < start_losses)


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
                           passes: int = 2) -> torch.Tensor:
    """Translations (B, 3) moved parallel to the image plane (depth kept) so that the sharp
    silhouettes of the B hypotheses' poses R (B, 3, 3), t (B, 3) have their centroid on their
    observed mask's (``problem`` at the working size), both over the pixels that count (weight);
    a silhouette outside the crop uses the projection of the mesh's centroid instead. Unchanged
    where the observed mask is empty."""
    observation = problem.observation
    weights = observation.weight * observation.mask                                # (N, H, W)
    has_mask = (weights.sum(dim=(1, 2)) > 0).expand(R.shape[0])
    target = _centroid(weights)                                                    # (N, 2) px
    K = observation.K.expand(R.shape[0], 3, 3)
    fx, fy = K[:, 0, 0], K[:, 1, 1]
    for _ in range(passes):
        rendered = sharp_render(problem, R, t).silhouette * observation.weight
        centroid = _centroid(rendered)
        projected = problem.per_mesh(_projected_mesh_centre, R, t, K)
        empty = rendered.sum(dim=(1, 2)) <= 0
        centroid = torch.where(empty[:, None], projected, centroid)
        shift = torch.where(has_mask[:, None], target - centroid, 0.0)                # (B, 2) px
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
    """(B, 2) pixel of the mesh's vertex centroid at poses R (B, 3, 3), t (B, 3) through
    intrinsics K (B, 3, 3)."""
    centre = R @ mesh.vertices.mean(dim=0) + t
    image = (K @ centre[:, :, None])[:, :, 0]
    return image[:, :2] / image[:, 2:].clamp(min=1e-6)

"""The pipeline API (no ROS): an image and its intrinsics in, a refined pose per known object out.

Data flows one way, per object:
1. mask: the object's visible mask from ``masks`` (an upstream segmenter or label image); else,
   for an object an upstream detector boxed, the built-in ``segmenter``'s mask inside the box,
   or the box's GrabCut foreground when the segmenter finds nothing there (or there is none);
   else the ``segmenter``'s mask; an object without a mask is not estimated this frame;
2. crop: a square around the mask's box (in tracking mode joined with the prior pose's projected
   box; for the coarse estimator around the mask and the object's hidden part, where known)
   enlarged by ``crop_scale`` and resampled to ``crop_size``, with its intrinsics; the other
   objects' masks are ignored pixels, so occluders do not drag the pose, and so are the
   ``ignore`` pixels and the hidden parts the segmenter finds, with the unsure bands around them
   (of the objects it segmented, where no mask claims them): an occluder no mask names does not
   cut the object short;
3. hypotheses: the prior pose when one is given (tracking: detection is skipped), else the coarse
   estimator's top ``hypotheses``;
4. refinement: render-and-compare of all hypotheses of all objects that share an optimizer
   (tracked from a prior, or detected) and a loss as one batch (:func:`refine_objects`); per
   object the lowest final loss wins and its silhouette IoU is the score.

Units: metres; poses object-to-camera (4, 4) float64 in the image's camera frame (REP 103 optical);
images (H, W, 3) float32 0..1 or uint8; K (3, 3) pixels (the rectified or undistorted image's).
"""
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pose_node.coarse import CoarseEstimator, Hypotheses
from pose_node.crop import CROP_SCALE, Segmenter, box_foreground, box_pixels, cut_crop, mask_box, \
    projected_box, union_box
from pose_node.mesh import ObjectModel
from pose_node.refine import (Level, LossConfig, Observation, make_observation, make_optimizer,
                              refine_objects)
from pose_node.refine.refiner import OptimizerConfig
from pose_node.render import Renderer, RenderMesh, make_renderer

RENDER_MAX_FACES = 4000
TRACKING_OVERRIDES = {'spread_deg': 0.0, 'levels': (Level(80, 0.5),), 'iterations': 12}
"""The default optimizer's settings for starts from a prior pose: one small sharp level without
supersampling, no extra starts; it usually stops before 12 iterations. Tracking a 20-frame
synthetic demo stream with exact masks (1 thread): median 0.28 deg / 0.37 mm in 89 ms per frame;
at 96 px 0.21 deg / 0.28 mm in 116 ms, at 64 px 0.31 deg / 0.49 mm in 70 ms. 80 px is the
largest level whose frame time stays under a 10 Hz camera's period on 2 cores once the node's
own work is added (bench-node: p95 199 ms against 253 ms at 96 px)."""
TRACKING_REFINE = {'recentre': False, 'score_supersample': 1}
"""refine() options for starts from a prior pose. A prior is already where the object was; moving
it onto the centroid of an imprecise mask (the segmenter's) cost accuracy: on 2 x 29 tracked demo
frames with the segmenter's masks, median 3.4 deg and one 60 deg loss with recentring, 1.5 deg
without."""


@dataclass(frozen=True)
class PipelineConfig:
    """crop_size: crop side in pixels; crop_scale: enlargement of the square around the box;
    hypotheses: coarse hypotheses refined per object; optimizer: 'default' or 'baseline', with
    ``optimizer_overrides`` replacing fields of its configuration, for starts from the coarse
    estimators; tracking_optimizer and tracking_overrides: the same for starts from prior poses;
    min_mask_pixels: smaller masks are not trusted; loss: the refinement loss; object_losses:
    per object name a loss replacing ``loss`` (e.g. a colour term for a mesh whose colours
    match the camera's)."""

    crop_size: int = 128
    crop_scale: float = CROP_SCALE
    hypotheses: int = 8
    optimizer: str = 'default'
    optimizer_overrides: dict = field(default_factory=dict)
    tracking_optimizer: str = 'default'
    tracking_overrides: dict = field(default_factory=lambda: dict(TRACKING_OVERRIDES))
    min_mask_pixels: int = 20
    loss: LossConfig = LossConfig()
    object_losses: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.crop_size < 16:
            raise ValueError(f'crop_size must be >= 16 px, got {self.crop_size}')
        if self.crop_scale < 1.0:
            raise ValueError(f'crop_scale must be >= 1, got {self.crop_scale}')
        if self.hypotheses < 1:
            raise ValueError(f'hypotheses must be >= 1, got {self.hypotheses}')
        self.optimizers()  # fails early on a bad name or field

    def optimizers(self) -> tuple[OptimizerConfig, OptimizerConfig]:
        """The optimizer configurations for coarse starts and for prior (tracking) starts."""
        return (make_optimizer(self.optimizer, **self.optimizer_overrides),
                make_optimizer(self.tracking_optimizer, **self.tracking_overrides))


@dataclass
class PoseEstimate:
    """The refined pose of one object: pose (4, 4) metres; score 0..1 the silhouette IoU with the
    observed mask; source of the winning start ('prior', 'templates', 'regressor'); diverged: the
    refinement did not improve on the start (the start is returned); timings_ms per stage
    ('segment' shared by all objects of the frame, 'crop', 'coarse', 'refine' shared by the
    objects refined in one batch)."""

    name: str
    pose: np.ndarray
    score: float
    source: str
    diverged: bool
    timings_ms: dict[str, float]

    @property
    def R(self) -> np.ndarray:
        return self.pose[:3, :3]

    @property
    def t(self) -> np.ndarray:
        return self.pose[:3, 3]


class Pipeline:
    """Estimates the poses of ``models`` in images (see the module docstring).

    segmenter: finds masks when none are given; coarse: per object name its estimator of
    hypotheses (objects without one can only be tracked from prior poses); renderer: the
    differentiable backend (default: ``make_renderer('auto', device)``).
    """

    def __init__(self, models: list[ObjectModel], device: torch.device,
                 config: PipelineConfig = PipelineConfig(), segmenter: Segmenter | None = None,
                 coarse: dict[str, CoarseEstimator] | None = None,
                 renderer: Renderer | None = None):
        names = [model.name for model in models]
        if len(set(names)) != len(names):
            raise ValueError(f'object names must be unique, got {names}')
        self.models = {model.name: model for model in models}
        self.device = device
        self.config = config
        self.segmenter = segmenter
        self.coarse = dict(coarse or {})
        unknown = set(self.coarse) - set(self.models)
        if unknown:
            raise ValueError(f'coarse estimators for unknown objects: {sorted(unknown)}')
        self.renderer = renderer or make_renderer('soft', device)
        self.detection_optimizer, self.tracking_optimizer = config.optimizers()
        self.meshes = {model.name: RenderMesh.from_model(model, device, RENDER_MAX_FACES)
                       for model in models}

    @property
    def names(self) -> list[str]:
        return list(self.models)

    def estimate(self, image: np.ndarray, K: np.ndarray,
                 masks: dict[str, np.ndarray] | None = None,
                 prior_poses: dict[str, np.ndarray] | None = None,
                 ignore: np.ndarray | None = None,
                 boxes: dict[str, np.ndarray] | None = None,
                 hidden: dict[str, np.ndarray] | None = None) -> dict[str, PoseEstimate]:
        """Poses of the objects found in ``image`` (H, W, 3) with intrinsics ``K`` (3, 3).

        masks: per object name its visible mask (H, W) (bool or 0..1); objects left out are
        looked for by the segmenter. prior_poses: per object name a pose (4, 4) to track from.
        ignore: (H, W) pixels whose content is unknown to the masks (e.g. hidden by an occluder
        they do not name): no object is compared there, like other objects' masks.
        boxes: per object name without a mask its box (x, y, w, h) in pixels from an upstream
        detector (see the module docstring for the mask it gets). hidden: per object name with a
        mask where it lies hidden (H, W) (an amodal segmenter's whole silhouette outside the
        visible mask): unknown where no mask claims it, and inside the coarse estimator's crop;
        the built-in segmenter's amodal head supplies it for the objects it segments, with pixels
        near it (a band, the occluder) that are unknown but outside the coarse estimator's crop
        (``Segment.unsure``).
        Objects without a mask, or whose estimate is not a finite pose in front of the camera,
        are left out of the result. Raises ValueError on a malformed image, K, mask, ignore,
        hidden part or box.
        """
        image = checked_image(image)
        K = checked_intrinsics(K)
        height, width = image.shape[:2]
        started = time.perf_counter()
        visible = {name: checked_mask(mask, (height, width), name)
                   for name, mask in (masks or {}).items() if name in self.models}
        unknown = (np.zeros((height, width), bool) if ignore is None
                   else checked_mask(ignore, (height, width), 'ignore') > 0.5)
        boxed = {name: checked_box(box, name) for name, box in (boxes or {}).items()
                 if name in self.models and name not in visible}
        hidden = {name: checked_mask(part, (height, width), f'hidden part of {name}') > 0.5
                  for name, part in (hidden or {}).items() if name in visible}
        unsure = {}
        if self.segmenter is not None and set(visible) != set(self.models):
            for name, found in self.segmenter.segment(image).items():
                if name in visible:
                    continue
                visible[name] = (found.mask * box_pixels(boxed[name], (height, width))
                                 if name in boxed else found.mask)
                if found.hidden is not None:
                    hidden[name] = found.hidden
                if found.unsure is not None:
                    unsure[name] = found.unsure
        for name, box in boxed.items():
            if np.count_nonzero(visible.get(name, 0) > 0.5) < self.config.min_mask_pixels:
                visible[name] = box_foreground(image, box).astype(np.float32)
        segment_ms = _ms_since(started)
        visible = {name: mask for name, mask in visible.items()
                   if np.count_nonzero(mask > 0.5) >= self.config.min_mask_pixels}
        claims = np.zeros((height, width), np.int32)
        for mask in visible.values():
            claims += mask > 0.5
        for part in [*hidden.values(), *unsure.values()]:
            unknown |= part & (claims == 0)
        starts = {}
        for name, mask in visible.items():
            others = unknown | (claims - (mask > 0.5) > 0)
            start = self._start(name, image, K, mask, others, hidden.get(name),
                                _usable_prior((prior_poses or {}).get(name)))
            if start is not None:
                starts[name] = start
        estimates = {}
        for (tracked, loss), names in self._refine_groups(starts).items():
            estimates.update(self._refine(names, tracked, loss, starts, segment_ms))
        return estimates

    def _start(self, name: str, image: np.ndarray, K: np.ndarray, mask: np.ndarray,
               others: np.ndarray, hidden: np.ndarray | None, prior: np.ndarray | None
               ) -> '_Start | None':
        """The object's crop and starting hypotheses; None when it has none. hidden: where the
        object lies hidden, or None.

        Refinement works on the crop around the visible mask (joined with the prior's box):
        hidden pixels are left out of the comparison anyway, so the crop's pixels go where the
        evidence is. The coarse estimator gets the crop around the whole known silhouette, so
        that it matches an occluded object at its whole size. On 60 synthetic tuning scenes with
        true visible masks and hidden parts, ADD(-S) recall 71.2 % with one crop around the
        visible mask, 88.1 % with one around the whole silhouette, 89.8 % with the two."""
        model = self.models[name]
        timings = {}
        started = time.perf_counter()
        box = mask_box(mask)
        if prior is not None:
            box = union_box(box, projected_box(model, prior, K))
        crop = cut_crop(image, K, box, self.config.crop_size, mask=mask, others=others,
                        scale=self.config.crop_scale)
        coarse_crop = crop
        if prior is None and hidden is not None:
            coarse_crop = cut_crop(image, K, mask_box(np.maximum(mask, hidden)),
                                   self.config.crop_size, mask=mask, others=others,
                                   scale=self.config.crop_scale, hidden=hidden)
        timings['crop'] = _ms_since(started)
        started = time.perf_counter()
        if prior is not None:
            hypotheses = Hypotheses(R=prior[None, :3, :3], t=prior[None, :3, 3],
                                    scores=np.ones(1), source='prior')
        elif name in self.coarse:
            hypotheses = self.coarse[name].hypotheses(coarse_crop, self.config.hypotheses)
        else:
            return None
        timings['coarse'] = _ms_since(started)
        if len(hypotheses) == 0:
            return None
        observation = make_observation(crop.image, crop.mask, crop.K, crop.ignore,
                                       device=self.device)
        return _Start(observation=observation, hypotheses=hypotheses, timings_ms=timings)

    def _refine_groups(self, starts: dict[str, '_Start']
                       ) -> dict[tuple[bool, LossConfig], list[str]]:
        """The objects of ``starts`` in groups refined as one batch, keyed by what they share:
        whether they are tracked (prior starts, else coarse starts) and their loss."""
        groups: dict[tuple[bool, LossConfig], list[str]] = {}
        for name, start in starts.items():
            key = (start.tracked, self.config.object_losses.get(name, self.config.loss))
            groups.setdefault(key, []).append(name)
        return groups

    def _refine(self, names: list[str], tracked: bool, loss: LossConfig,
                starts: dict[str, '_Start'], segment_ms: float) -> dict[str, PoseEstimate]:
        """Refine the objects ``names`` (one group of :meth:`_refine_groups`) together."""
        options = ({'optimizer': self.tracking_optimizer, **TRACKING_REFINE} if tracked
                   else {'optimizer': self.detection_optimizer})
        started = time.perf_counter()
        results = refine_objects([starts[name].observation for name in names],
                                 [self.meshes[name] for name in names],
                                 [(starts[name].hypotheses.R, starts[name].hypotheses.t)
                                  for name in names],
                                 self.renderer, loss=loss, **options)
        refine_ms = _ms_since(started)
        estimates = {}
        for name, result in zip(names, results):
            pose = result.pose.detach().cpu().double().numpy()
            if not plausible_pose(pose, self.models[name].diameter):
                continue
            start = starts[name]
            estimates[name] = PoseEstimate(
                name=name, pose=pose, score=result.score, source=start.hypotheses.source,
                diverged=result.diverged,
                timings_ms={**start.timings_ms, 'refine': refine_ms, 'segment': segment_ms})
        return estimates


@dataclass
class _Start:
    """One object's refinement input: its crop as an observation, its starting hypotheses, and
    the timings of the stages so far."""

    observation: Observation
    hypotheses: Hypotheses
    timings_ms: dict[str, float]

    @property
    def tracked(self) -> bool:
        return self.hypotheses.source == 'prior'


def checked_image(image: np.ndarray) -> np.ndarray:
    """``image`` as (H, W, 3) float32 0..1 (uint8 scaled by 1/255); ValueError when malformed or
    not finite."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ValueError(f'expected an RGB image (H, W, 3), got shape {image.shape}')
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    image = image.astype(np.float32)
    if not np.all(np.isfinite(image)):
        raise ValueError('the image has NaN or infinite pixels')
    return image


def checked_intrinsics(K: np.ndarray) -> np.ndarray:
    """``K`` as (3, 3) float64; ValueError unless finite with positive focal lengths."""
    K = np.asarray(K, dtype=np.float64)
    if K.shape != (3, 3) or not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f'intrinsics must be a finite (3, 3) matrix with positive focal lengths, '
                         f'got {K.tolist() if K.size == 9 else K.shape}')
    return K


def checked_mask(mask: np.ndarray, shape: tuple[int, int], name: str) -> np.ndarray:
    """``mask`` as (H, W) float32 0..1 (NaN as 0); ValueError when its shape is not ``shape``."""
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f'mask of {name!r} has shape {mask.shape}, the image {shape}')
    return np.nan_to_num(mask.astype(np.float32), nan=0.0).clip(0.0, 1.0)


def checked_box(box, name: str) -> np.ndarray:
    """``box`` as (4,) float64 (x, y, w, h); ValueError unless finite with positive size."""
    box = np.asarray(box, dtype=np.float64)
    if box.shape != (4,) or not np.all(np.isfinite(box)) or box[2] <= 0 or box[3] <= 0:
        raise ValueError(f'box of {name!r} must be finite (x, y, w, h) with w, h > 0, got '
                         f'{box.tolist()}')
    return box


def plausible_pose(pose: np.ndarray, diameter: float) -> bool:
    """Whether ``pose`` (4, 4) is finite with a proper rotation and puts the object's origin more
    than half its ``diameter`` (metres) in front of the camera."""
    if not np.all(np.isfinite(pose)):
        return False
    R = pose[:3, :3]
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-4) or np.linalg.det(R) < 0:
        return False
    return bool(pose[2, 3] > 0.5 * diameter)


def _usable_prior(pose) -> np.ndarray | None:
    """A prior pose (4, 4) float64 when it is plausible enough to track from, else None."""
    if pose is None:
        return None
    pose = np.asarray(pose, dtype=np.float64)
    if pose.shape != (4, 4) or not np.all(np.isfinite(pose)) or pose[2, 3] <= 0:
        return None
    return pose


def _ms_since(started: float) -> float:
    return 1e3 * (time.perf_counter() - started)

"""``pose_tools train --task segment|pose``: train the built-in segmenter or one object's pose
regressor on synthetic BOP-format scenes (``pose_tools synth``).

Data: ``--data DIR`` with a ``train`` split (and a ``val`` split, else every 10th train image is
held out). When ``DIR/train`` is missing it is generated first with the synth module
(``--n-images`` train images and a tenth as many val images with the next seed, 640x480,
``--max-objects`` instances per image). Dataset object ids 1..N are the objects in the
order of ``--objects`` (an objects file, config/objects.yaml format; default: the demo object),
as this command generates them.

``--task segment --crop-stage SIZE --init FIRST`` trains the segmenter's crop stage instead (see
:mod:`pose_node.crop.segmenter`): on squares of SIZE px cut as the segmenter cuts them, around
each instance's whole silhouette with its box jittered as the first stage's boxes err, starting
from the tensors of ``FIRST`` (a whole-image segmenter); the file written holds both stages.

Training: AdamW, cosine learning rate over ``--epochs`` or the ``--minutes`` budget (whichever
ends first sets the progress), a tqdm bar, and after each epoch: validation, a checkpoint
(``--checkpoint``: model, optimizer, epoch, history; resumable with ``--resume``), the weights
file ``--out`` (weights-only: ``torch.load(..., weights_only=True)``) and the validation curves
as a PNG (``--curves``, drawn with OpenCV). ``--evaluate WEIGHTS`` trains nothing and
measures the weights on the held-out images and on ray-cast frames like ``pose_tools demo``
renders (segmenter: full-resolution mask IoU; regressor: rotation and translation errors on
crops around the true visible mask). Under ``torchrun`` (WORLD_SIZE > 1) each process trains
on its share (DistributedSampler) of a DistributedDataParallel model (gloo on CPU, nccl on
CUDA); rank 0 validates and writes files.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler
from tqdm import tqdm

from pose_node.camera import crop_image, square_box_around
from pose_node.coarse import regressor as reg
from pose_node.crop import Segment, cut_crop, mask_box
from pose_node.crop import segmenter as seg
from pose_node.crop.segmenter import SegmentationNet
from pose_node.datasets.bop import BopDataset, BopFrame
from pose_node.datasets.synth import OutputLayout, SynthConfig, SynthObject, generate_dataset
from pose_node.geometry import make_pose, rot6d_to_matrix, rotation_angle_between
from pose_node.mesh import ObjectModel
from pose_node.objects_config import load_object_models, load_objects_config
from pose_node.render.raycast import RaycastScene
from pose_node.resources import load_demo_object
from pose_node.tools.demo import K_DEMO, SyntheticFrame, render_synthetic_frame
from pose_node.tools.synth import intrinsics

HELD_OUT_EVERY = 10
"""Without a val split, every this-many-th train image is held out for validation."""
TRAIN_WINDOW = 0.8
"""Segmenter training windows are this fraction of the network's image size (cheaper steps;
the network is fully convolutional)."""
SEGMENT_SCALE_RANGE = (0.75, 1.33)
COLOR_GAIN_RANGE = (0.8, 1.2)
MIN_TRAIN_VISIB, MIN_VAL_VISIB = 0.3, 0.5
"""Regressor instances less visible than this are left out of training / validation."""
CROPS_PER_INSTANCE = 6
"""Jittered crops cut once per training instance (the images are not kept in memory)."""
STAGE_CROPS_PER_INSTANCE = 4
"""The same for the segmenter's crop stage."""
STAGE_BOX_SCALE_RANGE = (0.75, 1.3)
STAGE_BOX_SHIFT = 0.15
"""Crop-stage training boxes: the whole silhouette's box scaled log-uniformly in this range and
shifted by up to this fraction of its longer side per axis, as the first stage's boxes err."""
MIN_STAGE_VISIB = 0.1
"""Instances less visible than this give no crop-stage sample (``eval-lmo`` leaves them out too)."""
WEIGHT_DECAY = 1e-4


def register(subparsers) -> None:
    parser = subparsers.add_parser('train', help='train the segmenter or a pose regressor',
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--task', choices=('segment', 'pose'), required=True)
    parser.add_argument('--data', type=Path, default=Path('out/train_data'),
                        help='BOP-format synthetic dataset; generated when DIR/train is missing')
    parser.add_argument('--n-images', type=int, default=1000, help='train images to generate')
    parser.add_argument('--max-objects', type=int, default=None,
                        help='instances per generated image: 1..k (default: the object count, '
                             'at most 3; instances are drawn with replacement)')
    parser.add_argument('--objects', type=Path, default=None,
                        help='objects file (config/objects.yaml format); default: the demo object')
    parser.add_argument('--object', default=None,
                        help='pose task: the object to train for (default: the first)')
    parser.add_argument('--epochs', type=int, default=20)
    parser.add_argument('--minutes', type=float, default=None, help='time budget of this run')
    parser.add_argument('--batch-size', type=int, default=None,
                        help='per process (default: 8 segment, 64 pose)')
    parser.add_argument('--lr', type=float, default=2e-3)
    parser.add_argument('--width', type=int, default=None,
                        help='base channel width (default: 16 segment, 32 pose)')
    parser.add_argument('--input-size', type=int, default=320,
                        help='segment: longer image side the network sees, px')
    parser.add_argument('--crop-size', type=int, default=64, help='pose: crop side, px')
    parser.add_argument('--crop-stage', type=int, default=0, metavar='SIZE',
                        help="segment: train the segmenter's crop stage on squares of SIZE px "
                             'around each object instead of the first stage on whole images; '
                             '--init names the first stage, which the written file carries too (a '
                             "two-stage file's crop stage is continued)")
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads per process')
    parser.add_argument('--loader-workers', type=int, default=0)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--out', type=Path, required=True, help='weights file to write (.pt)')
    parser.add_argument('--checkpoint', type=Path, default=None,
                        help='checkpoint written every epoch (default: OUT with .ckpt suffix)')
    parser.add_argument('--curves', type=Path, default=None,
                        help='validation curves PNG (default: OUT with _curves.png)')
    parser.add_argument('--resume', type=Path, default=None, help='checkpoint to continue')
    parser.add_argument('--init', type=Path, default=None, metavar='WEIGHTS',
                        help='segment: start from these segmenter weights (the tensors that '
                             'fit; a head without the amodal part seeds it from the classes)')
    parser.add_argument('--evaluate', type=Path, default=None, metavar='WEIGHTS',
                        help='no training: measure these weights on the held-out images of '
                             '--data and on --demo-frames ray-cast demo frames')
    parser.add_argument('--demo-frames', type=int, default=20,
                        help='with --evaluate: frames like `pose_tools demo` renders')
    parser.add_argument('--with-segmenter', type=Path, default=None, metavar='WEIGHTS',
                        help='with --evaluate --task pose: also crop the demo frames around '
                             "this segmenter's masks")
    parser.set_defaults(func=run)


# ------------------------------------------------------------------------------- data: shared

@dataclass(frozen=True)
class Objects:
    """The objects to learn, in dataset-id order (object i has dataset obj_id i + 1)."""

    models: list[ObjectModel]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(model.name for model in self.models)


def load_objects(path: Path | None) -> Objects:
    """The models of an objects file, or the demo object when ``path`` is None."""
    if path is None:
        return Objects([load_demo_object()])
    return Objects(load_object_models(load_objects_config(path)))


def ensure_data(root: Path, objects: Objects, n_images: int, max_objects: int | None,
                seed: int, device: torch.device) -> None:
    """Generate ``root/train`` (``n_images``) and ``root/val`` (a tenth) with the synth module
    unless ``root/train`` exists."""
    if (root / 'train').is_dir():
        return
    width, height = 640, 480
    config = SynthConfig(width=width, height=height, K=intrinsics(width, height, None, None, None),
                         max_objects=max_objects or min(len(objects.models), 3))
    synth_objects = [SynthObject(i + 1, model) for i, model in enumerate(objects.models)]
    for split, count, split_seed in (('train', n_images, seed),
                                     ('val', max(n_images // HELD_OUT_EVERY, 1), seed + 1)):
        with tqdm(total=count, unit='img', desc=f'synth {split}') as bar:
            generate_dataset(root, synth_objects, config, count, split_seed, device,
                             layout=OutputLayout(split=split),
                             progress=lambda done: bar.update(done - bar.n))


def split_frames(root: Path) -> tuple[list[BopFrame], list[BopFrame]]:
    """(train frames, val frames): the val split when present, else every
    :data:`HELD_OUT_EVERY`-th train frame."""
    frames = list(BopDataset(root, 'train').frames())
    if (root / 'val').is_dir():
        return frames, list(BopDataset(root, 'val').frames())
    return [f for i, f in enumerate(frames) if i % HELD_OUT_EVERY], frames[::HELD_OUT_EVERY]


def load_rgb(frame: BopFrame) -> np.ndarray:
    """(H, W, 3) float32 0..1."""
    return frame.load_rgb().astype(np.float32) / 255


def color_jitter(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``image`` (..., 3) 0..1 times a random gain per channel, clipped."""
    return np.clip(image * rng.uniform(*COLOR_GAIN_RANGE, 3).astype(np.float32), 0, 1)


class Augmented(Dataset):
    """Base of the datasets below: a per-(seed, epoch, index) generator, so that every process
    and loader worker draws reproducible, distinct augmentations."""

    def __init__(self, seed: int, augment: bool):
        self.seed, self.augment, self.epoch = seed, augment, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def rng(self, index: int) -> np.random.Generator | None:
        if not self.augment:
            return None
        return np.random.default_rng(np.random.SeedSequence([self.seed, self.epoch, index]))


# ------------------------------------------------------------------------------- data: segment

class SegmentationImages(Augmented):
    """Images (N, h, w, 3) uint8, label images (N, h, w) uint8 and whole silhouettes
    (N, n_objects, h, w) uint8 0/1 at the network's size; items (image (3, h', w') float32 0..1,
    labels (h', w') int64, silhouettes (n_objects, h', w') float32), with colour gain when
    augmenting, and random scale and shift in windows of :data:`TRAIN_WINDOW` too unless
    ``reframe`` is false (crops already jittered)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, silhouettes: np.ndarray,
                 seed: int, augment: bool, reframe: bool = True):
        super().__init__(seed, augment)
        self.images, self.labels, self.silhouettes = images, labels, silhouettes
        self.reframe = reframe

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, labels = self.images[index], self.labels[index]
        silhouettes = self.silhouettes[index].transpose(1, 2, 0)
        rng = self.rng(index)
        if rng is not None:
            if self.reframe:
                image, labels, silhouettes = random_window(image, labels, silhouettes, rng)
            image = color_jitter(image.astype(np.float32) / 255, rng)
        else:
            image = image.astype(np.float32) / 255
        silhouettes = silhouettes.reshape(*labels.shape, -1).transpose(2, 0, 1)
        return (torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                torch.from_numpy(labels.astype(np.int64)),
                torch.from_numpy(silhouettes.astype(np.float32)))


def random_window(image: np.ndarray, labels: np.ndarray, silhouettes: np.ndarray,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A :data:`TRAIN_WINDOW`-sized window of ``image`` (h, w, 3), ``labels`` (h, w) and
    ``silhouettes`` (h, w, n) at a random log-uniform scale and position; outside the image:
    grey, background and outside every silhouette."""
    height, width = labels.shape
    out_h, out_w = int(height * TRAIN_WINDOW) // 16 * 16, int(width * TRAIN_WINDOW) // 16 * 16
    scale = np.exp(rng.uniform(*np.log(SEGMENT_SCALE_RANGE)))
    shift = rng.uniform([min(0, out_w - width * scale), min(0, out_h - height * scale)],
                        [max(0, out_w - width * scale), max(0, out_h - height * scale)])
    A = np.array([[scale, 0, shift[0]], [0, scale, shift[1]]])
    grey = float(rng.uniform(0, 255))
    window = cv2.warpAffine(image, A, (out_w, out_h), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=(grey,) * 3)
    window_labels, window_silhouettes = (
        cv2.warpAffine(np.ascontiguousarray(values), A, (out_w, out_h), flags=cv2.INTER_NEAREST,
                       borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        for values in (labels, silhouettes))
    return window, window_labels, window_silhouettes.reshape(out_h, out_w, -1)


def segmentation_arrays(frames: list[BopFrame], config: seg.SegmenterConfig, stride: int,
                        desc: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (N, h, w, 3) uint8, labels (N, h, w) uint8 and whole silhouettes
    (N, n_objects, h, w) uint8 0/1 at the network's size (frames of one size); label i + 1 and
    silhouette i are dataset obj_id i + 1."""
    images, labels, silhouettes = [], [], []
    n_objects = len(config.object_names)
    for frame in tqdm(frames, desc=desc, unit='img'):
        rgb = frame.load_rgb()
        height, width = rgb.shape[:2]
        size = seg.network_size(height, width, config.input_size, stride)
        classes = np.array([inst.obj_id for inst in frame.instances])
        known = classes <= len(config.object_names)
        label = seg.label_image(frame.load_masks()[known], classes[known]).astype(np.uint8)
        whole = np.zeros((n_objects, height, width), np.uint8)
        for obj_id, mask in zip(classes[known], frame.load_masks(visible=False)[known]):
            whole[obj_id - 1] |= mask
        images.append(cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA))
        labels.append(cv2.resize(label, (size[1], size[0]), interpolation=cv2.INTER_NEAREST))
        silhouettes.append(np.stack([cv2.resize(m, (size[1], size[0]),
                                                interpolation=cv2.INTER_NEAREST)
                                     for m in whole]))
    return np.stack(images), np.stack(labels), np.stack(silhouettes)


def stage_crop_arrays(frames: list[BopFrame], n_objects: int, size: int,
                      crops_per_instance: int, seed: int | None, desc: str
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The arrays of :func:`segmentation_arrays` for the segmenter's crop stage: per instance of
    a known object at least :data:`MIN_STAGE_VISIB` visible, squares of ``size`` px around its
    whole silhouette's box enlarged by ``seg.CROP_STAGE_SCALE`` as the segmenter cuts them;
    ``crops_per_instance`` jittered ones (:data:`STAGE_BOX_SCALE_RANGE`,
    :data:`STAGE_BOX_SHIFT`) when ``seed`` is given, else one exact one."""
    images, labels, silhouettes = [], [], []
    out = (size, size)
    for frame_index, frame in enumerate(tqdm(frames, desc=desc, unit='img')):
        classes = np.array([inst.obj_id for inst in frame.instances])
        known = classes <= n_objects
        wanted = [i for i, inst in enumerate(frame.instances)
                  if known[i] and (inst.visib_fract or 0) >= MIN_STAGE_VISIB]
        if not wanted:
            continue
        rgb = frame.load_rgb()
        whole_masks = frame.load_masks(visible=False)
        label = seg.label_image(frame.load_masks()[known], classes[known]).astype(np.uint8)
        whole = np.zeros(label.shape + (n_objects,), np.uint8)
        for obj_id, mask in zip(classes[known], whole_masks[known]):
            whole[..., obj_id - 1] |= mask
        for index in wanted:
            box = mask_box(whole_masks[index])
            for copy in range(crops_per_instance if seed is not None else 1):
                jittered = box
                if seed is not None:
                    rng = np.random.default_rng(
                        np.random.SeedSequence([seed, frame_index, index, copy]))
                    jittered = reg.jittered_box(box, rng, STAGE_BOX_SHIFT, STAGE_BOX_SCALE_RANGE)
                square = square_box_around(jittered, seg.CROP_STAGE_SCALE)
                images.append(np.round(crop_image(rgb.astype(np.float32), square, out))
                              .clip(0, 255).astype(np.uint8))
                labels.append(crop_image(label, square, out, cv2.INTER_NEAREST,
                                         antialias=False))
                silhouettes.append(np.stack([crop_image(np.ascontiguousarray(whole[..., i]),
                                                        square, out, cv2.INTER_NEAREST,
                                                        antialias=False)
                                             for i in range(n_objects)]))
    return np.stack(images), np.stack(labels), np.stack(silhouettes)


# ------------------------------------------------------------------------------- data: pose

class RegressionCrops(Augmented):
    """Crops cut once: inputs (N, 4, S, S) uint8, R_allo (N, 3, 3), params (N, 3), K_crop
    (N, 3, 3), t (N, 3); items (inputs float32 0..1, R_allo, params) with colour gain when
    augmenting."""

    def __init__(self, samples: list[tuple[reg.RegressionSample, np.ndarray]], seed: int,
                 augment: bool):
        super().__init__(seed, augment)
        self.inputs = np.stack([np.round(s.inputs * 255).astype(np.uint8) for s, _ in samples])
        self.R_allo = np.stack([s.R_allo for s, _ in samples]).astype(np.float32)
        self.params = np.stack([s.params for s, _ in samples]).astype(np.float32)
        self.K_crop = np.stack([s.K for s, _ in samples])
        self.t = np.stack([t for _, t in samples])

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inputs = self.inputs[index].astype(np.float32) / 255
        rng = self.rng(index)
        if rng is not None:
            inputs[:3] = color_jitter(inputs[:3].transpose(1, 2, 0), rng).transpose(2, 0, 1)
        return (torch.from_numpy(inputs), torch.from_numpy(self.R_allo[index]),
                torch.from_numpy(self.params[index]))


def regression_samples(frames: list[BopFrame], obj_id: int, config: reg.RegressorConfig,
                       min_visib: float, crops_per_instance: int, seed: int | None, desc: str
                       ) -> list[tuple[reg.RegressionSample, np.ndarray]]:
    """(sample, true translation (3,) m) per crop of every instance of ``obj_id`` at least
    ``min_visib`` visible: ``crops_per_instance`` jittered crops when ``seed`` is given, else one
    exact crop."""
    samples = []
    for frame_index, frame in enumerate(tqdm(frames, desc=desc, unit='img')):
        wanted = [i for i, inst in enumerate(frame.instances)
                  if inst.obj_id == obj_id and (inst.visib_fract or 0) >= min_visib]
        if not wanted:
            continue
        rgb, masks = load_rgb(frame), frame.load_masks()
        for index in wanted:
            instance = frame.instances[index]
            pose = make_pose(instance.R, instance.t)
            for copy in range(crops_per_instance if seed is not None else 1):
                rng = (None if seed is None else np.random.default_rng(
                    np.random.SeedSequence([seed, frame_index, index, copy])))
                sample = reg.regression_sample(rgb, frame.K, masks[index], pose, config, rng)
                if sample is not None:
                    samples.append((sample, instance.t))
    return samples


# ------------------------------------------------------------------------------- tasks

@dataclass
class Task:
    """What differs between the two trainings: the network and its saved config, the data, the
    loss of a batch, and validation (metrics by name, ``primary`` the headline)."""

    kind: str
    net: nn.Module
    config: dict
    train_set: Augmented
    val_set: Augmented
    loss: Callable[[nn.Module, list[torch.Tensor]], torch.Tensor]
    validate: Callable[[nn.Module], dict[str, float]]
    primary: str
    packed: Callable[[dict, dict], tuple[dict, dict]] = lambda config, state: (config, state)
    """(config, state dict) of the weights file from the network's."""


def segment_task(args: argparse.Namespace, objects: Objects, device: torch.device) -> Task:
    config = seg.SegmenterConfig(objects.names, args.crop_stage or args.input_size,
                                 seg.widths_for(args.width or 16))
    net = seg.make_segmentation_net(config)
    packed = Task.packed
    if args.init is not None:
        stages = seg.stage_weights(*seg.read_weights(args.init, 'segmenter'))
        # A crop stage continues the init file's crop stage where it has one.
        fresh = seg.warm_start(net, stages[-1 if args.crop_stage else 0][1])
        print(f'train: started from {args.init}; fresh tensors: {", ".join(fresh) or "none"}')
        if args.crop_stage:
            first_config, first = stages[0]
            packed = lambda config_, state: seg.two_stage_weights(first_config, first, config_,
                                                                  state)
    train_frames, val_frames = split_frames(args.data)
    if args.crop_stage:
        n = len(objects.names)
        train_set = SegmentationImages(
            *stage_crop_arrays(train_frames, n, args.crop_stage, STAGE_CROPS_PER_INSTANCE,
                               args.seed, 'crop train'), args.seed, augment=True, reframe=False)
        val_set = SegmentationImages(
            *stage_crop_arrays(val_frames, n, args.crop_stage, 1, None, 'crop val'), args.seed,
            augment=False)
    else:
        train_set = SegmentationImages(*segmentation_arrays(train_frames, config, net.stride,
                                                            'load train'), args.seed, augment=True)
        val_set = SegmentationImages(*segmentation_arrays(val_frames, config, net.stride,
                                                          'load val'), args.seed, augment=False)

    def loss(model: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        images, labels, silhouettes = (b.to(device) for b in batch)
        return seg.segmentation_loss(model(images), labels, silhouettes)

    def validate(model: nn.Module) -> dict[str, float]:
        ious, amodal_ious = segmentation_ious(model, val_set, len(config.object_names), device)
        return {'val_iou_median': float(np.median(ious)) if ious else 0.0,
                'val_iou_ge_0.8': float(np.mean(np.asarray(ious) >= 0.8)) if ious else 0.0,
                'val_amodal_iou_median': float(np.median(amodal_ious)) if amodal_ious else 0.0}

    return Task('segmenter', net, config.to_dict(), train_set, val_set, loss, validate,
                'val_iou_median', packed)


@torch.no_grad()
def segmentation_ious(net: SegmentationNet, images: SegmentationImages, n_objects: int,
                      device: torch.device) -> tuple[list[float], list[float]]:
    """At the network's size, the IoUs of the predicted (argmax) and true visible mask, and of
    the predicted (amodal probability > 0.5) and true whole silhouette, of every object present
    in or predicted for each image."""
    net.eval()
    ious, amodal_ious = [], []
    for index in range(len(images)):
        image, labels, silhouettes = images[index]
        logits = net(image[None].to(device))[0].cpu()
        predicted = logits[:net.n_classes].argmax(dim=0).numpy()
        amodal = (logits[net.n_classes:] > 0).numpy()
        truth, whole = labels.numpy(), silhouettes.numpy() > 0.5
        for label in range(1, n_objects + 1):
            if (truth == label).any() or (predicted == label).any():
                ious.append(seg.mask_iou(predicted == label, truth == label))
            if len(amodal) and (whole[label - 1].any() or amodal[label - 1].any()):
                amodal_ious.append(seg.mask_iou(amodal[label - 1], whole[label - 1]))
    net.train()
    return ious, amodal_ious


def pose_task(args: argparse.Namespace, objects: Objects, device: torch.device) -> Task:
    name = args.object or objects.names[0]
    if name not in objects.names:
        raise ValueError(f'--object {name!r} is not one of {list(objects.names)}')
    obj_id = objects.names.index(name) + 1
    model = objects.models[obj_id - 1]
    config = reg.RegressorConfig(name, model.diameter, crop_size=args.crop_size,
                                 widths=reg.widths_for(args.width or 32))
    net = reg.make_regression_net(config)
    train_frames, val_frames = split_frames(args.data)
    train_set = RegressionCrops(
        regression_samples(train_frames, obj_id, config, MIN_TRAIN_VISIB, CROPS_PER_INSTANCE,
                           args.seed, 'crop train'), args.seed, augment=True)
    val_set = RegressionCrops(
        regression_samples(val_frames, obj_id, config, MIN_VAL_VISIB, 1, None, 'crop val'),
        args.seed, augment=False)
    points = torch.as_tensor(reg.symmetric_points(model, 500, np.random.default_rng(args.seed)),
                             device=device)

    def loss(net_: nn.Module, batch: list[torch.Tensor]) -> torch.Tensor:
        inputs, R_allo, params = (b.to(device) for b in batch)
        rot6d, predicted = net_(inputs)
        return reg.regression_loss(rot6d, predicted, R_allo, params, points)[0]

    def validate(net_: nn.Module) -> dict[str, float]:
        rotation_deg, translation_pct = regression_errors(net_, val_set, config, device)
        return {'val_rot_deg_median': float(np.median(rotation_deg)),
                'val_rot_lt_15': float(np.mean(rotation_deg < 15)),
                'val_rot_lt_30': float(np.mean(rotation_deg < 30)),
                'val_trans_pct_median': float(np.median(translation_pct))}

    return Task('regressor', net, config.to_dict(), train_set, val_set, loss, validate,
                'val_rot_deg_median')


@torch.no_grad()
def regression_errors(net: nn.Module, crops: RegressionCrops, config: reg.RegressorConfig,
                      device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Rotation errors (N,) degrees (geodesic, symmetries ignored) and translation errors (N,)
    in % of the true distance, of the unaugmented crops."""
    net.eval()
    rotations, params = [], []
    for start in range(0, len(crops), 256):
        inputs = torch.stack([crops[i][0] for i in range(start, min(start + 256, len(crops)))])
        rot6d, predicted = net(inputs.to(device))
        rotations.append(rot6d_to_matrix(rot6d.double()).cpu().numpy())
        params.append(predicted.double().cpu().numpy())
    net.train()
    rotations, params = np.concatenate(rotations), np.concatenate(params)
    rotation_deg = np.rad2deg(rotation_angle_between(rotations, crops.R_allo.astype(np.float64)))
    t = np.stack([reg.params_to_translation(p, K, config.crop_size, config.diameter)
                  for p, K in zip(params, crops.K_crop)])
    translation_pct = 100 * np.linalg.norm(t - crops.t, axis=1) / np.linalg.norm(crops.t, axis=1)
    return rotation_deg, translation_pct


# ------------------------------------------------------------------------------- loop

@dataclass(frozen=True)
class Process:
    """This process's place in a (possibly distributed) run."""

    rank: int
    world: int
    device: torch.device

    @property
    def writes(self) -> bool:
        return self.rank == 0


def start_process(device_name: str) -> Process:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on
    CPU; each CUDA process takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    device = torch.device(device_name)
    if world <= 1:
        return Process(0, 1, device)
    if device.type == 'cuda':
        device = torch.device('cuda', int(os.environ.get('LOCAL_RANK', '0')))
        torch.cuda.set_device(device)
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return Process(dist.get_rank(), dist.get_world_size(), device)


def cosine_lr(base_lr: float, progress: float) -> float:
    """Learning rate at ``progress`` 0..1 of the run: half a cosine from ``base_lr`` to 0."""
    return base_lr * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


def any_process(flag: bool, process: Process) -> bool:
    """True when ``flag`` is true in any process (all processes must stop at the same step)."""
    if process.world == 1:
        return flag
    value = torch.tensor([float(flag)], device=process.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def save_checkpoint(path: Path, task: Task, optimizer: torch.optim.Optimizer, epoch: int,
                    history: list[dict]) -> None:
    """Everything to continue: model, optimizer, epochs done, history (weights-only loadable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'kind': task.kind, 'config': task.config, 'model': task.net.state_dict(),
                'optimizer': optimizer.state_dict(), 'epoch': epoch, 'history': history}, path)


def load_checkpoint(path: Path, task: Task, optimizer: torch.optim.Optimizer
                    ) -> tuple[int, list[dict]]:
    """Restore model and optimizer from ``path``; (epochs done, history). ValueError naming the
    file when it is not a checkpoint of this task's network."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
        if state['kind'] != task.kind or state['config'] != task.config:
            raise ValueError(f'it is a {state["kind"]} with config {state["config"]}, this run '
                             f'a {task.kind} with {task.config}')
        task.net.load_state_dict(state['model'])
        optimizer.load_state_dict(state['optimizer'])
        return int(state['epoch']), list(state['history'])
    except FileNotFoundError:
        raise
    except Exception as error:
        raise ValueError(f'{path}: cannot resume from this checkpoint ({error})') from error


def train(task: Task, args: argparse.Namespace, process: Process) -> list[dict]:
    """Run the epochs; rank 0 writes checkpoint, weights and curves after each. Returns the
    history (one dict of metrics per epoch)."""
    net = task.net.to(process.device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=WEIGHT_DECAY)
    start_epoch, history = (0, []) if args.resume is None else \
        load_checkpoint(args.resume, task, optimizer)
    model = net if process.world == 1 else nn.parallel.DistributedDataParallel(
        net, device_ids=[process.device.index] if process.device.type == 'cuda' else None)
    sampler = (DistributedSampler(task.train_set, process.world, process.rank, seed=args.seed)
               if process.world > 1 else
               RandomSampler(task.train_set, generator=torch.Generator().manual_seed(args.seed)))
    loader = DataLoader(task.train_set, batch_size=args.batch_size, sampler=sampler,
                        num_workers=args.loader_workers, drop_last=len(task.train_set) >
                        args.batch_size * process.world)
    budget_s = None if args.minutes is None else 60 * args.minutes
    started = time.monotonic()
    out_of_time = False
    for epoch in range(start_epoch, args.epochs):
        task.train_set.set_epoch(epoch)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)
        losses = []
        bar = tqdm(loader, desc=f'epoch {epoch + 1}/{args.epochs}', unit='batch',
                   disable=not process.writes)
        for step, batch in enumerate(bar):
            progress = (epoch + step / len(loader)) / args.epochs
            if budget_s is not None:
                progress = max(progress, (time.monotonic() - started) / budget_s)
            for group in optimizer.param_groups:
                group['lr'] = cosine_lr(args.lr, progress)
            loss = task.loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f'{np.mean(losses[-20:]):.4f}')
            out_of_time = any_process(budget_s is not None and
                                      time.monotonic() - started > budget_s, process)
            if out_of_time:
                break
        if process.writes:
            metrics = task.validate(net)
            history.append({'epoch': epoch + 1, 'train_loss': float(np.mean(losses)),
                            'lr': optimizer.param_groups[0]['lr'],
                            'minutes': (time.monotonic() - started) / 60, **metrics})
            print(f'epoch {epoch + 1}: ' + ' '.join(f'{k}={v:.4g}' for k, v in
                                                    history[-1].items() if k != 'epoch'))
            save_checkpoint(args.checkpoint, task, optimizer, epoch + 1, history)
            seg.save_weights(args.out, task.kind, *task.packed(task.config, net.state_dict()))
            write_curves(args.curves, history, ['train_loss', task.primary])
        if process.world > 1:
            dist.barrier()
        if out_of_time:
            break
    return history


# ------------------------------------------------------------------------------- curves

CURVE_SIZE = (480, 360)
CURVE_COLORS = ((200, 60, 40), (40, 120, 220), (40, 170, 60), (160, 60, 190))


def write_curves(path: Path, history: list[dict], keys: list[str]) -> None:
    """A PNG with one panel per metric in ``keys`` against the epoch (OpenCV drawing)."""
    panels = [curve_panel([row['epoch'] for row in history], [row[key] for row in history], key,
                          CURVE_COLORS[index % len(CURVE_COLORS)])
              for index, key in enumerate(keys)]
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.concatenate(panels, axis=1))


def curve_panel(x: list[float], y: list[float], title: str,
                color: tuple[int, int, int]) -> np.ndarray:
    """(H, W, 3) uint8 BGR plot of ``y`` against ``x`` with min/max labels."""
    width, height = CURVE_SIZE
    left, right, top, bottom = 60, 15, 30, 35
    panel = np.full((height, width, 3), 255, np.uint8)
    x_low, x_high = min(x), max(max(x), min(x) + 1)
    y_low, y_high = min(y), max(y)
    if y_high - y_low < 1e-12:
        y_low, y_high = y_low - 0.5, y_high + 0.5
    to_px = lambda xv, yv: (int(left + (xv - x_low) / (x_high - x_low) * (width - left - right)),
                            int(height - bottom - (yv - y_low) / (y_high - y_low)
                                * (height - top - bottom)))
    cv2.rectangle(panel, (left, top), (width - right, height - bottom), (0, 0, 0), 1)
    points = np.array([to_px(a, b) for a, b in zip(x, y)], np.int32)
    cv2.polylines(panel, [points.reshape(-1, 1, 2)], False, color, 2, cv2.LINE_AA)
    for point in points:
        cv2.circle(panel, tuple(int(v) for v in point), 3, color, -1, cv2.LINE_AA)
    font = cv2.FONT_HERSHEY_SIMPLEX
    cv2.putText(panel, title, (left, 20), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(panel, f'{y_high:.3g}', (2, top + 5), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(panel, f'{y_low:.3g}', (2, height - bottom), font, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(panel, f'epoch {x_low:g}..{max(x):g}', (left, height - 12), font, 0.4, (0, 0, 0),
                1, cv2.LINE_AA)
    return panel


# ------------------------------------------------------------------------------- evaluation

def evaluate_segmenter(path: Path, frames: list[BopFrame], n_demo: int, seed: int,
                       device: torch.device) -> dict[str, list[float]]:
    """Full-resolution mask IoU (segment() thresholded at 0.5 against the true visible mask; 0
    when the object is not found) per object instance of ``frames`` and of ``n_demo`` ray-cast
    demo frames; with the amodal head also the IoU of the visible mask and hidden part together
    against the instance's whole silhouette (``held_out_whole_iou``)."""
    segmenter = seg.load_segmenter(path, device)
    names = segmenter.config.object_names
    held_out, whole = [], []
    for frame in tqdm(frames, desc='held-out', unit='img'):
        found = segmenter.segment(load_rgb(frame))
        masks, silhouettes = frame.load_masks(), frame.load_masks(visible=False)
        for obj_id in sorted({inst.obj_id for inst in frame.instances}):
            if obj_id > len(names):
                continue
            instances = [inst.obj_id == obj_id for inst in frame.instances]
            held_out.append(found_iou(found, names[obj_id - 1], masks[instances].any(axis=0)))
            if segmenter.config.amodal:
                whole.append(found_iou(found, names[obj_id - 1],
                                       silhouettes[instances].any(axis=0), with_hidden=True))
    demo = []
    for frame in demo_frames(n_demo, seed):
        found = segmenter.segment(frame.rgb.astype(np.float32) / 255)
        demo.append(found_iou(found, names[0], frame.mask))
    return {'held_out_iou': held_out, 'held_out_whole_iou': whole, 'demo_iou': demo}


def found_iou(found: dict[str, Segment], name: str, truth: np.ndarray,
              with_hidden: bool = False) -> float:
    """IoU of ``found[name]``'s mask (> 0.5), with its hidden part when ``with_hidden``, with
    ``truth`` (H, W) bool; 0 when not found."""
    if name not in found:
        return 0.0
    mask = found[name].mask > 0.5
    if with_hidden:
        mask |= found[name].hidden
    return seg.mask_iou(mask, truth)


def demo_frames(count: int, seed: int) -> list[SyntheticFrame]:
    """``count`` frames of the demo object as ``pose_tools demo`` renders them."""
    scene = RaycastScene([load_demo_object()])
    rng = np.random.default_rng(seed)
    return [render_synthetic_frame(scene, rng) for _ in range(count)]


def evaluate_regressor(path: Path, model: ObjectModel, obj_id: int, frames: list[BopFrame],
                       n_demo: int, seed: int, device: torch.device,
                       segmenter_path: Path | None = None) -> dict[str, list[float]]:
    """Rotation errors (deg) and translation errors (% of the distance) of the regressor on
    crops around the true visible mask: instances of ``obj_id`` in ``frames`` at least
    :data:`MIN_VAL_VISIB` visible, and ``n_demo`` ray-cast demo frames (demo object only).
    With ``segmenter_path``, the demo frames are also measured on crops around the segmenter's
    mask (``demo_seg_*``; an object it misses counts as 180 deg and 100 %)."""
    estimator = reg.load_regressor(path, model, device)
    segmenter = None if segmenter_path is None else seg.load_segmenter(segmenter_path, device)
    config = estimator.config
    errors: dict[str, list[float]] = {f'{prefix}_{metric}': []
                                      for prefix in ('held_out', 'demo', 'demo_seg')
                                      for metric in ('rot_deg', 'trans_pct')}

    def measure(prefix: str, rgb: np.ndarray, K: np.ndarray, mask: np.ndarray | None,
                pose: np.ndarray) -> None:
        rotation_deg, translation_pct = 180.0, 100.0
        if mask is not None:
            crop = cut_crop(rgb, K, mask_box(mask), config.crop_size, mask=mask,
                            scale=config.crop_scale)
            got = estimator.hypotheses(crop, 1)
            rotation_deg = float(np.rad2deg(rotation_angle_between(got.R[0], pose[:3, :3])))
            translation_pct = float(100 * np.linalg.norm(got.t[0] - pose[:3, 3])
                                    / np.linalg.norm(pose[:3, 3]))
        errors[f'{prefix}_rot_deg'].append(rotation_deg)
        errors[f'{prefix}_trans_pct'].append(translation_pct)

    for frame in tqdm(frames, desc='held-out', unit='img'):
        wanted = [i for i, inst in enumerate(frame.instances)
                  if inst.obj_id == obj_id and (inst.visib_fract or 0) >= MIN_VAL_VISIB]
        if wanted:
            rgb, masks = load_rgb(frame), frame.load_masks()
            for i in wanted:
                inst = frame.instances[i]
                measure('held_out', rgb, frame.K, masks[i], make_pose(inst.R, inst.t))
    if model.name == load_demo_object().name:
        for frame in demo_frames(n_demo, seed):
            rgb = frame.rgb.astype(np.float32) / 255
            measure('demo', rgb, K_DEMO, frame.mask, frame.pose)
            if segmenter is not None:
                found = segmenter.segment(rgb).get(model.name)
                measure('demo_seg', rgb, K_DEMO, None if found is None else found.mask > 0.5,
                        frame.pose)
    return errors


def summary(values: dict[str, list[float]]) -> str:
    """One line per measured list: count, median and the headline fractions."""
    lines = []
    for key, items in values.items():
        if not items:
            continue
        array = np.asarray(items)
        line = f'{key}: n={len(array)} median={np.median(array):.3f}'
        if key.endswith('iou'):
            line += (f' frac_ge_0.8={np.mean(array >= 0.8):.3f}'
                     f' frac_ge_0.5={np.mean(array >= 0.5):.3f}')
        elif key.endswith('rot_deg'):
            line += (f' frac_lt_15={np.mean(array < 15):.3f} frac_lt_30={np.mean(array < 30):.3f}'
                     f' p90={np.percentile(array, 90):.1f}')
        else:
            line += f' p90={np.percentile(array, 90):.2f}'
        lines.append(line)
    return '\n'.join(lines)


def evaluate(args: argparse.Namespace, objects: Objects, device: torch.device) -> None:
    held_out = split_frames(args.data)[1]
    if args.task == 'segment':
        values = evaluate_segmenter(args.evaluate, held_out, args.demo_frames, args.seed, device)
    else:
        name = args.object or objects.names[0]
        obj_id = objects.names.index(name) + 1
        values = evaluate_regressor(args.evaluate, objects.models[obj_id - 1], obj_id, held_out,
                                    args.demo_frames, args.seed, device, args.with_segmenter)
    print(f'evaluate {args.evaluate} on {len(held_out)} held-out images of {args.data} and '
          f'{args.demo_frames} demo frames (seed {args.seed}):')
    print(summary(values))


# ------------------------------------------------------------------------------- command

def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.checkpoint = args.checkpoint or args.out.with_suffix('.ckpt')
    args.curves = args.curves or args.out.with_name(args.out.stem + '_curves.png')
    args.batch_size = args.batch_size or (8 if args.task == 'segment' else 64)
    if args.task == 'segment' and args.crop_stage and args.init is None \
            and args.evaluate is None:
        print('train: --crop-stage needs --init, the first stage it follows', file=sys.stderr)
        return 1
    objects = load_objects(args.objects)
    if args.evaluate is not None:
        evaluate(args, objects, torch.device(args.device))
        return 0
    process = start_process(args.device)
    try:
        if process.writes:
            ensure_data(args.data, objects, args.n_images, args.max_objects, args.seed,
                        torch.device('cpu'))
        if process.world > 1:
            dist.barrier()
        make_task = segment_task if args.task == 'segment' else pose_task
        task = make_task(args, objects, process.device)
        if process.writes:
            print(f'train {args.task}: {len(task.train_set)} train / {len(task.val_set)} val '
                  f'samples, {sum(p.numel() for p in task.net.parameters())} parameters, '
                  f'{process.world} process(es) on {process.device}')
        history = train(task, args, process)
        if process.writes and history:
            print(f'train: wrote {args.out} (epoch {history[-1]["epoch"]}, '
                  f'{task.primary}={history[-1][task.primary]:.4g}), {args.checkpoint}, '
                  f'{args.curves}')
    finally:
        if process.world > 1:
            dist.destroy_process_group()
    return 0

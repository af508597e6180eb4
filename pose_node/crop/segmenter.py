"""The built-in segmenter: a tiny U-Net that labels every pixel of a full image as background or
one of the configured objects (each object at most once per image, as in LM-O), and, with an
amodal head, tells per object whether a pixel lies inside its whole silhouette, hidden or not.

The image is resized so that its longer side is ``input_size`` px (both sides rounded to a
multiple of the network's stride), the logits are resized back to the image, and per object the
class probability is its mask (:class:`NetworkSegmenter`, the :class:`pose_node.crop.Segmenter`
protocol); the amodal head's pixels outside the visible mask are the object's hidden part, which
the pipeline leaves out of every comparison instead of taking it for background. ``widths`` sets
the channels per scale; doubling them scales the same design up for a GPU.

An optional crop stage (Mask R-CNN's second look, at the object's own scale) runs a second
network of the same design on a square crop around each object the first stage found (its
visible mask and hidden part, enlarged by :data:`CROP_STAGE_SCALE`), resampled to the crop
stage's ``input_size``; its probabilities replace the first stage's inside that square. The
whole image seen at 320 px shows a 100 px object at half its resolution, where an occluder of
the object's own colour is hard to tell from it.

Weight files (:func:`save_weights`, :func:`read_weights`) hold only a state dict and a JSON-able
config, so they load with ``torch.load(..., weights_only=True)``; the regressor uses the same
format. Images are (H, W, 3) float32 RGB 0..1.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pose_node.camera import crop_image, crop_transform, square_box_around
from pose_node.crop import Segment, box_pixels, mask_box, occluder_region, refine_mask_edges

IMAGE_MEAN, IMAGE_STD = 0.5, 0.25
"""Pixel normalisation inside the networks: 0..1 RGB becomes roughly zero-mean, unit-spread."""
MIN_AREA_FRACTION = 2e-4
"""Masks smaller than this fraction of the image (60 px in VGA) are left out as noise."""
MIN_SCORE = 0.6
"""Masks whose mean object probability is below this are left out."""
AMODAL_THRESHOLD = 0.5
"""Pixels whose amodal probability is above this are inside the object's whole silhouette."""
HIDDEN_MARGIN = 4
"""The band of this many pixels of the network's input around the hidden part is unsure: the
amodal head completes the coarse shape behind an occluder but misses thin parts (a handle, a
cone), and a hidden pixel taken for background pulls the pose off, while an unknown one costs
little. On 60 synthetic tuning scenes (640 x 480, 320 px input) with the segmenter's masks,
ADD(-S) recall 50.8 % without the band, 52.5 / 61.0 / 59.3 / 50.8 % with 4 / 8 / 12 / 16 image
px; with colour in the template search, on 197 other tuning scenes, 82.7 % at 2 network px,
83.8 % at 4; with the crop stage too, 90.4 % at 2, 91.9 % at 4. Counted in the object's extent
as well (until stop 17) the band made the template search's scale too large: 91.9 % against
92.9 % when only unknown. Only unknown and without GrabCut edges: 90.9 / 93.9 / 93.4 % at 2 / 4 /
6 network px. Still needed beside the occluder's pixels (:data:`OCCLUDER_REACH`): on 200 fresh
tuning scenes (seed 5000) 92.4 / 93.4 / 94.9 % at 0 / 2 / 4 network px."""
OCCLUDER_REACH = 8
"""Pixels of the occluder (:func:`pose_node.crop.occluder_region`) within this many pixels of the
network's input of the hidden part are unsure too: the amodal head misses thin hidden parts with
confidence (probability below 0.05 on most missed pixels of the failed tuning scenes), so no
threshold or fixed band finds them, but they lie in the occluder. On the 197 synthetic tuning
scenes ADD(-S) recall 93.9 % without, 95.4 % with this reach (4 of the 6 failures whose true
pose drifted off are mended, one other instance fails); a first version (the band seeded as
probable occluder, GrabCut's region not widened by the reach) gave 93.9 / 95.4 / 94.9 % at 4 /
8 / 12 network px (4 adds nothing to the band of :data:`HIDDEN_MARGIN`) and 94.9 % unlimited:
the occluder's far parts take away background the pose needs. On the 97 test scenes 88.7 % ->
89.7 %."""
HIDDEN_OPENING_PX = 5
"""The hidden part is opened with a square of this side: the thin ring by which the amodal
silhouette overshoots an unoccluded object's visible edge is not a hidden part (counting it as
unknown would loosen the edge the refinement aligns to)."""
CROP_STAGE_SCALE = 1.4
"""The crop stage's square is the first stage's object box (visible mask and hidden part)
enlarged by this: room for a box that the first stage drew too small, and context."""
CROP_STAGE_KEY = 'crop_stage'
"""Weight files of a two-stage segmenter hold the crop stage's config under this key of the
config and its tensors under this prefix (plus a dot) in the state dict."""
KEEP_COMPONENT_FRACTION = 0.2
"""Connected parts of a mask smaller than this fraction of its largest part are dropped: an
object occurs once, so small far-away blobs are false positives (an occluder may still split
the object into large parts, which are kept)."""


# ---------------------------------------------------------------------------------- weight files

def save_weights(path: str | Path, kind: str, config: dict, state_dict: dict) -> None:
    """Write ``state_dict`` (tensors) with ``kind`` and a JSON-able ``config`` for weights-only
    loading."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().cpu() for key, value in state_dict.items()}
    torch.save({'kind': kind, 'config': config, 'state_dict': tensors}, path)


def read_weights(path: str | Path, kind: str) -> tuple[dict, dict]:
    """(config, state_dict) of a file written by :func:`save_weights` for ``kind``.

    FileNotFoundError when ``path`` is missing; ValueError naming the file when it is not such a
    file (corrupt, pickled code, another kind)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: {kind} weights file not found')
    try:
        content = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # torch raises many types for truncated or foreign files
        raise ValueError(f'{path}: not a readable {kind} weights file ({error})') from error
    if not isinstance(content, dict) or content.get('kind') != kind \
            or not isinstance(content.get('config'), dict) \
            or not isinstance(content.get('state_dict'), dict):
        raise ValueError(f'{path}: not a {kind} weights file (expected keys kind={kind!r}, '
                         'config, state_dict)')
    return content['config'], content['state_dict']


def load_state_checked(net: nn.Module, state_dict: dict, path: str | Path) -> None:
    """Load ``state_dict`` into ``net``; ValueError naming ``path`` when the shapes or keys do
    not match the architecture its config describes."""
    try:
        net.load_state_dict(state_dict)
    except RuntimeError as error:
        raise ValueError(f'{path}: weights do not match the architecture in its config '
                         f'({error})') from error


# ---------------------------------------------------------------------------------- network

def conv_block(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution, group norm (batch-size independent, so DDP and batch 1 behave alike),
    ReLU."""
    groups = math.gcd(8, out_channels)
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False),
                         nn.GroupNorm(groups, out_channels), nn.ReLU(inplace=True))


class SegmentationNet(nn.Module):
    """U-Net: ``len(widths)`` stages, each halving the resolution; decoder back to 1/2 with skip
    connections, logits bilinearly upsampled to the input.

    forward: x (B, 3, H, W) RGB 0..1, H and W multiples of :attr:`stride` -> logits
    (B, n_classes + n_amodal, H, W): first the classes' (class 0 the background, softmax), then
    per object (class i + 1) its amodal logit (sigmoid: inside its whole silhouette).
    """

    def __init__(self, n_classes: int, widths: tuple[int, ...], n_amodal: int = 0):
        super().__init__()
        channels = (3,) + tuple(widths)
        self.encoder = nn.ModuleList(
            nn.Sequential(conv_block(channels[i], channels[i + 1], stride=2),
                          conv_block(channels[i + 1], channels[i + 1]))
            for i in range(len(widths)))
        self.decoder = nn.ModuleList(
            conv_block(widths[i + 1] + widths[i], widths[i]) for i in range(len(widths) - 1))
        self.head = nn.Conv2d(widths[0], n_classes + n_amodal, 1)
        self.n_classes = n_classes
        self.stride = 2 ** len(widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = []
        h = (x - IMAGE_MEAN) / IMAGE_STD
        for stage in self.encoder:
            h = stage(h)
            features.append(h)
        for index in range(len(self.decoder) - 1, -1, -1):
            skip = features[index]
            h = F.interpolate(h, size=skip.shape[-2:], mode='bilinear', align_corners=False)
            h = self.decoder[index](torch.cat([h, skip], dim=1))
        return F.interpolate(self.head(h), size=x.shape[-2:], mode='bilinear',
                             align_corners=False)


@dataclass(frozen=True)
class SegmenterConfig:
    """object_names: class i + 1 is object_names[i]; input_size: longer image side fed to the
    network, px; widths: channels per U-Net stage; amodal: whether the network has the amodal
    head."""

    object_names: tuple[str, ...]
    input_size: int = 320
    widths: tuple[int, ...] = (16, 32, 64, 64)
    amodal: bool = True

    @classmethod
    def from_dict(cls, values: dict) -> SegmenterConfig:
        """The config of a weights file; files written before the amodal head have no
        ``amodal`` key."""
        return cls(object_names=tuple(values['object_names']), input_size=int(values['input_size']),
                   widths=tuple(int(w) for w in values['widths']),
                   amodal=bool(values.get('amodal', False)))

    def to_dict(self) -> dict:
        values = asdict(self)
        return values | {'object_names': list(self.object_names), 'widths': list(self.widths)}


def widths_for(base: int) -> tuple[int, ...]:
    """U-Net channels per stage for a base width (the ``--width`` flag): (w, 2w, 4w, 4w)."""
    return (base, 2 * base, 4 * base, 4 * base)


def make_segmentation_net(config: SegmenterConfig) -> SegmentationNet:
    n_objects = len(config.object_names)
    return SegmentationNet(n_objects + 1, config.widths, n_objects if config.amodal else 0)


def warm_start(net: SegmentationNet, state_dict: dict) -> list[str]:
    """Load into ``net`` the tensors of ``state_dict`` (another segmenter's weights) whose names
    and shapes match; a class head without amodal rows seeds them with each object's logit
    minus the background's, so that the amodal head starts as the visible mask's probability.
    Returns the names of ``net``'s tensors left as initialised."""
    own = net.state_dict()
    loaded = {key: value for key, value in state_dict.items()
              if key in own and own[key].shape == value.shape}
    n_classes = net.n_classes
    for key in ('head.weight', 'head.bias'):
        head = state_dict.get(key)
        if key not in loaded and head is not None and head.shape[0] == n_classes \
                and own[key].shape[0] == 2 * n_classes - 1 and own[key].shape[1:] == head.shape[1:]:
            loaded[key] = torch.cat([head, head[1:] - head[:1]])
    net.load_state_dict(own | loaded)
    return sorted(set(own) - set(loaded))


def network_size(height: int, width: int, input_size: int, stride: int) -> tuple[int, int]:
    """(h, w) the network sees for an H x W image: the longer side ``input_size``, both rounded
    to a multiple of ``stride`` (at least one stride)."""
    scale = input_size / max(height, width)
    return tuple(max(stride, int(round(side * scale / stride)) * stride)
                 for side in (height, width))


def image_tensor(image: np.ndarray, size: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(1, 3, h, w) float32 on ``device`` from ``image`` (H, W, 3) 0..1 resized to ``size``
    = (h, w) (area interpolation when shrinking)."""
    resized = cv2.resize(np.asarray(image, np.float32), (size[1], size[0]),
                         interpolation=cv2.INTER_AREA)
    return torch.from_numpy(resized).permute(2, 0, 1)[None].to(device)


# ---------------------------------------------------------------------------------- masks

def keep_large_components(mask: np.ndarray, fraction: float = KEEP_COMPONENT_FRACTION
                          ) -> np.ndarray:
    """(H, W) bool: the connected parts of ``mask`` (H, W) bool of at least ``fraction`` times
    the largest part's area."""
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), 8)
    if count <= 2:
        return mask
    areas = stats[1:, cv2.CC_STAT_AREA]
    kept = np.flatnonzero(areas >= fraction * areas.max()) + 1
    return np.isin(labels, kept)


def object_masks(probabilities: np.ndarray, names: tuple[str, ...],
                 min_area_fraction: float = MIN_AREA_FRACTION, min_score: float = MIN_SCORE
                 ) -> dict[str, tuple[np.ndarray, float]]:
    """Per object found: (mask (H, W) float32, score) from ``probabilities``
    (1 + len(names), H, W) that sum to 1 per pixel.

    The mask is 1 where the object is the most likely class (in kept large parts), 0 elsewhere:
    binary like an upstream segmenter's, so that any threshold reads it alike (with several
    objects the winning probability may be below 0.5); the score is the object's mean
    probability there. Objects whose area or score are below the limits are left out."""
    winner = probabilities.argmax(axis=0)
    minimum_area = min_area_fraction * winner.size
    found = {}
    for index, name in enumerate(names, start=1):
        region = keep_large_components(winner == index)
        area = int(region.sum())
        if area < minimum_area:
            continue
        score = float(probabilities[index][region].mean())
        if score >= min_score:
            found[name] = (region.astype(np.float32), score)
    return found


@dataclass(frozen=True)
class CropStage:
    """The second look of a two-stage segmenter: ``net`` sees square crops of
    ``config.input_size`` px around each object the first stage found."""

    net: SegmentationNet
    config: SegmenterConfig


class NetworkSegmenter:
    """:class:`pose_node.crop.Segmenter` backed by a :class:`SegmentationNet` on ``device``,
    optionally followed by a :class:`CropStage`.

    refine_edges: whether GrabCut moves the masks' edges onto the image's colour edges (see
    :meth:`segment`); None (the default): only without a crop stage. The crop stage sees the
    object at full resolution, and GrabCut then costs more than it gives: near occluders of the
    object's colours it moves the edge the wrong way. On the 197 synthetic tuning scenes with the
    two-stage demo segmenter, ADD(-S) recall 92.9 % with GrabCut, 93.9 % without (92.4 % against
    91.9 % at stop 17), 92.9 % with GrabCut kept off the occlusion edges; on unoccluded demo
    frames GrabCut still helps (median IoU 0.990 -> 1.0)."""

    def __init__(self, net: SegmentationNet, config: SegmenterConfig, device: torch.device,
                 min_area_fraction: float = MIN_AREA_FRACTION, min_score: float = MIN_SCORE,
                 refine_edges: bool | None = None, crop_stage: CropStage | None = None):
        self.net = net.to(device).eval()
        self.config = config
        self.device = device
        self.crop_stage = None if crop_stage is None else \
            CropStage(crop_stage.net.to(device).eval(), crop_stage.config)
        self.min_area_fraction = min_area_fraction
        self.min_score = min_score
        self.refine_edges = crop_stage is None if refine_edges is None else refine_edges

    @torch.no_grad()
    def probabilities(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Of ``image`` (H, W, 3) 0..1: the class probabilities (1 + n_objects, H, W) float32,
        and per object the probability (n_objects, H, W) float32 that a pixel is inside its
        whole silhouette (None without the amodal head)."""
        height, width = image.shape[:2]
        size = network_size(height, width, self.config.input_size, self.net.stride)
        logits = self.net(image_tensor(image, size, self.device))
        logits = F.interpolate(logits, size=(height, width), mode='bilinear',
                               align_corners=False)[0].float()
        classes, amodal = logits[:self.net.n_classes], logits[self.net.n_classes:]
        return (torch.softmax(classes, dim=0).cpu().numpy(),
                torch.sigmoid(amodal).cpu().numpy() if self.config.amodal else None)

    def segment(self, image: np.ndarray) -> dict[str, Segment]:
        """Per object found in ``image`` (H, W, 3) float32 0..1 its :class:`Segment`: mask 0 or
        1 and score as :func:`object_masks` finds them, and with the amodal head the hidden part
        (:func:`hidden_part`), and as unsure the band of :data:`HIDDEN_MARGIN` around it
        (:func:`unsure_band`) and the occluder within :data:`OCCLUDER_REACH` of it
        (:func:`pose_node.crop.occluder_region`). With ``refine_edges`` each mask's edge is
        moved onto the image's colour edges (:func:`pose_node.crop.refine_mask_edges`; the
        network sees the image at ``input_size``, so its edges are a few pixels off), keeping
        the masks apart. On 60 synthetic scenes of
        the demo object (2 occluders per image), the previous demo weights' median IoU with the
        true visible mask went 0.81 -> 0.85, unoccluded 0.94 -> 0.98, for 40-90 ms per object
        on a CPU."""
        probabilities, amodal = self.probabilities(image)
        found = object_masks(probabilities, self.config.object_names,
                             self.min_area_fraction, self.min_score)
        if self.crop_stage is not None and found:
            for name, (mask, _score) in found.items():
                whole = mask > 0.5
                if amodal is not None:
                    whole |= amodal[self.config.object_names.index(name)] > AMODAL_THRESHOLD
                self.look_again(image, mask_box(whole), probabilities, amodal)
            found = object_masks(probabilities, self.config.object_names,
                                 self.min_area_fraction, self.min_score)
        masks = {name: mask > 0.5 for name, (mask, _score) in found.items()}
        if self.refine_edges:
            refined = {}
            for name, mask in masks.items():
                edges = refine_mask_edges(image, mask)
                for other, other_mask in masks.items():
                    if other != name:
                        edges &= ~other_mask
                refined[name] = edges
            masks = refined
        segments = {}
        to_image = max(image.shape[:2]) / self.config.input_size
        margin, reach = round(HIDDEN_MARGIN * to_image), round(OCCLUDER_REACH * to_image)
        for name, mask in masks.items():
            hidden = unsure = None
            if amodal is not None:
                hidden = hidden_part(amodal[self.config.object_names.index(name)], mask)
                unsure = unsure_band(hidden, mask, margin) \
                    | occluder_region(image, mask, hidden, reach)
            segments[name] = Segment(mask.astype(np.float32), found[name][1], hidden, unsure)
        return segments

    @torch.no_grad()
    def look_again(self, image: np.ndarray, box: np.ndarray, probabilities: np.ndarray,
                   amodal: np.ndarray | None) -> None:
        """Replace, in place, ``probabilities`` (1 + n_objects, H, W) and ``amodal``
        (n_objects, H, W) (or None) of ``image`` (H, W, 3) inside the square around ``box``
        (x, y, w, h) enlarged by :data:`CROP_STAGE_SCALE` by the crop stage's."""
        height, width = image.shape[:2]
        size = self.crop_stage.config.input_size
        square = square_box_around(box, CROP_STAGE_SCALE)
        crop = crop_image(np.asarray(image, np.float32), square, (size, size))
        logits = self.crop_stage.net(torch.from_numpy(crop).permute(2, 0, 1)[None]
                                     .to(self.device))[0].float()
        n_classes = self.crop_stage.net.n_classes
        crop_values = torch.cat([torch.softmax(logits[:n_classes], dim=0),
                                 torch.sigmoid(logits[n_classes:])]).cpu().numpy()
        inside = box_pixels(square, (height, width))
        to_crop = crop_transform(square, (size, size))
        for channel, values in enumerate(crop_values):
            back = cv2.warpAffine(values, to_crop, (width, height),
                                  flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                  borderMode=cv2.BORDER_REPLICATE)
            if channel < n_classes:
                probabilities[channel][inside] = back[inside]
            elif amodal is not None:
                amodal[channel - n_classes][inside] = back[inside]


def hidden_part(amodal: np.ndarray, visible: np.ndarray) -> np.ndarray:
    """(H, W) bool: the pixels of an object's whole silhouette, ``amodal`` (H, W) probabilities
    above :data:`AMODAL_THRESHOLD`, outside its ``visible`` (H, W) bool mask, opened with a
    :data:`HIDDEN_OPENING_PX` square."""
    hidden = ((amodal > AMODAL_THRESHOLD) & ~visible).astype(np.uint8)
    kernel = np.ones((HIDDEN_OPENING_PX, HIDDEN_OPENING_PX), np.uint8)
    return cv2.morphologyEx(hidden, cv2.MORPH_OPEN, kernel).astype(bool)


def unsure_band(hidden: np.ndarray, visible: np.ndarray, margin_px: int) -> np.ndarray:
    """(H, W) bool: the pixels within ``margin_px`` (a disc) of an object's ``hidden`` part
    (H, W) bool, outside it and outside its ``visible`` (H, W) bool mask."""
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin_px + 1,) * 2)
    return cv2.dilate(hidden.astype(np.uint8), disc).astype(bool) & ~hidden & ~visible


def load_segmenter(path: str | Path, device: torch.device) -> NetworkSegmenter:
    """The segmenter stored at ``path`` (weights-only file) on ``device``.

    FileNotFoundError / ValueError naming the file when it is missing, corrupt or not a
    segmenter."""
    stages = []
    for stage_values, stage_state in stage_weights(*read_weights(path, 'segmenter')):
        try:
            config = SegmenterConfig.from_dict(stage_values)
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise ValueError(f'{path}: bad segmenter config {stage_values} ({error})') from error
        net = make_segmentation_net(config)
        load_state_checked(net, stage_state, path)
        stages.append((net, config))
    (net, config), crop_stage = stages[0], (CropStage(*stages[1]) if len(stages) > 1 else None)
    return NetworkSegmenter(net, config, device, crop_stage=crop_stage)


def stage_weights(config: dict, state_dict: dict) -> list[tuple[dict, dict]]:
    """(config, state dict) per stage of a segmenter weights file's ``config`` and
    ``state_dict``: the first stage's, then the crop stage's where the file has one."""
    prefix = CROP_STAGE_KEY + '.'
    stages = [({key: value for key, value in config.items() if key != CROP_STAGE_KEY},
               {key: value for key, value in state_dict.items() if not key.startswith(prefix)})]
    if CROP_STAGE_KEY in config:
        stages.append((config[CROP_STAGE_KEY],
                       {key[len(prefix):]: value for key, value in state_dict.items()
                        if key.startswith(prefix)}))
    return stages


def two_stage_weights(first_config: dict, first_state: dict, crop_config: dict,
                      crop_state: dict) -> tuple[dict, dict]:
    """(config, state dict) of a two-stage segmenter's weight file from its stages'."""
    return (first_config | {CROP_STAGE_KEY: crop_config},
            first_state | {f'{CROP_STAGE_KEY}.{key}': value for key, value in crop_state.items()})


# ---------------------------------------------------------------------------------- training

def label_image(masks: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """(H, W) int64 label image: 0 background, ``classes[i]`` where visible mask ``masks[i]``
    (N, H, W) bool is set (visible masks do not overlap)."""
    labels = np.zeros(masks.shape[1:], np.int64)
    for mask, label in zip(masks, classes):
        labels[mask] = label
    return labels


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor,
                      amodal: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy plus the soft Dice loss of the object classes: logits (B, C [+ C - 1], H, W)
    of a net with C classes, labels (B, H, W) int64; with ``amodal`` (B, C - 1, H, W) 0/1, each
    object's whole silhouette, the same pair (binary) for the amodal logits. Dice keeps small
    objects from drowning in background pixels."""
    n_classes = logits.shape[1] if amodal is None else (logits.shape[1] + 1) // 2
    classes = logits[:, :n_classes]
    probabilities = torch.softmax(classes, dim=1)[:, 1:]
    one_hot = F.one_hot(labels, n_classes).permute(0, 3, 1, 2)[:, 1:].float()
    loss = F.cross_entropy(classes, labels) + dice_loss(probabilities, one_hot)
    if amodal is not None:
        amodal_logits = logits[:, n_classes:]
        loss = loss + F.binary_cross_entropy_with_logits(amodal_logits, amodal) \
            + dice_loss(torch.sigmoid(amodal_logits), amodal)
    return loss


def dice_loss(probabilities: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean soft Dice loss over the (image, object) pairs whose ``targets`` (B, N, H, W) 0/1 are
    present; ``probabilities`` (B, N, H, W). Zero (with a gradient path) when none is."""
    overlap = (probabilities * targets).sum(dim=(2, 3))
    total = probabilities.sum(dim=(2, 3)) + targets.sum(dim=(2, 3))
    present = targets.sum(dim=(2, 3)) > 0
    dice = 1 - (2 * overlap + 1) / (total + 1)
    return dice[present].mean() if present.any() else dice.sum() * 0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two (H, W) bool masks; 1 when both are empty."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0

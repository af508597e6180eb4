"""Mask-style cropping: a region of the full image per object (from a mask, a box or a pose),
enlarged to a square and resampled to a fixed size, with the intrinsics of the crop.

Boxes are ``(x, y, w, h)`` continuous rectangles in OpenCV pixel coordinates (see
:mod:`pose_node.camera`); images float32 0..1; poses object-to-camera (4, 4), metres.
"""
from dataclasses import dataclass
from typing import Protocol

import cv2
import numpy as np

from pose_node.camera import crop_image, crop_transform, project_points, square_box_around, \
    transform_intrinsics
from pose_node.geometry import transform_points
from pose_node.mesh import ObjectModel

CROP_SCALE = 1.2
"""Default enlargement of the square crop around an object's box."""


@dataclass
class Crop:
    """A square crop of S x S pixels.

    image (S, S, 3) float32 0..1; mask (S, S) float32 0..1, the object's visible part (zeros when
    unknown); ignore (S, S) bool, pixels left out of every comparison (other objects, outside the
    image); K (3, 3) the crop's intrinsics; box (4,) the crop's square in full-image pixels;
    hidden (S, S) bool, where the object is known to lie behind something (None: not known);
    outside (S, S) bool, the pixels outside the image, where the object may go on (None: not
    known).
    """

    image: np.ndarray
    mask: np.ndarray
    ignore: np.ndarray
    K: np.ndarray
    box: np.ndarray
    hidden: np.ndarray | None = None
    outside: np.ndarray | None = None

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])

    @property
    def extent(self) -> np.ndarray:
        """(S, S) float32 0..1: the object's whole known silhouette, visible mask and hidden
        part."""
        return self.mask if self.hidden is None else np.maximum(self.mask, self.hidden)


def mask_box(mask: np.ndarray, threshold: float = 0.5) -> np.ndarray | None:
    """(x, y, w, h) box around the pixels of ``mask`` (H, W) above ``threshold`` (pixel edges
    included); None when there are none."""
    rows, cols = np.nonzero(np.asarray(mask) > threshold)
    if rows.size == 0:
        return None
    return np.array([cols.min() - 0.5, rows.min() - 0.5, np.ptp(cols) + 1.0, np.ptp(rows) + 1.0])


def projected_box(model: ObjectModel, pose: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(x, y, w, h) box of the projected model vertices at ``pose``, as BOP computes ``bbox_obj``."""
    uv = project_points(K, transform_points(pose, model.vertices))
    low, high = uv.min(axis=0), uv.max(axis=0)
    return np.concatenate([low, high - low])


def extend_box(box: np.ndarray, sides: np.ndarray, length: float) -> np.ndarray:
    """``box`` (x, y, w, h) moved out by ``length`` pixels on each of ``sides`` (4,) bool (left,
    top, right, bottom)."""
    left, top, right, bottom = np.asarray(sides, np.float64) * length
    x, y, w, h = box
    return np.array([x - left, y - top, w + left + right, h + top + bottom])


def union_box(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest box (x, y, w, h) holding boxes ``a`` and ``b``."""
    low = np.minimum(a[:2], b[:2])
    high = np.maximum(a[:2] + a[2:], b[:2] + b[2:])
    return np.concatenate([low, high - low])


def cut_crop(image: np.ndarray, K: np.ndarray, box: np.ndarray, size: int,
             mask: np.ndarray | None = None, others: np.ndarray | None = None,
             scale: float = CROP_SCALE, hidden: np.ndarray | None = None) -> Crop:
    """The crop of ``size`` px around ``box`` enlarged to a square by ``scale``.

    image (H, W, 3) float32 0..1; K (3, 3) of the full image; mask (H, W) this object's visible
    mask (bool or 0..1) or None; others (H, W) other objects' visible masks or None: their pixels,
    and pixels outside the image, are ignored; hidden (H, W) bool where this object lies hidden,
    or None.
    """
    height, width = image.shape[:2]
    square = square_box_around(box, scale)
    out = (size, size)
    outside = crop_image(np.ones((height, width), np.float32), square, out) < 0.5
    ignore = outside.copy()
    if others is not None:
        ignore |= crop_image(np.asarray(others, np.float32), square, out) > 0.5
    crop_mask = (np.zeros(out, np.float32) if mask is None
                 else crop_image(np.asarray(mask, np.float32), square, out))
    crop_hidden = None if hidden is None else \
        crop_image(np.asarray(hidden, np.float32), square, out) > 0.5
    return Crop(image=crop_image(image, square, out), mask=crop_mask, ignore=ignore,
                K=transform_intrinsics(K, crop_transform(square, out)), box=square,
                hidden=crop_hidden, outside=outside)


GRABCUT_MARGIN = 0.25
"""Surroundings of a box that GrabCut learns the background's colours from, per side, as a
fraction of the box's size."""
GRABCUT_ITERATIONS = 4
EDGE_BAND_PX = 6
"""Half width of the band around a mask's edge that :func:`refine_mask_edges` may move."""
OCCLUDER_CORE_ERODE_PX = 5
""":func:`occluder_region` takes the hidden part eroded by a square of this side as surely the
occluder's."""


def box_pixels(box: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool: the pixels of an image of ``shape`` with their centres in ``box``
    (x, y, w, h)."""
    x, y, w, h = np.asarray(box, np.float64)
    cols, rows = np.arange(shape[1]), np.arange(shape[0])
    return (((rows >= y) & (rows <= y + h))[:, None]
            & ((cols >= x) & (cols <= x + w))[None, :])


def _grabcut(image: np.ndarray, box: np.ndarray, seeds: np.ndarray | None) -> np.ndarray:
    """(H, W) bool foreground of GrabCut on the region around ``box`` (x, y, w, h) of ``image``
    (H, W, 3) float32 0..1, widened by GRABCUT_MARGIN per side. seeds: (H, W) uint8 GrabCut
    classes (cv2.GC_BGD, GC_FGD, GC_PR_BGD, GC_PR_FGD) to start from, or None to start from
    the box (inside probably foreground, outside background)."""
    height, width = image.shape[:2]
    x, y, w, h = np.asarray(box, np.float64)
    margin_x, margin_y = GRABCUT_MARGIN * w, GRABCUT_MARGIN * h
    x0, y0 = max(int(np.floor(x - margin_x)), 0), max(int(np.floor(y - margin_y)), 0)
    x1 = min(int(np.ceil(x + w + margin_x)), width)
    y1 = min(int(np.ceil(y + h + margin_y)), height)
    foreground = np.zeros((height, width), bool)
    region = np.ascontiguousarray((image[y0:y1, x0:x1, ::-1] * 255).round().astype(np.uint8))
    models = np.zeros((1, 65)), np.zeros((1, 65))
    if seeds is None:
        # The box's pixel centres, relative to the region (OpenCV pixel coordinates).
        left, top = max(int(np.ceil(x)), x0), max(int(np.ceil(y)), y0)
        right, bottom = min(int(np.floor(x + w)), x1), min(int(np.floor(y + h)), y1)
        if right - left < 2 or bottom - top < 2:
            return foreground
        labels = np.zeros(region.shape[:2], np.uint8)
        cv2.grabCut(region, labels, (left - x0, top - y0, right - left, bottom - top), *models,
                    GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_RECT)
    else:
        labels = np.ascontiguousarray(seeds[y0:y1, x0:x1])
        if not np.isin(labels, (cv2.GC_FGD, cv2.GC_PR_FGD)).any() \
                or not np.isin(labels, (cv2.GC_BGD, cv2.GC_PR_BGD)).any():
            return foreground
        cv2.grabCut(region, labels, None, *models, GRABCUT_ITERATIONS, cv2.GC_INIT_WITH_MASK)
    foreground[y0:y1, x0:x1] = (labels == cv2.GC_FGD) | (labels == cv2.GC_PR_FGD)
    return foreground


def box_foreground(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """(H, W) bool: the foreground GrabCut finds inside ``box`` (x, y, w, h) of ``image``
    (H, W, 3) float32 0..1, learning the background's colours from a margin around the box. The
    mask of an object that an upstream detector only boxed (training-free; on ray-cast demo
    frames over clutter, IoU 0.99 with the true mask in 40-90 ms)."""
    return _grabcut(image, box, None)


def refine_mask_edges(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: ``mask`` (H, W) bool with its edge moved onto the image's colour edges by
    GrabCut, within EDGE_BAND_PX of where it was (the inside of that band stays object, the
    outside background). Sharpens a coarse segmenter's masks."""
    box = mask_box(mask)
    if box is None:
        return mask
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * EDGE_BAND_PX + 1,) * 2)
    as_bytes = mask.astype(np.uint8)
    seeds = np.full(mask.shape, cv2.GC_BGD, np.uint8)
    seeds[cv2.dilate(as_bytes, kernel) > 0] = cv2.GC_PR_BGD
    seeds[mask] = cv2.GC_PR_FGD
    seeds[cv2.erode(as_bytes, kernel) > 0] = cv2.GC_FGD
    return _grabcut(image, box, seeds)


def occluder_region(image: np.ndarray, visible: np.ndarray, hidden: np.ndarray,
                    reach_px: int) -> np.ndarray:
    """(H, W) bool: the occluder in front of an object's ``hidden`` part (H, W) bool, within
    ``reach_px`` (a disc) of it, outside the object's ``visible`` (H, W) bool mask and its hidden
    part. GrabCut learns the occluder's colours from the hidden part (whatever lies there is in
    front of the object) and the object's from its visible mask, and grows the hidden part over
    the pixels of the occluder's colours. An amodal segmenter misses thin parts behind an
    occluder with confidence; they lie in the occluder, so the pixels found are unknown rather
    than background. Empty when ``hidden`` is."""
    if not hidden.any():
        return np.zeros_like(hidden)
    hidden_bytes = hidden.astype(np.uint8)
    seeds = np.full(hidden.shape, cv2.GC_PR_BGD, np.uint8)
    seeds[hidden] = cv2.GC_PR_FGD
    # The hidden part's edge is as rough as the amodal head's, its inside is the occluder's.
    seeds[cv2.erode(hidden_bytes, np.ones((OCCLUDER_CORE_ERODE_PX,) * 2, np.uint8)) > 0] = \
        cv2.GC_FGD
    seeds[visible] = cv2.GC_BGD
    occluder = _grabcut(image, extend_box(mask_box(hidden | visible), np.ones(4, bool), reach_px),
                        seeds)
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * reach_px + 1,) * 2)
    return occluder & (cv2.dilate(hidden_bytes, disc) > 0) & ~hidden & ~visible


UNKNOWN_LABEL = -1
"""In (H, W) int label images (0 background, i the i-th object): pixels of unknown content, e.g.
hidden by an occluder the labels do not name; the pipeline ignores them. Stored label images
(8 or 16 bits) use their type's largest value instead (255, 65535), as segmentation datasets mark
pixels to ignore."""


def stored_labels(labels: np.ndarray) -> np.ndarray:
    """``labels`` (H, W) ints (0, 1..N, UNKNOWN_LABEL) as a label image stores them: uint8 when
    N < 255, else uint16; unknown pixels become the type's largest value."""
    labels = np.asarray(labels)
    highest = int(labels.max(initial=0))
    if highest >= np.iinfo(np.uint16).max or labels.min(initial=0) < UNKNOWN_LABEL:
        raise ValueError(f'labels must be {UNKNOWN_LABEL}..65534, got {labels.min()}..{highest}')
    dtype = np.uint8 if highest < np.iinfo(np.uint8).max else np.uint16
    stored = labels.astype(dtype)
    stored[labels == UNKNOWN_LABEL] = np.iinfo(dtype).max
    return stored


def label_masks(stored: np.ndarray, names: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The masks in a stored label image (H, W) uint8 or uint16 (pixel value i is ``names[i - 1]``,
    0 background, the type's largest value unknown): per object name its mask (H, W) bool, leaving
    out objects without pixels; and the unknown pixels (H, W) bool."""
    stored = np.asarray(stored)
    masks = {name: stored == index + 1 for index, name in enumerate(names)}
    return ({name: mask for name, mask in masks.items() if mask.any()},
            stored == np.iinfo(stored.dtype).max)


@dataclass
class Segment:
    """One object a segmenter found in an (H, W) image: mask (H, W) float32 0..1, its visible
    part; score 0..1; hidden (H, W) bool, where its whole silhouette lies behind something
    (occluders included that no mask names), or None when the segmenter cannot tell; unsure
    (H, W) bool or None, pixels near the hidden part that may be hidden too (the segmenter
    places that edge only roughly, and misses thin parts behind the occluder): left out of
    comparisons like the hidden part, but not part of the object's extent, which sets the scale
    of its coarse pose."""

    mask: np.ndarray
    score: float
    hidden: np.ndarray | None = None
    unsure: np.ndarray | None = None


class Segmenter(Protocol):
    """Anything that finds the configured objects' visible masks in a full image."""

    def segment(self, image: np.ndarray) -> dict[str, Segment]:
        """Per object name found in ``image`` (H, W, 3) float32 0..1 its :class:`Segment`.
        Objects not found are left out."""

"""Mask-style cropping: a region of the full image per object (from a mask, a box or a pose),
enlarged to a square and resampled to a fixed size, with the intrinsics of the crop.

Boxes are ``(x, y, w, h)`` continuous rectangles in OpenCV pixel coordinates (see
:mod:`pose_node.camera`); images float32 0..1; poses object-to-camera (4, 4), metres.
"""
from dataclasses import dataclass
from typing import Protocol

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
    image); K (3, 3) the crop's intrinsics; box (4,) the crop's square in full-image pixels.
    """

    image: np.ndarray
    mask: np.ndarray
    ignore: np.ndarray
    K: np.ndarray
    box: np.ndarray

    @property
    def size(self) -> int:
        return int(self.mask.shape[0])


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


def union_box(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The smallest box (x, y, w, h) holding boxes ``a`` and ``b``."""
    low = np.minimum(a[:2], b[:2])
    high = np.maximum(a[:2] + a[2:], b[:2] + b[2:])
    return np.concatenate([low, high - low])


def cut_crop(image: np.ndarray, K: np.ndarray, box: np.ndarray, size: int,
             mask: np.ndarray | None = None, others: np.ndarray | None = None,
             scale: float = CROP_SCALE) -> Crop:
    """The crop of ``size`` px around ``box`` enlarged to a square by ``scale``.

    image (H, W, 3) float32 0..1; K (3, 3) of the full image; mask (H, W) this object's visible
    mask (bool or 0..1) or None; others (H, W) other objects' visible masks or None: their pixels,
    and pixels outside the image, are ignored.
    """
    height, width = image.shape[:2]
    square = square_box_around(box, scale)
    out = (size, size)
    ignore = crop_image(np.ones((height, width), np.float32), square, out) < 0.5
    if others is not None:
        ignore |= crop_image(np.asarray(others, np.float32), square, out) > 0.5
    crop_mask = (np.zeros(out, np.float32) if mask is None
                 else crop_image(np.asarray(mask, np.float32), square, out))
    return Crop(image=crop_image(image, square, out), mask=crop_mask, ignore=ignore,
                K=transform_intrinsics(K, crop_transform(square, out)), box=square)


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


class Segmenter(Protocol):
    """Anything that finds the configured objects' visible masks in a full image."""

    def segment(self, image: np.ndarray) -> dict[str, tuple[np.ndarray, float]]:
        """Per object name found in ``image`` (H, W, 3) float32 0..1: its visible mask (H, W)
        float32 0..1 and a score 0..1. Objects not found are left out."""

"""Writer for datasets in the BOP format: the counterpart of :mod:`pose_node.datasets.bop`.

Layout (https://github.com/thodan/bop_toolkit/blob/master/docs/bop_datasets_format.md)::

    root/camera.json
    root/models/obj_{obj_id:06d}.ply, root/models/models_info.json
    root/<split>/<scene_id:06d>/scene_camera.json, scene_gt.json, scene_gt_info.json
    root/<split>/<scene_id:06d>/rgb/{image_id:06d}.png (or .jpg)
    root/<split>/<scene_id:06d>/mask/{image_id:06d}_{instance:06d}.png        object alone
    root/<split>/<scene_id:06d>/mask_visib/{image_id:06d}_{instance:06d}.png  its visible part

Inputs are in METRES (poses, meshes); the files are in MILLIMETRES, as BOP defines them. Masks
are single-channel PNGs, 255 on the object and 0 elsewhere. JSON files list images by increasing
id, one image per line (bop_toolkit's layout), floats at full precision, so that the same input
always gives the same bytes.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np
import trimesh

from pose_node.datasets.bop import BOP_UNIT_SCALE, mask_path
from pose_node.mesh import ObjectModel

MM_PER_M = 1.0 / BOP_UNIT_SCALE
RGB_FORMATS = ('png', 'jpg')
JPEG_QUALITY = 95
_MODEL_INFO_KEYS_KEPT = ('symmetries_discrete', 'symmetries_continuous')


# ----------------------------------------------------------------------------- dataset level

def write_camera(root: Path, K: np.ndarray, width: int, height: int) -> None:
    """root/camera.json: intrinsics K (3, 3) in pixels and the image size of every frame."""
    K = np.asarray(K, np.float64)
    camera = {'cx': float(K[0, 2]), 'cy': float(K[1, 2]), 'depth_scale': 1.0,
              'fx': float(K[0, 0]), 'fy': float(K[1, 1]), 'height': int(height),
              'width': int(width)}
    _write_text(Path(root) / 'camera.json', json.dumps(camera, indent=2) + '\n')


def write_models(models_dir: Path, models: Mapping[int, ObjectModel],
                 source_info: Mapping[int, dict | None] | None = None) -> None:
    """models_dir/obj_{id:06d}.ply (binary PLY in mm, with vertex colours when the model has
    them) and models_info.json for ``models`` {obj_id: model in metres}.

    source_info: {obj_id: the model's BOP models_info entry or None}; its symmetries are kept
    (they cannot be recovered from the mesh), the other fields are recomputed from the model.
    Raises FileExistsError, writing nothing, when the folder holds a different models_info.json
    (the models of another data set).
    """
    models_dir = Path(models_dir)
    info = {str(obj_id): model_info_entry(models[obj_id], (source_info or {}).get(obj_id))
            for obj_id in sorted(models)}
    info_text = json.dumps(info, indent=2) + '\n'
    info_path = models_dir / 'models_info.json'
    if info_path.is_file() and info_path.read_text() != info_text:
        raise FileExistsError(f'{info_path} describes other models; write to another folder')
    for obj_id in sorted(models):
        _write_bytes(models_dir / f'obj_{obj_id:06d}.ply', model_ply_bytes(models[obj_id]))
    _write_text(info_path, info_text)


def model_ply_bytes(model: ObjectModel) -> bytes:
    """The model as a binary little-endian PLY in millimetres, vertex order kept."""
    colors = None
    if model.has_colors:
        rgba = np.concatenate([model.vertex_colors, np.ones((len(model.vertices), 1))], axis=1)
        colors = np.round(rgba * 255).astype(np.uint8)
    mesh = trimesh.Trimesh(np.asarray(model.vertices, np.float64) * MM_PER_M, model.faces,
                           vertex_colors=colors, process=False)
    return mesh.export(file_type='ply', encoding='binary')


def model_info_entry(model: ObjectModel, source: dict | None = None) -> dict:
    """BOP models_info entry (mm): diameter, axis-aligned box, and ``source``'s symmetries."""
    # Rounded to 1e-6 mm: below float32 vertex precision, and free of float64 noise digits.
    low = np.round(model.bbox_min * MM_PER_M, 6).tolist()
    size = np.round(model.bbox_size * MM_PER_M, 6).tolist()
    entry = {'diameter': round(model.diameter * MM_PER_M, 6),
             'min_x': low[0], 'min_y': low[1], 'min_z': low[2],
             'size_x': size[0], 'size_y': size[1], 'size_z': size[2]}
    for key in _MODEL_INFO_KEYS_KEPT:
        if source and key in source:
            entry[key] = source[key]
    return entry


# ------------------------------------------------------------------------------- scene level

def scene_dir(root: Path, split: str, scene_id: int) -> Path:
    """root/<split>/<scene_id:06d>."""
    return Path(root) / split / f'{scene_id:06d}'


def rgb_path(scene: Path, image_id: int, rgb_format: str = 'png') -> Path:
    """scene/rgb/{image_id:06d}.{png|jpg}."""
    if rgb_format not in RGB_FORMATS:
        raise ValueError(f'rgb format must be one of {RGB_FORMATS}, got {rgb_format!r}')
    return Path(scene) / 'rgb' / f'{image_id:06d}.{rgb_format}'


def write_frame_images(scene: Path, image_id: int, rgb: np.ndarray, masks: np.ndarray,
                       masks_visib: np.ndarray, rgb_format: str = 'png') -> None:
    """The frame's colour image rgb (H, W, 3) uint8 and its instances' masks (N, H, W) bool:
    whole silhouettes ``masks`` and visible parts ``masks_visib``."""
    path = rgb_path(scene, image_id, rgb_format)
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY] if rgb_format == 'jpg' else []
    _write_image(path, cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR), params)
    for instance, (mask, visible) in enumerate(zip(masks, masks_visib)):
        _write_image(mask_path(scene, image_id, instance, False), mask_image(mask))
        _write_image(mask_path(scene, image_id, instance, True), mask_image(visible))


def mask_image(mask: np.ndarray) -> np.ndarray:
    """(H, W) uint8: 255 where ``mask`` (H, W) is true, 0 elsewhere."""
    return np.where(mask, 255, 0).astype(np.uint8)


def write_scene_json(scene: Path, camera: Mapping[int, dict], gt: Mapping[int, list[dict]],
                     gt_info: Mapping[int, list[dict]]) -> None:
    """scene_camera.json, scene_gt.json and scene_gt_info.json, each {image_id: entry}."""
    scene = Path(scene)
    for name, entries in (('scene_camera', camera), ('scene_gt', gt),
                          ('scene_gt_info', gt_info)):
        _write_text(scene / f'{name}.json', bop_json(entries))


def bop_json(entries: Mapping[int, object]) -> str:
    """{image_id: value} as bop_toolkit lays it out: ids in increasing order, one per line."""
    lines = [f'  "{image_id}": {json.dumps(entries[image_id])}' for image_id in sorted(entries)]
    return '{\n' + ',\n'.join(lines) + '\n}\n'


# ------------------------------------------------------------------------------------ entries

def camera_entry(K: np.ndarray, depth_scale: float = 1.0) -> dict:
    """scene_camera entry: cam_K (row-major 3x3, pixels) and depth_scale."""
    return {'cam_K': [float(v) for v in np.asarray(K, np.float64).ravel()],
            'depth_scale': float(depth_scale)}


def gt_entry(obj_id: int, pose: np.ndarray) -> dict:
    """scene_gt entry of an object-to-camera pose (4, 4) in metres: cam_R_m2c (row-major 3x3)
    and cam_t_m2c in millimetres."""
    pose = np.asarray(pose, np.float64)
    return {'cam_R_m2c': [float(v) for v in pose[:3, :3].ravel()],
            'cam_t_m2c': [float(v) for v in pose[:3, 3] * MM_PER_M],
            'obj_id': int(obj_id)}


def gt_info_entry(silhouette: np.ndarray, origin: tuple[int, int], visible: np.ndarray) -> dict:
    """scene_gt_info entry as bop_toolkit's calc_gt_info computes it.

    silhouette (h, w) bool: the object alone, on a canvas holding its WHOLE projection, even what
    falls outside the image; its pixel (0, 0) is image pixel ``origin`` = (x0, y0).
    visible (H, W) bool: the pixels of the image where the object is the nearest surface.

    px_count_all: silhouette pixels (truncated part included); px_count_valid: those inside the
    image (a synthetic depth is valid everywhere); px_count_visib: visible pixels; visib_fract =
    px_count_visib / px_count_all (0 when empty). bbox_obj / bbox_visib: (x, y, w, h) of the
    silhouette (unclipped) / visible pixels with w = last column - first column (calc_2d_bbox's
    rule), [-1, -1, -1, -1] both when nothing is visible, as bop_toolkit writes them.
    """
    height, width = visible.shape
    ys, xs = np.nonzero(silhouette)
    xs, ys = xs + origin[0], ys + origin[1]
    inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height)
    px_count_all, px_count_visib = int(len(xs)), int(np.count_nonzero(visible))
    no_box = [-1, -1, -1, -1]
    visible_ys, visible_xs = np.nonzero(visible)
    return {
        'bbox_obj': bbox_of_pixels(xs, ys) if px_count_visib > 0 else no_box,
        'bbox_visib': bbox_of_pixels(visible_xs, visible_ys) if px_count_visib > 0 else no_box,
        'px_count_all': px_count_all,
        'px_count_valid': int(np.count_nonzero(inside)),
        'px_count_visib': px_count_visib,
        'visib_fract': px_count_visib / px_count_all if px_count_all > 0 else 0.0,
    }


def bbox_of_pixels(xs: np.ndarray, ys: np.ndarray) -> list[int]:
    """[x, y, w, h] of pixel columns xs (N,) and rows ys (N,): first column and row, and the
    spans last - first (bop_toolkit's calc_2d_bbox, unclipped)."""
    x0, y0 = int(xs.min()), int(ys.min())
    return [x0, y0, int(xs.max()) - x0, int(ys.max()) - y0]


# ------------------------------------------------------------------------------------- files

def _write_image(path: Path, image: np.ndarray, params: list[int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), image, params or []):
        raise OSError(f'{path}: cannot write image')


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)

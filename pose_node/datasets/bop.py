"""Reader for datasets in the BOP format (https://bop.felk.cvut.cz/datasets/), e.g. LM-O.

BOP stores translations and meshes in millimetres; everything returned here is in METRES
(rotations as (3, 3) model-to-camera matrices, camera frame: x right, y down, z forward).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pose_node.geometry import make_pose
from pose_node.mesh import ObjectModel, load_models_info, load_object_model
from pose_node.render.raycast import RaycastScene

LMO_ROOT_ENV = 'POSE_NODE_LMO_ROOT'
BOP_UNIT_SCALE = 0.001
"""BOP files are in millimetres."""
RGB_EXTENSIONS = ('.png', '.jpg')


def mask_path(scene: Path, image_id: int, instance: int, visible: bool) -> Path:
    """scene/mask[_visib]/{image_id:06d}_{instance:06d}.png."""
    folder = 'mask_visib' if visible else 'mask'
    return Path(scene) / folder / f'{image_id:06d}_{instance:06d}.png'


def default_lmo_root() -> Path:
    """The LM-O folder: $POSE_NODE_LMO_ROOT, else `<repo>/../shared/data/lmo`."""
    override = os.environ.get(LMO_ROOT_ENV)
    if override:
        return Path(override)
    repo = Path(__file__).resolve().parents[2]
    return repo.parent / 'shared' / 'data' / 'lmo'


@dataclass(frozen=True, eq=False)
class GtInstance:
    """One annotated object instance.

    R: (3, 3) model-to-camera rotation, the nearest proper rotation to the stored matrix (LM-O's
    stored matrices are off orthonormal by up to 1 %). t: (3,) model-to-camera translation, m.
    bbox_obj / bbox_visib: (x, y, w, h) pixels of the whole / visible projection;
    visib_fract: visible fraction 0..1; px_count_visib: visible pixels. The last four are None
    when the scene has no scene_gt_info.json.
    """

    obj_id: int
    R: np.ndarray
    t: np.ndarray
    bbox_obj: tuple[int, int, int, int] | None = None
    bbox_visib: tuple[int, int, int, int] | None = None
    visib_fract: float | None = None
    px_count_visib: int | None = None


@dataclass(frozen=True, eq=False)
class BopFrame:
    """One image with its camera and ground truth.

    K: (3, 3) intrinsics, pixels. depth_scale: BOP's multiplier from depth-image values to mm.
    """

    scene_id: int
    image_id: int
    K: np.ndarray
    depth_scale: float
    rgb_path: Path
    instances: list[GtInstance] = field(default_factory=list)

    def load_rgb(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB image."""
        if not self.rgb_path.is_file():
            raise FileNotFoundError(f'{self.rgb_path}: image not found')
        with Image.open(self.rgb_path) as image:
            return np.asarray(image.convert('RGB'))

    def mask_paths(self, visible: bool = True) -> list[Path]:
        """Each instance's BOP ``mask_visib`` (visible part) or ``mask`` (whole silhouette) PNG;
        they may not exist (LM-O ships none)."""
        scene = self.rgb_path.parent.parent
        return [mask_path(scene, self.image_id, index, visible)
                for index in range(len(self.instances))]

    def has_masks(self, visible: bool = True) -> bool:
        return all(path.is_file() for path in self.mask_paths(visible))

    def load_masks(self, visible: bool = True) -> np.ndarray:
        """(N, H, W) bool masks of the instances, visible parts or whole silhouettes (see
        :meth:`mask_paths`); FileNotFoundError naming a missing file."""
        masks = []
        for path in self.mask_paths(visible):
            if not path.is_file():
                raise FileNotFoundError(f'{path}: mask not found')
            with Image.open(path) as image:
                masks.append(np.asarray(image.convert('L')) > 127)
        return np.stack(masks) if masks else np.zeros((0, 1, 1), bool)


def bop_box_mask(box_xywh, shape: tuple[int, int]) -> np.ndarray:
    """(H, W) bool of a BOP box (x, y, w, h): columns x..x+w and rows y..y+h inclusive (BOP's
    width is the last minus the first column)."""
    x, y, w, h = box_xywh
    mask = np.zeros(shape, bool)
    mask[max(y, 0):max(y + h + 1, 0), max(x, 0):max(x + w + 1, 0)] = True
    return mask


def visible_labels(frame: BopFrame, models: list[ObjectModel], width: int,
                   height: int) -> tuple[np.ndarray, np.ndarray]:
    """The ground-truth visible masks of ``frame``'s instances (``models`` in the same order).

    Returns labels (H, W) int32, 1 + the index of the instance seen at each pixel (0: none),
    ray-cast from all GT poses and clipped to each instance's ``bbox_visib``; and unknown (H, W)
    bool, what the clipping removed. LM-O does not annotate every occluder (``bbox_visib`` comes
    from real depth), so those pixels are hidden by something unnamed: neither the object nor
    background.
    """
    poses = np.stack([make_pose(inst.R, inst.t) for inst in frame.instances])
    rendered = RaycastScene(models).render(poses, frame.K, width, height).labels
    labels = np.zeros_like(rendered)
    for index, inst in enumerate(frame.instances):
        inside = True if inst.bbox_visib is None else bop_box_mask(inst.bbox_visib,
                                                                   rendered.shape)
        labels[(rendered == index + 1) & inside] = index + 1
    return labels, (rendered > 0) & (labels == 0)


@dataclass(frozen=True)
class Target:
    """One BOP evaluation target: `inst_count` instances of `obj_id` in an image."""

    scene_id: int
    image_id: int
    obj_id: int
    inst_count: int


class BopDataset:
    """A BOP dataset folder: `root/<split>/<scene:06d>/...`, `root/<models_dir>/...`."""

    def __init__(self, root: str | Path, split: str = 'test', models_dir: str = 'models'):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f'{self.root}: BOP dataset folder not found')
        self.split_dir = self.root / split
        if not self.split_dir.is_dir():
            raise FileNotFoundError(f'{self.split_dir}: split folder not found')
        self.models_dir = models_dir
        self._scenes: dict[int, dict[str, dict]] = {}
        self._models: dict[tuple[int, bool], ObjectModel] = {}
        self._models_info: dict[bool, dict[int, dict]] = {}

    @property
    def scene_ids(self) -> list[int]:
        """Sorted ids of the scene folders in the split."""
        return sorted(int(p.name) for p in self.split_dir.iterdir()
                      if p.is_dir() and p.name.isdigit())

    def image_ids(self, scene_id: int) -> list[int]:
        """Sorted image ids annotated in a scene."""
        return sorted(int(i) for i in self._scene(scene_id)['camera'])

    def frame(self, scene_id: int, image_id: int) -> BopFrame:
        """The frame's camera, image path and ground-truth instances (metres)."""
        scene = self._scene(scene_id)
        key = str(image_id)
        if key not in scene['camera']:
            raise KeyError(f'image {image_id} not in scene {scene_id} of {self.split_dir}')
        camera = scene['camera'][key]
        gt_info = scene['gt_info'].get(key) if scene['gt_info'] is not None else None
        instances = [_gt_instance(gt, gt_info[i] if gt_info is not None else None)
                     for i, gt in enumerate(scene['gt'].get(key, []))]
        return BopFrame(
            scene_id=scene_id,
            image_id=image_id,
            K=np.asarray(camera['cam_K'], np.float64).reshape(3, 3),
            depth_scale=float(camera.get('depth_scale', 1.0)),
            rgb_path=self._rgb_path(scene_id, image_id),
            instances=instances,
        )

    def frames(self, image_ids: Iterable[int] | None = None) -> Iterator[BopFrame]:
        """Frames of every scene in order, restricted to `image_ids` when given."""
        wanted = None if image_ids is None else set(image_ids)
        for scene_id in self.scene_ids:
            for image_id in self.image_ids(scene_id):
                if wanted is None or image_id in wanted:
                    yield self.frame(scene_id, image_id)

    @property
    def object_ids(self) -> list[int]:
        """Sorted object ids listed in the models' models_info.json."""
        return sorted(self.models_info())

    def models_info(self, eval: bool = False) -> dict[int, dict]:
        """models_info.json of `models_dir` (or of `models_eval` with eval=True), file units."""
        if eval not in self._models_info:
            self._models_info[eval] = load_models_info(self._models_path(eval) /
                                                       'models_info.json')
        return self._models_info[eval]

    def load_model(self, obj_id: int, eval: bool = False) -> ObjectModel:
        """The object's mesh in metres with its BOP symmetries (cached).

        eval=True reads `models_eval/` (uniformly resampled, no colours; used by BOP metrics).
        """
        key = (obj_id, eval)
        if key not in self._models:
            info = self.models_info(eval)
            if obj_id not in info:
                raise KeyError(f'object {obj_id} not in {self._models_path(eval)}')
            self._models[key] = load_object_model(
                self._models_path(eval) / f'obj_{obj_id:06d}.ply', name=f'obj_{obj_id:06d}',
                unit_scale=BOP_UNIT_SCALE, models_info=info[obj_id])
        return self._models[key]

    def splits(self) -> dict[str, list[int]]:
        """Named image-id lists from `root/splits.json` (empty when the file is absent)."""
        path = self.root / 'splits.json'
        if not path.is_file():
            return {}
        return {name: [int(i) for i in ids] for name, ids in _read_json(path).items()}

    def targets(self, filename: str = 'test_targets_bop19.json') -> list[Target]:
        """The BOP evaluation targets listed in `root/<filename>`."""
        return [Target(scene_id=int(t['scene_id']), image_id=int(t['im_id']),
                       obj_id=int(t['obj_id']), inst_count=int(t['inst_count']))
                for t in _read_json(self.root / filename)]

    def _models_path(self, eval: bool) -> Path:
        return self.root / ('models_eval' if eval else self.models_dir)

    def _scene(self, scene_id: int) -> dict[str, dict]:
        """Parsed scene_camera / scene_gt / scene_gt_info (None when absent) of a scene."""
        if scene_id not in self._scenes:
            folder = self.split_dir / f'{scene_id:06d}'
            if not folder.is_dir():
                raise FileNotFoundError(f'{folder}: scene folder not found')
            info_path = folder / 'scene_gt_info.json'
            self._scenes[scene_id] = {
                'camera': _read_json(folder / 'scene_camera.json'),
                'gt': _read_json(folder / 'scene_gt.json'),
                'gt_info': _read_json(info_path) if info_path.is_file() else None,
            }
        return self._scenes[scene_id]

    def _rgb_path(self, scene_id: int, image_id: int) -> Path:
        """Path of the frame's colour image (.png preferred; BOP PBR data uses .jpg)."""
        stem = self.split_dir / f'{scene_id:06d}' / 'rgb' / f'{image_id:06d}'
        for extension in RGB_EXTENSIONS:
            if stem.with_suffix(extension).is_file():
                return stem.with_suffix(extension)
        return stem.with_suffix(RGB_EXTENSIONS[0])


def _gt_instance(gt: dict, info: dict | None) -> GtInstance:
    """A GtInstance from one scene_gt entry (mm) and its scene_gt_info entry (or None)."""
    return GtInstance(
        obj_id=int(gt['obj_id']),
        R=nearest_rotation(np.asarray(gt['cam_R_m2c'], np.float64).reshape(3, 3)),
        t=np.asarray(gt['cam_t_m2c'], np.float64) * BOP_UNIT_SCALE,
        bbox_obj=tuple(int(v) for v in info['bbox_obj']) if info else None,
        bbox_visib=tuple(int(v) for v in info['bbox_visib']) if info else None,
        visib_fract=float(info['visib_fract']) if info else None,
        px_count_visib=int(info['px_count_visib']) if info else None,
    )


def nearest_rotation(matrix: np.ndarray) -> np.ndarray:
    """(3, 3) rotation closest in Frobenius norm to a (3, 3) near-rotation matrix."""
    u, _, vt = np.linalg.svd(matrix)
    return u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt


def _read_json(path: Path):
    """Parsed JSON; FileNotFoundError naming the path when it is missing."""
    if not path.is_file():
        raise FileNotFoundError(f'{path}: file not found')
    with path.open() as file:
        return json.load(file)

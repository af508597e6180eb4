"""Refinement cases: an observed crop, its masks and intrinsics, the true pose and a perturbed start.

Two sources, both with their targets rendered by the exact ray-cast reference (never by the
differentiable backend under test):
- ``synthetic_cases``: the demo object (or any model) at random poses over procedural clutter,
  with photometric noise;
- ``lmo_cases``: real LM-O frames; the observed mask is the ground-truth visible mask rendered from
  the GT poses of all annotated objects (z-buffer), clipped to BOP's ``bbox_visib`` (LM-O does not
  annotate every occluder, see ENVIRONMENT.md; the clipped pixels are ignored, as occluded).
The crop is what the pipeline would cut without knowing the truth: a square around the union of
the observed mask's box and the start pose's projected box, enlarged by ``CROP_SCALE``. Pixels of
other objects' visible masks and pixels outside the image are marked ``ignore``.
Units: metres; K in pixels of the crop; images float32 0..1.
"""
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pose_node.camera import crop_transform, square_box_around, transform_intrinsics
from pose_node.crop import CROP_SCALE, cut_crop, mask_box, projected_box, union_box
from pose_node.datasets.bop import BopDataset, visible_labels
from pose_node.datasets.synthetic import photometric_noise, procedural_background, \
    random_pose_in_view
from pose_node.geometry import make_pose, perturb_pose
from pose_node.mesh import ObjectModel
from pose_node.render.raycast import RaycastScene

SYNTHETIC_K = np.array([[600.0, 0.0, 319.5], [0.0, 600.0, 239.5], [0.0, 0.0, 1.0]])


@dataclass
class RefineCase:
    """image (S, S, 3) float32; mask (S, S) float32 0..1 visible object; ignore (S, S) bool;
    K (3, 3) of the crop; true_pose, start_pose (4, 4) object-to-camera, metres."""

    name: str
    model: ObjectModel
    image: np.ndarray
    mask: np.ndarray
    ignore: np.ndarray
    K: np.ndarray
    true_pose: np.ndarray
    start_pose: np.ndarray
    visib_fract: float


def perturbed_start(true_pose: np.ndarray, rot_deg: float, trans_frac: float,
                    rng: np.random.Generator) -> np.ndarray:
    """The truth rotated by exactly ``rot_deg`` about a random axis and moved by exactly
    ``trans_frac`` of its distance in a random direction."""
    R, t = perturb_pose(true_pose[:3, :3], true_pose[:3, 3], np.deg2rad(rot_deg), trans_frac, rng)
    return make_pose(R, t)


def crop_case(name: str, model: ObjectModel, rgb: np.ndarray, visible: np.ndarray,
              others: np.ndarray, K: np.ndarray, true_pose: np.ndarray, start_pose: np.ndarray,
              size: int, visib_fract: float) -> RefineCase:
    """Cut the square crop of ``size`` pixels from a full frame (see the module docstring).

    rgb (H, W, 3) float32; visible, others (H, W) bool: this object's and other objects' visible
    masks; K (3, 3) of the full frame.
    """
    crop = cut_crop(rgb, K, union_box(mask_box(visible), projected_box(model, start_pose, K)),
                    size, mask=visible, others=others, scale=CROP_SCALE)
    return RefineCase(name=name, model=model, image=crop.image, mask=crop.mask,
                      ignore=crop.ignore, K=crop.K, true_pose=true_pose, start_pose=start_pose,
                      visib_fract=visib_fract)


def synthetic_cases(model: ObjectModel, n: int, rot_deg: float, trans_frac: float, size: int,
                    rng: np.random.Generator,
                    distance_range: tuple[float, float] = (0.4, 0.7)) -> Iterator[RefineCase]:
    """``n`` cases of ``model`` over procedural clutter with photometric noise (no occlusion).

    Unoccluded, the observed mask's box is the true pose's projected box, so the crop is known
    before rendering and only the crop is ray-cast (4 x 4 rays per pixel).
    """
    scene = RaycastScene([model])
    for index in range(n):
        true_pose = random_pose_in_view(rng, distance_range)
        start = perturbed_start(true_pose, rot_deg, trans_frac, rng)
        box = square_box_around(union_box(projected_box(model, true_pose, SYNTHETIC_K),
                                           projected_box(model, start, SYNTHETIC_K)), CROP_SCALE)
        K = transform_intrinsics(SYNTHETIC_K, crop_transform(box, (size, size)))
        rendered = scene.render(true_pose[None], K, size, size, supersample=4)
        coverage = rendered.coverage[0]
        rgb = photometric_noise(rendered.rgb, rng) * (coverage[..., None] > 0) \
            + (1 - coverage[..., None]) * procedural_background(size, size, rng)
        yield RefineCase(name=f'synthetic/{index}', model=model, image=rgb.astype(np.float32),
                         mask=coverage, ignore=np.zeros((size, size), bool), K=K,
                         true_pose=true_pose, start_pose=start, visib_fract=1.0)


def lmo_cases(dataset: BopDataset, image_ids: list[int], rot_deg: float, trans_frac: float,
              size: int, rng: np.random.Generator,
              min_visib_fract: float = 0.3) -> Iterator[RefineCase]:
    """Cases of every instance with BOP ``visib_fract`` >= ``min_visib_fract`` in ``image_ids``."""
    for frame in dataset.frames(image_ids):
        models = [dataset.load_model(inst.obj_id) for inst in frame.instances]
        rgb = frame.load_rgb().astype(np.float32) / 255
        height, width = rgb.shape[:2]
        labels, unknown = visible_labels(frame, models, width, height)
        for index, (inst, model) in enumerate(zip(frame.instances, models)):
            if inst.visib_fract is None or inst.visib_fract < min_visib_fract:
                continue
            visible = labels == index + 1
            if not visible.any():
                continue
            # Unknown pixels (unannotated occluders) are ignored like the annotated occluders,
            # not taken for background.
            others = ((labels > 0) & ~visible) | unknown
            true_pose = make_pose(inst.R, inst.t)
            start = perturbed_start(true_pose, rot_deg, trans_frac, rng)
            yield crop_case(f'lmo/{frame.image_id}/obj{inst.obj_id}', model, rgb, visible, others,
                            frame.K, true_pose, start, size, inst.visib_fract)


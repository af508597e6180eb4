"""Synthetic training images in the BOP format: known objects at random poses over clutter.

Each image holds 1..``max_objects`` instances of the configured objects (drawn with
replacement), each at a random viewpoint in the configured elevation range, distance range and
in-plane range, centred on a random pixel; 0..``max_occluders`` occluders (boxes, cylinders and
spheres of random colour, or given meshes) between the camera and an instance; a procedural
background (:func:`procedural_background`); Lambert shading under one random light plus ambient;
a random colour gain per instance; Gaussian blur; then :func:`photometric_noise` (per-channel
gain, smooth illumination field, sensor noise).

Ground truth, as BOP defines it: ``masks`` are the objects alone, ``masks_visib`` their pixels
where they are the nearest surface (z-buffer over all instances and occluders); a pixel belongs to
a mask when its centre falls inside the projection (a rasterizer's rule, as bop_toolkit's
renderer draws them). ``gt_info`` follows bop_toolkit's calc_gt_info (see
:func:`pose_node.datasets.bop_writer.gt_info_entry`); the visibility test is the exact z-buffer,
not a depth comparison with a tolerance, since the scene depth is known exactly.

Rendering uses :meth:`SoftRenderer.render_hard` on a canvas around each mesh's projection only.
Measured on that canvas (demo object, 5.7k faces, 640x480 camera, one thread), per mesh: about
8 ms for both it and the Embree ray caster at 1 sample per pixel (identical masks: 0 of 40765
pixels differed), 30 ms against 35-65 ms at 2 x 2 samples, 85 ms against 200 ms at 3 x 3; and
it shades (Lambert with vertex normals), which the ray caster does not. Colour is averaged over
``supersample`` x ``supersample`` samples per pixel (anti-aliased edges); masks and the z-buffer
of the ground truth take one sample at the pixel centre.

Determinism: image ``i`` draws everything from ``np.random.SeedSequence([seed, i])`` and renders
with one torch thread, so the files do not depend on the number of workers.

Units: metres and radians inside; config angles in degrees where the name says so; meshes must
be wound counter-clockwise seen from outside (the rasterizer culls back faces).
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch
import trimesh

from pose_node.camera import crop_transform, transform_intrinsics
from pose_node.datasets import bop_writer
from pose_node.crop import projected_box
from pose_node.datasets.synthetic import photometric_noise, procedural_background
from pose_node.geometry import axis_angle_to_matrix, make_pose, random_rotations
from pose_node.mesh import ObjectModel, points_diameter
from pose_node.render.base import RenderMesh, Shading
from pose_node.render.soft import SoftRenderer

OCCLUDER_PRIMITIVES = ('box', 'cylinder', 'sphere')
OCCLUDER_DEPTH_FRACTION = (0.4, 0.8)
"""An occluder's centre lies at this fraction of its target's distance from the camera."""
OCCLUDER_APPARENT_SIZE = (0.3, 0.8)
"""An occluder's diameter as it appears in the image, as a fraction of its target's."""
OCCLUDER_OFFSET = 0.6
"""Largest lateral offset from the target's centre, in target radii (apparent)."""
MIN_CLEARANCE = 0.03
"""Metres every mesh keeps in front of the camera plane (the rasterizer's near plane is 0.01)."""
LIGHT_CONE_DEG = 70.0
"""The light travels within this angle of the optical axis, so that visible faces are lit."""
AMBIENT_RANGE, DIFFUSE_RANGE = (0.25, 0.6), (0.4, 0.9)
INSTANCE_GAIN_RANGE = (0.8, 1.2)
IMAGE_GAIN_RANGE, ILLUMINATION_FIELD_MAX = (0.85, 1.15), 0.2
COLOR_JITTER = 0.05
"""Per-face colour noise (0..1) of primitive occluders, so that they are not perfectly flat."""


@dataclass(frozen=True, eq=False)
class SynthObject:
    """An object to draw: its BOP id, its mesh (metres) and its BOP models_info entry (file
    units; symmetries are carried into the written models_info.json) or None."""

    obj_id: int
    model: ObjectModel
    models_info: dict | None = None


@dataclass(frozen=True, eq=False)
class SynthConfig:
    """What the images look like.

    K (3, 3): intrinsics in pixels for images of width x height. distance_range: metres from the
    camera centre to an object's bounding-box centre. elevation_range_deg: the viewpoint's
    elevation above the model's x-y plane (+90 looks down the model's -z axis; the sphere zone
    between the limits is sampled uniformly by area). inplane_range_deg: largest rotation about
    the line of sight (180: any). centre_margin: fraction of the width/height kept between an
    object centre's projection and the image border (objects may still be cut by the border).
    occluder_models: meshes used as occluders besides the primitives (rescaled when placed).
    supersample: colour samples per pixel side. blur_sigma_max (px), noise_sigma_max (0..1):
    upper ends of the uniformly drawn blur and sensor noise.
    """

    width: int
    height: int
    K: np.ndarray
    distance_range: tuple[float, float] = (0.4, 0.9)
    elevation_range_deg: tuple[float, float] = (-90.0, 90.0)
    inplane_range_deg: float = 180.0
    max_objects: int = 3
    max_occluders: int = 2
    occluder_models: tuple[ObjectModel, ...] = ()
    centre_margin: float = 0.05
    supersample: int = 2
    blur_sigma_max: float = 1.0
    noise_sigma_max: float = 0.03


@dataclass(frozen=True, eq=False)
class Placement:
    """A mesh in the scene: pose (4, 4) object-to-camera, metres; gain (3,) colour multiplier."""

    model: ObjectModel
    pose: np.ndarray
    gain: np.ndarray


@dataclass(frozen=True, eq=False)
class SceneSample:
    """Everything random about one image except the background and the photometric noise."""

    obj_ids: list[int]
    instances: list[Placement]
    occluders: list[Placement]
    shading: Shading


@dataclass(frozen=True, eq=False)
class SynthImage:
    """One rendered image: rgb (H, W, 3) uint8; per instance obj_ids, poses (N, 4, 4) metres,
    masks and masks_visib (N, H, W) bool, gt_info (scene_gt_info entries)."""

    rgb: np.ndarray
    obj_ids: list[int]
    poses: np.ndarray
    masks: np.ndarray
    masks_visib: np.ndarray
    gt_info: list[dict]


@dataclass(frozen=True, eq=False)
class ImageRecord:
    """What was written for one image: where, and its ground truth (poses (N, 4, 4) metres)."""

    scene_id: int
    image_id: int
    obj_ids: list[int]
    poses: np.ndarray
    gt_info: list[dict]


# ------------------------------------------------------------------------------------ sampling

def sample_scene(objects: Sequence[SynthObject], config: SynthConfig,
                 rng: np.random.Generator) -> SceneSample:
    """Instances, occluders and light of one image."""
    count = int(rng.integers(1, config.max_objects + 1))
    chosen = [objects[int(i)] for i in rng.integers(len(objects), size=count)]
    instances = [Placement(obj.model, sample_object_pose(obj.model, config, rng),
                           rng.uniform(*INSTANCE_GAIN_RANGE, 3)) for obj in chosen]
    occluders = []
    for _ in range(int(rng.integers(0, config.max_occluders + 1))):
        target = instances[int(rng.integers(len(instances)))]
        occluder = sample_occluder(target, config.occluder_models, rng)
        if occluder is not None:
            occluders.append(occluder)
    return SceneSample(obj_ids=[obj.obj_id for obj in chosen], instances=instances,
                       occluders=occluders, shading=random_light(rng))


def sample_object_pose(model: ObjectModel, config: SynthConfig,
                       rng: np.random.Generator) -> np.ndarray:
    """(4, 4) pose: viewpoint in the elevation range, any azimuth, in-plane angle in range, the
    bounding-box centre at a distance in range on the ray through a random pixel."""
    sin_low, sin_high = np.sin(np.deg2rad(config.elevation_range_deg))
    elevation = np.arcsin(rng.uniform(sin_low, sin_high))
    azimuth = rng.uniform(0.0, 2.0 * np.pi)
    inplane = np.deg2rad(config.inplane_range_deg) * rng.uniform(-1.0, 1.0)
    margin = config.centre_margin
    pixel = (rng.uniform(margin, 1.0 - margin) * config.width - 0.5,
             rng.uniform(margin, 1.0 - margin) * config.height - 0.5)
    distance = rng.uniform(*config.distance_range)
    return viewpoint_pose(model, elevation, azimuth, inplane, pixel_ray(config.K, pixel),
                          distance)


def viewpoint_pose(model: ObjectModel, elevation: float, azimuth: float, inplane: float,
                   ray: np.ndarray, distance: float) -> np.ndarray:
    """(4, 4) pose that puts the model's bounding-box centre at ``distance`` metres along the
    unit camera-frame ``ray`` (3,), seen from ``elevation`` / ``azimuth`` (radians) in the
    model frame, rotated by ``inplane`` radians about the line of sight."""
    view = np.array([np.cos(elevation) * np.cos(azimuth), np.cos(elevation) * np.sin(azimuth),
                     np.sin(elevation)])
    R = (rotation_between(np.array([0.0, 0.0, 1.0]), ray)
         @ axis_angle_to_matrix(np.array([0.0, 0.0, inplane])) @ look_at_rotation(view))
    centre = model.bbox_centre
    return make_pose(R, distance * ray - R @ centre)


def look_at_rotation(view: np.ndarray) -> np.ndarray:
    """(3, 3) model-to-camera rotation of a camera on the model's ``view`` (3,) direction (unit,
    from the object towards the camera) looking at the model, the model's +z pointing up in the
    image (-y) as far as the view allows (+y when looking along z)."""
    forward = -view
    up = np.array([0.0, 0.0, 1.0]) if abs(view[2]) < 1 - 1e-9 else np.array([0.0, 1.0, 0.0])
    down = -(up - (up @ forward) * forward)
    down /= np.linalg.norm(down)
    return np.stack([np.cross(down, forward), down, forward])


def rotation_between(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(3, 3) smallest rotation taking unit vector a (3,) to unit vector b (3,) (not opposite)."""
    cross = np.cross(a, b)
    norm = np.linalg.norm(cross)
    if norm < 1e-12:
        return np.eye(3)
    return axis_angle_to_matrix(cross / norm * np.arctan2(norm, a @ b))


def pixel_ray(K: np.ndarray, pixel: tuple[float, float]) -> np.ndarray:
    """(3,) unit camera-frame direction through ``pixel`` (u, v)."""
    ray = np.linalg.solve(K, np.array([pixel[0], pixel[1], 1.0]))
    return ray / np.linalg.norm(ray)


def sample_occluder(target: Placement, meshes: Sequence[ObjectModel],
                    rng: np.random.Generator) -> Placement | None:
    """An occluder between the camera and ``target``, overlapping its projection; a random
    primitive or one of ``meshes``. None when it would come too close to the camera."""
    target_centre = target.pose[:3, :3] @ (0.5 * (target.model.bbox_min + target.model.bbox_max)) \
        + target.pose[:3, 3]
    fraction = rng.uniform(*OCCLUDER_DEPTH_FRACTION)
    size = rng.uniform(*OCCLUDER_APPARENT_SIZE) * target.model.diameter * fraction
    axis = target_centre / np.linalg.norm(target_centre)
    lateral = rng.standard_normal(3)
    lateral -= (lateral @ axis) * axis
    lateral *= rng.uniform(0.0, OCCLUDER_OFFSET) * 0.5 * target.model.diameter \
        / np.linalg.norm(lateral)
    centre = fraction * (target_centre + lateral)
    kind = int(rng.integers(len(OCCLUDER_PRIMITIVES) + len(meshes)))
    color = rng.uniform(0.05, 0.95, 3)
    if kind < len(OCCLUDER_PRIMITIVES):
        model = primitive_model(OCCLUDER_PRIMITIVES[kind], size, color, rng)
    else:
        model = rescaled_model(meshes[kind - len(OCCLUDER_PRIMITIVES)], size, color)
    if centre[2] - reach(model) < MIN_CLEARANCE:
        return None
    return Placement(model, make_pose(random_rotations(1, rng)[0], centre), np.ones(3))


def primitive_model(kind: str, diameter: float, color: np.ndarray,
                    rng: np.random.Generator) -> ObjectModel:
    """A box, cylinder or sphere of ``diameter`` metres centred at the origin, random aspect,
    colour ``color`` (3,) 0..1 with per-face jitter. Boxes and cylinders get one set of vertices
    per face, so that their faces shade flat."""
    if kind == 'box':
        extents = rng.uniform(0.3, 1.0, 3)
        mesh = trimesh.creation.box(extents=extents / np.linalg.norm(extents) * diameter)
    elif kind == 'cylinder':
        radius, height = rng.uniform(0.3, 1.0, 2)
        scale = diameter / np.hypot(2 * radius, height)
        mesh = trimesh.creation.cylinder(radius=radius * scale, height=height * scale,
                                         sections=24)
    elif kind == 'sphere':
        mesh = trimesh.creation.icosphere(subdivisions=2, radius=0.5 * diameter)
    else:
        raise ValueError(f'unknown primitive {kind!r}; expected one of {OCCLUDER_PRIMITIVES}')
    if kind != 'sphere':
        mesh.unmerge_vertices()
    faces = np.asarray(mesh.faces, np.int64)
    face_colors = color + rng.uniform(-COLOR_JITTER, COLOR_JITTER, (len(faces), 3))
    colors = np.empty((len(mesh.vertices), 3))
    colors[faces.ravel()] = np.repeat(face_colors, 3, axis=0)
    vertices = np.asarray(mesh.vertices, np.float64)
    return ObjectModel(name=kind, vertices=vertices.astype(np.float32), faces=faces,
                       vertex_colors=np.clip(colors, 0, 1).astype(np.float32), has_colors=True,
                       diameter=points_diameter(vertices), symmetries=np.eye(4)[None])


def rescaled_model(model: ObjectModel, diameter: float, color: np.ndarray) -> ObjectModel:
    """``model`` centred on its bounding box and scaled to ``diameter`` metres; coloured
    ``color`` (3,) when it has no colours of its own."""
    scale = diameter / model.diameter
    vertices = (model.vertices - model.bbox_centre) * scale
    colors = model.vertex_colors if model.has_colors else \
        np.broadcast_to(color, model.vertices.shape)
    return replace(model, vertices=vertices.astype(np.float32),
                   vertex_colors=np.ascontiguousarray(colors, np.float32),
                   diameter=model.diameter * scale, symmetries=np.eye(4)[None])


def reach(model: ObjectModel) -> float:
    """Metres from the model's bounding-box centre to its farthest vertex."""
    centre = model.bbox_centre
    return float(np.linalg.norm(model.vertices - centre, axis=1).max())


def random_light(rng: np.random.Generator) -> Shading:
    """Lambert shading with a light travelling within ``LIGHT_CONE_DEG`` of the optical axis."""
    cos_low = np.cos(np.deg2rad(LIGHT_CONE_DEG))
    cos_angle = rng.uniform(cos_low, 1.0)
    azimuth = rng.uniform(0.0, 2.0 * np.pi)
    sin_angle = np.sqrt(1.0 - cos_angle ** 2)
    direction = (sin_angle * np.cos(azimuth), sin_angle * np.sin(azimuth), cos_angle)
    return Shading(lambert=True, light_direction=tuple(float(v) for v in direction),
                   ambient=float(rng.uniform(*AMBIENT_RANGE)),
                   diffuse=float(rng.uniform(*DIFFUSE_RANGE)))


# ----------------------------------------------------------------------------------- rendering

@dataclass(frozen=True, eq=False)
class Layer:
    """One mesh rendered alone on a canvas of s x s samples per pixel around its projection.

    origin (x0, y0): the image pixel of the canvas's first pixel (may lie outside the image).
    silhouette (h*s, w*s) bool; depth (h*s, w*s) float32 metres, inf where empty;
    rgb (h*s, w*s, 3) float32 0..1, 0 where empty.
    """

    origin: tuple[int, int]
    scale: int
    silhouette: np.ndarray
    depth: np.ndarray
    rgb: np.ndarray


def pixel_box(model: ObjectModel, pose: np.ndarray, K: np.ndarray,
              margin: int = 1) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) inclusive pixel box of every pixel centre in the model's projection,
    widened by ``margin`` pixels (which samples off the centre may reach)."""
    x, y, w, h = projected_box(model, pose, K)
    low = np.ceil([x, y]).astype(int)
    high = np.floor([x + w, y + h]).astype(int)
    return (int(low[0]) - margin, int(low[1]) - margin, int(high[0]) + margin,
            int(high[1]) + margin)


def clip_box(box: tuple[int, int, int, int], width: int,
             height: int) -> tuple[int, int, int, int] | None:
    """``box`` restricted to the image, None when they do not overlap."""
    x0, y0 = max(box[0], 0), max(box[1], 0)
    x1, y1 = min(box[2], width - 1), min(box[3], height - 1)
    return (x0, y0, x1, y1) if x0 <= x1 and y0 <= y1 else None


def box_intrinsics(K: np.ndarray, box: tuple[int, int, int, int], scale: int) -> np.ndarray:
    """(3, 3) intrinsics of a canvas over ``box`` (inclusive pixels) with ``scale`` x ``scale``
    samples per pixel: the box's outer pixel edges become the canvas's."""
    width, height = box[2] - box[0] + 1, box[3] - box[1] + 1
    edges = (box[0] - 0.5, box[1] - 0.5, width, height)
    return transform_intrinsics(K, crop_transform(edges, (width * scale, height * scale)))


def render_layer(renderer: SoftRenderer, mesh: RenderMesh, placement: Placement, K: np.ndarray,
                 box: tuple[int, int, int, int], scale: int, shading: Shading) -> Layer:
    """``placement`` drawn alone over ``box`` (inclusive pixels) with ``scale`` samples per side."""
    width, height = (box[2] - box[0] + 1) * scale, (box[3] - box[1] + 1) * scale
    pose = torch.as_tensor(placement.pose)
    out = renderer.render_hard(mesh, pose[None, :3, :3], pose[None, :3, 3],
                               torch.as_tensor(box_intrinsics(K, box, scale)),
                               width, height, shading)
    silhouette = out.silhouette[0].cpu().numpy() > 0.5
    depth = np.where(silhouette, out.depth[0].cpu().numpy(), np.inf).astype(np.float32)
    rgb = (out.rgb[0].cpu().numpy() * placement.gain).astype(np.float32)
    return Layer(origin=(box[0], box[1]), scale=scale, silhouette=silhouette, depth=depth,
                 rgb=rgb)


def _overlap(layer: Layer, width: int, height: int
             ) -> tuple[tuple[slice, slice], tuple[slice, slice]] | None:
    """(image sample slices, layer slices) of the part of ``layer`` inside a width x height
    image, in samples; None when it lies outside."""
    s = layer.scale
    top, left = layer.origin[1] * s, layer.origin[0] * s
    rows, cols = layer.silhouette.shape
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + rows, height * s), min(left + cols, width * s)
    if y0 >= y1 or x0 >= x1:
        return None
    return ((slice(y0, y1), slice(x0, x1)),
            (slice(y0 - top, y1 - top), slice(x0 - left, x1 - left)))


def in_image(layer: Layer, width: int, height: int) -> np.ndarray:
    """(H*s, W*s) bool: the layer's silhouette placed in the image, cut at its border."""
    s = layer.scale
    mask = np.zeros((height * s, width * s), bool)
    overlap = _overlap(layer, width, height)
    if overlap is not None:
        mask[overlap[0]] = layer.silhouette[overlap[1]]
    return mask


def z_buffer(layers: Sequence[Layer], width: int, height: int
             ) -> tuple[np.ndarray, np.ndarray]:
    """Nearest layer per sample: owner (H*s, W*s) int, the layer index or -1, and rgb
    (H*s, W*s, 3) float32 of that layer (0 where none). All layers share one scale s; on equal
    depth the earlier layer wins."""
    s = layers[0].scale if layers else 1
    depth = np.full((height * s, width * s), np.inf, np.float32)
    owner = np.full(depth.shape, -1, np.int64)
    rgb = np.zeros(depth.shape + (3,), np.float32)
    for index, layer in enumerate(layers):
        overlap = _overlap(layer, width, height)
        if overlap is None:
            continue
        image, local = overlap
        nearer = layer.silhouette[local] & (layer.depth[local] < depth[image])
        depth[image][nearer] = layer.depth[local][nearer]
        owner[image][nearer] = index
        rgb[image][nearer] = layer.rgb[local][nearer]
    return owner, rgb


def downsample(owner: np.ndarray, rgb: np.ndarray, scale: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel, the covered fraction (H, W) and mean premultiplied colour (H, W, 3) of
    s x s samples: owner (H*s, W*s) (-1: empty) and rgb (H*s, W*s, 3)."""
    if scale == 1:
        return (owner >= 0).astype(np.float32), rgb
    stacked = np.concatenate([rgb, (owner >= 0)[..., None].astype(np.float32)], axis=-1)
    size = (owner.shape[1] // scale, owner.shape[0] // scale)
    # INTER_AREA at an integer factor is the mean of each s x s block.
    mean = cv2.resize(stacked, size, interpolation=cv2.INTER_AREA)
    return mean[..., 3], mean[..., :3]


def render_scene(scene: SceneSample, config: SynthConfig, renderer: SoftRenderer,
                 rng: np.random.Generator) -> SynthImage:
    """Render ``scene``: colour (background, blur, noise drawn from ``rng``) and ground truth."""
    width, height, K, s = config.width, config.height, config.K, config.supersample
    placements = scene.instances + scene.occluders
    meshes = [RenderMesh.from_model(p.model, renderer.device) for p in placements]
    boxes = [pixel_box(p.model, p.pose, K) for p in placements]
    n_instances = len(scene.instances)
    in_view = [(i, clip_box(box, width, height)) for i, box in enumerate(boxes)]
    # Ground truth at pixel centres. Instances come first (layer i is instance i), each on its
    # whole box: px_count_all and bbox_obj count what the image border cuts off.
    centre_layers = [render_layer(renderer, meshes[i], placements[i], K, boxes[i], 1,
                                  scene.shading) for i in range(n_instances)]
    centre_layers += [render_layer(renderer, meshes[i], placements[i], K, box, 1, scene.shading)
                      for i, box in in_view[n_instances:] if box is not None]
    labels, centre_rgb = z_buffer(centre_layers, width, height)
    if s == 1:
        owner, sample_rgb = labels, centre_rgb
    else:
        sample_layers = [render_layer(renderer, meshes[i], placements[i], K, box, s,
                                      scene.shading) for i, box in in_view if box is not None]
        owner, sample_rgb = z_buffer(sample_layers, width, height)
    covered, foreground = downsample(owner, sample_rgb, s)
    background = procedural_background(width, height, rng)
    rgb = foreground + (1.0 - covered)[..., None] * background
    rgb = finish_image(rgb, config, rng)
    masks = np.stack([in_image(layer, width, height) for layer in centre_layers[:n_instances]])
    masks_visib = np.stack([labels == i for i in range(n_instances)])
    gt_info = [bop_writer.gt_info_entry(layer.silhouette, layer.origin, visible)
               for layer, visible in zip(centre_layers, masks_visib)]
    return SynthImage(rgb=rgb, obj_ids=list(scene.obj_ids),
                      poses=np.stack([p.pose for p in scene.instances]), masks=masks,
                      masks_visib=masks_visib, gt_info=gt_info)


def finish_image(rgb: np.ndarray, config: SynthConfig, rng: np.random.Generator) -> np.ndarray:
    """(H, W, 3) uint8 from linear rgb (H, W, 3): random blur, then gain, illumination field and
    noise (:func:`photometric_noise`)."""
    sigma = rng.uniform(0.0, config.blur_sigma_max)
    blurred = cv2.GaussianBlur(rgb, (0, 0), sigma) if sigma > 0.1 else rgb
    noisy = photometric_noise(np.clip(blurred, 0, 1), rng, gain_range=IMAGE_GAIN_RANGE,
                              shading_amplitude=rng.uniform(0.0, ILLUMINATION_FIELD_MAX),
                              noise_sigma=rng.uniform(0.0, config.noise_sigma_max))
    return np.round(noisy * 255).astype(np.uint8)


def synthesize_image(objects: Sequence[SynthObject], config: SynthConfig, seed: int, index: int,
                     device: torch.device) -> SynthImage:
    """Image ``index`` of the sequence seeded by ``seed``: the same arguments give the same
    image, whatever else is generated."""
    rng = image_rng(seed, index)
    scene = sample_scene(objects, config, rng)
    with torch_threads(1):
        return render_scene(scene, config, SoftRenderer(device), rng)


def image_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of image ``index``, independent of every other image's."""
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch threads (results then never depend on the machine's
    core count), restoring the previous count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -------------------------------------------------------------------------------------- dataset

@dataclass(frozen=True)
class OutputLayout:
    """Where images go: ``root/<split>/<scene>/``, ``images_per_scene`` images per scene folder
    (image ``i`` is image ``i % n`` of scene ``i // n``), colour images as png or jpg."""

    split: str = 'train'
    images_per_scene: int = 1000
    rgb_format: str = 'png'

    def place(self, index: int) -> tuple[int, int]:
        """(scene_id, image_id) of the ``index``-th image."""
        return index // self.images_per_scene, index % self.images_per_scene


def validate(objects: Sequence[SynthObject], config: SynthConfig, layout: OutputLayout) -> None:
    """ValueError naming what cannot work: no objects, duplicate ids, bad ranges or layout, or
    objects that would reach behind the camera at the nearest distance."""
    if not objects:
        raise ValueError('no objects to draw')
    ids = [obj.obj_id for obj in objects]
    if len(set(ids)) != len(ids):
        raise ValueError(f'duplicate object ids {ids}')
    low, high = config.distance_range
    if not 0 < low <= high:
        raise ValueError(f'distance range must satisfy 0 < min <= max, got {low}, {high}')
    e_low, e_high = config.elevation_range_deg
    if not -90 <= e_low <= e_high <= 90:
        raise ValueError(f'elevations must satisfy -90 <= min <= max <= 90, got {e_low}, {e_high}')
    if config.max_objects < 1 or config.max_occluders < 0 or config.supersample < 1:
        raise ValueError('max_objects >= 1, max_occluders >= 0 and supersample >= 1 required')
    if config.width < 1 or config.height < 1:
        raise ValueError(f'image size must be positive, got {config.width}x{config.height}')
    if layout.rgb_format not in bop_writer.RGB_FORMATS or layout.images_per_scene < 1:
        raise ValueError(f'rgb format must be one of {bop_writer.RGB_FORMATS} and '
                         f'images_per_scene >= 1, got {layout}')
    # The most oblique line of sight, through a corner of the region object centres fall in.
    margin = config.centre_margin
    corners = [(fx * config.width - 0.5, fy * config.height - 0.5)
               for fx in (margin, 1 - margin) for fy in (margin, 1 - margin)]
    nearest_z = low * min(pixel_ray(config.K, corner)[2] for corner in corners)
    for obj in objects:
        if nearest_z - reach(obj.model) < MIN_CLEARANCE:
            raise ValueError(f'object {obj.obj_id} ({obj.model.name}) reaches '
                             f'{reach(obj.model):.3f} m from its centre and may come within '
                             f'{MIN_CLEARANCE} m of the camera plane: raise the smallest '
                             f'distance (now {low} m)')


def generate_dataset(root: Path, objects: Sequence[SynthObject], config: SynthConfig,
                     n_images: int, seed: int, device: torch.device, workers: int = 1,
                     layout: OutputLayout = OutputLayout(),
                     progress: Callable[[int], None] | None = None) -> list[ImageRecord]:
    """Write ``n_images`` images with their ground truth as a BOP dataset under ``root``.

    Writes camera.json, models/ (meshes in mm, models_info.json) and the split's scenes.
    ``workers`` > 1 renders in that many processes; the files are the same for any count.
    ``progress(n)`` is called after each image with the count done. Raises FileExistsError when
    the split folder already holds files (nothing is overwritten or mixed).
    """
    validate(objects, config, layout)
    root = Path(root)
    split_dir = root / layout.split
    if split_dir.is_dir() and any(split_dir.iterdir()):
        raise FileExistsError(f'{split_dir} is not empty; choose another --out or split')
    bop_writer.write_camera(root, config.K, config.width, config.height)
    bop_writer.write_models(root / 'models', {obj.obj_id: obj.model for obj in objects},
                            {obj.obj_id: obj.models_info for obj in objects})
    job = partial(write_image, root=root, objects=tuple(objects), config=config, seed=seed,
                  device=device, layout=layout)
    records: list[ImageRecord] = []
    scene_start = 0
    with _image_results(job, n_images, workers) as results:
        for record in results:
            if records and record.scene_id != records[-1].scene_id:
                write_scene_annotations(root, layout, config, records[scene_start:])
                scene_start = len(records)
            records.append(record)
            if progress is not None:
                progress(len(records))
    if records:
        write_scene_annotations(root, layout, config, records[scene_start:])
    return records


def write_image(index: int, root: Path, objects: Sequence[SynthObject], config: SynthConfig,
                seed: int, device: torch.device, layout: OutputLayout) -> ImageRecord:
    """Render image ``index`` and write its colour image and masks; its annotation returned."""
    scene_id, image_id = layout.place(index)
    image = synthesize_image(objects, config, seed, index, device)
    bop_writer.write_frame_images(bop_writer.scene_dir(root, layout.split, scene_id), image_id,
                                  image.rgb, image.masks, image.masks_visib, layout.rgb_format)
    return ImageRecord(scene_id=scene_id, image_id=image_id, obj_ids=image.obj_ids,
                       poses=image.poses, gt_info=image.gt_info)


def write_scene_annotations(root: Path, layout: OutputLayout, config: SynthConfig,
                            records: Sequence[ImageRecord]) -> None:
    """The scene JSON files of one scene's ``records``."""
    scene = bop_writer.scene_dir(root, layout.split, records[0].scene_id)
    camera = bop_writer.camera_entry(config.K)
    bop_writer.write_scene_json(
        scene,
        camera={r.image_id: camera for r in records},
        gt={r.image_id: [bop_writer.gt_entry(obj_id, pose)
                         for obj_id, pose in zip(r.obj_ids, r.poses)] for r in records},
        gt_info={r.image_id: r.gt_info for r in records})


@contextmanager
def _image_results(job: Callable[[int], ImageRecord], n_images: int,
                   workers: int) -> Iterator[Iterator[ImageRecord]]:
    """The records of images 0..n-1 in order, from this process or a pool of ``workers``.

    Workers are forked from a fresh server process that has imported this module but run no
    torch code (forking a process that has run torch can deadlock); importing once there instead
    of once per spawned worker saves about 3 s per worker.
    """
    if workers <= 1:
        yield (job(index) for index in range(n_images))
        return
    context = multiprocessing.get_context('forkserver')
    context.set_forkserver_preload([__name__])
    with context.Pool(workers) as pool:
        yield pool.imap(job, range(n_images))

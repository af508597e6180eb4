"""``pose_tools synth``: write synthetic training images with ground truth in the BOP format.

Each image: 1..--max-objects instances of the objects at random poses (distance and viewpoint
ranges below), --occluders (at most, per image) random boxes, cylinders, spheres or
--occluder-meshes between the camera and an instance, a procedural background, random lighting,
colour jitter, blur and noise. Written: camera.json, models/ (mm) with models_info.json, and
<split>/<scene>/ rgb, mask, mask_visib, scene_camera/gt/gt_info.json, readable by
pose_node.datasets.bop.BopDataset(out, split). The same --seed gives the same bytes, whatever
--workers.
"""
import argparse
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pose_node.datasets.bop import BOP_UNIT_SCALE
from pose_node.datasets.synth import OutputLayout, SynthConfig, SynthObject, generate_dataset
from pose_node.mesh import load_models_info, load_object_model
from pose_node.resources import demo_object_dir
from pose_node.resources import load_demo_object

DEFAULT_FOCAL_PER_WIDTH = 0.9375
"""Default fx = fy as a multiple of the width: 600 px at 640 px, a 56 deg horizontal view."""


def register(subparsers) -> None:
    parser = subparsers.add_parser('synth', help='write synthetic training images (BOP format)',
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, required=True, help='dataset folder to write')
    parser.add_argument('--objects', type=Path, nargs='+', default=None,
                        help='mesh files (PLY/OBJ) or BOP models folders (with '
                             'models_info.json); default: the embedded demo object')
    parser.add_argument('--obj-ids', type=int, nargs='+', default=None,
                        help='from BOP models folders, only these object ids')
    parser.add_argument('--unit-scale', type=float, default=1.0,
                        help='metres per unit of the mesh files (0.001 for mm); BOP folders '
                             'are always mm')
    parser.add_argument('--n-images', type=int, default=100)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--width', type=int, default=640)
    parser.add_argument('--height', type=int, default=480)
    parser.add_argument('--fx', type=float, default=None, help='focal length, px')
    parser.add_argument('--fy', type=float, default=None, help='default: fx')
    parser.add_argument('--fov', type=float, default=None,
                        help='horizontal field of view, deg (instead of --fx; default: fx = '
                             f'{DEFAULT_FOCAL_PER_WIDTH} x width)')
    parser.add_argument('--distance-min', type=float, default=0.4,
                        help='camera to object centre, m')
    parser.add_argument('--distance-max', type=float, default=0.9)
    parser.add_argument('--elevation-min', type=float, default=-90.0,
                        help="viewpoint elevation above the model's x-y plane, deg")
    parser.add_argument('--elevation-max', type=float, default=90.0)
    parser.add_argument('--inplane-max', type=float, default=180.0,
                        help='largest rotation about the line of sight, deg')
    parser.add_argument('--max-objects', type=int, default=3, help='instances per image: 1..k')
    parser.add_argument('--occluders', type=int, default=2, help='occluders per image: 0..N')
    parser.add_argument('--occluder-meshes', type=Path, nargs='+', default=(),
                        help='meshes used as occluders besides boxes, cylinders and spheres')
    parser.add_argument('--supersample', type=int, default=2,
                        help='colour samples per pixel side (masks: pixel centres)')
    parser.add_argument('--split', default='train')
    parser.add_argument('--images-per-scene', type=int, default=1000)
    parser.add_argument('--rgb-format', choices=('png', 'jpg'), default='png')
    parser.add_argument('--workers', type=int, default=1, help='processes rendering images')
    parser.add_argument('--device', default='cpu', help='torch device of the rasterizer')
    parser.set_defaults(func=run)


def intrinsics(width: int, height: int, fx: float | None, fy: float | None,
               fov_deg: float | None) -> np.ndarray:
    """(3, 3) K with the principal point at the image centre ((W - 1) / 2, (H - 1) / 2)."""
    if fx is None:
        fx = (0.5 * width / np.tan(np.deg2rad(0.5 * fov_deg)) if fov_deg is not None
              else DEFAULT_FOCAL_PER_WIDTH * width)
    fy = fx if fy is None else fy
    return np.array([[fx, 0.0, 0.5 * (width - 1)], [0.0, fy, 0.5 * (height - 1)],
                     [0.0, 0.0, 1.0]])


def load_objects(paths: list[Path] | None, unit_scale: float,
                 obj_ids: list[int] | None) -> list[SynthObject]:
    """The demo object (id 1) when ``paths`` is None; else every object of each BOP models
    folder (restricted to ``obj_ids``) and each mesh file, files numbered after the largest id
    so far."""
    if paths is None:
        info = load_models_info(demo_object_dir() / 'models_info.json')[1]
        return [SynthObject(1, load_demo_object(), info)]
    objects: list[SynthObject] = []
    for path in paths:
        if path.is_dir():
            objects += bop_folder_objects(path, obj_ids)
        else:
            next_id = max((obj.obj_id for obj in objects), default=0) + 1
            objects.append(SynthObject(next_id, load_object_model(path, unit_scale=unit_scale)))
    return objects


def bop_folder_objects(folder: Path, obj_ids: list[int] | None) -> list[SynthObject]:
    """The objects of a BOP models folder (meshes in mm), all or those in ``obj_ids``."""
    info = load_models_info(folder / 'models_info.json')
    wanted = sorted(info) if obj_ids is None else obj_ids
    missing = sorted(set(wanted) - set(info))
    if missing:
        raise ValueError(f'{folder}: no object ids {missing} in models_info.json')
    return [SynthObject(obj_id, load_object_model(folder / f'obj_{obj_id:06d}.ply',
                                                  name=f'obj_{obj_id:06d}',
                                                  unit_scale=BOP_UNIT_SCALE,
                                                  models_info=info[obj_id]), info[obj_id])
            for obj_id in wanted]


def run(args: argparse.Namespace) -> int:
    objects = load_objects(args.objects, args.unit_scale, args.obj_ids)
    config = SynthConfig(
        width=args.width, height=args.height,
        K=intrinsics(args.width, args.height, args.fx, args.fy, args.fov),
        distance_range=(args.distance_min, args.distance_max),
        elevation_range_deg=(args.elevation_min, args.elevation_max),
        inplane_range_deg=args.inplane_max, max_objects=args.max_objects,
        max_occluders=args.occluders,
        occluder_models=tuple(load_object_model(p) for p in args.occluder_meshes),
        supersample=args.supersample)
    layout = OutputLayout(split=args.split, images_per_scene=args.images_per_scene,
                          rgb_format=args.rgb_format)
    print(f'synth: {len(objects)} object(s) {[o.obj_id for o in objects]}, {args.n_images} '
          f'images {args.width}x{args.height}, {args.workers} worker(s) -> {args.out}')
    started = time.monotonic()
    with tqdm(total=args.n_images, unit='img') as bar:
        records = generate_dataset(args.out, objects, config, args.n_images, args.seed,
                                   torch.device(args.device), workers=args.workers,
                                   layout=layout, progress=lambda done: bar.update(done - bar.n))
    seconds = time.monotonic() - started
    instances = [info for record in records for info in record.gt_info]
    visib = np.mean([info['visib_fract'] for info in instances]) if instances else float('nan')
    print(f'synth: images={len(records)} instances={len(instances)} '
          f'mean_visib_fract={visib:.2f} seconds={seconds:.1f} '
          f'images_per_s={len(records) / max(seconds, 1e-9):.2f}')
    return 0

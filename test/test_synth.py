"""Synthetic BOP data: what `pose_tools synth` writes reads back through BopDataset and agrees
with independent references (Embree ray casting at the GT poses, hand computations)."""
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from pose_node.datasets import bop_writer
from pose_node.datasets.bop import BopDataset, mask_path
from pose_node.crop import projected_box
from pose_node.datasets.synth import SynthConfig, box_intrinsics, downsample, generate_dataset, \
    look_at_rotation, sample_object_pose, synthesize_image, viewpoint_pose
from pose_node.geometry import make_pose
from pose_node.mesh import load_models_info
from pose_node.render.raycast import RaycastScene
from pose_node.resources import demo_object_dir
from pose_node.tools import cli
from pose_node.tools.synth import intrinsics, load_objects

WIDTH, HEIGHT = 160, 120
SEED = 4
CPU = torch.device('cpu')
EDGE_TOLERANCE_PX = 3
"""Pixels whose centre lies on a triangle edge may go either way between float32 rasterizing
and float64 ray casting."""


@pytest.fixture(scope='module')
def objects():
    return load_objects(None, 1.0, None)


def config(occluders: int) -> SynthConfig:
    return SynthConfig(width=WIDTH, height=HEIGHT, K=intrinsics(WIDTH, HEIGHT, None, None, None),
                       distance_range=(0.35, 0.6), max_objects=3, max_occluders=occluders)


@pytest.fixture(scope='module')
def occluded(objects, tmp_path_factory):
    """4 images with up to 2 occluders each, written by one process."""
    root = tmp_path_factory.mktemp('occluded')
    records = generate_dataset(root, objects, config(2), 4, SEED, CPU, workers=1)
    return root, records


@pytest.fixture(scope='module')
def unoccluded(objects, tmp_path_factory):
    root = tmp_path_factory.mktemp('unoccluded')
    generate_dataset(root, objects, config(0), 3, SEED + 1, CPU, workers=1)
    return root


def read_mask(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image.dtype == np.uint8 and image.ndim == 2 and set(np.unique(image)) <= {0, 255}
    return image == 255


def instance_masks(root: Path, frame, index: int) -> tuple[np.ndarray, np.ndarray]:
    scene = root / 'train' / f'{frame.scene_id:06d}'
    return (read_mask(mask_path(scene, frame.image_id, index, visible=False)),
            read_mask(mask_path(scene, frame.image_id, index, visible=True)))


def raw_gt_info(root: Path) -> dict:
    return json.loads((root / 'train' / '000000' / 'scene_gt_info.json').read_text())


def frame_poses(frame) -> np.ndarray:
    return np.stack([make_pose(inst.R, inst.t) for inst in frame.instances])


def ray_cast_labels(dataset: BopDataset, frame) -> np.ndarray:
    """(H, W) z-buffer labels of the frame's objects alone (no occluders), by the ray caster."""
    poses = frame_poses(frame)
    return RaycastScene([dataset.load_model(1)] * len(poses)).render(
        poses, frame.K, WIDTH, HEIGHT).labels


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*'))
            if p.is_file()}


# --------------------------------------------------------------------------- read back

def test_ground_truth_reads_back_in_metres(occluded, objects):
    root, records = occluded
    dataset = BopDataset(root, split='train')
    frames = list(dataset.frames())
    assert [f.image_id for f in frames] == [0, 1, 2, 3]
    for frame, record in zip(frames, records):
        # An independent call regenerates the image from (seed, index) alone.
        image = synthesize_image(objects, config(2), SEED, frame.image_id, CPU)
        assert [inst.obj_id for inst in frame.instances] == image.obj_ids == record.obj_ids
        assert set(image.obj_ids) == {1}
        np.testing.assert_allclose(frame_poses(frame), image.poses, atol=1e-12)
        np.testing.assert_array_equal(record.poses, image.poses)
        np.testing.assert_allclose(frame.K, config(2).K, atol=0)
        assert frame.load_rgb().shape == (HEIGHT, WIDTH, 3)
        np.testing.assert_array_equal(frame.load_rgb(), image.rgb)
        for inst in frame.instances:   # metres: 0.35..0.6 m from the camera
            assert 0.3 < np.linalg.norm(inst.t) < 0.65
    camera = json.loads((root / 'camera.json').read_text())
    assert (camera['width'], camera['height'], camera['fx']) == (WIDTH, HEIGHT, 0.9375 * WIDTH)


def test_models_read_back_in_metres(occluded, objects):
    root, _ = occluded
    model = BopDataset(root, split='train').load_model(1)
    demo = objects[0].model
    np.testing.assert_allclose(model.vertices, demo.vertices, atol=1e-7)
    np.testing.assert_array_equal(model.faces, demo.faces)
    np.testing.assert_allclose(model.vertex_colors, demo.vertex_colors, atol=1 / 255)
    assert model.diameter == pytest.approx(demo.diameter, rel=1e-9)


def test_objects_from_a_bop_folder_and_a_mesh_file(objects):
    folder = demo_object_dir()
    loaded = load_objects([folder, folder / 'obj_000001.ply'], 0.001, None)
    assert [obj.obj_id for obj in loaded] == [1, 2]   # files numbered after the folder's ids
    for obj in loaded:
        np.testing.assert_allclose(obj.model.vertices, objects[0].model.vertices, atol=1e-9)
    assert loaded[0].models_info == load_models_info(folder / 'models_info.json')[1]
    assert loaded[1].models_info is None
    with pytest.raises(ValueError, match='no object ids'):
        load_objects([folder], 1.0, [2])


# ------------------------------------------------------------------------------- masks

def test_masks_equal_ray_cast_silhouettes(occluded):
    root, _ = occluded
    dataset = BopDataset(root, split='train')
    model = dataset.load_model(1)
    scene = RaycastScene([model])
    for frame in dataset.frames():
        for index, pose in enumerate(frame_poses(frame)):
            full, _ = instance_masks(root, frame, index)
            reference = scene.render(pose[None], frame.K, WIDTH, HEIGHT).coverage[0] > 0.5
            assert reference.sum() > 0
            assert np.count_nonzero(full != reference) <= EDGE_TOLERANCE_PX


def test_unoccluded_visible_masks_equal_the_ray_cast_z_buffer(unoccluded):
    dataset = BopDataset(unoccluded, split='train')
    for frame in dataset.frames():
        labels = ray_cast_labels(dataset, frame)
        for index in range(len(frame.instances)):
            _, visible = instance_masks(unoccluded, frame, index)
            assert np.count_nonzero(visible != (labels == index + 1)) <= EDGE_TOLERANCE_PX


def test_occluders_only_remove_visible_pixels_and_do_remove_some(occluded):
    root, _ = occluded
    dataset = BopDataset(root, split='train')
    hidden_by_occluders = []
    for frame in dataset.frames():
        labels = ray_cast_labels(dataset, frame)
        for index in range(len(frame.instances)):
            full, visible = instance_masks(root, frame, index)
            assert not np.any(visible & ~full)
            unoccluded_visible = labels == index + 1
            assert np.count_nonzero(visible & ~unoccluded_visible) <= EDGE_TOLERANCE_PX
            hidden_by_occluders.append(np.count_nonzero(unoccluded_visible & ~visible))
    assert max(hidden_by_occluders) > 50


def test_sample_canvas_is_aligned_with_the_pixel_grid():
    K = intrinsics(WIDTH, HEIGHT, None, None, None)
    K_box = box_intrinsics(K, (10, 20, 29, 34), 3)      # pixels x 10..29, y 20..34, 3x3 samples
    point = np.linalg.solve(K, [10.0, 34.0, 1.0])       # centre of pixel (10, 34)
    uv = K_box @ point
    # Its samples are columns 0..2 and rows 42..44 of the canvas: their middle is (1, 43).
    np.testing.assert_allclose(uv[:2] / uv[2], [1.0, 43.0], atol=1e-9)


def test_downsample_averages_blocks_of_samples():
    rng = np.random.default_rng(0)
    owner = rng.integers(-1, 3, (8, 12))
    rgb = rng.random((8, 12, 3)).astype(np.float32)
    covered, color = downsample(owner, rgb, 2)
    np.testing.assert_allclose(covered, (owner >= 0).reshape(4, 2, 6, 2).mean(axis=(1, 3)),
                               atol=1e-6)
    np.testing.assert_allclose(color, rgb.reshape(4, 2, 6, 2, 3).mean(axis=(1, 3)), atol=1e-6)


# ------------------------------------------------------------------------- gt info

def test_gt_info_counts_and_boxes_follow_bop(occluded):
    root, _ = occluded
    dataset = BopDataset(root, split='train')
    model = dataset.load_model(1)
    scene = RaycastScene([model])
    raw = raw_gt_info(root)
    truncated = 0
    for frame in dataset.frames():
        for index, (inst, pose) in enumerate(zip(frame.instances, frame_poses(frame))):
            info = raw[str(frame.image_id)][index]
            full, visible = instance_masks(root, frame, index)
            assert info['px_count_visib'] == inst.px_count_visib == visible.sum()
            assert info['px_count_valid'] == full.sum()
            assert inst.visib_fract == info['px_count_visib'] / info['px_count_all']
            # bop_toolkit counts the whole silhouette on a canvas 3x the image, centred on it.
            K_large = frame.K + np.array([[0, 0, WIDTH], [0, 0, HEIGHT], [0, 0, 0]])
            large = scene.render(pose[None], K_large, 3 * WIDTH, 3 * HEIGHT).coverage[0] > 0.5
            assert abs(info['px_count_all'] - large.sum()) <= EDGE_TOLERANCE_PX
            truncated += info['px_count_all'] > full.sum()
            if inst.px_count_visib == 0:
                assert inst.bbox_obj == inst.bbox_visib == (-1, -1, -1, -1)
                continue
            ys, xs = np.nonzero(large)
            expected = (xs.min() - WIDTH, ys.min() - HEIGHT, np.ptp(xs), np.ptp(ys))
            np.testing.assert_allclose(inst.bbox_obj, expected, atol=1)
            # Against the continuous box of the projected vertices: the pixel centres of the
            # silhouette lie inside it, within 2 px of its edges.
            x, y, w, h = inst.bbox_obj
            low_x, low_y, span_x, span_y = projected_box(model, pose, frame.K)
            assert 0 <= x - low_x < 2 and 0 <= y - low_y < 2
            assert 0 <= low_x + span_x - (x + w) < 2 and 0 <= low_y + span_y - (y + h) < 2
            ys, xs = np.nonzero(visible)
            assert inst.bbox_visib == (xs.min(), ys.min(), np.ptp(xs), np.ptp(ys))
    assert truncated >= 1  # the seed puts an object across the border: the case that differs


def test_gt_info_entry_by_hand():
    silhouette = np.zeros((4, 5), bool)
    silhouette[1:4, 1:4] = True                 # image pixels x -1..1, y 3..5 from origin (-2, 2)
    visible = np.zeros((6, 8), bool)
    visible[4:6, 0:2] = True
    info = bop_writer.gt_info_entry(silhouette, (-2, 2), visible)
    assert info == {'bbox_obj': [-1, 3, 2, 2], 'bbox_visib': [0, 4, 1, 1], 'px_count_all': 9,
                    'px_count_valid': 6, 'px_count_visib': 4, 'visib_fract': 4 / 9}
    hidden = bop_writer.gt_info_entry(silhouette, (-2, 2), np.zeros((6, 8), bool))
    assert hidden['bbox_obj'] == hidden['bbox_visib'] == [-1, -1, -1, -1]
    assert hidden['visib_fract'] == 0.0


def test_gt_entry_is_in_millimetres_and_row_major():
    R = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    entry = bop_writer.gt_entry(7, make_pose(R, np.array([0.1, -0.02, 0.5])))
    assert entry == {'cam_R_m2c': [0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0],
                     'cam_t_m2c': [100.0, -20.0, 500.0], 'obj_id': 7}


# ----------------------------------------------------------------------------- poses

def test_viewpoints_stay_in_the_elevation_range(objects):
    model = objects[0].model
    cfg = SynthConfig(width=WIDTH, height=HEIGHT, K=intrinsics(WIDTH, HEIGHT, None, None, None),
                      distance_range=(0.5, 0.7), elevation_range_deg=(30.0, 60.0))
    rng = np.random.default_rng(0)
    centre = 0.5 * (model.bbox_min + model.bbox_max)
    elevations, distances = [], []
    for _ in range(300):
        pose = sample_object_pose(model, cfg, rng)
        camera_in_model = -pose[:3, :3].T @ pose[:3, 3] - centre
        elevations.append(np.degrees(np.arcsin(camera_in_model[2]
                                               / np.linalg.norm(camera_in_model))))
        distances.append(np.linalg.norm(camera_in_model))
    assert 30 - 1e-9 <= min(elevations) < 33 and 57 < max(elevations) <= 60 + 1e-9
    assert 0.5 - 1e-9 <= min(distances) and max(distances) <= 0.7 + 1e-9


def test_look_at_points_the_camera_at_the_object_with_model_z_up():
    view = np.array([1.0, 0.0, 0.0])              # camera on the model's +x axis
    R = look_at_rotation(view)
    np.testing.assert_allclose(R @ view, [0, 0, -1], atol=1e-12)   # towards the camera
    np.testing.assert_allclose(R @ [0, 0, 1], [0, -1, 0], atol=1e-12)  # model up = image up
    np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(R) == pytest.approx(1.0)


def test_viewpoint_pose_puts_the_centre_on_the_ray(objects):
    model = objects[0].model
    ray = np.array([0.1, -0.2, 1.0]) / np.linalg.norm([0.1, -0.2, 1.0])
    pose = viewpoint_pose(model, 0.3, 1.0, 0.5, ray, 0.6)
    centre = pose[:3, :3] @ (0.5 * (model.bbox_min + model.bbox_max)) + pose[:3, 3]
    np.testing.assert_allclose(centre, 0.6 * ray, atol=1e-12)


# ----------------------------------------------------------------------- determinism

def test_same_seed_gives_the_same_bytes_whatever_the_worker_count(occluded, objects, tmp_path):
    root, _ = occluded
    generate_dataset(tmp_path / 'two', objects, config(2), 4, SEED, CPU, workers=2)
    first, second = tree_bytes(root), tree_bytes(tmp_path / 'two')
    assert sorted(first) == sorted(second) and len(first) > 20
    assert [name for name in first if first[name] != second[name]] == []
    other = synthesize_image(objects, config(2), SEED + 100, 0, CPU)
    assert not np.array_equal(other.rgb, BopDataset(root, 'train').frame(0, 0).load_rgb())


def test_refuses_to_write_into_a_split_that_holds_files(occluded, objects):
    root, _ = occluded
    with pytest.raises(FileExistsError):
        generate_dataset(root, objects, config(2), 1, SEED, CPU)


def test_refuses_distances_that_put_the_object_behind_the_camera(objects, tmp_path):
    too_near = SynthConfig(width=WIDTH, height=HEIGHT,
                           K=intrinsics(WIDTH, HEIGHT, None, None, None),
                           distance_range=(0.08, 0.5))   # the demo object reaches 0.085 m
    with pytest.raises(ValueError, match='smallest distance'):
        generate_dataset(tmp_path, objects, too_near, 1, SEED, CPU)
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------- CLI

def test_cli_writes_a_dataset_end_to_end(tmp_path):
    args = ['synth', '--out', str(tmp_path), '--n-images', '2', '--width', '96', '--height',
            '72', '--fov', '60', '--seed', '5', '--occluders', '1', '--images-per-scene', '1']
    if 'synth' in {m.__name__.rsplit('.', 1)[-1] for m in cli.SUBCOMMANDS}:
        command = [str(Path(sys.executable).parent / 'pose_tools'), *args]
    else:  # until cli.py registers the subcommand
        command = [sys.executable, '-c',
                   'import argparse, sys; from pose_node.tools import synth; '
                   'p = argparse.ArgumentParser(); synth.register(p.add_subparsers()); '
                   'a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))', *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'synth: images=2' in result.stdout
    dataset = BopDataset(tmp_path, split='train')
    assert dataset.scene_ids == [0, 1]                  # one image per scene folder
    frame = dataset.frame(1, 0)
    assert frame.load_rgb().shape == (72, 96, 3)
    assert frame.K[0, 0] == pytest.approx(48 / np.tan(np.radians(30)))
    assert frame.K[0, 2] == 47.5 and frame.K[1, 2] == 35.5
    assert len(frame.instances) >= 1 and dataset.object_ids == [1]

"""Tests for the BOP reader (pose_node.datasets.bop) on LM-O and on a tiny hand-made folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
from PIL import Image

from pose_node.datasets.bop import LMO_ROOT_ENV, BopDataset, default_lmo_root

REPO = Path(__file__).resolve().parents[1]
LMO_SCENE = 2
LMO_OBJECTS = [1, 5, 6, 8, 9, 10, 11, 12]


def project(points: np.ndarray, R: np.ndarray, t: np.ndarray, K: np.ndarray) -> np.ndarray:
    """(N, 3) model points (m) -> (N, 2) pixel coordinates."""
    camera = points @ R.T + t
    pixels = camera @ K.T
    return pixels[:, :2] / pixels[:, 2:]


# --------------------------------------------------------------------------- LM-O

def test_default_root_is_shared_data_next_to_the_repo(monkeypatch, tmp_path):
    monkeypatch.delenv(LMO_ROOT_ENV, raising=False)
    assert default_lmo_root() == REPO.parent / 'shared' / 'data' / 'lmo'
    monkeypatch.setenv(LMO_ROOT_ENV, str(tmp_path))
    assert default_lmo_root() == tmp_path


def test_lmo_scenes_images_objects(lmo):
    assert lmo.scene_ids == [LMO_SCENE]
    assert len(lmo.image_ids(LMO_SCENE)) == 200
    assert lmo.object_ids == LMO_OBJECTS


def test_lmo_splits_dev_and_test_are_disjoint_and_cover_the_frames(lmo):
    splits = lmo.splits()
    assert len(splits['dev']) == 50 and len(splits['test']) == 150
    assert not set(splits['dev']) & set(splits['test'])
    assert set(splits['dev']) | set(splits['test']) == set(lmo.image_ids(LMO_SCENE))


def test_lmo_frame_camera_and_units(lmo):
    camera = json.loads((lmo.root / 'camera.json').read_text())
    frame = lmo.frame(LMO_SCENE, lmo.splits()['dev'][0])
    np.testing.assert_allclose(frame.K, [[camera['fx'], 0, camera['cx']],
                                         [0, camera['fy'], camera['cy']], [0, 0, 1]])
    assert frame.depth_scale == 1.0
    assert frame.instances
    for frame in lmo.frames(lmo.splits()['dev'][:10]):
        for instance in frame.instances:
            assert 0.3 < instance.t[2] < 2.0 and 0.3 < np.linalg.norm(instance.t) < 2.0
            np.testing.assert_allclose(instance.R @ instance.R.T, np.eye(3), atol=1e-12)
            assert np.linalg.det(instance.R) == pytest.approx(1.0)
            assert instance.obj_id in LMO_OBJECTS
            assert 0.0 <= instance.visib_fract <= 1.0


def test_rotations_are_the_nearest_proper_rotation_to_the_stored_matrix(lmo):
    stored = json.loads((lmo.root / 'test' / f'{LMO_SCENE:06d}' / 'scene_gt.json').read_text())
    for image_id in ['3', '703', '1001']:
        frame = lmo.frame(LMO_SCENE, int(image_id))
        for instance, raw in zip(frame.instances, stored[image_id]):
            matrix = np.reshape(raw['cam_R_m2c'], (3, 3))
            # The polar factor of the stored matrix is the nearest rotation.
            polar = scipy.linalg.polar(matrix)[0]
            np.testing.assert_allclose(instance.R, polar, atol=1e-9)
            np.testing.assert_allclose(instance.R, matrix, atol=0.02)


def test_lmo_projected_model_matches_bbox_obj(lmo):
    checked = 0
    for image_id in [3, 8, 17, 27, 97, 203]:
        frame = lmo.frame(LMO_SCENE, image_id)
        for instance in frame.instances:
            model = lmo.load_model(instance.obj_id)
            uv = project(model.vertices.astype(np.float64), instance.R, instance.t, frame.K)
            x, y, w, h = instance.bbox_obj
            if w < 0:  # BOP marks objects entirely outside the image with -1
                assert (uv[:, 0] > 640).all() or (uv[:, 0] < 0).all() \
                    or (uv[:, 1] > 480).all() or (uv[:, 1] < 0).all()
                continue
            tolerance = 2.5
            assert uv[:, 0].min() >= x - tolerance and uv[:, 0].max() <= x + w + tolerance
            assert uv[:, 1].min() >= y - tolerance and uv[:, 1].max() <= y + h + tolerance
            np.testing.assert_allclose([uv[:, 0].min(), uv[:, 1].min(), uv[:, 0].max(),
                                        uv[:, 1].max()], [x, y, x + w, y + h], atol=tolerance)
            checked += 1
    assert checked >= 30


def test_lmo_rgb_loads(lmo):
    frame = lmo.frame(LMO_SCENE, 3)
    image = frame.load_rgb()
    assert image.shape == (480, 640, 3) and image.dtype == np.uint8
    assert frame.rgb_path.name == '000003.png'
    assert 20 < image.mean() < 235


def test_lmo_models_in_metres_with_symmetries(lmo):
    ape = lmo.load_model(1)
    assert ape.diameter == pytest.approx(0.102099)
    assert ape.has_colors and not ape.is_symmetric
    assert lmo.load_model(1) is ape  # cached
    eggbox_eval = lmo.load_model(10, eval=True)
    assert eggbox_eval.is_symmetric and not eggbox_eval.has_colors
    assert np.abs(eggbox_eval.vertices).max() < 0.1


def test_lmo_targets_match_ground_truth(lmo):
    targets = lmo.targets()
    assert len({(t.scene_id, t.image_id) for t in targets}) == 200
    for target in targets[:60]:
        frame = lmo.frame(target.scene_id, target.image_id)
        count = sum(instance.obj_id == target.obj_id for instance in frame.instances)
        assert count == target.inst_count


def test_lmo_frames_filter(lmo):
    wanted = [8, 3, 17]
    assert [f.image_id for f in lmo.frames(wanted)] == sorted(wanted)


# --------------------------------------------------------------------------- errors, tiny folder

def test_missing_root_raises_with_the_path(tmp_path):
    missing = tmp_path / 'no_such_dataset'
    with pytest.raises(FileNotFoundError, match='no_such_dataset'):
        BopDataset(missing)
    tmp_path.joinpath('data').mkdir()
    with pytest.raises(FileNotFoundError, match='test'):
        BopDataset(tmp_path / 'data')


def make_tiny_bop(root: Path) -> None:
    """One scene, one jpg frame, no scene_gt_info.json, no models."""
    scene = root / 'train_pbr' / '000007'
    (scene / 'rgb').mkdir(parents=True)
    Image.fromarray(np.full((6, 8, 3), 77, np.uint8)).save(scene / 'rgb' / '000004.jpg')
    (scene / 'scene_camera.json').write_text(json.dumps(
        {'4': {'cam_K': [100, 0, 4, 0, 110, 3, 0, 0, 1], 'depth_scale': 0.1}}))
    (scene / 'scene_gt.json').write_text(json.dumps(
        {'4': [{'cam_R_m2c': [1, 0, 0, 0, 1, 0, 0, 0, 1], 'cam_t_m2c': [10, -20, 500],
                'obj_id': 3}]}))


def test_tiny_folder_without_gt_info(tmp_path):
    make_tiny_bop(tmp_path)
    dataset = BopDataset(tmp_path, split='train_pbr')
    assert dataset.scene_ids == [7] and dataset.image_ids(7) == [4]
    frame = dataset.frame(7, 4)
    assert frame.depth_scale == 0.1 and frame.K[1, 1] == 110
    (instance,) = frame.instances
    np.testing.assert_allclose(instance.t, [0.01, -0.02, 0.5])
    assert instance.obj_id == 3 and instance.bbox_obj is None and instance.visib_fract is None
    assert frame.load_rgb().shape == (6, 8, 3)
    assert dataset.splits() == {}
    with pytest.raises(FileNotFoundError, match='models_info.json'):
        dataset.load_model(3)
    with pytest.raises(FileNotFoundError, match='test_targets_bop19.json'):
        dataset.targets()
    with pytest.raises(FileNotFoundError, match='000009'):
        dataset.frame(9, 4)
    with pytest.raises(KeyError):
        dataset.frame(7, 5)

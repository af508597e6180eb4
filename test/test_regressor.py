"""The two-branch pose regressor: its box-relative translation and allocentric rotation
conventions against hand computations and scipy, its loss, training, weight files, and the
shipped demo weights on ray-cast demo frames."""

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from pose_node.coarse import Hypotheses
from pose_node.coarse import regressor as reg
from pose_node.camera import crop_transform, square_box_around, transform_intrinsics
from pose_node.crop import cut_crop, mask_box, projected_box
from pose_node.crop.segmenter import save_weights
from pose_node.geometry import rot6d_to_matrix, rotation_angle_between
from pose_node.mesh import ObjectModel
from pose_node.datasets.synthetic import procedural_background, random_pose_in_view
from pose_node.render.raycast import RaycastScene
from pose_node.resources import demo_object_dir, load_demo_object
from pose_node.tools.demo import DISTANCE_RANGE, K_DEMO

SHIPPED = demo_object_dir() / 'regressor.pt'
SHIPPED_MEDIAN_ROT_DEG, SHIPPED_MEDIAN_TRANS_PCT = 15.0, 5.0
"""Largest median rotation error (deg) and translation error (% of the distance) allowed for
the shipped weights on the demo-frame windows below; measured 7.0 deg (0.8..18.6) and 2.3 %
on these 12 windows: the refiner's basin is about 15-20 deg."""
DEMO_FRAMES = 12


pytestmark = pytest.mark.usefixtures('one_torch_thread')


def tiny_config(diameter: float = 0.1) -> reg.RegressorConfig:
    return reg.RegressorConfig('thing', diameter, crop_size=32, widths=(4, 8))


def test_ray_rotation_is_the_smallest_rotation_onto_the_ray_as_scipy_aligns_it():
    rng = np.random.default_rng(0)
    for _ in range(5):
        ray = rng.normal(size=3) * [1, 1, 0.3] + [0, 0, 1]
        expected, _ = Rotation.align_vectors([ray / np.linalg.norm(ray)], [[0.0, 0.0, 1.0]])
        np.testing.assert_allclose(reg.ray_rotation(ray), expected.as_matrix(), atol=1e-12)
    np.testing.assert_allclose(reg.ray_rotation(np.array([0, 0, 2.0])), np.eye(3), atol=1e-15)


def test_allocentric_rotation_undoes_the_ray_and_is_egocentric_on_the_axis():
    R = Rotation.random(random_state=2).as_matrix()
    ray = np.array([0.3, -0.2, 1.0])
    allo = reg.allocentric_rotation(R, ray)
    np.testing.assert_allclose(reg.egocentric_rotation(allo, ray), R, atol=1e-12)
    np.testing.assert_allclose(reg.allocentric_rotation(R, np.array([0, 0, 1.0])), R, atol=1e-15)
    # The allocentric rotation is what the object shows along the ray: the direction from the
    # object to the camera, in the object's frame, is the same as for R_allo on the axis.
    t = 0.7 * ray
    seen_off_axis = R.T @ (-t / np.linalg.norm(t))
    seen_on_axis = allo.T @ np.array([0, 0, -1.0])
    np.testing.assert_allclose(seen_off_axis, seen_on_axis, atol=1e-12)


def test_translation_parameters_by_hand_and_back():
    K = np.array([[400.0, 0, 31.5], [0, 400.0, 31.5], [0, 0, 1]])
    size, diameter = 64, 0.1
    # On the crop's centre ray at z = f * d / size: no offset, s = 1.
    z = 400.0 * diameter / size
    np.testing.assert_allclose(reg.translation_to_params(np.array([0, 0, z]), K, size, diameter),
                               [0, 0, 0], atol=1e-12)
    # 16 px right (a quarter crop) and twice as far: dx = 0.25, log s = log 2.
    t = np.array([16 * 2 * z / 400.0, 0, 2 * z])
    np.testing.assert_allclose(reg.translation_to_params(t, K, size, diameter),
                               [0.25, 0, np.log(2)], atol=1e-12)
    t = np.array([0.031, -0.02, 0.55])
    np.testing.assert_allclose(reg.params_to_translation(
        reg.translation_to_params(t, K, size, diameter), K, size, diameter), t, atol=1e-12)


def test_crop_centre_ray_points_at_the_box_centre():
    K = np.array([[600.0, 0, 319.5], [0, 600.0, 239.5], [0, 0, 1]])
    image = np.zeros((480, 640, 3), np.float32)
    crop = cut_crop(image, K, np.array([400.0, 100.0, 50.0, 80.0]), 64)
    ray = reg.crop_centre_ray(crop.K, 64)
    uv = (K @ ray)[:2] / ray[2]
    np.testing.assert_allclose(uv, [425.0, 140.0], atol=1e-9)


def test_loss_is_zero_at_the_truth_and_the_mean_point_distance_otherwise():
    points = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]])
    identity = torch.eye(3)[None]
    rot6d_identity = torch.tensor([[1.0, 0, 0, 0, 1.0, 0]])
    zero = torch.zeros(1, 3)
    loss, loss_t, loss_r = reg.regression_loss(rot6d_identity, zero, identity, zero, points)
    assert float(loss) == pytest.approx(0, abs=1e-7)
    # 180 deg about z moves both points by 2; L_T is the L1 norm of the parameter error.
    R_z180 = torch.diag(torch.tensor([-1.0, -1.0, 1.0]))[None]
    loss, loss_t, loss_r = reg.regression_loss(rot6d_identity, torch.tensor([[0.1, -0.2, 0.3]]),
                                               R_z180, zero, points, rotation_weight=0.5)
    assert float(loss_r) == pytest.approx(2.0, abs=1e-6)
    assert float(loss_t) == pytest.approx(0.6, abs=1e-6)
    assert float(loss) == pytest.approx(0.6 + 0.5 * 2.0, abs=1e-6)
    # With the 180 deg turn as a symmetry, that pose is as good as the truth.
    symmetric = torch.stack([points[0], points[0] @ R_z180[0].T])
    _, _, loss_r = reg.regression_loss(rot6d_identity, zero, R_z180, zero, symmetric)
    assert float(loss_r) == pytest.approx(0, abs=1e-6)


def test_symmetric_points_apply_each_symmetry_in_diameters():
    model = load_demo_object()
    points = reg.symmetric_points(model, 50, np.random.default_rng(0))
    assert points.shape == (1, 50, 3)
    assert np.linalg.norm(points, axis=-1).max() <= 1.0


def square_scene(rng: np.random.Generator, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """A crop-like input whose bright square's position encodes a target."""
    image = rng.uniform(0, 0.3, (size, size, 3)).astype(np.float32)
    x, y = rng.integers(2, size - 10, 2)
    image[y:y + 8, x:x + 8] = [1.0, 0.5, 0.2]
    mask = np.zeros((size, size), np.float32)
    mask[y:y + 8, x:x + 8] = 1
    return reg.network_input(image, mask), np.array([x, y], np.float32) / size - 0.5


def test_a_few_training_steps_lower_the_loss():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = [square_scene(rng) for _ in range(16)]
    inputs = torch.as_tensor(np.stack([d[0] for d in data]))
    params = torch.as_tensor(np.stack([np.append(d[1], 0.0) for d in data]), dtype=torch.float32)
    R_target = torch.eye(3).expand(16, 3, 3)
    points = torch.as_tensor(np.random.default_rng(1).normal(size=(1, 30, 3)), dtype=torch.float32)
    net = reg.make_regression_net(tiny_config())
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)

    def loss() -> torch.Tensor:
        return reg.regression_loss(*net(inputs), R_target, params, points)[0]

    with torch.no_grad():
        before = float(loss())
    for _ in range(25):
        optimizer.zero_grad()
        value = loss()
        value.backward()
        optimizer.step()
    with torch.no_grad():
        assert float(loss()) < 0.5 * before


def cube_model(side: float = 0.1) -> ObjectModel:
    import trimesh
    mesh = trimesh.creation.box((side, side, side))
    return ObjectModel(name='cube', vertices=mesh.vertices.astype(np.float32),
                       faces=mesh.faces.astype(np.int64),
                       vertex_colors=np.full((len(mesh.vertices), 3), 0.5, np.float32),
                       has_colors=False, diameter=float(side * np.sqrt(3)),
                       symmetries=np.eye(4)[None])


def test_weights_load_weights_only_and_reproduce_the_hypotheses(tmp_path):
    model = cube_model()
    config = tiny_config(model.diameter)
    torch.manual_seed(3)
    net = reg.make_regression_net(config)
    path = tmp_path / 'regressor.pt'
    save_weights(path, 'regressor', config.to_dict(), net.state_dict())
    assert torch.load(path, weights_only=True)['config']['object_name'] == 'thing'
    estimator = reg.load_regressor(path, model, torch.device('cpu'))
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 1, (120, 160, 3)).astype(np.float32)
    K = np.array([[150.0, 0, 79.5], [0, 150.0, 59.5], [0, 0, 1]])
    crop = cut_crop(image, K, np.array([60.0, 40.0, 30.0, 30.0]), 32)
    got = estimator.hypotheses(crop, top_k=3)
    assert isinstance(got, Hypotheses) and len(got) == 1 and got.source == 'regressor'
    # The same network by hand: allocentric output turned by the crop's centre ray.
    with torch.no_grad():
        rot6d, params = net.eval()(torch.as_tensor(reg.network_input(crop.image, crop.mask))[None])
    R_allo = rot6d_to_matrix(rot6d.double()).numpy()[0]
    expected_R = reg.ray_rotation(reg.crop_centre_ray(crop.K, 32)) @ R_allo
    np.testing.assert_allclose(got.R[0], expected_R, atol=1e-6)
    np.testing.assert_allclose(got.t[0], reg.params_to_translation(
        params.double().numpy()[0], crop.K, 32, model.diameter), rtol=1e-6)
    # A crop of another size is resized, not rejected.
    larger = cut_crop(image, K, np.array([60.0, 40.0, 30.0, 30.0]), 64)
    assert np.isfinite(estimator.hypotheses(larger, 1).t).all()


def test_missing_corrupt_or_foreign_weights_name_the_file(tmp_path):
    model = cube_model()
    with pytest.raises(FileNotFoundError, match='nothere.pt'):
        reg.load_regressor(tmp_path / 'nothere.pt', model, torch.device('cpu'))
    corrupt = tmp_path / 'corrupt.pt'
    corrupt.write_bytes(b'not a torch file at all')
    with pytest.raises(ValueError, match='corrupt.pt'):
        reg.load_regressor(corrupt, model, torch.device('cpu'))
    config = tiny_config(model.diameter)
    other = tmp_path / 'segmenter_kind.pt'
    save_weights(other, 'segmenter', config.to_dict(), {})
    with pytest.raises(ValueError, match='segmenter_kind.pt'):
        reg.load_regressor(other, model, torch.device('cpu'))
    wrong_size = tmp_path / 'other_object.pt'
    save_weights(wrong_size, 'regressor', tiny_config(0.5).to_dict(),
                     reg.make_regression_net(tiny_config(0.5)).state_dict())
    with pytest.raises(ValueError, match='other_object.pt'):
        reg.load_regressor(wrong_size, model, torch.device('cpu'))


def demo_frame_window(scene: RaycastScene, model: ObjectModel, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The part of a `pose_tools demo` frame around the object (the same pose distribution,
    camera, ray casting and background recipe; rendering only the window keeps the test fast):
    rgb (S, S, 3) 0..1, the window's K, the object's mask (S, S) and its pose (4, 4)."""
    pose = random_pose_in_view(rng, DISTANCE_RANGE)
    window = square_box_around(projected_box(model, pose, K_DEMO), 1.5)
    side = int(np.ceil(window[2]))
    K = transform_intrinsics(K_DEMO, crop_transform(window, (side, side)))
    image = scene.render(pose[None], K, side, side, supersample=2)
    coverage = image.coverage[0][..., None]
    rgb = image.rgb + (1.0 - coverage) * procedural_background(side, side, rng)
    return rgb.astype(np.float32), K, coverage[..., 0] >= 0.5, pose


def test_shipped_regressor_lands_near_the_truth_on_demo_frames():
    model = load_demo_object()
    estimator = reg.load_regressor(SHIPPED, model, torch.device('cpu'))
    scene = RaycastScene([model])
    rng = np.random.default_rng(7)
    rotation_deg, translation_pct = [], []
    for _ in range(DEMO_FRAMES):
        rgb, K, mask, pose = demo_frame_window(scene, model, rng)
        crop = cut_crop(rgb, K, mask_box(mask), estimator.config.crop_size, mask=mask,
                        scale=estimator.config.crop_scale)
        got = estimator.hypotheses(crop, 1)
        rotation_deg.append(np.rad2deg(rotation_angle_between(got.R[0], pose[:3, :3])))
        translation_pct.append(100 * np.linalg.norm(got.t[0] - pose[:3, 3])
                               / np.linalg.norm(pose[:3, 3]))
    assert np.median(rotation_deg) < SHIPPED_MEDIAN_ROT_DEG, rotation_deg
    assert np.median(translation_pct) < SHIPPED_MEDIAN_TRANS_PCT, translation_pct

"""Tests of pose_node.geometry against transforms3d, numpy/scipy references and hand values."""
import numpy as np
import pytest
import scipy.stats
import torch
import transforms3d

from pose_node import geometry as g

BACKENDS = ['numpy', 'torch']


def as_backend(x: np.ndarray, backend: str):
    return torch.from_numpy(np.array(x)) if backend == 'torch' else np.array(x)


def as_numpy(x) -> np.ndarray:
    assert isinstance(x, (np.ndarray, torch.Tensor))
    return x.detach().numpy() if isinstance(x, torch.Tensor) else x


def expected_type(backend: str) -> type:
    return torch.Tensor if backend == 'torch' else np.ndarray


def wxyz_to_xyzw(q: np.ndarray) -> np.ndarray:
    return np.r_[q[1:], q[0]]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def rotations(rng) -> np.ndarray:
    """A batch (2, 8, 3, 3) of random rotations made by transforms3d, independent of geometry."""
    axes = rng.standard_normal((16, 3))
    angles = rng.uniform(0, np.pi, 16)
    return np.stack([transforms3d.axangles.axangle2mat(a, th) for a, th in zip(axes, angles)]
                    ).reshape(2, 8, 3, 3)


# ------------------------------------------------------------------------------------------
# Types, dtypes and batching
# ------------------------------------------------------------------------------------------

def test_numpy_in_numpy_out_and_torch_keeps_dtype(rotations):
    out_np = g.matrix_to_quaternion(rotations)
    assert isinstance(out_np, np.ndarray) and out_np.shape == (2, 8, 4)
    out_t = g.matrix_to_quaternion(torch.from_numpy(rotations).float())
    assert isinstance(out_t, torch.Tensor) and out_t.dtype == torch.float32
    np.testing.assert_allclose(out_t.numpy(), out_np, atol=1e-5)


def test_mixing_numpy_and_torch_runs_in_torch_on_the_tensors_dtype(rotations):
    T_np = g.make_pose(rotations, np.array([0.1, -0.2, 0.3]))
    shift = np.eye(4)
    shift[:3, 3] = [1.0, 2.0, 3.0]
    T_shift = torch.tensor(shift, dtype=torch.float32, requires_grad=True)
    T = g.compose_poses(T_np, T_shift)
    assert isinstance(T, torch.Tensor) and T.dtype == torch.float32
    assert T.device == T_shift.device
    np.testing.assert_allclose(T.detach().numpy(), T_np @ shift, atol=1e-6)
    T.sum().backward()
    # d sum(A @ B) / dB[k, l] = sum of A[..., :, k] over the batch and the rows.
    expected_grad = np.broadcast_to(T_np.sum(axis=(0, 1, 2))[:, None], (4, 4))
    np.testing.assert_allclose(T_shift.grad.numpy(), expected_grad, rtol=1e-6)


def test_integer_numpy_input_is_computed_in_float():
    np.testing.assert_allclose(g.quaternion_to_matrix(np.array([0, 0, 0, 1])), np.eye(3))


@pytest.mark.parametrize('backend', BACKENDS)
def test_skew_is_cross_product(backend, rng):
    v, u = rng.standard_normal((2, 5, 3))
    K = g.skew(as_backend(v, backend))
    assert isinstance(K, expected_type(backend))
    np.testing.assert_allclose(as_numpy(K) @ u[..., None], np.cross(v, u)[..., None], atol=1e-12)


# ------------------------------------------------------------------------------------------
# 6D representation
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('backend', BACKENDS)
def test_rot6d_round_trip(backend, rotations):
    x = g.matrix_to_rot6d(as_backend(rotations, backend))
    assert isinstance(x, expected_type(backend)) and x.shape == (2, 8, 6)
    # The 6 numbers are the first two columns.
    np.testing.assert_array_equal(as_numpy(x)[..., :3], rotations[..., :, 0])
    np.testing.assert_array_equal(as_numpy(x)[..., 3:], rotations[..., :, 1])
    np.testing.assert_allclose(as_numpy(g.rot6d_to_matrix(x)), rotations, atol=1e-12)


@pytest.mark.parametrize('backend', BACKENDS)
def test_rot6d_of_arbitrary_input_is_its_gram_schmidt(backend, rng):
    x = rng.standard_normal((50, 6)) * 3
    R = as_numpy(g.rot6d_to_matrix(as_backend(x, backend)))
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    # Independent reference: QR of [a1 a2] with positive diagonal of R is Gram-Schmidt.
    for xi, Ri in zip(x, R):
        Q, upper = np.linalg.qr(np.stack([xi[:3], xi[3:]], axis=1))
        Q = Q * np.sign(np.diag(upper))
        np.testing.assert_allclose(Ri[:, :2], Q, atol=1e-12)
        np.testing.assert_allclose(Ri[:, 2], np.cross(Q[:, 0], Q[:, 1]), atol=1e-12)


def test_rot6d_gradcheck(rng):
    x = torch.tensor(rng.standard_normal((4, 6)), requires_grad=True)
    assert torch.autograd.gradcheck(g.rot6d_to_matrix, (x,))


# ------------------------------------------------------------------------------------------
# Quaternions
# ------------------------------------------------------------------------------------------

def test_quaternion_convention_matches_transforms3d(rotations):
    flat = rotations.reshape(-1, 3, 3)
    q = g.matrix_to_quaternion(flat)
    for R, qi in zip(flat, q):
        q_ref = wxyz_to_xyzw(transforms3d.quaternions.mat2quat(R))
        q_ref *= np.sign(q_ref[3])
        np.testing.assert_allclose(qi, q_ref, atol=1e-12)
        np.testing.assert_allclose(g.quaternion_to_matrix(qi),
                                   transforms3d.quaternions.quat2mat(np.r_[qi[3], qi[:3]]),
                                   atol=1e-12)


def test_quaternion_hand_values():
    # 90 deg about z: (x, y, z, w) = (0, 0, sin 45, cos 45).
    q = np.array([0, 0, np.sqrt(0.5), np.sqrt(0.5)])
    np.testing.assert_allclose(g.quaternion_to_matrix(q),
                               [[0, -1, 0], [1, 0, 0], [0, 0, 1]], atol=1e-15)
    # Non-unit quaternions are normalised.
    np.testing.assert_allclose(g.quaternion_to_matrix(3 * q), g.quaternion_to_matrix(q),
                               atol=1e-15)


@pytest.mark.parametrize('backend', BACKENDS)
def test_quaternion_round_trip_and_sign(backend, rotations, rng):
    q = g.matrix_to_quaternion(as_backend(rotations, backend))
    assert isinstance(q, expected_type(backend))
    assert (as_numpy(q)[..., 3] >= 0).all()
    np.testing.assert_allclose(np.linalg.norm(as_numpy(q), axis=-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(as_numpy(g.quaternion_to_matrix(q)), rotations, atol=1e-12)
    q_in = rng.standard_normal((100, 4))
    q_in /= np.linalg.norm(q_in, axis=-1, keepdims=True)
    q_out = as_numpy(g.matrix_to_quaternion(g.quaternion_to_matrix(as_backend(q_in, backend))))
    np.testing.assert_allclose(q_out, q_in * np.sign(q_in[:, 3:]), atol=1e-12)


def test_quaternion_of_180_degree_rotations(rng):
    axes = g.random_unit_vectors(20, rng)
    for axis in axes:
        R = transforms3d.axangles.axangle2mat(axis, np.pi)
        q = g.matrix_to_quaternion(R)
        # q = (axis, 0) up to sign: w vanishes, the axis survives intact.
        assert abs(q[3]) < 1e-12
        np.testing.assert_allclose(np.abs(q[:3] @ axis), 1.0, atol=1e-12)
        np.testing.assert_allclose(g.quaternion_to_matrix(q), R, atol=1e-12)
    np.testing.assert_allclose(np.abs(g.matrix_to_quaternion(np.diag([1.0, -1.0, -1.0]))),
                               [1, 0, 0, 0], atol=1e-15)


# ------------------------------------------------------------------------------------------
# Axis-angle
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('backend', BACKENDS)
def test_axis_angle_matches_transforms3d_and_round_trips(backend, rotations):
    v = g.matrix_to_axis_angle(as_backend(rotations, backend))
    assert isinstance(v, expected_type(backend)) and v.shape == (2, 8, 3)
    for R, vi in zip(rotations.reshape(-1, 3, 3), as_numpy(v).reshape(-1, 3)):
        axis, angle = transforms3d.axangles.mat2axangle(R)
        np.testing.assert_allclose(vi, axis * angle, atol=1e-10)
    np.testing.assert_allclose(as_numpy(g.axis_angle_to_matrix(v)), rotations, atol=1e-12)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('angle', [0.0, 1e-12, 1e-8, 1e-4, 1e-3, 2e-3])
def test_axis_angle_near_zero(backend, angle, rng):
    v = g.random_unit_vectors(5, rng) * angle
    R = g.axis_angle_to_matrix(as_backend(v, backend))
    reference = np.stack([transforms3d.axangles.axangle2mat(vi if angle else [1, 0, 0], angle)
                          for vi in v])
    np.testing.assert_allclose(as_numpy(R), reference, atol=1e-15)
    np.testing.assert_allclose(as_numpy(g.matrix_to_axis_angle(R)), v, rtol=1e-9, atol=1e-18)


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('offset', [0.0, 1e-9, 1e-6, 1e-3])
def test_axis_angle_near_pi(backend, offset, rng):
    axes = g.random_unit_vectors(10, rng)
    v = axes * (np.pi - offset)
    R = as_backend(np.stack([transforms3d.axangles.axangle2mat(a, np.pi - offset) for a in axes]),
                   backend)
    v_out = as_numpy(g.matrix_to_axis_angle(R))
    np.testing.assert_allclose(np.linalg.norm(v_out, axis=-1), np.pi - offset, atol=1e-9)
    # At pi, +axis and -axis are the same rotation.
    sign = np.sign(np.sum(v_out * v, axis=-1, keepdims=True))
    np.testing.assert_allclose(v_out * sign, v, atol=1e-7)
    np.testing.assert_allclose(as_numpy(g.axis_angle_to_matrix(v_out)), as_numpy(R), atol=1e-12)


def test_axis_angle_gradcheck_at_zero_and_elsewhere(rng):
    zero = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(g.axis_angle_to_matrix, (zero,))
    x = torch.tensor(rng.standard_normal((4, 3)), requires_grad=True)
    assert torch.autograd.gradcheck(g.axis_angle_to_matrix, (x,))
    # d R / d v at 0 is skew(e_i): the generators of SO(3).
    jac = torch.autograd.functional.jacobian(g.axis_angle_to_matrix,
                                             torch.zeros(3, dtype=torch.float64))
    for i in range(3):
        np.testing.assert_allclose(jac[..., i].numpy(), g.skew(np.eye(3)[i]), atol=1e-15)


def test_matrix_to_axis_angle_gradient_finite_at_identity():
    R = torch.eye(3, dtype=torch.float64, requires_grad=True)
    g.matrix_to_axis_angle(R).sum().backward()
    assert torch.isfinite(R.grad).all()


# ------------------------------------------------------------------------------------------
# Euler ZXY
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('backend', BACKENDS)
def test_euler_zxy_matches_transforms3d(backend, rng):
    angles = rng.uniform(-np.pi, np.pi, (20, 3))
    R = as_numpy(g.euler_zxy_to_matrix(as_backend(angles, backend)))
    for (z, x, y), Ri in zip(angles, R):
        np.testing.assert_allclose(Ri, transforms3d.euler.euler2mat(z, x, y, 'rzxy'), atol=1e-12)
        Rz = transforms3d.axangles.axangle2mat([0, 0, 1], z)
        Rx = transforms3d.axangles.axangle2mat([1, 0, 0], x)
        Ry = transforms3d.axangles.axangle2mat([0, 1, 0], y)
        np.testing.assert_allclose(Ri, Rz @ Rx @ Ry, atol=1e-12)


@pytest.mark.parametrize('backend', BACKENDS)
def test_euler_zxy_round_trip(backend, rotations, rng):
    angles = as_numpy(g.matrix_to_euler_zxy(as_backend(rotations, backend)))
    np.testing.assert_allclose(as_numpy(g.euler_zxy_to_matrix(angles)), rotations, atol=1e-12)
    for R, a in zip(rotations.reshape(-1, 3, 3), angles.reshape(-1, 3)):
        np.testing.assert_allclose(a, transforms3d.euler.mat2euler(R, 'rzxy'), atol=1e-10)
    # Angles inside the principal ranges come back unchanged.
    inside = np.stack([rng.uniform(-3, 3, 50), rng.uniform(-1.5, 1.5, 50), rng.uniform(-3, 3, 50)],
                      axis=-1)
    np.testing.assert_allclose(g.matrix_to_euler_zxy(g.euler_zxy_to_matrix(inside)), inside,
                               atol=1e-10)


@pytest.mark.parametrize('x', [np.pi / 2, -np.pi / 2])
def test_euler_zxy_gimbal_lock(x):
    R = g.euler_zxy_to_matrix(np.array([0.3, x, -0.2]))
    angles = g.matrix_to_euler_zxy(R)
    np.testing.assert_allclose(angles[1], x, atol=1e-7)
    np.testing.assert_allclose(g.euler_zxy_to_matrix(angles), R, atol=1e-12)


# ------------------------------------------------------------------------------------------
# Poses
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('backend', BACKENDS)
def test_pose_compose_invert_transform(backend, rotations, rng):
    t = rng.standard_normal((2, 8, 3))
    T = g.make_pose(as_backend(rotations, backend), as_backend(t, backend))
    assert isinstance(T, expected_type(backend)) and T.shape == (2, 8, 4, 4)
    T_np = as_numpy(T)
    np.testing.assert_array_equal(T_np[..., :3, :3], rotations)
    np.testing.assert_array_equal(T_np[..., :3, 3], t)
    np.testing.assert_array_equal(T_np[..., 3, :], np.broadcast_to([0, 0, 0, 1], (2, 8, 4)))

    T_inv = g.invert_pose(T)
    np.testing.assert_allclose(as_numpy(T_inv), np.linalg.inv(T_np), atol=1e-12)
    np.testing.assert_allclose(as_numpy(g.compose_poses(T, T_inv)),
                               np.broadcast_to(np.eye(4), T_np.shape), atol=1e-12)
    np.testing.assert_allclose(as_numpy(g.invert_pose(T_inv)), T_np, atol=1e-12)

    points = rng.standard_normal((2, 8, 5, 3))
    moved = as_numpy(g.transform_points(T, as_backend(points, backend)))
    homogeneous = np.concatenate([points, np.ones((2, 8, 5, 1))], axis=-1)
    np.testing.assert_allclose(moved, (homogeneous @ np.swapaxes(T_np, -1, -2))[..., :3],
                               atol=1e-12)
    # Composition applies right to left: T_ab @ T_bc maps c into a.
    T_other = as_numpy(g.make_pose(np.flip(rotations, 1).copy(), np.flip(t, 1).copy()))
    T_ac = g.compose_poses(T, as_backend(T_other, backend))
    np.testing.assert_allclose(
        as_numpy(g.transform_points(T_ac, as_backend(points, backend))),
        as_numpy(g.transform_points(T, g.transform_points(as_backend(T_other, backend),
                                                          as_backend(points, backend)))),
        atol=1e-12)


def test_make_pose_broadcasts_and_is_differentiable():
    R = torch.eye(3, dtype=torch.float64, requires_grad=True)
    t = torch.zeros(4, 3, dtype=torch.float64, requires_grad=True)
    T = g.make_pose(R, t)
    assert T.shape == (4, 4, 4)
    T.sum().backward()
    np.testing.assert_allclose(R.grad.numpy(), 4 * np.ones((3, 3)))
    np.testing.assert_allclose(t.grad.numpy(), np.ones((4, 3)))


# ------------------------------------------------------------------------------------------
# Angles between rotations
# ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('backend', BACKENDS)
def test_rotation_angle_between(backend, rotations):
    flat = rotations.reshape(-1, 3, 3)
    other = np.roll(flat, 1, axis=0)
    angles = as_numpy(g.rotation_angle_between(as_backend(flat, backend),
                                               as_backend(other, backend)))
    for Ra, Rb, angle in zip(flat, other, angles):
        # mat2axangle may return (-axis, -angle).
        np.testing.assert_allclose(angle, abs(transforms3d.axangles.mat2axangle(Ra.T @ Rb)[1]),
                                   atol=1e-10)
    same = g.rotation_angle_between(as_backend(flat, backend), as_backend(flat, backend))
    np.testing.assert_array_equal(as_numpy(same), 0.0)


@pytest.mark.parametrize('angle', [1e-9, 1e-6, 0.5, np.pi - 1e-6, np.pi])
def test_rotation_angle_between_exact_at_extremes(angle):
    R = transforms3d.axangles.axangle2mat([1, 2, 3], 0.7)
    R_b = transforms3d.axangles.axangle2mat([-1, 0.5, 2], angle) @ R
    np.testing.assert_allclose(g.rotation_angle_between(R, R_b), angle, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Random sampling
# ------------------------------------------------------------------------------------------

def _angle_cdf(x):
    """CDF of the rotation angle of a Haar-random rotation: (x - sin x) / pi."""
    return (x - np.sin(x)) / np.pi


def test_random_rotations_are_uniform(rng):
    R = g.random_rotations(20000, rng)
    assert R.shape == (20000, 3, 3)
    np.testing.assert_allclose(R @ R.transpose(0, 2, 1), np.broadcast_to(np.eye(3), R.shape),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(R), 1.0, atol=1e-12)
    # Each entry has mean 0 and standard deviation 1/sqrt(3): the mean of 20000 has sd 0.004.
    np.testing.assert_allclose(R.mean(axis=0), 0.0, atol=0.02)
    angles = g.rotation_angle_between(np.eye(3), R)
    assert scipy.stats.kstest(angles, _angle_cdf).pvalue > 0.01


def test_angle_distribution_test_detects_non_uniform_sampling(rng):
    # Uniform Euler angles are NOT uniform on SO(3): the same check must reject them.
    angles = np.stack([rng.uniform(-np.pi, np.pi, 20000),
                       rng.uniform(-np.pi / 2, np.pi / 2, 20000),
                       rng.uniform(-np.pi, np.pi, 20000)], axis=-1)
    R = g.euler_zxy_to_matrix(angles)
    assert scipy.stats.kstest(g.rotation_angle_between(np.eye(3), R), _angle_cdf).pvalue < 1e-6


def test_random_rotations_are_reproducible():
    np.testing.assert_array_equal(g.random_rotations(3, np.random.default_rng(7)),
                                  g.random_rotations(3, np.random.default_rng(7)))


def test_random_unit_vectors(rng):
    v = g.random_unit_vectors(20000, rng)
    np.testing.assert_allclose(np.linalg.norm(v, axis=-1), 1.0, atol=1e-12)
    np.testing.assert_allclose(v.mean(axis=0), 0.0, atol=0.02)
    # Uniform on the sphere: each coordinate is uniform on [-1, 1] (Archimedes).
    assert scipy.stats.kstest(v[:, 2], scipy.stats.uniform(-1, 2).cdf).pvalue > 0.01


@pytest.mark.parametrize('backend', BACKENDS)
def test_rotate_about_random_axis_is_camera_frame_and_exact(backend, rotations):
    angle = np.deg2rad(15.0)
    R_new = g.rotate_about_random_axis(as_backend(rotations, backend), angle,
                                       np.random.default_rng(5))
    assert isinstance(R_new, expected_type(backend)) and R_new.shape == rotations.shape
    R_new = as_numpy(R_new)
    np.testing.assert_allclose(g.rotation_angle_between(rotations, R_new), angle, atol=1e-12)
    # Left-multiplication by a rotation about the axis drawn first from the same seed.
    axes = g.random_unit_vectors(16, np.random.default_rng(5)).reshape(2, 8, 3)
    delta = np.stack([transforms3d.axangles.axangle2mat(a, angle) for a in axes.reshape(-1, 3)])
    np.testing.assert_allclose(R_new, delta.reshape(2, 8, 3, 3) @ rotations, atol=1e-12)


@pytest.mark.parametrize('backend', BACKENDS)
def test_perturb_pose_exact_angle_and_translation(backend, rotations, rng):
    t = rng.uniform(-0.5, 0.5, (2, 8, 3)) + [0, 0, 1.0]
    angles = rng.uniform(0, np.pi, (2, 8))
    R_new, t_new = g.perturb_pose(as_backend(rotations, backend), as_backend(t, backend),
                                  as_backend(angles, backend), 0.1, rng)
    assert isinstance(R_new, expected_type(backend)) and isinstance(t_new, expected_type(backend))
    np.testing.assert_allclose(g.rotation_angle_between(rotations, as_numpy(R_new)), angles,
                               atol=1e-10)
    np.testing.assert_allclose(np.linalg.norm(as_numpy(t_new) - t, axis=-1),
                               0.1 * np.linalg.norm(t, axis=-1), atol=1e-12)
    # The translation directions are not all the same.
    directions = (as_numpy(t_new) - t).reshape(-1, 3)
    mean_length = np.linalg.norm(directions, axis=-1).mean()
    assert np.linalg.norm(directions.mean(axis=0)) < 0.8 * mean_length


def test_perturb_pose_keeps_torch_dtype():
    R = torch.eye(3, dtype=torch.float32)
    t = torch.tensor([0.0, 0.0, 2.0])
    R_new, t_new = g.perturb_pose(R, t, 0.2, 0.05, np.random.default_rng(0))
    assert R_new.dtype == t_new.dtype == torch.float32
    np.testing.assert_allclose(float(g.rotation_angle_between(R, R_new)), 0.2, atol=1e-5)
    np.testing.assert_allclose(float(torch.linalg.norm(t_new - t)), 0.1, atol=1e-6)

"""Tests of pose_node.metrics on hand-computed cases and brute-force references."""
import numpy as np
import pytest
import transforms3d
from scipy.spatial.distance import cdist

from pose_node import metrics

A = 0.1  # metres: half-size of the small hand-made point sets

# Camera: 640 x 480, f = 500 px, principal point at the centre.
K = np.array([[500.0, 0.0, 320.0], [0.0, 500.0, 240.0], [0.0, 0.0, 1.0]])


def rot(axis, degrees: float) -> np.ndarray:
    return transforms3d.axangles.axangle2mat(axis, np.deg2rad(degrees))


def homogeneous(R: np.ndarray, t=(0.0, 0.0, 0.0)) -> np.ndarray:
    T = np.eye(4)
    T[:3, :3], T[:3, 3] = R, t
    return T


IDENTITY_ONLY = homogeneous(np.eye(3))[None]

# Unit-axis points: under a 90 deg turn about z, x -> y and y -> -x move by sqrt(2) A, z stays.
AXIS_POINTS = A * np.eye(3)

# A point set that is unchanged by a 180 deg turn about z (it maps x <-> -x and y <-> -y).
SYMMETRIC_POINTS = np.array([[A, 0, 0], [-A, 0, 0], [0, 2 * A, 0], [0, -2 * A, 0],
                             [0, 0, A], [0, 0, -A]])
Z_TURN_SYMMETRIES = np.stack([homogeneous(np.eye(3)), homogeneous(rot([0, 0, 1], 180))])


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(42)


@pytest.fixture
def gt_pose():
    return rot([1, 2, 3], 40), np.array([0.05, -0.02, 0.8])


# ------------------------------------------------------------------------------------------
# Hand-computed cases
# ------------------------------------------------------------------------------------------

def test_identical_poses_give_zero_everywhere(gt_pose, rng):
    R, t = gt_pose
    points = rng.uniform(-A, A, (50, 3))
    assert metrics.add(R, t, R, t, points) == 0.0
    assert metrics.adi(R, t, R, t, points) == 0.0
    assert metrics.add_or_adi(R, t, R, t, points, symmetric=True) == 0.0
    assert metrics.mssd(R, t, R, t, points, IDENTITY_ONLY) == 0.0
    assert metrics.mspd(R, t, R, t, K, points, IDENTITY_ONLY) == 0.0
    assert metrics.rotation_error(R, R) == 0.0
    assert metrics.translation_error(t, t) == 0.0
    assert metrics.projection_error_2d(R, t, R, t, K, points) == 0.0
    assert metrics.speed_score(R, t, R, t) == 0.0


def test_pure_translation_offset(gt_pose, rng):
    R, t = gt_pose
    d = 0.013
    direction = np.array([2.0, -1.0, 2.0]) / 3.0
    t_e = t + d * direction
    points = rng.uniform(-A, A, (200, 3))
    assert metrics.add(R, t_e, R, t, points) == pytest.approx(d, abs=1e-12)
    assert metrics.adi(R, t_e, R, t, points) <= d + 1e-12
    assert metrics.adi(R, t_e, R, t, points) > 0.0
    assert metrics.mssd(R, t_e, R, t, points, IDENTITY_ONLY) == pytest.approx(d, abs=1e-12)
    assert metrics.translation_error(t_e, t) == pytest.approx(d, abs=1e-15)
    assert metrics.rotation_error(R, R) == 0.0


def test_90_degree_turn_of_axis_points():
    R_e = rot([0, 0, 1], 90)
    t = np.array([0.0, 0.0, 1.0])
    # ADD: two points move sqrt(2) A, one does not.
    assert metrics.add(R_e, t, np.eye(3), t, AXIS_POINTS) == pytest.approx(2 * np.sqrt(2) * A / 3)
    # ADI: GT x-point's nearest estimate is y or z (sqrt(2) A away); GT y and z points are hit.
    assert metrics.adi(R_e, t, np.eye(3), t, AXIS_POINTS) == pytest.approx(np.sqrt(2) * A / 3)
    assert metrics.mssd(R_e, t, np.eye(3), t, AXIS_POINTS, IDENTITY_ONLY) == pytest.approx(
        np.sqrt(2) * A)
    assert metrics.rotation_error(R_e, np.eye(3)) == pytest.approx(np.pi / 2)


def test_symmetric_object_turned_by_its_symmetry(gt_pose):
    R_g, t_g = gt_pose
    # The estimate is the truth turned 180 deg about the model's z axis (object frame).
    R_e = R_g @ rot([0, 0, 1], 180)
    add = metrics.add(R_e, t_g, R_g, t_g, SYMMETRIC_POINTS)
    # x-points move 2A, y-points move 4A, z-points stay: mean (2 * 2A + 2 * 4A) / 6 = 2A.
    assert add == pytest.approx(2 * A)
    assert metrics.adi(R_e, t_g, R_g, t_g, SYMMETRIC_POINTS) == pytest.approx(0.0, abs=1e-12)
    assert metrics.add_or_adi(R_e, t_g, R_g, t_g, SYMMETRIC_POINTS, symmetric=True) == \
        pytest.approx(0.0, abs=1e-12)
    assert metrics.add_or_adi(R_e, t_g, R_g, t_g, SYMMETRIC_POINTS, symmetric=False) == add
    assert metrics.mssd(R_e, t_g, R_g, t_g, SYMMETRIC_POINTS, Z_TURN_SYMMETRIES) == \
        pytest.approx(0.0, abs=1e-12)
    assert metrics.mspd(R_e, t_g, R_g, t_g, K, SYMMETRIC_POINTS, Z_TURN_SYMMETRIES) == \
        pytest.approx(0.0, abs=1e-9)
    # Without the symmetry, MSSD is the largest displacement: the y-points' 4A.
    assert metrics.mssd(R_e, t_g, R_g, t_g, SYMMETRIC_POINTS, IDENTITY_ONLY) == \
        pytest.approx(4 * A)
    assert metrics.mspd(R_e, t_g, R_g, t_g, K, SYMMETRIC_POINTS, IDENTITY_ONLY) > 100.0


def test_mssd_uses_symmetry_translation_in_metres():
    # A symmetry that is a pure 0.02 m shift along x (e.g. a periodic rail segment).
    symmetries = np.stack([homogeneous(np.eye(3)), homogeneous(np.eye(3), (0.02, 0.0, 0.0))])
    t_g = np.array([0.0, 0.0, 1.0])
    points = np.array([[0.0, 0.0, 0.0], [0.01, 0.0, 0.0]])
    t_e = t_g + [0.02, 0.0, 0.0]
    assert metrics.mssd(np.eye(3), t_e, np.eye(3), t_g, points, symmetries) == \
        pytest.approx(0.0, abs=1e-15)
    assert metrics.mssd(np.eye(3), t_e, np.eye(3), t_g, points, IDENTITY_ONLY) == \
        pytest.approx(0.02)


def test_mspd_and_proj2d_with_known_pixel_offset():
    # A planar model facing the camera 1 m away; a 1 cm lateral shift is f * 0.01 / 1 = 5 px
    # for every point.
    points = np.array([[-A, -A, 0.0], [A, -A, 0.0], [A, A, 0.0], [-A, A, 0.0], [0.0, 0.0, 0.0]])
    t_g = np.array([0.0, 0.0, 1.0])
    t_e = t_g + [0.01, 0.0, 0.0]
    assert metrics.mspd(np.eye(3), t_e, np.eye(3), t_g, K, points, IDENTITY_ONLY) == \
        pytest.approx(5.0)
    assert metrics.projection_error_2d(np.eye(3), t_e, np.eye(3), t_g, K, points) == \
        pytest.approx(5.0)
    # A 4 mm vertical shift at 1 m is 2 px.
    t_e2 = t_g + [0.0, 0.004, 0.0]
    assert metrics.mspd(np.eye(3), t_e2, np.eye(3), t_g, K, points, IDENTITY_ONLY) == \
        pytest.approx(2.0)


def test_speed_score_hand_computed():
    R_g = rot([0.3, -1, 0.2], 70)
    t_g = np.array([0.0, 0.0, 10.0])
    t_e = np.array([0.0, 1.0, 10.0])  # 10 % of the distance
    R_e = rot([1, 1, 0], 30) @ R_g
    parts = metrics.speed_errors(R_e, t_e, R_g, t_g)
    assert parts.position == pytest.approx(0.1)
    assert parts.orientation == pytest.approx(np.pi / 6)
    assert metrics.speed_score(R_e, t_e, R_g, t_g) == pytest.approx(0.1 + np.pi / 6)


def test_speed_orientation_takes_the_short_way_round():
    # Quaternions of a 170 deg turn may have opposite signs; |<q_e, q_g>| gives 170, not 190.
    R_g = rot([0, 1, 0], 100)
    R_e = rot([0, 1, 0], 270)
    parts = metrics.speed_errors(R_e, np.ones(3), R_g, np.ones(3))
    assert parts.orientation == pytest.approx(np.deg2rad(170))
    assert parts.position == 0.0


def test_rotation_error_matches_bop_definition(rng):
    # BOP's re: arccos((trace(R_e R_g^-1) - 1) / 2), clamped.
    for _ in range(20):
        R_e, R_g = (rot(rng.standard_normal(3), rng.uniform(0, 360)) for _ in range(2))
        reference = np.arccos(np.clip((np.trace(R_e @ np.linalg.inv(R_g)) - 1) / 2, -1, 1))
        assert metrics.rotation_error(R_e, R_g) == pytest.approx(reference, abs=1e-7)


# ------------------------------------------------------------------------------------------
# Brute-force references on random data
# ------------------------------------------------------------------------------------------

def test_against_brute_force_on_random_poses(rng, gt_pose):
    R_g, t_g = gt_pose
    R_e = rot(rng.standard_normal(3), 25) @ R_g
    t_e = t_g + rng.normal(0, 0.01, 3)
    points = rng.uniform(-A, A, (300, 3))
    symmetries = np.stack([homogeneous(rot(rng.standard_normal(3), rng.uniform(0, 180)),
                                       rng.normal(0, 0.01, 3)) for _ in range(5)])
    est = points @ R_e.T + t_e
    gt = points @ R_g.T + t_g
    assert metrics.add(R_e, t_e, R_g, t_g, points) == pytest.approx(
        np.mean([np.linalg.norm(a - b) for a, b in zip(est, gt)]))
    assert metrics.adi(R_e, t_e, R_g, t_g, points) == pytest.approx(
        cdist(gt, est).min(axis=1).mean())

    def project(p):
        uv = p @ K.T
        return uv[:, :2] / uv[:, 2:]

    mssd_loop, mspd_loop = [], []
    for S in symmetries:
        gt_sym = points @ (R_g @ S[:3, :3]).T + (R_g @ S[:3, 3] + t_g)
        mssd_loop.append(np.linalg.norm(est - gt_sym, axis=1).max())
        mspd_loop.append(np.linalg.norm(project(est) - project(gt_sym), axis=1).max())
    assert metrics.mssd(R_e, t_e, R_g, t_g, points, symmetries) == pytest.approx(min(mssd_loop))
    assert metrics.mspd(R_e, t_e, R_g, t_g, K, points, symmetries) == pytest.approx(min(mspd_loop))
    assert metrics.projection_error_2d(R_e, t_e, R_g, t_g, K, points) == pytest.approx(
        np.linalg.norm(project(est) - project(gt), axis=1).mean())


# ------------------------------------------------------------------------------------------
# Recall
# ------------------------------------------------------------------------------------------

def test_recall_counts_inf_as_failure_and_is_strict():
    errors = np.array([0.1, np.inf, 0.3, 0.05])
    assert metrics.recall(errors, 0.2) == 0.5
    assert metrics.recall(errors, 0.3) == 0.5  # BOP: correct iff error < threshold
    assert metrics.recall([np.inf, np.inf], 1e9) == 0.0
    assert metrics.recall([np.nan, 0.0], 1.0) == 0.5
    with pytest.raises(ValueError):
        metrics.recall([], 1.0)


def test_average_recall():
    errors = [0.01, 0.03, np.inf]
    # Threshold 0.02: 1 of 3; 0.04: 2 of 3; mean 1/2.
    assert metrics.average_recall(errors, [0.02, 0.04]) == pytest.approx(0.5)
    errors_mm = np.array([3.0, 7.0, 12.0, 60.0, np.inf]) / 1000
    thresholds = metrics.bop19_mssd_thresholds(0.1)  # 5, 10, ..., 50 mm
    # Passing counts per threshold: 1, 2, 3, 3, ..., 3 -> (1 + 2 + 8 * 3) / (10 * 5).
    assert metrics.average_recall(errors_mm, thresholds) == pytest.approx(27 / 50)


def test_bop19_thresholds():
    np.testing.assert_allclose(metrics.bop19_mssd_thresholds(0.2),
                               [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.10],
                               rtol=1e-12)
    np.testing.assert_allclose(metrics.bop19_mspd_thresholds(640),
                               [5, 10, 15, 20, 25, 30, 35, 40, 45, 50], rtol=1e-12)
    np.testing.assert_allclose(metrics.bop19_mspd_thresholds(1280), np.arange(10, 101, 10),
                               rtol=1e-12)
    # The BOP toolkit's own expressions (scripts/eval_bop19_pose.py).
    np.testing.assert_allclose(metrics.bop19_mssd_thresholds(1.0), np.arange(0.05, 0.51, 0.05),
                               rtol=1e-12)
    np.testing.assert_allclose(metrics.bop19_mspd_thresholds(640.0), np.arange(5, 51, 5),
                               rtol=1e-12)

"""Pose error metrics and recall scores, consistent with the BOP toolkit's
bop_toolkit_lib/pose_error.py (thodan/bop_toolkit; own code, same definitions).

Inputs, for every function below (numpy, one pose at a time):
- ``R_e, R_g``: estimated / ground-truth rotation ``(3, 3)``, object-to-camera.
- ``t_e, t_g``: estimated / ground-truth translation ``(3,)`` in METRES.
- ``points``: model points ``(N, 3)`` in metres, in the model frame.
- ``K``: camera intrinsics ``(3, 3)`` in pixels.
- ``symmetries``: ``(S, 4, 4)`` homogeneous symmetry transforms of the model (metres), identity
  included, as provided by the mesh module.
Distances are returned in metres, image distances in pixels, angles in radians.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy.spatial import cKDTree

from pose_node import geometry


def _transform(R: np.ndarray, t: np.ndarray, points: np.ndarray) -> np.ndarray:
    """``R @ p + t`` for ``points`` ``(..., N, 3)``; ``R`` and ``t`` broadcast over ``...``."""
    return points @ np.swapaxes(R, -1, -2) + t[..., None, :]


def _project(K: np.ndarray, points_cam: np.ndarray) -> np.ndarray:
    """Pinhole projection of camera-frame points ``(..., N, 3)`` to pixels ``(..., N, 2)``."""
    uvw = points_cam @ K.T
    return uvw[..., :2] / uvw[..., 2:]


def _symmetric_gt_points(R_g: np.ndarray, t_g: np.ndarray, points: np.ndarray,
                         symmetries: np.ndarray) -> np.ndarray:
    """Model points in every symmetric ground-truth pose ``T_g @ S``: ``(S, N, 3)`` metres."""
    points_sym = _transform(symmetries[:, :3, :3], symmetries[:, :3, 3], points)
    return _transform(R_g, t_g, points_sym)


def add(R_e: np.ndarray, t_e: np.ndarray, R_g: np.ndarray, t_g: np.ndarray,
        points: np.ndarray) -> float:
    """ADD (Hinterstoisser et al. 2012): mean distance of corresponding model points, metres."""
    return float(np.linalg.norm(_transform(R_e, t_e, points) - _transform(R_g, t_g, points),
                                axis=-1).mean())


def adi(R_e: np.ndarray, t_e: np.ndarray, R_g: np.ndarray, t_g: np.ndarray,
        points: np.ndarray) -> float:
    """ADI / ADD-S (Hinterstoisser et al. 2012): mean, over ground-truth-posed points, of the
    distance to the closest estimated-pose point, metres."""
    distances, _ = cKDTree(_transform(R_e, t_e, points)).query(_transform(R_g, t_g, points), k=1)
    return float(distances.mean())


def add_or_adi(R_e: np.ndarray, t_e: np.ndarray, R_g: np.ndarray, t_g: np.ndarray,
               points: np.ndarray, symmetric: bool) -> float:
    """AD(-S): ADI for objects with indistinguishable views (``symmetric``), else ADD; metres."""
    return (adi if symmetric else add)(R_e, t_e, R_g, t_g, points)


def mssd(R_e: np.ndarray, t_e: np.ndarray, R_g: np.ndarray, t_g: np.ndarray,
         points: np.ndarray, symmetries: np.ndarray) -> float:
    """MSSD (Hodan et al. 2020, BOP'19): min over symmetries of the max point distance, metres."""
    gt = _symmetric_gt_points(R_g, t_g, points, symmetries)
    return float(np.linalg.norm(gt - _transform(R_e, t_e, points), axis=-1).max(axis=-1).min())


def mspd(R_e: np.ndarray, t_e: np.ndarray, R_g: np.ndarray, t_g: np.ndarray, K: np.ndarray,
         points: np.ndarray, symmetries: np.ndarray) -> float:
    """MSPD (Hodan et al. 2020, BOP'19): min over symmetries of the max distance between
    projected points, pixels."""
    gt = _project(K, _symmetric_gt_points(R_g, t_g, points, symmetries))
    estimate = _project(K, _transform(R_e, t_e, points))
    return float(np.linalg.norm(gt - estimate, axis=-1).max(axis=-1).min())


def rotation_error(R_e: np.ndarray, R_g: np.ndarray) -> float:
    """re: geodesic angle between the rotations, radians."""
    return float(geometry.rotation_angle_between(R_e, R_g))


def translation_error(t_e: np.ndarray, t_g: np.ndarray) -> float:
    """te: Euclidean distance between the translations, metres."""
    return float(np.linalg.norm(t_e - t_g))


def projection_error_2d(R_e: np.ndarray, t_e: np.ndarray, R_g: np.ndarray, t_g: np.ndarray,
                        K: np.ndarray, points: np.ndarray) -> float:
    """Proj 2D (Brachmann et al. 2016): mean distance between projected model points, pixels."""
    estimate = _project(K, _transform(R_e, t_e, points))
    gt = _project(K, _transform(R_g, t_g, points))
    return float(np.linalg.norm(estimate - gt, axis=-1).mean())


class SpeedErrors(NamedTuple):
    """The two terms of the ESA SPEED score."""
    position: float  # ||t_e - t_g|| / ||t_g||, unitless
    orientation: float  # 2 arccos(|<q_e, q_g>|), radians


def speed_errors(R_e: np.ndarray, t_e: np.ndarray, R_g: np.ndarray,
                 t_g: np.ndarray) -> SpeedErrors:
    """Position and orientation terms of the ESA SPEED score (Kisantal et al. 2020)."""
    q_e = geometry.matrix_to_quaternion(R_e)
    q_g = geometry.matrix_to_quaternion(R_g)
    # Clamped because rounding can push |<q_e, q_g>| of unit quaternions just above 1.
    cos_half_angle = min(1.0, abs(float(q_e @ q_g)))
    return SpeedErrors(position=float(np.linalg.norm(t_e - t_g) / np.linalg.norm(t_g)),
                       orientation=2.0 * float(np.arccos(cos_half_angle)))


def speed_score(R_e: np.ndarray, t_e: np.ndarray, R_g: np.ndarray, t_g: np.ndarray) -> float:
    """ESA SPEED score (Kisantal et al. 2020): position error + orientation error (radians)."""
    return sum(speed_errors(R_e, t_e, R_g, t_g))


def recall(errors: np.ndarray, threshold: float) -> float:
    """Fraction of ``errors`` ``(M,)`` strictly below ``threshold`` (BOP's ``error < th``).

    Missing estimates are given as ``inf`` and count as failures, as does NaN.
    """
    errors = np.asarray(errors, dtype=float)
    if errors.size == 0:
        raise ValueError('recall of an empty error list is undefined')
    return float(np.mean(errors < threshold))


def average_recall(errors: np.ndarray, thresholds: np.ndarray) -> float:
    """Mean of ``recall(errors, th)`` over ``thresholds`` ``(T,)`` (BOP'19 AR of one error)."""
    return float(np.mean([recall(errors, th) for th in thresholds]))


# BOP'19 thresholds of correctness, as in the BOP toolkit: scripts/eval_bop19_pose.py sets
# correct_th = np.arange(0.05, 0.51, 0.05) for MSSD and np.arange(5, 51, 5) for MSPD;
# scripts/eval_calc_scores.py divides MSSD by the object diameter and multiplies MSPD by
# 640 / image_width before comparing, which is the same as scaling the thresholds here.

def bop19_mssd_thresholds(diameter_m: float) -> np.ndarray:
    """MSSD thresholds ``(10,)`` in metres: ``diameter * [0.05, 0.10, ..., 0.50]``."""
    return diameter_m * 0.05 * np.arange(1, 11)


def bop19_mspd_thresholds(image_width_px: float) -> np.ndarray:
    """MSPD thresholds ``(10,)`` in pixels: ``(image_width / 640) * [5, 10, ..., 50]``."""
    return image_width_px / 640.0 * 5.0 * np.arange(1, 11)

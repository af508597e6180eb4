"""Rotations and rigid poses for numpy and torch, batched over leading dimensions.

Conventions (used throughout the package):
- Rotation matrices ``(..., 3, 3)`` act on column vectors: ``x_cam = R @ x_obj + t``.
- Poses are homogeneous ``(..., 4, 4)`` object-to-camera transforms; translations in metres.
- Angles in radians. Quaternions in ROS order ``(x, y, z, w)``.
- 6D rotation representation (Zhou et al. 2019): the first two COLUMNS of ``R``,
  concatenated as ``(a1, a2)``.

Every public function accepts ``np.ndarray`` or ``torch.Tensor``: the maths is written once in
torch and :func:`pose_node.arrays.numpy_or_torch` serves numpy callers. Numpy in gives float64
numpy out; any tensor argument makes the call run in torch on the first tensor's device and dtype
(numpy arguments are converted to it), differentiable.

Random sampling takes an explicit ``np.random.Generator`` (numpy only, so benchmarks are
reproducible with one seed); the draws are moved to the device/dtype of any tensor argument.
"""
from __future__ import annotations

import numpy as np
import torch

from pose_node.arrays import Array, numpy_or_torch

# Below this squared angle (rad^2) the sin/cos ratios are replaced by their Taylor series:
# the truncation error (theta^6 / 5040) is far below float64 rounding there, and the
# series keeps gradients finite at exactly zero.
_SMALL_ANGLE_SQ = 1e-6


def _like(value, reference: torch.Tensor) -> torch.Tensor:
    """``value`` (scalar, numpy or tensor) as a tensor on ``reference``'s device and dtype."""
    return torch.as_tensor(value, dtype=reference.dtype, device=reference.device)


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / torch.linalg.vector_norm(v, dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------
# Skew-symmetric matrices
# --------------------------------------------------------------------------------------------

@numpy_or_torch
def skew(v: Array) -> Array:
    """Cross-product matrix: ``skew(v) @ u == cross(v, u)``. ``(..., 3) -> (..., 3, 3)``."""
    x, y, z = v.unbind(-1)
    zero = torch.zeros_like(x)
    return torch.stack([
        torch.stack([zero, -z, y], dim=-1),
        torch.stack([z, zero, -x], dim=-1),
        torch.stack([-y, x, zero], dim=-1),
    ], dim=-2)


# --------------------------------------------------------------------------------------------
# 6D representation
# --------------------------------------------------------------------------------------------

@numpy_or_torch
def rot6d_to_matrix(x: Array) -> Array:
    """Gram-Schmidt of the 6D representation (Zhou et al. 2019; Simpsi et al. 2022 eq. 2).

    ``x`` ``(..., 6)`` holds two 3-vectors ``a1, a2``; ``b1 = a1 / |a1|``,
    ``b2 = normalise(a2 - (b1 . a2) b1)``, ``b3 = b1 x b2``, ``R = [b1 b2 b3]`` (columns).
    Returns ``(..., 3, 3)``, a proper rotation for any input with independent ``a1, a2``.
    """
    a1, a2 = x[..., :3], x[..., 3:]
    b1 = _normalize(a1)
    b2 = _normalize(a2 - (b1 * a2).sum(-1, keepdim=True) * b1)
    b3 = torch.linalg.cross(b1, b2, dim=-1)
    return torch.stack([b1, b2, b3], dim=-1)


@numpy_or_torch
def matrix_to_rot6d(R: Array) -> Array:
    """First two columns of ``R`` ``(..., 3, 3)`` concatenated: ``(..., 6)``."""
    return torch.cat([R[..., :, 0], R[..., :, 1]], dim=-1)


# --------------------------------------------------------------------------------------------
# Quaternions (x, y, z, w)
# --------------------------------------------------------------------------------------------

@numpy_or_torch
def quaternion_to_matrix(q: Array) -> Array:
    """Rotation matrix ``(..., 3, 3)`` of quaternion ``q`` ``(..., 4)`` in (x, y, z, w) order.

    ``q`` need not be unit length; it is normalised first.
    """
    x, y, z, w = _normalize(q).unbind(-1)
    return torch.stack([
        torch.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], dim=-1),
        torch.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], dim=-1),
        torch.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], dim=-1),
    ], dim=-2)


@numpy_or_torch
def matrix_to_quaternion(R: Array) -> Array:
    """Unit quaternion ``(..., 4)``, (x, y, z, w) order, ``w >= 0``, of ``R`` ``(..., 3, 3)``.

    Shepperd's method: of the four algebraically equivalent formulas, each divides by one of
    ``2|w|, 2|x|, 2|y|, 2|z|``; the one with the largest divisor is used (it is >= 1), so the
    result stays accurate at 180 degrees where ``w`` vanishes.
    """
    m00, m01, m02 = R[..., 0, 0], R[..., 0, 1], R[..., 0, 2]
    m10, m11, m12 = R[..., 1, 0], R[..., 1, 1], R[..., 1, 2]
    m20, m21, m22 = R[..., 2, 0], R[..., 2, 1], R[..., 2, 2]
    # r_sq_i = 4 * (component i)^2 for i = x, y, z, w; they sum to 4, so the largest is >= 1.
    r_sq = torch.stack([
        1 + m00 - m11 - m22,
        1 - m00 + m11 - m22,
        1 - m00 - m11 + m22,
        1 + m00 + m11 + m22,
    ], dim=-1)
    # Row i: (x, y, z, w) * 2 r_i, from the formula that divides by r_i = 2 |component i|.
    candidates = torch.stack([
        torch.stack([r_sq[..., 0], m01 + m10, m02 + m20, m21 - m12], dim=-1),
        torch.stack([m01 + m10, r_sq[..., 1], m12 + m21, m02 - m20], dim=-1),
        torch.stack([m02 + m20, m12 + m21, r_sq[..., 2], m10 - m01], dim=-1),
        torch.stack([m21 - m12, m02 - m20, m10 - m01, r_sq[..., 3]], dim=-1),
    ], dim=-2)
    # Only the row with the largest r_sq is kept; clamping keeps the others (and the gradients
    # through them) finite where their r_sq is ~0.
    candidates = candidates / (2 * torch.sqrt(torch.clamp(r_sq, min=0.01)))[..., None]
    best = r_sq.argmax(dim=-1, keepdim=True)[..., None].expand(*r_sq.shape[:-1], 1, 4)
    q = _normalize(candidates.gather(-2, best).squeeze(-2))
    return torch.where(q[..., 3:] < 0, -q, q)


# --------------------------------------------------------------------------------------------
# Axis-angle (rotation vector)
# --------------------------------------------------------------------------------------------

@numpy_or_torch
def axis_angle_to_matrix(v: Array) -> Array:
    """Rodrigues' formula: rotation vector ``v`` ``(..., 3)`` (radians) -> ``(..., 3, 3)``.

    ``R = I + a K + b K^2`` with ``K = skew(v)``, ``a = sin(t)/t``, ``b = (1 - cos t)/t^2``,
    ``t = |v|``; series near ``t = 0`` keep values and gradients finite there.
    """
    theta_sq = (v * v).sum(-1)
    small = theta_sq < _SMALL_ANGLE_SQ
    # The exact formulas are evaluated at a harmless stand-in angle where the series is used,
    # so that the unused branch of torch.where never produces NaN gradients.
    safe_theta_sq = torch.where(small, torch.ones_like(theta_sq), theta_sq)
    theta = torch.sqrt(safe_theta_sq)
    a = torch.where(small, 1 - theta_sq / 6 + theta_sq ** 2 / 120, torch.sin(theta) / theta)
    # 2 sin^2(t/2) / t^2 avoids the cancellation in 1 - cos(t).
    b = torch.where(small, 0.5 - theta_sq / 24 + theta_sq ** 2 / 720,
                    2 * torch.sin(theta / 2) ** 2 / safe_theta_sq)
    K = skew(v)
    eye = torch.eye(3, dtype=v.dtype, device=v.device)
    return eye + a[..., None, None] * K + b[..., None, None] * (K @ K)


@numpy_or_torch
def matrix_to_axis_angle(R: Array) -> Array:
    """Rotation vector ``(..., 3)`` (radians, angle in ``[0, pi]``) of ``R`` ``(..., 3, 3)``.

    Goes through the robust quaternion (w >= 0): angle ``2 atan2(|xyz|, w)``, which is accurate
    near 0 and near pi. At exactly pi the sign of the axis is arbitrary (both are valid).
    """
    q = matrix_to_quaternion(R)
    xyz, w = q[..., :3], q[..., 3]
    sin_half_sq = (xyz * xyz).sum(-1)
    small = sin_half_sq < _SMALL_ANGLE_SQ
    sin_half = torch.sqrt(torch.where(small, torch.ones_like(sin_half_sq), sin_half_sq))
    # angle / sin(angle / 2) = 2 atan(s / w) / s, by its series in s = sin(angle / 2) near 0.
    s2_over_w2 = sin_half_sq / w ** 2
    scale = torch.where(small, (2 / w) * (1 - s2_over_w2 / 3 + s2_over_w2 ** 2 / 5),
                        2 * torch.atan2(sin_half, w) / sin_half)
    return xyz * scale[..., None]


# --------------------------------------------------------------------------------------------
# Euler ZXY (Simpsi et al. 2022)
# --------------------------------------------------------------------------------------------

def _elementary_rotation(angle: torch.Tensor, axis: int) -> torch.Tensor:
    """Rotation ``(..., 3, 3)`` by ``angle`` ``(...)`` about coordinate axis 0, 1 or 2."""
    c, s = torch.cos(angle), torch.sin(angle)
    one, zero = torch.ones_like(angle), torch.zeros_like(angle)
    rows = {
        0: [[one, zero, zero], [zero, c, -s], [zero, s, c]],
        1: [[c, zero, s], [zero, one, zero], [-s, zero, c]],
        2: [[c, -s, zero], [s, c, zero], [zero, zero, one]],
    }[axis]
    return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)


@numpy_or_torch
def euler_zxy_to_matrix(angles: Array) -> Array:
    """``angles`` ``(..., 3)`` = (z, x, y) radians -> ``Rz(z) @ Rx(x) @ Ry(y)`` ``(..., 3, 3)``.

    Intrinsic rotations: first about z, then about the new x, then about the new y
    (transforms3d axes ``'rzxy'``).
    """
    z, x, y = angles.unbind(-1)
    return _elementary_rotation(z, 2) @ _elementary_rotation(x, 0) @ _elementary_rotation(y, 1)


@numpy_or_torch
def matrix_to_euler_zxy(R: Array) -> Array:
    """Inverse of ``euler_zxy_to_matrix``: ``(..., 3, 3)`` -> (z, x, y) ``(..., 3)`` radians.

    ``x`` lies in ``[-pi/2, pi/2]``, ``z`` and ``y`` in ``(-pi, pi]``. At gimbal lock
    (``|x| = pi/2``) only ``z +- y`` is determined; ``y = 0`` is returned there.
    """
    # R = [[cz cy - sz sx sy, -sz cx, cz sy + sz sx cy],
    #      [sz cy + cz sx sy,  cz cx, sz sy - cz sx cy],
    #      [-cx sy,            sx,    cx cy          ]]
    cos_x = torch.sqrt(R[..., 0, 1] ** 2 + R[..., 1, 1] ** 2)
    x = torch.atan2(R[..., 2, 1], cos_x)
    locked = cos_x < 1e-6
    z = torch.where(locked, torch.atan2(R[..., 1, 0], R[..., 0, 0]),
                    torch.atan2(-R[..., 0, 1], R[..., 1, 1]))
    y = torch.where(locked, torch.zeros_like(x), torch.atan2(-R[..., 2, 0], R[..., 2, 2]))
    return torch.stack([z, x, y], dim=-1)


# --------------------------------------------------------------------------------------------
# Poses
# --------------------------------------------------------------------------------------------

@numpy_or_torch
def make_pose(R: Array, t: Array) -> Array:
    """Homogeneous pose ``(..., 4, 4)`` of ``R`` ``(..., 3, 3)`` and ``t`` ``(..., 3)`` metres."""
    batch = torch.broadcast_shapes(R.shape[:-2], t.shape[:-1])
    T = torch.zeros(*batch, 4, 4, dtype=R.dtype, device=R.device)
    T[..., :3, :3] = R
    T[..., :3, 3] = t
    T[..., 3, 3] = 1
    return T


@numpy_or_torch
def compose_poses(T_ab: Array, T_bc: Array) -> Array:
    """``T_ac = T_ab @ T_bc`` for poses ``(..., 4, 4)`` (maps frame c into frame a)."""
    return T_ab @ T_bc


@numpy_or_torch
def invert_pose(T: Array) -> Array:
    """Inverse of a rigid pose ``(..., 4, 4)``: ``[R^T, -R^T t]`` (exact, no matrix inverse)."""
    R_inv = T[..., :3, :3].transpose(-1, -2)
    t_inv = -(R_inv @ T[..., :3, 3:])[..., 0]
    return make_pose(R_inv, t_inv)


@numpy_or_torch
def transform_points(T: Array, points: Array) -> Array:
    """Apply poses ``T`` ``(..., 4, 4)`` to ``points`` ``(..., N, 3)``: ``(..., N, 3)``."""
    return points @ T[..., :3, :3].transpose(-1, -2) + T[..., None, :3, 3]


@numpy_or_torch
def rotation_angle_between(R_a: Array, R_b: Array) -> Array:
    """Geodesic angle ``(...)`` in ``[0, pi]`` radians between rotations ``(..., 3, 3)``.

    ``atan2(sin, cos)`` of the relative rotation: accurate for tiny angles (where ``acos`` of
    the trace loses half the digits) and needing no clamp against rounding.
    """
    R = R_a.transpose(-1, -2) @ R_b
    cos_angle = (R[..., 0, 0] + R[..., 1, 1] + R[..., 2, 2] - 1) / 2
    twice_sin_axis = torch.stack([R[..., 2, 1] - R[..., 1, 2],
                                  R[..., 0, 2] - R[..., 2, 0],
                                  R[..., 1, 0] - R[..., 0, 1]], dim=-1)
    sin_angle = torch.linalg.vector_norm(twice_sin_axis, dim=-1) / 2
    return torch.atan2(sin_angle, cos_angle)


# --------------------------------------------------------------------------------------------
# Random sampling (explicit np.random.Generator)
# --------------------------------------------------------------------------------------------

def random_unit_vectors(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` directions ``(n, 3)`` uniform on the unit sphere (normalised Gaussians)."""
    v = rng.standard_normal((n, 3))
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` rotations ``(n, 3, 3)`` uniform (Haar) on SO(3).

    A normalised 4D Gaussian is uniform on the unit quaternion sphere, which double-covers
    SO(3) uniformly.
    """
    return quaternion_to_matrix(rng.standard_normal((n, 4)))


def _random_unit_vectors_like(batch: torch.Size, reference: torch.Tensor,
                              rng: np.random.Generator) -> torch.Tensor:
    """Uniform directions ``(*batch, 3)`` on ``reference``'s device and dtype."""
    count = int(np.prod(batch, dtype=int))
    return _like(random_unit_vectors(count, rng), reference).reshape(*batch, 3)


@numpy_or_torch
def rotate_about_random_axis(R: Array, angle_rad: float | Array,
                             rng: np.random.Generator) -> Array:
    """Rotate each ``R`` ``(..., 3, 3)`` by exactly ``angle_rad`` (scalar or ``(...)``) about a
    uniformly random axis, in the CAMERA frame: ``R' = exp(angle * skew(axis)) @ R``.

    Because the axis is uniform, the result has the same distribution as the object-frame
    perturbation ``R @ exp(...)``; the geodesic distance to ``R`` is exactly ``angle_rad``
    (for angles in ``[0, pi]``).
    """
    axes = _random_unit_vectors_like(R.shape[:-2], R, rng)
    return axis_angle_to_matrix(axes * _like(angle_rad, R)[..., None]) @ R


@numpy_or_torch
def perturb_pose(R: Array, t: Array, angle_rad: float | Array, trans_frac: float | Array,
                 rng: np.random.Generator) -> tuple[Array, Array]:
    """Perturb poses for benchmarks: ``R`` ``(..., 3, 3)``, ``t`` ``(..., 3)`` metres.

    ``R'`` is ``R`` rotated by exactly ``angle_rad`` about a random axis in the camera frame
    (``rotate_about_random_axis``); ``t' = t + trans_frac * |t| * u`` with ``u`` a random unit
    direction, so ``|t' - t| = trans_frac * |t|`` exactly. Returns ``(R', t')``.
    """
    R_new = rotate_about_random_axis(R, angle_rad, rng)
    directions = _random_unit_vectors_like(t.shape[:-1], t, rng)
    offset = _like(trans_frac, t)[..., None] * torch.linalg.vector_norm(t, dim=-1, keepdim=True)
    return R_new, t + offset * directions

"""Pose parametrizations for the refiner: what the optimizers actually move.

Poses are object-to-camera ``R`` (B, 3, 3) and ``t`` (B, 3) in metres (see
:mod:`pose_node.geometry`).

Rotations (the paper's Table 1 ablation, Simpsi et al. 2022):
- ``'6d'``: the first two columns of R, (B, 6) (Zhou et al. 2019), Gram-Schmidt back to R;
- ``'quaternion'``: (x, y, z, w), (B, 4), normalised back to R;
- ``'euler_zxy'``: intrinsic z, x, y angles in radians, (B, 3).

Translations:
- ``'metric'``: t itself in metres, (B, 3) (the paper's choice);
- ``'scaled'``: ``(x / z * z0 / r, y / z * z0 / r, log(z / z0))`` with ``r`` the object's radius
  and ``z0`` the starting depth (both metres). A unit step of any of the three then moves the
  silhouette's outline by about its own image radius, as a 1-radian rotation does, so one learning
  rate suits rotation, lateral and depth steps alike.

Local increments (for Levenberg-Marquardt): ``delta`` (B, 6) = (omega, nu) moves a pose to
``R' = exp(omega) R`` (omega in radians, camera-frame axes, about the object's origin) and
``t' = exp(nu_z) * (t + r * (nu_x, nu_y, 0))``: the lateral part moves by object radii, the depth
part scales t along the ray through the object's origin (a pure change of image scale).
"""
from dataclasses import dataclass

import torch

from pose_node.geometry import (axis_angle_to_matrix, euler_zxy_to_matrix, matrix_to_euler_zxy,
                                matrix_to_quaternion, matrix_to_rot6d, quaternion_to_matrix,
                                rot6d_to_matrix)

ROTATIONS = ('6d', 'quaternion', 'euler_zxy')
TRANSLATIONS = ('metric', 'scaled')

_TO_MATRIX = {'6d': rot6d_to_matrix, 'quaternion': quaternion_to_matrix,
              'euler_zxy': euler_zxy_to_matrix}
_FROM_MATRIX = {'6d': matrix_to_rot6d, 'quaternion': matrix_to_quaternion,
                'euler_zxy': matrix_to_euler_zxy}


def check_rotation(kind: str) -> str:
    if kind not in ROTATIONS:
        raise ValueError(f'unknown rotation parametrization {kind!r}; choose one of '
                         f'{", ".join(ROTATIONS)}')
    return kind


def check_translation(kind: str) -> str:
    if kind not in TRANSLATIONS:
        raise ValueError(f'unknown translation parametrization {kind!r}; choose one of '
                         f'{", ".join(TRANSLATIONS)}')
    return kind


def rotation_to_params(R: torch.Tensor, kind: str) -> torch.Tensor:
    """Parameters (B, P) of rotations R (B, 3, 3): P = 6, 4, 3 for '6d', 'quaternion',
    'euler_zxy'."""
    return _FROM_MATRIX[check_rotation(kind)](R)


def params_to_rotation(params: torch.Tensor, kind: str) -> torch.Tensor:
    """Rotations (B, 3, 3) of parameters (B, P) (inverse of :func:`rotation_to_params`)."""
    return _TO_MATRIX[check_rotation(kind)](params)


@dataclass(frozen=True)
class TranslationScale:
    """The constants of the ``'scaled'`` translation: object radii ``radius`` (B,) metres (or one
    float for all) and reference depths ``depth`` (B,) metres (the starting poses' z)."""

    radius: float | torch.Tensor
    depth: torch.Tensor


def translation_to_params(t: torch.Tensor, kind: str, scale: TranslationScale) -> torch.Tensor:
    """Parameters (B, 3) of translations t (B, 3) metres; see the module docstring."""
    if check_translation(kind) == 'metric':
        return t.clone()
    z = t[:, 2:]
    lateral = t[:, :2] / z * (scale.depth[:, None] / _column(scale.radius, t))
    return torch.cat([lateral, torch.log(z / scale.depth[:, None])], dim=1)


def params_to_translation(params: torch.Tensor, kind: str, scale: TranslationScale) -> torch.Tensor:
    """Translations (B, 3) metres of parameters (B, 3); inverse of :func:`translation_to_params`."""
    if check_translation(kind) == 'metric':
        return params
    z = scale.depth[:, None] * torch.exp(params[:, 2:])
    lateral = params[:, :2] * (_column(scale.radius, params) / scale.depth[:, None]) * z
    return torch.cat([lateral, z], dim=1)


def apply_increment(R: torch.Tensor, t: torch.Tensor, delta: torch.Tensor,
                    radius: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Poses (R' (B, 3, 3), t' (B, 3)) reached from R (B, 3, 3), t (B, 3) metres by local
    increments delta (B, 6) = (omega rad, nu); ``radius`` (B,) metres (or one float for all) is
    the lateral unit."""
    omega, nu = delta[:, :3], delta[:, 3:]
    lateral = torch.cat([nu[:, :2], torch.zeros_like(nu[:, 2:])], dim=1) * _column(radius, t)
    return axis_angle_to_matrix(omega) @ R, torch.exp(nu[:, 2:]) * (t + lateral)


def _column(values: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``values`` (B,) or a float as a (B, 1) or (1, 1) column in ``like``'s dtype and device."""
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(-1, 1)

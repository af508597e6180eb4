"""Two-branch pose regressor (after Simpsi et al. 2022): from one object's crop, a rotation
branch regresses the 6D rotation (Zhou et al. 2019) and a localization branch the translation.

Input: the crop's RGB and its visible mask as a fourth channel (:func:`network_input`), so
that the network knows which pixels are the object and which an occluder (the mask is what the
segmenter or an upstream node gives; it is randomly blanked in training so that a crop without a
mask still works).

Rotation, allocentric: the network predicts the object's rotation relative to the ray through
the crop's centre (:func:`ray_rotation`), not relative to the camera's optical axis. An object
off the image centre is seen from a rotated direction, so the same egocentric rotation looks
different across the image, while the same allocentric rotation looks (nearly) the same in every
crop; the crop's K gives the ray exactly at run time, so converting back is free:
``R = ray_rotation(ray) @ R_allo``.

Translation, box-relative (:func:`translation_to_params`): (dx, dy) the offset of the projected
model origin from the crop's centre in crop widths, and log s with z = f * diameter / S * s,
S the crop's side in image pixels (the crop's own focal length over its size, so only the crop's
K is needed). Chosen over regressing the full-image translation because it is invariant to
where the crop lies in the image and to the image's size and focal length, which a network
trained on one camera cannot otherwise learn; log s makes depth errors relative.

Loss (eq. 1 of the paper): L = L_T + lambda * L_R, L_T the L1 distance of the translation
parameters, L_R the mean distance of model points under the predicted and true allocentric
rotations in units of the diameter (the minimum over the object's symmetries).

Units: metres and radians; crops (S, S, 3) float32 0..1; poses object-to-camera.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from pose_node.camera import unproject_points
from pose_node.coarse import Hypotheses
from pose_node.crop import Crop, cut_crop, mask_box
from pose_node.crop.segmenter import (IMAGE_MEAN, IMAGE_STD, conv_block, load_state_checked,
                                      read_weights)
from pose_node.geometry import axis_angle_to_matrix, rot6d_to_matrix, transform_points
from pose_node.mesh import ObjectModel

ROTATION_WEIGHT = 1.0
"""lambda of eq. 1: L_R (diameters) against L_T (crop widths and log depth)."""
DIAMETER_TOLERANCE = 0.02
"""Relative difference allowed between a weight file's diameter and the given model's."""


# ---------------------------------------------------------------------------------- geometry

def ray_rotation(direction: np.ndarray) -> np.ndarray:
    """(3, 3) the smallest rotation that turns the optical axis (0, 0, 1) onto ``direction``
    (3,) (any length)."""
    d = np.asarray(direction, np.float64) / np.linalg.norm(direction)
    axis = np.cross([0.0, 0.0, 1.0], d)
    angle = np.arctan2(np.linalg.norm(axis), d[2])
    norm = np.linalg.norm(axis)
    return axis_angle_to_matrix(axis / norm * angle if norm > 0 else np.zeros(3))


def crop_centre_ray(K_crop: np.ndarray, size: int) -> np.ndarray:
    """(3,) camera-frame direction (z = 1) through the centre of a ``size`` px crop with
    intrinsics ``K_crop`` (3, 3)."""
    centre = 0.5 * (size - 1)
    return np.linalg.solve(K_crop, np.array([centre, centre, 1.0]))


def translation_to_params(t: np.ndarray, K_crop: np.ndarray, size: int,
                          diameter: float) -> np.ndarray:
    """(3,) (dx, dy, log s) of translation ``t`` (3,) m in a ``size`` px crop with intrinsics
    ``K_crop``: offset of the projected origin from the crop's centre in crop widths, and
    z = fx_crop * diameter / size * s."""
    uv = (K_crop @ t)[:2] / t[2]
    offset = (uv - 0.5 * (size - 1)) / size
    scale = t[2] * size / (K_crop[0, 0] * diameter)
    return np.array([offset[0], offset[1], np.log(scale)])


def params_to_translation(params: np.ndarray, K_crop: np.ndarray, size: int,
                          diameter: float) -> np.ndarray:
    """(3,) translation, m: the inverse of :func:`translation_to_params`."""
    uv = 0.5 * (size - 1) + size * np.asarray(params[:2], np.float64)
    depth = K_crop[0, 0] * diameter / size * np.exp(params[2])
    return unproject_points(np.asarray(K_crop, np.float64), uv[None], np.array([depth]))[0]


def allocentric_rotation(R: np.ndarray, ray: np.ndarray) -> np.ndarray:
    """(3, 3) rotation relative to the ray (3,) of an egocentric rotation ``R`` (3, 3)."""
    return ray_rotation(ray).T @ R


def egocentric_rotation(R_allo: np.ndarray, ray: np.ndarray) -> np.ndarray:
    """(3, 3) camera-frame rotation of an allocentric rotation ``R_allo`` (3, 3) about the ray
    (3,)."""
    return ray_rotation(ray) @ R_allo


# ---------------------------------------------------------------------------------- network

POOLED_SIDE, HEAD_WIDTH = 4, 128
"""The last feature map is pooled to POOLED_SIDE x POOLED_SIDE cells and flattened, not
averaged globally: rotation depends on where parts lie in the crop, which a global average
discards."""


class Branch(nn.Module):
    """A small CNN from a (B, 4, S, S) crop to (B, n_out): strided conv stages, pooling to a
    :data:`POOLED_SIDE` grid, a two-layer head."""

    def __init__(self, n_out: int, widths: tuple[int, ...]):
        super().__init__()
        channels = (4,) + tuple(widths)
        self.features = nn.Sequential(*(
            nn.Sequential(conv_block(channels[i], channels[i + 1], stride=2),
                          conv_block(channels[i + 1], channels[i + 1]))
            for i in range(len(widths))))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(POOLED_SIDE), nn.Flatten(),
                                  nn.Linear(widths[-1] * POOLED_SIDE ** 2, HEAD_WIDTH),
                                  nn.ReLU(inplace=True), nn.Linear(HEAD_WIDTH, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class PoseRegressionNet(nn.Module):
    """Rotation branch -> (B, 6) 6D rotation; localization branch -> (B, 3) (dx, dy, log s).

    forward: x (B, 4, S, S) from :func:`network_input` -> (rot6d (B, 6), params (B, 3)).
    """

    def __init__(self, widths: tuple[int, ...]):
        super().__init__()
        self.rotation = Branch(6, widths)
        self.localization = Branch(3, widths)
        # Start near the identity rotation rather than at a random one.
        with torch.no_grad():
            last = self.rotation.head[-1]
            last.weight.mul_(0.1)
            last.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.cat([(x[:, :3] - IMAGE_MEAN) / IMAGE_STD, x[:, 3:] * 2 - 1], dim=1)
        return self.rotation(h), self.localization(h)


@dataclass(frozen=True)
class RegressorConfig:
    """object_name, diameter (m) the weights were trained for; crop_size (px) the network
    sees; crop_scale the enlargement of the object's box to its crop (see
    :func:`pose_node.crop.cut_crop`); widths: channels per stage of each branch."""

    object_name: str
    diameter: float
    crop_size: int = 64
    crop_scale: float = 1.2
    widths: tuple[int, ...] = (32, 64, 128, 128)

    @classmethod
    def from_dict(cls, values: dict) -> RegressorConfig:
        return cls(object_name=str(values['object_name']), diameter=float(values['diameter']),
                   crop_size=int(values['crop_size']), crop_scale=float(values['crop_scale']),
                   widths=tuple(int(w) for w in values['widths']))

    def to_dict(self) -> dict:
        return asdict(self) | {'widths': list(self.widths)}


def widths_for(base: int) -> tuple[int, ...]:
    """Channels per branch stage for a base width (the ``--width`` flag): (w, 2w, 4w, 4w)."""
    return (base, 2 * base, 4 * base, 4 * base)


def network_input(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(4, S, S) float32: a crop's image (S, S, 3) 0..1 and visible mask (S, S) 0..1."""
    return np.concatenate([np.asarray(image, np.float32).transpose(2, 0, 1),
                           np.asarray(mask, np.float32)[None]], axis=0)


# ---------------------------------------------------------------------------------- training

BOX_SHIFT, BOX_LOG_SCALE = 0.1, 0.15
"""Training jitter of the object's box: centre shift up to this fraction of its larger side,
size times exp(+-BOX_LOG_SCALE), so that boxes from an imperfect mask are familiar."""
MASK_DROPOUT = 0.15
"""Fraction of training crops whose mask channel is blanked (a crop without a known mask)."""


@dataclass(frozen=True, eq=False)
class RegressionSample:
    """One training crop: inputs (4, S, S) float32, targets R_allo (3, 3) and params (3,), and
    the crop's intrinsics K (3, 3)."""

    inputs: np.ndarray
    R_allo: np.ndarray
    params: np.ndarray
    K: np.ndarray


def jittered_box(box: np.ndarray, rng: np.random.Generator, shift: float = BOX_SHIFT,
                 scale_range: tuple[float, float] = (np.exp(-BOX_LOG_SCALE), np.exp(BOX_LOG_SCALE))
                 ) -> np.ndarray:
    """(x, y, w, h) ``box`` moved and resized at random, its centre kept as the reference of the
    move: the centre by up to ``shift`` times its larger side per axis, the size times a factor
    log-uniform in ``scale_range`` (default: :data:`BOX_SHIFT`, :data:`BOX_LOG_SCALE`)."""
    side = max(box[2], box[3])
    centre = box[:2] + 0.5 * box[2:] + rng.uniform(-shift, shift, 2) * side
    size = box[2:] * np.exp(rng.uniform(*np.log(scale_range)))
    return np.concatenate([centre - 0.5 * size, size])


def regression_sample(image: np.ndarray, K: np.ndarray, visible: np.ndarray, pose: np.ndarray,
                      config: RegressorConfig, rng: np.random.Generator | None
                      ) -> RegressionSample | None:
    """The training crop of one instance: ``image`` (H, W, 3) 0..1 with intrinsics ``K``, its
    visible mask (H, W) bool and pose (4, 4). Box jitter and mask dropout when ``rng`` is
    given; None when nothing of the object is visible."""
    box = mask_box(visible)
    if box is None:
        return None
    if rng is not None:
        box = jittered_box(box, rng)
    crop = cut_crop(image, K, box, config.crop_size, mask=visible, scale=config.crop_scale)
    mask = crop.mask
    if rng is not None and rng.random() < MASK_DROPOUT:
        mask = np.zeros_like(mask)
    ray = crop_centre_ray(crop.K, config.crop_size)
    return RegressionSample(
        inputs=network_input(crop.image, mask),
        R_allo=allocentric_rotation(pose[:3, :3], ray),
        params=translation_to_params(pose[:3, 3], crop.K, config.crop_size, config.diameter),
        K=crop.K)


# ---------------------------------------------------------------------------------- loss

def symmetric_points(model: ObjectModel, n_points: int, rng: np.random.Generator) -> np.ndarray:
    """(S, P, 3) float32 surface points in diameters, one set per symmetry of ``model`` (the
    identity first), matched point by point."""
    points = model.sample_points(n_points, rng)
    return (transform_points(model.symmetries, points) / model.diameter).astype(np.float32)


def regression_loss(rot6d: torch.Tensor, params: torch.Tensor, R_target: torch.Tensor,
                    params_target: torch.Tensor, points: torch.Tensor,
                    rotation_weight: float = ROTATION_WEIGHT
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(L, L_T, L_R) of eq. 1 for a batch: rot6d (B, 6) and params (B, 3) predicted; R_target
    (B, 3, 3) allocentric; params_target (B, 3); points (S, P, 3) from :func:`symmetric_points`.
    """
    R = rot6d_to_matrix(rot6d)
    predicted = points[0] @ R.transpose(1, 2)                        # (B, P, 3)
    truth = torch.einsum('spk,bjk->bspj', points, R_target)           # (B, S, P, 3)
    distances = torch.linalg.vector_norm(predicted[:, None] - truth, dim=-1).mean(dim=-1)
    loss_r = distances.min(dim=1).values.mean()
    loss_t = (params - params_target).abs().sum(dim=-1).mean()
    return loss_t + rotation_weight * loss_r, loss_t, loss_r


# ---------------------------------------------------------------------------------- estimator

class RegressorEstimator:
    """:class:`pose_node.coarse.CoarseEstimator` backed by a :class:`PoseRegressionNet` on
    ``device``, for the object its config names.

    Crops of another size than ``config.crop_size`` are resized (the crop's K scaled alike);
    the regressor expects crops cut like its training crops (box enlarged by ``crop_scale``).
    """

    def __init__(self, net: PoseRegressionNet, config: RegressorConfig, device: torch.device):
        self.net = net.to(device).eval()
        self.config = config
        self.device = device

    @torch.no_grad()
    def predict(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Allocentric rotations (B, 3, 3) and translation parameters (B, 3) of network inputs
        (B, 4, S, S)."""
        rot6d, params = self.net(torch.as_tensor(inputs, device=self.device))
        return (rot6d_to_matrix(rot6d.double()).cpu().numpy(), params.double().cpu().numpy())

    def hypotheses(self, crop: Crop, top_k: int = 1) -> Hypotheses:
        """One hypothesis (``top_k`` >= 1 is accepted; a regressor has one answer), score 1."""
        image, mask, K_crop = resized_crop(crop, self.config.crop_size)
        R_allo, params = self.predict(network_input(image, mask)[None])
        size = self.config.crop_size
        R = egocentric_rotation(R_allo[0], crop_centre_ray(K_crop, size))
        t = params_to_translation(params[0], K_crop, size, self.config.diameter)
        return Hypotheses(R=R[None], t=t[None], scores=np.ones(1), source='regressor')


def resized_crop(crop: Crop, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(image (size, size, 3), mask (size, size), K (3, 3)) of ``crop`` at ``size`` px."""
    if crop.size == size:
        return crop.image, crop.mask, crop.K
    factor = size / crop.size
    scale = np.array([[factor, 0, 0.5 * (factor - 1)], [0, factor, 0.5 * (factor - 1)],
                      [0, 0, 1]])
    interpolation = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    image = cv2.resize(crop.image, (size, size), interpolation=interpolation)
    mask = cv2.resize(crop.mask, (size, size), interpolation=interpolation)
    return image, mask, scale @ crop.K


def make_regression_net(config: RegressorConfig) -> PoseRegressionNet:
    return PoseRegressionNet(config.widths)


def load_regressor(path: str | Path, model: ObjectModel, device: torch.device
                   ) -> RegressorEstimator:
    """The regressor stored at ``path`` (weights-only file) for ``model`` on ``device``.

    FileNotFoundError / ValueError naming the file when it is missing, corrupt, not a regressor
    or trained for an object of another diameter."""
    values, state_dict = read_weights(path, 'regressor')
    try:
        config = RegressorConfig.from_dict(values)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f'{path}: bad regressor config {values} ({error})') from error
    if abs(config.diameter - model.diameter) > DIAMETER_TOLERANCE * model.diameter:
        raise ValueError(f'{path}: trained for {config.object_name!r} of diameter '
                         f'{config.diameter:.4f} m, not {model.name!r} of {model.diameter:.4f} m')
    net = make_regression_net(config)
    load_state_checked(net, state_dict, path)
    return RegressorEstimator(net, config, device)

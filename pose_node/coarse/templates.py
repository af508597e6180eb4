"""Training-free coarse pose: matching an observed silhouette against a bank of rendered templates.

Offline, per mesh: views from the vertices of an icosphere (object-to-camera directions), each
rolled about the optical axis by ``inplane`` angles, at a canonical distance with the object's
bounding-box centre on the optical axis, rendered by the exact ray caster. Rolling about the
optical axis only rotates the image about the principal point, so each view is ray-cast once and
its rolls are image rotations. Each template keeps its silhouette resampled from the square
around its box to ``size`` x ``size`` pixels, its unlit vertex colours in the same square at
``colour_size`` pixels, and the box geometry needed for translation: the box side and the offset
of the box centre from the object centre's projection, both divided by the focal length (tangent
units at the canonical distance).

Online: the observed visible mask (and the crop's ignored pixels) is resampled the same way and
compared with every template at once (an occlusion-aware IoU: template pixels on ignored pixels
count neither way). Optionally (``colour_weight`` > 0) the ``rerank`` best by IoU are re-scored
with the correlation of their colours with the image over the pixels both cover, which tells a
silhouette from its mirror image and from the other views that share it. It is for meshes whose
colours are what the camera sees, so it is off by default: on LM-O dev it HURT (top-1 within
15 deg: 54 % with silhouettes only, 37 % at weight 0.5: scanned colours differ too much from real
ones). For the demo object (197 synthetic tuning scenes, the built-in segmenter's masks) a
hypothesis within 20 deg is among the top 8 for 68.0 % with silhouettes only, 77.2 % at weight 0.3
re-ranking 256, 80.7 % re-ranking 4096. The best templates, thinned by non-maximum suppression in
rotation space, become hypotheses whose distance comes from the ratio of box sizes and whose
lateral position comes from unprojecting the observed box centre minus the template's scaled
offset. Objects off the optical axis are seen from a rotated direction: the template rotation is
turned by the rotation that takes the optical axis onto the object's ray.

Units: metres, radians; poses object-to-camera; masks float 0..1.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import trimesh

from pose_node.camera import crop_image, square_box_around
from pose_node.coarse import Hypotheses
from pose_node.crop import Crop, extend_box, mask_box
from pose_node.geometry import axis_angle_to_matrix
from pose_node.mesh import ObjectModel
from pose_node.render.raycast import RaycastScene

BANK_FORMAT_VERSION = 2
"""Bumped whenever what a cache file holds changes, so that old files are not read."""

SOURCE = 'templates'


@dataclass(frozen=True)
class TemplateSettings:
    """How a bank is built.

    subdivisions: icosphere subdivisions of the view directions (0: 12, 1: 42, 2: 162, 3: 642);
    inplane: rolls per view (evenly spaced over 360 deg); size: side of the stored silhouettes, px;
    colour_size: side of the stored colour images, px; render_size: side of the ray-cast views,
    px; supersample: rays per pixel side; distance_diameters: canonical distance in object
    diameters.
    """

    subdivisions: int = 3
    inplane: int = 24
    size: int = 40
    colour_size: int = 16
    render_size: int = 96
    supersample: int = 2
    distance_diameters: float = 5.0

    def __post_init__(self):
        if not 0 <= self.subdivisions <= 4:
            raise ValueError(f'subdivisions must be in 0..4, got {self.subdivisions}')
        if (self.inplane < 1 or self.size < 8 or not 4 <= self.colour_size <= self.size
                or self.render_size < 2 * self.size):
            raise ValueError(f'invalid template settings {self}')


@dataclass
class TemplateBank:
    """N templates of one object.

    rotations (N, 3, 3) object-to-camera as rendered (object on the optical axis); masks
    (N, S, S) uint8 0..255 silhouettes of the square around each template's box; colours
    (N, C, C, 3) uint8 0..255 unlit colours in the same square (0 off the object); box_sides (N,)
    the box side over the focal length; centre_offsets (N, 2) the box centre minus the projection
    of the object centre, over the focal length; distance: canonical distance of the object centre,
    metres; object_centre (3,) metres, the model-frame point put on the optical axis.
    """

    rotations: np.ndarray
    masks: np.ndarray
    colours: np.ndarray
    box_sides: np.ndarray
    centre_offsets: np.ndarray
    distance: float
    object_centre: np.ndarray

    def __len__(self) -> int:
        return int(self.rotations.shape[0])


def view_rotations(subdivisions: int, inplane: int) -> np.ndarray:
    """(V * inplane, 3, 3) object-to-camera rotations looking at the object centre from each
    icosphere vertex, each rolled by ``inplane`` angles; grouped by view, rolls innermost."""
    directions = trimesh.creation.icosphere(subdivisions=subdivisions).vertices
    looking = np.stack([_look_at(direction) for direction in directions])
    rolls = roll_rotations(inplane)
    return (rolls[None] @ looking[:, None]).reshape(-1, 3, 3)


def roll_rotations(inplane: int) -> np.ndarray:
    """(inplane, 3, 3) rotations about the camera's z axis by 0, 2 pi / inplane, ..."""
    angles = 2.0 * np.pi * np.arange(inplane) / inplane
    return axis_angle_to_matrix(np.outer(angles, [0.0, 0.0, 1.0]))


def _look_at(direction: np.ndarray) -> np.ndarray:
    """(3, 3) object-to-camera rotation of a camera on unit ``direction`` (object frame) looking
    at the origin; its rows are the camera axes in the object frame."""
    z_axis = -direction / np.linalg.norm(direction)
    # Any up vector not parallel to the view works: all rolls are enumerated anyway.
    up = np.array([0.0, 0.0, 1.0]) if abs(z_axis[2]) < 0.9 else np.array([0.0, 1.0, 0.0])
    x_axis = np.cross(up, z_axis)
    x_axis /= np.linalg.norm(x_axis)
    return np.stack([x_axis, np.cross(z_axis, x_axis), z_axis])


def render_intrinsics(model: ObjectModel, settings: TemplateSettings) -> np.ndarray:
    """(3, 3) intrinsics of the template renders: the bounding sphere around the box centre at the
    canonical distance fills 90 % of the inscribed circle, so that rolls never cut the object."""
    radius = float(np.linalg.norm(model.vertices - model.bbox_centre, axis=1).max())
    distance = settings.distance_diameters * model.diameter
    focal = 0.45 * settings.render_size * np.sqrt(distance ** 2 - radius ** 2) / radius
    centre = (settings.render_size - 1) / 2.0
    return np.array([[focal, 0.0, centre], [0.0, focal, centre], [0.0, 0.0, 1.0]])


def build_bank(model: ObjectModel, settings: TemplateSettings = TemplateSettings()) -> TemplateBank:
    """Render ``model``'s templates (see the module docstring)."""
    K = render_intrinsics(model, settings)
    distance = settings.distance_diameters * model.diameter
    centre = model.bbox_centre
    scene = RaycastScene([model])
    looks = view_rotations(settings.subdivisions, 1)
    rolls = roll_rotations(settings.inplane)
    side = settings.render_size
    masks, colours, sides, offsets = [], [], [], []
    for R in looks:
        pose = np.eye(4)
        pose[:3, :3] = R
        pose[:3, 3] = np.array([0.0, 0.0, distance]) - R @ centre
        view = scene.render(pose[None], K, side, side, settings.supersample)
        for roll in rolls:
            rolled = _rotate_about_principal_point(view.coverage[0], roll[:2, :2], K)
            square, box_side, offset = silhouette_frame(rolled, K)
            mask = crop_image(rolled, square, (settings.size,) * 2)
            colour = crop_image(_rotate_about_principal_point(view.rgb, roll[:2, :2], K), square,
                                (settings.colour_size,) * 2)
            masks.append(_to_uint8(mask))
            colours.append(_to_uint8(colour))
            sides.append(box_side)
            offsets.append(offset)
    return TemplateBank(rotations=(rolls[None] @ looks[:, None]).reshape(-1, 3, 3),
                        masks=np.stack(masks), colours=np.stack(colours),
                        box_sides=np.array(sides),
                        centre_offsets=np.stack(offsets), distance=float(distance),
                        object_centre=centre)


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(255 * np.clip(image, 0.0, 1.0)).astype(np.uint8)


def _rotate_about_principal_point(image: np.ndarray, rotation_2d: np.ndarray,
                                  K: np.ndarray) -> np.ndarray:
    """``image`` (H, W) or (H, W, C) as seen after rolling the camera: pixel offsets from the
    principal point turned by ``rotation_2d`` (2, 2) (equal focal lengths assumed)."""
    principal = K[:2, 2]
    warp = np.concatenate([rotation_2d, (principal - rotation_2d @ principal)[:, None]], axis=1)
    return cv2.warpAffine(image.astype(np.float32), warp, image.shape[1::-1],
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)


def silhouette_frame(mask: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """The :func:`box_frame` of ``mask``'s box; mask (H, W) 0..1. Raises ValueError on an empty
    mask."""
    box = mask_box(mask)
    if box is None:
        raise ValueError('empty mask: nothing to match')
    return box_frame(box, K)


def box_frame(box: np.ndarray, K: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """The square (x, y, w, h) pixels around ``box`` (x, y, w, h), the square's side over the
    focal length, and the box centre minus the principal point over the focal length (2,).
    K (3, 3) of the image, fx = fy assumed."""
    square = square_box_around(box)
    focal = float(K[0, 0])
    centre = box[:2] + 0.5 * box[2:]
    return square, float(square[2]) / focal, (centre - K[:2, 2]) / focal


def occlusion_aware_iou(template_masks: torch.Tensor, observed: torch.Tensor,
                        counted: torch.Tensor) -> torch.Tensor:
    """(N,) IoU of each template mask with the observed mask over the counted pixels only.

    template_masks (N, P) 0..1; observed (P,) 0..1; counted (P,) 0/1, zero where the crop is
    ignored (occluders, outside the image): a template pixel there is neither a hit nor a miss.
    """
    intersection = template_masks @ (observed * counted)
    union = template_masks @ counted + (observed * counted).sum() - intersection
    return intersection / union.clamp_min(1e-6)


def colour_correlation(template_colours: torch.Tensor, template_masks: torch.Tensor,
                       observed_colours: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """(N,) correlation in -1..1 of each template's colours with the observed ones over the pixels
    both cover (weights: template mask times observed mask), channel means removed.

    template_colours (N, P, 3) and observed_colours (P, 3) 0..1; template_masks (N, P) and
    observed (P,) 0..1, the observed mask already zero on ignored pixels.
    """
    weights = template_masks * observed                              # (N, P)
    total = weights.sum(dim=1, keepdim=True).clamp_min(1e-6)         # (N, 1)
    template_mean = (weights[..., None] * template_colours).sum(dim=1) / total
    observed_mean = weights @ observed_colours / total               # (N, 3)
    template_centred = template_colours - template_mean[:, None]
    observed_centred = observed_colours[None] - observed_mean[:, None]
    covariance = (weights[..., None] * template_centred * observed_centred).sum(dim=(1, 2))
    template_var = (weights[..., None] * template_centred ** 2).sum(dim=(1, 2))
    observed_var = (weights[..., None] * observed_centred ** 2).sum(dim=(1, 2))
    return covariance / (template_var * observed_var).sqrt().clamp_min(1e-9)


TRUNCATION_EXTENSIONS = (0.15, 0.3, 0.45, 0.6)
"""Where an object's known extent ends at the image's border, it may go on past it (the amodal
segmenter sees only the image): the template search also tries the extent's box extended past
each such side by these fractions of its longer side, and keeps per template the frame it
matches best (pixels outside the image count neither way). On 200 fresh synthetic tuning scenes
(seed 5000) 47 objects are cut by the border; ADD(-S) recall of those 74 % (35) without, 87 %
(41) with these extensions, all 90.4 % -> 93.4 %; 0.25 / 0.5 / 1.0 gave 92.9 % (the true
extension was at most 0.55, median 0.19)."""

OCCLUSION_EXTENSIONS = (0.1, 0.2, 0.3)
"""The same where the extent ends at ignored pixels inside the image (another object's mask, the
unsure pixels around a hidden part, pixels of unknown content): the object may go on behind them,
and an amodal segmenter's hidden part often stops short of the whole silhouette (thin parts
behind an occluder). Less than past the border, since a known hidden part covers most of what is
hidden. LM-O dev (oracle masks, no hidden parts): ADD(-S) recall 87.9 % -> 90.6 % (13 instances
fixed, 3 lost), 89.1 % with the border's fractions. 200 fresh synthetic scenes (seed 5000, the
segmenter's masks and hidden parts): 93.4 % -> 94.4 % (2 fixed, none lost); 0.1 / 0.2 the same;
0.05 / 0.1 / 0.2: 93.4 %; 0.15 / 0.3 / 0.45 / 0.6: 93.9 %; border and occluded sides extended
together by the border's fractions: 92.4 %."""


def sides_ending_at(extent: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """(4,) bool: whether the box of ``extent`` (S, S) 0..1 (not empty) ends at ``pixels``
    (S, S) bool on its left, top, right and bottom side: whether some pixel of the extent on
    that edge of the box has one of ``pixels`` within 2 px straight past it."""
    inside = extent > 0.5
    rows, cols = np.nonzero(inside)
    last = len(inside) - 1
    sides = []
    for plane, beyond_plane, edge, step in ((inside.T, pixels.T, cols.min(), -1),
                                            (inside, pixels, rows.min(), -1),
                                            (inside.T, pixels.T, cols.max(), 1),
                                            (inside, pixels, rows.max(), 1)):
        beyond = [int(np.clip(edge + step * k, 0, last)) for k in (1, 2)]
        sides.append(bool((plane[edge] & beyond_plane[beyond].any(axis=0)).any()))
    return np.array(sides)


def extended_boxes(crop: Crop) -> list[np.ndarray]:
    """The boxes (x, y, w, h) in crop pixels the template search matches ``crop``'s known extent
    in: its box, that box extended by :data:`TRUNCATION_EXTENSIONS` past the sides where the
    extent ends at the image's border (``crop.outside``), and by :data:`OCCLUSION_EXTENSIONS`
    past the other sides where it ends at ignored pixels. ValueError when the extent is empty."""
    extent = crop.extent
    box = mask_box(extent)
    if box is None:
        raise ValueError('empty mask: nothing to match')
    longer = box[2:].max()
    cut = np.zeros(4, bool) if crop.outside is None else sides_ending_at(extent, crop.outside)
    occluded = sides_ending_at(extent, crop.ignore & ~(extent > 0.5)) & ~cut
    boxes = [box]
    for sides, fractions in ((cut, TRUNCATION_EXTENSIONS), (occluded, OCCLUSION_EXTENSIONS)):
        if sides.any():
            boxes += [extend_box(box, sides, fraction * longer) for fraction in fractions]
    return boxes


def suppress_similar(rotations: np.ndarray, order: np.ndarray, min_angle: float, top_k: int,
                     symmetries: np.ndarray) -> np.ndarray:
    """Indices (<= top_k,) taken from ``order`` (best first), each at least ``min_angle`` radians
    from every one taken before, the angle being the smallest over the object's ``symmetries``
    (S, 4, 4) (identity first). rotations (N, 3, 3)."""
    symmetric = np.asarray(symmetries)[:, :3, :3]
    kept: list[int] = []
    for index in order:
        if kept:
            # R_a S vs R_b: angle between R_b^T R_a S for each symmetry S.
            relative = np.einsum('kji,jl->kil', rotations[kept], rotations[index])
            relative = relative[:, None] @ symmetric[None]
            cos = (np.trace(relative, axis1=-2, axis2=-1) - 1.0) / 2.0
            if np.arccos(np.clip(cos, -1.0, 1.0)).min() < min_angle:
                continue
        kept.append(int(index))
        if len(kept) == top_k:
            break
    return np.array(kept, dtype=np.int64)


def rotation_onto_ray(direction: np.ndarray) -> np.ndarray:
    """(3, 3) the smallest rotation taking the optical axis (0, 0, 1) onto ``direction`` (3,)."""
    direction = direction / np.linalg.norm(direction)
    axis = np.cross([0.0, 0.0, 1.0], direction)
    angle = np.arctan2(np.linalg.norm(axis), direction[2])
    if np.linalg.norm(axis) < 1e-12:
        return np.eye(3)
    return axis_angle_to_matrix(axis / np.linalg.norm(axis) * angle)


def hypothesis_poses(bank: TemplateBank, indices: np.ndarray, observed_side: float | np.ndarray,
                     observed_offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rotations (K, 3, 3) and translations (K, 3) metres of templates ``indices`` (K,) seen at an
    observed box of side ``observed_side`` (scalar or (K,)) and centre ``observed_offset`` ((2,)
    or (K, 2)) from the principal point, both over the focal length."""
    distances = bank.distance * bank.box_sides[indices] / observed_side
    # The template's box centre sits off the object centre by an offset that scales with 1/z.
    scale = bank.distance / distances
    centre_xy = np.broadcast_to(observed_offset, (len(indices), 2)) \
        - bank.centre_offsets[indices] * scale[:, None]
    rays = np.concatenate([centre_xy, np.ones((len(indices), 1))], axis=1)
    rays /= np.linalg.norm(rays, axis=1, keepdims=True)
    centres = rays * distances[:, None]
    rotations = np.stack([rotation_onto_ray(ray) @ bank.rotations[i]
                          for ray, i in zip(rays, indices)])
    translations = centres - rotations @ bank.object_centre
    return rotations, translations


def settings_key(model: ObjectModel, settings: TemplateSettings) -> str:
    """Hex digest identifying ``model``'s geometry and colours together with ``settings``."""
    digest = hashlib.sha256()
    for array in (model.vertices, model.faces, model.vertex_colors):
        array = np.ascontiguousarray(array)
        digest.update(str((array.dtype.str, array.shape)).encode())
        digest.update(array.tobytes())
    digest.update(json.dumps({**asdict(settings), 'format': BANK_FORMAT_VERSION},
                             sort_keys=True).encode())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    return Path.home() / '.cache' / 'pose_node' / 'templates'


def save_bank(bank: TemplateBank, path: Path) -> None:
    """Write ``bank`` to ``path`` (.npz, no pickled objects), atomically: processes that build
    the same bank at once (two nodes, two evaluations on a fresh cache) each write their own
    temporary file, and the last to finish replaces the others' identical result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=path.name + '.',
                                       suffix='.partial.npz')
    try:
        with os.fdopen(handle, 'wb') as file:
            np.savez(file, rotations=bank.rotations, masks=bank.masks, colours=bank.colours,
                     box_sides=bank.box_sides, centre_offsets=bank.centre_offsets,
                     distance=np.array(bank.distance), object_centre=bank.object_centre)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def load_bank(path: Path) -> TemplateBank:
    """Read a bank written by :func:`save_bank`; raises ValueError when the file is unreadable
    or inconsistent."""
    try:
        with np.load(path, allow_pickle=False) as data:
            bank = TemplateBank(rotations=data['rotations'], masks=data['masks'],
                                colours=data['colours'], box_sides=data['box_sides'],
                                centre_offsets=data['centre_offsets'],
                                distance=float(data['distance']),
                                object_centre=data['object_centre'])
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as error:
        raise ValueError(f'{path}: unreadable template bank ({error})') from error
    n = len(bank.rotations)
    if (bank.rotations.shape[1:] != (3, 3) or len(bank.masks) != n or len(bank.colours) != n
            or len(bank.box_sides) != n
            or bank.centre_offsets.shape != (n, 2) or bank.object_centre.shape != (3,)):
        raise ValueError(f'{path}: inconsistent template bank')
    return bank


def cached_bank(model: ObjectModel, settings: TemplateSettings = TemplateSettings(),
                cache_dir: Path | None = None) -> TemplateBank:
    """``model``'s bank from the cache, built and stored there when missing or corrupt. Files
    are named by the key alone: the same mesh under another object name shares its bank."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f'{settings_key(model, settings)[:24]}.npz'
    if path.is_file():
        try:
            return load_bank(path)
        except ValueError as error:
            warnings.warn(f'{error}; rebuilding it', stacklevel=2)
    bank = build_bank(model, settings)
    save_bank(bank, path)
    return bank


class TemplateMatcher:
    """:class:`~pose_node.coarse.CoarseEstimator` by template matching (see the module docstring).

    settings: those the bank was built with; device: where templates live and are compared;
    min_separation: radians between returned rotations (the object's symmetries considered);
    rerank: how many of the best by IoU are re-scored with colour; colour_weight: weight of the
    colour correlation added to the IoU (0: silhouette only, for untextured meshes).
    """

    def __init__(self, bank: TemplateBank, symmetries: np.ndarray, settings: TemplateSettings,
                 device: torch.device, min_separation: float = np.deg2rad(25.0),
                 rerank: int = 4096, colour_weight: float = 0.0):
        self.bank = bank
        self.symmetries = np.asarray(symmetries, np.float64)
        self.settings = settings
        self.device = device
        self.min_separation = min_separation
        self.rerank = rerank
        self.colour_weight = colour_weight
        self._masks = torch.as_tensor(bank.masks.reshape(len(bank), -1), device=device,
                                      dtype=torch.float32) / 255.0
        self._colours = torch.as_tensor(bank.colours.reshape(len(bank), -1, 3), device=device)
        self._colour_masks = torch.as_tensor(
            bank.colours.max(axis=-1).reshape(len(bank), -1) > 0, device=device,
            dtype=torch.float32)

    @classmethod
    def from_model(cls, model: ObjectModel, cache_dir: Path | None = None,
                   settings: TemplateSettings = TemplateSettings(),
                   device: torch.device = torch.device('cpu'), **options) -> TemplateMatcher:
        """The matcher of ``model`` with its bank from ``cache_dir`` (default
        ``~/.cache/pose_node/templates``), built there when needed; ``options`` as for the
        constructor."""
        return cls(cached_bank(model, settings, cache_dir), model.symmetries, settings, device,
                   **options)

    def scores(self, crop: Crop) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N,) matching scores of every template with ``crop`` (occlusion-aware IoU, plus the
        weighted colour correlation for the ``rerank`` best; -inf for those not re-ranked when
        colour is used), and per template the observed box side (N,) and centre offset (N, 2)
        over the focal length (see :func:`box_frame`) of the frame it was matched in: the box of
        the crop's known extent (its visible mask and the hidden part where known, so that an
        occluded object is matched at its whole size), or the best of it and its extensions where
        it ends at the image's border or at ignored pixels (:func:`extended_boxes`)."""
        frames = [box_frame(frame_box, crop.K) for frame_box in extended_boxes(crop)]
        per_frame = np.stack([self.frame_scores(crop, square) for square, _, _ in frames])
        best = per_frame.argmax(axis=0)
        sides = np.array([side for _, side, _ in frames])
        offsets = np.stack([offset for _, _, offset in frames])
        return per_frame.max(axis=0), sides[best], offsets[best]

    def frame_scores(self, crop: Crop, square: np.ndarray) -> np.ndarray:
        """(N,) matching scores (see :meth:`scores`) of every template with ``crop`` resampled
        from ``square`` (x, y, w, h) in crop pixels."""
        size, colour_size = (self.settings.size,) * 2, (self.settings.colour_size,) * 2
        observed = torch.as_tensor(crop_image(crop.mask, square, size).reshape(-1),
                                   device=self.device)
        ignored = crop_image(crop.ignore.astype(np.float32), square, size, border_value=1.0) > 0.5
        counted = torch.as_tensor(~ignored.reshape(-1), device=self.device, dtype=torch.float32)
        iou = occlusion_aware_iou(self._masks, observed, counted)
        if self.colour_weight <= 0:
            return iou.cpu().numpy()
        best = torch.topk(iou, min(self.rerank, len(iou))).indices
        visible = crop_image(crop.mask * ~crop.ignore, square, colour_size).reshape(-1)
        colours = crop_image(crop.image, square, colour_size).reshape(-1, 3)
        correlation = colour_correlation(
            self._colours[best].float() / 255.0, self._colour_masks[best],
            torch.as_tensor(colours, device=self.device),
            torch.as_tensor((visible > 0.5).astype(np.float32), device=self.device))
        scores = torch.full_like(iou, -np.inf)
        scores[best] = iou[best] + self.colour_weight * correlation
        return scores.cpu().numpy()

    def hypotheses(self, crop: Crop, top_k: int) -> Hypotheses:
        """At most ``top_k`` diverse hypotheses, best first; none when the crop's mask is empty."""
        if mask_box(crop.mask) is None:
            return Hypotheses(R=np.zeros((0, 3, 3)), t=np.zeros((0, 3)), scores=np.zeros(0),
                              source=SOURCE)
        scores, sides, offsets = self.scores(crop)
        order = np.argsort(-scores, kind='stable')
        order = order[np.isfinite(scores[order])]
        chosen = suppress_similar(self.bank.rotations, order, self.min_separation, top_k,
                                  self.symmetries)
        R, t = hypothesis_poses(self.bank, chosen, sides[chosen], offsets[chosen])
        return Hypotheses(R=R, t=t, scores=scores[chosen], source=SOURCE)

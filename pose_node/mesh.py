"""Object models: loading PLY/OBJ meshes, units, colours, diameter, symmetries, sampling.

Units: vertices and translations in METRES in the model frame; colours as floats in 0..1.
Mesh files may be in other units (BOP meshes are in millimetres): `unit_scale` converts at load.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import trimesh
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import cdist
from scipy.spatial.transform import Rotation

DEFAULT_GREY = 0.6
"""Colour (0..1, all channels) given to meshes whose file carries no colour."""

BOP_MAX_SYM_DISC_STEP = 0.01
"""BOP evaluation's discretisation of continuous symmetries (fraction of the diameter)."""

DIAMETER_TOLERANCE = 0.05
"""Relative disagreement allowed between a models_info diameter and the mesh's own."""


class MeshLoadError(ValueError):
    """A mesh file could not be turned into an ObjectModel; the message names the file."""


@dataclass(frozen=True, eq=False)
class ObjectModel:
    """A rigid object's mesh in its model frame.

    vertices: (V, 3) float32, metres. faces: (F, 3) int64 vertex indices.
    vertex_colors: (V, 3) float32 in 0..1 (uniform grey when `has_colors` is False).
    diameter: metres, the largest distance between two vertices.
    symmetries: (S, 4, 4) float64 model-frame transforms that leave the object's appearance
    unchanged, identity first, translations in metres.
    """

    name: str
    vertices: np.ndarray
    faces: np.ndarray
    vertex_colors: np.ndarray
    has_colors: bool
    diameter: float
    symmetries: np.ndarray
    source_path: Path | None = None

    @property
    def bbox_min(self) -> np.ndarray:
        """(3,) float64, metres: the smallest x, y, z over the vertices."""
        return self.vertices.min(axis=0).astype(np.float64)

    @property
    def bbox_max(self) -> np.ndarray:
        """(3,) float64, metres: the largest x, y, z over the vertices."""
        return self.vertices.max(axis=0).astype(np.float64)

    @property
    def bbox_size(self) -> np.ndarray:
        """(3,) float64, metres: side lengths of the axis-aligned bounding box."""
        return self.bbox_max - self.bbox_min

    @property
    def extents(self) -> np.ndarray:
        """(3,) float64, metres: `bbox_size` under trimesh's name for it."""
        return self.bbox_size

    @property
    def is_symmetric(self) -> bool:
        """True when any symmetry besides the identity is known."""
        return len(self.symmetries) > 1

    def face_areas(self) -> np.ndarray:
        """(F,) float64, square metres."""
        corners = self.vertices[self.faces].astype(np.float64)
        cross = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
        return 0.5 * np.linalg.norm(cross, axis=1)

    def sample_points(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """(n, 3) float64 points drawn uniformly (by area) from the surface, metres."""
        areas = self.face_areas()
        face_index = rng.choice(len(areas), size=n, p=areas / areas.sum())
        r1, r2 = rng.random(n), rng.random(n)
        sqrt_r1 = np.sqrt(r1)
        weights = np.stack([1.0 - sqrt_r1, sqrt_r1 * (1.0 - r2), sqrt_r1 * r2], axis=1)
        corners = self.vertices[self.faces[face_index]].astype(np.float64)
        return np.einsum('nk,nkd->nd', weights, corners)

    def decimated(self, max_faces: int) -> ObjectModel:
        """A copy with at most `max_faces` faces, for rendering; colours carried over.

        Diameter and symmetries stay those of the full model (they describe the object).
        """
        if len(self.faces) <= max_faces:
            return self
        vertices, faces, colors = decimate_by_clustering(
            self.vertices, self.faces, self.vertex_colors, max_faces)
        return replace(self, vertices=vertices, faces=faces, vertex_colors=colors)

    def to_trimesh(self) -> trimesh.Trimesh:
        """The model as a trimesh (metres, RGBA uchar vertex colours), vertex order kept."""
        rgba = np.concatenate([self.vertex_colors, np.ones((len(self.vertices), 1))], axis=1)
        return trimesh.Trimesh(self.vertices, self.faces,
                               vertex_colors=np.round(rgba * 255).astype(np.uint8), process=False)


# --------------------------------------------------------------------------- loading

def load_object_model(path: str | Path, name: str | None = None, unit_scale: float = 1.0,
                      models_info: dict | None = None,
                      continuous_symmetry_steps: int | None = None) -> ObjectModel:
    """Load a PLY or OBJ mesh as an ObjectModel.

    unit_scale: multiplier from file units to metres (0.001 for BOP meshes in millimetres).
    models_info: this object's BOP models_info entry (file units); gives the diameter and the
    symmetries. continuous_symmetry_steps: rotations per continuous symmetry axis; None uses
    BOP's evaluation rule (`BOP_MAX_SYM_DISC_STEP`).
    Vertex colours come from the file's vertex or face colours, or are baked from its texture
    at the vertex UVs. Raises MeshLoadError naming the file when it cannot give a usable mesh.
    """
    path = Path(path)
    if not path.is_file():
        raise MeshLoadError(f'{path}: mesh file not found')
    try:
        loaded = trimesh.load(path, process=False)
    except Exception as error:  # trimesh raises many types for corrupt files
        raise MeshLoadError(f'{path}: cannot read mesh ({type(error).__name__}: {error})') \
            from error
    vertices, faces, colors = _mesh_arrays(loaded, path)
    vertices = vertices * unit_scale
    diameter = points_diameter(vertices)
    if models_info is not None:
        diameter = _checked_info_diameter(models_info, unit_scale, diameter, path)
        symmetries = symmetries_from_models_info(
            models_info, unit_scale, continuous_steps=continuous_symmetry_steps)
    else:
        symmetries = np.eye(4)[None]
    return ObjectModel(
        name=name if name is not None else path.stem,
        vertices=vertices.astype(np.float32),
        faces=faces,
        vertex_colors=(colors if colors is not None
                       else np.full(vertices.shape, DEFAULT_GREY)).astype(np.float32),
        has_colors=colors is not None,
        diameter=float(diameter),
        symmetries=symmetries,
        source_path=path,
    )


def load_models_info(path: str | Path) -> dict[int, dict]:
    """Read a BOP models_info.json: object id -> entry (file units, usually millimetres)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'{path}: models_info.json not found')
    with path.open() as file:
        return {int(obj_id): entry for obj_id, entry in json.load(file).items()}


def _mesh_arrays(loaded, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Vertices (V, 3) float64, faces (F, 3) int64, colours (V, 3) or None from a trimesh load."""
    if isinstance(loaded, trimesh.Scene):
        if len(loaded.geometry) == 0:
            raise MeshLoadError(f'{path}: the file holds a scene with no geometry')
        meshes = [g for g in loaded.dump() if isinstance(g, trimesh.Trimesh)]
        if not meshes:
            raise MeshLoadError(f'{path}: the scene holds no triangle mesh')
    elif isinstance(loaded, trimesh.Trimesh):
        meshes = [loaded]
    else:
        raise MeshLoadError(f'{path}: has no faces (loaded as {type(loaded).__name__})')

    vertices = np.concatenate([np.asarray(m.vertices, np.float64) for m in meshes])
    offsets = np.cumsum([0] + [len(m.vertices) for m in meshes[:-1]])
    faces = np.concatenate([np.asarray(m.faces, np.int64) + o for m, o in zip(meshes, offsets)])
    if len(faces) == 0:
        raise MeshLoadError(f'{path}: mesh has zero faces')
    if not np.isfinite(vertices).all():
        raise MeshLoadError(f'{path}: mesh has non-finite vertex coordinates')
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise MeshLoadError(f'{path}: face indices out of range')

    per_mesh = [_vertex_colors(m) for m in meshes]
    if all(c is None for c in per_mesh):
        return vertices, faces, None
    colors = np.concatenate([c if c is not None else np.full((len(m.vertices), 3), DEFAULT_GREY)
                             for c, m in zip(per_mesh, meshes)])
    return vertices, faces, colors


def _vertex_colors(mesh: trimesh.Trimesh) -> np.ndarray | None:
    """(V, 3) float64 colours in 0..1 from vertex/face colours or a texture; None if absent."""
    visual = mesh.visual
    if isinstance(visual, trimesh.visual.TextureVisuals):
        material = visual.material
        if hasattr(material, 'baseColorTexture'):
            material = material.to_simple()
        image = getattr(material, 'image', None)
        if image is None or visual.uv is None:
            return None
        return sample_texture(np.asarray(image.convert('RGB')), np.asarray(visual.uv))
    if visual.kind in ('vertex', 'face'):
        return np.asarray(visual.vertex_colors, np.float64)[:, :3] / 255.0
    return None


def sample_texture(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """Bilinearly sample an (H, W, 3) uint8 texture at (V, 2) UVs -> (V, 3) float64 in 0..1.

    UV origin is the image's bottom-left corner (v points up), as in OBJ/glTF-via-trimesh.
    UVs in [0, 1] clamp to the edge pixels; UVs outside wrap around (repeat).
    """
    height, width = image.shape[:2]
    uv = np.where((uv < 0.0) | (uv > 1.0), uv % 1.0, uv)
    x = np.clip(uv[:, 0] * width - 0.5, 0.0, width - 1.0)
    y = np.clip((1.0 - uv[:, 1]) * height - 0.5, 0.0, height - 1.0)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, width - 1), np.minimum(y0 + 1, height - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    texels = image.astype(np.float64) / 255.0
    top = texels[y0, x0] * (1.0 - fx) + texels[y0, x1] * fx
    bottom = texels[y1, x0] * (1.0 - fx) + texels[y1, x1] * fx
    return top * (1.0 - fy) + bottom * fy


def _checked_info_diameter(info: dict, unit_scale: float, mesh_diameter: float,
                           path: Path) -> float:
    """The models_info diameter in metres, after checking it agrees with the mesh's own."""
    info_diameter = float(info['diameter']) * unit_scale
    if abs(info_diameter - mesh_diameter) > DIAMETER_TOLERANCE * mesh_diameter:
        raise MeshLoadError(
            f'{path}: models_info diameter {info_diameter:.6g} m disagrees with the mesh '
            f'diameter {mesh_diameter:.6g} m (wrong unit_scale or models_info entry?)')
    return info_diameter


# --------------------------------------------------------------------------- geometry

def points_diameter(points: np.ndarray) -> float:
    """The largest distance between two of the (N, 3) points (exact, via the convex hull)."""
    try:
        candidates = points[ConvexHull(points).vertices]
    except (QhullError, ValueError):  # flat or tiny point sets have no 3D hull
        candidates = points
    largest = 0.0
    for start in range(0, len(candidates), 2048):  # bounded memory for big flat sets
        largest = max(largest, float(cdist(candidates[start:start + 2048], candidates).max()))
    return largest


def symmetries_from_models_info(info: dict, unit_scale: float = 1.0,
                                continuous_steps: int | None = None,
                                max_sym_disc_step: float = BOP_MAX_SYM_DISC_STEP) -> np.ndarray:
    """(S, 4, 4) float64 symmetry transforms of one BOP models_info entry, identity first.

    Discrete symmetries are row-major 4x4 lists with translations in file units; continuous
    ones ({axis, offset}) become `continuous_steps` rotations about the axis through the offset
    (by default as many as BOP evaluation uses: ceil(pi / max_sym_disc_step)). Every discrete
    symmetry (identity included) is composed with every continuous rotation, as the BOP toolkit
    does. Translations are returned in metres (file units times unit_scale).
    """
    discrete = [np.eye(4)]
    for flat in info.get('symmetries_discrete', []):
        transform = np.asarray(flat, np.float64).reshape(4, 4).copy()
        transform[:3, 3] *= unit_scale
        discrete.append(transform)

    continuous = info.get('symmetries_continuous', [])
    if not continuous:
        return np.stack(discrete)
    steps = continuous_steps if continuous_steps is not None \
        else int(np.ceil(np.pi / max_sym_disc_step))
    rotations = []
    for sym in continuous:
        axis = np.asarray(sym['axis'], np.float64)
        offset = np.asarray(sym['offset'], np.float64) * unit_scale
        for angle in 2.0 * np.pi * np.arange(steps) / steps:
            rotations.append(rotation_about_line(axis, offset, angle))
    return np.stack([rotation @ transform for transform in discrete for rotation in rotations])


def rotation_about_line(axis: np.ndarray, point: np.ndarray, angle: float) -> np.ndarray:
    """(4, 4) rotation by `angle` (rad) about the line through `point` along `axis` (3,)."""
    transform = np.eye(4)
    rotation = Rotation.from_rotvec(angle * axis / np.linalg.norm(axis)).as_matrix()
    transform[:3, :3] = rotation
    transform[:3, 3] = point - rotation @ point
    return transform


# --------------------------------------------------------------------------- decimation

def decimate_by_clustering(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray,
                           max_faces: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertex-clustering decimation to at most `max_faces` faces.

    vertices (V, 3), faces (F, 3), colors (V, 3) -> the same for the decimated mesh
    (float32, int64, float32). Vertices are merged per cubic grid cell; the cell size is the
    smallest (found by bisection) that meets `max_faces`. Each cell's vertex sits where the
    summed plane quadrics of its faces are smallest (Lindstrom 2000), so flat sides, edges and
    the bounding box survive; its colour is the members' mean.
    """
    points = vertices.astype(np.float64)
    low, high = _bracketing_cell_sizes(points, faces, max_faces)
    for _ in range(30):
        middle = np.sqrt(low * high)
        if len(_clustered_faces(_cell_labels(points, middle)[0], faces)) <= max_faces:
            high = middle
        else:
            low = middle
    labels, cells = _cell_labels(points, high)
    new_faces = _clustered_faces(labels, faces)
    counts = np.bincount(labels)[:, None]
    mean_points = np.zeros((len(counts), 3))
    np.add.at(mean_points, labels, points)
    mean_points /= counts
    new_colors = np.zeros((len(counts), 3))
    np.add.at(new_colors, labels, colors.astype(np.float64))
    new_colors /= counts
    new_points = _quadric_cell_points(points, faces, labels, mean_points)
    cell_origin = points.min(axis=0) + cells * high
    new_points = np.clip(new_points, cell_origin, cell_origin + high)
    used, new_faces = np.unique(new_faces, return_inverse=True)
    return (new_points[used].astype(np.float32), new_faces.reshape(-1, 3).astype(np.int64),
            new_colors[used].astype(np.float32))


def _bracketing_cell_sizes(points: np.ndarray, faces: np.ndarray,
                           max_faces: int) -> tuple[float, float]:
    """Cell sizes (metres) giving more than / at most `max_faces` faces."""
    high = float(np.ptp(points, axis=0).max())
    while len(_clustered_faces(_cell_labels(points, high)[0], faces)) > max_faces:
        high *= 2.0  # only when max_faces is tiny
    return high * 1e-6, high


def _cell_labels(points: np.ndarray, cell_size: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-point cluster label (V,) and each cluster's integer grid cell (C, 3)."""
    grid = np.floor((points - points.min(axis=0)) / cell_size).astype(np.int64)
    cells, labels = np.unique(grid, axis=0, return_inverse=True)
    return labels.reshape(-1), cells


def _clustered_faces(labels: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F', 3) faces over cluster labels, without collapsed or repeated triangles."""
    merged = labels[faces]
    keep = ((merged[:, 0] != merged[:, 1]) & (merged[:, 1] != merged[:, 2])
            & (merged[:, 0] != merged[:, 2]))
    merged = merged[keep]
    _, first = np.unique(np.sort(merged, axis=1), axis=0, return_index=True)
    return merged[np.sort(first)]


def _quadric_cell_points(points: np.ndarray, faces: np.ndarray, labels: np.ndarray,
                         mean_points: np.ndarray) -> np.ndarray:
    """(C, 3) per-cluster points minimising the area-weighted squared distances to the
    planes of the cluster's faces, pulled weakly towards the cluster mean where that is
    under-determined (flat or straight regions)."""
    corners = points[faces]
    cross = np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])
    double_area = np.linalg.norm(cross, axis=1)
    valid = double_area > 0
    normals = cross[valid] / double_area[valid, None]
    weights = 0.5 * double_area[valid]
    offsets = -np.einsum('fd,fd->f', normals, corners[valid, 0])
    face_a = weights[:, None, None] * normals[:, :, None] * normals[:, None, :]
    face_b = -(weights * offsets)[:, None] * normals

    clusters = len(mean_points)
    a = np.zeros((clusters, 3, 3))
    b = np.zeros((clusters, 3))
    for corner in range(3):
        corner_labels = labels[faces[valid, corner]]
        np.add.at(a, corner_labels, face_a)
        np.add.at(b, corner_labels, face_b)
    regulariser = 1e-3 * np.trace(a, axis1=1, axis2=2) / 3.0 + 1e-12
    a += regulariser[:, None, None] * np.eye(3)
    b += regulariser[:, None] * mean_points
    return np.linalg.solve(a, b[:, :, None])[:, :, 0]

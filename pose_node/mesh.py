"""Object models: loading PLY/OBJ meshes, units, colours, diameter, symmetries, sampling,
decimation for rendering (manifold-preserving vertex clustering).

Units: vertices and translations in METRES in the model frame; colours as floats in 0..1.
Mesh files may be in other units (BOP meshes are in millimetres): `unit_scale` converts at load.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import trimesh
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
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
    def bbox_centre(self) -> np.ndarray:
        """(3,) float64, metres: centre of the axis-aligned bounding box."""
        return 0.5 * (self.bbox_min + self.bbox_max)

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

        Parts stay apart and no new edge gets more than two faces (see `decimate_by_clustering`).
        Diameter and symmetries stay those of the full model (they describe the object).
        Raises ValueError when `max_faces` is too small to keep every part closed.
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

COARSE_FACE_FRACTION = 0.5
"""Error-driven refinement starts from the uniform grid that gives (before repairs) this
fraction of the faces it aims at."""

FACES_PER_SPLIT_ROUND = 4
"""Each refinement round splits one worst cluster per this many faces still missing (a split
adds about two faces, so rounds close about half the gap)."""

COLOR_ERROR_WEIGHT = 0.02
"""Geometric error (fraction of the bounding-box diagonal) that counts as much as a colour
standard deviation of 1 when choosing clusters to split."""

FACE_BUDGET_SLACK = 0.05
"""The searches stop once the face count is within this fraction below the budget."""

SEARCH_STEPS = 64
"""Face counts tried at most in the search for the coarse grid's cell size."""

BUDGET_TRIES = 8
"""Refinement runs tried at most while adjusting their face target to the budget."""

DEGENERATE_AREA_FRACTION = 1e-4
"""A decimated face with less area than this fraction of its longest side squared counts as
degenerate (its clusters are split); 1e-4 keeps it clear of float32 rounding."""


@dataclass(frozen=True)
class _Sums:
    """Sums over the members of each of N groups (vertices or clusters).

    members: (N,) how many. points: (N, 3) metres. quadric_a: (N, 3, 3), quadric_b: (N, 3),
    quadric_c: (N,), the area-weighted plane quadrics of the members' faces (metres^2,
    metres^3, metres^4; see `_vertex_quadrics`). colors, colors_squared: (N, 3).
    """

    members: np.ndarray
    points: np.ndarray
    quadric_a: np.ndarray
    quadric_b: np.ndarray
    quadric_c: np.ndarray
    colors: np.ndarray
    colors_squared: np.ndarray

    def stacked(self) -> np.ndarray:
        """(N, 23) the sums side by side, for summing them over groups at once."""
        return np.concatenate([self.members[:, None], self.points,
                               self.quadric_a.reshape(-1, 9), self.quadric_b,
                               self.quadric_c[:, None], self.colors, self.colors_squared],
                              axis=1)

    @staticmethod
    def from_stacked(stacked: np.ndarray) -> _Sums:
        return _Sums(members=stacked[:, 0], points=stacked[:, 1:4],
                     quadric_a=stacked[:, 4:13].reshape(-1, 3, 3), quadric_b=stacked[:, 13:16],
                     quadric_c=stacked[:, 16], colors=stacked[:, 17:20],
                     colors_squared=stacked[:, 20:23])


@dataclass(frozen=True)
class _ClusteringInput:
    """The full mesh with what every clustering of it needs, computed once.

    points: (V, 3) float64, metres. faces: (F, 3) int64.
    links: (L, 2) vertex pairs that may merge: the undirected edges and vertices at the same
    position (seams of split vertices). flawed_edges: (K, 2) its edges not shared by exactly
    one face each way (borders, non-manifold or inconsistently oriented edges) and
    flaw_kinds: (K,) what is wrong with each (see `_flawed_edges`); clustering may keep such a
    flaw, not make a new one. components: (V,) connected component (through links) of each
    vertex. vertex_sums: (V, 23) each vertex's own `_Sums`, stacked.
    color_scale: metres of error that a colour standard deviation of 1 counts as.
    """

    points: np.ndarray
    faces: np.ndarray
    links: np.ndarray
    flawed_edges: np.ndarray
    flaw_kinds: np.ndarray
    components: np.ndarray
    vertex_sums: np.ndarray
    color_scale: float


@dataclass(frozen=True)
class _Cells:
    """Boxes that partition the vertices: ids (V,) each vertex's box; low, high (N, 3) metres,
    the boxes' corners."""

    ids: np.ndarray
    low: np.ndarray
    high: np.ndarray


@dataclass(frozen=True)
class _Clustering:
    """Vertices merged into C clusters, each connected through links inside one cell.

    labels: (V,) cluster of each vertex. cells: (C,) the cell of each cluster. faces: (F', 3)
    the surviving triangles over cluster labels. points: (C, 3) metres, each cluster's new
    position. sums: the clusters' `_Sums`. member_low, member_high: (C, 3) metres, the
    bounding box of each cluster's members.
    """

    labels: np.ndarray
    cells: np.ndarray
    faces: np.ndarray
    points: np.ndarray
    sums: _Sums
    member_low: np.ndarray
    member_high: np.ndarray

    @property
    def count(self) -> int:
        return len(self.points)


def decimate_by_clustering(vertices: np.ndarray, faces: np.ndarray, colors: np.ndarray,
                           max_faces: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Vertex-clustering decimation to at most `max_faces` faces that keeps the mesh manifold.

    vertices (V, 3), faces (F, 3), colors (V, 3) -> the same for the decimated mesh
    (float32, int64, float32). Vertices are merged per cell, but only those joined by mesh
    edges inside the cell (or sitting at one point, as split vertices along texture seams do):
    separate parts and the two sides of a thin wall stay apart, so each connected component is
    decimated on its own. Cells start as a coarse cubic grid; the clusters with the largest
    error (distance to their faces' planes, colour spread) are split in two (across the middle
    of their longest side) until the face budget is used, so flat and plain regions get fewer
    faces than curved or detailed ones. Where merging leaves an edge not shared by exactly one
    face each way (non-manifold, a hole or a fold), a degenerate face or a vanished component,
    the clusters involved are split too, until none is left; flaws of the input itself may
    stay. Each cluster's vertex sits where the summed plane quadrics of its faces are smallest
    (Lindstrom 2000), inside its cell, so flat sides, edges and the bounding box survive; its
    colour is the members' mean.
    Raises ValueError when `max_faces` is too small for a manifold result this way (measured:
    200 faces are enough for the demo object and every LM-O object, 100 are not for some).
    """
    if len(faces) <= max_faces:
        return vertices.astype(np.float32), faces.astype(np.int64), colors.astype(np.float32)
    mesh = _clustering_input(vertices.astype(np.float64), faces.astype(np.int64),
                             colors.astype(np.float64))
    clustering = _clustering_within_budget(mesh, max_faces)
    new_colors = clustering.sums.colors / clustering.sums.members[:, None]
    used, new_faces = np.unique(clustering.faces, return_inverse=True)
    return (clustering.points[used].astype(np.float32),
            new_faces.reshape(-1, 3).astype(np.int64), new_colors[used].astype(np.float32))


def _finest_cell_size(face_count: Callable[[float], int], start: float,
                      max_faces: int) -> float:
    """The smallest cell size (metres) found whose `face_count(size)` is at most `max_faces`,
    stopping early once the count is within `FACE_BUDGET_SLACK` below it. Searched from
    `start` by assuming the count goes with 1 / size**2, kept inside the bracket found so far
    (else halving, doubling or bisecting it), for at most `SEARCH_STEPS` counts."""
    target = max((1.0 - 0.5 * FACE_BUDGET_SLACK) * max_faces, 1.0)
    too_fine, feasible = 0.0, np.inf
    size = start
    for _ in range(SEARCH_STEPS):
        count = face_count(size)
        if count <= max_faces:
            feasible = size
            if count >= (1.0 - FACE_BUDGET_SLACK) * max_faces:
                break
        else:
            too_fine = size
        if too_fine * (1.0 + 1e-3) >= feasible:
            break
        size_for_target = size * np.sqrt(max(count, 1) / target)
        if too_fine < size_for_target < feasible:
            size = size_for_target
        elif too_fine > 0.0 and feasible < np.inf:
            size = np.sqrt(too_fine * feasible)
        else:
            size = size / 2.0 if count <= max_faces else size * 2.0
    return feasible


def _clustering_within_budget(mesh: _ClusteringInput, max_faces: int) -> _Clustering:
    """The repaired, error-refined clustering with the most faces up to `max_faces` among a few
    runs, each aiming its refinement lower or higher by what the repairs of the last one
    added (down to half the last aim at a time)."""
    area = 0.5 * np.linalg.norm(_face_normals(mesh.points, mesh.faces), axis=1).sum()
    coarse_size = np.sqrt(area / max_faces)
    best = None
    target = max_faces
    for _ in range(BUDGET_TRIES):
        coarse_faces = int(COARSE_FACE_FRACTION * target)
        coarse_size = _finest_cell_size(lambda size: len(_unrepaired_faces(mesh, size)),
                                        coarse_size, coarse_faces)
        coarse = _grid_cells(mesh.points, coarse_size)
        clustering = _manifold_clustering(mesh, _refined_cells(mesh, coarse, target))
        count = len(clustering.faces)
        if count <= max_faces:
            if best is None or count > len(best.faces):
                best = clustering
            if count >= (1.0 - FACE_BUDGET_SLACK) * max_faces:
                break
        goal = int((1.0 - 0.5 * FACE_BUDGET_SLACK) * max_faces)
        target = max(target + goal - count, target // 2)
    if best is None:
        raise ValueError(f'cannot decimate to {max_faces} faces and keep the mesh manifold '
                         f'(too few faces for its parts)')
    return best


def _clustering_input(points: np.ndarray, faces: np.ndarray,
                      colors: np.ndarray) -> _ClusteringInput:
    """Links, flaws, components and per-vertex sums of the (V, 3) points' (F, 3) faces and
    (V, 3) colours."""
    edge_keys = np.unique(_edge_keys(_face_edges(faces), len(points)))
    edges = np.stack([edge_keys // len(points), edge_keys % len(points)], axis=1)
    links = np.concatenate([edges, _same_position_pairs(points)])
    graph = coo_matrix((np.ones(len(links)), (links[:, 0], links[:, 1])),
                       shape=(len(points), len(points)))
    _, components = connected_components(graph, directed=False)
    quadric_a, quadric_b, quadric_c = _vertex_quadrics(points, faces)
    vertex_sums = _Sums(members=np.ones(len(points)), points=points, quadric_a=quadric_a,
                        quadric_b=quadric_b, quadric_c=quadric_c, colors=colors,
                        colors_squared=colors ** 2)
    flawed_edges, flaw_kinds = _flawed_edges(faces, len(points))
    return _ClusteringInput(
        points=points, faces=faces, links=links, flawed_edges=flawed_edges,
        flaw_kinds=flaw_kinds, components=components, vertex_sums=vertex_sums.stacked(),
        color_scale=COLOR_ERROR_WEIGHT * float(np.linalg.norm(np.ptp(points, axis=0))))


def _same_position_pairs(points: np.ndarray) -> np.ndarray:
    """(P, 2) pairs of vertices at exactly the same position, each with the first of its
    position (in lexicographic order)."""
    order = np.lexsort(points.T[::-1])
    ordered = points[order]
    new_position = np.concatenate([[True], (ordered[1:] != ordered[:-1]).any(axis=1)])
    first = order[np.flatnonzero(new_position)][np.cumsum(new_position) - 1]
    repeated = ~new_position
    return np.stack([order[repeated], first[repeated]], axis=1)


def _face_edges(faces: np.ndarray) -> np.ndarray:
    """(3F, 2) directed edges of the (F, 3) faces, face by face."""
    return faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)


def _edge_keys(edges: np.ndarray, vertex_count: int) -> np.ndarray:
    """(E,) one int64 per undirected (E, 2) edge, equal for (a, b) and (b, a)."""
    return edges.min(axis=1) * vertex_count + edges.max(axis=1)


def _flawed_edges(faces: np.ndarray, vertex_count: int) -> tuple[np.ndarray, np.ndarray]:
    """(K, 2) undirected edges of the (F, 3) faces not shared by exactly two faces that run
    along them in opposite directions, and (K,) int64 kinds of flaw: 0 a border (one face),
    1 non-manifold (more than two faces), 2 a fold (two faces running the same way)."""
    directed = _face_edges(faces)
    keys, inverse, counts = np.unique(_edge_keys(directed, vertex_count),
                                      return_inverse=True, return_counts=True)
    forward = np.where(directed[:, 0] < directed[:, 1], 1.0, -1.0)
    folded = np.bincount(inverse.reshape(-1), weights=forward, minlength=len(keys)) != 0
    kinds = np.select([counts == 1, counts > 2, (counts == 2) & folded], [0, 1, 2], -1)
    flawed = kinds >= 0
    return (np.stack([keys[flawed] // vertex_count, keys[flawed] % vertex_count], axis=1),
            kinds[flawed])


def _face_normals(points: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """(F, 3) face normals scaled to twice the face area (metres^2), right-hand winding."""
    corners = points[faces]
    return np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0])


def _vertex_quadrics(points: np.ndarray,
                     faces: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(V, 3, 3), (V, 3), (V,): per vertex, the sums A, b, c of w n n^T, -w d n and w d^2 over
    planes n.x + d = 0, so that x^T A x - 2 b^T x + c is the weighted sum of squared distances
    from x to those planes. The planes are those of the vertex's faces (w: the face area) and,
    for a border edge at the vertex, the plane through the edge square to its face (w: the
    edge length squared), which keeps open rims where they are (Lindstrom 2000)."""
    cross = _face_normals(points, faces)
    double_area = np.linalg.norm(cross, axis=1)
    normals = cross / np.maximum(double_area, np.finfo(float).tiny)[:, None]
    face_planes = _plane_quadrics(normals, points[faces[:, 0]], 0.5 * double_area, faces,
                                  len(points))
    directed = _face_edges(faces)
    _, inverse, counts = np.unique(_edge_keys(directed, len(points)), return_inverse=True,
                                   return_counts=True)
    border = np.flatnonzero(counts[inverse.reshape(-1)] == 1)
    start = points[directed[border, 0]]
    across = np.cross(points[directed[border, 1]] - start, normals[border // 3])
    length = np.linalg.norm(across, axis=1)
    border_planes = _plane_quadrics(across / np.maximum(length, np.finfo(float).tiny)[:, None],
                                    start, length ** 2, directed[border], len(points))
    return tuple(face + rim for face, rim in zip(face_planes, border_planes))


def _plane_quadrics(normals: np.ndarray, anchors: np.ndarray, weights: np.ndarray,
                    vertex_ids: np.ndarray,
                    vertex_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The quadrics (see `_vertex_quadrics`) of P planes with unit normals (P, 3) through
    anchors (P, 3), weighted (P,), summed into each of the (P, K) vertices of each plane."""
    offsets = -np.einsum('pd,pd->p', normals, anchors)
    values = np.concatenate([
        (weights[:, None, None] * normals[:, :, None] * normals[:, None, :]).reshape(-1, 9),
        -(weights * offsets)[:, None] * normals, (weights * offsets ** 2)[:, None]], axis=1)
    sums = _sums_per_label(vertex_ids.T.reshape(-1), np.tile(values, (vertex_ids.shape[1], 1)),
                           vertex_count)
    return sums[:, :9].reshape(-1, 3, 3), sums[:, 9:12], sums[:, 12]


def _sums_per_label(labels: np.ndarray, values: np.ndarray, count: int) -> np.ndarray:
    """(count, D) sums of the (N, D) values per label (N,)."""
    return np.stack([np.bincount(labels, weights=column, minlength=count)
                     for column in values.T], axis=1)


def _grid_cells(points: np.ndarray, cell_size: float) -> _Cells:
    """The cubic cells of side `cell_size` (metres) that hold the (V, 3) points, the grid
    anchored at the points' minimum corner."""
    origin = points.min(axis=0)
    grid = np.floor((points - origin) / cell_size).astype(np.int64)
    shape = grid.max(axis=0) + 1
    keys = (grid[:, 0] * shape[1] + grid[:, 1]) * shape[2] + grid[:, 2]
    _, first, ids = np.unique(keys, return_index=True, return_inverse=True)
    low = origin + grid[first] * cell_size
    return _Cells(ids=ids.reshape(-1), low=low, high=low + cell_size)


def _cluster_labels(mesh: _ClusteringInput, cell_ids: np.ndarray) -> tuple[np.ndarray, int]:
    """(V,) cluster labels and their count: vertices joined by links inside one cell."""
    start, end = mesh.links[:, 0], mesh.links[:, 1]
    inside = cell_ids[start] == cell_ids[end]
    vertex_count = len(mesh.points)
    graph = coo_matrix((np.ones(int(inside.sum())), (start[inside], end[inside])),
                       shape=(vertex_count, vertex_count))
    count, labels = connected_components(graph, directed=False)
    return labels, count


def _clustered_faces(labels: np.ndarray, count: int, faces: np.ndarray) -> np.ndarray:
    """(F', 3) faces over cluster labels, without collapsed or repeated triangles (a pair of
    opposite triangles on the same clusters keeps its first one)."""
    merged = labels[faces]
    keep = ((merged[:, 0] != merged[:, 1]) & (merged[:, 1] != merged[:, 2])
            & (merged[:, 0] != merged[:, 2]))
    merged = merged[keep]
    ordered = np.sort(merged, axis=1)
    keys = (ordered[:, 0] * count + ordered[:, 1]) * count + ordered[:, 2]
    _, first = np.unique(keys, return_index=True)
    return merged[np.sort(first)]


def _unrepaired_faces(mesh: _ClusteringInput, cell_size: float) -> np.ndarray:
    """(F', 3) faces of the clustering in cubic cells of side `cell_size`, flaws and all."""
    labels, count = _cluster_labels(mesh, _grid_cells(mesh.points, cell_size).ids)
    return _clustered_faces(labels, count, mesh.faces)


def _clustering(mesh: _ClusteringInput, cells: _Cells) -> _Clustering:
    """Clusters, their faces and quadric-placed points (clipped to the cells)."""
    labels, count = _cluster_labels(mesh, cells.ids)
    order = np.argsort(labels, kind='stable')
    starts = np.searchsorted(labels[order], np.arange(count))
    cluster_cells = cells.ids[order[starts]]
    sums = _Sums.from_stacked(np.add.reduceat(mesh.vertex_sums[order], starts))
    points = np.clip(_quadric_cluster_points(sums),
                     cells.low[cluster_cells], cells.high[cluster_cells])
    return _Clustering(labels=labels, cells=cluster_cells,
                       faces=_clustered_faces(labels, count, mesh.faces), points=points,
                       sums=sums, member_low=np.minimum.reduceat(mesh.points[order], starts),
                       member_high=np.maximum.reduceat(mesh.points[order], starts))


def _quadric_cluster_points(sums: _Sums) -> np.ndarray:
    """(C, 3) per-cluster points minimising the weighted squared distances to the planes of
    their quadrics (see `_vertex_quadrics`), pulled weakly towards the cluster mean where that
    is under-determined (flat or straight regions)."""
    regulariser = 1e-3 * np.trace(sums.quadric_a, axis1=1, axis2=2) / 3.0 + 1e-12
    a = sums.quadric_a + regulariser[:, None, None] * np.eye(3)
    b = sums.quadric_b + regulariser[:, None] * sums.points / sums.members[:, None]
    return np.linalg.solve(a, b[:, :, None])[:, :, 0]


def _cluster_errors(clustering: _Clustering, color_scale: float) -> np.ndarray:
    """(C,) metres: each cluster's weighted RMS distance from its point to the planes of its
    quadrics, combined with its members' colour standard deviation times `color_scale`
    (metres)."""
    sums, points = clustering.sums, clustering.points
    squared_sum = (np.einsum('ci,cij,cj->c', points, sums.quadric_a, points)
                   - 2.0 * (sums.quadric_b * points).sum(axis=1) + sums.quadric_c)
    weight = np.trace(sums.quadric_a, axis1=1, axis2=2)  # unit normals: trace(n n^T) = 1
    squared_distance = np.maximum(squared_sum, 0.0) / np.maximum(weight, np.finfo(float).tiny)
    members = sums.members[:, None]
    color_variance = (sums.colors_squared / members - (sums.colors / members) ** 2).sum(axis=1)
    return np.sqrt(squared_distance + color_scale ** 2 * np.maximum(color_variance, 0.0))


def _splittable(clustering: _Clustering) -> np.ndarray:
    """(C,) bool: clusters whose members do not all sit at one point."""
    return (clustering.member_high > clustering.member_low).any(axis=1)


def _refined_cells(mesh: _ClusteringInput, cells: _Cells, target_faces: int) -> _Cells:
    """The cells after splitting the clusters with the largest `_cluster_errors`, round by
    round, until the clustering (before repairs) is within half of `FACE_BUDGET_SLACK` below
    `target_faces` faces, or above."""
    while True:
        clustering = _clustering(mesh, cells)
        missing = target_faces - len(clustering.faces)
        if missing <= 0.5 * FACE_BUDGET_SLACK * target_faces:
            return cells
        errors = np.where(_splittable(clustering),
                          _cluster_errors(clustering, mesh.color_scale), 0.0)
        worst = np.argsort(-errors)[:max(missing // FACES_PER_SPLIT_ROUND, 1)]
        worst = worst[errors[worst] > 0]
        if len(worst) == 0:
            return cells
        cells = _split_cells(mesh.points, clustering, cells, worst)


def _manifold_clustering(mesh: _ClusteringInput, cells: _Cells) -> _Clustering:
    """The clustering in `cells`, its flawed clusters split until none is left (or none that
    can still be split)."""
    while True:
        clustering = _clustering(mesh, cells)
        split = _clusters_to_split(mesh, clustering)
        if len(split) == 0:
            return clustering
        cells = _split_cells(mesh.points, clustering, cells, split)


def _clusters_to_split(mesh: _ClusteringInput, clustering: _Clustering) -> np.ndarray:
    """Labels of the splittable clusters on clustering flaws; empty when none is left.

    A new flawed edge splits its ends, or the other corners of its faces when neither end can
    be split; a degenerate face splits its corners; a vanished component all its clusters."""
    count, faces = clustering.count, clustering.faces
    splittable = _splittable(clustering)
    edges, kinds = _flawed_edges(faces, count)
    kept = _edge_keys(clustering.labels[mesh.flawed_edges], count) * 3 + mesh.flaw_kinds
    edges = edges[~np.isin(_edge_keys(edges, count) * 3 + kinds, kept)]  # 3 kinds of flaw
    stuck = ~splittable[edges].any(axis=1)
    on_stuck = np.isin(_edge_keys(_face_edges(faces), count),
                       _edge_keys(edges[stuck], count)).reshape(-1, 3).any(axis=1)
    double_area = np.linalg.norm(_face_normals(clustering.points, faces), axis=1)
    sides = np.diff(clustering.points[faces[:, [0, 1, 2, 0]]], axis=1)
    degenerate = 0.5 * double_area < \
        DEGENERATE_AREA_FRACTION * (sides ** 2).sum(axis=2).max(axis=1)
    component = np.zeros(count, np.int64)
    component[clustering.labels] = mesh.components
    vanished = np.setdiff1d(mesh.components[mesh.faces[:, 0]], component[faces])
    flawed = np.unique(np.concatenate([
        edges.reshape(-1), faces[on_stuck | degenerate].reshape(-1),
        np.flatnonzero(np.isin(component, vanished))]))
    return flawed[splittable[flawed]]


def _split_cells(points: np.ndarray, clustering: _Clustering, cells: _Cells,
                 split: np.ndarray) -> _Cells:
    """The cells after cutting each cluster in `split` (distinct labels) out of its cell and in
    two, across the middle of the longest side of its members' bounding box; both halves get
    new cells."""
    extent = clustering.member_high[split] - clustering.member_low[split]
    axis = np.argmax(extent, axis=1)
    rows = np.arange(len(split))
    middle = clustering.member_low[split, axis] + 0.5 * extent[rows, axis]
    old_low, old_high = cells.low[clustering.cells[split]], cells.high[clustering.cells[split]]
    near_high, far_low = old_high.copy(), old_low.copy()
    near_high[rows, axis] = middle
    far_low[rows, axis] = middle
    position = np.full(clustering.count, -1)
    position[split] = rows
    chosen = np.flatnonzero(position[clustering.labels] >= 0)
    which = position[clustering.labels[chosen]]
    far = points[chosen, axis[which]] > middle[which]
    ids = cells.ids.copy()
    ids[chosen] = len(cells.low) + 2 * which + far
    return _Cells(ids=ids,
                  low=np.concatenate([cells.low, np.stack([old_low, far_low], 1).reshape(-1, 3)]),
                  high=np.concatenate([cells.high,
                                       np.stack([near_high, old_high], 1).reshape(-1, 3)]))

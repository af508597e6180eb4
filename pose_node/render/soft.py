"""Pure-PyTorch rasterizer: a differentiable soft mode (SoftRas-style) and an exact hard mode.

Both modes work on sparse pixel-face pairs: each visible face is paired with the pixel centres
inside its screen bounding box (widened by the soft support in soft mode), so memory and time
grow with the covered area, never as a dense (B, H*W, F) tensor. Faces facing away from the
camera (back-face culling; faces must be wound counter-clockwise seen from outside) and faces
with a corner at z <= ``near`` are dropped. Shapes and units as in :mod:`pose_node.render.base`:
pixel centres are at integer coordinates, ``sigma`` is in square pixels.

Soft coverage (Liu et al. 2019, "Soft Rasterizer"): a face covers a pixel centre at squared screen
distance d2 with D = sigmoid(d2 / sigma) inside it and sigmoid(-d2 / sigma) outside; the
silhouette is 1 - prod_j (1 - D_j). One change from SoftRas: d2 is measured to the *contour*
(edges between a visible face and a culled or missing one) near the face, namely the contour
edges that touch its corners or their neighbours, and outside a face to the farther of that and
the face itself; a face with no contour edge near it covers exactly its own pixels. With SoftRas'
rule (distance to the face's own edges) every edge shared by two visible faces pulls the coverage
down to 0.75 and darkens the colour along a band about sqrt(sigma) wide, all over the silhouette
(measured here: a mean interior deficit of about 0.1); here the interior stays 1. Two faces that
share an edge see the same contour edges around it, so the coverage stays continuous across it,
and the topological neighbourhood keeps an object's part in front from eating into the one
behind. The coverage still jumps where a face turns from back- to front-facing (culling, as
SoftRas with culling does), and colour where two faces swap depth order.

Colour: the pairs of a pixel are alpha-composited front to back in depth order with opacity D, so
the nearest face hides those behind it and the weights sum to the silhouette (rgb is premultiplied
by coverage, like the reference ray caster's). Depth is a hard z-buffer, without gradient.
As sigma -> 0 the soft mode becomes :meth:`SoftRenderer.render_hard`.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pose_node.render.base import Renderer, RenderMesh, RenderOutput, Shading

DEFAULT_SIGMA = 0.02
"""Default softness (px^2). Larger widens the basin of attraction and biases the silhouette
outward; refinement anneals it (about 0.4 -> 0.01, see the README)."""

DEFAULT_NEAR = 0.01
"""Faces with a corner closer to the camera plane than this (metres) are dropped."""

COVERAGE_EPSILON = 1e-4
"""Soft coverage below this is treated as zero; it sets how far the soft support reaches."""

CONTOUR_EDGES_PER_VERTEX = 8
"""Contour edges remembered per vertex, among those at it or its neighbours (about 4 on a clean
contour; folds of coarse meshes add more)."""

_TOPOLOGY_CACHE_SIZE = 64  # meshes
_MAX_LOGIT = 50.0  # sigmoid(50) == 1 in float32 and float64; clamping keeps logits finite


@dataclass(frozen=True)
class _PosedFaces:
    """Faces of one mesh at B poses, flattened over (B * F).

    xy (B*F, 3, 2) pixel coordinates of the corners; z (B*F, 3) their camera-frame depth, metres;
    visible (B*F,) bool: in front of the near plane and facing the camera.
    """

    xy: torch.Tensor
    z: torch.Tensor
    visible: torch.Tensor


@dataclass(frozen=True)
class _Pairs:
    """Pixel-face pairs: face (P,) index into B*F; pixel (P,) index into B*H*W; xy (P, 2) the
    pixel centre's coordinates."""

    face: torch.Tensor
    pixel: torch.Tensor
    xy: torch.Tensor

    def select(self, keep: torch.Tensor) -> '_Pairs':
        return _Pairs(self.face[keep], self.pixel[keep], self.xy[keep])


class SoftRenderer(Renderer):
    """Differentiable SoftRas-style rasterizer (``render``) and exact hard rasterizer
    (``render_hard``), batched over poses, on the mesh's device.

    sigma: default softness in px^2. near: near-plane distance in metres. smooth_normals: Lambert
    shading with interpolated vertex normals (True) or flat face normals (False).
    """

    name = 'soft'
    renders_normals = True

    def __init__(self, device: torch.device, sigma: float = DEFAULT_SIGMA,
                 near: float = DEFAULT_NEAR, smooth_normals: bool = True):
        if sigma <= 0:
            raise ValueError(f'sigma must be positive, got {sigma}')
        self.device = torch.device(device)
        self.sigma = float(sigma)
        self.near = float(near)
        self.smooth_normals = smooth_normals
        # Topology per mesh, computed once. The entries hold the mesh's tensors, so their ids
        # (the keys) cannot be reused by other tensors while cached.
        self._topologies: dict[tuple[int, int], tuple[RenderMesh, MeshTopology]] = {}

    def render(self, mesh: RenderMesh, R: torch.Tensor, t: torch.Tensor, K: torch.Tensor,
               width: int, height: int, shading: Shading = Shading(), *,
               sigma: float | None = None) -> RenderOutput:
        """Soft silhouette and colour, differentiable with respect to ``R`` (B, 3, 3) and
        ``t`` (B, 3); ``K`` (B, 3, 3) or (3, 3); ``sigma`` (px^2) overrides the default."""
        sigma = self.sigma if sigma is None else float(sigma)
        if sigma <= 0:
            raise ValueError(f'sigma must be positive, got {sigma}; use render_hard for sigma 0')
        R, t, K = _pose_tensors(mesh, R, t, K)
        batch, n_faces = R.shape[0], mesh.faces.shape[0]
        posed = _posed_faces(mesh, R, t, K, self.near)
        support_d2 = sigma * math.log(1.0 / COVERAGE_EPSILON - 1.0)
        contour = _contour(posed, self._topology(mesh), batch, reach=math.sqrt(support_d2))
        with torch.no_grad():
            # Only faces near the contour reach pixels outside them (the others cover 0 there).
            pairs = _candidate_pairs(contour.reach_low, contour.reach_high, posed.visible, width,
                                     height, n_faces)
            corners = posed.xy.detach()[pairs.face]
            inside = (_barycentric(pairs.xy, corners) >= 0).all(dim=-1)
            d2, boundary = _nearest_boundary(pairs, corners, inside, contour)
            keep = inside | (d2 < support_d2)
            pairs, inside, boundary = pairs.select(keep), inside[keep], boundary[keep]
        # The differentiable distance, to the segment found above (min and max pass their
        # gradient to the chosen argument only, so this is their gradient too).
        d2 = _distances_to(pairs.xy, _boundary_segments(posed, contour), boundary,
                           far=2 * _MAX_LOGIT * sigma)
        corners = posed.xy[pairs.face]
        logits = (torch.where(inside, d2, -d2) / sigma).clamp(-_MAX_LOGIT, _MAX_LOGIT)
        weights, depth = _perspective_weights(_barycentric(pairs.xy, corners).clamp(min=0.0),
                                              posed.z[pairs.face])
        planes = _pair_planes(mesh, R, pairs.face, weights, shading, self.smooth_normals)
        n_pixels = batch * height * width
        silhouette, planes = _composite(pairs.pixel, depth.detach(), logits, planes, n_pixels)
        depth_image = _nearest_depth(pairs.pixel[inside], depth.detach()[inside], n_pixels)
        return _output(silhouette, planes, depth_image, (batch, height, width))

    def _topology(self, mesh: RenderMesh) -> 'MeshTopology':
        key = (id(mesh.vertices), id(mesh.faces))
        if key not in self._topologies:
            if len(self._topologies) >= _TOPOLOGY_CACHE_SIZE:
                self._topologies.pop(next(iter(self._topologies)))
            self._topologies[key] = (mesh, mesh_topology(mesh.vertices, mesh.faces))
        return self._topologies[key][1]

    @torch.no_grad()
    def render_hard(self, mesh: RenderMesh, R: torch.Tensor, t: torch.Tensor, K: torch.Tensor,
                    width: int, height: int, shading: Shading = Shading()) -> RenderOutput:
        """Exact rasterization, no gradient: a pixel is covered when its centre lies in a visible
        face; colour and depth are the nearest such face's. silhouette is 0 or 1."""
        R, t, K = _pose_tensors(mesh, R, t, K)
        batch, n_faces = R.shape[0], mesh.faces.shape[0]
        posed = _posed_faces(mesh, R, t, K, self.near)
        pairs = _covered_pairs(posed, width, height, n_faces)
        weights, depth = _perspective_weights(_barycentric(pairs.xy, posed.xy[pairs.face]),
                                              posed.z[pairs.face])
        n_pixels = batch * height * width
        depth_image = _nearest_depth(pairs.pixel, depth, n_pixels)
        winner = _nearest_pair(pairs.pixel, depth, depth_image, n_pixels)
        hit = winner >= 0
        colours = _pair_planes(mesh, R, pairs.face[winner[hit]], weights[winner[hit]], shading,
                               self.smooth_normals)
        planes = colours.new_zeros(n_pixels, colours.shape[1])
        planes[hit] = colours
        return _output(hit.to(planes.dtype), planes, depth_image, (batch, height, width))

    @torch.no_grad()
    def render_silhouette(self, mesh: RenderMesh, R: torch.Tensor, t: torch.Tensor,
                          K: torch.Tensor, width: int, height: int) -> torch.Tensor:
        """(B, H, W) the silhouette of :meth:`render_hard` (0 or 1) without its colour and depth:
        no interpolation and no z-buffer (about a quarter less time per refinement step)."""
        R, t, K = _pose_tensors(mesh, R, t, K)
        batch, n_faces = R.shape[0], mesh.faces.shape[0]
        posed = _posed_faces(mesh, R, t, K, self.near)
        pairs = _covered_pairs(posed, width, height, n_faces)
        covered = torch.zeros(batch * height * width, dtype=torch.bool, device=posed.xy.device)
        covered[pairs.pixel] = True
        return covered.to(posed.xy.dtype).view(batch, height, width)


# ------------------------------------------------------------------------------------ geometry

def _pose_tensors(mesh: RenderMesh, R, t, K) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """R (B, 3, 3), t (B, 3), K (B, 3, 3) in the mesh's dtype and device (gradients kept)."""
    like = dict(dtype=mesh.vertices.dtype, device=mesh.device)
    R, t, K = (torch.as_tensor(x, **like) for x in (R, t, K))
    if R.dim() != 3 or t.shape != (R.shape[0], 3):
        raise ValueError(f'expected R (B, 3, 3) and t (B, 3), got {tuple(R.shape)} and '
                         f'{tuple(t.shape)}')
    return R, t, K.expand(R.shape[0], 3, 3)


def _posed_faces(mesh: RenderMesh, R: torch.Tensor, t: torch.Tensor, K: torch.Tensor,
                 near: float) -> _PosedFaces:
    """Project the mesh's faces at B poses; see :class:`_PosedFaces`."""
    points = mesh.vertices @ R.transpose(1, 2) + t[:, None, :]          # (B, V, 3)
    image = points @ K.transpose(1, 2)
    in_front = points[..., 2] > near
    # Vertices behind the near plane get a stand-in depth: their faces are dropped, and the
    # stand-in keeps their coordinates (and gradients) finite.
    safe_z = torch.where(in_front, image[..., 2], torch.ones_like(image[..., 2]))
    xy = (image[..., :2] / safe_z[..., None])[:, mesh.faces].flatten(0, 1)  # (B*F, 3, 2)
    z = points[..., 2][:, mesh.faces].flatten(0, 1)
    with torch.no_grad():
        # With x right and y down, a face seen from its outside (counter-clockwise in the
        # model) runs clockwise on screen: negative signed area.
        visible = in_front[:, mesh.faces].flatten(0, 1).all(dim=-1) & (_signed_area(xy) < 0)
    return _PosedFaces(xy=xy, z=z, visible=visible)


def _signed_area(xy: torch.Tensor) -> torch.Tensor:
    """Twice the signed area (px^2) of triangles xy (..., 3, 2)."""
    return _cross(xy[..., 1, :] - xy[..., 0, :], xy[..., 2, :] - xy[..., 0, :])


def _cross(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """z component of the cross product of 2-vectors a, b (..., 2)."""
    return a[..., 0] * b[..., 1] - a[..., 1] * b[..., 0]


@dataclass(frozen=True)
class MeshTopology:
    """Connectivity of a mesh with coincident vertices merged.

    corners (F, 3) int64: merged vertex id of each face corner; edges (F, 3) int64: id of the
    undirected edge k (corners k -> k+1) of each face; ring_offsets (V' + 1,) and ring (R,)
    int64: vertex i's neighbours, itself included, are ring[ring_offsets[i]:ring_offsets[i+1]];
    n_vertices (V'), n_edges: the counts of merged vertices and of edges.
    """

    corners: torch.Tensor
    edges: torch.Tensor
    ring_offsets: torch.Tensor
    ring: torch.Tensor
    n_vertices: int
    n_edges: int


def mesh_topology(vertices: torch.Tensor, faces: torch.Tensor) -> MeshTopology:
    """Topology of faces (F, 3) over vertices (V, 3). Vertices at the same position count as one,
    so that meshes split at colour or normal seams still share their edges."""
    _, merged = torch.unique(vertices, dim=0, return_inverse=True)
    n_vertices = int(merged.max()) + 1
    corners = merged[faces]
    start, end = corners.flatten(), corners.roll(-1, dims=1).flatten()
    keys = torch.minimum(start, end) * n_vertices + torch.maximum(start, end)
    unique_keys, edges = torch.unique(keys, return_inverse=True)
    itself = torch.arange(n_vertices, device=faces.device)
    directed = torch.unique(torch.cat([start * n_vertices + end, end * n_vertices + start,
                                       itself * n_vertices + itself]))
    counts = torch.bincount(directed // n_vertices, minlength=n_vertices)
    ring_offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
    return MeshTopology(corners=corners, edges=edges.view(faces.shape),
                        ring_offsets=ring_offsets, ring=directed % n_vertices,
                        n_vertices=n_vertices, n_edges=len(unique_keys))


@dataclass(frozen=True)
class _Contour:
    """The contour of B posed meshes.

    segments (C, 2, 2): screen endpoints (px) of the C contour edges. edge_offsets (B*F + 1,),
    edges (E,): the contour edges near posed face i (touching one of its corners or their
    neighbours) are edges[edge_offsets[i]:edge_offsets[i + 1]], rows of ``segments``.
    reach_low, reach_high (B*F, 2): a box (px) holding every pixel face i may cover softly.
    """

    segments: torch.Tensor
    edge_offsets: torch.Tensor
    edges: torch.Tensor
    reach_low: torch.Tensor
    reach_high: torch.Tensor


def _contour(posed: _PosedFaces, topology: MeshTopology, batch: int, reach: float) -> _Contour:
    """The contour edges (edges of a visible face shared with no other visible face) of the posed
    faces, and for each face those near it: touching one of its corners or their neighbours, and
    within ``reach`` px of its bounding box.

    Two faces that share an edge thus see the same contour edges around it, so their soft
    coverages agree along it and the silhouette stays continuous across it.
    """
    n_faces, n_edges = topology.edges.shape[0], topology.n_edges
    device = posed.xy.device
    face_batch = torch.arange(batch, device=device).repeat_interleave(n_faces)     # (B*F,)
    posed_edges = topology.edges.repeat(batch, 1) + face_batch[:, None] * n_edges  # (B*F, 3)
    visible_edges = posed_edges[posed.visible].flatten()
    sharing = torch.zeros(batch * n_edges, dtype=torch.long, device=device).index_add(
        0, visible_edges, torch.ones_like(visible_edges))
    face, side = ((sharing[posed_edges] < 2) & posed.visible[:, None]).nonzero(as_tuple=True)
    segments = torch.stack([posed.xy[face, side], posed.xy[face, (side + 1) % 3]], dim=1)
    corners = topology.corners.repeat(batch, 1) + face_batch[:, None] * topology.n_vertices
    ends = torch.stack([corners[face, side], corners[face, (side + 1) % 3]], dim=1).flatten()
    vertex, contour_edge = _spread_to_neighbours(ends, torch.arange(len(face), device=device)
                                                 .repeat_interleave(2), topology)
    n_contour = max(len(face), 1)
    at_vertex = _first_per_key(vertex, contour_edge, batch * topology.n_vertices,
                               CONTOUR_EDGES_PER_VERTEX, placeholder=-1)
    # Visible face -> contour edges at its corners, each once: distinct (face, edge) keys.
    near_contour = torch.zeros(batch * topology.n_vertices, dtype=torch.bool, device=device)
    near_contour[vertex] = True
    rows = (posed.visible & near_contour[corners].any(dim=1)).nonzero().squeeze(1)
    near = at_vertex[corners[rows]].flatten(1)                            # (rows, 3 * slots)
    row, slot = (near >= 0).nonzero(as_tuple=True)
    keys = torch.unique(rows[row] * n_contour + near[row, slot])
    # Edges farther than ``reach`` from a face's bounding box cannot matter to its pixels.
    with torch.no_grad():
        face_low, face_high = posed.xy.amin(dim=1) - reach, posed.xy.amax(dim=1) + reach
        row, edge = keys // n_contour, keys % n_contour
        overlaps = ((segments[edge].amax(dim=1) >= face_low[row])
                    & (segments[edge].amin(dim=1) <= face_high[row])).all(dim=1)
        keys = keys[overlaps]
        row, edge = keys // n_contour, keys % n_contour
        # Outside its own box a face reaches only pixels near both it and its contour edges.
        edges_low = face_high.clone().scatter_reduce(
            0, row[:, None].expand(-1, 2), segments[edge].amin(dim=1) - reach, reduce='amin')
        edges_high = face_low.clone().scatter_reduce(
            0, row[:, None].expand(-1, 2), segments[edge].amax(dim=1) + reach, reduce='amax')
        reach_low = torch.minimum(posed.xy.amin(dim=1), torch.maximum(face_low, edges_low))
        reach_high = torch.maximum(posed.xy.amax(dim=1), torch.minimum(face_high, edges_high))
    counts = torch.bincount(row, minlength=len(corners))
    return _Contour(segments=segments,
                    edge_offsets=torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)]),
                    edges=edge, reach_low=reach_low, reach_high=reach_high)


def _spread_to_neighbours(vertex: torch.Tensor, value: torch.Tensor, topology: MeshTopology
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct (vertex, value) pairs for every neighbour (itself included) of each vertex (N,)
    (batch-offset merged ids) carrying value (N,) int64 >= 0."""
    n_vertices = topology.n_vertices
    local, offset = vertex % n_vertices, vertex - vertex % n_vertices
    degree = topology.ring_offsets[local + 1] - topology.ring_offsets[local]
    source = torch.repeat_interleave(torch.arange(len(vertex), device=vertex.device), degree)
    within = torch.arange(len(source), device=vertex.device) \
        - (torch.cumsum(degree, 0) - degree)[source]
    neighbour = topology.ring[topology.ring_offsets[local[source]] + within] + offset[source]
    span = int(value.max()) + 1 if len(value) else 1
    pairs = torch.unique(neighbour * span + value[source])
    return pairs // span, pairs % span


def _first_per_key(key: torch.Tensor, value: torch.Tensor, n_keys: int, slots: int,
                   placeholder: int) -> torch.Tensor:
    """(n_keys, slots) table of up to ``slots`` values per key from pairs key (N,), value (N,)
    sorted by key, padded with ``placeholder``."""
    position = torch.arange(len(key), device=key.device)
    first = torch.ones_like(key, dtype=torch.bool)
    first[1:] = key[1:] != key[:-1]
    rank = position - torch.cummax(torch.where(first, position, 0), dim=0).values
    kept = rank < slots
    table = torch.full((n_keys, slots), placeholder, dtype=torch.long, device=key.device)
    table[key[kept], rank[kept]] = value[kept]
    return table


# ------------------------------------------------------------------------------ pixel-face pairs

def _candidate_pairs(low: torch.Tensor, high: torch.Tensor, visible: torch.Tensor, width: int,
                     height: int, n_faces: int) -> _Pairs:
    """Every pixel centre in the box low..high (B*F, 2) px of each visible face (B*F,); faces of
    batch element b are rows b*F .. b*F+F-1."""
    face = visible.nonzero().squeeze(1)
    low = low[face].clamp(-1.0, max(width, height) + 1.0)
    high = high[face].clamp(-1.0, max(width, height) + 1.0)
    x0 = torch.ceil(low[:, 0]).long().clamp(0, width)
    y0 = torch.ceil(low[:, 1]).long().clamp(0, height)
    nx = (torch.floor(high[:, 0]).long().clamp(max=width - 1) - x0 + 1).clamp(min=0)
    ny = (torch.floor(high[:, 1]).long().clamp(max=height - 1) - y0 + 1).clamp(min=0)
    counts = nx * ny
    owner = torch.repeat_interleave(torch.arange(len(face), device=low.device), counts)
    local = torch.arange(len(owner), device=low.device) - (torch.cumsum(counts, 0) - counts)[owner]
    px = x0[owner] + local % nx[owner]
    py = y0[owner] + local // nx[owner]
    pair_face = face[owner]
    pixel = ((pair_face // n_faces) * height + py) * width + px
    return _Pairs(face=pair_face, pixel=pixel, xy=torch.stack([px, py], dim=1).to(low.dtype))


def _covered_pairs(posed: _PosedFaces, width: int, height: int, n_faces: int) -> _Pairs:
    """The pairs of :func:`_candidate_pairs` whose pixel centre lies in the (visible) face."""
    pairs = _candidate_pairs(posed.xy.amin(dim=1), posed.xy.amax(dim=1), posed.visible, width,
                             height, n_faces)
    a, b, c = posed.xy[pairs.face].unbind(dim=1)
    p = pairs.xy
    # Visible faces run clockwise on screen (negative area): inside, every edge function is <= 0,
    # the same test as non-negative barycentric coordinates without the division.
    inside = ((_cross(b - p, c - p) <= 0) & (_cross(c - p, a - p) <= 0)
              & (_cross(a - p, b - p) <= 0))
    return pairs.select(inside)


def _barycentric(p: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
    """(P, 3) screen-space barycentric coordinates of points p (P, 2) in triangles (P, 3, 2);
    all >= 0 inside, whichever the winding."""
    a, b, c = corners.unbind(dim=1)
    area = _cross(b - a, c - a)
    return torch.stack([_cross(b - p, c - p), _cross(c - p, a - p), _cross(a - p, b - p)],
                       dim=1) / area[:, None]


def _segment_squared_distances(p: torch.Tensor, start: torch.Tensor,
                               end: torch.Tensor) -> torch.Tensor:
    """(P, M) squared distances (px^2) from points p (P, 2) to segments start -> end (P, M, 2)."""
    edge = end - start
    offset = p[:, None, :] - start
    along = ((offset * edge).sum(-1) / (edge * edge).sum(-1).clamp(min=1e-12)).clamp(0.0, 1.0)
    gap = offset - along[..., None] * edge
    return (gap * gap).sum(-1)


def _nearest_boundary(pairs: _Pairs, corners: torch.Tensor, inside: torch.Tensor,
                      contour: _Contour) -> tuple[torch.Tensor, torch.Tensor]:
    """The squared distance (P,) px^2 that sets each pair's soft coverage and the boundary
    segment (P,) realising it, for pairs with corners (P, 3, 2).

    The distance is to the nearest contour edge near the face (segment index < C), and for a
    pixel outside the face at least to the face (its nearest edge k: index C + 3 * face + k; see
    :func:`_boundary_segments`). Where no contour edge is near the face: inf and -1.
    """
    n_contour = len(contour.segments)
    start = contour.edge_offsets[pairs.face]
    count = contour.edge_offsets[pairs.face + 1] - start
    # One entry per (pair, nearby contour edge): most faces have none, a few have many.
    entry = torch.repeat_interleave(torch.arange(len(count), device=count.device), count)
    within = torch.arange(len(entry), device=count.device) - (torch.cumsum(count, 0) - count)[entry]
    edge = contour.edges[start[entry] + within]
    segment = contour.segments[edge]
    entry_d2 = _segment_squared_distances(pairs.xy[entry], segment[:, None, 0],
                                          segment[:, None, 1]).squeeze(1)
    d2 = torch.full(count.shape, torch.inf, dtype=corners.dtype, device=corners.device)
    d2 = d2.scatter_reduce(0, entry, entry_d2, reduce='amin')
    nearest = entry_d2 == d2[entry]
    boundary = torch.full_like(count, -1).scatter_reduce(0, entry[nearest], edge[nearest],
                                                        reduce='amax')
    outside = (~inside & (count > 0)).nonzero().squeeze(1)
    face_d2, side = _segment_squared_distances(
        pairs.xy[outside], corners[outside], corners[outside].roll(-1, dims=1)).min(dim=-1)
    farther = face_d2 > d2[outside]
    d2[outside[farther]] = face_d2[farther]
    boundary[outside[farther]] = n_contour + 3 * pairs.face[outside[farther]] + side[farther]
    return d2, boundary


def _boundary_segments(posed: _PosedFaces, contour: _Contour) -> torch.Tensor:
    """(C + B*F*3, 2, 2) endpoints (px) of the contour edges, then of every posed face's edges
    k -> k+1."""
    face_edges = torch.stack([posed.xy, posed.xy.roll(-1, dims=1)], dim=2).flatten(0, 1)
    return torch.cat([contour.segments, face_edges])


def _distances_to(p: torch.Tensor, segments: torch.Tensor, index: torch.Tensor,
                  far: float) -> torch.Tensor:
    """(P,) squared distances (px^2) from points p (P, 2) to segments[index] (index (P,));
    ``far`` where index is -1."""
    chosen = segments[index.clamp(min=0)]
    d2 = _segment_squared_distances(p, chosen[:, None, 0], chosen[:, None, 1]).squeeze(1)
    return torch.where(index >= 0, d2, far)


def _perspective_weights(barycentric: torch.Tensor, corner_z: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Perspective-correct interpolation weights (P, 3) and depth (P,) metres from non-negative
    screen-space barycentric coordinates (P, 3) and corner depths (P, 3)."""
    barycentric = barycentric / barycentric.sum(dim=-1, keepdim=True)
    inverse_z = barycentric / corner_z
    depth = 1.0 / inverse_z.sum(dim=-1)
    return inverse_z * depth[:, None], depth


# ------------------------------------------------------------------------------------- shading

def _pair_planes(mesh: RenderMesh, R: torch.Tensor, pair_face: torch.Tensor,
                 weights: torch.Tensor, shading: Shading, smooth_normals: bool) -> torch.Tensor:
    """(P, 3) colours of pairs on faces pair_face (P,) (index into B*F) with interpolation
    weights (P, 3): vertex albedo, times Lambert shading when ``shading.lambert``; followed by
    their camera-frame unit normals, (P, 6), when ``shading.normals``."""
    face = pair_face % mesh.faces.shape[0]
    colours = torch.einsum('pk,pkc->pc', weights, mesh.colors[mesh.faces[face]])
    if not (shading.lambert or shading.normals):
        return colours
    normals = _pair_normals(mesh, R, pair_face, weights, smooth_normals)
    if shading.lambert:
        light = F.normalize(torch.as_tensor(shading.light_direction, dtype=normals.dtype,
                                            device=normals.device), dim=0)
        lit = shading.ambient + shading.diffuse * (-(normals @ light)).clamp(min=0.0)
        colours = colours * lit[:, None]
    return torch.cat([colours, normals], dim=1) if shading.normals else colours


def _pair_normals(mesh: RenderMesh, R: torch.Tensor, pair_face: torch.Tensor,
                  weights: torch.Tensor, smooth_normals: bool) -> torch.Tensor:
    """(P, 3) camera-frame unit normals of pairs (see :func:`_pair_planes`): interpolated vertex
    normals, or the faces' own."""
    n_faces = mesh.faces.shape[0]
    face, batch = pair_face % n_faces, pair_face // n_faces
    if smooth_normals:
        normals = torch.einsum('pk,pkc->pc', weights, vertex_normals(mesh.vertices,
                                                                     mesh.faces)[mesh.faces[face]])
    else:
        normals = face_normals(mesh.vertices, mesh.faces)[face]
    return F.normalize(torch.einsum('pij,pj->pi', R[batch], normals), dim=-1)


def face_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(F, 3) outward unit normals of counter-clockwise faces (F, 3) of vertices (V, 3)."""
    corners = vertices[faces]
    return F.normalize(torch.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0],
                                   dim=-1), dim=-1)


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """(V, 3) unit vertex normals: area-weighted means of the adjacent faces' normals."""
    corners = vertices[faces]
    area_normals = torch.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0],
                               dim=-1)
    summed = torch.zeros_like(vertices).index_add(0, faces.flatten(),
                                                  area_normals.repeat_interleave(3, dim=0))
    return F.normalize(summed, dim=-1)


# ----------------------------------------------------------------------------------- compositing

def _output(silhouette: torch.Tensor, planes: torch.Tensor, depth: torch.Tensor,
            shape: tuple[int, int, int]) -> RenderOutput:
    """A RenderOutput of shape (B, H, W) = ``shape`` from silhouette (B*H*W,), planes
    (B*H*W, 3 or 6) (colour, then normals where asked for) and depth (B*H*W,)."""
    planes = planes.view(*shape, -1)
    return RenderOutput(silhouette=silhouette.view(shape), rgb=planes[..., :3],
                        depth=depth.view(shape),
                        normal=planes[..., 3:] if planes.shape[-1] > 3 else None)


def _composite(pixel: torch.Tensor, depth: torch.Tensor, logits: torch.Tensor,
               planes: torch.Tensor, n_pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft silhouette (n_pixels,) and premultiplied planes (n_pixels, C) of pairs on pixels
    pixel (P,) at depth (P,) with coverage logits (P,) and planes (P, C) (colours, normals),
    composited front to back: pair j's weight is D_j * prod over nearer pairs k (1 - D_k)."""
    order = _front_to_back(pixel, depth)
    pixel, logits, planes = pixel[order], logits[order], planes[order]
    log_transmit = F.logsigmoid(-logits)  # log(1 - D)
    # The running sum spans all pixels; float64 keeps its differences exact enough.
    running = torch.cumsum(log_transmit.double(), dim=0) - log_transmit
    position = torch.arange(len(pixel), device=pixel.device)
    starts = torch.ones_like(pixel, dtype=torch.bool)
    starts[1:] = pixel[1:] != pixel[:-1]
    segment_start = torch.cummax(torch.where(starts, position, 0), dim=0).values
    transmittance = torch.exp(running - running[segment_start]).to(logits.dtype)
    weights = torch.sigmoid(logits) * transmittance
    total_log_transmit = torch.zeros(n_pixels, dtype=logits.dtype, device=pixel.device)
    silhouette = 1.0 - torch.exp(total_log_transmit.index_add(0, pixel, log_transmit))
    composited = planes.new_zeros(n_pixels, planes.shape[1]).index_add(
        0, pixel, weights[:, None] * planes)
    return silhouette, composited


def _front_to_back(pixel: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
    """(P,) permutation grouping pairs by pixel, nearest first within a pixel."""
    if len(depth) == 0:
        return pixel.clone()
    # One sort on pixel + a depth fraction in [0, 0.5]: float64 resolves both at once.
    span = (depth.max() - depth.min()).clamp(min=1e-12)
    fraction = (depth - depth.min()).double() / span.double() * 0.5
    return torch.argsort(pixel.double() + fraction)


def _nearest_depth(pixel: torch.Tensor, depth: torch.Tensor, n_pixels: int) -> torch.Tensor:
    """(n_pixels,) smallest depth among the pairs on each pixel, 0 where there are none."""
    nearest = torch.full((n_pixels,), torch.inf, dtype=depth.dtype, device=depth.device)
    nearest = nearest.scatter_reduce(0, pixel, depth, reduce='amin')
    return torch.where(torch.isinf(nearest), torch.zeros_like(nearest), nearest)


def _nearest_pair(pixel: torch.Tensor, depth: torch.Tensor, nearest_depth: torch.Tensor,
                  n_pixels: int) -> torch.Tensor:
    """(n_pixels,) index of one pair at each pixel's nearest depth, -1 where there are none."""
    index = torch.arange(len(pixel), device=pixel.device)
    front = depth <= nearest_depth[pixel]
    winner = torch.full((n_pixels,), -1, dtype=torch.long, device=pixel.device)
    return winner.scatter_reduce(0, pixel[front], index[front], reduce='amax')

"""Image motion of rendered content under a local pose increment, for the Levenberg-Marquardt
Jacobian (see :mod:`.optimizers`).

The increment ``delta`` (B, 6) of :func:`pose_node.refine.parametrization.apply_increment` moves a
camera-frame point X of the object by ``dX = omega x (X - t) + (r nu_x, r nu_y, 0) + nu_z t``; its
pixel moves by the projection's derivative times dX. Colour moves with the surface point seen at a
pixel; the silhouette's outline moves with its rim, the mesh's contour edges (between a face turned
to the camera and one turned away). The rim's depth is taken from those edges, not from the
surface seen at border pixels: where a face is seen at a grazing angle, the surface one pixel
inside the outline can be a whole object radius nearer than the rim.

Shapes: B poses, images H x W; K (B, 3, 3) pixels; depths metres, 0 where nothing is known.
"""
import torch
import torch.nn.functional as F

from pose_node.render.base import RenderMesh

RIM_SAMPLE_SPACING_PX = 0.5
"""Spacing of the points sampled along each contour edge when splatting rim depths: below a pixel
so that a rim leaves no gaps."""


def rim_depth(mesh: RenderMesh, R: torch.Tensor, t: torch.Tensor,
              K: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(B, H, W) camera-frame depth of the nearest contour edge crossing each pixel, 0 elsewhere.

    Contour edges: shared by a face turned to the camera and one turned away, or an open edge of
    a face turned to the camera. Each is sampled every RIM_SAMPLE_SPACING_PX along its projection.
    """
    points = mesh.vertices @ R.transpose(1, 2) + t[:, None, :]                     # (B, V, 3)
    corners = points[:, mesh.faces]                                                # (B, F, 3, 3)
    normals = torch.linalg.cross(corners[:, :, 1] - corners[:, :, 0],
                                 corners[:, :, 2] - corners[:, :, 0], dim=-1)
    facing = ((normals * corners.mean(dim=2)).sum(-1) < 0).long()                  # (B, F)
    edges = mesh.edges
    batch, n_edges = R.shape[0], edges.face_count.shape[0]
    facing_count = torch.zeros(batch, n_edges, dtype=torch.long, device=R.device).scatter_add_(
        1, edges.of_face.flatten().expand(batch, -1), facing.repeat_interleave(3, dim=1))
    contour = (facing_count > 0) & (facing_count < edges.face_count) | (
        (edges.face_count == 1) & (facing_count == 1))
    pose, edge = contour.nonzero(as_tuple=True)
    ends = points[pose[:, None], edges.vertices[edge]]                             # (M, 2, 3)
    pixels = ends @ K[pose].transpose(1, 2)
    pixels = pixels[..., :2] / pixels[..., 2:].clamp(min=1e-6)
    length = (pixels[:, 1] - pixels[:, 0]).norm(dim=-1)
    samples = (length / RIM_SAMPLE_SPACING_PX).ceil().long().clamp(min=1) + 1
    owner = torch.repeat_interleave(torch.arange(len(edge), device=R.device), samples)
    first = torch.cumsum(samples, 0) - samples
    fraction = ((torch.arange(len(owner), device=R.device) - first[owner])
                / (samples[owner] - 1).clamp(min=1)).to(points.dtype)[:, None]
    sample_points = ends[owner, 0] + fraction * (ends[owner, 1] - ends[owner, 0])   # (S, 3)
    projected = (K[pose[owner]] @ sample_points[:, :, None])[:, :, 0]
    u = (projected[:, 0] / projected[:, 2]).round().long()
    v = (projected[:, 1] / projected[:, 2]).round().long()
    inside = (u >= 0) & (u < width) & (v >= 0) & (v < height) & (sample_points[:, 2] > 0)
    pixel = (pose[owner] * height + v) * width + u
    depth = torch.full((batch * height * width,), torch.inf, dtype=points.dtype,
                       device=R.device).scatter_reduce(0, pixel[inside],
                                                       sample_points[inside, 2], reduce='amin')
    return torch.where(torch.isinf(depth), 0.0, depth).view(batch, height, width)


def grown_depth(depth: torch.Tensor, steps: int) -> torch.Tensor:
    """depth (B, H, W) with its 0 pixels filled from their 3 x 3 neighbours, ``steps`` times (the
    largest neighbouring depth)."""
    grown = depth[:, None]
    for _ in range(steps):
        neighbours = F.max_pool2d(grown, kernel_size=3, stride=1, padding=1)
        grown = torch.where(grown > 0, grown, neighbours)
    return grown[:, 0]


def pixel_motion(depth: torch.Tensor, K: torch.Tensor, t: torch.Tensor,
                 radius: torch.Tensor) -> torch.Tensor:
    """(B, 2, 6, H, W) image motion (px per unit of each increment component) of the point at
    depth (B, H, W) metres on each pixel's ray; 0 where the depth is 0. ``radius`` (B,) metres is
    the increment's lateral unit, t (B, 3) the poses' translations."""
    batch, height, width = depth.shape
    v, u = torch.meshgrid(torch.arange(height, dtype=depth.dtype, device=depth.device),
                          torch.arange(width, dtype=depth.dtype, device=depth.device),
                          indexing='ij')
    fx, fy, cx, cy = (K[:, row, column, None, None] for row, column in ((0, 0), (1, 1), (0, 2),
                                                                        (1, 2)))
    z = depth.clamp(min=1e-6)
    x = (u - cx) / fx * depth
    y = (v - cy) / fy * depth
    relative = torch.stack([x, y, depth], dim=1) - t[:, :, None, None]            # (B, 3, H, W)
    zeros = torch.zeros_like(depth)
    # d(point) / d(omega_k) = e_k x relative: the increment rotates about the object's origin.
    px, py, pz = relative.unbind(1)
    d_omega = torch.stack([torch.stack([zeros, -pz, py], dim=1),
                           torch.stack([pz, zeros, -px], dim=1),
                           torch.stack([-py, px, zeros], dim=1)], dim=2)           # (B, 3, 3, H, W)
    lateral = radius[:, None, None].expand_as(depth)
    d_nu = torch.stack([torch.stack([lateral, zeros, zeros], dim=1),
                        torch.stack([zeros, lateral, zeros], dim=1),
                        t[:, :, None, None].expand(-1, -1, height, width)], dim=2)
    d_point = torch.cat([d_omega, d_nu], dim=2)                                    # (B, 3, 6, H, W)
    du = (fx[:, None] * d_point[:, 0] - (u - cx)[:, None] * d_point[:, 2]) / z[:, None]
    dv = (fy[:, None] * d_point[:, 1] - (v - cy)[:, None] * d_point[:, 2]) / z[:, None]
    seen = (depth > 0)[:, None]
    return torch.stack([torch.where(seen, du, 0.0), torch.where(seen, dv, 0.0)], dim=1)

"""Reference renderer: exact ray casting with Embree (through trimesh), not differentiable.

It is deliberately independent of the differentiable backends so that it can serve as their ground
truth in tests and benchmarks, and it renders the synthetic frames of the demo. Rays go through pixel
centres (OpenCV convention, as for K); with ``supersample`` s each pixel is the average of s x s rays.

Units: poses are object-to-camera ``(4, 4)`` with translations in metres; depth is the camera-frame z
in metres (0 where no object is hit); colours are linear 0..1 vertex colours (unlit albedo).
"""
from dataclasses import dataclass

import numpy as np
import trimesh
from trimesh.ray.ray_pyembree import RayMeshIntersector

from pose_node.mesh import ObjectModel


@dataclass
class RaycastImage:
    """Result of :func:`render_scene` for an image of H x W pixels and N objects."""

    rgb: np.ndarray        # (H, W, 3) float32 0..1, background 0 (premultiplied by coverage)
    depth: np.ndarray      # (H, W) float32 metres, nearest hit averaged over covered sub-samples
    coverage: np.ndarray   # (N, H, W) float32 0..1, fraction of sub-samples whose first hit is object i

    @property
    def labels(self) -> np.ndarray:
        """(H, W) int32: 1 + index of the object covering most of the pixel, 0 for background."""
        covered = self.coverage.sum(axis=0) >= 0.5
        return np.where(covered, self.coverage.argmax(axis=0) + 1, 0).astype(np.int32)


class RaycastScene:
    """Objects ready for ray casting; building the Embree BVH once per object is the costly part."""

    def __init__(self, models: list[ObjectModel]):
        self.models = list(models)
        self._meshes = [trimesh.Trimesh(m.vertices, m.faces, process=False) for m in self.models]
        self._intersectors = [RayMeshIntersector(mesh) for mesh in self._meshes]

    def render(self, poses: np.ndarray, K: np.ndarray, width: int, height: int,
               supersample: int = 1) -> RaycastImage:
        """Render all objects at ``poses`` (N, 4, 4) with intrinsics ``K`` (3, 3) into W x H pixels."""
        poses = np.asarray(poses, dtype=np.float64).reshape(-1, 4, 4)
        if len(poses) != len(self.models):
            raise ValueError(f'{len(poses)} poses for {len(self.models)} objects')
        directions_cam = _pixel_ray_directions(np.asarray(K, np.float64), width, height, supersample)
        n_rays = len(directions_cam)
        best_z = np.full(n_rays, np.inf)
        best_object = np.full(n_rays, -1)
        best_rgb = np.zeros((n_rays, 3))
        for index, (model, mesh, intersector, pose) in enumerate(
                zip(self.models, self._meshes, self._intersectors, poses)):
            R, t = pose[:3, :3], pose[:3, 3]
            # Cast in the model frame: one rigid transform of the rays instead of the whole mesh.
            origin_model = -R.T @ t
            directions_model = directions_cam @ R
            tri, ray, points = intersector.intersects_id(
                np.broadcast_to(origin_model, directions_model.shape), directions_model,
                multiple_hits=False, return_locations=True)
            if len(ray) == 0:
                continue
            z = points @ R[2] + t[2]
            closer = z < best_z[ray]
            tri, ray, points, z = tri[closer], ray[closer], points[closer], z[closer]
            best_z[ray] = z
            best_object[ray] = index
            best_rgb[ray] = _interpolate_vertex_colors(mesh, model.vertex_colors, tri, points)
        return _downsample(best_z, best_object, best_rgb, len(self.models), width, height, supersample)


def _pixel_ray_directions(K: np.ndarray, width: int, height: int, supersample: int) -> np.ndarray:
    """(H*s * W*s, 3) camera-frame ray directions with z = 1, row-major over the sub-sample grid."""
    offsets = (np.arange(supersample) + 0.5) / supersample - 0.5
    u = (np.arange(width)[:, None] + offsets[None, :]).reshape(-1)
    v = (np.arange(height)[:, None] + offsets[None, :]).reshape(-1)
    uu, vv = np.meshgrid(u, v)
    pixels = np.stack([uu.ravel(), vv.ravel(), np.ones(uu.size)], axis=1)
    return pixels @ np.linalg.inv(K).T


def _interpolate_vertex_colors(mesh: trimesh.Trimesh, vertex_colors: np.ndarray, tri: np.ndarray,
                               points: np.ndarray) -> np.ndarray:
    """(M, 3) colours at hit ``points`` (M, 3) on faces ``tri`` (M,), barycentric interpolation."""
    barycentric = trimesh.triangles.points_to_barycentric(mesh.triangles[tri], points)
    corner_colors = np.asarray(vertex_colors, np.float64)[mesh.faces[tri]]  # (M, 3 corners, 3 rgb)
    return np.einsum('mc,mcd->md', barycentric, corner_colors)


def _downsample(z, obj, rgb, n_objects, width, height, s) -> RaycastImage:
    """Average the (H*s, W*s) sub-sample grid into pixels."""
    def blocks(a):
        return a.reshape(height, s, width, s, *a.shape[1:])

    hit = obj >= 0
    coverage = np.stack([blocks((obj == i).astype(np.float32)).mean(axis=(1, 3))
                         for i in range(n_objects)])
    rgb_mean = blocks(np.where(hit[:, None], rgb, 0.0)).mean(axis=(1, 3))
    hits_per_pixel = blocks(hit.astype(np.float64)).sum(axis=(1, 3))
    depth_sum = blocks(np.where(hit, z, 0.0)).sum(axis=(1, 3))
    depth = np.divide(depth_sum, hits_per_pixel, out=np.zeros_like(depth_sum),
                      where=hits_per_pixel > 0)
    return RaycastImage(rgb=rgb_mean.astype(np.float32), depth=depth.astype(np.float32),
                        coverage=coverage)

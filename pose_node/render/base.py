"""The renderer interface shared by the differentiable backends (``soft``, ``mitsuba``).

A renderer draws one mesh at B poses: object-to-camera rotations ``R`` (B, 3, 3) and translations
``t`` (B, 3) in metres, intrinsics ``K`` (B, 3, 3) in pixels (OpenCV convention: integer pixel
coordinates are pixel centres), into images of ``height`` x ``width`` pixels. Outputs are torch
tensors on the mesh's device, differentiable with respect to ``R`` and ``t``.
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from pose_node.mesh import ObjectModel


@dataclass(frozen=True)
class MeshEdges:
    """Undirected edges of a mesh, vertices at equal positions welded (colour seams are not edges).

    vertices (E, 2) int64: the edge's end vertices; of_face (F, 3) int64: the edge id of corner
    k -> k+1 of each face; face_count (E,): how many faces share the edge.
    """

    vertices: torch.Tensor
    of_face: torch.Tensor
    face_count: torch.Tensor


@dataclass(frozen=True)
class RenderMesh:
    """An ObjectModel's geometry as tensors on one device.

    vertices (V, 3) float32 metres; faces (F, 3) int64; colors (V, 3) float32 0..1.
    """

    name: str
    vertices: torch.Tensor
    faces: torch.Tensor
    colors: torch.Tensor

    @classmethod
    def from_model(cls, model: ObjectModel, device: torch.device,
                   max_faces: int | None = None) -> 'RenderMesh':
        """Tensors of ``model`` on ``device``, decimated to at most ``max_faces`` faces if given."""
        if max_faces is not None and len(model.faces) > max_faces:
            model = model.decimated(max_faces)
        return cls(name=model.name,
                   vertices=torch.as_tensor(np.asarray(model.vertices, np.float32), device=device),
                   faces=torch.as_tensor(np.asarray(model.faces, np.int64), device=device),
                   colors=torch.as_tensor(np.asarray(model.vertex_colors, np.float32), device=device))

    @property
    def device(self) -> torch.device:
        return self.vertices.device

    @cached_property
    def edges(self) -> MeshEdges:
        """The mesh's :class:`MeshEdges` (computed once per mesh)."""
        _, welded = torch.unique(self.vertices, dim=0, return_inverse=True)
        start = welded[self.faces]
        end = start.roll(-1, dims=1)
        n_vertices = self.vertices.shape[0]
        keys = torch.minimum(start, end) * n_vertices + torch.maximum(start, end)
        unique_keys, of_face = torch.unique(keys.flatten(), return_inverse=True)
        of_face = of_face.view(self.faces.shape)
        corners = torch.stack([self.faces, self.faces.roll(-1, dims=1)], dim=-1)   # (F, 3, 2)
        vertices = torch.zeros(len(unique_keys), 2, dtype=torch.long, device=self.device)
        vertices[of_face.flatten()] = corners.reshape(-1, 2)
        face_count = torch.bincount(of_face.flatten(), minlength=len(unique_keys))
        return MeshEdges(vertices=vertices, of_face=of_face, face_count=face_count)


@dataclass(frozen=True)
class Shading:
    """How colour is computed: unlit albedo (default), or Lambert with one directional light.

    ``light_direction`` (3,) is the direction the light travels, in the camera frame; the colour is
    albedo * (ambient + diffuse * max(0, -n . light_direction)). ``normals``: also render the
    surface's camera-frame normals (``RenderOutput.normal``), from which a lighting model can be
    fitted to an image (:func:`pose_node.refine.losses.lit_colours`).
    """

    lambert: bool = False
    light_direction: tuple[float, float, float] = (0.0, 0.0, 1.0)
    ambient: float = 0.4
    diffuse: float = 0.6
    normals: bool = False


@dataclass
class RenderOutput:
    """silhouette (B, H, W) 0..1; rgb (B, H, W, 3) 0..1, 0 on background; depth (B, H, W) metres,
    camera-frame z, 0 on background. rgb and depth are None where only the silhouette was asked
    for (the refiner's sharp renders without a colour term). normal (B, H, W, 3): the surface's
    camera-frame unit normals premultiplied by coverage like rgb, where ``Shading.normals`` asked
    for them, else None."""

    silhouette: torch.Tensor
    rgb: torch.Tensor | None
    depth: torch.Tensor | None
    normal: torch.Tensor | None = None


class Renderer(ABC):
    """A differentiable renderer backend; ``renders_normals``: whether it honours
    ``Shading.normals``."""

    name: str
    renders_normals: bool = False

    @abstractmethod
    def render(self, mesh: RenderMesh, R: torch.Tensor, t: torch.Tensor, K: torch.Tensor,
               width: int, height: int, shading: Shading = Shading()) -> RenderOutput:
        """Render ``mesh`` at B poses; see the module docstring for shapes and units."""

"""Renderers: differentiable backends behind one interface (``base.Renderer``) and the exact
ray-cast reference (``raycast``)."""
import torch

from pose_node.render.base import Renderer, RenderMesh, RenderOutput, Shading

BACKENDS = ('soft', 'mitsuba')


def make_renderer(backend: str, device: torch.device) -> Renderer:
    """The differentiable renderer called ``backend`` (one of BACKENDS) running on ``device``."""
    if backend == 'soft':
        from pose_node.render.soft import SoftRenderer
        return SoftRenderer(device)
    if backend == 'mitsuba':
        from pose_node.render.mitsuba_backend import MitsubaRenderer
        return MitsubaRenderer(device)
    raise ValueError(f'unknown renderer backend {backend!r}; choose one of {", ".join(BACKENDS)}')


__all__ = ['BACKENDS', 'Renderer', 'RenderMesh', 'RenderOutput', 'Shading', 'make_renderer']

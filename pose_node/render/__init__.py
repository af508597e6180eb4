"""Renderers: differentiable backends behind one interface (``base.Renderer``) and the exact
ray-cast reference (``raycast``)."""
import logging

import torch

from pose_node.render.base import Renderer, RenderMesh, RenderOutput, Shading

BACKENDS = ('soft', 'mitsuba')
CHOICES = ('auto', *BACKENDS)

_log = logging.getLogger(__name__)


def make_renderer(backend: str, device: torch.device) -> Renderer:
    """The differentiable renderer called ``backend`` (one of CHOICES) running on ``device``.

    'auto' takes Mitsuba when its LLVM (CPU) or CUDA variant works here — probed in a subprocess,
    since a wrong libLLVM aborts the process — and the pure-PyTorch soft rasterizer otherwise,
    logging which and why.
    """
    if backend == 'auto':
        from pose_node.render.mitsuba_backend import probe_mitsuba, variant_for_device
        variant = variant_for_device(device)
        usable, reason = probe_mitsuba(variant)
        backend = 'mitsuba' if usable else 'soft'
        _log.info('renderer auto: %s (mitsuba %s: %s)', backend, variant,
                  'usable' if usable else reason)
    if backend == 'soft':
        from pose_node.render.soft import SoftRenderer
        return SoftRenderer(device)
    if backend == 'mitsuba':
        from pose_node.render.mitsuba_backend import MitsubaRenderer
        return MitsubaRenderer(device)
    raise ValueError(f'unknown renderer backend {backend!r}; choose one of {", ".join(CHOICES)}')


__all__ = ['BACKENDS', 'CHOICES', 'Renderer', 'RenderMesh', 'RenderOutput', 'Shading',
           'make_renderer']

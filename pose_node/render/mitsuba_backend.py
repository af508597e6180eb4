"""Mitsuba 3 backend: silhouette and unlit colour with exact visibility gradients.

How it renders, and why:
- Mitsuba's alpha channel carries no gradient, so the mesh is an area emitter whose radiance is
  its vertex colour (unlit albedo) and the scene holds nothing else. The silhouette is the same
  render with radiance 1. Visibility edges are differentiated by ``direct_projective``'s
  projective sampling (Zhang et al. 2023), in a subclass that only looks up the emission at the
  first hit (nothing is lit, so light sampling would only cost time) and has no indirect part.
- The sensor is one canonical pinhole at the origin for a given image size. The intrinsics ``K``
  enter as the linear map ``K0^-1 K`` applied to the camera-frame vertices: it keeps z, so it
  maps a ray through pixel (u, v) of ``K`` onto the canonical ray through (u, v), which gives
  fx != fy and any principal point without touching the sensor, and depth stays camera z.
  Mitsuba's camera looks along +z with x left and y up, hence the extra flip of x and y.
- Area emitters shine on the side their shading normal faces only, so vertex normals are set to
  point at the camera: any winding renders (some scanned meshes are not consistently oriented).
- Projective sampling needs a manifold mesh: where edges shared by more than two faces lie on
  the outline, the silhouette gradient there comes out too large (measured 1.7x along a cone rim
  glued to a body by an earlier, non-manifold decimation). A warning names such meshes;
  ``ObjectModel.decimated`` keeps meshes manifold.
- Forward: one ray-cast pass of our own, ``grid`` x ``grid`` stratified rays per pixel, gives
  silhouette, colour and depth together (pixel-area averages, like the ray-cast reference's
  supersampling). Backward: Mitsuba's ``render_backward`` with ``spp`` samples per pixel, once
  per output whose gradient is needed (silhouette, colour), with fresh samples: an unbiased
  estimate of the gradient of the forward's expectation, as in Mitsuba's own forward/backward.
  The silhouette gradient has low variance; the colour gradient's interior part is noisy where
  the colours vary within a pixel (about 85 % per estimate at spp 8 on the demo object's bands,
  under 10 % once its colours are smoothed), so colour terms want more spp or smoother colours.
- B poses are a Python loop over one scene per (mesh, image size) whose vertex buffer is
  rewritten for each pose; nothing is rebuilt per call except the ray-tracing BVH. A backward
  pass re-uploads its pose's vertices unless the scene still holds them (the last pose does).

Process safety: drjit loads the first libLLVM it finds, and the libLLVM 15 on this image aborts
the whole process inside the JIT. ``configure_drjit_llvm`` points drjit at libLLVM 19 before
Mitsuba's LLVM backend starts, and ``probe_mitsuba`` renders a tiny scene in a subprocess first,
so a bad setup becomes a RuntimeError with the probe's reason instead of a crash.

Units as in ``base``: metres, pixels, OpenCV pixel centres; depth is camera-frame z in metres.
"""
from __future__ import annotations

import functools
import glob
import math
import os
import signal
import subprocess
import sys
import warnings
from collections import OrderedDict
from pathlib import Path

import torch

from pose_node.render.base import Renderer, RenderMesh, RenderOutput, Shading

LIBLLVM_ENV = 'DRJIT_LIBLLVM_PATH'
LIBLLVM_GLOBS = ('/usr/lib/*/libLLVM.so.19*', '/usr/lib/*/libLLVM-19.so*',
                 '/usr/lib/llvm-19/lib/libLLVM*.so*')
"""Where a libLLVM 19 is looked for; older versions abort inside drjit 1.5 (``fminimum``)."""

PROBE_TIMEOUT_S = 60.0

CANONICAL_FOV_X_DEG = math.degrees(2.0 * math.atan(0.5))
"""Horizontal field of view of the canonical sensor, whose focal length is the image width."""

MITSUBA_TO_OPENCV = (-1.0, -1.0, 1.0)
"""Axis signs from the OpenCV camera frame (x right, y down) to Mitsuba's (x left, y up)."""

_PROBE_SCRIPT = """
import sys
import drjit as dr
import mitsuba as mi
mi.set_variant(sys.argv[1])
props = mi.Properties()
props['emitter'] = mi.load_dict({'type': 'area', 'radiance': 1.0})
mesh = mi.Mesh('probe', 3, 1, props=props)
params = mi.traverse(mesh)
params['vertex_positions'] = mi.Float([-1, -1, 3, 1, -1, 3, 0, 1, 3])
params['faces'] = mi.UInt32([0, 2, 1])
params.update()
scene = mi.load_dict({'type': 'scene', 'mesh': mesh,
                      'integrator': {'type': 'direct_projective', 'sppi': 0},
                      'sensor': {'type': 'perspective', 'fov': 60,
                                 'film': {'type': 'hdrfilm', 'width': 8, 'height': 8,
                                          'sample_border': True}}})
params = mi.traverse(scene)
dr.enable_grad(params['mesh.vertex_positions'])
params.update()
image = mi.render(scene, params, spp=2)
dr.backward(dr.mean(image, axis=None))
total = float(image.numpy().sum())
gradient = dr.grad(params['mesh.vertex_positions']).numpy()
assert total > 0.0, f'the probe rendered an empty image (sum {total})'
assert abs(gradient).sum() > 0.0, 'the probe got no vertex gradient'
print('ok', total)
"""


def find_libllvm(patterns: tuple[str, ...] = LIBLLVM_GLOBS) -> Path | None:
    """The first existing shared library matching ``patterns`` (in order), or None."""
    for pattern in patterns:
        for path in sorted(glob.glob(pattern)):
            if Path(path).is_file():
                return Path(path)
    return None


def configure_drjit_llvm() -> Path | None:
    """Point drjit at libLLVM 19 through ``DRJIT_LIBLLVM_PATH`` unless that is already set.

    Must run before the process first uses an ``llvm_*`` variant (drjit loads LLVM then, once).
    Returns the library in effect, or None when none was set and none was found.
    """
    if os.environ.get(LIBLLVM_ENV):
        return Path(os.environ[LIBLLVM_ENV])
    path = find_libllvm()
    if path is not None:
        os.environ[LIBLLVM_ENV] = str(path)
    return path


def variant_for_device(device: torch.device) -> str:
    """The Mitsuba variant whose arrays live where ``device``'s tensors do."""
    device = torch.device(device)
    if device.type == 'cpu':
        return 'llvm_ad_rgb'
    if device.type == 'cuda':
        return 'cuda_ad_rgb'
    raise ValueError(f'the Mitsuba backend runs on cpu or cuda devices, not {device}')


def probe_mitsuba(variant: str, libllvm: Path | None = None) -> tuple[bool, str]:
    """Whether ``variant`` renders and differentiates a tiny scene in a subprocess.

    ``libllvm`` is the library the subprocess gets as ``DRJIT_LIBLLVM_PATH`` (default: the one
    ``configure_drjit_llvm`` chooses). Returns (ok, reason); the caller never crashes, whatever
    the subprocess does (abort, timeout). Cached per (variant, library) for the process.
    """
    if libllvm is None:
        libllvm = configure_drjit_llvm()
    return _probe_mitsuba_cached(variant, None if libllvm is None else str(libllvm))


@functools.lru_cache(maxsize=None)
def _probe_mitsuba_cached(variant: str, libllvm: str | None) -> tuple[bool, str]:
    env = dict(os.environ)
    if libllvm is not None:
        env[LIBLLVM_ENV] = libllvm
    try:
        done = subprocess.run([sys.executable, '-c', _PROBE_SCRIPT, variant], env=env,
                              capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f'probe of {variant} did not finish within {PROBE_TIMEOUT_S:.0f} s'
    if done.returncode == 0:
        return True, f'{variant} renders (libLLVM: {libllvm or "drjit default"})'
    return False, (f'probe of {variant} with libLLVM {libllvm or "(drjit default)"} '
                   f'{_describe_exit(done.returncode)}: {_last_lines(done.stderr + done.stdout)}')


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f'was killed by {signal.Signals(-returncode).name}'
    return f'exited with status {returncode}'


def _last_lines(text: str, count: int = 3) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return ' | '.join(lines[-count:]) or '(no output)'


# --------------------------------------------------------------------------- camera geometry

def canonical_intrinsics(width: int, height: int) -> torch.Tensor:
    """(3, 3) float64 K of the canonical sensor: focal length ``width`` px, centred principal
    point in OpenCV pixel coordinates (pixel centres are integers)."""
    return torch.tensor([[float(width), 0.0, (width - 1) / 2.0],
                         [0.0, float(width), (height - 1) / 2.0],
                         [0.0, 0.0, 1.0]], dtype=torch.float64)


def sensor_space_vertices(vertices: torch.Tensor, R: torch.Tensor, t: torch.Tensor,
                          K: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(B, V, 3) vertices in the canonical Mitsuba sensor's frame.

    vertices (V, 3) model frame, R (B, 3, 3), t (B, 3) metres, K (B, 3, 3) pixels. The canonical
    sensor sees these exactly where a camera with ``K`` sees the posed model; the third
    coordinate is the camera-frame z in metres.
    """
    K0_inv = torch.linalg.inv(canonical_intrinsics(width, height)).to(R)
    flip = torch.tensor(MITSUBA_TO_OPENCV, dtype=R.dtype, device=R.device)
    to_sensor = flip[:, None] * (K0_inv @ K.to(R))                          # (B, 3, 3)
    # Broadcast products, not matmul: a (V, 3) x (3, 3) product goes to a threaded BLAS whose
    # start-up cost tens of ms on a busy CPU (measured beside drjit's thread pool).
    camera = (vertices.to(R)[None, :, None, :] * R[:, None]).sum(-1) + t[:, None, :]
    return (camera[:, :, None, :] * to_sensor[:, None]).sum(-1).to(torch.float32)


def non_manifold_edge_count(faces: torch.Tensor) -> int:
    """How many undirected edges of ``faces`` (F, 3) are shared by more than two faces."""
    edges = torch.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), dim=1).values
    _, counts = torch.unique(edges, dim=0, return_counts=True)
    return int((counts > 2).sum())


def camera_facing_normals(points: torch.Tensor) -> torch.Tensor:
    """(..., 3) unit normals from ``points`` (..., 3) towards the camera at the origin."""
    return -points / points.norm(dim=-1, keepdim=True).clamp_min(1e-12)


# --------------------------------------------------------------------------- scene

def _emission_projective_integrator(mi, dr):
    """A ``direct_projective`` integrator that only looks up the emission at the first hit.

    The scene is one emitter and nothing is lit, so the light and BSDF sampling of
    ``direct_projective`` add only cost (about half of the backward pass); the projective
    machinery (edge sampling for visibility) is inherited unchanged.
    """
    from mitsuba.python.ad.integrators.direct_projective import DirectProjectiveIntegrator

    class EmissionProjectiveIntegrator(DirectProjectiveIntegrator):
        def sample(self, mode, scene, sampler, ray, depth, δL, state_in, active,
                   project=False, si_shade=None, **kwargs):
            del sampler, depth, δL, state_in, project, kwargs  # nothing is scattered
            with dr.resume_grad(when=mode != dr.ADMode.Primal):
                hit = si_shade if si_shade is not None else scene.ray_intersect(
                    ray, ray_flags=mi.RayFlags.All, coherent=True, active=active)
                radiance = hit.emitter(scene).eval(hit, active)
            return radiance, active, [], None

    props = mi.Properties()
    props['sppi'] = 0  # nothing is lit, so there are no indirect visibility edges
    return EmissionProjectiveIntegrator(props)


class _MeshScene:
    """One mesh as an emitter in front of the canonical sensor, for one image size.

    It holds one pose's vertices at a time, named by a ``token``, so that a backward pass right
    after its forward pass need not upload them again (each upload rebuilds the BVH).
    Holds Mitsuba objects of the variant that was active when it was built.
    """

    def __init__(self, mi, mesh: RenderMesh, width: int, height: int):
        import drjit as dr
        self.mi, self.dr = mi, dr
        self.width, self.height = width, height
        shared = non_manifold_edge_count(mesh.faces)
        if shared:
            warnings.warn(
                f'mesh {mesh.name!r}: {shared} edges are shared by more than two faces; '
                'Mitsuba overestimates silhouette gradients where they lie on the outline '
                '(repair the mesh, or decimate it with ObjectModel.decimated, which keeps it '
                'manifold)', RuntimeWarning, stacklevel=4)
        props = mi.Properties()
        props['emitter'] = mi.load_dict({
            'type': 'area', 'radiance': {'type': 'mesh_attribute', 'name': 'vertex_color'}})
        shape = mi.Mesh(mesh.name or 'object', len(mesh.vertices), len(mesh.faces), props=props,
                        has_vertex_normals=True)
        self.colors = mi.Float(_flat(mesh.colors))
        self.ones = dr.ones(mi.Float, dr.width(self.colors))
        shape.add_attribute('vertex_color', 3, self.colors)
        self.scene = mi.load_dict({
            'type': 'scene',
            'object': shape,
            'sensor': {
                'type': 'perspective', 'fov_axis': 'x', 'fov': CANONICAL_FOV_X_DEG,
                'near_clip': 1e-3, 'far_clip': 1e3,
                'film': {'type': 'hdrfilm', 'width': width, 'height': height,
                         'pixel_format': 'rgb', 'rfilter': {'type': 'box'},
                         'sample_border': True},
                'sampler': {'type': 'independent'}}})
        self.params = mi.traverse(self.scene)
        self.params['object.faces'] = mi.UInt32(_flat(mesh.faces.to(torch.int32)))
        self.params.update()
        self.sensor = self.scene.sensors()[0]
        self.integrator = _emission_projective_integrator(mi, dr)
        self.sampler = self.sensor.sampler().clone()
        self.token: int | None = None

    def load(self, positions: torch.Tensor, token: int) -> None:
        """Hold the sensor-space vertex ``positions`` (V, 3), grad-enabled, as pose ``token``."""
        flat = self.mi.Float(_flat(positions))
        self.dr.enable_grad(flat)
        self.params['object.vertex_positions'] = flat
        self.params['object.vertex_normals'] = self.mi.Float(
            _flat(camera_facing_normals(positions)))
        self.params.update()
        self.token = token

    def trace(self, seed: int, grid: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Silhouette (H, W), colour (H, W, 3) and depth (H, W) of the held pose.

        Each pixel is split into ``grid`` x ``grid`` cells with one uniformly jittered ray each
        (stratified: unbiased pixel-area averages with little noise). Depth is the mean camera
        z over the rays that hit, 0 where none does.
        """
        mi, dr = self.mi, self.dr
        width, height = self.width, self.height
        rays_per_pixel = grid * grid
        with dr.suspend_grad():
            count = width * height * rays_per_pixel
            index = dr.arange(mi.UInt32, count)
            pixel, cell = index // rays_per_pixel, index % rays_per_pixel
            self.sampler.seed(dr.opaque(mi.UInt32, seed), count)
            jitter = self.sampler.next_2d()
            x = mi.Float(pixel % width) + (mi.Float(cell % grid) + jitter.x) / grid
            y = mi.Float(pixel // width) + (mi.Float(cell // grid) + jitter.y) / grid
            ray, _ = self.sensor.sample_ray(0.0, 0.5, mi.Point2f(x / width, y / height),
                                            mi.Point2f(0.5))
            hit_point = self.scene.ray_intersect(ray, mi.RayFlags.All, coherent=True)
            hit = hit_point.is_valid()
            per_ray = [dr.select(hit, 1.0, 0.0), dr.select(hit, hit_point.p.z, 0.0),
                       *hit_point.emitter(self.scene).eval(hit_point, hit)]
            # One kernel traces the rays; each block sum would otherwise trace them again.
            dr.eval(per_ray)
            hits, depth_sum, *channels = (dr.block_sum(value, rays_per_pixel)
                                          for value in per_ray)
            channels = [channel / rays_per_pixel for channel in channels]
            depth = depth_sum / dr.maximum(hits, 1.0)
            silhouette = hits / rays_per_pixel
            dr.eval(silhouette, depth, channels)
        shape = (height, width)
        return (silhouette.torch().reshape(shape),
                torch.stack([c.torch().reshape(shape) for c in channels], dim=-1),
                depth.torch().reshape(shape))

    def vertex_gradient(self, positions: torch.Tensor, token: int,
                        grad_silhouette: torch.Tensor | None, grad_rgb: torch.Tensor | None,
                        seed: int, spp: int) -> torch.Tensor:
        """(V, 3) gradient of sum(grad_silhouette * silhouette + grad_rgb * rgb) with respect
        to the sensor-space vertex ``positions`` (V, 3) of pose ``token``."""
        mi, dr = self.mi, self.dr
        if self.token != token:
            self.load(positions, token)
        passes = []
        if grad_silhouette is not None:
            # Each channel of the radiance-1 render is the silhouette; the loss sees their mean.
            # Constant radiance has no continuous derivative: only the edges are sampled.
            # (The broadcast is done by drjit: torch's threaded copy is slow at this size.)
            per_pixel = mi.Float(_flat(grad_silhouette.to(torch.float32)))
            passes.append((self.ones, dr.repeat(per_pixel, 3) / 3.0, 0))
        if grad_rgb is not None:
            passes.append((self.colors, mi.Float(_flat(grad_rgb.to(torch.float32))), None))
        for radiance, grad_image, continuous_spp in passes:
            self.params['object.vertex_color'] = radiance
            self.params.update()
            self.integrator.sppc = continuous_spp
            self.integrator.render_backward(
                self.scene, self.params,
                grad_in=mi.TensorXf(grad_image, shape=(self.height, self.width, 3)),
                seed=dr.opaque(mi.UInt32, seed), spp=spp)
        self.params['object.vertex_color'] = self.colors
        self.params.update()
        flat_positions = self.params['object.vertex_positions']
        gradient = dr.grad(flat_positions).torch().reshape(-1, 3).to(positions)
        dr.clear_grad(flat_positions)
        return gradient


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1)


def _seed(token: int, use: int) -> int:
    """A 32-bit sampler seed for pose ``token``: use 0 forward, 1 backward."""
    return (2 * token + use) & 0xFFFFFFFF


class _RenderPose(torch.autograd.Function):
    """Torch autograd node around one Mitsuba render of sensor-space vertices (V, 3)."""

    @staticmethod
    def forward(ctx, positions: torch.Tensor, scene: _MeshScene, token: int, spp: int,
                grid: int):
        positions = positions.detach()
        scene.load(positions, token)
        silhouette, rgb, depth = scene.trace(_seed(token, 0), grid)
        ctx.save_for_backward(positions)
        ctx.scene, ctx.token, ctx.spp = scene, token, spp
        ctx.mark_non_differentiable(depth)
        ctx.set_materialize_grads(False)
        return silhouette, rgb, depth

    @staticmethod
    def backward(ctx, grad_silhouette, grad_rgb, grad_depth):
        del grad_depth  # depth is not differentiable
        if grad_silhouette is None and grad_rgb is None:
            return None, None, None, None, None
        (positions,) = ctx.saved_tensors
        gradient = ctx.scene.vertex_gradient(positions, ctx.token, grad_silhouette, grad_rgb,
                                             _seed(ctx.token, 1), ctx.spp)
        return gradient, None, None, None, None


# --------------------------------------------------------------------------- renderer

class MitsubaRenderer(Renderer):
    """Mitsuba 3 projective-sampling renderer on ``device`` (llvm on CPU, cuda on CUDA).

    spp: samples per pixel of Mitsuba's gradient estimate (each backward pass). grid: the
    forward images average grid x grid stratified rays per pixel (one ray cast each; an odd
    grid never gives a coverage of exactly 0.5). seed: first sample seed; every pose rendered
    gets the next one. max_scenes: how many (mesh, image size) scenes are kept.
    Raises RuntimeError with the probe's reason if Mitsuba cannot run here.
    """

    name = 'mitsuba'

    def __init__(self, device: torch.device, spp: int = 2, grid: int = 3, seed: int = 0,
                 max_scenes: int = 8):
        self.device = torch.device(device)
        self.spp, self.grid = int(spp), int(grid)
        self.variant = variant_for_device(self.device)
        ok, reason = probe_mitsuba(self.variant)
        if not ok:
            raise RuntimeError(f'the Mitsuba renderer cannot run on {self.device}: {reason}')
        import mitsuba
        self._mi = mitsuba
        self._mi.set_variant(self.variant)
        self._next_token = int(seed)
        self._max_scenes = max_scenes
        self._scenes: OrderedDict[tuple, tuple[RenderMesh, _MeshScene]] = OrderedDict()

    def render(self, mesh: RenderMesh, R: torch.Tensor, t: torch.Tensor, K: torch.Tensor,
               width: int, height: int, shading: Shading = Shading()) -> RenderOutput:
        """See ``Renderer.render``; the B poses are rendered one after another in one scene."""
        if shading.lambert:
            raise NotImplementedError(
                'the Mitsuba backend renders unlit albedo only (the mesh is an emitter so that '
                'visibility gets exact gradients); use Shading() or the soft backend for Lambert')
        if shading.normals:
            raise NotImplementedError(
                'the Mitsuba backend renders no normals; use the soft backend, or a loss that '
                "fits a colour gain only (LossConfig(colour_fit='gain'))")
        if self._mi.variant() != self.variant:
            self._mi.set_variant(self.variant)
        scene = self._scene(mesh, int(width), int(height))
        images = []
        for pose_positions in sensor_space_vertices(mesh.vertices, R, t, K, width, height):
            images.append(_RenderPose.apply(pose_positions, scene, self._next_token, self.spp,
                                            self.grid))
            self._next_token += 1
        silhouette, rgb, depth = (torch.stack(parts) for parts in zip(*images))
        return RenderOutput(silhouette=silhouette.to(self.device), rgb=rgb.to(self.device),
                            depth=depth.to(self.device))

    def _scene(self, mesh: RenderMesh, width: int, height: int) -> _MeshScene:
        """The scene of ``mesh`` at this image size, built on first use.

        One scene serves every pose: a scene of its own per batch slot would JIT-compile every
        kernel again (the BVH's address is part of the kernels).
        """
        key = (id(mesh), width, height)
        if key not in self._scenes:
            # The mesh is kept with its scene so that its id cannot be reused meanwhile.
            self._scenes[key] = (mesh, _MeshScene(self._mi, mesh, width, height))
            while len(self._scenes) > self._max_scenes:
                self._scenes.popitem(last=False)
        self._scenes.move_to_end(key)
        return self._scenes[key][1]

"""Renderer correctness against the exact ray-cast reference (Embree), for every backend.

The shared tests run through ``make_renderer(name, cpu)`` only, so any backend in
``pose_node.render.BACKENDS`` is checked the same way; a backend whose module cannot be imported
yet is skipped with the reason. Tests after the shared ones exercise the ``soft`` backend's own
features (hard mode, sigma, batching, near plane, Lambert shading).

Scene: the demo object (decimated to ~2k faces, the same mesh for the backends and the reference)
about 0.5 m away, 128 x 128 pixels, focal length 280 px: the object spans about 80 px.
"""
import importlib
from dataclasses import dataclass

import cv2
import numpy as np
import pytest
import torch
import trimesh
from scipy.spatial.transform import Rotation
from trimesh.ray.ray_pyembree import RayMeshIntersector

from pose_node.geometry import axis_angle_to_matrix
from pose_node.mesh import ObjectModel
from pose_node.render import BACKENDS, RenderMesh, Shading, make_renderer
from pose_node.render.raycast import RaycastScene
from pose_node.render.soft import SoftRenderer
from pose_node.resources import load_demo_object

SIZE = 128
FOCAL = 280.0
K = np.array([[FOCAL, 0.0, (SIZE - 1) / 2], [0.0, FOCAL, (SIZE - 1) / 2], [0.0, 0.0, 1.0]])
MAX_FACES = 2000
REFERENCE_SUPERSAMPLE = 4

MIN_SILHOUETTE_IOU = 0.99
MAX_MEDIAN_DEPTH_ERROR_M = 1e-3
MAX_INTERIOR_COLOUR_MAE = 0.02
INTERIOR_EROSION_PX = 2
SHIFT_PX = 2.0
MAX_SHIFTED_IOU = 0.97


@dataclass(frozen=True)
class GradientCheck:
    """Central finite differences vs autograd for one backend. step_px: the finite-difference
    step, in pixels of image motion; Monte-Carlo backends need steps larger than their noise."""

    step_px: float
    min_cosine: float
    max_relative_norm_error: float


GRADIENT_CHECKS = {
    # Steps far below sqrt(sigma) of the default sigma (0.02 px^2), where the loss is linear.
    'soft': GradientCheck(step_px=0.005, min_cosine=0.95, max_relative_norm_error=0.2),
    # Mitsuba's gradients are Monte-Carlo estimates: looser by design.
    'mitsuba': GradientCheck(step_px=0.5, min_cosine=0.9, max_relative_norm_error=0.3),
}


# ------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope='module')
def model() -> ObjectModel:
    return load_demo_object().decimated(MAX_FACES)


@pytest.fixture(scope='module')
def mesh(model) -> RenderMesh:
    return RenderMesh.from_model(model, torch.device('cpu'))


@pytest.fixture(scope='module')
def scene(model) -> RaycastScene:
    return RaycastScene([model])


@pytest.fixture(scope='module')
def poses() -> np.ndarray:
    """(3, 4, 4) object-to-camera poses 0.45-0.55 m away, random rotations."""
    rotations = Rotation.random(3, random_state=7).as_matrix()
    translations = np.array([[0.01, -0.005, 0.45], [-0.008, 0.01, 0.5], [0.0, 0.004, 0.55]])
    result = np.tile(np.eye(4), (3, 1, 1))
    result[:, :3, :3] = rotations
    result[:, :3, 3] = translations
    return result


@pytest.fixture(scope='module')
def references(scene, poses) -> list:
    return [scene.render(pose[None], K, SIZE, SIZE, supersample=REFERENCE_SUPERSAMPLE)
            for pose in poses]


@pytest.fixture(scope='module', params=BACKENDS)
def backend(request):
    """(name, renderer) for each backend; skipped while its module cannot be imported."""
    name = request.param
    if name == 'mitsuba':
        try:
            importlib.import_module('pose_node.render.mitsuba_backend')
        except ImportError as error:
            pytest.skip(f'mitsuba backend not importable yet: {error}')
    return name, make_renderer(name, torch.device('cpu'))


@pytest.fixture(scope='module')
def rendered(backend, mesh, poses):
    """The backend's RenderOutput (numpy arrays) for all poses in one batched call."""
    _, renderer = backend
    out = _render(renderer, mesh, poses)
    return {key: getattr(out, key).detach().numpy() for key in ('silhouette', 'rgb', 'depth')}


# ------------------------------------------------------------------------------------- helpers

def _render(renderer, mesh: RenderMesh, poses: np.ndarray, **kwargs):
    R = torch.tensor(poses[:, :3, :3], dtype=torch.float32)
    t = torch.tensor(poses[:, :3, 3], dtype=torch.float32)
    return renderer.render(mesh, R, t, _intrinsics(len(poses)), SIZE, SIZE, **kwargs)


def _intrinsics(batch: int) -> torch.Tensor:
    """K repeated to (batch, 3, 3)."""
    return torch.tensor(K, dtype=torch.float32).expand(batch, 3, 3)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def _interior(coverage: np.ndarray) -> np.ndarray:
    """Pixels fully covered in the reference, at least INTERIOR_EROSION_PX from its border."""
    size = 2 * INTERIOR_EROSION_PX + 1
    full = (coverage >= 1.0).astype(np.uint8)
    return cv2.erode(full, np.ones((size, size), np.uint8)).astype(bool)


def _smooth_random_image(rng: np.random.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Float64 zero-mean noise of ``shape`` (1, H, W[, C]) blurred over a few pixels: weights
    whose sum over the image depends on where the object's pixels move, not only on how many."""
    noise = rng.standard_normal(shape[1:]).astype(np.float32)
    blurred = cv2.GaussianBlur(noise, (0, 0), 4.0).reshape(shape)
    return torch.tensor(blurred / blurred.std(), dtype=torch.float64)


def _shifted(pose: np.ndarray, pixels: float) -> np.ndarray:
    """The pose moved sideways so that its image moves ``pixels`` to the right."""
    moved = pose.copy()
    moved[0, 3] += pixels * pose[2, 3] / FOCAL
    return moved


# ------------------------------------------------------------------------------ shared backends

def test_silhouette_iou_against_reference(rendered, references):
    for index, reference in enumerate(references):
        iou = _iou(rendered['silhouette'][index] > 0.5, reference.coverage[0] > 0.5)
        assert iou >= MIN_SILHOUETTE_IOU, f'pose {index}: IoU {iou:.4f}'


def test_depth_against_reference(rendered, references):
    for index, reference in enumerate(references):
        both = (rendered['silhouette'][index] > 0.5) & (rendered['depth'][index] > 0) \
            & (reference.coverage[0] >= 1.0)
        assert both.sum() > 1000
        error = np.abs(rendered['depth'][index] - reference.depth)[both]
        assert np.median(error) < MAX_MEDIAN_DEPTH_ERROR_M, f'pose {index}'


def test_unlit_colour_against_reference(rendered, references):
    for index, reference in enumerate(references):
        interior = _interior(reference.coverage[0])
        assert interior.sum() > 1000
        mae = np.abs(rendered['rgb'][index] - reference.rgb)[interior].mean()
        # The object is not one flat colour, so matching it means interpolating it.
        assert reference.rgb[interior].std(axis=0).max() > 5 * MAX_INTERIOR_COLOUR_MAE
        assert mae < MAX_INTERIOR_COLOUR_MAE, f'pose {index}: colour MAE {mae:.4f}'


def test_shifted_pose_is_detected(rendered, references, scene, poses):
    """The IoU test can fail: a 2 px offset of the reference drops the IoU clearly."""
    shifted = scene.render(_shifted(poses[0], SHIFT_PX)[None], K, SIZE, SIZE,
                           supersample=REFERENCE_SUPERSAMPLE)
    silhouette = rendered['silhouette'][0] > 0.5
    assert _iou(silhouette, references[0].coverage[0] > 0.5) >= MIN_SILHOUETTE_IOU
    assert _iou(silhouette, shifted.coverage[0] > 0.5) < MAX_SHIFTED_IOU


def test_pose_gradient_matches_finite_differences(backend, mesh, poses):
    """Gradient of sum(silhouette * W) + sum(rgb * W2) (W, W2 fixed smooth random images) with
    respect to a 6-vector: a small rotation vector on the left of R and a translation, each
    scaled so that a unit step moves the object's outline by about one pixel."""
    name, renderer = backend
    check = GRADIENT_CHECKS[name]
    pose = poses[1]
    R0 = torch.tensor(pose[:3, :3], dtype=torch.float32)
    t0 = torch.tensor(pose[:3, 3], dtype=torch.float32)
    depth, radius = float(pose[2, 3]), 0.05
    pixel_scale = torch.tensor([depth / (FOCAL * radius)] * 3 + [depth / FOCAL] * 2
                               + [depth ** 2 / (FOCAL * radius)])
    rng = np.random.default_rng(3)
    weights = _smooth_random_image(rng, (1, SIZE, SIZE))
    colour_weights = _smooth_random_image(rng, (1, SIZE, SIZE, 3))

    def losses(delta_px: torch.Tensor) -> torch.Tensor:
        """(N,) losses at N perturbations delta_px (N, 6), rendered as one batch."""
        delta = (delta_px * pixel_scale).float()
        R = axis_angle_to_matrix(delta[:, :3]) @ R0
        out = renderer.render(mesh, R, t0 + delta[:, 3:], _intrinsics(len(delta)), SIZE, SIZE)
        return (out.silhouette.double() * weights).sum(dim=(1, 2)) \
            + (out.rgb.double() * colour_weights).sum(dim=(1, 2, 3))

    delta = torch.zeros(1, 6, dtype=torch.float64, requires_grad=True)
    losses(delta).sum().backward()
    analytic = delta.grad[0].numpy()
    with torch.no_grad():
        steps = check.step_px * torch.eye(6, dtype=torch.float64)
        step_losses = losses(torch.cat([steps, -steps])).numpy()
    numeric = (step_losses[:6] - step_losses[6:]) / (2 * check.step_px)
    cosine = analytic @ numeric / (np.linalg.norm(analytic) * np.linalg.norm(numeric))
    relative = abs(np.linalg.norm(analytic) / np.linalg.norm(numeric) - 1.0)
    message = f'analytic {analytic.round(2)} numeric {numeric.round(2)}'
    assert cosine > check.min_cosine, message
    assert relative < check.max_relative_norm_error, message


# ------------------------------------------------------------------------------ soft backend only

HARD_MIN_IOU = 0.995


@pytest.fixture(scope='module')
def soft() -> SoftRenderer:
    return SoftRenderer(torch.device('cpu'))


def _pose_tensors(poses: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.tensor(poses[:, :3, :3], dtype=torch.float32),
            torch.tensor(poses[:, :3, 3], dtype=torch.float32), _intrinsics(len(poses)))


def test_render_hard_matches_reference(soft, mesh, poses, references):
    out = soft.render_hard(mesh, *_pose_tensors(poses), SIZE, SIZE)
    assert set(np.unique(out.silhouette.numpy())) == {0.0, 1.0}
    for index, reference in enumerate(references):
        silhouette = out.silhouette[index].numpy() > 0.5
        assert _iou(silhouette, reference.coverage[0] > 0.5) >= HARD_MIN_IOU, f'pose {index}'
        both = silhouette & (reference.coverage[0] >= 1.0)
        depth_error = np.abs(out.depth[index].numpy() - reference.depth)[both]
        assert np.median(depth_error) < 1e-4
        interior = _interior(reference.coverage[0])
        assert np.abs(out.rgb[index].numpy() - reference.rgb)[interior].mean() \
            < MAX_INTERIOR_COLOUR_MAE


def test_silhouette_only_render_equals_the_hard_silhouette(soft, mesh, poses):
    R, t, K_batch = _pose_tensors(poses)
    for size in (SIZE, 3 * SIZE):
        K_size = K_batch.clone()
        K_size[:, :2] *= size / SIZE
        K_size[:, :2, 2] += (size / SIZE - 1) / 2   # the same view, pixel centres at integers
        hard = soft.render_hard(mesh, R, t, K_size, size, size).silhouette
        only = soft.render_silhouette(mesh, R, t, K_size, size, size)
        assert hard.sum() > 100 * len(poses)
        assert torch.equal(only, hard)


def test_soft_approaches_hard_as_sigma_shrinks(soft, mesh, poses):
    pose = _pose_tensors(poses)
    hard = soft.render_hard(mesh, *pose, SIZE, SIZE)
    errors = []
    for sigma in (0.4, 0.02, 1e-4):
        out = soft.render(mesh, *pose, SIZE, SIZE, sigma=sigma)
        errors.append(float((out.silhouette - hard.silhouette).abs().mean()))
        assert torch.equal(out.depth, hard.depth)
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] > 0.005
    out = soft.render(mesh, *pose, SIZE, SIZE, sigma=1e-4)
    differing = (out.silhouette - hard.silhouette).abs() > 0.5
    assert differing.float().mean() < 1e-4
    assert float((out.rgb - hard.rgb).abs().mean()) < 1e-3


def test_soft_interior_has_no_seams(soft, mesh, poses, references):
    """Inside the silhouette the soft coverage stays 1 even with a wide sigma: edges shared by
    two visible faces leave no trace. (SoftRas' own rule, distance to each face's own edges,
    leaves coverage down to 0.75 along every edge: a mean deficit of about 0.1 here.)"""
    out = soft.render(mesh, *_pose_tensors(poses), SIZE, SIZE, sigma=0.4)
    for index, reference in enumerate(references):
        interior = cv2.erode((reference.coverage[0] >= 1.0).astype(np.uint8),
                             np.ones((7, 7), np.uint8)).astype(bool)
        assert (1.0 - out.silhouette[index].numpy()[interior]).mean() < 0.005


def test_batched_render_equals_separate_renders(soft, mesh, poses):
    batched = soft.render(mesh, *_pose_tensors(poses), SIZE, SIZE)
    for index in range(len(poses)):
        single = soft.render(mesh, *_pose_tensors(poses[index:index + 1]), SIZE, SIZE)
        for key in ('silhouette', 'rgb', 'depth'):
            torch.testing.assert_close(getattr(batched, key)[index], getattr(single, key)[0],
                                       atol=1e-5, rtol=1e-5)


def test_faces_behind_the_camera_are_dropped(soft, mesh, poses):
    """The object straddles the camera plane: what is in front renders, nothing is NaN."""
    pose = poses[:1].copy()
    pose[0, :3, 3] = [0.0, 0.0, 0.02]
    R, t, K_batch = _pose_tensors(pose)
    t.requires_grad_(True)
    out = soft.render(mesh, R, t, K_batch, SIZE, SIZE)
    (out.silhouette.sum() + out.rgb.sum()).backward()
    for image in (out.silhouette, out.rgb, out.depth, t.grad):
        assert torch.isfinite(image).all()
    hard = soft.render_hard(mesh, R, t.detach(), K_batch, SIZE, SIZE)
    assert torch.isfinite(hard.rgb).all() and hard.silhouette.sum() > 100
    # The soft silhouette can pass 0.5 just outside an outline corner; where a face truly covers
    # the pixel centre, its depth lies in front of the near plane.
    covered = out.depth[hard.silhouette > 0.5]
    assert len(covered) > 100 and (covered > soft.near).all()


def test_normals_face_the_camera_on_a_box_seen_head_on():
    """The soft and the exact modes render the camera-frame normals, premultiplied like rgb: on
    a box seen head-on the visible face's normal points back at the camera (-z) (flat normals:
    the box's 8 shared corners would round the smooth ones)."""
    box = trimesh.creation.box(extents=(0.1, 0.1, 0.1))
    model = ObjectModel(name='box', vertices=box.vertices.astype(np.float32),
                        faces=box.faces.astype(np.int64),
                        vertex_colors=np.full((len(box.vertices), 3), 0.5, np.float32),
                        has_colors=True, diameter=0.17, symmetries=np.eye(4)[None])
    box_mesh = RenderMesh.from_model(model, torch.device('cpu'))
    R, t = torch.eye(3)[None], torch.tensor([[0.0, 0.0, 0.5]])
    K = torch.tensor([[200.0, 0.0, 30.0], [0.0, 200.0, 30.0], [0.0, 0.0, 1.0]])   # a 40 px face
    renderer = SoftRenderer(torch.device('cpu'), smooth_normals=False)
    for out in (renderer.render(box_mesh, R, t, K, 60, 60, Shading(normals=True)),
                renderer.render_hard(box_mesh, R, t, K, 60, 60, Shading(normals=True))):
        centre = out.normal[0, 20:40, 20:40] / out.silhouette[0, 20:40, 20:40, None]
        assert torch.allclose(centre, torch.tensor([0.0, 0.0, -1.0]), atol=1e-4)
        assert out.normal.shape == out.rgb.shape
        assert float(out.normal[0, 0, 0].abs().sum()) == 0.0          # background
    assert renderer.render_hard(box_mesh, R, t, K, 60, 60).normal is None


def test_lambert_flat_shading_matches_trimesh_normals(model, mesh, scene, poses):
    """Flat Lambert: albedo * (ambient + diffuse * max(0, -n . l)) with n the normal of the
    face that trimesh's ray caster hits through each pixel centre."""
    shading = Shading(lambert=True, light_direction=(0.3, 0.2, 1.0), ambient=0.3, diffuse=0.7)
    renderer = SoftRenderer(torch.device('cpu'), smooth_normals=False)
    pose = poses[0]
    out = renderer.render_hard(mesh, *_pose_tensors(pose[None]), SIZE, SIZE, shading)
    triangles = _pixel_centre_triangles(model, pose)
    reference = scene.render(pose[None], K, SIZE, SIZE)
    normals_cam = model.to_trimesh().face_normals @ pose[:3, :3].T
    light = np.array(shading.light_direction) / np.linalg.norm(shading.light_direction)
    hit = triangles >= 0
    lit = shading.ambient + shading.diffuse * np.maximum(0.0, -normals_cam[triangles[hit]] @ light)
    expected = reference.rgb[hit] * lit[:, None]
    error = np.abs(out.rgb[0].numpy()[hit] - expected).max(axis=1)
    assert lit.std() > 0.05
    assert np.median(error) < 1e-3
    assert (error < 0.02).mean() > 0.97


def _pixel_centre_triangles(model: ObjectModel, pose: np.ndarray) -> np.ndarray:
    """(H, W) index of the face hit by the ray through each pixel centre, -1 where none."""
    v, u = np.mgrid[0:SIZE, 0:SIZE]
    pixels = np.stack([u.ravel(), v.ravel(), np.ones(u.size)], axis=1)
    directions = (pixels @ np.linalg.inv(K).T) @ pose[:3, :3]  # camera rays in the model frame
    origins = np.broadcast_to(-pose[:3, :3].T @ pose[:3, 3], directions.shape)
    intersector = RayMeshIntersector(model.to_trimesh())
    triangles, rays = intersector.intersects_id(origins, directions, multiple_hits=False)
    result = np.full(SIZE * SIZE, -1)
    result[rays] = triangles
    return result.reshape(SIZE, SIZE)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device')
def test_cuda_matches_cpu(model, mesh, poses):
    cuda = torch.device('cuda')
    renderer = SoftRenderer(cuda)
    cuda_mesh = RenderMesh.from_model(model, cuda)
    R, t, K_batch = (x.to(cuda) for x in _pose_tensors(poses))
    on_cuda = renderer.render(cuda_mesh, R, t, K_batch, SIZE, SIZE)
    on_cpu = SoftRenderer(torch.device('cpu')).render(mesh, *_pose_tensors(poses), SIZE, SIZE)
    for key in ('silhouette', 'rgb', 'depth'):
        torch.testing.assert_close(getattr(on_cuda, key).cpu(), getattr(on_cpu, key),
                                   atol=1e-3, rtol=1e-3)

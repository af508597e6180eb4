"""Mitsuba backend: the LLVM probe, the camera mapping and the gradients, against independent
references (Embree ray casting through ``raycast``, finite differences of the reference).

The shared backend checks (IoU, depth, colour, gradient vs the backend's own finite
differences) live in ``test_render.py``; these are the Mitsuba-specific ones.
"""
import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from pose_node.render import RenderMesh, Shading
from pose_node.render import mitsuba_backend
from pose_node.render.mitsuba_backend import (LIBLLVM_ENV, MitsubaRenderer, configure_drjit_llvm,
                                              find_libllvm, non_manifold_edge_count,
                                              probe_mitsuba)
from pose_node.render.raycast import RaycastScene
from pose_node.resources import load_demo_object

VARIANT = 'llvm_ad_rgb'
MAX_FACES = 2000
REFERENCE_SUPERSAMPLE = 8
MAX_CENTROID_ERROR_PX = 0.1
MAX_GRADIENT_ERROR = 0.1
"""Relative error of an averaged Monte-Carlo gradient (about 3 % noise) against finite
differences; a misplaced edge or a doubly counted one (as on non-manifold meshes) is 20 %+."""

@pytest.fixture(scope='module')
def full_model():
    """The demo object as shipped: 5664 faces, four closed manifold parts."""
    return load_demo_object()


@pytest.fixture(scope='module')
def model(full_model):
    return full_model.decimated(MAX_FACES)


@pytest.fixture(scope='module')
def mesh(model) -> RenderMesh:
    return RenderMesh.from_model(model, torch.device('cpu'))


@pytest.fixture(scope='module')
def reference(model) -> RaycastScene:
    return RaycastScene([model])


@pytest.fixture(scope='module')
def renderer() -> MitsubaRenderer:
    return MitsubaRenderer(torch.device('cpu'), spp=4, grid=5)


def _pose(euler_deg, translation) -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_euler('xyz', euler_deg, degrees=True).as_matrix()
    pose[:3, 3] = translation
    return pose


def _centroid(image: np.ndarray) -> np.ndarray:
    """(x, y) coverage-weighted centroid of an (H, W) image, OpenCV pixel coordinates."""
    rows, cols = np.mgrid[:image.shape[0], :image.shape[1]]
    return np.array([(image * cols).sum(), (image * rows).sum()]) / image.sum()


def _render(renderer, mesh, poses, K, width, height):
    poses = np.asarray(poses).reshape(-1, 4, 4)
    return renderer.render(mesh, torch.tensor(poses[:, :3, :3]), torch.tensor(poses[:, :3, 3]),
                           torch.tensor(np.asarray(K, np.float64)).expand(len(poses), 3, 3),
                           width, height)


# ----------------------------------------------------------------------------------- LLVM probe

def test_find_libllvm_finds_version_19_only_where_asked():
    path = find_libllvm()
    assert path is not None and path.is_file() and '19' in path.name
    assert find_libllvm(('/nonexistent/libLLVM.so.19*',)) is None


def test_configure_keeps_a_preset_path_and_sets_one_otherwise(monkeypatch):
    monkeypatch.setenv(LIBLLVM_ENV, '/preset/libLLVM.so')
    assert configure_drjit_llvm() == Path('/preset/libLLVM.so')
    monkeypatch.delenv(LIBLLVM_ENV)
    chosen = configure_drjit_llvm()
    assert chosen == find_libllvm() and os.environ[LIBLLVM_ENV] == str(chosen)


def test_probe_succeeds_here():
    ok, reason = probe_mitsuba(VARIANT)
    assert ok, reason


def test_probe_fails_cleanly_on_a_missing_library():
    ok, reason = probe_mitsuba(VARIANT, Path('/nonexistent/libLLVM.so.19.1'))
    assert not ok
    # drjit's own words, passed on from the subprocess's last lines
    assert 'exited with status 1' in reason and 'LLVM backend is inactive' in reason


def test_probe_survives_an_aborting_library():
    """libLLVM 15 makes drjit abort the whole process: the probe reports it and lives on."""
    old = Path('/usr/lib/x86_64-linux-gnu/libLLVM-15.so.1')
    if not old.is_file():
        pytest.skip('no libLLVM 15 on this machine')
    ok, reason = probe_mitsuba(VARIANT, old)
    assert not ok and 'SIGABRT' in reason


def test_unusable_backend_raises_with_the_probe_reason(monkeypatch):
    monkeypatch.setattr(mitsuba_backend, 'probe_mitsuba',
                        lambda variant: (False, f'{variant}: no usable libLLVM'))
    with pytest.raises(RuntimeError, match='llvm_ad_rgb: no usable libLLVM'):
        MitsubaRenderer(torch.device('cpu'))


def test_lambert_is_refused_clearly(renderer, mesh):
    pose = _pose([0, 0, 0], [0, 0, 0.5])
    with pytest.raises(NotImplementedError, match='unlit'):
        renderer.render(mesh, torch.tensor(pose[None, :3, :3]), torch.tensor(pose[None, :3, 3]),
                        torch.eye(3, dtype=torch.float64)[None], 32, 32, Shading(lambert=True))


# ------------------------------------------------------------------------------- camera mapping

def test_off_centre_principal_point_and_unequal_focal_lengths(renderer, mesh, reference):
    """Non-square image, fx != fy, principal point off centre: silhouette centroid and area
    agree with the ray-cast reference; half a pixel of principal point would be caught."""
    width, height = 120, 96
    K = np.array([[310.0, 0.0, 47.3], [0.0, 260.0, 55.8], [0.0, 0.0, 1.0]])
    pose = _pose([25, -40, 15], [-0.012, 0.006, 0.5])
    out = _render(renderer, mesh, pose, K, width, height)
    silhouette = out.silhouette[0].numpy()
    expected = reference.render(pose[None], K, width, height, REFERENCE_SUPERSAMPLE).coverage[0]
    error = np.abs(_centroid(silhouette) - _centroid(expected))
    assert error.max() < MAX_CENTROID_ERROR_PX, f'centroid error {error} px'
    assert abs(silhouette.sum() / expected.sum() - 1.0) < 0.005
    K_shifted = K.copy()
    K_shifted[0, 2] += 0.5
    shifted = reference.render(pose[None], K_shifted, width, height, REFERENCE_SUPERSAMPLE)
    assert np.abs(_centroid(silhouette) - _centroid(shifted.coverage[0]))[0] > 0.4


def test_depth_is_camera_z_without_gradient(renderer, mesh, reference):
    width = height = 64
    K = np.array([[150.0, 0.0, 30.0], [0.0, 170.0, 33.0], [0.0, 0.0, 1.0]])
    pose = _pose([-30, 10, 70], [0.01, 0.0, 0.6])
    t = torch.tensor(pose[None, :3, 3], requires_grad=True)
    out = renderer.render(mesh, torch.tensor(pose[None, :3, :3]), t, torch.tensor(K)[None],
                          width, height)
    assert not out.depth.requires_grad and out.silhouette.requires_grad
    expected = reference.render(pose[None], K, width, height, REFERENCE_SUPERSAMPLE)
    silhouette, depth = out.silhouette[0].detach().numpy(), out.depth[0].numpy()
    inside = (expected.coverage[0] >= 1.0) & (silhouette >= 1.0)
    assert inside.sum() > 300
    assert np.median(np.abs(depth - expected.depth)[inside]) < 2e-4
    assert (depth[silhouette == 0] == 0).all()


# ------------------------------------------------------------------------------------ gradients

def test_non_manifold_meshes_are_named(renderer, full_model, mesh):
    """Three triangles sharing one edge make Mitsuba's silhouette gradient wrong there: warned.
    The shipped and the decimated demo meshes are manifold."""
    fan = torch.tensor([[0, 1, 2], [1, 0, 3], [0, 1, 4]])
    vertices = torch.tensor([[0.0, -0.02, 0], [0, 0.02, 0], [0.02, 0, 0], [-0.02, 0, 0],
                             [0, 0, 0.02]])
    non_manifold = RenderMesh(name='fan', vertices=vertices, faces=fan,
                              colors=torch.full((5, 3), 0.5))
    with pytest.warns(RuntimeWarning, match='shared by more than two faces'):
        _render(renderer, non_manifold, _pose([0, 0, 0], [0, 0, 0.5]),
                np.diag([40.0, 40.0, 1.0]), 8, 8)
    assert non_manifold_edge_count(fan) == 1
    assert non_manifold_edge_count(torch.as_tensor(full_model.faces)) == 0
    assert non_manifold_edge_count(mesh.faces) == 0


def test_translation_gradients_match_reference_finite_differences(full_model):
    """Two different poses in one batch (the backward pass re-uploads the first pose): the
    gradient of sum(silhouette * ramp) and of sum(rgb * ramp) with respect to each pose's
    translation matches central differences of the exact ray-cast reference.

    The mesh is the undecimated one, with
    colours made a smooth function of position: the scanned colours' sub-pixel bands make the
    colour gradient unbiased but too noisy (about 85 % per estimate at spp 8) for a quick check."""
    smooth = np.clip(0.5 + 4.0 * full_model.vertices, 0.0, 1.0).astype(np.float32)
    model = dataclasses.replace(full_model, vertex_colors=smooth)
    renderer = MitsubaRenderer(torch.device('cpu'), spp=8, grid=5)
    mesh = RenderMesh.from_model(model, torch.device('cpu'))
    reference = RaycastScene([model])
    width = height = 64
    K = np.array([[160.0, 0.0, 31.5], [0.0, 160.0, 31.5], [0.0, 0.0, 1.0]])
    poses = np.stack([_pose([20, 30, 10], [0.004, -0.003, 0.55]),
                      _pose([-50, 5, 100], [-0.006, 0.002, 0.6])])
    rows, cols = np.mgrid[:height, :width]
    ramp = (cols + 0.5 * rows).astype(np.float64)
    colour_ramp = np.stack([ramp, -ramp, 0.5 * ramp], axis=-1)

    def reference_losses(pose):
        image = reference.render(pose[None], K, width, height, REFERENCE_SUPERSAMPLE)
        return np.array([(ramp * image.coverage[0]).sum(), (colour_ramp * image.rgb).sum()])

    step = 2e-3
    numeric = np.zeros((2, 2, 3))  # pose, loss (silhouette, rgb), axis
    for index, pose in enumerate(poses):
        for axis in range(3):
            moved = [pose.copy(), pose.copy()]
            moved[0][axis, 3] += step
            moved[1][axis, 3] -= step
            numeric[index, :, axis] = (reference_losses(moved[0])
                                       - reference_losses(moved[1])) / (2 * step)

    analytic = np.zeros_like(numeric)
    repeats = 3  # Monte-Carlo gradients: average a few estimates
    for _ in range(repeats):
        for loss_index in range(2):
            t = torch.tensor(poses[:, :3, 3], requires_grad=True)
            out = renderer.render(mesh, torch.tensor(poses[:, :3, :3]), t,
                                  torch.tensor(K).expand(2, 3, 3), width, height)
            loss = ((out.silhouette * torch.tensor(ramp)).sum() if loss_index == 0
                    else (out.rgb * torch.tensor(colour_ramp)).sum())
            loss.backward()
            analytic[:, loss_index] += t.grad.numpy() / repeats
    for index in range(2):
        for loss_index in range(2):
            got, want = analytic[index, loss_index], numeric[index, loss_index]
            error = np.linalg.norm(got - want) / np.linalg.norm(want)
            assert error < MAX_GRADIENT_ERROR, f'pose {index} loss {loss_index}: {got} vs {want}'


def test_auto_picks_mitsuba_when_the_probe_passes_and_soft_when_it_fails(monkeypatch, caplog):
    import logging

    from pose_node.render import make_renderer, mitsuba_backend
    from pose_node.render.soft import SoftRenderer

    caplog.set_level(logging.INFO, logger='pose_node.render')
    monkeypatch.setattr(mitsuba_backend, 'probe_mitsuba', lambda variant: (False, 'no libLLVM 19'))
    assert isinstance(make_renderer('auto', torch.device('cpu')), SoftRenderer)
    assert 'soft' in caplog.text and 'no libLLVM 19' in caplog.text
    monkeypatch.setattr(mitsuba_backend, 'probe_mitsuba', lambda variant: (True, ''))
    assert isinstance(make_renderer('auto', torch.device('cpu')), mitsuba_backend.MitsubaRenderer)
    with pytest.raises(ValueError, match='unknown renderer backend'):
        make_renderer('opengl', torch.device('cpu'))

"""Tests of pose_node.camera against hand computations, OpenCV and image content."""
import cv2
import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from pose_node.camera import (Camera, camera_from_camera_info, crop_image, crop_transform,
                              project_points, square_box_around, transform_intrinsics,
                              undistort_image, undistort_points, undistortion_maps,
                              unproject_points)

WIDTH, HEIGHT = 640, 480
K_VGA = np.array([[600.0, 0.0, 318.7], [0.0, 605.0, 241.3], [0.0, 0.0, 1.0]])
PLUMB_BOB = np.array([-0.28, 0.09, 0.0012, -0.0007, -0.012])
RATIONAL = np.array([0.6, -0.2, 0.001, -0.0005, 0.05, 0.95, -0.1, 0.08])
EQUIDISTANT = np.array([0.08, -0.03, 0.01, -0.002])


def gaussian_blob(centre_uv, width: int, height: int, sigma: float = 2.0) -> np.ndarray:
    """(H, W) float32 image of a unit Gaussian centred at ``centre_uv`` (pixel-centre coords)."""
    u = np.arange(width)[None, :]
    v = np.arange(height)[:, None]
    squared = (u - centre_uv[0]) ** 2 + (v - centre_uv[1]) ** 2
    return np.exp(-squared / (2.0 * sigma ** 2)).astype(np.float32)


def centroid(image: np.ndarray) -> np.ndarray:
    """Intensity-weighted centroid (u, v) in pixel-centre coordinates."""
    v, u = np.mgrid[:image.shape[0], :image.shape[1]]
    total = image.sum()
    return np.array([(image * u).sum() / total, (image * v).sum() / total])


def points_in_view(rng: np.random.Generator, count: int) -> np.ndarray:
    """(count, 3) camera-frame points, metres, spread over the VGA view of K_VGA."""
    z = rng.uniform(0.4, 2.0, count)
    x, y = rng.uniform(-0.45, 0.45, count) * z, rng.uniform(-0.35, 0.35, count) * z
    return np.stack([x, y, z], axis=-1)


# --- Camera ---------------------------------------------------------------------------------------

def test_camera_stores_read_only_float64_and_compares_by_value():
    camera = Camera(K=K_VGA.astype(np.float32), width=WIDTH, height=HEIGHT)
    assert camera.K.dtype == np.float64 and not camera.K.flags.writeable
    assert camera.is_rectified and not camera.has_distortion
    same = Camera(K=K_VGA.astype(np.float32), width=WIDTH, height=HEIGHT)
    assert camera == same and hash(camera) == hash(same) and len({camera, same}) == 1
    assert camera != Camera(K=K_VGA, width=WIDTH, height=HEIGHT + 2)
    distorted = Camera(K=K_VGA, width=WIDTH, height=HEIGHT, D=PLUMB_BOB,
                       distortion_model='plumb_bob')
    assert distorted.has_distortion and not distorted.is_rectified
    zeros = Camera(K=K_VGA, width=WIDTH, height=HEIGHT, D=np.zeros(5), distortion_model='plumb_bob')
    assert zeros.is_rectified


@pytest.mark.parametrize('change, message', [
    (dict(K=np.where(np.eye(3) == 1, np.nan, K_VGA)), 'non-finite'),
    (dict(K=K_VGA * [[1, 1, 1], [1, -1, 1], [1, 1, 1]]), 'focal'),
    (dict(K=K_VGA * [[0, 1, 1], [1, 1, 1], [1, 1, 1]]), 'focal'),
    (dict(width=0), 'size'),
    (dict(K=K_VGA + [[0, 0, 2000], [0, 0, 0], [0, 0, 0]]), 'principal point'),
    (dict(K=K_VGA + [[0, 0, 0], [0, 0, -800], [0, 0, 0]]), 'principal point'),
    (dict(K=K_VGA.T), 'last row'),
    (dict(D=PLUMB_BOB, distortion_model='kannala'), 'unknown distortion model'),
    (dict(D=PLUMB_BOB, distortion_model=''), 'without a distortion model'),
    (dict(D=PLUMB_BOB, distortion_model='equidistant'), 'equidistant'),
    (dict(D=PLUMB_BOB[:3], distortion_model='plumb_bob'), 'plumb_bob'),
    (dict(D=[np.inf, 0, 0, 0, 0], distortion_model='plumb_bob'), 'non-finite'),
])
def test_camera_rejects_invalid_values(change, message):
    values = dict(K=K_VGA, width=WIDTH, height=HEIGHT) | change
    with pytest.raises(ValueError, match=message):
        Camera(**values)


def test_camera_accepts_principal_point_off_image_within_lenient_bound():
    Camera(K=K_VGA + [[0, 0, 500], [0, 0, -400], [0, 0, 0]], width=WIDTH, height=HEIGHT)


# --- CameraInfo -----------------------------------------------------------------------------------

K_INFO = [610.0, 0.0, 322.0, 0.0, 615.0, 238.0, 0.0, 0.0, 1.0]
P_INFO = [590.0, 0.0, 330.0, 0.0, 0.0, 596.0, 244.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def test_camera_info_rectified_uses_p_and_raw_uses_k_and_d():
    rectified = camera_from_camera_info(K_INFO, P_INFO, PLUMB_BOB, 'plumb_bob', 640, 480,
                                        use_rectified=True)
    np.testing.assert_array_equal(rectified.K, [[590, 0, 330], [0, 596, 244], [0, 0, 1]])
    assert (rectified.width, rectified.height) == (640, 480)
    assert rectified.is_rectified and rectified.distortion_model == ''

    raw = camera_from_camera_info(K_INFO, P_INFO, PLUMB_BOB, 'plumb_bob', 640, 480,
                                  use_rectified=False)
    np.testing.assert_array_equal(raw.K, np.reshape(K_INFO, (3, 3)))
    np.testing.assert_array_equal(raw.D, PLUMB_BOB)
    assert raw.distortion_model == 'plumb_bob' and raw.has_distortion


def test_camera_info_zero_distortion_with_any_model_name_is_rectified():
    camera = camera_from_camera_info(K_INFO, P_INFO, [0.0] * 5, 'none', 640, 480,
                                     use_rectified=False)
    assert camera.is_rectified and camera.distortion_model == '' and camera.D.size == 0


def test_camera_info_binning_follows_image_geometry_formula():
    # fx' = fx / b, cx' = cx / b (image_geometry), image size divided by b (integer division).
    camera = camera_from_camera_info(K_INFO, P_INFO, [], '', 640, 481, binning_x=2, binning_y=4,
                                     use_rectified=False)
    np.testing.assert_allclose(camera.K, [[305.0, 0, 161.0], [0, 153.75, 59.5], [0, 0, 1]])
    assert (camera.width, camera.height) == (320, 120)
    one = camera_from_camera_info(K_INFO, P_INFO, [], '', 640, 480, binning_x=1, binning_y=0,
                                  use_rectified=False)
    np.testing.assert_array_equal(one.K, np.reshape(K_INFO, (3, 3)))


def test_camera_info_binning_is_exact_for_decimation_by_subsampling():
    # Keeping every 2nd pixel (image_proc's crop_decimate): pixel i of the small image is pixel
    # 2 i of the full one, so a point's projection must halve exactly.
    full = camera_from_camera_info(K_INFO, P_INFO, [], '', 640, 480, use_rectified=True)
    binned = camera_from_camera_info(K_INFO, P_INFO, [], '', 640, 480, binning_x=2, binning_y=2,
                                     use_rectified=True)
    points = points_in_view(np.random.default_rng(3), 20)
    np.testing.assert_allclose(project_points(binned.K, points), project_points(full.K, points) / 2,
                               atol=1e-9)


def test_camera_info_roi_shifts_principal_point_before_binning():
    camera = camera_from_camera_info(K_INFO, P_INFO, PLUMB_BOB, 'plumb_bob', 640, 480,
                                     roi=(100, 60, 400, 300, True), use_rectified=True)
    np.testing.assert_allclose(camera.K, [[590, 0, 230], [0, 596, 184], [0, 0, 1]])
    assert (camera.width, camera.height) == (400, 300)
    binned = camera_from_camera_info(K_INFO, P_INFO, PLUMB_BOB, 'plumb_bob', 640, 480, 2, 2,
                                     roi=(100, 60, 400, 300, False), use_rectified=False)
    np.testing.assert_allclose(binned.K, [[305, 0, 111], [0, 307.5, 89], [0, 0, 1]])
    assert (binned.width, binned.height) == (200, 150)
    np.testing.assert_array_equal(binned.D, PLUMB_BOB)
    full = camera_from_camera_info(K_INFO, P_INFO, [], '', 640, 480, roi=(0, 0, 0, 0, False),
                                   use_rectified=True)
    assert (full.width, full.height) == (640, 480) and full.K[0, 2] == 330


@pytest.mark.parametrize('k, p, use_rectified, message', [
    ([0.0] * 9, P_INFO, False, 'uncalibrated'),
    (K_INFO, [0.0] * 12, True, 'uncalibrated'),
    ([np.nan] + K_INFO[1:], P_INFO, False, 'non-finite'),
    (K_INFO, P_INFO[:4] + [np.nan] + P_INFO[5:], True, 'non-finite'),
    (K_INFO[:8], P_INFO, False, 'needs 9'),
])
def test_camera_info_rejects_uncalibrated_and_invalid(k, p, use_rectified, message):
    with pytest.raises(ValueError, match=message):
        camera_from_camera_info(k, p, [], '', 640, 480, use_rectified=use_rectified)


def test_camera_info_rejects_unknown_model_with_nonzero_coefficients():
    with pytest.raises(ValueError, match='unknown distortion model'):
        camera_from_camera_info(K_INFO, P_INFO, PLUMB_BOB, 'brown', 640, 480, use_rectified=False)


# --- crops ----------------------------------------------------------------------------------------

def test_crop_transform_by_hand():
    identity = crop_transform((-0.5, -0.5, WIDTH, HEIGHT), (WIDTH, HEIGHT))
    np.testing.assert_allclose(identity, [[1, 0, 0], [0, 1, 0]], atol=1e-12)
    # The box covering source pixels 10..19 x 20..29, doubled: source pixel 10 becomes crop pixels
    # 0 and 1, so its centre lands at 0.5; the box's far edge 19.5 lands on 19.5.
    A = crop_transform((9.5, 19.5, 10, 10), (20, 20))
    np.testing.assert_allclose(A @ [10, 20, 1], [0.5, 0.5])
    np.testing.assert_allclose(A @ [19.5, 29.5, 1], [19.5, 19.5])
    batch = crop_transform([[9.5, 19.5, 10, 10], [-0.5, -0.5, WIDTH, HEIGHT]], (20, 20))
    np.testing.assert_allclose(batch[0], A)
    with pytest.raises(ValueError, match='positive'):
        crop_transform((0, 0, 0, 10), (20, 20))


def test_square_box_around_by_hand():
    np.testing.assert_allclose(square_box_around((10, 20, 40, 20), 1.5), (0, 0, 60, 60))
    np.testing.assert_allclose(square_box_around([[0, 0, 2, 4], [1, 1, 1, 1]], 1.0),
                               [[-1, 0, 4, 4], [1, 1, 1, 1]])


def test_integer_box_crop_is_array_slice():
    image = np.random.default_rng(0).integers(0, 255, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    x0, y0, w, h = 37, 51, 90, 60
    crop = crop_image(image, (x0 - 0.5, y0 - 0.5, w, h), (w, h))
    np.testing.assert_array_equal(crop, image[y0:y0 + h, x0:x0 + w])


def test_whole_image_resize_matches_cv2_resize():
    # cv2.resize uses the same pixel-centre convention; it is an independent implementation.
    u = np.arange(WIDTH)[None, :]
    v = np.arange(HEIGHT)[:, None]
    image = (0.5 + 0.4 * np.sin(u / 7.0) * np.cos(v / 5.0)).astype(np.float32)
    for size in [(1000, 700), (97, 83)]:
        reference = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        crop = crop_image(image, (-0.5, -0.5, WIDTH, HEIGHT), size, border=cv2.BORDER_REPLICATE,
                          antialias=False)
        np.testing.assert_allclose(crop, reference, atol=2e-3)


def test_cropped_intrinsics_agree_with_crop_affine():
    points = points_in_view(np.random.default_rng(1), 50)
    boxes = np.array([[100.2, 80.7, 200.0, 200.0], [-60.0, 300.5, 150.3, 150.3],
                      [500.0, -20.0, 33.3, 47.9]])
    A = crop_transform(boxes, (128, 96))
    K_crop = transform_intrinsics(K_VGA, A)
    full_uv = project_points(K_VGA, points)
    mapped = full_uv @ np.swapaxes(A[:, :, :2], -1, -2) + A[:, None, :, 2]
    np.testing.assert_allclose(project_points(K_crop, points[None]), mapped, atol=1e-9)

    K_crop_torch = transform_intrinsics(torch.as_tensor(K_VGA), torch.as_tensor(A))
    np.testing.assert_allclose(K_crop_torch.numpy(), K_crop, atol=1e-12)
    np.testing.assert_allclose(transform_intrinsics(K_VGA, torch.as_tensor(A)).numpy(), K_crop,
                               atol=1e-12)


@pytest.mark.parametrize('box_offset, box_size, out_size', [
    ((-40.3, -33.1), (80.6, 80.6), (128, 128)),      # upsampling by 1.59
    ((-100.0, -90.0), (300.0, 300.0), (128, 128)),   # downsampling by 2.34
    ((-50.0, -60.0), (113.7, 91.1), (64, 96)),       # non-square, down in x, up in y
    ((-7.0, -8.0), (17.0, 17.0), (160, 160)),        # upsampling by 9.4
    ((-360.0, -250.0), (400.0, 400.0), (200, 200)),  # box partly outside the image, downsampling
])
def test_crop_content_centroid_matches_cropped_intrinsics(box_offset, box_size, out_size):
    point = np.array([[0.031, -0.017, 0.8]])
    uv = project_points(K_VGA, point)[0]
    image = gaussian_blob(uv, WIDTH, HEIGHT)
    box = (uv[0] + box_offset[0], uv[1] + box_offset[1], *box_size)
    if box_offset[0] < -300:
        assert box[0] < -0.5 and box[1] < -0.5  # the case is meant to leave the image
    crop = crop_image(image, box, out_size)
    expected = project_points(transform_intrinsics(K_VGA, crop_transform(box, out_size)), point)[0]
    np.testing.assert_allclose(centroid(crop), expected, atol=0.05)


def test_antialias_removes_aliasing_of_fine_stripes():
    # Period 2.3 px is above the Nyquist limit of a 4x downsampling: sampled as is, it aliases into
    # visible stripes; the image's true local mean is 0.5 everywhere.
    u = np.arange(WIDTH, dtype=np.float32)
    stripes = np.tile(0.5 + 0.5 * np.sin(2 * np.pi * u / 2.3), (HEIGHT, 1))
    box, out = (99.0, 99.0, 256, 256), (64, 64)  # samples fall on pixel centres
    assert crop_image(stripes, box, out, antialias=False).std() > 0.2
    smoothed = crop_image(stripes, box, out, antialias=True)
    assert smoothed.std() < 0.01 and abs(smoothed.mean() - 0.5) < 0.01


@pytest.mark.parametrize('border', [cv2.BORDER_CONSTANT, cv2.BORDER_REPLICATE])
@pytest.mark.parametrize('box, out', [((-60.3, 400.2, 201.0, 150.0), (50, 50)),
                                      ((300.7, -20.1, 90.0, 30.0), (30, 60)),   # x only
                                      ((-20.1, 300.7, 30.0, 90.0), (60, 30))])  # y only
def test_antialias_window_equals_blurring_the_whole_extended_image(border, box, out):
    # Reference: extend the whole image by the border rule, blur it all with scipy's Gaussian
    # (sigma (f - 1) / 2 along each downsampled axis), then warp.
    image = np.random.default_rng(2).random((HEIGHT, WIDTH)).astype(np.float32)
    sigma = [max((size / n - 1) / 2, 0.0) for size, n in zip(box[2:], out)]
    pad = 200
    extended = cv2.copyMakeBorder(image, pad, pad, pad, pad, border, value=0.25)
    blurred = gaussian_filter(extended, sigma=sigma[::-1], truncate=4.0, mode='nearest')
    A = crop_transform((box[0] + pad, box[1] + pad, *box[2:]), out)
    reference = cv2.warpAffine(blurred, A, out, flags=cv2.INTER_LINEAR)
    crop = crop_image(image, box, out, border=border, border_value=0.25)
    np.testing.assert_allclose(crop, reference, atol=2e-3)


def test_crop_border_fills_every_channel():
    image = np.ones((HEIGHT, WIDTH, 3), np.float32)
    outside = crop_image(image, (2000.0, 2000.0, 300.0, 300.0), (32, 32), border_value=0.5)
    np.testing.assert_array_equal(outside, np.full((32, 32, 3), 0.5, np.float32))
    for antialias in (False, True):
        partly = crop_image(image, (-200.5, -0.5, 400, 400), (100, 100), border_value=0.5,
                            antialias=antialias)
        np.testing.assert_array_equal(partly[50, 10], [0.5, 0.5, 0.5])
        np.testing.assert_array_equal(partly[50, 90], [1.0, 1.0, 1.0])


# --- projection -----------------------------------------------------------------------------------

def test_project_points_matches_cv2_project_points():
    points = points_in_view(np.random.default_rng(4), 30)
    reference, _ = cv2.projectPoints(points, np.zeros(3), np.zeros(3), K_VGA, None)
    np.testing.assert_allclose(project_points(K_VGA, points), reference[:, 0], atol=1e-9)


def test_project_unproject_round_trip_numpy_and_torch_batched():
    rng = np.random.default_rng(5)
    points = np.stack([points_in_view(rng, 40) for _ in range(3)])          # (3, 40, 3)
    A = crop_transform(rng.uniform(50, 300, (3, 4)), (128, 128))
    K_batch = transform_intrinsics(K_VGA, A)                                 # (3, 3, 3)
    uv = project_points(K_batch, points)
    assert uv.shape == (3, 40, 2)
    np.testing.assert_allclose(unproject_points(K_batch, uv, points[..., 2]), points, atol=1e-10)

    points_t = torch.as_tensor(points)
    uv_t = project_points(torch.as_tensor(K_batch), points_t)
    np.testing.assert_allclose(uv_t.numpy(), uv, atol=1e-9)
    back = unproject_points(K_batch, uv_t, points_t[..., 2])
    assert isinstance(back, torch.Tensor)
    np.testing.assert_allclose(back.numpy(), points, atol=1e-10)
    depth_only_torch = unproject_points(K_batch, uv, points_t[..., 2].float())
    assert depth_only_torch.dtype == torch.float32
    np.testing.assert_allclose(depth_only_torch.numpy(), points, atol=1e-4)


def test_points_behind_camera_give_nan_and_zero_gradient():
    points = torch.tensor([[0.1, -0.2, 1.5], [0.3, 0.1, -1.0], [0.2, 0.2, 0.0]], requires_grad=True)
    K = torch.tensor(K_VGA, dtype=torch.float32, requires_grad=True)
    uv = project_points(K, points)
    assert torch.isfinite(uv[0]).all() and torch.isnan(uv[1:]).all()
    loss = uv[torch.isfinite(uv)].square().sum()
    loss.backward()
    assert torch.isfinite(points.grad).all() and torch.isfinite(K.grad).all()
    assert torch.all(points.grad[1:] == 0)
    # d u / d x = fx / z for the valid point
    assert points.grad[0, 0].item() == pytest.approx(2 * uv[0, 0].item() * 600.0 / 1.5, rel=1e-5)
    assert np.isnan(project_points(K_VGA, np.array([[0.0, 0.0, -2.0]]))).all()


# --- distortion -----------------------------------------------------------------------------------

def distorted_and_ideal(camera: Camera, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels of ``points`` through OpenCV's own distortion, and their ideal pinhole pixels."""
    if camera.distortion_model == 'equidistant':
        raw, _ = cv2.fisheye.projectPoints(points[:, None], np.zeros(3), np.zeros(3), camera.K,
                                           camera.D)
    else:
        raw, _ = cv2.projectPoints(points, np.zeros(3), np.zeros(3), camera.K, camera.D)
    ideal = (points[:, :2] / points[:, 2:]) * np.diag(camera.K)[:2] + camera.K[:2, 2]
    return raw.reshape(-1, 2), ideal


@pytest.mark.parametrize('model, coefficients', [('plumb_bob', PLUMB_BOB),
                                                 ('rational_polynomial', RATIONAL),
                                                 ('equidistant', EQUIDISTANT)])
def test_undistort_points_recovers_ideal_projections(model, coefficients):
    camera = Camera(K=K_VGA, width=WIDTH, height=HEIGHT, D=coefficients, distortion_model=model)
    # A grid reaching into the corners, where a few fixed-point iterations are not enough.
    grid = np.mgrid[-0.55:0.55:23j, -0.42:0.42:17j].reshape(2, -1).T
    raw, ideal = distorted_and_ideal(camera, np.c_[grid, np.ones(len(grid))])
    in_image = np.all((raw >= -0.5) & (raw <= (WIDTH - 0.5, HEIGHT - 0.5)), axis=1)
    raw, ideal = raw[in_image], ideal[in_image]
    assert np.abs(raw - ideal).max() > 20.0  # the distortion is strong enough to matter
    np.testing.assert_allclose(undistort_points(raw, camera), ideal, atol=0.01)
    batched = undistort_points(np.stack([raw, raw[::-1]]), camera)
    np.testing.assert_allclose(batched[1], ideal[::-1], atol=0.01)


@pytest.mark.parametrize('model, coefficients', [('plumb_bob', PLUMB_BOB),
                                                 ('equidistant', EQUIDISTANT)])
def test_undistort_image_moves_marks_to_ideal_projections(model, coefficients):
    camera = Camera(K=K_VGA, width=WIDTH, height=HEIGHT, D=coefficients, distortion_model=model)
    points = np.array([[0.0, 0.0, 1.0], [0.35, 0.25, 1.0], [-0.4, 0.3, 1.0], [0.3, -0.28, 1.0]])
    raw_uv, ideal_uv = distorted_and_ideal(camera, points)
    checker = ((np.arange(HEIGHT)[:, None] // 40 + np.arange(WIDTH)[None, :] // 40) % 2) * 0.1
    image = checker.astype(np.float32)
    for uv in raw_uv:
        image += 5.0 * gaussian_blob(uv, WIDTH, HEIGHT, sigma=1.5)
    rectified, rectified_camera = undistort_image(image, camera)
    assert rectified_camera.is_rectified and rectified.shape == image.shape
    np.testing.assert_array_equal(rectified_camera.K, camera.K)
    for raw, ideal in zip(raw_uv, ideal_uv):
        assert np.linalg.norm(raw - ideal) > 3.0 or np.allclose(raw, camera.K[:2, 2])
        u0, v0 = np.round(ideal).astype(int)
        window = rectified[v0 - 8:v0 + 9, u0 - 8:u0 + 9]
        window = np.clip(window - 0.1, 0.0, None)  # the checker's 0.1 is background
        np.testing.assert_allclose(centroid(window) + (u0 - 8, v0 - 8), ideal, atol=0.5)
    again, _ = undistort_image(image, camera, maps=undistortion_maps(camera))
    np.testing.assert_array_equal(again, rectified)


def test_undistortion_is_identity_without_distortion():
    camera = Camera(K=K_VGA, width=WIDTH, height=HEIGHT, D=np.zeros(5),
                    distortion_model='plumb_bob')
    image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    rectified, rectified_camera = undistort_image(image, camera)
    assert rectified is image and rectified_camera is camera
    uv = np.array([[1.5, 2.5], [600.0, 470.0]])
    np.testing.assert_array_equal(undistort_points(uv, camera), uv)

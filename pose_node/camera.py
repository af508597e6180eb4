"""Pinhole camera model: intrinsics from CameraInfo-like data, crops, projection, undistortion.

No ROS imports: :func:`camera_from_camera_info` takes the message's fields as plain values.

Conventions, the same everywhere in this module (OpenCV's):

- Pixel coordinates ``(u, v)`` put integer values at pixel *centres*; an image of W x H pixels
  covers the continuous rectangle ``[-0.5, W - 0.5] x [-0.5, H - 0.5]``. ``K`` uses these
  coordinates.
- A box ``(x, y, w, h)`` is the continuous rectangle ``[x, x + w] x [y, y + h]`` in those same
  coordinates. The full image is the box ``(-0.5, -0.5, W, H)``; a BOP box ``(x0, y0, w, h)`` (first
  column ``x0``; BOP's ``w`` is last column minus first, so it spans ``w + 1`` columns) is
  ``(x0 - 0.5, y0 - 0.5, w + 1, h + 1)``.
- Camera frame: REP 103 optical frame (x right, y down, z forward); lengths in metres.
- Crops and resizes are affine maps ``A`` (2, 3) from full-image to crop pixel coordinates. The
  crop's intrinsics are ``[A; 0 0 1] @ K`` and its pixels are ``cv2.warpAffine`` with the same
  ``A``, so the geometry and the image content cannot disagree.

Functions taking ``K`` and points accept numpy arrays or torch tensors
(:func:`pose_node.arrays.numpy_or_torch`): numpy in gives float64 numpy out; when any argument is
a torch tensor, the computation runs in torch on the first tensor's device and dtype
(differentiable), numpy arguments converted to it.
"""
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from pose_node.arrays import Array, numpy_or_torch

DISTORTION_MODELS = ('', 'plumb_bob', 'rational_polynomial', 'equidistant')
# plumb_bob and rational_polynomial both go to OpenCV's standard model, which reads the
# coefficients by count (k1 k2 p1 p2 [k3 [k4 k5 k6 [s1..s4 [tx ty]]]]): any count it takes is fine.
_OPENCV_STANDARD_COUNTS = (4, 5, 8, 12, 14)
_EQUIDISTANT_COUNT = 4
# Iterative point undistortion: OpenCV's default (5 iterations) leaves errors of 0.03-0.1 px near
# the corners of a VGA image with k1 = -0.3 to -0.4 (measured); these criteria reach 1e-11 px.
_UNDISTORT_CRITERIA = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-12)


@dataclass(frozen=True, eq=False)
class Camera:
    """Pinhole camera of the image the pipeline actually sees.

    ``K`` (3, 3) intrinsics in pixels; ``width``, ``height`` in pixels; ``D`` (N,) distortion
    coefficients in ``distortion_model``'s convention (empty or zeros when the image is
    rectified); ``distortion_model`` one of :data:`DISTORTION_MODELS` ('' = none).
    Arrays are stored as read-only float64 copies. Equality and hashing compare values, so a
    Camera can key a cache (e.g. of undistortion maps).
    """

    K: np.ndarray
    width: int
    height: int
    D: np.ndarray = field(default_factory=lambda: np.zeros(0))
    distortion_model: str = ''

    def __post_init__(self):
        object.__setattr__(self, 'K', _read_only_float64(self.K))
        object.__setattr__(self, 'D', _read_only_float64(self.D).reshape(-1))
        object.__setattr__(self, 'width', int(self.width))
        object.__setattr__(self, 'height', int(self.height))
        _validate_intrinsics(self.K, self.width, self.height)
        _validate_distortion(self.D, self.distortion_model)

    @property
    def has_distortion(self) -> bool:
        """True when some distortion coefficient is non-zero (the image is not rectified)."""
        return bool(np.any(self.D != 0.0))

    @property
    def is_rectified(self) -> bool:
        """True when the image follows the ideal pinhole model given by ``K`` alone."""
        return not self.has_distortion

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Camera):
            return NotImplemented
        return (self.width == other.width and self.height == other.height
                and self.distortion_model == other.distortion_model
                and np.array_equal(self.K, other.K) and np.array_equal(self.D, other.D))

    def __hash__(self) -> int:
        return hash((self.K.tobytes(), self.D.tobytes(), self.width, self.height,
                     self.distortion_model))


def _read_only_float64(values) -> np.ndarray:
    array = np.array(values, dtype=np.float64)
    array.setflags(write=False)
    return array


def _validate_intrinsics(K: np.ndarray, width: int, height: int) -> None:
    if K.shape != (3, 3):
        raise ValueError(f'K must be (3, 3), got {K.shape}')
    if not np.all(np.isfinite(K)):
        raise ValueError(f'K has non-finite values:\n{K}')
    if width <= 0 or height <= 0:
        raise ValueError(f'image size must be positive, got {width} x {height}')
    if K[0, 0] <= 0 or K[1, 1] <= 0:
        raise ValueError(f'focal lengths must be positive, got fx={K[0, 0]}, fy={K[1, 1]}')
    if not np.allclose(K[2], (0.0, 0.0, 1.0)):
        raise ValueError(f'the last row of K must be (0, 0, 1), got {K[2]}')
    cx, cy = K[0, 2], K[1, 2]
    # Lenient on purpose (an off-centre ROI moves the principal point out of its image); this
    # catches garbage such as a K in mm or in the wrong layout, not calibration offsets.
    if not (-width <= cx <= 2 * width and -height <= cy <= 2 * height):
        raise ValueError(f'principal point ({cx}, {cy}) is more than one image size outside the '
                         f'{width} x {height} image')


def _validate_distortion(D: np.ndarray, model: str) -> None:
    if model not in DISTORTION_MODELS:
        raise ValueError(f'unknown distortion model {model!r}; known: {DISTORTION_MODELS}')
    if not np.all(np.isfinite(D)):
        raise ValueError(f'D has non-finite values: {D}')
    if model == '' and np.any(D != 0.0):
        raise ValueError(f'non-zero distortion coefficients {D} without a distortion model')
    if model == 'equidistant' and len(D) != _EQUIDISTANT_COUNT:
        raise ValueError(f'equidistant needs {_EQUIDISTANT_COUNT} coefficients, got {len(D)}')
    if model in ('plumb_bob', 'rational_polynomial') and len(D) not in _OPENCV_STANDARD_COUNTS:
        raise ValueError(f'{model} needs {_OPENCV_STANDARD_COUNTS} coefficients, got {len(D)}')


# -------------------------------------------------------------------------------------------------
# CameraInfo
# -------------------------------------------------------------------------------------------------

def camera_from_camera_info(k, p, d, distortion_model: str, width: int, height: int,
                            binning_x: int = 0, binning_y: int = 0,
                            roi: tuple[int, int, int, int, bool] | None = None, *,
                            use_rectified: bool) -> Camera:
    """Camera of the image published with a ``sensor_msgs/CameraInfo``, from the message's fields.

    ``k`` (9,) or (3, 3), ``p`` (12,) or (3, 4), ``d`` (N,); ``width``, ``height`` are the
    message's (full, calibrated) resolution; ``roi`` is ``(x_offset, y_offset, width, height,
    do_rectify)`` in full-resolution pixels, None or all zeros meaning the full image.
    ``use_rectified`` says which image the pipeline receives: True for ``image_rect*``
    (intrinsics from P's left 3 x 3, no distortion), False for ``image``/``image_color``
    (intrinsics K, distortion D).

    Binning and ROI follow image_geometry's ``PinholeCameraModel::fromCameraInfo``, so that this K
    agrees with every other ROS consumer of the same message (image_proc, rviz overlays):

        K' = [[1/bx, 0, -x_offset/bx], [0, 1/by, -y_offset/by], [0, 0, 1]] @ K, i.e.
        fx' = fx / bx,   cx' = (cx - x_offset) / bx,   width' = roi_width // bx   (same for y)

    with binning 0 treated as 1. (image_geometry leaves the skew K[0, 1] unscaled; it is 0 in
    practice, and dividing it too is the consistent affine.) The formula is exact for decimation
    that keeps every b-th pixel, as image_proc's crop_decimate does; for sensors that average
    b x b blocks the pixel-centre convention would give ``(cx - x_offset + 0.5) / b - 0.5``,
    0.25 px away at b = 2.
    As in image_geometry, the rectified image of a ROI is cut at the raw ROI's offset and size
    (``do_rectify`` changes neither); P's Tx, Ty (stereo baseline) are ignored since poses are
    expressed in this camera's own (rectified) optical frame; R is taken as identity (monocular).

    Raises ValueError for an uncalibrated camera (the intrinsics used are all zeros, the message's
    convention) and for any value that :class:`Camera` rejects.
    """
    bx, by = max(int(binning_x), 1), max(int(binning_y), 1)
    x_offset, y_offset, roi_width, roi_height = _roi_or_full(roi, width, height)
    if use_rectified:
        intrinsics = _reshape_checked(p, (3, 4), 'P')[:, :3]
        if not np.any(intrinsics):
            raise ValueError('P is all zeros (uncalibrated camera): rectified input needs P')
        coefficients, model = np.zeros(0), ''
    else:
        intrinsics = _reshape_checked(k, (3, 3), 'K')
        if not np.any(intrinsics):
            raise ValueError('K is all zeros (uncalibrated camera)')
        coefficients = np.asarray(d, dtype=np.float64).reshape(-1)
        # The model's name does not matter when there is nothing to undo: drivers and simulators
        # publish 'plumb_bob' with zeros, 'none', or '' for the same thing.
        model = distortion_model if np.any(coefficients != 0.0) else ''
        coefficients = coefficients if model else np.zeros(0)
    roi_and_binning = np.array([[1.0 / bx, 0.0, -x_offset / bx],
                                [0.0, 1.0 / by, -y_offset / by]])
    return Camera(K=transform_intrinsics(intrinsics, roi_and_binning), width=roi_width // bx,
                  height=roi_height // by, D=coefficients, distortion_model=model)


def _roi_or_full(roi, width: int, height: int) -> tuple[int, int, int, int]:
    if roi is None or not any(roi[:4]):
        return 0, 0, int(width), int(height)
    x_offset, y_offset, roi_width, roi_height = (int(v) for v in roi[:4])
    return x_offset, y_offset, roi_width, roi_height


def _reshape_checked(values, shape: tuple[int, int], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.size != shape[0] * shape[1]:
        raise ValueError(f'{name} needs {shape[0] * shape[1]} values, got {array.size}')
    array = array.reshape(shape)
    if not np.all(np.isfinite(array)):
        raise ValueError(f'{name} has non-finite values:\n{array}')
    return array


# -------------------------------------------------------------------------------------------------
# Crops
# -------------------------------------------------------------------------------------------------

def square_box_around(box_xywh, scale: float = 1.0) -> np.ndarray:
    """Square box (..., 4) centred on ``box_xywh`` (..., 4) with side ``scale * max(w, h)``.

    The "mask-style crop": scale 1.2-1.5 leaves context around the object. May leave the image.
    """
    box = np.asarray(box_xywh, dtype=np.float64)
    centre = box[..., :2] + 0.5 * box[..., 2:]
    side = scale * np.max(box[..., 2:], axis=-1, keepdims=True)
    return np.concatenate([centre - 0.5 * side, side, side], axis=-1)


def crop_transform(box_xywh, out_size: tuple[int, int]) -> np.ndarray:
    """Affine ``A`` (..., 2, 3) mapping full-image pixel coordinates to those of the crop.

    ``box_xywh`` (..., 4) becomes the whole output image of ``out_size`` = ``(W_out, H_out)``
    pixels, its edges on the output's outer pixel edges (-0.5 and W_out - 0.5):
    ``u' = (W_out / w) (u - x) - 0.5``, the same for v.
    """
    box = np.asarray(box_xywh, dtype=np.float64)
    if np.any(box[..., 2:] <= 0):
        raise ValueError(f'box width and height must be positive, got {box}')
    scale = np.asarray(out_size, dtype=np.float64) / box[..., 2:]
    A = np.zeros(box.shape[:-1] + (2, 3))
    A[..., 0, 0] = scale[..., 0]
    A[..., 1, 1] = scale[..., 1]
    A[..., :, 2] = -scale * box[..., :2] - 0.5
    return A


@numpy_or_torch
def transform_intrinsics(K: Array, A: Array) -> Array:
    """Intrinsics ``[A; 0 0 1] @ K`` (..., 3, 3) of an image warped by the affine ``A`` (..., 2, 3).

    Batch dimensions broadcast.
    """
    last_row = torch.tensor([0.0, 0.0, 1.0], dtype=A.dtype, device=A.device)
    A3 = torch.cat([A, last_row.expand(A.shape[:-2] + (1, 3))], dim=-2)
    return A3 @ K


def crop_image(image: np.ndarray, box_xywh, out_size: tuple[int, int],
               interpolation: int = cv2.INTER_LINEAR, border: int = cv2.BORDER_CONSTANT,
               border_value: float = 0.0, antialias: bool = True) -> np.ndarray:
    """Pixels of ``box_xywh`` (4,) resampled to ``out_size`` = (W_out, H_out) by ``cv2.warpAffine``
    with :func:`crop_transform`'s ``A`` (:func:`transform_intrinsics` with it gives the crop's K).

    ``image`` (H, W) or (H, W, C), C <= 4, any dtype cv2.warpAffine takes (not bool). Pixels
    outside the image follow ``border``; ``border_value`` fills every channel. With ``antialias``,
    where an axis is downsampled by a factor f > 1 the source is first blurred along it by a
    Gaussian of sigma (f - 1) / 2 source pixels (skimage ``rescale``'s choice); being symmetric,
    the blur moves nothing. Pass ``antialias=False`` with ``cv2.INTER_NEAREST`` for label masks.
    """
    A = crop_transform(box_xywh, out_size)
    fill = (float(border_value),) * 4  # a bare number would fill the first channel only
    sigma = np.maximum((1.0 / np.diag(A[:, :2]) - 1.0) / 2.0, 0.0)
    if antialias and np.any(sigma > 0):
        image, A = _blurred_window(image, A, box_xywh, sigma, border, fill)
    return cv2.warpAffine(image, A, (int(out_size[0]), int(out_size[1])), flags=interpolation,
                          borderMode=border, borderValue=fill)


def _blurred_window(image: np.ndarray, A: np.ndarray, box_xywh, sigma: np.ndarray, border: int,
                    fill: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The box's neighbourhood, extended by ``border`` where it leaves the image and blurred by
    ``sigma`` (x, y) source pixels, and the affine from its pixel coordinates to the crop's.

    Blurring only this window keeps the cost proportional to the crop, not to the image. Its
    margin covers the blur kernel and the interpolation footprint, so the warp never samples where
    the window and a blur of the whole (extended) image differ.
    """
    x, y, w, h = np.asarray(box_xywh, dtype=np.float64)
    margin = int(np.ceil(4.0 * sigma.max())) + 2
    left, top = int(np.floor(x)) - margin, int(np.floor(y)) - margin
    right, bottom = int(np.ceil(x + w)) + margin + 1, int(np.ceil(y + h)) + margin + 1
    height, width = image.shape[:2]
    inner_left, inner_top = min(max(left, 0), width), min(max(top, 0), height)
    inner_right = max(min(right, width), inner_left)
    inner_bottom = max(min(bottom, height), inner_top)
    if inner_right == inner_left or inner_bottom == inner_top:
        return image, A  # the box misses the image: the output is border only
    window = cv2.copyMakeBorder(image[inner_top:inner_bottom, inner_left:inner_right],
                                inner_top - top, bottom - inner_bottom,
                                inner_left - left, right - inner_right, border, value=fill)
    # Zero sigma here means "no blur along this axis"; OpenCV would read sigmaY = 0 as = sigmaX.
    window = cv2.GaussianBlur(window, (0, 0), sigmaX=max(sigma[0], 1e-6),
                              sigmaY=max(sigma[1], 1e-6))
    A_window = A.copy()
    A_window[:, 2] += A[:, :2] @ np.array([left, top], dtype=np.float64)
    return window, A_window


# -------------------------------------------------------------------------------------------------
# Projection
# -------------------------------------------------------------------------------------------------

@numpy_or_torch
def project_points(K: Array, points_cam: Array, min_depth: float = 1e-6) -> Array:
    """Pixel coordinates (..., N, 2) of camera-frame points ``points_cam`` (..., N, 3), metres.

    ``K`` (..., 3, 3) broadcasts against the batch dimensions. Points with z <= ``min_depth``
    (behind or on the camera plane) project to NaN; in torch their gradient is exactly zero, never
    NaN, so a loss that masks them out (``torch.isfinite``) stays finite.
    """
    homogeneous = points_cam @ K.transpose(-1, -2)
    in_front = points_cam[..., 2:3] > min_depth
    # Dividing by a stand-in depth where the point is dropped keeps its gradient finite (zero).
    safe_depth = torch.where(in_front, homogeneous[..., 2:3], 1.0)
    return torch.where(in_front, homogeneous[..., :2] / safe_depth, float('nan'))


@numpy_or_torch
def unproject_points(K: Array, uv: Array, depth: Array) -> Array:
    """Camera-frame points (..., N, 3) at pixels ``uv`` (..., N, 2) with z = ``depth`` (..., N).

    ``depth`` is the optical-axis coordinate z (as in depth images), not the distance along the
    ray.
    """
    pixels = torch.cat([uv, torch.ones_like(uv[..., :1])], dim=-1)
    rays = pixels @ torch.linalg.inv(K).transpose(-1, -2)
    # Dividing by the ray's z makes z equal ``depth`` exactly despite rounding in the inverse.
    return rays / rays[..., 2:3] * depth[..., None]


# -------------------------------------------------------------------------------------------------
# Distortion
# -------------------------------------------------------------------------------------------------

def undistortion_maps(camera: Camera) -> tuple[np.ndarray, np.ndarray]:
    """``cv2.remap`` maps (H, W) float32 from the rectified image (intrinsics ``camera.K``) to the
    raw one.

    They cost about 2 ms per VGA frame (measured); a node can compute them once per camera.
    """
    size = (camera.width, camera.height)
    if camera.distortion_model == 'equidistant':
        return cv2.fisheye.initUndistortRectifyMap(camera.K, camera.D, np.eye(3), camera.K, size,
                                                   cv2.CV_32FC1)
    return cv2.initUndistortRectifyMap(camera.K, camera.D, None, camera.K, size, cv2.CV_32FC1)


def undistort_image(image: np.ndarray, camera: Camera, interpolation: int = cv2.INTER_LINEAR,
                    maps: tuple[np.ndarray, np.ndarray] | None = None
                    ) -> tuple[np.ndarray, Camera]:
    """Rectified ``image`` (H, W[, C]) and its Camera (same K and size, no distortion).

    The rectified image keeps K as its intrinsics (not ``getOptimalNewCameraMatrix``): the pixel
    scale at the centre and the image size stay as they were, so boxes and K keep their meaning;
    the price is that barrel distortion pushes a little of the border out of the image and
    pincushion leaves black (zero) corners. ``maps`` from :func:`undistortion_maps` skip
    recomputing them. A camera without distortion returns the same image object and camera.
    """
    if not camera.has_distortion:
        return image, camera
    map_x, map_y = undistortion_maps(camera) if maps is None else maps
    rectified = cv2.remap(image, map_x, map_y, interpolation, borderMode=cv2.BORDER_CONSTANT)
    return rectified, Camera(K=camera.K, width=camera.width, height=camera.height)


def undistort_points(uv, camera: Camera) -> np.ndarray:
    """Ideal pinhole pixels (..., N, 2) under ``camera.K`` of raw (distorted) pixels ``uv``
    (..., N, 2): the inverse of the lens distortion. Numpy only, float64.
    """
    uv = np.asarray(uv, dtype=np.float64)
    if not camera.has_distortion:
        return uv
    points = np.ascontiguousarray(uv.reshape(-1, 1, 2))
    if camera.distortion_model == 'equidistant':
        ideal = cv2.fisheye.undistortPoints(points, camera.K, camera.D, R=np.eye(3), P=camera.K,
                                            criteria=_UNDISTORT_CRITERIA)
    else:
        ideal = _undistort_points_standard(points, camera.K, camera.D)
    return ideal.reshape(uv.shape)


def _undistort_points_standard(points: np.ndarray, K: np.ndarray, D: np.ndarray) -> np.ndarray:
    # OpenCV 4 takes the iteration criteria only in undistortPointsIter; OpenCV 5 merged it into
    # undistortPoints. ROS distributions ship OpenCV 4.
    if hasattr(cv2, 'undistortPointsIter'):
        return cv2.undistortPointsIter(points, K, D, None, K, _UNDISTORT_CRITERIA)
    return cv2.undistortPoints(points, K, D, R=None, P=K, criteria=_UNDISTORT_CRITERIA)

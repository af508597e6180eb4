"""Message <-> core type conversion at the ROS edge (the only place where ROS units and layouts meet
the core's). Images: sensor_msgs/Image with its ``step`` (row padding) and ``is_bigendian`` honoured."""
import numpy as np
from geometry_msgs.msg import Pose, PoseStamped, Transform, TransformStamped
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header

from pose_node.camera import Camera, camera_from_camera_info
from pose_node.crop import label_masks
from pose_node.geometry import matrix_to_quaternion, quaternion_to_matrix

# encoding -> (channels, numpy dtype, order of the colour channels as stored)
IMAGE_ENCODINGS = {
    'rgb8': (3, np.uint8, 'rgb'),
    'bgr8': (3, np.uint8, 'bgr'),
    'rgba8': (4, np.uint8, 'rgba'),
    'bgra8': (4, np.uint8, 'bgra'),
    'mono8': (1, np.uint8, 'mono'),
    'rgb16': (3, np.uint16, 'rgb'),
    'bgr16': (3, np.uint16, 'bgr'),
    'rgba16': (4, np.uint16, 'rgba'),
    'bgra16': (4, np.uint16, 'bgra'),
    'mono16': (1, np.uint16, 'mono'),
    '8UC1': (1, np.uint8, 'mono'),
    '16UC1': (1, np.uint16, 'mono'),
}


class ImageConversionError(ValueError):
    """The image message cannot be read as stated (unknown encoding, inconsistent sizes)."""


def image_msg_to_array(msg: Image) -> np.ndarray:
    """Pixels of ``msg`` as stored: (H, W, C) of uint8 or uint16 in native byte order."""
    if msg.encoding not in IMAGE_ENCODINGS:
        raise ImageConversionError(
            f'unsupported image encoding {msg.encoding!r}; supported: {", ".join(IMAGE_ENCODINGS)}')
    channels, dtype, _ = IMAGE_ENCODINGS[msg.encoding]
    dtype = np.dtype(dtype).newbyteorder('>' if msg.is_bigendian else '<')
    row_bytes = msg.width * channels * dtype.itemsize
    if msg.height == 0 or msg.width == 0:
        raise ImageConversionError('empty image (width or height is 0)')
    if msg.step < row_bytes:
        raise ImageConversionError(f'step {msg.step} is smaller than a row ({row_bytes} bytes)')
    if len(msg.data) < msg.step * msg.height:
        raise ImageConversionError(
            f'data has {len(msg.data)} bytes, expected step*height = {msg.step * msg.height}')
    rows = np.frombuffer(bytes(msg.data), dtype=np.uint8, count=msg.step * msg.height)
    rows = rows.reshape(msg.height, msg.step)[:, :row_bytes]
    pixels = np.ascontiguousarray(rows).view(dtype).reshape(msg.height, msg.width, channels)
    return pixels.astype(dtype.newbyteorder('='))


def image_msg_to_rgb(msg: Image) -> np.ndarray:
    """(H, W, 3) float32 RGB in 0..1 from any supported encoding (alpha dropped, mono replicated)."""
    pixels = image_msg_to_array(msg)
    _, dtype, order = IMAGE_ENCODINGS[msg.encoding]
    scale = float(np.iinfo(dtype).max)
    if order == 'mono':
        rgb = np.repeat(pixels, 3, axis=2)
    elif order.startswith('bgr'):
        rgb = pixels[..., [2, 1, 0]]
    else:
        rgb = pixels[..., :3]
    return rgb.astype(np.float32) / scale


def label_msg_to_masks(msg: Image, names: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per object name its mask (H, W) bool from a one-channel label image, and its unknown pixels
    (H, W) bool (see ``pose_node.crop.label_masks``: value i is ``names[i - 1]``, 0 background,
    255 or 65535 unknown)."""
    pixels = image_msg_to_array(msg)
    if pixels.shape[2] != 1:
        raise ImageConversionError(f'a mask label image needs one channel, got {msg.encoding!r}')
    return label_masks(pixels[..., 0], names)


def rgb_to_image_msg(rgb: np.ndarray, header: Header, encoding: str = 'rgb8') -> Image:
    """An Image message from (H, W, 3) uint8 RGB pixels, stored in ``encoding`` (8-bit ones)."""
    channels, dtype, order = IMAGE_ENCODINGS[encoding]
    if dtype is not np.uint8 or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ImageConversionError('rgb_to_image_msg expects (H, W, 3) uint8 and an 8-bit encoding')
    if order == 'mono':
        pixels = rgb.mean(axis=2, keepdims=True).round().astype(np.uint8)
    else:
        pixels = rgb[..., [2, 1, 0]] if order.startswith('bgr') else rgb
        if channels == 4:
            pixels = np.concatenate([pixels, np.full(rgb.shape[:2] + (1,), 255, np.uint8)], axis=2)
    msg = Image(header=header, height=rgb.shape[0], width=rgb.shape[1], encoding=encoding,
                is_bigendian=0, step=rgb.shape[1] * channels)
    msg.data = np.ascontiguousarray(pixels).tobytes()
    return msg


def camera_info_msg_to_camera(msg: CameraInfo, use_rectified: bool) -> Camera:
    """The core Camera model of a CameraInfo (P for rectified input, K and D otherwise)."""
    return camera_from_camera_info(
        k=np.array(msg.k, np.float64).reshape(3, 3), p=np.array(msg.p, np.float64).reshape(3, 4),
        d=np.array(msg.d, np.float64), distortion_model=msg.distortion_model,
        width=msg.width, height=msg.height, binning_x=msg.binning_x, binning_y=msg.binning_y,
        roi=(msg.roi.x_offset, msg.roi.y_offset, msg.roi.width, msg.roi.height, msg.roi.do_rectify),
        use_rectified=use_rectified)


def camera_to_camera_info_msg(K: np.ndarray, width: int, height: int, header: Header) -> CameraInfo:
    """A CameraInfo for an ideal pinhole camera (no distortion, P = [K | 0])."""
    msg = CameraInfo(header=header, width=width, height=height, distortion_model='plumb_bob')
    msg.d = [0.0] * 5
    msg.k = [float(v) for v in np.asarray(K, np.float64).ravel()]
    msg.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    msg.p = [float(v) for v in np.hstack([K, np.zeros((3, 1))]).ravel()]
    return msg


def pose_to_msg(T: np.ndarray) -> Pose:
    """geometry_msgs/Pose of an object-to-camera transform (4, 4), metres."""
    T = np.asarray(T, np.float64)
    qx, qy, qz, qw = (float(v) for v in matrix_to_quaternion(T[:3, :3]))
    msg = Pose()
    msg.position.x, msg.position.y, msg.position.z = (float(v) for v in T[:3, 3])
    msg.orientation.x, msg.orientation.y, msg.orientation.z, msg.orientation.w = qx, qy, qz, qw
    return msg


def msg_to_pose(msg: Pose) -> np.ndarray:
    """(4, 4) transform of a geometry_msgs/Pose (the quaternion is normalised first)."""
    q = np.array([msg.orientation.x, msg.orientation.y, msg.orientation.z, msg.orientation.w])
    T = np.eye(4)
    T[:3, :3] = quaternion_to_matrix(q / np.linalg.norm(q))
    T[:3, 3] = [msg.position.x, msg.position.y, msg.position.z]
    return T


def pose_stamped_msg(T: np.ndarray, header: Header) -> PoseStamped:
    return PoseStamped(header=header, pose=pose_to_msg(T))


def transform_stamped_msg(T: np.ndarray, header: Header, child_frame_id: str) -> TransformStamped:
    """TF of the object frame ``child_frame_id`` in the camera frame ``header.frame_id``."""
    pose = pose_to_msg(T)
    transform = Transform()
    transform.translation.x, transform.translation.y, transform.translation.z = (
        pose.position.x, pose.position.y, pose.position.z)
    transform.rotation = pose.orientation
    return TransformStamped(header=header, child_frame_id=child_frame_id, transform=transform)

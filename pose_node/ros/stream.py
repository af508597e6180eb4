"""A synthetic camera for the node: ray-cast frames of known objects moving smoothly over a
procedural background, published as image + camera_info + mask label image, and a client that
records what pose_node publishes back (for the demo, bench-node and the node tests).

Units: metres, poses object-to-camera (4, 4) in the camera's optical frame; images uint8 RGB.
"""
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage
from vision_msgs.msg import Detection3DArray
from visualization_msgs.msg import MarkerArray

from pose_node.camera import project_points
from pose_node.crop import stored_labels
from pose_node.datasets.synthetic import procedural_background
from pose_node.geometry import (axis_angle_to_matrix, make_pose, random_rotations,
                                transform_points)
from pose_node.mesh import ObjectModel
from pose_node.render.raycast import RaycastScene
from pose_node.resources import share_dir
from pose_node.ros.conversions import camera_to_camera_info_msg, rgb_to_image_msg

CAMERA_FRAME = 'synthetic_camera_optical_frame'
FASTDDS_PROFILES_VARIABLE = 'FASTDDS_DEFAULT_PROFILES_FILE'
STREAM_QOS = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


@dataclass
class StreamFrame:
    """rgb (H, W, 3) uint8; labels (H, W) uint8: 1 + index of the visible object, 0 background;
    poses (N, 4, 4) the truth, metres."""

    rgb: np.ndarray
    labels: np.ndarray
    poses: np.ndarray


def smooth_trajectory(n_frames: int, start: np.ndarray, rng: np.random.Generator,
                      turn_deg_per_frame: float = 2.0, sway_m: float = 0.03) -> np.ndarray:
    """(n_frames, 4, 4) poses from ``start`` (4, 4): turning steadily about a random axis and
    swaying laterally by up to ``sway_m`` metres (a slow sinusoid)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    phase = rng.uniform(0, 2 * np.pi, 2)
    poses = []
    for index in range(n_frames):
        R = np.asarray(axis_angle_to_matrix(axis * np.deg2rad(turn_deg_per_frame * index)))
        offset = sway_m * np.sin(2 * np.pi * index / 60 + phase)
        t = start[:3, 3] + np.array([offset[0], offset[1], 0.0])
        poses.append(make_pose(R @ start[:3, :3], t))
    return np.stack(poses)


def render_frame(scene: RaycastScene, poses: np.ndarray, K: np.ndarray, background: np.ndarray,
                 supersample: int = 1) -> StreamFrame:
    """The objects of ``scene`` at ``poses`` (N, 4, 4) over ``background`` (H, W, 3) float 0..1;
    only the box around their projections is ray-cast, ``supersample`` squared rays per pixel.
    Labels are the pixels more than half covered. An odd ``supersample`` keeps them unbiased: with
    2 x 2 rays the pixels covered exactly half all fall on one side, which moved the refined depth
    by 1.2-1.7 mm at 0.5 m (measured; 0.04-0.14 mm with 1 or 3 rays per side)."""
    height, width = background.shape[:2]
    uv = np.concatenate([project_points(K, transform_points(pose, model.vertices))
                         for pose, model in zip(poses, scene.models)])
    low = np.clip(np.floor(uv.min(axis=0)).astype(int) - 1, 0, [width, height])
    high = np.clip(np.ceil(uv.max(axis=0)).astype(int) + 2, 0, [width, height])
    rgb = background.astype(np.float32).copy()
    labels = np.zeros((height, width), np.uint8)
    if np.all(high > low):
        K_box = np.array(K, np.float64)
        K_box[:2, 2] -= low
        image = scene.render(poses, K_box, int(high[0] - low[0]), int(high[1] - low[1]),
                             supersample=supersample)
        window = (slice(low[1], high[1]), slice(low[0], high[0]))
        coverage = image.coverage.sum(axis=0)[..., None]
        rgb[window] = image.rgb + (1.0 - coverage) * rgb[window]
        labels[window] = np.where(coverage[..., 0] > 0.5, image.coverage.argmax(axis=0) + 1, 0)
    return StreamFrame(rgb=(rgb * 255).round().astype(np.uint8), labels=labels,
                       poses=np.asarray(poses))


def synthetic_stream(models: list[ObjectModel], K: np.ndarray, width: int, height: int,
                     n_frames: int, rng: np.random.Generator, distance_m: float = 0.5,
                     supersample: int = 1) -> list[StreamFrame]:
    """``n_frames`` frames of ``models`` moving smoothly over one procedural background, side
    by side across the image (0.16 m apart) at ``distance_m``."""
    scene = RaycastScene(models)
    background = procedural_background(width, height, rng)
    spacing = np.linspace(-1, 1, len(models)) * 0.16 * (len(models) > 1)
    trajectories = [smooth_trajectory(n_frames, make_pose(random_rotations(1, rng)[0],
                                                          np.array([x, 0.0, distance_m])), rng)
                    for x in spacing]
    return [render_frame(scene, np.stack([trajectory[index] for trajectory in trajectories]), K,
                         background, supersample) for index in range(n_frames)]


def use_large_message_transport(environ: dict) -> None:
    """Point Fast DDS at the shipped profile for image-sized messages (shared-memory segments
    larger than a frame; see config/fastdds_large_messages.xml) unless ``environ`` already names
    a profile file. Takes effect for participants created afterwards, in this process and in
    subprocesses given ``environ``."""
    environ.setdefault(FASTDDS_PROFILES_VARIABLE,
                       str(share_dir() / 'config' / 'fastdds_large_messages.xml'))


def stamp_header(stamp_ns: int, frame_id: str = CAMERA_FRAME) -> Header:
    header = Header(frame_id=frame_id)
    header.stamp.sec, header.stamp.nanosec = divmod(int(stamp_ns), 1_000_000_000)
    return header


def header_ns(header: Header) -> int:
    return int(header.stamp.sec) * 1_000_000_000 + int(header.stamp.nanosec)


@dataclass
class Received:
    """What the client got from pose_node, keyed by the image stamp (ns): per object name the
    PoseStamped and when it arrived (time.monotonic()); Detection3DArrays; MarkerArrays and debug
    images (with ``watch_visuals``); TF messages and DiagnosticArrays in arrival order."""

    poses: dict[int, dict[str, tuple[PoseStamped, float]]] = field(default_factory=dict)
    detections: dict[int, Detection3DArray] = field(default_factory=dict)
    detections_at: dict[int, float] = field(default_factory=dict)
    tf: list[TFMessage] = field(default_factory=list)
    diagnostics: list[DiagnosticArray] = field(default_factory=list)
    markers: dict[int, MarkerArray] = field(default_factory=dict)
    debug_images: dict[int, Image] = field(default_factory=dict)


class NodeClient:
    """One rclpy node that plays the camera (``image``, ``camera_info``, ``mask`` under
    ``camera_ns``) and listens to the pose_node at ``node_path`` (e.g. '/pose_node')."""

    def __init__(self, context, names: list[str], node_path: str = '/pose_node',
                 camera_ns: str = '', watch_visuals: bool = False):
        self.node = Node('synthetic_camera', context=context)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        self.received = Received()
        self.sent_at: dict[int, float] = {}
        self.publishers = {
            'image': self.node.create_publisher(Image, f'{camera_ns}/image', STREAM_QOS),
            'camera_info': self.node.create_publisher(CameraInfo, f'{camera_ns}/camera_info',
                                                      STREAM_QOS),
            'mask': self.node.create_publisher(Image, f'{camera_ns}/mask', STREAM_QOS)}
        for name in names:
            self.node.create_subscription(PoseStamped, f'{node_path}/{name}/pose',
                                          self._pose_callback(name), 10)
        self.node.create_subscription(Detection3DArray, f'{node_path}/detections',
                                      self._on_detections, 10)
        self.node.create_subscription(TFMessage, '/tf', self.received.tf.append,
                                      QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        self.node.create_subscription(DiagnosticArray, '/diagnostics',
                                      self.received.diagnostics.append, 10)
        if watch_visuals:
            self.node.create_subscription(MarkerArray, f'{node_path}/markers', self._on_markers,
                                          10)
            self.node.create_subscription(Image, f'{node_path}/debug_image',
                                          self._on_debug_image, 10)

    def _pose_callback(self, name: str) -> Callable[[PoseStamped], None]:
        def callback(msg: PoseStamped) -> None:
            self.received.poses.setdefault(header_ns(msg.header), {})[name] = (
                msg, time.monotonic())
        return callback

    def _on_detections(self, msg: Detection3DArray) -> None:
        self.received.detections[header_ns(msg.header)] = msg
        self.received.detections_at[header_ns(msg.header)] = time.monotonic()

    def _on_markers(self, msg: MarkerArray) -> None:
        if msg.markers:
            self.received.markers[header_ns(msg.markers[0].header)] = msg

    def _on_debug_image(self, msg: Image) -> None:
        self.received.debug_images[header_ns(msg.header)] = msg

    def wait_for_node(self, timeout_s: float, with_mask: bool = True) -> bool:
        """Spin until pose_node subscribes to the camera topics (it is up)."""
        keys = ('image', 'camera_info', 'mask') if with_mask else ('image', 'camera_info')
        return self.spin_until(
            lambda: all(self.publishers[key].get_subscription_count() > 0 for key in keys),
            timeout_s)

    def publish(self, frame: StreamFrame, K: np.ndarray, stamp_ns: int, with_mask: bool = True,
                image_encoding: str = 'bgr8') -> None:
        """Send one frame: image, camera_info and (optionally) the label image, same stamp."""
        header = stamp_header(stamp_ns)
        height, width = frame.labels.shape
        self.sent_at[stamp_ns] = time.monotonic()
        self.publishers['camera_info'].publish(camera_to_camera_info_msg(K, width, height,
                                                                         header))
        if with_mask:
            self.publishers['mask'].publish(label_image_msg(frame.labels, header))
        self.publishers['image'].publish(rgb_to_image_msg(frame.rgb, header, image_encoding))

    def publish_until_answered(self, frame: StreamFrame, K: np.ndarray, first_stamp_ns: int,
                               timeout_s: float, with_mask: bool = True,
                               repeat_s: float = 1.0) -> int | None:
        """Publish ``frame`` every ``repeat_s`` (stamps 1 ms apart from ``first_stamp_ns``) until
        the node answers one (its detections arrive); the answered stamp, None on timeout.
        Repeating covers a first sample lost while the connection is still being set up."""
        deadline = time.monotonic() + timeout_s
        stamps = []

        def answered() -> list[int]:
            return [stamp for stamp in stamps if stamp in self.received.detections]

        while time.monotonic() < deadline:
            stamps.append(first_stamp_ns + 1_000_000 * len(stamps))
            self.publish(frame, K, stamps[-1], with_mask=with_mask)
            if self.spin_until(lambda: bool(answered()),
                               min(repeat_s, deadline - time.monotonic())):
                return answered()[0]
        return None

    def spin_until(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not condition() and time.monotonic() < deadline:
            self.executor.spin_once(timeout_sec=0.02)
        return condition()

    def spin_for(self, seconds: float) -> None:
        self.spin_until(lambda: False, seconds)

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()


def label_image_msg(labels: np.ndarray, header: Header) -> Image:
    """mono8 (or 16UC1 above 254 objects) Image of a label image (H, W) of ints (see
    ``pose_node.crop.stored_labels``)."""
    stored = stored_labels(labels)
    height, width = stored.shape
    msg = Image(header=header, height=height, width=width,
                encoding='mono8' if stored.dtype == np.uint8 else '16UC1', is_bigendian=0,
                step=width * stored.itemsize)
    msg.data = stored.astype(stored.dtype.newbyteorder('<')).tobytes()
    return msg

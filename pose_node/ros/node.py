"""The ``pose_node`` ROS 2 node: images (+ camera_info, + optional mask label image) in; per
object PoseStamped, TF, Detection3DArray, markers, a debug image and diagnostics out.

All estimation is the core's :class:`pose_node.pipeline.Pipeline`; this node converts at the
edges, pairs messages by stamp and runs the pipeline on a worker thread that always takes the
newest complete frame (subscription callbacks only store messages; nothing queues up).
Bad input is reported (throttled warning + /diagnostics) and skipped; nothing that is not a
finite pose in front of the camera with a score above ``score_threshold`` is published.
"""
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import rclpy
import torch
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PoseStamped
from sensor_msgs.msg import CameraInfo, Image
from std_msgs.msg import Header
from tf2_msgs.msg import TFMessage
from vision_msgs.msg import Detection3DArray
from visualization_msgs.msg import MarkerArray

from pose_node.camera import Camera, undistort_image, undistortion_maps
from pose_node.objects_config import (ObjectsConfig, ObjectsConfigError, load_object_models,
                                      load_objects_config)
from pose_node.pipeline import TRACKING_OVERRIDES, Pipeline, PipelineConfig
from pose_node.render import make_renderer
from pose_node.render.raycast import RaycastScene
from pose_node.resources import share_dir
from pose_node.ros import outputs
from pose_node.ros.conversions import (ImageConversionError, camera_info_msg_to_camera,
                                       image_msg_to_rgb, label_msg_to_masks, pose_stamped_msg,
                                       rgb_to_image_msg)
from pose_node.ros.diagnostics import NodeHealth, Throttle
from pose_node.ros.params import NodeSettings, declare_parameters, read_settings
from pose_node.ros.sync import FrameInbox, MatchedFrame
from pose_node.ros.tracking import TrackingState

WARNING_PERIOD_S = 2.0
DIAGNOSTICS_PERIOD_S = 1.0
WORKER_WAIT_S = 0.1
# tf2_ros.TransformBroadcaster's QoS
TF_QOS = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)


class StartupError(RuntimeError):
    """The node cannot start (configuration, mesh or weights); the message says which file."""


def stamp_ns(stamp) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def select_device(name: str) -> torch.device:
    """torch device for the ``device`` parameter ('auto': CUDA when available)."""
    if name == 'auto':
        return torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if name == 'cuda' and not torch.cuda.is_available():
        raise StartupError('device is "cuda" but torch sees no CUDA device here')
    return torch.device(name)


def input_qos(reliability: str) -> QoSProfile:
    """Sensor-data style QoS (keep last 1) with the chosen reliability."""
    policy = (ReliabilityPolicy.RELIABLE if reliability == 'reliable'
              else ReliabilityPolicy.BEST_EFFORT)
    return QoSProfile(depth=1, history=HistoryPolicy.KEEP_LAST, reliability=policy)


def objects_file(settings: NodeSettings) -> str:
    return settings.objects_file or str(share_dir() / 'config' / 'objects.yaml')


def build_pipeline(settings: NodeSettings, config: ObjectsConfig, models: list,
                   device: torch.device, log) -> Pipeline:
    """The core pipeline the parameters and the objects file describe; StartupError naming the
    file when weights cannot be loaded."""
    segmenter = None
    if config.segmenter is not None and not settings.use_mask_topic:
        from pose_node.crop.segmenter import load_segmenter
        segmenter = _loaded(lambda: load_segmenter(config.segmenter, device), config.segmenter)
    if config.segmenter is None and not settings.use_mask_topic:
        log.error('no source of object masks: the objects file names no segmenter weights and '
                  'use_mask_topic is false. Detection and tracking both need a mask per object, '
                  'so nothing will be estimated. Set use_mask_topic:=true and publish a label '
                  'image on `mask`, or add `segmenter:` to the objects file.')
    coarse = {}
    for obj, model in zip(config.objects, models):
        if obj.regressor is not None:
            from pose_node.coarse.regressor import load_regressor
            coarse[obj.name] = _loaded(lambda: load_regressor(obj.regressor, model, device),
                                       obj.regressor)
        else:
            from pose_node.coarse.templates import TemplateMatcher
            coarse[obj.name] = TemplateMatcher.from_model(model, device=device,
                                                          colour_weight=obj.colour_weight)
    iterations = {'iterations': settings.iterations} if settings.iterations else {}
    pipeline_config = PipelineConfig(crop_size=settings.crop_size,
                                     hypotheses=settings.hypotheses,
                                     optimizer_overrides=iterations,
                                     tracking_overrides={**TRACKING_OVERRIDES, **iterations},
                                     object_losses={obj.name: obj.loss
                                                    for obj in config.objects})
    return Pipeline(models, device, pipeline_config, segmenter=segmenter, coarse=coarse,
                    renderer=make_renderer(settings.backend, device))


def _loaded(load, path):
    try:
        return load()
    except (OSError, ValueError, RuntimeError) as error:
        raise StartupError(f'{path}: cannot load weights ({error})') from error


class PoseNode(Node):
    """See the module docstring; topics relative to the node: image, camera_info, mask (in);
    ~/<object>/pose, ~/detections, ~/markers, ~/debug_image (out); /tf, /diagnostics."""

    def __init__(self):
        super().__init__('pose_node')
        declare_parameters(self)
        settings = read_settings(self)
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        try:
            self.objects = load_objects_config(objects_file(settings))
            self.models = load_object_models(self.objects)
        except ObjectsConfigError as error:
            raise StartupError(str(error)) from error
        self.device = select_device(settings.device)
        self.pipeline = build_pipeline(settings, self.objects, self.models, self.device,
                                       self.get_logger())
        self.scenes = {model.name: RaycastScene([model]) for model in self.models}
        self.diameters = {model.name: model.diameter for model in self.models}
        self.health = NodeHealth(backend=type(self.pipeline.renderer).__name__,
                                 device=str(self.device), objects=self.objects.names)
        self.throttle = Throttle(WARNING_PERIOD_S)
        self.tracking = TrackingState()
        self.inbox = FrameInbox(slop_ns=int(settings.sync_slop_s * 1e9),
                                need_mask=settings.use_mask_topic,
                                timeout_s=settings.camera_info_timeout_s)
        self._undistortion: dict[Camera, tuple[np.ndarray, np.ndarray]] = {}
        self._create_publishers()
        self._create_subscriptions(settings)
        self.create_timer(DIAGNOSTICS_PERIOD_S, self._on_diagnostics_timer)
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._work, name='pose_node_worker', daemon=True)
        self._worker.start()
        masks = ('the mask topic' if settings.use_mask_topic
                 else 'the built-in segmenter' if self.pipeline.segmenter is not None
                 else 'nowhere (see the error above)')
        self.get_logger().info(f'estimating {", ".join(self.objects.names)} on {self.device} '
                               f'with {self.health.backend}; masks from {masks}')

    def _create_publishers(self) -> None:
        self.pose_publishers = {name: self.create_publisher(PoseStamped, f'~/{name}/pose', 10)
                                for name in self.objects.names}
        self.detections_publisher = self.create_publisher(Detection3DArray, '~/detections', 10)
        self.markers_publisher = self.create_publisher(MarkerArray, '~/markers', 10)
        self.debug_publisher = self.create_publisher(Image, '~/debug_image', 1)
        self.send_tf = tf_sender(self)
        self.diagnostics_publisher = self.create_publisher(DiagnosticArray, '/diagnostics', 10)

    def _create_subscriptions(self, settings: NodeSettings) -> None:
        qos = input_qos(settings.qos_reliability)
        self.create_subscription(Image, 'image', self._on_image, qos)
        self.create_subscription(CameraInfo, 'camera_info', self._on_camera_info, qos_depth(qos))
        if settings.use_mask_topic:
            self.create_subscription(Image, 'mask', self._on_mask, qos_depth(qos))

    # ------------------------------------------------------------------ callbacks (never block)

    def _on_image(self, msg: Image) -> None:
        self.health.image_received(time.monotonic())
        refused = self.inbox.put_image(stamp_ns(msg.header.stamp), msg)
        if refused:
            self.report('stamp', refused)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        self.health.camera_info_received(time.monotonic())
        self.inbox.put_camera_info(stamp_ns(msg.header.stamp), msg)

    def _on_mask(self, msg: Image) -> None:
        self.inbox.put_mask(stamp_ns(msg.header.stamp), msg)

    def _on_diagnostics_timer(self) -> None:
        now = time.monotonic()
        settings = read_settings(self)
        self.inbox.set_slop(int(settings.sync_slop_s * 1e9))
        self.inbox.set_timeout(settings.camera_info_timeout_s)
        missing_s = self.health.camera_info_missing_s(now, settings.camera_info_timeout_s)
        if missing_s is not None:
            since = 'has ever arrived' if np.isinf(missing_s) else f'for {missing_s:.1f} s'
            self.report('camera_info', f'images arrive but no camera_info {since}')
        header = Header(stamp=self.get_clock().now().to_msg())
        status = self.health.status(now, self.inbox.dropped, self.get_fully_qualified_name())
        self.diagnostics_publisher.publish(DiagnosticArray(header=header, status=[status]))

    def report(self, kind: str, message: str) -> None:
        """A problem with the input or the pipeline: diagnostics, and a throttled warning."""
        now = time.monotonic()
        self.health.problem(kind, message, now)
        if self.throttle.allow(kind, now):
            self.get_logger().warning(f'{kind}: {message}')

    # ------------------------------------------------------------------ worker thread

    def _work(self) -> None:
        next_allowed = 0.0
        while not self._stop.is_set():
            wait = next_allowed - time.monotonic()
            if wait > 0:
                self._stop.wait(wait)
                continue
            frame, problem = self.inbox.take(WORKER_WAIT_S)
            if problem:
                self.report('sync', problem)
            if frame is None:
                continue
            settings = read_settings(self)
            started = time.monotonic()
            if settings.max_rate_hz > 0:
                next_allowed = started + 1.0 / settings.max_rate_hz
            try:
                self.process(frame, settings)
            except Exception as error:  # a worker that dies silently is worse than any frame
                if not self.context.ok():
                    return                  # shutting down: the publishers are gone
                self.report('pipeline', f'{type(error).__name__}: {error}')
                self.get_logger().debug(traceback.format_exc())

    def process(self, frame: MatchedFrame, settings: NodeSettings) -> None:
        """Estimate and publish one frame (bad input is reported and skipped)."""
        try:
            inputs = frame_inputs(frame, self.objects.names, settings.input_is_rectified,
                                  self._undistortion)
        except BadInput as problem:
            self.report(problem.kind, str(problem))
            return
        priors = self.tracking.priors_for_frame(settings.tracking, settings.redetect_interval)
        try:
            estimates = self.pipeline.estimate(inputs.rgb, inputs.camera.K, masks=inputs.masks,
                                               prior_poses=priors, ignore=inputs.ignore)
        except ValueError as error:
            self.report('input', str(error))
            return
        accepted = {name: estimate for name, estimate in estimates.items()
                    if outputs.publishable(estimate.pose, estimate.score,
                                           settings.score_threshold, self.diameters[name])}
        self.tracking.update({name: e.pose for name, e in accepted.items()}, priors)
        self._publish(frame.image.header, inputs.rgb, inputs.camera, accepted, settings)
        now = time.monotonic()
        self.health.frame_processed(now, 1e3 * (now - frame.received),
                                    {name: e.source for name, e in accepted.items()},
                                    stage_totals(estimates.values()))

    def _publish(self, header: Header, rgb: np.ndarray, camera: Camera, accepted: dict,
                 settings: NodeSettings) -> None:
        poses = {name: estimate.pose for name, estimate in accepted.items()}
        for name, pose in poses.items():
            self.pose_publishers[name].publish(pose_stamped_msg(pose, header))
        models = dict(zip(self.objects.names, self.models))
        detections = [outputs.detection_msg(name, estimate.pose, estimate.score, models[name],
                                            header) for name, estimate in accepted.items()]
        self.detections_publisher.publish(outputs.detections_msg(detections, header))
        if settings.publish_tf and poses:
            frames = {obj.name: outputs.object_frame_id(settings.tf_prefix, obj.frame_id)
                      for obj in self.objects.objects}
            self.send_tf(outputs.tf_message(poses, frames, header))
        if settings.publish_markers and accepted:
            markers = []
            for index, obj in enumerate(self.objects.objects):
                if obj.name in accepted:
                    markers += outputs.object_markers(
                        index, obj.name, poses[obj.name], accepted[obj.name].score,
                        models[obj.name], obj.mesh.resolve().as_uri(), obj.unit_scale, header)
            self.markers_publisher.publish(MarkerArray(markers=markers))
        if settings.publish_debug_image and self.debug_publisher.get_subscription_count() > 0:
            pixels = (rgb * 255).round().astype(np.uint8)
            drawn = outputs.debug_image(pixels, camera.K, poses, self.scenes, self.diameters)
            self.debug_publisher.publish(rgb_to_image_msg(drawn, header, 'rgb8'))

    def close(self) -> None:
        """Stop the worker thread (waits for the frame in progress)."""
        self._stop.set()
        self._worker.join()


class BadInput(ValueError):
    """A frame that cannot be used; ``kind`` names the input at fault (image, camera_info, mask)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class FrameInputs:
    """What the pipeline needs from a frame: rgb (H, W, 3) float32 0..1 and its Camera, both
    rectified; masks (H, W) bool by object name and ignore (H, W) bool (unknown pixels) from the
    label image, both None without one."""

    rgb: np.ndarray
    camera: Camera
    masks: dict[str, np.ndarray] | None
    ignore: np.ndarray | None


def frame_inputs(frame: MatchedFrame, names: list[str], rectified_input: bool,
                 undistortion: dict[Camera, tuple[np.ndarray, np.ndarray]]) -> FrameInputs:
    """The frame's :class:`FrameInputs`; raw input is undistorted with maps cached in
    ``undistortion``. BadInput when a message cannot be used."""
    try:
        rgb = image_msg_to_rgb(frame.image)
    except ImageConversionError as error:
        raise BadInput('image', str(error)) from error
    try:
        camera = camera_info_msg_to_camera(frame.camera_info, rectified_input)
    except ValueError as error:
        raise BadInput('camera_info', f'unusable camera_info: {error}') from error
    if (camera.width, camera.height) != (rgb.shape[1], rgb.shape[0]):
        raise BadInput('camera_info', f'camera_info describes a {camera.width} x {camera.height} '
                       f'image, the image is {rgb.shape[1]} x {rgb.shape[0]}')
    masks = ignore = None
    if frame.mask is not None:
        try:
            masks, ignore = label_msg_to_masks(frame.mask, names)
        except ImageConversionError as error:
            raise BadInput('mask', str(error)) from error
        if (frame.mask.width, frame.mask.height) != (camera.width, camera.height):
            raise BadInput('mask', f'mask is {frame.mask.width} x {frame.mask.height}, the image '
                           f'{camera.width} x {camera.height}')
    if not camera.has_distortion:
        return FrameInputs(rgb, camera, masks, ignore)
    if camera not in undistortion:
        undistortion[camera] = undistortion_maps(camera)
    maps = undistortion[camera]
    rgb, rectified = undistort_image(rgb, camera, maps=maps)

    def undistorted(mask: np.ndarray) -> np.ndarray:
        return undistort_image(mask.astype(np.uint8), camera, cv2.INTER_NEAREST, maps)[0] > 0

    if masks is not None:
        masks = {name: undistorted(mask) for name, mask in masks.items()}
        ignore = undistorted(ignore)
    return FrameInputs(rgb, rectified, masks, ignore)


def stage_totals(estimates) -> dict[str, float]:
    """Milliseconds per pipeline stage summed over ``estimates`` (the segmenter's time is
    shared by all objects of a frame: counted once)."""
    totals: dict[str, float] = {}
    for estimate in estimates:
        for stage, ms in estimate.timings_ms.items():
            totals[stage] = ms if stage == 'segment' else totals.get(stage, 0.0) + ms
    return totals


def tf_sender(node: Node) -> Callable[[TFMessage], None]:
    """Sends TF: tf2_ros's TransformBroadcaster where tf2_ros is installed, else a TFMessage
    publisher on /tf with the broadcaster's QoS (the same messages on the wire)."""
    try:
        from tf2_ros import TransformBroadcaster
    except ImportError:
        return node.create_publisher(TFMessage, '/tf', TF_QOS).publish
    broadcaster = TransformBroadcaster(node)
    return lambda message: broadcaster.sendTransform(list(message.transforms))


def qos_depth(qos: QoSProfile) -> QoSProfile:
    """``qos`` keeping a few messages: camera_info and masks may run ahead of their images."""
    return QoSProfile(depth=10, history=HistoryPolicy.KEEP_LAST, reliability=qos.reliability)


def main(argv: list[str] | None = None) -> int:
    """Run the node until shut down; 1 with a one-line message when it cannot start."""
    rclpy.init(args=argv if argv is not None else sys.argv)
    node = None
    try:
        node = PoseNode()
        rclpy.spin(node)
    except StartupError as error:
        sys.stderr.write(f'pose_node: cannot start: {error}\n')
        return 1
    except (InvalidParameterValueException, InvalidParameterTypeException) as error:
        sys.stderr.write(f'pose_node: cannot start: invalid parameter: {error}\n')
        return 1
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.close()
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == '__main__':
    sys.exit(main())

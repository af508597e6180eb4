"""The pose_node node: its pure parts (parameters, pairing, tracking, outputs) and the real node
started through its console script over Fast DDS, fed ray-cast frames with known poses."""
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch

rclpy = pytest.importorskip('rclpy', reason='rclpy (ROS 2 Python client) is not importable')

from rcl_interfaces.msg import Parameter as ParameterMsg  # noqa: E402
from rcl_interfaces.msg import ParameterType, ParameterValue  # noqa: E402
from rcl_interfaces.srv import SetParameters  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from diagnostic_msgs.msg import DiagnosticStatus  # noqa: E402
from scipy.spatial.transform import Rotation  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image  # noqa: E402
from std_msgs.msg import Header  # noqa: E402

from pose_node.crop import UNKNOWN_LABEL, stored_labels  # noqa: E402
from pose_node.overlay import draw_axes  # noqa: E402
from pose_node.render.raycast import RaycastScene  # noqa: E402
from pose_node.resources import load_demo_object  # noqa: E402
from pose_node.ros import outputs  # noqa: E402
from pose_node.ros.conversions import (camera_to_camera_info_msg, label_msg_to_masks,  # noqa: E402
                                       msg_to_pose, rgb_to_image_msg)
from pose_node.ros.diagnostics import PROBLEM_MEMORY_S, NodeHealth  # noqa: E402
from pose_node.objects_config import load_object_models, load_objects_config  # noqa: E402
from pose_node.ros.node import (BadInput, build_pipeline, frame_inputs, objects_file,  # noqa: E402
                               stage_totals)
from pose_node.ros.params import (PARAMETERS, SPECS, NodeSettings, descriptor,  # noqa: E402
                                  parameters_problem)
from pose_node.ros.stream import (NodeClient, label_image_msg, stamp_header,  # noqa: E402
                                  synthetic_stream, use_large_message_transport)
from pose_node.ros.sync import FrameInbox, MatchedFrame, nearest  # noqa: E402
from pose_node.ros.tracking import TrackingState  # noqa: E402

NODE = Path(sys.executable).parent / 'pose_node'
# Shared-memory transport for VGA images (before this process creates any DDS participant):
# without it, a lost UDP fragment stalls reliable delivery for up to 3 s.
use_large_message_transport(os.environ)
K = np.array([[600.0, 0.0, 319.5], [0.0, 600.0, 239.5], [0.0, 0.0, 1.0]])
WIDTH, HEIGHT = 640, 480
BASE_NS = 1_700_000_000_000_000_000
FRAME_NS = 100_000_000
STARTUP_S = 120.0   # the first start on a machine builds the template bank (about 40 s)
# Measured through the node on 50 synthetic frames at 0.5 m (detection, then tracking):
# 0.006-0.45 deg, 0.01-0.36 mm.
MAX_ROT_DEG, MAX_TRANS_M = 1.0, 0.002


# ----------------------------------------------------------------------------- pure parts

def test_every_parameter_is_declared_with_a_valid_default_and_its_range():
    assert parameters_problem([Parameter(spec.name, value=spec.default) for spec in PARAMETERS]) \
        is None
    assert descriptor(SPECS['crop_size']).integer_range[0].to_value == 512
    assert descriptor(SPECS['score_threshold']).floating_point_range[0].from_value == 0.0
    assert descriptor(SPECS['backend']).read_only and not descriptor(SPECS['tracking']).read_only


@pytest.mark.parametrize(('name', 'value', 'reason'), [
    ('score_threshold', 1.5, r'score_threshold must be in \[0, 1\], got 1.5'),
    ('backend', 'opengl', 'backend must be one of auto, soft, mitsuba'),
    ('crop_size', 8, r'crop_size must be in \[32, 512\]'),
    ('tracking', 1, 'tracking must be a bool'),
    ('qos_reliability', 'sometimes', 'best_effort, reliable'),
])
def test_invalid_values_are_rejected_with_the_reason(name, value, reason):
    assert re.search(reason, parameters_problem([Parameter(name, value=value)]))


def test_inbox_pairs_by_stamp_within_the_slop_and_keeps_only_the_newest_image():
    inbox = FrameInbox(slop_ns=5, need_mask=True, timeout_s=10.0)
    assert inbox.put_image(100, 'image100') is None
    assert inbox.put_image(200, 'image200') is None       # replaces the incomplete 100
    assert inbox.dropped == 1
    inbox.put_camera_info(196, 'info196')
    inbox.put_camera_info(203, 'info203')
    assert inbox.take(0.0) == (None, None)                 # the mask is still missing
    inbox.put_mask(200, 'mask200')
    frame, problem = inbox.take(0.0)
    assert problem is None
    assert (frame.stamp_ns, frame.image, frame.camera_info, frame.mask) == (
        200, 'image200', 'info203', 'mask200')
    assert 'not newer' in inbox.put_image(150, 'late')     # out of order
    assert 'not newer' in inbox.put_image(200, 'again')    # duplicate stamp
    assert nearest(inbox._infos, 190, 5) is None


def test_inbox_drops_an_image_whose_camera_info_never_comes():
    inbox = FrameInbox(slop_ns=0, need_mask=False, timeout_s=0.05)
    inbox.put_image(100, 'image')
    inbox.put_camera_info(101, 'other stamp')
    frame, problem = inbox.take(0.5)
    assert frame is None and 'no camera_info within 0.000 s' in problem and inbox.dropped == 1


def test_tracking_uses_last_poses_and_redetects_on_loss_and_on_schedule():
    state, pose = TrackingState(), np.eye(4)
    assert state.priors_for_frame(True, 3) == {}
    state.update({'a': pose, 'b': pose}, {})
    for expected in ({'a', 'b'}, {'a'}, {'a'}):
        priors = state.priors_for_frame(True, 3)
        assert set(priors) == expected
        state.update({'a': pose}, priors)                  # b lost: detected anew next frame
    assert state.priors_for_frame(True, 3) == {}           # the 3rd tracked frame: redetect
    assert state.priors_for_frame(False, 0) == {}
    state.update({'a': pose}, {})
    assert set(state.priors_for_frame(True, 0)) == {'a'}


def test_publishable_rejects_garbage_poses():
    pose = np.eye(4)
    pose[2, 3] = 0.5
    assert outputs.publishable(pose, 0.9, 0.5, 0.1)
    assert not outputs.publishable(pose, 0.4, 0.5, 0.1)    # below the threshold
    assert not outputs.publishable(pose, float('nan'), 0.0, 0.1)
    for bad in ((2, 3, 0.04), (2, 3, -0.5), (2, 3, 80.0), (0, 0, np.nan), (0, 0, -1.0)):
        broken = pose.copy()
        broken[bad[0], bad[1]] = bad[2]
        assert not outputs.publishable(broken, 0.9, 0.5, 0.1), bad


def test_health_reports_rates_latency_and_recent_problems_only():
    health = NodeHealth(backend='SoftRenderer', device='cpu', objects=['a'])
    for second in range(5):                                # images at 2 Hz, frames at 1 Hz
        health.image_received(100.0 + second)
        health.image_received(100.5 + second)
        health.frame_processed(100.2 + second, 150.0 + second, {'a': 'prior'},
                               {'segment': 5.0, 'refine': 90.0})
    health.problem('image', "unsupported image encoding 'yuv422'", 104.0)
    status = health.status(104.6, dropped=3, hardware_id='/pose_node')
    values = {kv.key: kv.value for kv in status.values}
    assert status.level == DiagnosticStatus.WARN
    assert status.message == "image: unsupported image encoding 'yuv422'"
    assert (values['input_rate_hz'], values['processing_rate_hz']) == ('2.00', '1.00')
    assert (values['latency_ms_median'], values['latency_ms_max']) == ('152.0', '154.0')
    assert (values['frames_dropped'], values['last_frame_sources']) == ('3', 'a=prior')
    assert values['last_frame_stage_ms'] == 'segment=5, refine=90'
    later = health.status(104.0 + PROBLEM_MEMORY_S + 1, dropped=3, hardware_id='/pose_node')
    assert later.level == DiagnosticStatus.OK and later.message == 'ok'


def test_camera_info_is_missing_only_while_images_keep_coming_without_it():
    health = NodeHealth(backend='b', device='cpu', objects=['a'])
    health.image_received(10.0)
    assert health.camera_info_missing_s(10.5, timeout_s=1.0) is None     # just started
    health.image_received(12.0)
    assert health.camera_info_missing_s(12.5, timeout_s=1.0) == float('inf')
    health.camera_info_received(12.6)
    health.image_received(15.0)
    assert health.camera_info_missing_s(15.2, timeout_s=1.0) == pytest.approx(2.4)
    assert health.camera_info_missing_s(20.0, timeout_s=1.0) is None     # images stopped


def test_stage_times_add_up_over_objects_but_the_shared_segmenter_counts_once():
    estimates = [SimpleNamespace(timings_ms={'segment': 7.0, 'crop': 1.0, 'refine': 100.0}),
                 SimpleNamespace(timings_ms={'segment': 7.0, 'crop': 2.0, 'refine': 50.0})]
    assert stage_totals(estimates) == {'segment': 7.0, 'crop': 3.0, 'refine': 150.0}


def raw_frame(distortion: list[float], rgb: np.ndarray, labels: np.ndarray) -> MatchedFrame:
    header = stamp_header(BASE_NS)
    info = camera_to_camera_info_msg(K, WIDTH, HEIGHT, header)
    info.d = distortion
    P = np.hstack([K * [[0.9], [0.9], [1.0]], np.zeros((3, 1))])   # rectified: other focal
    info.p = [float(v) for v in P.ravel()]
    return MatchedFrame(BASE_NS, rgb_to_image_msg(rgb, header, 'rgb8'), info,
                        label_image_msg(labels, header), 0.0)


def test_raw_input_is_undistorted_with_opencv_and_rectified_input_uses_p():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    labels = np.zeros((HEIGHT, WIDTH), np.int32)
    labels[100:300, 200:400] = 2
    labels[300:340, 200:400] = UNKNOWN_LABEL
    stored = stored_labels(labels)
    distortion = [-0.3, 0.1, 0.001, -0.002, 0.0]
    frame = raw_frame(distortion, rgb, labels)
    cache = {}
    inputs = frame_inputs(frame, ['a', 'b'], False, cache)
    image, camera, masks, ignore = inputs.rgb, inputs.camera, inputs.masks, inputs.ignore
    map_x, map_y = cv2.initUndistortRectifyMap(K, np.array(distortion), None, K,
                                               (WIDTH, HEIGHT), cv2.CV_32FC1)
    expected = cv2.remap(rgb.astype(np.float32) / 255, map_x, map_y, cv2.INTER_LINEAR)
    np.testing.assert_allclose(image, expected, atol=1e-6)
    np.testing.assert_array_equal(camera.K, K)
    assert not camera.has_distortion and len(cache) == 1
    expected_mask = cv2.remap(stored, map_x, map_y, cv2.INTER_NEAREST) == 2
    assert set(masks) == {'b'}
    np.testing.assert_array_equal(masks['b'], expected_mask)
    assert 0 < np.count_nonzero(masks['b'] != (labels == 2))      # it did move
    np.testing.assert_array_equal(
        ignore, cv2.remap(stored, map_x, map_y, cv2.INTER_NEAREST) == np.iinfo(np.uint8).max)
    inputs = frame_inputs(frame, ['a', 'b'], True, cache)
    image, camera = inputs.rgb, inputs.camera
    np.testing.assert_allclose(camera.K[:2, :2], 0.9 * K[:2, :2])  # P, not K
    np.testing.assert_array_equal(image, rgb.astype(np.float32) / 255)


def test_the_objects_files_colour_weight_reaches_the_template_match_and_the_loss():
    settings = NodeSettings(**{name: spec.default for name, spec in SPECS.items()})
    config = load_objects_config(objects_file(settings))
    pipeline = build_pipeline(settings, config, load_object_models(config), torch.device('cpu'),
                              log=None)
    (demo,) = config.objects
    assert demo.colour_weight == 0.3
    assert pipeline.coarse[demo.name].colour_weight == demo.colour_weight
    assert pipeline.config.object_losses[demo.name].colour_weight == demo.colour_weight


def test_bad_frames_raise_with_the_input_at_fault():
    rgb = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    frame = raw_frame([0.0] * 5, rgb, np.zeros((HEIGHT // 2, WIDTH // 2), np.uint8))
    with pytest.raises(BadInput, match='mask is 320 x 240') as problem:
        frame_inputs(frame, ['a'], False, {})
    assert problem.value.kind == 'mask'


def demo_pose() -> np.ndarray:
    pose = np.eye(4)
    pose[:3, :3] = Rotation.from_euler('xyz', [30, -20, 75], degrees=True).as_matrix()
    pose[:3, 3] = [0.03, -0.02, 0.55]
    return pose


def test_detection_and_markers_carry_the_pose_the_box_and_the_mesh():
    model = load_demo_object()
    pose = demo_pose()
    header = stamp_header(BASE_NS)
    detection = outputs.detection_msg('demo_object', pose, 0.93, model, header)
    result = detection.results[0]
    assert (result.hypothesis.class_id, result.hypothesis.score) == ('demo_object', 0.93)
    np.testing.assert_allclose(msg_to_pose(result.pose.pose), pose, atol=1e-12)
    size = detection.bbox.size
    np.testing.assert_allclose([size.x, size.y, size.z], [0.126, 0.074, 0.0865], atol=1e-6)
    # models_info: min (-63, -37, -43.25) mm, size (126, 74, 86.5) mm -> centre (0, 0, 0) mm
    box_centre_camera = pose[:3, :3] @ np.array([0.0, 0.0, 0.0]) + pose[:3, 3]
    centre = detection.bbox.center.position
    np.testing.assert_allclose([centre.x, centre.y, centre.z], box_centre_camera, atol=1e-6)
    mesh, label = outputs.object_markers(2, 'demo_object', pose, 0.93, model,
                                         'file:///m/obj.ply', 0.001, header)
    assert (mesh.id, mesh.type, mesh.mesh_resource, mesh.scale.x) == (
        4, mesh.MESH_RESOURCE, 'file:///m/obj.ply', 0.001)
    np.testing.assert_allclose(msg_to_pose(mesh.pose), pose, atol=1e-12)
    assert (label.id, label.type, label.text) == (5, label.TEXT_VIEW_FACING, 'demo_object 0.93')
    assert label.pose.position.y < pose[1, 3]             # above the object in the image


def test_boxed_silhouette_equals_the_full_frame_ray_cast():
    model = load_demo_object()
    scene = RaycastScene([model])
    pose = demo_pose()
    full = scene.render(pose[None], K, WIDTH, HEIGHT).coverage[0] >= 0.5
    assert full.sum() > 1000
    np.testing.assert_array_equal(outputs.silhouette(scene, pose, K, WIDTH, HEIGHT), full)
    drawn = outputs.debug_image(np.zeros((HEIGHT, WIDTH, 3), np.uint8), K, {'d': pose},
                                {'d': scene}, {'d': model.diameter})
    contour = np.all(drawn == outputs.CONTOUR_COLOR, axis=2)
    assert contour.sum() > 100 and not np.any(contour & ~dilated(full))


def dilated(mask: np.ndarray) -> np.ndarray:
    return cv2.dilate(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0


@pytest.mark.parametrize('objects, encoding', [(3, 'mono8'), (300, '16UC1')])
def test_label_image_becomes_one_mask_per_object_and_unknown_pixels(objects, encoding):
    labels = np.zeros((4, 5), np.int32)
    labels[1, 1:3], labels[3, 4], labels[0, 0] = 1, objects, UNKNOWN_LABEL
    msg = label_image_msg(labels, Header())
    assert msg.encoding == encoding
    names = [f'o{i}' for i in range(1, objects + 1)]
    masks, unknown = label_msg_to_masks(msg, names)
    assert set(masks) == {'o1', names[-1]}
    np.testing.assert_array_equal(masks['o1'], labels == 1)
    np.testing.assert_array_equal(masks[names[-1]], labels == objects)
    np.testing.assert_array_equal(unknown, labels == UNKNOWN_LABEL)


# ----------------------------------------------------------------------------- the real node

def start_node(*ros_args: str) -> subprocess.Popen:
    return subprocess.Popen([str(NODE), '--ros-args', *ros_args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def stop(process: subprocess.Popen) -> str:
    if process.poll() is None:
        process.send_signal(2)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
    return process.stdout.read()


@pytest.fixture(scope='module')
def running_node(tmp_path_factory):
    """pose_node with masks from the mask topic, plus a client node and 6 ray-cast frames."""
    params = tmp_path_factory.mktemp('node') / 'params.yaml'
    params.write_text("""pose_node:
  ros__parameters:
    use_mask_topic: true
    qos_reliability: reliable
    torch_threads: 1
    tf_prefix: test/
    camera_info_timeout_s: 3.0
    redetect_interval: 3
""")
    model = load_demo_object()
    frames = synthetic_stream([model], K, WIDTH, HEIGHT, 6, np.random.default_rng(3))
    process = start_node('--params-file', str(params))
    context = Context()
    rclpy.init(context=context)
    client = NodeClient(context, ['demo_object'], watch_visuals=True)
    try:
        assert client.wait_for_node(STARTUP_S), stop(process)
        yield process, client, frames, model
    finally:
        client.close()
        context.try_shutdown()
        print(stop(process))


def send(client: NodeClient, frame, stamp_ns: int) -> bool:
    """Publish a frame and wait until the node published its detections."""
    client.publish(frame, K, stamp_ns)
    return client.spin_until(lambda: stamp_ns in client.received.detections, 20.0)


def errors(pose_msg, truth: np.ndarray) -> tuple[float, float]:
    T = msg_to_pose(pose_msg)
    rotation = Rotation.from_matrix(T[:3, :3] @ truth[:3, :3].T).magnitude()
    return np.rad2deg(rotation), float(np.linalg.norm(T[:3, 3] - truth[:3, 3]))


def latest_status(client: NodeClient):
    return client.received.diagnostics[-1].status[0]


def diagnostics_values(client: NodeClient) -> dict[str, str]:
    return {kv.key: kv.value for kv in latest_status(client).values}


@pytest.mark.ros
@pytest.mark.slow
def test_node_publishes_pose_tf_and_detections_of_the_truth(running_node):
    process, client, frames, model = running_node
    for index, frame in enumerate(frames[:4]):
        stamp = BASE_NS + index * FRAME_NS
        assert send(client, frame, stamp), f'no detections for frame {index}'
        pose_msg, _ = client.received.poses[stamp]['demo_object']
        assert pose_msg.header.frame_id == 'synthetic_camera_optical_frame'
        rot_deg, trans_m = errors(pose_msg.pose, frame.poses[0])
        assert rot_deg < MAX_ROT_DEG and trans_m < MAX_TRANS_M, (index, rot_deg, trans_m)
        (detection,) = client.received.detections[stamp].detections
        hypothesis = detection.results[0]
        assert hypothesis.hypothesis.class_id == 'demo_object'
        assert 0.9 < hypothesis.hypothesis.score <= 1.0
        np.testing.assert_allclose(msg_to_pose(hypothesis.pose.pose),
                                   msg_to_pose(pose_msg.pose), atol=1e-12)
        np.testing.assert_allclose([detection.bbox.size.x, detection.bbox.size.y,
                                    detection.bbox.size.z], model.bbox_size, atol=1e-6)
    client.spin_until(lambda: any(t.transforms and t.transforms[0].header.stamp.nanosec
                                  == (BASE_NS + 3 * FRAME_NS) % 10**9
                                  for t in client.received.tf), 5.0)
    transform = next(t.transforms[0] for t in client.received.tf
                     if t.transforms[0].header.stamp.nanosec == (BASE_NS + 3 * FRAME_NS) % 10**9)
    assert (transform.header.frame_id, transform.child_frame_id) == (
        'synthetic_camera_optical_frame', 'test/demo_object')
    translation = transform.transform.translation
    np.testing.assert_allclose([translation.x, translation.y, translation.z],
                               frames[3].poses[0][:3, 3], atol=MAX_TRANS_M)
    assert_visuals_show_the_estimate(client, BASE_NS + 3 * FRAME_NS, frames[3], model)
    # frames 1-3 were tracked from the previous pose; redetect_interval 3 then detects anew
    assert client.spin_until(lambda: client.received.diagnostics
                             and diagnostics_values(client)['frames_processed'] == '4', 5.0)
    assert diagnostics_values(client)['last_frame_sources'] == 'demo_object=prior'
    assert float(diagnostics_values(client)['processing_rate_hz']) > 0


def assert_visuals_show_the_estimate(client: NodeClient, stamp: int, frame, model) -> None:
    """Markers: the mesh file at the pose, scaled from mm; debug image: the input with the
    contour drawn on the true silhouette's outline."""
    assert client.spin_until(lambda: stamp in client.received.markers
                             and stamp in client.received.debug_images, 5.0)
    mesh, label = client.received.markers[stamp].markers
    assert mesh.mesh_resource == (Path(model.source_path).resolve().as_uri())
    assert mesh.scale.x == mesh.scale.y == mesh.scale.z == 0.001
    estimated = msg_to_pose(client.received.poses[stamp]['demo_object'][0].pose)
    np.testing.assert_allclose(msg_to_pose(mesh.pose), estimated, atol=1e-12)
    assert label.text.startswith('demo_object 0.9')
    debug = client.received.debug_images[stamp]
    assert (debug.encoding, debug.width, debug.height) == ('rgb8', WIDTH, HEIGHT)
    drawn = np.frombuffer(bytes(debug.data), np.uint8).reshape(HEIGHT, WIDTH, 3)
    truth = RaycastScene([model]).render(frame.poses, K, WIDTH, HEIGHT).coverage[0] >= 0.5
    contour = np.all(drawn == outputs.CONTOUR_COLOR, axis=2)
    assert contour.sum() > 100 and not np.any(contour & ~dilated(truth))
    axes = np.zeros_like(drawn)
    draw_axes(axes, K, estimated[:3, :3], estimated[:3, 3], length=0.5 * model.diameter)
    untouched = ~dilated(truth | contour | np.any(axes > 0, axis=2))
    np.testing.assert_array_equal(drawn[untouched], frame.rgb[untouched])


def image_of(frame, header: Header, claimed_encoding: str = 'bgr8') -> Image:
    """The frame as bgr8 pixels, its encoding field set to ``claimed_encoding``."""
    msg = rgb_to_image_msg(frame.rgb, header, 'bgr8')
    msg.encoding = claimed_encoding
    return msg


def bad_cases(frame):
    """(name, messages to publish for a stamp's header, text the diagnostics must show)."""
    def nan_image(header):
        msg = Image(header=header, height=HEIGHT, width=WIDTH, encoding='32FC3', step=WIDTH * 12)
        msg.data = np.full((HEIGHT, WIDTH, 3), np.nan, np.float32).tobytes()
        return msg

    def info(header, K_matrix=K, size=(WIDTH, HEIGHT)):
        return camera_to_camera_info_msg(K_matrix, *size, header)

    def mask(header, labels=frame.labels):
        return label_image_msg(labels, header)

    return [
        ('NaN pixels (float encoding)', lambda h: [info(h), mask(h), nan_image(h)],
         "unsupported image encoding '32FC3'"),
        ('unknown encoding', lambda h: [info(h), mask(h), image_of(frame, h, 'yuv422')],
         "unsupported image encoding 'yuv422'"),
        ('size mismatch', lambda h: [info(h, size=(320, 240)), mask(h), image_of(frame, h)],
         'camera_info describes a 320 x 240 image, the image is 640 x 480'),
        ('all-zero intrinsics', lambda h: [info(h, np.zeros((3, 3))), mask(h), image_of(frame, h)],
         'K is all zeros'),
        ('NaN intrinsics', lambda h: [info(h, np.full((3, 3), np.nan)), mask(h),
                                      image_of(frame, h)], 'K has non-finite values'),
        ('mask size mismatch', lambda h: [info(h), mask(h, frame.labels[::2, ::2]),
                                          image_of(frame, h)], 'mask is 320 x 240'),
        ('no camera_info', lambda h: [mask(h), image_of(frame, h)],
         'no camera_info within 0.010 s'),
    ]


@pytest.mark.ros
@pytest.mark.slow
def test_bad_input_is_reported_and_never_published(running_node):
    process, client, frames, _ = running_node
    publishers = client.publishers
    stamp = BASE_NS + 10 * FRAME_NS
    for name, messages, reason in bad_cases(frames[4]):
        stamp += FRAME_NS
        header = stamp_header(stamp)
        seen = len(client.received.diagnostics)
        for message in messages(header):
            topic = ('camera_info' if isinstance(message, CameraInfo)
                     else 'mask' if message.encoding == 'mono8' else 'image')
            publishers[topic].publish(message)
        reported = client.spin_until(
            lambda: any(reason in status.message for array in client.received.diagnostics[seen:]
                        for status in array.status), 10.0)
        assert reported, (name, latest_status(client).message)
        assert stamp not in client.received.poses and stamp not in client.received.detections
        assert process.poll() is None, name
    late = BASE_NS + 5 * FRAME_NS                          # older than the frames before
    seen = len(client.received.diagnostics)
    client.publish(frames[4], K, late)
    assert client.spin_until(lambda: any('not newer than the last image' in status.message
                                         for array in client.received.diagnostics[seen:]
                                         for status in array.status), 6.0)
    assert late not in client.received.poses
    assert latest_status(client).level == b'\x01'         # WARN
    stamp += FRAME_NS                                      # the node still works afterwards
    assert send(client, frames[5], stamp)
    assert 'demo_object' in client.received.poses[stamp]


def set_parameters(client: NodeClient, **values):
    service = client.node.create_client(SetParameters, '/pose_node/set_parameters')
    assert service.wait_for_service(timeout_sec=10.0)
    request = SetParameters.Request()
    for name, value in values.items():
        kind, field = ((ParameterType.PARAMETER_DOUBLE, 'double_value') if isinstance(value, float)
                       else (ParameterType.PARAMETER_STRING, 'string_value'))
        request.parameters.append(ParameterMsg(name=name, value=ParameterValue(
            type=kind, **{field: value})))
    future = service.call_async(request)
    assert client.spin_until(future.done, 10.0)
    client.node.destroy_client(service)
    return future.result().results


@pytest.mark.ros
@pytest.mark.slow
def test_parameters_are_validated_at_run_time(running_node):
    _, client, _, _ = running_node
    (result,) = set_parameters(client, score_threshold=1.5)
    assert not result.successful and 'score_threshold out of range' in result.reason
    (result,) = set_parameters(client, backend='mitsuba')
    assert not result.successful and 'read-only' in result.reason
    (result,) = set_parameters(client, score_threshold=0.65)
    assert result.successful


@pytest.mark.ros
@pytest.mark.parametrize(('objects_yaml', 'params_yaml', 'expected'), [
    ('objects: [{name: gone, mesh: /nonexistent/gone.ply}]', '',
     '/nonexistent/gone.ply: mesh file not found'),
    ('objects: [{name: demo, mesh: package://pose_node/models/demo_object/obj_000001.ply}]',
     'backend: opengl', 'backend must be one of auto, soft, mitsuba'),
])
def test_startup_errors_exit_non_zero_naming_the_cause(tmp_path, objects_yaml, params_yaml,
                                                       expected):
    objects = tmp_path / 'objects.yaml'
    objects.write_text(objects_yaml)
    params = tmp_path / 'params.yaml'
    params.write_text(f'pose_node:\n  ros__parameters:\n    objects_file: {objects}\n'
                      f'    {params_yaml}\n')
    result = subprocess.run([str(NODE), '--ros-args', '--params-file', str(params)],
                            capture_output=True, text=True, timeout=60, env=os.environ)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr
    assert 'Traceback' not in result.stderr + result.stdout

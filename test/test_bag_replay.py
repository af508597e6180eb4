"""``pose_tools bag replay`` and ``eval`` over real rclpy + Fast DDS: the plumbing with a minimal
stand-in node (recorded stamps kept, receive and publish times written, a Humble sqlite3 bag
played), then a few synthetic frames of the demo object through the real node."""
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from rosbags.typesys import Stores, get_typestore

from pose_node import bags
from pose_node.geometry import make_pose
from pose_node.render.raycast import RaycastScene
from pose_node.resources import demo_object_dir, load_demo_object, share_dir
from pose_node.tools import cli

pytestmark = pytest.mark.ros
pytest.importorskip('rclpy', reason='rclpy (ROS 2 Python client) is not importable')

K = np.array([[600.0, 0.0, 319.5], [0.0, 600.0, 239.5], [0.0, 0.0, 1.0]])
FIXED_POSE = make_pose(np.eye(3), np.array([0.01, -0.02, 0.5]))

# A stand-in for pose_node: answers every image with a Detection3DArray and a PoseStamped
# (FIXED_POSE) under the image's header, as the real node does.
ECHO_NODE = textwrap.dedent('''
    import sys

    import rclpy
    from geometry_msgs.msg import PoseStamped
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import CameraInfo, Image
    from vision_msgs.msg import Detection3DArray

    rclpy.init(args=sys.argv)
    node = rclpy.create_node('echo')
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    poses = node.create_publisher(PoseStamped, '~/demo_object/pose', qos)
    detections = node.create_publisher(Detection3DArray, '~/detections', qos)

    def answer(image):
        pose = PoseStamped(header=image.header)
        pose.pose.position.x, pose.pose.position.y, pose.pose.position.z = 0.01, -0.02, 0.5
        pose.pose.orientation.w = 1.0
        poses.publish(pose)
        detections.publish(Detection3DArray(header=image.header))

    node.create_subscription(Image, 'image', answer, qos)
    node.create_subscription(CameraInfo, 'camera_info', lambda msg: None, qos)
    node.create_subscription(Image, 'mask', lambda msg: None, qos)
    try:
        rclpy.spin(node)
    except KeyboardInterrupt:
        pass
''')


def objects_file(folder: Path) -> Path:
    """The shipped objects file with absolute paths (demo_object)."""
    document = yaml.safe_load((share_dir() / 'config' / 'objects.yaml').read_text())
    for obj in document['objects']:
        for key in ('mesh', 'models_info'):
            obj[key] = str(share_dir() / obj[key])
    path = folder / bags.OBJECTS_FILE
    path.write_text(yaml.safe_dump(document))
    return path


def write_demo_bag(folder: Path, store, storage: str, n: int, rng: np.random.Generator,
                   poses: list[np.ndarray] | None = None) -> list[int]:
    """Frames of the demo object (ray-cast over grey) with camera_info, mask and ground truth."""
    model = load_demo_object()
    scene = RaycastScene([model])
    stamps = [bags.frame_stamp(k, 5.0) for k in range(n)]
    with bags.BagWriter(folder / bags.BAG_DIR, store, storage) as writer:
        for k, stamp in enumerate(stamps):
            pose = poses[k] if poses else FIXED_POSE
            rendered = scene.render(pose[None], K, 640, 480, supersample=2)
            coverage = rendered.coverage[0][..., None]
            rgb = rendered.rgb + (1 - coverage) * (0.35 + 0.1 * rng.random((480, 640, 3)))
            writer.write(bags.CAMERA_INFO_TOPIC, bags.camera_info_msg(
                store, K, 640, 480, stamp, bags.CAMERA_FRAME), stamp)
            writer.write(bags.MASK_TOPIC, bags.label_image_msg(
                store, (coverage[..., 0] >= 0.5).astype(np.uint8), stamp, bags.CAMERA_FRAME), stamp)
            writer.write(bags.IMAGE_TOPIC, bags.image_msg(
                store, (rgb * 255).round().astype(np.uint8), stamp, bags.CAMERA_FRAME, 'rgb8'),
                stamp)
            writer.write(bags.ground_truth_topic(model.name), bags.pose_stamped_msg(
                store, pose, stamp, bags.CAMERA_FRAME), stamp)
    objects_file(folder)
    return stamps


def test_replay_plumbing_keeps_stamps_and_records_times(tmp_path):
    stamps = write_demo_bag(tmp_path / 'gt', get_typestore(Stores.ROS2_HUMBLE), 'sqlite3', 3,
                            np.random.default_rng(0))
    node = tmp_path / 'echo_node.py'
    node.write_text(ECHO_NODE)
    run = tmp_path / 'run'
    assert cli.main(['bag', 'replay', str(tmp_path / 'gt'), '--out', str(run), '--lockstep',
                     '--answer-timeout', '20', '--startup-timeout', '60', '--drain', '2',
                     '--node-command', f'{sys.executable} {node}']) == 0

    recording = bags.load_recording(run / bags.BAG_DIR, tmp_path / 'gt' / bags.BAG_DIR)
    assert sorted(recording.published_ns) == stamps
    assert sorted(recording.answered_ns) == stamps
    assert sorted(recording.estimates['demo_object']) == stamps
    for stamp in stamps:
        np.testing.assert_allclose(recording.estimates['demo_object'][stamp], FIXED_POSE,
                                   atol=1e-12)
        latency = recording.answered_ns[stamp] - recording.published_ns[stamp]
        assert 0 < latency < 20e9
    topics = bags.bag_topics(run / bags.BAG_DIR)
    assert topics['/pose_node/detections'] == 'vision_msgs/msg/Detection3DArray'
    assert topics[bags.REPLAY_TOPIC] == 'sensor_msgs/msg/TimeReference'

    report = tmp_path / 'report'
    assert cli.main(['bag', 'eval', str(run), '--gt', str(tmp_path / 'gt'), '--json',
                     str(tmp_path / 'eval.json'), '--report', str(report),
                     '--thumbnails', '1']) == 0
    result = json.loads((tmp_path / 'eval.json').read_text())
    assert result['add_s_recall'] == {'demo_object': 1.0, 'mean': 1.0}
    assert result['frames'] == {'published': 3, 'answered': 3, 'dropped': 0,
                                'dropped_fraction': 0.0}
    assert (report / 'overlays.png').is_file() and (report / 'report.md').is_file()


@pytest.mark.slow
def test_replay_through_the_real_node_finds_the_demo_object(tmp_path):
    rng = np.random.default_rng(3)
    from pose_node.datasets.synthetic import random_pose_in_view
    poses = [random_pose_in_view(rng, (0.4, 0.6)) for _ in range(3)]
    write_demo_bag(tmp_path / 'gt', bags.default_store(), 'mcap', 3, rng, poses)
    params = tmp_path / 'gt' / bags.PARAMS_FILE
    document = bags.node_parameters(tmp_path / 'gt' / bags.OBJECTS_FILE, with_masks=True)
    document['/**']['ros__parameters']['torch_threads'] = 1
    params.write_text(yaml.safe_dump(document))
    run = tmp_path / 'run'
    assert cli.main(['bag', 'replay', str(tmp_path / 'gt'), '--out', str(run), '--lockstep',
                     '--answer-timeout', '60', '--startup-timeout', '240', '--drain', '2']) == 0
    assert cli.main(['bag', 'eval', str(run), '--gt', str(tmp_path / 'gt'), '--json',
                     str(tmp_path / 'eval.json'), '--thumbnails', '0']) == 0
    result = json.loads((tmp_path / 'eval.json').read_text())
    assert result['frames']['answered'] == 3
    assert result['add_s_recall']['demo_object'] >= 2 / 3
    assert result['objects']['demo_object']['rotation_median_deg'] < 2.0
    markers = [m.msg for m in bags.read_messages(run / bags.BAG_DIR, ['/pose_node/markers'])]
    meshes = {marker.mesh_resource for array in markers for marker in array.markers
              if marker.mesh_resource}
    assert meshes == {(demo_object_dir() / 'obj_000001.ply').resolve().as_uri()}
    assert all(Path(uri[len('file://'):]).is_file() for uri in meshes)

"""rosbag2 helpers: messages written are read back equal (mcap, sqlite3, Humble and Kilted
definitions), BOP frames become a bag in metres with a correct mask label image and objects file."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import transforms3d
import yaml
from rosbags.typesys import Stores, get_typestore
from scipy.spatial.transform import Rotation

from pose_node import bags
from pose_node.datasets.bop import BopDataset, default_lmo_root
from pose_node.geometry import make_pose
from pose_node.objects_config import load_objects_config
from pose_node.render.raycast import RaycastScene
from pose_node.report import silhouette

K = np.array([[600.0, 0.0, 319.5], [0.0, 610.0, 239.5], [0.0, 0.0, 1.0]])
STAMP = 1_700_000_123_456_789_012


def random_pose(rng: np.random.Generator) -> np.ndarray:
    return make_pose(Rotation.random(random_state=rng.integers(1 << 31)).as_matrix(),
                     rng.uniform([-0.1, -0.1, 0.3], [0.1, 0.1, 1.0]))


def write_sample_bag(path, store, storage, rgb, labels, pose):
    with bags.BagWriter(path, store, storage) as writer:
        writer.write(bags.CAMERA_INFO_TOPIC, bags.camera_info_msg(
            store, K, rgb.shape[1], rgb.shape[0], STAMP, 'cam'), STAMP)
        writer.write(bags.IMAGE_TOPIC, bags.image_msg(store, rgb, STAMP, 'cam', 'rgb8'), STAMP)
        writer.write(bags.MASK_TOPIC, bags.label_image_msg(store, labels, STAMP, 'cam'), STAMP)
        writer.write('/ground_truth/thing/pose',
                     bags.pose_stamped_msg(store, pose, STAMP, 'cam'), STAMP + 5)


@pytest.mark.parametrize('storage', ['mcap', 'sqlite3'])
@pytest.mark.parametrize('distro', [Stores.ROS2_HUMBLE, Stores.ROS2_KILTED])
def test_round_trip_reads_back_what_was_written(tmp_path, storage, distro):
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (12, 17, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, (12, 17))
    pose = random_pose(rng)
    write_sample_bag(tmp_path / 'bag', get_typestore(distro), storage, rgb, labels, pose)

    messages = {m.topic: m for m in bags.read_messages(tmp_path / 'bag')}
    image = messages[bags.IMAGE_TOPIC].msg
    assert (image.encoding, image.width, image.height, image.step) == ('rgb8', 17, 12, 51)
    np.testing.assert_array_equal(bags.rgb_from_msg(image), rgb)
    mask = messages[bags.MASK_TOPIC].msg
    assert mask.encoding == 'mono8'
    np.testing.assert_array_equal(bags.pixels_from_msg(mask)[..., 0], labels)
    info = messages[bags.CAMERA_INFO_TOPIC].msg
    np.testing.assert_array_equal(bags.intrinsics_from_msg(info), K)
    np.testing.assert_array_equal(np.asarray(info.p).reshape(3, 4)[:, :3], K)
    assert not np.any(info.d)
    gt = messages['/ground_truth/thing/pose']
    assert gt.timestamp_ns == STAMP + 5
    assert bags.stamp_ns(gt.msg.header.stamp) == STAMP
    position = gt.msg.pose.position
    np.testing.assert_allclose([position.x, position.y, position.z], pose[:3, 3], atol=1e-12)
    q = gt.msg.pose.orientation
    w_first = transforms3d.quaternions.mat2quat(pose[:3, :3])
    assert abs(np.dot([q.w, q.x, q.y, q.z], w_first)) == pytest.approx(1.0, abs=1e-12)
    np.testing.assert_allclose(bags.pose_from_msg(gt.msg.pose), pose, atol=1e-12)


def test_reading_absent_topics_yields_nothing(tmp_path):
    rng = np.random.default_rng(5)
    write_sample_bag(tmp_path / 'bag', bags.default_store(), 'mcap',
                     rng.integers(0, 256, (4, 5, 3), np.uint8), np.zeros((4, 5), int),
                     random_pose(rng))
    assert list(bags.read_messages(tmp_path / 'bag', ['/not/recorded'])) == []
    assert bags.poses_by_stamp(tmp_path / 'bag', '/pose_node/') == {}


def test_humble_bag_is_wire_compatible_with_kilted(tmp_path):
    rng = np.random.default_rng(2)
    humble = get_typestore(Stores.ROS2_HUMBLE)
    write_sample_bag(tmp_path / 'bag', humble, 'mcap', rng.integers(0, 256, (4, 5, 3), np.uint8),
                     np.zeros((4, 5), int), random_pose(rng))
    assert all(bags.wire_compatible(tmp_path / 'bag', bags.default_store()).values())
    kilted = bags.default_store()
    for message in bags.read_messages(tmp_path / 'bag'):
        rebuilt = bags.reserialize(message.msg, message.msgtype, kilted)
        assert rebuilt == message.raw


def test_reserialize_names_a_missing_field():
    humble = get_typestore(Stores.ROS2_HUMBLE)
    point = humble.types['geometry_msgs/msg/Point'](x=1.0, y=2.0, z=3.0)
    without_orientation = SimpleNamespace(position=point)
    with pytest.raises(ValueError, match="no field 'orientation'"):
        bags.reserialize(without_orientation, 'geometry_msgs/msg/Pose', bags.default_store())


def test_label_image_switches_to_16_bit_above_255():
    store = bags.default_store()
    labels = np.array([[0, 1], [300, 2]])
    msg = bags.label_image_msg(store, labels, STAMP, 'cam')
    assert msg.encoding == '16UC1' and msg.step == 4
    np.testing.assert_array_equal(bags.pixels_from_msg(msg)[..., 0], labels)
    assert bags.stamp_ns(bags.time_msg(store, STAMP)) == STAMP


def test_topic_object_parses_only_pose_topics():
    assert bags.topic_object('/pose_node/ape/pose', '/pose_node/') == 'ape'
    assert bags.topic_object('/pose_node/detections', '/pose_node/') is None
    assert bags.topic_object('/pose_node/a/b/pose', '/pose_node/') is None


@pytest.fixture(scope='module')
def lmo_bag(tmp_path_factory):
    root = default_lmo_root()
    if not (root / 'splits.json').is_file():
        pytest.skip(f'LM-O data not found at {root}')
    dataset = BopDataset(root)
    image_ids = dataset.splits()['dev'][:2]
    out = tmp_path_factory.mktemp('lmo')
    frames = list(bags.write_bop_bag(out, dataset, image_ids, 2.0, True))
    return out, dataset, frames


def test_bop_bag_ground_truth_is_in_metres_at_the_frame_stamps(lmo_bag):
    out, dataset, frames = lmo_bag
    scene_gt = json.loads((dataset.split_dir / '000002' / 'scene_gt.json').read_text())
    truth = bags.poses_by_stamp(out / bags.BAG_DIR, bags.GROUND_TRUTH_PREFIX)
    names = {obj_id: name for obj_id, name in bags.LMO_OBJECT_NAMES.items()}
    checked = 0
    for index, frame in enumerate(frames):
        stamp = bags.DEFAULT_T0_NS + index * 500_000_000
        for entry in scene_gt[str(frame.image_id)]:
            poses = truth.get(names[entry['obj_id']], {})
            if stamp in poses:
                np.testing.assert_allclose(poses[stamp][:3, 3],
                                           np.array(entry['cam_t_m2c']) / 1000.0, atol=1e-9)
                R = np.array(entry['cam_R_m2c']).reshape(3, 3)
                assert np.abs(poses[stamp][:3, :3] - R).max() < 0.02  # stored R is ~1 % off
                checked += 1
    assert checked >= 10


def test_bop_bag_objects_file_and_parameters(lmo_bag):
    out, dataset, _ = lmo_bag
    config = load_objects_config(out / bags.OBJECTS_FILE)
    assert config.names == [bags.LMO_OBJECT_NAMES[i] for i in dataset.object_ids]
    for obj in config.objects:
        assert obj.mesh.is_absolute() and obj.mesh.is_file() and obj.unit_scale == 0.001
    params = yaml.safe_load((out / bags.PARAMS_FILE).read_text())['/**']['ros__parameters']
    assert params['use_mask_topic'] is True and params['tracking'] is False


def test_bop_bag_mask_labels_match_the_ground_truth_projection(lmo_bag):
    """The label image's object i is where the GT pose of objects[i - 1] projects (the overlay
    the report draws for the truth lands on the mask) for well visible instances; what
    unannotated occluders hide is marked unknown (255)."""
    out, dataset, frames = lmo_bag
    masks = [bags.pixels_from_msg(m.msg)[..., 0]
             for m in bags.read_messages(out / bags.BAG_DIR, [bags.MASK_TOPIC])]
    infos = [bags.intrinsics_from_msg(m.msg)
             for m in bags.read_messages(out / bags.BAG_DIR, [bags.CAMERA_INFO_TOPIC])]
    label_of = {obj_id: index + 1 for index, obj_id in enumerate(dataset.object_ids)}
    ious, unknown = [], 0
    for frame, labels, K_msg in zip(frames, masks, infos):
        np.testing.assert_array_equal(K_msg, frame.K)
        assert set(np.unique(labels)) <= {0, 255, *label_of.values()}
        unknown += np.count_nonzero(labels == 255)
        for inst in frame.instances:
            if inst.visib_fract > 0.95:
                drawn = silhouette(RaycastScene([dataset.load_model(inst.obj_id)]),
                                   make_pose(inst.R, inst.t), frame.K, 640, 480)
                mask = labels == label_of[inst.obj_id]
                ious.append((drawn & mask).sum() / (drawn | mask).sum())
    assert len(ious) >= 4 and min(ious) > 0.9
    assert unknown > 500    # frame 3: part of its eggbox is outside BOP's visible box

"""rosbag2 files without ROS: BOP frames as ROS messages, bag writing and reading, and recorded
runs gathered by image stamp for :mod:`pose_node.evaluation` (which matches them to the ground
truth). Built on ``rosbags`` (no rclpy here).

Messages are ``rosbags`` typestore objects (``store.types[msgtype]``); the default store is ROS 2
Kilted's, whose sensor_msgs / geometry_msgs definitions are wire-identical (same RIHS01 hash) to
Humble's and Jazzy's. Bags are read with the message definitions they carry; bags without any
(Humble's sqlite3 storage) are read with the Humble typestore.

Ground-truth bags made from BOP (``write_bop_bag``), topics (stamps: frame k at t0 + k / rate):
- ``/camera/image_raw`` sensor_msgs/Image rgb8;
- ``/camera/camera_info`` sensor_msgs/CameraInfo (K, P = [K | 0], no distortion);
- ``/camera/mask`` sensor_msgs/Image mono8 label image (optional): pixel value i is the i-th
  object of the objects file written beside the bag, 0 background, 255 unknown (hidden by an
  occluder the dataset does not annotate);
- ``/ground_truth/<object>/pose`` geometry_msgs/PoseStamped in METRES (BOP files are in mm), for
  the BOP evaluation targets at least ``min_visib_fract`` visible (default 0.1).
Object names are the LM-O names (``LMO_OBJECT_NAMES``: ape, can, ...), readable in topic and TF
names; BOP ids keep working through the mesh file names (obj_0000NN.ply).

Units: metres, radians, nanoseconds for stamps; poses (4, 4) object-to-camera; images uint8.
"""
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from rosbags.highlevel import AnyReader
from rosbags.rosbag2 import StoragePlugin, Writer
from rosbags.typesys import Stores, get_typestore, get_types_from_msg
from rosbags.typesys.base import Nodetype
from rosbags.typesys.store import Typestore

from pose_node.crop import UNKNOWN_LABEL, stored_labels
from pose_node.datasets.bop import BopDataset, BopFrame, visible_labels
from pose_node.evaluation import Recording
from pose_node.geometry import make_pose, matrix_to_quaternion, quaternion_to_matrix
from pose_node.mesh import ObjectModel

IMAGE_TOPIC = '/camera/image_raw'
CAMERA_INFO_TOPIC = '/camera/camera_info'
MASK_TOPIC = '/camera/mask'
GROUND_TRUTH_PREFIX = '/ground_truth/'
CAMERA_FRAME = 'camera_optical_frame'
DEFAULT_T0_NS = 1_700_000_000 * 10**9
"""Stamp of frame 0 of bags made from BOP: a fixed time so that the same data gives the same bag."""
REPLAY_TOPIC = '/replay/image_published'
"""Written by replay: sensor_msgs/TimeReference per image sent, header stamp = the image's stamp,
time_ref = the wall time it was published (also its bag time)."""
OBJECTS_FILE = 'objects.yaml'
PARAMS_FILE = 'pose_node.yaml'
BAG_DIR = 'bag'
LMO_OBJECT_NAMES = {1: 'ape', 5: 'can', 6: 'cat', 8: 'driller', 9: 'duck', 10: 'eggbox',
                    11: 'glue', 12: 'holepuncher'}
IMAGE_LAYOUTS = {'rgb8': (3, np.uint8), 'bgr8': (3, np.uint8), 'rgba8': (4, np.uint8),
                 'bgra8': (4, np.uint8), 'mono8': (1, np.uint8), '8UC1': (1, np.uint8),
                 'mono16': (1, np.uint16), '16UC1': (1, np.uint16)}
"""encoding -> (channels, dtype) of the images read here."""
STORAGES = {'mcap': StoragePlugin.MCAP, 'sqlite3': StoragePlugin.SQLITE3}


# --------------------------------------------------------------------------- typestores

def default_store() -> Typestore:
    """The ROS 2 Kilted typestore, the distribution of the node's rclpy."""
    return get_typestore(Stores.ROS2_KILTED)


def register_msg_folder(store: Typestore, package: str, folder: Path) -> None:
    """Add the ``.msg`` definitions of ``package`` found in ``folder`` (e.g. vision_msgs, built
    into the venv and missing from the stock stores) to ``store``."""
    types = {}
    for path in sorted(Path(folder).glob('*.msg')):
        types.update(get_types_from_msg(path.read_text(), f'{package}/msg/{path.stem}'))
    if not types:
        raise FileNotFoundError(f'{folder}: no .msg files of {package}')
    store.register(types)


# --------------------------------------------------------------------------- messages

def time_msg(store: Typestore, stamp_ns: int):
    """builtin_interfaces/Time of ``stamp_ns`` (non-negative nanoseconds)."""
    sec, nanosec = divmod(int(stamp_ns), 10**9)
    return store.types['builtin_interfaces/msg/Time'](sec=sec, nanosec=nanosec)


def stamp_ns(stamp) -> int:
    """Nanoseconds of a builtin_interfaces/Time (any store's, or rclpy's)."""
    return int(stamp.sec) * 10**9 + int(stamp.nanosec)


def header_msg(store: Typestore, stamp: int, frame_id: str):
    return store.types['std_msgs/msg/Header'](stamp=time_msg(store, stamp), frame_id=frame_id)


def image_msg(store: Typestore, pixels: np.ndarray, stamp: int, frame_id: str, encoding: str):
    """sensor_msgs/Image of ``pixels`` (H, W) or (H, W, C), uint8 or uint16 (little endian),
    rows unpadded."""
    pixels = np.ascontiguousarray(pixels)
    height, width = pixels.shape[:2]
    data = pixels.astype(pixels.dtype.newbyteorder('<')).view(np.uint8).reshape(-1)
    return store.types['sensor_msgs/msg/Image'](
        header=header_msg(store, stamp, frame_id), height=height, width=width,
        encoding=encoding, is_bigendian=0, step=len(data) // height, data=data)


def label_image_msg(store: Typestore, labels: np.ndarray, stamp: int, frame_id: str):
    """Mask label image of (H, W) ints (see ``pose_node.crop.stored_labels``): mono8 below 255
    objects, else 16UC1."""
    stored = stored_labels(labels)
    return image_msg(store, stored, stamp, frame_id,
                     'mono8' if stored.dtype == np.uint8 else '16UC1')


def camera_info_msg(store: Typestore, K: np.ndarray, width: int, height: int, stamp: int,
                    frame_id: str):
    """sensor_msgs/CameraInfo of a distortion-free pinhole camera K (3, 3): P = [K | 0]."""
    K = np.asarray(K, np.float64)
    types = store.types
    return types['sensor_msgs/msg/CameraInfo'](
        header=header_msg(store, stamp, frame_id), height=height, width=width,
        distortion_model='plumb_bob', d=np.zeros(5), k=K.reshape(-1), r=np.eye(3).reshape(-1),
        p=np.hstack([K, np.zeros((3, 1))]).reshape(-1), binning_x=0, binning_y=0,
        roi=types['sensor_msgs/msg/RegionOfInterest'](x_offset=0, y_offset=0, height=0,
                                                      width=0, do_rectify=False))


def pose_stamped_msg(store: Typestore, pose: np.ndarray, stamp: int, frame_id: str):
    """geometry_msgs/PoseStamped of ``pose`` (4, 4), metres; quaternion x, y, z, w."""
    types = store.types
    x, y, z = (float(v) for v in pose[:3, 3])
    qx, qy, qz, qw = (float(v) for v in matrix_to_quaternion(np.asarray(pose[:3, :3])))
    return types['geometry_msgs/msg/PoseStamped'](
        header=header_msg(store, stamp, frame_id),
        pose=types['geometry_msgs/msg/Pose'](
            position=types['geometry_msgs/msg/Point'](x=x, y=y, z=z),
            orientation=types['geometry_msgs/msg/Quaternion'](x=qx, y=qy, z=qz, w=qw)))


def time_reference_msg(store: Typestore, stamp: int, time_ref: int, source: str):
    """sensor_msgs/TimeReference: header stamp ``stamp``, ``time_ref`` (both ns), ``source``."""
    return store.types['sensor_msgs/msg/TimeReference'](
        header=header_msg(store, stamp, ''), time_ref=time_msg(store, time_ref), source=source)


def pose_from_msg(msg) -> np.ndarray:
    """(4, 4) float64 pose of a geometry_msgs/Pose (metres)."""
    q = msg.orientation
    R = quaternion_to_matrix(np.array([q.x, q.y, q.z, q.w], np.float64))
    return make_pose(R, np.array([msg.position.x, msg.position.y, msg.position.z], np.float64))


def pixels_from_msg(msg) -> np.ndarray:
    """(H, W, C) pixels of a sensor_msgs/Image as stored (step and byte order honoured, channel
    order untouched); encodings: ``IMAGE_LAYOUTS``."""
    if msg.encoding not in IMAGE_LAYOUTS:
        raise ValueError(f'unsupported encoding {msg.encoding!r}')
    channels, dtype = IMAGE_LAYOUTS[msg.encoding]
    dtype = np.dtype(dtype).newbyteorder('>' if msg.is_bigendian else '<')
    rows = np.frombuffer(bytes(msg.data), np.uint8, count=msg.step * msg.height)
    rows = rows.reshape(msg.height, msg.step)[:, :msg.width * channels * dtype.itemsize]
    pixels = np.ascontiguousarray(rows).view(dtype).reshape(msg.height, msg.width, channels)
    return pixels.astype(dtype.newbyteorder('='))


def rgb_from_msg(msg) -> np.ndarray:
    """(H, W, 3) uint8 RGB of an rgb8 / bgr8 / rgba8 / bgra8 / mono8 image."""
    pixels = pixels_from_msg(msg)
    if msg.encoding.startswith('bgr'):
        return pixels[..., [2, 1, 0]]
    if pixels.shape[2] == 1:
        return np.repeat(pixels, 3, axis=2)
    if msg.encoding not in ('rgb8', 'rgba8'):
        raise ValueError(f'cannot show a {msg.encoding!r} image as RGB')
    return pixels[..., :3]


def intrinsics_from_msg(msg) -> np.ndarray:
    """(3, 3) K of a sensor_msgs/CameraInfo."""
    return np.asarray(msg.k, np.float64).reshape(3, 3)


# --------------------------------------------------------------------------- writing

class BagWriter:
    """A new rosbag2 at ``path`` (must not exist) with one connection per topic. Use as a context
    manager. ``store`` serialises the messages and provides their definitions."""

    def __init__(self, path: str | Path, store: Typestore, storage: str = 'mcap'):
        if storage not in STORAGES:
            raise ValueError(f'storage must be one of {", ".join(STORAGES)}, got {storage!r}')
        self.store = store
        self._writer = Writer(Path(path), version=Writer.VERSION_LATEST,
                              storage_plugin=STORAGES[storage])
        self._connections = {}

    def __enter__(self) -> 'BagWriter':
        self._writer.open()
        return self

    def __exit__(self, *exc) -> None:
        self._writer.close()

    def write(self, topic: str, msg, timestamp_ns: int) -> None:
        """Serialise a message of ``store`` onto ``topic`` at bag time ``timestamp_ns``."""
        self.write_raw(topic, msg.__msgtype__, self.store.serialize_cdr(msg, msg.__msgtype__),
                       timestamp_ns)

    def write_raw(self, topic: str, msgtype: str, data: bytes, timestamp_ns: int) -> None:
        """Write an already serialised (CDR) message of ``msgtype`` (known to ``store``)."""
        key = (topic, msgtype)
        if key not in self._connections:
            self._connections[key] = self._writer.add_connection(topic, msgtype,
                                                                 typestore=self.store)
        self._writer.write(self._connections[key], int(timestamp_ns), data)


# --------------------------------------------------------------------------- reading

@dataclass(frozen=True)
class BagMessage:
    """One message of a bag: bag timestamp (ns; the receive time when recorded), the raw CDR and
    the message deserialised with the bag's own definitions."""

    topic: str
    msgtype: str
    timestamp_ns: int
    raw: bytes
    msg: object


def open_reader(path: str | Path) -> AnyReader:
    """An AnyReader of the rosbag2 at ``path`` (not opened); definitions from the bag, else from
    the Humble typestore (only pre-Iron sqlite3 bags carry none)."""
    return AnyReader([Path(path)], default_typestore=get_typestore(Stores.ROS2_HUMBLE))


def read_messages(path: str | Path, topics: Iterable[str] | None = None) -> Iterator[BagMessage]:
    """Messages of the bag at ``path`` in bag-time order (all topics, or only ``topics``)."""
    with open_reader(path) as reader:
        wanted = None if topics is None else set(topics)
        connections = [c for c in reader.connections if wanted is None or c.topic in wanted]
        if not connections:  # rosbags reads every connection when given none
            return
        for connection, timestamp, raw in reader.messages(connections=connections):
            yield BagMessage(connection.topic, connection.msgtype, timestamp, bytes(raw),
                             reader.deserialize(raw, connection.msgtype))


def bag_topics(path: str | Path) -> dict[str, str]:
    """Topic -> message type of the bag at ``path``."""
    with open_reader(path) as reader:
        return {c.topic: c.msgtype for c in reader.connections}


def message_counts(path: str | Path) -> dict[str, int]:
    """Topic -> number of messages of the bag at ``path``."""
    with open_reader(path) as reader:
        return {topic: info.msgcount for topic, info in reader.topics.items()}


def wire_compatible(path: str | Path, store: Typestore) -> dict[str, bool]:
    """Per topic of the bag: whether its definition hashes like ``store``'s (then the raw CDR can
    be sent as is to nodes built with ``store``'s distribution)."""
    with open_reader(path) as reader:
        result = {}
        for connection in reader.connections:
            mine = reader.typestore.hash_rihs01(connection.msgtype)
            theirs = (store.hash_rihs01(connection.msgtype)
                      if connection.msgtype in store.fielddefs else None)
            result[connection.topic] = mine == theirs
        return result


def reserialize(msg, msgtype: str, store: Typestore) -> bytes:
    """CDR of a message read with another definition, rebuilt field by field as ``store``'s
    ``msgtype`` (fields the source lacks raise an error naming them)."""
    return store.serialize_cdr(_converted(msg, msgtype, store), msgtype)


def _converted(value, msgtype: str, store: Typestore):
    names = store.fielddefs[msgtype][1]
    fields = {}
    for name, (kind, detail) in names:
        if not hasattr(value, name):
            raise ValueError(f'{msgtype}: the recorded message has no field {name!r}')
        fields[name] = _converted_field(getattr(value, name), kind, detail, store)
    return store.types[msgtype](**fields)


def _converted_field(value, kind, detail, store: Typestore):
    if kind == Nodetype.NAME:
        return _converted(value, detail, store)
    if kind in (Nodetype.ARRAY, Nodetype.SEQUENCE) and detail[0][0] == Nodetype.NAME:
        return [_converted(item, detail[0][1], store) for item in value]
    return value


# --------------------------------------------------------------------------- BOP -> bag

@dataclass(frozen=True)
class BagObject:
    """An object of a bag made from BOP: its name in topics, BOP id and model (metres)."""

    name: str
    obj_id: int
    model: ObjectModel


def object_name(obj_id: int) -> str:
    """LM-O name of a BOP object id (``obj_0000NN`` for ids LM-O does not have)."""
    return LMO_OBJECT_NAMES.get(obj_id, f'obj_{obj_id:06d}')


def bag_objects(dataset: BopDataset) -> list[BagObject]:
    """Every object of the dataset's models_info, in id order (= label order of the masks)."""
    return [BagObject(object_name(obj_id), obj_id, dataset.load_model(obj_id))
            for obj_id in dataset.object_ids]


def objects_document(dataset: BopDataset, objects: list[BagObject]) -> dict:
    """The objects file (``config/objects.yaml`` format) for ``objects``: absolute mesh and
    models_info paths (the entry is found from the mesh's obj_0000NN name), unit_scale 0.001."""
    models_dir = (dataset.root / dataset.models_dir).resolve()
    return {'objects': [{'name': obj.name, 'mesh': str(models_dir / f'obj_{obj.obj_id:06d}.ply'),
                         'models_info': str(models_dir / 'models_info.json'),
                         'unit_scale': 0.001, 'frame_id': obj.name} for obj in objects]}


def write_yaml(path: Path, document: dict, comment: str) -> None:
    """``document`` as YAML at ``path`` under a ``comment`` header (lines prefixed with #)."""
    header = ''.join(f'# {line}\n' for line in comment.splitlines())
    path.write_text(header + yaml.safe_dump(document, sort_keys=False))


def object_labels(objects: list[BagObject], frame: BopFrame, width: int,
                  height: int) -> np.ndarray:
    """(H, W) int label image of ``frame``'s ground truth: 1 + index into ``objects`` of the
    object visible at each pixel, 0 background, UNKNOWN_LABEL where an occluder LM-O does not
    annotate hides an object (see ``bop.visible_labels``)."""
    index_of = {obj.obj_id: index for index, obj in enumerate(objects)}
    models = {obj.obj_id: obj.model for obj in objects}
    instance_labels, unknown = visible_labels(
        frame, [models[inst.obj_id] for inst in frame.instances], width, height)
    label_of_instance = np.array([0] + [index_of[inst.obj_id] + 1 for inst in frame.instances])
    labels = label_of_instance[instance_labels]
    labels[unknown] = UNKNOWN_LABEL
    return labels


def ground_truth_instances(frame: BopFrame, targets: set[tuple[int, int]] | None,
                           min_visib_fract: float) -> list:
    """The frame's instances that are evaluation targets: listed in ``targets`` ((image_id,
    obj_id) pairs; None: all) and at least ``min_visib_fract`` visible (when BOP says)."""
    return [inst for inst in frame.instances
            if (targets is None or (frame.image_id, inst.obj_id) in targets)
            and (inst.visib_fract is None or inst.visib_fract >= min_visib_fract)]


def frame_stamp(index: int, rate_hz: float, t0_ns: int = DEFAULT_T0_NS) -> int:
    """Stamp (ns) of the ``index``-th frame of a bag played at ``rate_hz``."""
    return t0_ns + int(round(index * 1e9 / rate_hz))


def write_bop_frame(writer: BagWriter, frame: BopFrame, rgb: np.ndarray, stamp: int,
                    objects: list[BagObject], gt_instances: list,
                    labels: np.ndarray | None) -> None:
    """One frame's messages (camera_info and mask before the image, so that a node pairing by
    stamp has the frame complete when its image arrives), bag time = ``stamp``. rgb (H, W, 3)
    uint8; labels (H, W) label image or None."""
    store = writer.store
    height, width = rgb.shape[:2]
    writer.write(CAMERA_INFO_TOPIC,
                 camera_info_msg(store, frame.K, width, height, stamp, CAMERA_FRAME), stamp)
    if labels is not None:
        writer.write(MASK_TOPIC, label_image_msg(store, labels, stamp, CAMERA_FRAME), stamp)
    writer.write(IMAGE_TOPIC, image_msg(store, rgb, stamp, CAMERA_FRAME, 'rgb8'), stamp)
    names = {obj.obj_id: obj.name for obj in objects}
    for inst in gt_instances:
        writer.write(ground_truth_topic(names[inst.obj_id]),
                     pose_stamped_msg(store, make_pose(inst.R, inst.t), stamp, CAMERA_FRAME),
                     stamp)


def ground_truth_topic(name: str) -> str:
    return f'{GROUND_TRUTH_PREFIX}{name}/pose'


def output_pose_topic(name: str, node_name: str = 'pose_node') -> str:
    return f'/{node_name}/{name}/pose'


def topic_object(topic: str, prefix: str) -> str | None:
    """``<object>`` of a topic ``<prefix><object>/pose``, else None."""
    if topic.startswith(prefix) and topic.endswith('/pose'):
        name = topic[len(prefix):-len('/pose')]
        return name if name and '/' not in name else None
    return None


# --------------------------------------------------------------------------- matching

def poses_by_stamp(path: str | Path, prefix: str) -> dict[str, dict[int, np.ndarray]]:
    """Per object the PoseStamped poses (4, 4, metres) on topics ``<prefix><object>/pose`` of
    the bag at ``path``, keyed by header stamp (ns)."""
    result: dict[str, dict[int, np.ndarray]] = {}
    topics = [t for t in bag_topics(path) if topic_object(t, prefix) is not None]
    for message in read_messages(path, topics):
        name = topic_object(message.topic, prefix)
        result.setdefault(name, {})[stamp_ns(message.msg.header.stamp)] = \
            pose_from_msg(message.msg.pose)
    return result


# --------------------------------------------------------------------------- a whole BOP bag

def node_parameters(objects_file: Path, with_masks: bool) -> dict:
    """Parameters of the node for replaying a BOP bag: masks from the bag's label images when
    it has them; no tracking, because BOP test frames are not consecutive video frames; reliable
    inputs so that no replayed frame is lost on the way."""
    return {'/**': {'ros__parameters': {
        'objects_file': str(objects_file), 'use_mask_topic': with_masks, 'tracking': False,
        'input_is_rectified': True, 'qos_reliability': 'reliable'}}}


def write_bop_bag(out_dir: Path, dataset: BopDataset, image_ids: list[int], rate_hz: float,
                  with_masks: bool, storage: str = 'mcap', store: Typestore | None = None,
                  min_visib_fract: float = 0.1, t0_ns: int = DEFAULT_T0_NS) -> Iterator[BopFrame]:
    """Write ``out_dir/bag`` (see the module docstring) with the frames ``image_ids`` of
    ``dataset``, plus ``objects.yaml`` and ``pose_node.yaml`` (node parameters) beside it;
    yields each frame once written. Ground truth: the BOP evaluation targets (all instances when
    the dataset lists none) at least ``min_visib_fract`` visible."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    objects = bag_objects(dataset)
    objects_path = out_dir / OBJECTS_FILE
    write_yaml(objects_path, objects_document(dataset, objects),
               f'Objects of the bag {BAG_DIR}/ made from {dataset.root}: mask label i = '
               f'objects[i - 1].\nNames are the LM-O names; the BOP id is in the mesh name.')
    write_yaml(out_dir / PARAMS_FILE, node_parameters(objects_path.resolve(), with_masks),
               'pose_node parameters for replaying the bag beside this file.')
    targets_path = dataset.root / 'test_targets_bop19.json'
    targets = ({(t.image_id, t.obj_id) for t in dataset.targets()}
               if targets_path.is_file() else None)
    with BagWriter(out_dir / BAG_DIR, store or default_store(), storage) as writer:
        for index, frame in enumerate(dataset.frames(image_ids)):
            rgb = frame.load_rgb()
            labels = object_labels(objects, frame, rgb.shape[1], rgb.shape[0]) \
                if with_masks else None
            write_bop_frame(writer, frame, rgb, frame_stamp(index, rate_hz, t0_ns), objects,
                            ground_truth_instances(frame, targets, min_visib_fract), labels)
            yield frame



# --------------------------------------------------------------------------- recorded runs

def load_recording(run_bag: str | Path, gt_bag: str | Path,
                   node_name: str = 'pose_node') -> Recording:
    """The Recording of a replay: estimates from ``/<node_name>/<object>/pose`` of ``run_bag``,
    publish times from its ``REPLAY_TOPIC``, answer times = the earliest bag (receive) time of
    any ``/<node_name>/...`` message with the image's stamp; truth and intrinsics from
    ``gt_bag``."""
    prefix = f'/{node_name}/'
    intrinsics, width = {}, 0
    for message in read_messages(gt_bag, [CAMERA_INFO_TOPIC]):
        intrinsics[stamp_ns(message.msg.header.stamp)] = intrinsics_from_msg(message.msg)
        width = int(message.msg.width)
    published, answered = {}, {}
    for message in read_messages(run_bag):
        if message.topic == REPLAY_TOPIC:
            published[stamp_ns(message.msg.header.stamp)] = stamp_ns(message.msg.time_ref)
        elif message.topic.startswith(prefix) and hasattr(message.msg, 'header'):
            stamp = stamp_ns(message.msg.header.stamp)
            answered[stamp] = min(answered.get(stamp, message.timestamp_ns),
                                  message.timestamp_ns)
    return Recording(truth=poses_by_stamp(gt_bag, GROUND_TRUTH_PREFIX),
                     estimates=poses_by_stamp(run_bag, prefix), intrinsics=intrinsics,
                     image_width=width, published_ns=published, answered_ns=answered)


def frame_images(path: str | Path, stamps: Iterable[int],
                 topic: str = IMAGE_TOPIC) -> dict[int, np.ndarray]:
    """(H, W, 3) uint8 RGB of the bag's images with the given header stamps."""
    wanted = set(stamps)
    images = {}
    for message in read_messages(path, [topic]):
        stamp = stamp_ns(message.msg.header.stamp)
        if stamp in wanted:
            images[stamp] = rgb_from_msg(message.msg)
    return images

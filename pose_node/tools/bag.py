"""``pose_tools bag``: evaluation of the live node on recorded data (rosbag2, mcap or sqlite3).

  pose_tools bag from-bop --split dev --masks --out out/lmo_dev
      a bag (out/lmo_dev/bag) of BOP frames: /camera/image_raw, /camera/camera_info,
      /camera/mask (--masks), /ground_truth/<object>/pose (metres), plus objects.yaml and
      pose_node.yaml (node parameters: masks from the bag, no tracking) beside it;
  pose_tools bag replay out/lmo_dev --out out/lmo_dev_run --lockstep
      starts the node (console script ``pose_node``), plays the bag into it over DDS with the
      recorded stamps, and records its outputs (/pose_node/<object>/pose, detections, markers,
      /diagnostics) with receive times as bag times, plus the publish time of every image
      (out/lmo_dev_run/bag); --lockstep waits for the node's answer to each image;
  pose_tools bag eval out/lmo_dev_run --gt out/lmo_dev --json out/lmo_dev_run/eval.json
      --report out/lmo_dev_run/report
      ADD(-S) recall, AR of MSSD and MSPD, SPEED, latency and dropped frames, PNG charts and
      report.md.
A BAG argument is a rosbag2 folder or a folder holding one as ``bag/``.
"""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pose_node import bags
from pose_node.datasets.bop import BopDataset, default_lmo_root

REPLAY_TOPIC = '/replay/image_published'
"""Recorded by replay: sensor_msgs/TimeReference per image, header stamp = the image's stamp,
time_ref = wall time when it was published (bag time: the same)."""
NODE_NAME = 'pose_node'
SETTLE_S = 0.5


def register(subparsers) -> None:
    parser = subparsers.add_parser('bag', help='rosbag2: BOP -> bag, replay into the node, eval',
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest='bag_command', metavar='BAG_COMMAND', required=True)
    _register_from_bop(commands)
    _register_replay(commands)
    _register_eval(commands)


def resolve_bag(path: Path) -> Path:
    """The rosbag2 folder of ``path``: itself when it holds metadata.yaml, else ``path/bag``."""
    path = Path(path)
    if (path / 'metadata.yaml').is_file():
        return path
    if (path / bags.BAG_DIR / 'metadata.yaml').is_file():
        return path / bags.BAG_DIR
    raise FileNotFoundError(f'{path}: no rosbag2 here (no metadata.yaml, nor bag/metadata.yaml)')


def beside(bag: Path, name: str) -> Path | None:
    """``name`` in the folder holding ``bag`` (or in ``bag`` itself), when it exists."""
    for folder in (bag.parent, bag):
        if (folder / name).is_file():
            return folder / name
    return None


# --------------------------------------------------------------------------- from-bop

def _register_from_bop(commands) -> None:
    parser = commands.add_parser('from-bop', help='write a bag of BOP frames with ground truth')
    parser.add_argument('--split', choices=('dev', 'test', 'all'), default='dev',
                        help='image ids of splits.json (all: every annotated frame)')
    parser.add_argument('--out', type=Path, required=True,
                        help='folder to create: bag/, objects.yaml, pose_node.yaml')
    parser.add_argument('--storage', choices=tuple(bags.STORAGES), default='mcap')
    parser.add_argument('--rate', type=float, default=1.0, help='frames per second of bag time')
    parser.add_argument('--masks', action='store_true',
                        help='add /camera/mask: GT visible masks as one label image')
    parser.add_argument('--lmo-root', type=Path, default=None,
                        help='BOP dataset folder (default: $POSE_NODE_LMO_ROOT or '
                             '../shared/data/lmo)')
    parser.add_argument('--bop-split-dir', default='test', help='BOP split folder to read')
    parser.add_argument('--min-visib', type=float, default=0.1,
                        help='ground truth only for instances at least this visible')
    parser.add_argument('--limit', type=int, default=0, help='first N frames only (0: all)')
    parser.set_defaults(func=run_from_bop)


def run_from_bop(args) -> int:
    if args.rate <= 0:
        raise SystemExit('--rate must be positive')
    dataset = BopDataset(args.lmo_root or default_lmo_root(), args.bop_split_dir)
    splits = dataset.splits()
    if args.split == 'all':
        image_ids = [i for scene in dataset.scene_ids for i in dataset.image_ids(scene)]
    elif args.split in splits:
        image_ids = splits[args.split]
    else:
        raise SystemExit(f'{dataset.root}/splits.json has no split {args.split!r}')
    if args.limit:
        image_ids = sorted(image_ids)[:args.limit]
    if (args.out / bags.BAG_DIR).exists():
        raise SystemExit(f'{args.out / bags.BAG_DIR} exists already; choose another --out')
    frames = bags.write_bop_bag(args.out, dataset, image_ids, args.rate, args.masks,
                                args.storage, min_visib_fract=args.min_visib)
    count = sum(1 for _ in tqdm(frames, total=len(image_ids), desc='from-bop', unit='frame'))
    print(f'from-bop: {count} frames -> {args.out / bags.BAG_DIR} ({args.storage}); '
          f'objects: {args.out / bags.OBJECTS_FILE}; parameters: {args.out / bags.PARAMS_FILE}')
    return 0


# --------------------------------------------------------------------------- replay

def _register_replay(commands) -> None:
    parser = commands.add_parser('replay', help='play a bag into the live node, record outputs')
    parser.add_argument('bag', type=Path, help='rosbag2 folder (or a folder holding bag/)')
    parser.add_argument('--out', type=Path, required=True,
                        help='folder to create: bag/ (outputs), objects.yaml, node.log')
    parser.add_argument('--rate', type=float, default=1.0, help='playback speed factor')
    parser.add_argument('--lockstep', action='store_true',
                        help='send the next image only once the node published its detections '
                             'for the previous one (or --answer-timeout passed): no frame is '
                             'dropped')
    parser.add_argument('--answer-timeout', type=float, default=60.0, help='seconds (lockstep)')
    parser.add_argument('--objects', type=Path, default=None,
                        help='objects file (default: objects.yaml beside the bag)')
    parser.add_argument('--params', type=Path, default=None,
                        help='node parameters file (default: pose_node.yaml beside the bag)')
    parser.add_argument('--image-topic', default=bags.IMAGE_TOPIC)
    parser.add_argument('--camera-info-topic', default=bags.CAMERA_INFO_TOPIC)
    parser.add_argument('--mask-topic', default=bags.MASK_TOPIC,
                        help='label image topic of the bag, played when the bag has it')
    parser.add_argument('--limit', type=int, default=0, help='first N images only (0: all)')
    parser.add_argument('--startup-timeout', type=float, default=600.0,
                        help='seconds to wait for the node to connect')
    parser.add_argument('--drain', type=float, default=5.0,
                        help='seconds to keep recording after the last image')
    parser.add_argument('--node-command', default=None,
                        help='command starting the node (default: the pose_node console script '
                             'beside this Python); ROS arguments are appended')
    parser.set_defaults(func=run_replay)


def node_command(args, objects: Path, params: Path | None, input_topics: dict[str, str]) -> list:
    """The node's command line: console script, parameters file, objects file, remappings of
    its relative inputs (image, camera_info, mask) onto the bag's topics."""
    command = (args.node_command.split() if args.node_command
               else [str(Path(sys.executable).with_name('pose_node'))])
    command += ['--ros-args', '-r', f'__node:={NODE_NAME}']
    if params is not None:
        command += ['--params-file', str(params)]
    command += ['-p', f'objects_file:={objects.resolve()}']
    for name, topic in input_topics.items():
        command += ['-r', f'{name}:={topic}']
    return command


def run_replay(args) -> int:
    if args.rate <= 0:
        raise SystemExit('--rate must be positive')
    bag = resolve_bag(args.bag)
    objects = args.objects or beside(bag, bags.OBJECTS_FILE)
    if objects is None:
        raise SystemExit(f'no {bags.OBJECTS_FILE} beside {bag}; pass --objects')
    params = args.params or beside(bag, bags.PARAMS_FILE)
    from pose_node.objects_config import load_objects_config
    names = load_objects_config(objects).names
    recorded = bags.bag_topics(bag)
    inputs = {'image': args.image_topic, 'camera_info': args.camera_info_topic,
              'mask': args.mask_topic}
    inputs = {name: topic for name, topic in inputs.items() if topic in recorded}
    for needed in ('image', 'camera_info'):
        if needed not in inputs:
            raise SystemExit(f'{bag} has no {needed} topic {getattr(args, needed + "_topic")!r}; '
                             f'topics: {", ".join(recorded)}')
    if (args.out / bags.BAG_DIR).exists():
        raise SystemExit(f'{args.out / bags.BAG_DIR} exists already; choose another --out')
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(objects, args.out / bags.OBJECTS_FILE)
    from pose_node.ros.stream import use_large_message_transport
    use_large_message_transport(os.environ)  # before any participant: here and in the node
    command = node_command(args, objects, params, inputs)
    print('replay: starting the node:', ' '.join(command))
    # Ctrl-C or a kill ends the replay through the finally blocks: node stopped, bag closed.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    with open(args.out / 'node.log', 'w') as log:
        # A shell running this in the background ignores SIGINT; the node must not inherit that.
        node = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            summary = Replayer(bag, args.out / bags.BAG_DIR, names, inputs, node).run(args)
        except KeyboardInterrupt:
            print(f'replay: interrupted; what was recorded is in {args.out / bags.BAG_DIR}')
            return 130
        finally:
            stop_process(node)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    print(f'replay: {summary["published"]} images sent, {summary["answered"]} answered, '
          f'outputs -> {args.out / bags.BAG_DIR}; node log: {args.out / "node.log"}')
    return 0


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f'signal {signum}')


def stop_process(process: subprocess.Popen, timeout_s: float = 15.0) -> None:
    """SIGINT (the node shuts down cleanly), then SIGKILL if it does not exit in time."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def output_types() -> dict[str, type]:
    """The node's output message classes by kind (rclpy imported here, not at module load)."""
    from diagnostic_msgs.msg import DiagnosticArray
    from geometry_msgs.msg import PoseStamped
    from vision_msgs.msg import Detection3DArray
    from visualization_msgs.msg import MarkerArray
    return {'pose': PoseStamped, 'detections': Detection3DArray, 'markers': MarkerArray,
            'diagnostics': DiagnosticArray}


def ros_type_name(message_class: type) -> str:
    """'pkg/msg/Name' of an rclpy message class."""
    return f'{message_class.__module__.split(".")[0]}/msg/{message_class.__name__}'


def output_store():
    """Kilted typestore plus vision_msgs, as built into this environment."""
    store = bags.default_store()
    bags.register_msg_folder(store, 'vision_msgs',
                             Path(sys.prefix) / 'share' / 'vision_msgs' / 'msg')
    return store


class Replayer:
    """Plays the input topics of ``bag`` into the node and records its outputs into
    ``out_bag`` with receive times as bag times."""

    def __init__(self, bag: Path, out_bag: Path, names: list[str], inputs: dict[str, str],
                 node: subprocess.Popen):
        self.bag = bag
        self.out_bag = out_bag
        self.names = names
        self.inputs = inputs
        self.node_process = node
        self.lock = threading.Lock()
        self.answered: dict[int, int] = {}
        self.completed: set[int] = set()
        self.answer_arrived = threading.Condition(self.lock)

    def output_topics(self) -> dict[str, type]:
        types = output_types()
        topics = {f'/{NODE_NAME}/{name}/pose': types['pose'] for name in self.names}
        topics[f'/{NODE_NAME}/detections'] = types['detections']
        topics[f'/{NODE_NAME}/markers'] = types['markers']
        topics['/diagnostics'] = types['diagnostics']
        return topics

    def run(self, args) -> dict:
        import rclpy
        from rclpy.context import Context
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image

        context = Context()
        rclpy.init(context=context)
        store = output_store()
        qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
        try:
            with bags.BagWriter(self.out_bag, store) as writer:
                node = rclpy.create_node('pose_tools_bag_replay', context=context)
                executor = SingleThreadedExecutor(context=context)
                executor.add_node(node)
                for topic, message_class in self.output_topics().items():
                    node.create_subscription(
                        message_class, topic, self._recorder(writer, topic, message_class), qos,
                        raw=True)
                publishers = {topic: node.create_publisher(
                    CameraInfo if name == 'camera_info' else Image, topic, qos)
                    for name, topic in self.inputs.items()}
                spinner = threading.Thread(target=executor.spin, daemon=True)
                spinner.start()
                try:
                    self._wait_for_node(node, publishers, args.startup_timeout)
                    published = self._play(writer, publishers, args)
                    self._drain(published, args)
                finally:
                    executor.shutdown()
                    node.destroy_node()
        finally:
            context.try_shutdown()
        return {'published': len(published), 'answered': len(set(published) & set(self.answered))}

    def _recorder(self, writer: bags.BagWriter, topic: str, message_class: type):
        msgtype = ros_type_name(message_class)
        # DiagnosticArray's header holds the node's clock, not an image stamp.
        answers_image = hasattr(message_class, 'header') and \
            msgtype != 'diagnostic_msgs/msg/DiagnosticArray'
        # The node publishes a frame's detections after its poses: the frame is complete.
        completes_frame = topic == f'/{NODE_NAME}/detections'

        def record(data: bytes) -> None:
            received = time.time_ns()
            with self.lock:
                writer.write_raw(topic, msgtype, data, received)
                if answers_image:
                    stamp = bags.stamp_ns(writer.store.deserialize_cdr(data, msgtype).header.stamp)
                    self.answered.setdefault(stamp, received)
                    if completes_frame:
                        self.completed.add(stamp)
                    self.answer_arrived.notify_all()
        return record

    def _wait_for_node(self, node, publishers: dict, timeout_s: float) -> None:
        """Until the node subscribes to the image and camera_info (the mask only when its
        parameters ask for it) and publishes its detections."""
        deadline = time.monotonic() + timeout_s
        detections = f'/{NODE_NAME}/detections'
        needed = [publishers[self.inputs[name]] for name in ('image', 'camera_info')]
        while time.monotonic() < deadline:
            if self.node_process.poll() is not None:
                raise SystemExit(f'the node exited with code {self.node_process.returncode} '
                                 'before the replay started; see node.log')
            if all(p.get_subscription_count() > 0 for p in needed) and \
                    node.count_publishers(detections) > 0:
                time.sleep(1.0)  # discovery of the remaining endpoints settles
                return
            time.sleep(0.2)
        raise SystemExit(f'the node did not connect within {timeout_s:.0f} s')

    def _play(self, writer: bags.BagWriter, publishers: dict, args) -> dict[int, int]:
        """Send the input messages at ``rate`` x bag time; returns image stamp -> publish ns."""
        compatible = bags.wire_compatible(self.bag, bags.default_store())
        image_topic = self.inputs['image']
        total = bags.message_counts(self.bag).get(image_topic)
        if args.limit:
            total = min(total, args.limit)
        published: dict[int, int] = {}
        progress = tqdm(desc='replay', unit='image', total=total)
        wall_start = bag_start = None
        for message in bags.read_messages(self.bag, list(publishers)):
            if args.limit and message.topic == image_topic and len(published) >= args.limit:
                break
            if wall_start is None:
                wall_start, bag_start = time.monotonic(), message.timestamp_ns
            delay = wall_start + (message.timestamp_ns - bag_start) * 1e-9 / args.rate \
                - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            data = message.raw if compatible[message.topic] else \
                bags.reserialize(message.msg, message.msgtype, bags.default_store())
            sent = time.time_ns()
            publishers[message.topic].publish(data)
            if message.topic != image_topic:
                continue
            stamp = bags.stamp_ns(message.msg.header.stamp)
            published[stamp] = sent
            with self.lock:
                writer.write(bags.REPLAY_TOPIC, bags.time_reference_msg(
                    writer.store, stamp, sent, image_topic), sent)
            progress.update()
            if args.lockstep:
                self._wait_for_answer(stamp, args.answer_timeout)
                # Bag time restarts after each answer: the node's pace, not the bag's, rules.
                wall_start, bag_start = time.monotonic(), message.timestamp_ns
        progress.close()
        return published

    def _wait_for_answer(self, stamp: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self.answer_arrived:
            while stamp not in self.completed:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.node_process.poll() is not None:
                    return False
                self.answer_arrived.wait(min(remaining, 0.5))
        return True

    def _drain(self, published: dict[int, int], args) -> None:
        """Keep recording until every image's detections arrived or ``drain`` seconds passed,
        then a little longer for what the node sends after them (markers, TF)."""
        deadline = time.monotonic() + args.drain
        while time.monotonic() < deadline and self.node_process.poll() is None:
            with self.lock:
                if set(published) <= self.completed:
                    break
            time.sleep(0.1)
        time.sleep(SETTLE_S)


# --------------------------------------------------------------------------- eval

def _register_eval(commands) -> None:
    parser = commands.add_parser('eval', help='score a replay against the ground-truth bag')
    parser.add_argument('run', type=Path, help='output of replay (rosbag2 or its folder)')
    parser.add_argument('--gt', type=Path, required=True,
                        help='the bag replayed (with /ground_truth/<object>/pose)')
    parser.add_argument('--json', type=Path, required=True, help='metrics file to write')
    parser.add_argument('--report', type=Path, default=None,
                        help='folder for the PNG charts and report.md')
    parser.add_argument('--objects', type=Path, default=None,
                        help='objects file (default: beside the run bag, else beside --gt)')
    parser.add_argument('--thumbnails', type=int, default=6, help='overlay frames in the report')
    parser.add_argument('--tolerance-ms', type=float, default=1.0,
                        help='largest stamp difference matching an estimate to the truth')
    parser.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from pose_node import evaluation, report
    from pose_node.objects_config import load_object_models, load_objects_config

    run_bag, gt_bag = resolve_bag(args.run), resolve_bag(args.gt)
    objects = args.objects or beside(run_bag, bags.OBJECTS_FILE) or \
        beside(gt_bag, bags.OBJECTS_FILE)
    if objects is None:
        raise SystemExit(f'no {bags.OBJECTS_FILE} beside {run_bag} or {gt_bag}; pass --objects')
    models = {model.name: model for model in load_object_models(load_objects_config(objects))}
    recording = bags.load_recording(run_bag, gt_bag, NODE_NAME)
    missing = sorted(set(recording.truth) - set(models))
    if missing:
        raise SystemExit(f'{objects} has no model for {", ".join(missing)}')
    errors = {}
    for name in tqdm(sorted(recording.truth), desc='eval', unit='object'):
        errors[name] = evaluation.object_errors(name, recording, models[name],
                                                int(args.tolerance_ms * 1e6))
    summary = evaluation.summarize(errors, models, recording)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({**summary, 'errors': evaluation.errors_document(errors)},
                                    indent=1))
    if args.report is not None:
        stamps = sorted(recording.intrinsics)
        chosen = [stamps[i] for i in np.unique(np.linspace(0, len(stamps) - 1, args.thumbnails,
                                                            dtype=int))] if stamps else []
        images = bags.frame_images(gt_bag, chosen)
        scenes = {name: report.RaycastScene([model]) for name, model in models.items()}
        thumbnails = [report.overlay_thumbnail(
            images[stamp], recording.intrinsics[stamp],
            {n: p[stamp] for n, p in recording.truth.items() if stamp in p},
            {n: p[stamp] for n, p in recording.estimates.items() if stamp in p}, scenes)
            for stamp in tqdm(chosen, desc='overlays', unit='frame') if stamp in images]
        path = report.write_report(args.report, summary, errors, models,
                                   evaluation.frame_latencies_ms(recording),
                                   stamps[0] if stamps else 0, thumbnails)
        print(f'eval: report {path}')
    print(f'eval: ADD(-S) recall mean {_fmt(summary["add_s_recall"]["mean"])} over '
          f'{len(errors)} objects, AR {_fmt(summary["ar"]["mean"])}, frames '
          f'{summary["frames"]["answered"]}/{summary["frames"]["published"]} answered, '
          f'latency p50 {_fmt(summary["latency_ms"].get("p50"), 0)} ms; -> {args.json}')
    return 0


def _fmt(value, digits: int = 3) -> str:
    return 'n/a' if value is None else f'{value:.{digits}f}'

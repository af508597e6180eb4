"""``pose_tools bench-node``: latency and throughput of the running pose_node over ROS 2.

For 1 and 3 objects (copies of the demo object under different names), tracking on and off: start
the real node (console script, masks from the mask topic, reliable inputs, Fast DDS with the
shared-memory profile config/fastdds_large_messages.xml unless one is set), wait for its answer to
a first frame (a detection), then publish ray-cast frames at ``--camera-hz`` for ``--seconds``.
Latency: image published -> the last object's PoseStamped received (only frames the node
answered for every object; it always takes the newest frame, so the others are skipped, not
queued). Throughput: answered frames per second. Memory: the node process's resident set size
after its first answer and at the end of the stream (Linux /proc; growth over a long
``--seconds`` run would show a leak or a growing queue). Writes a JSON file and prints a table.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pose_node.objects_config import load_object_models, load_objects_config
from pose_node.resources import demo_object_dir, share_dir
from pose_node.tools.demo import BASE_STAMP_NS, HEIGHT, K_DEMO, WIDTH, stop_node

STARTUP_TIMEOUT_S = 600.0   # a new mesh builds its template bank (about 40 s on 2 cores)
FIRST_ANSWER_TIMEOUT_S = 120.0


def register(subparsers) -> None:
    parser = subparsers.add_parser('bench-node', help='latency and throughput of the pose_node '
                                   'node over ROS 2', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--objects', default='1,3', help='object counts to run, comma-separated')
    parser.add_argument('--tracking', default='on,off', help='tracking modes to run: on, off')
    parser.add_argument('--seconds', type=float, default=15.0, help='streaming time per run')
    parser.add_argument('--camera-hz', type=float, default=10.0, help='frames published per s')
    parser.add_argument('--frames', type=int, default=20,
                        help='distinct frames rendered per run (streamed back and forth)')
    parser.add_argument('--threads', type=int, default=1, help="the node's torch threads")
    parser.add_argument('--json', type=Path, default=Path('out/bench_node.json'))
    parser.add_argument('--seed', type=int, default=0)
    parser.set_defaults(func=run)


def objects_yaml(count: int) -> str:
    """An objects file with ``count`` copies of the demo object (names demo_object[_i]) as the
    shipped objects file configures it (colour weight included)."""
    folder = demo_object_dir()
    (shipped,) = load_objects_config(share_dir() / 'config' / 'objects.yaml').objects
    names = ['demo_object'] if count == 1 else [f'demo_object_{i}' for i in range(count)]
    return 'objects:\n' + ''.join(
        f'  - {{name: {name}, mesh: {folder / "obj_000001.ply"}, unit_scale: 0.001, '
        f'models_info: {folder / "models_info.json"}, '
        f'colour_weight: {shipped.colour_weight}}}\n' for name in names)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float('nan')


def ping_pong(count: int, length: int) -> list[int]:
    """Frame indices 0, 1, ..., length-1, length-2, ..., 1, 0, 1, ... (``count`` of them): a
    smooth back-and-forth over ``length`` rendered frames."""
    cycle = list(range(length)) + list(range(length - 2, 0, -1)) or [0]
    return [cycle[i % len(cycle)] for i in range(count)]


def bench_one(n_objects: int, tracking: bool, args: argparse.Namespace) -> dict:
    """One run: start the node, stream, stop; the figures of :func:`summary`."""
    import rclpy
    from rclpy.context import Context

    from pose_node.ros.stream import NodeClient, synthetic_stream, use_large_message_transport

    use_large_message_transport(os.environ)
    with tempfile.TemporaryDirectory() as folder:
        objects_file = Path(folder) / 'objects.yaml'
        objects_file.write_text(objects_yaml(n_objects))
        models = load_object_models(load_objects_config(objects_file))
        command = [str(Path(sys.executable).parent / 'pose_node'), '--ros-args',
                   '-p', f'objects_file:={objects_file}', '-p', 'use_mask_topic:=true',
                   '-p', 'qos_reliability:=reliable', '-p', f'torch_threads:={args.threads}',
                   '-p', f'tracking:={str(tracking).lower()}', '-p', 'publish_debug_image:=false']
        process = subprocess.Popen(command, env=os.environ, stdout=subprocess.DEVNULL)
        context = Context()
        rclpy.init(context=context)
        client = NodeClient(context, [m.name for m in models])
        try:
            frames = synthetic_stream(models, K_DEMO, WIDTH, HEIGHT, args.frames,
                                      np.random.default_rng(args.seed))
            if not client.wait_for_node(STARTUP_TIMEOUT_S):
                raise RuntimeError('pose_node did not come up')
            stamps, resident_mb = stream(client, frames, args.camera_hz, args.seconds,
                                         process.pid)
        finally:
            client.close()
            context.try_shutdown()
            stop_node(process)
    return {**summary(client, stamps, [m.name for m in models]),
            'rss_mb_first_answer': resident_mb[0], 'rss_mb_end': resident_mb[1]}


def resident_mb(pid: int) -> float | None:
    """Resident set size (MB) of process ``pid`` from /proc; None where that is not readable."""
    try:
        status = Path(f'/proc/{pid}/status').read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith('VmRSS:'):
            return int(line.split()[1]) / 1024
    return None


def stream(client, frames, camera_hz: float, seconds: float,
           pid: int) -> tuple[list[int], tuple[float | None, float | None]]:
    """Publish a first frame and wait for its answer, then stream for ``seconds``; the stamps
    of the streamed frames (the first left out) and the node's (process ``pid``) resident MB
    after its first answer and at the end."""
    first = client.publish_until_answered(frames[0], K_DEMO, BASE_STAMP_NS,
                                          FIRST_ANSWER_TIMEOUT_S)
    if first is None:
        raise RuntimeError('pose_node did not answer the first frame')
    resident_at_first = resident_mb(pid)
    period = 1.0 / camera_hz
    count = int(seconds * camera_hz)
    stamps = []
    started = time.monotonic()
    for step, index in enumerate(ping_pong(count + 1, len(frames))[1:], start=1):
        stamps.append(first + int(step * period * 1e9))
        client.publish(frames[index], K_DEMO, stamps[-1])
        client.spin_for(max(0.0, started + step * period - time.monotonic()))
    client.spin_for(3.0)
    return stamps, (resident_at_first, resident_mb(pid))


def summary(client, stamps: list[int], names: list[str]) -> dict:
    """Latency (ms, image published -> last object's pose received) p50/p95 over the frames
    answered for every object, answered frames per second, and the share of frames answered."""
    latencies, arrivals = [], []
    for stamp in stamps:
        answers = client.received.poses.get(stamp, {})
        if set(answers) != set(names):
            continue
        arrived = max(arrival for _, arrival in answers.values())
        latencies.append(1e3 * (arrived - client.sent_at[stamp]))
        arrivals.append(arrived)
    span = max(arrivals) - min(arrivals) if len(arrivals) > 1 else float('nan')
    return {'frames_published': len(stamps), 'frames_answered': len(latencies),
            'latency_ms_p50': percentile(latencies, 50),
            'latency_ms_p95': percentile(latencies, 95),
            'throughput_hz': (len(arrivals) - 1) / span if len(arrivals) > 1 else 0.0}


def mb(value: float | None) -> str:
    return 'n/a' if value is None else f'{value:.0f}'


def load_average() -> float:
    return os.getloadavg()[0]


def run(args: argparse.Namespace) -> int:
    counts = [int(value) for value in args.objects.split(',')]
    modes = [value.strip() == 'on' for value in args.tracking.split(',')]
    results = []
    for n_objects in counts:
        for tracking in modes:
            started = time.monotonic()
            figures = bench_one(n_objects, tracking, args)
            results.append({'objects': n_objects, 'tracking': tracking, **figures,
                            'load_average_1min': load_average(),
                            'wall_s': time.monotonic() - started})
            print(f'objects={n_objects} tracking={"on" if tracking else "off"}: '
                  f'{figures["frames_answered"]}/{figures["frames_published"]} frames answered, '
                  f'p50 {figures["latency_ms_p50"]:.0f} ms, '
                  f'p95 {figures["latency_ms_p95"]:.0f} ms, '
                  f'{figures["throughput_hz"]:.2f} Hz, node RSS '
                  f'{mb(figures["rss_mb_first_answer"])} -> {mb(figures["rss_mb_end"])} MB',
                  flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({'camera_hz': args.camera_hz, 'seconds': args.seconds,
                                     'threads': args.threads, 'cpu_count': os.cpu_count(),
                                     'results': results}, indent=2))
    print('\n| objects | tracking | answered | latency p50 ms | latency p95 ms | throughput Hz '
          '| node RSS MB (first answer -> end) |')
    print('|---|---|---|---|---|---|---|')
    for row in results:
        print(f'| {row["objects"]} | {"on" if row["tracking"] else "off"} | '
              f'{row["frames_answered"]}/{row["frames_published"]} | {row["latency_ms_p50"]:.0f} | '
              f'{row["latency_ms_p95"]:.0f} | {row["throughput_hz"]:.2f} | '
              f'{mb(row["rss_mb_first_answer"])} -> {mb(row["rss_mb_end"])} |')
    print(f'wrote {args.json} (camera {args.camera_hz:g} Hz, node torch threads {args.threads}, '
          f'1-min load average at the end {load_average():.1f} on {os.cpu_count()} CPUs)')
    return 0

"""``pose_tools demo``: the main job end to end on the embedded demo object.

1. Start the real ``pose_node`` node (its console script, default parameters) on the shipped
   objects file as a subprocess.
2. Ray-cast the demo object moving smoothly over procedural clutter and publish the frames as a
   camera stream (image + camera_info, and the mask label image unless the built-in segmenter's
   weights ``models/demo_object/segmenter.pt`` exist or ``--masks`` says otherwise) over
   ROS 2 / Fast DDS for about 10 s.
3. Compare every PoseStamped the node publishes with the truth; print per-frame errors, write an
   overlay (truth green, the node's pose yellow) to ``<out>/demo_overlay.png`` and end with one
   summary line: ``demo: frames=N median_rot_err_deg=X median_trans_err_mm=Y rate_hz=Z``
   (N: frames the node published a pose for; rate: poses per second once the first frame
   (a detection) is answered).
"""
import argparse
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pose_node.datasets.synthetic import procedural_background, random_pose_in_view
from pose_node.render.raycast import RaycastScene
from pose_node.resources import demo_object_dir, load_demo_object

WIDTH, HEIGHT = 640, 480
K_DEMO = np.array([[600.0, 0.0, 319.5], [0.0, 600.0, 239.5], [0.0, 0.0, 1.0]])
DISTANCE_RANGE = (0.4, 0.6)
TRUE_COLOR = (40, 220, 40)
STARTUP_TIMEOUT_S = 300.0   # the first start on a machine builds the template bank
BASE_STAMP_NS = 1_700_000_000_000_000_000
FIRST_ANSWER_TIMEOUT_S = 60.0
SEGMENTER = demo_object_dir() / 'segmenter.pt'
"""The built-in segmenter's weights, as the shipped objects file names them."""


def register(subparsers) -> None:
    parser = subparsers.add_parser('demo', help='run pose_node on a synthetic camera stream of '
                                   'the demo object', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=Path('out'), help='folder for the overlay PNG')
    parser.add_argument('--frames', type=int, default=30, help='frames to stream')
    parser.add_argument('--camera-hz', type=float, default=3.0,
                        help='frames published per second (the node takes the newest)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--masks', choices=('auto', 'topic', 'segmenter'), default='auto',
                        help='where the node gets object masks: the mask topic (the renderer\'s '
                        'exact labels), the built-in segmenter, or auto (the segmenter when '
                        'models/demo_object/segmenter.pt exists)')
    parser.add_argument('--threads', type=int, default=0,
                        help="the node's torch threads (0: torch's default)")
    parser.set_defaults(func=run)


@dataclass
class SyntheticFrame:
    """One still frame of the demo object (the segmenter and regressor train and test on these)."""

    rgb: np.ndarray      # (H, W, 3) uint8
    mask: np.ndarray     # (H, W) bool
    pose: np.ndarray     # (4, 4) object-to-camera, metres


def render_synthetic_frame(scene: RaycastScene, rng: np.random.Generator) -> SyntheticFrame:
    """The object of ``scene`` at a random pose in view (0.4-0.6 m) over a procedural
    background, 640 x 480 with ``K_DEMO``."""
    pose = random_pose_in_view(rng, DISTANCE_RANGE)
    image = scene.render(pose[None], K_DEMO, WIDTH, HEIGHT, supersample=2)
    coverage = image.coverage[0][..., None]
    rgb = image.rgb + (1.0 - coverage) * procedural_background(WIDTH, HEIGHT, rng)
    return SyntheticFrame(rgb=(rgb * 255).round().astype(np.uint8), mask=coverage[..., 0] >= 0.5,
                          pose=pose)


def node_command(use_mask_topic: bool, threads: int) -> list[str]:
    """The pose_node console script next to this Python with its --ros-args (the shipped
    objects file)."""
    return [str(Path(sys.executable).parent / 'pose_node'), '--ros-args',
            '-p', f'use_mask_topic:={str(use_mask_topic).lower()}',
            '-p', f'torch_threads:={threads}']


def masks_from_topic(masks: str) -> bool:
    """Whether the demo's node takes masks from the mask topic rather than from the built-in
    segmenter that the shipped objects file names."""
    return masks == 'topic' or (masks == 'auto' and not SEGMENTER.is_file())


def stop_node(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(2)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(args: argparse.Namespace) -> int:
    import rclpy
    from rclpy.context import Context

    from pose_node.ros.stream import NodeClient, synthetic_stream, use_large_message_transport

    args.out.mkdir(parents=True, exist_ok=True)
    use_large_message_transport(os.environ)
    model = load_demo_object()
    use_mask_topic = masks_from_topic(args.masks)
    print('masks: ' + ('published on the mask topic' if use_mask_topic
                       else f'built-in segmenter {SEGMENTER}'))
    process = subprocess.Popen(node_command(use_mask_topic, args.threads), env=os.environ)
    context = Context()
    rclpy.init(context=context)
    client = NodeClient(context, [model.name])
    try:
        started = time.monotonic()
        frames = synthetic_stream([model], K_DEMO, WIDTH, HEIGHT, args.frames,
                                  np.random.default_rng(args.seed))
        print(f'rendered {len(frames)} frames in {time.monotonic() - started:.1f} s')
        if not client.wait_for_node(STARTUP_TIMEOUT_S, with_mask=use_mask_topic):
            print('demo: pose_node did not come up', file=sys.stderr)
            return 1
        rows = stream(client, frames, args.camera_hz, use_mask_topic)
        print_node_health(client)
    finally:
        client.close()
        context.try_shutdown()
        stop_node(process)
    if not rows:
        print('demo: frames=0 median_rot_err_deg=nan median_trans_err_mm=nan rate_hz=0.00')
        return 1
    write_overlay(args.out / 'demo_overlay.png', frames, rows, model)
    rot = np.median([row['rot_err_deg'] for row in rows])
    trans = np.median([row['trans_err_mm'] for row in rows])
    print(f'demo: frames={len(rows)} median_rot_err_deg={rot:.3f} median_trans_err_mm={trans:.2f} '
          f'rate_hz={answer_rate_hz(rows):.2f}')
    return 0


def stream(client, frames, camera_hz: float, with_mask: bool) -> list[dict]:
    """Publish the first frame and wait for its answer, then the others at ``camera_hz``, then
    wait briefly for the last answers. Returns per frame the node answered its row (index, pose,
    errors, latency, arrival time)."""
    period = 1.0 / camera_hz
    # The first frame is a detection (template matching, several hypotheses, first-call set-up):
    # the stream starts once it is answered.
    first = client.publish_until_answered(frames[0], K_DEMO, BASE_STAMP_NS,
                                          FIRST_ANSWER_TIMEOUT_S, with_mask)
    if first is None:
        return []
    stamps = [first]
    rows = answered_rows(client, stamps, frames, set())
    started = time.monotonic()
    for index, frame in enumerate(frames[1:], start=1):
        stamps.append(first + int(index * period * 1e9))
        client.publish(frame, K_DEMO, stamps[-1], with_mask=with_mask)
        client.spin_for(max(0.0, started + index * period - time.monotonic()))
        rows += answered_rows(client, stamps, frames, {row['index'] for row in rows})
    client.spin_for(2.0)
    return rows + answered_rows(client, stamps, frames, {row['index'] for row in rows})


def answered_rows(client, stamps: list[int], frames, done: set[int]) -> list[dict]:
    """Rows of the frames answered and not in ``done``, printed as they are found."""
    from pose_node.ros.conversions import msg_to_pose

    rows = []
    for index, stamp in enumerate(stamps):
        answer = client.received.poses.get(stamp, {}).get('demo_object')
        if index in done or answer is None:
            continue
        pose_msg, arrived = answer
        pose = msg_to_pose(pose_msg.pose)
        truth = frames[index].poses[0]
        cos = np.clip((np.trace(pose[:3, :3] @ truth[:3, :3].T) - 1) / 2, -1, 1)
        row = {'index': index, 'pose': pose, 'rot_err_deg': float(np.rad2deg(np.arccos(cos))),
               'trans_err_mm': float(1000 * np.linalg.norm(pose[:3, 3] - truth[:3, 3])),
               'latency_ms': 1000 * (arrived - client.sent_at[stamp]), 'arrived': arrived}
        rows.append(row)
        print(f'frame {index:3d}: rot err {row["rot_err_deg"]:6.3f} deg, trans err '
              f'{row["trans_err_mm"]:6.2f} mm, latency {row["latency_ms"]:6.0f} ms')
    return rows


def answer_rate_hz(rows: list[dict]) -> float:
    """Poses per second between the first and the last answer of the stream (the first frame,
    a detection answered before streaming started, left out)."""
    arrivals = sorted(row['arrived'] for row in rows if row['index'] > 0)
    if len(arrivals) < 2:
        return 0.0
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])


def print_node_health(client) -> None:
    """The node's last /diagnostics status, one line."""
    if not client.received.diagnostics:
        return
    status = client.received.diagnostics[-1].status[0]
    values = ', '.join(f'{kv.key}={kv.value}' for kv in status.values)
    print(f'pose_node diagnostics: {status.message}; {values}')


def write_overlay(path: Path, frames, rows: list[dict], model) -> None:
    """The last answered frame with the truth's contour (green) and the node's pose (yellow
    contour, axes) drawn as the node's debug image draws them."""
    from pose_node.overlay import draw_mask_contour
    from pose_node.ros.outputs import debug_image, silhouette

    last = rows[-1]
    frame = frames[last['index']]
    scene = RaycastScene([model])
    drawn = frame.rgb.copy()
    # Thicker than the node's contour, so that the truth stays visible around an exact estimate.
    draw_mask_contour(drawn, silhouette(scene, frame.poses[0], K_DEMO, WIDTH, HEIGHT), TRUE_COLOR,
                      thickness=5)
    drawn = debug_image(drawn, K_DEMO, {model.name: last['pose']}, {model.name: scene},
                        {model.name: model.diameter})
    cv2.imwrite(str(path), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
    print(f'wrote {path} (green: truth, yellow: pose_node, frame {last["index"]})')

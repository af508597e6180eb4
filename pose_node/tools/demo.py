"""``pose_tools demo``: every piece that works so far, run for real on the embedded demo object.

1. Ray-cast the demo object at known poses into synthetic 640x480 frames (cluttered background).
2. Send image, CameraInfo and the true PoseStamped from a camera node to a listener node over real
   ROS 2 (Fast DDS), and convert what arrives back into core types (checked against what was sent).
3. Refine a start 15 deg and 10 % of the distance off the truth against each received frame
   (render-and-compare, the default optimizer on the soft renderer; the object's binary mask plays
   the upstream segmenter's), score start and result with the metrics, and draw start, truth and
   refined pose onto the frame.
4. With the LM-O data present: overlay the ground truth of a real LM-O frame and check the
   projections against the dataset's boxes and visible fractions.
Until the node exists (issue 5) this is the closest working thing to the main job.
"""
import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from pose_node import metrics
from pose_node.datasets.bop import BopDataset, default_lmo_root
from pose_node.crop import projected_box
from pose_node.datasets.refine_cases import crop_case, perturbed_start
from pose_node.datasets.synthetic import procedural_background, random_pose_in_view
from pose_node.geometry import make_pose
from pose_node.mesh import ObjectModel
from pose_node.overlay import draw_axes, draw_mask_contour
from pose_node.refine import make_observation, make_optimizer, refine
from pose_node.render import RenderMesh, make_renderer
from pose_node.render.raycast import RaycastScene
from pose_node.resources import load_demo_object

WIDTH, HEIGHT = 640, 480
K_DEMO = np.array([[600.0, 0.0, 319.5], [0.0, 600.0, 239.5], [0.0, 0.0, 1.0]])
START_ROT_DEG, START_TRANS_FRAC = 15.0, 0.10
DISTANCE_RANGE = (0.4, 0.6)
TRUE_COLOR, START_COLOR, REFINED_COLOR = (40, 220, 40), (230, 60, 40), (255, 230, 0)
CROP_SIZE, RENDER_MAX_FACES = 128, 4000


def register(subparsers) -> None:
    parser = subparsers.add_parser('demo', help='run the working pipeline pieces on the demo object',
                                   description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--out', type=Path, default=Path('out'), help='folder for the overlay PNGs')
    parser.add_argument('--frames', type=int, default=3, help='synthetic frames to send')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--lmo-root', type=Path, default=None,
                        help='LM-O folder (default: $POSE_NODE_LMO_ROOT or ../shared/data/lmo)')
    parser.set_defaults(func=run)


@dataclass
class SyntheticFrame:
    rgb: np.ndarray      # (H, W, 3) uint8
    mask: np.ndarray     # (H, W) bool
    pose: np.ndarray     # (4, 4) object-to-camera, metres


def render_synthetic_frame(scene: RaycastScene, rng: np.random.Generator) -> SyntheticFrame:
    pose = random_pose_in_view(rng, DISTANCE_RANGE)
    image = scene.render(pose[None], K_DEMO, WIDTH, HEIGHT, supersample=2)
    coverage = image.coverage[0][..., None]
    rgb = image.rgb + (1.0 - coverage) * procedural_background(WIDTH, HEIGHT, rng)
    return SyntheticFrame(rgb=(rgb * 255).round().astype(np.uint8), mask=coverage[..., 0] >= 0.5,
                          pose=pose)


class RosLink:
    """A camera node and a listener node on one executor: what one sends, the other receives."""

    def __init__(self):
        import rclpy
        from geometry_msgs.msg import PoseStamped
        from rclpy.qos import QoSDurabilityPolicy, QoSProfile, QoSReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image

        self._rclpy = rclpy
        rclpy.init()
        qos = QoSProfile(depth=5, reliability=QoSReliabilityPolicy.RELIABLE,
                         durability=QoSDurabilityPolicy.TRANSIENT_LOCAL)
        self.camera = rclpy.create_node('demo_camera')
        self.listener = rclpy.create_node('demo_listener')
        self.received: dict[str, object] = {}
        topics = {'image': ('/demo/camera/image_raw', Image),
                  'camera_info': ('/demo/camera/camera_info', CameraInfo),
                  'pose': ('/demo/ground_truth/demo_object/pose', PoseStamped)}
        self.publishers = {key: self.camera.create_publisher(kind, name, qos)
                           for key, (name, kind) in topics.items()}
        for key, (name, kind) in topics.items():
            self.listener.create_subscription(kind, name, self._store(key), qos)
        self.executor = rclpy.executors.SingleThreadedExecutor()
        self.executor.add_node(self.camera)
        self.executor.add_node(self.listener)

    def _store(self, key: str):
        def callback(msg):
            self.received[key] = msg
        return callback

    def send_and_receive(self, messages: dict[str, object], timeout_s: float = 10.0) -> dict:
        self.received = {}
        deadline = time.monotonic() + timeout_s
        while any(p.get_subscription_count() == 0 for p in self.publishers.values()):
            if time.monotonic() > deadline:
                raise TimeoutError('the listener node was not discovered over DDS')
            self.executor.spin_once(timeout_sec=0.05)
        for key, msg in messages.items():
            self.publishers[key].publish(msg)
        while len(self.received) < len(messages):
            if time.monotonic() > deadline:
                raise TimeoutError(f'received only {sorted(self.received)} over DDS')
            self.executor.spin_once(timeout_sec=0.05)
        return self.received

    def close(self) -> None:
        self.executor.shutdown()
        self.camera.destroy_node()
        self.listener.destroy_node()
        self._rclpy.try_shutdown()


def pose_errors(R_e: np.ndarray, t_e: np.ndarray, R_g: np.ndarray, t_g: np.ndarray,
                model: ObjectModel, points: np.ndarray, K: np.ndarray, prefix: str) -> dict:
    """The metrics of one estimate, keyed ``<prefix>_<metric>`` (degrees, millimetres, pixels)."""
    return {f'{prefix}_{key}': value for key, value in {
        'rot_err_deg': np.rad2deg(metrics.rotation_error(R_e, R_g)),
        'trans_err_mm': 1000 * metrics.translation_error(t_e, t_g),
        'add_mm': 1000 * metrics.add(R_e, t_e, R_g, t_g, points),
        'mssd_mm': 1000 * metrics.mssd(R_e, t_e, R_g, t_g, points, model.symmetries),
        'mspd_px': metrics.mspd(R_e, t_e, R_g, t_g, K, points, model.symmetries),
        'speed': metrics.speed_score(R_e, t_e, R_g, t_g),
    }.items()}


def run_synthetic(model: ObjectModel, n_frames: int, rng: np.random.Generator,
                  out_dir: Path) -> dict:
    """Send frames over DDS, then refine a 15 deg / 10 % start against each received frame with
    the default optimizer (the object's mask plays the upstream segmenter's)."""
    from std_msgs.msg import Header

    from pose_node.ros.conversions import (camera_info_msg_to_camera, camera_to_camera_info_msg,
                                           image_msg_to_rgb, msg_to_pose, pose_stamped_msg,
                                           rgb_to_image_msg)

    scene = RaycastScene([model])
    points = model.sample_points(2000, rng)
    device = torch.device('cpu')
    mesh = RenderMesh.from_model(model, device, max_faces=RENDER_MAX_FACES)
    renderer = make_renderer('soft', device)
    link = RosLink()
    rows = []
    try:
        for index in range(n_frames):
            frame = render_synthetic_frame(scene, rng)
            header = Header(frame_id='demo_camera_optical_frame')
            header.stamp.sec, header.stamp.nanosec = 1_700_000_000 + index, 0
            started = time.monotonic()
            received = link.send_and_receive({
                'image': rgb_to_image_msg(frame.rgb, header, encoding='bgr8'),
                'camera_info': camera_to_camera_info_msg(K_DEMO, WIDTH, HEIGHT, header),
                'pose': pose_stamped_msg(frame.pose, header)})
            latency_ms = (time.monotonic() - started) * 1000
            rgb = (image_msg_to_rgb(received['image']) * 255).round().astype(np.uint8)
            camera = camera_info_msg_to_camera(received['camera_info'], use_rectified=True)
            true_pose = msg_to_pose(received['pose'].pose)
            start_pose = perturbed_start(true_pose, START_ROT_DEG, START_TRANS_FRAC, rng)
            case = crop_case(f'demo/{index}', model, rgb.astype(np.float32) / 255, frame.mask,
                             np.zeros_like(frame.mask), camera.K, true_pose, start_pose,
                             CROP_SIZE, 1.0)
            result = refine(make_observation(case.image, case.mask, case.K, case.ignore,
                                             device=device),
                            mesh, start_pose[None], renderer, optimizer=make_optimizer('default'))
            refined_pose = result.pose.double().numpy()
            R_g, t_g = true_pose[:3, :3], true_pose[:3, 3]
            row = {
                'image_max_abs_diff': int(np.abs(rgb.astype(int) - frame.rgb).max()),
                'K_max_abs_diff': float(np.abs(camera.K - K_DEMO).max()),
                'pose_max_abs_diff': float(np.abs(true_pose - frame.pose).max()),
                'latency_ms': latency_ms,
                'refine_ms': result.elapsed_ms,
                'score': result.score,
                **pose_errors(start_pose[:3, :3], start_pose[:3, 3], R_g, t_g, model, points,
                              camera.K, 'start'),
                **pose_errors(refined_pose[:3, :3], refined_pose[:3, 3], R_g, t_g, model, points,
                              camera.K, 'refined'),
            }
            rows.append(row)
            print(f'frame {index}: DDS round trip {latency_ms:5.1f} ms, image diff '
                  f'{row["image_max_abs_diff"]}, pose diff {row["pose_max_abs_diff"]:.0e} | '
                  f'start {row["start_rot_err_deg"]:.1f} deg {row["start_trans_err_mm"]:.1f} mm '
                  f'ADD {row["start_add_mm"]:.1f} mm -> refined {row["refined_rot_err_deg"]:.3f} '
                  f'deg {row["refined_trans_err_mm"]:.2f} mm ADD {row["refined_add_mm"]:.2f} mm '
                  f'MSSD {row["refined_mssd_mm"]:.2f} mm MSPD {row["refined_mspd_px"]:.2f} px '
                  f'SPEED {row["refined_speed"]:.4f} IoU {result.score:.3f} '
                  f'in {result.elapsed_ms:.0f} ms')
        overlay = rgb.copy()
        for pose, color in ((start_pose, START_COLOR), (true_pose, TRUE_COLOR),
                            (refined_pose, REFINED_COLOR)):
            silhouette = scene.render(pose[None], camera.K, WIDTH, HEIGHT).coverage[0] >= 0.5
            draw_mask_contour(overlay, silhouette, color, thickness=1 if color is REFINED_COLOR
                              else 2)
        draw_axes(overlay, camera.K, refined_pose[:3, :3], refined_pose[:3, 3],
                  length=0.5 * model.diameter)
        path = out_dir / 'demo_overlay.png'
        cv2.imwrite(str(path), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
        print(f'wrote {path} (red: the 15 deg / 10 % start, green: truth, yellow: refined)')
    finally:
        link.close()
    return {key: float(np.median([row[key] for row in rows])) for key in rows[0]}


def run_lmo(root: Path, out_dir: Path) -> dict:
    """Overlay the ground truth of the first dev frame; compare projected boxes with BOP's."""
    dataset = BopDataset(root)
    image_id = dataset.splits()['dev'][0]
    frame = next(dataset.frames([image_id]))
    models = [dataset.load_model(inst.obj_id) for inst in frame.instances]
    rgb = frame.load_rgb()
    height, width = rgb.shape[:2]
    poses = np.stack([make_pose(inst.R, inst.t) for inst in frame.instances])
    rendered = RaycastScene(models).render(poses, frame.K, width, height)
    overlay = rgb.copy()
    box_errors = []
    for index, (inst, model) in enumerate(zip(frame.instances, models)):
        box_errors.append(np.abs(projected_box(model, poses[index], frame.K)
                                 - np.asarray(inst.bbox_obj)).max())
        visible = rendered.labels == index + 1
        unoccluded = RaycastScene([model]).render(poses[index][None], frame.K, width, height)
        print(f'  LM-O image {image_id}, obj {inst.obj_id:2d}: projected box vs bbox_obj '
              f'{box_errors[-1]:.1f} px, visible fraction rendered '
              f'{visible.sum() / max((unoccluded.coverage[0] >= 0.5).sum(), 1):.2f} vs BOP '
              f'{inst.visib_fract:.2f}')
        draw_mask_contour(overlay, visible, TRUE_COLOR)
        draw_axes(overlay, frame.K, inst.R, inst.t, length=0.4 * model.diameter)
    path = out_dir / 'demo_lmo_overlay.png'
    cv2.imwrite(str(path), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
    print(f'wrote {path} (ground-truth visible contours and axes on a real LM-O frame; the '
          'visible fractions differ where objects BOP does not annotate occlude)')
    return {'lmo_image_id': image_id, 'lmo_box_err_px_max': float(max(box_errors))}


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    model = load_demo_object()
    print(f'demo object: {len(model.faces)} faces, diameter {1000 * model.diameter:.1f} mm')
    summary = run_synthetic(model, args.frames, rng, args.out)
    lmo_root = args.lmo_root or default_lmo_root()
    if lmo_root.is_dir():
        summary |= run_lmo(lmo_root, args.out)
    else:
        print(f'LM-O data not found at {lmo_root}: skipping the real-frame overlay')
    print(f'demo: frames={args.frames} dds_latency_ms={summary["latency_ms"]:.1f} '
          f'image_max_abs_diff={summary["image_max_abs_diff"]:.0f} '
          f'start_rot_err_deg={summary["start_rot_err_deg"]:.1f} '
          f'start_add_mm={summary["start_add_mm"]:.1f} '
          f'median_rot_err_deg={summary["refined_rot_err_deg"]:.3f} '
          f'median_trans_err_mm={summary["refined_trans_err_mm"]:.2f} '
          f'median_refine_ms={summary["refine_ms"]:.0f} '
          f'lmo_box_err_px_max={summary.get("lmo_box_err_px_max", float("nan")):.1f}')
    return 0

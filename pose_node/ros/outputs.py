"""What the node publishes for the accepted estimates of one frame, as messages: PoseStamped, TF,
Detection3DArray, RViz markers and the debug image. Poses object-to-camera (4, 4), metres, in the
image's optical frame (``header.frame_id``)."""
import numpy as np
from builtin_interfaces.msg import Duration
from std_msgs.msg import ColorRGBA, Header
from tf2_msgs.msg import TFMessage
from vision_msgs.msg import Detection3D, Detection3DArray, ObjectHypothesisWithPose
from visualization_msgs.msg import Marker

from pose_node.camera import project_points
from pose_node.geometry import transform_points
from pose_node.mesh import ObjectModel
from pose_node.overlay import draw_axes, draw_mask_contour
from pose_node.render.raycast import RaycastScene
from pose_node.ros.conversions import pose_to_msg, transform_stamped_msg

MAX_DEPTH_M = 50.0
"""Estimates farther than this from the camera are treated as garbage, not published."""
MARKER_LIFETIME_S = 1.0
CONTOUR_COLOR = (255, 230, 0)
LABEL_COLOR = ColorRGBA(r=1.0, g=1.0, b=1.0, a=1.0)


def publishable(pose: np.ndarray, score: float, threshold: float, diameter: float) -> bool:
    """Whether an estimate may be published: pose (4, 4) finite with a proper rotation, origin
    between half the object's ``diameter`` and MAX_DEPTH_M in front of the camera (metres), and
    a finite ``score`` >= ``threshold``."""
    pose = np.asarray(pose, np.float64)
    if pose.shape != (4, 4) or not np.all(np.isfinite(pose)) or not np.isfinite(score):
        return False
    R = pose[:3, :3]
    if not np.allclose(R @ R.T, np.eye(3), atol=1e-4) or np.linalg.det(R) <= 0:
        return False
    return bool(0.5 * diameter < pose[2, 3] < MAX_DEPTH_M and score >= threshold)


def object_frame_id(tf_prefix: str, frame_id: str) -> str:
    return f'{tf_prefix}{frame_id}'


def tf_message(poses: dict[str, np.ndarray], child_frames: dict[str, str],
               header: Header) -> TFMessage:
    """TF of every object frame ``child_frames[name]`` at ``poses[name]`` in ``header``'s frame."""
    return TFMessage(transforms=[transform_stamped_msg(pose, header, child_frames[name])
                                 for name, pose in poses.items()])


def detection_msg(name: str, pose: np.ndarray, score: float, model: ObjectModel,
                  header: Header) -> Detection3D:
    """Detection3D of one object: class id = name, score = IoU, pose of the object frame; box of
    the mesh's axis-aligned extents (metres) centred at the box centre in the camera frame."""
    hypothesis = ObjectHypothesisWithPose()
    hypothesis.hypothesis.class_id = name
    hypothesis.hypothesis.score = float(score)
    hypothesis.pose.pose = pose_to_msg(pose)
    box_pose = np.array(pose, np.float64)
    box_pose[:3, 3] = transform_points(pose, model.bbox_centre[None])[0]
    detection = Detection3D(header=header, results=[hypothesis], id=name)
    detection.bbox.center = pose_to_msg(box_pose)
    detection.bbox.size.x, detection.bbox.size.y, detection.bbox.size.z = (
        float(v) for v in model.bbox_size)
    return detection


def detections_msg(detections: list[Detection3D], header: Header) -> Detection3DArray:
    return Detection3DArray(header=header, detections=detections)


def object_markers(index: int, name: str, pose: np.ndarray, score: float, model: ObjectModel,
                   mesh_uri: str, unit_scale: float, header: Header) -> list[Marker]:
    """The mesh (MESH_RESOURCE at ``mesh_uri``, scaled from file units by ``unit_scale``) and a
    label above it (TEXT_VIEW_FACING: name and score), ids 2 * index and 2 * index + 1."""
    lifetime = Duration(sec=int(MARKER_LIFETIME_S),
                        nanosec=int(MARKER_LIFETIME_S % 1 * 1e9))
    mesh = Marker(header=header, ns='pose_node', id=2 * index, type=Marker.MESH_RESOURCE,
                  action=Marker.ADD, pose=pose_to_msg(pose), lifetime=lifetime,
                  mesh_resource=mesh_uri, mesh_use_embedded_materials=True,
                  color=ColorRGBA(r=0.0, g=0.0, b=0.0, a=0.0))
    mesh.scale.x = mesh.scale.y = mesh.scale.z = float(unit_scale)
    label_pose = np.eye(4)
    label_pose[:3, 3] = transform_points(pose, model.bbox_centre[None])[0]
    # Camera optical frame: -y is up in the image, so the label sits above the object there.
    label_pose[1, 3] -= 0.6 * model.diameter
    label = Marker(header=header, ns='pose_node', id=2 * index + 1, type=Marker.TEXT_VIEW_FACING,
                   action=Marker.ADD, pose=pose_to_msg(label_pose), lifetime=lifetime,
                   text=f'{name} {score:.2f}', color=LABEL_COLOR)
    label.scale.z = float(0.25 * model.diameter)
    return [mesh, label]


def silhouette(scene: RaycastScene, pose: np.ndarray, K: np.ndarray, width: int,
               height: int) -> np.ndarray:
    """(H, W) bool: the object of the one-model ``scene`` at ``pose``; only the projected box of
    its vertices is ray-cast (a few ms instead of a full frame)."""
    mask = np.zeros((height, width), bool)
    uv = project_points(K, transform_points(pose, scene.models[0].vertices))
    low = np.clip(np.floor(uv.min(axis=0)).astype(int) - 1, 0, [width, height])
    high = np.clip(np.ceil(uv.max(axis=0)).astype(int) + 2, 0, [width, height])
    if np.any(high <= low):
        return mask
    K_box = np.array(K, np.float64)
    K_box[:2, 2] -= low
    box_width, box_height = high - low
    coverage = scene.render(pose[None], K_box, int(box_width), int(box_height)).coverage[0]
    mask[low[1]:high[1], low[0]:high[0]] = coverage >= 0.5
    return mask


def debug_image(rgb: np.ndarray, K: np.ndarray, poses: dict[str, np.ndarray],
                scenes: dict[str, RaycastScene], diameters: dict[str, float]) -> np.ndarray:
    """(H, W, 3) uint8 copy of ``rgb`` with each object's silhouette contour and axes drawn at
    ``poses[name]``; ``scenes[name]`` ray-casts that object alone."""
    height, width = rgb.shape[:2]
    drawn = np.ascontiguousarray(rgb).copy()
    for name, pose in poses.items():
        draw_mask_contour(drawn, silhouette(scenes[name], pose, K, width, height), CONTOUR_COLOR)
        draw_axes(drawn, K, pose[:3, :3], pose[:3, 3], length=0.5 * diameters[name])
    return drawn


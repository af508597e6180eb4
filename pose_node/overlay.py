"""Drawing poses onto images: silhouette contours and object axes (for the demo, the node's debug
image and reports). Images are (H, W, 3) uint8 RGB, drawn in place; colours are RGB tuples."""
import cv2
import numpy as np

from pose_node.camera import project_points


def draw_mask_contour(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int],
                      thickness: int = 2) -> None:
    """Outline the regions of ``mask`` (H, W), True/nonzero inside."""
    contours, _ = cv2.findContours(np.ascontiguousarray(mask, np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(image, contours, -1, color, thickness, lineType=cv2.LINE_AA)


def draw_axes(image: np.ndarray, K: np.ndarray, R: np.ndarray, t: np.ndarray, length: float,
              thickness: int = 2) -> None:
    """Object axes x (red), y (green), z (blue) of ``length`` metres at pose R (3, 3), t (3,) m."""
    points_model = np.vstack([np.zeros(3), np.eye(3) * length])
    points_cam = points_model @ np.asarray(R).T + np.asarray(t)
    if np.any(points_cam[:, 2] <= 0):
        return
    origin, *tips = project_points(np.asarray(K, np.float64), points_cam)
    for tip, color in zip(tips, [(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        cv2.line(image, _pixel(origin), _pixel(tip), color, thickness, lineType=cv2.LINE_AA)


def _pixel(uv: np.ndarray) -> tuple[int, int]:
    return int(round(float(uv[0]))), int(round(float(uv[1])))

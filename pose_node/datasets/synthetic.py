"""Building blocks of synthetic frames: procedural backgrounds, poses in view, photometric noise.

Images are (H, W, 3) float32 RGB in 0..1; poses are object-to-camera (4, 4) in metres.
"""
import cv2
import numpy as np

from pose_node.geometry import make_pose, random_rotations


def procedural_background(width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """A random colour gradient with blurred blobs of random colour, so no frame is trivially clean."""
    v, u = np.mgrid[0:height, 0:width] / max(width, height)
    low, slope = rng.uniform(0.2, 0.6, 3), rng.uniform(-0.3, 0.3, (2, 3))
    base = low + u[..., None] * slope[0] + v[..., None] * slope[1]
    blobs = np.zeros((height, width, 3), np.float32)
    for _ in range(int(25 * width * height / (640 * 480)) + 5):
        centre = (int(rng.integers(width)), int(rng.integers(height)))
        radius = int(rng.integers(4, 8 + max(width, height) // 10))
        cv2.circle(blobs, centre, radius, rng.uniform(-0.3, 0.3, 3).tolist(), -1)
    sigma = max(width, height) / 100
    return np.clip(base + cv2.GaussianBlur(blobs, (0, 0), sigma), 0, 1).astype(np.float32)


def random_pose_in_view(rng: np.random.Generator, distance_range: tuple[float, float],
                        lateral_frac: float = 0.1) -> np.ndarray:
    """(4, 4) pose: uniform random rotation, depth in ``distance_range`` metres, lateral offsets up
    to ``lateral_frac`` of the depth (keeps the object well inside a typical field of view)."""
    distance = rng.uniform(*distance_range)
    lateral = rng.uniform(-lateral_frac, lateral_frac, 2) * distance
    return make_pose(random_rotations(1, rng)[0], np.array([lateral[0], lateral[1], distance]))


def photometric_noise(rgb: np.ndarray, rng: np.random.Generator, gain_range=(0.75, 1.25),
                      shading_amplitude: float = 0.25, noise_sigma: float = 0.02) -> np.ndarray:
    """``rgb`` (H, W, 3) with a random per-channel gain, a smooth multiplicative illumination field
    (amplitude ``shading_amplitude``) and Gaussian pixel noise: what real lighting and a real sensor
    do to scanned vertex colours, so that a colour term cannot match exactly."""
    height, width = rgb.shape[:2]
    coarse = rng.uniform(-1, 1, (4, 4)).astype(np.float32)
    field = 1 + shading_amplitude * cv2.resize(coarse, (width, height),
                                               interpolation=cv2.INTER_CUBIC)
    gain = rng.uniform(*gain_range, 3)
    noisy = rgb * gain * field[..., None] + rng.normal(0, noise_sigma, rgb.shape)
    return np.clip(noisy, 0, 1).astype(np.float32)

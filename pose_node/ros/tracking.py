"""Tracking state between frames: which prior poses to hand to the pipeline, and when to detect
anew. Plain Python; poses object-to-camera (4, 4), metres."""
import numpy as np


class TrackingState:
    """Priors are the poses published for the previous frame; an object that was not published
    has none and is detected anew. Every ``redetect_interval`` tracked frames (0: never) all
    objects are detected anew."""

    def __init__(self):
        self.priors: dict[str, np.ndarray] = {}
        self.frames_since_detection = 0

    def priors_for_frame(self, tracking: bool, redetect_interval: int) -> dict[str, np.ndarray]:
        """The prior poses for the next frame (empty: detect every object)."""
        due = redetect_interval > 0 and self.frames_since_detection >= redetect_interval
        if not tracking or due:
            return {}
        return dict(self.priors)

    def update(self, published: dict[str, np.ndarray], used_priors: dict[str, np.ndarray]) -> None:
        """Record the frame's ``published`` poses; ``used_priors`` were the frame's priors."""
        self.frames_since_detection = self.frames_since_detection + 1 if used_priors else 0
        self.priors = {name: np.array(pose, np.float64) for name, pose in published.items()}

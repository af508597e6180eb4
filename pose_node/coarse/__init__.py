"""Coarse pose: rotation and translation hypotheses of one object from its crop, before refinement.

Estimators: training-free template matching (:mod:`.templates`) and the two-branch regressor
(:mod:`.regressor`). Both follow :class:`CoarseEstimator`.
"""
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from pose_node.crop import Crop


@dataclass
class Hypotheses:
    """K_h pose hypotheses of one object, best first.

    R (K_h, 3, 3), t (K_h, 3) metres: object-to-camera in the full image's camera frame (a crop's
    K differs from the image's only by an affine map of pixels, so the frame is the same);
    scores (K_h,) the estimator's own confidence, higher is better; source: which estimator.
    """

    R: np.ndarray
    t: np.ndarray
    scores: np.ndarray
    source: str

    def __len__(self) -> int:
        return int(self.R.shape[0])


class CoarseEstimator(Protocol):
    """Anything that proposes poses of one known object from a crop."""

    def hypotheses(self, crop: Crop, top_k: int) -> Hypotheses:
        """At most ``top_k`` hypotheses from ``crop`` (its image, visible mask and K)."""

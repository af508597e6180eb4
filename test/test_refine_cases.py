"""Refinement benchmark cases: crops, masks and intrinsics agree with the truth they come from."""
import numpy as np
import pytest

from pose_node.datasets.refine_cases import lmo_cases, synthetic_cases
from pose_node.geometry import rotation_angle_between
from pose_node.render.raycast import RaycastScene
from pose_node.resources import load_demo_object


def silhouette(case, supersample=1) -> np.ndarray:
    size = case.mask.shape[0]
    return RaycastScene([case.model]).render(case.true_pose[None], case.K, size, size,
                                             supersample).coverage[0] >= 0.5


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return (a & b).sum() / (a | b).sum()


def test_synthetic_cases_mask_matches_the_truth_and_start_is_perturbed_exactly():
    rng = np.random.default_rng(3)
    cases = list(synthetic_cases(load_demo_object(), 3, rot_deg=15, trans_frac=0.1, size=64, rng=rng))
    for case in cases:
        assert case.image.shape == (64, 64, 3) and case.mask.shape == (64, 64)
        assert iou(silhouette(case), case.mask >= 0.5) > 0.97
        true_R, start_R = case.true_pose[:3, :3], case.start_pose[:3, :3]
        assert np.rad2deg(rotation_angle_between(start_R, true_R)) == pytest.approx(15, abs=1e-6)
        moved = np.linalg.norm(case.start_pose[:3, 3] - case.true_pose[:3, 3])
        assert moved == pytest.approx(0.1 * np.linalg.norm(case.true_pose[:3, 3]), rel=1e-9)
        assert not case.ignore.any()
        # The object occupies a good part of the crop but is not cut by it.
        assert 0.05 < (case.mask >= 0.5).mean() < 0.8
        assert not (case.mask[0].any() or case.mask[-1].any() or case.mask[:, 0].any())


def test_lmo_cases_masks_are_visible_parts_of_the_true_silhouette(lmo):
    rng = np.random.default_rng(0)
    cases = list(lmo_cases(lmo, lmo.splits()['dev'][:1], rot_deg=15, trans_frac=0.1, size=96,
                           rng=rng))
    assert len(cases) >= 5 and all(case.visib_fract >= 0.3 for case in cases)
    for case in cases:
        observed = case.mask >= 0.5
        assert observed.sum() > 50
        covered = silhouette(case)
        # The visible mask lies inside the full silhouette (crop resampling blurs its edge).
        assert (observed & covered).sum() / observed.sum() > 0.95
        assert (observed & case.ignore).sum() / observed.sum() < 0.05
        # The rest of the silhouette is hidden by annotated objects or, outside BOP's
        # bbox_visib, by unannotated ones: ignored, so that the truth scores an IoU near 1.
        assert (covered & ~observed & ~case.ignore).sum() / covered.sum() < 0.05

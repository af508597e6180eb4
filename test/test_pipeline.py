"""The pipeline API on ray-cast frames of the demo object: tracking from a prior, detection through
a coarse estimator, and the input checks."""
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from pose_node import metrics
from pose_node.coarse import Hypotheses
from pose_node.crop import Segment, box_foreground, mask_box
from pose_node.datasets.refine_cases import SYNTHETIC_K, perturbed_start
from pose_node.datasets.synthetic import procedural_background
from pose_node.geometry import make_pose, random_rotations
from pose_node.pipeline import Pipeline, PipelineConfig, plausible_pose
from pose_node.render.raycast import RaycastScene
from pose_node.resources import load_demo_object

WIDTH, HEIGHT = 640, 480


@pytest.fixture(scope='module')
def model():
    return load_demo_object()


@pytest.fixture(scope='module')
def pipeline(model):
    torch.set_num_threads(1)
    return Pipeline([model], torch.device('cpu'))


@pytest.fixture(scope='module')
def frame(model):
    """A frame (image (H, W, 3) float32, visible mask (H, W), true pose (4, 4))."""
    rng = np.random.default_rng(3)
    pose = make_pose(random_rotations(1, rng)[0], np.array([0.03, -0.02, 0.5]))
    rendered = RaycastScene([model]).render(pose[None], SYNTHETIC_K, WIDTH, HEIGHT, supersample=2)
    coverage = rendered.coverage[0]
    image = rendered.rgb * coverage[..., None] \
        + (1 - coverage[..., None]) * procedural_background(WIDTH, HEIGHT, rng)
    return image.astype(np.float32), coverage, pose


class PerturbedTruth:
    """A coarse estimator that proposes the truth turned by a known angle (the protocol's
    contract without a trained model)."""

    def __init__(self, pose: np.ndarray, degrees: float):
        self.start = perturbed_start(pose, degrees, 0.05, np.random.default_rng(0))

    def hypotheses(self, crop, top_k):
        return Hypotheses(R=self.start[None, :3, :3], t=self.start[None, :3, 3],
                          scores=np.ones(1), source='test')


def errors(estimate, pose) -> tuple[float, float]:
    """Rotation error in degrees and translation error in mm."""
    return (float(np.rad2deg(metrics.rotation_error(estimate.R, pose[:3, :3]))),
            1e3 * float(np.linalg.norm(estimate.t - pose[:3, 3])))


def test_tracking_from_a_prior_pose_converges(pipeline, model, frame):
    image, mask, pose = frame
    prior = perturbed_start(pose, 4.0, 0.02, np.random.default_rng(1))
    estimates = pipeline.estimate(image, SYNTHETIC_K, masks={model.name: mask},
                                  prior_poses={model.name: prior})
    estimate = estimates[model.name]
    rot_deg, trans_mm = errors(estimate, pose)
    assert estimate.source == 'prior'
    assert rot_deg < 0.5 and trans_mm < 2.0
    assert estimate.score > 0.95
    assert {'segment', 'crop', 'coarse', 'refine'} <= set(estimate.timings_ms)


def test_detection_refines_the_coarse_hypotheses(model, frame):
    image, mask, pose = frame
    pipeline = Pipeline([model], torch.device('cpu'),
                        coarse={model.name: PerturbedTruth(pose, 12.0)})
    estimate = pipeline.estimate((255 * image).astype(np.uint8), SYNTHETIC_K,
                                 masks={model.name: mask > 0.5})[model.name]
    rot_deg, trans_mm = errors(estimate, pose)
    assert estimate.source == 'test'
    assert rot_deg < 1.0 and trans_mm < 3.0


def test_ignored_pixels_let_a_hidden_part_count_as_unknown(model, frame):
    image, mask, pose = frame
    cols = np.nonzero(mask.any(axis=0))[0]
    hidden = np.zeros_like(mask, bool)
    hidden[:, int(np.percentile(cols, 60)):] = True  # an occluder the masks do not name
    occluded = np.where(hidden[..., None], 0.5, image).astype(np.float32)
    visible = {model.name: (mask > 0.5) & ~hidden}
    pipeline = Pipeline([model], torch.device('cpu'),
                        coarse={model.name: PerturbedTruth(pose, 12.0)})
    told = pipeline.estimate(occluded, SYNTHETIC_K, masks=visible, ignore=hidden)[model.name]
    untold = pipeline.estimate(occluded, SYNTHETIC_K, masks=visible)[model.name]
    told_rot, told_trans = errors(told, pose)
    untold_rot, untold_trans = errors(untold, pose)
    assert told_rot < 1.0 and told_trans < 3.0
    # Without being told, the hidden part is taken for background and the pose shrinks onto it.
    assert untold_rot > 3 * told_rot or untold_trans > 3 * told_trans


class GivenSegments:
    """A segmenter (the protocol) that finds the given segments in any image."""

    def __init__(self, segments: dict[str, Segment]):
        self.segments = segments

    def segment(self, image):
        return self.segments


def test_a_segmenters_hidden_part_is_unknown_where_no_mask_claims_it(model, frame):
    image, mask, pose = frame
    truth = mask > 0.5
    cols = np.nonzero(truth.any(axis=0))[0]
    band = np.zeros_like(truth)
    band[:, int(np.percentile(cols, 60)):] = True  # an occluder no mask names
    occluded = np.where(band[..., None], 0.5, image).astype(np.float32)
    visible, hidden = truth & ~band, truth & band
    coarse = {model.name: PerturbedTruth(pose, 12.0)}

    def segmented(hidden_part):
        segmenter = GivenSegments({model.name: Segment(visible.astype(np.float32), 0.9,
                                                       hidden_part)})
        pipeline = Pipeline([model], torch.device('cpu'), segmenter=segmenter, coarse=coarse)
        return pipeline.estimate(occluded, SYNTHETIC_K)[model.name]

    told = segmented(hidden)
    rot_deg, trans_mm = errors(told, pose)
    assert rot_deg < 1.0 and trans_mm < 3.0
    given = Pipeline([model], torch.device('cpu'), coarse=coarse).estimate(
        occluded, SYNTHETIC_K, masks={model.name: visible}, hidden={model.name: hidden})
    np.testing.assert_allclose(given[model.name].pose, told.pose, atol=1e-9)
    # A hidden part over the object's own visible mask is not made unknown.
    np.testing.assert_allclose(segmented(hidden | visible).pose, told.pose, atol=1e-9)
    untold_rot, untold_trans = errors(segmented(None), pose)
    assert untold_rot > 3 * rot_deg or untold_trans > 3 * trans_mm
    with pytest.raises(ValueError, match='hidden part'):
        Pipeline([model], torch.device('cpu'), coarse=coarse).estimate(
            occluded, SYNTHETIC_K, masks={model.name: visible}, hidden={model.name: hidden[1:]})


class RecordingCoarse(PerturbedTruth):
    """PerturbedTruth that keeps the crops it was given."""

    def __init__(self, pose: np.ndarray, degrees: float):
        super().__init__(pose, degrees)
        self.crops = []

    def hypotheses(self, crop, top_k):
        self.crops.append(crop)
        return super().hypotheses(crop, top_k)


def test_a_segmenters_unsure_band_is_unknown_but_not_part_of_the_coarse_crop(model, frame):
    image, mask, pose = frame
    truth = mask > 0.5
    cols = np.nonzero(truth.any(axis=0))[0]
    band = np.zeros_like(truth)
    band[:, int(np.percentile(cols, 60)):] = True
    occluded = np.where(band[..., None], 0.5, image).astype(np.float32)
    visible, hidden = truth & ~band, truth & band
    ring = cv2.dilate(hidden.astype(np.uint8), np.ones((15, 15), np.uint8)).astype(bool) \
        & ~hidden & ~visible

    def estimated(segment: Segment):
        coarse = RecordingCoarse(pose, 12.0)
        estimate = Pipeline([model], torch.device('cpu'), segmenter=GivenSegments(
            {model.name: segment}), coarse={model.name: coarse}).estimate(
            occluded, SYNTHETIC_K)[model.name]
        return estimate, coarse.crops[0]

    with_band, crop = estimated(Segment(visible.astype(np.float32), 0.9, hidden, ring))
    without_band, plain_crop = estimated(Segment(visible.astype(np.float32), 0.9, hidden))
    _, widened_crop = estimated(Segment(visible.astype(np.float32), 0.9, hidden | ring))
    np.testing.assert_allclose(crop.box, plain_crop.box)
    assert widened_crop.box[2] > crop.box[2] + 10
    assert crop.ignore.sum() > plain_crop.ignore.sum()
    # The band is left out of the refinement as an ignored region given with the masks is.
    given = Pipeline([model], torch.device('cpu'), coarse={model.name: PerturbedTruth(pose, 12.0)}
                     ).estimate(occluded, SYNTHETIC_K, masks={model.name: visible},
                                hidden={model.name: hidden}, ignore=ring)[model.name]
    np.testing.assert_allclose(with_band.pose, given.pose, atol=1e-9)
    assert not np.allclose(with_band.pose, without_band.pose, atol=1e-9)


def test_a_box_without_mask_is_segmented_by_grabcut_and_refined(model, frame):
    image, mask, pose = frame
    truth = mask > 0.5
    box = mask_box(truth)
    found = box_foreground(image, box)
    assert (found & truth).sum() / (found | truth).sum() > 0.95
    pipeline = Pipeline([model], torch.device('cpu'),
                        coarse={model.name: PerturbedTruth(pose, 12.0)})
    estimate = pipeline.estimate(image, SYNTHETIC_K, boxes={model.name: box})[model.name]
    rot_deg, trans_mm = errors(estimate, pose)
    assert rot_deg < 1.0 and trans_mm < 5.0  # 1 % of the distance: GrabCut's edge is not exact
    with pytest.raises(ValueError, match='box'):
        pipeline.estimate(image, SYNTHETIC_K, boxes={model.name: [10, 10, 0, 5]})


def test_objects_of_one_frame_are_refined_in_batches_by_optimizer(model):
    """Three copies of the demo object apart in one frame: two tracked from priors (one batch),
    one detected (another batch)."""
    names = ('left', 'middle', 'right')
    models = [replace(model, name=name) for name in names]
    rng = np.random.default_rng(4)
    poses = [make_pose(rotation, np.array([x, 0.01, 0.6]))
             for rotation, x in zip(random_rotations(3, rng), (-0.14, 0.0, 0.14))]
    rendered = RaycastScene(models).render(np.stack(poses), SYNTHETIC_K, WIDTH, HEIGHT,
                                           supersample=2)
    covered = rendered.coverage.sum(axis=0)[..., None]
    image = rendered.rgb + (1 - covered) * procedural_background(WIDTH, HEIGHT, rng)
    masks = dict(zip(names, rendered.coverage))
    pipeline = Pipeline(models, torch.device('cpu'),
                        coarse={'right': PerturbedTruth(poses[2], 12.0)})
    priors = {name: perturbed_start(pose, 4.0, 0.02, np.random.default_rng(i))
              for i, (name, pose) in enumerate(zip(names[:2], poses[:2]))}
    estimates = pipeline.estimate(image.astype(np.float32), SYNTHETIC_K, masks=masks,
                                  prior_poses=priors)
    assert set(estimates) == set(names)
    for name, pose in zip(names, poses):
        rot_deg, trans_mm = errors(estimates[name], pose)
        assert rot_deg < 2.0 and trans_mm < 3.0, (name, rot_deg, trans_mm)
        # The same object estimated alone, the others' masks as ignored pixels: the same pose.
        others = sum(mask for other, mask in masks.items() if other != name) > 0.5
        alone = pipeline.estimate(image.astype(np.float32), SYNTHETIC_K, masks={name: masks[name]},
                                  prior_poses={name: priors[name]} if name in priors else None,
                                  ignore=others)[name]
        np.testing.assert_allclose(estimates[name].pose, alone.pose, atol=2e-5)
    assert [estimates[name].source for name in names] == ['prior', 'prior', 'test']
    refine_ms = [estimates[name].timings_ms['refine'] for name in names]
    assert refine_ms[0] == refine_ms[1] != refine_ms[2]


def test_objects_without_mask_or_start_are_left_out(pipeline, model, frame):
    image, mask, _ = frame
    assert pipeline.estimate(image, SYNTHETIC_K) == {}
    # a mask but neither a coarse estimator nor a prior: nothing to refine
    assert pipeline.estimate(image, SYNTHETIC_K, masks={model.name: mask}) == {}
    tiny = np.zeros_like(mask)
    tiny[100, 100:105] = 1
    assert pipeline.estimate(image, SYNTHETIC_K, masks={model.name: tiny},
                             prior_poses={model.name: frame[2]}) == {}


@pytest.mark.parametrize('bad_image, message', [
    (np.full((HEIGHT, WIDTH, 3), np.nan, np.float32), 'NaN'),
    (np.zeros((HEIGHT, WIDTH), np.float32), 'RGB'),
])
def test_malformed_images_are_rejected(pipeline, bad_image, message):
    with pytest.raises(ValueError, match=message):
        pipeline.estimate(bad_image, SYNTHETIC_K)


@pytest.mark.parametrize('K', [np.zeros((3, 3)), np.full((3, 3), np.nan), np.eye(2)])
def test_bad_intrinsics_are_rejected(pipeline, frame, K):
    with pytest.raises(ValueError, match='intrinsics'):
        pipeline.estimate(frame[0], K)


def test_mask_of_the_wrong_size_is_rejected(pipeline, model, frame):
    with pytest.raises(ValueError, match='shape'):
        pipeline.estimate(frame[0], SYNTHETIC_K, masks={model.name: np.ones((10, 10))})
    with pytest.raises(ValueError, match='ignore'):
        pipeline.estimate(frame[0], SYNTHETIC_K, ignore=np.ones((10, 10)))


def test_plausible_pose():
    diameter = 0.1
    assert plausible_pose(make_pose(np.eye(3), np.array([0.0, 0.0, 0.5])), diameter)
    assert not plausible_pose(make_pose(np.eye(3), np.array([0.0, 0.0, 0.04])), diameter)
    assert not plausible_pose(make_pose(np.eye(3), np.array([0.0, 0.0, -0.5])), diameter)
    assert not plausible_pose(make_pose(np.diag([1.0, 1.0, -1.0]), np.array([0, 0, 0.5])),
                              diameter)
    bad = make_pose(np.eye(3), np.array([0.0, 0.0, 0.5]))
    bad[0, 0] = np.nan
    assert not plausible_pose(bad, diameter)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError):
        PipelineConfig(crop_size=8)
    with pytest.raises(ValueError):
        PipelineConfig(hypotheses=0)
    with pytest.raises(ValueError):
        PipelineConfig(optimizer='newton')
    with pytest.raises(TypeError):
        PipelineConfig(optimizer_overrides={'no_such_field': 1})

"""Template matching: bank geometry, matching accuracy on ray-cast crops, the on-disk cache."""
from dataclasses import replace

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from pose_node.coarse import templates
from pose_node.coarse.templates import TemplateMatcher, TemplateSettings, cached_bank, \
    hypothesis_poses, occlusion_aware_iou, rotation_onto_ray, settings_key, suppress_similar, \
    view_rotations
from pose_node.crop import Crop, cut_crop, extend_box, mask_box
from pose_node.datasets.refine_cases import SYNTHETIC_K, synthetic_cases
from pose_node.geometry import make_pose
from pose_node.metrics import rotation_error
from pose_node.render.raycast import RaycastScene
from pose_node.resources import load_demo_object

# Small enough to build in about a second: 162 views x 18 rolls (20 deg apart).
FAST = TemplateSettings(subdivisions=2, inplane=18, size=32, render_size=64, supersample=1)
CPU = torch.device('cpu')


@pytest.fixture(scope='module')
def demo():
    return load_demo_object()


@pytest.fixture(scope='module')
def matcher(demo, tmp_path_factory):
    return TemplateMatcher.from_model(demo, cache_dir=tmp_path_factory.mktemp('bank'),
                                      settings=FAST, device=CPU)


def degrees(R_a, R_b) -> float:
    return float(np.rad2deg(rotation_error(R_a, R_b)))


def crop_of_pose(model, pose: np.ndarray, size: int = 128) -> Crop:
    """The crop the pipeline would cut around ``model`` ray-cast at ``pose`` in a 640x480 frame."""
    coverage = RaycastScene([model]).render(pose[None], SYNTHETIC_K, 640, 480).coverage[0]
    rgb = np.repeat(coverage[..., None], 3, axis=2).astype(np.float32)
    return cut_crop(rgb, SYNTHETIC_K, mask_box(coverage), size, mask=coverage)


def test_view_rotations_look_at_the_object_from_every_icosphere_vertex():
    rotations = view_rotations(subdivisions=1, inplane=4)
    assert rotations.shape == (42 * 4, 3, 3)
    np.testing.assert_allclose(rotations @ rotations.transpose(0, 2, 1),
                               np.broadcast_to(np.eye(3), rotations.shape), atol=1e-9)
    np.testing.assert_allclose(np.linalg.det(rotations), 1.0, atol=1e-9)
    # The camera's optical axis, in the object frame, points from the view to the origin, so the
    # directions of the 42 views (4 rolls each share one) are the unit icosphere vertices.
    optical_axes = rotations[:, 2, :]
    np.testing.assert_allclose(optical_axes[0::4], optical_axes[3::4], atol=1e-9)
    np.testing.assert_allclose(np.linalg.norm(optical_axes, axis=1), 1.0, atol=1e-9)
    # Roll k of a view is turned by k * 90 deg about the optical axis.
    assert degrees(rotations[1], rotations[0]) == pytest.approx(90.0, abs=1e-6)
    assert degrees(rotations[2], rotations[0]) == pytest.approx(180.0, abs=1e-6)


def test_rolled_render_equals_the_image_rotated_about_the_principal_point(demo):
    settings = replace(FAST, render_size=80)
    K = templates.render_intrinsics(demo, settings)
    R = Rotation.from_euler('xyz', [20, -35, 50], degrees=True).as_matrix()
    distance = settings.distance_diameters * demo.diameter
    roll = Rotation.from_euler('z', 40, degrees=True).as_matrix()
    pose = make_pose(R, np.array([0.0, 0.0, distance]) - R @ demo.bbox_centre)
    rolled_pose = make_pose(roll @ R, roll @ pose[:3, 3])
    scene = RaycastScene([demo])
    size = settings.render_size
    rotated = templates._rotate_about_principal_point(
        scene.render(pose[None], K, size, size, 2).coverage[0], roll[:2, :2], K) > 0.5
    reference = scene.render(rolled_pose[None], K, size, size, 2).coverage[0] > 0.5
    iou = (rotated & reference).sum() / (rotated | reference).sum()
    assert iou > 0.97


def test_rotation_onto_ray_takes_the_optical_axis_onto_the_ray():
    direction = np.array([0.3, -0.2, 0.9])
    R = rotation_onto_ray(direction)
    np.testing.assert_allclose(R @ [0.0, 0.0, 1.0], direction / np.linalg.norm(direction),
                               atol=1e-12)
    expected_angle = np.arccos(direction[2] / np.linalg.norm(direction))
    assert np.arccos((np.trace(R) - 1) / 2) == pytest.approx(expected_angle, abs=1e-9)
    np.testing.assert_allclose(rotation_onto_ray(np.array([0.0, 0.0, 2.0])), np.eye(3))


def test_occlusion_aware_iou_leaves_ignored_pixels_out():
    observed = torch.tensor([1.0, 1.0, 0.0, 0.0])
    counted = torch.tensor([1.0, 1.0, 1.0, 0.0])
    masks = torch.tensor([[1.0, 1.0, 0.0, 0.0],    # exact
                          [1.0, 1.0, 0.0, 1.0],    # extra pixel on an ignored pixel: no penalty
                          [1.0, 1.0, 1.0, 0.0],    # extra pixel on a counted pixel: 2 / 3
                          [1.0, 0.0, 0.0, 0.0]])   # half the observed mask: 1 / 2
    np.testing.assert_allclose(occlusion_aware_iou(masks, observed, counted).numpy(),
                               [1.0, 1.0, 2 / 3, 0.5], rtol=1e-6)


def test_colour_correlation_matches_a_weighted_pearson_reference():
    rng = np.random.default_rng(0)
    template_colours = rng.random((2, 10, 3))
    observed_colours = rng.random((10, 3))
    template_masks = np.ones((2, 10))
    template_masks[1, :4] = 0.0
    observed = np.ones(10)
    observed[-2:] = 0.0
    # Template 0 is the observation under a gain and an offset: correlation exactly 1.
    template_colours[0] = 0.5 * observed_colours + 0.2
    result = templates.colour_correlation(*(torch.as_tensor(a, dtype=torch.float64) for a in (
        template_colours, template_masks, observed_colours, observed))).numpy()
    assert result[0] == pytest.approx(1.0, abs=1e-9)
    both = (template_masks[1] * observed) > 0
    a = template_colours[1][both] - template_colours[1][both].mean(axis=0)
    b = observed_colours[both] - observed_colours[both].mean(axis=0)
    assert result[1] == pytest.approx(np.corrcoef(a.ravel(), b.ravel())[0, 1], abs=1e-9)


def test_suppression_keeps_rotations_apart_and_respects_symmetries():
    base = Rotation.from_euler('x', np.array([0, 5, 40, 44, 178])[:, None], degrees=True).as_matrix()
    identity = np.eye(4)[None]
    kept = suppress_similar(base, np.arange(5), np.deg2rad(20), top_k=10, symmetries=identity)
    np.testing.assert_array_equal(kept, [0, 2, 4])
    assert len(suppress_similar(base, np.arange(5), np.deg2rad(20), 2, identity)) == 2
    # With a half-turn symmetry about x, the view at 178 deg is 2 deg from the one at 0 deg.
    flip = make_pose(Rotation.from_euler('x', 180, degrees=True).as_matrix(), np.zeros(3))
    kept = suppress_similar(base, np.arange(5), np.deg2rad(20), 10,
                            np.concatenate([identity, flip[None]]))
    np.testing.assert_array_equal(kept, [0, 2])


def test_distance_and_lateral_position_follow_the_observed_box(matcher):
    bank = matcher.bank
    index = np.array([7])
    side = bank.box_sides[7]
    R, t = hypothesis_poses(bank, index, side / 2, bank.centre_offsets[7] / 2)
    # Half the box: twice the distance; the offset scaled alike puts the centre on the axis.
    centre = t[0] + R[0] @ bank.object_centre
    np.testing.assert_allclose(centre, [0.0, 0.0, 2 * bank.distance], atol=1e-12)
    np.testing.assert_allclose(R[0], bank.rotations[7], atol=1e-12)


def test_crop_at_a_template_pose_off_axis_returns_that_pose(demo, matcher):
    bank = matcher.bank
    index = 1000
    centre = np.array([0.06, -0.04, 0.5])  # object centre off the optical axis, metres
    R = rotation_onto_ray(centre) @ bank.rotations[index]
    true_pose = make_pose(R, centre - R @ bank.object_centre)
    hypotheses = matcher.hypotheses(crop_of_pose(demo, true_pose), top_k=3)
    assert hypotheses.source == 'templates'
    assert len(hypotheses) == 3
    assert np.all(np.diff(hypotheses.scores) <= 0)
    assert degrees(hypotheses.R[0], R) < 3.0
    assert np.linalg.norm(hypotheses.t[0] - true_pose[:3, 3]) < 0.03 * np.linalg.norm(centre)


def test_an_occluded_object_is_matched_at_its_whole_size_when_its_hidden_part_is_known(
        demo, matcher):
    bank = matcher.bank
    centre = np.array([0.02, 0.01, 0.5])
    R = rotation_onto_ray(centre) @ bank.rotations[1000]
    true_pose = make_pose(R, centre - R @ bank.object_centre)
    coverage = RaycastScene([demo]).render(true_pose[None], SYNTHETIC_K, 640, 480).coverage[0]
    whole = coverage > 0.5
    cols = np.nonzero(whole.any(axis=0))[0]
    hidden = whole & (np.arange(640) >= np.percentile(cols, 55))[None, :]
    visible = (whole & ~hidden).astype(np.float32)
    rgb = np.repeat(visible[..., None], 3, axis=2)

    def distance_error(crop: Crop) -> float:
        hypotheses = matcher.hypotheses(crop, top_k=1)
        return float(np.linalg.norm(hypotheses.t[0] - true_pose[:3, 3]) / centre[2])

    told = cut_crop(rgb, SYNTHETIC_K, mask_box(whole), 128, mask=visible, others=hidden,
                    hidden=hidden)
    np.testing.assert_array_equal(told.extent > 0.5, crop_of_pose(demo, true_pose).mask > 0.5)
    assert degrees(matcher.hypotheses(told, top_k=1).R[0], R) < 3.0
    assert distance_error(told) < 0.03
    untold = cut_crop(rgb, SYNTHETIC_K, mask_box(whole), 128, mask=visible, others=hidden)
    assert distance_error(untold) > 3 * distance_error(told)


def test_a_hidden_part_known_short_of_the_whole_is_matched_past_the_occluder(
        demo, matcher, monkeypatch):
    # The amodal head misses thin hidden parts: here the known hidden part stops 24 % of the
    # object's width short of its end, and the rest of the occluder is ignored (unsure).
    bank = matcher.bank
    centre = np.array([0.02, 0.01, 0.5])
    R = rotation_onto_ray(centre) @ bank.rotations[1000]
    true_pose = make_pose(R, centre - R @ bank.object_centre)
    whole = RaycastScene([demo]).render(true_pose[None], SYNTHETIC_K, 640, 480).coverage[0] > 0.5
    rows, cols = np.nonzero(whole.any(axis=1))[0], np.nonzero(whole.any(axis=0))[0]
    occluder = np.zeros_like(whole)
    occluder[rows.min():rows.max() + 1, int(np.percentile(cols, 55)):] = True
    known = occluder & whole & (np.arange(640) < np.percentile(cols, 80))[None, :]
    visible = (whole & ~occluder).astype(np.float32)
    crop = cut_crop(np.repeat(visible[..., None], 3, axis=2), SYNTHETIC_K, mask_box(whole), 128,
                    mask=visible, others=occluder, hidden=known)
    assert templates.sides_ending_at(crop.extent, crop.ignore & ~(crop.extent > 0.5)).tolist() \
        == [False, False, True, False]

    def errors() -> tuple[float, float]:
        """Rotation (deg) and distance (fraction of the depth) errors of the best hypothesis."""
        hypotheses = matcher.hypotheses(crop, top_k=1)
        return (degrees(hypotheses.R[0], R),
                float(np.linalg.norm(hypotheses.t[0] - true_pose[:3, 3]) / centre[2]))

    extended = errors()
    monkeypatch.setattr(templates, 'OCCLUSION_EXTENSIONS', ())
    cut_short = errors()
    # Measured: 0.2 deg, 0.055 and 37 deg, 0.127.
    assert extended[0] < 3.0 and cut_short[0] > 20.0
    assert extended[1] < 0.5 * cut_short[1]


def test_colour_tells_apart_views_that_share_a_half_hidden_silhouette(demo, matcher):
    coloured = TemplateMatcher(matcher.bank, demo.symmetries, FAST, CPU, colour_weight=0.3)
    scene = RaycastScene([demo])
    rng = np.random.default_rng(0)
    errors = {'silhouette': [], 'colour': []}
    for _ in range(12):
        R = Rotation.random(random_state=rng).as_matrix()
        out = scene.render(make_pose(R, np.array([0.0, 0.0, 0.5]))[None], SYNTHETIC_K, 640, 480)
        whole = out.coverage[0] > 0.5
        cols = np.nonzero(whole.any(axis=0))[0]
        hidden = whole & (np.arange(640) >= np.median(cols))[None, :]
        visible = (whole & ~hidden).astype(np.float32)
        crop = cut_crop(out.rgb * visible[..., None], SYNTHETIC_K, mask_box(whole), 128,
                        mask=visible, others=hidden, hidden=hidden)
        for kind, estimator in (('silhouette', matcher), ('colour', coloured)):
            errors[kind].append(degrees(estimator.hypotheses(crop, top_k=1).R[0], R))
    within = {kind: int(np.sum(np.array(e) < 25.0)) for kind, e in errors.items()}
    assert within['colour'] >= 11
    assert within['colour'] > within['silhouette']


def test_random_poses_land_within_the_template_spacing(demo, matcher):
    # Neighbouring templates of FAST are up to one roll step (20 deg) apart.
    step = 360.0 / FAST.inplane
    errors, translation_errors = [], []
    for case in synthetic_cases(demo, 6, 0.0, 0.0, 128, np.random.default_rng(3)):
        crop = Crop(case.image, case.mask, case.ignore, case.K, np.zeros(4))
        hypotheses = matcher.hypotheses(crop, top_k=4)
        errors.append(min(degrees(R, case.true_pose[:3, :3]) for R in hypotheses.R))
        t_true = case.true_pose[:3, 3]
        translation_errors.append(np.linalg.norm(hypotheses.t[0] - t_true)
                                  / np.linalg.norm(t_true))
    errors = np.array(errors)
    assert np.mean(errors < step) >= 5 / 6
    assert errors.max() < 1.5 * step
    assert np.median(translation_errors) < 0.04


def test_empty_mask_gives_no_hypothesis(matcher):
    crop = Crop(np.zeros((64, 64, 3), np.float32), np.zeros((64, 64), np.float32),
                np.zeros((64, 64), bool), SYNTHETIC_K, np.zeros(4))
    assert len(matcher.hypotheses(crop, 4)) == 0


def test_cache_round_trip_reads_the_file_without_rendering(demo, tmp_path, monkeypatch):
    settings = replace(FAST, subdivisions=0, inplane=4)
    built = cached_bank(demo, settings, tmp_path)
    assert len(list(tmp_path.glob('*.npz'))) == 1

    def no_rendering(*args, **kwargs):
        raise AssertionError('the cached bank was rebuilt')

    monkeypatch.setattr(templates, 'build_bank', no_rendering)
    loaded = cached_bank(demo, settings, tmp_path)
    cached_bank(replace(demo, name='another_name'), settings, tmp_path)   # same mesh: same file
    for field in ('rotations', 'masks', 'box_sides', 'centre_offsets', 'object_centre'):
        np.testing.assert_array_equal(getattr(loaded, field), getattr(built, field))
    assert loaded.distance == built.distance


def test_cache_key_changes_with_mesh_colours_and_settings(demo):
    key = settings_key(demo, FAST)
    moved = demo.vertices.copy()
    moved[0, 0] += 1e-6
    recoloured = demo.vertex_colors.copy()
    recoloured[0] = 1.0 - recoloured[0]
    assert settings_key(replace(demo, vertices=moved), FAST) != key
    assert settings_key(replace(demo, vertex_colors=recoloured), FAST) != key
    assert settings_key(demo, replace(FAST, inplane=12)) != key
    assert settings_key(load_demo_object(), FAST) == key


def test_corrupt_cache_file_is_rebuilt_with_a_warning(demo, tmp_path):
    settings = replace(FAST, subdivisions=0, inplane=4)
    built = cached_bank(demo, settings, tmp_path)
    path = next(tmp_path.glob('*.npz'))
    path.write_bytes(b'not a zip file')
    with pytest.warns(UserWarning, match='unreadable template bank'):
        rebuilt = cached_bank(demo, settings, tmp_path)
    np.testing.assert_array_equal(rebuilt.masks, built.masks)
    np.testing.assert_array_equal(templates.load_bank(path).rotations, built.rotations)


def test_writers_of_the_same_bank_at_once_do_not_break_each_other(demo, tmp_path, monkeypatch):
    """A second process writing the same bank while the first is still writing (two evaluations
    on a fresh cache) must not take the first one's temporary file away."""
    bank = templates.build_bank(demo, replace(FAST, subdivisions=0, inplane=4))
    path = tmp_path / 'bank.npz'
    savez = np.savez
    nested = []

    def interleaved(file, **arrays):
        savez(file, **arrays)
        if not nested:
            nested.append(True)
            templates.save_bank(bank, path)      # the other writer, finished before this one

    monkeypatch.setattr(templates.np, 'savez', interleaved)
    templates.save_bank(bank, path)
    np.testing.assert_array_equal(templates.load_bank(path).rotations, bank.rotations)
    assert [p.name for p in tmp_path.iterdir()] == ['bank.npz']


def test_objects_cut_by_the_image_border_are_matched_beyond_it(demo, matcher, monkeypatch):
    coloured = TemplateMatcher(matcher.bank, demo.symmetries, FAST, CPU, colour_weight=0.3)
    scene = RaycastScene([demo])
    rng = np.random.default_rng(5)
    within = {'told': 0, 'untold': 0}
    for _ in range(8):
        R = Rotation.random(random_state=rng).as_matrix()
        # Ray-cast 160 px past the right border, then cut the frame at 640 px: the object's
        # centre is 20 px inside, so up to about a third of it is outside the image.
        centre = np.array([0.45, rng.uniform(-0.1, 0.1), 0.9])
        pose = make_pose(R, centre - R @ matcher.bank.object_centre)
        out = scene.render(pose[None], SYNTHETIC_K, 800, 480)
        coverage = out.coverage[0][:, :640]
        crop = cut_crop(np.ascontiguousarray(out.rgb[:, :640]), SYNTHETIC_K,
                        mask_box(coverage), 128, mask=coverage)
        assert templates.sides_ending_at(crop.extent, crop.outside).tolist() == \
            [False, False, True, False]
        within['told'] += degrees(coloured.hypotheses(crop, top_k=1).R[0], R) < 25.0
        # Untold, the pixels outside the image are only ignored ones; without the occlusion
        # extensions too, the search keeps the cut extent's box.
        with monkeypatch.context() as untold:
            untold.setattr(templates, 'OCCLUSION_EXTENSIONS', ())
            within['untold'] += degrees(coloured.hypotheses(replace(crop, outside=None),
                                                            top_k=1).R[0], R) < 25.0
    # Measured: 8 and 3 of 8.
    assert within['told'] >= 7 and within['told'] > within['untold'] + 2, within


def test_sides_ending_at_pixels_are_those_with_such_pixels_straight_past_the_edge():
    extent = np.zeros((20, 20), np.float32)
    extent[5:12, 8:18] = 1.0
    outside = np.zeros((20, 20), bool)
    outside[:, 19:] = True       # 2 px right of the extent's right edge (column 17)
    # The bottom-right corner pixel has outside pixels beside it, not below it.
    assert templates.sides_ending_at(extent, outside).tolist() == [False, False, True, False]
    outside[13:] = True          # 2 px below the bottom edge (row 11)
    assert templates.sides_ending_at(extent, outside).tolist() == [False, False, True, True]
    outside[:] = False
    outside[14:] = True          # 3 px below: too far
    assert not templates.sides_ending_at(extent, outside).any()
    np.testing.assert_allclose(extend_box(np.array([1.0, 2, 3, 4]),
                                          np.array([True, False, True, True]), 2.0),
                               [-1.0, 2, 7, 6])

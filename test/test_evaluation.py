"""Scores of recorded runs against hand-made cases: perfect outputs, known offsets, missing
estimates, symmetric objects, latency percentiles and dropped frames; plus the report files."""
import numpy as np
import pytest
from PIL import Image
from scipy.spatial.transform import Rotation

from pose_node import evaluation, report
from pose_node.geometry import make_pose
from pose_node.mesh import ObjectModel

K = np.array([[600.0, 0.0, 320.0], [0.0, 600.0, 240.0], [0.0, 0.0, 1.0]])
T0 = 1_000_000_000_000


def box_model(name: str, size=(0.1, 0.06, 0.04), symmetries=None) -> ObjectModel:
    """A box centred on the origin: 8 corner vertices, 12 faces."""
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)],
                       np.float32) * np.array(size, np.float32) / 2
    faces = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                      [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    return ObjectModel(name=name, vertices=corners, faces=faces,
                       vertex_colors=np.full((8, 3), 0.6, np.float32), has_colors=False,
                       diameter=float(np.linalg.norm(size)),
                       symmetries=np.eye(4)[None] if symmetries is None else symmetries)


def truth_poses(n: int, rng: np.random.Generator) -> dict[int, np.ndarray]:
    return {T0 + k * 100_000_000: make_pose(Rotation.random(random_state=k).as_matrix(),
                                            rng.uniform([-0.05, -0.05, 0.5], [0.05, 0.05, 0.8]))
            for k in range(n)}


def recording(truth, estimates, published=None, answered=None) -> evaluation.Recording:
    stamps = {s for poses in truth.values() for s in poses}
    return evaluation.Recording(truth=truth, estimates=estimates,
                                intrinsics={s: K for s in stamps}, image_width=640,
                                published_ns=published or {}, answered_ns=answered or {})


def test_estimates_equal_to_the_truth_score_perfectly():
    model = box_model('box')
    truth = truth_poses(5, np.random.default_rng(0))
    summary, errors = evaluation.evaluate(recording({'box': truth}, {'box': dict(truth)}),
                                          {'box': model})
    assert summary['add_s_recall'] == {'box': 1.0, 'mean': 1.0}
    assert summary['ar']['box'] == 1.0 and summary['speed_mean']['box'] == pytest.approx(0.0)
    assert summary['objects']['box']['estimated'] == 5
    for e in errors['box']:
        assert max(e.add_s, e.mssd, e.mspd, e.translation) == pytest.approx(0.0, abs=1e-9)


def test_a_known_translation_offset_gives_the_known_errors():
    model = box_model('box')
    truth = truth_poses(4, np.random.default_rng(1))
    offset = np.array([0.003, 0.004, 0.0])  # 5 mm
    estimates = {s: make_pose(p[:3, :3], p[:3, 3] + offset) for s, p in truth.items()}
    summary, errors = evaluation.evaluate(recording({'box': truth}, {'box': estimates}),
                                          {'box': model})
    for e, pose in zip(errors['box'], truth.values()):
        assert e.add_s == pytest.approx(0.005) and e.mssd == pytest.approx(0.005)
        assert e.translation == pytest.approx(0.005) and e.rotation == pytest.approx(0.0, abs=1e-7)
        assert e.speed == pytest.approx(0.005 / np.linalg.norm(pose[:3, 3]), abs=1e-7)
    assert summary['add_s_recall']['box'] == 1.0  # 5 mm < 0.1 x 124 mm
    # MSSD thresholds 0.05..0.5 d = 6.2..62 mm: all ten pass.
    assert summary['ar_mssd']['box'] == pytest.approx(1.0)
    assert summary['objects']['box']['translation_median_mm'] == pytest.approx(5.0)


def test_a_known_rotation_offset_gives_the_known_errors():
    model = box_model('box')
    truth = truth_poses(3, np.random.default_rng(2))
    angle = np.deg2rad(30.0)
    turn = Rotation.from_rotvec([0.0, 0.0, angle]).as_matrix()
    estimates = {s: make_pose(p[:3, :3] @ turn, p[:3, 3]) for s, p in truth.items()}
    _, errors = evaluation.evaluate(recording({'box': truth}, {'box': estimates}), {'box': model})
    corners = model.vertices.astype(np.float64)
    # Each corner moves along a chord 2 r sin(angle / 2), r its distance from the z axis.
    chord = 2 * np.linalg.norm(corners[:, :2], axis=1) * np.sin(angle / 2)
    for e in errors['box']:
        assert e.rotation == pytest.approx(angle)
        assert e.add_s == pytest.approx(chord.mean()) and e.mssd == pytest.approx(chord.max())
        assert e.speed == pytest.approx(angle)


def test_missing_estimates_fail_and_symmetric_flips_do_not():
    flip = np.eye(4)
    flip[:3, :3] = Rotation.from_rotvec([0.0, 0.0, np.pi]).as_matrix()
    model = box_model('sym', symmetries=np.stack([np.eye(4), flip]))
    truth = truth_poses(4, np.random.default_rng(3))
    estimates = {s: p @ flip for s, p in list(truth.items())[:3]}
    summary, errors = evaluation.evaluate(recording({'sym': truth}, {'sym': estimates}),
                                          {'sym': model})
    assert [e.found for e in errors['sym']] == [True, True, True, False]
    for e in errors['sym'][:3]:
        assert e.add_s == pytest.approx(0.0, abs=1e-9) and e.mssd == pytest.approx(0.0, abs=1e-9)
        assert e.rotation == pytest.approx(np.pi)
    assert np.isinf(errors['sym'][3].add_s)
    assert summary['add_s_recall']['sym'] == pytest.approx(0.75)
    assert summary['objects']['sym']['estimated'] == 3
    document = evaluation.errors_document(errors)
    assert document['sym']['add_s'][3] is None


def test_mean_is_over_objects():
    truth = truth_poses(2, np.random.default_rng(4))
    models = {'a': box_model('a'), 'b': box_model('b')}
    summary, _ = evaluation.evaluate(recording({'a': truth, 'b': truth}, {'a': dict(truth)}),
                                     models)
    assert summary['add_s_recall'] == {'a': 1.0, 'b': 0.0, 'mean': 0.5}


def test_match_by_stamp_respects_the_tolerance():
    truth = {100: np.eye(4), 200: np.eye(4)}
    estimates = {103: 2 * np.eye(4), 260: 3 * np.eye(4)}
    matched = evaluation.match_by_stamp(estimates, truth, tolerance_ns=5)
    assert [stamp for stamp, _, _ in matched] == [100, 200]
    assert matched[0][2][0, 0] == 2 and matched[1][2] is None


def test_latency_percentiles_and_dropped_frames():
    published = {T0 + k: T0 + 10**6 * k for k in range(5)}
    latencies = [30.0, 10.0, 20.0, 40.0]
    answered = {T0 + k: published[T0 + k] + int(latency * 1e6)
                for k, latency in enumerate(latencies)}
    rec = recording({}, {}, published, answered)
    assert evaluation.frames_summary(rec) == {'published': 5, 'answered': 4, 'dropped': 1,
                                              'dropped_fraction': 0.2}
    summary = evaluation.latency_summary(list(evaluation.frame_latencies_ms(rec).values()))
    assert summary['count'] == 4 and summary['max'] == pytest.approx(40.0)
    assert summary['p50'] == pytest.approx(25.0)  # median of 10, 20, 30, 40
    assert summary['p90'] == pytest.approx(37.0)  # linear interpolation: 30 + 0.7 x 10
    assert evaluation.latency_summary([]) == {'count': 0}


def test_cdf_series_counts_missing_values():
    series = report.cdf_series(np.array([2.0, np.inf, 1.0, 3.0]), 'x', (0, 0, 0))
    assert series.y.max() == pytest.approx(0.75)
    assert series.x[-1] == pytest.approx(3.0)
    np.testing.assert_allclose(report.nice_ticks(0.0, 0.5), [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])


def test_scaled_intrinsics_keep_pixel_centres():
    K_half = report.scaled_intrinsics(K, 0.5)
    # Pixel centre (1, 1) of the full image covers half-image pixels 0..1: its centre is 0.25.
    point = np.array([1.0, 1.0, 1.0])
    full = K @ point
    half = K_half @ point
    assert half[0] / half[2] == pytest.approx(0.5 * full[0] / full[2] - 0.25)


def test_write_report_writes_the_charts_and_markdown(tmp_path):
    model = box_model('box')
    truth = truth_poses(4, np.random.default_rng(5))
    estimates = {s: make_pose(p[:3, :3], p[:3, 3] + [0.002, 0, 0]) for s, p in truth.items()}
    published = {s: s for s in truth}
    answered = {s: s + 50_000_000 for s in truth}
    rec = recording({'box': truth}, {'box': estimates}, published, answered)
    summary, errors = evaluation.evaluate(rec, {'box': model})
    path = report.write_report(tmp_path, summary, errors, {'box': model},
                               evaluation.frame_latencies_ms(rec), T0, [])
    text = path.read_text()
    assert '| box | 4 | 4 | 1.000 |' in text
    for name in ('recall_vs_threshold.png', 'rotation_error_cdf.png', 'latency_over_time.png'):
        assert f']({name})' in text
        with Image.open(tmp_path / name) as image:
            assert image.size == report.CHART_SIZE


def test_line_chart_cuts_lines_at_the_right_border():
    """A CDF whose last step lies beyond the x range keeps its level up to the border instead
    of jumping there."""
    series = [report.Series('s', np.array([0.0, 0.1, 0.1, 0.9]), np.array([0.5, 0.5, 1.0, 1.5]),
                            (255, 0, 0))]
    image = report.line_chart(series, '', '', '', (0.0, 0.5), (0.0, 2.0))
    left, top, right, bottom = report.MARGINS
    plot_w = report.CHART_SIZE[0] - left - right
    plot_h = report.CHART_SIZE[1] - top - bottom
    column = image[:, left + plot_w - 3]
    red = np.flatnonzero((column[:, 0] > 200) & (column[:, 1] < 80))
    level_1 = top + plot_h / 2  # y = 1.0 of 0..2
    assert red.size and np.abs(red - level_1).max() <= 2  # no trace of y = 1.5

"""Scoring a recorded run of the node against ground truth (no ROS): per object ADD(-S) recall at
0.1 diameter, BOP'19 average recall of MSSD and MSPD, the ESA SPEED score, error distributions,
latency percentiles and dropped frames. The error definitions are those of :mod:`pose_node.metrics`.

Inputs are keyed by image stamp (ns): the node stamps its outputs with its input image's stamp.
A ground-truth instance without an estimate counts as a failure (its errors are ``inf``).
Units: metres, radians, pixels, milliseconds; poses (4, 4) object-to-camera.
"""
from dataclasses import dataclass, field

import numpy as np

from pose_node import metrics
from pose_node.mesh import ObjectModel

ADD_S_THRESHOLD = 0.1
"""ADD(-S) is correct below this fraction of the object's diameter."""
MAX_EVAL_POINTS = 4000
LATENCY_PERCENTILES = (50, 90, 95, 99)


@dataclass(frozen=True)
class Recording:
    """What a replay produced and what it is compared with.

    truth / estimates: per object name, per image stamp (ns), pose (4, 4) metres.
    intrinsics: per image stamp, K (3, 3). image_width: pixels (scales the MSPD thresholds).
    published_ns: per image stamp, the wall time its image was sent to the node (ns).
    answered_ns: per image stamp, the wall time the node's first output for it arrived (ns).
    """

    truth: dict[str, dict[int, np.ndarray]]
    estimates: dict[str, dict[int, np.ndarray]]
    intrinsics: dict[int, np.ndarray]
    image_width: int
    published_ns: dict[int, int] = field(default_factory=dict)
    answered_ns: dict[int, int] = field(default_factory=dict)


@dataclass(frozen=True)
class InstanceErrors:
    """Errors of one ground-truth instance (``inf`` when nothing was estimated): add_s, mssd in
    metres, mspd in pixels, rotation in radians, translation in metres, speed unitless."""

    name: str
    stamp_ns: int
    add_s: float
    mssd: float
    mspd: float
    rotation: float
    translation: float
    speed: float

    @property
    def found(self) -> bool:
        return bool(np.isfinite(self.add_s))


def evaluation_points(model: ObjectModel, max_points: int = MAX_EVAL_POINTS) -> np.ndarray:
    """(N, 3) float64 model points for the metrics, metres: the vertices, thinned by a fixed
    stride to at most ``max_points`` (scanned meshes have roughly even vertex density)."""
    step = max(1, -(-len(model.vertices) // max_points))
    return model.vertices[::step].astype(np.float64)


def instance_errors(name: str, stamp_ns: int, estimate: np.ndarray | None, truth: np.ndarray,
                    model: ObjectModel, points: np.ndarray, K: np.ndarray) -> InstanceErrors:
    """All errors of ``estimate`` (4, 4, or None when missing) against ``truth`` (4, 4)."""
    if estimate is None:
        return InstanceErrors(name, stamp_ns, *([float('inf')] * 6))
    R_e, t_e, R_g, t_g = estimate[:3, :3], estimate[:3, 3], truth[:3, :3], truth[:3, 3]
    return InstanceErrors(
        name=name, stamp_ns=stamp_ns,
        add_s=metrics.add_or_adi(R_e, t_e, R_g, t_g, points, model.is_symmetric),
        mssd=metrics.mssd(R_e, t_e, R_g, t_g, points, model.symmetries),
        mspd=metrics.mspd(R_e, t_e, R_g, t_g, K, points, model.symmetries),
        rotation=metrics.rotation_error(R_e, R_g),
        translation=metrics.translation_error(t_e, t_g),
        speed=metrics.speed_score(R_e, t_e, R_g, t_g))


def object_errors(name: str, recording: Recording, model: ObjectModel,
                  tolerance_ns: int = 0) -> list[InstanceErrors]:
    """Errors of every ground-truth instance of ``name``, in stamp order; an estimate belongs to
    the instance whose stamp is within ``tolerance_ns`` of its own."""
    points = evaluation_points(model)
    matches = match_by_stamp(recording.estimates.get(name, {}), recording.truth.get(name, {}),
                             tolerance_ns)
    return [instance_errors(name, stamp, estimate, truth, model, points,
                            recording.intrinsics[stamp])
            for stamp, truth, estimate in matches]


def match_by_stamp(estimates: dict[int, np.ndarray], truth: dict[int, np.ndarray],
                   tolerance_ns: int = 0) -> list[tuple[int, np.ndarray, np.ndarray | None]]:
    """For every ground-truth stamp (sorted): (stamp, true pose, the estimate whose stamp is
    nearest within ``tolerance_ns``, or None)."""
    stamps = np.array(sorted(estimates), dtype=np.int64)
    matched = []
    for stamp in sorted(truth):
        estimate = None
        if len(stamps):
            nearest = int(stamps[np.argmin(np.abs(stamps - stamp))])
            if abs(nearest - stamp) <= tolerance_ns:
                estimate = estimates[nearest]
        matched.append((stamp, truth[stamp], estimate))
    return matched


def add_s_recall_curve(errors: list[InstanceErrors], diameter: float,
                       fractions: np.ndarray) -> np.ndarray:
    """(T,) ADD(-S) recall at thresholds ``fractions`` (T,) of the ``diameter`` (metres)."""
    add_s = np.array([e.add_s for e in errors])
    return np.array([metrics.recall(add_s, f * diameter) for f in fractions])


def object_summary(errors: list[InstanceErrors], diameter: float, image_width: int) -> dict:
    """Scores of one object's instances: counts, ADD(-S) recall at 0.1 d, AR of MSSD and MSPD
    (BOP'19 thresholds) and their mean, mean SPEED score and median errors of the found ones."""
    found = [e for e in errors if e.found]
    mssd = np.array([e.mssd for e in errors])
    mspd = np.array([e.mspd for e in errors])
    ar_mssd = metrics.average_recall(mssd, metrics.bop19_mssd_thresholds(diameter))
    ar_mspd = metrics.average_recall(mspd, metrics.bop19_mspd_thresholds(image_width))
    return {
        'instances': len(errors),
        'estimated': len(found),
        'add_s_recall': metrics.recall(np.array([e.add_s for e in errors]),
                                       ADD_S_THRESHOLD * diameter),
        'ar_mssd': ar_mssd,
        'ar_mspd': ar_mspd,
        'ar': 0.5 * (ar_mssd + ar_mspd),
        'speed_mean': _mean_or_none([e.speed for e in found]),
        'rotation_median_deg': _median_or_none([np.rad2deg(e.rotation) for e in found]),
        'translation_median_mm': _median_or_none([1e3 * e.translation for e in found]),
    }


def latency_summary(latencies_ms: np.ndarray) -> dict:
    """Count, mean, max and percentiles (``LATENCY_PERCENTILES``) of latencies (N,) in ms."""
    latencies_ms = np.asarray(latencies_ms, np.float64)
    if latencies_ms.size == 0:
        return {'count': 0}
    summary = {'count': int(latencies_ms.size), 'mean': float(latencies_ms.mean()),
               'max': float(latencies_ms.max())}
    for percentile in LATENCY_PERCENTILES:
        summary[f'p{percentile}'] = float(np.percentile(latencies_ms, percentile))
    return summary


def frame_latencies_ms(recording: Recording) -> dict[int, float]:
    """Per answered image stamp: answer time minus publish time, milliseconds."""
    return {stamp: 1e-6 * (recording.answered_ns[stamp] - published)
            for stamp, published in sorted(recording.published_ns.items())
            if stamp in recording.answered_ns}


def frames_summary(recording: Recording) -> dict:
    """Images published, answered and dropped (published but never answered)."""
    published = len(recording.published_ns)
    answered = len(set(recording.published_ns) & set(recording.answered_ns))
    return {'published': published, 'answered': answered, 'dropped': published - answered,
            'dropped_fraction': (published - answered) / published if published else None}


def evaluate(recording: Recording, models: dict[str, ObjectModel],
             tolerance_ns: int = 0) -> tuple[dict, dict[str, list[InstanceErrors]]]:
    """The summary (see :func:`summarize`) of ``recording`` and its per-instance errors by
    object. Objects with ground truth but no model raise KeyError."""
    errors = {name: object_errors(name, recording, models[name], tolerance_ns)
              for name in sorted(recording.truth) if recording.truth[name]}
    return summarize(errors, models, recording), errors


def summarize(errors: dict[str, list[InstanceErrors]], models: dict[str, ObjectModel],
              recording: Recording) -> dict:
    """JSON-ready scores. Keys: per score ('add_s_recall', 'ar_mssd', 'ar_mspd', 'ar',
    'speed_mean') a map object -> value plus 'mean' (over objects); 'objects' (each object's
    summary), 'frames', 'latency_ms'."""
    objects = {name: object_summary(errs, models[name].diameter, recording.image_width)
               for name, errs in errors.items()}
    summary = {}
    for score in ('add_s_recall', 'ar_mssd', 'ar_mspd', 'ar', 'speed_mean'):
        values = {name: obj[score] for name, obj in objects.items()}
        known = [v for v in values.values() if v is not None]
        summary[score] = {**values, 'mean': float(np.mean(known)) if known else None}
    summary['objects'] = objects
    summary['frames'] = frames_summary(recording)
    summary['latency_ms'] = latency_summary(list(frame_latencies_ms(recording).values()))
    return summary


def errors_document(errors: dict[str, list[InstanceErrors]]) -> dict:
    """Per object the per-instance errors as lists (JSON: missing estimates as null)."""
    def column(errs, attribute):
        return [float(getattr(e, attribute)) if e.found else None for e in errs]
    return {name: {'stamp_ns': [e.stamp_ns for e in errs],
                   **{attribute: column(errs, attribute)
                      for attribute in ('add_s', 'mssd', 'mspd', 'rotation', 'translation',
                                        'speed')}}
            for name, errs in errors.items()}


def _mean_or_none(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _median_or_none(values: list[float]) -> float | None:
    return float(np.median(values)) if values else None

"""Evaluation report: PNG charts drawn with OpenCV (no matplotlib here) and a Markdown page
embedding them. Charts: ADD(-S) recall against its threshold, CDFs of rotation and translation
errors, per-frame ADD(-S) and latency over the run, and overlay thumbnails (ground truth green,
estimate orange, drawn from ray-cast silhouettes).

Images are (H, W, 3) uint8 RGB. Errors come from :mod:`pose_node.evaluation` (metres, radians).
"""
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from pose_node.evaluation import ADD_S_THRESHOLD, InstanceErrors
from pose_node.mesh import ObjectModel
from pose_node.overlay import draw_mask_contour
from pose_node.render.raycast import RaycastScene

PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
TRUTH_COLOR, ESTIMATE_COLOR = (40, 220, 40), (255, 140, 0)
CHART_SIZE = (760, 440)
MARGINS = (80, 40, 170, 60)
"""left, top, right (legend), bottom, pixels."""
FONT = cv2.FONT_HERSHEY_SIMPLEX
TEXT_COLOR, GRID_COLOR = (30, 30, 30), (225, 225, 225)


@dataclass(frozen=True)
class Series:
    """One line of a chart: x, y (N,), colour RGB; ``points`` draws dots instead of a line."""

    label: str
    x: np.ndarray
    y: np.ndarray
    color: tuple[int, int, int]
    points: bool = False


# --------------------------------------------------------------------------- charts

def nice_ticks(low: float, high: float, count: int = 5) -> np.ndarray:
    """Round tick values (steps of 1, 2 or 5 x 10^k) covering [low, high], about ``count``."""
    span = max(high - low, 1e-12)
    raw = span / count
    magnitude = 10.0 ** np.floor(np.log10(raw))
    step = magnitude * min((s for s in (1, 2, 5, 10) if s * magnitude >= raw))
    return np.arange(np.ceil(low / step) * step, high + 1e-9 * span, step)


def line_chart(series: list[Series], title: str, x_label: str, y_label: str,
               x_range: tuple[float, float] | None = None,
               y_range: tuple[float, float] | None = None,
               size: tuple[int, int] = CHART_SIZE) -> np.ndarray:
    """A chart (H, W, 3) of ``series`` with axes, grid, ticks, labels and a legend at the right.
    Ranges default to the finite data's extent."""
    width, height = size
    image = np.full((height, width, 3), 255, np.uint8)
    left, top, right, bottom = MARGINS
    plot_w, plot_h = width - left - right, height - top - bottom
    x_low, x_high = x_range or _extent([s.x for s in series])
    y_low, y_high = y_range or _extent([s.y for s in series])

    def to_pixels(x, y):
        u = left + (np.asarray(x, float) - x_low) / (x_high - x_low) * plot_w
        v = top + plot_h - (np.asarray(y, float) - y_low) / (y_high - y_low) * plot_h
        return np.stack([u, v], axis=-1)

    for tick in nice_ticks(x_low, x_high):
        u = int(round(to_pixels(tick, y_low)[0]))
        cv2.line(image, (u, top), (u, top + plot_h), GRID_COLOR, 1)
        _text(image, f'{tick:g}', (u - 12, top + plot_h + 18), 0.42)
    for tick in nice_ticks(y_low, y_high):
        v = int(round(to_pixels(x_low, tick)[1]))
        cv2.line(image, (left, v), (left + plot_w, v), GRID_COLOR, 1)
        _text(image, f'{tick:g}', (8, v + 5), 0.42)
    cv2.rectangle(image, (left, top), (left + plot_w, top + plot_h), TEXT_COLOR, 1)
    for index, s in enumerate(series):
        x, y = _cut_at(s, x_high)
        finite = np.isfinite(x) & np.isfinite(y)
        pixels = np.round(to_pixels(x[finite], y[finite])).astype(np.int32)
        pixels[:, 0] = pixels[:, 0].clip(left, left + plot_w)
        pixels[:, 1] = pixels[:, 1].clip(top, top + plot_h)
        if s.points:
            for u, v in pixels:
                cv2.circle(image, (int(u), int(v)), 3, s.color, -1, lineType=cv2.LINE_AA)
        elif len(pixels) > 1:
            cv2.polylines(image, [pixels], False, s.color, 2, lineType=cv2.LINE_AA)
        legend_y = top + 12 + 20 * index
        cv2.line(image, (left + plot_w + 12, legend_y - 4), (left + plot_w + 32, legend_y - 4),
                 s.color, 3)
        _text(image, s.label, (left + plot_w + 38, legend_y), 0.45)
    _text(image, title, (left, 26), 0.6)
    _text(image, x_label, (left + plot_w // 2 - 60, height - 14), 0.5)
    _text(image, y_label, (8, top - 10), 0.45)
    return image


def _cut_at(series: Series, x_high: float) -> tuple[np.ndarray, np.ndarray]:
    """x, y of ``series`` without the points right of ``x_high``; a line keeps its level up to
    ``x_high`` (step charts such as CDFs would otherwise jump at the border)."""
    inside = np.asarray(series.x) <= x_high
    x, y = np.asarray(series.x, float)[inside], np.asarray(series.y, float)[inside]
    if not series.points and len(x) and not inside.all():
        x, y = np.append(x, x_high), np.append(y, y[-1])
    return x, y


def _extent(arrays: list[np.ndarray]) -> tuple[float, float]:
    values = np.concatenate([np.asarray(a, float).ravel() for a in arrays] + [np.zeros(0)])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    return (low, high) if high > low else (low - 0.5, high + 0.5)


def _text(image: np.ndarray, text: str, origin: tuple[int, int], scale: float) -> None:
    cv2.putText(image, text, origin, FONT, scale, TEXT_COLOR, 1, lineType=cv2.LINE_AA)


def cdf_series(values: np.ndarray, label: str, color: tuple[int, int, int]) -> Series:
    """Empirical CDF of ``values`` (N,) as a step line; non-finite values (missing estimates)
    count in N but never arrive, so the curve ends at the fraction found."""
    values = np.asarray(values, float)
    finite = np.sort(values[np.isfinite(values)])
    fraction = np.arange(1, finite.size + 1) / max(values.size, 1)
    x = np.repeat(finite, 2)[1:]
    y = np.repeat(fraction, 2)[:-1]
    return Series(label, np.concatenate([[0.0], x]), np.concatenate([[0.0], y]), color)


def recall_chart(errors: dict[str, list[InstanceErrors]],
                 diameters: dict[str, float]) -> np.ndarray:
    """ADD(-S) recall against the threshold (0..0.5 of the diameter), per object."""
    series = [cdf_series(np.array([e.add_s for e in errs]) / diameters[name], name,
                         PALETTE[index % len(PALETTE)])
              for index, (name, errs) in enumerate(errors.items())]
    return line_chart(series, f'ADD(-S) recall vs threshold (reported at {ADD_S_THRESHOLD} d)',
                      'threshold / diameter', 'recall', (0.0, 0.5), (0.0, 1.0))


def error_cdf_chart(errors: dict[str, list[InstanceErrors]], attribute: str, scale: float,
                    title: str, unit: str, limit: float) -> np.ndarray:
    """CDF per object of ``attribute`` x ``scale`` (e.g. rotation in degrees), up to ``limit``."""
    series = [cdf_series(np.array([getattr(e, attribute) for e in errs]) * scale, name,
                         PALETTE[index % len(PALETTE)])
              for index, (name, errs) in enumerate(errors.items())]
    return line_chart(series, title, unit, 'fraction of instances', (0.0, limit), (0.0, 1.0))


def add_s_over_time_chart(errors: dict[str, list[InstanceErrors]], diameters: dict[str, float],
                          t0_ns: int, clip: float = 0.5) -> np.ndarray:
    """ADD(-S) / diameter of each instance against its image time (clipped at ``clip``: missing
    estimates sit on the top line)."""
    series = [Series(name, np.array([(e.stamp_ns - t0_ns) * 1e-9 for e in errs]),
                     np.minimum(np.array([e.add_s for e in errs]) / diameters[name], clip),
                     PALETTE[index % len(PALETTE)], points=True)
              for index, (name, errs) in enumerate(errors.items())]
    return line_chart(series, f'ADD(-S) per frame (top line: >= {clip} d or missing)',
                      'bag time, s', 'ADD(-S) / diameter', y_range=(0.0, clip))


def latency_chart(latencies_ms: dict[int, float], t0_ns: int) -> np.ndarray:
    """Latency of each answered image against its image time."""
    stamps = np.array(sorted(latencies_ms), dtype=np.int64)
    values = np.array([latencies_ms[s] for s in stamps])
    series = [Series('latency', (stamps - t0_ns) * 1e-9, values, PALETTE[0], points=True)]
    high = float(values.max()) * 1.05 if values.size else 1.0
    return line_chart(series, 'latency: node output received - image published',
                      'bag time, s', 'ms', y_range=(0.0, high))


# --------------------------------------------------------------------------- overlays

def scaled_intrinsics(K: np.ndarray, scale: float) -> np.ndarray:
    """K (3, 3) of the image resized by ``scale`` (pixel centres at integer coordinates)."""
    A = np.array([[scale, 0.0, 0.5 * scale - 0.5], [0.0, scale, 0.5 * scale - 0.5], [0, 0, 1]])
    return A @ np.asarray(K, np.float64)


def silhouette(scene: RaycastScene, pose: np.ndarray, K: np.ndarray, width: int,
               height: int) -> np.ndarray:
    """(H, W) bool: pixels whose centre sees the (single-object) ``scene`` at ``pose`` (4, 4)."""
    return scene.render(pose[None], K, width, height).coverage[0] >= 0.5


def overlay_thumbnail(rgb: np.ndarray, K: np.ndarray, truth: dict[str, np.ndarray],
                      estimates: dict[str, np.ndarray], scenes: dict[str, RaycastScene],
                      width: int = 320) -> np.ndarray:
    """``rgb`` (H, W, 3) shrunk to ``width`` with the outline of every object at its true pose
    (green) and at its estimated pose (orange), poses (4, 4) by object name."""
    scale = width / rgb.shape[1]
    height = int(round(rgb.shape[0] * scale))
    image = cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA)
    K_small = scaled_intrinsics(K, scale)
    for poses, color in ((truth, TRUTH_COLOR), (estimates, ESTIMATE_COLOR)):
        for name, pose in poses.items():
            draw_mask_contour(image, silhouette(scenes[name], pose, K_small, width, height),
                              color, 1)
    return image


def thumbnail_grid(images: list[np.ndarray], columns: int = 3, gap: int = 4) -> np.ndarray:
    """Images of one size tiled row by row on white."""
    height, width = images[0].shape[:2]
    rows = -(-len(images) // columns)
    grid = np.full((rows * (height + gap) - gap, columns * (width + gap) - gap, 3), 255, np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        grid[row * (height + gap):row * (height + gap) + height,
             column * (width + gap):column * (width + gap) + width] = image
    return grid


# --------------------------------------------------------------------------- report

def save_png(path: Path, image: np.ndarray) -> None:
    Image.fromarray(image).save(path)


def markdown_report(summary: dict, figures: dict[str, str]) -> str:
    """report.md: headline scores, a per-object table, frames and latency, the figures
    (``figures``: caption -> file name relative to the report)."""
    lines = ['# Replay evaluation', '',
             f'ADD(-S) recall at {ADD_S_THRESHOLD} d, mean over objects: '
             f'**{_fmt(summary["add_s_recall"]["mean"])}**; AR (MSSD, MSPD) mean: '
             f'{_fmt(summary["ar"]["mean"])}; SPEED mean: {_fmt(summary["speed_mean"]["mean"])}.',
             'AR here is the mean of AR_MSSD and AR_MSPD (BOP\'19 thresholds); AR_VSD needs depth '
             'and is not computed.', '',
             '| object | instances | estimated | ADD(-S) | AR_MSSD | AR_MSPD | SPEED | '
             'median rot (deg) | median trans (mm) |',
             '|---|---|---|---|---|---|---|---|---|']
    for name, obj in summary['objects'].items():
        lines.append(f'| {name} | {obj["instances"]} | {obj["estimated"]} | '
                     f'{_fmt(obj["add_s_recall"])} | {_fmt(obj["ar_mssd"])} | '
                     f'{_fmt(obj["ar_mspd"])} | {_fmt(obj["speed_mean"])} | '
                     f'{_fmt(obj["rotation_median_deg"], 2)} | '
                     f'{_fmt(obj["translation_median_mm"], 1)} |')
    frames, latency = summary['frames'], summary['latency_ms']
    lines += ['', f'Frames: {frames["published"]} published, {frames["answered"]} answered, '
              f'{frames["dropped"]} dropped.',
              'Latency (node output received - image published, ms): ' +
              ', '.join(f'{key} {_fmt(value, 0)}' for key, value in latency.items()), '']
    for caption, file_name in figures.items():
        lines += [f'## {caption}', '', f'![{caption}]({file_name})', '']
    return '\n'.join(lines)


def _fmt(value, digits: int = 3) -> str:
    return 'n/a' if value is None else f'{value:.{digits}f}'


def write_report(out_dir: Path, summary: dict, errors: dict[str, list[InstanceErrors]],
                 models: dict[str, ObjectModel], latencies_ms: dict[int, float], t0_ns: int,
                 thumbnails: list[np.ndarray]) -> Path:
    """Write the charts, the overlay grid (when ``thumbnails``) and report.md into ``out_dir``;
    returns the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    diameters = {name: models[name].diameter for name in errors}
    charts = {
        'ADD(-S) recall vs threshold': ('recall_vs_threshold.png',
                                        recall_chart(errors, diameters)),
        'Rotation error CDF': ('rotation_error_cdf.png', error_cdf_chart(
            errors, 'rotation', 180 / np.pi, 'rotation error CDF', 'deg', 30.0)),
        'Translation error CDF': ('translation_error_cdf.png', error_cdf_chart(
            errors, 'translation', 1e3, 'translation error CDF', 'mm', 50.0)),
        'ADD(-S) per frame': ('add_s_over_time.png',
                              add_s_over_time_chart(errors, diameters, t0_ns)),
        'Latency per frame': ('latency_over_time.png', latency_chart(latencies_ms, t0_ns)),
    }
    if thumbnails:
        charts['Overlays (green: ground truth, orange: estimate)'] = (
            'overlays.png', thumbnail_grid(thumbnails))
    for file_name, image in charts.values():
        save_png(out_dir / file_name, image)
    path = out_dir / 'report.md'
    path.write_text(markdown_report(summary, {caption: file_name
                                              for caption, (file_name, _) in charts.items()}))
    return path

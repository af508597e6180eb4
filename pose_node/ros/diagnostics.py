"""Health of the node for /diagnostics: input and processing rates, latency, backend, recent
problems; and per-reason throttling of warnings. Times are seconds of ``time.monotonic()``."""
import threading
from collections import deque
from dataclasses import dataclass, field

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

RATE_WINDOW_S = 5.0
PROBLEM_MEMORY_S = 10.0
"""A problem keeps the status at WARN for this long after it was last seen."""


class RateMeter:
    """Events per second over the last ``window_s`` seconds."""

    def __init__(self, window_s: float = RATE_WINDOW_S):
        self.window_s = window_s
        self._times: deque[float] = deque()

    def tick(self, now: float) -> None:
        self._times.append(now)
        self._forget(now)

    def rate_hz(self, now: float) -> float:
        self._forget(now)
        if len(self._times) < 2:
            return 0.0
        return (len(self._times) - 1) / max(self._times[-1] - self._times[0], 1e-9)

    def _forget(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()


class Throttle:
    """Lets one message per ``key`` through every ``period_s`` seconds."""

    def __init__(self, period_s: float):
        self.period_s = period_s
        self._last: dict[str, float] = {}

    def allow(self, key: str, now: float) -> bool:
        last = self._last.get(key)
        if last is not None and now - last < self.period_s:
            return False
        self._last[key] = now
        return True


@dataclass
class NodeHealth:
    """What the node reports; fed from the subscription callbacks and the worker (thread-safe).

    latencies_ms: image arrival to outputs published, recent frames; problems: per kind the last
    message and when it was seen; last_sources, last_stage_ms: see :meth:`frame_processed`."""

    backend: str
    device: str
    objects: list[str]
    input_rate: RateMeter = field(default_factory=RateMeter)
    processing_rate: RateMeter = field(default_factory=RateMeter)
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=50))
    problems: dict[str, tuple[str, float]] = field(default_factory=dict)
    frames_processed: int = 0
    last_sources: dict[str, str] = field(default_factory=dict)
    last_stage_ms: dict[str, float] = field(default_factory=dict)
    first_image: float | None = None
    last_image: float | None = None
    last_camera_info: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def image_received(self, now: float) -> None:
        with self._lock:
            self.input_rate.tick(now)
            self.last_image = now
            if self.first_image is None:
                self.first_image = now

    def camera_info_received(self, now: float) -> None:
        with self._lock:
            self.last_camera_info = now

    def frame_processed(self, now: float, latency_ms: float, sources: dict[str, str],
                        stage_ms: dict[str, float]) -> None:
        """A frame was published; ``sources``: per published object where its pose started
        from ('prior' when tracked, else the coarse estimator); ``stage_ms``: milliseconds per
        pipeline stage, summed over the objects."""
        with self._lock:
            self.last_sources = dict(sources)
            self.last_stage_ms = dict(stage_ms)
            self.processing_rate.tick(now)
            self.latencies_ms.append(latency_ms)
            self.frames_processed += 1

    def camera_info_missing_s(self, now: float, timeout_s: float) -> float | None:
        """How long images have been arriving (the last within ``timeout_s``) without any
        camera_info for more than ``timeout_s`` seconds before it; None when that is not so."""
        with self._lock:
            if self.last_image is None or now - self.last_image > timeout_s:
                return None
            if self.last_camera_info is None:
                return float('inf') if now - self.first_image > timeout_s else None
            gap = self.last_image - self.last_camera_info
            return gap if gap > timeout_s else None

    def problem(self, kind: str, message: str, now: float) -> None:
        with self._lock:
            self.problems[kind] = (message, now)

    def status(self, now: float, dropped: int, hardware_id: str) -> DiagnosticStatus:
        """One DiagnosticStatus: WARN while a problem is recent (its message first), else OK."""
        with self._lock:
            recent = sorted(((seen, kind, message) for kind, (message, seen)
                             in self.problems.items() if now - seen <= PROBLEM_MEMORY_S),
                            reverse=True)
            latencies = sorted(self.latencies_ms)
            values = {
                'input_rate_hz': f'{self.input_rate.rate_hz(now):.2f}',
                'processing_rate_hz': f'{self.processing_rate.rate_hz(now):.2f}',
                'latency_ms_median': f'{latencies[len(latencies) // 2]:.1f}' if latencies else '',
                'latency_ms_max': f'{latencies[-1]:.1f}' if latencies else '',
                'frames_processed': str(self.frames_processed),
                'frames_dropped': str(dropped),
                'last_frame_sources': ', '.join(f'{name}={source}' for name, source
                                                in sorted(self.last_sources.items())),
                'last_frame_stage_ms': ', '.join(f'{stage}={ms:.0f}' for stage, ms
                                                 in self.last_stage_ms.items()),
                'camera_info_age_s': ('never' if self.last_camera_info is None
                                      else f'{now - self.last_camera_info:.1f}'),
                'backend': self.backend,
                'device': self.device,
                'objects': ', '.join(self.objects),
            }
            for kind, (message, seen) in sorted(self.problems.items()):
                values[f'last_error.{kind}'] = f'{message} ({now - seen:.1f} s ago)'
        level = DiagnosticStatus.WARN if recent else DiagnosticStatus.OK
        message = '; '.join(f'{kind}: {text}' for _, kind, text in recent) or 'ok'
        return DiagnosticStatus(level=level, name='pose_node: pipeline', message=message,
                                hardware_id=hardware_id,
                                values=[KeyValue(key=k, value=v) for k, v in values.items()])


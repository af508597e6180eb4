"""Pairing images with their camera_info (and optional mask) by stamp, keeping only the newest
frame: subscription callbacks hand messages in and never wait; the worker takes whole frames.

Plain Python (no rclpy): stamps are integer nanoseconds, messages are opaque objects.
"""
import threading
import time
from collections import deque
from dataclasses import dataclass

# Enough for a camera_info or mask stream to run a few frames ahead of its images.
COMPANION_DEPTH = 30


@dataclass
class MatchedFrame:
    """An image with the camera_info (and mask, when required) nearest its stamp (nanoseconds).
    received: time.monotonic() when the image arrived."""

    stamp_ns: int
    image: object
    camera_info: object
    mask: object | None
    received: float


@dataclass
class _Pending:
    stamp_ns: int
    image: object
    received: float


class FrameInbox:
    """Holds the newest unprocessed image and recent camera_infos and masks.

    slop_ns: the largest stamp difference that still pairs two messages; need_mask: whether a
    frame is complete only with a mask. An image that is replaced before it is complete counts as
    dropped; so does one still incomplete ``timeout_s`` after it arrived (reported by ``take``).
    """

    def __init__(self, slop_ns: int, need_mask: bool, timeout_s: float):
        self.slop_ns = slop_ns
        self.need_mask = need_mask
        self.timeout_s = timeout_s
        self.dropped = 0
        self._pending: _Pending | None = None
        self._last_taken_ns: int | None = None
        self._infos: deque[tuple[int, object]] = deque(maxlen=COMPANION_DEPTH)
        self._masks: deque[tuple[int, object]] = deque(maxlen=COMPANION_DEPTH)
        self._changed = threading.Condition()

    def put_image(self, stamp_ns: int, image: object) -> str | None:
        """Offer an image; returns why it was refused (stamp not newer than the last image taken
        or pending), None when accepted."""
        with self._changed:
            known = (self._last_taken_ns, self._pending.stamp_ns if self._pending else None)
            newest = max((stamp for stamp in known if stamp is not None), default=None)
            if newest is not None and stamp_ns <= newest:
                return (f'image stamp {stamp_ns * 1e-9:.9f} s is not newer than the last image '
                        f'({newest * 1e-9:.9f} s): stale or out of order, dropped')
            if self._pending is not None:
                self.dropped += 1
            self._pending = _Pending(stamp_ns, image, time.monotonic())
            self._changed.notify_all()
        return None

    def put_camera_info(self, stamp_ns: int, info: object) -> None:
        with self._changed:
            self._infos.append((stamp_ns, info))
            self._changed.notify_all()

    def put_mask(self, stamp_ns: int, mask: object) -> None:
        with self._changed:
            self._masks.append((stamp_ns, mask))
            self._changed.notify_all()

    def take(self, wait_s: float) -> tuple[MatchedFrame | None, str | None]:
        """Wait up to ``wait_s`` for the pending image to be complete. Returns the frame (or
        None) and, when the pending image timed out and was dropped, the reason."""
        with self._changed:
            deadline = time.monotonic() + wait_s
            while True:
                frame, problem = self._complete_or_expired()
                remaining = deadline - time.monotonic()
                if frame is not None or problem is not None or remaining <= 0:
                    return frame, problem
                self._changed.wait(remaining)

    def set_slop(self, slop_ns: int) -> None:
        with self._changed:
            self.slop_ns = slop_ns

    def set_timeout(self, timeout_s: float) -> None:
        with self._changed:
            self.timeout_s = timeout_s

    def _complete_or_expired(self) -> tuple[MatchedFrame | None, str | None]:
        pending = self._pending
        if pending is None:
            return None, None
        info = nearest(self._infos, pending.stamp_ns, self.slop_ns)
        mask = nearest(self._masks, pending.stamp_ns, self.slop_ns) if self.need_mask else None
        if info is not None and (mask is not None or not self.need_mask):
            self._pending = None
            self._last_taken_ns = pending.stamp_ns
            return MatchedFrame(pending.stamp_ns, pending.image, info, mask, pending.received), None
        if time.monotonic() - pending.received > self.timeout_s:
            self._pending = None
            self.dropped += 1
            missing = ' and '.join(name for name, found in (('camera_info', info), ('mask', mask))
                                   if found is None and (name == 'camera_info' or self.need_mask))
            return None, (f'no {missing} within {self.slop_ns * 1e-9:.3f} s of the image stamp '
                          f'{pending.stamp_ns * 1e-9:.9f} s after {self.timeout_s:.1f} s: '
                          f'image dropped')
        return None, None


def nearest(items: deque, stamp_ns: int, slop_ns: int) -> object | None:
    """The message of ``items`` ((stamp_ns, message) pairs) nearest ``stamp_ns`` within
    ``slop_ns``, or None."""
    best, best_gap = None, slop_ns
    for item_stamp, message in items:
        gap = abs(item_stamp - stamp_ns)
        if gap <= best_gap:
            best, best_gap = message, gap
    return best

"""`ReplayCamera`: a `Driver` that streams frames rendered beforehand, at an exact rate.

``focaltrack bench`` measures the live pipeline with it, so the numbers are the pipeline's
and not the simulator's: rendering a 512² frame takes ~0.1 s on a laptop CPU, which would
cap a simulated camera at ~10 fps and eat the cores the analysis needs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np

from focaltrack.drivers.base import (
    CameraInfo,
    CameraTimeoutError,
    DriverError,
    Frame,
    StreamEnded,
)

__all__ = ["ReplayCamera"]


class ReplayCamera:
    """A `Driver` that streams pre-rendered frames at a fixed rate, like a camera.

    Frame ``k`` of a stream is due at ``t0 + k · period`` and stamped with that time
    (``t_acq_s``); `next_frame` waits until it is due. A reader that falls behind gets the
    frames it missed with their own time stamps, as from a camera's buffer (up to
    ``buffer_frames``; older ones are counted in `dropped_frames`, as a circular buffer
    overflow). The focus drive is ideal (moves at once). Frames wrap around when the
    sequence is exhausted.
    """

    def __init__(
        self,
        frames: np.ndarray,
        *,
        pixel_size_um: float,
        exposure_ms: float = 10.0,
        bit_depth: int = 16,
        buffer_frames: int = 256,
    ) -> None:
        if frames.ndim != 3 or len(frames) == 0:
            raise ValueError(f"frames must be a non-empty (N, H, W) stack, got {frames.shape}")
        self._frames = frames
        self._px = float(pixel_size_um)
        self._exposure_ms = float(exposure_ms)
        self._bits = int(bit_depth)
        self._buffer = int(buffer_frames)
        self._z = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._streaming = False
        self._t0_mono = 0.0
        self._t0_wall = 0.0
        self._period_s = 0.0
        self._next = 0
        self._index0 = 0
        self._dropped = 0
        self._closed = False

    def describe(self) -> CameraInfo:
        _, h, w = self._frames.shape
        return CameraInfo(
            width=int(w),
            height=int(h),
            bit_depth=self._bits,
            pixel_size_um=self._px,
            exposure_ms=self._exposure_ms,
            name="replay",
            focus_device="Z",
        )

    def set_exposure_ms(self, exposure_ms: float) -> None:
        self._exposure_ms = float(exposure_ms)

    def move_z(self, z_um: float, *, timeout_s: float = 5.0, settle_s: float = 0.0) -> None:
        self._z = float(z_um)

    def get_z(self) -> float:
        return self._z

    def snap(self, *, timeout_s: float = 5.0) -> Frame:
        time.sleep(self._exposure_ms / 1000.0)
        return Frame(self._frames[0].copy(), 0, time.time(), self._z, self._exposure_ms)

    def start_stream(self, interval_ms: float = 0.0, *, n_frames: int | None = None) -> None:
        if self._closed:
            raise DriverError("the replay camera is closed")
        with self._lock:
            if self._streaming:
                raise DriverError("already streaming")
            self._period_s = max(float(interval_ms), self._exposure_ms) / 1000.0
            self._stop = threading.Event()
            self._t0_mono = time.monotonic()
            self._t0_wall = time.time()
            self._index0 += self._next
            self._next = 0
            self._streaming = True

    def next_frame(self, *, timeout_s: float = 1.0) -> Frame:
        if not self._streaming:
            raise StreamEnded("not streaming")
        k = self._next
        now = time.monotonic()
        if self._period_s > 0:
            # Frames older than the buffer were overwritten: skip (and count) them.
            newest = int((now - self._t0_mono) / self._period_s)
            if newest - k >= self._buffer:
                skip = newest - k - self._buffer + 1
                self._dropped += skip
                k += skip
        due = self._t0_mono + k * self._period_s
        wait = due - now
        if wait > timeout_s:
            if self._stop.wait(timeout_s):
                raise StreamEnded("the stream was stopped")
            raise CameraTimeoutError(f"no frame within {timeout_s} s")
        if wait > 0 and self._stop.wait(wait):
            raise StreamEnded("the stream was stopped")
        if not self._streaming:
            raise StreamEnded("the stream was stopped")
        self._next = k + 1
        pixels = self._frames[k % len(self._frames)]
        return Frame(
            pixels, self._index0 + k, self._t0_wall + k * self._period_s, self._z, self._exposure_ms
        )

    def frames(self, *, timeout_s: float = 1.0) -> Iterator[Frame]:
        while True:
            try:
                yield self.next_frame(timeout_s=timeout_s)
            except StreamEnded:
                return

    def stop_stream(self) -> None:
        with self._lock:
            self._streaming = False
            self._stop.set()

    @property
    def dropped_frames(self) -> int:
        return self._dropped

    def close(self) -> None:
        self.stop_stream()
        self._closed = True

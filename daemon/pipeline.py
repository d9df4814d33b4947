"""The live pipeline: a driver thread and an analysis thread joined by a drop-oldest queue.

::

    driver thread ── Frame ──▶ newest-frame queue (queue_frames) ──▶ analysis thread
        │                          full: drop the oldest,          localize → track →
        └─▶ recorder (frames)       count analysis_behind           sink (publish, record)

* The driver thread is the only thread that talks to the camera while live (``move_z`` and
  ``get_z`` from the control side go through the driver's own lock between polls). It never
  waits for the analysis: a full queue loses its oldest frame.
* Camera faults (`CameraTimeoutError`, a stopped sequence) are reported through
  ``on_fault``; the stream is restarted up to ``restart_attempts`` times with a doubling
  back-off, and ``on_recovered`` is called when frames come again. When every attempt fails
  the pipeline ends and ``on_failed`` is called.
* The analysis thread always takes the newest frame. The localizer and tracker can be
  replaced between frames (`LivePipeline.swap_model`).

The driver itself is built by `focaltrack.daemon.microscope.open_service_driver`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from focaltrack.drivers.base import CameraTimeoutError, DriverError, StreamEnded
from focaltrack.models.analyser import FrameAnalyser

if TYPE_CHECKING:
    from focaltrack.daemon.metrics import ServiceMetrics
    from focaltrack.drivers.base import Driver, Frame
    from focaltrack.models.localizer import Localizations, Localizer
    from focaltrack.models.tracker import KalmanTracker
    from focaltrack.records import Tracks

log = logging.getLogger(__name__)

__all__ = [
    "AnalysisModel",
    "FrameSink",
    "LivePipeline",
    "NewestFrameQueue",
]

# ============================================================================ queue


class NewestFrameQueue:
    """A bounded queue that keeps the newest frames: `put` never blocks; when full, the
    oldest frame is dropped and counted. `get` returns the newest frame and discards (and
    counts) any older ones still waiting, so the analysis always works on the newest."""

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self._dq: deque[Frame] = deque()
        self._cap = int(capacity)
        self._cond = threading.Condition()
        self.dropped = 0
        self._closed = False

    def put(self, frame: Frame) -> int:
        """Add ``frame``; returns how many older frames were dropped to make room."""
        with self._cond:
            dropped = 0
            while len(self._dq) >= self._cap:
                self._dq.popleft()
                dropped += 1
            self._dq.append(frame)
            self.dropped += dropped
            self._cond.notify()
            return dropped

    def get(self, timeout_s: float) -> tuple[Frame | None, int]:
        """(newest frame or None on timeout/close, older frames skipped)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not self._dq and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None, 0
                self._cond.wait(left)
            if not self._dq:
                return None, 0
            frame = self._dq.pop()
            skipped = len(self._dq)
            self._dq.clear()
            self.dropped += skipped
            return frame, skipped

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# ============================================================================ pipeline


@dataclass(frozen=True, slots=True)
class AnalysisModel:
    """What the analysis thread needs: the localizer, a fresh tracker, and a name."""

    name: str
    localizer: Localizer
    make_tracker: Callable[[], KalmanTracker]

    def analyser(self) -> FrameAnalyser:
        """A `FrameAnalyser` with a fresh tracker: the one analysis live and offline."""
        return FrameAnalyser(self.localizer, self.make_tracker())


class FrameSink(Protocol):
    """Where the analysis sends each frame's results (the service's live session: PUB,
    recording, metrics; `focaltrack.daemon.live.LiveSession`)."""

    def on_frame_result(
        self,
        frame: Frame,
        locs: Localizations,
        tracks: Tracks,
        inference_s: float,
        model_name: str,
    ) -> None: ...


class LivePipeline:
    """Driver + analysis threads for one live session. `start` returns at once; `stop`
    ends both threads (bounded) and stops the camera stream."""

    def __init__(
        self,
        driver: Driver,
        model: AnalysisModel,
        sink: FrameSink,
        metrics: ServiceMetrics,
        *,
        interval_ms: float = 0.0,
        queue_frames: int = 2,
        frame_timeout_s: float = 2.0,
        restart_attempts: int = 3,
        restart_backoff_s: float = 0.5,
        on_raw_frame: Callable[[Frame], None] | None = None,
        on_fault: Callable[[str, int], None] | None = None,
        on_recovered: Callable[[], None] | None = None,
        on_failed: Callable[[str], None] | None = None,
        on_analysis_error: Callable[[str], None] | None = None,
        watchdog: Callable[[], None] | None = None,
    ) -> None:
        self.driver = driver
        self._model = model
        self._pending_model: AnalysisModel | None = None
        self.sink = sink
        self.metrics = metrics
        self.interval_ms = float(interval_ms)
        self.queue = NewestFrameQueue(queue_frames)
        self.frame_timeout_s = float(frame_timeout_s)
        self.restart_attempts = int(restart_attempts)
        self.restart_backoff_s = float(restart_backoff_s)
        self.on_raw_frame = on_raw_frame
        self.on_fault = on_fault
        self.on_recovered = on_recovered
        self.on_failed = on_failed
        self.on_analysis_error = on_analysis_error
        self.watchdog = watchdog
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.frames_acquired = 0
        self.frames_analysed = 0
        self.frames_dropped_camera = 0
        self.last_error: str | None = None
        self._analysis_errors = 0

    # ------------------------------------------------------------------ control
    @property
    def model_name(self) -> str:
        return (self._pending_model or self._model).name

    @property
    def frames_dropped(self) -> int:
        return self.frames_dropped_camera + self.queue.dropped

    def counts(self) -> dict[str, int]:
        """Frames so far: acquired, analysed, and dropped by reason (camera, analysis_behind)."""
        return {
            "acquired": self.frames_acquired,
            "analysed": self.frames_analysed,
            "camera": self.frames_dropped_camera,
            "analysis_behind": self.queue.dropped,
        }

    @property
    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def start(self) -> None:
        """Start the camera stream (errors raise here) and both threads."""
        self.driver.start_stream(self.interval_ms)
        self._camera_dropped0 = int(self.driver.dropped_frames)
        self._threads = [
            threading.Thread(target=self._acquire, name="focaltrack-driver", daemon=True),
            threading.Thread(target=self._analyse, name="focaltrack-analysis", daemon=True),
        ]
        for t in self._threads:
            t.start()

    def swap_model(self, model: AnalysisModel) -> None:
        """Use ``model`` from the next frame on (a new tracker starts with it)."""
        self._pending_model = model

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop both threads and the stream; True if they ended within ``timeout_s``."""
        self._stop.set()
        self.queue.close()
        try:
            self.driver.stop_stream()  # next_frame sees it and ends
        except DriverError as e:
            log.warning("stopping the camera stream: %s", e)
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(max(deadline - time.monotonic(), 0.0))
        alive = [t.name for t in self._threads if t.is_alive()]
        if alive:
            log.error("live threads still running after %.1f s: %s", timeout_s, ", ".join(alive))
        return not alive

    # ------------------------------------------------------------------ driver thread
    def _acquire(self) -> None:
        m = self.metrics
        failures = 0
        while not self._stop.is_set():
            msg = ""  # why no frame came (set where frame is None)
            try:
                frame = self.driver.next_frame(timeout_s=self.frame_timeout_s)
            except StreamEnded:
                if self._stop.is_set():
                    break
                frame = None
                msg = "the camera stream ended"
            except (CameraTimeoutError, DriverError) as e:
                if self._stop.is_set():
                    break
                frame = None
                msg = str(e)
            if frame is None:
                failures += 1
                self.last_error = msg
                if failures > self.restart_attempts:
                    log.error("camera: giving up after %d restarts: %s", failures - 1, msg)
                    if self.on_failed is not None:
                        self.on_failed(msg)
                    self.queue.close()
                    return
                log.warning(
                    "camera fault (attempt %d/%d): %s", failures, self.restart_attempts, msg
                )
                if self.on_fault is not None:
                    self.on_fault(msg, failures)
                if self.watchdog is not None:  # this loop is alive, the camera is not
                    self.watchdog()
                if self._stop.wait(self.restart_backoff_s * 2 ** (failures - 1)):
                    break
                self._restart_stream()
                continue
            if failures:
                failures = 0
                self.last_error = None
                if self.on_recovered is not None:
                    self.on_recovered()
            self.frames_acquired += 1
            m.frames_acquired.inc()
            cam = int(self.driver.dropped_frames) - self._camera_dropped0
            if cam > self.frames_dropped_camera:
                m.frames_dropped.labels(reason="camera").inc(cam - self.frames_dropped_camera)
                self.frames_dropped_camera = cam
            if self.on_raw_frame is not None:
                self.on_raw_frame(frame)
            skipped = self.queue.put(frame)
            if skipped:
                m.frames_dropped.labels(reason="analysis_behind").inc(skipped)
            if self.watchdog is not None:
                self.watchdog()

    def _restart_stream(self) -> None:
        try:
            self.driver.stop_stream()
        except DriverError as e:
            log.warning("camera: stop before restart failed: %s", e)
        try:
            self.driver.start_stream(self.interval_ms)
            self._camera_dropped0 = int(self.driver.dropped_frames) - self.frames_dropped_camera
        except (DriverError, ValueError) as e:
            log.warning("camera: restart failed: %s", e)

    # ------------------------------------------------------------------ analysis thread
    def _analyse(self) -> None:
        m = self.metrics
        analyser = self._model.analyser()
        last_t: float | None = None
        while not self._stop.is_set():
            frame, skipped = self.queue.get(timeout_s=0.2)
            if skipped:
                m.frames_dropped.labels(reason="analysis_behind").inc(skipped)
            if frame is None:
                if self.queue.closed and not self._stop.is_set():
                    return  # the driver thread gave up
                continue
            pending = self._pending_model
            if pending is not None:
                self._model, self._pending_model = pending, None
                analyser = pending.analyser()
                last_t = None
                log.info("live analysis now uses model %s", pending.name)
            if last_t is not None and not frame.t_acq_s > last_t:
                continue  # the tracker needs strictly increasing times
            try:
                # Tracked in absolute depth so that a focus move is not seen as motion;
                # published, like the localizations, as defocus at this frame's focus.
                locs, at_focus = analyser.analyse(
                    frame.pixels, frame.index, frame.t_acq_s, frame.stage_z_um
                )
                inference_s = analyser.last_inference_s
                tracks = at_focus.record(frame.index)
                last_t = frame.t_acq_s
                m.inference_seconds.observe(inference_s)
                m.localizations_per_frame.observe(len(locs))
                m.live_tracks.set(len(tracks))
                self.sink.on_frame_result(frame, locs, tracks, inference_s, self._model.name)
                self.frames_analysed += 1
                m.frames_analysed.inc()
            except Exception as e:  # one bad frame must not end the live session
                self._analysis_errors += 1
                msg = f"analysis of frame {frame.index} failed: {type(e).__name__}: {e}"
                self.last_error = msg
                # Reported for the first few and then every 2^k-th: a model that fails on
                # every frame must not flood the log and the event topic.
                if self._analysis_errors <= 3 or math.log2(self._analysis_errors).is_integer():
                    log.exception("%s (%d so far)", msg, self._analysis_errors)
                    if self.on_analysis_error is not None:
                        self.on_analysis_error(f"{msg} ({self._analysis_errors} so far)")

"""`MicroManagerDriver`: the `Driver` Protocol over any MMCore-like core.

The same code runs on pycromanager's ``Core`` (pymmcore in-process through the Python
backend, or MMCoreJ over the Java ZMQ bridge) and on `SimulatedCore`. It calls only these
core methods (snake_case, as both pycromanager backends expose them):

    get_camera_device, get_focus_device, get_image_width, get_image_height,
    get_bytes_per_pixel, get_image_bit_depth, get_pixel_size_um, get_exposure,
    set_exposure, set_position, get_position, device_busy, snap_image, get_image,
    start_continuous_sequence_acquisition, start_sequence_acquisition,
    get_remaining_image_count, pop_next_tagged_image, is_sequence_running,
    stop_sequence_acquisition, get_buffer_total_capacity, is_buffer_overflowed

Design decisions (each one is what a real core needs):

* **One lock.** Every core call goes through one `threading.RLock` (shared with other users
  of the same core when passed in). MMCore is not safe to drive from several threads and
  the Java bridge serialises anyway. Acquiring the lock itself has a timeout
  (``lock_timeout_s``), so a hung core call never hangs the caller silently.
* **Focus moves poll, they do not block.** ``wait_for_device`` blocks inside the core for
  up to the core's own timeout (5 s by default) while holding the core, which would stall
  the frame stream. `move_z` instead calls ``set_position`` and then polls ``device_busy``
  and ``get_position`` with the lock released between polls, until the stage is idle *and*
  within ``z_tolerance_um`` of the target, or ``timeout_s`` passes (`StageTimeoutError`).
  A stage that reports idle but never gets there (stuck, or quantised coarser than the
  tolerance) is a timeout too: raise ``z_tolerance_um`` for coarse drives.
* **Snaps have a timeout.** ``snap_image`` blocks in the camera adapter with no timeout of
  its own, so it runs on a helper thread; if it does not return within ``timeout_s`` the
  driver raises `CameraTimeoutError` (the helper still holds the core until the camera
  returns; later calls then fail with a lock timeout instead of hanging).
* **Streaming** uses the circular buffer: ``start_continuous_sequence_acquisition`` (or the
  finite ``start_sequence_acquisition(n, interval, stop_on_overflow=True)``); `next_frame`
  polls ``get_remaining_image_count`` / ``pop_next_tagged_image`` with short sleeps until
  its timeout. Tags are strings on pymmcore and may be numbers over the Java bridge: both
  are parsed. Pixels that arrive flat (Java bridge) are reshaped by ``Width``/``Height``.
* **Drops.** In continuous mode MMCore does not stop when the buffer is full: the camera
  adapter clears the buffer and carries on. In the MMCore source (CircularBuffer::Clear)
  the clear also *resets* the per-camera ``ImageNumber`` to 0, and ``ElapsedTime-ms``
  restarts too when the camera does not supply its own. So the driver handles both a jump
  in ``ImageNumber`` (frames missing, counted exactly) and a step backwards (buffer
  cleared: the lost count is estimated from the camera's time stamps when they kept
  running, else as the buffer capacity plus the new number). `Frame.index` is the
  driver's continuation of the camera's numbering across such resets, so gaps in
  ``Frame.index`` are always the dropped frames, and `dropped_frames` is their running sum
  over the driver's life.
* **Time stamps.** ``t_acq_s`` = the UNIX time just before the sequence was started +
  ``ElapsedTime-ms`` / 1000 (MMCore's elapsed time counts from the sequence start when the
  core stamps it; cameras that stamp it themselves usually count from their sequence
  start too). If the first frame's elapsed time is implausible for a sequence-relative
  clock (before the start, or later than "now"), the stamps are anchored on that frame's
  arrival instead. After a buffer reset whose elapsed times restarted, the clock is
  re-anchored from the estimated frame period. For `snap`, ``t_acq_s`` is the time just
  before ``snap_image`` was called and ``index`` counts snaps.
* **Stage z per frame** is the last commanded-and-confirmed (or read) focus position, not a
  per-frame ``get_position``: a query per frame costs a bridge round trip (about a
  millisecond over the Java bridge, more on serial stages) and would contend for the core
  lock with the frame loop at camera rate. During a move the polled positions update it.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import numpy as np

from focaltrack.drivers.base import (
    CameraInfo,
    CameraTimeoutError,
    DriverError,
    Frame,
    StageTimeoutError,
    StreamEnded,
)

__all__ = ["MicroManagerDriver", "NoPixelSizeError", "StreamEnded"]

#: How a caller of the Python API gives the pixel size Micro-Manager lacks; the command line
#: and the service say their own way (`NoPixelSizeError.with_remedy`).
API_PIXEL_SIZE_REMEDY = (
    "pass pixel_size_um=<camera pixel / magnification, in µm> to the driver "
    "(drivers.open_driver(..., pixel_size_um=...))"
)


class NoPixelSizeError(DriverError):
    """Micro-Manager has no pixel size for the current objective and none was given.
    ``remedy`` says how the caller gives one."""

    def __init__(self, core_px: float, remedy: str = API_PIXEL_SIZE_REMEDY) -> None:
        self.core_px = core_px
        self.remedy = remedy
        super().__init__(
            "Micro-Manager reports no pixel size (get_pixel_size_um() returned "
            f"{core_px}): there is no pixel-size configuration for the current objective. "
            f"Either define one in Micro-Manager (Devices > Pixel Size Calibration) or {remedy}."
        )

    def with_remedy(self, remedy: str) -> NoPixelSizeError:
        """The same error, telling the user to give the pixel size ``remedy``'s way."""
        return NoPixelSizeError(self.core_px, remedy)


_PIXEL_DTYPES = {1: np.uint8, 2: np.uint16}


def _tag(tags: Any, key: str) -> Any:
    try:
        return tags[key]
    except (KeyError, TypeError, IndexError):
        getter = getattr(tags, "get", None)
        return getter(key) if callable(getter) else None


def _as_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        out = float(str(value).strip())
    except ValueError:
        return None
    return out if math.isfinite(out) else None


def _as_int(value: Any) -> int | None:
    f = _as_float(value)
    return None if f is None else round(f)


def _parse_local_time(value: Any) -> float | None:
    """MMCore's ``TimeReceivedByCore`` ("YYYY-mm-dd HH:MM:SS.ffffff", local time) → epoch s."""
    if value is None:
        return None
    try:
        return datetime.strptime(str(value).strip(), "%Y-%m-%d %H:%M:%S.%f").timestamp()
    except ValueError:
        return None


class MicroManagerDriver:
    """A microscope behind an MMCore-like ``core`` (see the module docstring).

    ``pixel_size_um`` overrides the core's pixel size (sample plane, µm). It is required
    when Micro-Manager has no pixel-size configuration (``get_pixel_size_um()`` returns 0).
    ``lock`` lets several users of one core share its lock; by default the driver makes one.
    ``on_close`` runs once in `close` (the factory uses it to shut a headless core down).
    """

    def __init__(
        self,
        core: Any,
        *,
        pixel_size_um: float | None = None,
        lock: threading.RLock | None = None,
        z_tolerance_um: float = 0.05,
        poll_s: float = 0.001,
        lock_timeout_s: float = 10.0,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        if pixel_size_um is not None and not (math.isfinite(pixel_size_um) and pixel_size_um > 0):
            raise ValueError(f"pixel_size_um must be a positive number, got {pixel_size_um!r}")
        if not z_tolerance_um > 0:
            raise ValueError(f"z_tolerance_um must be positive, got {z_tolerance_um!r}")
        self._core = core
        self._lock = lock if lock is not None else threading.RLock()
        self._z_tol = float(z_tolerance_um)
        self._poll_s = float(poll_s)
        self._lock_timeout_s = float(lock_timeout_s)
        self._on_close = on_close
        self._closed = False

        with self._locked():
            self._camera = str(core.get_camera_device())
            self._focus = str(core.get_focus_device())
            core_px = float(core.get_pixel_size_um())
        if not self._camera:
            raise DriverError(
                "Micro-Manager has no camera device selected (get_camera_device() is empty); "
                "load a configuration with a camera and set Core-Camera"
            )
        if not self._focus:
            raise DriverError(
                "Micro-Manager has no focus device (get_focus_device() is empty); "
                "set Core-Focus to the z drive in the configuration"
            )
        if pixel_size_um is not None:
            self._pixel_size_um = float(pixel_size_um)
        elif math.isfinite(core_px) and core_px > 0:
            self._pixel_size_um = core_px
        else:
            raise NoPixelSizeError(core_px)

        self._z = self.get_z()
        self._snap_count = 0
        self._dropped = 0
        # Stream state.
        self._streaming = False
        self._finite: int | None = None
        self._delivered = 0
        self._t0 = 0.0
        self._stream_exposure_ms = math.nan
        self._capacity = 0
        self._last_number: int | None = None
        self._last_index = -1
        self._index_offset = 0
        self._last_elapsed_ms: float | None = None
        self._last_received: float | None = None
        self._last_t: float | None = None
        self._nominal_period_s = 0.0
        self._clock_offset_s = 0.0  # t_acq = t0 + elapsed/1000 + clock_offset
        self._run_start: tuple[int, float] | None = None  # (number, elapsed_ms)
        self._run_period_s = 0.0
        self._run_len = 0

    # ----------------------------------------------------------------- plumbing

    @contextmanager
    def _locked(self) -> Iterator[Any]:
        if not self._lock.acquire(timeout=self._lock_timeout_s):
            raise DriverError(
                f"the Micro-Manager core stayed busy for more than {self._lock_timeout_s} s "
                "(an earlier call, e.g. a snap whose camera stopped responding, still holds it)"
            )
        try:
            yield self._core
        finally:
            self._lock.release()

    @property
    def core(self) -> Any:
        """The underlying core (use `lock` around any direct call)."""
        return self._core

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def _check_open(self) -> None:
        if self._closed:
            raise DriverError("driver is closed")

    # ----------------------------------------------------------------- describe

    def describe(self) -> CameraInfo:
        self._check_open()
        with self._locked() as core:
            width = int(core.get_image_width())
            height = int(core.get_image_height())
            bpp = int(core.get_bytes_per_pixel())
            bit_depth = int(core.get_image_bit_depth())
            exposure = float(core.get_exposure())
        if bpp not in _PIXEL_DTYPES:
            raise DriverError(
                f"camera {self._camera} delivers {bpp} bytes per pixel; focaltrack supports "
                "8- and 16-bit monochrome cameras only"
            )
        return CameraInfo(
            width=width,
            height=height,
            bit_depth=bit_depth,
            pixel_size_um=self._pixel_size_um,
            exposure_ms=exposure,
            name=self._camera,
            focus_device=self._focus,
        )

    def set_exposure_ms(self, exposure_ms: float) -> None:
        self._check_open()
        with self._locked() as core:
            core.set_exposure(float(exposure_ms))

    # ----------------------------------------------------------------- focus

    def get_z(self) -> float:
        self._check_open()
        with self._locked() as core:
            z = float(core.get_position(self._focus))
        self._z = z
        return z

    def move_z(self, z_um: float, *, timeout_s: float = 5.0, settle_s: float = 0.0) -> None:
        """Move the focus drive to ``z_um`` and wait until it is there (or raise).

        Done means ``device_busy`` is false and ``get_position`` is within
        ``z_tolerance_um`` of the target; then ``settle_s`` is slept.
        """
        self._check_open()
        z_um = float(z_um)
        if not math.isfinite(z_um):
            raise ValueError(f"z_um must be finite, got {z_um!r}")
        deadline = time.monotonic() + float(timeout_s)
        with self._locked() as core:
            core.set_position(self._focus, z_um)
        pos = math.nan
        busy = True
        while True:
            with self._locked() as core:
                busy = bool(core.device_busy(self._focus))
                pos = float(core.get_position(self._focus))
            self._z = pos
            if not busy and abs(pos - z_um) <= self._z_tol:
                break
            if time.monotonic() >= deadline:
                raise StageTimeoutError(
                    f"focus drive {self._focus!r} did not reach z = {z_um:.3f} µm within "
                    f"{timeout_s} s: it is at {pos:.3f} µm"
                    + (" and still reports busy" if busy else " and reports idle")
                    + f" (tolerance {self._z_tol} µm)"
                )
            time.sleep(self._poll_s)
        if settle_s > 0:
            time.sleep(settle_s)

    # ----------------------------------------------------------------- pixels

    def _pixels(self, pix: Any, width: int | None, height: int | None) -> np.ndarray:
        arr = np.asarray(pix)
        if arr.ndim == 1:  # Java bridge: flat array
            if not width or not height or width * height != arr.size:
                with self._locked() as core:
                    width = int(core.get_image_width())
                    height = int(core.get_image_height())
            if width * height != arr.size:
                raise DriverError(
                    f"image of {arr.size} pixels does not match the camera's {width} x {height}"
                )
            arr = arr.reshape(height, width)
        if arr.ndim != 2:
            raise DriverError(f"expected a 2-D monochrome image, got shape {arr.shape}")
        if arr.dtype == np.int16:  # a signed view of 16-bit data
            arr = arr.view(np.uint16)
        if arr.dtype not in (np.uint8, np.uint16):
            raise DriverError(
                f"camera delivers {arr.dtype} pixels; focaltrack supports 8- and 16-bit "
                "monochrome cameras only"
            )
        return arr

    # ----------------------------------------------------------------- snap

    def snap(self, *, timeout_s: float = 5.0) -> Frame:
        self._check_open()
        if self._streaming:
            raise DriverError("cannot snap while streaming: call stop_stream() first")
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                with self._locked() as core:
                    exposure = float(core.get_exposure())
                    result["t"] = time.time()
                    core.snap_image()
                    result["pix"] = core.get_image()
                    result["exposure"] = exposure
            except BaseException as exc:  # handed to the caller below
                result["error"] = exc

        worker = threading.Thread(target=work, name="focaltrack-snap", daemon=True)
        worker.start()
        worker.join(timeout_s)
        if worker.is_alive():
            raise CameraTimeoutError(
                f"camera {self._camera!r} did not deliver a snapped image within {timeout_s} s"
            )
        if "error" in result:
            exc = result["error"]
            if isinstance(exc, DriverError):
                raise exc
            raise DriverError(f"snap on camera {self._camera!r} failed: {exc}") from exc
        pixels = self._pixels(result["pix"], None, None)
        index = self._snap_count
        self._snap_count += 1
        return Frame(
            pixels=pixels,
            index=index,
            t_acq_s=result["t"],
            stage_z_um=self._z,
            exposure_ms=result["exposure"],
        )

    # ----------------------------------------------------------------- stream

    @property
    def streaming(self) -> bool:
        return self._streaming

    def start_stream(self, interval_ms: float = 0.0, *, n_frames: int | None = None) -> None:
        """Start streaming; ``n_frames`` makes it a finite sequence (then `StreamEnded`).

        ``interval_ms`` 0 means as fast as the exposure allows. A finite sequence stops
        the camera on buffer overflow (reported as a `DriverError`); a continuous one
        never stops, and its overflows show up as `dropped_frames`.
        """
        self._check_open()
        if self._streaming:
            raise DriverError("already streaming: call stop_stream() first")
        if not (math.isfinite(interval_ms) and interval_ms >= 0):
            raise ValueError(f"interval_ms must be >= 0, got {interval_ms!r}")
        if n_frames is not None and n_frames < 1:
            raise ValueError(f"n_frames must be >= 1, got {n_frames!r}")
        with self._locked() as core:
            if core.is_sequence_running():
                raise DriverError(
                    "a sequence acquisition is already running on the core (started by "
                    "Micro-Manager's live mode or another program); stop it first"
                )
            self._stream_exposure_ms = float(core.get_exposure())
            self._capacity = int(core.get_buffer_total_capacity())
            self._t0 = time.time()
            if n_frames is None:
                core.start_continuous_sequence_acquisition(float(interval_ms))
            else:
                core.start_sequence_acquisition(int(n_frames), float(interval_ms), True)
        self._streaming = True
        self._finite = n_frames
        self._delivered = 0
        self._last_number = None
        self._last_elapsed_ms = None
        self._last_received = None
        self._last_t = None
        self._nominal_period_s = max(float(interval_ms), self._stream_exposure_ms, 0.0) / 1000.0
        self._clock_offset_s = 0.0
        self._index_offset = self._last_index + 1
        self._run_start = None
        self._run_period_s = 0.0
        self._run_len = 0

    def next_frame(self, *, timeout_s: float = 1.0) -> Frame:
        self._check_open()
        if not self._streaming:
            raise DriverError("not streaming: call start_stream() first")
        deadline = time.monotonic() + float(timeout_s)
        next_running_check = 0.0
        while True:
            if not self._streaming:  # stop_stream() from another thread
                raise StreamEnded("the stream was stopped")
            tagged = None
            ended = False
            overflowed = False
            with self._locked() as core:
                if int(core.get_remaining_image_count()) > 0:
                    try:
                        tagged = core.pop_next_tagged_image()
                    except IndexError:
                        tagged = None
                elif time.monotonic() >= next_running_check:
                    # Order matters: running first, then the count, so a sequence that
                    # ends between the two calls is not mistaken for an empty end.
                    if not core.is_sequence_running():
                        if int(core.get_remaining_image_count()) == 0:
                            ended = True
                            overflowed = bool(core.is_buffer_overflowed())
                    next_running_check = time.monotonic() + 0.02
            if tagged is not None:
                return self._frame_from_tagged(tagged)
            if ended:
                self._streaming = False
                if self._finite is not None and not overflowed:
                    raise StreamEnded(
                        f"finite sequence ended after {self._delivered} of {self._finite} frames"
                    )
                raise DriverError(
                    f"camera {self._camera!r} stopped the sequence acquisition"
                    + (" because the circular buffer overflowed" if overflowed else "")
                    + f" after {self._delivered} frames"
                )
            if time.monotonic() >= deadline:
                raise CameraTimeoutError(
                    f"camera {self._camera!r} delivered no frame within {timeout_s} s "
                    f"({self._delivered} frames so far in this stream)"
                )
            time.sleep(self._poll_s)

    def _frame_from_tagged(self, tagged: Any) -> Frame:
        tags = getattr(tagged, "tags", None) or {}
        pixels = self._pixels(
            tagged.pix, _as_int(_tag(tags, "Width")), _as_int(_tag(tags, "Height"))
        )
        number = _as_int(_tag(tags, "ImageNumber"))
        elapsed = _as_float(_tag(tags, "ElapsedTime-ms"))
        received = _parse_local_time(_tag(tags, "TimeReceivedByCore"))
        now = time.time()

        if number is None:  # no camera numbering: count ourselves
            number = 0 if self._last_number is None else self._last_number + 1

        # --- frame numbering and drops
        gap = 0
        if self._last_number is None:
            gap = max(number, 0)  # a fresh sequence starts at 0
        elif number > self._last_number:
            gap = number - self._last_number - 1
        else:  # numbering restarted: the core cleared a full buffer
            gap = self._estimate_lost_on_reset(number, elapsed, received)
        if self._last_number is None:
            index = self._index_offset + number
        else:
            index = self._last_index + 1 + gap
        self._index_offset = index - number
        self._dropped += gap

        # --- time stamp
        if elapsed is None:
            t = now
        elif self._last_elapsed_ms is None:
            plausible = -1000.0 <= elapsed <= (now - self._t0) * 1000.0 + 1000.0
            self._clock_offset_s = 0.0 if plausible else (now - self._t0) - elapsed / 1000.0
            t = self._t0 + elapsed / 1000.0 + self._clock_offset_s
        else:
            if elapsed < self._last_elapsed_ms and self._last_t is not None:
                # The elapsed clock restarted with the buffer: re-anchor on frame count.
                period = self._period_s()
                t_est = self._last_t + (gap + 1) * period if period else now
                self._clock_offset_s = t_est - self._t0 - elapsed / 1000.0
            t = self._t0 + elapsed / 1000.0 + self._clock_offset_s
        # --- frame period, from runs of consecutive numbers (long baselines beat the
        # millisecond rounding of core-stamped elapsed times)
        if (
            elapsed is not None
            and gap == 0
            and self._run_start is not None
            and (number > self._run_start[0])
        ):
            n0, e0 = self._run_start
            run = number - n0
            if elapsed > e0 and run >= 2 and run >= min(self._run_len, 16):
                self._run_period_s = (elapsed - e0) / 1000.0 / run
                self._run_len = run
        else:
            self._run_start = None if elapsed is None else (number, elapsed)

        self._last_number = number
        self._last_index = index
        self._last_elapsed_ms = elapsed
        self._last_received = received
        self._last_t = t
        self._delivered += 1
        return Frame(
            pixels=pixels,
            index=index,
            t_acq_s=t,
            stage_z_um=self._z,
            exposure_ms=self._stream_exposure_ms,
        )

    def _period_s(self) -> float:
        """Frame period: the longest recent run of consecutive numbers, else the nominal."""
        if self._run_period_s > 0:
            return self._run_period_s
        return self._nominal_period_s

    def _estimate_lost_on_reset(
        self, number: int, elapsed: float | None, received: float | None
    ) -> int:
        # A clear only happens to a full buffer: at least its whole capacity was discarded,
        # plus the frames numbered before this one since the clear. That is a hard floor.
        floor = max(self._capacity, 1) + max(number, 0)
        period = self._period_s()
        last_e = self._last_elapsed_ms
        by_time: float | None = None
        if elapsed is not None and last_e is not None and elapsed > last_e:
            # The camera's clock kept running across the clear: count frames by time.
            by_time = (elapsed - last_e) / 1000.0
        elif received is not None and self._last_received is not None:
            # MMCore's own wall-clock stamp (TimeReceivedByCore) never restarts.
            by_time = received - self._last_received
        if by_time is not None and by_time > 0 and period > 0:
            return max(round(by_time / period) - 1, floor)
        return floor

    def frames(self, *, timeout_s: float = 1.0) -> Iterator[Frame]:
        """Yield streamed frames until `stop_stream` or the end of a finite sequence."""
        while self._streaming:
            try:
                yield self.next_frame(timeout_s=timeout_s)
            except StreamEnded:
                return

    def stop_stream(self) -> None:
        """Stop the camera; frames still in the buffer are discarded (not counted as drops)."""
        if self._closed:
            return
        self._streaming = False
        with self._locked() as core:
            if core.is_sequence_running():
                core.stop_sequence_acquisition()
        self._streaming = False

    @property
    def dropped_frames(self) -> int:
        return self._dropped

    # ----------------------------------------------------------------- lifetime

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.stop_stream()
        finally:
            self._closed = True
            if self._on_close is not None:
                self._on_close()

    def __enter__(self) -> MicroManagerDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""`SimulatedCore`: the MMCore methods `MicroManagerDriver` calls, over the simulated microscope.

Same method names (pycromanager's snake_case), same argument forms and return types as
pymmcore 12.5.1 through pycromanager 1.0.2's Python backend, so tests drive the real
driver code:

* ``get_image()`` returns a fresh 2-D ``uint16`` array (``uint8`` for an 8-bit camera);
* ``pop_next_tagged_image()`` returns an object with ``.pix`` (2-D array) and ``.tags``
  (dict of **strings**: ``ImageNumber``, ``ElapsedTime-ms``, ``Width``, ``Height``,
  ``PixelType``, ``Camera``, ``TimeReceivedByCore``, ``Binning``) and raises `IndexError`
  when the buffer is empty;
* errors the real core reports as ``CMMError`` are `RuntimeError` here, as in pymmcore.

Circular buffer, as in MMCore (CircularBuffer.cpp and the camera adapters' sequence
threads): ``ImageNumber`` counts per camera from 0 since the buffer was last cleared.
When the buffer is full, a continuous sequence (or a finite one started with
``stop_on_overflow=False``) clears it and carries on, so ``ImageNumber`` restarts at 0; a
finite sequence with ``stop_on_overflow=True`` stops and ``is_buffer_overflowed()`` turns
true. ``ElapsedTime-ms`` is stamped by the simulated camera, relative to the sequence start
(like the DemoCamera), unless ``camera_supplies_elapsed=False``: then the "core" stamps it
relative to the last buffer clear, as MMCore does for cameras that do not.
``numbers_survive_clear=True`` keeps ``ImageNumber`` counting across an overflow clear (so
numbers jump instead of restarting), for cores or cameras that number frames that way.

The focus stage moves at ``stage_speed_um_s``, so waiting matters. Faults for tests:
``stage_stuck`` (the stage accepts moves but stays put and busy) and ``camera_stalled``
(no frames; ``snap_image`` blocks until the stall is lifted or the core closes);
``stall_after_frames = k`` stalls the camera once, before sequence frame ``k``.

The scene responds to the stage: an emitter at absolute depth ``z`` is rendered with
defocus ``focus - z`` (the calibration's sign convention). ``drift_um_per_um=(dx, dy)``
tilts the focus axis: moving the focus by ``dz`` shifts the sample image laterally by
``(dx, dy) * dz`` µm, to exercise re-centring in the calibration.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import numpy as np

from focaltrack.sim.camera import expose, frame_dtype
from focaltrack.sim.optics import SIM_ABERRATIONS, CameraModel, Optics
from focaltrack.sim.scene import GroundTruth, Scene, render_frame

if TYPE_CHECKING:
    from focaltrack.sim.psf import PSFModel

__all__ = ["SimFrameTruth", "SimulatedCore", "TaggedImage"]


class TaggedImage:
    """What ``pop_next_tagged_image`` returns: pixels and string tags (as pycromanager's)."""

    __slots__ = ("pix", "tags")

    def __init__(self, tags: dict[str, str], pix: np.ndarray) -> None:
        self.tags = tags
        self.pix = pix


@dataclass(frozen=True, slots=True)
class SimFrameTruth:
    """Ground truth of one rendered frame (sim only; a real core has nothing like it)."""

    serial: int  # frames rendered by this core, snaps included
    sequence_frame: int  # frame number since the sequence started (-1 for snaps)
    t_sim_s: float  # scene time
    focus_z_um: float
    offset_xy_um: tuple[float, float]  # lateral drift of the sample image
    scene: GroundTruth | None  # emitters (absolute positions, before drift); None: no scene


class SimulatedCore:
    """A simulated camera + focus drive with MMCore's method names and buffer behaviour.

    ``scene``: a `focaltrack.sim.scene.Scene` (None: background only); it is stepped by the
    camera's frame period during sequences and by the wall-clock time between snaps.
    ``psf_model``: the `PSFModel` to render with; by default ``PSFModel.shared(optics)``,
    loaded (or built, which takes a while the first time) in the constructor when there
    is a scene. ``pixel_size_um``: what ``get_pixel_size_um`` reports (default: the optics'
    sample pixel; 0 mimics a Micro-Manager without a pixel-size configuration); frames are
    always rendered at the optics' pixel size. ``buffer_capacity``: circular-buffer size in
    frames. ``focus_z_um``: initial focus; ``drift_um_per_um`` is relative to it.
    ``call_latency_s`` adds a delay to every API call (to make overlapping calls likely);
    ``concurrent_calls`` counts API calls that overlapped another one — zero when every
    caller serialises through one lock. ``truth`` holds the ground truth of recent frames.
    """

    CAMERA = "SimCamera"
    FOCUS = "SimZ"

    def __init__(
        self,
        scene: Scene | None = None,
        *,
        optics: Optics | None = None,
        psf_model: PSFModel | None = None,
        camera: CameraModel | None = None,
        width: int = 512,
        height: int = 512,
        exposure_ms: float = 10.0,
        background_photons: float = 20.0,
        buffer_capacity: int = 256,
        stage_speed_um_s: float = 2000.0,
        seed: int | None = 0,
        focus_z_um: float = 0.0,
        pixel_size_um: float | None = None,
        drift_um_per_um: tuple[float, float] = (0.0, 0.0),
        camera_supplies_elapsed: bool = True,
        numbers_survive_clear: bool = False,
        call_latency_s: float = 0.0,
        timeout_ms: int = 5000,
        max_lag_s: float = 0.05,
    ) -> None:
        if width < 1 or height < 1:
            raise ValueError("width and height must be positive")
        if buffer_capacity < 1:
            raise ValueError("buffer_capacity must be >= 1")
        if stage_speed_um_s <= 0:
            raise ValueError("stage_speed_um_s must be positive")
        self.optics = optics if optics is not None else Optics(aberrations=SIM_ABERRATIONS)
        self.camera_model = camera if camera is not None else CameraModel()
        frame_dtype(self.camera_model)  # rejects bit depths above 16
        self.scene = scene
        self.width = int(width)
        self.height = int(height)
        self.background_photons = float(background_photons)
        self.buffer_capacity = int(buffer_capacity)
        self.stage_speed_um_s = float(stage_speed_um_s)
        self.drift_um_per_um = (float(drift_um_per_um[0]), float(drift_um_per_um[1]))
        self.camera_supplies_elapsed = bool(camera_supplies_elapsed)
        self.numbers_survive_clear = bool(numbers_survive_clear)
        self.call_latency_s = float(call_latency_s)
        self._pixel_size_um = (
            self.optics.pixel_size_um if pixel_size_um is None else float(pixel_size_um)
        )
        self._psf_model = psf_model
        if scene is not None and psf_model is None:
            # Load (or build) the library now, not inside the first snap's timeout.
            self._psf_model = _shared_psf_model(self.optics)
        self.max_lag_s = float(max_lag_s)
        self._rng = np.random.default_rng(seed)

        # Fault injection.
        self.stage_stuck = False
        self.camera_stalled = False
        self.stall_after_frames: int | None = None  # one-shot: stall before sequence frame k

        # Concurrency detector: counts API calls that overlapped another API call.
        self.concurrent_calls = 0
        self.api_calls = 0
        self._api_guard = threading.Lock()
        self._count_lock = threading.Lock()

        self._state = threading.RLock()  # stage and buffer (never held while rendering)
        self._render_lock = threading.RLock()  # scene, rng, scene clock, truth
        self._closed = threading.Event()
        self._exposure_ms = float(exposure_ms)
        self._timeout_ms = int(timeout_ms)

        # Stage.
        self._z0 = float(focus_z_um)
        self._z_from = float(focus_z_um)
        self._z_to = float(focus_z_um)
        self._z_t0 = time.monotonic()

        # Scene clock and ground truth.
        self._t_sim = 0.0
        self._last_render_mono: float | None = None
        self._serial = 0
        self.truth: deque[SimFrameTruth] = deque(maxlen=4096)

        # Snap.
        self._snapped: np.ndarray | None = None

        # Circular buffer.
        self._buffer: deque[TaggedImage] = deque()
        self._image_number = 0
        self._buffer_t0 = time.monotonic()
        self._overflowed = False
        self._seq_thread: threading.Thread | None = None
        self._seq_stop = threading.Event()
        self._running = False
        self.frames_produced = 0  # by sequences, over the core's life
        self.skipped_slots = 0  # frame slots a late (slow-rendering) camera left out
        self._prev_slot = 0
        self.buffer_clears = 0

    # ================================================================ API guard

    def _enter(self) -> bool:
        with self._count_lock:
            self.api_calls += 1
        got = self._api_guard.acquire(blocking=False)
        if not got:
            with self._count_lock:
                self.concurrent_calls += 1
        if self.call_latency_s > 0:
            time.sleep(self.call_latency_s)
        return got

    def _exit(self, got: bool) -> None:
        if got:
            self._api_guard.release()

    def _api(self, fn: Callable[[], Any]) -> Any:
        got = self._enter()
        try:
            return fn()
        finally:
            self._exit(got)

    # ================================================================ devices

    def get_camera_device(self) -> str:
        return self._api(lambda: self.CAMERA)

    def get_focus_device(self) -> str:
        return self._api(lambda: self.FOCUS)

    def get_version_info(self) -> str:
        return self._api(lambda: "focaltrack SimulatedCore (MMCore 12.5.1 API subset)")

    def get_timeout_ms(self) -> int:
        return self._api(lambda: self._timeout_ms)

    def set_timeout_ms(self, timeout_ms: int) -> None:
        def f() -> None:
            self._timeout_ms = int(timeout_ms)

        self._api(f)

    def _check_label(self, label: str, expected: str) -> None:
        if label != expected:
            raise RuntimeError(f'No device with label "{label}"')

    # ================================================================ stage

    def _stage_pos(self, now: float) -> float:
        if self.stage_stuck:
            return self._z_from
        dist = self._z_to - self._z_from
        travelled = self.stage_speed_um_s * max(now - self._z_t0, 0.0)
        if travelled >= abs(dist):
            return self._z_to
        return self._z_from + math.copysign(travelled, dist)

    def _focus_now(self) -> float:
        with self._state:
            return self._stage_pos(time.monotonic())

    def set_position(self, *args: Any) -> None:
        """``set_position(z)`` or ``set_position(label, z)``, µm."""
        if len(args) == 1:
            label, z = self.FOCUS, args[0]
        elif len(args) == 2:
            label, z = args
        else:
            raise TypeError("set_position(z) or set_position(label, z)")

        def f() -> None:
            self._check_label(str(label), self.FOCUS)
            zf = float(z)
            if not math.isfinite(zf):
                raise RuntimeError("Invalid stage position")
            with self._state:
                now = time.monotonic()
                self._z_from = self._stage_pos(now)
                self._z_to = zf
                self._z_t0 = now

        self._api(f)

    def get_position(self, *args: Any) -> float:
        """``get_position()`` or ``get_position(label)``, µm."""
        label = args[0] if args else self.FOCUS

        def f() -> float:
            self._check_label(str(label), self.FOCUS)
            return float(self._focus_now())

        return self._api(f)

    def _stage_busy(self) -> bool:
        with self._state:
            return self.stage_stuck or self._stage_pos(time.monotonic()) != self._z_to

    def device_busy(self, label: str) -> bool:
        def f() -> bool:
            if label == self.CAMERA:
                return False
            self._check_label(str(label), self.FOCUS)
            return self._stage_busy()

        return self._api(f)

    def wait_for_device(self, label: str) -> None:
        """Block until the device is idle; `RuntimeError` after the core timeout."""

        def f() -> None:
            if label == self.CAMERA:
                return
            self._check_label(str(label), self.FOCUS)
            deadline = time.monotonic() + self._timeout_ms / 1000.0
            while self._stage_busy():
                if time.monotonic() >= deadline or self._closed.is_set():
                    raise RuntimeError(
                        f'Wait for device "{label}" timed out after {self._timeout_ms}ms'
                    )
                time.sleep(0.001)

        self._api(f)

    # ================================================================ camera properties

    def get_image_width(self) -> int:
        return self._api(lambda: self.width)

    def get_image_height(self) -> int:
        return self._api(lambda: self.height)

    def get_bytes_per_pixel(self) -> int:
        return self._api(lambda: 1 if self.camera_model.bit_depth <= 8 else 2)

    def get_image_bit_depth(self) -> int:
        return self._api(lambda: int(self.camera_model.bit_depth))

    def get_number_of_components(self) -> int:
        return self._api(lambda: 1)

    def get_pixel_size_um(self, cached: bool = False) -> float:
        """0.0 when constructed with ``pixel_size_um=0`` (no pixel-size configuration)."""
        return self._api(lambda: float(self._pixel_size_um))

    def get_exposure(self, *args: Any) -> float:
        return self._api(lambda: float(self._exposure_ms))

    def set_exposure(self, *args: Any) -> None:
        if len(args) == 1:
            exp = args[0]
        elif len(args) == 2:
            self._check_label(str(args[0]), self.CAMERA)
            exp = args[1]
        else:
            raise TypeError("set_exposure(ms) or set_exposure(label, ms)")

        def f() -> None:
            e = float(exp)
            if not (math.isfinite(e) and e >= 0):
                raise RuntimeError("Invalid exposure")
            self._exposure_ms = e

        self._api(f)

    # ================================================================ rendering

    @property
    def psf_model(self) -> PSFModel:
        """The PSF library frames are rendered with (built or loaded on first use)."""
        if self._psf_model is None:
            self._psf_model = _shared_psf_model(self.optics)
        return self._psf_model

    def _render(self, dt_s: float, sequence_frame: int) -> np.ndarray:
        """Advance the scene by ``dt_s``, render at the current focus."""
        with self._render_lock:
            return self._render_locked(dt_s, sequence_frame)

    def _render_locked(self, dt_s: float, sequence_frame: int) -> np.ndarray:
        if self.scene is not None and dt_s > 0:
            self.scene.step(dt_s)
        self._t_sim += max(dt_s, 0.0)
        focus = self._focus_now()
        dz = focus - self._z0
        off = (self.drift_um_per_um[0] * dz, self.drift_um_per_um[1] * dz)
        truth = self.scene.truth() if self.scene is not None else None
        if truth is not None and len(truth):
            img, _ = render_frame(
                truth,
                self.psf_model,
                self.camera_model,
                self._rng,
                focus,
                (self.height, self.width),
                background_photons=self.background_photons,
                offset_xy_um=off,
            )
        else:
            img = expose(
                np.zeros((self.height, self.width)),
                self.camera_model,
                self._rng,
                background_photons=self.background_photons,
            )
        self.truth.append(
            SimFrameTruth(
                serial=self._serial,
                sequence_frame=sequence_frame,
                t_sim_s=self._t_sim,
                focus_z_um=focus,
                offset_xy_um=off,
                scene=truth,
            )
        )
        self._serial += 1
        self._last_render_mono = time.monotonic()
        return img

    # ================================================================ snap

    def snap_image(self) -> None:
        def f() -> None:
            if self._running:
                raise RuntimeError("Action not permitted during sequence acquisition (snap_image)")
            t_block = time.monotonic()
            while self.camera_stalled:
                if self._closed.is_set() or time.monotonic() - t_block > 60.0:
                    raise RuntimeError(f"Camera {self.CAMERA} timed out (stalled)")
                time.sleep(0.002)
            if self._exposure_ms > 0:
                time.sleep(self._exposure_ms / 1000.0)
            with self._render_lock:
                now = time.monotonic()
                dt = 0.0 if self._last_render_mono is None else now - self._last_render_mono
                self._snapped = self._render_locked(dt, -1)

        self._api(f)

    def get_image(self, *args: Any) -> np.ndarray:
        def f() -> np.ndarray:
            if self._snapped is None:
                raise RuntimeError("Image not snapped")
            return self._snapped.copy()

        return self._api(f)

    # ================================================================ sequences

    def _clear_buffer_locked(self, *, keep_numbers: bool = False) -> None:
        self._buffer.clear()
        if not keep_numbers:
            self._image_number = 0
        self._buffer_t0 = time.monotonic()
        self._overflowed = False

    def clear_circular_buffer(self) -> None:
        def f() -> None:
            with self._state:
                self._clear_buffer_locked()

        self._api(f)

    def get_buffer_total_capacity(self) -> int:
        return self._api(lambda: self.buffer_capacity)

    def get_buffer_free_capacity(self) -> int:
        def f() -> int:
            with self._state:
                return self.buffer_capacity - len(self._buffer)

        return self._api(f)

    def is_buffer_overflowed(self) -> bool:
        return self._api(lambda: bool(self._overflowed))

    def get_remaining_image_count(self) -> int:
        def f() -> int:
            with self._state:
                return len(self._buffer)

        return self._api(f)

    def is_sequence_running(self, *args: Any) -> bool:
        return self._api(lambda: bool(self._running))

    def start_continuous_sequence_acquisition(self, interval_ms: float) -> None:
        self._api(lambda: self._start(None, float(interval_ms), False))

    def start_sequence_acquisition(self, *args: Any) -> None:
        """``(n, interval_ms, stop_on_overflow)``, optionally with the camera label first."""
        if len(args) == 4:
            self._check_label(str(args[0]), self.CAMERA)
            args = args[1:]
        if len(args) != 3:
            raise TypeError("start_sequence_acquisition(n, interval_ms, stop_on_overflow)")
        n, interval_ms, stop = args
        if int(n) < 1:
            raise RuntimeError("Invalid number of images")
        self._api(lambda: self._start(int(n), float(interval_ms), bool(stop)))

    def _start(self, n: int | None, interval_ms: float, stop_on_overflow: bool) -> None:
        if self._running:
            raise RuntimeError("Action not permitted during sequence acquisition")
        if self._closed.is_set():
            raise RuntimeError("core is closed")
        with self._state:
            self._clear_buffer_locked()
        period_s = max(interval_ms, self._exposure_ms, 0.0) / 1000.0
        self._seq_stop = threading.Event()
        self._prev_slot = 0
        self._running = True
        self._seq_thread = threading.Thread(
            target=self._sequence,
            args=(n, period_s, stop_on_overflow, self._seq_stop),
            name="SimulatedCore-sequence",
            daemon=True,
        )
        self._seq_thread.start()

    def _sequence(
        self, n: int | None, period_s: float, stop_on_overflow: bool, stop: threading.Event
    ) -> None:
        """The camera: one frame per slot of ``period_s`` (slot ``j`` at ``j * period_s``).

        A camera that falls more than ``max_lag_s`` behind (rendering slower than the frame
        rate) skips the slots it missed, as a camera at its maximum rate would, so its time
        stamps stay on the wall clock; small delays are caught up without skipping.
        """
        try:
            t_start = time.monotonic()
            slot = 0
            k = 0  # frames made
            while not stop.is_set() and (n is None or k < n):
                if self.stall_after_frames is not None and k >= self.stall_after_frames:
                    self.stall_after_frames = None
                    self.camera_stalled = True
                if self.camera_stalled:
                    t_stall = time.monotonic()
                    while self.camera_stalled and not stop.is_set():
                        stop.wait(0.002)
                    if stop.is_set():
                        break
                    t_start += time.monotonic() - t_stall  # a stall is not a lag
                wait = t_start + slot * period_s - time.monotonic()
                if wait > 0 and stop.wait(wait):
                    break
                lag = -wait
                if period_s > 0 and lag > self.max_lag_s:
                    skip = int(lag / period_s)
                    slot += skip
                    self.skipped_slots += skip
                img = self._render(period_s * (slot - self._prev_slot) if k else 0.0, k)
                self._prev_slot = slot
                with self._state:
                    if not self._insert_locked(img, slot * period_s, stop_on_overflow):
                        break
                self.frames_produced += 1
                k += 1
                slot += 1
        finally:
            self._running = False

    def _insert_locked(self, img: np.ndarray, t_frame_s: float, stop_on_overflow: bool) -> bool:
        if len(self._buffer) >= self.buffer_capacity:
            if stop_on_overflow:
                self._overflowed = True
                return False
            # MMCore camera adapters: "do not stop on overflow - just reset the buffer".
            self._clear_buffer_locked(keep_numbers=self.numbers_survive_clear)
            self.buffer_clears += 1
        if self.camera_supplies_elapsed:
            elapsed_ms = t_frame_s * 1000.0
        else:  # MMCore's own stamp: whole milliseconds since the buffer was last cleared
            elapsed_ms = float(int((time.monotonic() - self._buffer_t0) * 1000.0))
        tags = {
            "Camera": self.CAMERA,
            "ImageNumber": str(self._image_number),
            "ElapsedTime-ms": f"{elapsed_ms:.4f}",
            "Width": str(img.shape[1]),
            "Height": str(img.shape[0]),
            "PixelType": "GRAY8" if img.dtype == np.uint8 else "GRAY16",
            "Binning": "1",
            "BitDepth": str(self.camera_model.bit_depth),
            "TimeReceivedByCore": datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f"),
        }
        self._image_number += 1
        self._buffer.append(TaggedImage(tags, img))
        return True

    def pop_next_tagged_image(self) -> TaggedImage:
        def f() -> TaggedImage:
            with self._state:
                if not self._buffer:
                    raise IndexError("Circular buffer is empty.")
                return self._buffer.popleft()

        return self._api(f)

    def stop_sequence_acquisition(self, *args: Any) -> None:
        def f() -> None:
            self._seq_stop.set()
            t = self._seq_thread
            if t is not None and t is not threading.current_thread():
                t.join(5.0)
            self._running = False

        self._api(f)

    # ================================================================ lifetime

    def close(self) -> None:
        """Stop any sequence and release blocked calls (like ``unload_all_devices``)."""
        self._closed.set()
        self._seq_stop.set()
        t = self._seq_thread
        if t is not None and t is not threading.current_thread():
            t.join(5.0)
        self._running = False

    unload_all_devices = close


def _shared_psf_model(optics: Optics) -> PSFModel:
    from focaltrack.sim.psf import PSFModel

    return PSFModel.shared(optics)

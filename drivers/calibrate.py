"""Acquire a bead focal stack over the `Driver` Protocol (real or simulated microscope).

`acquire_focal_stack` steps the focus drive from the current focus (the bead in focus)
upwards in equal steps (seed 002: to +100 µm in 2 µm steps, 51 slices), waits for the
stage to settle at each step, snaps ``n_average`` frames and keeps, per step, their mean,
their per-pixel temporal variance (for the camera noise model) and the stage position read
back; over all frames it keeps the per-pixel maximum (for the saturation check on raw
ADU). The focus drive always goes back to where it started, also after an error or a
cancel.

Why 4 frames per step by default: averaging halves the shot and read noise of each slice
(the calibration is the template every training image is made of, so its noise is
copied into all of them), three degrees of freedom per pixel are enough for the temporal
variance over ~10⁴ background pixels to pin the read noise to a percent, and 51 × 4 frames
at 100 ms is still a ~30 s acquisition during which the bead barely drifts.

The focal-stack processing (bead finding, background, re-centring, photometry, noise
model) is `focaltrack.calibration.process_stack`; `calibrate` does both.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from focaltrack.drivers.base import CameraInfo, Driver, DriverError, StageTimeoutError

if TYPE_CHECKING:
    from focaltrack.calibration import Calibration

__all__ = [
    "AcquisitionCancelled",
    "Progress",
    "RawStack",
    "acquire_focal_stack",
    "calibrate",
    "calibration_from_raw",
    "z_grid",
]

log = logging.getLogger(__name__)

#: progress(step_done, n_steps, z_offset_um): called after each z step (and once with 0).
Progress = Callable[[int, int, float], None]


class AcquisitionCancelled(DriverError):
    """The focal-stack acquisition was cancelled (its cancel event was set)."""


@dataclass(frozen=True)
class RawStack:
    """A focal stack as acquired: ADU, before any processing.

    ``mean`` / ``var``: per z step, the mean and the per-pixel temporal variance (ddof 1;
    zeros when one frame per step) of the ``n_average`` frames, float32 (Z, H, W).
    ``max_frame``: per-pixel maximum over every raw frame (H, W), the camera's dtype.
    ``z_um``: the commanded offsets from the start focus (0, step, 2·step, …);
    ``z_readback_um``: the focus positions read back after each move, minus the start.
    """

    mean: np.ndarray
    var: np.ndarray
    max_frame: np.ndarray
    z_um: np.ndarray
    z_readback_um: np.ndarray
    z_start_um: float
    camera: CameraInfo
    exposure_ms: float
    n_average: int
    settle_s: float
    t_start_s: float
    t_end_s: float
    extra: dict[str, Any] = field(default_factory=dict)


def z_grid(z_range_um: float, z_step_um: float) -> np.ndarray:
    """Offsets 0, step, …, up to ``z_range_um`` inclusive (within 1e-6 of a step)."""
    if not (math.isfinite(z_step_um) and z_step_um > 0):
        raise ValueError(f"z step must be a positive number of µm, got {z_step_um:g}")
    if not (math.isfinite(z_range_um) and z_range_um > 0):
        raise ValueError(f"z range must be a positive number of µm, got {z_range_um:g}")
    n = math.floor(z_range_um / z_step_um + 1e-6) + 1
    if n < 3:
        raise ValueError(
            f"a z range of {z_range_um:g} µm in {z_step_um:g} µm steps gives {n} slice(s); "
            "a focal-stack calibration needs at least 3"
        )
    return np.arange(n, dtype=np.float64) * z_step_um


def _set_exposure(driver: Driver, exposure_ms: float) -> None:
    """Set the camera exposure (kept for callers that import it; it is `Driver.set_exposure_ms`)."""
    driver.set_exposure_ms(float(exposure_ms))


def acquire_focal_stack(
    driver: Driver,
    *,
    z_start_um: float | None = None,
    z_range_um: float = 100.0,
    z_step_um: float = 2.0,
    n_average: int = 4,
    settle_s: float = 0.05,
    timeout_s: float = 5.0,
    exposure_ms: float | None = None,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
) -> RawStack:
    """Step the focus through ``z_start_um + z_grid(z_range_um, z_step_um)`` and snap.

    ``z_start_um`` None: the current focus (the bead in focus). ``timeout_s`` bounds each
    stage move and each snap. Raises `StageTimeoutError` (naming the z it could not
    reach), `CameraTimeoutError`, `AcquisitionCancelled`, `ValueError` for bad settings.
    """
    if int(n_average) != n_average or n_average < 1:
        raise ValueError(f"frames averaged per step must be a whole number ≥ 1, got {n_average}")
    if not (math.isfinite(settle_s) and settle_s >= 0):
        raise ValueError(f"settle time must be ≥ 0 s, got {settle_s:g}")
    if not (math.isfinite(timeout_s) and timeout_s > 0):
        raise ValueError(f"stage timeout must be > 0 s, got {timeout_s:g}")
    if exposure_ms is not None and not (math.isfinite(exposure_ms) and exposure_ms > 0):
        raise ValueError(f"exposure must be > 0 ms, got {exposure_ms:g}")
    offsets = z_grid(z_range_um, z_step_um)
    n_average = int(n_average)
    if exposure_ms is not None:
        _set_exposure(driver, exposure_ms)
    info = driver.describe()
    home = float(driver.get_z())
    start = home if z_start_um is None else float(z_start_um)
    nz, h, w = offsets.size, info.height, info.width
    mean = np.zeros((nz, h, w), dtype=np.float32)
    var = np.zeros((nz, h, w), dtype=np.float32)
    max_frame: np.ndarray | None = None
    readback = np.zeros(nz, dtype=np.float64)
    exposures: list[float] = []
    t0 = time.time()
    if progress is not None:
        progress(0, nz, 0.0)
    try:
        for k, dz in enumerate(offsets):
            if cancel is not None and cancel.is_set():
                raise AcquisitionCancelled(f"focal-stack acquisition cancelled at step {k}/{nz}")
            target = start + float(dz)
            try:
                driver.move_z(target, timeout_s=timeout_s, settle_s=settle_s)
            except StageTimeoutError as e:
                raise StageTimeoutError(
                    f"the focus stage did not reach z = {target:.3f} µm (step {k + 1}/{nz}, "
                    f"+{dz:g} µm from focus) within {timeout_s:g} s: {e}"
                ) from e
            readback[k] = float(driver.get_z()) - start
            # Welford in float64 over the frames of this step.
            m = np.zeros((h, w), dtype=np.float64)
            s = np.zeros((h, w), dtype=np.float64)
            for i in range(n_average):
                if cancel is not None and cancel.is_set():
                    raise AcquisitionCancelled(
                        f"focal-stack acquisition cancelled at step {k}/{nz}"
                    )
                frame = driver.snap(timeout_s=timeout_s + 0.001 * info.exposure_ms)
                px = np.asarray(frame.pixels)
                if px.shape != (h, w):
                    raise DriverError(
                        f"camera delivered a {px.shape} frame, expected ({h}, {w}); "
                        "did the ROI or binning change during the calibration?"
                    )
                exposures.append(float(frame.exposure_ms))
                max_frame = px.copy() if max_frame is None else np.maximum(max_frame, px)
                x = px.astype(np.float64)
                d = x - m
                m += d / (i + 1)
                s += d * (x - m)
            mean[k] = m
            if n_average > 1:
                var[k] = s / (n_average - 1)
            if progress is not None:
                progress(k + 1, nz, float(dz))
    finally:
        try:
            driver.move_z(home, timeout_s=timeout_s, settle_s=0.0)
        except Exception as e:  # never hide the error that brought us here
            log.warning("could not return the focus to %.3f µm: %s", home, e)
    assert max_frame is not None
    return RawStack(
        mean=mean,
        var=var,
        max_frame=max_frame,
        z_um=offsets,
        z_readback_um=readback,
        z_start_um=start,
        camera=info,
        exposure_ms=float(np.median(exposures)) if exposures else info.exposure_ms,
        n_average=n_average,
        settle_s=float(settle_s),
        t_start_s=t0,
        t_end_s=time.time(),
    )


def calibrate(
    driver: Driver,
    *,
    window_px: int = 128,
    pixel_size_um: float | None = None,
    source: str | None = None,
    **acquire: Any,
) -> Calibration:
    """Acquire a focal stack (`acquire_focal_stack` keywords) and process it."""
    raw = acquire_focal_stack(driver, **acquire)
    return calibration_from_raw(
        raw, window_px=window_px, pixel_size_um=pixel_size_um, source=source
    )


def calibration_from_raw(
    raw: RawStack,
    *,
    window_px: int = 128,
    pixel_size_um: float | None = None,
    source: str | None = None,
) -> Calibration:
    """`process_stack` on an acquired `RawStack`, recording how it was acquired."""
    from focaltrack.calibration import process_stack

    px = float(pixel_size_um) if pixel_size_um is not None else raw.camera.pixel_size_um
    dev = float(np.max(np.abs(raw.z_readback_um - raw.z_um)))
    extra: dict[str, object] = {
        "z_readback_um": raw.z_readback_um,
        "z_readback_max_dev_um": dev,
        "z_start_um": raw.z_start_um,
        "exposure_ms": raw.exposure_ms,
        "settle_s": raw.settle_s,
        "camera": raw.camera.name,
        "focus_device": raw.camera.focus_device,
        "acquisition_s": raw.t_end_s - raw.t_start_s,
    }
    return process_stack(
        raw.mean,
        raw.z_um,
        px,
        var_stack=raw.var if raw.n_average > 1 else None,
        max_frame=raw.max_frame,
        window_px=window_px,
        bit_depth=raw.camera.bit_depth,
        source=source or f"acquired:{raw.camera.name}",
        n_averages=raw.n_average,
        extra=extra,
    )

"""From a raw bead focal stack (ADU) to a `Calibration`: the steps in order."""

from __future__ import annotations

import logging
import math
from datetime import UTC

import numpy as np

from focaltrack.calibration.beads import find_bead, robust_sigma
from focaltrack.calibration.drift import crop_shifted, smooth_drift, track_bead
from focaltrack.calibration.format import Calibration, CalibrationError
from focaltrack.calibration.noise import background_mask, estimate_noise

log = logging.getLogger(__name__)

#: A slice whose bead centre is this far from the smooth drift is reported (a jump).
JUMP_WARN_PX = 1.0

__all__ = ["process_stack"]


def process_stack(
    mean_stack: np.ndarray,
    z_um: np.ndarray,
    pixel_size_um: float,
    *,
    var_stack: np.ndarray | None = None,
    max_frame: np.ndarray | None = None,
    window_px: int = 128,
    bit_depth: int = 16,
    source: str = "unknown",
    n_averages: int = 1,
    extra: dict[str, object] | None = None,
) -> Calibration:
    """Turn a raw bead focal stack (ADU) into a `Calibration`.

    ``mean_stack`` (Z, H, W): the image at each z (the mean of ``n_averages`` frames);
    ``var_stack``: their per-pixel temporal variance (enables the temporal read-noise and
    photon-transfer gain estimates); ``max_frame`` (H, W): per-pixel maximum over every
    raw frame, for the saturation check (default: the maximum over ``mean_stack``, exact
    when it holds raw frames). Steps: find the bead (`find_bead`), refuse a saturated
    bead, subtract each slice's background (median of the frame outside the bead's
    window), track the bead's centre slice by slice (`track_bead`), cut a ``window_px``
    square with the bead at `Calibration.centre_px` (in the centre pixel) in every slice
    (see the module docstring), and divide the whole stack by one number (the largest
    slice integral).
    """
    stack = np.asarray(mean_stack)
    if stack.ndim != 3:
        raise CalibrationError(f"a focal stack is (Z, H, W), got shape {stack.shape}")
    z_um = np.asarray(z_um, dtype=np.float64)
    nz, h, w = stack.shape
    if nz < 3:
        raise CalibrationError(f"a focal-stack calibration needs at least 3 slices, got {nz}")
    if z_um.shape != (nz,):
        raise CalibrationError(f"{z_um.size} z positions for {nz} slices")
    if not np.all(np.diff(z_um) > 0):
        raise CalibrationError("z positions must be strictly ascending (z step > 0)")
    if not pixel_size_um > 0:
        raise CalibrationError(f"pixel size must be positive, got {pixel_size_um}")
    if window_px < 16 or window_px > min(h, w):
        raise CalibrationError(
            f"window {window_px} px must be between 16 px and the frame size ({w}×{h} px)"
        )
    full_scale = float((1 << int(bit_depth)) - 1)
    peak_img = np.asarray(max_frame) if max_frame is not None else stack.max(axis=0)
    if peak_img.shape != (h, w):
        raise CalibrationError(f"max_frame is {peak_img.shape}, the slices are {(h, w)}")
    try:
        bead = find_bead(stack, window_px=window_px)
    except CalibrationError:
        # A saturated bead's clipped, ringed top can look like several spots: name the
        # real problem when the brightest spot is saturated.
        yb, xb = np.unravel_index(int(np.argmax(peak_img)), peak_img.shape)
        _check_saturation(peak_img, float(yb), float(xb), window_px, full_scale, bit_depth)
        raise
    _check_saturation(peak_img, bead.y_px, bead.x_px, window_px, full_scale, bit_depth)
    # Slice by slice throughout: a full-frame sCMOS stack is not copied into floats.
    mask = background_mask((h, w), bead.y_px, bead.x_px, window_px)
    bg_level = np.array([float(np.median(stack[k][mask])) for k in range(nz)])  # (Z,)
    both = mask[:, 1:] & mask[:, :-1]
    slice_sigma = np.array(
        [
            robust_sigma(np.diff(stack[k].astype(np.float64), axis=1)[both]) / math.sqrt(2)
            for k in range(nz)
        ]
    )
    found_y, found_x = track_bead(
        stack, bg_level, bead, window_px=window_px, noise_sigma=slice_sigma
    )
    # The drift removed is the smooth one under the centres found (each a noisy centroid).
    focus = bead.focus_index
    jumped = np.zeros(len(found_y), dtype=bool)
    ys, xs, off = found_y, found_x, np.zeros(len(found_y))
    for _ in range(3):
        # slices far off the curve (a jump) are left out of it and fitted again
        ys, xs = smooth_drift(found_y, found_x, keep=~jumped)
        # anchored on the focal slice's centre, measured best (a small, bright spot): the
        # smooth curve gives every other slice's position relative to it
        ys = ys + (found_y[focus] - ys[focus])
        xs = xs + (found_x[focus] - xs[focus])
        off = np.hypot(found_y - ys, found_x - xs)
        now = off > JUMP_WARN_PX
        if np.array_equal(now, jumped):
            break
        jumped = now
    if jumped.any():
        # A stage that jumped (a knock) is not followed by a smooth drift: those slices
        # keep the centre found in them (far beyond a centroid's scatter), and the log
        # says where.
        k = np.nonzero(jumped)[0]
        ys[k], xs[k] = found_y[k], found_x[k]
        log.warning(
            "calibration: in %d slice(s) (z %s µm) the bead's centre was found up to %.1f px "
            "off the smooth drift; a jump of the stage or a second bead there: those "
            "slices are centred on their own centres; acquire again if the figure shows a "
            "jump",
            len(k),
            ", ".join(f"{z_um[i]:g}" for i in k[:5]) + (", ..." if len(k) > 5 else ""),
            float(off.max()),
        )
    # Align every slice on the focal slice's bead position: the focal slice is cut at whole
    # pixels (never interpolated: in focus the PSF is undersampled), the others are shifted
    # by their drift relative to it (cubic spline). The bead sits at the same sub-pixel
    # position, within the centre pixel (H//2, W//2), in every slice.
    ry = float(ys[focus] - round(ys[focus]))
    rx = float(xs[focus] - round(xs[focus]))
    crops = np.stack(
        [
            crop_shifted(
                stack[k], ys[k] - ry, xs[k] - rx, window_px, window_px, background=bg_level[k]
            )
            for k in range(nz)
        ]
    )
    integrals = crops.reshape(nz, -1).sum(axis=1)
    scale = float(integrals.max())
    if not scale > 0:
        raise CalibrationError("no bead signal above the background in any slice")
    noise = estimate_noise(
        stack,
        mask=mask,
        var_stack=var_stack,
        n_averages=n_averages,
        signal_box=(
            round(bead.y_px) - window_px // 2,
            round(bead.x_px) - window_px // 2,
            window_px,
            window_px,
        ),
        saturation_adu=full_scale,
    )
    info: dict[str, object] = {
        "centre_x_px": window_px // 2 + rx,
        "centre_y_px": window_px // 2 + ry,
        "focus_index": focus,
        "bead_snr": float(bead.snr),
        "bead_x_per_slice_px": found_x.astype(np.float64),
        "bead_y_per_slice_px": found_y.astype(np.float64),
        "drift_x_px": xs.astype(np.float64),
        "drift_y_px": ys.astype(np.float64),
        "background_per_slice_adu": bg_level.astype(np.float64),
    }
    info.update(extra or {})
    fy, fx = float(ys[focus]), float(xs[focus])
    return Calibration(
        psf=(crops / scale).astype(np.float32),
        z_um=z_um,
        pixel_size_um=float(pixel_size_um),
        noise=noise,
        source=source,
        bead_xy_px=(fx, fy),
        crop_box=(round(fy) - window_px // 2, round(fx) - window_px // 2, window_px, window_px),
        n_averages=int(n_averages),
        bit_depth=int(bit_depth),
        bead_signal_adu=scale,
        background_adu=float(bg_level.mean()),
        created_utc=_utc_now(),
        extra=info,
    )


def _check_saturation(
    peak_img: np.ndarray, y: float, x: float, window_px: int, full_scale: float, bit_depth: int
) -> None:
    m = 8
    y0 = max(round(y) - window_px // 2 - m, 0)
    x0 = max(round(x) - window_px // 2 - m, 0)
    region = peak_img[y0 : y0 + window_px + 2 * m, x0 : x0 + window_px + 2 * m]
    n_sat = int(np.count_nonzero(region >= full_scale))
    if n_sat:
        raise CalibrationError(
            f"the bead is saturated: {n_sat} pixel(s) near (x={x:.0f}, y={y:.0f}) reach the "
            f"{bit_depth}-bit full scale ({full_scale:.0f} ADU); lower the exposure time or "
            "the illumination and calibrate again"
        )


def _utc_now() -> str:
    from datetime import datetime

    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

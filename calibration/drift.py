"""Following the bead through the slices (stage drift), and cutting it out sub-pixel."""

from __future__ import annotations

import math

import numpy as np

from focaltrack.calibration.beads import BeadLocation, centroid

__all__ = ["crop_shifted", "track_bead"]


def crop_shifted(
    img: np.ndarray,
    cy: float,
    cx: float,
    h: int,
    w: int,
    margin: int = 4,
    background: float = 0.0,
) -> np.ndarray:
    """The (h, w) window whose pixel (h//2, w//2) is frame position (cy, cx), sub-pixel.

    Integer crop of ``img − background`` (zero outside the frame) plus a cubic-spline shift
    of the sub-pixel rest (a Fourier shift would ring along the row and column through a
    sharp near-focus peak); the crop carries a margin so the edges do not matter.
    """
    from scipy import ndimage

    iy, ix = round(cy), round(cx)
    top, left = iy - h // 2 - margin, ix - w // 2 - margin
    hh, ww = h + 2 * margin, w + 2 * margin
    out = np.zeros((hh, ww), dtype=np.float64)
    fy0, fx0 = max(top, 0), max(left, 0)
    fy1, fx1 = min(top + hh, img.shape[0]), min(left + ww, img.shape[1])
    if fy1 > fy0 and fx1 > fx0:
        out[fy0 - top : fy1 - top, fx0 - left : fx1 - left] = img[fy0:fy1, fx0:fx1]
        out[fy0 - top : fy1 - top, fx0 - left : fx1 - left] -= background
    dy, dx = iy - cy, ix - cx
    if abs(dy) > 1e-6 or abs(dx) > 1e-6:
        out = ndimage.shift(out, (dy, dx), order=3, mode="nearest")
    return out[margin : margin + h, margin : margin + w]


def track_bead(
    stack: np.ndarray,
    background: np.ndarray,
    start: BeadLocation,
    *,
    window_px: int,
    noise_sigma: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Bead centre (y, x) in every slice of ``stack`` (minus ``background[k]``): the drift.

    From the focal slice outwards, each slice's centre is the thresholded centroid of
    the Gaussian-smoothed (σ = 1.5 px) slice in a window around the neighbouring slice's
    centre (pixels above max(10 % of the local maximum, 3 σ of the smoothed noise)).
    The centroid is the centre of symmetry of a centro-symmetric PSF (defocus, spherical
    aberration, astigmatism); coma's z-dependent lateral shift is absorbed as drift.
    """
    from scipy import ndimage

    z, h, w = stack.shape
    ys = np.full(z, math.nan)
    xs = np.full(z, math.nan)
    ys[start.focus_index], xs[start.focus_index] = start.y_px, start.x_px
    radius = window_px // 2 - 2
    reach = window_px // 2 + 8  # the region smoothed around the guess
    order = list(range(start.focus_index, z)) + list(range(start.focus_index - 1, -1, -1))
    for k in order:
        if k == start.focus_index:
            prev = k
        else:
            prev = k - 1 if k > start.focus_index else k + 1
        gy, gx = ys[prev], xs[prev]
        y0, y1 = max(round(gy) - reach, 0), min(round(gy) + reach + 1, h)
        x0, x1 = max(round(gx) - reach, 0), min(round(gx) + reach + 1, w)
        region = stack[k, y0:y1, x0:x1].astype(np.float64) - float(background[k])
        sm = ndimage.gaussian_filter(region, 1.5)
        # σ of noise after a σ=1.5 px Gaussian: ≈ σ / (2√π · 1.5)
        thr = 3.0 * float(noise_sigma[k]) / (2.0 * math.sqrt(math.pi) * 1.5)
        y, x = centroid(sm, gy - y0, gx - x0, radius=radius, threshold_frac=0.1, threshold_abs=thr)
        if k == start.focus_index:
            # The in-focus spot is small: refine in a tight box for sub-pixel accuracy.
            y, x = centroid(sm, y, x, radius=4, threshold_frac=0.2)
        ys[k], xs[k] = y + y0, x + x0
    return ys, xs

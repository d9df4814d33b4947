"""Following the bead through the slices (stage drift), and cutting it out sub-pixel."""

from __future__ import annotations

import math

import numpy as np

from focaltrack.calibration.beads import BeadLocation, centroid

__all__ = ["DRIFT_DEGREE", "crop_shifted", "smooth_drift", "track_bead"]

#: Degree of the polynomial in acquisition order that stands for the stage drift.
DRIFT_DEGREE = 2


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
    aberration, astigmatism); coma's z-dependent lateral shift looks like drift.
    The drift removed is the smooth curve under these centres (`smooth_drift`).
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


def smooth_drift(
    ys: np.ndarray,
    xs: np.ndarray,
    degree: int = DRIFT_DEGREE,
    keep: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The stage drift under the bead centres ``ys``, ``xs`` (Z,) found slice by slice: a
    polynomial of ``degree`` in acquisition order, fitted robustly and weighted by how
    noisy the centres are around each slice.

    A stage drifts smoothly over a stack's tens of seconds; the centres found in defocused
    slices scatter about it by a tenth of a pixel and more (a faint ring's centroid). Cut
    out at those centres, every slice of the model would carry its own scatter as a lateral
    error at that depth, which every localization there inherits. The fit: least squares,
    then each slice weighted by the inverse square of its neighbours' scatter about the
    fit (median absolute residual over ±5 slices, at least 0.01 px) and Tukey's biweight
    (4.685 scatters), iterated; a stack too short for the degree keeps its centres.
    ``keep`` (Z,) bool: only those slices are fitted (the curve is drawn at all).
    """
    z = ys.shape[0]
    use = np.ones(z, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    if int(use.sum()) < degree + 3:
        return ys.copy(), xs.copy()
    t = np.linspace(-1.0, 1.0, z)
    basis = np.vander(t, degree + 1)
    out = []
    for c in (ys, xs):
        w = use.astype(np.float64)
        fit = c.copy()
        for _ in range(6):
            coef, *_ = np.linalg.lstsq(basis * np.sqrt(w)[:, None], c * np.sqrt(w), rcond=None)
            fit = basis @ coef
            r = c - fit
            scatter = np.array([np.median(np.abs(r[max(k - 5, 0) : k + 6])) for k in range(z)])
            scatter = np.maximum(1.4826 * scatter, 0.01)
            u = r / (4.685 * scatter)
            w = np.where(use & (np.abs(u) < 1.0), (1.0 - u**2) ** 2, 0.0) / scatter**2
        out.append(fit)
    return out[0], out[1]

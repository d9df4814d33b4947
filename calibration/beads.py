"""Finding the calibration bead: the brightest isolated spot, and its sub-pixel centre."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from focaltrack.calibration.format import CalibrationError

__all__ = ["MIN_BEAD_SNR", "OVERLAP_FRACTION", "BeadLocation", "find_bead"]

#: A spot counts as a bead when its peak in the smoothed maximum projection stands this
#: many (robust) standard deviations above the projection's background.
MIN_BEAD_SNR = 10.0
#: A second spot inside the crop window that is at least this fraction of the bead's
#: peak (background subtracted, smoothed maximum projection) means overlapping beads.
OVERLAP_FRACTION = 0.1


@dataclass(frozen=True, slots=True)
class BeadLocation:
    """Where the bead is: sub-pixel centre in the focal slice, in frame pixels."""

    x_px: float
    y_px: float
    focus_index: int  # slice where the bead's peak is highest
    snr: float  # peak over background noise in the smoothed maximum projection
    peak_adu: float  # background-subtracted peak of the smoothed maximum projection


def robust_sigma(values: np.ndarray) -> float:
    v = np.asarray(values, dtype=np.float64).ravel()
    med = np.median(v)
    return float(1.4826 * np.median(np.abs(v - med)))


def find_bead(
    stack: np.ndarray,
    *,
    window_px: int = 128,
    min_snr: float = MIN_BEAD_SNR,
    overlap_fraction: float = OVERLAP_FRACTION,
) -> BeadLocation:
    """Find the calibration bead: the brightest isolated spot of the maximum projection.

    The projection over z is smoothed (Gaussian, σ = 1 px) and its local maxima (5×5
    neighbourhood) standing ``min_snr`` robust standard deviations above the projection's
    median are the candidate spots. A candidate is *isolated* when no other candidate
    inside its crop window (``window_px`` square centred on it) reaches ``overlap_fraction``
    of its peak and its window lies inside the frame. The brightest isolated candidate is
    the bead. Raises `CalibrationError` for a stack with no bead, with overlapping beads
    (no isolated candidate), or whose only beads sit too close to the frame edge.
    """
    from scipy import ndimage

    stack = np.asarray(stack)
    _, h, w = stack.shape
    proj = ndimage.gaussian_filter(stack.max(axis=0).astype(np.float64), 1.0)
    background = float(np.median(proj))
    sigma = robust_sigma(proj)
    amp = proj - background
    peak = float(amp.max())
    floor = 1e-9 * max(abs(background), abs(peak), 1.0)
    snr = peak / max(sigma, floor)
    if not snr >= min_snr:
        raise CalibrationError(
            f"no bead found: the brightest spot in the stack's maximum projection is only "
            f"{snr:.1f}× the background noise (a bead needs ≥ {min_snr:g}); check that the "
            "bead is in the field of view, in focus at the first slice, and illuminated"
        )
    is_max = (proj == ndimage.maximum_filter(proj, size=5)) & (amp >= min_snr * max(sigma, floor))
    ys, xs = np.nonzero(is_max)
    order = np.argsort(amp[ys, xs])[::-1][:200]
    cands = [(int(ys[i]), int(xs[i]), float(amp[ys[i], xs[i]])) for i in order]
    # Merge plateau duplicates (flat saturated tops give several equal maxima).
    merged: list[tuple[int, int, float]] = []
    for c in cands:
        if all(max(abs(c[0] - m[0]), abs(c[1] - m[1])) > 3 for m in merged):
            merged.append(c)
    half = window_px // 2
    first_conflict: tuple[tuple[int, int, float], tuple[int, int, float]] | None = None
    edge_skipped: tuple[int, int, float] | None = None
    for cy, cx, a in merged:
        rivals = [
            o
            for o in merged
            if o != (cy, cx, a)
            and max(abs(o[0] - cy), abs(o[1] - cx)) <= half
            and o[2] >= overlap_fraction * a
        ]
        if rivals:
            first_conflict = first_conflict or ((cy, cx, a), rivals[0])
            continue
        if cy - half < 0 or cx - half < 0 or cy - half + window_px > h or cx - half + window_px > w:
            edge_skipped = edge_skipped or (cy, cx, a)
            continue
        return _refine_bead(stack, cy, cx, snr=a / max(sigma, floor), peak=a, background=background)
    if first_conflict is not None:
        (y1, x1, a1), (y2, x2, a2) = first_conflict
        dist = math.hypot(x2 - x1, y2 - y1)
        raise CalibrationError(
            f"two overlapping beads: spots at (x={x1}, y={y1}) and (x={x2}, y={y2}) px are "
            f"{dist:.0f} px apart, inside one {window_px} px calibration window (the weaker "
            f"is {a2 / a1:.0%} of the brighter); move to a single isolated bead"
        )
    assert edge_skipped is not None
    y1, x1, _ = edge_skipped
    raise CalibrationError(
        f"the bead at (x={x1}, y={y1}) px is too close to the frame edge for a "
        f"{window_px}×{window_px} px window in a {w}×{h} px frame; centre the bead or use a "
        "smaller --window"
    )


def _refine_bead(
    stack: np.ndarray, cy: int, cx: int, *, snr: float, peak: float, background: float
) -> BeadLocation:
    from scipy import ndimage

    r = 3
    y0, y1 = max(cy - r, 0), min(cy + r + 1, stack.shape[1])
    x0, x1 = max(cx - r, 0), min(cx + r + 1, stack.shape[2])
    local = ndimage.gaussian_filter(stack[:, y0:y1, x0:x1].astype(np.float64), (0, 1, 1))
    focus = int(np.argmax(local.reshape(local.shape[0], -1).max(axis=1)))
    img = stack[focus].astype(np.float64)
    bg = float(np.median(img))
    y, x = centroid(img - bg, float(cy), float(cx), radius=4, threshold_frac=0.2)
    return BeadLocation(x_px=x, y_px=y, focus_index=focus, snr=float(snr), peak_adu=float(peak))


def centroid(
    img: np.ndarray,
    y: float,
    x: float,
    *,
    radius: int,
    threshold_frac: float = 0.1,
    threshold_abs: float = 0.0,
    iterations: int = 4,
) -> tuple[float, float]:
    """Iterated thresholded centroid in a (2r+1)² box; pixels outside the frame ignored."""
    h, w = img.shape
    for _ in range(iterations):
        iy, ix = round(y), round(x)
        y0, y1 = max(iy - radius, 0), min(iy + radius + 1, h)
        x0, x1 = max(ix - radius, 0), min(ix + radius + 1, w)
        box = img[y0:y1, x0:x1]
        t = max(threshold_abs, threshold_frac * float(box.max()))
        wts = np.clip(box - t, 0.0, None)
        total = float(wts.sum())
        if not total > 0:
            break
        gy, gx = np.mgrid[y0:y1, x0:x1]
        ny, nx = float((wts * gy).sum() / total), float((wts * gx).sum() / total)
        done = abs(ny - y) < 1e-3 and abs(nx - x) < 1e-3
        y, x = ny, nx
        if done:
            break
    return y, x

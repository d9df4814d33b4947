"""The camera noise model measured from the calibration frames, and where to measure it."""

from __future__ import annotations

import math

import numpy as np

from focaltrack.calibration.beads import robust_sigma
from focaltrack.calibration.format import CalibrationError, NoiseModel

__all__ = ["background_mask", "estimate_noise"]


def background_mask(
    shape: tuple[int, int],
    y: float,
    x: float,
    window_px: int,
    *,
    min_pixels: int = 2000,
    max_pixels: int = 100_000,
) -> np.ndarray:
    """Pixels of the full frame far enough from the bead to measure background on.

    The exclusion radius is the first of 0.75, 0.6, 0.5 × the window that leaves at least
    ``min_pixels`` pixels (at 100 µm defocus the bead's image reaches ~55 px from its
    centre, so the frame outside the crop window is the safe place to look). Large frames
    keep every n-th row only (whole rows, so horizontal neighbours stay together), about
    ``max_pixels`` pixels: plenty for a median, and memory stays small for a full sCMOS
    frame.
    """
    h, w = shape
    yy, xx = np.ogrid[:h, :w]
    r2 = (yy - y) ** 2 + (xx - x) ** 2
    mask = np.zeros(shape, dtype=bool)
    for frac in (0.75, 0.6, 0.5):
        mask = r2 > (frac * window_px) ** 2
        n = int(mask.sum())
        if n >= min_pixels:
            if n > max_pixels:
                mask &= (np.arange(h) % math.ceil(n / max_pixels) == 0)[:, None]
            return mask
    if int(mask.sum()) < 200:
        raise CalibrationError(
            f"the {w}×{h} px frame leaves too few pixels outside the bead's "
            f"{window_px} px window to measure the background; record a larger field of view "
            "or use a smaller --window"
        )
    return mask


def estimate_noise(
    mean_stack: np.ndarray,
    *,
    mask: np.ndarray,
    var_stack: np.ndarray | None = None,
    n_averages: int = 1,
    signal_box: tuple[int, int, int, int] | None = None,
    saturation_adu: float | None = None,
) -> NoiseModel:
    """The camera noise model, in ADU, measured from the calibration frames themselves.

    Model (single frames): a pixel with mean ``μ`` ADU has variance
    ``read_noise² + (μ − offset) / gain``, with ``gain`` in e⁻/ADU.

    - ``offset_adu``: median of the background pixels (``mask``), median over slices: the
      level an empty pixel reads (camera offset plus any uniform background light).
    - ``read_noise_adu``: the noise of such an empty pixel in one frame. With
      ``var_stack`` (per-pixel temporal variance over the frames averaged at each step):
      the mean temporal variance of the background pixels (those above 50× the median
      variance left out: hot pixels, other beads), square-rooted. Without it: a spatial
      high-pass — the robust spread of horizontal neighbour differences over background
      pixels, ÷√2, times
      √``n_averages`` (the stack holds averages of that many frames).
    - ``gain_e_per_adu``: photon transfer, with ``var_stack`` only (else NaN): over the
      pixels of ``signal_box`` (y0, x0, h, w; the bead's window) in every slice, binned by
      the brightness of their neighbours (`_photon_transfer_gain`), the slope of variance
      against ``μ − offset`` (intercept fixed at ``read_noise²``) is 1/gain. NaN when the
      bead is too faint for shot noise to show.
    """
    mean_stack = np.asarray(mean_stack)
    z = mean_stack.shape[0]
    bg = mean_stack[:, mask].astype(np.float64)  # (Z, N)
    offset = float(np.median(np.median(bg, axis=1)))
    if var_stack is not None:
        # Mean (unbiased whatever the distribution and the ADU quantisation) of the pixels
        # whose variance is below 50× the median: hot pixels and other beads are left out,
        # while a χ² variance over ≥ 2 frames exceeds that only with probability < 1e-5.
        v = np.asarray(var_stack)[:, mask].astype(np.float64).ravel()
        med = float(np.median(v))
        if med > 0:
            v = v[v < 50.0 * med]
        read = float(np.sqrt(max(float(v.mean()), 0.0)))
    else:
        both = mask[:, 1:] & mask[:, :-1]
        sig = []
        for k in range(z):
            img = mean_stack[k].astype(np.float64)
            d = (img[:, 1:] - img[:, :-1])[both]
            sig.append(robust_sigma(d) / math.sqrt(2.0))
        read = float(np.median(sig)) * math.sqrt(max(n_averages, 1))
    gain = math.nan
    if var_stack is not None and signal_box is not None:
        gain = _photon_transfer_gain(
            mean_stack, np.asarray(var_stack), signal_box, offset, read, saturation_adu
        )
    return NoiseModel(offset_adu=offset, read_noise_adu=read, gain_e_per_adu=gain)


def _photon_transfer_gain(
    mean_stack: np.ndarray,
    var_stack: np.ndarray,
    box: tuple[int, int, int, int],
    offset: float,
    read: float,
    saturation_adu: float | None,
) -> float:
    """1/slope of temporal variance against mean signal over the bead's pixels.

    Pixels are binned by the mean of their 8 neighbours, not by their own mean: binning by
    a pixel's own noisy mean would put pixels with upward noise into the bright bins
    (regression dilution) and flatten the slope. The neighbours' noise is independent of
    the pixel's, so each bin's average mean and average variance are unbiased, and the
    linear model holds for the bin averages exactly.
    """
    from scipy import ndimage

    y0, x0, h, w = box
    y0, x0 = max(y0, 0), max(x0, 0)
    m = mean_stack[:, y0 : y0 + h, x0 : x0 + w].astype(np.float64)
    nb = (ndimage.uniform_filter(m, size=(1, 3, 3), mode="nearest") * 9.0 - m) / 8.0
    mu = m.ravel() - offset
    key = nb.ravel() - offset
    var = var_stack[:, y0 : y0 + h, x0 : x0 + w].astype(np.float64).ravel()
    keep = key > 3.0 * max(read, 1e-9)
    if saturation_adu is not None:
        keep &= m.ravel() < 0.9 * saturation_adu
    mu, var, key = mu[keep], var[keep], key[keep]
    if mu.size < 200:
        return math.nan
    edges = np.quantile(key, np.linspace(0.0, 1.0, 21))
    idx = np.clip(np.searchsorted(edges, key, side="right") - 1, 0, 19)
    counts = np.bincount(idx, minlength=20).astype(np.float64)
    ok = counts >= 10
    mb = np.bincount(idx, weights=mu, minlength=20)[ok] / counts[ok]
    vb = np.bincount(idx, weights=var, minlength=20)[ok] / counts[ok] - read**2
    # Weighted least squares through the origin; weights from the model's variance (not
    # the measured one, which would favour bins whose variance came out low by chance).
    slope = float((counts[ok] * mb * vb).sum() / (counts[ok] * mb * mb).sum())
    for _ in range(3):
        wts = counts[ok] / np.maximum(read**2 + max(slope, 0.0) * mb, 1e-12) ** 2
        slope = float((wts * mb * vb).sum() / (wts * mb * mb).sum())
    if not slope > 0 or slope * float(mb.max()) < 0.5 * read**2:
        return math.nan  # no usable shot-noise lever arm
    return 1.0 / slope

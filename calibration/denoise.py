"""A calibration stack's noise, and the stack without it: the noise level of its window's
corners, a Wiener filter, and the projection of each ring around the bead onto its low
angular harmonics. Numpy and scipy only; `focaltrack.sim.spline_psf.model_stack` builds
the models from it, `focaltrack.calibration.pupil` weighs its fit with it.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ANGULAR_ORDER", "angular_projection", "calibration_noise", "denoised"]

#: `angular_projection`: the highest angular order kept
ANGULAR_ORDER = 8


def calibration_noise(stack: np.ndarray, centre_px: tuple[float, float]) -> float:
    """The noise of a calibration stack's pixels (its units; robust σ, 1.4826 · MAD) where
    no bead light reaches: the corners of its window, outside the inscribed circle, over
    all slices. 0 for a stack without noise or without corners."""
    _, hh, ww = stack.shape
    cx, cy = centre_px
    yy, xx = np.mgrid[:hh, :ww]
    corner = np.hypot(yy - cy, xx - cx) > 0.5 * min(hh, ww)
    if corner.sum() < 64:
        return 0.0
    v = stack[:, corner]
    return float(1.4826 * np.median(np.abs(v - np.median(v))))


def denoised(
    stack: np.ndarray, noise: float, centre_px: tuple[float, float] | None = None
) -> np.ndarray:
    """The stack with its pixel noise ``noise`` (σ, white) filtered out, slice by slice.

    A bead stack is one bead's light over a whole window: 100 µm out of focus its ring
    peaks at ~10 noise σ per pixel. A spline through that noise is a model with false
    structure: a Poisson fit weights the dim pixels most, so it is pulled by it (a ring
    90 µm out was placed 1–2 µm off), and the derivatives of the noise add information
    that is not there (a Cramér–Rao bound several times too low).

    Two steps: a Wiener filter in each slice's spatial frequencies (the gain
    1 − noise power / power, the power averaged over 5 × 5 neighbouring frequencies, so
    the ring's own frequencies pass and those of noise alone do not), then pixels whose
    3 × 3 neighbourhood (or one up to 2 px away) holds no light above a third of the
    noise set to zero. Simulated bead stacks correlate with the true PSF at 0.95 instead
    of 0.78 at 98 µm (0.97 instead of 0.96 at 30 µm).

    With the bead's position ``centre_px`` (x, y), a third: `angular_projection`, which
    keeps of each ring of pixels around the bead only its low angular harmonics."""
    from scipy import ndimage

    _, hh, ww = stack.shape
    f = np.fft.fft2(stack, axes=(1, 2))
    power = ndimage.uniform_filter(np.abs(f) ** 2, size=(1, 5, 5), mode="wrap")
    gain = np.clip(1.0 - noise**2 * hh * ww / np.maximum(power, 1e-300), 0.0, 1.0)
    out = np.real(np.fft.ifft2(f * gain, axes=(1, 2)))
    box = ndimage.uniform_filter(out, size=(1, 3, 3), mode="constant")
    keep = box > noise / 3.0
    keep = ndimage.binary_dilation(keep, structure=np.ones((1, 5, 5), dtype=bool))
    out = np.where(keep, out, 0.0)
    return out if centre_px is None else angular_projection(out, centre_px)


def angular_projection(
    stack: np.ndarray, centre_px: tuple[float, float], order: int = ANGULAR_ORDER
) -> np.ndarray:
    """Each slice with every 1-px ring of pixels around the bead (``centre_px``: x, y)
    replaced by its least-squares fit by the angular harmonics cos mθ, sin mθ, m ≤
    ``order``, each with a term linear in the radius; rings of fewer than three pixels
    per number (within ~16 px of the bead for order 8) and the corners outside the
    inscribed circle are kept as they are.

    A defocused PSF is a ring whose shape around the bead is set by the pupil's
    aberrations, all of low angular order (defocus and spherical aberration m = 0, coma
    m = 1, astigmatism m = 2, trefoil m = 3; the square pixels add m = 4, 8), while a bead
    stack's noise is spread over every order: a ring 50 px out has ~300 pixels and keeps
    34 numbers. On `evaluate`'s isolated bright emitters with the default calibration (4
    frames averaged per slice) this took the RMSE from 0.14 / 0.33 µm (lateral / axial)
    to 0.11 / 0.24 µm (order 8; orders 4 and 12 were no better)."""
    z, hh, ww = stack.shape
    cx, cy = centre_px
    yy, xx = np.mgrid[:hh, :ww]
    r = np.hypot(yy - cy, xx - cx).ravel()
    theta = np.arctan2(yy - cy, xx - cx).ravel()
    flat = stack.reshape(z, -1)
    out = flat.copy()
    for ring in range(int(0.5 * min(hh, ww)) + 1):
        sel = np.nonzero((r >= ring) & (r < ring + 1))[0]
        if len(sel) < 3 * 2 * (2 * order + 1):
            # under three pixels a number: kept (a ring this small is a compact, bright
            # spot, whose square pixels give it orders a few numbers cannot hold)
            continue
        k = np.arange(1, order + 1)[None, :] * theta[sel, None]
        basis = np.concatenate([np.ones((len(sel), 1)), np.cos(k), np.sin(k)], 1)
        basis = np.concatenate([basis, basis * (r[sel] - ring - 0.5)[:, None]], 1)
        coef, *_ = np.linalg.lstsq(basis, flat[:, sel].T, rcond=None)
        out[:, sel] = (basis @ coef).T
    return out.reshape(stack.shape)

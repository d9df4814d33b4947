"""Synthetic bead focal stacks with known truth, for the calibration tests.

A defocus-widened Gaussian per bead (σ grows linearly with defocus, like the geometric
blur), Poisson photons, an sCMOS-like camera (offset, gain, read noise), lateral drift.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SynthStack:
    mean: np.ndarray  # float32 (Z, H, W), the average of n_avg frames
    var: np.ndarray  # float32 (Z, H, W), temporal variance (ddof 1)
    max_frame: np.ndarray  # uint16 (H, W)
    frames0: np.ndarray  # uint16 (Z, H, W): the first frame of every step (a raw stack)
    z_um: np.ndarray
    truth_xy: np.ndarray  # (Z, 2) bead centre x, y in pixels per slice
    offset_adu: float
    read_noise_adu: float  # effective: read noise and background shot noise, ADU
    gain_e_per_adu: float


def synth_stack(
    *,
    nz: int = 21,
    shape: tuple[int, int] = (200, 200),
    beads: tuple[tuple[float, float, float], ...] = ((100.3, 96.6, 1.0),),
    drift_px_per_slice: tuple[float, float] = (0.06, -0.04),
    photons: float = 2.0e5,
    dz_um: float = 5.0,
    offset_adu: float = 100.0,
    gain_e_per_adu: float = 0.5,
    read_noise_e: float = 1.5,
    background_e: float = 10.0,
    n_avg: int = 3,
    sigma0_px: float = 1.1,
    sigma_slope_px_per_um: float = 0.25,
    seed: int = 0,
) -> SynthStack:
    """``beads``: (x, y, relative brightness) in the focal slice, pixels."""
    rng = np.random.default_rng(seed)
    h, w = shape
    z = np.arange(nz, dtype=np.float64) * dz_um
    yy, xx = np.mgrid[:h, :w]
    mean = np.zeros((nz, h, w), np.float32)
    var = np.zeros_like(mean)
    frames0 = np.zeros((nz, h, w), np.uint16)
    mx = np.zeros((h, w), np.uint16)
    truth = np.zeros((nz, 2))
    for k in range(nz):
        dx, dy = drift_px_per_slice[0] * k, drift_px_per_slice[1] * k
        s = np.hypot(sigma0_px, sigma_slope_px_per_um * z[k])
        expected = np.full((h, w), background_e, np.float64)
        for bx, by, rel in beads:
            g = np.exp(-((xx - bx - dx) ** 2 + (yy - by - dy) ** 2) / (2 * s * s))
            expected += photons * rel * g / (2 * np.pi * s * s)
        truth[k] = beads[0][0] + dx, beads[0][1] + dy
        frames = []
        for _ in range(n_avg):
            e = rng.poisson(expected) + rng.normal(0.0, read_noise_e, (h, w))
            adu = offset_adu + e / gain_e_per_adu
            frames.append(np.clip(np.rint(adu), 0, 65535).astype(np.uint16))
        f = np.stack(frames).astype(np.float64)
        mean[k] = f.mean(axis=0)
        var[k] = f.var(axis=0, ddof=1) if n_avg > 1 else 0.0
        frames0[k] = frames[0]
        mx = np.maximum(mx, np.max(frames, axis=0))
    read_eff = float(np.sqrt(read_noise_e**2 + background_e)) / gain_e_per_adu
    return SynthStack(
        mean=mean,
        var=var,
        max_frame=mx,
        frames0=frames0,
        z_um=z,
        truth_xy=truth,
        offset_adu=offset_adu + background_e / gain_e_per_adu,
        read_noise_adu=read_eff,
        gain_e_per_adu=gain_e_per_adu,
    )

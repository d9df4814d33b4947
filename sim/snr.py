"""The SNR of the evaluation and of the training synthesizer: peak-pixel SNR, in dB.

For the *reference emitter* — intensity 1, centred on a pixel, at the middle of the depth
range —

    SNR = S / sqrt(S + B + σ_r² + σ_q²),        SNR_dB = 20·log10(SNR)

with S the expected signal photo-electrons in its brightest pixel (above background), B
the expected background photo-electrons per pixel, σ_r the camera read noise and σ_q the
ADU quantisation noise (electrons). This is the peak-pixel SNR of the particle-tracking
literature (signal at the peak over the noise standard deviation there; Chenouard et al.
2014) in amplitude decibels: 0 dB is a peak as high as its noise, 20 dB ten times higher.
For a given background the signal that reaches a target SNR follows in closed form (the
positive root of S² = SNR²·(S + F)), and from it the photons per unit intensity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from focaltrack.sim.render import Microscope

__all__ = ["SNR_DEFINITION", "Exposure", "exposure_for_snr", "signal_for_snr_e", "snr_db_of"]

SNR_DEFINITION = (
    "SNR_dB = 20·log10(S / sqrt(S + B + σ_r² + σ_q²)) for the reference emitter "
    "(intensity 1, centred on a pixel, at the middle of the depth range): S = expected "
    "signal photo-electrons in its brightest pixel above background, B = expected "
    "background photo-electrons per pixel, σ_r = camera read noise, σ_q = ADU quantisation "
    "noise (electrons). Peak-pixel SNR (signal over noise standard deviation at the peak) "
    "in amplitude decibels: 0 dB = peak as high as its noise, 20 dB = 10×."
)


@dataclass(frozen=True, slots=True)
class Exposure:
    """Brightness and background of one evaluation point, in photons at the sample."""

    photons_per_intensity: float  # an intensity-1 emitter's photons reaching the camera
    background_photons: float  # per pixel per frame
    snr_db: float  # of the reference emitter, by construction
    peak_fraction: float  # the reference emitter's brightest pixel / its total photons


def signal_for_snr_e(snr_db: float, noise_e2: float) -> float:
    """Peak signal (electrons) with S / sqrt(S + noise_e2) = 10^(snr_db/20): closed form."""
    t2 = 10.0 ** (snr_db / 10.0)  # SNR²
    return 0.5 * (t2 + math.sqrt(t2 * t2 + 4.0 * t2 * noise_e2))


def snr_db_of(signal_e: float, noise_e2: float) -> float:
    """Inverse of `signal_for_snr_e`: the peak SNR in dB of a peak of ``signal_e``."""
    return 20.0 * math.log10(signal_e / math.sqrt(signal_e + noise_e2))


def exposure_for_snr(
    snr_db: float,
    *,
    peak_fraction: float,
    microscope: Microscope,
    background_photons: float,
) -> Exposure:
    """Photons per unit intensity that put the reference emitter exactly at ``snr_db``."""
    if not peak_fraction > 0:
        raise ValueError(f"peak fraction must be positive, got {peak_fraction}")
    if background_photons < 0:
        raise ValueError(f"background must be non-negative, got {background_photons}")
    qe = microscope.camera.quantum_efficiency
    noise_e2 = qe * background_photons + microscope.noise_floor_e2
    s_e = signal_for_snr_e(snr_db, noise_e2)
    return Exposure(
        photons_per_intensity=s_e / (qe * peak_fraction),
        background_photons=background_photons,
        snr_db=snr_db,
        peak_fraction=peak_fraction,
    )

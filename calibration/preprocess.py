"""Raw camera frames (ADU) to network input: the calibration's noise model applied to pixels.

``y = asinh(e / s0)`` with ``e = (ADU − offset) · gain`` electrons and
``s0 = max(2 σ_r, 1 e⁻)``. It is a fixed, pixel-wise function of the calibration's noise
model, so a 128-px training window and a 2048-px live frame are normalised identically
(no per-image statistics, which would differ between a window and a frame). Noise-level
signals stay linear; bright ones are log-compressed, so one network spans the whole
brightness and SNR range it was trained on. The training synthesizer
(`focaltrack.sim.synth`) and the live localizer (`focaltrack.models.localizer`) both apply
this one function; a model bundle stores its constants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from focaltrack.calibration.format import NoiseModel

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_GAIN_E_PER_ADU", "Preprocess", "preprocess"]

DEFAULT_GAIN_E_PER_ADU = 1.0  # used when the calibration could not estimate the gain


@dataclass(frozen=True, slots=True)
class Preprocess:
    """Raw ADU → network input; constants from the calibration's noise model."""

    offset_adu: float
    gain_e_per_adu: float
    s0_e: float

    @classmethod
    def from_noise(cls, noise: NoiseModel) -> Preprocess:
        gain = noise.gain_e_per_adu
        if not (math.isfinite(gain) and gain > 0):
            gain = DEFAULT_GAIN_E_PER_ADU
        read_e = noise.read_noise_adu * gain if math.isfinite(noise.read_noise_adu) else 1.0
        return cls(float(noise.offset_adu), float(gain), float(max(2.0 * read_e, 1.0)))

    @property
    def read_noise_e(self) -> float:
        return self.s0_e / 2.0

    def __call__(self, adu: torch.Tensor) -> torch.Tensor:
        # Tensor methods (not torch.*): the calibration package does not import torch.
        e = (adu.float() - self.offset_adu) * self.gain_e_per_adu
        return (e / self.s0_e).asinh()


def preprocess(adu: torch.Tensor, noise: NoiseModel) -> torch.Tensor:
    return Preprocess.from_noise(noise)(adu)

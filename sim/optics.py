"""Value types describing the simulated (and the real) microscope: optics and camera.

Defaults follow seed 002: a 10x / 0.45 NA air objective, 6.5 µm sCMOS pixels
(0.65 µm in the sample), GFP-like emission, emitters in an aqueous sample.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Aberrations:
    """Pupil aberrations as Zernike amplitudes, RMS waves (Noll normalisation).

    Zero everywhere is the ideal microscope; the simulated microscope uses a little of
    each so that training on its calibration is not training on the ideal model.
    """

    spherical_waves: float = 0.0  # Z(4,0), Noll 11
    astigmatism_waves: float = 0.0  # Z(2,2), Noll 6 (0°)
    astigmatism_45_waves: float = 0.0  # Z(2,-2), Noll 5
    coma_x_waves: float = 0.0  # Z(3,1), Noll 8
    coma_y_waves: float = 0.0  # Z(3,-1), Noll 7

    @property
    def is_zero(self) -> bool:
        return not any(
            (
                self.spherical_waves,
                self.astigmatism_waves,
                self.astigmatism_45_waves,
                self.coma_x_waves,
                self.coma_y_waves,
            )
        )


# A slightly imperfect but realistic objective: what the simulated microscope uses.
SIM_ABERRATIONS = Aberrations(
    spherical_waves=0.08, astigmatism_waves=0.05, coma_x_waves=0.04, coma_y_waves=0.02
)

#: The simulated microscope's calibration bead: photons per exposure, a bright bead that
#: stays below the 16-bit full scale in focus (`focaltrack calibrate --driver sim` and the
#: service's calibration on the simulator both use it).
SIM_BEAD_PHOTONS = 60000.0


@dataclass(frozen=True, slots=True)
class Optics:
    """A wide-field fluorescence microscope's imaging optics."""

    na: float = 0.45
    magnification: float = 10.0
    wavelength_um: float = 0.515  # emission, vacuum
    n_immersion: float = 1.0  # air objective
    n_sample: float = 1.33  # emitters in water / agarose
    camera_pixel_um: float = 6.5
    aberrations: Aberrations = field(default_factory=Aberrations)

    def __post_init__(self) -> None:
        if not 0 < self.na < min(self.n_immersion, self.n_sample) + 1e-9:
            raise ValueError(
                f"NA {self.na} must be positive and below the refractive indices "
                f"({self.n_immersion}, {self.n_sample})"
            )
        if self.wavelength_um <= 0 or self.camera_pixel_um <= 0 or self.magnification <= 0:
            raise ValueError("wavelength, camera pixel and magnification must be positive")

    @property
    def pixel_size_um(self) -> float:
        """Pixel size in the sample plane."""
        return self.camera_pixel_um / self.magnification


@dataclass(frozen=True, slots=True)
class CameraModel:
    """An sCMOS-like camera: photons → electrons → ADU with offset, read noise, gain.

    ``gain_e_per_adu`` is electrons per ADU (the conversion factor on a data sheet).
    ORCA-Flash4.0 V2-like defaults.
    """

    offset_adu: float = 100.0
    gain_e_per_adu: float = 0.46
    read_noise_e: float = 1.6
    quantum_efficiency: float = 0.72
    bit_depth: int = 16

    @property
    def max_adu(self) -> int:
        return (1 << self.bit_depth) - 1

"""One still frame of the simulated microscope: emitters drawn in a volume, rendered, exposed.

`Microscope` is the simulated microscope's physics (the `focaltrack.sim` PSF model *with its
aberrations*, the sCMOS camera model), the same physics the simulated core images;
`Renderer` turns emitters into expected photons per pixel and a camera frame. `FrameEmitters`
is the truth of one still frame with *relative* intensities (an evaluation point scales them
to photons by its exposure): unlike `focaltrack.sim.scene.GroundTruth`, the instant of a
moving scene, it has no time, no ids and no photon counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from focaltrack.sim.optics import SIM_ABERRATIONS, CameraModel, Optics

if TYPE_CHECKING:
    from focaltrack.sim.psf import PSFModel

__all__ = ["FrameEmitters", "Geometry", "Microscope", "Renderer", "random_scene"]


@dataclass(frozen=True, slots=True)
class Microscope:
    """The simulated microscope's physics: optics (with aberrations) and camera."""

    optics: Optics = field(default_factory=lambda: Optics(aberrations=SIM_ABERRATIONS))
    camera: CameraModel = field(default_factory=CameraModel)

    @property
    def pixel_size_um(self) -> float:
        return self.optics.pixel_size_um

    @property
    def noise_floor_e2(self) -> float:
        """Camera noise variance independent of light, electrons²: read + quantisation."""
        c = self.camera
        return c.read_noise_e**2 + c.gain_e_per_adu**2 / 12.0


class Renderer:
    """Noise-free images of emitters and noisy camera frames, from the sim's physics."""

    def __init__(
        self, microscope: Microscope, shape: tuple[int, int], psf: PSFModel | None = None
    ) -> None:
        if psf is None:
            from focaltrack.sim.psf import PSFModel

            # The simulated core's PSF library: same optics, same defaults, same instance.
            psf = PSFModel.shared(microscope.optics)
        self.microscope = microscope
        self.shape = shape
        self.psf = psf

    def expected_photons(
        self, x_px: np.ndarray, y_px: np.ndarray, z_um: np.ndarray, photons: np.ndarray
    ) -> np.ndarray:
        """Expected photons per pixel (no background) of emitters at (x, y) px, depth z."""
        if len(x_px) == 0:
            return np.zeros(self.shape, dtype=np.float64)
        img = self.psf.render(
            self.shape,
            np.asarray(x_px, dtype=np.float64),
            np.asarray(y_px, dtype=np.float64),
            np.asarray(z_um, dtype=np.float64),
            np.asarray(photons, dtype=np.float64),
        )
        return np.asarray(img, dtype=np.float64)

    def expose(
        self, photons: np.ndarray, background_photons: float, rng: np.random.Generator
    ) -> np.ndarray:
        from focaltrack.sim import camera

        return camera.expose(
            photons, self.microscope.camera, rng, background_photons=background_photons
        )

    def peak_fraction(self, z_um: float) -> float:
        """Brightest pixel of a pixel-centred emitter at depth ``z_um``, per photon."""
        h, w = self.shape
        img = self.expected_photons(
            np.array([float(w // 2)]), np.array([float(h // 2)]), np.array([z_um]), np.ones(1)
        )
        return float(img.max())


@dataclass(frozen=True, slots=True)
class Geometry:
    """Where emitters go: the evaluated volume inside a camera frame with a margin."""

    pixel_size_um: float
    field_um: float = 100.0  # the volume's lateral side (seed 002: 100 µm)
    margin_um: float = 10.0  # frame beyond the volume on each side
    z_range_um: tuple[float, float] = (0.0, 100.0)

    @property
    def frame_px(self) -> int:
        return math.ceil((self.field_um + 2 * self.margin_um) / self.pixel_size_um)

    @property
    def shape(self) -> tuple[int, int]:
        return self.frame_px, self.frame_px

    @property
    def centre_um(self) -> float:
        """Frame centre; pixel centres sit at index × pixel size."""
        return (self.frame_px - 1) / 2 * self.pixel_size_um

    @property
    def z_ref_um(self) -> float:
        return 0.5 * (self.z_range_um[0] + self.z_range_um[1])


@dataclass(frozen=True, slots=True)
class FrameEmitters:
    """Ground truth of one still frame: positions and relative brightness (not photons)."""

    xyz_um: np.ndarray  # (N, 3)
    intensity: np.ndarray  # (N,), relative brightness


def random_scene(
    rng: np.random.Generator,
    n: int,
    geometry: Geometry,
    intensity_range: tuple[float, float] = (0.1, 1.0),
) -> FrameEmitters:
    """``n`` emitters uniform in the volume, intensities uniform in ``intensity_range``."""
    half = geometry.field_um / 2
    c = geometry.centre_um
    xy = rng.uniform(c - half, c + half, size=(n, 2))
    z = rng.uniform(*geometry.z_range_um, size=n)
    lo, hi = intensity_range
    inten = rng.uniform(lo, hi, size=n) if hi > lo else np.full(n, float(lo))
    return FrameEmitters(np.column_stack([xy, z]), inten)

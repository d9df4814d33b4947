"""Camera noise: expected photons per pixel → a raw sCMOS frame in ADU.

The model (per pixel, independent), with ``CameraModel`` from `focaltrack.sim.optics`::

    electrons = Poisson(QE · (signal_photons + background_photons)) + Normal(0, read_noise_e)
    ADU       = clip(round(electrons / gain_e_per_adu + offset_adu), 0, 2^bit_depth − 1)

so that, away from the clipping limits,

    mean(ADU)     = offset + QE · photons / gain
    variance(ADU) = (QE · photons + read_noise_e²) / gain² + 1/12    (the last term: rounding)

``gain_e_per_adu`` is electrons per ADU (the data-sheet conversion factor). Values above the
full scale saturate at ``max_adu`` (65535 for 16 bit); the frame is ``uint16`` (``uint8`` for
cameras of 8 bits or fewer).
"""

from __future__ import annotations

import numpy as np

from focaltrack.sim.optics import CameraModel

__all__ = [
    "adu_to_photons",
    "expected_adu",
    "expose",
    "frame_dtype",
    "variance_adu",
]


def frame_dtype(camera: CameraModel) -> type[np.unsignedinteger]:
    """The pixel type a camera of this bit depth delivers."""
    if camera.bit_depth > 16:
        raise ValueError(f"bit depth {camera.bit_depth} > 16 is not supported")
    return np.uint8 if camera.bit_depth <= 8 else np.uint16


def expose(
    photons: np.ndarray,
    camera: CameraModel | None = None,
    rng: np.random.Generator | int | None = None,
    *,
    background_photons: float | np.ndarray = 0.0,
) -> np.ndarray:
    """One noisy raw frame from expected photons per pixel (signal, without background).

    ``photons``: expected detected photons per pixel arriving at the sensor over the
    exposure (the PSF model's output); ``background_photons``: expected background photons
    per pixel (scalar or an image). Negative expectations count as 0. Returns an integer
    frame of the camera's dtype (uint16 for 16 bit), saturated at ``camera.max_adu``.
    """
    cam = camera if camera is not None else CameraModel()
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    lam = np.asarray(photons, dtype=np.float64) + np.asarray(background_photons, dtype=np.float64)
    lam = np.maximum(lam, 0.0) * cam.quantum_efficiency
    electrons = gen.poisson(lam).astype(np.float64)
    if cam.read_noise_e > 0:
        electrons += gen.normal(0.0, cam.read_noise_e, size=electrons.shape)
    adu = electrons / cam.gain_e_per_adu + cam.offset_adu
    np.rint(adu, out=adu)
    np.clip(adu, 0, cam.max_adu, out=adu)
    return adu.astype(frame_dtype(cam))


def expected_adu(
    photons: np.ndarray | float,
    camera: CameraModel | None = None,
    background_photons: float | np.ndarray = 0.0,
) -> np.ndarray:
    """Mean ADU per pixel (before clipping): offset + QE · photons / gain."""
    cam = camera if camera is not None else CameraModel()
    lam = np.maximum(np.asarray(photons, dtype=np.float64) + background_photons, 0.0)
    return cam.offset_adu + cam.quantum_efficiency * lam / cam.gain_e_per_adu


def variance_adu(
    photons: np.ndarray | float,
    camera: CameraModel | None = None,
    background_photons: float | np.ndarray = 0.0,
) -> np.ndarray:
    """ADU variance per pixel (before clipping): shot + read noise over gain², + 1/12."""
    cam = camera if camera is not None else CameraModel()
    lam = np.maximum(np.asarray(photons, dtype=np.float64) + background_photons, 0.0)
    e_var = cam.quantum_efficiency * lam + cam.read_noise_e**2
    return e_var / cam.gain_e_per_adu**2 + 1.0 / 12.0


def adu_to_photons(frame: np.ndarray, camera: CameraModel | None = None) -> np.ndarray:
    """Invert the mean: (ADU − offset) · gain / QE, float32 detected photons (noisy)."""
    cam = camera if camera is not None else CameraModel()
    f = np.asarray(frame, dtype=np.float32)
    return (f - np.float32(cam.offset_adu)) * np.float32(
        cam.gain_e_per_adu / cam.quantum_efficiency
    )

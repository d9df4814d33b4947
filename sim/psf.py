"""Scalar diffraction PSF of a wide-field fluorescence microscope, honest over ±100 µm defocus.

Physics (Gibson–Lanni without a cover glass, evaluated as a pupil integral):

The field in the image plane is the Fourier transform of the pupil function
``P(k) = A(ρ) · exp(i Φ(k))`` over the spatial frequencies ``|k| ≤ NA/λ`` (cycles/µm,
sample space). With ``s = λ|k|`` (the ray's ``n sinθ``, invariant across the interface)
and ``ρ = s / NA``::

    Φ = (2π/λ) · [ d · (√(n_s² − s²) − n_s)            exact non-paraxial defocus in the sample
                 + W_mm(s)                               index mismatch at the focal depth
                 + λ · Σ a_j Z_j(ρ, φ) ]                 Zernike aberrations, Noll RMS waves

**Defocus.** ``d`` (µm, sample space) is the axial distance between the emitter and the focal
plane *inside the sample*: ``d = focus − z`` in the project's convention (COMMON.md and
`focaltrack.calibration.format`: an emitter at absolute ``z`` seen with the focus at ``f`` has
defocus ``f − z``). The focus drive is expressed in sample-space micrometres (the focal-shift
factor of the air → water interface is folded into the drive's calibration), so a drive step of
``δ`` moves the focal plane by ``δ`` in the sample. The defocus term is the exact Debye
``k_z · d`` phase in the sample medium, not the paraxial ``ρ²`` approximation (which is off by
~0.5 waves at the pupil edge at 100 µm for 10x/0.45 in water).

**Which refractive index sets the blur.** The light spreading from an emitter ``d`` away from
the focal plane travels through the sample, at the sample-side marginal angle
``θ_s = asin(NA / n_sample)``. So the geometric blur radius is ``|d| · tan(asin(NA/n_sample))``
— 0.360 µm per µm for NA 0.45 in water (n = 1.33), i.e. ≈ 36 µm = 55 px (0.65 µm pixels) at
100 µm defocus. (Had the *objective* been moved in air with the emitter fixed, the slope per
µm of drive travel would be ``tan(asin(NA/n_immersion))`` = 0.504; the ratio, ≈ 1.40 at the
marginal ray and 1.33 paraxially, is the air/water focal-shift factor.) ``tests/test_psf.py``
measures the slope against ``tan(asin(NA/n_sample))``.

**Index mismatch.** With the focal plane at depth ``z_f`` (``focal_depth_um``) below the
interface between immersion (``n_i``) and sample (``n_s``), Gibson–Lanni gives the extra path
``z_f · [√(n_s² − s²) − (n_i/n_s) · √(n_i² − s²)]`` (nominal focal depth ``z_f`` reached by a
drive travel of ``z_f · n_i/n_s``, the paraxial focal shift). Its piston and its component
along the defocus term are removed (least squares over the pupil), so ``d = 0`` remains the
best focus and what is left is the depth-induced spherical aberration. For 10x/0.45 air into
water at 50 µm this is small (a few hundredths of a wave); it grows with depth and NA.

**Aberrations.** `focaltrack.sim.optics.Aberrations`: Noll-normalised Zernike amplitudes in
RMS waves — primary spherical Z11, astigmatism Z6/Z5, coma Z8/Z7. The simulated microscope
uses `SIM_ABERRATIONS` so it is not the ideal model.

**Amplitude.** Uniform over the pupil (the aplanatic ``cos^(±1/2) θ`` and Fresnel factors
change the amplitude by < 5 % at NA 0.45 and are left out), with a one-sample anti-aliased
edge so the sampled disk stays round.

Numerics:

* The field is evaluated with a matrix DFT (``E = A_y · P · A_xᵀ``) onto an oversampled grid
  (``oversample`` samples per pixel, odd, ≥ 3 so the intensity, band-limited to ``2NA/λ``, is
  Nyquist-sampled). The sampled pupil makes the image-plane field periodic with period
  ``1/Δk``; the pupil grid is chosen per window so that ``1/Δk > 2R + blur + 10 λ/NA``
  (nothing but a faint tail of a periodic copy reaches the window) — which also keeps the
  defocus phase well below π per pupil sample (no phase aliasing at 110 µm).
* Pixel integration is exact for the band-limited intensity: the oversampled intensity is
  multiplied by ``sinc(f_x p) sinc(f_y p)`` in the Fourier domain (the pixel's box), giving
  ``g(x) = ∫ I over the pixel centred at x``. Sampling ``g`` at pixel centres is the camera
  image; sampling it between them is the same emitter moved by a sub-pixel step.
* Normalisation: ``∫ I = 1`` over the infinite plane (Parseval on the pupil), so the sum of a
  pixel image is the fraction of the emitter's detected light that falls inside the window.

`PSFModel` (what the simulator renders with) computes ``g`` once per optics on a fine defocus
grid (default −110 … +110 µm every 0.5 µm; the intensity PSF is band-limited axially to
``(n_s − √(n_s² − NA²))/λ`` ≈ 0.15 cycles/µm, so 0.5 µm steps with linear interpolation are
accurate to ~3 % in the highest axial frequency and far better in the bulk). Each slice has
its own window, sized to its blur: ``radius = 1.06 · |d| · tanθ_s + margin`` with a margin of
12 λ/NA ≈ 14 µm (default optics: 45 px in focus, 173 px = 112 µm at |d| = 110 µm). A window
holds 99.65–99.85 % of the light at every defocus (`PSFModel.energy`); what it cuts is the
hard pupil edge's faint diffraction tail. Slices are stored on their oversampled grid — 7
samples per pixel near focus, 5 from ~3 µm, 3 beyond ~20 µm (a budget of ~333 fine samples
across a slice; smaller pixels or higher NA get up to 9) — as float16 of ``g / max g``
(relative error ≤ 5e-4) with a float64 scale each: ≈ 115 MB for the default model. Sub-pixel
positions are rendered by picking the sample phase and blending the two neighbouring phases
linearly (exact centroid; ≤ 2 % of the peak shape error in focus), eight strided slice-adds
per emitter, no per-pixel loops: ≈ 35 ms for 50 emitters in a 512² frame across the whole
defocus range. Build (first time, this project's shared 2-core box): ≈ 6–9 s when the machine
is quiet (up to ~25 s when it is busy); then loaded from disk in ≈ 0.1–0.3 s. Cache:
``$FOCALTRACK_CACHE`` or ``~/.cache/focaltrack``, an ``.npz`` per configuration keyed by a
hash of the optics, grid and `PSF_VERSION`, written atomically (temporary file + rename);
instances in one process share one library.

`psf_stack` (module function) evaluates the PSF directly at any z and sub-pixel offset without
a library — for tests, references and calibration ground truth.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from focaltrack.common.files import atomic_path
from focaltrack.sim.optics import Optics

__all__ = [
    "PSF_VERSION",
    "PSFModel",
    "blur_radius_um",
    "cache_dir",
    "psf_stack",
]

PSF_VERSION = "psf-3"

# Window margin around the geometric blur, in units of λ/NA.
_MARGIN_LAMBDA_NA = 12.0
_BLUR_SAFETY = 1.06


def blur_radius_um(optics: Optics, defocus_um: float | np.ndarray) -> float | np.ndarray:
    """Geometric blur radius ``|d| · tan(asin(NA / n_sample))`` in µm (see module docstring)."""
    t = math.tan(math.asin(optics.na / optics.n_sample))
    return np.abs(defocus_um) * t


def cache_dir() -> Path:
    """Where PSF libraries are cached: ``$FOCALTRACK_CACHE`` when set (read at each model's
    construction), else ``~/.cache/focaltrack``. The test suite sets it to a temporary folder
    of its session (tests/conftest.py), so that tests never write into the user's cache."""
    env = os.environ.get("FOCALTRACK_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "focaltrack"


# ----------------------------------------------------------------------------------------
# Pupil
# ----------------------------------------------------------------------------------------


def _zernike_phase_waves(optics: Optics, rho: np.ndarray, phi: np.ndarray) -> np.ndarray:
    a = optics.aberrations
    w = np.zeros_like(rho)
    if a.is_zero:
        return w
    r2 = rho * rho
    if a.spherical_waves:
        w += a.spherical_waves * math.sqrt(5.0) * (6.0 * r2 * r2 - 6.0 * r2 + 1.0)
    if a.astigmatism_waves:
        w += a.astigmatism_waves * math.sqrt(6.0) * r2 * np.cos(2.0 * phi)
    if a.astigmatism_45_waves:
        w += a.astigmatism_45_waves * math.sqrt(6.0) * r2 * np.sin(2.0 * phi)
    coma_r = math.sqrt(8.0) * (3.0 * r2 * rho - 2.0 * rho)
    if a.coma_x_waves:
        w += a.coma_x_waves * coma_r * np.cos(phi)
    if a.coma_y_waves:
        w += a.coma_y_waves * coma_r * np.sin(phi)
    return w


class _Pupil:
    """The sampled pupil of one optics: amplitude, fixed phase, defocus kernel, frequencies."""

    def __init__(self, optics: Optics, n: int, focal_depth_um: float) -> None:
        self.optics = optics
        lam = optics.wavelength_um
        kmax = optics.na / lam  # cycles/µm
        self.n = n
        self.dk = 2.0 * kmax / n
        k = (np.arange(n) - (n - 1) / 2.0) * self.dk
        self.k = k
        kx, ky = np.meshgrid(k, k, indexing="xy")
        kr = np.hypot(kx, ky)
        rho = kr / kmax
        phi = np.arctan2(ky, kx)
        # Anti-aliased edge: fraction of a sample inside the unit circle (1-sample ramp).
        amp = np.clip((1.0 - rho) * (n / 2.0) + 0.5, 0.0, 1.0)
        inside = amp > 0
        s = np.minimum(rho, 1.0) * optics.na  # n sinθ
        ns, ni = optics.n_sample, optics.n_immersion
        dfoc = np.sqrt(ns * ns - s * s) - ns  # defocus OPD per µm (≤ 0)
        # Gibson–Lanni mismatch at the focal depth, minus piston and defocus components.
        w_mm = np.zeros_like(rho)
        if focal_depth_um and abs(ns - ni) > 1e-12:
            raw = focal_depth_um * (np.sqrt(ns * ns - s * s) - (ni / ns) * np.sqrt(ni * ni - s * s))
            wts = amp[inside] ** 2
            basis = np.stack([np.ones(int(inside.sum())), dfoc[inside]], axis=1)
            sw = np.sqrt(wts)[:, None]
            coef, *_ = np.linalg.lstsq(basis * sw, raw[inside] * sw[:, 0], rcond=None)
            w_mm = raw - coef[0] - coef[1] * dfoc
        fixed_waves = w_mm / lam + _zernike_phase_waves(optics, np.minimum(rho, 1.0), phi)
        amp = np.where(inside, amp, 0.0)
        # Normalise: Σ|P|² Δk² = 1  ⇒  ∫|E|² dA = 1 (Parseval).
        amp = amp / math.sqrt(float(np.sum(amp * amp)) * self.dk * self.dk)
        self.p0 = (amp * np.exp(2j * np.pi * fixed_waves)).astype(np.complex128)
        self.defocus_rad_per_um = (2.0 * np.pi / lam) * dfoc
        self.support = inside
        # Compact representation: only rows/cols that touch the support.
        self.rows = np.flatnonzero(inside.any(axis=1))
        self.cols = np.flatnonzero(inside.any(axis=0))
        self._fm_cache: dict[tuple[int, float, float, int], np.ndarray] = {}
        self.fixed_waves_rms = float(
            np.sqrt(np.average((fixed_waves[inside] - fixed_waves[inside].mean()) ** 2))
        )

    def field_matrix(self, x_um: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """A[j, m] = exp(i 2π x_j k_m) Δk (m in ``idx``): the inverse transform at points x_j."""
        key = (x_um.size, float(x_um[0]), float(x_um[-1]), idx.size)
        a = self._fm_cache.get(key)
        if a is None:
            a = (np.exp(2j * np.pi * np.outer(x_um, self.k[idx])) * self.dk).astype(np.complex64)
            if len(self._fm_cache) > 8:
                self._fm_cache.pop(next(iter(self._fm_cache)))
            self._fm_cache[key] = a
        return a

    def pupil(self, defocus_um: float) -> np.ndarray:
        return (self.p0 * np.exp(1j * self.defocus_rad_per_um * defocus_um)).astype(np.complex64)


def _pupil_samples(optics: Optics, max_abs_defocus_um: float, max_radius_um: float) -> int:
    """Pupil samples across the diameter: no defocus-phase aliasing, no image-plane wrap."""
    kmax = optics.na / optics.wavelength_um
    tan_s = math.tan(math.asin(optics.na / optics.n_sample))
    # The sampled pupil makes the image-plane field periodic with period 1/Δk. A copy
    # centred 1/Δk away must not reach into the window (radius R) with more than its faint
    # tail: 1/Δk > 2R + blur radius + 10 λ/NA (a copy's light then starts ≥ R + 10 λ/NA
    # beyond our window's far edge). This also keeps the defocus phase below π per sample
    # (its local frequency in k is the ray's image position, ≤ the blur radius: Nyquist).
    blur = max_abs_defocus_um * tan_s * _BLUR_SAFETY
    spread = 2.0 * max_radius_um + blur + 10.0 / kmax
    n = math.ceil(2.0 * kmax * spread)
    n = max(64, n)
    return int(math.ceil(n / 16.0) * 16)


def _default_oversample(optics: Optics) -> int:
    """Odd samples per pixel so the intensity (band 2NA/λ) is Nyquist-sampled; at least 3."""
    need = optics.pixel_size_um * 4.0 * optics.na / optics.wavelength_um
    os_ = max(3, math.ceil(need))
    return os_ if os_ % 2 == 1 else os_ + 1


def _box_filter(inten: np.ndarray, h_um: float, p_um: float) -> np.ndarray:
    """Exact pixel integration of a Nyquist-sampled intensity: × sinc(f p)² in Fourier space."""
    from scipy import fft as sfft

    ny, nx = inten.shape
    # Zero-pad to fast lengths (the window edges hold almost nothing, so padding only
    # removes the circular wrap).
    py, px = sfft.next_fast_len(ny + 8, real=True), sfft.next_fast_len(nx + 8, real=True)
    fy = np.fft.fftfreq(py, d=h_um)
    fx = np.fft.rfftfreq(px, d=h_um)
    spec = sfft.rfft2(inten, s=(py, px), workers=-1)
    spec *= (np.sinc(fy * p_um)[:, None] * np.sinc(fx * p_um)[None, :]) * (p_um * p_um)
    out = sfft.irfft2(spec, s=(py, px), workers=-1)[:ny, :nx]
    np.maximum(out, 0.0, out=out)
    return out


def _fine_psf(
    pupil: _Pupil,
    defocus_um: float,
    window_px: tuple[int, int],
    oversample: int,
    p_um: float,
    offset_px: tuple[float, float] = (0.0, 0.0),
) -> np.ndarray:
    """Pixel-integrated PSF ``g`` on the oversampled grid of a (H, W)-pixel window.

    Fine sample ``j`` along an axis sits at pixel coordinate ``(j − (os−1)/2) / os``; the
    emitter is at pixel ``(H//2 + oy, W//2 + ox)``. Returns (os·H, os·W) float64; the camera
    image is ``g[(os-1)//2::os, (os-1)//2::os]``.
    """
    h, w = window_px
    os_ = oversample
    hstep = p_um / os_
    half = (os_ - 1) / 2.0
    ys = ((np.arange(os_ * h) - half) / os_ - h // 2 - offset_px[1]) * p_um
    xs = ((np.arange(os_ * w) - half) / os_ - w // 2 - offset_px[0]) * p_um
    rows, cols = pupil.rows, pupil.cols
    ay = pupil.field_matrix(ys, rows)
    ax = pupil.field_matrix(xs, cols)
    pp = pupil.pupil(defocus_um)[np.ix_(rows, cols)]
    field = ay @ (pp @ ax.T)
    inten = (field.real.astype(np.float64) ** 2) + (field.imag.astype(np.float64) ** 2)
    return _box_filter(inten, hstep, p_um)


# ----------------------------------------------------------------------------------------
# Direct evaluation
# ----------------------------------------------------------------------------------------


def psf_stack(
    optics: Optics | None = None,
    z_um: float | Sequence[float] | np.ndarray = 0.0,
    *,
    window_px: int | tuple[int, int] = 64,
    offset_px: tuple[float, float] = (0.0, 0.0),
    focal_depth_um: float = 0.0,
    oversample: int | None = None,
    pupil_samples: int | None = None,
) -> np.ndarray:
    """The camera image of a point emitter at each defocus in ``z_um``: float32 (Z, H, W).

    Evaluated directly (no library): the emitter sits at pixel ``(H//2 + oy, W//2 + ox)``
    (row, column) with ``offset_px = (ox, oy)``; values are the fraction of the emitter's
    detected light in each pixel (the whole plane sums to 1, so a slice sums to the
    in-window fraction). ``focal_depth_um`` sets the index-mismatch spherical aberration
    (0 = focal plane at the interface: no mismatch aberration).
    """
    optics = optics if optics is not None else Optics()
    z = np.atleast_1d(np.asarray(z_um, dtype=np.float64))
    hw = (window_px, window_px) if isinstance(window_px, int) else tuple(window_px)
    h, w = int(hw[0]), int(hw[1])
    p = optics.pixel_size_um
    os_ = oversample if oversample is not None else _default_oversample(optics)
    if os_ < 1 or os_ % 2 == 0:
        raise ValueError(f"oversample must be odd and positive, got {os_}")
    radius = 0.5 * math.hypot(h, w) * p
    n = pupil_samples or _pupil_samples(optics, float(np.max(np.abs(z))), radius)
    pupil = _Pupil(optics, n, focal_depth_um)
    out = np.empty((len(z), h, w), dtype=np.float32)
    c = (os_ - 1) // 2
    for i, zz in enumerate(z):
        g = _fine_psf(pupil, float(zz), (h, w), os_, p, offset_px)
        out[i] = g[c::os_, c::os_]
    return out


# ----------------------------------------------------------------------------------------
# Library
# ----------------------------------------------------------------------------------------

_Library = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
_MODELS: dict[str, PSFModel] = {}
_LIBS: dict[str, _Library] = {}
_REGISTRY_LOCK = threading.Lock()  # guards the dicts below; held only briefly
_KEY_LOCKS: dict[str, threading.Lock] = {}  # one per configuration: build or load it once


def _key_lock(key: str) -> threading.Lock:
    with _REGISTRY_LOCK:
        return _KEY_LOCKS.setdefault(key, threading.Lock())


class PSFModel:
    """A PSF library for one microscope: oversampled slices on a fine defocus grid.

    ``PSFModel(optics)`` builds (or loads from the disk cache) the library for defocus
    ``z_min_um … z_max_um`` in steps of ``dz_um``. Defocus outside the grid is clamped to
    its ends. Use `PSFModel.shared` to reuse one instance per configuration in a process.

    Main methods: `render` (superpose many emitters into a frame), `psf_stack` (pixel images
    at given defocus and sub-pixel offset), `energy` (in-window fraction of the light).
    """

    def __init__(
        self,
        optics: Optics | None = None,
        *,
        z_min_um: float = -110.0,
        z_max_um: float = 110.0,
        dz_um: float = 0.5,
        focal_depth_um: float = 50.0,
        oversample: int | None = None,
        margin_um: float | None = None,
        max_window_px: int | None = None,
        max_oversample: int = 9,
        fine_budget: int = 333,
        cache: bool = True,
        cache_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.optics = optics if optics is not None else Optics()
        if not (math.isfinite(z_min_um) and math.isfinite(z_max_um) and z_max_um > z_min_um):
            raise ValueError(f"z range must be finite and increasing, got {z_min_um}..{z_max_um}")
        if not (math.isfinite(dz_um) and dz_um > 0):
            raise ValueError(f"dz_um must be positive, got {dz_um}")
        n_z = round((z_max_um - z_min_um) / dz_um) + 1
        if n_z < 2:
            raise ValueError(f"dz_um {dz_um} leaves fewer than 2 slices in {z_min_um}..{z_max_um}")
        self.z_um = z_min_um + dz_um * np.arange(n_z)
        self.dz_um = float(dz_um)
        self.focal_depth_um = float(focal_depth_um)
        self.pixel_size_um = self.optics.pixel_size_um
        self.oversample = oversample if oversample is not None else _default_oversample(self.optics)
        if self.oversample < 3 or self.oversample % 2 == 0:
            raise ValueError(f"oversample must be odd and >= 3, got {self.oversample}")
        lam_na = self.optics.wavelength_um / self.optics.na
        self.margin_um = float(margin_um) if margin_um is not None else _MARGIN_LAMBDA_NA * lam_na
        p = self.pixel_size_um
        radii = _BLUR_SAFETY * np.asarray(blur_radius_um(self.optics, self.z_um)) + self.margin_um
        sizes = 2 * np.ceil(radii / p).astype(int) + 1
        if max_window_px is not None:
            cap = int(max_window_px) - (1 - int(max_window_px) % 2)  # odd
            sizes = np.minimum(sizes, cap)
        self.sizes = sizes
        self.window_px = int(sizes.max())
        # Per-slice oversampling: small (sharp, near-focus) slices get finer sub-pixel
        # phases (up to 9 per pixel) within a fine-grid budget, large ones the base factor.
        budget = int(fine_budget)
        os_i = np.minimum(max_oversample, budget // sizes)
        os_i = np.maximum(os_i - (1 - os_i % 2), self.oversample)
        self.oversamples = os_i.astype(int)
        self.build_seconds = 0.0
        self.loaded_from_cache = False  # True when read from the disk cache
        key = self.cache_key
        path = Path(cache_path) if cache_path is not None else cache_dir() / f"psf-{key}.npz"
        self.cache_file = path if cache else None
        with _key_lock("lib:" + key):
            with _REGISTRY_LOCK:
                lib = _LIBS.get(key)
            self.source = "memory"  # where the library came from: memory, disk or built
            if lib is None and cache:
                lib = self._load(path)
                self.loaded_from_cache = lib is not None
                self.source = "disk"
            if lib is None:
                self.source = "built"
                t0 = time.perf_counter()
                lib = self._build()
                self.build_seconds = time.perf_counter() - t0
                if cache:
                    self._save(path, lib)
            with _REGISTRY_LOCK:
                _LIBS[key] = lib  # instances with the same key share one read-only library
        self._flat, self._starts, self._scale, self._energy = lib

    # ------------------------------------------------------------------ construction

    @classmethod
    def shared(cls, optics: Optics | None = None, **kwargs: object) -> PSFModel:
        """One instance per configuration per process (built or loaded once)."""
        optics = optics if optics is not None else Optics()
        key = repr((asdict(optics), sorted(kwargs.items())))
        with _key_lock("shared:" + key):
            with _REGISTRY_LOCK:
                m = _MODELS.get(key)
            if m is None:
                m = cls(optics, **kwargs)  # type: ignore[arg-type]
                with _REGISTRY_LOCK:
                    _MODELS[key] = m
            return m

    @staticmethod
    def clear_memory_cache() -> None:
        """Forget the libraries and `shared` instances held in this process."""
        with _REGISTRY_LOCK:
            _LIBS.clear()
            _MODELS.clear()

    @property
    def cache_key(self) -> str:
        h = hashlib.sha256()
        h.update(PSF_VERSION.encode())
        h.update(repr(asdict(self.optics)).encode())
        h.update(
            repr(
                (
                    round(float(self.z_um[0]), 9),
                    len(self.z_um),
                    round(self.dz_um, 9),
                    round(self.focal_depth_um, 9),
                    self.oversample,
                    round(self.margin_um, 9),
                    tuple(int(s) for s in self.sizes),
                    tuple(int(o) for o in self.oversamples),
                )
            ).encode()
        )
        return h.hexdigest()[:24]

    def _build(self) -> _Library:
        """Slices stored as float16 of g / max(g) (relative error ≤ 5e-4) and a scale each."""
        p = self.pixel_size_um
        pupils: dict[int, _Pupil] = {}  # per pupil sampling: each slice gets what it needs
        counts = (self.oversamples * self.sizes) ** 2
        starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        flat = np.empty(int(starts[-1]), dtype=np.float16)
        scale = np.empty(len(self.z_um))
        energy = np.empty(len(self.z_um))
        for i, (z, s, os_) in enumerate(zip(self.z_um, self.sizes, self.oversamples, strict=True)):
            os_ = int(os_)
            c = (os_ - 1) // 2
            n = _pupil_samples(self.optics, abs(float(z)), 0.5 * math.sqrt(2.0) * int(s) * p)
            n = math.ceil(n / 32) * 32
            if n not in pupils:
                pupils[n] = _Pupil(self.optics, n, self.focal_depth_um)
            g = _fine_psf(pupils[n], float(z), (int(s), int(s)), os_, p)
            energy[i] = float(g[c::os_, c::os_].sum())
            scale[i] = float(g.max())
            flat[starts[i] : starts[i + 1]] = (g / scale[i]).ravel()
        return flat, starts, scale, energy

    def _load(self, path: Path) -> _Library | None:
        try:
            with np.load(path, allow_pickle=False) as f:
                if str(f["key"]) != self.cache_key:
                    return None
                flat = np.asarray(f["flat"], dtype=np.float16)
                starts = np.asarray(f["starts"], dtype=np.int64)
                scale = np.asarray(f["scale"], dtype=np.float64)
                energy = np.asarray(f["energy"], dtype=np.float64)
        except (OSError, KeyError, ValueError):
            return None
        nz = len(self.z_um)
        if starts[-1] != flat.size or len(starts) != nz + 1 or len(scale) != nz:
            return None
        return flat, starts, scale, energy

    def _save(self, path: Path, lib: _Library) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Several processes may build the same library at once: each writes its own
            # uniquely named temporary and the last rename wins, every one complete. A file
            # handle, not a name, for np.savez, which would append ".npz" to the name.
            with atomic_path(path, mode=0o644) as tmp, open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    key=np.array(self.cache_key),
                    flat=lib[0],
                    starts=lib[1],
                    scale=lib[2],
                    energy=lib[3],
                )
        except OSError:
            pass  # a read-only or full cache directory only costs a rebuild next time

    # ------------------------------------------------------------------ access

    def _slice(self, i: int) -> np.ndarray:
        f = int(self.oversamples[i]) * int(self.sizes[i])
        return self._flat[self._starts[i] : self._starts[i + 1]].reshape(f, f)

    @property
    def nbytes(self) -> int:
        return int(self._flat.nbytes)

    @property
    def z_range_um(self) -> tuple[float, float]:
        return float(self.z_um[0]), float(self.z_um[-1])

    def _z_index(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Lower slice index and weight of the upper slice for linear interpolation."""
        t = (np.clip(z, self.z_um[0], self.z_um[-1]) - self.z_um[0]) / self.dz_um
        i0 = np.minimum(np.floor(t).astype(int), len(self.z_um) - 2)
        return i0, t - i0

    def energy(self, z_um: float | np.ndarray) -> np.ndarray:
        """Fraction of an emitter's light inside the library window at defocus ``z_um``."""
        z = np.atleast_1d(np.asarray(z_um, dtype=np.float64))
        i0, w = self._z_index(z)
        return (1.0 - w) * self._energy[i0] + w * self._energy[i0 + 1]

    # ------------------------------------------------------------------ rendering

    def render(
        self,
        shape: tuple[int, int],
        x_px: np.ndarray | float,
        y_px: np.ndarray | float,
        defocus_um: np.ndarray | float,
        photons: np.ndarray | float = 1.0,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Expected photons per pixel from point emitters, superposed into a (H, W) image.

        ``x_px``, ``y_px``: (N,) positions in pixel coordinates (x = column, y = row; pixel
        (r, c) has its centre at (x, y) = (c, r), so x_px = x_um / pixel_size_um).
        ``defocus_um``: (N,) focus − z. ``photons``: detected photons per emitter over the
        exposure (scalar or (N,)). Adds into ``out`` (float64, zeros if None) and returns it.
        Emitters partly or wholly outside the frame contribute the part that overlaps it.
        Cost: one strided slice-add per emitter and tap (≤ 8), no per-pixel loops.
        """
        h, w = int(shape[0]), int(shape[1])
        if out is None:
            out = np.zeros((h, w), dtype=np.float64)
        elif out.shape != (h, w):
            raise ValueError(f"out has shape {out.shape}, expected {(h, w)}")
        x = np.atleast_1d(np.asarray(x_px, dtype=np.float64))
        n = len(x)
        if n == 0:
            return out
        y = np.broadcast_to(np.asarray(y_px, dtype=np.float64), (n,))
        z = np.broadcast_to(np.asarray(defocus_um, dtype=np.float64), (n,))
        ph = np.broadcast_to(np.asarray(photons, dtype=np.float64), (n,))
        i0, wz = self._z_index(np.nan_to_num(z))
        reach = self.window_px // 2 + 2
        for k in range(n):
            xk, yk = x[k], y[k]
            if not (ph[k] != 0 and math.isfinite(xk) and math.isfinite(yk)):
                continue
            if xk < -reach or yk < -reach or xk > w + reach or yk > h + reach:
                continue
            for i, wi in ((i0[k], 1.0 - wz[k]), (i0[k] + 1, wz[k])):
                if wi <= 0.0:
                    continue
                self._add_slice(out, int(i), xk, yk, ph[k] * wi * self._scale[i])
        return out

    def _add_slice(self, out: np.ndarray, i: int, x: float, y: float, scale: float) -> None:
        s = int(self.sizes[i])
        os_ = int(self.oversamples[i])
        g = self._slice(i)
        f = os_ * s
        cf = os_ * (s // 2) + (os_ - 1) // 2  # fine index of offset 0
        h, w = out.shape
        # fine index for pixel m: j = cf + os*(m - x) = (cf - q) + os*m - r, os*x = q + r
        qx = math.floor(os_ * x)
        rx = os_ * x - qx
        qy = math.floor(os_ * y)
        ry = os_ * y - qy
        for by, wy in ((cf - qy, 1.0 - ry), (cf - qy - 1, ry)):
            if wy <= 0.0:
                continue
            py = by % os_
            my0 = (py - by) // os_  # frame row of g[py]
            ny = len(range(py, f, os_))
            r0, r1 = max(my0, 0), min(my0 + ny, h)
            if r0 >= r1:
                continue
            for bx, wx in ((cf - qx, 1.0 - rx), (cf - qx - 1, rx)):
                if wx <= 0.0:
                    continue
                px = bx % os_
                mx0 = (px - bx) // os_
                nx = len(range(px, f, os_))
                c0, c1 = max(mx0, 0), min(mx0 + nx, w)
                if c0 >= c1:
                    continue
                view = g[
                    py + os_ * (r0 - my0) : py + os_ * (r1 - my0) : os_,
                    px + os_ * (c0 - mx0) : px + os_ * (c1 - mx0) : os_,
                ]
                out[r0:r1, c0:c1] += np.multiply(view, scale * wy * wx, dtype=np.float64)

    def psf_stack(
        self,
        z_um: float | Sequence[float] | np.ndarray,
        window_px: int | None = None,
        offset_px: tuple[float, float] = (0.0, 0.0),
    ) -> np.ndarray:
        """Library PSF images, float32 (Z, W, W): emitter at pixel (W//2 + oy, W//2 + ox).

        Values are fractions of the emitter's light (a slice sums to `energy`). Default
        window: the library's largest (`window_px`).
        """
        z = np.atleast_1d(np.asarray(z_um, dtype=np.float64))
        wpx = int(window_px) if window_px is not None else self.window_px
        out = np.zeros((len(z), wpx, wpx), dtype=np.float64)
        cx, cy = wpx // 2 + offset_px[0], wpx // 2 + offset_px[1]
        for k, zz in enumerate(z):
            self.render((wpx, wpx), cx, cy, zz, 1.0, out=out[k])
        return out.astype(np.float32)

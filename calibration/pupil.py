"""A pupil function fitted to the calibration stack (phase retrieval): the bead's PSF at
any depth without the stack's noise.

Why: the localizer's maximum-likelihood fit, the matched filter and the training images all
use the calibration stack as the PSF. A 4-frame average of a faint defocused ring carries
noise of 10–50 % of the ring's own pixels (more with depth), and every localization at that
depth inherits it as a model error. On the simulated microscope, a noise-free stack (the
simulator's own PSF) put isolated bright emitters at 0.025 µm lateral RMSE where the
measured stack gave 0.085 µm, and 20-emitter frames at 20 dB at 0.23 / 0.54 µm where it
gave 0.39 / 0.69 µm (the same networks). A pupil has few numbers, which the whole stack
pins down at once; what is left after its fit is the noise.

The model (scalar, as `focaltrack.sim.psf`, with unknowns instead of the simulator's
optics): the pupil ``P(k) = A(ρ) · exp(2πi Φ)`` over spatial frequencies ``|k| ≤ kmax``
(cycles/µm; ``kmax`` = NA/λ), ``ρ = |k| / kmax``, with

* ``Φ = d · (√(kn² − |k|²) − kn) + Σ a_j Z_j(ρ, φ) + (d / 100 µm) · a′₁₁ Z₁₁(ρ) − k·r₀``:
  the exact defocus phase of a medium with ``kn`` = n/λ at defocus ``d = z − z₀``, Noll
  Zernikes 5–15 and 22 (astigmatism, coma, trefoil, spherical, secondary astigmatism,
  quadrafoil, secondary spherical; in waves), a spherical aberration that grows with the
  focus travel (an index mismatch), and the bead's position ``r₀`` as a tilt;
* ``A(ρ) = exp(b₁ρ² + b₂ρ⁴)`` (apodization), one-sample soft edge, normalised so that the
  image's light integrates to one;
* the image ``|FFT⁻¹ P|²`` on a grid ``oversample`` times finer than the pixels, integrated
  over each pixel exactly (× sinc(kₓp)·sinc(k_yp) in Fourier space) and sampled at the
  pixel centres.

Fitted by L-BFGS (torch) to every other slice, weighted by the calibration's noise model
(read noise and shot noise per pixel), each slice with its own scale and offset (bleaching,
a background left over) and its own small shift of the bead (what the drift correction
left): first ``kmax``, ``kn``, ``r₀``, ``z₀``, then everything. The start: ``kn`` for water
at 0.55 µm; ``kmax`` from how fast the deep slices' rings grow. One sign of ``d`` is
enough: the other sign gives this one's images with the even Zernikes (m = 0, 2, 4)
negated, which the fit is free to do. Without a gain in the noise model (an imported
stack), the weights come from the stack (`pixel_variance`); where the bead's shot noise
dominates, that estimate is low and the fit is then judged not to explain the stack (the
stack's own model is kept). Kept only where the fit explains the stack
(`PupilFit.acceptable`: weighted χ² per pixel ≤ `MAX_CHI2`): a PSF this model cannot
describe (a phase mask, a strong vectorial effect, two beads) keeps the stack as it is,
denoised as before (`focaltrack.sim.spline_psf.model_stack`).

The fitted bead position ``r₀`` is where the pupil's tilt is zero: the source itself. The
model is drawn with ``r₀`` on `Calibration.centre_px`, so a localization with this model is
the source's position, not the position of the focal slice's centroid (which coma moves).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from focaltrack.calibration.format import Calibration

log = logging.getLogger(__name__)

__all__ = [
    "MAX_CHI2",
    "NOLL",
    "PupilFit",
    "describe",
    "fit_pupil",
    "pixel_variance",
    "pupil_of",
    "with_pupil",
]

#: Fewer slices than this are not fitted (the spline models need 4: `focaltrack.sim.synth`).
MIN_SLICES = 4
#: The Zernike terms fitted (Noll indices).
NOLL = (5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 22)
#: A fit is kept when its noise-weighted χ² per pixel is at most this (1 = the noise).
MAX_CHI2 = 3.0
#: Samples per pixel of the fine grid (odd: a pixel's centre is a sample).
OVERSAMPLE = 3
#: Pixels added around the window on the fine grid, at least: the grid is periodic, and a
#: deep ring's diffraction tail would otherwise wrap into the window (`_margin_px` adds
#: what a ring wider than the window needs).
MARGIN_PX = 16


def _margin_px(
    window_px: tuple[int, int], max_defocus_um: float, tan_theta: float, p: float
) -> int:
    """The fine grid's margin: a ring of radius d·tanθ must not reach a copy of the
    window (the grid repeats every window + 2·margin), with 10 px for its tail."""
    ring = abs(max_defocus_um) * tan_theta / p
    return max(MARGIN_PX, math.ceil(ring + 10.0 - min(window_px) / 2.0))


_KEYS = ("kmax", "kn", "x_px", "y_px", "z0_um", "sign", "spherical_slope", "chi2")


def _zernikes(rho: Any, phi: Any) -> Any:
    import torch

    r2 = rho * rho
    r3, r4 = r2 * rho, r2 * r2
    s2, c2 = torch.sin(2 * phi), torch.cos(2 * phi)
    coma = math.sqrt(8) * (3 * r3 - 2 * rho)
    astig2 = math.sqrt(10) * (4 * r4 - 3 * r2)
    return torch.stack(
        [
            math.sqrt(6) * r2 * s2,  # 5
            math.sqrt(6) * r2 * c2,  # 6
            coma * torch.sin(phi),  # 7
            coma * torch.cos(phi),  # 8
            math.sqrt(8) * r3 * torch.sin(3 * phi),  # 9
            math.sqrt(8) * r3 * torch.cos(3 * phi),  # 10
            math.sqrt(5) * (6 * r4 - 6 * r2 + 1),  # 11
            astig2 * c2,  # 12
            astig2 * s2,  # 13
            math.sqrt(10) * r4 * torch.cos(4 * phi),  # 14
            math.sqrt(10) * r4 * torch.sin(4 * phi),  # 15
            math.sqrt(7) * (20 * r4 * r2 - 30 * r4 + 12 * r2 - 1),  # 22
        ]
    )


_SPHERICAL = NOLL.index(11)


@dataclass(frozen=True, slots=True)
class PupilFit:
    """A fitted pupil (module docstring); lengths in µm, frequencies in cycles/µm."""

    kmax: float  # NA / λ
    kn: float  # n_sample / λ
    x_px: float  # the bead in the calibration window (column, row)
    y_px: float
    z0_um: float  # its focus on the calibration's z axis
    sign: float  # defocus d = sign · (z − z0)
    spherical_slope: float  # waves of Z11 per 100 µm of d
    zernike_waves: tuple[float, ...]  # one per `NOLL`
    amplitude: tuple[float, float]  # b1, b2
    chi2: float  # noise-weighted, per pixel
    seconds: float = 0.0

    @property
    def acceptable(self) -> bool:
        return bool(math.isfinite(self.chi2) and self.chi2 <= MAX_CHI2)

    # ------------------------------------------------------------------ storage
    def to_extra(self) -> dict[str, object]:
        """`Calibration.extra` entries (``extra_pupil_*`` in the file)."""
        d: dict[str, object] = {f"pupil_{k}": float(getattr(self, k)) for k in _KEYS}
        d["pupil_zernike_waves"] = np.asarray(self.zernike_waves, dtype=np.float64)
        d["pupil_zernike_noll"] = np.asarray(NOLL, dtype=np.int64)
        d["pupil_amplitude"] = np.asarray(self.amplitude, dtype=np.float64)
        d["pupil_seconds"] = float(self.seconds)
        return d

    @classmethod
    def from_extra(cls, extra: dict[str, object]) -> PupilFit | None:
        """The fit stored in a calibration's ``extra``, or None (none, or another basis)."""
        if "pupil_kmax" not in extra:
            return None
        try:
            noll = tuple(int(v) for v in np.atleast_1d(np.asarray(extra["pupil_zernike_noll"])))
            waves = tuple(float(v) for v in np.atleast_1d(np.asarray(extra["pupil_zernike_waves"])))
            amp = tuple(float(v) for v in np.atleast_1d(np.asarray(extra["pupil_amplitude"])))
            numbers = {k: float(extra[f"pupil_{k}"]) for k in _KEYS}  # type: ignore[arg-type]
            seconds = float(extra.get("pupil_seconds", 0.0))  # type: ignore[arg-type]
        except (KeyError, TypeError, ValueError):
            return None  # incomplete or malformed: as if there were none
        if noll != NOLL or len(waves) != len(NOLL) or len(amp) != 2:
            return None
        return cls(**numbers, zernike_waves=waves, amplitude=(amp[0], amp[1]), seconds=seconds)

    def key(self) -> tuple[float, ...]:
        """Every number of the fit (a cache key)."""
        return (
            *(float(getattr(self, k)) for k in _KEYS),
            *self.zernike_waves,
            *self.amplitude,
        )

    # ------------------------------------------------------------------ drawing
    def render(
        self,
        z_um: np.ndarray,
        window_px: tuple[int, int],
        pixel_size_um: float,
        centre_px: tuple[float, float],
    ) -> np.ndarray:
        """(Z, H, W) the bead's image at each ``z_um`` with the source on ``centre_px``
        (x, y) of the window: the fraction of its light in each pixel."""
        import torch

        z = np.asarray(z_um, dtype=np.float64)
        tan = self.kmax / math.sqrt(max(self.kn**2 - self.kmax**2, 1e-12))
        margin = _margin_px(window_px, float(np.max(np.abs(z - self.z0_um))), tan, pixel_size_um)
        model = _PupilModel(
            window_px,
            pixel_size_um,
            dtype=torch.float64,
            fft_dtype=torch.float32,
            margin_px=margin,
        )
        model.load(self)
        with torch.no_grad():
            model.xy0.copy_(torch.tensor(centre_px, dtype=torch.float64))
            out = model(torch.as_tensor(z))
        return np.asarray(out.numpy())


class _PupilModel:
    """The differentiable forward model: parameters -> pixel images (module docstring)."""

    def __init__(
        self,
        window_px: tuple[int, int],
        pixel_size_um: float,
        dtype: Any,
        fft_dtype: Any = None,
        margin_px: int = MARGIN_PX,
    ) -> None:
        import torch

        # the transforms (most of the time) may run in single precision; sums stay double
        self.fft_dtype = dtype if fft_dtype is None else fft_dtype
        h, w = int(window_px[0]), int(window_px[1])
        self.h, self.w, self.p = h, w, float(pixel_size_um)
        os_ = OVERSAMPLE
        self.margin = int(margin_px)
        self.ny, self.nx = os_ * (h + 2 * self.margin), os_ * (w + 2 * self.margin)
        delta = self.p / os_
        self.dtype = dtype
        ky = torch.fft.fftfreq(self.ny, d=delta, dtype=dtype)[:, None]
        kx = torch.fft.fftfreq(self.nx, d=delta, dtype=dtype)[None, :]
        self.kx, self.ky = kx, ky
        self.kr = torch.sqrt(kx * kx + ky * ky)
        self.phi = torch.atan2(ky.expand(self.ny, self.nx), kx.expand(self.ny, self.nx))
        self.dk2 = (1.0 / (self.ny * delta)) * (1.0 / (self.nx * delta))
        self.dk = math.sqrt(self.dk2)
        fx = torch.fft.rfftfreq(self.nx, d=delta, dtype=dtype)
        self.box = torch.sinc(ky * self.p) * torch.sinc(fx[None, :] * self.p) * (self.p * self.p)
        t = dict(dtype=dtype)
        self.log_kmax = torch.tensor(math.log(0.8), **t, requires_grad=True)
        self.log_kn = torch.tensor(math.log(1.33 / 0.55), **t, requires_grad=True)
        self.zern = torch.zeros(len(NOLL), **t, requires_grad=True)
        self.sph_slope = torch.zeros((), **t, requires_grad=True)
        self.amp = torch.zeros(2, **t, requires_grad=True)
        self.xy0 = torch.tensor([w / 2.0, h / 2.0], **t, requires_grad=True)
        self.z0 = torch.zeros((), **t, requires_grad=True)
        self.sign = 1.0

    def load(self, fit: PupilFit) -> None:
        import torch

        with torch.no_grad():
            self.log_kmax.fill_(math.log(fit.kmax))
            self.log_kn.fill_(math.log(fit.kn))
            self.zern.copy_(torch.tensor(fit.zernike_waves, dtype=self.dtype))
            self.sph_slope.fill_(fit.spherical_slope)
            self.amp.copy_(torch.tensor(fit.amplitude, dtype=self.dtype))
            self.xy0.copy_(torch.tensor([fit.x_px, fit.y_px], dtype=self.dtype))
            self.z0.fill_(fit.z0_um)
        self.sign = fit.sign

    def result(self, chi2: float, seconds: float) -> PupilFit:
        return PupilFit(
            kmax=float(self.log_kmax.detach().exp()),
            kn=float(self.log_kn.detach().exp()),
            x_px=float(self.xy0.detach()[0]),
            y_px=float(self.xy0.detach()[1]),
            z0_um=float(self.z0.detach()),
            sign=float(self.sign),
            spherical_slope=float(self.sph_slope.detach()),
            zernike_waves=tuple(float(v) for v in self.zern.detach()),
            amplitude=(float(self.amp.detach()[0]), float(self.amp.detach()[1])),
            chi2=float(chi2),
            seconds=float(seconds),
        )

    def __call__(self, z_um: Any, shift_px: Any = None) -> Any:
        """The images at ``z_um`` (Z,); ``shift_px`` (Z, 2): each slice's bead moved by
        (x, y) from ``xy0`` (what is left of the stage's drift in a measured stack)."""
        import torch

        kmax = torch.exp(self.log_kmax)
        kn = torch.exp(self.log_kn)
        rho = self.kr / kmax
        per_kmax = kmax / self.dk  # samples per kmax: a one-sample soft edge
        edge = torch.clamp((1.0 - rho) * per_kmax + 0.5, 0.0, 1.0)
        rc = torch.clamp(rho, max=1.0)
        zern = _zernikes(rc, self.phi)
        amp = edge * torch.exp(self.amp[0] * rc * rc + self.amp[1] * rc**4)
        amp = amp / torch.sqrt((amp * amp).sum() * self.dk2)
        kz = torch.sqrt(torch.clamp(kn * kn - self.kr * self.kr, min=1e-12)) - kn
        # the bead's position, from the fine grid's origin (the margin's first sample)
        xb = (self.xy0[0] + self.margin) * self.p
        yb = (self.xy0[1] + self.margin) * self.p
        fixed = torch.einsum("j,jyx->yx", self.zern, zern) - (self.kx * xb + self.ky * yb)
        d = self.sign * (z_um.to(self.dtype) - self.z0)
        lateral = d[:, None, None] * (kz + (self.sph_slope / 100.0) * zern[_SPHERICAL]) + fixed
        if shift_px is not None:
            lateral = lateral - self.p * (
                self.kx * shift_px[:, 0, None, None] + self.ky * shift_px[:, 1, None, None]
            )
        phase = 2 * math.pi * lateral
        fd = self.fft_dtype
        pupil = (amp * (self.ny * self.nx * self.dk2)).to(fd) * torch.polar(
            torch.ones_like(phase, dtype=fd), phase.to(fd)
        )
        field = torch.fft.ifft2(pupil)
        inten = field.real**2 + field.imag**2
        g = torch.fft.irfft2(torch.fft.rfft2(inten) * self.box.to(fd), s=(self.ny, self.nx))
        g = g.to(self.dtype)
        o = OVERSAMPLE * self.margin
        step = OVERSAMPLE
        return g[:, o : o + step * self.h : step, o : o + step * self.w : step]


def pixel_variance(cal: Calibration) -> np.ndarray:
    """(Z, H, W) each pixel's noise variance, in the units of ``cal.psf``.

    From the calibration's noise model where it is complete (read noise, gain and the
    bead's signal in ADU: read² + shot, over the frames averaged). Otherwise (an imported
    stack has no gain; a hand-made one may lack the rest) from the stack itself: the
    window corners' noise (`calibration_noise`) plus a shot term ``c · signal``, ``c``
    from the stack's difference from its denoised self where the bead is bright. A stack
    without noise gets 0.1 % of its peak, squared.
    """
    from focaltrack.calibration.denoise import calibration_noise, denoised

    psf = np.asarray(cal.psf, dtype=np.float64)
    n_avg = max(int(cal.n_averages), 1)
    scale = float(cal.bead_signal_adu)
    read_adu = float(cal.noise.read_noise_adu)
    gain = float(cal.noise.gain_e_per_adu)
    if noise_model_complete(cal):
        read = read_adu / scale
        return np.asarray((read * read + np.clip(psf, 0.0, None) / (gain * scale)) / n_avg)
    floor = (1e-3 * float(np.abs(psf).max())) ** 2
    noise = calibration_noise(psf, cal.centre_px)
    if not (noise > 0):
        return np.full(psf.shape, max(floor, 1e-30))
    smooth = np.clip(denoised(psf, noise, cal.centre_px), 0.0, None)
    r2 = (psf - smooth) ** 2
    a = noise * noise  # the window's corners: read and background noise
    bright = smooth > 5.0 * noise  # where the bead's own shot noise can show
    c = 0.0
    if np.count_nonzero(bright) > 100:
        c = max(float(np.mean(r2[bright] - a) / np.mean(smooth[bright])), 0.0)
    return np.asarray(a + c * smooth)


def noise_model_complete(cal: Calibration) -> bool:
    """The calibration's noise model gives every pixel's variance (`pixel_variance`)."""
    numbers = (cal.bead_signal_adu, cal.noise.read_noise_adu, cal.noise.gain_e_per_adu)
    return all(math.isfinite(float(v)) and float(v) > 0 for v in numbers)


def _ring_growth_kmax(cal: Calibration, kn: float) -> float:
    """A start for ``kmax`` from the deep slices: a defocused pupil's image is a disk of
    radius ``d · tanθ`` whose RMS radius is ``radius / √2``."""
    psf = np.clip(np.asarray(cal.psf, dtype=np.float64), 0.0, None)
    z = np.asarray(cal.z_um, dtype=np.float64)
    h, w = psf.shape[1:]
    cx, cy = cal.centre_px
    yy, xx = np.mgrid[:h, :w]
    r2 = ((xx - cx) ** 2 + (yy - cy) ** 2) * cal.pixel_size_um**2
    deep = np.nonzero(np.abs(z - z[0]) >= 0.5 * np.abs(z[-1] - z[0]))[0]
    tans = []
    for k in deep:
        s = psf[k].sum()
        d = abs(z[k] - z[0])
        if s > 0 and d > 0:
            tans.append(math.sqrt(2.0 * float((psf[k] * r2).sum() / s)) / d)
    tan = float(np.median(tans)) if tans else 0.35
    sin = tan / math.sqrt(1.0 + tan * tan)
    return max(min(kn * sin, 0.95 * kn), 1e-3)


def fit_pupil(
    cal: Calibration,
    *,
    every: int = 2,
    iterations: tuple[int, int] = (25, 60),
    single: bool = True,
) -> PupilFit:
    """Fit the pupil to ``cal`` (module docstring). 1.5–5 min for a 51-slice 128²
    calibration on one CPU core; quicker for smaller windows and fewer slices."""
    import torch

    t0 = time.perf_counter()
    dtype = torch.float64
    fft_dtype = torch.float32 if single else torch.float64
    y_all = torch.as_tensor(np.asarray(cal.psf, dtype=np.float64))
    z_all = torch.as_tensor(np.asarray(cal.z_um, dtype=np.float64))
    sel = torch.arange(0, y_all.shape[0], max(int(every), 1))
    y, z = y_all[sel], z_all[sel]
    wt = 1.0 / torch.as_tensor(pixel_variance(cal))[sel]
    # the parts of each slice's scale-and-offset solve that do not depend on the model
    a22 = wt.sum((1, 2))
    b2 = (wt * y).sum((1, 2))
    kn0 = 1.33 / 0.55

    # each fitted slice's own bead position about xy0 (zero mean): a measured stack keeps
    # whatever its drift correction left (a smooth fit under noisy centroids is off by a
    # few hundredths of a pixel, slice to slice); left out, the fit would explain that
    # walk with aberrations (coma) and draw every depth a little off
    shift = torch.zeros((len(z), 2), dtype=dtype, requires_grad=True)

    def fitted(m: _PupilModel) -> tuple[Any, Any]:
        """The model as fitted to each slice (its own scale and offset: weighted least
        squares, in closed form) and the residual."""
        mod = m(z, shift - shift.mean(0))
        a11 = (wt * mod * mod).sum((1, 2))
        a12 = (wt * mod).sum((1, 2))
        b1 = (wt * mod * y).sum((1, 2))
        det = a11 * a22 - a12 * a12
        s = (b1 * a22 - b2 * a12) / det
        b = (a11 * b2 - a12 * b1) / det
        signal = s[:, None, None] * mod
        return signal, y - signal - b[:, None, None]

    def chi2(m: _PupilModel) -> Any:
        _, r = fitted(m)
        return (wt * r * r).sum() / y.numel()

    kmax0 = _ring_growth_kmax(cal, kn0)
    # the grid's margin for the widest ring, with a fifth more cone than the start's
    tan0 = 1.2 * kmax0 / math.sqrt(kn0 * kn0 - kmax0 * kmax0)
    reach = float(np.max(np.abs(np.asarray(cal.z_um) - float(cal.z_um[0]))))
    margin = _margin_px(cal.window_px, reach, tan0, cal.pixel_size_um)
    # its defocus sign stays +1: the other sign gives these images with the even Zernikes
    # (m = 0, 2, 4) negated, which the fit is free to do
    m = _PupilModel(cal.window_px, cal.pixel_size_um, dtype, fft_dtype=fft_dtype, margin_px=margin)
    with torch.no_grad():
        m.log_kn.fill_(math.log(kn0))
        m.log_kmax.fill_(math.log(kmax0))
        m.xy0.copy_(torch.tensor(cal.centre_px, dtype=dtype))
        m.z0.fill_(float(z_all[0]))
    stages: list[tuple[list[Any], int]] = [
        ([m.log_kmax, m.log_kn, m.xy0, m.z0], iterations[0]),
        ([m.log_kmax, m.log_kn, m.xy0, m.z0, m.zern, m.sph_slope, m.amp, shift], iterations[1]),
    ]
    value = math.inf
    for params, n in stages:
        opt = torch.optim.LBFGS(
            params, lr=1.0, max_iter=n, history_size=20, line_search_fn="strong_wolfe"
        )

        def closure(opt: Any = opt, m: _PupilModel = m) -> Any:
            opt.zero_grad()
            loss = chi2(m)
            loss.backward()
            return loss

        try:
            opt.step(closure)
            with torch.no_grad():
                value = float(chi2(m))
        except (RuntimeError, ValueError) as e:  # a step that left the model's domain
            log.warning("pupil fit failed: %s", e)
            value = math.nan
            break
    seconds = time.perf_counter() - t0
    log.info("pupil fit: chi2 per pixel %.3g in %.0f s", value, seconds)
    return m.result(value, seconds)


def pupil_of(cal: Calibration) -> PupilFit | None:
    """The calibration's stored pupil if it is one to use (`PupilFit.acceptable`)."""
    fit = PupilFit.from_extra(cal.extra)
    return fit if fit is not None and fit.acceptable else None


def with_pupil(cal: Calibration, *, log_line: Any = None, **fit_kwargs: Any) -> Calibration:
    """``cal`` with its pupil fitted and stored (``extra_pupil_*``), unless it has one
    already. Stored whether or not it is `acceptable`, so that the file says what was tried;
    the models use it only when it is (`pupil_of`)."""
    import dataclasses

    if PupilFit.from_extra(cal.extra) is not None:
        return cal
    if len(cal.z_um) < MIN_SLICES:
        # the synthesizer draws such a stack from its raw slices (no spline): one model
        # convention for every part, the stack's
        return cal
    if log_line is not None:
        log_line("fitting the calibration's pupil first (1.5–5 min for 51 slices of 128² px)")
    fit = fit_pupil(cal, **fit_kwargs)
    if log_line is not None:
        log_line(describe(fit))
        if not fit.acceptable and not noise_model_complete(cal):
            log_line(
                "pupil: the calibration has no camera gain (an imported stack), so its shot "
                "noise was estimated from the stack; `focaltrack calibrate --from-file ... "
                "--gain E_PER_ADU` gives it"
            )
    return dataclasses.replace(cal, extra={**cal.extra, **fit.to_extra()})


def describe(fit: PupilFit) -> str:
    """One line for people: what was fitted and whether the models use it."""
    z = dict(zip(NOLL, fit.zernike_waves, strict=True))
    use = "used for the model" if fit.acceptable else f"not used (χ² above {MAX_CHI2:g})"
    return (
        f"pupil: NA/λ {fit.kmax:.3f} /µm, n/λ {fit.kn:.3f} /µm (NA/n {fit.kmax / fit.kn:.3f}), "
        f"astigmatism {math.hypot(z[5], z[6]):.3f}, coma {math.hypot(z[7], z[8]):.3f}, "
        f"spherical {z[11]:+.3f} waves RMS; bead at ({fit.x_px:.2f}, {fit.y_px:.2f}) px; "
        f"χ² {fit.chi2:.2f} per pixel in {fit.seconds:.0f} s: {use}"
    )

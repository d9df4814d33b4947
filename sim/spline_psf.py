"""The calibration PSF as a tricubic spline over x, y and z: values and exact derivatives.

The model of Li et al. 2018 ("Real-time 3D single-molecule localization using experimental
point spread functions", Nat. Methods 15, 367), used by SMAP, Picasso and DECODE: the
averaged bead stack is interpolated by a cubic spline along each of x, y and z, so an
emitter's expected image is smooth in its position, sub-pixel shifts are exact (no
bilinear blurring of a ring) and the derivatives that a maximum-likelihood fit and its
Fisher information need are analytic.

What was followed, and where this differs in form (not in the model):

- SMAP's ``Spline3D_interp.m`` (github.com/jries/SMAP) upsamples the stack threefold with
  MATLAB's ``interp3(..., 'spline')`` (a not-a-knot cubic spline along each axis) and solves,
  per voxel, the 64 coefficients of the tricubic polynomial Σ a_ijk dx^i dy^j dz^k that
  reproduces it; DECODE's ``spline_psf.c`` (github.com/TuragaLab/DECODE, ``fSpline3D``,
  ``kernel_computeDelta3D``) evaluates that polynomial, and its x/y/z derivatives, per pixel.
- Here the same piecewise-tricubic C² interpolant (not-a-knot ends along every axis) is held
  as its uniform cubic B-spline coefficients, one per voxel instead of 64 (a change of basis:
  the 64 polynomial coefficients of a voxel are a fixed linear map of its 4×4×4 neighbouring
  B-spline coefficients). The evaluation is separable: an emitter's z and sub-pixel phase are
  the same for every pixel of its window, so the window is four coefficient planes contracted
  with four z weights, then four y taps, then four x taps — about 40 multiply-adds per pixel
  for the value and the three derivatives, where the per-voxel polynomial takes 4 × 64.

Geometry (`focaltrack.calibration.format`): in every slice of ``psf`` the bead sits at
`Calibration.centre_px`; frame pixel (r, c) has its centre at (x, y) = (c, r). An emitter at
(x, y, z) puts, on frame pixel (r, c), the stack's value at window position
(c − x + cx, r − y + cy) and defocus z; outside the calibration window the PSF is zero
(the stack is padded with zeros laterally before the spline is fitted, so the model falls
to zero smoothly at the window's edge). Values are fractions of the bead's detected light,
so ``photons · psf`` is an emitter's expected signal per pixel.

The z axis must be uniform for a separable spline: a stack whose z steps differ by more
than 1 % is first resampled (a not-a-knot cubic spline in z) onto the uniform grid
nearest its median step that spans its whole range. Outside
the stack's z range the model holds its end slices' value (the callers clamp z and flag it).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from focaltrack.calibration import Calibration
from focaltrack.calibration.denoise import (
    angular_projection,
    calibration_noise,
    denoised,
)

if TYPE_CHECKING:
    from focaltrack.calibration.pupil import PupilFit

__all__ = [
    "PSFWindows",
    "SplinePSF",
    "angular_projection",
    "calibration_noise",
    "denoised",
    "frame_index",
    "gather",
    "model_stack",
    "not_a_knot_matrix",
]

LATERAL_PAD_PX = 4  # zeros around the calibration window before the spline is fitted
#: `model_stack`'s results by calibration content, the most recent few (read-only arrays)
_MODEL_STACKS: OrderedDict[tuple[object, ...], tuple[np.ndarray, float]] = OrderedDict()
_MODEL_STACKS_KEPT = 4
#: held while a model stack is looked up or made: two threads building a localizer for one
#: calibration make its model once, and eviction cannot come between a look-up and its use
_MODEL_STACKS_LOCK = threading.Lock()


def model_stack(calibration: Calibration, *, denoise: bool = True) -> tuple[np.ndarray, float]:
    """The calibration stack (float64, read-only) a model is built from, and its noise
    level (`calibration_noise`): unless ``denoise`` is False, the calibration's fitted
    pupil drawn at its slices where it has one that explains it
    (`focaltrack.calibration.pupil.pupil_of`: no noise at all), else the stack `denoised`
    (where it has noise).

    Kept for the few most recent calibrations (by content): a localizer builds three
    models from one calibration (the spline fit, the least-squares start's table, the
    matched filter), and drawing or denoising costs about a second a time."""
    from focaltrack.calibration.pupil import pupil_of

    pupil = pupil_of(calibration) if denoise else None
    key = (
        calibration.sha256,
        calibration.centre_px,
        bool(denoise),
        None if pupil is None else pupil.key(),
    )
    with _MODEL_STACKS_LOCK:
        return _model_stack(calibration, key, pupil, denoise)


def _model_stack(
    calibration: Calibration, key: tuple[object, ...], pupil: PupilFit | None, denoise: bool
) -> tuple[np.ndarray, float]:
    if key in _MODEL_STACKS:
        _MODEL_STACKS.move_to_end(key)
        return _MODEL_STACKS[key]
    stack = np.asarray(calibration.psf, dtype=np.float64)
    noise = calibration_noise(stack, calibration.centre_px)
    if pupil is not None:
        # the source on the calibration's centre (the pupil's own position is where its
        # tilt is zero), scaled as the stack is: its largest slice sum is one
        drawn = pupil.render(
            calibration.z_um,
            calibration.window_px,
            calibration.pixel_size_um,
            calibration.centre_px,
        )
        stack = drawn / float(drawn.reshape(len(drawn), -1).sum(axis=1).max())
    elif denoise and noise > 0:
        stack = denoised(stack, noise, calibration.centre_px)
    stack = np.array(stack, dtype=np.float64)  # its own copy, never the calibration's
    stack.setflags(write=False)
    _MODEL_STACKS[key] = (stack, noise)
    while len(_MODEL_STACKS) > _MODEL_STACKS_KEPT:
        _MODEL_STACKS.popitem(last=False)
    return stack, noise


def not_a_knot_matrix(n: int) -> np.ndarray:
    """(n + 2, n) matrix M: the uniform cubic B-spline coefficients c₋₁ … cₙ of the
    not-a-knot interpolant of n samples f₀ … fₙ₋₁ are ``M @ f``.

    Interpolation: f_i = (c_{i−1} + 4 c_i + c_{i+1}) / 6. Not-a-knot: the third derivative is
    continuous at the second and the second-to-last sample (one cubic over the first two and
    the last two intervals), i.e. the fourth difference of (c₋₁ … c₃) and of (c_{n−4} … cₙ)
    vanishes — the end condition of MATLAB's ``spline`` and so of SMAP's ``interp3``.
    """
    if n < 4:
        raise ValueError(f"a not-a-knot cubic spline needs at least 4 samples, got {n}")
    a = np.zeros((n + 2, n + 2))
    for i in range(n):  # unknown j holds c_{j-1}
        a[i, i : i + 3] = (1.0, 4.0, 1.0)
    a[n, 0:5] = (-1.0, 4.0, -6.0, 4.0, -1.0)
    a[n + 1, n - 3 : n + 2] = (-1.0, 4.0, -6.0, 4.0, -1.0)
    rhs = np.zeros((n + 2, n))
    rhs[np.arange(n), np.arange(n)] = 6.0
    return np.linalg.solve(a, rhs)


def _weights(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform cubic B-spline weights of the four taps at fraction ``t`` ∈ [0, 1], and their
    derivatives with respect to t: (B, 4) each."""
    t2 = t * t
    t3 = t2 * t
    s = 1.0 - t
    w = torch.stack([s * s * s, 3 * t3 - 6 * t2 + 4, -3 * t3 + 3 * t2 + 3 * t + 1, t3], -1) / 6
    d = torch.stack([-s * s, 3 * t2 - 4 * t, -3 * t2 + 2 * t + 1, t2], -1) / 2
    return w, d


@dataclass(frozen=True, slots=True)
class PSFWindows:
    """The PSF of B emitters on (h, w) windows of the frame and its derivatives.

    ``value`` is the fraction of an emitter's light per pixel; ``dx``, ``dy``: its
    derivative with respect to the emitter's x and y (pixels), ``dz`` to its z (µm).
    All (B, h, w); the derivatives are None when they were not asked for.
    """

    value: torch.Tensor
    dx: torch.Tensor | None = None
    dy: torch.Tensor | None = None
    dz: torch.Tensor | None = None


class SplinePSF:
    """The calibration's tricubic spline PSF on one device, in one floating dtype."""

    def __init__(
        self,
        calibration: Calibration,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        denoise: bool = True,
    ) -> None:
        stack, self.noise_level = model_stack(calibration, denoise=denoise)
        z = np.asarray(calibration.z_um, dtype=np.float64)
        step = float(np.median(np.diff(z)))
        if np.max(np.abs(np.diff(z) - step)) > 0.01 * step:
            from scipy.interpolate import CubicSpline

            # the uniform grid nearest the median step that spans the stack's whole range
            # (the median step itself can end short of the last slice)
            nz = round((z[-1] - z[0]) / step) + 1
            grid = np.linspace(z[0], z[-1], nz)
            step = float(grid[1] - grid[0])
            stack = CubicSpline(z, stack, axis=0, bc_type="not-a-knot")(grid)
            z = grid
        self.z0_um = float(z[0])
        self.z_step_um = step
        self.z_max_um = float(z[-1])
        self.n_z = len(z)
        self.window_px = calibration.window_px  # (h, w)
        cx, cy = calibration.centre_px
        p = LATERAL_PAD_PX
        # spline coordinate u of frame position v (pixels): u = v − emitter + centre + pad,
        # coefficient index of tap a at u = i + t: i + a (index 0 holds c₋₁)
        self._cx = cx + p
        self._cy = cy + p
        stack = np.pad(stack, ((0, 0), (p, p), (p, p)))
        coef = np.einsum("kz,zyx->kyx", not_a_knot_matrix(stack.shape[0]), stack)
        coef = np.einsum("ky,zyx->zkx", not_a_knot_matrix(stack.shape[1]), coef)
        coef = np.einsum("kx,zyx->zyk", not_a_knot_matrix(stack.shape[2]), coef)
        # one more zero row and column: where a window reaches past the spline, its taps
        # read that zero (the PSF is zero outside the calibration window)
        coef = np.pad(coef, ((0, 0), (0, 1), (0, 1)))
        self.device = torch.device(device)
        self.dtype = dtype
        self.coef = torch.as_tensor(coef, dtype=dtype, device=self.device).contiguous()
        self._shape = tuple(int(s) for s in coef.shape)  # (Z + 2, Hc + 1, Wc + 1)
        # the same coefficients inside a wide margin of zeros: a window's coefficients are
        # then one slice (a view) instead of a gather of 4·(h+3)·(w+3) indices
        m = self._margin = max(coef.shape[1:]) + 8
        self._coef_wide = torch.nn.functional.pad(self.coef, (m, m, m, m)).contiguous()

    @property
    def z_range_um(self) -> tuple[float, float]:
        return self.z0_um, self.z_max_um

    # ------------------------------------------------------------------ evaluation
    def _axis(
        self, origin: torch.Tensor, position: torch.Tensor, centre: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """First coefficient index (B,) along one lateral axis of windows starting at frame
        pixel ``origin`` (the window's taps are that index and the next size + 2), and the
        tap weights and their derivatives (B, 4)."""
        s = origin.to(self.dtype) - position + centre
        k = torch.floor(s)
        w, d = _weights(s - k)
        return k.long(), w, d

    def evaluate(
        self,
        x_px: torch.Tensor,
        y_px: torch.Tensor,
        z_um: torch.Tensor,
        origin: torch.Tensor,
        size: tuple[int, int],
        *,
        derivatives: bool = True,
    ) -> PSFWindows:
        """The PSF of B emitters at (x, y, z) on windows of ``size`` (h, w) pixels whose
        top-left pixel is ``origin`` (B, 2) (row, column) in frame pixels.

        One batched computation for all emitters: each window's 4 × (h+3) × (w+3)
        coefficients, then z, y and x contractions. z is clamped to the stack's range.
        """
        dev, dt = self.device, self.dtype
        x = x_px.to(dev, dt).reshape(-1)
        y = y_px.to(dev, dt).reshape(-1)
        z = z_um.to(dev, dt).reshape(-1)
        org = origin.to(dev).long().reshape(-1, 2)
        h, w = int(size[0]), int(size[1])
        # z: u = (z − z0) / Δz ∈ [0, Z − 1]; the last interval is closed (t = 1 at the end)
        u = ((z - self.z0_um) / self.z_step_um).clamp(0.0, float(self.n_z - 1))
        kz = torch.floor(u).clamp(max=float(self.n_z - 2))
        wz, dwz = _weights(u - kz)
        ky, wy, dwy = self._axis(org[:, 0], y, self._cy)
        kx, wx, dwx = self._axis(org[:, 1], x, self._cx)
        block = self._blocks(kz.long(), ky, kx, (h, w))
        if not derivatives:
            plane = torch.einsum("ba,bayx->byx", wz, block)
            return PSFWindows(_taps_x(_taps_y(plane, wy), wx))
        planes = torch.einsum("bka,bayx->bkyx", torch.stack([wz, dwz], 1), block)  # P, ∂P/∂u_z
        p0, pz = planes[:, 0], planes[:, 1]
        rows = _taps_y(torch.stack([p0, p0, pz], 1), torch.stack([wy, dwy, wy], 1))
        y0, y1, yz = rows[:, 0], rows[:, 1], rows[:, 2]
        cols = _taps_x(torch.stack([y0, y0, y1, yz], 1), torch.stack([wx, dwx, wx, wx], 1))
        # u_x = c − x + cx: ∂/∂x = −∂/∂u_x (likewise y); u_z = (z − z0)/Δz
        return PSFWindows(
            value=cols[:, 0],
            dx=-cols[:, 1],
            dy=-cols[:, 2],
            dz=cols[:, 3] / self.z_step_um,
        )

    def _blocks(
        self, kz: torch.Tensor, ky: torch.Tensor, kx: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """(B, 4, h + 3, w + 3) coefficients of B windows whose first taps are at ``kz``,
        ``ky``, ``kx`` (B,); taps past the spline read zero."""
        b = kz.shape[0]
        h, w = size
        m = self._margin
        wide = self._coef_wide
        y0, x0 = ky + m, kx + m
        inside = (
            (y0 >= 0) & (y0 + h + 3 <= wide.shape[1]) & (x0 >= 0) & (x0 + w + 3 <= wide.shape[2])
        )
        if b and bool(inside.all()):
            # one view per window, then one stack (as the localizer's crops: a gather with
            # (B, 4, h+3, w+3) index tensors moves 8 bytes of index per coefficient)
            return torch.stack(
                [
                    wide[z : z + 4, r : r + h + 3, c : c + w + 3]
                    for z, r, c in zip(kz.tolist(), y0.tolist(), x0.tolist(), strict=True)
                ]
            )
        # a window far off its emitter (or none): gather, past-the-end taps reading the
        # zero row and column at the end of each axis
        _, hc, wc = self._shape
        dev = kz.device
        iz = kz[:, None] + torch.arange(4, device=dev)
        iy = ky[:, None] + torch.arange(h + 3, device=dev)
        ix = kx[:, None] + torch.arange(w + 3, device=dev)
        iy = torch.where((iy >= 0) & (iy < hc - 1), iy, torch.full_like(iy, hc - 1))
        ix = torch.where((ix >= 0) & (ix < wc - 1), ix, torch.full_like(ix, wc - 1))
        flat = (iz[:, :, None, None] * hc + iy[:, None, :, None]) * wc + ix[:, None, None, :]
        return self.coef.reshape(-1)[flat.reshape(b, -1)].reshape(b, 4, h + 3, w + 3)

    def windows_at(
        self, x_px: torch.Tensor, y_px: torch.Tensor, size: tuple[int, int]
    ) -> torch.Tensor:
        """(B, 2) top-left pixels (row, column) of ``size`` windows centred on (x, y)."""
        h, w = size
        row = torch.round(y_px.to(self.device, self.dtype)).long() - h // 2
        col = torch.round(x_px.to(self.device, self.dtype)).long() - w // 2
        return torch.stack([row.reshape(-1), col.reshape(-1)], 1)

    def render(
        self,
        shape: tuple[int, int],
        x_px: torch.Tensor,
        y_px: torch.Tensor,
        z_um: torch.Tensor,
        photons: torch.Tensor,
        *,
        window: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Σ photons · PSF of the emitters on an (H, W) frame (no background): each emitter
        on a ``window`` around it (default: the calibration window plus its padding, all
        of its light), clipped at the frame's edges."""
        hh, ww = int(shape[0]), int(shape[1])
        if window is None:
            window = (self._shape[1] - 1, self._shape[2] - 1)
        x = x_px.to(self.device, self.dtype).reshape(-1)
        y = y_px.to(self.device, self.dtype).reshape(-1)
        out = torch.zeros(hh * ww + 1, dtype=self.dtype, device=self.device)
        if x.numel() == 0:
            return out[:-1].reshape(hh, ww)
        org = self.windows_at(x, y, window)
        psf = self.evaluate(x, y, z_um, org, window, derivatives=False).value
        flat, inside = frame_index(org, window, shape)
        val = psf.reshape(len(x), -1) * photons.to(self.device, self.dtype).reshape(-1, 1)
        out.index_add_(0, flat.reshape(-1), (val * inside).reshape(-1))
        return out[:-1].reshape(hh, ww)


def frame_index(
    origin: torch.Tensor,
    size: tuple[int, int],
    shape: tuple[int, int],
    frame: torch.Tensor | None = None,
    n_frames: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices (B, h·w) of windows' pixels into a stack of ``n_frames`` frames
    (F, H, W) flattened (``frame``: each window's frame, default 0), and whether each pixel
    lies in its frame (B, h·w). Pixels outside point at the one element past the stack
    (index F·H·W), which callers keep as a zero sink."""
    h, w = size
    hh, ww = shape
    dev = origin.device
    r = origin[:, 0, None] + torch.arange(h, device=dev)  # (B, h)
    c = origin[:, 1, None] + torch.arange(w, device=dev)  # (B, w)
    inside = ((r >= 0) & (r < hh))[:, :, None] & ((c >= 0) & (c < ww))[:, None, :]
    f = torch.zeros(len(origin), dtype=torch.long, device=dev) if frame is None else frame
    flat = (f[:, None, None] * hh + r[:, :, None]) * ww + c[:, None, :]
    flat = torch.where(inside, flat, torch.full_like(flat, n_frames * hh * ww))
    return flat.reshape(len(origin), -1), inside.reshape(len(origin), -1)


def gather(stack: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
    """The pixels of windows of a stack (anything of F·H·W elements) at `frame_index`'s
    flat indices ``flat``; the sink index one past the end reads 0."""
    s = stack.reshape(-1)
    return torch.cat([s, s.new_zeros(1)])[flat]


def _taps(planes: torch.Tensor, weights: torch.Tensor, kernel: tuple[int, int]) -> torch.Tensor:
    """The 4-tap filter of every plane with its own weights, as one grouped convolution
    (one pass over memory; four broadcast multiply-adds were ~6× slower on a CPU)."""
    *lead, hh, ww = planes.shape
    c = 1
    for n in lead:
        c *= n
    x = planes.reshape(1, c, hh, ww)
    k = weights.expand(*lead, 4).reshape(c, 1, *kernel).to(planes.dtype)
    out = F.conv2d(x, k, groups=c)
    return out.reshape(*lead, out.shape[-2], out.shape[-1])


def _taps_y(planes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ_a weights[..., a] · planes[..., a : a + h, :] over the 4 taps: (..., h + 3, W) ->
    (..., h, W); ``weights`` (..., 4), one set per plane."""
    return _taps(planes, weights, (4, 1))


def _taps_x(planes: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """As `_taps_y` along the last axis: (..., H, w + 3) -> (..., H, w)."""
    return _taps(planes, weights, (1, 4))

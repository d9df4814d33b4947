"""The localizer's last step: every emitter of a frame fitted by Poisson maximum likelihood.

The networks say where the emitters are, to a pixel or so and a calibration step; this
step puts each at the position the photons say, with the uncertainty the photons allow
(Li et al. 2018, Nat. Methods 15, 367: a cubic-spline model of the calibration stack, the
fit SMAP, Picasso and DECODE run after their detectors):

- **Model**: the calibration stack as a tricubic spline (`SplinePSF`): smooth in x, y and
  z, exact sub-pixel shifts, analytic derivatives. μ = photons · PSF + background on each
  emitter's window, the background a parameter of that window (so it follows the frame:
  a locally constant, not one number per frame).
- **Windows per depth**: a focused emitter's light lies within a few pixels, a ring
  100 µm out spans 100 px. Each emitter is fitted on a square window that holds
  `LIGHT_FRACTION` of its calibration slice's light (`window_sizes`), rounded up to one of a
  few sizes (`WINDOW_SIZES`), so a frame's fits are a few batched calls, not one per emitter
  and not all at the deepest ring's size.
- **Crowds**: first the photons and backgrounds of all emitters at their starts
  (`AMPLITUDE_SWEEPS` halfway Jacobi sweeps, each window less its neighbours' light), then
  each emitter's z moved to the likeliest of a few slices around its start (`_search_z`),
  then `sweeps` block-coordinate sweeps: every emitter fitted against the frame less its
  neighbours' current models, their light counted in each pixel's variance, so each fit
  maximises the frame's likelihood over its own emitter and a ring under a focused emitter
  gives its light to the ring, not to the emitter's background. The full joint system
  (`mle.fit_frames(joint=True)`) is the exact alternative; on a 2-core CPU its cost at
  100 µm depth (one (5k)² solve over 128-px windows) is 10–30× this.
- **Uncertainty**: each localization's σ_x, σ_y, σ_z is the Cramér–Rao bound at the fit
  (the Fisher information of its window, its neighbours held fixed): no extra cost.
- **Never dropped, never NaN**: a fit that does not converge, a z held at the calibration's
  end (the calibration is too short for this emitter) or an x, y held at the window's edge
  is reported where it stopped, with its σ and a flag (`focaltrack.records.LocFlag`); a fit
  that fails numerically keeps the networks' position, flagged, with σ unknown (NaN).
  An emitter on saturated pixels (brighter than the camera's range: the model does not hold
  there) is flagged too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from focaltrack.calibration import Calibration
from focaltrack.models.mle import (
    MLEFit,
    electrons,
    fit_windows,
    least_squares,
    log_likelihood_terms,
    start_amplitudes,
)
from focaltrack.records import LocFlag
from focaltrack.sim.spline_psf import SplinePSF, frame_index, gather

__all__ = [
    "LIGHT_FRACTION",
    "WINDOW_SIZES",
    "Refined",
    "SplineRefiner",
    "concat_refined",
    "window_sizes",
]

#: A window holds this share of its emitter's calibration light (the rest: background).
LIGHT_FRACTION = 0.95
#: The window sizes (px) fits are batched in: an emitter's window is the first that holds
#: its light; at most the calibration window.
WINDOW_SIZES = (16, 24, 32, 48, 64, 96, 128)
#: The z starts tried around the networks' (in calibration steps): see `_search_z`.
Z_SEARCH_STEPS = (-2.0, -1.0, 0.0, 1.0, 2.0)
#: Jacobi sweeps of the photons and backgrounds before any position moves (see
#: `SplineRefiner._amplitudes_in_crowd`).
AMPLITUDE_SWEEPS = 6
WINDOW_MARGIN_PX = 3  # beyond the light's radius: room for the start to be a pixel off


def window_sizes(calibration: Calibration) -> np.ndarray:
    """(Z,) the fit window side (px) for each calibration slice: the smallest of
    `WINDOW_SIZES` (at most the calibration window) whose inscribed circle, centred on the
    bead, holds `LIGHT_FRACTION` of the slice's light plus `WINDOW_MARGIN_PX`."""
    psf = np.asarray(calibration.psf, dtype=np.float64)
    nz, hh, ww = psf.shape
    cx, cy = calibration.centre_px
    yy, xx = np.mgrid[:hh, :ww]
    r = np.hypot(yy - cy, xx - cx).ravel()
    order = np.argsort(r)
    cum = np.cumsum(psf.reshape(nz, -1)[:, order], axis=1)
    total = np.maximum(cum[:, -1:], 1e-30)
    reach = r[order][np.argmax(cum / total >= LIGHT_FRACTION, axis=1)]
    need = 2.0 * (reach + WINDOW_MARGIN_PX)
    largest = min(hh, ww)
    sizes = np.asarray([s for s in WINDOW_SIZES if s < largest] + [largest])
    pick = np.searchsorted(sizes, need)
    return sizes[np.minimum(pick, len(sizes) - 1)]


@dataclass(frozen=True, slots=True)
class Refined:
    """One frame's fitted emitters, (n,) float64 arrays: pixel x, y, z µm, photons (e⁻),
    background (e⁻/px), σ (px, px, µm; NaN where unknown), `LocFlag` bits, and the
    amplitude's significance (photons / σ_photons)."""

    x_px: np.ndarray
    y_px: np.ndarray
    z_um: np.ndarray
    photons: np.ndarray
    background: np.ndarray
    sigma_x_px: np.ndarray
    sigma_y_px: np.ndarray
    sigma_z_um: np.ndarray
    flags: np.ndarray
    significance: np.ndarray

    def take(self, keep: np.ndarray) -> Refined:
        return Refined(*(getattr(self, f)[keep] for f in self.__dataclass_fields__))


class SplineRefiner:
    """Fits a frame's emitters from the networks' positions (see the module docstring)."""

    def __init__(
        self,
        calibration: Calibration,
        *,
        device: torch.device | str = "cpu",
        sweeps: int = 2,
        max_iter: int = 6,
        tol: float = 1e-2,
    ) -> None:
        self.calibration = calibration
        self.psf = SplinePSF(calibration, device=device, dtype=torch.float32)
        self.device = self.psf.device
        self.sweeps = int(sweeps)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self._sizes = window_sizes(calibration)
        self._z = np.asarray(calibration.z_um, dtype=np.float64)
        self.saturation_adu = float((1 << int(calibration.bit_depth)) - 1)

    def window_for(self, z_um: np.ndarray) -> np.ndarray:
        """(n,) fit window sides for emitters at ``z_um`` (the slice nearest each)."""
        idx = np.abs(np.asarray(z_um, dtype=np.float64)[:, None] - self._z[None]).argmin(1)
        return self._sizes[idx]

    @torch.inference_mode()
    def fit(
        self,
        frame_adu: np.ndarray | torch.Tensor,
        start: np.ndarray,
        *,
        held: torch.Tensor | None = None,
    ) -> Refined:
        """Fit the emitters starting at ``start`` (n, 3: x px, y px, z µm) on one raw frame
        (H, W) in ADU. ``held`` (H, W, e⁻): the light of other emitters of the frame, fitted
        before and held: taken from the frame and counted in each pixel's variance, as a
        neighbour's light is in the sweeps."""
        raw = torch.as_tensor(np.asarray(frame_adu), device=self.device)
        e, read = electrons(raw, self.calibration.noise)
        e = e.to(self.psf.dtype)
        read_var: float | torch.Tensor = read
        if held is not None:
            light = held.to(self.device, self.psf.dtype).clamp_min(0.0)
            e = e - light
            read_var = read + light
        st = np.asarray(start, dtype=np.float64).reshape(-1, 3)
        n = len(st)
        if n == 0:
            return _empty()
        z0, z1 = self.psf.z_range_um
        theta = torch.as_tensor(st, dtype=self.psf.dtype, device=self.device).clone()
        theta[:, 2] = theta[:, 2].clamp(z0, z1)
        theta = torch.cat([theta, torch.full((n, 2), math.nan, device=self.device)], 1)
        sizes = self.window_for(st[:, 2])
        groups = [
            (int(s), torch.as_tensor(np.nonzero(sizes == s)[0], device=self.device))
            for s in np.unique(sizes)
        ]
        shape = (int(e.shape[0]), int(e.shape[1]))
        # first the photons and background of every window at the networks' positions (linear
        # least squares), so that from the first fit on each emitter sees the frame less its
        # neighbours: fitted alone first, a ring would take its neighbours' light and wander
        for side, rows in groups:
            origin, flat, inside, _ = self._window(theta[rows], side, shape)
            theta[rows] = start_amplitudes(
                self.psf, theta[rows], origin, (side, side), gather(e, flat), inside
            )
        theta = self._amplitudes_in_crowd(e, theta, groups, shape)
        theta = self._search_z(e, theta, groups, shape, read_var)
        fits: list[tuple[torch.Tensor, MLEFit]] = []
        for _ in range(max(1, self.sweeps)):
            # each emitter against the frame less its neighbours' models of the last sweep
            windows = [self._window(theta[rows], side, shape) for side, rows in groups]
            total = self._total(shape, windows)
            fits = []
            for (side, rows), (origin, flat, inside, own) in zip(groups, windows, strict=True):
                # the neighbours' light is known (held) but still noise: as the read
                # noise, it is added to the model's variance (`mle`'s sCMOS form), so
                # each fit maximises the frame's likelihood over its own emitter
                neighbours = (gather(total, flat) - own).clamp_min(0.0)
                f = fit_windows(
                    self.psf,
                    (gather(e, flat) - neighbours).reshape(-1, side, side),
                    origin,
                    theta[rows],
                    read_var=(_at(read_var, flat) + neighbours).reshape(-1, side, side),
                    inside=inside.reshape(-1, side, side),
                    max_iter=self.max_iter,
                    tol=self.tol,
                )
                ok = torch.isfinite(f.theta).all(1, keepdim=True)
                theta[rows] = torch.where(ok, f.theta.to(theta.dtype), theta[rows])
                fits.append((rows, f))
        return self._result(raw, st, theta, fits)

    def _amplitudes_in_crowd(
        self,
        e: torch.Tensor,
        theta: torch.Tensor,
        groups: list[tuple[int, torch.Tensor]],
        shape: tuple[int, int],
    ) -> torch.Tensor:
        """Photons and background of every emitter at its position, each against the frame
        less its neighbours (`AMPLITUDE_SWEEPS` Jacobi sweeps, halfway steps: overlapping
        windows of a crowd first count their neighbours' light as their own)."""
        windows = [self._window(theta[rows], side, shape) for side, rows in groups]
        unit = [
            (w[3] / theta[rows, 3].clamp_min(1e-6)[:, None]).detach()
            for w, (_, rows) in zip(windows, groups, strict=True)
        ]
        for _ in range(AMPLITUDE_SWEEPS):
            total = self._total(
                shape,
                [
                    (w[0], w[1], w[2], u * theta[rows, 3, None])
                    for w, u, (_, rows) in zip(windows, unit, groups, strict=True)
                ],
            )
            new = theta.clone()
            for (_, rows), (_, flat, inside, _), u in zip(groups, windows, unit, strict=True):
                own = u * theta[rows, 3, None]
                data = gather(e, flat) - (gather(total, flat) - own)
                n_ls, bg_ls = _least_squares(u, data, inside.to(data.dtype))
                new[rows, 3] = 0.5 * (theta[rows, 3] + n_ls)
                new[rows, 4] = 0.5 * (theta[rows, 4] + bg_ls)
            theta = new
        return theta

    def _search_z(
        self,
        e: torch.Tensor,
        theta: torch.Tensor,
        groups: list[tuple[int, torch.Tensor]],
        shape: tuple[int, int],
        read_var: float | torch.Tensor,
    ) -> torch.Tensor:
        """Each emitter's z moved to the likeliest of its z plus `Z_SEARCH_STEPS` calibration
        steps (photons and background by least squares at each), against the frame less
        its neighbours.

        A ring's radius grows ~1 px per calibration step, so between slices the spline
        blends two rings: the likelihood in z has a local optimum near every slice, and a
        start a step or two off converges to the wrong one. Trying the slices around the
        networks' z, as SMAP starts its fits from several z, finds the right basin
        (isolated bright emitters on `evaluate`'s frames: axial RMSE 0.44 µm without it,
        0.32 µm with it; a search in x and y besides changed nothing once the crowd's
        photons are settled first, and cost 1.7× the fit)."""
        windows = [self._window(theta[rows], side, shape) for side, rows in groups]
        total = self._total(shape, windows)
        z0, z1 = self.psf.z_range_um
        dz = torch.as_tensor(Z_SEARCH_STEPS, dtype=theta.dtype, device=self.device)
        dz = dz * self.psf.z_step_um
        k = len(dz)
        out = theta.clone()
        for (side, rows), (origin, flat, inside, own) in zip(groups, windows, strict=True):
            b = len(rows)
            neighbours = (gather(total, flat) - own).clamp_min(0.0)
            data = (gather(e, flat) - neighbours).repeat_interleave(k, 0)
            var = (_at(read_var, flat) + neighbours).repeat_interleave(k, 0)
            m = inside.repeat_interleave(k, 0).to(data.dtype)
            cand = theta[rows].repeat_interleave(k, 0)
            cand[:, 2] = (cand[:, 2] + dz.repeat(b)).clamp(z0, z1)
            v = self.psf.evaluate(
                cand[:, 0],
                cand[:, 1],
                cand[:, 2],
                origin.repeat_interleave(k, 0),
                (side, side),
                derivatives=False,
            ).value.reshape(b * k, -1)
            cand[:, 3], cand[:, 4] = _least_squares(v, data, m)
            mu = v * cand[:, 3, None] + cand[:, 4, None] + var
            d = (data + var).clamp_min(0.0)
            ll = (log_likelihood_terms(d, mu) * m).sum(1).reshape(b, k)
            best = ll.argmax(1)
            out[rows] = cand.reshape(b, k, -1)[torch.arange(b, device=self.device), best]
        return out

    def _window(
        self, theta: torch.Tensor, side: int, shape: tuple[int, int]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Windows of ``side`` px around emitters θ (B, 5): top-left pixels (B, 2), flat
        frame indices and inside-the-frame mask (B, side²), and the emitters' own model
        photons · PSF there (B, side²; zero before photons are known)."""
        origin = self.psf.windows_at(theta[:, 0], theta[:, 1], (side, side))
        flat, inside = frame_index(origin, (side, side), shape)
        photons = torch.nan_to_num(theta[:, 3], nan=0.0)
        p = self.psf.evaluate(
            theta[:, 0], theta[:, 1], theta[:, 2], origin, (side, side), derivatives=False
        )
        v = p.value.reshape(len(theta), -1)
        own = v * photons[:, None] * inside
        return origin, flat, inside, own

    @staticmethod
    def _total(
        shape: tuple[int, int],
        windows: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        """Σ of every emitter's own model on the frame (H, W), without background."""
        hh, ww = shape
        out = torch.zeros(hh * ww + 1, dtype=windows[0][3].dtype, device=windows[0][3].device)
        for _, flat, _, own in windows:
            out.index_add_(0, flat.reshape(-1), own.reshape(-1))
        return out[:-1].reshape(hh, ww)

    def _result(
        self,
        raw: torch.Tensor,
        start: np.ndarray,
        theta: torch.Tensor,
        fits: list[tuple[torch.Tensor, MLEFit]],
    ) -> Refined:
        n = len(start)
        sigma = np.full((n, 5), math.nan)
        flags = np.zeros(n, dtype=np.int64)
        for rows, f in fits:
            r = rows.cpu().numpy()
            sigma[r] = f.sigma.cpu().numpy()
            flags[r] |= np.where(f.converged.cpu().numpy(), 0, int(LocFlag.NOT_CONVERGED))
            edge = f.xy_at_bound.cpu().numpy()
            flags[r] |= np.where(edge, int(LocFlag.XY_AT_WINDOW_EDGE), 0)
        th = theta.double().cpu().numpy()
        bad = ~np.isfinite(th).all(1) | ~np.isfinite(sigma[:, :3]).all(1)
        z0, z1 = self.psf.z_range_um
        eps = 1e-3 * self.psf.z_step_um
        at_z = (th[:, 2] <= z0 + eps) | (th[:, 2] >= z1 - eps)
        flags |= np.where(at_z, int(LocFlag.Z_AT_RANGE_END), 0)
        if bad.any():  # numerically failed: the networks' position, σ unknown
            th[bad, :3] = start[bad]
            sigma[bad] = math.nan
            flags[bad] |= int(LocFlag.NOT_CONVERGED)
        flags |= np.where(self._saturated(raw, th[:, 0], th[:, 1]), int(LocFlag.BRIGHT), 0)
        photons = np.nan_to_num(th[:, 3], nan=0.0)
        with np.errstate(divide="ignore", invalid="ignore"):
            significance = np.where(sigma[:, 3] > 0, photons / sigma[:, 3], 0.0)
        return Refined(
            x_px=th[:, 0],
            y_px=th[:, 1],
            z_um=th[:, 2],
            photons=photons,
            background=np.nan_to_num(th[:, 4], nan=0.0),
            sigma_x_px=sigma[:, 0],
            sigma_y_px=sigma[:, 1],
            sigma_z_um=sigma[:, 2],
            flags=flags,
            significance=np.nan_to_num(significance, nan=0.0),
        )

    def _saturated(self, raw: torch.Tensor, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """(n,) whether any pixel of the 3 × 3 around each emitter is at the camera's top."""
        hh, ww = raw.shape
        r = np.clip(np.rint(y).astype(np.int64)[:, None] + np.arange(-1, 2), 0, hh - 1)
        c = np.clip(np.rint(x).astype(np.int64)[:, None] + np.arange(-1, 2), 0, ww - 1)
        patch = raw.cpu().numpy()[r[:, :, None], c[:, None, :]]
        return (patch >= self.saturation_adu).any((1, 2))


def _at(var: float | torch.Tensor, flat: torch.Tensor) -> float | torch.Tensor:
    """A pixel variance (one number, or a frame map) on windows at flat indices ``flat``."""
    return gather(var, flat) if isinstance(var, torch.Tensor) else var


def _least_squares(
    v: torch.Tensor, data: torch.Tensor, m: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Photons (≥ 1) and background (≥ 0) of windows (B, P) by `mle.least_squares`."""
    photons, background = least_squares(v, data, m)
    return photons.clamp_min(1.0), background.clamp_min(0.0)


def concat_refined(*parts: Refined) -> Refined:
    """The rows of several fits, in order."""
    return Refined(
        *(np.concatenate([getattr(p, f) for p in parts]) for f in Refined.__dataclass_fields__)
    )


def _empty() -> Refined:
    z = np.zeros(0)
    return Refined(
        x_px=z,
        y_px=z.copy(),
        z_um=z.copy(),
        photons=z.copy(),
        background=z.copy(),
        sigma_x_px=z.copy(),
        sigma_y_px=z.copy(),
        sigma_z_um=z.copy(),
        flags=np.zeros(0, dtype=np.int64),
        significance=z.copy(),
    )

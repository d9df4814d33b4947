"""Emitters the networks missed, found in the residual by a matched filter of the calibration.

In a crowded frame the networks miss deep emitters above all (on `evaluate`'s frames at
10 dB with 20 emitters, 122 of the 141 emitters the two passes missed were 60–100 µm deep),
although a detector that knew the PSF would see nearly all of them (ideal recall 0.99):
a ring 100 µm out spreads its light over thousands of pixels, each near the noise, under
the light of its neighbours. Summed along the ring, that light is well above the noise.
This is what a matched filter does: for each depth z_k of the calibration it correlates
the residual r (the frame less the fitted emitters and the background) with that slice's
PSF s_k, normalised by the noise the sum carries (v: the expected frame, every fitted
emitter plus the background, plus the read noise),

    SNR_k(x, y) = Σ s_k r / √(Σ s_k² v),

the amplitude of an emitter at (x, y, z_k) estimated by least squares in units of its
standard error: the statistic of `evaluate`'s ideal recall, searched over position and
depth instead of known. Peaks of max_k SNR_k at least ``threshold`` and at least
``nms_px`` apart are candidates at (x, y, z_k); they join the networks' emitters before the
final fit, which places them and, with its significance cut, drops those that a joint fit
of the frame does not keep (the filter also answers partly to the misfit remainders of
found emitters: most candidates are such, and are cut there).

All depths at once: one FFT of the residual and of v, one product per template (its FFT
computed once per frame shape), one inverse FFT per template. The templates are the
calibration's slices, denoised as for the spline (`spline_psf.model_stack`), from
`Z_FROM_FRACTION` of its range down (the networks find shallow emitters: 2 of those 141
were within 20 µm of focus; a compact shallow template answers most to the remainders of
bright emitters) every ``TEMPLATE_SPACING_UM`` (about one ring-radius step of 1.5 px at
the 0.36 µm/µm blur of a 10x/0.45 in water: finer spacing found no more).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from focaltrack.calibration import Calibration
from focaltrack.sim.spline_psf import model_stack

__all__ = ["TEMPLATE_SPACING_UM", "Z_FROM_FRACTION", "MatchedFilter"]

#: The templates start this far into the calibration's z range (0: at its start).
Z_FROM_FRACTION = 0.3
#: Templates every this many µm of defocus (rounded to whole calibration steps).
TEMPLATE_SPACING_UM = 4.0


class MatchedFilter:
    """The calibration's deep slices as matched filters for a residual (module docstring)."""

    def __init__(self, calibration: Calibration, *, device: torch.device | str = "cpu") -> None:
        stack, _ = model_stack(calibration)
        z = np.asarray(calibration.z_um, dtype=np.float64)
        step = float(np.median(np.diff(z))) if len(z) > 1 else 1.0
        every = max(1, round(TEMPLATE_SPACING_UM / step))
        first = z[0] + Z_FROM_FRACTION * (z[-1] - z[0])
        pick = np.nonzero(z >= first - 1e-9)[0][::every]
        self.device = torch.device(device)
        self.z_um = z[pick]
        self.templates = torch.as_tensor(stack[pick], dtype=torch.float32, device=self.device)
        cx, cy = calibration.centre_px
        self._centre = (round(cy), round(cx))
        self._spectra: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def _padded(self, shape: tuple[int, int]) -> tuple[int, int]:
        """The FFT size for frames of ``shape``: frame plus template, so that no emitter's
        correlation wraps onto another part of the frame."""
        _, th, tw = self.templates.shape
        return shape[0] + th, shape[1] + tw

    def _spectrum(self, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The conjugate spectra of the templates and of their squares at ``shape``'s FFT
        size (computed once per frame shape)."""
        if shape not in self._spectra:
            s = self._padded(shape)
            t = self.templates
            self._spectra[shape] = (
                torch.fft.rfft2(t, s=s).conj(),
                torch.fft.rfft2(t * t, s=s).conj(),
            )
        return self._spectra[shape]

    @torch.inference_mode()
    def snr(self, residual_e: torch.Tensor, variance_e2: torch.Tensor) -> torch.Tensor:
        """(K, H, W) the SNR of an emitter at each pixel and template depth ``z_um``:
        ``residual_e`` (H, W) photo-electrons less the fitted emitters and background,
        ``variance_e2`` (H, W) each pixel's expected variance (e⁻²)."""
        hh, ww = (int(residual_e.shape[0]), int(residual_e.shape[1]))
        s = self._padded((hh, ww))
        spec, spec2 = self._spectrum((hh, ww))
        # the frame placed (cy, cx) into the FFT's grid: the correlation at (i, j), whose
        # template's top-left corner is there, then has the template's centre on frame
        # pixel (i, j) (no wrap: the grid holds frame and template side by side)
        cy, cx = self._centre
        pad = (cx, 0, cy, 0)
        r = F.pad(residual_e.to(self.device, torch.float32), pad)
        v = F.pad(variance_e2.to(self.device, torch.float32).clamp_min(0.0), pad)
        num = torch.fft.irfft2(torch.fft.rfft2(r, s=s)[None] * spec, s=s)[:, :hh, :ww]
        den = torch.fft.irfft2(torch.fft.rfft2(v, s=s)[None] * spec2, s=s)[:, :hh, :ww]
        return num / den.clamp_min(1e-6).sqrt()

    def search(
        self,
        residual_e: torch.Tensor,
        variance_e2: torch.Tensor,
        *,
        threshold: float,
        nms_px: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Candidates (n, 3: x px, y px, z µm) and their SNR (n,): the peaks of the best
        template's SNR at least ``threshold`` and the highest within ``nms_px`` (odd)."""
        if len(self.z_um) == 0:
            return np.zeros((0, 3)), np.zeros(0)
        snr = self.snr(residual_e, variance_e2)
        best, k = snr.max(0)
        size = int(nms_px) | 1
        # the square neighbourhood's maximum as two one-dimensional ones (the same values;
        # 5× faster than one size² pool at 512²)
        top = F.max_pool2d(best[None, None], (1, size), 1, (0, size // 2))
        top = F.max_pool2d(top, (size, 1), 1, (size // 2, 0))[0, 0]
        yy, xx = torch.nonzero((best >= top) & (best >= threshold), as_tuple=True)
        z = self.z_um[k[yy, xx].cpu().numpy()]
        xyz = np.stack([xx.cpu().numpy(), yy.cpu().numpy(), z], 1).astype(np.float64)
        return xyz.reshape(-1, 3), best[yy, xx].double().cpu().numpy()

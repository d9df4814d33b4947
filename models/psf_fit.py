"""Least-squares fit of the calibration PSF to localized emitters, and the frame without them.

The networks find most emitters of a frame, but where emitters crowd, a bright or
large-ringed one hides its neighbours: a deeply defocused emitter's ring spans 100 px and
lies under everything near it. This module lets the localizer do what a microscopist does
by eye, and what crowded-field photometry has long done (DAOPHOT's find–fit–subtract):

1. **fit** every localization's calibration PSF to the frame: its amplitude, a
   whole-pixel search around the networks' position (a defocused ring's dark gaps stop
   Gauss–Newton from moving more than about a pixel), then Gauss–Newton steps in x, y and
   z; all emitters together (each fitted against the frame minus the others' current
   models, Gauss–Seidel sweeps), over one background for the frame;
2. **subtract** the fitted emitters (not the background) from the frame, so that the
   networks can be run again on what is left.

The model of one emitter is `focaltrack.sim.synth.PSFTable`, the same table the training
synthesizer draws from: the calibration's denoised tricubic spline (its slices linearly
interpolated in z and bilinearly shifted for a stack of under 4 slices) at every half
calibration step of z and ¼-pixel phase.
The fit linearises that model around the table entry nearest the current position, so
positions move continuously even though the table is quantised.

Each emitter is fitted over the part of its window that holds its light (a few pixels in
focus, most of the 128-px window 100 µm out), with whole-window torch operations: the
Python loop is over emitters and sweeps, never over pixels. The wide search for deeply
defocused emitters runs only where no other emitter shares the window: in a crowd it
would pull a ring onto a neighbour's light. Unweighted least squares: the photon counts of
interest sit well above the read noise, and the weights would change every sweep.

Cost on the 2-core development CPU, 20 emitters: the two fits of a two-pass `localize`
take ≈ 70 ms of its ≈ 90 ms (256²) to ≈ 125 ms (512²) per frame.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from focaltrack.calibration import Calibration
from focaltrack.sim.synth import PSFTable

MAX_STEP_PX = 1.0  # a Gauss–Newton step larger than this is clipped (the linear model's reach)
MAX_STEP_Z_UM = 2.0
SEARCH_PX = 3  # placement: whole-pixel shifts up to this (see `PSFFitter._search`) ...
SEARCH_PX_PER_UM = 0.08  # ... or this many per µm of defocus, when more and uncrowded
SEARCH_Z_STEPS = 2  # ... and depths up to this many calibration steps away
SEARCH_Z_STRIDE = 2  # ... every this many table entries (one calibration step)


@dataclass(frozen=True, slots=True)
class PSFFit:
    """Fitted emitters of one frame, (N,) tensors. Pixel coordinates, z in µm."""

    x_px: torch.Tensor
    y_px: torch.Tensor
    z_um: torch.Tensor
    amplitude_e: torch.Tensor  # photo-electrons in the emitter's calibration window
    background_e: torch.Tensor  # the frame's background (e⁻/px; the same for every emitter)
    image_e: torch.Tensor | None = None  # (H, W) Σ of the fitted models, no background


class PSFFitter:
    """Fits and subtracts the calibration PSF; one instance per calibration and device."""

    def __init__(self, calibration: Calibration, *, device: torch.device | str = "cpu") -> None:
        self.table = PSFTable(calibration, z_step_fraction=0.5, phases=4, device=device)
        self.device = torch.device(device)
        self.window = self.table.window
        z = calibration.z_um
        self.z_lo, self.z_hi = float(z[0]), float(z[-1])
        self.z_cal_step = float(calibration.z_step_um)
        self.max_search_px = math.ceil(SEARCH_PX_PER_UM * max(abs(self.z_lo), abs(self.z_hi)))
        self.box = _support(self.table)

    # ------------------------------------------------------------------ model
    def _entries(
        self, x_px: torch.Tensor, y_px: torch.Tensor, z_um: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Nearest table entries: window top-left (oy, ox), z index, phases, and the
        position each entry represents (so the fit can linearise around it)."""
        t = self.table
        ph = t.phases
        cy, cx = t.centre
        qy = torch.round((y_px - cy) * ph).long()
        qx = torch.round((x_px - cx) * ph).long()
        oy = torch.div(qy, ph, rounding_mode="floor")
        ox = torch.div(qx, ph, rounding_mode="floor")
        py, px = qy - oy * ph, qx - ox * ph
        nz = t.table.shape[0]
        iz = torch.round((z_um - t.z0) / t.z_step).long().clamp(1, nz - 2)
        y_at = qy.to(y_px.dtype) / ph + cy
        x_at = qx.to(x_px.dtype) / ph + cx
        z_at = iz.to(z_um.dtype) * t.z_step + t.z0
        return oy, ox, iz, py, px, y_at, x_at, z_at

    def render(self, shape: tuple[int, int], fit: PSFFit) -> torch.Tensor:
        """Σ amplitude · PSF over the frame (e⁻, no background), (H, W)."""
        n = len(fit.x_px)
        img = self.table.render(
            shape,
            1,
            torch.zeros(n, dtype=torch.long, device=self.device),
            fit.x_px,
            fit.y_px,
            fit.z_um,
            fit.amplitude_e.clamp_min(0),
        )
        return img[0]

    # -------------------------------------------------------------------- fit
    def fit(
        self,
        frame_e: torch.Tensor,
        x_px: torch.Tensor,
        y_px: torch.Tensor,
        z_um: torch.Tensor,
        *,
        sweeps: int = 3,
        order: torch.Tensor | None = None,
        search_px: int = SEARCH_PX,
    ) -> PSFFit:
        """Fit N emitters, starting at (x, y, z), to one frame in photo-electrons (H, W).

        Gauss–Seidel over emitters (``order``: e.g. strongest first; default as given):
        each is fitted to the frame minus every other emitter's current model. The first
        sweep gives every emitter an amplitude at its start; with ``search_px`` > 0 the
        next places each one at the best of the whole-pixel shifts within ``search_px``
        and the depths within ± 2 calibration steps of its start (every step); then
        ``sweeps`` Gauss–Newton steps in x, y and z (each clipped to 1 px and 2 µm).
        """
        dev = self.device
        e = frame_e.to(dev, torch.float32)
        x = x_px.to(dev, torch.float32).clone()
        y = y_px.to(dev, torch.float32).clone()
        z = z_um.to(dev, torch.float32).clamp(self.z_lo, self.z_hi)
        n = len(x)
        amp = torch.zeros(n, device=dev)
        bg = torch.zeros(n, device=dev)
        h, w = e.shape
        if n == 0:
            return PSFFit(x, y, z, amp, bg, torch.zeros_like(e))
        wh, ww = self.window
        sr = max(int(search_px), 0)
        pad = max(wh, ww) + 1 + max(sr, self.max_search_px)
        ep = F.pad(e, (pad, pad, pad, pad))
        inside = F.pad(torch.ones_like(e), (pad, pad, pad, pad))
        model = torch.zeros_like(ep)  # Σ of the emitters' current models, padded like ep
        tab = self.table.table
        zs = self.table.z_step
        placed: list[tuple[int, int, torch.Tensor] | None] = [None] * n
        idx = (order if order is not None else torch.arange(n)).tolist()
        core = (slice(pad, pad + h), slice(pad, pad + w))
        # one background for the frame: a window-local constant is nearly collinear with
        # a deep ring that fills the window, and would take its light
        # (the median of a quarter of the pixels: as good a start, 16x cheaper)
        back = float(torch.median(e[::4, ::4]))
        e_sum = float(e.sum())
        # first every emitter gets an amplitude at its start, so that the search (if any)
        # sees each one's neighbours already subtracted; then Gauss–Newton sweeps
        stages = ["amplitude"] + (["search"] if sr else []) + ["newton"] * sweeps
        # the wide search (deep emitters) only where no other emitter is in the window: in a
        # crowd it would pull a ring onto a neighbour's light that no model accounts for
        near = ((x[:, None] - x[None, :]).abs() < ww / 2) & (
            (y[:, None] - y[None, :]).abs() < wh / 2
        )
        crowded = (near.sum(1) > 1).tolist()
        box = self.box
        for stage in stages:
            ent = self._entries(x, y, z)
            oy_all, ox_all, iz_all, py_all, px_all = (t.tolist() for t in ent[:5])
            y_at, x_at, z_at = ent[5:]
            for i in idx:
                prev = placed[i]
                if prev is not None:  # take this emitter's own model out of the sum
                    a0, b0, c0 = prev
                    model[a0 : a0 + c0.shape[0], b0 : b0 + c0.shape[1]] -= c0
                oy, ox = oy_all[i] + pad, ox_all[i] + pad
                iz, py, px = iz_all[i], py_all[i], px_all[i]
                if stage == "search":
                    oy1, ox1, iz = self._search(
                        ep, model, inside, back, oy, ox, iz, py, px, sr, wide=not crowded[i]
                    )
                    x[i] = x_at[i] + (ox1 - ox)
                    y[i] = y_at[i] + (oy1 - oy)
                    z[i] = iz * zs + self.table.z0
                    oy, ox = oy1, ox1
                # only the part of the window that holds the PSF's light (± its neighbours
                # in z, for the derivative): most emitters are far smaller than the window
                y0, y1, x0, x1 = box[iz]
                t0 = tab[iz, py, px, y0:y1, x0:x1]
                win = (slice(oy + y0, oy + y1), slice(ox + x0, ox + x1))
                m = inside[win]
                d = ep[win] - model[win] - back * m
                if stage != "newton":
                    basis = t0[None]
                else:
                    # the PSF's derivatives: a model moved by +δ changes by −δ·∂T
                    gy, gx = _grad(t0)
                    gz = (tab[iz + 1, py, px, y0:y1, x0:x1] - tab[iz - 1, py, px, y0:y1, x0:x1]) / (
                        2 * zs
                    )
                    basis = torch.stack([t0, -gx, -gy, gz])
                k = basis.shape[0]
                bm = (basis * m).reshape(k, -1)
                g = bm @ basis.reshape(k, -1).T
                r = bm @ d.reshape(-1)
                # a tiny ridge keeps a window with almost no light solvable
                g = g + 1e-6 * g.diagonal().mean() * torch.eye(k, device=dev)
                c = torch.linalg.solve(g, r)
                a = float(c[0])
                if a <= 0:  # nothing of this emitter's shape here: no model, position kept
                    amp[i] = 0.0
                    placed[i] = None
                    continue
                amp[i] = a
                if stage == "newton":
                    sx = min(max(float(c[1]) / a, -MAX_STEP_PX), MAX_STEP_PX)
                    sy = min(max(float(c[2]) / a, -MAX_STEP_PX), MAX_STEP_PX)
                    sz = min(max(float(c[3]) / a, -MAX_STEP_Z_UM), MAX_STEP_Z_UM)
                    # from the table entry the model was linearised at, not from (x, y, z)
                    x[i] = x_at[i] + sx
                    y[i] = y_at[i] + sy
                    z[i] = min(max(float(z_at[i]) + sz, self.z_lo), self.z_hi)
                    oy, ox, iz, py, px = (int(v) for v in self._entry(x[i], y[i], z[i]))
                    oy, ox = oy + pad, ox + pad
                    y0, y1, x0, x1 = box[iz]
                    t0 = tab[iz, py, px, y0:y1, x0:x1]
                c1 = a * t0
                model[oy + y0 : oy + y1, ox + x0 : ox + x1] += c1
                placed[i] = (oy + y0, ox + x0, c1)
            back = (e_sum - float(model[core].sum())) / (h * w)
        bg.fill_(back)
        return PSFFit(x, y, z, amp, bg, model[core].clone())

    def _entry(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor) -> list[int]:
        """`_entries` for one emitter: [oy, ox, iz, py, px]."""
        t = self.table
        ph = t.phases
        cy, cx = t.centre
        qy = round((float(y) - cy) * ph)
        qx = round((float(x) - cx) * ph)
        oy, ox = qy // ph, qx // ph
        iz = min(max(round((float(z) - t.z0) / t.z_step), 1), t.table.shape[0] - 2)
        return [oy, ox, iz, qy - oy * ph, qx - ox * ph]

    def _search(
        self,
        ep: torch.Tensor,
        model: torch.Tensor,
        inside: torch.Tensor,
        back: float,
        oy: int,
        ox: int,
        iz: int,
        py: int,
        px: int,
        r: int,
        *,
        wide: bool = True,
    ) -> tuple[int, int, int]:
        """Best whole-pixel shift and depth (± 2 calibration steps) of one emitter's model
        in the padded frame ``ep`` minus the others' ``model`` and the background: the
        largest drop of the squared residual, Σ(T·d)² / ΣT², over all of them at once.
        Returns the window's new top-left and the table's z index.

        Gauss–Newton alone cannot cross the dark gaps of a defocused ring: a start 2–3 px
        off stays there. The networks' lateral error grows with defocus, so does the
        reach: ``r`` px, or `SEARCH_PX_PER_UM` × |z| when larger and ``wide`` (then on a
        2-px grid, and ± 1 px around the best)."""
        tab = self.table.table
        reach = round(SEARCH_Z_STEPS * self.z_cal_step / self.table.z_step)
        dz = torch.arange(-reach, reach + 1, SEARCH_Z_STRIDE, device=self.device)
        ks = (iz + dz).clamp(1, tab.shape[0] - 2)
        # one box for all candidate depths: the largest of theirs
        y0, y1, x0, x1 = self._union(ks.tolist())
        t = tab[ks, py, px, y0:y1, x0:x1]  # (K, h, w)
        z_um = abs(iz * self.table.z_step + self.table.z0)
        far = min(math.ceil(SEARCH_PX_PER_UM * z_um), self.max_search_px) if wide else 0
        oy, ox = oy + y0, ox + x0  # the box's top-left in the padded frame
        if far > r:
            sy, sx, _ = self._best(ep, model, inside, back, oy, ox, far, 2, t)
            oy, ox = oy + sy, ox + sx
        sy, sx, k = self._best(ep, model, inside, back, oy, ox, r if far <= r else 1, 1, t)
        return oy + sy - y0, ox + sx - x0, int(ks[k])

    def _union(self, iz: list[int]) -> tuple[int, int, int, int]:
        b = self.box
        return (
            min(b[k][0] for k in iz),
            max(b[k][1] for k in iz),
            min(b[k][2] for k in iz),
            max(b[k][3] for k in iz),
        )

    def _best(
        self,
        ep: torch.Tensor,
        model: torch.Tensor,
        inside: torch.Tensor,
        back: float,
        oy: int,
        ox: int,
        r: int,
        stride: int,
        t: torch.Tensor,
    ) -> tuple[int, int, int]:
        """(dy, dx, template index) of the best of the shifts −r…r (every ``stride`` px)
        of the (K, h, w) templates ``t`` whose top-left sits at (oy, ox)."""
        _, th, tw = t.shape
        region = (slice(oy - r, oy + th + r), slice(ox - r, ox + tw + r))
        m = inside[region]
        d = ep[region] - model[region] - back * m
        # every shifted window as a column: (h·w, S²)
        cols = F.unfold(d[None, None], (th, tw), stride=stride)[0]
        mcols = F.unfold(m[None, None], (th, tw), stride=stride)[0]
        tf = t.reshape(len(t), -1)
        c = tf @ cols
        en = (tf * tf) @ mcols
        gain = torch.where(c > 0, c * c / en.clamp_min(1e-12), torch.full_like(c, -1.0))
        k, sidx = divmod(int(torch.argmax(gain)), gain.shape[1])
        side = 2 * r // stride + 1
        sy, sx = divmod(sidx, side)
        return sy * stride - r, sx * stride - r, k

    def significance(self, fit: PSFFit, read_noise_e: float) -> torch.Tensor:
        """Each fitted emitter's amplitude over its standard error, (N,): the square root
        of its likelihood-ratio statistic, "how many σ this emitter is above nothing".

        The variance of a pixel is what the fitted model expects there (the fitted
        emitters plus the background, Poisson) plus ``read_noise_e`` squared: the noise of
        a pixel with no light, in the frame's electrons (the localizer passes its
        calibration's, `Preprocess.read_noise_e`, which also holds the shot noise of the
        calibration's background: that background is in the calibration's offset). The
        amplitude's error is ``1 / sqrt(Σ T² / variance)`` over the emitter's window
        (T its calibration PSF at the fitted position). A network's false positive, or a
        fit that landed on the leftover of a neighbour, has little amplitude for the light
        its shape would collect: a low significance. Emitters with no amplitude score 0.
        """
        n = len(fit.x_px)
        out = torch.zeros(n, device=self.device)
        if n == 0:
            return out
        if fit.image_e is None:
            raise ValueError("significance needs the fit's model image (image_e)")
        back = float(fit.background_e[0])
        wh, ww = self.window
        pad = max(wh, ww) + 1
        var = F.pad((fit.image_e + back).clamp_min(0.0) + float(read_noise_e) ** 2, (pad,) * 4)
        inside = F.pad(torch.ones_like(fit.image_e), (pad,) * 4)
        # a pixel outside the frame collects nothing: infinite variance, zero weight
        inv = inside / var.clamp_min(1e-6)
        ent = self._entries(fit.x_px, fit.y_px, fit.z_um)
        oy_all, ox_all, iz_all, py_all, px_all = (t.tolist() for t in ent[:5])
        amp = fit.amplitude_e.tolist()
        tab = self.table.table
        for i in range(n):
            if amp[i] <= 0:
                continue
            iz = iz_all[i]
            y0, y1, x0, x1 = self.box[iz]
            t0 = tab[iz, py_all[i], px_all[i], y0:y1, x0:x1]
            oy, ox = oy_all[i] + pad, ox_all[i] + pad
            info = float((t0 * t0 * inv[oy + y0 : oy + y1, ox + x0 : ox + x1]).sum())
            out[i] = amp[i] * math.sqrt(max(info, 0.0))
        return out

    def residual(self, frame_e: torch.Tensor, fit: PSFFit) -> torch.Tensor:
        """The frame (e⁻) with the fitted emitters removed; the background stays."""
        h, w = frame_e.shape
        image = fit.image_e if fit.image_e is not None else self.render((h, w), fit)
        return frame_e.to(self.device, torch.float32) - image


def _support(table: PSFTable, keep: float = 0.998, margin: int = 3) -> list[tuple[int, ...]]:
    """Per table depth, the box (y0, y1, x0, x1) of the window, centred on the emitter,
    that holds ``keep`` of the PSF's Σ T² (with its neighbours in z), plus ``margin`` px.

    An in-focus PSF fills a few pixels of its 128-px window, a ring 100 µm out of focus
    most of it: fitting only the box does the same work at a fraction of the cost. A
    measured calibration carries noise everywhere in its window, so each slice's noise
    floor (mean T² along the window's border) is taken off before the light is summed.
    """
    t = table.table[:, 0, 0].double()  # (Z, H, W), phase (0, 0)
    nz, hh, ww = t.shape
    cy, cx = (round(c) for c in table.centre)
    ys = (torch.arange(hh) - cy).abs()[:, None]
    xs = (torch.arange(ww) - cx).abs()[None, :]
    cheb = torch.maximum(ys, xs)  # (H, W) Chebyshev distance from the centre
    half = int(cheb.max())
    e = t * t
    floor = e[:, cheb >= half - 4].mean(1)
    per_ring = torch.zeros(nz, half + 1, dtype=torch.float64)
    per_ring.index_add_(1, cheb.reshape(-1), (e - floor[:, None, None]).reshape(nz, -1))
    frac = per_ring.cumsum(1) / per_ring.sum(1, keepdim=True).clamp_min(1e-30)
    r = (frac < keep).sum(1)  # smallest half-size reaching ``keep``
    r[1:] = torch.maximum(r[1:], r[:-1].clone())  # the z neighbours' light (the derivative)
    r[:-1] = torch.maximum(r[:-1], r[1:].clone())
    out: list[tuple[int, ...]] = []
    for ri in (r + margin).clamp_max(half).tolist():
        out.append((max(cy - ri, 0), min(cy + ri + 1, hh), max(cx - ri, 0), min(cx + ri + 1, ww)))
    return out


def _grad(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences (per pixel) of an (H, W) image along y and x; zero at the edge."""
    gy = torch.zeros_like(t)
    gx = torch.zeros_like(t)
    gy[1:-1] = 0.5 * (t[2:] - t[:-2])
    gx[:, 1:-1] = 0.5 * (t[:, 2:] - t[:, :-2])
    return gy, gx

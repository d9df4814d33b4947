"""Training-data synthesizer: labelled windows and frames drawn from a calibration alone.

Everything is vectorised in torch on the training device and drawn on the fly from a
`torch.Generator`, so no dataset is stored and a seed reproduces every batch.

How an image is made (the method of seed 002, with continuous z):

1. **Emitters**: per image a count from a Poisson law whose mean is a density drawn
   log-uniformly from ``density_per_100um`` (emitters per 100 × 100 µm² of sample, laterally;
   seed 002 evaluates 20 per 100 µm), positions uniform over the image plus a margin of
   half a calibration window (emitters outside still spill light in), z uniform and
   continuous over the calibration's z range, intensities uniform in ``intensity``.
2. **Rendering**: each emitter is the calibration's PSF model at its z and sub-pixel
   position: by default the denoised tricubic spline the localizer's maximum-likelihood fit
   uses (`focaltrack.sim.spline_psf.SplinePSF`: smooth in z, exact sub-pixel shifts), so the
   networks learn the model the fit refines with; ``psf_model="stack"`` gives the raw stack
   linearly interpolated in z and bilinearly shifted (the synthesizer before, kept for
   comparison). Either is precomputed once into a table (`PSFTable`: z every
   ``z_step_fraction`` of the calibration step, ``phases`` × ``phases`` sub-pixel phases), so
   drawing is a table gather plus one ``index_add_`` — no per-emitter Python.
3. **Brightness and noise**: per image a background B (e⁻/pixel, log-uniform in
   ``background_e``, none with probability ``p_no_background``) and an SNR uniform in dB
   in ``snr_db``. The SNR is that of the *reference emitter* — intensity 1, at the middle
   of the z range, centred on a pixel — at its brightest pixel S (e⁻):
   SNR_dB = 20·log10(S / sqrt(S + B + σ_r²)), the definition `focaltrack evaluate` uses;
   the photons per unit intensity follow in closed form. Then Poisson shot noise,
   Gaussian read noise, gain and offset from the calibration's `NoiseModel` (gain NaN →
   1 e⁻/ADU), rounding and clipping to the calibration's bit depth: a raw ADU image,
   exactly what a camera gives.
4. **Preprocessing**: `focaltrack.calibration.preprocess.Preprocess` — the same function
   the localizer applies to real frames — maps ADU to network input.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from focaltrack.calibration.format import Calibration
from focaltrack.calibration.preprocess import Preprocess
from focaltrack.sim.spline_psf import SplinePSF

UM_PER_DENSITY_AREA = 100.0  # densities are per (100 µm)² of sample
#: The fewest slices the spline table is built from (`PSFTable`); fewer: the stack table.
MIN_SPLINE_SLICES = 4


@dataclass(frozen=True, slots=True)
class SynthConfig:
    """What the synthesizer draws. Ranges are (low, high)."""

    snr_db: tuple[float, float] = (-4.0, 34.0)  # reference emitter's peak SNR, uniform
    intensity: tuple[float, float] = (0.1, 1.0)
    density_per_100um: tuple[float, float] = (2.0, 40.0)  # log-uniform
    p_no_background: float = 0.1
    background_e: tuple[float, float] = (1.0, 300.0)  # e⁻/pixel, log-uniform
    z_step_fraction: float = 0.5  # PSF table z step, fraction of the calibration's step
    phases: int = 4  # PSF table sub-pixel phases per axis
    psf_model: str = "spline"  # "spline" (the fit's denoised model) or "stack" (raw, bilinear)
    # axial windows
    axial_jitter_px: float = 1.5  # centre emitter displaced up to this (lateral error)
    # emitters this close to the centre are labels: the lateral detector's peak spacing (two
    # 4-px cells), so that an emitter whose lateral peak was suppressed by a neighbour's is
    # still reported, at its own offset, by the neighbour's window
    axial_label_radius_px: float = 8.0
    axial_p_empty: float = 0.1  # windows centred at random (no emitter forced there)
    scene_px: int = 192  # axial windows are cut from scenes this large
    windows_per_scene: int = 4
    max_emitters: int = 160  # per image (caps the Poisson draw)

    def to_dict(self) -> dict[str, object]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class PSFTable:
    """Calibration PSF precomputed at fine z and sub-pixel phases, on one device.

    ``table[iz, py, px]`` is the PSF at ``z_fine[iz]`` shifted by ``(py, px) / phases``
    pixels (down, right). ``centre`` (row, column) is the emitter position within a slice
    (pixel coordinates, centre of pixel (0, 0) at 0): `Calibration.centre_px`.
    """

    def __init__(
        self,
        calibration: Calibration,
        *,
        z_step_fraction: float = 0.5,
        phases: int = 4,
        device: torch.device | str = "cpu",
        model: str = "spline",
    ) -> None:
        z = calibration.z_um
        step = calibration.z_step_um * z_step_fraction
        n_fine = round((z[-1] - z[0]) / step) + 1
        self.z_fine = np.linspace(z[0], z[-1], n_fine)
        if hasattr(calibration, "centre_px"):  # the calibration's own centring contract
            cx, cy = calibration.centre_px
            self.centre = (float(cy), float(cx))
        else:  # pragma: no cover - older Calibration without centre_px
            focal = calibration.psf[int(np.argmax(calibration.psf.max(axis=(1, 2))))]
            self.centre = _centroid(focal.astype(np.float64))
        if model not in ("spline", "stack"):
            raise ValueError(f"PSF model must be 'spline' or 'stack', got {model!r}")
        if model == "spline" and len(z) < MIN_SPLINE_SLICES:
            # a cubic spline with not-a-knot ends needs 4 slices; a shorter stack (which
            # `Calibration` allows) is interpolated linearly, as before the spline
            model = "stack"
        if model == "spline":
            out = _spline_table(calibration, self.z_fine, phases, self.centre)
        else:
            out = _stack_table(calibration, self.z_fine, phases)
        self.table = out.to(device)
        self.model = model
        self.phases = phases
        self.window = (int(out.shape[-2]), int(out.shape[-1]))
        self.z0 = float(z[0])
        self.z_step = float(self.z_fine[1] - self.z_fine[0])
        self.device = torch.device(device)
        z_mid = 0.5 * (z[0] + z[-1])
        self.reference_peak = float(out[int(np.argmin(np.abs(self.z_fine - z_mid))), 0, 0].max())

    def render(
        self,
        size: tuple[int, int],
        batch: int,
        b_idx: torch.Tensor,
        x_px: torch.Tensor,
        y_px: torch.Tensor,
        z_um: torch.Tensor,
        amp: torch.Tensor,
    ) -> torch.Tensor:
        """Noiseless images (batch, H, W): Σ amp · PSF(z) at (x, y) per emitter.

        Emitters are flat tensors (E,) with their image index ``b_idx``; positions in pixel
        coordinates of the image (may lie outside it: only their light inside counts).
        """
        h, w = size
        wh, ww = self.window
        ph = self.phases
        cy, cx = self.centre
        pad_y, pad_x = wh + 1, ww + 1
        ch, cw = h + 2 * pad_y, w + 2 * pad_x
        canvas = torch.zeros(batch * ch * cw, dtype=torch.float32, device=self.device)
        if len(b_idx) or self.device.type == "cpu":
            iz = torch.round((z_um - self.z0) / self.z_step).long()
            iz = iz.clamp_(0, self.table.shape[0] - 1)
            ty = (y_px - cy) * ph
            tx = (x_px - cx) * ph
            qy = torch.round(ty).long()
            qx = torch.round(tx).long()
            oy = torch.div(qy, ph, rounding_mode="floor")
            ox = torch.div(qx, ph, rounding_mode="floor")
            py = qy - oy * ph
            px = qx - ox * ph
            # slice top-left lands at (oy, ox); keep those overlapping the image
            keep = (oy > -wh) & (oy < h) & (ox > -ww) & (ox < w)
            b_idx, oy, ox, iz, py, px, amp = (t[keep] for t in (b_idx, oy, ox, iz, py, px, amp))
            if self.device.type == "cpu":
                return self._render_cpu(size, batch, b_idx, oy, ox, iz, py, px, amp)
            vals = self.table[iz, py, px] * amp[:, None, None]  # (E, wh, ww)
            base = b_idx * (ch * cw) + (oy + pad_y) * cw + (ox + pad_x)
            off = (
                torch.arange(wh, device=self.device)[:, None] * cw
                + torch.arange(ww, device=self.device)[None, :]
            ).reshape(-1)
            idx = (base[:, None] + off[None, :]).reshape(-1)
            canvas.index_add_(0, idx, vals.reshape(-1))
        canvas = canvas.view(batch, ch, cw)
        return canvas[:, pad_y : pad_y + h, pad_x : pad_x + w]

    def _render_cpu(
        self,
        size: tuple[int, int],
        batch: int,
        *emitters: torch.Tensor,
    ) -> torch.Tensor:
        """CPU path: add each slice's overlap with the image in place.

        On a CPU the vectorised gather + ``index_add_`` moves every emitter's whole
        window (4x the light that lands in a window-sized image, on average) and is
        memory-bound; adding only the overlapping part of the table slice, one strided
        in-place add per emitter, is about 3x faster here. On a GPU the vectorised path
        is used.
        """
        h, w = size
        wh, ww = self.window
        out = torch.zeros((batch, h, w), dtype=torch.float32)
        cols = [t.tolist() for t in emitters]
        table = self.table
        for b, oy, ox, iz, py, px, a in zip(*cols, strict=True):
            y0, x0 = max(oy, 0), max(ox, 0)
            y1, x1 = min(oy + wh, h), min(ox + ww, w)
            src = table[iz, py, px, y0 - oy : y1 - oy, x0 - ox : x1 - ox]
            out[b, y0:y1, x0:x1].add_(src, alpha=a)
        return out


def _stack_table(calibration: Calibration, z_fine: np.ndarray, phases: int) -> torch.Tensor:
    """(Zf, phases, phases, H, W): the raw stack linearly interpolated in z between slices,
    shifted bilinearly to each sub-pixel phase."""
    psf = torch.as_tensor(calibration.psf, dtype=torch.float32)
    z = calibration.z_um
    pos = np.interp(z_fine, z, np.arange(len(z)))
    i0 = np.clip(np.floor(pos).astype(int), 0, len(z) - 2)
    w = torch.as_tensor(pos - i0, dtype=torch.float32)[:, None, None]
    fine = psf[i0] * (1 - w) + psf[i0 + 1] * w  # (Zf, H, W)
    zf, h, wd = fine.shape
    # bilinear sub-pixel shifts via grid_sample (align_corners=True: pixel centres)
    ys = torch.arange(h, dtype=torch.float32)
    xs = torch.arange(wd, dtype=torch.float32)
    out = torch.empty((zf, phases, phases, h, wd), dtype=torch.float32)
    for py in range(phases):
        for px in range(phases):
            sy, sx = py / phases, px / phases
            gy = (ys - sy) / (h - 1) * 2 - 1
            gx = (xs - sx) / (wd - 1) * 2 - 1
            grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)
            grid = grid.expand(zf, h, wd, 2)
            out[:, py, px] = F.grid_sample(
                fine[:, None], grid, mode="bilinear", padding_mode="zeros", align_corners=True
            )[:, 0]
    return out


def _spline_table(
    calibration: Calibration, z_fine: np.ndarray, phases: int, centre: tuple[float, float]
) -> torch.Tensor:
    """(Zf, phases, phases, H, W): the denoised tricubic spline the localizer fits with,
    evaluated exactly at each z and sub-pixel phase on the calibration window. What noise
    the denoising leaves is zero-mean and stays signed (clipping it would add a pedestal
    of ~10 % of the light at focus); `Synthesizer.expose` clips the expected image."""
    spline = SplinePSF(calibration, dtype=torch.float32)
    h, w = calibration.window_px
    cy, cx = centre
    zf = len(z_fine)
    ph = torch.arange(phases, dtype=torch.float32) / phases
    sy, sx = torch.meshgrid(ph, ph, indexing="ij")  # (py, px) shifts down and right
    out = torch.empty((zf, phases, phases, h, w), dtype=torch.float32)
    origin = torch.zeros((phases * phases, 2), dtype=torch.long)
    for iz, zv in enumerate(z_fine.tolist()):
        value = spline.evaluate(
            cx + sx.reshape(-1),
            cy + sy.reshape(-1),
            torch.full((phases * phases,), zv),
            origin,
            (h, w),
            derivatives=False,
        ).value
        out[iz] = value.reshape(phases, phases, h, w)
    return out


def _centroid(img: np.ndarray) -> tuple[float, float]:
    iy, ix = np.unravel_index(int(np.argmax(img)), img.shape)
    r = 3
    y0, y1 = max(iy - r, 0), min(iy + r + 1, img.shape[0])
    x0, x1 = max(ix - r, 0), min(ix + r + 1, img.shape[1])
    sub = img[y0:y1, x0:x1] - min(float(img[y0:y1, x0:x1].min()), 0.0)
    yy, xx = np.mgrid[y0:y1, x0:x1]
    s = float(sub.sum())
    return float((sub * yy).sum() / s), float((sub * xx).sum() / s)


@dataclass
class Emitters:
    """Drawn emitters, flat (E,) tensors; ``b`` is the image index. Pixel coordinates."""

    b: torch.Tensor
    x_px: torch.Tensor
    y_px: torch.Tensor
    z_um: torch.Tensor
    intensity: torch.Tensor

    def of_image(self, i: int) -> dict[str, np.ndarray]:
        m = self.b == i
        return {
            k: getattr(self, k)[m].cpu().numpy().astype(np.float64)
            for k in ("x_px", "y_px", "z_um", "intensity")
        }


@dataclass
class LateralBatch:
    x: torch.Tensor  # (B, 1, H, W) preprocessed
    heat: torch.Tensor  # (B, 1, H/s, W/s) 1 at the cell holding an emitter centre, else Gaussian
    offset: torch.Tensor  # (B, 2, H/s, W/s) (dy, dx) of the emitter from the cell centre / s
    positive: torch.Tensor  # (B, 1, H/s, W/s) bool
    emitters: Emitters
    adu: torch.Tensor  # (B, H, W) raw ADU


@dataclass
class AxialBatch:
    x: torch.Tensor  # (B, 1, S, S) preprocessed windows
    target: torch.Tensor  # (B, Z) soft multi-label targets over the calibration z grid
    offset: torch.Tensor  # (B, 2, Z) (dy, dx) from the window centre / label radius, per bin
    emitters: Emitters
    centre_px: float  # window centre (pixel coordinates inside the window)


@dataclass
class Synthesizer:
    """Draws labelled training data from one calibration on one device."""

    calibration: Calibration
    config: SynthConfig = field(default_factory=SynthConfig)
    device: torch.device | str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.table = PSFTable(
            self.calibration,
            z_step_fraction=self.config.z_step_fraction,
            phases=self.config.phases,
            device=self.device,
            model=self.config.psf_model,
        )
        self.pre = Preprocess.from_noise(self.calibration.noise)
        self.gen = torch.Generator(device=self.device)
        self.gen.manual_seed(int(self.seed))
        self.z_grid = torch.as_tensor(self.calibration.z_um, dtype=torch.float32).to(self.device)
        self.max_adu = float((1 << int(self.calibration.bit_depth)) - 1)
        self.windows_drawn = 0
        self.seconds = 0.0

    # ------------------------------------------------------------------ draws
    def _u(self, *shape: int) -> torch.Tensor:
        return torch.rand(shape, generator=self.gen, device=self.device)

    def _range(self, lo_hi: tuple[float, float], n: int, log: bool = False) -> torch.Tensor:
        lo, hi = lo_hi
        u = self._u(n)
        if log:
            return torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
        return lo + u * (hi - lo)

    def draw_emitters(
        self, batch: int, size: tuple[int, int], n_per_image: int | None = None
    ) -> Emitters:
        """Emitters uniform over each image plus a margin of half a window, uniform z."""
        cfg = self.config
        h, w = size
        my, mx = (s // 2 for s in self.table.window)
        area_um2 = (h + 2 * my) * (w + 2 * mx) * self.calibration.pixel_size_um**2
        if n_per_image is None:
            dens = self._range(cfg.density_per_100um, batch, log=True)
            lam = dens * area_um2 / UM_PER_DENSITY_AREA**2
            counts = torch.poisson(lam, generator=self.gen).long().clamp_(max=cfg.max_emitters)
        else:
            counts = torch.full((batch,), n_per_image, dtype=torch.long, device=self.device)
        b = torch.repeat_interleave(torch.arange(batch, device=self.device), counts)
        e = len(b)
        z0, z1 = float(self.calibration.z_um[0]), float(self.calibration.z_um[-1])
        return Emitters(
            b=b,
            x_px=-mx - 0.5 + self._u(e) * (w + 2 * mx),
            y_px=-my - 0.5 + self._u(e) * (h + 2 * my),
            z_um=z0 + self._u(e) * (z1 - z0),
            intensity=self._range(cfg.intensity, e),
        )

    def expose(
        self,
        signal: torch.Tensor,
        snr_db: torch.Tensor | None = None,
        background_e: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Unit-brightness signal (B, H, W) → raw ADU at a drawn (or given) SNR and
        background (electrons per pixel)."""
        cfg = self.config
        bsz = signal.shape[0]
        if snr_db is None:
            snr_db = self._range(cfg.snr_db, bsz)
        if background_e is None:
            background_e = self._range(cfg.background_e, bsz, log=True)
            background_e = background_e * (self._u(bsz) >= cfg.p_no_background)
        k = self.photons_for_snr(snr_db, background_e)
        expected = signal * k[:, None, None] + background_e[:, None, None]
        e = torch.poisson(expected.clamp_min(0), generator=self.gen)
        e = e + torch.randn(e.shape, generator=self.gen, device=self.device) * self.pre.read_noise_e
        adu = torch.round(e / self.pre.gain_e_per_adu + self.pre.offset_adu)
        return adu.clamp_(0.0, self.max_adu)

    def photons_for_snr(self, snr_db: torch.Tensor, background_e: torch.Tensor) -> torch.Tensor:
        """Electrons per unit intensity that put the reference emitter (intensity 1, at the
        middle of the z range, centred on a pixel) at peak-pixel SNR ``snr_db``:
        S / sqrt(S + B + σ_r²) = 10^(dB/20), S its brightest pixel (closed form)."""
        t2 = torch.pow(10.0, snr_db / 10.0)
        noise2 = background_e + self.pre.read_noise_e**2
        s_peak = 0.5 * (t2 + torch.sqrt(t2 * t2 + 4.0 * t2 * noise2))
        return s_peak / self.table.reference_peak

    # --------------------------------------------------------------- lateral
    def lateral_batch(self, batch: int, size: int, stride: int = 4) -> LateralBatch:
        """Patches with dense labels for the fully convolutional detector."""
        t0 = time.perf_counter()
        em = self.draw_emitters(batch, (size, size))
        sig = self.table.render((size, size), batch, em.b, em.x_px, em.y_px, em.z_um, em.intensity)
        adu = self.expose(sig)
        x = self.pre(adu)[:, None]
        heat, offset, positive = lateral_targets(em, batch, size, stride)
        self._count(batch, t0)
        return LateralBatch(x, heat, offset, positive, em, adu)

    # ----------------------------------------------------------------- axial
    def axial_batch(self, batch: int, size: int | None = None) -> AxialBatch:
        """Windows centred (± jitter) on emitters, multi-label z targets.

        Windows are cut from larger synthetic scenes (``scene_px`` square, emitters with the
        usual density and margin), the way the localizer cuts them from a frame: each window
        is centred on the pixel nearest a randomly chosen emitter of a random scene,
        displaced by up to ``axial_jitter_px`` (a lateral detection error), zero-padded
        where it leaves the scene; a fraction ``axial_p_empty`` is centred at random
        instead (false detections, to be rejected). Rendering one scene for many windows
        is several times cheaper than rendering each window with its own margin.
        """
        t0 = time.perf_counter()
        cfg = self.config
        size = size or self.table.window[0]
        c = size // 2  # the localizer crops so that the detection lies at pixel (c, c)
        sp = cfg.scene_px
        n_scenes = max(1, math.ceil(batch / cfg.windows_per_scene))
        em = self.draw_emitters(n_scenes, (sp, sp))
        sig = self.table.render((sp, sp), n_scenes, em.b, em.x_px, em.y_px, em.z_um, em.intensity)
        x = self.pre(self.expose(sig))  # (S, sp, sp)
        # choose a scene per window, then an emitter inside it
        inside = (em.x_px >= -0.5) & (em.x_px < sp - 0.5) & (em.y_px >= -0.5) & (em.y_px < sp - 0.5)
        ib = em.b[inside]
        counts = torch.bincount(ib, minlength=n_scenes)
        starts = torch.cumsum(counts, 0) - counts
        scene = torch.floor(self._u(batch) * n_scenes).long().clamp_(max=n_scenes - 1)
        pick = starts[scene] + torch.floor(self._u(batch) * counts[scene]).long()
        has = (counts[scene] > 0) & (self._u(batch) >= cfg.axial_p_empty)
        pick = torch.where(has, pick, torch.zeros_like(pick)).clamp_(
            max=max(int(inside.sum()) - 1, 0)
        )
        rad = cfg.axial_jitter_px * torch.sqrt(self._u(batch))
        ang = 2 * math.pi * self._u(batch)
        if int(inside.sum()):
            ex, ey = em.x_px[inside][pick], em.y_px[inside][pick]
        else:
            ex = ey = torch.zeros(batch, device=self.device)
        rx = torch.where(has, ex + rad * torch.cos(ang), -0.5 + self._u(batch) * sp)
        ry = torch.where(has, ey + rad * torch.sin(ang), -0.5 + self._u(batch) * sp)
        cx = torch.round(rx).long().clamp_(0, sp - 1)
        cy = torch.round(ry).long().clamp_(0, sp - 1)
        padded = F.pad(x, (c, size - c, c, size - c))
        ar = torch.arange(size, device=self.device)
        win = padded[
            scene[:, None, None], (cy[:, None] + ar)[:, :, None], (cx[:, None] + ar)[:, None, :]
        ]
        # emitters relative to each window (window pixel coordinates)
        same = scene[:, None] == em.b[None, :]  # (batch, E)
        wi, ei = torch.nonzero(same, as_tuple=True)
        rel = Emitters(
            b=wi,
            x_px=em.x_px[ei] - cx[wi].float() + c,
            y_px=em.y_px[ei] - cy[wi].float() + c,
            z_um=em.z_um[ei],
            intensity=em.intensity[ei],
        )
        target, offset = axial_targets_with_offsets(
            rel, batch, float(c), cfg.axial_label_radius_px, self.z_grid
        )
        self._count(batch, t0)
        return AxialBatch(win[:, None], target, offset, rel, float(c))

    def frames(
        self,
        n: int,
        size: tuple[int, int],
        n_emitters: int,
        snr_db: float | None = None,
        region_px: tuple[float, float, float, float] | None = None,
        background_e: float | None = None,
    ) -> tuple[torch.Tensor, Emitters]:
        """Whole raw-ADU frames (n, H, W) with ``n_emitters`` each, for validation.

        ``region_px`` = (x0, y0, x1, y1) limits where emitters are placed (default: the frame).
        """
        h, w = size
        x0, y0, x1, y1 = region_px or (0.0, 0.0, float(w - 1), float(h - 1))
        e = n * n_emitters
        z0, z1 = float(self.calibration.z_um[0]), float(self.calibration.z_um[-1])
        em = Emitters(
            b=torch.repeat_interleave(torch.arange(n, device=self.device), n_emitters),
            x_px=x0 + self._u(e) * (x1 - x0),
            y_px=y0 + self._u(e) * (y1 - y0),
            z_um=z0 + self._u(e) * (z1 - z0),
            intensity=self._range(self.config.intensity, e),
        )
        sig = self.table.render(size, n, em.b, em.x_px, em.y_px, em.z_um, em.intensity)
        snr = None if snr_db is None else torch.full((n,), float(snr_db), device=self.device)
        bg = (
            None
            if background_e is None
            else torch.full((n,), float(background_e), device=self.device)
        )
        return self.expose(sig, snr_db=snr, background_e=bg), em

    def _count(self, n: int, t0: float) -> None:
        self.windows_drawn += n
        self.seconds += time.perf_counter() - t0

    @property
    def windows_per_s(self) -> float:
        return self.windows_drawn / self.seconds if self.seconds > 0 else float("nan")

    def with_config(self, **changes: Any) -> Synthesizer:
        return Synthesizer(
            self.calibration, replace(self.config, **changes), self.device, self.seed
        )


def lateral_targets(
    em: Emitters, batch: int, size: int, stride: int, sigma_cells: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Heatmap (Gaussian around each emitter, 1 at its cell), offsets, positive mask.

    Cell (i, j) covers pixels [s·i, s·i + s) in y and [s·j, s·j + s) in x; its centre is
    at s·i + (s − 1)/2 (centre of pixel (0, 0) at 0). Emitters centred outside the image
    are not labels (their light still appears in it).
    """
    dev = em.b.device
    n = size // stride
    inside = (em.x_px >= -0.5) & (em.x_px < size - 0.5) & (em.y_px >= -0.5) & (em.y_px < size - 0.5)
    b, x, y = em.b[inside], em.x_px[inside], em.y_px[inside]
    cj = torch.div(torch.floor(x + 0.5).long(), stride, rounding_mode="floor").clamp_(0, n - 1)
    ci = torch.div(torch.floor(y + 0.5).long(), stride, rounding_mode="floor").clamp_(0, n - 1)
    half = (stride - 1) / 2
    heat = torch.zeros((batch, n, n), device=dev)
    if len(b):
        # Gaussian splats: max over emitters, computed on a local 7×7 neighbourhood of cells
        r = 3
        d = torch.arange(-r, r + 1, device=dev)
        gi = (ci[:, None, None] + d[None, :, None]).expand(-1, 2 * r + 1, 2 * r + 1)
        gj = (cj[:, None, None] + d[None, None, :]).expand(-1, 2 * r + 1, 2 * r + 1)
        ok = (gi >= 0) & (gi < n) & (gj >= 0) & (gj < n)
        cy = (gi * stride + half).float()
        cx = (gj * stride + half).float()
        g = torch.exp(
            -((cy - y[:, None, None]) ** 2 + (cx - x[:, None, None]) ** 2)
            / (2 * (sigma_cells * stride) ** 2)
        )
        flat = (b[:, None, None] * n * n + gi * n + gj)[ok]
        heat.view(-1).scatter_reduce_(0, flat, g[ok], reduce="amax")
    positive = torch.zeros((batch, n, n), dtype=torch.bool, device=dev)
    offset = torch.zeros((batch, 2, n, n), device=dev)
    if len(b):
        positive[b, ci, cj] = True
        heat[b, ci, cj] = 1.0
        offset[b, 0, ci, cj] = (y - (ci * stride + half)) / stride
        offset[b, 1, ci, cj] = (x - (cj * stride + half)) / stride
    return heat[:, None], offset, positive[:, None]


def axial_targets(
    em: Emitters, batch: int, centre: float, radius: float, z_grid: torch.Tensor
) -> torch.Tensor:
    """Soft multi-label z targets: for each emitter within ``radius`` px of the centre, a
    triangle over the z grid (1 at its z, falling to 0 one grid step away), max-combined.

    A triangle is linear interpolation between neighbouring bins, so the two bins around an
    emitter carry weights that sum to 1 and their weighted mean is its z exactly.
    """
    return axial_targets_with_offsets(em, batch, centre, radius, z_grid)[0]


def axial_targets_with_offsets(
    em: Emitters, batch: int, centre: float, radius: float, z_grid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`axial_targets` and, per window and bin, the lateral offset (dy, dx) of the emitter
    that owns the bin (the largest triangle weight there) from the window centre, divided
    by ``radius`` (so within [-1, 1]); zero where no emitter does."""
    near = torch.hypot(em.x_px - centre, em.y_px - centre) <= radius
    b, z = em.b[near], em.z_um[near]
    nz = len(z_grid)
    target = torch.zeros((batch, nz), device=z_grid.device)
    offset = torch.zeros((batch, 2, nz), device=z_grid.device)
    if len(b):
        dz = torch.diff(z_grid)
        up = torch.cat([dz, dz[-1:]])  # spacing to the next grid point
        down = torch.cat([dz[:1], dz])  # spacing to the previous one
        d = z[:, None] - z_grid[None, :]
        tri = torch.where(d >= 0, 1.0 - d / up[None, :], 1.0 + d / down[None, :])
        tri = tri.clamp_(min=0.0)
        target.scatter_reduce_(0, b[:, None].expand(-1, nz), tri, reduce="amax", include_self=True)
        # the owner of each (window, bin): the emitter whose weight is the maximum there
        # (ties need two emitters at exactly the same continuous z)
        own_e, own_z = torch.nonzero((tri > 0) & (tri == target[b]), as_tuple=True)
        ob = b[own_e]
        offset[ob, 0, own_z] = (em.y_px[near][own_e] - centre) / radius
        offset[ob, 1, own_z] = (em.x_px[near][own_e] - centre) / radius
    return target, offset

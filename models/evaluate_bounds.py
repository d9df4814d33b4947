"""What physics allows at each evaluation point: Cramér–Rao bounds and the ideal recall.

For every true emitter of a point's frames, from the **calibration model** (the model's
calibration PSF as `focaltrack.sim.spline_psf.SplinePSF`, a tricubic spline of the bead
stack) with Poisson plus read noise (variance μ + σ² per pixel, `focaltrack.models.crlb`):

- the **joint** Cramér–Rao bound: the Fisher information of all of a frame's parameters —
  every emitter's x, y, z and photon count, and the frame's background (one number: the
  simulated background is uniform) — over the pixels of the emitters' windows, so emitters
  whose windows overlap share information and crowding costs precision;
- the **single-emitter** bound: the same emitter alone, with its own background, on the
  same window (its neighbours' light and parameters absent);
- the **known-position matched-filter SNR**, √(Σ s² / v) over the emitter's window, with s
  its expected image and v the expected frame (all emitters, background) plus the read-noise
  variance; an *ideal detector* finds the emitters whose SNR is at least `IDEAL_SNR`.

Windows: the calibration window (`Calibration.window_px`) centred on the emitter's pixel,
clipped at the frame's edges (the window a fit of the calibration PSF would use).

Units. θ = (x_px, y_px, z_um, N, b) as in `focaltrack.models.crlb`: the model's expected
image is N · PSF + b photo-electrons per pixel. The simulator renders an emitter of P photons
as qe · P · g (g its PSF, ∫ g = 1 over the plane; qe the camera's quantum efficiency) over a
background of qe · b_photons; the calibration stack is normalised to its brightest slice's
window sum, so its PSF is g / S with S that slice's in-window light fraction. N = qe · P · κ
with κ (`BoundModel.photon_scale`) fixed once per run: the ratio of the simulator's light in
the calibration window to the spline's, summed over depths across the range (κ ≈ S when the
calibration was cut from the same physics; its spread over depth is reported as
``photometry_max_dev``). σ² is the simulated camera's noise floor (read noise and ADU rounding,
e⁻²). Bounds come out in pixels and µm; `PointBounds` holds them in µm².

Cost: one spline evaluation (value and x, y, z derivatives on the window) per emitter and,
per frame, one dense (4n + 1)² Fisher product over the frame's pixels: ≈ 0.08 s per frame
of 20 emitters, ≈ 0.55 s per frame of 100, on one core.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from focaltrack.calibration import Calibration
from focaltrack.models.crlb import covariance, fisher
from focaltrack.sim.spline_psf import SplinePSF, frame_index

if TYPE_CHECKING:
    from focaltrack.models.evaluate_report import Report
    from focaltrack.sim.render import Microscope, Renderer

__all__ = [
    "BOUND_COLUMNS",
    "IDEAL_SNR",
    "BoundModel",
    "PointBounds",
    "bounds_by_depth",
    "plot_depth",
]

#: The matched-filter SNR an ideal detector needs (a threshold that survives searching a
#: whole frame of pixels for emitters without false alarms).
IDEAL_SNR = 5.0
#: The per-tolerance columns `PointBounds.summary` adds to a point's scores.
BOUND_COLUMNS = (
    "crlb_lat_um",
    "crlb_ax_um",
    "crlb1_lat_um",
    "crlb1_ax_um",
    "rmse_crlb_lat",
    "rmse_crlb_ax",
    "crlb_unbounded",
)
#: Elements of the per-frame Jacobian (parameters × pixels) held at once: frames are bounded
#: a few at a time so that it stays near 64 MB (float32).
DENSE_ELEMENTS = 1 << 24
#: Emitters whose windows are evaluated at once, in window pixels (about 100 of 128²).
WINDOW_ELEMENTS = 1 << 21
N_EMITTER_PARAMS = 4  # x, y, z, N; the frame's background is the last parameter


@dataclass(frozen=True, slots=True)
class PointBounds:
    """The bounds of a point's true emitters (frames concatenated, in the order of the
    truth): variances in µm² of x, y, z, jointly and alone, and the matched-filter SNR."""

    z_um: np.ndarray  # (n,)
    var_joint_um2: np.ndarray  # (n, 3)
    var_alone_um2: np.ndarray  # (n, 3)
    snr: np.ndarray  # (n,)

    @property
    def ideal_recall(self) -> float | None:
        """The share of emitters with SNR ≥ `IDEAL_SNR` (None without emitters)."""
        return float(np.mean(self.snr >= IDEAL_SNR)) if len(self.snr) else None

    def summary(
        self, matched: np.ndarray, rmse_lat_um: float | None, rmse_ax_um: float | None
    ) -> dict[str, Any]:
        """`BOUND_COLUMNS` over the emitters ``matched`` (indices into the truth): RMS of
        √CRLB, lateral √(σx² + σy²) as the lateral RMSE combines x and y, and the RMSE's ratio
        to the joint bound. Emitters whose joint bound is infinite (a singular frame) are
        left out of every column and counted in ``crlb_unbounded``."""
        idx = np.asarray(matched, dtype=np.int64)
        vj, va = self.var_joint_um2[idx], self.var_alone_um2[idx]
        ok = np.isfinite(vj).all(1) & np.isfinite(va).all(1)
        out: dict[str, Any] = dict.fromkeys(BOUND_COLUMNS)
        out["crlb_unbounded"] = int((~ok).sum())
        if not ok.any():
            return out
        vj, va = vj[ok], va[ok]
        out["crlb_lat_um"] = math.sqrt(float(np.mean(vj[:, 0] + vj[:, 1])))
        out["crlb_ax_um"] = math.sqrt(float(np.mean(vj[:, 2])))
        out["crlb1_lat_um"] = math.sqrt(float(np.mean(va[:, 0] + va[:, 1])))
        out["crlb1_ax_um"] = math.sqrt(float(np.mean(va[:, 2])))
        out["rmse_crlb_lat"] = _ratio(rmse_lat_um, out["crlb_lat_um"])
        out["rmse_crlb_ax"] = _ratio(rmse_ax_um, out["crlb_ax_um"])
        return out


def _ratio(a: float | None, b: float) -> float | None:
    return a / b if a is not None and math.isfinite(a) and b > 0 else None


class BoundModel:
    """The calibration model of the evaluated frames: spline PSF, photon scale, noise."""

    def __init__(
        self,
        calibration: Calibration,
        microscope: Microscope,
        renderer: Renderer,
        *,
        z_range_um: tuple[float, float],
    ) -> None:
        px = microscope.pixel_size_um
        if not math.isclose(calibration.pixel_size_um, px, rel_tol=1e-3):
            raise ValueError(
                f"the calibration's pixels are {calibration.pixel_size_um:g} µm, the "
                f"simulated microscope's {px:g} µm: its model does not describe these frames"
            )
        self.psf = SplinePSF(calibration)
        self.window = calibration.window_px
        self.pixel_size_um = px
        self.qe = microscope.camera.quantum_efficiency
        self.read_var_e2 = microscope.noise_floor_e2
        self.photon_scale, self.photometry_max_dev = _photon_scale(
            self.psf, renderer, self.window, z_range_um
        )

    def info(self) -> dict[str, Any]:
        """What the report records about the model the bounds come from."""
        return {
            "model": "calibration PSF (tricubic spline), Poisson + read noise",
            "window_px": list(self.window),
            "photon_scale": self.photon_scale,
            "photometry_max_dev": self.photometry_max_dev,
            "read_var_e2": self.read_var_e2,
            "ideal_snr": IDEAL_SNR,
        }

    def point(
        self,
        xyz_um: list[np.ndarray],
        photons: list[np.ndarray],
        background_photons: float,
        shape: tuple[int, int],
    ) -> PointBounds:
        """The bounds of frames' emitters: positions (µm) and photons (at the camera, as the
        simulator renders them) of each frame, its uniform background (photons/px)."""
        counts = [len(x) for x in xyz_um]
        if not counts or sum(counts) == 0:
            empty = np.zeros((0, 3))
            return PointBounds(np.zeros(0), empty, empty, np.zeros(0))
        xyz = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1, 3) for x in xyz_um])
        ph = np.concatenate([np.asarray(p, dtype=np.float64).reshape(-1) for p in photons])
        frame = np.repeat(np.arange(len(counts)), counts)
        h, w = self.window
        per_frame = max(counts)
        pixels = shape[0] * shape[1] + 1
        step = max(
            1,
            min(
                DENSE_ELEMENTS // ((N_EMITTER_PARAMS * per_frame + 1) * pixels),
                WINDOW_ELEMENTS // (per_frame * h * w),
            ),
        )
        px = self.pixel_size_um
        n_e = ph * self.qe * self.photon_scale
        theta = np.column_stack([xyz[:, 0] / px, xyz[:, 1] / px, xyz[:, 2], n_e])
        bg_e = background_photons * self.qe
        starts = np.concatenate([[0], np.cumsum(counts)])
        parts = []
        for f0 in range(0, len(counts), step):
            f1 = min(f0 + step, len(counts))
            sl = slice(int(starts[f0]), int(starts[f1]))
            if sl.stop == sl.start:
                parts.append((np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0)))
                continue
            parts.append(
                self._frames(
                    torch.as_tensor(theta[sl], dtype=self.psf.dtype),
                    torch.as_tensor(frame[sl] - f0),
                    f1 - f0,
                    bg_e,
                    shape,
                )
            )
        joint, alone, snr = (np.concatenate(p) for p in zip(*parts, strict=True))
        scale = np.array([self.pixel_size_um**2, self.pixel_size_um**2, 1.0])
        return PointBounds(xyz[:, 2].copy(), joint * scale, alone * scale, snr)

    def _frames(
        self,
        theta: torch.Tensor,
        frame: torch.Tensor,
        n_frames: int,
        bg_e: float,
        shape: tuple[int, int],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Joint and single variances (n, 3) of x_px, y_px, z_um and the SNR (n,) of the
        emitters θ (n, 4: x_px, y_px, z_um, N e⁻) of ``n_frames`` frames."""
        psf, size = self.psf, self.window
        n = theta.shape[0]
        k4 = N_EMITTER_PARAMS
        hw = shape[0] * shape[1]
        origin = psf.windows_at(theta[:, 0], theta[:, 1], size)
        p = psf.evaluate(theta[:, 0], theta[:, 1], theta[:, 2], origin, size)
        assert p.dx is not None and p.dy is not None and p.dz is not None
        flat, inside_b = frame_index(origin, size, shape, frame, n_frames)
        inside = inside_b.to(psf.dtype)
        nph = theta[:, 3, None]
        value = p.value.reshape(n, -1) * inside
        jac = torch.stack(
            [
                nph * p.dx.reshape(n, -1) * inside,
                nph * p.dy.reshape(n, -1) * inside,
                nph * p.dz.reshape(n, -1) * inside,
                value,
                inside,
            ],
            1,
        )
        signal = nph * value
        # the expected frames: every emitter's light, the background on the covered pixels
        # (the likelihood's domain, the union of the windows); the last element a sink
        canvas = torch.zeros(n_frames * hw + 1, dtype=psf.dtype)
        canvas.index_add_(0, flat.reshape(-1), signal.reshape(-1))
        covered = torch.zeros(n_frames * hw + 1, dtype=psf.dtype)
        covered.index_add_(0, flat.reshape(-1), inside.reshape(-1))
        covered = (covered > 0).to(psf.dtype)
        covered[-1] = 0.0
        variance = (canvas + bg_e * covered + self.read_var_e2).clamp_min(1e-6)
        weight = covered / variance  # 0 off the windows and at the sink
        snr = torch.sqrt((signal * signal * weight[flat]).sum(1))
        # jointly: per frame, D (4·S + 1, H·W + 1) holds ∂μ/∂θ · √W of all of its parameters
        # (emitter s at rows 4s … 4s + 3, the background last; W = 1 / (μ + σ²) on the
        # covered pixels) and I = D Dᵀ; off-frame pixels go to the last column (zero)
        same = frame[:, None] == frame[None, :]
        idx = torch.arange(n)
        slot = (same & (idx[None, :] < idx[:, None])).sum(1)
        slots = int(slot.max()) + 1
        dim = k4 * slots + 1
        root_w = weight.sqrt()
        col = torch.where(inside_b, flat - frame[:, None] * hw, torch.full_like(flat, hw))
        rows = slot[:, None] * k4 + torch.arange(k4)
        target = ((frame[:, None] * dim + rows)[:, :, None] * (hw + 1) + col[:, None, :]).reshape(
            -1
        )
        dense = torch.zeros(n_frames, dim, hw + 1, dtype=psf.dtype)
        dense.view(-1)[target] = (jac[:, :k4] * root_w[flat][:, None, :]).reshape(-1)
        dense[:, -1, :hw] = root_w[:-1].reshape(n_frames, hw)
        info = torch.bmm(dense, dense.transpose(1, 2)).double()
        used = torch.zeros(n_frames, slots, dtype=torch.bool)
        used[frame, slot] = True
        free = torch.nonzero(~used)  # empty slots of frames with fewer emitters
        if len(free):
            d = free[:, 1, None] * k4 + torch.arange(k4)
            info[free[:, 0, None].expand(-1, k4), d, d] = 1.0
        cov = covariance(info)
        joint = cov[frame[:, None], rows, rows][:, :3]
        # alone: the emitter's own light and background on its window
        mu_alone = signal + bg_e * inside
        alone_cov = covariance(fisher(mu_alone, jac, self.read_var_e2, inside))
        alone = alone_cov.diagonal(dim1=1, dim2=2)[:, :3]
        return joint.numpy(), alone.numpy(), snr.double().numpy()


def _photon_scale(
    psf: SplinePSF,
    renderer: Renderer,
    window: tuple[int, int],
    z_range_um: tuple[float, float],
    n_depths: int = 21,
) -> tuple[float, float]:
    """κ: the simulator's light (per photon) in the calibration window (its part in the
    frame) over the spline's, summed over ``n_depths`` depths across the range, for an
    emitter centred on a pixel of the frame's centre; and the largest relative deviation
    of one depth's ratio from κ."""
    shape = renderer.shape
    cy, cx = float(shape[0] // 2), float(shape[1] // 2)
    z = np.linspace(z_range_um[0], z_range_um[1], n_depths)
    xs, ys = torch.full((n_depths,), cx), torch.full((n_depths,), cy)
    origin = psf.windows_at(xs, ys, window)
    model = psf.evaluate(xs, ys, torch.as_tensor(z), origin, window, derivatives=False).value
    flat, inside = frame_index(origin[:1], window, shape)
    model_sum = (model.double().reshape(n_depths, -1) * inside.double()).sum(1).numpy()
    sel = flat[0][inside[0]].numpy()
    sim_sum = np.array(
        [
            renderer.expected_photons(np.array([cx]), np.array([cy]), np.array([zz]), np.ones(1))
            .reshape(-1)[sel]
            .sum()
            for zz in z
        ]
    )
    kappa = float(sim_sum.sum() / model_sum.sum())
    dev = float(np.max(np.abs(sim_sum / (kappa * model_sum) - 1.0)))
    return kappa, dev


# --------------------------------------------------------------------------------------
# By depth, and the plot
# --------------------------------------------------------------------------------------


def bounds_by_depth(
    pairs: np.ndarray,
    bounds: PointBounds,
    z_range_um: tuple[float, float],
    n_bins: int = 10,
) -> list[dict[str, Any]]:
    """Per depth slab, over the matched emitters (``pairs``: `score_frames_with_ci`'s rows,
    the truth's index in column 6): lateral and axial RMSE and RMS √CRLB, joint and alone."""
    z0, z1 = z_range_um
    edges = np.linspace(z0, z1, n_bins + 1)
    idx = pairs[:, 6].astype(np.int64)
    vj, va = bounds.var_joint_um2[idx], bounds.var_alone_um2[idx]
    finite = np.isfinite(vj).all(1) & np.isfinite(va).all(1)
    out = []
    for a, b in itertools.pairwise(edges):
        sel = (pairs[:, 2] >= a) & ((pairs[:, 2] < b) | (b == z1))
        e = pairs[sel]
        ok = sel & finite
        row: dict[str, Any] = {"z_from_um": float(a), "z_to_um": float(b), "n": int(sel.sum())}
        row["rmse_lateral_um"] = _rms(e[:, 3] ** 2 + e[:, 4] ** 2)
        row["rmse_axial_um"] = _rms(e[:, 5] ** 2)
        row["crlb_lat_um"] = _rms(vj[ok, 0] + vj[ok, 1])
        row["crlb_ax_um"] = _rms(vj[ok, 2])
        row["crlb1_lat_um"] = _rms(va[ok, 0] + va[ok, 1])
        row["crlb1_ax_um"] = _rms(va[ok, 2])
        out.append(row)
    return out


def _rms(squares: np.ndarray) -> float:
    return math.sqrt(float(np.mean(squares))) if len(squares) else float("nan")


def plot_depth(report: Report, out_dir: Path) -> Path | None:
    """depth.png: lateral and axial RMSE and √CRLB (joint, alone) against the true depth,
    one colour per point of the SNR sweep (20 emitters per frame), at the first tolerance.
    None when no point has bounds."""
    from matplotlib.figure import Figure

    key = report.paper_tol
    pts = [p for p in report.experiment("snr") if p.bounds is not None]
    if not pts:
        return None
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    axes = fig.subplots(1, 2, sharex=True)
    drawn = False
    for i, p in enumerate(pts):
        assert p.bounds is not None
        rows = bounds_by_depth(p.pairs[key], p.bounds, report.geometry.z_range_um)
        zc = np.array([0.5 * (r["z_from_um"] + r["z_to_um"]) for r in rows])
        colour = f"C{i % 10}"
        for ax, (rmse, joint, alone) in zip(
            axes,
            (
                ("rmse_lateral_um", "crlb_lat_um", "crlb1_lat_um"),
                ("rmse_axial_um", "crlb_ax_um", "crlb1_ax_um"),
            ),
            strict=True,
        ):
            for name, style, label in (
                (rmse, "o-", f"RMSE, {p.spec.label}"),
                (joint, "--", f"√CRLB joint, {p.spec.label}"),
                (alone, ":", "√CRLB alone" if i == 0 else None),
            ):
                y = np.array([r[name] for r in rows], dtype=float)
                drawn |= bool(np.isfinite(y).any())
                ax.plot(zc, y, style, color=colour, ms=3, lw=1.2 if name != alone else 0.8,
                        label=label)  # fmt: skip
    for ax, what in zip(axes, ("lateral", "axial"), strict=True):
        ax.set_xlabel("true depth z (µm)")
        ax.set_ylabel(f"{what} error / bound (µm)")
        ax.grid(alpha=0.3, which="both")
        if drawn:
            ax.set_yscale("log")
    axes[0].legend(fontsize=7, ncol=2, loc="upper left")
    fig.suptitle(
        f"RMSE of matched emitters and √CRLB against depth: SNR sweep, "
        f"{pts[0].spec.n_emitters} emitters / frame, tolerance {key.removesuffix('um')} µm\n"
        "dashed: the joint bound (all of a frame's emitters); dotted: each emitter alone",
        fontsize=10,
    )
    path = out_dir / "depth.png"
    fig.savefig(path, dpi=110)
    return path

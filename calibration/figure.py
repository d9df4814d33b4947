"""The `focaltrack calibration show` figure: a calibration checked at a glance.

One PNG (matplotlib, Agg backend, no display needed):

- top left / top middle: XZ and YZ sections through the bead centre (the crop's centre
  row and column), log-scaled, axes in µm (x or y across, defocus z down the page as on
  a focus drive going up);
- top right: integrated and peak intensity of each slice against z (log scale), so a
  photometry jump or a slice without bead stands out; and the bead's lateral track
  (stage drift) when the calibration recorded it;
- bottom row: slices at six depths spread over the stack, one common log scale (so the
  spread of the light with defocus reads directly), axes in µm;
- the noise model and the key attributes as text.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from focaltrack.common.files import atomic_path

if TYPE_CHECKING:
    from focaltrack.calibration.format import Calibration


def _log_limits(psf: np.ndarray) -> tuple[float, float]:
    vmax = float(psf.max())
    if not vmax > 0:
        vmax = 1.0
    return vmax * 1e-4, vmax


def render_figure(cal: Calibration, path: str | os.PathLike[str], *, dpi: int = 110) -> Path:
    """Draw the calibration figure into ``path`` (PNG), atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import colors
    from matplotlib.figure import Figure

    from focaltrack.calibration.format import CalibrationError, summary

    path = Path(path)
    if not path.parent.is_dir():
        raise CalibrationError(f"output directory {path.parent} does not exist")
    psf = np.asarray(cal.psf, dtype=np.float64)
    nz, h, w = psf.shape
    px = cal.pixel_size_um
    z = cal.z_um
    cy, cx = h // 2, w // 2
    dz = cal.z_step_um
    vmin, vmax = _log_limits(psf)
    norm = colors.LogNorm(vmin=vmin, vmax=vmax, clip=True)
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="black", under="black")

    fig = Figure(figsize=(15, 11), layout="constrained")
    subs = np.asarray(fig.subfigures(3, 1, height_ratios=[1.3, 0.85, 0.45])).ravel()
    top, middle, bottom = subs[0], subs[1], subs[2]
    gs = top.add_gridspec(1, 3)
    x_ext = ((-cx - 0.5) * px, (w - cx - 0.5) * px)
    y_ext = ((-cy - 0.5) * px, (h - cy - 0.5) * px)
    z_ext = (z[-1] + dz / 2, z[0] - dz / 2)  # focus at the top

    ax_xz = top.add_subplot(gs[0, 0])
    im = ax_xz.imshow(
        np.clip(psf[:, cy, :], vmin, None),
        norm=norm,
        cmap=cmap,
        extent=(x_ext[0], x_ext[1], z_ext[0], z_ext[1]),
        aspect="auto",
        interpolation="nearest",
    )
    ax_xz.set_xlabel("x (µm)")
    ax_xz.set_ylabel("z, defocus (µm)")
    ax_xz.set_title("XZ section through the bead")
    ax_yz = top.add_subplot(gs[0, 1], sharey=ax_xz)
    ax_yz.imshow(
        np.clip(psf[:, :, cx], vmin, None),
        norm=norm,
        cmap=cmap,
        extent=(y_ext[0], y_ext[1], z_ext[0], z_ext[1]),
        aspect="auto",
        interpolation="nearest",
    )
    ax_yz.set_xlabel("y (µm)")
    ax_yz.set_title("YZ section through the bead")
    ax_yz.tick_params(labelleft=False)
    cb = top.colorbar(im, ax=[ax_xz, ax_yz], location="right", shrink=0.9, pad=0.01)
    cb.set_label("fraction of bead signal per pixel (log)")

    ax_int = top.add_subplot(gs[0, 2])
    flat = psf.reshape(nz, -1)
    ax_int.semilogy(z, flat.sum(axis=1), "o-", ms=3, label="integrated (window)")
    ax_int.semilogy(z, np.clip(flat.max(axis=1), 1e-12, None), "s-", ms=3, label="peak pixel")
    ax_int.set_xlabel("z, defocus (µm)")
    ax_int.set_ylabel("intensity (fraction of bead signal)")
    ax_int.set_title("Photometry vs z")
    ax_int.grid(True, which="both", alpha=0.3)
    ax_int.legend(loc="lower left", fontsize=8)
    xs = cal.extra.get("bead_x_per_slice_px")
    ys = cal.extra.get("bead_y_per_slice_px")
    if isinstance(xs, np.ndarray) and isinstance(ys, np.ndarray) and xs.size == nz:
        ax_d = ax_int.twinx()
        dx, dy = cal.extra.get("drift_x_px"), cal.extra.get("drift_y_px")
        drift = (
            (dx, dy)
            if isinstance(dx, np.ndarray) and isinstance(dy, np.ndarray) and dx.size == nz
            else None
        )
        # re-centred on the first slice's drift where it is stored (its centre otherwise):
        # the dots are the centres found, the line the drift removed
        x0, y0 = (float(xs[0]), float(ys[0])) if drift is None else (drift[0][0], drift[1][0])
        ax_d.plot(z, (xs - x0) * px, ".", ms=3, color="tab:green", label="bead x, found")
        ax_d.plot(z, (ys - y0) * px, ".", ms=3, color="tab:red", label="bead y, found")
        if drift is not None:
            dx, dy = drift
            ax_d.plot(z, (dx - x0) * px, "-", color="tab:green", label="x drift removed")
            ax_d.plot(z, (dy - y0) * px, "-", color="tab:red", label="y drift removed")
        ax_d.set_ylabel("lateral drift, re-centred (µm)")
        ax_d.legend(loc="center right", fontsize=8)

    picks = np.unique(np.linspace(0, nz - 1, 6).round().astype(int))
    axes = middle.subplots(1, len(picks), squeeze=False)[0]
    for i, k in enumerate(picks):
        ax = axes[i]
        ax.imshow(
            np.clip(psf[k], vmin, None),
            norm=norm,
            cmap=cmap,
            extent=(x_ext[0], x_ext[1], y_ext[1], y_ext[0]),
            interpolation="nearest",
        )
        ax.set_title(f"z = {z[k]:g} µm", fontsize=10)
        ax.set_xlabel("x (µm)")
        if i == 0:
            ax.set_ylabel("y (µm)")
        else:
            ax.tick_params(labelleft=False)
    middle.suptitle("slices at several depths (common log scale; bead centred on the window)")

    ax_t = bottom.add_subplot(1, 1, 1)
    ax_t.axis("off")
    ax_t.text(
        0.0,
        1.0,
        summary(cal),
        va="top",
        ha="left",
        family="monospace",
        fontsize=9,
        transform=ax_t.transAxes,
    )
    n = cal.noise
    gain = "n/a" if math.isnan(n.gain_e_per_adu) else f"{n.gain_e_per_adu:.3g} e⁻/ADU"
    fig.suptitle(
        f"focaltrack calibration — {nz} slices, {w}×{h} px at {px:g} µm/px — noise: offset "
        f"{n.offset_adu:.1f} ADU, read {n.read_noise_adu:.2f} ADU, gain {gain}",
        fontsize=12,
    )
    # format= given: matplotlib would otherwise read the format off the temporary's suffix.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    return path

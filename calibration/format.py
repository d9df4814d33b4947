"""The calibration file: the PSF measured from one bead, its noise model, and the HDF5 format.

File layout (schema version 1), one HDF5 file per calibration:

- dataset ``psf`` float32 (Z, H, W): background-subtracted, laterally centred bead images.
  One common scale for all slices (photometry is consistent across z): the stack is
  divided by the integrated intensity of its brightest-integral slice, so values are
  "fraction of the bead's total detected signal" and a slice's sum falls with defocus
  only where light leaves the window.
- dataset ``z_um`` float64 (Z,): defocus of each slice, ascending from 0 (the focal plane).
  Convention: the slice acquired with the focus drive moved by +d from the bead's focus
  has z = +d; an emitter whose image looks like that slice has z_um = +d and would come
  into focus if the focus drive moved by -d.
- attributes: ``schema_version`` (int), ``pixel_size_um``, ``z_step_um``, ``source``,
  ``noise_offset_adu``, ``noise_read_noise_adu``, ``noise_gain_e_per_adu`` (NaN when it
  could not be estimated), ``bead_x_px``, ``bead_y_px`` (bead centre in the original
  frame, focal slice), ``crop_y0``, ``crop_x0``, ``crop_h``, ``crop_w``, ``n_averages``,
  ``bit_depth``, ``bead_signal_adu`` (integrated background-free signal of the brightest
  slice, ADU), ``background_adu`` (mean background, ADU), ``created_utc``,
  ``focaltrack_version``.
- ``extra_*`` attributes (`Calibration.extra`, optional, scalars or 1-D arrays; readers
  must not require them). `process_stack` writes ``extra_centre_x_px`` and
  ``extra_centre_y_px`` (see Centring), ``extra_focus_index`` (slice with the
  highest bead peak; 0 when the stack starts in focus), ``extra_bead_snr``,
  ``extra_bead_x_per_slice_px`` / ``extra_bead_y_per_slice_px`` (Z,) (the bead centre found
  in each slice of the original frames), ``extra_drift_x_px`` / ``extra_drift_y_px`` (Z,)
  (the lateral drift removed: the smooth curve under those centres,
  `focaltrack.calibration.drift.smooth_drift`), ``extra_pupil_*`` (a fitted pupil,
  `focaltrack.calibration.pupil`: added by ``focaltrack train`` to the model bundle's copy),
  ``extra_background_per_slice_adu`` (Z,); an acquisition adds ``extra_z_readback_um``
  (Z,), ``extra_z_readback_max_dev_um``, ``extra_z_start_um``, ``extra_exposure_ms``,
  ``extra_settle_s``, ``extra_camera``, ``extra_focus_device``, ``extra_acquisition_s``;
  an import adds ``extra_input_dtype``.

Centring: in every slice the bead sits in the centre pixel (H//2, W//2) (row, column) of
the ``psf`` window, at the same sub-pixel position: exactly `Calibration.centre_px`
(attributes ``extra_centre_x_px``, ``extra_centre_y_px``; within ±0.5 px of the centre
pixel). The focal slice is cut at whole pixels (an in-focus PSF is undersampled, and a
sub-pixel shift of it would distort it); every other slice is shifted sub-pixel (cubic
spline) by the lateral drift relative to the focal slice. The training synthesizer places an
emitter at (x, y) by putting `Calibration.centre_px` on (x, y).

Noise model (single frames, ADU): a pixel whose mean is ``μ`` has variance
``read_noise² + (μ − offset) / gain``; see `focaltrack.calibration.noise.estimate_noise` for
how each number is found. With background light in the sample, ``offset`` and
``read_noise`` are those of an empty pixel of the calibration frames (camera offset +
background, read + background shot noise), which is what a synthetic image needs to look
like the real ones.

Processing (`focaltrack.calibration.process.process_stack`): find the bead
(`focaltrack.calibration.beads.find_bead`: brightest isolated spot of the maximum
projection; refuses no bead, overlapping beads, a bead at the frame edge), refuse a
saturated bead (raw ADU against ``2**bit_depth − 1``), subtract each slice's background
(median of the full frame outside the bead's window), follow the bead through the slices
(`focaltrack.calibration.drift.track_bead`: stage drift), cut the window around it, and
scale the whole stack by one number (`Calibration` above).
`focaltrack.calibration.importing.load_stack_file` imports z-stacks recorded elsewhere.

Writes are atomic: a file appears at its final path only when complete.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from focaltrack.common.errors import FocaltrackError
from focaltrack.common.files import atomic_path
from focaltrack.common.version import __version__

__all__ = ["SCHEMA_VERSION", "Calibration", "CalibrationError", "NoiseModel", "summary"]

SCHEMA_VERSION = 1


class CalibrationError(FocaltrackError, ValueError):
    """A calibration that cannot be made or read: the message names the problem."""


@dataclass(frozen=True, slots=True)
class NoiseModel:
    """Camera noise estimated from the calibration frames, in ADU."""

    offset_adu: float
    read_noise_adu: float
    gain_e_per_adu: float = math.nan  # NaN: not estimated


@dataclass(frozen=True)
class Calibration:
    psf: np.ndarray  # float32 (Z, H, W)
    z_um: np.ndarray  # float64 (Z,), ascending
    pixel_size_um: float
    noise: NoiseModel
    source: str = "unknown"
    bead_xy_px: tuple[float, float] = (math.nan, math.nan)
    crop_box: tuple[int, int, int, int] = (0, 0, 0, 0)  # y0, x0, h, w in the original frame
    n_averages: int = 1
    bit_depth: int = 16
    bead_signal_adu: float = math.nan
    background_adu: float = math.nan
    created_utc: str = ""
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        psf = np.asarray(self.psf)
        z = np.asarray(self.z_um, dtype=np.float64)
        if psf.ndim != 3:
            raise CalibrationError(f"psf must be (Z, H, W), got shape {psf.shape}")
        if z.shape != (psf.shape[0],):
            raise CalibrationError(f"z_um has {z.shape} entries for {psf.shape[0]} PSF slices")
        if psf.shape[0] < 3:
            raise CalibrationError(f"a calibration needs at least 3 slices, got {psf.shape[0]}")
        if not np.all(np.diff(z) > 0):
            raise CalibrationError("z_um must be strictly ascending")
        if not (self.pixel_size_um > 0):
            raise CalibrationError(f"pixel size must be positive, got {self.pixel_size_um}")
        if not np.all(np.isfinite(psf)):
            raise CalibrationError("psf contains NaN or infinite values")
        object.__setattr__(self, "psf", psf.astype(np.float32, copy=False))
        object.__setattr__(self, "z_um", z)

    @property
    def z_step_um(self) -> float:
        return float(np.median(np.diff(self.z_um)))

    @property
    def window_px(self) -> tuple[int, int]:
        return int(self.psf.shape[1]), int(self.psf.shape[2])

    @property
    def centre_px(self) -> tuple[float, float]:
        """The bead's position (x = column, y = row) in the ``psf`` window, every slice.

        Within the centre pixel (W//2, H//2) ± 0.5; exactly as measured in the focal slice
        (``extra_centre_x_px``, ``extra_centre_y_px``), (W//2, H//2) for files without them.
        """
        h, w = self.psf.shape[1:]
        x = self.extra.get("centre_x_px", w // 2)
        y = self.extra.get("centre_y_px", h // 2)
        return float(x), float(y)  # type: ignore[arg-type]

    @property
    def sha256(self) -> str:
        """Content hash: what a model bundle records to name its calibration."""
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(self.psf).tobytes())
        h.update(np.ascontiguousarray(self.z_um).tobytes())
        h.update(repr(round(self.pixel_size_um, 9)).encode())
        return h.hexdigest()

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically: a temporary file beside the target, renamed when complete."""
        import h5py

        path = Path(path)
        if not path.parent.is_dir():
            raise CalibrationError(f"output directory {path.parent} does not exist")
        # The default mode is a plain open()'s (umask applies): a calibration is for the whole
        # lab, not private to whoever ran it.
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
            f.create_dataset("psf", data=self.psf, compression="gzip", compression_opts=4)
            f.create_dataset("z_um", data=self.z_um)
            a = f.attrs
            a["schema_version"] = SCHEMA_VERSION
            a["kind"] = "focaltrack.calibration"
            a["pixel_size_um"] = float(self.pixel_size_um)
            a["z_step_um"] = self.z_step_um
            a["source"] = self.source
            a["noise_offset_adu"] = float(self.noise.offset_adu)
            a["noise_read_noise_adu"] = float(self.noise.read_noise_adu)
            a["noise_gain_e_per_adu"] = float(self.noise.gain_e_per_adu)
            a["bead_x_px"], a["bead_y_px"] = (float(v) for v in self.bead_xy_px)
            a["crop_y0"], a["crop_x0"], a["crop_h"], a["crop_w"] = (int(v) for v in self.crop_box)
            a["n_averages"] = int(self.n_averages)
            a["bit_depth"] = int(self.bit_depth)
            a["bead_signal_adu"] = float(self.bead_signal_adu)
            a["background_adu"] = float(self.background_adu)
            a["created_utc"] = self.created_utc
            a["sha256"] = self.sha256
            a["focaltrack_version"] = __version__
            for k, v in self.extra.items():
                a[f"extra_{k}"] = v
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Calibration:
        import h5py

        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"calibration file {path} does not exist")
        try:
            f = h5py.File(path, "r")
        except OSError as e:
            raise CalibrationError(f"{path} is not a readable HDF5 file: {e}") from e
        with f:
            a = f.attrs
            if a.get("kind") != "focaltrack.calibration" or "psf" not in f or "z_um" not in f:
                raise CalibrationError(f"{path} is not a focaltrack calibration file")
            version = int(a.get("schema_version", -1))
            if version != SCHEMA_VERSION:
                raise CalibrationError(
                    f"{path} has calibration schema version {version}; this focaltrack "
                    f"reads version {SCHEMA_VERSION}"
                )
            extra = {
                k[len("extra_") :]: _attr_value(v) for k, v in a.items() if k.startswith("extra_")
            }
            return cls(
                psf=f["psf"][()],
                z_um=f["z_um"][()],
                pixel_size_um=float(a["pixel_size_um"]),
                noise=NoiseModel(
                    offset_adu=float(a["noise_offset_adu"]),
                    read_noise_adu=float(a["noise_read_noise_adu"]),
                    gain_e_per_adu=float(a["noise_gain_e_per_adu"]),
                ),
                source=str(a["source"]),
                bead_xy_px=(float(a["bead_x_px"]), float(a["bead_y_px"])),
                crop_box=(
                    int(a["crop_y0"]),
                    int(a["crop_x0"]),
                    int(a["crop_h"]),
                    int(a["crop_w"]),
                ),
                n_averages=int(a["n_averages"]),
                bit_depth=int(a["bit_depth"]),
                bead_signal_adu=float(a["bead_signal_adu"]),
                background_adu=float(a["background_adu"]),
                created_utc=str(a["created_utc"]),
                extra=extra,
            )


def _attr_value(v: object) -> object:
    """An HDF5 attribute as a plain Python value (scalars unwrapped, arrays kept)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode()
    return v


def summary(cal: Calibration) -> str:
    """A few lines a microscopist reads to judge a calibration."""
    z = cal.z_um
    psf = cal.psf
    integ = psf.reshape(psf.shape[0], -1).sum(axis=1)
    peak = psf.reshape(psf.shape[0], -1).max(axis=1)
    n = cal.noise
    gain = "not estimated" if math.isnan(n.gain_e_per_adu) else f"{n.gain_e_per_adu:.3g} e⁻/ADU"
    lines = [
        f"source:      {cal.source}",
        f"slices:      {psf.shape[0]}, z {z[0]:g} … {z[-1]:g} µm in {cal.z_step_um:g} µm steps",
        f"window:      {psf.shape[2]}×{psf.shape[1]} px at {cal.pixel_size_um:g} µm/px "
        f"({psf.shape[2] * cal.pixel_size_um:.1f} µm wide), crop box y0={cal.crop_box[0]} "
        f"x0={cal.crop_box[1]}",
        f"bead:        x={cal.bead_xy_px[0]:.2f} px, y={cal.bead_xy_px[1]:.2f} px "
        f"(focal slice), signal {cal.bead_signal_adu:.4g} ADU, background "
        f"{cal.background_adu:.1f} ADU",
        f"noise model: offset {n.offset_adu:.1f} ADU, read noise {n.read_noise_adu:.2f} ADU, "
        f"gain {gain}",
        f"photometry:  integral at last slice {integ[-1] / integ.max():.0%} of max, "
        f"peak falls {peak[0] / max(float(peak[-1]), 1e-12):.3g}× from first to last slice",
        f"frames:      {cal.n_averages} averaged per slice, {cal.bit_depth}-bit camera",
    ]
    xs, ys = cal.extra.get("drift_x_px"), cal.extra.get("drift_y_px")
    if not isinstance(xs, np.ndarray):  # files from before the smooth drift: the centres
        xs, ys = cal.extra.get("bead_x_per_slice_px"), cal.extra.get("bead_y_per_slice_px")
    if isinstance(xs, np.ndarray) and isinstance(ys, np.ndarray) and xs.size == psf.shape[0]:
        drift = float(np.hypot(xs - xs[0], ys - ys[0]).max())
        lines.append(f"drift:       bead moved up to {drift:.2f} px laterally over the stack")
    from focaltrack.calibration.pupil import PupilFit, describe

    fit = PupilFit.from_extra(cal.extra)
    if fit is not None:
        lines.append(f"model:       {describe(fit)}")
    if cal.created_utc:
        lines.append(f"created:     {cal.created_utc}")
    return "\n".join(lines)

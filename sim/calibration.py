"""Focal-stack calibrations: the PSF measured from one bead, and its HDF5 file format.

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
  in each slice of the original frames: the lateral drift that was removed),
  ``extra_background_per_slice_adu`` (Z,); an acquisition adds ``extra_z_readback_um``
  (Z,), ``extra_z_readback_max_dev_um``, ``extra_z_start_um``, ``extra_exposure_ms``,
  ``extra_settle_s``, ``extra_camera``, ``extra_focus_device``, ``extra_acquisition_s``;
  an import adds ``extra_input_dtype``.

Centring: in every slice the bead sits in the centre pixel (H//2, W//2) (row, column) of
the ``psf`` window, at the same sub-pixel position: exactly `Calibration.centre_px`
(attributes ``extra_centre_x_px``, ``extra_centre_y_px``; within ±0.5 px of the centre
pixel). The focal slice is cut at whole pixels (an in-focus PSF is undersampled, and a
sub-pixel shift of it would distort it); every other slice is shifted sub-pixel (cubic
spline) by its lateral drift relative to the focal slice. The training synthesizer places an
emitter at (x, y) by putting `Calibration.centre_px` on (x, y).

Noise model (single frames, ADU): a pixel whose mean is ``μ`` has variance
``read_noise² + (μ − offset) / gain``; see `estimate_noise` for how each number is found.
With background light in the sample, ``offset`` and ``read_noise`` are those of an empty
pixel of the calibration frames (camera offset + background, read + background shot
noise), which is what a synthetic image needs to look like the real ones.

Processing (`process_stack`): find the bead (`find_bead`: brightest isolated spot of the
maximum projection; refuses no bead, overlapping beads, a bead at the frame edge), refuse
a saturated bead (raw ADU against ``2**bit_depth − 1``), subtract each slice's background
(median of the full frame outside the bead's window), follow the bead through the slices
(`track_bead`: stage drift), cut the window around it, and scale the whole stack by one
number (`Calibration` above). `load_stack_file` imports z-stacks recorded elsewhere.

Writes are atomic: a file appears at its final path only when complete.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path

import numpy as np

from focaltrack.common.errors import FocaltrackError
from focaltrack.common.version import __version__

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
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            with h5py.File(tmp, "w") as f:
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
                a["crop_y0"], a["crop_x0"], a["crop_h"], a["crop_w"] = (
                    int(v) for v in self.crop_box
                )
                a["n_averages"] = int(self.n_averages)
                a["bit_depth"] = int(self.bit_depth)
                a["bead_signal_adu"] = float(self.bead_signal_adu)
                a["background_adu"] = float(self.background_adu)
                a["created_utc"] = self.created_utc
                a["sha256"] = self.sha256
                a["focaltrack_version"] = __version__
                for k, v in self.extra.items():
                    a[f"extra_{k}"] = v  # type: ignore[assignment]
            # mkstemp makes 0600 files; a calibration is for the whole lab (umask applies).
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
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


# --------------------------------------------------------------------------------------
# Reading a z-stack recorded elsewhere
# --------------------------------------------------------------------------------------

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def load_stack_file(path: str | os.PathLike[str], dataset: str | None = None) -> np.ndarray:
    """Read a bead z-stack (Z, H, W) from a multi-page TIFF or an HDF5 file.

    The pixels come back in the file's own dtype (uint16 for a camera), so saturation can
    be checked against the camera's full scale. Slices are in file order: the first slice
    is taken as the focal plane, z ascending.

    TIFF: the first image series (Micro-Manager, ImageJ, OME and plain multi-page files);
    singleton axes are dropped, and exactly one non-spatial axis may remain (the z axis).
    HDF5: the dataset named by ``dataset``, or else the file's only 3-D dataset.
    """
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"stack file {path} does not exist")
    if path.is_dir():
        raise CalibrationError(f"stack file {path} is a directory, not a file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(8)
    except OSError as e:
        raise CalibrationError(f"stack file {path} cannot be read: {e.strerror or e}") from e
    if magic.startswith(_HDF5_MAGIC):
        stack = _load_hdf5_stack(path, dataset)
    elif magic[:4] in _TIFF_MAGIC:
        if dataset is not None:
            raise CalibrationError(f"--dataset applies to HDF5 files; {path} is a TIFF")
        stack = _load_tiff_stack(path)
    else:
        raise CalibrationError(
            f"{path} is neither a TIFF nor an HDF5 file (unrecognised content); "
            "give a multi-page TIFF z-stack or an HDF5 file with a 3-D dataset"
        )
    return _check_stack(stack, str(path))


def _check_stack(stack: np.ndarray, what: str) -> np.ndarray:
    if stack.ndim != 3:
        raise CalibrationError(f"{what} is not a z-stack: expected (Z, H, W), got {stack.shape}")
    if not (np.issubdtype(stack.dtype, np.integer) or np.issubdtype(stack.dtype, np.floating)):
        raise CalibrationError(f"{what} has pixels of type {stack.dtype}, not numbers")
    if stack.shape[0] < 3:
        raise CalibrationError(
            f"{what} has {stack.shape[0]} slice(s); a focal-stack calibration needs at least 3"
        )
    if stack.shape[1] < 16 or stack.shape[2] < 16:
        raise CalibrationError(f"{what} has tiny {stack.shape[1]}×{stack.shape[2]} px slices")
    if np.issubdtype(stack.dtype, np.floating) and not np.all(np.isfinite(stack)):
        raise CalibrationError(f"{what} contains NaN or infinite pixels")
    return stack


def _load_tiff_stack(path: Path) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = series.axes
            data = series.asarray()
    except Exception as e:  # tifffile raises many types for damaged files
        raise CalibrationError(f"{path} is not a readable TIFF: {e}") from e
    if "S" in axes and data.shape[axes.index("S")] > 1:
        raise CalibrationError(
            f"{path} is a colour (RGB) image with axes {axes}, not a grayscale camera z-stack"
        )
    keep = [i for i, n in enumerate(data.shape) if n > 1 or axes[i] in "YX"]
    squeezed_axes = "".join(axes[i] for i in keep)
    data = data.reshape([data.shape[i] for i in keep])
    if data.ndim == 2:
        raise CalibrationError(
            f"{path} holds a single {data.shape[0]}×{data.shape[1]} image, not a z-stack; "
            "save the focal stack as a multi-page TIFF"
        )
    if data.ndim != 3:
        raise CalibrationError(
            f"{path} is not a single z-stack: its axes are {squeezed_axes} "
            f"(shape {data.shape}); export one z-stack of one channel and one time point"
        )
    return data


def _load_hdf5_stack(path: Path, dataset: str | None) -> np.ndarray:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CalibrationError(f"{path} is not a readable HDF5 file: {e}") from e
    with f:
        if dataset is not None:
            obj = f.get(dataset)
            if not isinstance(obj, h5py.Dataset):
                raise CalibrationError(f"{path} has no dataset named {dataset!r}")
            if obj.ndim != 3:
                raise CalibrationError(
                    f"dataset {dataset!r} in {path} is not a z-stack: shape {obj.shape}"
                )
            return np.asarray(obj[()])
        found: list[str] = []

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset) and obj.ndim == 3:
                found.append(name)

        f.visititems(visit)
        if not found:
            raise CalibrationError(f"{path} contains no 3-D dataset (Z, H, W) to use as a z-stack")
        if len(found) > 1:
            raise CalibrationError(
                f"{path} contains several 3-D datasets ({', '.join(found)}); "
                "name one with --dataset"
            )
        return np.asarray(f[found[0]][()])


# --------------------------------------------------------------------------------------
# Finding the bead
# --------------------------------------------------------------------------------------

#: A spot counts as a bead when its peak in the smoothed maximum projection stands this
#: many (robust) standard deviations above the projection's background.
MIN_BEAD_SNR = 10.0
#: A second spot inside the crop window that is at least this fraction of the bead's
#: peak (background subtracted, smoothed maximum projection) means overlapping beads.
OVERLAP_FRACTION = 0.1


@dataclass(frozen=True, slots=True)
class BeadLocation:
    """Where the bead is: sub-pixel centre in the focal slice, in frame pixels."""

    x_px: float
    y_px: float
    focus_index: int  # slice where the bead's peak is highest
    snr: float  # peak over background noise in the smoothed maximum projection
    peak_adu: float  # background-subtracted peak of the smoothed maximum projection


def _robust_sigma(values: np.ndarray) -> float:
    v = np.asarray(values, dtype=np.float64).ravel()
    med = np.median(v)
    return float(1.4826 * np.median(np.abs(v - med)))


def find_bead(
    stack: np.ndarray,
    *,
    window_px: int = 128,
    min_snr: float = MIN_BEAD_SNR,
    overlap_fraction: float = OVERLAP_FRACTION,
) -> BeadLocation:
    """Find the calibration bead: the brightest isolated spot of the maximum projection.

    The projection over z is smoothed (Gaussian, σ = 1 px) and its local maxima (5×5
    neighbourhood) standing ``min_snr`` robust standard deviations above the projection's
    median are the candidate spots. A candidate is *isolated* when no other candidate
    inside its crop window (``window_px`` square centred on it) reaches ``overlap_fraction``
    of its peak and its window lies inside the frame. The brightest isolated candidate is
    the bead. Raises `CalibrationError` for a stack with no bead, with overlapping beads
    (no isolated candidate), or whose only beads sit too close to the frame edge.
    """
    from scipy import ndimage

    stack = np.asarray(stack)
    _, h, w = stack.shape
    proj = ndimage.gaussian_filter(stack.max(axis=0).astype(np.float64), 1.0)
    background = float(np.median(proj))
    sigma = _robust_sigma(proj)
    amp = proj - background
    peak = float(amp.max())
    floor = 1e-9 * max(abs(background), abs(peak), 1.0)
    snr = peak / max(sigma, floor)
    if not snr >= min_snr:
        raise CalibrationError(
            f"no bead found: the brightest spot in the stack's maximum projection is only "
            f"{snr:.1f}× the background noise (a bead needs ≥ {min_snr:g}); check that the "
            "bead is in the field of view, in focus at the first slice, and illuminated"
        )
    is_max = (proj == ndimage.maximum_filter(proj, size=5)) & (amp >= min_snr * max(sigma, floor))
    ys, xs = np.nonzero(is_max)
    order = np.argsort(amp[ys, xs])[::-1][:200]
    cands = [(int(ys[i]), int(xs[i]), float(amp[ys[i], xs[i]])) for i in order]
    # Merge plateau duplicates (flat saturated tops give several equal maxima).
    merged: list[tuple[int, int, float]] = []
    for c in cands:
        if all(max(abs(c[0] - m[0]), abs(c[1] - m[1])) > 3 for m in merged):
            merged.append(c)
    half = window_px // 2
    first_conflict: tuple[tuple[int, int, float], tuple[int, int, float]] | None = None
    edge_skipped: tuple[int, int, float] | None = None
    for cy, cx, a in merged:
        rivals = [
            o
            for o in merged
            if o != (cy, cx, a)
            and max(abs(o[0] - cy), abs(o[1] - cx)) <= half
            and o[2] >= overlap_fraction * a
        ]
        if rivals:
            first_conflict = first_conflict or ((cy, cx, a), rivals[0])
            continue
        if cy - half < 0 or cx - half < 0 or cy - half + window_px > h or cx - half + window_px > w:
            edge_skipped = edge_skipped or (cy, cx, a)
            continue
        return _refine_bead(stack, cy, cx, snr=a / max(sigma, floor), peak=a, background=background)
    if first_conflict is not None:
        (y1, x1, a1), (y2, x2, a2) = first_conflict
        dist = math.hypot(x2 - x1, y2 - y1)
        raise CalibrationError(
            f"two overlapping beads: spots at (x={x1}, y={y1}) and (x={x2}, y={y2}) px are "
            f"{dist:.0f} px apart, inside one {window_px} px calibration window (the weaker "
            f"is {a2 / a1:.0%} of the brighter); move to a single isolated bead"
        )
    assert edge_skipped is not None
    y1, x1, _ = edge_skipped
    raise CalibrationError(
        f"the bead at (x={x1}, y={y1}) px is too close to the frame edge for a "
        f"{window_px}×{window_px} px window in a {w}×{h} px frame; centre the bead or use a "
        "smaller --window"
    )


def _refine_bead(
    stack: np.ndarray, cy: int, cx: int, *, snr: float, peak: float, background: float
) -> BeadLocation:
    from scipy import ndimage

    r = 3
    y0, y1 = max(cy - r, 0), min(cy + r + 1, stack.shape[1])
    x0, x1 = max(cx - r, 0), min(cx + r + 1, stack.shape[2])
    local = ndimage.gaussian_filter(stack[:, y0:y1, x0:x1].astype(np.float64), (0, 1, 1))
    focus = int(np.argmax(local.reshape(local.shape[0], -1).max(axis=1)))
    img = stack[focus].astype(np.float64)
    bg = float(np.median(img))
    y, x = _centroid(img - bg, float(cy), float(cx), radius=4, threshold_frac=0.2)
    return BeadLocation(x_px=x, y_px=y, focus_index=focus, snr=float(snr), peak_adu=float(peak))


def _centroid(
    img: np.ndarray,
    y: float,
    x: float,
    *,
    radius: int,
    threshold_frac: float = 0.1,
    threshold_abs: float = 0.0,
    iterations: int = 4,
) -> tuple[float, float]:
    """Iterated thresholded centroid in a (2r+1)² box; pixels outside the frame ignored."""
    h, w = img.shape
    for _ in range(iterations):
        iy, ix = round(y), round(x)
        y0, y1 = max(iy - radius, 0), min(iy + radius + 1, h)
        x0, x1 = max(ix - radius, 0), min(ix + radius + 1, w)
        box = img[y0:y1, x0:x1]
        t = max(threshold_abs, threshold_frac * float(box.max()))
        wts = np.clip(box - t, 0.0, None)
        total = float(wts.sum())
        if not total > 0:
            break
        gy, gx = np.mgrid[y0:y1, x0:x1]
        ny, nx = float((wts * gy).sum() / total), float((wts * gx).sum() / total)
        done = abs(ny - y) < 1e-3 and abs(nx - x) < 1e-3
        y, x = ny, nx
        if done:
            break
    return y, x


# --------------------------------------------------------------------------------------
# Background, noise model
# --------------------------------------------------------------------------------------


def background_mask(
    shape: tuple[int, int],
    y: float,
    x: float,
    window_px: int,
    *,
    min_pixels: int = 2000,
    max_pixels: int = 100_000,
) -> np.ndarray:
    """Pixels of the full frame far enough from the bead to measure background on.

    The exclusion radius is the first of 0.75, 0.6, 0.5 × the window that leaves at least
    ``min_pixels`` pixels (at 100 µm defocus the bead's image reaches ~55 px from its
    centre, so the frame outside the crop window is the safe place to look). Large frames
    keep every n-th row only (whole rows, so horizontal neighbours stay together), about
    ``max_pixels`` pixels: plenty for a median, and memory stays small for a full sCMOS
    frame.
    """
    h, w = shape
    yy, xx = np.ogrid[:h, :w]
    r2 = (yy - y) ** 2 + (xx - x) ** 2
    mask = np.zeros(shape, dtype=bool)
    for frac in (0.75, 0.6, 0.5):
        mask = r2 > (frac * window_px) ** 2
        n = int(mask.sum())
        if n >= min_pixels:
            if n > max_pixels:
                mask &= (np.arange(h) % math.ceil(n / max_pixels) == 0)[:, None]
            return mask
    if int(mask.sum()) < 200:
        raise CalibrationError(
            f"the {w}×{h} px frame leaves too few pixels outside the bead's "
            f"{window_px} px window to measure the background; record a larger field of view "
            "or use a smaller --window"
        )
    return mask


def estimate_noise(
    mean_stack: np.ndarray,
    *,
    mask: np.ndarray,
    var_stack: np.ndarray | None = None,
    n_averages: int = 1,
    signal_box: tuple[int, int, int, int] | None = None,
    saturation_adu: float | None = None,
) -> NoiseModel:
    """The camera noise model, in ADU, measured from the calibration frames themselves.

    Model (single frames): a pixel with mean ``μ`` ADU has variance
    ``read_noise² + (μ − offset) / gain``, with ``gain`` in e⁻/ADU.

    - ``offset_adu``: median of the background pixels (``mask``), median over slices: the
      level an empty pixel reads (camera offset plus any uniform background light).
    - ``read_noise_adu``: the noise of such an empty pixel in one frame. With
      ``var_stack`` (per-pixel temporal variance over the frames averaged at each step):
      the mean temporal variance of the background pixels (those above 50× the median
      variance left out: hot pixels, other beads), square-rooted. Without it: a spatial
      high-pass — the robust spread of horizontal neighbour differences over background
      pixels, ÷√2, times
      √``n_averages`` (the stack holds averages of that many frames).
    - ``gain_e_per_adu``: photon transfer, with ``var_stack`` only (else NaN): over the
      pixels of ``signal_box`` (y0, x0, h, w; the bead's window) in every slice, binned by
      the brightness of their neighbours (`_photon_transfer_gain`), the slope of variance
      against ``μ − offset`` (intercept fixed at ``read_noise²``) is 1/gain. NaN when the
      bead is too faint for shot noise to show.
    """
    mean_stack = np.asarray(mean_stack)
    z = mean_stack.shape[0]
    bg = mean_stack[:, mask].astype(np.float64)  # (Z, N)
    offset = float(np.median(np.median(bg, axis=1)))
    if var_stack is not None:
        # Mean (unbiased whatever the distribution and the ADU quantisation) of the pixels
        # whose variance is below 50× the median: hot pixels and other beads are left out,
        # while a χ² variance over ≥ 2 frames exceeds that only with probability < 1e-5.
        v = np.asarray(var_stack)[:, mask].astype(np.float64).ravel()
        med = float(np.median(v))
        if med > 0:
            v = v[v < 50.0 * med]
        read = float(np.sqrt(max(float(v.mean()), 0.0)))
    else:
        both = mask[:, 1:] & mask[:, :-1]
        sig = []
        for k in range(z):
            img = mean_stack[k].astype(np.float64)
            d = (img[:, 1:] - img[:, :-1])[both]
            sig.append(_robust_sigma(d) / math.sqrt(2.0))
        read = float(np.median(sig)) * math.sqrt(max(n_averages, 1))
    gain = math.nan
    if var_stack is not None and signal_box is not None:
        gain = _photon_transfer_gain(
            mean_stack, np.asarray(var_stack), signal_box, offset, read, saturation_adu
        )
    return NoiseModel(offset_adu=offset, read_noise_adu=read, gain_e_per_adu=gain)


def _photon_transfer_gain(
    mean_stack: np.ndarray,
    var_stack: np.ndarray,
    box: tuple[int, int, int, int],
    offset: float,
    read: float,
    saturation_adu: float | None,
) -> float:
    """1/slope of temporal variance against mean signal over the bead's pixels.

    Pixels are binned by the mean of their 8 neighbours, not by their own mean: binning by
    a pixel's own noisy mean would put pixels with upward noise into the bright bins
    (regression dilution) and flatten the slope. The neighbours' noise is independent of
    the pixel's, so each bin's average mean and average variance are unbiased, and the
    linear model holds for the bin averages exactly.
    """
    from scipy import ndimage

    y0, x0, h, w = box
    y0, x0 = max(y0, 0), max(x0, 0)
    m = mean_stack[:, y0 : y0 + h, x0 : x0 + w].astype(np.float64)
    nb = (ndimage.uniform_filter(m, size=(1, 3, 3), mode="nearest") * 9.0 - m) / 8.0
    mu = m.ravel() - offset
    key = nb.ravel() - offset
    var = var_stack[:, y0 : y0 + h, x0 : x0 + w].astype(np.float64).ravel()
    keep = key > 3.0 * max(read, 1e-9)
    if saturation_adu is not None:
        keep &= m.ravel() < 0.9 * saturation_adu
    mu, var, key = mu[keep], var[keep], key[keep]
    if mu.size < 200:
        return math.nan
    edges = np.quantile(key, np.linspace(0.0, 1.0, 21))
    idx = np.clip(np.searchsorted(edges, key, side="right") - 1, 0, 19)
    counts = np.bincount(idx, minlength=20).astype(np.float64)
    ok = counts >= 10
    mb = np.bincount(idx, weights=mu, minlength=20)[ok] / counts[ok]
    vb = np.bincount(idx, weights=var, minlength=20)[ok] / counts[ok] - read**2
    # Weighted least squares through the origin; weights from the model's variance (not
    # the measured one, which would favour bins whose variance came out low by chance).
    slope = float((counts[ok] * mb * vb).sum() / (counts[ok] * mb * mb).sum())
    for _ in range(3):
        wts = counts[ok] / np.maximum(read**2 + max(slope, 0.0) * mb, 1e-12) ** 2
        slope = float((wts * mb * vb).sum() / (wts * mb * mb).sum())
    if not slope > 0 or slope * float(mb.max()) < 0.5 * read**2:
        return math.nan  # no usable shot-noise lever arm
    return 1.0 / slope


# --------------------------------------------------------------------------------------
# From a raw focal stack to a calibration
# --------------------------------------------------------------------------------------


def _crop_shifted(
    img: np.ndarray,
    cy: float,
    cx: float,
    h: int,
    w: int,
    margin: int = 4,
    background: float = 0.0,
) -> np.ndarray:
    """The (h, w) window whose pixel (h//2, w//2) is frame position (cy, cx), sub-pixel.

    Integer crop of ``img − background`` (zero outside the frame) plus a cubic-spline shift
    of the sub-pixel rest (a Fourier shift would ring along the row and column through a
    sharp near-focus peak); the crop carries a margin so the edges do not matter.
    """
    from scipy import ndimage

    iy, ix = round(cy), round(cx)
    top, left = iy - h // 2 - margin, ix - w // 2 - margin
    hh, ww = h + 2 * margin, w + 2 * margin
    out = np.zeros((hh, ww), dtype=np.float64)
    fy0, fx0 = max(top, 0), max(left, 0)
    fy1, fx1 = min(top + hh, img.shape[0]), min(left + ww, img.shape[1])
    if fy1 > fy0 and fx1 > fx0:
        out[fy0 - top : fy1 - top, fx0 - left : fx1 - left] = img[fy0:fy1, fx0:fx1]
        out[fy0 - top : fy1 - top, fx0 - left : fx1 - left] -= background
    dy, dx = iy - cy, ix - cx
    if abs(dy) > 1e-6 or abs(dx) > 1e-6:
        out = ndimage.shift(out, (dy, dx), order=3, mode="nearest")
    return out[margin : margin + h, margin : margin + w]


def track_bead(
    stack: np.ndarray,
    background: np.ndarray,
    start: BeadLocation,
    *,
    window_px: int,
    noise_sigma: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Bead centre (y, x) in every slice of ``stack`` (minus ``background[k]``): the drift.

    From the focal slice outwards, each slice's centre is the thresholded centroid of
    the Gaussian-smoothed (σ = 1.5 px) slice in a window around the neighbouring slice's
    centre (pixels above max(10 % of the local maximum, 3 σ of the smoothed noise)).
    The centroid is the centre of symmetry of a centro-symmetric PSF (defocus, spherical
    aberration, astigmatism); coma's z-dependent lateral shift is absorbed as drift.
    """
    from scipy import ndimage

    z, h, w = stack.shape
    ys = np.full(z, math.nan)
    xs = np.full(z, math.nan)
    ys[start.focus_index], xs[start.focus_index] = start.y_px, start.x_px
    radius = window_px // 2 - 2
    reach = window_px // 2 + 8  # the region smoothed around the guess
    order = list(range(start.focus_index, z)) + list(range(start.focus_index - 1, -1, -1))
    for k in order:
        if k == start.focus_index:
            prev = k
        else:
            prev = k - 1 if k > start.focus_index else k + 1
        gy, gx = ys[prev], xs[prev]
        y0, y1 = max(round(gy) - reach, 0), min(round(gy) + reach + 1, h)
        x0, x1 = max(round(gx) - reach, 0), min(round(gx) + reach + 1, w)
        region = stack[k, y0:y1, x0:x1].astype(np.float64) - float(background[k])
        sm = ndimage.gaussian_filter(region, 1.5)
        # σ of noise after a σ=1.5 px Gaussian: ≈ σ / (2√π · 1.5)
        thr = 3.0 * float(noise_sigma[k]) / (2.0 * math.sqrt(math.pi) * 1.5)
        y, x = _centroid(sm, gy - y0, gx - x0, radius=radius, threshold_frac=0.1, threshold_abs=thr)
        if k == start.focus_index:
            # The in-focus spot is small: refine in a tight box for sub-pixel accuracy.
            y, x = _centroid(sm, y, x, radius=4, threshold_frac=0.2)
        ys[k], xs[k] = y + y0, x + x0
    return ys, xs


def process_stack(
    mean_stack: np.ndarray,
    z_um: np.ndarray,
    pixel_size_um: float,
    *,
    var_stack: np.ndarray | None = None,
    max_frame: np.ndarray | None = None,
    window_px: int = 128,
    bit_depth: int = 16,
    source: str = "unknown",
    n_averages: int = 1,
    extra: dict[str, object] | None = None,
) -> Calibration:
    """Turn a raw bead focal stack (ADU) into a `Calibration`.

    ``mean_stack`` (Z, H, W): the image at each z (the mean of ``n_averages`` frames);
    ``var_stack``: their per-pixel temporal variance (enables the temporal read-noise and
    photon-transfer gain estimates); ``max_frame`` (H, W): per-pixel maximum over every
    raw frame, for the saturation check (default: the maximum over ``mean_stack``, exact
    when it holds raw frames). Steps: find the bead (`find_bead`), refuse a saturated
    bead, subtract each slice's background (median of the frame outside the bead's
    window), track the bead's centre slice by slice (`track_bead`), cut a ``window_px``
    square with the bead at `Calibration.centre_px` (in the centre pixel) in every slice
    (see the module docstring), and divide the whole stack by one number (the largest
    slice integral).
    """
    stack = np.asarray(mean_stack)
    if stack.ndim != 3:
        raise CalibrationError(f"a focal stack is (Z, H, W), got shape {stack.shape}")
    z_um = np.asarray(z_um, dtype=np.float64)
    nz, h, w = stack.shape
    if nz < 3:
        raise CalibrationError(f"a focal-stack calibration needs at least 3 slices, got {nz}")
    if z_um.shape != (nz,):
        raise CalibrationError(f"{z_um.size} z positions for {nz} slices")
    if not np.all(np.diff(z_um) > 0):
        raise CalibrationError("z positions must be strictly ascending (z step > 0)")
    if not pixel_size_um > 0:
        raise CalibrationError(f"pixel size must be positive, got {pixel_size_um}")
    if window_px < 16 or window_px > min(h, w):
        raise CalibrationError(
            f"window {window_px} px must be between 16 px and the frame size ({w}×{h} px)"
        )
    full_scale = float((1 << int(bit_depth)) - 1)
    peak_img = np.asarray(max_frame) if max_frame is not None else stack.max(axis=0)
    if peak_img.shape != (h, w):
        raise CalibrationError(f"max_frame is {peak_img.shape}, the slices are {(h, w)}")
    try:
        bead = find_bead(stack, window_px=window_px)
    except CalibrationError:
        # A saturated bead's clipped, ringed top can look like several spots: name the
        # real problem when the brightest spot is saturated.
        yb, xb = np.unravel_index(int(np.argmax(peak_img)), peak_img.shape)
        _check_saturation(peak_img, float(yb), float(xb), window_px, full_scale, bit_depth)
        raise
    _check_saturation(peak_img, bead.y_px, bead.x_px, window_px, full_scale, bit_depth)
    # Slice by slice throughout: a full-frame sCMOS stack is not copied into floats.
    mask = background_mask((h, w), bead.y_px, bead.x_px, window_px)
    bg_level = np.array([float(np.median(stack[k][mask])) for k in range(nz)])  # (Z,)
    both = mask[:, 1:] & mask[:, :-1]
    slice_sigma = np.array(
        [
            _robust_sigma(np.diff(stack[k].astype(np.float64), axis=1)[both]) / math.sqrt(2)
            for k in range(nz)
        ]
    )
    ys, xs = track_bead(stack, bg_level, bead, window_px=window_px, noise_sigma=slice_sigma)
    # Align every slice on the focal slice's bead position: the focal slice is cut at whole
    # pixels (never interpolated: in focus the PSF is undersampled), the others are shifted
    # by their drift relative to it (cubic spline). The bead sits at the same sub-pixel
    # position, within the centre pixel (H//2, W//2), in every slice.
    focus = bead.focus_index
    ry = float(ys[focus] - round(ys[focus]))
    rx = float(xs[focus] - round(xs[focus]))
    crops = np.stack(
        [
            _crop_shifted(
                stack[k], ys[k] - ry, xs[k] - rx, window_px, window_px, background=bg_level[k]
            )
            for k in range(nz)
        ]
    )
    integrals = crops.reshape(nz, -1).sum(axis=1)
    scale = float(integrals.max())
    if not scale > 0:
        raise CalibrationError("no bead signal above the background in any slice")
    noise = estimate_noise(
        stack,
        mask=mask,
        var_stack=var_stack,
        n_averages=n_averages,
        signal_box=(
            round(bead.y_px) - window_px // 2,
            round(bead.x_px) - window_px // 2,
            window_px,
            window_px,
        ),
        saturation_adu=full_scale,
    )
    info: dict[str, object] = {
        "centre_x_px": window_px // 2 + rx,
        "centre_y_px": window_px // 2 + ry,
        "focus_index": focus,
        "bead_snr": float(bead.snr),
        "bead_x_per_slice_px": xs.astype(np.float64),
        "bead_y_per_slice_px": ys.astype(np.float64),
        "background_per_slice_adu": bg_level.astype(np.float64),
    }
    info.update(extra or {})
    fy, fx = float(ys[focus]), float(xs[focus])
    return Calibration(
        psf=(crops / scale).astype(np.float32),
        z_um=z_um,
        pixel_size_um=float(pixel_size_um),
        noise=noise,
        source=source,
        bead_xy_px=(fx, fy),
        crop_box=(round(fy) - window_px // 2, round(fx) - window_px // 2, window_px, window_px),
        n_averages=int(n_averages),
        bit_depth=int(bit_depth),
        bead_signal_adu=scale,
        background_adu=float(bg_level.mean()),
        created_utc=_utc_now(),
        extra=info,
    )


def _check_saturation(
    peak_img: np.ndarray, y: float, x: float, window_px: int, full_scale: float, bit_depth: int
) -> None:
    m = 8
    y0 = max(round(y) - window_px // 2 - m, 0)
    x0 = max(round(x) - window_px // 2 - m, 0)
    region = peak_img[y0 : y0 + window_px + 2 * m, x0 : x0 + window_px + 2 * m]
    n_sat = int(np.count_nonzero(region >= full_scale))
    if n_sat:
        raise CalibrationError(
            f"the bead is saturated: {n_sat} pixel(s) near (x={x:.0f}, y={y:.0f}) reach the "
            f"{bit_depth}-bit full scale ({full_scale:.0f} ADU); lower the exposure time or "
            "the illumination and calibrate again"
        )


def _utc_now() -> str:
    from datetime import datetime

    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
    xs, ys = cal.extra.get("bead_x_per_slice_px"), cal.extra.get("bead_y_per_slice_px")
    if isinstance(xs, np.ndarray) and isinstance(ys, np.ndarray) and xs.size == psf.shape[0]:
        drift = float(np.hypot(xs - xs[0], ys - ys[0]).max())
        lines.append(f"drift:       bead moved up to {drift:.2f} px laterally over the stack")
    if cal.created_utc:
        lines.append(f"created:     {cal.created_utc}")
    return "\n".join(lines)

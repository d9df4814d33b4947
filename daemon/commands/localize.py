"""``focaltrack localize``: every emitter in every frame of a recording, with a trained model.

Inputs: a multi-page TIFF (every page a frame, in file order) or an HDF5 file (a 3-D
dataset (N, H, W): ``--dataset NAME``, or the file's only 3-D dataset; a 2-D dataset is one
frame). Output by extension: ``.csv`` (header ``frame,x_um,y_um,z_um,score``) or ``.h5``
(one 1-D dataset per column in group ``localizations`` plus attributes naming the model,
its calibration hash, pixel size and the input). ``frame`` is the 0-based index of the image
in the input. A recording of the service (HDF5 with ``frame_meta/stage_z_um``) adds a last
column ``stage_z_um``, the focus each frame was taken at, which `focaltrack track` uses to
track across focus moves as the live service does. Prints frames/s to stderr. See
docs/models.md.

Pixel size: ``--pixel-size``, else what the file states about itself
(`focaltrack.calibration.pixelsize`), checked against the model's like ``--pixel-size``
(1 %; a mismatch is refused unless ``--force``); a file that states none is taken to have
the model's, with a note on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from focaltrack.common.files import atomic_path
from focaltrack.daemon.argtypes import positive_float, positive_int
from focaltrack.records import Localizations, columns_of, concat, csv_columns
from focaltrack.records.columns import csv_rows

if TYPE_CHECKING:
    from focaltrack.calibration import Calibration
    from focaltrack.calibration.pixelsize import StatedPixelSize

#: The CSV header and the HDF5 datasets: the `Localizations` record's columns.
COLUMNS = csv_columns(Localizations)
#: The column added where the frames' focus is known (input from a recording).
STAGE_Z = "stage_z_um"


def _unit_float(text: str) -> float:
    v = float(text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return v


def register(sub: Any) -> None:
    p = sub.add_parser(
        "localize",
        help="3D-localize every emitter in every frame of a TIFF or HDF5 recording",
        description=(
            "Apply a trained model bundle to raw camera frames (multi-page TIFF or HDF5) and "
            "write every localization: frame, x_um, y_um (pixel index × pixel size, centre of "
            "pixel (0, 0) at 0), z_um (the calibration's convention), score."
        ),
    )
    p.add_argument("--model", required=True, type=Path, help="model bundle directory")
    p.add_argument("frames", type=Path, help="multi-page TIFF or HDF5 file of raw frames")
    p.add_argument("--out", required=True, type=Path, help="output .csv or .h5")
    p.add_argument("--dataset", help="HDF5 dataset holding the frames (N, H, W)")
    p.add_argument(
        "--pixel-size",
        type=positive_float,
        metavar="UM",
        help="pixel size of the frames in the sample (µm), over what the file states; must "
        "match the model's within 1 %% unless --force (default: the file's own, from OME, "
        "Micro-Manager or ImageJ metadata, TIFF resolution tags or an HDF5 pixel_size_um "
        "attribute; where it states none, the model's)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="apply the model despite a pixel-size or bit-depth mismatch",
    )
    p.add_argument("--threshold", type=_unit_float, help="lateral detection threshold")
    p.add_argument(
        "--passes",
        type=positive_int,
        help="1: the networks alone; 2 or more: also fit the calibration PSF to what was found, "
        "subtract it and search the rest again (finds emitters hidden by neighbours; slower). "
        "Default: the model's setting",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: CUDA if available)")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: all cores, ≤ 8)")
    p.add_argument("--batch", type=positive_int, default=4, help="frames per batch (default 4)")
    p.set_defaults(func=run)


def read_frames(path: Path, dataset: str | None = None) -> np.ndarray:
    """(N, H, W) frames from a TIFF or HDF5 file, in the file's dtype. Clear errors."""
    if not path.exists():
        raise ValueError(f"input {path} does not exist")
    if path.is_dir():
        raise ValueError(f"input {path} is a directory, not a file")
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic.startswith(b"\x89HDF\r\n\x1a\n"):
        arr = _read_h5(path, dataset)
    elif magic[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        if dataset is not None:
            raise ValueError(f"--dataset applies to HDF5 input; {path} is a TIFF")
        arr = _read_tiff(path)
    else:
        raise ValueError(f"{path} is neither a TIFF nor an HDF5 file")
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(
            f"{path}: frames must be 2-D images (a stack is N × H × W), got shape {arr.shape}"
        )
    if arr.shape[0] == 0 or arr.size == 0:
        raise ValueError(f"{path} contains no frames")
    return arr


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            if len(tf.pages) == 0:
                raise ValueError(f"{path} is an empty TIFF (no images)")
            arr = tf.asarray()
    except ValueError:
        raise
    except Exception as e:  # tifffile raises a variety of errors on broken files
        raise ValueError(f"{path} is not a readable TIFF: {e}") from e
    arr = np.asarray(arr)
    # drop singleton axes beyond the image plane (e.g. (N, 1, H, W) from some writers)
    while arr.ndim > 3 and 1 in arr.shape[:-2]:
        arr = arr.reshape([s for i, s in enumerate(arr.shape) if not (s == 1 and i < arr.ndim - 2)])
    return arr


def _read_h5(path: Path, dataset: str | None) -> np.ndarray:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        # A recording still being written, or left by a crash (kill -9, power loss), keeps
        # its "open for writing" mark and refuses a plain open; as a SWMR reader it opens,
        # with everything the writer had flushed.
        try:
            f = h5py.File(path, "r", libver="latest", swmr=True)
        except OSError:
            raise ValueError(f"{path} is not a readable HDF5 file: {e}") from e
    with f:
        if dataset is not None:
            if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
                raise ValueError(f"{path} has no dataset {dataset!r}")
            return np.asarray(f[dataset][()])
        found: list[str] = []
        f.visititems(
            lambda name, obj: (
                found.append(name) if isinstance(obj, h5py.Dataset) and obj.ndim == 3 else None
            )
        )
        if len(found) != 1:
            what = "no 3-D dataset" if not found else f"several 3-D datasets ({', '.join(found)})"
            raise ValueError(f"{path} has {what}; name the frames with --dataset")
        return np.asarray(f[found[0]][()])


def read_stage_z(path: Path, n_frames: int) -> np.ndarray | None:
    """The focus (µm) of each of the ``n_frames`` frames of a service recording
    (``frame_meta/stage_z_um``), or None: a TIFF, another HDF5 file, or a length that does
    not match the frames."""
    with open(path, "rb") as fh:
        if not fh.read(8).startswith(b"\x89HDF\r\n\x1a\n"):
            return None
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError:
        f = h5py.File(path, "r", libver="latest", swmr=True)
    with f:
        ds = f.get("frame_meta/stage_z_um")
        if not isinstance(ds, h5py.Dataset) or ds.shape != (n_frames,):
            return None
        return np.asarray(ds[()], dtype=np.float64)


def write_localizations(path: Path, locs: list[Localizations], attrs: dict[str, Any]) -> None:
    """Write localizations (a list of `Localizations`) as CSV or HDF5, atomically; with a
    last column ``stage_z_um`` where any frame's focus is known."""
    cols = _columns(locs)
    names = COLUMNS
    if any(np.isfinite(r.stage_z_um) for r in locs):
        names = (*COLUMNS, STAGE_Z)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".h5", ".hdf5"):
        raise ValueError(f"--out must end in .csv or .h5, got {path.name}")
    if not path.parent.is_dir():
        raise ValueError(f"output directory {path.parent} does not exist")
    with atomic_path(path) as tmp:
        if suffix == ".csv":
            with open(tmp, "w", newline="") as fh:
                fh.write(",".join(names) + "\n")
                rows = csv_rows(Localizations, cols)
                if names != COLUMNS:
                    fmt = next(c.csv_format for c in columns_of(Localizations) if c.name == STAGE_Z)
                    for row, z in zip(rows, cols[STAGE_Z].tolist(), strict=True):
                        row.append(fmt % z)
                fh.writelines(",".join(row) + "\n" for row in rows)
        else:
            import h5py

            with h5py.File(tmp, "w") as f:
                g = f.create_group("localizations")
                for c in names:
                    g.create_dataset(c, data=cols[c])
                for k, v in attrs.items():
                    g.attrs[k] = v


def _columns(locs: list[Localizations]) -> dict[str, np.ndarray]:
    if not locs:  # no record to take dtypes from: as files without rows always were
        return {c: np.zeros(0, dtype=np.int64 if c == "frame" else np.float64) for c in COLUMNS}
    return concat(locs)


def run(args: argparse.Namespace) -> int:
    from focaltrack.calibration.pixelsize import read_pixel_size
    from focaltrack.models.bundle import load_bundle
    from focaltrack.models.localizer import Localizer

    if args.out.suffix.lower() not in (".csv", ".h5", ".hdf5"):
        raise ValueError(f"--out must end in .csv or .h5, got {args.out.name}")
    bundle = load_bundle(args.model, device="cpu")
    stated = read_pixel_size(args.frames, args.dataset)
    pixel_size, source = _frames_pixel_size(args, stated, bundle.calibration)
    loc = Localizer(
        bundle,
        device=args.device,
        threads=args.threads,
        pixel_size_um=pixel_size,
        force=args.force,
        passes=args.passes,
    )
    frames = read_frames(args.frames, args.dataset)
    if stated is None and args.pixel_size is None:  # after read_frames: a file to speak of
        print(
            f"localize: {args.frames.name} states no pixel size; assuming the model's "
            f"{loc.pixel_size_um:g} µm (--pixel-size UM states it)",
            file=sys.stderr,
        )
    loc.check_frames(frames)  # all checks before any work
    n = len(frames)
    results = []
    t0 = time.perf_counter()
    for i in range(0, n, args.batch):
        results += loc.localize_batch(
            frames[i : i + args.batch], first_index=i, threshold=args.threshold
        )
    dt = time.perf_counter() - t0
    stage_z = read_stage_z(args.frames, n)
    if stage_z is not None:  # a recording: keep the focus of each frame
        results = [dataclasses.replace(r, stage_z_um=float(stage_z[r.frame])) for r in results]
    attrs = {
        "model": str(args.model.resolve()),
        "calibration_sha256": loc.calibration.sha256,
        "pixel_size_um": loc.pixel_size_um,
        "pixel_size_source": source,
        "input": str(args.frames.resolve()),
        "n_frames": n,
        "columns": ",".join((*COLUMNS, STAGE_Z) if stage_z is not None else COLUMNS),
        "z_convention": "distance from the focal plane as in the calibration (µm)",
    }
    write_localizations(args.out, results, attrs)
    total = sum(len(r) for r in results)
    print(
        f"localize: {n} frames, {total} localizations → {args.out}; "
        f"{n / dt:.1f} frames/s ({1e3 * dt / n:.1f} ms/frame, "
        f"{frames.shape[2]}×{frames.shape[1]} px, {loc.device})",
        file=sys.stderr,
    )
    return 0


def _frames_pixel_size(
    args: argparse.Namespace, stated: StatedPixelSize | None, calibration: Calibration
) -> tuple[float | None, str]:
    """The frames' pixel size for the localizer (None: the model's) and where it came from.

    ``--pixel-size`` wins over the file. A pixel size the file states counts as if given with
    ``--pixel-size``: within the localizer's tolerance (1 %) of the model's it is used for
    the coordinates; further off it is refused here, naming the file's source, unless
    ``--force`` (then the coordinates use it, as with ``--pixel-size --force``).
    """
    from focaltrack.models.localizer import PIXEL_SIZE_TOLERANCE, LocalizerError

    def differ(a: float, b: float) -> bool:
        return abs(a - b) / b > PIXEL_SIZE_TOLERANCE

    model_um = float(calibration.pixel_size_um)
    if args.pixel_size is not None:
        if stated is not None and differ(stated.um, float(args.pixel_size)):
            print(
                f"localize: using --pixel-size {args.pixel_size:g} µm; {args.frames.name} "
                f"states {stated.um:g} µm ({stated.source})",
                file=sys.stderr,
            )
        return float(args.pixel_size), "--pixel-size"
    if stated is None:
        return None, "model (the input states none)"
    if differ(stated.um, model_um) and not args.force:
        raise LocalizerError(
            f"{args.frames.name} states {stated.um:g} µm pixels ({stated.source}) but the model "
            f"was trained for {model_um:g} µm (calibration {calibration.sha256[:12]}); "
            "give --pixel-size UM if the file is wrong, or --force to localize anyway "
            "(coordinates then use the file's pixel size)"
        )
    return stated.um, stated.source

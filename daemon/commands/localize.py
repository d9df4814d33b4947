"""``focaltrack localize``: every emitter in every frame of a recording, with a trained model.

Inputs: a multi-page TIFF (every page a frame, in file order) or an HDF5 file (a 3-D
dataset (N, H, W): ``--dataset NAME``, or the file's only 3-D dataset; a 2-D dataset is one
frame). Output by extension: ``.csv`` (header ``frame,x_um,y_um,z_um,score,sigma_x_um,sigma_y_um,
sigma_z_um,photons,background,flags``: the fit's σ, photons, background and `LocFlag` bits,
NaN and flag 1 where not fitted) or ``.h5``
(one 1-D dataset per column in group ``localizations`` plus attributes naming the model,
its calibration hash, pixel size and the input). ``frame`` is the 0-based index of the image
in the input. A recording of the service (HDF5 with ``frame_meta/stage_z_um``) adds a last
column ``stage_z_um``, the focus each frame was taken at, which `focaltrack track` uses to
track across focus moves as the live service does. Prints frames/s to stderr. See
docs/models.md.

Any length of recording (`focaltrack.models.reanalysis`): frames are read, localized and
written ``--chunk`` frames at a time, with a progress bar; the rows so far are kept in
``OUT.partial`` (and ``OUT.partial.json``: what they are of, how far they go) and the output
appears, complete, at the end. Run again on the same output it resumes after the last
complete chunk; another input, model or settings is refused unless ``--force``. ``--dask``
runs the chunks on a dask.distributed cluster (docs/scaling.md), with the same rows.

Pixel size: ``--pixel-size``, else what the file states about itself
(`focaltrack.calibration.pixelsize`), checked against the model's like ``--pixel-size``
(1 %; a mismatch is refused unless ``--force``); a file that states none is taken to have
the model's, with a note on stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
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


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def register(sub: Any) -> None:
    p = sub.add_parser(
        "localize",
        help="3D-localize every emitter in every frame of a TIFF or HDF5 recording",
        description=(
            "Apply a trained model bundle to raw camera frames (multi-page TIFF or HDF5) and "
            "write every localization: frame, x_um, y_um (pixel index × pixel size, centre of "
            "pixel (0, 0) at 0), z_um (the calibration's convention), score, and the fit's "
            "sigma_x_um, sigma_y_um, sigma_z_um, photons, background and flags "
            "(docs/protocol.md)."
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
    p.add_argument(
        "--fit",
        choices=("spline", "none"),
        help="last step: spline (default) fits every localization by Poisson maximum likelihood "
        "of the calibration (with its sigma, photons and flags); none keeps the networks' "
        "positions (with --passes 2+: the residual passes' least-squares fit), no sigma",
    )
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: CUDA if available)")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: all cores, ≤ 8)")
    p.add_argument("--batch", type=positive_int, default=4, help="frames per batch (default 4)")
    p.add_argument(
        "--chunk",
        type=positive_int,
        default=128,
        help="frames read, analysed and written at a time, rounded up to whole batches: the "
        "memory used and the unit of resuming and of Dask tasks (default 128)",
    )
    p.add_argument(
        "--dask",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="run the chunks on Dask: a local cluster of --workers processes, or the "
        "scheduler at ADDRESS (tcp://host:8786); needs focaltrack[dask]",
    )
    p.add_argument(
        "--workers",
        type=positive_int,
        default=_cores(),
        help="worker processes of the local Dask cluster (default: the usable cores)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(func=run)


def read_frames(path: Path, dataset: str | None = None) -> np.ndarray:
    """(N, H, W) frames from a TIFF or HDF5 file, in the file's dtype, all at once. Clear
    errors. (`focaltrack localize` reads them in chunks: `focaltrack.models.reanalysis`.)"""
    from focaltrack.models.reanalysis import open_frames

    source = open_frames(path, dataset)
    return source.read(0, source.n_frames)


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
    from focaltrack.models import reanalysis
    from focaltrack.models.bundle import load_bundle
    from focaltrack.models.localizer import Localizer

    if args.out.suffix.lower() not in (".csv", ".h5", ".hdf5"):
        raise ValueError(f"--out must end in .csv or .h5, got {args.out.name}")
    if not args.out.parent.is_dir():
        raise ValueError(f"output directory {args.out.parent} does not exist")
    bundle = load_bundle(args.model, device="cpu")
    stated = read_pixel_size(args.frames, args.dataset)
    pixel_size, source_of_size = _frames_pixel_size(args, stated, bundle.calibration)
    # Built here for its checks (pixel size, passes) before any work, and for the run's
    # settings; the chunks use the process's own (`reanalysis.localizer_for`).
    loc = Localizer(
        bundle,
        device=args.device,
        threads=args.threads,
        pixel_size_um=pixel_size,
        force=args.force,
        passes=args.passes,
        fit=args.fit,
    )
    source = reanalysis.open_frames(args.frames, args.dataset)
    if stated is None and args.pixel_size is None:  # after open_frames: a file to speak of
        print(
            f"localize: {args.frames.name} states no pixel size; assuming the model's "
            f"{loc.pixel_size_um:g} µm (--pixel-size UM states it)",
            file=sys.stderr,
        )
    spec = reanalysis.AnalysisSpec(
        model=str(args.model.resolve()),
        batch=args.batch,
        device=args.device,
        # a Dask worker has one core: one torch thread unless told otherwise
        threads=args.threads or (1 if args.dask else None),
        pixel_size_um=pixel_size,
        force=args.force,
        passes=args.passes,
        fit=args.fit,
        threshold=args.threshold,
    )
    identity = {
        "input": reanalysis.input_identity(source),
        "model": reanalysis.model_identity(args.model),
        "settings": {
            "pixel_size_um": loc.pixel_size_um,
            "threshold": args.threshold,
            "passes": loc.decode.passes,
            "fit": loc.decode.fit,
            "batch": args.batch,
            "format": args.out.suffix.lower(),
        },
    }
    attrs = {
        "model": str(args.model.resolve()),
        "calibration_sha256": loc.calibration.sha256,
        "pixel_size_um": loc.pixel_size_um,
        "pixel_size_source": source_of_size,
        "input": str(args.frames.resolve()),
        "n_frames": source.n_frames,
        "columns": ",".join((*COLUMNS, STAGE_Z) if source.stage_z else COLUMNS),
        "z_convention": "distance from the focal plane as in the calibration (µm)",
    }
    client = cluster = None
    where = str(loc.device)
    if args.dask:
        client, cluster = reanalysis.dask_client(args.dask, args.workers, spec.threads or 1)
        where = f"Dask, {len(client.nthreads())} workers"
    try:
        n, total, dt, _ = reanalysis.reanalyse(
            spec,
            source,
            args.out,
            identity=identity,
            attrs=attrs,
            chunk=args.chunk,
            force=args.force,
            client=client,
            progress=not args.no_progress,
        )
    finally:
        if client is not None:
            client.close()
        if cluster is not None:
            cluster.close()
    h, w = source.frame_shape
    print(
        f"localize: {source.n_frames} frames ({n} now), {total} localizations → {args.out}; "
        f"{n / max(dt, 1e-9):.1f} frames/s ({1e3 * dt / max(n, 1):.1f} ms/frame, "
        f"{w}×{h} px, {where})",
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

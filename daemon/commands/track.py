"""``focaltrack track``: link a localization table into Kalman tracks, offline.

Input: the localizer's CSV (``frame,x_um,y_um,z_um[,score][,t_s][,stage_z_um]
[,sigma_x_um,sigma_y_um,sigma_z_um],...``; other columns are ignored), or a recording of the
service (HDF5). A localization's σ columns, where given and finite, are its measurement noise
in the tracker (``--use-localization-sigma``, the default; docs/tracking.md). Frame times
come from ``t_s`` when the column exists, otherwise ``--fps`` gives them as ``frame / fps``.
With the frames' focus (``stage_z_um``; a recording has it in ``frame_meta``) the tracks are
linked in absolute depth as the live service links them (`focaltrack.models.analyser`): a
recording gives the tracks the service recorded. Output: ``.csv`` or ``.h5``, one row per
live track per frame.
See docs/tracking.md for the model, the parameters and both file formats.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from focaltrack.common.files import atomic_path
from focaltrack.daemon.argtypes import positive_float
from focaltrack.records import STATUS_CODES, Tracks, columns_of, csv_columns, flushed_counts
from focaltrack.records.columns import csv_rows
from focaltrack.records.localizations import SIGMA_COLUMNS

if TYPE_CHECKING:
    from focaltrack.models.tracker import TrackerConfig, TrackTable

log = logging.getLogger("focaltrack.track")

SCHEMA_VERSION = "1"
REQUIRED = ("frame", "x_um", "y_um", "z_um")
#: The CSV header and the HDF5 datasets: the `Tracks` record's CSV columns.
CSV_COLUMNS = csv_columns(Tracks)
_MOTION_ALIASES = {
    "cv": "constant_velocity",
    "constant_velocity": "constant_velocity",
    "rw": "random_walk",
    "random_walk": "random_walk",
}


# --------------------------------------------------------------------------- arguments


def _non_negative_float(text: str) -> float:
    """For ``evaluate-tracking``'s own options (the tracker's are checked by `TrackerConfig`)."""
    v = float(text)
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"must be a non-negative number, got {text!r}")
    return v


def _positive_pair(names: str) -> Callable[[str], tuple[float, float]]:
    """An argparse type for ``A,B``: two positive finite numbers (``names`` says which)."""

    def parse(text: str) -> tuple[float, float]:
        try:
            vals = tuple(float(p) for p in text.split(","))
        except ValueError:
            vals = ()
        if len(vals) != 2 or not all(math.isfinite(v) and v > 0 for v in vals):
            raise argparse.ArgumentTypeError(
                f"expected {names} (two positive numbers), got {text!r}"
            )
        return vals[0], vals[1]

    return parse


_noise_pair = _positive_pair("SIGMA_LATERAL_UM,SIGMA_AXIAL_UM")
_field_pair = _positive_pair("WIDTH_UM,HEIGHT_UM")


def _motion(text: str) -> str:
    try:
        return _MOTION_ALIASES[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"motion model must be cv (constant_velocity) or rw (random_walk), got {text!r}"
        ) from None


def tracker_option(name: str) -> str:
    """The option of `TrackerConfig` field ``name`` (``accel_um_s2`` -> ``--accel-um-s2``)."""
    return "--" + name.replace("_", "-")


def add_tracker_arguments(p: argparse.ArgumentParser) -> None:
    """One option per `TrackerConfig` field (its name, help and default; unset options are
    ``None``), and ``--model-noise`` / ``--model`` for the measurement noise. Ranges are
    checked by `TrackerConfig` (`config_from_args`), as for the service's ``[tracker]``."""
    from focaltrack.models.tracker_config import NOISE_SETTINGS, TrackerConfig

    g = p.add_argument_group("tracker (docs/tracking.md; the service's [tracker] section)")
    for f in dataclasses.fields(TrackerConfig):
        default: Any = f.default
        kw: dict[str, Any] = {"dest": f.name, "default": None}
        if isinstance(default, Enum):
            kw.update(type=_motion, metavar="|".join(m.value for m in type(default)))
            shown = f"default {default.value}; cv, rw for short"
        elif isinstance(default, bool):  # --name / --no-name
            kw.update(action=argparse.BooleanOptionalAction)
            shown = f"default {'on' if default else 'off'}"
        else:
            kw.update(type=type(default), metavar="N" if type(default) is int else "X")
            shown = f"default {default:g}"
        if f.name in NOISE_SETTINGS:
            shown = f"default: from --model's validation, else {default:g}; 0 = from --model"
        kw["help"] = f"{f.metadata['help']}; {shown}"
        g.add_argument(tracker_option(f.name), **kw)
    g.add_argument(
        "--model-noise",
        type=_noise_pair,
        default=None,
        metavar="LAT_UM,AX_UM",
        help="--sigma-lateral-um and --sigma-axial-um in one; use the localizer's measured errors",
    )
    g.add_argument(
        "--model",
        type=Path,
        default=None,
        help="model bundle: take the localization noise from its validation errors "
        "(--model-noise and --sigma-*-um override)",
    )


def config_from_args(args: argparse.Namespace, **defaults: Any) -> TrackerConfig:
    """A `TrackerConfig` from the options of `add_tracker_arguments` (unset: ``defaults``,
    then the `TrackerConfig` defaults; the noise of ``--model`` comes before ``defaults``),
    made by `TrackerConfig.from_settings` as the service makes its tracker's."""
    from focaltrack.models.tracker_config import (
        NOISE_FROM_MODEL,
        NOISE_SETTINGS,
        TrackerConfig,
        TrackerConfigError,
    )

    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(TrackerConfig)
        if getattr(args, f.name) is not None
    }
    if args.model_noise is not None:
        both = [tracker_option(n) for n in NOISE_SETTINGS if n in given]
        if both:
            raise ValueError(f"--model-noise and {' and '.join(both)}: give the noise once")
        given.update(zip(NOISE_SETTINGS, args.model_noise, strict=True))
    settings = {**defaults, **given}
    noise: tuple[float, float] | None = None
    if args.model is not None:
        for name in NOISE_SETTINGS:
            if name not in given:  # --model's noise comes before the caller's defaults
                settings[name] = NOISE_FROM_MODEL
        if any(settings[name] == NOISE_FROM_MODEL for name in NOISE_SETTINGS):
            noise = _model_noise(args.model)
    try:
        return TrackerConfig.from_settings(settings, noise)
    except TrackerConfigError as e:
        raise ValueError(f"{' and '.join(map(tracker_option, e.names))}: {e}") from None


def _model_noise(bundle: Path) -> tuple[float, float]:
    """The localization noise (lateral, axial) of a model bundle's validation."""
    from focaltrack.models.bundle import read_meta
    from focaltrack.models.tracker_config import noise_from_validation

    try:
        lat, ax = noise_from_validation(read_meta(bundle))
    except ValueError as e:
        raise ValueError(f"{bundle}: {e}; give --model-noise") from e
    log.info("localization noise from %s: %.3g µm lateral, %.3g µm axial", bundle, lat, ax)
    return lat, ax


def register(sub: Any) -> None:
    p = sub.add_parser(
        "track",
        help="link a localization CSV into Kalman tracks (CSV or HDF5 out)",
        description=(
            "Link per-frame 3D localizations into tracks with a Kalman filter per track "
            "(constant velocity or random walk), Mahalanobis gating and global assignment. "
            "Rows with NaN or infinite coordinates are rejected and counted. Frames missing "
            "from the file between the first and the last are processed as empty frames."
        ),
    )
    p.add_argument("input", type=Path, help="localizations CSV: frame,x_um,y_um,z_um[,score,t_s]")
    p.add_argument("--out", required=True, type=Path, help="tracks file, .csv or .h5")
    p.add_argument(
        "--fps",
        type=positive_float,
        default=None,
        help="frame rate, Hz: frame times are frame / fps (needed without a t_s column)",
    )
    p.add_argument(
        "--confirmed-only",
        action="store_true",
        help="write only tracks that were confirmed at some point (their tentative start too)",
    )
    p.add_argument(
        "--field-um",
        type=_field_pair,
        default=None,
        metavar="WIDTH_UM,HEIGHT_UM",
        help="field of view (x from 0 to WIDTH_UM, y from 0 to HEIGHT_UM): a track predicted "
        "further than --field-margin-um outside it ends; default: a recording's camera frame, "
        "none for a CSV",
    )
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    add_tracker_arguments(p)
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- input
@dataclass(frozen=True, slots=True)
class LocalizationTable:
    frame: np.ndarray  # (n,) int64
    xyz_um: np.ndarray  # (n, 3), may hold NaN
    t_s: np.ndarray | None  # (n,)
    score: np.ndarray | None  # (n,)
    stage_z_um: np.ndarray | None = None  # (n,) the focus of each row's frame
    #: (n, 3) each localization's σ per axis (NaN where unknown), where the input has them.
    sigma_xyz_um: np.ndarray | None = None
    #: A recording's analysed frames as ``(frames, t_s, stage_z_um)``: exactly the frames
    #: the live service tracked, with their times and focus (see `read_recording`).
    frame_meta: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    #: The camera's field of view (width, height) in µm, where the input states it (a
    #: recording: ``frame_shape`` × ``pixel_size_um``): the live tracker's field.
    field_um: tuple[float, float] | None = None


def read_recording(path: Path) -> LocalizationTable:
    """The localizations of a service recording, with its analysed frames' times and focus.

    The frames linked are those with localizations or tracks in the recording: the live
    service recorded both for every frame it analysed. (A frame analysed with neither, its
    tracks all ended, cannot be told from a frame the analysis skipped; it is left out.)
    """
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError:
        f = h5py.File(path, "r", libver="latest", swmr=True)
    with f:
        if "frame_meta" not in f or "localizations" not in f:
            raise ValueError(f"{path}: not a focaltrack recording (no frame_meta, localizations)")
        g, m = f["localizations"], f["frame_meta"]
        # rows its writer vouched for (a recording still written or left by a crash: rows
        # past them can read as zeros), and no column longer than the shortest
        n_meta, n_loc, n_trk = flushed_counts(f)
        loc_cols = [c for c in (*REQUIRED, "score", *SIGMA_COLUMNS) if c in g]
        n_loc = min([g[c].shape[0] for c in loc_cols] + ([n_loc] if n_loc is not None else []))
        meta_cols = ("index", "t_acq_s", "stage_z_um")
        n_meta = min([m[c].shape[0] for c in meta_cols] + ([n_meta] if n_meta is not None else []))
        frame = np.asarray(g["frame"][:n_loc], dtype=np.int64)
        xyz = np.stack([np.asarray(g[c][:n_loc], dtype=np.float64) for c in REQUIRED[1:]], 1)
        score = np.asarray(g["score"][:n_loc], dtype=np.float64)
        sigma = _sigma_columns({c: g[c][:n_loc] for c in SIGMA_COLUMNS if c in g}, len(frame))
        tracked = np.asarray(f["tracks/frame"][:n_trk], dtype=np.int64) if "tracks" in f else frame
        idx = np.asarray(m["index"][:n_meta], dtype=np.int64)
        t = np.asarray(m["t_acq_s"][:n_meta], dtype=np.float64)
        z = np.asarray(m["stage_z_um"][:n_meta], dtype=np.float64)
        field = _recording_field(f.attrs)
    keep = np.isin(idx, np.union1d(frame, tracked))
    return LocalizationTable(
        frame=frame,
        xyz_um=xyz.reshape(-1, 3),
        t_s=None,
        score=score,
        frame_meta=(idx[keep], t[keep], z[keep]),
        field_um=field,
        sigma_xyz_um=sigma,
    )


def _sigma_columns(found: dict[str, Any], n: int) -> np.ndarray | None:
    """(n, 3) σ from the σ columns an input has (an axis it lacks is NaN); None if none."""
    if not found:
        return None
    nan = np.full(n, math.nan)
    return np.stack(
        [np.asarray(found.get(c, nan), dtype=np.float64).reshape(n) for c in SIGMA_COLUMNS], 1
    )


def _recording_field(attrs: Any) -> tuple[float, float] | None:
    """The camera's field (width, height) in µm from a recording's ``frame_shape`` (H, W)
    and ``pixel_size_um``, as the live analysis gave its tracker; None if either is absent."""
    try:
        h, w = (int(v) for v in attrs["frame_shape"])
        px = float(attrs["pixel_size_um"])
    except (KeyError, TypeError, ValueError):
        return None
    if not (h > 0 and w > 0 and math.isfinite(px) and px > 0):
        return None
    return w * px, h * px


def read_localizations(path: Path) -> LocalizationTable:
    """Read the localizer's CSV (errors name the line and the column) or a recording."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with path.open("rb") as fb:
        if fb.read(8).startswith(b"\x89HDF\r\n\x1a\n"):
            return read_recording(path)
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ValueError(f"{path}: empty file (expected a header row)") from None
        missing = [c for c in REQUIRED if c not in header]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {', '.join(missing)}; "
                f"need {','.join(REQUIRED)} (found {','.join(header)})"
            )
        optional = ("t_s", "score", "stage_z_um", *SIGMA_COLUMNS)
        col = {name: header.index(name) for name in (*REQUIRED, *optional) if name in header}
        frames: list[int] = []
        values: list[list[float]] = []
        floats = [c for c in ("x_um", "y_um", "z_um", *optional) if c in col]
        for line, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < len(header):
                raise ValueError(
                    f"{path}, line {line}: {len(row)} fields, header has {len(header)}"
                )
            try:
                f = float(row[col["frame"]])
            except ValueError:
                raise ValueError(
                    f"{path}, line {line}: frame {row[col['frame']]!r} is not a number"
                ) from None
            if not (math.isfinite(f) and f == int(f)):
                raise ValueError(
                    f"{path}, line {line}: frame {row[col['frame']]!r} is not an integer"
                )
            frames.append(int(f))
            vals = []
            for c in floats:
                text = row[col[c]].strip()
                try:
                    vals.append(float(text) if text else math.nan)
                except ValueError:
                    raise ValueError(f"{path}, line {line}: {c} {text!r} is not a number") from None
            values.append(vals)
    arr = np.asarray(values, dtype=np.float64).reshape(len(values), len(floats))
    get = {c: arr[:, i] for i, c in enumerate(floats)}
    return LocalizationTable(
        frame=np.asarray(frames, dtype=np.int64),
        xyz_um=np.stack([get["x_um"], get["y_um"], get["z_um"]], axis=1),
        t_s=get.get("t_s"),
        score=get.get("score"),
        stage_z_um=get.get("stage_z_um"),
        sigma_xyz_um=_sigma_columns({c: get[c] for c in SIGMA_COLUMNS if c in get}, len(arr)),
    )


# --------------------------------------------------------------------------- output
def write_tracks(
    table: TrackTable, out: Path, config: TrackerConfig, meta: dict[str, Any] | None = None
) -> Path:
    """Write ``table`` as CSV or HDF5 (by suffix), atomically."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".h5", ".hdf5"):
        raise ValueError(f"{out}: output must end in .csv or .h5")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        if suffix == ".csv":
            _write_csv(table, tmp)
        else:
            _write_h5(table, tmp, config, meta or {})
    return out


def _write_csv(table: TrackTable, path: Path) -> None:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(CSV_COLUMNS)
        w.writerows(csv_rows(Tracks, table.record().columns()))


def _write_h5(table: TrackTable, path: Path, config: TrackerConfig, meta: dict[str, Any]) -> None:
    import h5py

    cols = table.record().columns()
    units = {c.name: c.unit.replace("µ", "u") for c in columns_of(Tracks)}  # ASCII attributes
    status_t = h5py.enum_dtype(STATUS_CODES, basetype="u1")
    with h5py.File(path, "w") as f:
        g = f.create_group("tracks")
        g.attrs["schema_version"] = SCHEMA_VERSION
        g.attrs["format"] = "focaltrack-tracks"
        g.attrs["n_rows"] = len(table)
        g.attrs["n_tracks"] = len(np.unique(table.track_id))
        g.attrs["tracker_config"] = json.dumps(_config_dict(config))
        for k, v in meta.items():
            g.attrs[k] = v
        for name in CSV_COLUMNS:
            v = cols[name]
            if name == "status":
                ds = g.create_dataset(name, data=v.astype(np.uint8), dtype=status_t)
            else:
                ds = g.create_dataset(name, data=v)
            if units[name]:
                ds.attrs["units"] = units[name]
        ds = g.create_dataset("cov_xyz_um2", data=table.cov_xyz_um2)
        ds.attrs["units"] = "um^2"


def _config_dict(config: TrackerConfig) -> dict[str, Any]:
    d = asdict(config)
    d["motion"] = config.motion.value
    return d


# --------------------------------------------------------------------------- run
def run(args: argparse.Namespace) -> int:
    from focaltrack.models.tracker import KalmanTracker, link_table

    out = Path(args.out)
    if out.suffix.lower() not in (".csv", ".h5", ".hdf5"):
        raise ValueError(f"{out}: output must end in .csv or .h5")
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists (use --force to overwrite)")
    config = config_from_args(args)
    locs = read_localizations(args.input)
    if locs.frame_meta is not None:  # a recording: its own times
        if args.fps is not None:
            log.info("using the recording's frame times; --fps is ignored")
        args.fps = None
    elif locs.t_s is None and args.fps is None:
        raise ValueError(f"{args.input}: no t_s column; give the frame rate with --fps")
    if locs.t_s is not None and args.fps is not None:
        log.info("using the t_s column for frame times; --fps is ignored")
    field = args.field_um if args.field_um is not None else locs.field_um
    if field is None:
        log.info("no field of view (--field-um): tracks are not ended at its edges")
    else:
        log.info("field of view %.6g × %.6g µm (margin %g µm)", *field, config.field_margin_um)
    tracker = KalmanTracker(config, field_um=field)
    table = link_table(
        locs.frame,
        locs.xyz_um,
        locs.t_s,
        fps=None if locs.t_s is not None else args.fps,
        scores=locs.score,
        tracker=tracker,
        stage_z_um=locs.stage_z_um,
        frame_meta=locs.frame_meta,
        sigma_xyz_um=locs.sigma_xyz_um,
    )
    if args.confirmed_only:
        table = table.ever_confirmed()
    meta: dict[str, Any] = {
        "input": str(Path(args.input).resolve()),
        "n_localizations": len(locs.frame),
        "n_rejected_non_finite": tracker.rejected_count,
        "n_dropped_over_cap": tracker.dropped_count,
        "n_left_field": tracker.left_field_count,
        "confirmed_only": bool(args.confirmed_only),
    }
    if field is not None:
        meta["field_um"] = list(field)
    write_tracks(table, out, config, meta)
    n_tracks = len(np.unique(table.track_id))
    n_conf = len(np.unique(table.track_id[table.confirmed]))
    n_frames = len(np.unique(table.frame))
    if tracker.rejected_count:
        print(
            f"rejected {tracker.rejected_count} localization(s) with NaN or infinite coordinates",
            file=sys.stderr,
        )
    if tracker.dropped_count:
        print(
            f"dropped {tracker.dropped_count} localization(s) over "
            f"{config.max_localizations_per_frame} per frame",
            file=sys.stderr,
        )
    print(
        f"{len(locs.frame)} localizations, {tracker.frame_count} frames -> {n_tracks} tracks "
        f"({n_conf} confirmed), {len(table)} rows over {n_frames} frames: {out}"
    )
    return 0

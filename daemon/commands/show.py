"""``focaltrack show RECORDING.h5 [--png OUT.png] [--frame N]``: look at a recording.

Prints the recording's counters (frames recorded, analysed, missing, dropped) and draws the
figure a microscopist looks at first (`focaltrack.models.recording_figure`): one frame with
its localizations coloured by depth, the tracks in x–y and in 3D, x, y, z over time of the
longest tracks, localizations and tracks per frame.

The reader here knows the recording's layout (`focaltrack.daemon.recorder`); it takes
only what the figure needs: the metadata and result columns, and the pixels of the one frame
shown (a recording with frames can be far larger than memory). A file still being written,
or left open by a crash, is read as a SWMR reader, with everything the writer had flushed.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from focaltrack.common.errors import FocaltrackError
from focaltrack.common.files import fmt
from focaltrack.daemon.argtypes import positive_int
from focaltrack.records import flushed_counts

if TYPE_CHECKING:
    from focaltrack.models.recording_figure import RecordingFigure, RecordingView

__all__ = ["ShowError", "draw_recording", "read_recording_view", "register"]

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
#: Section of the counters computed from the file itself.
FILE_SECTION = "from the file"


class ShowError(FocaltrackError, ValueError):
    """The file is not a recording, or the frame asked for is not in it."""


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from focaltrack.models.recording_figure import DEFAULT_DPI

    p = sub.add_parser(
        "show",
        help="draw what a recording localized and tracked (PNG)",
        description="Print a recording's counters (frames recorded, analysed, missing, "
        "dropped) and draw its figure: one frame with its localizations coloured by depth, "
        "the tracks in x–y and in 3D, x/y/z over time of the longest tracks, localizations "
        "and tracks per frame.",
    )
    p.add_argument("recording", type=Path, help="a recording of the service (.h5)")
    p.add_argument(
        "--png", type=Path, default=None, help="figure to write (default: beside the file, .png)"
    )
    p.add_argument(
        "--frame",
        type=int,
        default=None,
        metavar="N",
        help="camera frame index to show (default: the frame with most localizations)",
    )
    p.add_argument(
        "--dpi",
        type=positive_int,
        default=DEFAULT_DPI,
        help=f"figure resolution (default {DEFAULT_DPI}: 1600 × 1000 px)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    rec: Path = args.recording
    png: Path = args.png if args.png is not None else rec.with_suffix(".png")
    if png.resolve() == rec.resolve():
        raise ShowError(f"--png {png} would overwrite the recording")
    if not png.parent.is_dir():
        raise ShowError(f"output directory {png.parent} does not exist (for --png {png})")
    view = read_recording_view(rec, frame=args.frame)
    print(f"recording: {rec}")
    for title, rows in view.counters:
        print(f"{title}:")
        width = max((len(k) for k, _ in rows), default=0)
        for k, v in rows:
            print(f"  {k:<{width}}  {v}")
    from focaltrack.models.recording_figure import render_recording_figure

    render_recording_figure(view, png, dpi=int(args.dpi))
    print(f"figure:    {png}")
    return 0


def draw_recording(
    path: Path,
    png: Path,
    *,
    frame: int | None = None,
    counters_first: Sequence[tuple[str, Sequence[tuple[str, str]]]] = (),
) -> RecordingFigure:
    """Read a recording and draw its figure; ``counters_first``: sections shown above the
    file's own counters (the demo adds what the service and its subscriber measured)."""
    from focaltrack.models.recording_figure import render_recording_figure

    view = read_recording_view(path, frame=frame)
    if counters_first:
        view = dataclasses.replace(view, counters=(*counters_first, *view.counters))
    return render_recording_figure(view, png)


# --------------------------------------------------------------------------- reading


def read_recording_view(path: Path, *, frame: int | None = None) -> RecordingView:
    """What the figure shows of the recording at ``path``; ``frame``: the camera frame to
    show (default: the one with most localizations). `ShowError` for a file that is not a
    recording or a frame it does not hold."""
    import h5py

    from focaltrack.daemon.recorder import RECORDING_KIND

    path = Path(path)
    if not path.is_file():
        raise ShowError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    with open(path, "rb") as fh:
        if not fh.read(8).startswith(_HDF5_MAGIC):
            raise ShowError(f"{path} is not a focaltrack recording (not an HDF5 file)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        # still being written, or left open by a crash: its writer's mark refuses a plain open
        try:
            f = h5py.File(path, "r", libver="latest", swmr=True)
        except OSError:
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ShowError(f"{path} is not a readable HDF5 file: {first}") from e
    with f:
        kind = _text(f.attrs.get("kind"))
        groups = ("frame_meta", "localizations", "tracks")
        if kind != RECORDING_KIND or not all(isinstance(f.get(g), h5py.Group) for g in groups):
            raise ShowError(
                f"{path} is not a focaltrack recording (kind {kind or 'missing'!r}, "
                f"expected {RECORDING_KIND!r} with {', '.join(groups)})"
            )
        attrs = dict(f.attrs.items())
        # a recording still written, or left by a crash, vouches for its rows in `flushed`
        # (rows past it can read as zeros); a file without it has only its lengths
        n_rows = flushed_counts(f)
        meta = _table(f["frame_meta"], ("index", "t_acq_s"), n_rows[0])
        loc = _table(f["localizations"], ("frame", "x_um", "y_um", "z_um"), n_rows[1])
        tracks = _table(
            f["tracks"], ("frame", "track_id", "x_um", "y_um", "z_um", "status"), n_rows[2]
        )
        codes = h5py.check_enum_dtype(f["tracks/status"].dtype) or {"tentative": 0}
        # every state past tentative is an established track (confirmed, and any later one)
        tentative = int(codes.get("tentative", 0))
        tracks["confirmed"] = tracks.pop("status").astype(np.int64) != tentative
        frames = f.get("frames")
        has_frames = isinstance(frames, h5py.Dataset)
        n_px = min(frames.shape[0], len(meta["index"])) if has_frames else 0
        chosen = _pick_frame(path, meta["index"], n_px, loc["frame"], frame)
        image = None
        if chosen is not None and n_px:
            row = int(np.flatnonzero(meta["index"][:n_px] == chosen)[0])
            image = np.asarray(frames[row])  # the one frame shown, not the whole stack
        shape = tuple(int(v) for v in np.asarray(attrs.get("frame_shape", (0, 0))).reshape(-1))
        if has_frames:
            shape = tuple(int(v) for v in frames.shape[1:])
    from focaltrack.models.recording_figure import RecordingView

    if chosen is None:
        note = "the recording holds no frame"
    elif image is None:
        note = (
            "recorded without frames: localizations only"
            if not has_frames
            else "no frame pixels were flushed to the file"
        )
    else:
        note = ""
    complete = bool(attrs.get("complete", False))
    model = _text(attrs.get("model")) or "?"
    created = _text(attrs.get("created_utc")) or "?"
    return RecordingView(
        name=path.name,
        pixel_size_um=float(attrs.get("pixel_size_um", 0.0)) or 1.0,
        frame_shape=(shape[0], shape[1]) if len(shape) == 2 else (0, 0),
        frame_index=meta["index"].astype(np.int64),
        t_acq_s=meta["t_acq_s"].astype(np.float64),
        loc=loc,
        tracks=tracks,
        image=image,
        image_frame=chosen,
        image_note=note,
        title=f"model {model}, recorded {created}" + ("" if complete else " — NOT CLOSED CLEANLY"),
        counters=((FILE_SECTION, file_counters(attrs, meta, loc, tracks, n_px)),),
    )


def _text(v: Any) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return "" if v is None else str(v)


def _table(group: Any, names: Sequence[str], rows: int | None = None) -> dict[str, np.ndarray]:
    """The named columns of a table; a file left by a crash may hold columns of unequal
    length (the writer appends one dataset after another): cut to the shortest, and to
    ``rows`` (what the writer vouched for) where given."""
    cols = {n: np.asarray(group[n][()]) for n in names}
    n = min(len(v) for v in cols.values())
    if rows is not None:
        n = min(n, rows)
    return {k: v[:n] for k, v in cols.items()}


def _pick_frame(
    path: Path, index: np.ndarray, n_px: int, loc_frame: np.ndarray, asked: int | None
) -> int | None:
    """The camera frame to show: ``asked``, else the one with most localizations among the
    frames with pixels (among all recorded and localized frames in a recording without
    frames); None when there is none."""
    candidates = index[:n_px] if n_px else np.union1d(index, loc_frame)
    if asked is not None:
        if not np.any(candidates == asked):
            where = (
                f"its {'frames with pixels' if n_px else 'frames'} run "
                f"{int(candidates.min())}–{int(candidates.max())}"
                if len(candidates)
                else "it holds no frame"
            )
            raise ShowError(f"--frame {asked}: not in {path} ({where})")
        return int(asked)
    if not len(candidates):
        return None
    frames, counts = np.unique(loc_frame, return_counts=True)
    pos = np.clip(np.searchsorted(frames, candidates), 0, max(len(frames) - 1, 0))
    n = np.zeros(len(candidates), dtype=np.int64)
    if len(frames):
        hit = frames[pos] == candidates
        n[hit] = counts[pos[hit]]
    return int(candidates[int(np.argmax(n))])


def file_counters(
    attrs: dict[str, Any],
    meta: dict[str, np.ndarray],
    loc: dict[str, np.ndarray],
    tracks: dict[str, np.ndarray],
    n_px: int,
) -> tuple[tuple[str, str], ...]:
    """What the file tells of the run, each line saying how it was counted. A recording
    keeps acquisition times but no analysis times: the latency is not in it."""
    idx = np.unique(meta["index"])
    recorded = len(meta["index"])
    with_results = np.union1d(loc["frame"], tracks["frame"])
    rows: list[tuple[str, str]] = [
        (
            "file",
            "complete (closed by record_stop)"
            if bool(attrs.get("complete", False))
            else "not closed cleanly: what was flushed",
        ),
        (
            "frames recorded",
            f"{recorded}" + (f", {n_px} with pixels" if n_px else ", metadata only (no pixels)"),
        ),
    ]
    if len(idx):
        span = int(idx[-1] - idx[0] + 1)
        rows.append(("camera frames", f"{int(idx[0])}–{int(idx[-1])} ({span})"))
        rows.append(("missing (index gaps)", f"{span - len(idx)} (camera or recorder drops)"))
    dropped = attrs.get("dropped")
    rows.append(
        (
            "recorder drops",
            f"{int(dropped)} (writer queue full)"
            if dropped is not None
            else "not stored (the file was not closed)",
        )
    )
    rows.append(("analysed", f"≥ {len(with_results)} (frames with results)"))
    if len(idx):
        rows.append(
            (
                "recorded, no results",
                f"{int(np.sum(~np.isin(idx, with_results)))} (skipped while behind, or empty)",
            )
        )
    t = meta["t_acq_s"].astype(np.float64)
    t = t[np.isfinite(t)]
    if len(t) >= 2 and t.max() > t.min():
        dur = float(t.max() - t.min())
        rows.append(("duration", f"{dur:.1f} s ({(len(t) - 1) / dur:.1f} frames/s recorded)"))
    n_loc = len(loc["frame"])
    per = fmt(n_loc / len(with_results) if len(with_results) else None, ".1f")
    rows.append(("localizations", f"{n_loc} ({per} per analysed frame)"))
    ids, counts = np.unique(tracks["track_id"], return_counts=True)
    n_conf = len(np.unique(tracks["track_id"][tracks["confirmed"]]))
    longest = f", longest {int(counts.max())} frames" if len(counts) else ""
    rows.append(("tracks", f"{len(ids)} ({n_conf} confirmed){longest}"))
    rows.append(("latency", "not in the file (acquisition times only)"))
    return tuple(rows)

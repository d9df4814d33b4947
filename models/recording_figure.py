"""The `focaltrack show` figure: what a recording localized and tracked, at a glance.

One PNG (matplotlib, Agg backend, no display needed), drawn from a `RecordingView` (what the
daemon's reader takes out of a recording file; this module reads no files):

- top left: one camera frame in grey (the one with most localizations, or the one asked
  for), its localizations as circles coloured by depth, axes in µm with the image's
  orientation (row 0 at the top);
- top middle: every track in x–y as line segments coloured by time (tentative stretches in
  grey), the camera's field as a dashed frame;
- top right: the same tracks in 3D (x, y, defocus z);
- bottom left: x, y and z against time for the longest confirmed tracks;
- bottom middle: localizations and confirmed tracks per analysed frame against time, with
  the frames missing from the recording marked;
- bottom right: the counters (frames recorded, analysed, dropped, latency), each saying
  where it comes from.

Segments and circles are drawn as collections (one artist each, whatever the number of
rows); only the few longest tracks of the bottom-left panel are drawn one by one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from focaltrack.common.files import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.colors import Colormap, Normalize
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_DPI",
    "FIGURE_SIZE_IN",
    "MAX_TRACKS_DRAWN",
    "RecordingFigure",
    "RecordingView",
    "render_recording_figure",
]

#: Figure size (inches) and default resolution: 1600 × 1000 pixels at the default dpi.
FIGURE_SIZE_IN = (16.0, 10.0)
DEFAULT_DPI = 100
#: Tracks drawn in the x–y and 3D panels: the longest ones when a recording has more (an
#: hour at 100 fps can hold hundreds of thousands; more lines would only fill the panel).
MAX_TRACKS_DRAWN = 2000
#: Tracks drawn one by one in the x, y, z against time panel.
LONGEST_TRACKS = 6

#: A panel's place in the PNG: (left, top, right, bottom) in pixels, origin top left.
PixelBox = tuple[int, int, int, int]


@dataclass(frozen=True)
class RecordingView:
    """What the figure shows of one recording (the reader fills it; see the module doc).

    ``frame_index`` and ``t_acq_s``: the recording's ``frame_meta`` (every recorded frame,
    analysed or not). ``loc``: the localization columns ``frame``, ``x_um``, ``y_um``,
    ``z_um``; ``tracks``: ``frame``, ``track_id``, ``x_um``, ``y_um``, ``z_um`` and a
    boolean ``confirmed``. ``image``: the pixels of the camera frame ``image_frame``, or
    None when the recording has no frames (then ``image_note`` says why). ``counters``:
    sections of (label, value) lines for the text box, each section titled with where its
    numbers come from.
    """

    name: str
    pixel_size_um: float
    frame_shape: tuple[int, int]
    frame_index: np.ndarray
    t_acq_s: np.ndarray
    loc: Mapping[str, np.ndarray]
    tracks: Mapping[str, np.ndarray]
    image: np.ndarray | None
    image_frame: int | None
    image_note: str = ""
    title: str = ""
    counters: Sequence[tuple[str, Sequence[tuple[str, str]]]] = field(default_factory=tuple)


@dataclass(frozen=True)
class RecordingFigure:
    """The figure written: its path, its size in pixels (width, height), where each panel
    lies in the PNG (``frame``, ``tracks_xy``, ``tracks_3d``, ``longest``, ``counts``,
    ``counters``), and the note drawn in each panel that had nothing to show."""

    path: Path
    size_px: tuple[int, int]
    panels: dict[str, PixelBox]
    notes: dict[str, str]


def render_recording_figure(
    view: RecordingView, path: str | os.PathLike[str], *, dpi: int = DEFAULT_DPI
) -> RecordingFigure:
    """Draw the recording figure into ``path`` (PNG), atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"output directory {path.parent} does not exist")
    if dpi < 20 or dpi > 600:
        raise ValueError(f"dpi must be 20..600, got {dpi}")
    fig = Figure(figsize=FIGURE_SIZE_IN, dpi=dpi, layout="constrained")
    gs = fig.add_gridspec(2, 3, width_ratios=[1.2, 1.0, 1.0], height_ratios=[1.25, 1.0])
    t_rel, t_label = _time_axis(view)
    z_norm = _norm(view.loc["z_um"])
    notes: dict[str, str] = {}
    axes: dict[str, Any] = {}

    axes["frame"] = fig.add_subplot(gs[0, 0])
    _frame_panel(fig, axes["frame"], view, z_norm, notes)

    segs = _Segments.of(view.tracks, t_rel(view.tracks["frame"]))
    t_norm = _norm(segs.t if len(segs.t) else t_rel(view.frame_index))
    axes["tracks_xy"] = fig.add_subplot(gs[0, 1])
    _xy_panel(fig, axes["tracks_xy"], view, segs, t_norm, t_label, notes)
    axes["tracks_3d"] = fig.add_subplot(gs[0, 2], projection="3d")
    _xyz_panel(axes["tracks_3d"], segs, t_norm, notes)

    sub = gs[1, 0].subgridspec(3, 1, hspace=0.0)
    first = fig.add_subplot(sub[0])
    longest = [first, fig.add_subplot(sub[1], sharex=first), fig.add_subplot(sub[2], sharex=first)]
    axes["longest"] = longest
    _longest_panel(longest, view, t_rel, t_label, notes)
    axes["counts"] = fig.add_subplot(gs[1, 1])
    _counts_panel(axes["counts"], view, t_rel, t_label, notes)
    axes["counters"] = fig.add_subplot(gs[1, 2])
    _counters_panel(axes["counters"], view)

    h, w = view.frame_shape
    fig.suptitle(
        f"focaltrack recording {view.name} — {len(view.frame_index)} frames of {w}×{h} px at "
        f"{view.pixel_size_um:g} µm/px" + (f" — {view.title}" if view.title else ""),
        fontsize=12,
    )
    # format= given: matplotlib would otherwise read the format off the temporary's suffix.
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png")
    size = (round(FIGURE_SIZE_IN[0] * dpi), round(FIGURE_SIZE_IN[1] * dpi))
    panels = {name: _pixel_box(fig, ax, size[1]) for name, ax in axes.items()}
    return RecordingFigure(path, size, panels, notes)


# --------------------------------------------------------------------------- helpers


def _time_axis(view: RecordingView) -> tuple[Any, str]:
    """A function frame index → time since the first recorded frame (s), and its label.

    Frames missing from ``frame_meta`` (dropped by the recorder) get a time interpolated
    between their neighbours; without acquisition times the axis is the frame index.
    """
    idx = np.asarray(view.frame_index, dtype=np.int64)
    t = np.asarray(view.t_acq_s, dtype=np.float64)
    ok = np.isfinite(t)
    if ok.sum() >= 2:
        order = np.argsort(idx[ok], kind="stable")
        known_i, known_t = idx[ok][order], t[ok][order]
        t0 = float(known_t[0])

        def to_time(frames: np.ndarray) -> np.ndarray:
            f = np.asarray(frames, dtype=np.float64)
            out: np.ndarray = np.interp(f, known_i, known_t - t0)
            return out

        return to_time, "time (s)"

    def to_frame(frames: np.ndarray) -> np.ndarray:
        return np.asarray(frames, dtype=np.float64)

    return to_frame, "camera frame"


def _norm(values: np.ndarray) -> Normalize:
    """A colour scale over the finite values (0–1 when there are none or one)."""
    from matplotlib.colors import Normalize

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 1.0)
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    return Normalize(vmin=lo, vmax=hi)


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.35",
            fontsize=11, wrap=True)  # fmt: skip


def _field_extent(view: RecordingView) -> tuple[float, float, float, float]:
    """(left, right, bottom, top) of the camera field in µm: pixel (0, 0)'s centre at 0
    and row 0 at the top, as the localizations are given."""
    h, w = view.frame_shape
    px = view.pixel_size_um
    return (-0.5 * px, (w - 0.5) * px, (h - 0.5) * px, -0.5 * px)


def _frame_panel(
    fig: Figure, ax: Axes, view: RecordingView, z_norm: Normalize, notes: dict[str, str]
) -> None:
    import matplotlib
    from matplotlib.cm import ScalarMappable

    extent = _field_extent(view)
    if view.image is not None:
        img = np.asarray(view.image, dtype=np.float32)
        lo, hi = (float(v) for v in np.percentile(img, [1.0, 99.8]))
        if not hi > lo:
            hi = lo + 1.0
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, extent=extent, interpolation="nearest")
    else:
        ax.set_facecolor("0.93")
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
    cmap: Colormap = matplotlib.colormaps["viridis"]
    n_here = 0
    if view.image_frame is not None:
        sel = np.asarray(view.loc["frame"]) == view.image_frame
        x, y, z = (np.asarray(view.loc[c], dtype=np.float64)[sel] for c in ("x_um", "y_um", "z_um"))
        n_here = int(sel.sum())
        colours = cmap(z_norm(np.where(np.isfinite(z), z, float(z_norm.vmin or 0.0))))
        ax.scatter(x, y, s=90, facecolors="none", edgecolors=colours, linewidths=1.4)
    ax.set_xlim(extent[0], extent[1])
    ax.set_ylim(extent[2], extent[3])
    ax.set_aspect("equal")
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")
    cb = fig.colorbar(ScalarMappable(norm=z_norm, cmap=cmap), ax=ax, shrink=0.85, pad=0.01)
    cb.set_label("z, defocus (µm)")
    if view.image_frame is None:
        notes["frame"] = view.image_note or "no frame to show"
        _note(ax, notes["frame"])
        ax.set_title("no frame")
        return
    what = f"frame {view.image_frame}: {n_here} localizations"
    if view.image is None:
        notes["frame"] = view.image_note or "frames not recorded"
        ax.set_title(f"{what}\n({notes['frame']})", fontsize=10)
    else:
        ax.set_title(what)


@dataclass(frozen=True)
class _Segments:
    """The tracks as segments between successive rows of each track (the longest
    `MAX_TRACKS_DRAWN` tracks): (m, 2, 3) coordinates, the time of each segment's end, and
    whether the track was confirmed there."""

    xyz: np.ndarray
    t: np.ndarray
    confirmed: np.ndarray
    #: The last position of each track drawn (where it was when it ended or the file did).
    ends: np.ndarray
    n_tracks: int
    n_drawn: int

    @classmethod
    def of(cls, tracks: Mapping[str, np.ndarray], t_rows: np.ndarray) -> _Segments:
        tid = np.asarray(tracks["track_id"], dtype=np.int64)
        ids, counts = np.unique(tid, return_counts=True)
        keep = np.ones(len(tid), dtype=bool)
        if len(ids) > MAX_TRACKS_DRAWN:
            longest = ids[np.argsort(-counts, kind="stable")[:MAX_TRACKS_DRAWN]]
            keep = np.isin(tid, longest)
        frame = np.asarray(tracks["frame"], dtype=np.int64)[keep]
        tid = tid[keep]
        order = np.lexsort((frame, tid))
        xyz = np.stack(
            [
                np.asarray(tracks[c], dtype=np.float64)[keep][order]
                for c in ("x_um", "y_um", "z_um")
            ],
            axis=1,
        ).reshape(-1, 3)
        tid = tid[order]
        t = np.asarray(t_rows, dtype=np.float64)[keep][order]
        conf = np.asarray(tracks["confirmed"], dtype=bool)[keep][order]
        same = tid[1:] == tid[:-1]
        seg = np.stack([xyz[:-1][same], xyz[1:][same]], axis=1).reshape(-1, 2, 3)
        finite = np.all(np.isfinite(seg), axis=(1, 2))
        ends = xyz[np.append(~same, True)] if len(tid) else xyz
        return cls(
            xyz=seg[finite],
            t=t[1:][same][finite],
            confirmed=conf[1:][same][finite],
            ends=ends[np.all(np.isfinite(ends), axis=1)],
            n_tracks=len(ids),
            n_drawn=min(len(ids), MAX_TRACKS_DRAWN),
        )

    def title(self, what: str) -> str:
        if self.n_drawn < self.n_tracks:
            return f"{what}: the {self.n_drawn} longest of {self.n_tracks} tracks"
        return f"{what}: {self.n_tracks} tracks"


def _xy_panel(
    fig: Figure,
    ax: Axes,
    view: RecordingView,
    segs: _Segments,
    t_norm: Normalize,
    t_label: str,
    notes: dict[str, str],
) -> None:
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import LineCollection
    from matplotlib.patches import Rectangle

    left, right, bottom, top = _field_extent(view)
    ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, ls="--",
                           lw=0.8, ec="0.5", label="camera field"))  # fmt: skip
    xy = segs.xyz[:, :, :2]
    c = segs.confirmed
    if np.any(~c):
        ax.add_collection(LineCollection(xy[~c], colors="0.65", linewidths=0.6))
    if np.any(c):
        lines = LineCollection(xy[c], cmap="plasma", norm=t_norm, linewidths=1.1)
        lines.set_array(segs.t[c])
        ax.add_collection(lines)
    ax.scatter(segs.ends[:, 0], segs.ends[:, 1], s=9, c="k", marker="o", lw=0, label="track ends")
    ax.autoscale_view()
    ax.set_aspect("equal", adjustable="datalim")
    if not ax.yaxis_inverted():
        ax.invert_yaxis()  # row 0 at the top, as in the frame
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")
    cb = fig.colorbar(ScalarMappable(norm=t_norm, cmap="plasma"), ax=ax, shrink=0.85, pad=0.01)
    cb.set_label(t_label + " (confirmed; tentative in grey, ends in black)")
    if not len(segs.xyz):
        notes["tracks_xy"] = "no tracks in this recording" if not segs.n_tracks else (
            "no track lasted two frames")  # fmt: skip
        _note(ax, notes["tracks_xy"])
    ax.set_title(segs.title("x–y"))


def _xyz_panel(ax: Any, segs: _Segments, t_norm: Normalize, notes: dict[str, str]) -> None:
    from mpl_toolkits.mplot3d.art3d import Line3DCollection

    c = segs.confirmed
    # an empty collection is not added: mplot3d cannot take the limits of no points
    if np.any(~c):
        ax.add_collection3d(Line3DCollection(segs.xyz[~c], colors="0.65", linewidths=0.5))
    if np.any(c):
        lines = Line3DCollection(segs.xyz[c], cmap="plasma", norm=t_norm, linewidths=1.0)
        lines.set_array(segs.t[c])
        ax.add_collection3d(lines)
    if len(segs.ends):
        e = segs.ends
        ax.scatter(e[:, 0], e[:, 1], e[:, 2], s=6, c="k", marker="o", depthshade=False)
    if len(segs.xyz):
        pts = np.vstack([segs.xyz.reshape(-1, 3), segs.ends])
        lo, hi = pts.min(axis=0), pts.max(axis=0)
        pad = np.maximum((hi - lo) * 0.05, 0.5)
        ax.set_xlim(lo[0] - pad[0], hi[0] + pad[0])
        ax.set_ylim(hi[1] + pad[1], lo[1] - pad[1])  # y down, as in the frame
        ax.set_zlim(lo[2] - pad[2], hi[2] + pad[2])
    else:
        notes["tracks_3d"] = "no tracks in 3D"
        ax.text2D(0.5, 0.5, notes["tracks_3d"], ha="center", va="center",
                  transform=ax.transAxes, color="0.35")  # fmt: skip
    ax.set_xlabel("x (µm)")
    ax.set_ylabel("y (µm)")
    ax.set_zlabel("z, defocus (µm)")
    ax.set_title(segs.title("3D"))


def _longest_panel(
    axes: list[Axes], view: RecordingView, t_rel: Any, t_label: str, notes: dict[str, str]
) -> None:
    tr = view.tracks
    conf = np.asarray(tr["confirmed"], dtype=bool)
    tid = np.asarray(tr["track_id"], dtype=np.int64)[conf]
    ids, counts = np.unique(tid, return_counts=True)
    top = ids[np.argsort(-counts, kind="stable")[:LONGEST_TRACKS]]
    frame = np.asarray(tr["frame"], dtype=np.int64)[conf]
    cols = {c: np.asarray(tr[c], dtype=np.float64)[conf] for c in ("x_um", "y_um", "z_um")}
    for k, track in enumerate(top):  # a handful of tracks: one line each
        rows = np.flatnonzero(tid == track)
        rows = rows[np.argsort(frame[rows], kind="stable")]
        t = t_rel(frame[rows])
        for ax, c in zip(axes, ("x_um", "y_um", "z_um"), strict=True):
            ax.plot(t, cols[c][rows], lw=1.0, color=f"C{k}", label=f"track {track}")
    for ax, c in zip(axes, ("x", "y", "z"), strict=True):
        ax.set_ylabel(f"{c} (µm)")
        ax.grid(True, alpha=0.3)
    for ax in axes[:-1]:
        ax.tick_params(labelbottom=False)
    axes[-1].set_xlabel(t_label)
    if len(top):
        axes[0].set_title(f"the {len(top)} longest confirmed tracks")
        axes[0].legend(fontsize=7, ncols=min(len(top), 3), loc="upper right")
    else:
        notes["longest"] = "no confirmed track"
        axes[0].set_title("longest confirmed tracks")
        _note(axes[1], notes["longest"])


def _counts_panel(
    ax: Axes, view: RecordingView, t_rel: Any, t_label: str, notes: dict[str, str]
) -> None:
    loc_f, loc_n = np.unique(np.asarray(view.loc["frame"], dtype=np.int64), return_counts=True)
    tr = view.tracks
    conf = np.asarray(tr["confirmed"], dtype=bool)
    trk_f = np.asarray(tr["frame"], dtype=np.int64)
    # per analysed frame: a frame with tracks but no localization counts 0 localizations
    analysed = np.union1d(loc_f, trk_f)
    n_loc = np.zeros(len(analysed), dtype=np.int64)
    n_loc[np.searchsorted(analysed, loc_f)] = loc_n
    n_conf = np.bincount(np.searchsorted(analysed, trk_f[conf]), minlength=len(analysed))
    t = t_rel(analysed)
    ax.plot(t, n_loc, lw=1.0, label="localizations")
    ax.plot(t, n_conf, lw=1.0, label="confirmed tracks")
    missing = _missing_frames(view.frame_index)
    if len(missing):
        ax.vlines(t_rel(missing), 0, 1, transform=ax.get_xaxis_transform(), colors="tab:red",
                  alpha=0.25, lw=0.8, label="frames missing from the recording")  # fmt: skip
    ax.set_xlabel(t_label)
    ax.set_ylabel("per analysed frame")
    ax.grid(True, alpha=0.3)
    ax.set_title("localizations and confirmed tracks per frame")
    if len(analysed):
        ax.legend(fontsize=8, loc="upper right")
    else:
        notes["counts"] = "no frame with results"
        _note(ax, notes["counts"])


def _missing_frames(frame_index: np.ndarray) -> np.ndarray:
    """Camera frame indices between the first and last recorded ones that the recording
    lacks (capped at a million, beyond which a sample is as telling)."""
    idx = np.unique(np.asarray(frame_index, dtype=np.int64))
    if len(idx) < 2:
        return idx[:0]
    gaps = np.diff(idx) - 1
    starts = idx[:-1][gaps > 0] + 1
    lengths = gaps[gaps > 0]
    if not len(starts) or lengths.sum() > 1_000_000:
        return starts
    return np.repeat(starts, lengths) + (
        np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    )


def _counters_panel(ax: Axes, view: RecordingView) -> None:
    ax.axis("off")
    lines: list[str] = []
    for title, rows in view.counters:
        if lines:
            lines.append("")
        lines.append(title)
        width = max((len(k) for k, _ in rows), default=0)
        lines += [f"  {k:<{width}}  {v}" for k, v in rows]
    ax.text(0.0, 1.0, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8.5,
            transform=ax.transAxes, wrap=True)  # fmt: skip
    ax.set_title("counters")


def _pixel_box(fig: Figure, ax: Any, height_px: int) -> PixelBox:
    """Where ``ax`` (or the union of a list of axes) lies in the saved PNG."""
    from matplotlib.transforms import Bbox

    boxes = [a.get_window_extent() for a in (ax if isinstance(ax, list) else [ax])]
    b = Bbox.union(boxes)
    return (round(b.x0), round(height_px - b.y1), round(b.x1), round(height_px - b.y0))

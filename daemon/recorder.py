"""Recording to HDF5: one writer thread behind a bounded queue, SWMR so a reader can follow.

File layout (``schema_version`` 1), every dataset created before SWMR starts and extended
along its first axis afterwards:

* ``frames`` — (N, H, W) camera pixels (the camera's dtype, uint16 normally), chunked one
  frame per chunk ``(1, H, W)``; absent when recording without frames.
* ``frame_meta/index``, ``frame_meta/t_acq_s``, ``frame_meta/stage_z_um``,
  ``frame_meta/exposure_ms`` — one row per recorded frame, same order as ``frames``.
* ``localizations/{frame, x_um, y_um, z_um, score}`` — one row per localization; ``frame``
  is the camera frame index (``frame_meta/index``). Since the localizer fits (issue #13)
  also ``sigma_x_um, sigma_y_um, sigma_z_um, photons, background`` (float32, NaN where not
  fitted) and ``flags`` (uint16, `focaltrack.records.LocFlag` bits, listed in the dataset's
  ``bits`` attribute); a file without them is read as NaN and NOT_FITTED.
* ``tracks/{frame, track_id, x_um, y_um, z_um, vx_um_s, vy_um_s, vz_um_s, sigma_x_um,
  sigma_y_um, sigma_z_um, status, age_frames, misses}`` — one row per live track after each
  analysed frame; ``status`` is an HDF5 enum (0 tentative, 1 confirmed, 2 coasting).

The three tables are the HDF5 columns of the records `FrameMeta`, `Localizations` and
`Tracks` (`focaltrack.records`); the lists above are what they hold at schema 1 (datasets
are only ever added within a schema version: a reader takes a missing one as its column's
``absent`` value).

Root attributes: ``schema_version``, ``kind`` ("focaltrack.recording"), ``created_utc``,
``calibration_sha256``, ``model``, ``pixel_size_um``, ``frames_recorded`` (bool), plus any
extra given; ``complete`` is False while writing and set True (with ``n_frames``) after a
clean `Recorder.stop` — a file left by a crash keeps ``complete = False`` and everything
flushed before the crash.

Durability: the writer appends what it has and calls ``flush()`` at least every
``flush_interval_s`` (and when many frames are waiting), so a reader opening the file with
``h5py.File(path, "r", libver="latest", swmr=True)`` and calling ``refresh()`` on datasets
sees data at most about one interval old, and a ``kill -9`` loses at most about that much.
``frames_flushed`` counts the frames on disk for certain.

A follower reads only the rows the root dataset ``flushed`` vouches for: (frames,
localizations, track rows) on disk for certain, rewritten after each flush and flushed after
everything it counts. HDF5 may show a dataset's new length to a reader before the rows'
values reach the disk (those read as zeros until the next flush), so a dataset's length alone
is no promise. A file without ``flushed`` (written before it was added) has only the lengths.

A writer that dies leaves HDF5's "open for writing" mark in the file, which every plain open
refuses; `focaltrack.daemon.repair` clears it. While it writes, the writer holds a shared
lock on the file (`hold_writer_lock`) so that a repair never touches a file still being
written: HDF5's own lock is dropped when SWMR writing starts, and the mark alone looks the
same whether the writer is alive or dead.

Producers never block: `Recorder.add_frame` and `Recorder.add_results` put into a bounded
queue and return False (counted in ``dropped``) when it is full.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from focaltrack.common.errors import FocaltrackError
from focaltrack.records import (
    FLUSHED,
    STATUS_CODES,
    FrameMeta,
    Localizations,
    LocFlag,
    Tracks,
    TrackStatus,
    columns_of,
    fill_absent,
    hdf5_columns,
    to_columns,
)

if sys.platform != "win32":
    import fcntl

if TYPE_CHECKING:
    from focaltrack.drivers.base import Frame

log = logging.getLogger(__name__)

__all__ = [
    "RECORDING_KIND",
    "RECORDING_SCHEMA_VERSION",
    "Recorder",
    "RecorderError",
    "RecordingSummary",
    "hold_writer_lock",
]

RECORDING_KIND = "focaltrack.recording"
RECORDING_SCHEMA_VERSION = 1

# The datasets of each group: the HDF5 columns of its record (name -> dtype, "enum" for
# the track status), so a field added to a record is recorded without a change here.
FRAME_META_COLUMNS: dict[str, str] = hdf5_columns(FrameMeta)
LOC_COLUMNS: dict[str, str] = hdf5_columns(Localizations)
TRACK_COLUMNS: dict[str, str] = hdf5_columns(Tracks)
_TABLE_CHUNK = 4096
#: Write out early when this many frames are waiting (bounds the writer's memory).
_MAX_PENDING_FRAMES = 32


class RecorderError(FocaltrackError, RuntimeError):
    """The recording could not be created or written (the message names the file)."""


@dataclass(frozen=True, slots=True)
class RecordingSummary:
    path: str
    frames: int
    localizations: int
    track_rows: int
    dropped: int
    duration_s: float
    error: str | None = None


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def hold_writer_lock(path: str | os.PathLike[str]) -> int | None:
    """Take a shared ``flock`` on ``path`` for as long as the returned descriptor stays open
    (`os.close` releases it): the sign, for `focaltrack.daemon.repair`, that a live process
    writes the file. Shared, so that SWMR readers (HDF5 takes a shared lock for them) still
    open it. None where the platform or the file system has no such locks; the recording
    goes on without."""
    if sys.platform == "win32":
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        log.debug("recording %s: no writer lock (%s)", path, e)
        return None
    return fd


class Recorder:
    """Writes one recording file; see the module docstring for the layout.

    ``frame_shape`` (H, W) and ``frame_dtype``: the camera's; ``frames=False`` records only
    metadata, localizations and tracks. ``attrs``: extra root attributes (scalars/strings).
    ``on_frames_written(n)`` is called from the writer thread after each write-out (metrics).
    The file is created in `start`, which raises `RecorderError` if it cannot be (an
    existing file is never overwritten).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        frame_shape: tuple[int, int],
        frame_dtype: str | np.dtype[Any] = "uint16",
        frames: bool = True,
        calibration_sha256: str = "",
        model: str = "",
        pixel_size_um: float = 0.0,
        attrs: Mapping[str, Any] | None = None,
        flush_interval_s: float = 1.0,
        queue_frames: int = 64,
        on_frames_written: Callable[[int], None] | None = None,
    ) -> None:
        if not (flush_interval_s > 0):
            raise ValueError(f"flush_interval_s must be > 0, got {flush_interval_s}")
        if int(queue_frames) < 1:
            raise ValueError(f"queue_frames must be >= 1, got {queue_frames}")
        h, w = (int(frame_shape[0]), int(frame_shape[1]))
        if h < 1 or w < 1:
            raise ValueError(f"frame shape must be positive, got {frame_shape}")
        self.path = Path(path)
        self.frame_shape = (h, w)
        self.frame_dtype = np.dtype(frame_dtype)
        self.record_frames = bool(frames)
        self.attrs: dict[str, Any] = {
            "schema_version": RECORDING_SCHEMA_VERSION,
            "kind": RECORDING_KIND,
            "created_utc": _utc_now(),
            "calibration_sha256": str(calibration_sha256 or ""),
            "model": str(model or ""),
            "pixel_size_um": float(pixel_size_um),
            "frames_recorded": self.record_frames,
            "frame_shape": [h, w],
            "complete": False,
            **dict(attrs or {}),
        }
        self.flush_interval_s = float(flush_interval_s)
        # Results are small; frames are what the bound is about. Twice the frames, so that
        # each frame's result row fits beside it.
        self._q: queue.Queue[tuple[str, Any] | None] = queue.Queue(maxsize=2 * int(queue_frames))
        self._on_written = on_frames_written
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._stopping = False
        self.dropped = 0
        self.frames_written = 0
        #: frames on disk for certain: written and flushed (a crash keeps them)
        self.frames_flushed = 0
        self.localizations_written = 0
        self.track_rows_written = 0
        self.error: str | None = None
        self._t0 = 0.0
        self._summary: RecordingSummary | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Create the file and every dataset, switch to SWMR, start the writer thread."""
        import h5py

        if self._thread is not None:
            raise RecorderError("this recorder was already started")
        if self.path.exists():
            raise RecorderError(f"recording {self.path} already exists")
        if not self.path.parent.is_dir():
            raise RecorderError(f"recording directory {self.path.parent} does not exist")
        try:
            f = h5py.File(self.path, "w-", libver="latest")
        except OSError as e:
            raise RecorderError(f"cannot create recording {self.path}: {e}") from e
        lock: int | None = None
        try:
            self._create(f)
            f.swmr_mode = True
            # At once: HDF5 held an exclusive lock of its own until SWMR writing started
            # (and the file's mark said "not SWMR", which a repair refuses anyway).
            lock = hold_writer_lock(self.path)
            f.flush()
        except BaseException as e:
            f.close()
            if lock is not None:
                os.close(lock)
            self.path.unlink(missing_ok=True)
            raise RecorderError(f"cannot set up recording {self.path}: {e}") from e
        self._t0 = time.monotonic()
        self._thread = threading.Thread(
            target=self._run, args=(f, lock), name="focaltrack-recorder", daemon=True
        )
        self._thread.start()

    def _create(self, f: Any) -> None:
        import h5py

        h, w = self.frame_shape
        for k, v in self.attrs.items():
            f.attrs[k] = v
        if self.record_frames:
            f.create_dataset(
                "frames",
                shape=(0, h, w),
                maxshape=(None, h, w),
                chunks=(1, h, w),
                dtype=self.frame_dtype,
            )
        status_dt = h5py.enum_dtype(STATUS_CODES, basetype="u1")
        for group, cols in (
            ("frame_meta", FRAME_META_COLUMNS),
            ("localizations", LOC_COLUMNS),
            ("tracks", TRACK_COLUMNS),
        ):
            g = f.create_group(group)
            for name, dt in cols.items():
                g.create_dataset(
                    name,
                    shape=(0,),
                    maxshape=(None,),
                    chunks=(_TABLE_CHUNK,),
                    dtype=status_dt if dt == "enum" else np.dtype(dt),
                )
        flushed = f.create_dataset(FLUSHED, shape=(3,), chunks=(3,), dtype=np.int64)
        flushed.attrs["columns"] = "frames, localizations, track_rows"
        f["tracks/status"].attrs["codes"] = ", ".join(f"{c} {s}" for s, c in STATUS_CODES.items())
        f["localizations/flags"].attrs["bits"] = ", ".join(
            f"{int(b)} {b.name.lower()}" for b in LocFlag if b.name
        )

    def stop(self, timeout_s: float = 10.0) -> RecordingSummary:
        """Write out everything queued, flush, close, mark the file complete."""
        t = self._thread
        if t is None:
            raise RecorderError("the recorder was never started")
        with self._lock:
            self._stopping = True
        if self._summary is not None:
            return self._summary
        deadline = time.monotonic() + timeout_s
        while True:  # the sentinel must get in even if the queue is full
            try:
                self._q.put(None, timeout=0.1)
                break
            except queue.Full:
                if not t.is_alive() or time.monotonic() > deadline:
                    break
        t.join(max(deadline - time.monotonic(), 0.1))
        if t.is_alive():
            self.error = self.error or f"the writer did not finish within {timeout_s:g} s"
            log.error("recording %s: %s", self.path, self.error)
        else:
            self._mark_complete()
        self._summary = RecordingSummary(
            str(self.path),
            self.frames_written,
            self.localizations_written,
            self.track_rows_written,
            self.dropped,
            time.monotonic() - self._t0,
            self.error,
        )
        return self._summary

    def _mark_complete(self) -> None:
        import h5py

        try:
            with h5py.File(self.path, "r+", libver="latest") as f:
                f.attrs["complete"] = self.error is None
                f.attrs["n_frames"] = self.frames_written
                f.attrs["dropped"] = self.dropped
                f.attrs["closed_utc"] = _utc_now()
        except OSError as e:
            log.warning("could not mark recording %s complete: %s", self.path, e)

    # ------------------------------------------------------------------ producers
    def _put(self, item: tuple[str, Any]) -> bool:
        if self._stopping or self.error is not None:
            return False
        try:
            self._q.put_nowait(item)
            return True
        except queue.Full:
            self.dropped += 1
            return False

    def add_frame(self, frame: Frame) -> bool:
        """Queue one camera frame (pixels and metadata); False if the queue is full."""
        px = frame.pixels
        if self.record_frames and tuple(px.shape) != self.frame_shape:
            self.dropped += 1
            log.warning(
                "recording %s: frame %d is %s, the recording is %s; skipped",
                self.path.name,
                frame.index,
                px.shape,
                self.frame_shape,
            )
            return False
        # FrameMeta's fields are named as the Frame's attributes
        meta = tuple(
            int(getattr(frame, name)) if dt[0] in "iu" else float(getattr(frame, name))
            for name, dt in FRAME_META_COLUMNS.items()
        )
        return self._put(("frame", (meta, px if self.record_frames else None)))

    def add_results(
        self,
        frame_index: int,
        loc: Localizations | Mapping[str, np.ndarray] | None,
        tracks: Tracks | Mapping[str, np.ndarray] | None,
    ) -> bool:
        """Queue one frame's localizations and tracks: the records, or their columns by name
        (tracks as `TrackFrame.as_columns`; ``status`` as codes or strings, or a boolean
        ``confirmed`` instead). The rows get ``frame = frame_index``."""
        if isinstance(loc, Localizations):
            loc = to_columns(loc)
        if isinstance(tracks, Tracks):
            tracks = to_columns(tracks)
        return self._put(("results", (int(frame_index), loc, tracks)))

    # ------------------------------------------------------------------ writer
    def _run(self, f: Any, lock: int | None) -> None:
        pending_meta: list[tuple[int, float, float, float]] = []
        pending_px: list[np.ndarray] = []
        loc_rows: dict[str, list[np.ndarray]] = {k: [] for k in LOC_COLUMNS}
        trk_rows: dict[str, list[np.ndarray]] = {k: [] for k in TRACK_COLUMNS}
        next_flush = time.monotonic() + self.flush_interval_s
        done = False
        try:
            while not done:
                timeout = max(next_flush - time.monotonic(), 0.0)
                try:
                    item = self._q.get(timeout=timeout)
                except queue.Empty:
                    item = ("tick", None)
                if item is None:
                    done = True
                elif item[0] == "frame":
                    meta, px = item[1]
                    pending_meta.append(meta)
                    if px is not None:
                        pending_px.append(px)
                elif item[0] == "results":
                    self._collect(item[1], loc_rows, trk_rows)
                now = time.monotonic()
                if done or now >= next_flush or len(pending_meta) >= _MAX_PENDING_FRAMES:
                    self._write_out(f, pending_meta, pending_px, loc_rows, trk_rows)
                    if done or now >= next_flush:
                        f.flush()
                        self._vouch(f)
                        self.frames_flushed = self.frames_written
                        next_flush = now + self.flush_interval_s
        except Exception as e:
            self.error = f"writing {self.path} failed: {type(e).__name__}: {e}"
            log.error("recording: %s", self.error)
        finally:
            try:
                f.close()
            except Exception as e:
                log.warning("closing recording %s: %s", self.path, e)
            # Released after the close has cleared the mark (and before `_mark_complete`,
            # whose HDF5 open wants an exclusive lock).
            if lock is not None:
                os.close(lock)

    def _vouch(self, f: Any) -> None:
        """After a flush: count what it put on disk, and flush the count alone, so that no
        reader sees it before the rows it counts."""
        ds = f[FLUSHED]
        ds[:] = (self.frames_written, self.localizations_written, self.track_rows_written)
        ds.flush()

    @staticmethod
    def _collect(
        item: tuple[int, Mapping[str, np.ndarray] | None, Mapping[str, np.ndarray] | None],
        loc_rows: dict[str, list[np.ndarray]],
        trk_rows: dict[str, list[np.ndarray]],
    ) -> None:
        index, loc, tracks = item
        if loc is not None:
            _collect_rows(Localizations, index, loc, loc_rows)
        if tracks is not None:
            _collect_rows(Tracks, index, tracks, trk_rows)

    def _write_out(
        self,
        f: Any,
        pending_meta: list[tuple[int, float, float, float]],
        pending_px: list[np.ndarray],
        loc_rows: dict[str, list[np.ndarray]],
        trk_rows: dict[str, list[np.ndarray]],
    ) -> None:
        k = len(pending_meta)
        if k:
            if self.record_frames:
                ds = f["frames"]
                n = ds.shape[0]
                ds.resize(n + k, axis=0)
                ds[n : n + k] = np.stack(pending_px).astype(self.frame_dtype, copy=False)
            cols = list(zip(*pending_meta, strict=True))
            for name, values in zip(FRAME_META_COLUMNS, cols, strict=True):
                _append(f[f"frame_meta/{name}"], np.asarray(values))
            self.frames_written += k
            pending_meta.clear()
            pending_px.clear()
            if self._on_written is not None:
                self._on_written(k)
        if loc_rows["frame"]:
            for name, parts in loc_rows.items():
                _append(f[f"localizations/{name}"], np.concatenate(parts))
                parts.clear()
            self.localizations_written = int(f["localizations/frame"].shape[0])
        if trk_rows["frame"]:
            for name, parts in trk_rows.items():
                _append(f[f"tracks/{name}"], np.concatenate(parts))
                parts.clear()
            self.track_rows_written = int(f["tracks/frame"].shape[0])


def _append(ds: Any, values: np.ndarray) -> None:
    m = len(values)
    if not m:
        return
    n = ds.shape[0]
    ds.resize(n + m, axis=0)
    ds[n : n + m] = values.astype(ds.dtype, copy=False)


def _collect_rows(
    record: type[Any],
    index: int,
    cols: Mapping[str, np.ndarray],
    rows: dict[str, list[np.ndarray]],
) -> None:
    """Append one frame's columns to ``rows`` (the record's HDF5 columns; ``frame`` is the
    frame's index whatever ``cols`` holds; a column with an ``absent`` value may be missing)."""
    spec = [c for c in columns_of(record) if c.hdf5]
    n = len(np.asarray(cols[next(c.name for c in spec if c.wire == "required")]))
    cols = fill_absent(record, cols, n)
    for c in spec:
        if c.name == "frame":
            rows[c.name].append(np.full(n, index, dtype=np.int64))
        elif c.enum is not None:
            rows[c.name].append(_status_codes(cols, n))
        else:
            rows[c.name].append(np.asarray(cols[c.name]).reshape(n))


def _status_codes(tracks: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    if "status" in tracks:
        s = np.asarray(tracks["status"]).reshape(n)
        if s.dtype.kind in "US":
            return np.array([STATUS_CODES[str(v)] for v in s.astype(str)], dtype=np.uint8)
        return s.astype(np.uint8)
    return TrackStatus.of_confirmed(np.asarray(tracks["confirmed"]).reshape(n))

"""Re-analysis of a recording of any length: frames in chunks, rows streamed, resumable, Dask.

`focaltrack localize` runs through here. The frames are read a chunk at a time
(`FrameSource`: an HDF5 dataset sliced, a TIFF's pages by index), each chunk goes through
`Localizer.localize_batch` in the same batches as an all-at-once run (chunks are whole
batches, aligned on frame 0, so the networks see the same inputs and the rows are the same),
and its rows are appended to a journal beside the output:

* ``<out>.partial``: the rows so far, fixed-width binary (`ROW_DTYPE`), appended per chunk;
* ``<out>.partial.json``: what the rows are of (the input, the model, the settings) and how
  many frames and rows are complete; replaced (write, flush, rename) after each chunk's rows
  are flushed to disk, so it never counts rows that are not there.

A rerun with the same identity truncates the journal to the rows the state counts (a chunk
cut off mid-write leaves at most a partial tail) and continues with the next frame; another
identity is refused unless ``force``. When every frame is done the output (CSV or HDF5) is
written from the journal in blocks under a temporary name and renamed into place: a finished
output appears only complete, as before, and the journal is deleted.

With Dask the chunks are the tasks: `analyse_chunk` gets the file's path and a frame range
(never pixels), reads its frames itself and keeps one `Localizer` per process
(`localizer_for`); the client gathers the results in frame order and appends them, so the
output is the one a single process writes.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from focaltrack.common.errors import FocaltrackError
from focaltrack.common.files import atomic_path
from focaltrack.common.progress import progress_bar
from focaltrack.records import Localizations, columns_of, csv_columns, flushed_counts
from focaltrack.records.columns import csv_rows

if TYPE_CHECKING:
    from focaltrack.models.localizer import Localizer

#: The CSV header and the HDF5 datasets: the `Localizations` record's columns.
COLUMNS = csv_columns(Localizations)
#: The column added where the frames' focus is known (input from a recording).
STAGE_Z = "stage_z_um"
#: One journal row: the output's columns and the frame's focus (NaN where unknown).
ROW_DTYPE = np.dtype(
    [(c.name, np.dtype(c.dtype).newbyteorder("<")) for c in columns_of(Localizations)]
)
#: Rows converted per block when the journal becomes the output (bounded memory).
BLOCK_ROWS = 1 << 20
#: Frames hashed to recognise the input on a rerun (with its shape and dtype).
IDENTITY_FRAMES = 8
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
#: 2: the rows gained the fit's columns (`ROW_DTYPE`); a journal of version 1 starts over.
_STATE_VERSION = 2


class ReanalysisError(FocaltrackError, ValueError):
    """A partial output that does not belong to this run (one line, for the CLI)."""


# ----------------------------------------------------------------------------- input


@dataclasses.dataclass(frozen=True)
class FrameSource:
    """Where a recording's frames are, without the pixels: picklable, sent to Dask workers.

    ``kind``: ``"h5"`` or ``"tiff"``. ``dataset``: the HDF5 dataset of the frames.
    ``pages``: a TIFF with one page per frame (read in chunks); otherwise a TIFF is read
    whole, as tifffile lays it out. ``stage_z``: the HDF5 file has ``frame_meta/stage_z_um``
    with one value per frame (a service recording).
    """

    path: str
    kind: str
    dataset: str | None
    n_frames: int
    frame_shape: tuple[int, int]
    dtype: str
    pages: bool = True
    stage_z: bool = False

    def read(self, start: int, stop: int) -> np.ndarray:
        """Frames ``start`` to ``stop`` (exclusive) as an (n, H, W) array."""
        if self.kind == "h5":
            with _open_h5(Path(self.path)) as f:
                ds = f[self.dataset]
                arr = np.asarray(ds[()])[None] if ds.ndim == 2 else np.asarray(ds[start:stop])
        elif self.pages:
            import tifffile

            with tifffile.TiffFile(self.path) as tf:
                arr = np.asarray(tf.asarray(key=range(start, stop)))
        else:
            whole = _read_tiff_whole(Path(self.path))
            arr = whole.reshape(self.n_frames, *self.frame_shape)[start:stop]
        return arr.reshape(stop - start, *self.frame_shape)

    def read_stage_z(self, start: int, stop: int) -> np.ndarray:
        """The focus (µm) of frames ``start`` to ``stop``; NaN where the file has none."""
        if not self.stage_z:
            return np.full(stop - start, math.nan)
        with _open_h5(Path(self.path)) as f:
            return np.asarray(f["frame_meta/stage_z_um"][start:stop], dtype=np.float64)


def open_frames(path: Path, dataset: str | None = None) -> FrameSource:
    """The frames of a TIFF or HDF5 file, checked (shape, non-empty), without reading them."""
    if not path.exists():
        raise ValueError(f"input {path} does not exist")
    if path.is_dir():
        raise ValueError(f"input {path} is a directory, not a file")
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic.startswith(_HDF5_MAGIC):
        return _h5_source(path, dataset)
    if magic[:4] in _TIFF_MAGICS:
        if dataset is not None:
            raise ValueError(f"--dataset applies to HDF5 input; {path} is a TIFF")
        return _tiff_source(path)
    raise ValueError(f"{path} is neither a TIFF nor an HDF5 file")


def _frames_shape(path: Path, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(shape) == 2:
        shape = (1, *shape)
    if len(shape) != 3:
        raise ValueError(
            f"{path}: frames must be 2-D images (a stack is N × H × W), got shape {shape}"
        )
    if math.prod(shape) == 0:
        raise ValueError(f"{path} contains no frames")
    return (int(shape[0]), int(shape[1]), int(shape[2]))


def _open_h5(path: Path) -> Any:
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as e:
        # A recording still being written, or left by a crash (kill -9, power loss), keeps
        # its "open for writing" mark and refuses a plain open; as a SWMR reader it opens,
        # with everything the writer had flushed.
        try:
            return h5py.File(path, "r", libver="latest", swmr=True)
        except OSError:
            raise ValueError(f"{path} is not a readable HDF5 file: {e}") from e


def _h5_source(path: Path, dataset: str | None) -> FrameSource:
    import h5py

    with _open_h5(path) as f:
        if dataset is not None:
            if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
                raise ValueError(f"{path} has no dataset {dataset!r}")
            name = dataset
        else:
            found: list[str] = []
            f.visititems(
                lambda n, obj: (
                    found.append(n) if isinstance(obj, h5py.Dataset) and obj.ndim == 3 else None
                )
            )
            if len(found) != 1:
                what = (
                    "no 3-D dataset" if not found else f"several 3-D datasets ({', '.join(found)})"
                )
                raise ValueError(f"{path} has {what}; name the frames with --dataset")
            name = found[0]
        ds = f[name]
        shape = tuple(ds.shape)
        vouched = flushed_counts(f)[0]
        if name == "frames" and vouched is not None and len(shape) == 3:
            # A recording still written, or left by a crash: only the frames its writer
            # vouched for after a flush (rows past them can still read as zeros).
            shape = (min(shape[0], vouched), *shape[1:])
        n, h, w = _frames_shape(path, shape)
        z = f.get("frame_meta/stage_z_um")
        has_z = isinstance(z, h5py.Dataset) and z.ndim == 1 and z.shape[0] >= n
        return FrameSource(str(path), "h5", name, n, (h, w), str(ds.dtype), True, has_z)


def _tiff_source(path: Path) -> FrameSource:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            if len(tf.pages) == 0:
                raise ValueError(f"{path} is an empty TIFF (no images)")
            series = tf.series[0]
            shape = _squeeze(tuple(series.shape))
            page = tf.pages[0]
            # one 2-D page per frame: chunks are page ranges; anything else (planar
            # samples, a single page holding a stack) is read whole, as tifffile lays it out
            paged = len(shape) == 3 and len(tf.pages) == shape[0] and page.shape == shape[1:]
            dtype = str(series.dtype)
    except ValueError:
        raise
    except Exception as e:  # tifffile raises a variety of errors on broken files
        raise ValueError(f"{path} is not a readable TIFF: {e}") from e
    n, h, w = _frames_shape(path, shape)
    return FrameSource(str(path), "tiff", None, n, (h, w), dtype, paged, False)


def _squeeze(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Drop singleton axes beyond the image plane (e.g. (N, 1, H, W) from some writers)."""
    while len(shape) > 3 and 1 in shape[:-2]:
        i = shape.index(1)
        shape = shape[:i] + shape[i + 1 :]
    return shape


def _read_tiff_whole(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        arr = np.asarray(tf.asarray())
    return arr.reshape(_squeeze(arr.shape))


# -------------------------------------------------------------------------- analysis


@dataclasses.dataclass(frozen=True)
class AnalysisSpec:
    """How to analyse: the bundle and the `Localizer`'s settings. Picklable (for Dask)."""

    model: str
    batch: int = 4
    device: str | None = None
    threads: int | None = None
    pixel_size_um: float | None = None
    force: bool = False
    passes: int | None = None
    fit: str | None = None
    threshold: float | None = None


_LOCALIZERS: dict[tuple[Any, ...], Localizer] = {}


def localizer_for(spec: AnalysisSpec) -> Localizer:
    """The process's `Localizer` for ``spec``: loaded on first use, then kept (a Dask worker
    loads the model once, not once per chunk)."""
    from focaltrack.models.localizer import Localizer

    key = (
        spec.model,
        spec.device,
        spec.threads,
        spec.pixel_size_um,
        spec.force,
        spec.passes,
        spec.fit,
    )
    loc = _LOCALIZERS.get(key)
    if loc is None:
        loc = Localizer.from_bundle(
            spec.model,
            device=spec.device,
            threads=spec.threads,
            pixel_size_um=spec.pixel_size_um,
            force=spec.force,
            passes=spec.passes,
            fit=spec.fit,
        )
        _LOCALIZERS.clear()  # one model per process: a new one replaces the last
        _LOCALIZERS[key] = loc
    return loc


def analyse_chunk(spec: AnalysisSpec, source: FrameSource, start: int, stop: int) -> np.ndarray:
    """The rows (`ROW_DTYPE`, in frame order) of frames ``start`` to ``stop``: read here,
    checked, localized in batches of ``spec.batch`` counted from ``start``."""
    loc = localizer_for(spec)
    frames = loc.check_frames(source.read(start, stop))
    found: list[Localizations] = []
    for i in range(0, len(frames), spec.batch):
        found += loc.localize_batch(
            frames[i : i + spec.batch], first_index=start + i, threshold=spec.threshold
        )
    stage_z = source.read_stage_z(start, stop)
    rows = np.zeros(sum(len(r) for r in found), dtype=ROW_DTYPE)
    k = 0
    for r in found:
        m = len(r)
        for c in COLUMNS:
            rows[c][k : k + m] = getattr(r, c)
        rows[STAGE_Z][k : k + m] = stage_z[r.frame - start]
        k += m
    return rows


def chunk_ranges(n_frames: int, first: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(a + chunk, n_frames)) for a in range(first, n_frames, chunk)]


# --------------------------------------------------------------------------- journal


class Journal:
    """``<out>.partial`` (rows) and ``<out>.partial.json`` (identity, progress): see the
    module docstring. Opening one resumes it when the identity matches."""

    def __init__(self, out: Path, identity: dict[str, Any], *, force: bool = False) -> None:
        self.out = out
        self.rows_path = out.with_name(out.name + ".partial")
        self.state_path = out.with_name(out.name + ".partial.json")
        self.identity = identity
        self.frames_done = 0
        self.rows_done = 0
        self.any_stage_z = False
        old = self._read_state()
        if old is not None and not old.get("frames_done"):
            old = None  # nothing done (a run that failed on its first chunk): nothing to keep
        if old is not None and old.get("identity") != identity:
            if not force:
                differ = sorted(
                    k for k in identity if (old.get("identity") or {}).get(k) != identity[k]
                ) or ["format"]
                raise ReanalysisError(
                    f"{self.rows_path} holds {old.get('frames_done', '?')} frames of another "
                    f"run (its {', '.join(differ)} differ): rerun with the same input, model "
                    "and settings to resume it, or --force to start over"
                )
            old = None
        resume = old is not None and self.rows_path.is_file()
        if old is not None and resume:
            self.frames_done = int(old["frames_done"])
            self.rows_done = int(old["rows_done"])
            self.any_stage_z = bool(old["any_stage_z"])
        self._fh: IO[bytes] = open(self.rows_path, "r+b" if resume else "wb")
        # rows past the last counted chunk were cut off mid-write: drop them
        self._fh.truncate(self.rows_done * ROW_DTYPE.itemsize)
        self._fh.seek(0, os.SEEK_END)
        if not resume:
            self._write_state()

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            return None
        return state

    def _write_state(self) -> None:
        state = {
            "version": _STATE_VERSION,
            "identity": self.identity,
            "frames_done": self.frames_done,
            "rows_done": self.rows_done,
            "any_stage_z": self.any_stage_z,
        }
        with atomic_path(self.state_path, fsync=True) as tmp:
            tmp.write_text(json.dumps(state, indent=1) + "\n")

    def append(self, rows: np.ndarray, frames_done: int) -> None:
        """A chunk's rows, flushed to disk, then the state counting them."""
        self._fh.write(np.ascontiguousarray(rows, dtype=ROW_DTYPE).tobytes())
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.frames_done = frames_done
        self.rows_done += len(rows)
        self.any_stage_z = self.any_stage_z or bool(np.isfinite(rows[STAGE_Z]).any())
        self._write_state()

    def close(self) -> None:
        self._fh.close()

    def discard_if_empty(self) -> None:
        """Delete the journal of a run that ends before its first chunk is in: no trace of
        a run refused by its checks."""
        if self.frames_done == 0:
            self.close()
            self.rows_path.unlink(missing_ok=True)
            self.state_path.unlink(missing_ok=True)

    def blocks(self) -> Iterator[np.ndarray]:
        """The rows, ``BLOCK_ROWS`` at a time."""
        rows = np.memmap(self.rows_path, dtype=ROW_DTYPE, mode="r", shape=(self.rows_done,))
        try:
            for a in range(0, self.rows_done, BLOCK_ROWS):
                yield np.array(rows[a : a + BLOCK_ROWS])
        finally:
            del rows

    def finish(self, attrs: dict[str, Any]) -> list[str]:
        """Write the output from the rows (atomically) and delete the journal. Returns its
        columns: ``stage_z_um`` last where any row's frame has a known focus."""
        self.close()
        names = [*COLUMNS, STAGE_Z] if self.any_stage_z else list(COLUMNS)
        if self.rows_done == 0:  # np.memmap refuses an empty file
            blocks: Iterator[np.ndarray] = iter([np.zeros(0, dtype=ROW_DTYPE)])
        else:
            blocks = self.blocks()
        with atomic_path(self.out) as tmp:
            if self.out.suffix.lower() == ".csv":
                _write_csv(tmp, names, blocks)
            else:
                _write_h5(tmp, names, blocks, attrs)
        self.rows_path.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)
        return names


def _write_csv(path: Path, names: list[str], blocks: Iterator[np.ndarray]) -> None:
    fmt = next(c.csv_format for c in columns_of(Localizations) if c.name == STAGE_Z)
    with open(path, "w", newline="") as fh:
        fh.write(",".join(names) + "\n")
        for rows in blocks:
            cells = csv_rows(Localizations, {c: rows[c] for c in COLUMNS})
            if STAGE_Z in names:
                for row, z in zip(cells, rows[STAGE_Z].tolist(), strict=True):
                    row.append(fmt % z)
            fh.writelines(",".join(row) + "\n" for row in cells)


def _write_h5(
    path: Path, names: list[str], blocks: Iterator[np.ndarray], attrs: dict[str, Any]
) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        g = f.create_group("localizations")
        sets = {
            c: g.create_dataset(
                c, shape=(0,), maxshape=(None,), chunks=(65536,), dtype=ROW_DTYPE[c]
            )
            for c in names
        }
        for rows in blocks:
            n0 = sets[names[0]].shape[0]
            for c, ds in sets.items():
                ds.resize((n0 + len(rows),))
                ds[n0:] = rows[c]
        for k, v in attrs.items():
            g.attrs[k] = v


# --------------------------------------------------------------------------- driving


def input_identity(source: FrameSource) -> dict[str, Any]:
    """What recognises the input on a rerun: its frames' shape and dtype, the dataset, and a
    hash of its first frames (not the path, size or mtime: a copied or touched recording is
    the same recording)."""
    head = source.read(0, min(IDENTITY_FRAMES, source.n_frames))
    return {
        "dataset": source.dataset,
        "shape": [source.n_frames, *source.frame_shape],
        "dtype": source.dtype,
        "first_frames_sha256": hashlib.sha256(np.ascontiguousarray(head).tobytes()).hexdigest(),
    }


def model_identity(bundle_dir: Path) -> str:
    """A hash of the bundle's files (weights, settings, calibration)."""
    h = hashlib.sha256()
    for p in sorted(q for q in bundle_dir.iterdir() if q.is_file()):
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def reanalyse(
    spec: AnalysisSpec,
    source: FrameSource,
    out: Path,
    *,
    identity: dict[str, Any],
    attrs: dict[str, Any],
    chunk: int = 128,
    force: bool = False,
    client: Any = None,
    in_flight: int = 0,
    progress: bool = True,
    on_chunk: Callable[[int], None] | None = None,
) -> tuple[int, int, float, list[str]]:
    """Localize every frame of ``source`` into ``out`` (.csv or .h5), resuming a journal of
    the same ``identity``. ``chunk``: frames per chunk, rounded up to whole batches.
    ``client``: a `dask.distributed.Client` to run the chunks on, ``in_flight`` chunks at a
    time (default: two per worker thread); None runs them here. ``on_chunk``: called with
    the frames done after each chunk is on disk.

    Returns (frames analysed by this call, rows in the output, seconds, output columns).
    """
    if not source.pages:  # a TIFF tifffile reads only whole: one chunk
        chunk = source.n_frames
    chunk = -(-max(chunk, 1) // spec.batch) * spec.batch  # whole batches: same rows
    journal = Journal(out, identity, force=force)
    first = journal.frames_done
    ranges = chunk_ranges(source.n_frames, first, chunk)
    bar = progress_bar(source.n_frames, "localize", enabled=progress, unit="frame", initial=first)
    t0 = time.perf_counter()
    try:
        if client is None:
            results: Iterator[np.ndarray] = (analyse_chunk(spec, source, a, b) for a, b in ranges)
        else:
            if in_flight <= 0:
                in_flight = 2 * max(1, sum(client.nthreads().values()))
            results = _in_order(client, spec, source, ranges, in_flight)
        for (a, b), rows in zip(ranges, results, strict=True):
            journal.append(rows, b)
            bar.update(b - a)
            if on_chunk is not None:
                on_chunk(b)
    except BaseException:
        journal.discard_if_empty()
        raise
    finally:
        bar.close()
        journal.close()
    dt = time.perf_counter() - t0
    names = journal.finish(attrs)
    return source.n_frames - first, journal.rows_done, dt, names


def _in_order(
    client: Any,
    spec: AnalysisSpec,
    source: FrameSource,
    ranges: list[tuple[int, int]],
    in_flight: int,
) -> Iterator[np.ndarray]:
    """The chunks' rows in frame order, at most ``in_flight`` chunks submitted at a time (the
    client's memory holds no more than that)."""
    pending: collections.deque[Any] = collections.deque()
    todo = iter(ranges)
    try:
        for a, b in todo:
            pending.append(client.submit(analyse_chunk, spec, source, a, b, pure=False))
            if len(pending) >= in_flight:
                break
        while pending:
            rows = pending.popleft().result()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append(client.submit(analyse_chunk, spec, source, *nxt, pure=False))
            yield rows
    finally:
        for fut in pending:
            fut.cancel()


def dask_client(address: str, workers: int, threads: int) -> tuple[Any, Any]:
    """A `dask.distributed.Client`: to the scheduler at ``address``, or for ``"local"`` to a
    new `LocalCluster` of ``workers`` processes with one thread each (torch's ``threads``
    inside). Returns (client, cluster or None); close both when done."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError as e:
        raise ValueError("--dask needs dask.distributed: pip install 'focaltrack[dask]'") from e
    # the scheduler's and workers' start/stop chatter (INFO) is not the user's business
    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.worker"):
        logging.getLogger(name).setLevel(logging.WARNING)
    if address != "local":
        return Client(address), None
    import dask.config

    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    # Dask starts workers with MALLOC_TRIM_THRESHOLD_=65536, which makes glibc hand every
    # large array back to the system and fault it in again: the localizer ran at 15 instead
    # of 25 frames/s (two passes, 256² px). None unsets it (docs/scaling.md for clusters).
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}):
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            env=env,
        )
    return Client(cluster), cluster

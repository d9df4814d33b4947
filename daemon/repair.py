"""Recordings left open by a crash: clear HDF5's "open for writing" mark as ``h5clear -s``
does, and mark the recording incomplete with the frames it holds.

A writer that dies (``kill -9``, a power cut) cannot close its file, and HDF5 (1.10 and
later) leaves the file's superblock marked "open for writing / for SWMR writing". Every
plain open (h5py's default, Fiji, napari, MATLAB) then refuses the file ("file is already
open for write ... may use <h5clear file> to clear file consistency flags"); only SWMR
readers open it. ``h5clear`` comes with the HDF5 tools, which a microscope PC rarely has, so
the service does the same change itself on start (`repair_crashed_recordings`) and
``focaltrack recording repair FILE`` does it for files copied elsewhere.

The change, from the HDF5 file format specification (superblock versions 2 and 3) and the
library (``H5Fsuper_cache.c``, ``H5checksum.c``; ``h5clear -s`` opens the file with a private
property that sets the flags to 0 and closes it, which writes the superblock back):

* the superblock starts with the signature ``\\x89HDF\\r\\n\\x1a\\n`` at byte 0, 512, 1024,
  2048, ... (a user block may come first);
* then the version (byte 8: 2 or 3), the size of offsets and of lengths (bytes 9 and 10: 2,
  4, 8, 16 or 32), the file consistency flags (byte 11: bit 0 open for writing, bit 1
  unused, bit 2 open for SWMR writing; any other bit makes HDF5 refuse the file), four
  addresses (base, superblock extension, end of file, root group) and a little-endian
  32-bit checksum: Jenkins' lookup3 of every byte before it, initial value 0.

`repair_recording` writes the flags as 0 and the checksum again, after checking the
signature, the version, both sizes, the checksum, the flags and the base address, and
refusing anything else with a one-line `RepairError`. It also makes the end-of-file address
(HDF5's EOA) at least the file's size, as ``h5clear --increment=0`` does: a SWMR writer's
superblock may lag behind the objects it wrote since (SWMR readers are allowed to read past
it for that reason), and a plain reader refuses an address past it, while a writer would
allocate over what lies there. Where the EOA lies past the end of the file (space allocated,
never written), the file is extended with zeros to it, as HDF5 does when it closes a file.

It never touches a file that a live process writes: the recorder holds a shared lock on its
file while writing (`recorder.hold_writer_lock`), and the repair works under an exclusive
one, taken without waiting. A file that opens as it is needs nothing and is left byte for
byte as it was; one that still does not open after the change gets its old superblock (and
size) back.

After the flags, the recording is opened for writing and made consistent: ``frames`` and
``frame_meta`` are cut to the frames that are complete in all of them (``frames`` rows whose
chunk was never written read as zeros and are cut too), each table group to its shortest
column, everything to the rows the writer's ``flushed`` count vouched for where the file has
one, and the root attributes ``complete`` = False, ``n_frames`` = the frames recovered
and ``repaired_utc`` are set.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from focaltrack.common.errors import FocaltrackError
from focaltrack.daemon.recorder import FRAME_META_COLUMNS, RECORDING_KIND
from focaltrack.records import flushed_counts

if sys.platform != "win32":
    import fcntl

log = logging.getLogger("focaltrack.repair")

__all__ = [
    "RepairError",
    "Repaired",
    "left_open",
    "lookup3",
    "repair_crashed_recordings",
    "repair_recording",
]

SIGNATURE = b"\x89HDF\r\n\x1a\n"
_WRITE_ACCESS = 0x01
_SWMR_WRITE_ACCESS = 0x04
_ALL_FLAGS = 0x07  # with bit 1, "file OK", which the library defines and never sets
_LEFT_BY_SWMR_WRITER = _WRITE_ACCESS | _SWMR_WRITE_ACCESS
_SIZES = (2, 4, 8, 16, 32)
_M32 = 0xFFFFFFFF


class RepairError(FocaltrackError, ValueError):
    """A file that cannot or must not be repaired; the message names it and says why."""


@dataclass(frozen=True, slots=True)
class Repaired:
    """A recording that was repaired: its path, the frames recovered (its ``n_frames``) and
    the consistency flags it had."""

    path: Path
    frames: int
    flags: int


# ---------------------------------------------------------------------- the checksum


def _rot(x: int, k: int) -> int:
    return ((x << k) | (x >> (32 - k))) & _M32


def lookup3(data: bytes, initval: int = 0) -> int:
    """Bob Jenkins' lookup3 ``hashlittle`` as HDF5 computes its metadata checksums
    (``H5_checksum_lookup3``): the bytes read as little-endian words on every machine."""
    n = len(data)
    a = b = c = (0xDEADBEEF + n + initval) & _M32
    k = 0
    while n - k > 12:
        a = (a + int.from_bytes(data[k : k + 4], "little")) & _M32
        b = (b + int.from_bytes(data[k + 4 : k + 8], "little")) & _M32
        c = (c + int.from_bytes(data[k + 8 : k + 12], "little")) & _M32
        # mix(a, b, c)
        a = ((a - c) & _M32) ^ _rot(c, 4)
        c = (c + b) & _M32
        b = ((b - a) & _M32) ^ _rot(a, 6)
        a = (a + c) & _M32
        c = ((c - b) & _M32) ^ _rot(b, 8)
        b = (b + a) & _M32
        a = ((a - c) & _M32) ^ _rot(c, 16)
        c = (c + b) & _M32
        b = ((b - a) & _M32) ^ _rot(a, 19)
        a = (a + c) & _M32
        c = ((c - b) & _M32) ^ _rot(b, 4)
        b = (b + a) & _M32
        k += 12
    if n == k:  # only for empty input: the loop leaves 1 to 12 bytes otherwise
        return c
    # The last 1–12 bytes, as zero-padded words (what the C switch's fall-through adds).
    tail = data[k:].ljust(12, b"\0")
    a = (a + int.from_bytes(tail[0:4], "little")) & _M32
    b = (b + int.from_bytes(tail[4:8], "little")) & _M32
    c = (c + int.from_bytes(tail[8:12], "little")) & _M32
    # final(a, b, c)
    c = ((c ^ b) - _rot(b, 14)) & _M32
    a = ((a ^ c) - _rot(c, 11)) & _M32
    b = ((b ^ a) - _rot(a, 25)) & _M32
    c = ((c ^ b) - _rot(b, 16)) & _M32
    a = ((a ^ c) - _rot(c, 4)) & _M32
    b = ((b ^ a) - _rot(a, 14)) & _M32
    c = ((c ^ b) - _rot(b, 24)) & _M32
    return c


# ---------------------------------------------------------------------- the superblock


@dataclass(frozen=True, slots=True)
class _Superblock:
    offset: int  # of the signature in the file
    image: bytes  # every byte the checksum covers, and the checksum

    @property
    def flags(self) -> int:
        return self.image[11]

    def _address(self, i: int) -> int:
        """The i-th address field: 0 base, 1 superblock extension, 2 end of file, 3 root."""
        n = self.image[9]
        return int.from_bytes(self.image[12 + i * n : 12 + (i + 1) * n], "little")

    @property
    def base(self) -> int:
        return self._address(0)

    @property
    def end_of_file(self) -> int:
        """The end of the allocated space (HDF5's EOA), relative to the base address."""
        return self._address(2)

    def patched(self, *, flags: int, end_of_file: int) -> bytes:
        n = self.image[9]
        body = bytearray(self.image[:-4])
        body[11] = flags
        body[12 + 2 * n : 12 + 3 * n] = end_of_file.to_bytes(n, "little")
        return bytes(body) + struct.pack("<I", lookup3(bytes(body)))


def _find_signature(fh: BinaryIO, size: int) -> int | None:
    at = 0
    while at + len(SIGNATURE) <= size:
        fh.seek(at)
        if fh.read(len(SIGNATURE)) == SIGNATURE:
            return at
        at = 512 if at == 0 else 2 * at
    return None


def _read_superblock(fh: BinaryIO, path: Path) -> _Superblock:
    """The superblock, checked as HDF5 checks it before it believes a flag in it."""
    size = os.fstat(fh.fileno()).st_size
    at = _find_signature(fh, size)
    if at is None:
        raise RepairError(f"{path} is not an HDF5 file (no HDF5 signature in it)")
    fh.seek(at)
    head = fh.read(12)
    if len(head) < 12:
        raise RepairError(f"{path} is cut short inside its HDF5 superblock")
    version, sizeof_addr, sizeof_size = head[8], head[9], head[10]
    if version not in (2, 3):
        raise RepairError(
            f"{path} has an HDF5 superblock of version {version}: only versions 2 and 3 "
            "carry the 'open for writing' mark that a repair clears"
        )
    if sizeof_addr not in _SIZES or sizeof_size not in _SIZES:
        raise RepairError(
            f"{path} has a damaged HDF5 superblock (sizes {sizeof_addr}, {sizeof_size})"
        )
    n = 12 + 4 * sizeof_addr
    fh.seek(at)
    image = fh.read(n + 4)
    if len(image) < n + 4:
        raise RepairError(f"{path} is cut short inside its HDF5 superblock")
    (stored,) = struct.unpack_from("<I", image, n)
    if lookup3(image[:n]) != stored:
        raise RepairError(f"{path} has a damaged HDF5 superblock (its checksum does not match)")
    sb = _Superblock(at, image)
    if sb.flags & ~_ALL_FLAGS:
        raise RepairError(f"{path} has unknown HDF5 consistency flags 0x{sb.flags:02x}")
    if sb.base != at:
        raise RepairError(
            f"{path} has its HDF5 superblock at byte {at} but names {sb.base} as its base"
        )
    return sb


def _write_superblock(fh: BinaryIO, at: int, image: bytes) -> None:
    fh.seek(at)
    fh.write(image)
    fh.flush()
    os.fsync(fh.fileno())


def left_open(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an HDF5 file whose superblock says a writer has it open (or had,
    when it died). Reads a few bytes, no HDF5; anything that is not such a file is False."""
    try:
        with open(path, "rb") as fh:
            at = _find_signature(fh, os.fstat(fh.fileno()).st_size)
            if at is None:
                return False
            fh.seek(at)
            head = fh.read(12)
    except OSError:
        return False
    return len(head) == 12 and head[8] in (2, 3) and bool(head[11] & _LEFT_BY_SWMR_WRITER)


# ---------------------------------------------------------------------- the lock


@contextlib.contextmanager
def _exclusive(path: Path, *, require_lock: bool) -> Iterator[BinaryIO]:
    """``path`` open for reading and writing under an exclusive ``flock`` taken without
    waiting: refused while a recorder writes it (it holds a shared lock) or another program
    has it open through HDF5 (which locks its files too). ``require_lock=False`` goes on
    where the platform or file system has no locks (the service, which knows it writes
    none of its recordings when it looks)."""
    fh = open(path, "r+b")  # held for the whole repair: closing it releases the lock
    try:
        if sys.platform != "win32":
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RepairError(
                        f"{path} is open in another program (a recording still being "
                        "written, or a reader): not repaired; close it first"
                    ) from None
                if require_lock:
                    raise RepairError(
                        f"cannot lock {path} to make sure no program is writing it ({e}); "
                        "copy it to a local disk and repair the copy"
                    ) from None
        elif require_lock:
            raise RepairError(
                f"cannot make sure no program is writing {path} on this platform (no file "
                "locks): stop the recording service and let it repair its recordings at start"
            )
        yield fh
    finally:
        fh.close()  # releases the lock


# ---------------------------------------------------------------------- the repair


def _plain_open_error(path: Path) -> str | None:
    """Why a plain read-only open (as Fiji or napari do it) fails, or None if it works."""
    import h5py

    try:
        with h5py.File(path, "r"):
            return None
    except OSError as e:
        return str(e)


def _check_recording(path: Path) -> None:
    """A SWMR reader's look, before anything is written: the file is a focaltrack recording."""
    import h5py

    try:
        with h5py.File(path, "r", libver="latest", swmr=True, locking=False) as f:
            kind = f.attrs.get("kind")
    except OSError as e:
        raise RepairError(f"cannot read {path} as a SWMR reader: {e}") from None
    if isinstance(kind, bytes):
        kind = kind.decode("utf-8", "replace")
    if kind != RECORDING_KIND:
        raise RepairError(
            f"{path} is not a focaltrack recording (kind {kind!r}): not repaired; "
            "HDF5's h5clear -s clears the mark of other files"
        )


def _chunk_written(ds: Any, row: int) -> bool:
    info = ds.id.get_chunk_info_by_coord((row,) + (0,) * (len(ds.shape) - 1))
    return info.byte_offset is not None


def _make_consistent(f: Any) -> int:
    """Cut ``frames`` and ``frame_meta`` to their complete frames and each table group to
    its shortest column (a crash can come between the appends of one write-out); the
    number of frames recovered."""
    meta = [f[f"frame_meta/{name}"] for name in FRAME_META_COLUMNS if f"frame_meta/{name}" in f]
    frames = f.get("frames")
    lengths = [ds.shape[0] for ds in meta]
    if frames is not None:
        lengths.append(frames.shape[0])
    n = min(lengths, default=0)
    # What the writer vouched for after its last flush (recordings since the count was
    # added): rows past it may read as zeros, their values never flushed.
    counts = flushed_counts(f)
    if counts[0] is not None:
        n = min(n, counts[0])
    if frames is not None:
        # A row whose chunk never reached the disk reads as zeros: not a recovered frame.
        while n > 0 and not _chunk_written(frames, n - 1):
            n -= 1
    for ds in [*meta, *([frames] if frames is not None else [])]:
        if ds.shape[0] > n:
            ds.resize(n, axis=0)
    for i, group in enumerate(("localizations", "tracks"), start=1):
        g = f.get(group)
        if g is None:
            continue
        cols = [g[name] for name in g]
        m = min((ds.shape[0] for ds in cols), default=0)
        vouched = counts[i]
        if vouched is not None:
            m = min(m, vouched)
        for ds in cols:
            if ds.shape[0] > m:
                ds.resize(m, axis=0)
    return n


def repair_recording(path: str | os.PathLike[str], *, require_lock: bool = True) -> Repaired | None:
    """Repair a recording left open by a crash (see the module docstring); None when it
    opens as it is (then nothing is written). Raises `RepairError` (one line) for anything
    that is not a focaltrack recording left open by its writer, or that one still writes."""
    import h5py

    p = Path(path)
    if not p.is_file():
        raise RepairError(f"{p} does not exist" if not p.exists() else f"{p} is not a file")
    error = _plain_open_error(p)
    if error is None:
        return None
    with _exclusive(p, require_lock=require_lock) as fh:
        sb = _read_superblock(fh, p)
        if sb.flags & _LEFT_BY_SWMR_WRITER != _LEFT_BY_SWMR_WRITER:
            why = (
                "it was open for writing without SWMR, which no focaltrack recorder leaves "
                "after its first frame"
                if sb.flags & _WRITE_ACCESS
                else "no writer left it open"
            )
            raise RepairError(f"cannot open {p} ({error}), and {why}: not repaired")
        _check_recording(p)
        size = os.fstat(fh.fileno()).st_size
        end = max(sb.end_of_file, size - sb.offset)
        if sb.offset + end > size:
            os.ftruncate(fh.fileno(), sb.offset + end)  # zeros, where nothing was written
        _write_superblock(fh, sb.offset, sb.patched(flags=0, end_of_file=end))
        try:
            # Under the exclusive lock: HDF5's own locking would conflict with it.
            f = h5py.File(p, "r+", libver="latest", locking=False)
        except OSError as e:
            # HDF5 wrote nothing: the old superblock and size back, the file as it was.
            _write_superblock(fh, sb.offset, sb.image)
            os.ftruncate(fh.fileno(), size)
            raise RepairError(f"cannot repair {p}: {e}; left as it was") from None
        with f:
            try:
                frames = _make_consistent(f)
                f.attrs["complete"] = False
                f.attrs["n_frames"] = frames
                f.attrs["repaired_utc"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            except (OSError, KeyError, ValueError) as e:
                raise RepairError(
                    f"{p} opens again, but marking it incomplete failed: {e}"
                ) from None
    return Repaired(p, frames, sb.flags)


def repair_crashed_recordings(directory: str | os.PathLike[str]) -> list[Repaired]:
    """At service start: repair every recording in ``directory`` (``*.h5``) that a crash
    left open; the repaired ones. Called before the service records anything, so none of
    them is its own live recording; another program's is refused by the lock. A file that
    cannot be repaired is logged, never raised: it must not keep the service from starting."""
    out = []
    for p in sorted(Path(directory).glob("*.h5")):
        if p.name.startswith(".") or not left_open(p):
            continue
        try:
            r = repair_recording(p, require_lock=False)
        except Exception as e:  # whatever it is, the service starts
            log.warning("recording %s was left open by a crash and is not repaired: %s", p.name, e)
            continue
        if r is not None:
            log.info(
                "recording %s was left open by a crash: repaired, %d frames recovered, "
                "marked incomplete",
                p.name,
                r.frames,
            )
            out.append(r)
    return out

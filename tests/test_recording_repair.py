"""Recordings left open by a crash (issue 14, point 4): ``focaltrack recording repair`` and
the service's repair at start make them open in every program (a plain ``h5py.File``), keep
what the writer had flushed and mark them incomplete; anything else is refused untouched.

The crash is real: a child process records with the `Recorder` (SWMR) and is killed with
SIGKILL once its writer has flushed the frames.
"""

from __future__ import annotations

import select
import signal
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from service_config import loopback_config

from focaltrack.daemon.cli import main
from focaltrack.daemon.recorder import Recorder
from focaltrack.daemon.repair import (
    RepairError,
    _make_consistent,
    left_open,
    lookup3,
    repair_recording,
)
from focaltrack.daemon.service import Service
from focaltrack.drivers.base import Frame

H, W = 24, 32
N_FRAMES = 7

# The child: records N frames (each frame's localizations queued before it, so the
# write-out that holds the last frame holds every localization), waits for the writer's
# flush of the last one, says so and waits to be killed.
_CRASHING_WRITER = r"""
import sys, time
import numpy as np
from focaltrack.daemon.recorder import Recorder
from focaltrack.drivers.base import Frame

path, n, h, w = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
r = Recorder(path, frame_shape=(h, w), flush_interval_s=0.05, attrs={"camera": "crash"})
r.start()
for i in range(n):
    locs = {c: np.array([float(i), 1.0]) for c in ("x_um", "y_um", "z_um", "score")}
    assert r.add_results(i, locs, None)
    px = np.full((h, w), i, dtype=np.uint16)
    px[0, 0] = 1000 + i
    assert r.add_frame(Frame(px, i, 1.7e9 + 0.01 * i, 0.5 * i, 10.0))
while r.frames_flushed < n:
    time.sleep(0.01)
print("flushed", r.frames_flushed, flush=True)
sys.stdin.read()
"""


class _Writer:
    """The child recording ``path``; `kill` it with SIGKILL."""

    def __init__(self, path: Path, n: int = N_FRAMES) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _CRASHING_WRITER, str(path), str(n), str(H), str(W)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], 120)
        line = self.proc.stdout.readline().decode() if ready else ""
        if line.split() != ["flushed", str(n)]:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=30)
            raise AssertionError(f"the writer did not flush: {line!r}\n{err.decode()[-2000:]}")

    def kill(self) -> None:
        self.proc.kill()  # SIGKILL: nothing is flushed or closed
        assert self.proc.wait(30) == -signal.SIGKILL
        self.proc.communicate(timeout=30)


def _crashed(path: Path, n: int = N_FRAMES) -> Path:
    _Writer(path, n).kill()
    return path


def _healthy(path: Path) -> Path:
    r = Recorder(path, frame_shape=(H, W), flush_interval_s=0.05)
    r.start()
    for i in range(3):
        r.add_frame(Frame(np.full((H, W), i, np.uint16), i, 1.0 + i, 0.0, 10.0))
    assert r.stop().error is None
    return path


def _refuses_plain_open(path: Path) -> bool:
    try:
        with h5py.File(path, "r"):
            return False
    except OSError as e:
        assert "already open for" in str(e), e
        return True


def _check_recovered(path: Path, n: int) -> None:
    with h5py.File(path, "r") as f:  # a plain open, as Fiji or napari do it
        a = f.attrs
        assert not a["complete"] and a["n_frames"] == n and "repaired_utc" in a
        assert a["camera"] == "crash"
        fr = f["frames"]
        assert fr.shape == (n, H, W)
        np.testing.assert_array_equal(fr[:, 0, 0], 1000 + np.arange(n))
        np.testing.assert_array_equal(fr[:, 5, 5], np.arange(n))
        np.testing.assert_array_equal(f["frame_meta/index"][:], np.arange(n))
        np.testing.assert_allclose(f["frame_meta/stage_z_um"][:], 0.5 * np.arange(n))
        np.testing.assert_array_equal(f["localizations/frame"][:], np.repeat(np.arange(n), 2))
        assert f["localizations/score"].shape == (2 * n,)


# ------------------------------------------------------------------------ the checksum


def test_lookup3_is_jenkins_hashlittle_and_hdf5s_superblock_checksum(tmp_path):
    # Bob Jenkins' own check values for hashlittle (lookup3.c, driver5)
    assert lookup3(b"") == 0xDEADBEEF
    assert lookup3(b"", 0xDEADBEEF) == 0xBD5B7DDE
    assert lookup3(b"Four score and seven years ago") == 0x17770551
    assert lookup3(b"Four score and seven years ago", 1) == 0xCD628161
    # ... and what the HDF5 library wrote into a version-3 superblock (8-byte offsets)
    path = _healthy(tmp_path / "ok.h5")
    sb = path.read_bytes()[:48]
    assert sb[:8] == b"\x89HDF\r\n\x1a\n" and sb[8] == 3 and sb[9] == 8
    assert lookup3(sb[:44]) == struct.unpack("<I", sb[44:48])[0]


# ------------------------------------------------------------------------ the repair


def test_a_crashed_recording_is_repaired_with_the_flushed_frames(tmp_path):
    path = tmp_path / "crash.h5"
    writer = _Writer(path)
    try:
        # While its writer lives, the file is refused and left as it is.
        with pytest.raises(RepairError, match="open in another program"):
            repair_recording(path)
        assert left_open(path) and _refuses_plain_open(path)
    finally:
        writer.kill()
    assert _refuses_plain_open(path)
    r = repair_recording(path)
    assert r is not None and r.frames == N_FRAMES and r.flags == 0x05
    assert not left_open(path)
    _check_recovered(path, N_FRAMES)
    # SWMR readers open it too, and a second repair has nothing to do.
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        assert f["frames"].shape[0] == N_FRAMES
    before = path.read_bytes()
    assert repair_recording(path) is None
    assert path.read_bytes() == before


def test_rows_past_the_writers_flushed_count_are_cut(tmp_path):
    # A crash can come after HDF5 showed a dataset's new length (and even its frame
    # chunks) but before the values of its table rows were flushed: the repair keeps only
    # what the writer vouched for in ``flushed`` after its last flush.
    path = tmp_path / "ahead.h5"
    r = Recorder(path, frame_shape=(H, W), flush_interval_s=0.05, attrs={"camera": "crash"})
    r.start()
    for i in range(N_FRAMES):
        locs = {c: np.array([float(i), 1.0]) for c in ("x_um", "y_um", "z_um", "score")}
        assert r.add_results(i, locs, None)
        px = np.full((H, W), i, dtype=np.uint16)
        px[0, 0] = 1000 + i
        assert r.add_frame(Frame(px, i, 1.7e9 + 0.01 * i, 0.5 * i, 10.0))
    assert r.stop().error is None
    with h5py.File(path, "r+") as f:
        np.testing.assert_array_equal(f["flushed"][()], [N_FRAMES, 2 * N_FRAMES, 0])
        f["frames"].resize(N_FRAMES + 3, axis=0)
        f["frames"][N_FRAMES:] = 7  # chunks on disk: only the count tells them apart
        for name in f["frame_meta"]:
            f[f"frame_meta/{name}"].resize(N_FRAMES + 3, axis=0)
        for name in f["localizations"]:
            f[f"localizations/{name}"].resize(2 * N_FRAMES + 4, axis=0)
        assert _make_consistent(f) == N_FRAMES
        f.attrs["n_frames"] = N_FRAMES
        f.attrs["complete"] = False
        f.attrs["repaired_utc"] = "now"
    _check_recovered(path, N_FRAMES)


def test_cli_repairs_refuses_and_leaves_healthy_files_alone(tmp_path, capsys):
    crashed = _crashed(tmp_path / "crash.h5")
    healthy = _healthy(tmp_path / "ok.h5")
    healthy_bytes = healthy.read_bytes()
    assert main(["recording", "repair", str(crashed), str(healthy)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"{crashed}: repaired: {N_FRAMES} frames recovered, marked incomplete",
        f"{healthy}: nothing to repair (it opens as it is)",
    ]
    _check_recovered(crashed, N_FRAMES)
    assert healthy.read_bytes() == healthy_bytes

    text = tmp_path / "notes.h5"
    text.write_bytes(b"not an HDF5 file\n" * 100)
    assert main(["recording", "repair", str(text)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"focaltrack recording repair: error: {text} is not an HDF5 file (no HDF5 signature in it)"
    ]
    assert text.read_bytes() == b"not an HDF5 file\n" * 100
    assert main(["recording", "repair", str(tmp_path / "missing.h5")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _set_superblock(path: Path, flags: int | None = None, **poke: int) -> None:
    """Write flags (and a good checksum) or poke bytes (keeping the old checksum)."""
    data = bytearray(path.read_bytes())
    for at, value in ((int(k[1:]), v) for k, v in poke.items()):
        data[at] = value
    if flags is not None:
        data[11] = flags
        data[44:48] = struct.pack("<I", lookup3(bytes(data[:44])))
    path.write_bytes(bytes(data))


def test_anything_unexpected_is_refused_untouched(tmp_path):
    # A damaged superblock: one address byte changed, the checksum no longer matches.
    bad = _crashed(tmp_path / "bad.h5", n=2)
    _set_superblock(bad, b20=bad.read_bytes()[20] ^ 0xFF)
    before = bad.read_bytes()
    with pytest.raises(RepairError, match="checksum does not match"):
        repair_recording(bad)
    assert bad.read_bytes() == before
    # Another program's HDF5 file with the SWMR writer's mark: not ours to change.
    other = tmp_path / "other.h5"
    with h5py.File(other, "w", libver="latest") as f:
        f["x"] = np.arange(3)
    _set_superblock(other, flags=0x05)
    before = other.read_bytes()
    with pytest.raises(RepairError, match="not a focaltrack recording"):
        repair_recording(other)
    assert other.read_bytes() == before
    # The mark of a writer without SWMR, and flags HDF5 does not know.
    for flags, match in ((0x01, "without SWMR"), (0x85, "unknown HDF5 consistency flags")):
        p = _healthy(tmp_path / f"f{flags}.h5")
        _set_superblock(p, flags=flags)
        before = p.read_bytes()
        with pytest.raises(RepairError, match=match):
            repair_recording(p)
        assert p.read_bytes() == before


def test_the_end_of_allocated_space_covers_the_whole_file(tmp_path):
    # A SWMR writer's superblock can lag behind what it wrote (the end of its allocated
    # space short of the file's end), or lead it (space allocated, never written): either
    # way the repaired file's EOA is the end of the file, and the frames are all there.
    for name, shift in (("behind", -4096), ("ahead", 1 << 20)):
        path = _crashed(tmp_path / f"{name}.h5")
        data = bytearray(path.read_bytes())
        size = len(data)
        eoa = int.from_bytes(data[28:36], "little")
        # What the writer left: at or behind the end (its count of flushed rows is written
        # after the flush, past the superblock's last EOA). The test moves it further.
        assert size - 4096 < eoa <= size
        data[28:36] = (size + shift).to_bytes(8, "little")
        data[44:48] = struct.pack("<I", lookup3(bytes(data[:44])))
        path.write_bytes(bytes(data))
        r = repair_recording(path)
        assert r is not None and r.frames == N_FRAMES
        _check_recovered(path, N_FRAMES)
        with open(path, "rb") as fh:
            sb = fh.read(48)
        assert int.from_bytes(sb[28:36], "little") == path.stat().st_size >= size + max(shift, 0)


def test_a_live_recording_of_this_process_is_left_alone(tmp_path):
    # HDF5 hands this process its own open file (no mark to refuse it): nothing to repair.
    # (Another process's live recording is refused: see the crash test above.)
    path = tmp_path / "live.h5"
    r = Recorder(path, frame_shape=(H, W), flush_interval_s=0.05)
    r.start()
    try:
        r.add_frame(Frame(np.ones((H, W), np.uint16), 0, 1.0, 0.0, 10.0))
        assert left_open(path)
        assert repair_recording(path) is None
        assert left_open(path)
    finally:
        s = r.stop()
    assert s.error is None and s.frames == 1
    with h5py.File(path, "r") as f:  # the writer closed and marked it as before
        assert f.attrs["complete"] and f.attrs["n_frames"] == 1


# ------------------------------------------------------------------------ the service


def test_the_service_repairs_its_recordings_when_it_starts(tmp_path):
    ws = tmp_path / "ws"
    recordings = ws / "recordings"
    recordings.mkdir(parents=True)
    crashed = _crashed(recordings / "rec-crash.h5")
    healthy = _healthy(recordings / "rec-ok.h5")
    healthy_bytes = healthy.read_bytes()
    assert _refuses_plain_open(crashed)
    svc = Service(loopback_config(ws, **{"sim.width": 64, "sim.height": 64, "sim.n_emitters": 1}))
    svc.start()
    try:
        _check_recovered(crashed, N_FRAMES)
        assert healthy.read_bytes() == healthy_bytes
    finally:
        svc.stop()
        assert svc.join(20)

"""The HDF5 recorder: layout, SWMR following while writing, clean close, bad input.

A reader in another process following a live file, and a file left by ``kill -9``, are
tested end to end in test_service.py (the real ``focaltrack serve`` in a subprocess).
"""

from __future__ import annotations

import time

import h5py
import numpy as np
import pytest

from focaltrack.daemon.recorder import (
    FLUSHED,
    RECORDING_KIND,
    RECORDING_SCHEMA_VERSION,
    Recorder,
    RecorderError,
)
from focaltrack.drivers.base import Frame

H, W = 24, 32


def _frame(i: int) -> Frame:
    px = np.full((H, W), i, dtype=np.uint16)
    px[0, 0] = 1000 + i
    return Frame(px, i, 1.7e9 + 0.01 * i, 0.5 * i, 10.0)


def _locs(i: int, n: int) -> dict[str, np.ndarray]:
    k = np.arange(n, dtype=np.float64)
    return {"x_um": k + i, "y_um": k * 2, "z_um": k * 3, "score": np.full(n, 0.5)}


def _tracks(i: int, n: int) -> dict[str, np.ndarray]:
    k = np.arange(n)
    cols = {
        c: k.astype(np.float64) + i
        for c in (
            "x_um",
            "y_um",
            "z_um",
            "vx_um_s",
            "vy_um_s",
            "vz_um_s",
            "sigma_x_um",
            "sigma_y_um",
            "sigma_z_um",
        )
    }
    cols["track_id"] = k + 100
    cols["confirmed"] = k % 2 == 0
    cols["age_frames"] = k + 1
    cols["misses"] = np.zeros(n, dtype=np.int64)
    return cols


def _wait(cond, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_layout_and_clean_close(tmp_path):
    path = tmp_path / "rec.h5"
    written: list[int] = []
    r = Recorder(
        path,
        frame_shape=(H, W),
        calibration_sha256="abc",
        model="m1",
        pixel_size_um=0.65,
        attrs={"camera": "SimCamera"},
        flush_interval_s=0.05,
        on_frames_written=written.append,
    )
    r.start()
    for i in range(10):
        assert r.add_frame(_frame(i))
        assert r.add_results(i, _locs(i, i % 3), _tracks(i, 2))
    s = r.stop()
    assert (s.frames, s.localizations, s.track_rows, s.dropped, s.error) == (10, 9, 20, 0, None)
    assert sum(written) == 10
    assert r.stop() is s  # idempotent
    with h5py.File(path, "r") as f:
        a = f.attrs
        assert a["schema_version"] == RECORDING_SCHEMA_VERSION and a["kind"] == RECORDING_KIND
        assert a["complete"] and a["n_frames"] == 10
        assert a["calibration_sha256"] == "abc" and a["model"] == "m1"
        assert a["pixel_size_um"] == pytest.approx(0.65) and a["camera"] == "SimCamera"
        np.testing.assert_array_equal(f[FLUSHED][()], [10, 9, 20])  # vouched at the last flush
        fr = f["frames"]
        assert fr.shape == (10, H, W) and fr.dtype == np.uint16 and fr.chunks == (1, H, W)
        assert fr[7, 0, 0] == 1007 and fr[7, 5, 5] == 7
        np.testing.assert_array_equal(f["frame_meta/index"][:], np.arange(10))
        np.testing.assert_allclose(f["frame_meta/stage_z_um"][:], 0.5 * np.arange(10))
        np.testing.assert_allclose(f["frame_meta/t_acq_s"][:], 1.7e9 + 0.01 * np.arange(10))
        loc_frame = f["localizations/frame"][:]
        np.testing.assert_array_equal(loc_frame, [1, 2, 2, 4, 5, 5, 7, 8, 8])
        np.testing.assert_allclose(f["localizations/x_um"][:3], [1.0, 2.0, 3.0])
        st = f["tracks/status"]
        assert h5py.check_enum_dtype(st.dtype) == {"tentative": 0, "confirmed": 1, "coasting": 2}
        np.testing.assert_array_equal(st[:4], [1, 0, 1, 0])
        np.testing.assert_array_equal(f["tracks/track_id"][:4], [100, 101, 100, 101])
        np.testing.assert_array_equal(f["tracks/frame"][:4], [0, 0, 1, 1])


def test_reader_follows_the_live_file(tmp_path):
    path = tmp_path / "live.h5"
    r = Recorder(path, frame_shape=(H, W), flush_interval_s=0.05)
    r.start()
    try:
        with h5py.File(path, "r", libver="latest", swmr=True) as f:
            assert f.attrs["complete"] == False  # noqa: E712 - numpy bool
            ds, idx, flushed = f["frames"], f["frame_meta/index"], f[FLUSHED]
            assert flushed.attrs["columns"] == "frames, localizations, track_rows"
            for i in range(5):
                r.add_frame(_frame(i))

            def seen(n: int) -> bool:
                # The rows the writer vouches for: a dataset's length alone can run ahead
                # of its values (they read as zeros until the writer's next flush).
                for d in (ds, idx, flushed):
                    d.refresh()
                return int(flushed[0]) >= n and ds.shape[0] >= n and idx.shape[0] >= n

            _wait(lambda: seen(5))
            assert ds[4, 0, 0] == 1004
            for i in range(5, 12):
                r.add_frame(_frame(i))
            _wait(lambda: seen(12))
            np.testing.assert_array_equal(idx[:12], np.arange(12))
    finally:
        r.stop()


def test_metadata_only_and_bad_input(tmp_path):
    path = tmp_path / "meta.h5"
    r = Recorder(path, frame_shape=(H, W), frames=False, flush_interval_s=0.05)
    with pytest.raises(RecorderError, match="never started"):
        r.stop()
    r.start()
    with pytest.raises(RecorderError, match="already started"):
        r.start()
    assert r.add_frame(_frame(0))
    assert r.add_results(0, None, _tracks(0, 1) | {"status": np.array(["confirmed"])})
    s = r.stop()
    assert not r.add_frame(_frame(1))  # after stop: refused, not written
    assert s.frames == 1 and s.track_rows == 1
    with h5py.File(path, "r") as f:
        assert "frames" not in f and not f.attrs["frames_recorded"]
        assert f["tracks/status"][0] == 1
    # An existing file is never overwritten; a missing folder is named.
    with pytest.raises(RecorderError, match="already exists"):
        Recorder(path, frame_shape=(H, W)).start()
    with pytest.raises(RecorderError, match="does not exist"):
        Recorder(tmp_path / "no" / "x.h5", frame_shape=(H, W)).start()
    with pytest.raises(ValueError, match="flush_interval_s"):
        Recorder(tmp_path / "y.h5", frame_shape=(H, W), flush_interval_s=0)
    # A frame of the wrong shape is skipped and counted, the recording goes on.
    r2 = Recorder(tmp_path / "z.h5", frame_shape=(H, W), flush_interval_s=0.05)
    r2.start()
    bad = Frame(np.zeros((H + 1, W), np.uint16), 0, 1.0, 0.0, 10.0)
    assert not r2.add_frame(bad)
    assert r2.add_frame(_frame(1))
    s2 = r2.stop()
    assert (s2.frames, s2.dropped) == (1, 1)


def test_full_queue_drops_instead_of_blocking(tmp_path):
    r = Recorder(tmp_path / "q.h5", frame_shape=(H, W), queue_frames=1, flush_interval_s=5.0)
    r.start()
    t0 = time.monotonic()
    accepted = sum(r.add_frame(_frame(i)) for i in range(200))
    assert time.monotonic() - t0 < 2.0  # never waits for the writer
    s = r.stop()
    assert s.frames == accepted and s.dropped == 200 - accepted
    assert s.dropped >= 0 and s.frames >= 1

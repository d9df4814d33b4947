"""`focaltrack localize` in chunks (focaltrack.models.reanalysis): the same rows as the
all-at-once analysis, resuming an interrupted run, refusing another run's partial output,
and the same rows from a 2-worker Dask `LocalCluster`."""

from __future__ import annotations

import dataclasses

import h5py
import numpy as np
import pytest
from cnn_fixtures import PIXEL_UM, photons_for_peak_snr, random_scene, render_frame

from focaltrack.daemon.cli import main
from focaltrack.daemon.commands import localize as localize_cmd
from focaltrack.models import reanalysis
from focaltrack.models.localizer import Localizer
from focaltrack.records import Localizations, csv_columns

SHAPE = (96, 96)
N_FRAMES = 22  # not a whole number of chunks: the last one is short


@pytest.fixture(scope="module")
def recording(tmp_path_factory):
    """A service-like recording: ``frames`` (N, H, W) and each frame's focus."""
    rng = np.random.default_rng(3)
    photons = photons_for_peak_snr(25.0, 20.0)
    frames = np.stack(
        [
            render_frame(SHAPE, random_scene(rng, 3, SHAPE, 20, 5.0), np.full(3, photons), rng)
            for _ in range(N_FRAMES)
        ]
    )
    path = tmp_path_factory.mktemp("rec") / "rec.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("frames", data=frames)
        f.create_dataset("frame_meta/stage_z_um", data=np.linspace(10.0, 12.0, N_FRAMES))
        f.attrs["pixel_size_um"] = PIXEL_UM  # as the service writes it
    return path


@pytest.fixture(scope="module")
def reference(trained_model, recording, tmp_path_factory):
    """The analysis as `focaltrack localize` did it before chunks: every frame read at once,
    batches of 4 from frame 0, one write at the end (CSV and HDF5)."""
    frames = localize_cmd.read_frames(recording)
    # one torch thread, as a Dask worker has: more threads may sum the second pass's fit in
    # another order (the last digit of a few rows; docs/scaling.md)
    loc = Localizer.from_bundle(trained_model.bundle, threads=1)
    found = []
    for i in range(0, len(frames), 4):
        found += loc.localize_batch(frames[i : i + 4], first_index=i)
    z = localize_cmd.read_stage_z(recording, len(frames))
    found = [dataclasses.replace(r, stage_z_um=float(z[r.frame])) for r in found]
    # emitters found: rows to compare (3 a frame are there; the CI-sized model finds 40–80
    # of the 66 after the fit's significance cut, depending on the machine it trained on)
    assert sum(len(r) for r in found) > N_FRAMES
    out = tmp_path_factory.mktemp("ref")
    localize_cmd.write_localizations(out / "ref.csv", found, {})
    localize_cmd.write_localizations(out / "ref.h5", found, {})
    return out / "ref.csv", out / "ref.h5"


def _localize(model, recording, out, *extra):
    args = ["localize", "--model", str(model), str(recording), "--out", str(out)]
    return main([*args, "--threads", "1", *extra])


def _h5_columns(path):
    with h5py.File(path, "r") as f:
        g = f["localizations"]
        return {k: g[k][()] for k in g}


def test_chunks_give_the_all_at_once_rows(trained_model, recording, reference, tmp_path, capsys):
    ref_csv, ref_h5 = reference
    out = tmp_path / "locs.csv"
    assert _localize(trained_model.bundle, recording, out, "--chunk", "8") == 0
    assert out.read_text() == ref_csv.read_text()  # same rows, same order, same text
    err = capsys.readouterr().err
    assert "frame/s" in err  # the progress bar's rate
    assert f"{N_FRAMES} frames ({N_FRAMES} now)" in err
    # chunks of 6 frames are rounded up to whole batches of 4 (8): still the same rows
    h5 = tmp_path / "locs.h5"
    assert _localize(trained_model.bundle, recording, h5, "--chunk", "6", "--no-progress") == 0
    got, want = _h5_columns(h5), _h5_columns(ref_h5)
    assert set(got) == set(want) == {*csv_columns(Localizations), "stage_z_um"}
    for k in want:
        assert np.array_equal(got[k], want[k], equal_nan=True), k  # NaN: not fitted
    with h5py.File(h5, "r") as f:
        g = f["localizations"]
        assert g["frame"].maxshape == (None,)  # appended, not written in one piece
        assert g.attrs["n_frames"] == N_FRAMES
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locs.csv", "locs.h5"]  # no journal


class _Interrupt(Exception):
    pass


def _interrupt_after(monkeypatch, chunks):
    """Make the analysis of chunk number ``chunks`` (0-based) fail, as a kill would."""
    real = reanalysis.analyse_chunk
    calls = []

    def flaky(*args):
        calls.append(args[2:])
        if len(calls) > chunks:
            raise _Interrupt
        return real(*args)

    monkeypatch.setattr(reanalysis, "analyse_chunk", flaky)
    return calls


def test_an_interrupted_run_resumes_without_losing_or_repeating_frames(
    trained_model, recording, reference, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "locs.csv"
    args = ("--chunk", "8", "--no-progress")
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(_Interrupt):
        _localize(trained_model.bundle, recording, out, *args)
    monkeypatch.undo()
    assert not out.exists()  # the output appears only complete
    partial = tmp_path / "locs.csv.partial"
    state = tmp_path / "locs.csv.partial.json"
    assert partial.is_file() and state.is_file()
    # a chunk cut off while its rows were written: bytes the state does not count
    with open(partial, "ab") as fh:
        fh.write(b"\x01" * (reanalysis.ROW_DTYPE.itemsize * 3 + 5))
    calls = _interrupt_after(monkeypatch, 99)
    capsys.readouterr()
    assert _localize(trained_model.bundle, recording, out, *args) == 0
    assert calls == [(16, 22)]  # only what was missing
    assert f"{N_FRAMES} frames (6 now)" in capsys.readouterr().err
    assert out.read_text() == reference[0].read_text()
    assert not partial.exists() and not state.exists()


def test_another_runs_partial_output_is_refused_unless_forced(
    trained_model, recording, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "locs.h5"
    # a run that fails on its first chunk (a bad frame, Ctrl-C) leaves nothing to refuse
    _interrupt_after(monkeypatch, 0)
    with pytest.raises(_Interrupt):
        _localize(trained_model.bundle, recording, out, "--chunk", "8", "--no-progress")
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(_Interrupt):
        _localize(trained_model.bundle, recording, out, "--chunk", "8", "--no-progress")
    monkeypatch.undo()
    capsys.readouterr()
    other = ("--chunk", "8", "--no-progress", "--threshold", "0.5")
    assert _localize(trained_model.bundle, recording, out, *other) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "settings differ" in err[0] and "--force" in err[0], err
    assert not out.exists()
    calls = _interrupt_after(monkeypatch, 99)
    assert _localize(trained_model.bundle, recording, out, *other, "--force") == 0
    assert calls[0] == (0, 8)  # started over
    monkeypatch.undo()
    fresh = tmp_path / "fresh.h5"
    assert _localize(trained_model.bundle, recording, fresh, *other) == 0
    got, want = _h5_columns(out), _h5_columns(fresh)
    assert len(want["frame"]) > 0
    for k in want:
        assert np.array_equal(got[k], want[k], equal_nan=True), k  # NaN: not fitted


def test_a_two_worker_dask_cluster_gives_the_single_process_rows(
    trained_model, recording, reference, tmp_path
):
    pytest.importorskip("dask.distributed")
    out = tmp_path / "locs.csv"
    # the local cluster of --dask: LocalCluster(n_workers=2, processes=True,
    # threads_per_worker=1) on loopback; chunks of 4 frames: each worker gets several
    args = ("--dask", "--workers", "2", "--chunk", "4", "--no-progress")
    assert _localize(trained_model.bundle, recording, out, *args) == 0
    assert out.read_text() == reference[0].read_text()


def test_a_live_recording_is_read_up_to_the_frames_its_writer_vouched_for(recording, tmp_path):
    # A recording still written (or left by a crash) can show more rows than reached the
    # disk; its ``flushed`` count says how many did, and only those are analysed.
    path = tmp_path / "live.h5"
    with h5py.File(recording, "r") as src, h5py.File(path, "w") as f:
        f.create_dataset("frames", data=src["frames"][()])
        f.create_dataset("frame_meta/stage_z_um", data=src["frame_meta/stage_z_um"][()])
        f.create_dataset("flushed", data=np.array([N_FRAMES - 5, 0, 0], dtype=np.int64))
    source = reanalysis.open_frames(path, None)
    assert source.n_frames == N_FRAMES - 5 and source.stage_z
    frames = localize_cmd.read_frames(path)
    with h5py.File(recording, "r") as src:
        np.testing.assert_array_equal(frames, src["frames"][: N_FRAMES - 5])

"""The one frame analyser (`focaltrack.models.analyser.FrameAnalyser`): the same tracks live
and offline, across focus moves."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from focaltrack.models.analyser import FrameAnalyser
from focaltrack.models.track_types import TrackFrame, TrackTable
from focaltrack.models.tracker import (
    KalmanTracker,
    TrackerConfig,
    defocus_to_depth,
    link_table,
    tracks_at_focus,
)
from focaltrack.records import Localizations, LocFlag


class _ScriptedLocalizer:
    """A localizer that returns prepared localizations (one `Localizations` per frame)."""

    # The analyser gives the tracker the field of view (frame size × pixel size): with the
    # 4 × 4 px frames below, 40 × 40 µm holds the scene.
    pixel_size_um = 10.0

    def __init__(self, per_frame: list[Localizations]) -> None:
        self.per_frame = per_frame

    def localize(self, pixels: np.ndarray, frame_index: int) -> Localizations:
        del pixels
        return self.per_frame[frame_index]


def _scene(
    n_frames: int = 40, move_at: int = 20, step_um: float = 6.0
) -> tuple[list[Localizations], np.ndarray, np.ndarray]:
    """Three emitters drifting slowly in absolute depth, seen as defocus (stage − z_abs)
    by a focus that steps by ``step_um`` at frame ``move_at``; one NaN row now and then."""
    rng = np.random.default_rng(3)
    xyz_abs = np.array([[10.0, 12.0, -40.0], [30.0, 8.0, -55.0], [22.0, 30.0, -48.0]])
    stage = np.where(np.arange(n_frames) < move_at, 0.0, step_um)
    t = 0.01 * (1 + np.arange(n_frames))
    locs = []
    for i in range(n_frames):
        drift = np.array([0.5 * t[i], 0.0, 2.0 * t[i]])
        p = xyz_abs + drift + rng.normal(0, 0.05, xyz_abs.shape)
        d = p.copy()
        d[:, 2] = stage[i] - p[:, 2]  # the localizer reports defocus
        if i % 7 == 3:
            d[1, 0] = np.nan  # a row the tracker must reject
        score = rng.uniform(0.5, 1.0, len(d)).astype(np.float32)
        locs.append(Localizations(i, d[:, 0], d[:, 1], d[:, 2], score))
    return locs, t, stage


def _old_chain(locs: list[Localizations], t: np.ndarray, stage: np.ndarray) -> list[TrackFrame]:
    """The live analysis thread before the analyser (daemon/pipeline.py at cd4a0dd^)."""
    tracker = KalmanTracker(TrackerConfig())
    out = []
    for lc, ti, focus in zip(locs, t.tolist(), stage.tolist(), strict=True):
        xyz = defocus_to_depth(lc.xyz_um, focus)
        ok = np.all(np.isfinite(xyz), axis=1) if len(lc) else None
        frame = tracker.update_frame(
            xyz if ok is None else xyz[ok], ti, None if ok is None else np.asarray(lc.score)[ok]
        )
        out.append(tracks_at_focus(frame, focus))
    return out


def _same(a: TrackFrame, b: TrackFrame, *, rows: bool = True) -> None:
    assert a.t_s == b.t_s
    for name in ("id", "xyz_um", "velocity_um_s", "cov_xyz_um2", "status", "age_frames",
                 "hits", "misses"):  # fmt: skip
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    if rows:
        np.testing.assert_array_equal(a.localization_row, b.localization_row)


def test_analyser_gives_the_old_live_chain_across_a_focus_move() -> None:
    locs, t, stage = _scene()
    old = _old_chain(locs, t, stage)
    analyser = FrameAnalyser(_ScriptedLocalizer(locs), KalmanTracker(TrackerConfig()))
    px = np.zeros((4, 4), np.uint16)
    confirmed_after_move = 0
    for i, (want, ti, z) in enumerate(zip(old, t.tolist(), stage.tolist(), strict=True)):
        got_locs, got = analyser.analyse(px, i, ti, z)
        assert got_locs.stage_z_um == z
        # localization_row: the old chain numbered the finite rows, the analyser the input's
        _same(got, want, rows=not np.isnan(locs[i].x_um).any())
        if i >= 20:
            confirmed_after_move += int(got.confirmed.sum())
    # the move did not end the tracks: all three stay confirmed through it
    assert confirmed_after_move == 3 * 20
    ids = set(old[19].id.tolist())
    assert ids == set(old[-1].id.tolist()) and len(ids) == 3


def test_link_table_with_stage_z_is_the_analyser() -> None:
    locs, t, stage = _scene(step_um=40.0)
    analyser = FrameAnalyser(None, KalmanTracker(TrackerConfig()))
    want = [
        (i, analyser.track_only(lc, i, ti, z))
        for i, (lc, ti, z) in enumerate(zip(locs, t.tolist(), stage.tolist(), strict=True))
    ]
    rows = [(i, r) for i, lc in enumerate(locs) for r in range(len(lc))]
    frame = np.array([i for i, _ in rows])
    xyz = np.concatenate([lc.xyz_um for lc in locs])
    score = np.concatenate([lc.score for lc in locs])
    got = link_table(frame, xyz, t[frame], scores=score, stage_z_um=stage[frame])
    w = TrackTable.from_frames(want)
    for name in ("frame", "track_id", "xyz_um", "status", "hits", "misses"):
        np.testing.assert_array_equal(getattr(got, name), getattr(w, name), err_msg=name)
    # without the focus, the move looks like a 40 µm jump of every emitter: new tracks
    plain = link_table(frame, xyz, t[frame], scores=score)
    assert len(np.unique(plain.track_id)) > len(np.unique(got.track_id))


def test_analyser_without_a_localizer_refuses_frames() -> None:
    with pytest.raises(ValueError, match="track_only"):
        FrameAnalyser(None, KalmanTracker()).analyse(np.zeros((2, 2)), 0, 1.0, 0.0)


def test_unknown_focus_tracks_the_defocus_as_it_is() -> None:
    locs, t, _ = _scene(n_frames=10, move_at=99)
    a = FrameAnalyser(None, KalmanTracker())
    b = KalmanTracker()
    for i, (lc, ti) in enumerate(zip(locs, t.tolist(), strict=True)):
        got = a.track_only(lc, i, ti, float("nan"))
        _same(got, b.update_frame(lc.xyz_um, ti, np.asarray(lc.score)))


# ----------------------------------------------------------------- live == offline


def _focaltrack(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "focaltrack.daemon.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _from_fresh_tracker(src: Path, dst: Path) -> Path:
    """A copy of recording ``src`` from the first frame the reloaded model's fresh tracker
    analysed: the last frame where track 1 is born (all emitters are in every frame)."""
    with h5py.File(src, "r") as f:
        t = f["tracks"]
        born1 = t["frame"][()][(t["track_id"][()] == 1) & (t["age_frames"][()] == 1)]
        cut = int(born1.max())
        with h5py.File(dst, "w") as g:
            for group in ("frame_meta", "localizations", "tracks"):
                key = "index" if group == "frame_meta" else "frame"
                keep = f[group][key][()] >= cut
                for name, ds in f[group].items():
                    g.create_dataset(f"{group}/{name}", data=ds[()][keep])
    return dst


_PX = 160
_Z_ABS = (-22.0, -18.0)  # defocus ≈ 20 µm with the focus at 0, as in test_demo's focus lock


def _bright_scene_seed() -> int:
    """A sim seed whose emitters are all well inside the frame and bright (the service
    builds the same `Scene` from the same settings)."""
    from focaltrack.sim.optics import Optics
    from focaltrack.sim.scene import Scene

    field = _PX * Optics().pixel_size_um
    for seed in range(500):
        scene = Scene(field_um=(field, field), z_range_um=_Z_ABS, n_emitters=3,
                      motion="static", seed=seed)  # fmt: skip
        p = scene.positions_um
        inside = np.minimum(np.minimum(p[:, 0], p[:, 1]), field - np.maximum(p[:, 0], p[:, 1]))
        if inside.min() > 15.0 and scene.photons.min() > 5000:
            return seed
    raise AssertionError("no seed gives central, bright emitters")


def test_track_on_a_recording_gives_the_live_tracks(tmp_path: Path, trained_model: Any) -> None:
    """A live service on the simulated microscope records while its focus moves; `focaltrack
    track` on the recording reproduces the recording's tracks (ids, positions, status);
    `focaltrack localize` on it keeps each frame's focus."""
    from service_config import loopback_config

    from focaltrack.daemon.client import ControlClient
    from focaltrack.daemon.service import Service

    ws = tmp_path / "ws"
    shutil.copytree(trained_model.bundle, ws / "models" / "ci")
    sim = {"width": _PX, "height": _PX, "n_emitters": 3, "motion": "static",
           "seed": _bright_scene_seed(), "z_range_um": _Z_ABS}  # fmt: skip
    svc = Service(loopback_config(ws, **{f"sim.{k}": v for k, v in sim.items()}))
    svc.start()
    try:
        with ControlClient(svc.endpoints["control"], timeout_s=30) as ctl:
            ctl.call("load_model", name="ci")
            ctl.call("start")
            rec = ctl.call("record_start", name="move")
            # Frames analysed before the recording began gave the live tracker a history the
            # file does not hold: a model (re)load starts a fresh tracker at a recorded frame.
            ctl.call("load_model", name="ci")
            deadline = time.monotonic() + 120

            def analysed_past(n: int, what: str) -> int:
                # frames analysed (their results recorded), not only acquired
                while (k := ctl.call("status")["frames_analysed"]) < n:
                    assert time.monotonic() < deadline, what
                    time.sleep(0.05)
                return k

            n = analysed_past(ctl.call("status")["frames_analysed"] + 12, "no frames analysed")
            z0 = ctl.call("get_z")["z_um"]
            ctl.call("move_z", z_um=z0 + 4.0)
            analysed_past(n + 12, "no frames analysed after the move")
            ctl.call("record_stop")
            ctl.call("stop")
    finally:
        svc.stop()
        svc.join(30.0)
    path = Path(rec["path"])
    with h5py.File(path, "r") as f:
        live = {k: f["tracks"][k][()] for k in ("frame", "track_id", "x_um", "y_um", "z_um",
                                                 "status")}  # fmt: skip
        stage = f["frame_meta/stage_z_um"][()]
        assert np.ptp(stage) > 3  # the focus moved while recording
        assert len(f["localizations/frame"]) > 0
        # the live analysis is the model's default: each localization fitted, with its σ
        flags = f["localizations/flags"][()]
        fitted = (flags & int(LocFlag.NOT_FITTED)) == 0
        assert fitted.any() and np.all(f["localizations/sigma_x_um"][()][fitted] > 0)
        assert np.all(f["localizations/photons"][()][fitted] > 0)
    assert len(live["track_id"]) > 0 and (live["status"] == 1).any()
    trimmed = _from_fresh_tracker(path, tmp_path / "from_reload.h5")
    with h5py.File(trimmed, "r") as f:
        live = {k: f["tracks"][k][()] for k in live}

    out = tmp_path / "tracks.h5"
    r = _focaltrack("track", str(trimmed), "--out", str(out), "--model", str(ws / "models" / "ci"))
    assert r.returncode == 0, r.stderr
    with h5py.File(out, "r") as f:
        off = {k: f["tracks"][k][()] for k in live}
    np.testing.assert_array_equal(off["frame"], live["frame"])
    np.testing.assert_array_equal(off["track_id"], live["track_id"])
    np.testing.assert_array_equal(off["status"], live["status"])
    for k in ("x_um", "y_um", "z_um"):
        np.testing.assert_allclose(off[k], live[k], rtol=0, atol=1e-9, err_msg=k)

    # localize keeps each frame's focus (the recording's frame_meta); the networks alone:
    # the recording holds every acquired frame, and the column is what is checked here
    locs = tmp_path / "locs.csv"
    r = _focaltrack("localize", "--model", str(ws / "models" / "ci"), str(path), "--out",
                    str(locs), "--dataset", "frames", "--device", "cpu",
                    "--passes", "1", "--fit", "none")  # fmt: skip
    assert r.returncode == 0, r.stderr
    header = locs.read_text().splitlines()[0].split(",")
    assert header[:5] == ["frame", "x_um", "y_um", "z_um", "score"]
    assert header[-1] == "stage_z_um"  # after the fit's columns
    rows = np.loadtxt(locs, delimiter=",", skiprows=1, ndmin=2)
    np.testing.assert_array_equal(rows[:, -1], np.round(stage[rows[:, 0].astype(int)], 4))

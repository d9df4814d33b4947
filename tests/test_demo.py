"""The demo, the benchmark's replay camera and the focus-lock example.

Pure parts first (ground-truth mapping, scoring with an edge margin, live-view statistics,
the focus-lock controller in closed loop with a simulated stage); then one short end-to-end
demo over the real sockets with a tiny training run and small frames; last, the focus-lock
example steering the simulated focus drive through a service running a trained model
(the session's `ci` bundle), judged against the simulator's ground truth.
"""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from focaltrack.daemon.commands import demo
from focaltrack.daemon.commands.bench import ReplayCamera, SizeResult, format_table
from focaltrack.daemon.protocol import hb_header, loc_header, track_header, validate
from focaltrack.drivers.base import CameraTimeoutError, StreamEnded
from focaltrack.drivers.simcore import SimFrameTruth
from focaltrack.sim.scene import GroundTruth

ROOT = Path(__file__).resolve().parents[1]
PX = 0.65


def _load_focus_lock():
    path = ROOT / "deploy" / "examples" / "focus_lock.py"
    spec = importlib.util.spec_from_file_location("focus_lock_example", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


fl = _load_focus_lock()


# ============================================================================ focus lock


def _tracks(frame, tracks, *, stage_z=0.0, t=None):
    """A `track` message header with the given tracks: (id, z, status, age, misses)."""
    cols = {name: [] for name in ("track_id", "z_um", "status", "age_frames", "misses")}
    for tid, z, status, age, misses in tracks:
        cols["track_id"].append(tid)
        cols["z_um"].append(z)
        cols["status"].append(status)
        cols["age_frames"].append(age)
        cols["misses"].append(misses)
    n = len(tracks)
    columns = {
        **cols,
        "x_um": [10.0] * n,
        "y_um": [10.0] * n,
        **{k: [0.0] * n for k in ("vx_um_s", "vy_um_s", "vz_um_s")},
        **{k: [0.5] * n for k in ("sigma_x_um", "sigma_y_um", "sigma_z_um")},
    }
    h = track_header(
        seq=frame,
        frame=frame,
        t_acq_s=1000.0 + 0.1 * frame if t is None else t,
        stage_z_um=stage_z,
        columns=columns,
    )
    validate("track", h)  # the controller reads real messages
    return h


def test_focus_lock_picks_the_longest_confirmed_track_seen_now_and_stays_on_it():
    lock = fl.FocusLock(fl.FocusLockConfig(min_age_frames=3))
    msg = _tracks(
        1,
        [
            (1, 40.0, "tentative", 50, 0),  # not confirmed
            (2, 40.0, "coasting", 30, 2),  # missed in this frame
            (3, 40.0, "confirmed", 20, 0),
            (4, 40.0, "confirmed", 25, 0),  # the one
            (5, 140.0, "confirmed", 90, 0),  # outside the calibrated range
            (6, 40.0, "confirmed", 2, 0),  # too young
        ],
    )
    assert lock.step(msg).track_id == 4
    # Sticky: once locked, an older track appearing does not steal the lock ...
    msg = _tracks(2, [(4, 45.0, "confirmed", 26, 0), (7, 45.0, "confirmed", 99, 0)])
    assert lock.step(msg).track_id == 4
    # ... nor while the locked track coasts (not seen this frame): hold, do not steer ...
    d = lock.step(_tracks(3, [(4, 10.0, "coasting", 27, 1), (7, 45.0, "confirmed", 100, 0)]))
    assert (d.track_id, d.reason, d.move_to_um) == (4, "coasting", None)
    # ... until the locked track ends.
    msg = _tracks(4, [(7, 45.0, "confirmed", 101, 0)])
    assert lock.step(msg).track_id == 7
    d = lock.step(_tracks(5, [(8, 45.0, "tentative", 3, 0)]))
    assert d.reason == "no_track" and d.move_to_um is None and lock.locked_id is None


def test_focus_lock_step_sign_gain_rate_limit_deadband_and_stale_frames():
    cfg = fl.FocusLockConfig(
        setpoint_um=50.0, gain=0.5, max_rate_um_s=40.0, max_dt_s=0.2, deadband_um=1.0
    )
    lock = fl.FocusLock(cfg)
    # Defocus 46 < 50: the focus must go up by 0.5 · 4 = 2 µm from the frame's stage z.
    d = lock.step(_tracks(1, [(1, 46.0, "confirmed", 9, 0)], stage_z=10.0, t=100.0))
    assert d.reason == "move" and d.move_to_um == pytest.approx(12.0)
    assert d.error_um == pytest.approx(4.0)
    # Too far above: −0.5 · 30 = −15 µm, limited to 40 µm/s · 0.1 s = 4 µm.
    d = lock.step(_tracks(2, [(1, 80.0, "confirmed", 10, 0)], stage_z=12.0, t=100.1))
    assert d.move_to_um == pytest.approx(8.0)
    # A long pause grants at most max_dt_s worth of travel.
    d = lock.step(_tracks(3, [(1, 80.0, "confirmed", 11, 0)], stage_z=8.0, t=110.0))
    assert d.move_to_um == pytest.approx(0.0)
    # Inside the dead band: nothing is sent.
    d = lock.step(_tracks(4, [(1, 50.6, "confirmed", 12, 0)], t=110.1))
    assert d.reason == "deadband" and d.move_to_um is None
    # The same frame again is ignored.
    d = lock.step(_tracks(4, [(1, 30.0, "confirmed", 12, 0)], t=110.2))
    assert d.reason == "stale" and d.move_to_um is None
    # A track whose z is not a number (published as null) is not steered on.
    h = _tracks(5, [(1, 30.0, "confirmed", 13, 0)], t=110.3)
    h["z_um"] = [None]
    assert lock.step(h).reason == "no_track"
    # Frame numbers going back mean the service restarted: start over (new lock, new timing).
    d = lock.step(_tracks(0, [(9, 48.0, "confirmed", 6, 0)], stage_z=3.0, t=5.0))
    assert d.track_id == 9 and d.move_to_um == pytest.approx(4.0)


def test_focus_lock_closes_the_loop_on_a_simulated_stage():
    """The plant of the simulated microscope: defocus d = focus − z_abs, the emitter
    drifting in depth; stage moves land before the next frame, measurements are noisy."""
    rng = np.random.default_rng(3)
    cfg = fl.FocusLockConfig(setpoint_um=50.0, gain=0.5, max_rate_um_s=60.0, deadband_um=1.0)
    lock = fl.FocusLock(cfg)
    focus, z_abs, dt = 0.0, -20.0, 0.05  # start at d = 20 µm, 30 µm off the setpoint
    errors = []
    t_last_move = None
    for k in range(200):
        z_abs += 2.0 * dt + rng.normal(0.0, math.sqrt(2 * 1.0 * dt))  # 2 µm/s drift + D = 1
        errors.append(focus - z_abs - cfg.setpoint_um)
        d_meas = focus - z_abs + rng.normal(0.0, 0.7)
        msg = _tracks(k, [(1, d_meas, "confirmed", 10 + k, 0)], stage_z=focus, t=k * dt)
        decision = lock.step(msg)
        if decision.move_to_um is not None:
            # The speed limit: never faster than max_rate_um_s since the last move.
            since = cfg.max_dt_s if t_last_move is None else min(k * dt - t_last_move, 0.2)
            assert abs(decision.move_to_um - focus) <= cfg.max_rate_um_s * since + 1e-9
            focus, t_last_move = decision.move_to_um, k * dt
    # 30 µm at ≤ 3 µm per frame: there within ~20 frames, then held to about the noise.
    assert abs(errors[0]) > 25
    late = np.abs(np.array(errors[60:]))
    assert late.mean() < 2.0 and late.max() < 5.0


def test_focus_lock_config_rejects_bad_values():
    with pytest.raises(ValueError, match="gain"):
        fl.FocusLockConfig(gain=0.0)
    with pytest.raises(ValueError, match="setpoint"):
        fl.FocusLockConfig(setpoint_um=150.0)
    with pytest.raises(ValueError, match="max_rate_um_s"):
        fl.FocusLockConfig(max_rate_um_s=-1.0)


def test_focus_lock_script_help_and_bad_arguments():
    r = subprocess.run(
        [sys.executable, str(ROOT / "deploy/examples/focus_lock.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0 and "--setpoint-um" in r.stdout
    r = subprocess.run(
        [sys.executable, str(ROOT / "deploy/examples/focus_lock.py"), "--gain", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "gain" in r.stderr


# ============================================================================ ground truth


def _entry(k, xyz, *, focus=0.0, offset=(0.0, 0.0), t=None):
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    gt = GroundTruth(
        t_s=0.0, ids=np.arange(len(xyz)), xyz_um=xyz, photons=np.full(len(xyz), 1000.0)
    )
    return SimFrameTruth(
        serial=k,
        sequence_frame=k,
        t_sim_s=0.1 * k if t is None else t,
        focus_z_um=focus,
        offset_xy_um=offset,
        scene=gt,
    )


def test_visible_truth_is_in_published_coordinates_and_inside_the_frame():
    shape = (100, 200)  # rows, columns
    xyz = [
        [10.0, 10.0, -30.0],  # defocus 30 at focus 0
        [199 * PX, 5.0, -50.0],  # on the last column
        [200 * PX, 5.0, -50.0],  # off the frame (x)
        [10.0, 100 * PX + 2.0, -50.0],  # off the frame (y)
        [10.0, 10.0, 20.0],  # defocus −20: above the calibrated range
    ]
    e = _entry(0, xyz, focus=5.0, offset=(1.0, -2.0))
    v = demo.visible_truth(e, shape, PX, (0.0, 100.0))
    # Drift moves the image (x + 1, y − 2); defocus = focus − z.
    np.testing.assert_allclose(v, [[11.0, 8.0, 35.0]])
    e = _entry(0, xyz)
    v = demo.visible_truth(e, shape, PX, (0.0, 100.0))
    assert len(v) == 2 and v[1, 0] == pytest.approx(199 * PX)


def test_truth_by_frame_skips_snaps_and_keeps_the_first_stream():
    snap = SimFrameTruth(0, -1, 0.0, 0.0, (0.0, 0.0), None)
    first = [_entry(k, [[10.0, 10.0, -40.0 - k]]) for k in range(3)]
    second = [_entry(k, [[20.0, 20.0, -60.0]]) for k in range(2)]
    tf = demo.truth_by_frame([snap, *first, snap, *second], (64, 64), PX, (0.0, 100.0))
    assert sorted(tf.xyz_um) == [0, 1, 2] and tf.n_streams == 2
    assert tf.xyz_um[2][0, 2] == pytest.approx(42.0)
    assert tf.t_sim_s[1] == pytest.approx(0.1)


def test_alignment_error_detects_a_shifted_mapping():
    t_sim = {k: 0.1 * k for k in range(10)}
    t_acq = {k: 5000.0 + 0.1 * k for k in range(10)}
    assert demo.alignment_error_s(t_acq, t_sim) == pytest.approx(0.0, abs=1e-9)
    shifted = {k: 5000.0 + 0.1 * (k + 1) for k in range(10)}
    shifted[0] = 5000.0
    assert demo.alignment_error_s(shifted, t_sim) == pytest.approx(0.1)
    assert demo.alignment_error_s({}, t_sim) is None


def test_match_in_region_scores_only_inside_the_margin():
    region = (5.0, 95.0, 5.0, 95.0)
    truth = np.array(
        [
            [50.0, 50.0, 40.0],  # inside, found
            [60.0, 60.0, 40.0],  # inside, missed -> FN
            [2.0, 50.0, 40.0],  # outside, found (just inside) -> not counted
            [1.0, 10.0, 40.0],  # outside, missed -> not counted
        ]
    )
    pred = np.array(
        [
            [50.5, 50.0, 41.0],  # TP
            [5.5, 50.0, 40.0],  # matched to the outside emitter: ignored
            [80.0, 80.0, 40.0],  # inside, no emitter -> FP
            [2.0, 90.0, 40.0],  # outside, no emitter -> ignored
        ]
    )
    m = demo.match_in_region(pred, truth, 10.0, region)
    assert (m.tp, m.fp, m.fn) == (1, 1, 1)
    np.testing.assert_allclose(m.errors_um, [[0.5, 0.0, 1.0]])
    assert m.jaccard == pytest.approx(1 / 3)


def test_score_frames_pools_frames_per_tolerance():
    region = demo.scoring_region((128, 128), PX)
    rng = np.random.default_rng(0)
    truth = {
        k: np.column_stack([rng.uniform(10, 70, (8, 2)), rng.uniform(0, 100, 8)]) for k in range(5)
    }
    dz = np.array([0.0, 0.0, 1.0])
    # Perfect in x and y, 1.5 µm deep in z: within both tolerances.
    pred = {k: v + 1.5 * dz for k, v in truth.items()}
    pred[7] = np.zeros((1, 3))  # a frame without truth: not scored
    s = demo.score_frames(pred, truth, region_um=region)
    assert s["frames"] == 5
    for key in ("10um", "2um"):
        v = s["by_tolerance"][key]
        assert v["jaccard"] == pytest.approx(1.0)
        assert v["rmse_axial_um"] == pytest.approx(1.5)
        assert v["rmse_lateral_um"] == pytest.approx(0.0)
    # 3 µm deep: still matched within 10 µm, none within 2 µm.
    pred = {k: v + 3.0 * dz for k, v in truth.items()}
    s = demo.score_frames(pred, truth, region_um=region)
    assert s["by_tolerance"]["10um"]["jaccard"] == pytest.approx(1.0)
    v = s["by_tolerance"]["2um"]
    assert v["jaccard"] == 0.0 and v["rmse_axial_um"] is None
    assert v["fp"] == v["fn"] == 40
    json.dumps(s, allow_nan=False)  # summary.json is strict JSON


# ============================================================================ live view


def _loc(seq, frame, xyz, t_acq, latency_s, inference_s=0.01):
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    return loc_header(
        seq=seq,
        frame=frame,
        t_acq_s=t_acq,
        stage_z_um=0.0,
        x_um=xyz[:, 0],
        y_um=xyz[:, 1],
        z_um=xyz[:, 2],
        score=np.ones(len(xyz)),
        inference_s=inference_s,
        t_pub_s=t_acq + latency_s,
    )


def test_live_stats_rates_latencies_tracks_and_gaps():
    st = demo.LiveStats(t0=0.0)
    st._win_t0 = 0.0
    st.add("hb", hb_header(seq=0, state="live", frames_acquired=0, frames_analysed=0,
                           frames_dropped=0, model="m", uptime_s=1.0), now=0.0)  # fmt: skip
    for k in range(10):
        seq = k if k < 5 else k + 2  # two loc messages lost
        st.add(
            "loc", _loc(seq, k, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], 100.0 + k, 0.010 + 0.001 * k)
        )
        st.add(
            "track",
            _tracks(k, [(1, 3.0, "confirmed", 5, 0), (2, 6.0, "tentative", 1, 0)]),
        )
    st.add("hb", hb_header(seq=1, state="live", frames_acquired=20, frames_analysed=10,
                           frames_dropped=3, model="m", uptime_s=2.0), now=2.0)  # fmt: skip
    line = st.window_line(2.0, truth_in_view=7)
    assert "5.0 frames/s" in line and "emitters   2 (true   7)" in line
    assert "tracks   1" in line and "dropped     3" in line
    s = st.summary(2.0)
    assert s["frames_published"] == 10 and s["analysed_fps"] == pytest.approx(5.0)
    assert s["camera_fps"] == pytest.approx(10.0)
    assert s["latency_ms"]["p50"] == pytest.approx(14.5)
    assert s["inference_ms"]["p50"] == pytest.approx(10.0)
    assert s["messages_lost_by_topic"] == {"loc": 2}
    assert s["confirmed_tracks_per_frame"] == 1.0
    assert set(st.loc_xyz) == set(range(10)) and st.track_xyz[3].shape == (1, 3)
    # The next window starts empty.
    assert "0.0 frames/s" in st.window_line(3.0)


# ============================================================================ bench parts


def test_replay_camera_streams_at_its_rate_and_counts_overflow():
    frames = np.arange(3 * 4 * 4, dtype=np.uint16).reshape(3, 4, 4)
    cam = ReplayCamera(frames, pixel_size_um=PX, exposure_ms=1.0, buffer_frames=5)
    info = cam.describe()
    assert (info.width, info.height, info.pixel_size_um) == (4, 4, PX)
    cam.start_stream(20.0)
    t0 = time.monotonic()
    got = [cam.next_frame(timeout_s=1.0) for _ in range(4)]
    assert time.monotonic() - t0 >= 0.055  # frame 3 is due at 60 ms
    assert [f.index for f in got] == [0, 1, 2, 3]
    assert np.array_equal(got[3].pixels, frames[0])  # wraps around
    assert got[1].t_acq_s - got[0].t_acq_s == pytest.approx(0.02)
    time.sleep(0.2)  # ~10 frames come while nobody reads: the 5-frame buffer overflows
    f = cam.next_frame(timeout_s=1.0)
    assert cam.dropped_frames >= 3 and f.index == 4 + cam.dropped_frames
    cam.stop_stream()
    with pytest.raises(StreamEnded):
        cam.next_frame(timeout_s=0.1)
    cam.start_stream(1000.0)
    cam.next_frame(timeout_s=0.5)
    with pytest.raises(CameraTimeoutError):
        cam.next_frame(timeout_s=0.05)
    cam.close()


def test_bench_table_and_limits():
    r = SizeResult(256, 45.0, 120.0, 130.0, 100.0, 8.0, 0, 920, 1000, 80, 95.0, 160.0, 118.0,
                   19.5, 10.0)  # fmt: skip
    assert not r.keeps_up and "analysis-bound" in r.limit(100.0, "replay")
    ok = SizeResult(512, 100.0, 5.0, 6.0, 9.5, 9.5, 0, 0, 95, 95, 20.0, 30.0, 5.0, 20.0, 10.0)
    assert ok.keeps_up and "simulator is the bottleneck" in ok.limit(100.0, "sim")
    shared = SizeResult(256, 21.7, 20.6, 21.9, 23.9, 13.7, 0, 82, 191, 110, 155.1, 216.2, 64.5,
                        18.2, 8.0)  # fmt: skip
    assert "share the CPU" in shared.limit(100.0, "sim") and "renders" in shared.limit(1, "sim")
    lines = format_table([r, ok])
    assert "256×256" in lines[2] and "920/0" in lines[2] and "95.0 / 160.0" in lines[2]


# ============================================================================ CLI


def test_command_modules_do_not_import_torch():
    code = (
        "import sys, argparse\n"
        "from focaltrack.daemon.commands import demo, bench\n"
        "p = argparse.ArgumentParser(); s = p.add_subparsers()\n"
        "demo.register(s); bench.register(s)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_demo_and_bench_refuse_bad_arguments(tmp_path, capsys):
    from focaltrack.daemon.cli import main

    assert main(["demo", "--out", str(tmp_path / "d"), "--duration-s", "0"]) == 2
    assert "--duration-s must be > 0" in capsys.readouterr().err
    assert main(["demo", "--out", str(tmp_path / "d"), "--model", str(tmp_path)]) == 2
    assert "not a model bundle" in capsys.readouterr().err
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["demo", "--out", str(f)]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["bench", "--model", str(tmp_path)]) == 2
    assert "not a model bundle" in capsys.readouterr().err
    assert main(["bench", "--workspace", str(tmp_path / "none")]) == 2
    assert "no model to benchmark" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()  # nothing half-written


# ============================================================================ end to end

TINY_TRAINING = {"lateral_steps": 3, "axial_steps": 3, "lateral_batch": 2, "axial_batch": 2,
                 "val_frames": 1, "val_size": 128, "pupil_fit": False}  # fmt: skip


def test_demo_end_to_end_over_the_sockets(tmp_path):
    """Calibrate, train (a tiny run), load, go live, score: the whole flow in ~30 s.
    The tiny model finds nothing; the plumbing and the summary are what is checked."""
    out = tmp_path / "demo"
    settings = demo.DemoSettings(
        out=out,
        duration_s=2.5,
        size_px=128,
        cal_z_step_um=20.0,
        cal_averages=1,
        interval_ms=100.0,
        train_overrides=TINY_TRAINING,
    )
    lines: list[str] = []

    class Stream:
        def write(self, text: str) -> int:
            lines.append(text)
            return len(text)

        def flush(self) -> None:
            pass

    summary = demo.run_demo(settings, stream=Stream())  # type: ignore[arg-type]
    text = "".join(lines)
    for step in ("1. calibrate", "2. train", "3. live", "4. what was published"):
        assert step in text
    assert "frames/s" in text and "latency p50/p99" in text
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk == summary
    assert (out / "calibration.png").stat().st_size > 10_000
    # the live phase was recorded and drawn (`focaltrack show`), both listed in the summary
    files = summary["files"]
    assert files["recording_png"] == str(out / "recording.png")
    assert (out / "recording.png").stat().st_size > 10_000
    rec = Path(files["recording"])
    assert rec.is_file() and rec.parent == out / "workspace" / "recordings"
    from focaltrack.daemon.commands.show import read_recording_view

    assert len(read_recording_view(rec).frame_index) >= 10
    assert "recording.png" in text and summary["timings_s"]["recording_figure_s"] > 0
    cal = summary["calibration"]
    assert cal["n_slices"] == 6 and Path(cal["path"]).is_file()
    live = summary["live"]
    assert live["frames_published"] >= 10 and live["frames_analysed"] >= 10
    assert live["latency_ms"]["p50"] is not None and live["latency_ms"]["p50"] > 0
    acc = summary["accuracy"]
    assert acc["localizations"]["frames"] >= 10 and acc["truth_streams"] == 1
    assert acc["frame_alignment_spread_s"] < 0.01  # frame index ↔ truth mapping holds
    assert acc["localizations"]["by_tolerance"]["10um"]["fn"] > 0  # emitters were in view
    state = json.loads((out / "workspace" / "state.json").read_text())
    assert state["model"] == summary["model"]["name"] and state["calibration"] == cal["calibration"]
    # The workspace restores into a fresh service, and the focus-lock example runs against
    # it over the sockets (with this tiny model there is nothing to lock on: no moves).
    from focaltrack.daemon.service import Service

    svc = Service(demo.demo_config(settings, out / "workspace"))
    svc.start()
    try:
        assert svc.state.value == "idle"
        ep = svc.endpoints
        cfg = fl.FocusLockConfig()
        rc = fl.run(ep["control"], ep["pub"], cfg, duration_s=2.0, start=True, stage_timeout_s=2.0)
        assert rc == 0 and svc.state.value == "live"
    finally:
        svc.stop()
        svc.join(30.0)


# ============================================================ focus lock against a trained model

LOCK_PX = 160  # simulated camera, pixels
LOCK_Z_ABS = (-20.5, -19.5)  # the emitter's depth, µm: defocus ≈ 20 µm with the focus at 0


def _lock_scene_seed() -> tuple[int, np.ndarray]:
    """A sim seed whose one emitter is well inside the frame and bright, and its position
    (the service builds the same `Scene` from the same settings)."""
    from focaltrack.sim.optics import Optics
    from focaltrack.sim.scene import Scene

    field = LOCK_PX * Optics().pixel_size_um
    for seed in range(100):
        scene = Scene(field_um=(field, field), z_range_um=LOCK_Z_ABS, n_emitters=1,
                      motion="static", seed=seed)  # fmt: skip
        xyz, photons = scene.positions_um[0], scene.photons[0]
        if min(xyz[0], xyz[1], field - xyz[0], field - xyz[1]) > 30.0 and photons > 6000:
            return seed, xyz
    raise AssertionError("no seed gives a central, bright emitter")


def test_focus_lock_holds_a_setpoint_through_a_trained_model(tmp_path, trained_model, capsys):
    """The whole feedback loop, for real: the simulated microscope renders the emitter at
    defocus focus − z_abs, a trained model (the session's `ci` bundle) localizes it live,
    the tracker confirms it, and the focus-lock example steers the focus drive over the
    control socket until the emitter sits at the setpoint defocus."""
    from service_config import loopback_config

    from focaltrack.daemon.service import Service

    bundle = trained_model.bundle
    seed, xyz = _lock_scene_seed()
    ws = tmp_path / "ws"
    shutil.copytree(bundle, ws / "models" / "ci")
    sim = {"width": LOCK_PX, "height": LOCK_PX, "n_emitters": 1, "motion": "static",
           "z_range_um": LOCK_Z_ABS, "seed": seed}  # fmt: skip
    config = loopback_config(ws, **{f"sim.{k}": v for k, v in sim.items()})
    svc = Service(config)
    svc.start()
    try:
        from focaltrack.daemon.client import ControlClient

        ep = svc.endpoints
        with ControlClient(ep["control"], timeout_s=30) as ctl:
            assert ctl.call("load_model", name="ci") == {"model": "ci"}
            focus0 = ctl.call("get_z")["z_um"]
            setpoint = 40.0
            assert abs((focus0 - xyz[2]) - setpoint) > 15  # starts ~20 µm off the setpoint
            cfg = fl.FocusLockConfig(setpoint_um=setpoint, gain=0.5, max_rate_um_s=20.0)
            rc = fl.run(ep["control"], ep["pub"], cfg, duration_s=12.0, start=True,
                        stage_timeout_s=2.0)  # fmt: skip
            assert rc == 0
            focus = ctl.call("get_z")["z_um"]
            ctl.call("stop")
    finally:
        svc.stop()
        svc.join(30.0)
    out = capsys.readouterr().out
    moves = [int(line.rsplit("moves", 1)[1]) for line in out.splitlines() if "moves" in line]
    assert moves and moves[-1] >= 2, out  # it steered, more than once
    # The true defocus the loop left the emitter at: the setpoint, within the ci model's
    # axial bias there (1.8 µm on the development machine; a retraining on another CPU
    # differs) and the 1.5 µm dead band. It started 20 µm off.
    defocus = focus - xyz[2]
    assert abs(defocus - setpoint) < 5.0, (defocus, out)

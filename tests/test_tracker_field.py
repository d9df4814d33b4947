"""Tracks stay where emitters can be: they end when their prediction leaves the field of
view, a confirmed track that missed a frame says it is coasting, and no association gives a
track a speed above ``max_speed_um_s`` (issue 14, point 3)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from focaltrack.daemon.cli import main
from focaltrack.daemon.recorder import Recorder
from focaltrack.drivers.base import Frame
from focaltrack.models.analyser import FrameAnalyser
from focaltrack.models.tracker import KalmanTracker, TrackerConfig, TrackStatus, link_table
from focaltrack.models.tracker_config import TrackerConfigError
from focaltrack.models.tracking_metrics import Trajectories, clear_mot, identity_scores
from focaltrack.records import Localizations
from focaltrack.sim.tracking_scenes import observe, simulate

#: The live case of the issue: a 256-px camera at 0.65 µm/px, analysed at ~10 fps.
FIELD_UM = (166.4, 166.4)
DT = 0.1
V = 75.0  # µm/s along x


def _flow_out_of_the_field(tracker: KalmanTracker) -> list:
    """One emitter at 75 µm/s along x, seen while it is inside the field, then never again;
    the tracks after each frame."""
    out = []
    for k in range(30):
        x = 100.0 + V * DT * k
        z = np.array([[x, 80.0, 5.0]]) if x <= FIELD_UM[0] else np.empty((0, 3))
        out.append(tracker.update_frame(z, k * DT))
    return out


def test_a_track_whose_prediction_leaves_the_field_ends() -> None:
    cfg = TrackerConfig()
    tracker = KalmanTracker(cfg, field_um=FIELD_UM)
    frames = _flow_out_of_the_field(tracker)
    rows = [(f.xyz_um[i, 0], f.status[i], f.misses[i]) for f in frames for i in range(len(f))]
    xs = np.array([r[0] for r in rows])
    # never published beyond the field plus its margin ...
    assert xs.max() <= FIELD_UM[0] + cfg.field_margin_um
    # ... and ended there, before max_misses would have ended it
    last_seen = max(k for k, f in enumerate(frames) if len(f) and f.misses[0] == 0)
    ended = next(k for k, f in enumerate(frames) if k > last_seen and not len(f))
    assert ended - last_seen < cfg.max_misses
    assert tracker.left_field_count == 1
    assert frames[ended].id.size == 0
    # while it coasted inside the margin it said so
    coasting = [r for r in rows if r[2] > 0]
    assert coasting and all(r[1] == TrackStatus.COASTING.code for r in coasting)
    # Without a field (an offline CSV without --field-um) it coasts on to max_misses.
    free = _flow_out_of_the_field(KalmanTracker(cfg))
    x_free = max(float(f.xyz_um[0, 0]) for f in free if len(f))
    assert x_free > FIELD_UM[0] + cfg.field_margin_um


def test_the_field_is_checked_and_can_be_set_later() -> None:
    tracker = KalmanTracker()
    assert tracker.field_um is None
    tracker.field_um = (40, 30)
    assert tracker.field_um == (40.0, 30.0)
    for bad in ((0.0, 10.0), (10.0, float("nan")), (-5.0, 5.0)):
        with pytest.raises(ValueError, match="field_um"):
            KalmanTracker(field_um=bad)
    # a track born outside the field (plus the margin) ends at the next prediction
    tracker.update_frame(np.array([[20.0, 15.0, 0.0], [60.0, 15.0, 0.0]]), 0.0)
    frame = tracker.update_frame(np.empty((0, 3)), 0.01)
    assert frame.xyz_um[:, 0].tolist() == [20.0]
    assert tracker.last_stats.n_left_field == 1 and tracker.last_stats.n_deleted == 1


def test_coasting_is_the_status_of_a_confirmed_track_that_missed() -> None:
    tracker = KalmanTracker()
    statuses = []
    for k in range(12):
        z = np.empty((0, 3)) if k in (6, 7) else np.array([[10 + 0.75 * k, 5.0, 0.0]])
        f = tracker.update_frame(z, k / 100)
        statuses.append(TrackStatus.of_code(int(f.status[0])))
    assert statuses[:2] == [TrackStatus.TENTATIVE] * 2
    assert statuses[2:6] == [TrackStatus.CONFIRMED] * 4
    assert statuses[6:8] == [TrackStatus.COASTING] * 2  # predicted, not measured
    assert statuses[8:] == [TrackStatus.CONFIRMED] * 4  # found again
    (track,) = tracker.update(np.empty((0, 3)), 0.12)
    assert track.status is TrackStatus.COASTING and track.misses == 1
    f = tracker.update_frame(np.empty((0, 3)), 0.13)
    assert f.coasting.tolist() == [True] and f.confirmed.tolist() == [True]
    assert f.record().coasting.tolist() == [True] and f.record().confirmed.tolist() == [True]


def test_a_400_um_s_jump_is_not_associated_while_a_75_um_s_flow_is_tracked() -> None:
    tracker = KalmanTracker()
    # at 10 fps: A flows at 75 µm/s; B appears and 0.1 s later a localization 40 µm away
    # (400 µm/s), well inside a new track's gate (its velocity σ is 100 µm/s per axis)
    tracker.update_frame(np.array([[20.0, 20.0, 0.0], [50.0, 120.0, 0.0]]), 0.0)
    f = tracker.update_frame(np.array([[27.5, 20.0, 0.0], [90.0, 120.0, 0.0]]), DT)
    assert f.id.tolist() == [1, 2, 3] and f.hits.tolist() == [2, 1, 1]
    assert tracker.last_stats.n_speed_refused == 1
    for k in range(2, 8):
        f = tracker.update_frame(np.array([[20.0 + 7.5 * k, 20.0, 0.0]]), k * DT)
    assert f.id.tolist() == [1] and f.status.tolist() == [TrackStatus.CONFIRMED.code]
    assert f.hits.tolist() == [8]
    assert abs(f.velocity_um_s[0, 0] - V) < 10.0
    # A coasting track's gate grows every missed frame: after two misses at 10 fps a
    # localization 48 µm to the side is inside it, but would swing the velocity to 230 µm/s.
    cfg = TrackerConfig()
    tracker = KalmanTracker(cfg)
    for k in range(10):
        tracker.update_frame(np.array([[20.0 + 7.5 * k, 20.0, 0.0]]), k * DT)
    tracker.update_frame(np.empty((0, 3)), 10 * DT)
    tracker.update_frame(np.empty((0, 3)), 11 * DT)
    f = tracker.update_frame(np.array([[110.0, 20.0 + 47.8, 0.0]]), 12 * DT)
    assert f.id.tolist() == [1, 2] and f.misses.tolist() == [3, 0]
    assert np.linalg.norm(f.velocity_um_s[0]) == pytest.approx(V, abs=1.0)
    # no limit: the old behaviour takes it
    tracker = KalmanTracker(TrackerConfig(max_speed_um_s=0))
    for k in range(10):
        tracker.update_frame(np.array([[20.0 + 7.5 * k, 20.0, 0.0]]), k * DT)
    tracker.update_frame(np.empty((0, 3)), 10 * DT)
    tracker.update_frame(np.empty((0, 3)), 11 * DT)
    f = tracker.update_frame(np.array([[110.0, 20.0 + 47.8, 0.0]]), 12 * DT)
    assert f.id.tolist() == [1] and np.linalg.norm(f.velocity_um_s[0]) > cfg.max_speed_um_s


def test_max_speed_and_margin_are_checked() -> None:
    for name in ("max_speed_um_s", "field_margin_um"):
        with pytest.raises(TrackerConfigError, match=name) as e:
            TrackerConfig(**{name: -1.0})
        assert e.value.names == (name,)
    assert TrackerConfig(max_speed_um_s=0).max_speed_um_s == 0  # no limit


def test_a_flow_at_10_fps_stays_in_the_field_at_physical_speeds() -> None:
    """The tracking benchmark's flow scene (75 µm/s, 200 × 200 µm, misses and false
    positives) analysed at 10 fps, as the live service analyses the simulated camera."""
    frames, fps = 100, 10.0
    pts, info = simulate("flow", frames, fps, 0)
    box = (np.asarray(info["box_um"][0]), np.asarray(info["box_um"][1]))
    rng = np.random.default_rng(0)
    loc_frame, loc_xyz = observe(pts, frames, rng, (0.3, 1.5), 0.05, 2.0, box)
    cfg = TrackerConfig()
    tracker = KalmanTracker(cfg, field_um=tuple(info["field_um"]))
    table = link_table(loc_frame, loc_xyz, fps=fps, tracker=tracker, frame_range=(0, frames - 1))
    conf = table.select(table.confirmed)
    xy = conf.xyz_um[:, :2]
    m = cfg.field_margin_um
    assert np.all((xy >= -m) & (xy <= np.asarray(info["field_um"]) + m))
    speed = np.linalg.norm(conf.velocity_um_s, axis=1)
    assert speed.max() <= cfg.max_speed_um_s
    # and the flow keeps its tracks (without field and limit: MOTA 0.54, IDF1 0.74)
    truth = Trajectories.of(*pts)
    est = Trajectories.of(conf.frame, conf.track_id, conf.xyz_um)
    assert clear_mot(truth, est, 5.0).mota > 0.7
    assert identity_scores(truth, est, 5.0).idf1 > 0.8


class _Localizer:
    """A localizer that returns prepared localizations; frames of 64 × 64 px of 1 µm."""

    pixel_size_um = 1.0

    def __init__(self, per_frame: list[Localizations]) -> None:
        self.per_frame = per_frame

    def localize(self, pixels: np.ndarray, frame_index: int) -> Localizations:
        del pixels
        return self.per_frame[frame_index]


def _leaving_emitter(n: int = 14) -> list[Localizations]:
    """One emitter at 75 µm/s along x, seen at 10 fps while inside a 64-µm frame."""
    out = []
    for k in range(n):
        x = 20.0 + V * DT * k
        xs = np.array([x]) if x <= 64.0 else np.empty(0)
        out.append(
            Localizations(k, xs, np.full(len(xs), 30.0), np.zeros(len(xs)), np.ones(len(xs)))
        )
    return out


def test_live_analysis_gives_the_tracker_the_cameras_field() -> None:
    locs = _leaving_emitter()
    analyser = FrameAnalyser(_Localizer(locs), KalmanTracker())  # type: ignore[arg-type]
    px = np.zeros((48, 64), np.uint16)  # rows = y
    for k in range(len(locs)):
        analyser.analyse(px, k, k * DT, 0.0)
    assert analyser.tracker.field_um == (64.0, 48.0)
    assert analyser.tracker.left_field_count == 1


def test_track_a_recording_within_its_cameras_field(tmp_path, capsys) -> None:
    """Offline tracking of a recording ends tracks where the live service ended them: the
    recording's frame shape × pixel size is the field; --field-um overrides it."""
    locs = _leaving_emitter()
    analyser = FrameAnalyser(_Localizer(locs), KalmanTracker())  # type: ignore[arg-type]
    rec = tmp_path / "rec.h5"
    r = Recorder(rec, frame_shape=(64, 64), frames=False, pixel_size_um=1.0)
    r.start()
    px = np.zeros((64, 64), np.uint16)
    for k in range(len(locs)):
        lc, tf = analyser.analyse(px, k, 1000.0 + k * DT, 0.0)
        r.add_frame(Frame(px, k, 1000.0 + k * DT, 0.0, 10.0))
        r.add_results(k, lc, tf.record(k))
    r.stop()
    with h5py.File(rec, "r") as f:
        live = {c: f["tracks"][c][()] for c in ("frame", "track_id", "x_um", "status")}
    assert analyser.tracker.left_field_count == 1
    assert live["x_um"].max() <= 64.0 + TrackerConfig().field_margin_um
    out = tmp_path / "t.h5"
    assert main(["track", str(rec), "--out", str(out)]) == 0
    with h5py.File(out, "r") as f:
        g = f["tracks"]
        assert g.attrs["field_um"].tolist() == [64.0, 64.0]
        for c, want in live.items():
            np.testing.assert_array_equal(g[c][()], want, err_msg=c)
    # a narrower field given on the command line ends the track sooner
    out2 = tmp_path / "u.h5"
    assert main(["track", str(rec), "--out", str(out2), "--field-um", "50,64"]) == 0
    with h5py.File(out2, "r") as f:
        assert f["tracks"].attrs["n_left_field"] == 1
        assert f["tracks/x_um"][()].max() <= 50.0 + TrackerConfig().field_margin_um
        assert len(f["tracks/frame"]) < len(live["frame"])
    with pytest.raises(SystemExit) as e:
        main(["track", str(rec), "--out", str(tmp_path / "v.h5"), "--field-um", "0,5"])
    assert e.value.code == 2 and "WIDTH_UM,HEIGHT_UM" in capsys.readouterr().err


def test_recorded_status_names_coasting(tmp_path) -> None:
    """The recorder writes the tracker's statuses, coasting included (HDF5 enum by name)."""
    tracker = KalmanTracker()
    rec = tmp_path / "rec.h5"
    r = Recorder(rec, frame_shape=(8, 8), frames=False, pixel_size_um=1.0)
    r.start()
    for k in range(6):
        z = np.empty((0, 3)) if k == 4 else np.array([[3.0, 3.0, 0.0]])
        tf = tracker.update_frame(z, k / 100)
        r.add_frame(Frame(np.zeros((8, 8), np.uint16), k, k / 100, 0.0, 10.0))
        r.add_results(k, None, tf.record(k))
    r.stop()
    with h5py.File(rec, "r") as f:
        ds = f["tracks/status"]
        names = {v: k for k, v in h5py.check_enum_dtype(ds.dtype).items()}
        assert [names[int(c)] for c in ds[()]] == [
            "tentative",
            "tentative",
            "confirmed",
            "confirmed",
            "coasting",
            "confirmed",
        ]

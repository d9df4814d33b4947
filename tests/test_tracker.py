"""Kalman tracker on ground-truth scenes built here, with known localization noise."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from filterpy.kalman import KalmanFilter

from focaltrack.models.tracker import (
    KalmanTracker,
    MotionModel,
    TrackerConfig,
    TrackStatus,
    link_iter,
    link_table,
    noise_from_errors,
)

FPS = 100.0
SIGMA = np.array([0.3, 0.3, 1.5])  # the default config's measurement noise, µm


def _line(v_um_s, n_frames, seed, start=(0.0, 0.0, 0.0), fps=FPS):
    rng = np.random.default_rng(seed)
    t = np.arange(n_frames) / fps
    truth = np.asarray(start) + t[:, None] * np.asarray(v_um_s)
    return t, truth, truth + rng.normal(0.0, SIGMA, truth.shape)


def test_straight_line_is_one_track_with_the_right_velocity():
    v = np.array([75.0, 20.0, -10.0])
    t, _, meas = _line(v, 150, seed=3)
    tracker = KalmanTracker()
    ids, velocities = set(), []
    for k, (tk, z) in enumerate(zip(t, meas, strict=True)):
        tracks = tracker.update(z[None], tk)
        assert len(tracks) == 1
        ids.add(tracks[0].id)
        if k >= 2:
            assert tracks[0].status is TrackStatus.CONFIRMED  # M = 3 hits
        velocities.append(tracks[0].velocity_um_s)
    assert ids == {1}
    assert tracker.last_stats.n_births == 0
    late = np.array(velocities[50:])
    assert np.all(np.abs(late.mean(axis=0) - v) < 5.0), late.mean(axis=0)
    assert np.all(np.abs(late - v) < 30.0)  # any single frame: within ~3 σ of the estimate
    last = tracks[0]
    assert last.age_frames == 150 and last.hits == 150 and last.misses == 0
    assert last.cov_xyz_um2.shape == (3, 3)
    assert not last.xyz_um.flags.writeable  # results never alias the live state
    cols = tracker.update_frame(meas[-1][None] + v / FPS, t[-1] + 1 / FPS).as_columns()
    assert cols["track_id"].tolist() == [1] and cols["status"].tolist() == [
        TrackStatus.CONFIRMED.code
    ]
    assert cols["sigma_z_um"][0] == pytest.approx(np.sqrt(last.cov_xyz_um2[2, 2]), rel=0.2)
    # filtered position is tighter than one localization, axis by axis
    assert np.all(np.sqrt(np.diag(last.cov_xyz_um2)) < SIGMA)


def test_slow_process_noise_gives_a_precise_velocity():
    v = np.array([75.0, 0.0, 0.0])
    t, _, meas = _line(v, 200, seed=4)
    tracker = KalmanTracker(TrackerConfig(accel_um_s2=5.0))
    for tk, z in zip(t, meas, strict=True):
        (track,) = tracker.update(z[None], tk)
    assert np.all(np.abs(track.velocity_um_s - v) < 3.0), track.velocity_um_s


@pytest.mark.parametrize("angle_deg", [30, 90, 180])
@pytest.mark.parametrize("seed", range(4))
def test_crossing_emitters_keep_their_identities(angle_deg, seed):
    """Two emitters at 75 µm/s, same depth, paths passing 1 µm apart (≈3 σ lateral)."""
    rng = np.random.default_rng(seed)
    a = np.deg2rad(angle_deg)
    v1 = np.array([75.0, 0.0, 0.0])
    v2 = 75.0 * np.array([np.cos(a), np.sin(a), 0.0])
    normal = np.cross(v1 - v2, [0.0, 0.0, 1.0])
    normal *= 1.0 / np.linalg.norm(normal)  # closest approach 1 µm, at t = 0.5 s
    tracker = KalmanTracker()
    owner: dict[int, set[int]] = {0: set(), 1: set()}
    for k in range(100):
        t = k / FPS
        truth = np.stack([v1 * (t - 0.5), normal + v2 * (t - 0.5)])
        frame = tracker.update_frame(truth + rng.normal(0.0, SIGMA, truth.shape), t)
        for tid, li, conf in zip(frame.id, frame.localization_row, frame.confirmed, strict=True):
            if li >= 0 and conf:
                owner[int(li)].add(int(tid))
    assert all(len(ids) == 1 for ids in owner.values()), owner
    assert owner[0] != owner[1]


def test_missed_detections_fewer_than_k_do_not_break_a_track():
    cfg = TrackerConfig()
    k = cfg.max_misses
    v = np.array([75.0, 0.0, 0.0])
    t, truth, meas = _line(v, 60, seed=5)
    gap = range(20, 20 + k - 1)  # K − 1 missed frames
    tracker = KalmanTracker(cfg)
    seen = set()
    for i, (tk, z) in enumerate(zip(t, meas, strict=True)):
        tracks = tracker.update(np.empty((0, 3)) if i in gap else z[None], tk)
        assert len(tracks) == 1
        seen.add(tracks[0].id)
        if i in gap:
            assert tracks[0].misses == i - 19
            assert tracks[0].localization_row == -1
            # the coasting track keeps moving with the emitter
            assert abs(tracks[0].xyz_um[0] - truth[i, 0]) < 2.0
    assert seen == {1}
    assert tracks[0].misses == 0


def test_k_missed_detections_delete_a_confirmed_track():
    cfg = TrackerConfig()
    t, _, meas = _line([75.0, 0.0, 0.0], 40, seed=6)
    tracker = KalmanTracker(cfg)
    for tk, z in zip(t[:20], meas[:20], strict=True):
        tracker.update(z[None], tk)
    for i in range(cfg.max_misses):
        tracks = tracker.update(np.empty((0, 3)), t[20 + i])
        assert len(tracks) == (1 if i < cfg.max_misses - 1 else 0)
    (track,) = tracker.update(meas[20 + cfg.max_misses][None], t[20 + cfg.max_misses])
    assert track.id == 2 and track.status is TrackStatus.TENTATIVE


def test_tentative_tracks_die_once_they_cannot_be_confirmed():
    cfg = TrackerConfig(confirm_hits=3, confirm_window=5)
    tracker = KalmanTracker(cfg)
    assert len(tracker.update([[0.0, 0.0, 0.0]], 0.0)) == 1  # born, 1 hit
    assert len(tracker.update(np.empty((0, 3)), 0.01)) == 1  # 1 hit, 3 frames left
    assert len(tracker.update(np.empty((0, 3)), 0.02)) == 1  # 1 hit, 2 frames left
    assert len(tracker.update(np.empty((0, 3)), 0.03)) == 0  # 1 + 1 < 3: deleted


def test_ids_are_unique_and_increasing():
    rng = np.random.default_rng(7)
    tracker = KalmanTracker()
    last_max = 0
    all_ids: set[int] = set()
    for k in range(30):
        z = rng.uniform(0, 100, (int(rng.integers(0, 20)), 3))  # pure clutter
        frame = tracker.update_frame(z, k / FPS)
        new = set(frame.id.tolist()) - all_ids
        assert all(i > last_max for i in new)
        last_max = max([last_max, *new])
        all_ids |= new
        assert len(set(frame.id.tolist())) == len(frame)


def test_batched_filter_matches_filterpy():
    cfg = TrackerConfig()
    t, _, meas = _line([75.0, -30.0, 10.0], 12, seed=8)
    tracker = KalmanTracker(cfg)
    tracker.update(meas[0][None], t[0])
    kf = tracker.kalman_filter(1)
    assert isinstance(kf, KalmanFilter)
    for k in range(1, 12):
        (track,) = tracker.update(meas[k][None], t[k])
        kf.F, kf.Q = cfg.transition(t[k] - t[k - 1])
        kf.predict()
        kf.update(meas[k].reshape(3, 1))
        np.testing.assert_allclose(track.xyz_um, kf.x[:3, 0], rtol=0, atol=1e-9)
        np.testing.assert_allclose(track.velocity_um_s, kf.x[3:, 0], rtol=0, atol=1e-9)
        np.testing.assert_allclose(track.cov_xyz_um2, kf.P[:3, :3], rtol=0, atol=1e-12)
    again = tracker.kalman_filter(1)
    np.testing.assert_allclose(again.P, kf.P, atol=1e-12)
    with pytest.raises(KeyError):
        tracker.kalman_filter(99)


def test_process_noise_means_the_same_at_any_frame_rate():
    """Ten 10 ms steps and one 100 ms step give the same prediction (exact discretisation)."""
    cfg = TrackerConfig()
    p = cfg.initial_covariance()
    f10, q10 = cfg.transition(0.01)
    p_fast = p.copy()
    for _ in range(10):
        p_fast = f10 @ p_fast @ f10.T + q10
    f1, q1 = cfg.transition(0.1)
    np.testing.assert_allclose(p_fast, f1 @ p @ f1.T + q1, rtol=1e-9, atol=1e-12)


def test_a_dropped_frame_is_a_longer_step():
    v = np.array([75.0, 0.0, 0.0])
    t, _, meas = _line(v, 40, seed=9)
    keep = np.ones(40, dtype=bool)
    keep[[10, 11, 25]] = False  # frames never analysed
    tracker = KalmanTracker()
    for tk, z in zip(t[keep], meas[keep], strict=True):
        (track,) = tracker.update(z[None], tk)
    assert track.id == 1 and track.misses == 0 and track.hits == keep.sum()


def test_random_walk_model_follows_a_brownian_emitter():
    rng = np.random.default_rng(10)
    d_um2_s = 2.0
    steps = rng.normal(0.0, np.sqrt(2 * d_um2_s / FPS), (200, 3))
    truth = np.cumsum(steps, axis=0)
    cfg = TrackerConfig(motion=MotionModel.RANDOM_WALK, diffusion_um2_s=d_um2_s)
    tracker = KalmanTracker(cfg)
    for k in range(200):
        (track,) = tracker.update((truth[k] + rng.normal(0.0, SIGMA))[None], k / FPS)
    assert track.id == 1
    np.testing.assert_array_equal(track.velocity_um_s, np.zeros(3))
    assert np.all(np.abs(track.xyz_um - truth[-1]) < 3 * np.sqrt(np.diag(track.cov_xyz_um2)))
    assert cfg.motion is MotionModel("random_walk")
    assert TrackerConfig(motion="random_walk").motion is MotionModel.RANDOM_WALK


# ---------------------------------------------------------------------------- bad input
def test_non_finite_localizations_are_rejected_counted_and_harmless():
    t, truth, meas = _line([75.0, 0.0, 0.0], 30, seed=11)
    tracker = KalmanTracker()
    bad = np.array([[np.nan, 0.0, 0.0], [0.0, np.inf, 0.0], [0.0, 0.0, -np.inf]])
    for tk, z in zip(t, meas, strict=True):
        tracks = tracker.update(np.vstack([bad, z[None]]), tk)
    assert tracker.rejected_count == 3 * 30
    assert tracker.last_stats.n_rejected == 3
    (track,) = tracks
    assert track.localization_row == 3  # index into the frame as given
    assert np.all(np.isfinite(track.xyz_um)) and np.all(np.isfinite(track.cov_xyz_um2))
    assert np.all(np.abs(track.xyz_um - truth[-1]) < 2.0)


def test_time_must_strictly_increase():
    tracker = KalmanTracker()
    tracker.update([[0.0, 0.0, 0.0]], 1.0)
    with pytest.raises(ValueError, match="strictly increase"):
        tracker.update([[0.0, 0.0, 0.0]], 1.0)
    with pytest.raises(ValueError, match="strictly increase"):
        tracker.update([[0.0, 0.0, 0.0]], 0.5)
    with pytest.raises(ValueError, match="finite"):
        tracker.update([[0.0, 0.0, 0.0]], float("nan"))
    assert len(tracker.update([[0.0, 0.0, 0.0]], 1.01)) == 1  # the state survived the errors


def test_bad_shapes_are_rejected():
    tracker = KalmanTracker()
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        tracker.update(np.zeros((4, 2)), 0.0)
    with pytest.raises(ValueError, match="scores"):
        tracker.update(np.zeros((4, 3)), 0.0, scores=np.ones(3))


def test_empty_frames():
    tracker = KalmanTracker()
    assert tracker.update(np.empty((0, 3)), 0.0) == []
    assert tracker.update([], 0.01) == []
    tracker.update([[1.0, 2.0, 3.0]], 0.02)
    assert len(tracker.update(np.empty((0, 3)), 0.03)) == 1


def test_a_burst_of_spurious_detections_costs_bounded_work():
    cfg = TrackerConfig(max_births_per_frame=100, max_localizations_per_frame=5000)
    rng = np.random.default_rng(12)
    t, _truth, meas = _line([75.0, 0.0, 0.0], 40, seed=12)
    tracker = KalmanTracker(cfg)
    for k in range(40):
        z = meas[k][None]
        if k == 20:  # 20 000 spurious detections spread over the field
            clutter = rng.uniform(-200, 200, (20_000, 3))
            z = np.vstack([z, clutter])
        frame = tracker.update_frame(z, t[k])
        if k == 20:
            assert tracker.last_stats.n_dropped == 20_001 - 5000
            assert tracker.last_stats.n_births <= 100
            assert len(frame) <= 101
    assert tracker.dropped_count == 15_001
    confirmed = [tr for tr in tracker.update(meas[-1][None] + 0.75, 0.4) if tr.hits > 10]
    assert len(confirmed) == 1 and confirmed[0].id == 1  # the real track survived


def test_scores_choose_which_localizations_survive_the_cap():
    cfg = TrackerConfig(max_localizations_per_frame=2, max_births_per_frame=1)
    tracker = KalmanTracker(cfg)
    z = np.array([[0.0, 0, 0], [10.0, 0, 0], [20.0, 0, 0]])
    (track,) = tracker.update(z, 0.0, scores=np.array([0.1, 0.9, 0.5]))
    assert track.localization_row == 1  # the best score is born first
    assert tracker.last_stats.n_dropped == 1


def test_config_validation():
    with pytest.raises(ValueError):
        TrackerConfig(sigma_axial_um=0.0)
    with pytest.raises(ValueError):
        TrackerConfig(confirm_hits=6, confirm_window=5)
    with pytest.raises(ValueError):
        TrackerConfig(gate_probability=1.0)
    with pytest.raises(ValueError):
        TrackerConfig(motion="ballistic")
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrackerConfig().max_misses = 3  # type: ignore[misc]


def test_noise_from_errors():
    rng = np.random.default_rng(13)
    e = rng.normal(0.0, [0.2, 0.2, 1.0], (20_000, 3))
    lat, ax = noise_from_errors(e)
    assert lat == pytest.approx(0.2, rel=0.05) and ax == pytest.approx(1.0, rel=0.05)


def test_predict_ahead_does_not_change_the_state():
    t, _, meas = _line([75.0, 0.0, 0.0], 20, seed=14)
    tracker = KalmanTracker()
    for tk, z in zip(t, meas, strict=True):
        before = tracker.update_frame(z[None], tk)
    ahead = tracker.predict(t[-1] + 0.02)
    assert ahead.xyz_um[0, 0] == pytest.approx(before.xyz_um[0, 0] + 0.02 * 75.0, abs=1.0)
    assert tracker.update_frame(meas[-1][None] + 0.75, t[-1] + 0.01).id.tolist() == [1]


# ---------------------------------------------------------------------------- offline
def test_link_table_processes_missing_frames_as_empty():
    _t, _, meas = _line([75.0, 0.0, 0.0], 30, seed=15)
    frames = np.arange(30)
    keep = (frames < 10) | (frames >= 13)  # frames 10-12 have no localizations
    table = link_table(frames[keep], meas[keep], fps=FPS)
    assert set(table.frame.tolist()) == set(range(30))
    gap = table.select(np.isin(table.frame, [10, 11, 12]))
    assert gap.misses.tolist() == [1, 2, 3]
    assert set(table.track_id.tolist()) == {1}
    # localization_row points back into the input rows
    hit = table.localization_row >= 0
    np.testing.assert_array_equal(table.frame[hit], frames[keep][table.localization_row[hit]])


def test_link_table_with_times_names_the_bad_frame():
    frames = np.array([0, 1, 2, 3])
    xyz = np.zeros((4, 3))
    with pytest.raises(ValueError, match="frame 2"):
        link_table(frames, xyz, t_s=np.array([0.0, 0.01, 0.01, 0.03]))
    table = link_table(frames[[0, 1, 3]], xyz[:3], t_s=np.array([0.0, 0.01, 0.05]))
    np.testing.assert_allclose(np.unique(table.t_s), [0.0, 0.01, 0.03, 0.05])  # interpolated


def test_link_iter_streams_frames():
    t, _, meas = _line([75.0, 0.0, 0.0], 10, seed=16)
    out = list(link_iter(((tk, z[None]) for tk, z in zip(t, meas, strict=True))))
    assert [len(f) for f in out] == [1] * 10
    assert out[-1].confirmed.tolist() == [True]


def test_sparse_and_dense_assignment_agree(monkeypatch):
    """A crowded scene through both solvers: the same optimum, track for track."""
    import focaltrack.models.tracker as trk

    rng = np.random.default_rng(17)
    n = 120
    start = rng.uniform(0, 15, (n, 3)) * [1, 1, 0.2]  # crowded: gates overlap a lot
    vel = rng.normal(0, 40, (n, 3))
    frames = [(k / FPS, start + vel * k / FPS + rng.normal(0, SIGMA, (n, 3))) for k in range(15)]

    def run(threshold):
        monkeypatch.setattr(trk, "_SPARSE_SOLVER_PAIRS", threshold)
        tracker = KalmanTracker()
        out = [tracker.update_frame(z, t) for t, z in frames]
        return out, tracker.last_stats.n_solver_pairs

    dense, n_dense = run(10**9)
    sparse, _ = run(0)
    assert n_dense > 100  # the scene really is ambiguous (last frame alone)
    for a, b in zip(dense, sparse, strict=True):
        np.testing.assert_array_equal(a.id, b.id)
        np.testing.assert_array_equal(a.localization_row, b.localization_row)
        np.testing.assert_allclose(a.xyz_um, b.xyz_um)


def test_reset_keeps_ids_unique_and_accepts_any_time():
    tracker = KalmanTracker()
    tracker.update([[0.0, 0.0, 0.0]], 5.0)
    tracker.reset()
    assert len(tracker) == 0 and tracker.t_s is None
    (track,) = tracker.update([[0.0, 0.0, 0.0]], 1.0)  # earlier than before the reset: fine
    assert track.id == 2


def test_a_focus_move_is_not_motion_when_tracking_in_depth():
    """The service tracks absolute depth (focus − defocus) and publishes defocus: a 10 µm
    focus step in the middle of a still scene keeps the track, its zero velocity, and
    reports the defocus change at once."""
    from focaltrack.models.tracker import defocus_to_depth, tracks_at_focus

    rng = np.random.default_rng(4)
    depth = np.array([[20.0, 30.0, -40.0]])  # absolute, µm
    tracker = KalmanTracker(TrackerConfig(sigma_lateral_um=0.1, sigma_axial_um=0.3))
    ids, out = set(), None
    for k in range(40):
        focus = 0.0 if k < 20 else 10.0
        defocus = depth.copy()
        defocus[:, 2] = focus - depth[:, 2]  # what the localizer reports
        meas = defocus + rng.normal(0.0, [0.1, 0.1, 0.3], size=(1, 3))
        tf = tracks_at_focus(tracker.update_frame(defocus_to_depth(meas, focus), k * 0.01), focus)
        ids.update(tf.id.tolist())
        out = tf
    assert out is not None and len(ids) == 1  # one track throughout, no re-birth
    assert out.xyz_um[0, 2] == pytest.approx(50.0, abs=0.5)  # defocus after the move
    assert abs(out.velocity_um_s[0, 2]) < 20.0  # a jump of 10 µm in 10 ms would read ~1000
    # The map is its own inverse, and covariances keep their diagonal.
    np.testing.assert_allclose(defocus_to_depth(defocus_to_depth(meas, 3.0), 3.0), meas)
    assert np.all(np.diagonal(out.cov_xyz_um2, axis1=1, axis2=2) > 0)

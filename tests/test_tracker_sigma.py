"""Each localization's own σ is its measurement noise in the tracker (issue #13): R = diag(σ²)
in the gate, the assignment and the update, and a new track's starting covariance."""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from filterpy.kalman import KalmanFilter

from focaltrack.daemon.cli import main
from focaltrack.models.tracker import KalmanTracker, TrackerConfig, link_table
from focaltrack.models.tracker_config import TrackerConfigError

NAN = math.nan
DT = 0.01
CONFIG = TrackerConfig(confirm_hits=1, confirm_window=1)


def _settled(config: TrackerConfig = CONFIG, frames: int = 15) -> KalmanTracker:
    """One emitter at rest at (10, 10, 5), tracked with precise localizations."""
    tracker = KalmanTracker(config)
    for k in range(frames):
        tracker.update_frame(np.array([[10.0, 10.0, 5.0]]), k * DT, None, np.full((1, 3), 0.05))
    return tracker


def test_the_update_is_filterpys_with_each_localizations_r():
    rng = np.random.default_rng(1)
    sigmas = [
        [0.05, 0.06, 0.2],
        [1.0, 0.8, 3.0],
        [NAN, NAN, NAN],  # unknown: the configured noise
        [0.01, 0.3, NAN],  # under the floor; z unknown
        [0.1, 0.1, 0.4],
    ]
    truth = np.array([10.0, 20.0, 5.0])
    tracker = KalmanTracker(CONFIG)
    kf: KalmanFilter | None = None
    for k, s in enumerate(sigmas):
        s = np.array(s)
        z = truth + 0.7 * k * DT * np.array([75.0, 10.0, -5.0]) + rng.normal(0, 0.1, 3)
        frame = tracker.update_frame(z[None], k * DT, None, s[None])
        r = np.where(np.isfinite(s), np.maximum(s, CONFIG.localization_sigma_floor_um), NAN)
        r = np.where(np.isfinite(r), r, [0.3, 0.3, 1.5]) ** 2
        if kf is None:
            kf = KalmanFilter(dim_x=6, dim_z=3)
            kf.x = np.r_[z, 0, 0, 0].reshape(6, 1)
            kf.P = CONFIG.initial_covariance()
            kf.P[:3, :3] = np.diag(r)  # a new track starts with its localization's R
            kf.H = np.eye(3, 6)
        else:
            kf.F, kf.Q = CONFIG.transition(DT)
            kf.predict()
            kf.update(z, R=np.diag(r))
        assert frame.id.tolist() == [1]
        np.testing.assert_allclose(frame.xyz_um[0], kf.x[:3, 0], rtol=0, atol=1e-9)
        np.testing.assert_allclose(frame.cov_xyz_um2[0], kf.P[:3, :3], rtol=1e-9, atol=1e-12)


def test_an_uncertain_localization_pulls_its_track_less():
    shifts, var = {}, {}
    for s in (0.1, 1.0):
        tracker = _settled()
        before = tracker.predict(15 * DT).xyz_um[0]
        after = tracker.update_frame(
            np.array([[10.3, 10.0, 5.0]]), 15 * DT, None, np.array([[s, s, 0.2]])
        )
        assert after.id.tolist() == [1]  # the same track, updated
        shifts[s] = after.xyz_um[0, 0] - before[0]
        var[s] = after.cov_xyz_um2[0, 0, 0]
    assert 0 < shifts[1.0] < 0.1 * shifts[0.1]  # ~0.005 µm against ~0.18 µm
    assert shifts[0.1] > 0.5 * 0.3  # the precise one moves the track most of the 0.3 µm
    assert var[0.1] < var[1.0]


def test_precise_localizations_give_a_tighter_track():
    rng = np.random.default_rng(4)
    truth = np.array([30.0, 30.0, 10.0])
    noise = rng.normal(0, 1, (40, 3))
    out = {}
    for name, sigma in (("precise", np.array([0.03, 0.03, 0.1])), ("configured", None)):
        tracker = KalmanTracker(CONFIG)
        for k in range(40):
            s = 0.03 if sigma is not None else 0.3
            z = (truth + noise[k] * [s, s, s * 3])[None]
            frame = tracker.update_frame(z, k * DT, None, None if sigma is None else sigma[None])
        out[name] = np.sqrt(np.diag(frame.cov_xyz_um2[0]))
        assert abs(frame.xyz_um[0, 0] - truth[0]) < 4 * out[name][0]
    assert np.all(out["precise"] < 0.25 * out["configured"]), out


def test_the_gate_is_the_localizations_own():
    """A localization 3 µm from a settled track: outside the gate with the configured 0.3 µm,
    inside with its own σ of 2 µm (S = P + R per pair). Beside it a precise localization of
    a second emitter: the gate's window search handles both σ groups in one frame."""
    frame = 15 * DT
    results = {}
    for own in (False, True):
        tracker = _settled()
        tracker.update_frame(np.array([[10.0, 10.0, 5.0], [40.0, 10.2, 5.0]]), frame - DT / 2)
        z = np.array([[13.0, 10.0, 5.0], [40.0, 10.2, 5.0]])
        s = np.array([[2.0, 2.0, 2.0], [0.05, 0.05, 0.1]]) if own else None
        res = tracker.update_frame(z, frame, None, s)
        results[own] = (tracker.last_stats.n_assigned, tracker.last_stats.n_births, res)
    assert results[False][:2] == (1, 1)  # too far for the configured noise: a new track
    assert results[True][:2] == (2, 0)  # both assigned, nothing born
    res = results[True][2]
    assert res.localization_row.tolist() == [0, 1]


def test_unknown_or_unused_sigma_is_the_configured_noise():
    z = [np.array([[1.0, 2.0, 3.0], [20.0, 2.0, 3.0]]) + 0.05 * k for k in range(6)]
    runs = {}
    for name, config, sigma in (
        ("none", CONFIG, None),
        ("nan", CONFIG, np.full((2, 3), NAN)),
        ("off", dataclasses.replace(CONFIG, use_localization_sigma=False), np.full((2, 3), 0.01)),
        ("used", CONFIG, np.full((2, 3), 0.01)),
    ):
        tracker = KalmanTracker(config)
        for k in range(6):
            frame = tracker.update_frame(z[k], k * DT, None, sigma)
        runs[name] = frame
    for name in ("nan", "off"):
        np.testing.assert_array_equal(runs[name].xyz_um, runs["none"].xyz_um)
        np.testing.assert_array_equal(runs[name].cov_xyz_um2, runs["none"].cov_xyz_um2)
    assert not np.allclose(runs["used"].cov_xyz_um2, runs["none"].cov_xyz_um2)


def test_a_new_track_starts_with_its_localizations_floored_r():
    tracker = KalmanTracker(dataclasses.replace(CONFIG, localization_sigma_floor_um=0.02))
    frame = tracker.update_frame(np.array([[1.0, 2.0, 3.0]]), 0.0, None, [[0.001, 0.05, NAN]])
    np.testing.assert_allclose(np.diag(frame.cov_xyz_um2[0]), [0.02**2, 0.05**2, 1.5**2])


def test_sigma_settings_are_checked():
    with pytest.raises(TrackerConfigError, match="localization_sigma_floor_um"):
        TrackerConfig(localization_sigma_floor_um=-0.1)
    with pytest.raises(TrackerConfigError, match="use_localization_sigma"):
        TrackerConfig(use_localization_sigma="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        KalmanTracker(CONFIG).update_frame(np.zeros((2, 3)), 0.0, None, np.zeros((2, 2)))
    # a σ of 0, negative or overflowing is unknown: the configured noise
    r = CONFIG.measurement_variances_um2(np.array([[0.0, -1.0, 1e200]]), 1)
    np.testing.assert_array_equal(r, [[0.09, 0.09, 2.25]])


def test_link_table_tracks_in_depth_with_each_localizations_sigma():
    frames = np.repeat(np.arange(20), 1)
    xyz = np.column_stack([10 + 0.5 * frames, np.full(20, 5.0), np.full(20, 8.0)])
    stage = np.where(frames < 10, 50.0, 53.0)  # a focus move: z (defocus) jumps by 3
    xyz[:, 2] += stage - 50.0
    sigma = np.tile([0.02, 0.02, 0.05], (20, 1))
    with_sigma = link_table(frames, xyz, fps=100.0, stage_z_um=stage, sigma_xyz_um=sigma,
                            config=CONFIG)  # fmt: skip
    without = link_table(frames, xyz, fps=100.0, stage_z_um=stage, config=CONFIG)
    assert set(with_sigma.track_id.tolist()) == set(without.track_id.tolist()) == {1}
    last = with_sigma.frame == 19
    assert with_sigma.record().sigma_z_um[last][0] < 0.1 * without.record().sigma_z_um[last][0]
    with pytest.raises(ValueError, match="σ rows"):
        link_table(frames, xyz, fps=100.0, sigma_xyz_um=sigma[:5])


def _write_csv(path: Path, with_sigma: bool) -> Path:
    rng = np.random.default_rng(2)
    header = ["frame", "x_um", "y_um", "z_um", "score"]
    header += ["sigma_x_um", "sigma_y_um", "sigma_z_um", "flags"] if with_sigma else []
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for k in range(30):
            p = np.array([10 + 0.5 * k, 20.0, 4.0]) + rng.normal(0, [0.02, 0.02, 0.05])
            w.writerow([k, *p.tolist(), 0.9, *([0.02, 0.02, 0.05, 0] if with_sigma else [])])
    return path


def test_track_command_uses_the_sigma_columns(tmp_path: Path):
    sig = _write_csv(tmp_path / "sig.csv", True)
    runs = {}
    for name, src, extra in (
        ("own", sig, []),
        ("off", sig, ["--no-use-localization-sigma"]),
        ("old", _write_csv(tmp_path / "old.csv", False), []),
    ):
        out = tmp_path / f"tracks-{name}.csv"
        assert main(["track", str(src), "--out", str(out), "--fps", "100", *extra]) == 0
        with out.open() as fh:
            rows = list(csv.DictReader(fh))
        assert {r["track_id"] for r in rows} == {"1"}
        runs[name] = float(rows[-1]["sigma_x_um"])
    assert runs["off"] == runs["old"]
    assert runs["own"] < 0.3 * runs["off"]

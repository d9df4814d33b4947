"""`focaltrack track` and `focaltrack evaluate-tracking` through the real CLI entry point."""

from __future__ import annotations

import csv
import json

import h5py
import numpy as np
import pytest

from focaltrack.daemon.cli import main

FPS = 100.0


def _write_locs(path, *, n_frames=40, t_s=None, nan_rows=(), skip_frames=(), clutter=0, seed=0):
    """Three emitters moving along x at 75 µm/s, 20 µm apart in y."""
    rng = np.random.default_rng(seed)
    header = ["frame", "x_um", "y_um", "z_um", "score"] + (["t_s"] if t_s is not None else [])
    rows = []
    for k in range(n_frames):
        if k in skip_frames:
            continue
        for e in range(3):
            p = np.array([10 + 0.75 * k, 20.0 * e, 5.0 * e]) + rng.normal(0, [0.3, 0.3, 1.5])
            if (k, e) in nan_rows:
                p[e] = np.nan
            row = [k, *p.tolist(), 0.9]
            rows.append(row + ([t_s[k]] if t_s is not None else []))
        for _ in range(clutter if k % 7 == 3 else 0):
            rows.append([k, *rng.uniform(100, 200, 3).tolist(), 0.5] + ([t_s[k]] if t_s else []))
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def _read(path):
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_track_csv_with_fps(tmp_path, capsys):
    locs = _write_locs(tmp_path / "locs.csv", skip_frames=(20,))
    out = tmp_path / "tracks.csv"
    assert main(["track", str(locs), "--out", str(out), "--fps", "100"]) == 0
    rows = _read(out)
    need = "frame,track_id,x_um,y_um,z_um,vx_um_s,vy_um_s,vz_um_s,status".split(",")
    assert all(c in rows[0] for c in need)
    assert {r["track_id"] for r in rows} == {"1", "2", "3"}
    assert {r["status"] for r in rows} == {"tentative", "confirmed", "coasting"}
    assert len(rows) == 3 * 40  # frame 20 has no localizations: the tracks coast through it
    gap = [r for r in rows if r["frame"] == "20"]
    assert [r["misses"] for r in gap] == ["1"] * 3 and {r["localization_row"] for r in gap} == {
        "-1"
    }
    assert {r["status"] for r in gap} == {"coasting"}
    last = [r for r in rows if r["frame"] == "39"]
    assert all(abs(float(r["vx_um_s"]) - 75.0) < 25.0 for r in last)
    assert float(rows[-1]["t_s"]) == pytest.approx(0.39)
    assert "3 tracks (3 confirmed)" in capsys.readouterr().out


def test_track_uses_the_t_s_column_and_reports_backwards_time(tmp_path, capsys):
    t = (np.arange(40) / FPS).tolist()
    locs = _write_locs(tmp_path / "locs.csv", t_s=t)
    out = tmp_path / "tracks.csv"
    assert main(["track", str(locs), "--out", str(out)]) == 0
    assert {r["track_id"] for r in _read(out)} == {"1", "2", "3"}
    t[12] = t[10]
    bad = _write_locs(tmp_path / "bad.csv", t_s=t)
    assert main(["track", str(bad), "--out", str(tmp_path / "b.csv")]) == 2
    err = capsys.readouterr().err
    assert "frame 12" in err and "strictly increase" in err
    assert not (tmp_path / "b.csv").exists()


def test_track_rejects_and_counts_non_finite_rows(tmp_path, capsys):
    locs = _write_locs(tmp_path / "locs.csv", nan_rows={(5, 0), (6, 1), (30, 2)})
    out = tmp_path / "tracks.h5"
    assert main(["track", str(locs), "--out", str(out), "--fps", "100"]) == 0
    assert "rejected 3 localization(s)" in capsys.readouterr().err
    with h5py.File(out, "r") as f:
        g = f["tracks"]
        assert g.attrs["schema_version"] == "1"
        assert g.attrs["n_rejected_non_finite"] == 3
        assert json.loads(g.attrs["tracker_config"])["max_misses"] == 5
        assert set(np.unique(g["track_id"][()]).tolist()) == {1, 2, 3}
        assert g["cov_xyz_um2"].shape == (len(g["frame"]), 3, 3)
        assert g["x_um"].attrs["units"] == "um"
        assert h5py.check_enum_dtype(g["status"].dtype) == {
            "tentative": 0,
            "confirmed": 1,
            "coasting": 2,
        }
        assert np.all(np.isfinite(g["x_um"][()]))


def test_track_input_errors(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("frame,x_um,y_um\n0,1,2\n")
    assert main(["track", str(bad), "--out", str(tmp_path / "o.csv"), "--fps", "100"]) == 2
    assert "missing column(s) z_um" in capsys.readouterr().err
    bad.write_text("frame,x_um,y_um,z_um\n0,1,2,3\n1,1,abc,3\n")
    assert main(["track", str(bad), "--out", str(tmp_path / "o.csv"), "--fps", "100"]) == 2
    assert "line 3: y_um 'abc'" in capsys.readouterr().err
    locs = _write_locs(tmp_path / "locs.csv")
    assert main(["track", str(locs), "--out", str(tmp_path / "o.csv")]) == 2
    assert "--fps" in capsys.readouterr().err
    assert main(["track", str(locs), "--out", str(tmp_path / "o.txt"), "--fps", "100"]) == 2
    assert ".csv or .h5" in capsys.readouterr().err
    (tmp_path / "exists.csv").write_text("x")
    assert main(["track", str(locs), "--out", str(tmp_path / "exists.csv"), "--fps", "1"]) == 2
    assert "--force" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["track", str(locs), "--out", str(tmp_path / "o.csv"), "--model-noise", "0.3"])


def test_track_options_and_confirmed_only(tmp_path):
    locs = _write_locs(tmp_path / "locs.csv", clutter=5)
    out = tmp_path / "all.csv"
    assert main(["track", str(locs), "--out", str(out), "--fps", "100"]) == 0
    every = {r["track_id"] for r in _read(out)}
    out2 = tmp_path / "conf.csv"
    args = ["--fps", "100", "--confirmed-only", "--model-noise", "0.3,1.5", "--max-misses", "3"]
    assert main(["track", str(locs), "--out", str(out2), *args]) == 0
    kept = {r["track_id"] for r in _read(out2)}
    assert kept == {"1", "2", "3"} and len(every) > 3
    out3 = tmp_path / "rw.csv"
    assert main(["track", str(locs), "--out", str(out3), "--fps", "100", "--motion", "rw"]) == 0
    assert all(r["vx_um_s"] == "0" for r in _read(out3))


def test_evaluate_tracking_writes_a_report(tmp_path, capsys):
    out = tmp_path / "report"
    argv = ["evaluate-tracking", "--out", str(out), "--frames", "60"]
    argv += ["--scenes", "flow,crossing,brownian", "--timing-iterations", "5"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "MOTA" in printed and "200 tracks × 200 localizations" in printed
    report = json.loads((out / "results.json").read_text())
    assert [r["scene"] for r in report["scenes"]] == ["flow", "crossing", "brownian"]
    flow = report["scenes"][0]
    assert flow["clear_mot"]["mota"] > 0.8
    assert flow["smoothing"]["gain_3d"] < 1.0
    assert report["scenes"][2]["motion_model"] == "random_walk"
    assert report["timing"]["tracks"] == 200
    assert report["timing"]["update_frame"]["median_ms"] > 0
    assert "| MOTA |" in (out / "README.md").read_text()


def test_evaluate_tracking_rejects_unknown_scenes(tmp_path):
    with pytest.raises(SystemExit):
        main(["evaluate-tracking", "--out", str(tmp_path), "--scenes", "tornado"])


def test_track_takes_the_noise_from_a_model_bundle(tmp_path, capsys):
    bundle = tmp_path / "model"
    bundle.mkdir()
    for name in ("lateral.pt", "axial.pt", "calibration.h5", "COMPLETE"):
        (bundle / name).write_bytes(b"")
    meta = {
        "kind": "focaltrack.model",
        "schema_version": 1,
        "validation": {
            "by_snr": {
                "10dB": {"rmse_lateral_um": 0.6, "rmse_axial_um": 3.0},
                "20dB": {"rmse_lateral_um": 0.4, "rmse_axial_um": 2.0},
                "30dB": {"rmse_lateral_um": 0.2, "rmse_axial_um": 1.0},
            }
        },
    }
    (bundle / "bundle.json").write_text(json.dumps(meta))
    locs = _write_locs(tmp_path / "locs.csv")
    out = tmp_path / "t.h5"
    assert (
        main(["track", str(locs), "--out", str(out), "--fps", "100", "--model", str(bundle)]) == 0
    )
    with h5py.File(out, "r") as f:
        cfg = json.loads(f["tracks"].attrs["tracker_config"])
    assert cfg["sigma_lateral_um"] == pytest.approx(0.4 / np.sqrt(2))
    assert cfg["sigma_axial_um"] == pytest.approx(2.0)
    del meta["validation"]
    (bundle / "bundle.json").write_text(json.dumps(meta))
    out2 = tmp_path / "u.csv"
    assert (
        main(["track", str(locs), "--out", str(out2), "--fps", "100", "--model", str(bundle)]) == 2
    )
    assert "--model-noise" in capsys.readouterr().err


def _bundle(path, validation):
    """A model bundle folder `read_meta` accepts, with ``validation`` (or none) in bundle.json."""
    path.mkdir()
    for name in ("lateral.pt", "axial.pt", "calibration.h5", "COMPLETE"):
        (path / name).write_bytes(b"")
    meta = {"kind": "focaltrack.model", "schema_version": 1}
    if validation is not None:
        meta["validation"] = validation
    (path / "bundle.json").write_text(json.dumps(meta))
    return path, meta


def _track_args(*options):
    from focaltrack.daemon.cli import build_parser

    return build_parser().parse_args(["track", "in.csv", "--out", "o.csv", *options])


def test_track_options_mirror_the_trackerconfig_fields():
    import argparse
    import dataclasses

    from focaltrack.daemon.commands.track import add_tracker_arguments, config_from_args
    from focaltrack.models.tracker_config import TrackerConfig

    p = argparse.ArgumentParser()
    add_tracker_arguments(p)
    options = {s: a for a in p._actions for s in a.option_strings}
    fields = dataclasses.fields(TrackerConfig)
    for f in fields:
        action = options["--" + f.name.replace("_", "-")]
        assert action.dest == f.name and action.default is None
        assert action.help.startswith(f.metadata["help"])
    # Exactly the fields' options and the two noise shortcuts; unset, they give the defaults.
    dests = {a.dest for a in p._actions} - {"help"}
    assert dests == {f.name for f in fields} | {"model_noise", "model"}
    assert config_from_args(_track_args()) == TrackerConfig()


def test_track_options_are_checked_by_trackerconfig(tmp_path, capsys):
    locs = _write_locs(tmp_path / "locs.csv")
    argv = ["track", str(locs), "--out", str(tmp_path / "o.csv"), "--fps", "100"]
    assert main([*argv, "--gate-probability", "1.5"]) == 2
    assert "--gate-probability: gate_probability must be in (0, 1)" in capsys.readouterr().err
    assert main([*argv, "--confirm-hits", "6"]) == 2
    assert "--confirm-hits and --confirm-window" in capsys.readouterr().err
    assert main([*argv, "--model-noise", "0.3,1.5", "--sigma-axial-um", "2"]) == 2
    assert "--model-noise and --sigma-axial-um" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.parametrize(
    "validation", [None, {"by_snr": {"x": {"rmse_lateral_um": 0.4, "rmse_axial_um": 2.0}}}]
)
def test_service_and_track_make_equal_tracker_configs(tmp_path, validation):
    from focaltrack.daemon.analysis import tracker_config
    from focaltrack.daemon.commands.track import config_from_args
    from focaltrack.daemon.config import load_config
    from focaltrack.models.tracker_config import MotionModel, TrackerConfig

    bundle, meta = _bundle(tmp_path / "model", validation)
    # The defaults: the service's [tracker] with a model, `track` with --model (when the
    # model has validation noise; without, `track --model` refuses) or without one.
    service = tracker_config(load_config(None, env={}).tracker, meta)
    if validation is None:
        assert service == TrackerConfig() == config_from_args(_track_args())
    else:
        assert service == config_from_args(_track_args("--model", str(bundle)))
        assert service.sigma_lateral_um == pytest.approx(0.4 / np.sqrt(2))
        assert service.sigma_axial_um == pytest.approx(2.0)
    # Equal settings, every one of them changed, give equal configs.
    settings = {
        "motion": "random_walk",
        "sigma_lateral_um": 0.25,
        "sigma_axial_um": 0.0,  # from the model, or the default
        "use_localization_sigma": False,
        "localization_sigma_floor_um": 0.05,
        "accel_um_s2": 50.0,
        "diffusion_um2_s": 3.0,
        "init_velocity_std_um_s": 80.0,
        "gate_probability": 0.999,
        "max_speed_um_s": 150.0,
        "confirm_hits": 2,
        "confirm_window": 4,
        "max_misses": 7,
        "field_margin_um": 5.0,
        "max_localizations_per_frame": 900,
        "max_births_per_frame": 40,
        "max_tracks": 300,
    }
    assert set(settings) == {f for f in TrackerConfig.__dataclass_fields__}
    cfg = load_config(None, env={}, overrides={f"tracker.{k}": v for k, v in settings.items()})
    service = tracker_config(cfg.tracker, meta)
    options = [f"--no-{k.replace('_', '-')}" for k, v in settings.items() if v is False]
    options += [s for k, v in settings.items() if v is not False
                for s in ("--" + k.replace("_", "-"), str(v))]  # fmt: skip
    if validation is not None:
        options += ["--model", str(bundle)]
    track = config_from_args(_track_args(*options))
    assert service == track
    assert service.motion is MotionModel.RANDOM_WALK and service.max_tracks == 300
    assert service.use_localization_sigma is False and service.localization_sigma_floor_um == 0.05
    assert service.sigma_lateral_um == 0.25
    assert service.sigma_axial_um == (2.0 if validation else TrackerConfig().sigma_axial_um)


def test_write_tracks_is_atomic_with_ordinary_permissions(tmp_path, monkeypatch):
    import os

    from focaltrack.daemon.commands import track as track_cmd
    from focaltrack.models.tracker import KalmanTracker, TrackerConfig, link_table

    locs = track_cmd.read_localizations(_write_locs(tmp_path / "locs.csv"))
    config = TrackerConfig()
    table = link_table(locs.frame, locs.xyz_um, fps=FPS, tracker=KalmanTracker(config))
    out = tmp_path / "out" / "t.csv"
    track_cmd.write_tracks(table, out, config)
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's private 0o600
    written = out.read_bytes()

    def fail_halfway(table, path):
        path.write_text("frame,track_id\n1,")
        raise RuntimeError("disk full")

    monkeypatch.setattr(track_cmd, "_write_csv", fail_halfway)
    with pytest.raises(RuntimeError, match="disk full"):
        track_cmd.write_tracks(table, out, config)
    assert out.read_bytes() == written  # the old file, whole
    assert [p.name for p in out.parent.iterdir()] == ["t.csv"]  # no temporary file left

"""`focaltrack evaluate`: SNR construction, scoring with oracle localizers, report, CLI."""

from __future__ import annotations

import json
import math
from collections import deque

import numpy as np
import pytest

from focaltrack.daemon.cli import main
from focaltrack.models import evaluate as ev
from focaltrack.sim.optics import CameraModel


class GaussianDefocusPSF:
    """A cheap stand-in for the PSF model where only bookkeeping is under test.

    Same ``render(shape, x_px, y_px, defocus_um, photons)`` call as `focaltrack.sim.psf`.
    """

    def render(self, shape, x_px, y_px, defocus_um, photons):
        h, w = shape
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.zeros(shape)
        for x, y, z, n in zip(x_px, y_px, defocus_um, photons, strict=True):
            s = 0.7 * math.sqrt(1 + (z / 3.0) ** 2)
            img += (
                n / (2 * math.pi * s * s) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))
            )
        return img


class Oracle:
    """Knows the truth (fed by the test), adds Gaussian errors, misses some emitters."""

    def __init__(self, scenes: deque, sigma_xy=0.0, sigma_z=0.0, miss=0.0, seed=1, offset=None):
        self.scenes = scenes
        self.offset = np.zeros(3) if offset is None else np.asarray(offset, dtype=np.float64)
        self.sigma_xy, self.sigma_z, self.miss = sigma_xy, sigma_z, miss
        self.rng = np.random.default_rng(seed)
        self.calls = 0

    def localize(self, frame, *, frame_index=0):
        assert frame.dtype == np.uint16 and frame.ndim == 2
        self.calls += 1
        xyz = self.scenes.popleft().xyz_um.copy()
        keep = self.rng.random(len(xyz)) >= self.miss
        xyz = xyz[keep]
        xyz[:, :2] += self.rng.normal(0, self.sigma_xy, size=(len(xyz), 2)) if self.sigma_xy else 0
        xyz[:, 2] += self.rng.normal(0, self.sigma_z, size=len(xyz)) if self.sigma_z else 0
        return xyz + self.offset


def _quick(**kw):
    return ev.Settings.quick(**kw)


# ----------------------------------------------------------------------------- SNR


@pytest.mark.parametrize("noise", [0.0, 3.0, 50.0])
@pytest.mark.parametrize("snr_db", [-5.0, 0.0, 10.0, 30.0])
def test_snr_closed_form_inverts(snr_db, noise):
    s = ev.signal_for_snr_e(snr_db, noise)
    assert s > 0
    assert ev.snr_db_of(s, noise) == pytest.approx(snr_db, abs=1e-9)


def test_snr_zero_db_means_peak_equals_its_noise():
    s = ev.signal_for_snr_e(0.0, 12.0)
    assert s == pytest.approx(math.sqrt(s + 12.0))


@pytest.mark.parametrize("snr_db", [0.0, 10.0, 20.0])
def test_snr_construction_hits_target_on_generated_frames(snr_db):
    """Render the reference emitter with the sim's physics, expose many frames, measure."""
    mic = ev.Microscope()
    geo = ev.Geometry(pixel_size_um=mic.pixel_size_um, field_um=40.0, margin_um=5.0)
    r = ev.Renderer(mic, geo.shape)
    z_ref = 50.0
    peak = r.peak_fraction(z_ref)
    exp = ev.exposure_for_snr(snr_db, peak_fraction=peak, microscope=mic, background_photons=20.0)
    h, w = geo.shape
    expected = r.expected_photons(
        np.array([float(w // 2)]),
        np.array([float(h // 2)]),
        np.array([z_ref]),
        np.array([exp.photons_per_intensity]),
    )
    iy, ix = np.unravel_index(np.argmax(expected), expected.shape)
    # Many exposures of the frame's neighbourhood of the peak, stacked into one image.
    crop = expected[iy - 2 : iy + 3, ix - 2 : ix + 3]
    n = 20000
    rng = np.random.default_rng(7)
    cam: CameraModel = mic.camera
    on = r.expose(np.tile(crop, (n, 1)), 20.0, rng)[2::5, 2].astype(float)
    off = r.expose(np.zeros((n, 1)), 20.0, rng)[:, 0].astype(float)
    signal_e = (on.mean() - off.mean()) * cam.gain_e_per_adu
    noise_e = on.std(ddof=1) * cam.gain_e_per_adu
    measured = 20 * math.log10(signal_e / noise_e)
    assert measured == pytest.approx(snr_db, abs=0.35)


def test_exposure_rejects_bad_values():
    mic = ev.Microscope()
    with pytest.raises(ValueError):
        ev.exposure_for_snr(10, peak_fraction=0.0, microscope=mic, background_photons=1)
    with pytest.raises(ValueError):
        ev.exposure_for_snr(10, peak_fraction=0.1, microscope=mic, background_photons=-1)


# ----------------------------------------------------------------------------- scenes


def test_scene_inside_the_volume():
    geo = ev.Geometry(pixel_size_um=0.65, z_range_um=(0.0, 100.0))
    s = ev.random_scene(np.random.default_rng(0), 500, geo)
    c = geo.centre_um
    assert np.all(np.abs(s.xyz_um[:, :2] - c) <= 50.0)
    assert s.xyz_um[:, 2].min() >= 0 and s.xyz_um[:, 2].max() <= 100
    assert s.intensity.min() >= 0.1 and s.intensity.max() <= 1.0
    # the frame holds the volume plus its margin on each side
    assert geo.frame_px * 0.65 >= 100 + 2 * geo.margin_um


def test_truth_and_frame_agree_on_coordinates():
    """x = column × pixel size, y = row × pixel size, z = defocus (COMMON.md): an in-focus
    emitter's brightest pixel is where its truth says, a defocused one is blurred."""
    mic = ev.Microscope()
    geo = ev.Geometry(pixel_size_um=mic.pixel_size_um)
    r = ev.Renderer(mic, geo.shape)
    px = mic.pixel_size_um
    x_um, y_um = 30.0 * px, 120.0 * px  # column 30, row 120
    img = r.expected_photons(np.array([x_um / px]), np.array([y_um / px]), np.zeros(1), np.ones(1))
    assert np.unravel_index(np.argmax(img), img.shape) == (120, 30)
    far = r.expected_photons(
        np.array([x_um / px]), np.array([y_um / px]), np.array([60.0]), np.ones(1)
    )
    assert far.max() < 0.01 * img.max()


# ----------------------------------------------------------------------------- scoring


def test_perfect_oracle_scores_jaccard_one(scenes):
    oracle = Oracle(scenes)
    rep = ev.evaluate(oracle, _quick(), z_range_um=(0, 100), psf=GaussianDefocusPSF())
    assert oracle.calls == sum(s.frames for s in _quick().specs())
    for p in rep.points:
        for key, s in p.scores.items():
            assert s["jaccard"] == 1.0, (p.spec, key)
            assert s["fp"] == s["fn"] == 0
            assert s["rmse_3d_um"] == pytest.approx(0.0, abs=1e-9)
    assert all(c["pass"] for c in rep.checks())


def test_a_constant_offset_shows_as_the_mean_error_apart_from_the_spread(scenes):
    sx, sz, off = 0.3, 0.6, (0.5, -0.2, 1.0)
    oracle = Oracle(scenes, sigma_xy=sx, sigma_z=sz, offset=off)
    st = ev.Settings(frames=30, isolated_frames=0, snr_db=(10.0,), densities=(), snr_n_emitters=20)
    rep = ev.evaluate(oracle, st, z_range_um=(0, 100), psf=GaussianDefocusPSF())
    s = rep.points[0].scores["10um"]
    n = s["tp"]
    np.testing.assert_allclose(s["mean_error_um"], off, atol=4 * sz / math.sqrt(n))
    tol = 3 / math.sqrt(2 * n)
    assert s["spread_lateral_um"] == pytest.approx(math.sqrt(2) * sx, rel=tol)
    assert s["spread_axial_um"] == pytest.approx(sz, rel=tol)
    # the RMSE holds both: the root sum of squares of the mean and the spread
    m = np.asarray(s["mean_error_um"])
    assert s["rmse_lateral_um"] ** 2 == pytest.approx(
        s["spread_lateral_um"] ** 2 + m[0] ** 2 + m[1] ** 2, rel=1e-9
    )
    assert s["rmse_axial_um"] ** 2 == pytest.approx(s["spread_axial_um"] ** 2 + m[2] ** 2, rel=1e-9)
    md = ev.markdown(rep)
    row = f"| {m[0]:+.3f}, {m[1]:+.3f}, {m[2]:+.3f} | {s['rmse_lateral_um']:.3f} |"
    assert "Mean error and spread" in md and row in md


def test_noisy_oracle_rmse_matches_injected_noise(scenes):
    sx, sz, miss = 0.4, 0.9, 0.1
    oracle = Oracle(scenes, sigma_xy=sx, sigma_z=sz, miss=miss)
    st = ev.Settings(frames=40, isolated_frames=0, snr_db=(10.0,), densities=(), snr_n_emitters=20)
    rep = ev.evaluate(oracle, st, z_range_um=(0, 100), psf=GaussianDefocusPSF())
    s = rep.points[0].scores["10um"]
    n = s["tp"]
    assert n > 600
    tol = 3 / math.sqrt(2 * n)  # a few standard errors of an RMSE estimate
    assert s["rmse_lateral_um"] == pytest.approx(math.sqrt(2) * sx, rel=tol)
    assert s["rmse_axial_um"] == pytest.approx(sz, rel=tol)
    assert s["rmse_3d_um"] == pytest.approx(math.sqrt(2 * sx**2 + sz**2), rel=tol)
    assert s["recall"] == pytest.approx(1 - miss, abs=0.04)
    assert s["precision"] == 1.0
    lo, hi = s["ci95"]["jaccard"]
    assert lo <= s["jaccard"] <= hi
    # the tight tolerance loses the pairs whose error exceeds it
    t = rep.points[0].scores["2um"]
    assert t["tp"] < s["tp"] and t["rmse_3d_um"] < s["rmse_3d_um"]


def test_false_positives_and_wrong_depths_count(scenes):
    class Liar(Oracle):
        def localize(self, frame, *, frame_index=0):
            xyz = super().localize(frame, frame_index=frame_index)
            xyz[:, 0] += 200.0  # every position far from any emitter
            return xyz

    st = ev.Settings(frames=3, isolated_frames=0, snr_db=(20.0,), densities=())
    rep = ev.evaluate(Liar(scenes), st, z_range_um=(0, 100), psf=GaussianDefocusPSF())
    s = rep.points[0].scores["10um"]
    assert s["tp"] == 0 and s["jaccard"] == 0.0
    assert s["fp"] == s["fn"] == 60
    assert not rep.checks()[0]["pass"]


def test_empty_predictions_are_fine(scenes):
    class Blind:
        def localize(self, frame, *, frame_index=0):
            scenes.popleft()
            return np.zeros((0, 3))

    st = ev.Settings(frames=2, isolated_frames=2, snr_db=(0.0,), densities=(1,), min_emitters=0)
    rep = ev.evaluate(Blind(), st, z_range_um=(0, 100), psf=GaussianDefocusPSF())
    d = rep.to_json()
    json.dumps(d, allow_nan=False)
    assert d["experiments"]["snr"]["points"][0]["scores"]["10um"]["rmse_3d_um"] is None
    assert [c["pass"] for c in d["checks"]] == [False, False]


def test_points_are_reproducible_and_independent(scenes):
    class Null:
        def localize(self, frame, *, frame_index=0):
            return np.zeros((0, 3))

    st = ev.Settings(frames=2, isolated_frames=0, snr_db=(0.0, 10.0), densities=())
    ev.evaluate(Null(), st, z_range_um=(0, 100), psf=GaussianDefocusPSF())
    first = [s.xyz_um for s in scenes]
    scenes.clear()
    st2 = ev.Settings(frames=2, isolated_frames=0, snr_db=(10.0,), densities=())
    ev.evaluate(Null(), st2, z_range_um=(0, 100), psf=GaussianDefocusPSF())
    # the 10-dB point draws the same scenes whether or not the 0-dB point ran
    assert len(first) == 4 and len(scenes) == 2
    np.testing.assert_array_equal(scenes[0].xyz_um, first[2])
    np.testing.assert_array_equal(scenes[1].xyz_um, first[3])


# ----------------------------------------------------------------------------- report


def test_report_files_and_schema(scenes, tmp_path):
    oracle = Oracle(scenes, sigma_xy=0.3, sigma_z=0.5, miss=0.05)
    rep = ev.evaluate(
        oracle,
        _quick(),
        z_range_um=(0, 100),
        psf=GaussianDefocusPSF(),
        model_info={"path": "x", "calibration_sha256": "ab" * 32, "z_step_um": 2.0},
    )
    paths = ev.write_report(rep, tmp_path / "report")
    d = json.loads(paths["json"].read_text())
    assert d["schema_version"] == ev.SCHEMA_VERSION and d["kind"] == "focaltrack.evaluation"
    assert d["model"]["calibration_sha256"] == "ab" * 32
    assert "SNR_dB" in d["snr_definition"]
    assert set(d["experiments"]) == {"snr", "density", "isolated"}
    assert [p["snr_db"] for p in d["experiments"]["snr"]["points"]] == [0.0, 10.0, 30.0]
    assert [p["n_emitters"] for p in d["experiments"]["density"]["points"]] == [1, 8, 32]
    for exp in d["experiments"].values():
        for p in exp["points"]:
            assert set(p["scores"]) == {"10um", "2um"}
            for s in p["scores"].values():
                assert 0 <= s["jaccard"] <= 1
                assert s["tp"] + s["fn"] == p["frames"] * p["n_emitters"]
            assert p["photons_per_intensity"] > 0
    photons = [p["photons_per_intensity"] for p in d["experiments"]["snr"]["points"]]
    assert photons == sorted(photons)  # brighter for a higher SNR, same background
    by_depth = d["experiments"]["isolated"]["axial_by_depth"]
    assert (
        sum(r["n"] for r in by_depth)
        == d["experiments"]["isolated"]["points"][0]["scores"]["10um"]["tp"]
    )
    q = d["experiments"]["isolated"]["axial_abs_error_quantiles_um"]
    assert 0 <= q["p50"] <= q["p90"]
    assert len(d["checks"]) == 3
    md = paths["markdown"].read_text()
    assert "SNR_dB = 20·log10" in md and "| 10 dB |" in md and "snr.png" in md
    for name in ("snr", "density", "isolated"):
        png = paths[name]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    text = ev.summary_text(rep)
    assert "J@10um" in text and "PASS" in text


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match=r"not a directory|cannot write"):
        ev.check_writable(blocker)
    with pytest.raises(OSError, match="cannot write"):
        ev.check_writable(blocker / "sub")


# ----------------------------------------------------------------------------- CLI


def test_cli_missing_model_dir(tmp_path, capsys):
    rc = main(["evaluate", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nope" in err and "evaluate" in err
    assert not (tmp_path / "r").exists()  # no empty report directory left behind


def test_cli_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    (tmp_path / "model").mkdir()
    rc = main(["evaluate", "--model", str(tmp_path / "model"), "--out", str(blocker / "r")])
    assert rc == 2
    assert "cannot write" in capsys.readouterr().err


def test_cli_rejects_bad_numbers(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    base = ["evaluate", "--model", str(tmp_path / "model"), "--out", str(tmp_path)]
    with pytest.raises(SystemExit):
        main([*base, "--matched-filter-snr", "-1"])
    assert "at least 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--matched-filter-rounds", "0"])
    assert "--matched-filter-rounds" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(
            [
                "evaluate",
                "--model",
                str(tmp_path / "model"),
                "--out",
                str(tmp_path),
                "--frames",
                "0",
            ]
        )


@pytest.fixture(scope="module")
def untrained_bundle(tmp_path_factory):
    """A real bundle (real files, real networks) with untrained weights: cheap, and enough
    to drive the whole command. The trained model's accuracy is the CNN tests' business
    (their trained fixture costs minutes); this test is about the command."""
    from cnn_fixtures import save_untrained_bundle

    return save_untrained_bundle(tmp_path_factory.mktemp("bundle") / "model")


def test_cli_end_to_end_with_a_bundle(untrained_bundle, tmp_path, capsys):
    path, cal = untrained_bundle
    out = tmp_path / "report"
    rc = main(["evaluate", "--model", str(path), "--out", str(out), "--quick", "--threads", "1"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    d = json.loads((out / "results.json").read_text())
    assert d["model"]["calibration_sha256"] == cal.sha256
    assert d["model"]["preset"] == "untrained"
    assert d["model"]["z_range_um"] == [0.0, 100.0] and d["model"]["z_step_um"] == 2.0
    assert d["geometry"]["z_range_um"] == [0.0, 100.0]
    assert [p["snr_db"] for p in d["experiments"]["snr"]["points"]] == [0.0, 10.0, 30.0]
    for name in ("README.md", "snr.png", "density.png", "isolated.png", "depth.png"):
        assert (out / name).is_file()
    assert "J@10um" in captured.out and "Checks" in captured.out
    # the bounds of the bundle's calibration (docs/evaluation.md), ideal recall at every point
    assert d["bounds"]["window_px"] == [128, 128] and "lat/CR" in captured.out
    ideal = [p["ideal_recall"] for p in d["experiments"]["snr"]["points"]]
    assert all(0.0 <= v <= 1.0 for v in ideal) and ideal == sorted(ideal)


def test_cli_options_reach_the_settings(untrained_bundle, tmp_path):
    path, _ = untrained_bundle
    out = tmp_path / "r"
    argv = ["evaluate", "--model", str(path), "--out", str(out), "--quick", "--frames", "1"]
    argv += ["--isolated-frames", "0", "--snr-db", "5", "--densities", "3", "--seed", "4"]
    argv += ["--tolerances-um", "8,1", "--background-photons", "5", "--threads", "1"]
    argv += ["--no-bounds", "--matched-filter-snr", "0", "--matched-filter-rounds", "3"]
    assert main(argv) == 0
    d = json.loads((out / "results.json").read_text())
    assert d["model"]["decode"]["matched_filter_snr"] == 0.0  # the analysis as applied
    assert d["model"]["decode"]["matched_filter_rounds"] == 3
    st = d["settings"]
    assert st["frames"] == 1 and st["seed"] == 4 and st["tolerances_um"] == [8.0, 1.0]
    assert st["bounds"] is False and d["bounds"] is None
    assert set(d["experiments"]) == {"snr", "density"}
    (p,) = d["experiments"]["density"]["points"]
    assert p["n_emitters"] == 3 and p["background_photons"] == 5.0
    assert set(p["scores"]) == {"8um", "1um"}
    assert p["ideal_recall"] is None and "crlb_lat_um" not in p["scores"]["8um"]


def test_cli_incomplete_bundle(tmp_path, capsys):
    (tmp_path / "model").mkdir()
    rc = main(["evaluate", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "r")])
    assert rc == 2
    assert "incomplete" in capsys.readouterr().err


def test_sparse_density_points_get_enough_frames():
    specs = {s.label: s for s in ev.Settings(frames=50).specs()}
    assert specs["1 / frame"].frames == 200 and specs["2 / frame"].frames == 100
    assert specs["8 / frame"].frames == 50 and specs["0 dB"].frames == 50
    assert specs["1 bright / frame"].frames == 200

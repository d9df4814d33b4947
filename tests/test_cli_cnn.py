"""`focaltrack train` and `focaltrack localize` end to end on small inputs, and bad inputs."""

from __future__ import annotations

import csv
import shutil

import h5py
import numpy as np
import pytest
import tifffile
from cnn_fixtures import PIXEL_UM, photons_for_peak_snr, random_scene, render_frame

from focaltrack.daemon.cli import main
from focaltrack.records import Localizations, csv_columns

SHAPE = (128, 160)


@pytest.fixture(scope="module")
def trained(trained_model):
    return trained_model


@pytest.fixture(scope="module")
def scene_frames():
    """Three frames of two emitters each, and their true (x, y) in µm per frame."""
    rng = np.random.default_rng(9)
    photons = photons_for_peak_snr(25.0, 20.0)
    scenes, frames = [], []
    for _ in range(3):  # each frame's scene, then its noise, from one generator
        scenes.append(random_scene(rng, 2, SHAPE, 25, 30.0))
        frames.append(render_frame(SHAPE, scenes[-1], np.full(2, photons), rng))
    return np.stack(frames), [xyz[:, :2] for xyz in scenes]


@pytest.fixture(scope="module")
def frames(scene_frames):
    return scene_frames[0]


def _read_csv(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_train_wrote_a_complete_bundle(trained):
    _, model = trained
    assert {p.name for p in model.iterdir()} >= {
        "bundle.json", "lateral.pt", "axial.pt", "calibration.h5", "COMPLETE"
    }  # fmt: skip
    # no temporary directories left beside it
    assert not [p for p in model.parent.iterdir() if p.name.startswith(".model.")]


def test_localize_tiff_to_csv(trained, frames, tmp_path, capsys):
    _, model = trained
    tif = tmp_path / "frames.tif"
    tifffile.imwrite(tif, frames, photometric="minisblack")
    out = tmp_path / "locs.csv"
    rc = main(["localize", "--model", str(model), str(tif), "--out", str(out)])
    assert rc == 0
    err = capsys.readouterr().err
    assert "frames/s" in err
    rows = _read_csv(out)
    assert list(rows[0].keys())[:5] == ["frame", "x_um", "y_um", "z_um", "score"]
    frames_seen = {int(r["frame"]) for r in rows}
    assert frames_seen <= {0, 1, 2} and len(frames_seen) >= 2
    xs = np.array([float(r["x_um"]) for r in rows])
    ys = np.array([float(r["y_um"]) for r in rows])
    assert np.all((xs > -1) & (xs < SHAPE[1] * PIXEL_UM + 1))
    assert np.all((ys > -1) & (ys < SHAPE[0] * PIXEL_UM + 1))


def test_localize_with_residual_passes(trained, scene_frames, tmp_path, capsys):
    """--passes 2 runs the fit-subtract-search path from the CLI; --passes 0 is refused."""
    _, model = trained
    frames, truth_xy = scene_frames
    tif = tmp_path / "frames.tif"
    tifffile.imwrite(tif, frames, photometric="minisblack")
    one, two = tmp_path / "one.csv", tmp_path / "two.csv"
    assert (
        main(["localize", "--model", str(model), str(tif), "--out", str(one), "--passes", "1"]) == 0
    )
    assert (
        main(["localize", "--model", str(model), str(tif), "--out", str(two), "--passes", "2"]) == 0
    )
    a, b = _read_csv(one), _read_csv(two)
    assert len(a) >= 2 and len(b) >= 2
    # The second pass adds what the residual shows and drops what its fit cannot tell from
    # noise (the significance cut), so counts can go either way with a CI-sized model; what
    # it must not do is lose a true emitter the networks found. The fit moves each one by
    # at most its search reach (8 px for the deepest) plus two Gauss–Newton steps: accuracy
    # is test_cnn's job.
    found = [_true_found(rows, truth_xy, 7.0) for rows in (a, b)]
    assert found[0].any(), "the networks found no true emitter: nothing to compare"
    assert np.all(found[1][found[0]]), found
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["localize", "--model", str(model), str(tif), "--out", str(two), "--passes", "0"])
    assert "passes" in capsys.readouterr().err


def _true_found(rows, truth_xy, tol_um):
    """For each true emitter (frames in order), whether a row of its frame lies within tol."""
    out = []
    for f, xy in enumerate(truth_xy):
        got = np.array([[float(r["x_um"]), float(r["y_um"])] for r in rows if int(r["frame"]) == f])
        for p in xy:
            out.append(len(got) > 0 and bool(np.hypot(*(got - p).T).min() < tol_um))
    return np.array(out)


def test_localize_hdf5_to_h5(trained, frames, tmp_path):
    _, model = trained
    src = tmp_path / "rec.h5"
    with h5py.File(src, "w") as f:
        f.create_dataset("acq/frames", data=frames)
        f.create_dataset("other", data=np.zeros((3, 3)))
    out = tmp_path / "locs.h5"
    assert main(["localize", "--model", str(model), str(src), "--out", str(out),
                 "--dataset", "acq/frames"]) == 0  # fmt: skip
    with h5py.File(out, "r") as f:
        g = f["localizations"]
        assert set(g) == set(csv_columns(Localizations))  # the fit's columns too
        assert g.attrs["calibration_sha256"]
        assert len(g["frame"]) == len(g["x_um"]) > 0
    # the only 3-D dataset is found without --dataset
    out2 = tmp_path / "locs2.csv"
    assert main(["localize", "--model", str(model), str(src), "--out", str(out2)]) == 0


def test_localize_pixel_size_check_and_override(trained, frames, tmp_path, capsys):
    _, model = trained
    tif = tmp_path / "f.tif"
    tifffile.imwrite(tif, frames[:1], photometric="minisblack")
    out = tmp_path / "l.csv"
    args = ["localize", "--model", str(model), str(tif), "--out", str(out)]
    assert main([*args, "--pixel-size", "1.3"]) == 2
    assert "pixel" in capsys.readouterr().err
    assert not out.exists()
    assert main([*args, "--pixel-size", "1.3", "--force"]) == 0
    assert main([*args, "--pixel-size", str(PIXEL_UM)]) == 0


def _expect_error(argv, capsys, *words):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    for w in words:
        assert w.lower() in err.lower(), err
    assert "Traceback" not in err


def test_localize_bad_inputs(trained, frames, tmp_path, capsys):
    _, model = trained
    out = str(tmp_path / "l.csv")
    base = ["localize", "--model", str(model)]
    # empty TIFF (a file with a header but no images)
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"II*\x00\x08\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00")
    _expect_error([*base, str(empty), "--out", out], capsys, "empty.tif")
    # frames of the wrong dimensionality (4-D)
    h5 = tmp_path / "bad.h5"
    with h5py.File(h5, "w") as f:
        f.create_dataset("x", data=np.zeros((2, 2, 32, 32), dtype=np.uint16))
        f.create_dataset("line", data=np.zeros(32, dtype=np.uint16))
    _expect_error([*base, str(h5), "--dataset", "x", "--out", out], capsys, "2-D")
    _expect_error([*base, str(h5), "--dataset", "line", "--out", out], capsys, "2-D")
    _expect_error([*base, str(h5), "--out", out], capsys, "--dataset")
    # NaNs in input
    nan = tmp_path / "nan.tif"
    f32 = frames[:1].astype(np.float32)
    f32[0, 5, 5] = np.nan
    tifffile.imwrite(nan, f32, photometric="minisblack")
    _expect_error([*base, str(nan), "--out", out], capsys, "NaN")
    # bit depth: 8-bit frames for a 16-bit calibration
    u8 = tmp_path / "u8.tif"
    tifffile.imwrite(u8, (frames[:1] // 256).astype(np.uint8), photometric="minisblack")
    _expect_error([*base, str(u8), "--out", out], capsys, "8-bit")
    # not an image file
    txt = tmp_path / "notes.txt"
    txt.write_text("hello")
    _expect_error([*base, str(txt), "--out", out], capsys, "neither a TIFF nor an HDF5")
    # output format
    tif = tmp_path / "ok.tif"
    tifffile.imwrite(tif, frames[:1], photometric="minisblack")
    _expect_error([*base, str(tif), "--out", str(tmp_path / "l.txt")], capsys, ".csv or .h5")
    # incomplete model directory (training interrupted)
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    (broken / "COMPLETE").unlink()
    _expect_error(
        ["localize", "--model", str(broken), str(tif), "--out", out], capsys, "incomplete"
    )
    assert not (tmp_path / "l.csv").exists()


def test_train_bad_inputs(trained, tmp_path, capsys):
    cal_path, model = trained
    # a calibration file of the wrong schema: an HDF5 file that is not a calibration
    wrong = tmp_path / "wrong.h5"
    with h5py.File(wrong, "w") as f:
        f.create_dataset("psf", data=np.zeros((3, 8, 8)))
    _expect_error(
        ["train", "--calibration", str(wrong), "--out", str(tmp_path / "m")], capsys,
        "not a focaltrack calibration",
    )  # fmt: skip
    # a calibration of an unknown schema version
    newer = tmp_path / "newer.h5"
    shutil.copy(cal_path, newer)
    with h5py.File(newer, "a") as f:
        f.attrs["schema_version"] = 99
    _expect_error(
        ["train", "--calibration", str(newer), "--out", str(tmp_path / "m")], capsys, "version 99"
    )
    _expect_error(
        ["train", "--calibration", str(tmp_path / "missing.h5"), "--out", str(tmp_path / "m")],
        capsys,
        "does not exist",
    )
    # refusing to overwrite an existing bundle
    _expect_error(
        ["train", "--calibration", str(cal_path), "--out", str(model), "--preset", "ci"],
        capsys,
        "already exists",
    )
    assert not (tmp_path / "m").exists()

"""`focaltrack calibrate` and `focaltrack calibration show`, end to end, bad inputs included."""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import tifffile
from calib_synth import synth_stack

from focaltrack.calibration import Calibration
from focaltrack.daemon.cli import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# A quick simulated acquisition: 11 slices, small frames, no waiting.
SIM_FAST = [
    "--driver",
    "sim",
    "--z-range",
    "20",
    "--averages",
    "2",
    "--settle",
    "0",
    "--exposure-ms",
    "1",
    "--window",
    "64",
    "--sim-size",
    "128",
    "--sim-photons",
    "20000",
]


@pytest.fixture(scope="module")
def stack():
    return synth_stack(nz=11, n_avg=1)


@pytest.fixture
def tif(tmp_path, stack):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack.frames0)
    return path


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_calibrate_from_the_simulator_and_show(tmp_path, capsys):
    out = tmp_path / "cal.h5"
    assert main(["calibrate", *SIM_FAST, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "slices:      11" in text and "noise model" in text and f"wrote {out}" in text
    cal = Calibration.load(out)
    assert cal.psf.shape == (11, 64, 64)
    np.testing.assert_allclose(cal.z_um, np.arange(11) * 2.0)
    assert cal.pixel_size_um == pytest.approx(0.65)
    assert cal.source.startswith("sim:") and cal.n_averages == 2
    assert cal.noise.read_noise_adu > 0 and cal.noise.offset_adu > 50
    assert cal.extra["z_readback_um"].shape == (11,)

    png = tmp_path / "figure.png"
    assert main(["calibration", "show", str(out), "--png", str(png)]) == 0
    text = capsys.readouterr().out
    assert "bead:" in text and "noise model:" in text and str(png) in text
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 20_000


def test_calibrate_from_tiff_and_hdf5(tmp_path, tif, stack, capsys):
    out = tmp_path / "cal.h5"
    args = ["calibrate", "--from-file", str(tif), "--z-step", "5", "--pixel-size", "0.65"]
    assert main([*args, "--out", str(out)]) == 0
    cal = Calibration.load(out)
    assert cal.z_step_um == pytest.approx(5.0) and cal.psf.shape == (11, 128, 128)
    assert cal.bead_xy_px == pytest.approx(tuple(stack.truth_xy[0]), abs=0.15)
    assert cal.source.startswith("file:") and cal.source.endswith("stack.tif")
    assert cal.n_averages == 1 and cal.bit_depth == 16
    assert math.isnan(cal.noise.gain_e_per_adu)  # a stack of single frames cannot show it
    assert "wrote" in capsys.readouterr().out
    # the camera's gain, where the user knows it (the pupil fit weighs the pixels with it)
    out_g = tmp_path / "cal_gain.h5"
    assert main([*args, "--gain", "0.46", "--out", str(out_g)]) == 0
    assert Calibration.load(out_g).noise.gain_e_per_adu == pytest.approx(0.46)

    h5 = tmp_path / "stack.h5"
    with h5py.File(h5, "w") as f:
        f["raw/beads"] = stack.frames0
        f["raw/dark"] = np.zeros((3, 8, 8))
    out2 = tmp_path / "cal2.h5"
    cmd = ["calibrate", "--from-file", str(h5), "--dataset", "raw/beads", "--pixel-size", "0.65"]
    assert main([*cmd, "--z-step", "5", "--window", "96", "--out", str(out2)]) == 0
    cal2 = Calibration.load(out2)
    assert cal2.psf.shape == (11, 96, 96)
    np.testing.assert_allclose(
        cal2.psf[:, 16:-16, 16:-16].sum(), cal.psf[:, 32:-32, 32:-32].sum(), rtol=0.02
    )


def _bad_cases(tmp: Path, stack) -> dict[str, tuple[list[str], str]]:
    """name → (argv without --out, expected message)."""
    (tmp / "garbage.tif").write_bytes(b"this is not an image at all")
    tifffile.imwrite(tmp / "single.tif", stack.frames0[0])
    tifffile.imwrite(tmp / "short.tif", stack.frames0[:2])
    tifffile.imwrite(tmp / "noise.tif", synth_stack(nz=6, photons=0.0, n_avg=1).frames0)
    tifffile.imwrite(tmp / "sat.tif", synth_stack(nz=6, photons=3.0e6, n_avg=1).frames0)
    tifffile.imwrite(
        tmp / "two.tif",
        synth_stack(nz=6, beads=((100.0, 100.0, 1.0), (110.0, 104.0, 0.9)), n_avg=1).frames0,
    )
    tifffile.imwrite(tmp / "good.tif", stack.frames0)
    ff = ["calibrate", "--pixel-size", "0.65", "--from-file"]
    return {
        "missing-file": ([*ff, str(tmp / "nope.tif")], "does not exist"),
        "unreadable-file": ([*ff, str(tmp / "garbage.tif")], "neither a TIFF nor an HDF5"),
        "not-a-z-stack": ([*ff, str(tmp / "single.tif")], "not a z-stack"),
        "z-step-zero": ([*ff, str(tmp / "good.tif"), "--z-step", "0"], "--z-step must be > 0"),
        "z-step-negative": ([*ff, str(tmp / "good.tif"), "--z-step", "-2"], "--z-step must be"),
        "short-stack": ([*ff, str(tmp / "short.tif")], "at least 3"),
        "saturated-bead": ([*ff, str(tmp / "sat.tif")], "saturated"),
        "no-bead": ([*ff, str(tmp / "noise.tif")], "no bead found"),
        "two-beads": ([*ff, str(tmp / "two.tif")], "two overlapping beads"),
        "no-pixel-size": (
            ["calibrate", "--from-file", str(tmp / "good.tif")],
            "--from-file needs --pixel-size",
        ),
        "stage-timeout": (
            ["calibrate", *SIM_FAST, "--sim-stage-speed", "1", "--stage-timeout", "0.2"],
            "did not reach z",
        ),
        "sim-saturated": (["calibrate", *SIM_FAST, "--sim-photons", "1e7"], "saturated"),
        "mm-without-config": (
            ["calibrate", "--driver", "micromanager"],
            "needs --mm-app-path and --mm-config",
        ),
        "mm-folder-missing": (
            [
                "calibrate",
                "--driver",
                "micromanager",
                "--mm-app-path",
                str(tmp / "Micro-Manager"),
                "--mm-config",
                str(tmp / "scope.cfg"),
            ],
            "does not exist",
        ),
        "attach-with-from-file": ([*ff, str(tmp / "good.tif"), "--attach"], "--attach is for"),
        "gain-without-from-file": (["calibrate", *SIM_FAST, "--gain", "0.5"], "--gain is for"),
        "gain-zero": ([*ff, str(tmp / "good.tif"), "--gain", "0"], "--gain"),
    }


BAD = [
    "missing-file",
    "unreadable-file",
    "not-a-z-stack",
    "z-step-zero",
    "z-step-negative",
    "short-stack",
    "saturated-bead",
    "no-bead",
    "two-beads",
    "no-pixel-size",
    "stage-timeout",
    "sim-saturated",
    "mm-without-config",
    "mm-folder-missing",
    "attach-with-from-file",
]


@pytest.mark.parametrize("case", BAD)
def test_calibrate_bad_input_is_one_clear_line_and_no_file(tmp_path, stack, capsys, case):
    argv, message = _bad_cases(tmp_path, stack)[case]
    outdir = tmp_path / "out"
    outdir.mkdir()
    assert main([*argv, "--out", str(outdir / "cal.h5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("focaltrack calibrate: error: ")
    assert message in err[-1]
    assert _files(outdir) == []  # nothing half-written


@pytest.mark.parametrize("source", ["file", "sim"])
def test_calibrate_refuses_an_output_directory_that_does_not_exist(tmp_path, tif, capsys, source):
    out = tmp_path / "missing" / "cal.h5"
    argv = ["--from-file", str(tif), "--pixel-size", "0.65"] if source == "file" else SIM_FAST
    before = _files(tmp_path)
    assert main(["calibrate", *argv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"output directory {out.parent} does not exist" in err
    assert not out.parent.exists() and _files(tmp_path) == before


def test_calibration_show_refuses_a_file_that_is_not_a_calibration(tmp_path, tif, capsys):
    assert main(["calibration", "show", str(tif), "--png", str(tmp_path / "x.png")]) == 2
    assert "not a readable HDF5" in capsys.readouterr().err
    assert main(["calibration", "show", str(tmp_path / "none.h5")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    assert main(["calibration", "show", str(tif), "--png", str(tmp_path / "no" / "x.png")]) == 2
    assert f"output directory {tmp_path / 'no'} does not exist" in capsys.readouterr().err


def test_installed_console_script(tmp_path, tif):
    exe = shutil.which("focaltrack", path=str(Path(sys.executable).parent))
    assert exe, "the focaltrack console script is not installed next to this Python"
    out = tmp_path / "cal.h5"
    ok = subprocess.run(
        [exe, "calibrate", "--from-file", str(tif), "--pixel-size", "0.65", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert "wrote" in ok.stdout and Calibration.load(out).psf.shape[0] == 11

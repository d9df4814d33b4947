"""The pixel size files state about their frames (`focaltrack.calibration.pixelsize`) and
`focaltrack localize` checking it against the model's (issue 14, point 2).

The files are written as the acquisition programs write them, with tifffile and h5py: ImageJ
hyperstacks, OME-TIFF, plain resolution tags, Micro-Manager's per-image JSON tag, service
recordings.
"""

from __future__ import annotations

import csv
import json
import os
import stat

import h5py
import numpy as np
import pytest
import tifffile
from cnn_fixtures import PIXEL_UM, photons_for_peak_snr, random_scene, render_frame

from focaltrack.calibration.pixelsize import StatedPixelSize, read_pixel_size
from focaltrack.daemon.cli import main

SHAPE = (128, 160)
FRAMES = np.zeros((3, 32, 32), dtype=np.uint16)


# ------------------------------------------------------------------ files of each kind
def imagej_tiff(path, frames, um, unit="um"):
    tifffile.imwrite(
        path, frames, imagej=True, resolution=(1 / um, 1 / um), metadata={"unit": unit}
    )


def ome_tiff(path, frames, size, unit=None):
    meta = {"axes": "TYX", "PhysicalSizeX": size, "PhysicalSizeY": size}
    if unit is not None:
        meta["PhysicalSizeXUnit"] = meta["PhysicalSizeYUnit"] = unit
    tifffile.imwrite(path, frames, ome=True, metadata=meta)


def resolution_tiff(path, frames, per_unit, unit):
    tifffile.imwrite(
        path,
        frames,
        photometric="minisblack",
        resolution=(per_unit, per_unit),
        resolutionunit=unit,
        metadata=None,
    )


def micromanager_tiff(path, frames, um):
    # Micro-Manager writes each image's metadata as JSON in tag 51123 (MicroManagerMetadata)
    tag = json.dumps({"PixelSizeUm": um, "Camera": "DCam", "Exposure-ms": 10.0})
    tifffile.imwrite(
        path,
        frames,
        photometric="minisblack",
        metadata=None,
        extratags=[(51123, "s", 0, tag, True)],
    )


def recording_h5(path, frames, um):
    with h5py.File(path, "w") as f:
        f.attrs["kind"] = "focaltrack.recording"
        f.attrs["pixel_size_um"] = um
        f.create_dataset("frames", data=frames)
        f.create_dataset("frame_meta/stage_z_um", data=np.zeros(len(frames)))


# ------------------------------------------------------------------ reading
@pytest.mark.parametrize(
    ("unit", "per_unit", "um"),
    [("um", 10.0, 0.1), ("micron", 1 / 0.65, 0.65), ("\\u00B5m", 2.0, 0.5), ("nm", 0.01, 0.1)],
)
def test_imagej_metadata(tmp_path, unit, per_unit, um):
    p = tmp_path / "ij.tif"
    imagej_tiff(p, FRAMES, 1 / per_unit, unit)
    found = read_pixel_size(p)
    assert found is not None and found.source == "ImageJ metadata"
    assert found.um == pytest.approx(um, rel=1e-6)


def test_imagej_without_a_unit_states_nothing(tmp_path):
    p = tmp_path / "ij.tif"
    tifffile.imwrite(p, FRAMES, imagej=True, resolution=(10.0, 10.0))  # unit: pixels
    assert read_pixel_size(p) is None


@pytest.mark.parametrize(
    ("size", "unit", "um"), [(0.1, None, 0.1), (100.0, "nm", 0.1), (0.65, "µm", 0.65)]
)
def test_ome_physical_size(tmp_path, size, unit, um):
    p = tmp_path / "x.ome.tif"
    ome_tiff(p, FRAMES, size, unit)
    assert read_pixel_size(p) == StatedPixelSize(pytest.approx(um, rel=1e-9), "OME PhysicalSizeX")


def test_ome_in_pixels_states_nothing(tmp_path):
    p = tmp_path / "x.ome.tif"
    ome_tiff(p, FRAMES, 1.0, "pixel")
    assert read_pixel_size(p) is None


@pytest.mark.parametrize(
    ("per_unit", "unit", "um", "source"),
    [
        (1e5, "CENTIMETER", 0.1, "TIFF XResolution (cm)"),
        (25400 / 0.65, "INCH", 0.65, "TIFF XResolution (inch)"),
        (1e4 / 6.5, "MILLIMETER", 0.1 * 6.5, "TIFF XResolution (mm)"),
    ],
)
def test_resolution_tags(tmp_path, per_unit, unit, um, source):
    p = tmp_path / "r.tif"
    resolution_tiff(p, FRAMES, per_unit, unit)
    found = read_pixel_size(p)
    assert found is not None and found.source == source
    assert found.um == pytest.approx(um, rel=1e-6)


@pytest.mark.parametrize(
    ("per_unit", "unit"),
    [(1.0, "NONE"), (10.0, "NONE"), (1.0, "CENTIMETER"), (72.0, "INCH"), (300.0, "INCH")],
)
def test_resolution_tags_that_state_nothing(tmp_path, per_unit, unit):
    """No unit, 1 pixel per unit, or an image program's document dpi: no microscope's."""
    p = tmp_path / "r.tif"
    resolution_tiff(p, FRAMES, per_unit, unit)
    assert read_pixel_size(p) is None


def test_plain_files_state_nothing(tmp_path):
    tifffile.imwrite(tmp_path / "plain.tif", FRAMES, photometric="minisblack")
    assert read_pixel_size(tmp_path / "plain.tif") is None
    with h5py.File(tmp_path / "plain.h5", "w") as f:
        f.create_dataset("frames", data=FRAMES)
    assert read_pixel_size(tmp_path / "plain.h5") is None
    (tmp_path / "notes.txt").write_text("hello")
    assert read_pixel_size(tmp_path / "notes.txt") is None
    assert read_pixel_size(tmp_path / "missing.tif") is None


def test_micromanager_metadata(tmp_path):
    p = tmp_path / "mm.tif"
    micromanager_tiff(p, FRAMES, 0.325)
    assert read_pixel_size(p) == StatedPixelSize(0.325, "Micro-Manager PixelSizeUm")
    micromanager_tiff(p, FRAMES, 0.0)  # Micro-Manager without a pixel-size configuration
    assert read_pixel_size(p) is None


def test_hdf5_attributes(tmp_path):
    p = tmp_path / "rec.h5"
    recording_h5(p, FRAMES, 0.1)
    assert read_pixel_size(p) == StatedPixelSize(0.1, "recording pixel_size_um")
    recording_h5(p, FRAMES, 0.0)  # a recording of a microscope without a pixel size
    assert read_pixel_size(p) is None
    with h5py.File(tmp_path / "ij.h5", "w") as f:
        f.create_dataset("a/frames", data=FRAMES).attrs["element_size_um"] = (2.0, 0.2, 0.2)
        f.create_dataset("b", data=np.zeros((4, 4)))
    assert read_pixel_size(tmp_path / "ij.h5") == StatedPixelSize(
        0.2, "HDF5 /a/frames attribute element_size_um"
    )
    assert read_pixel_size(tmp_path / "ij.h5", dataset="b") is None
    with h5py.File(tmp_path / "ij.h5", "a") as f:
        f.attrs["pixel_size_um"] = 0.4  # not a recording: the root's attribute still counts
    assert read_pixel_size(tmp_path / "ij.h5", dataset="b") == StatedPixelSize(
        0.4, "HDF5 root attribute pixel_size_um"
    )
    assert read_pixel_size(tmp_path / "ij.h5", dataset="nope") is None  # read_frames says why


# ------------------------------------------------------------------ localize
@pytest.fixture(scope="module")
def model(trained_model):
    return trained_model.bundle


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(9)
    photons = photons_for_peak_snr(25.0, 20.0)
    return np.stack(
        [render_frame(SHAPE, random_scene(rng, 2, SHAPE, 25, 30.0), np.full(2, photons), rng)
         for _ in range(2)]
    )  # fmt: skip


WRITERS = {
    "ImageJ metadata": lambda p, fr, um: imagej_tiff(p.with_suffix(".tif"), fr, um),
    "OME PhysicalSizeX": lambda p, fr, um: ome_tiff(p.with_suffix(".tif"), fr, um),
    "TIFF XResolution (cm)": lambda p, fr, um: resolution_tiff(
        p.with_suffix(".tif"), fr, 1e4 / um, "CENTIMETER"
    ),
    "Micro-Manager PixelSizeUm": lambda p, fr, um: micromanager_tiff(p.with_suffix(".tif"), fr, um),
    "recording pixel_size_um": lambda p, fr, um: recording_h5(p.with_suffix(".h5"), fr, um),
}


def _write(kind, tmp_path, frames, um):
    WRITERS[kind](tmp_path / "in", frames, um)
    return next(tmp_path.glob("in.*"))


def _xy(path):
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return np.array([[float(r["x_um"]), float(r["y_um"])] for r in rows])


@pytest.mark.parametrize("kind", list(WRITERS))
def test_localize_refuses_a_file_of_another_pixel_size(model, frames, tmp_path, capsys, kind):
    src = _write(kind, tmp_path, frames, 0.1)
    out = tmp_path / "l.csv"
    assert main(["localize", "--model", str(model), str(src), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    for words in ("error", "0.1 µm", kind, f"{PIXEL_UM:g} µm", "--pixel-size", "--force"):
        assert words in err, err
    assert not out.exists()


def test_localize_overrides_the_file(model, frames, tmp_path, capsys):
    """--pixel-size says the file is wrong; --force takes the file's pixel size for the
    coordinates, as --pixel-size with --force does."""
    src = _write("ImageJ metadata", tmp_path, frames, 0.1)
    base = ["localize", "--model", str(model), str(src), "--out"]
    assert main([*base, str(tmp_path / "own.csv"), "--pixel-size", str(PIXEL_UM)]) == 0
    assert "ImageJ metadata" in capsys.readouterr().err  # says which value it overrode
    assert main([*base, str(tmp_path / "forced.csv"), "--force"]) == 0
    own, forced = _xy(tmp_path / "own.csv"), _xy(tmp_path / "forced.csv")
    assert len(own) >= 2
    np.testing.assert_allclose(forced, own * (0.1 / PIXEL_UM), rtol=1e-4, atol=1e-3)


def test_localize_uses_a_matching_file_pixel_size(model, frames, tmp_path, capsys):
    um = PIXEL_UM * 1.005  # within the 1 % tolerance
    src = _write("OME PhysicalSizeX", tmp_path, frames, um)
    out = tmp_path / "l.h5"
    assert main(["localize", "--model", str(model), str(src), "--out", str(out)]) == 0
    assert "pixel size" not in capsys.readouterr().err
    with h5py.File(out, "r") as f:
        attrs = dict(f["localizations"].attrs)
    assert attrs["pixel_size_source"] == "OME PhysicalSizeX"
    assert attrs["pixel_size_um"] == pytest.approx(um, rel=1e-9)


def test_localize_a_file_that_states_nothing(model, frames, tmp_path, capsys):
    src = tmp_path / "plain.tif"
    tifffile.imwrite(src, frames, photometric="minisblack")
    out = tmp_path / "l.csv"
    assert main(["localize", "--model", str(model), str(src), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert err.count("states no pixel size") == 1, err
    assert f"{PIXEL_UM:g} µm" in err
    assert len(_xy(out)) >= 2
    # written through common.files.atomic_path: nothing left beside it, and the permissions
    # a plain open gives (a bare mkstemp made the file private)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~umask


# ------------------------------------------------------------------ calibrate --from-file
def test_calibrate_from_file_takes_the_files_pixel_size(tmp_path, capsys):
    """(Goes with the calibrate.py patch.) --from-file without --pixel-size reads it from
    the file; --pixel-size still wins; a file stating none still needs it."""
    from calib_synth import synth_stack

    from focaltrack.calibration import Calibration

    frames = synth_stack(nz=6, n_avg=1).frames0
    ij = tmp_path / "ij.tif"
    imagej_tiff(ij, frames, 0.325)
    base = ["calibrate", "--from-file", str(ij), "--z-step", "2"]
    assert main([*base, "--out", str(tmp_path / "a.h5")]) == 0
    assert Calibration.load(tmp_path / "a.h5").pixel_size_um == pytest.approx(0.325, rel=1e-6)
    assert main([*base, "--pixel-size", "0.65", "--out", str(tmp_path / "b.h5")]) == 0
    assert Calibration.load(tmp_path / "b.h5").pixel_size_um == pytest.approx(0.65)
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, frames)
    capsys.readouterr()
    argv = [
        "calibrate",
        "--from-file",
        str(plain),
        "--z-step",
        "2",
        "--out",
        str(tmp_path / "c.h5"),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "--from-file needs --pixel-size" in err and "plain.tif" in err

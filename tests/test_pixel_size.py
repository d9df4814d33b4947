"""The pixel size files state about their frames (`focaltrack.calibration.pixelsize`).

The files are written as the acquisition programs write them, with tifffile and h5py: ImageJ
hyperstacks, OME-TIFF, plain resolution tags, Micro-Manager's per-image JSON tag, service
recordings.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import tifffile

from focaltrack.calibration.pixelsize import StatedPixelSize, read_pixel_size

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

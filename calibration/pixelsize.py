"""The pixel size a TIFF or HDF5 file states about its own frames (µm in the sample).

A model is trained for one pixel size; frames taken at another are refused unless the
user says otherwise. Acquisition software usually writes the pixel size into the file, and
`read_pixel_size` finds it there, with where it came from. Sources, first found wins:

TIFF
  * OME-XML: ``Pixels/@PhysicalSizeX`` in ``PhysicalSizeXUnit`` (µm when absent, as the
    OME schema says);
  * Micro-Manager: ``PixelSizeUm`` in the first image's ``MicroManagerMetadata`` tag (0 is
    Micro-Manager's "not calibrated": nothing stated);
  * ImageJ: ``XResolution`` pixels per ``unit=`` of the ImageJ description (``micron``,
    ``um``, ``µm``, ``nm``, ``mm``, …; ``pixel`` or no unit: nothing stated);
  * plain ``XResolution`` with ``ResolutionUnit`` inch, cm, mm or µm. ``ResolutionUnit``
    none states no physical size. 1 pixel per unit, and the document resolutions image
    programs write by default (72, 96, 150, 300, 600 dpi), are not a microscope's and state
    nothing either.

HDF5
  * the frames dataset's ``pixel_size_um`` attribute, or its ``element_size_um`` (z, y, x:
    the ImageJ HDF5 plugin's and ilastik's convention), then the root's ``pixel_size_um``
    (a focaltrack recording's; 0 there means unknown).

The x pixel size is returned; the models assume square pixels. Unreadable files and
metadata that cannot be parsed state nothing here: the frame readers report broken files.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["StatedPixelSize", "read_pixel_size"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"

#: µm per unit of length, for OME's ``UnitsLength`` symbols and ImageJ's unit names.
_UM_PER_UNIT: dict[str, float] = {
    "m": 1e6,
    "cm": 1e4,
    "mm": 1e3,
    "µm": 1.0,  # U+00B5 MICRO SIGN
    "μm": 1.0,  # U+03BC GREEK SMALL LETTER MU
    "um": 1.0,
    "\\u00b5m": 1.0,  # ImageJ escapes non-ASCII characters in its description
    "micron": 1.0,
    "microns": 1.0,
    "micrometer": 1.0,
    "micrometre": 1.0,
    "nm": 1e-3,
    "nanometer": 1e-3,
    "nanometre": 1e-3,
    "pm": 1e-6,
    "å": 1e-4,
    "angstrom": 1e-4,
    "in": 25400.0,
    "inch": 25400.0,
}

#: TIFF ``ResolutionUnit`` codes (2 inch, 3 cm; 4 mm and 5 µm from DNG) to (µm, name).
_RESOLUTION_UNITS: dict[int, tuple[float, str]] = {
    2: (25400.0, "inch"),
    3: (1e4, "cm"),
    4: (1e3, "mm"),
    5: (1.0, "µm"),
}

#: Dots per inch that image programs write when nobody measured anything.
_DOCUMENT_DPI = (72.0, 96.0, 150.0, 300.0, 600.0)


@dataclass(frozen=True, slots=True)
class StatedPixelSize:
    """A pixel size found in a file: ``um`` µm per pixel, ``source`` saying where (e.g.
    "ImageJ metadata", "OME PhysicalSizeX", "TIFF XResolution (cm)")."""

    um: float
    source: str


def read_pixel_size(
    path: str | os.PathLike[str], dataset: str | None = None
) -> StatedPixelSize | None:
    """The pixel size ``path`` states for its frames, or None where it states none.

    ``dataset``: for HDF5, the dataset holding the frames (else the file's only 3-D one).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            magic = fh.read(8)
    except OSError:
        return None
    if magic.startswith(_HDF5_MAGIC):
        return _from_hdf5(path, dataset)
    if magic[:4] in _TIFF_MAGIC:
        return _from_tiff(path)
    return None


def _stated(um: float, source: str) -> StatedPixelSize | None:
    return StatedPixelSize(float(um), source) if math.isfinite(um) and um > 0 else None


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _um_per(unit: Any) -> float | None:
    if not isinstance(unit, str):
        return None
    u = unit.strip()
    return _UM_PER_UNIT.get(u, _UM_PER_UNIT.get(u.lower()))


# ------------------------------------------------------------------ TIFF
def _from_tiff(path: Path) -> StatedPixelSize | None:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tf:
            if len(tf.pages) == 0:
                return None
            page = tf.pages.first
            for find in (_ome, _micromanager, _imagej, _resolution_tags):
                found = find(tf, page)
                if found is not None:
                    return found
    except Exception:  # tifffile raises many types for damaged files; read_frames says why
        return None
    return None


def _ome(tf: Any, page: Any) -> StatedPixelSize | None:
    xml = tf.ome_metadata
    if not xml:
        return None
    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    # the first image's Pixels: the series the frame readers read
    pixels = next((e for e in root.iter() if e.tag.rpartition("}")[2] == "Pixels"), None)
    if pixels is None or "PhysicalSizeX" not in pixels.attrib:
        return None
    per = _um_per(pixels.get("PhysicalSizeXUnit", "µm"))
    if per is None:  # "pixel", "reference frame": not a length in the sample
        return None
    return _stated(_number(pixels.get("PhysicalSizeX")) * per, "OME PhysicalSizeX")


def _micromanager(tf: Any, page: Any) -> StatedPixelSize | None:
    # Micro-Manager (1.4's multipage TIFF, 2's NDTiff) writes every image's metadata,
    # PixelSizeUm among it, as JSON in this tag; tifffile decodes it to a dict.
    tags = page.tags.valueof(51123)  # MicroManagerMetadata
    if not isinstance(tags, dict):
        return None
    return _stated(_number(tags.get("PixelSizeUm")), "Micro-Manager PixelSizeUm")


def _imagej(tf: Any, page: Any) -> StatedPixelSize | None:
    meta = tf.imagej_metadata
    if not isinstance(meta, dict):
        return None
    per = _um_per(meta.get("unit"))
    if per is None or 282 not in page.tags:  # no unit, or no XResolution to scale
        return None
    x_per_unit = page.get_resolution()[0]  # pixels per ``unit``, whatever ResolutionUnit says
    if not x_per_unit > 0:
        return None
    return _stated(per / x_per_unit, "ImageJ metadata")


def _resolution_tags(tf: Any, page: Any) -> StatedPixelSize | None:
    if 282 not in page.tags:  # XResolution
        return None
    unit = _RESOLUTION_UNITS.get(int(page.tags.valueof(296, default=2)))  # TIFF default inch
    if unit is None:  # ResolutionUnit none: proportions only
        return None
    um_per_unit, name = unit
    x_per_unit = float(page.get_resolution()[0])
    if not x_per_unit > 0 or abs(x_per_unit - 1.0) < 1e-9:
        return None
    dpi = x_per_unit * 25400.0 / um_per_unit
    if any(abs(dpi - d) < 0.5 for d in _DOCUMENT_DPI):
        return None
    return _stated(um_per_unit / x_per_unit, f"TIFF XResolution ({name})")


# ------------------------------------------------------------------ HDF5
def _from_hdf5(path: Path, dataset: str | None) -> StatedPixelSize | None:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError:
        try:  # a recording still open for writing, or left so by a crash
            f = h5py.File(path, "r", libver="latest", swmr=True)
        except OSError:
            return None
    try:
        with f:
            return _hdf5_attributes(f, dataset)
    except Exception:  # h5py raises many types for damaged files; read_frames says why
        return None


def _hdf5_attributes(f: Any, dataset: str | None) -> StatedPixelSize | None:
    import h5py

    if dataset is not None:
        ds = f.get(dataset)
        if not isinstance(ds, h5py.Dataset):  # read_frames says so
            return None
    else:
        found: list[Any] = []
        f.visititems(
            lambda _n, o: found.append(o) if isinstance(o, h5py.Dataset) and o.ndim == 3 else None
        )
        ds = found[0] if len(found) == 1 else None
    if ds is not None:
        where = f"HDF5 {ds.name} attribute"
        stated = _stated(_number(ds.attrs.get("pixel_size_um")), f"{where} pixel_size_um")
        if stated is not None:
            return stated
        element = np.atleast_1d(np.asarray(ds.attrs.get("element_size_um", [])))
        if element.size >= 2:  # (z, y, x) or (y, x): x is last
            stated = _stated(_number(element[-1]), f"{where} element_size_um")
            if stated is not None:
                return stated
    kind = f.attrs.get("kind")
    if isinstance(kind, bytes):
        kind = kind.decode(errors="replace")
    what = "recording" if kind == "focaltrack.recording" else "HDF5 root attribute"
    return _stated(_number(f.attrs.get("pixel_size_um")), f"{what} pixel_size_um")

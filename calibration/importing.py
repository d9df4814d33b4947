"""Reading a bead z-stack recorded elsewhere: multi-page TIFF or HDF5."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from focaltrack.calibration.format import CalibrationError

__all__ = ["load_stack_file"]

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def load_stack_file(path: str | os.PathLike[str], dataset: str | None = None) -> np.ndarray:
    """Read a bead z-stack (Z, H, W) from a multi-page TIFF or an HDF5 file.

    The pixels come back in the file's own dtype (uint16 for a camera), so saturation can
    be checked against the camera's full scale. Slices are in file order: the first slice
    is taken as the focal plane, z ascending.

    TIFF: the first image series (Micro-Manager, ImageJ, OME and plain multi-page files);
    singleton axes are dropped, and exactly one non-spatial axis may remain (the z axis).
    HDF5: the dataset named by ``dataset``, or else the file's only 3-D dataset.
    """
    path = Path(path)
    if not path.exists():
        raise CalibrationError(f"stack file {path} does not exist")
    if path.is_dir():
        raise CalibrationError(f"stack file {path} is a directory, not a file")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(8)
    except OSError as e:
        raise CalibrationError(f"stack file {path} cannot be read: {e.strerror or e}") from e
    if magic.startswith(_HDF5_MAGIC):
        stack = _load_hdf5_stack(path, dataset)
    elif magic[:4] in _TIFF_MAGIC:
        if dataset is not None:
            raise CalibrationError(f"--dataset applies to HDF5 files; {path} is a TIFF")
        stack = _load_tiff_stack(path)
    else:
        raise CalibrationError(
            f"{path} is neither a TIFF nor an HDF5 file (unrecognised content); "
            "give a multi-page TIFF z-stack or an HDF5 file with a 3-D dataset"
        )
    return _check_stack(stack, str(path))


def _check_stack(stack: np.ndarray, what: str) -> np.ndarray:
    if stack.ndim != 3:
        raise CalibrationError(f"{what} is not a z-stack: expected (Z, H, W), got {stack.shape}")
    if not (np.issubdtype(stack.dtype, np.integer) or np.issubdtype(stack.dtype, np.floating)):
        raise CalibrationError(f"{what} has pixels of type {stack.dtype}, not numbers")
    if stack.shape[0] < 3:
        raise CalibrationError(
            f"{what} has {stack.shape[0]} slice(s); a focal-stack calibration needs at least 3"
        )
    if stack.shape[1] < 16 or stack.shape[2] < 16:
        raise CalibrationError(f"{what} has tiny {stack.shape[1]}×{stack.shape[2]} px slices")
    if np.issubdtype(stack.dtype, np.floating) and not np.all(np.isfinite(stack)):
        raise CalibrationError(f"{what} contains NaN or infinite pixels")
    return stack


def _load_tiff_stack(path: Path) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = series.axes
            data = series.asarray()
    except Exception as e:  # tifffile raises many types for damaged files
        raise CalibrationError(f"{path} is not a readable TIFF: {e}") from e
    if "S" in axes and data.shape[axes.index("S")] > 1:
        # Samples stored as separate planes (S before Y and X) are how tifffile writes a 3- or
        # 4-slice (N, H, W) array unless told otherwise: a stack of planes, as `focaltrack
        # localize` reads it. Interleaved samples (YXS) are a colour image.
        if axes.index("S") > axes.find("Y"):
            raise CalibrationError(
                f"{path} is a colour (RGB) image with axes {axes}, not a grayscale camera z-stack"
            )
        axes = axes.replace("S", "Q")
    keep = [i for i, n in enumerate(data.shape) if n > 1 or axes[i] in "YX"]
    squeezed_axes = "".join(axes[i] for i in keep)
    data = data.reshape([data.shape[i] for i in keep])
    if data.ndim == 2:
        raise CalibrationError(
            f"{path} holds a single {data.shape[0]}×{data.shape[1]} image, not a z-stack; "
            "save the focal stack as a multi-page TIFF"
        )
    if data.ndim != 3:
        raise CalibrationError(
            f"{path} is not a single z-stack: its axes are {squeezed_axes} "
            f"(shape {data.shape}); export one z-stack of one channel and one time point"
        )
    return data


def _load_hdf5_stack(path: Path, dataset: str | None) -> np.ndarray:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CalibrationError(f"{path} is not a readable HDF5 file: {e}") from e
    with f:
        if dataset is not None:
            obj = f.get(dataset)
            if not isinstance(obj, h5py.Dataset):
                raise CalibrationError(f"{path} has no dataset named {dataset!r}")
            if obj.ndim != 3:
                raise CalibrationError(
                    f"dataset {dataset!r} in {path} is not a z-stack: shape {obj.shape}"
                )
            return np.asarray(obj[()])
        found: list[str] = []

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset) and obj.ndim == 3:
                found.append(name)

        f.visititems(visit)
        if not found:
            raise CalibrationError(f"{path} contains no 3-D dataset (Z, H, W) to use as a z-stack")
        if len(found) > 1:
            raise CalibrationError(
                f"{path} contains several 3-D datasets ({', '.join(found)}); "
                "name one with --dataset"
            )
        return np.asarray(f[found[0]][()])

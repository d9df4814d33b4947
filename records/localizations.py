"""Localizations: every emitter found in one frame, as columns."""

# ruff: noqa: RUF009  (`column` returns a `dataclasses.field`, which ruff cannot see)
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from focaltrack.records.columns import column

__all__ = ["Localizations"]


@dataclass(frozen=True, slots=True)
class Localizations:
    """All emitters found in one frame, as columns (µm; score in [0, 1]).

    x = column × pixel size and y = row × pixel size (the centre of pixel (0, 0) is (0, 0));
    z is the distance from the focal plane in the calibration's convention (the defocus).
    On the wire ``frame`` and ``stage_z_um`` are the header's; in tables they are repeated
    on every row.
    """

    frame: int = column(
        "i8", "", "camera frame index (0-based image index offline)", wire=None, csv_format="%d"
    )
    x_um: np.ndarray = column("f8", "µm", "lateral position x", csv_format="%.4f")
    y_um: np.ndarray = column("f8", "µm", "lateral position y", csv_format="%.4f")
    z_um: np.ndarray = column("f8", "µm", "defocus, calibration's convention", csv_format="%.4f")
    score: np.ndarray = column("f4", "", "detection confidence in [0, 1]", csv_format="%.4f")
    #: The focus (stage z) the frame was taken at; NaN where unknown (a TIFF). The wire has
    #: it once per frame in the ``loc`` header and recordings in ``frame_meta``; the CSV and
    #: HDF5 files of `focaltrack localize` have it as a last column where it is known (not
    #: in `csv_columns`: files of TIFF input keep their five columns).
    stage_z_um: float = column(
        "f8",
        "µm",
        "stage focus position of the frame, NaN if unknown",
        wire=None,
        hdf5=False,
        csv=False,
        csv_format="%.4f",
        default=math.nan,
    )

    @property
    def xyz_um(self) -> np.ndarray:
        return np.stack([self.x_um, self.y_um, self.z_um], axis=1).reshape(-1, 3)

    def __len__(self) -> int:
        return len(self.x_um)

    @classmethod
    def empty(cls, frame: int, stage_z_um: float = math.nan) -> Localizations:
        z = np.zeros(0, dtype=np.float64)
        return cls(frame, z, z.copy(), z.copy(), z.copy(), stage_z_um=stage_z_um)

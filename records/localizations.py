"""Localizations: every emitter found in one frame, as columns."""

# ruff: noqa: RUF009  (`column` returns a `dataclasses.field`, which ruff cannot see)
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from focaltrack.records.columns import column

__all__ = ["Localizations"]


@dataclass(frozen=True, slots=True)
class Localizations:
    """All emitters found in one frame, as columns (µm; score in [0, 1]).

    x = column × pixel size and y = row × pixel size (the centre of pixel (0, 0) is (0, 0));
    z is the distance from the focal plane in the calibration's convention (the defocus).
    On the wire ``frame`` is the header's frame; in tables it is repeated on every row.
    """

    frame: int = column(
        "i8", "", "camera frame index (0-based image index offline)", wire=None, csv_format="%d"
    )
    x_um: np.ndarray = column("f8", "µm", "lateral position x", csv_format="%.4f")
    y_um: np.ndarray = column("f8", "µm", "lateral position y", csv_format="%.4f")
    z_um: np.ndarray = column("f8", "µm", "defocus, calibration's convention", csv_format="%.4f")
    score: np.ndarray = column("f4", "", "detection confidence in [0, 1]", csv_format="%.4f")

    @property
    def xyz_um(self) -> np.ndarray:
        return np.stack([self.x_um, self.y_um, self.z_um], axis=1).reshape(-1, 3)

    def __len__(self) -> int:
        return len(self.x_um)

    @classmethod
    def empty(cls, frame: int) -> Localizations:
        z = np.zeros(0, dtype=np.float64)
        return cls(frame, z, z.copy(), z.copy(), z.copy())

"""Localizations: every emitter found in one frame, as columns."""

# ruff: noqa: RUF009  (`column` returns a `dataclasses.field`, which ruff cannot see)
from __future__ import annotations

import math
from dataclasses import dataclass
from enum import IntFlag

import numpy as np

from focaltrack.records.columns import column, columns_of

__all__ = ["LocFlag", "Localizations"]


class LocFlag(IntFlag):
    """The bits of a localization's ``flags`` (docs/protocol.md). Bits are stored in files:
    never renumber, only add. Every flagged localization is still reported, with its σ
    (NaN where there is none)."""

    #: The networks' position only (no fit): σ, photons and background unknown (NaN).
    NOT_FITTED = 1
    #: The fit stopped before converging; its position and σ are those it stopped at.
    NOT_CONVERGED = 2
    #: z held at an end of the calibration's z range (the calibration is too short there).
    Z_AT_RANGE_END = 4
    #: x or y at the edge of the fitted window.
    XY_AT_WINDOW_EDGE = 8
    #: Brighter than the calibration's photon range (saturating): σ is optimistic.
    BRIGHT = 16


#: The columns of the fit, which a localization without one has as NaN.
FIT_COLUMNS = ("sigma_x_um", "sigma_y_um", "sigma_z_um", "photons", "background")
#: σ per axis, the tracker's measurement noise.
SIGMA_COLUMNS = FIT_COLUMNS[:3]


_SIGMA_DOC = (
    "1-σ uncertainty of {} from the fit's Fisher information (the Cramér–Rao bound at the "
    "fit), NaN where not fitted"
)


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
    # The fit's columns (issue #13): each localization with its own uncertainty and photons,
    # so that the tracker and the user can weight it. Left out (the networks' positions,
    # files and columns from before them) they are NaN, and ``flags`` says NOT_FITTED.
    sigma_x_um: np.ndarray = column(
        "f4", "µm", _SIGMA_DOC.format("x"), csv_format="%.5f", default=None, absent=math.nan
    )
    sigma_y_um: np.ndarray = column(
        "f4", "µm", _SIGMA_DOC.format("y"), csv_format="%.5f", default=None, absent=math.nan
    )
    sigma_z_um: np.ndarray = column(
        "f4", "µm", _SIGMA_DOC.format("z"), csv_format="%.5f", default=None, absent=math.nan
    )
    photons: np.ndarray = column(
        "f4",
        "e⁻",
        "fitted photon count of the emitter (photo-electrons), NaN where not fitted",
        csv_format="%.1f",
        default=None,
        absent=math.nan,
    )
    background: np.ndarray = column(
        "f4",
        "e⁻/px",
        "fitted local background per pixel (photo-electrons), NaN where not fitted",
        csv_format="%.2f",
        default=None,
        absent=math.nan,
    )
    flags: np.ndarray = column(
        "u2",
        "",
        "bit mask of LocFlag: 1 not fitted, 2 not converged, 4 z at the calibration's range "
        "end, 8 x/y at the window edge, 16 brighter than the calibration's range",
        default=None,
        absent=int(LocFlag.NOT_FITTED),
    )
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

    def __post_init__(self) -> None:
        # Left-out fit columns: NaN, and flags NOT_FITTED where any σ is unknown.
        n = len(self.x_um)
        for c in columns_of(Localizations):  # the fit's columns first, then the flags
            if c.name not in (*FIT_COLUMNS, "flags"):
                continue
            given = getattr(self, c.name)
            if given is not None:  # kept, as the column's dtype (float32 σ: ~1e-7 relative)
                value = np.asarray(given, dtype=np.dtype(c.dtype))
            elif c.name == "flags":
                known = np.isfinite(self.sigma_xyz_um).all(axis=1)
                value = np.where(known, 0, c.absent).astype(np.dtype(c.dtype))
            else:
                value = np.full(n, c.absent, dtype=np.dtype(c.dtype))
            object.__setattr__(self, c.name, value)

    @property
    def sigma_xyz_um(self) -> np.ndarray:
        """(N, 3) σ per axis (NaN where unknown)."""
        s = [np.asarray(getattr(self, c), dtype=np.float64) for c in SIGMA_COLUMNS]
        return np.stack(s, axis=1).reshape(-1, 3)

    @property
    def xyz_um(self) -> np.ndarray:
        return np.stack([self.x_um, self.y_um, self.z_um], axis=1).reshape(-1, 3)

    def __len__(self) -> int:
        return len(self.x_um)

    @classmethod
    def empty(cls, frame: int, stage_z_um: float = math.nan) -> Localizations:
        z = np.zeros(0, dtype=np.float64)
        return cls(frame, z, z.copy(), z.copy(), z.copy(), stage_z_um=stage_z_um)

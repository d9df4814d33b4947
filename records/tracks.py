"""Tracks: the Kalman tracks alive after each frame, one row per track per frame."""

# ruff: noqa: RUF009  (`column` returns a `dataclasses.field`, which ruff cannot see)
from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import ClassVar

import numpy as np

from focaltrack.records.columns import column, to_columns

__all__ = ["STATUS_CODES", "TrackStatus", "Tracks"]


class TrackStatus(str, Enum):
    """A track's lifecycle state. Stored as its `code` (the HDF5 enum), sent and written in
    CSV as its value."""

    TENTATIVE = "tentative"
    CONFIRMED = "confirmed"

    @property
    def code(self) -> int:
        return _CODES[self]

    @classmethod
    def of_code(cls, code: int) -> TrackStatus:
        return _BY_CODE[int(code)]

    @classmethod
    def of_confirmed(cls, confirmed: np.ndarray) -> np.ndarray:
        """Status codes of a boolean "is confirmed" mask."""
        return np.where(np.asarray(confirmed, dtype=bool), _CODES[cls.CONFIRMED], 0).astype(
            np.uint8
        )


_CODES = {TrackStatus.TENTATIVE: 0, TrackStatus.CONFIRMED: 1}
_BY_CODE = {c: s for s, c in _CODES.items()}
#: Value → code: the HDF5 enum of the ``status`` datasets (recordings and track files).
STATUS_CODES: dict[str, int] = {s.value: c for s, c in _CODES.items()}


@dataclass(frozen=True, slots=True, eq=False)  # arrays: compare fields explicitly
class Tracks:
    """Tracks as columns, one row per live track after a frame (for one frame, or for a
    whole recording: ``frame`` and ``t_s`` say which).

    On the wire the frame and its time are the header's ``frame`` and ``t_acq_s``; the
    recorder has the time in ``frame_meta``. Velocities are 0 under the random-walk model.
    """

    #: `focaltrack track` CSV files have had this column order since their first version
    #: (status before the σ columns, hits before misses); a column added later follows.
    CSV_ORDER: ClassVar[tuple[str, ...]] = (
        "frame", "t_s", "track_id", "x_um", "y_um", "z_um", "vx_um_s", "vy_um_s", "vz_um_s",
        "status", "sigma_x_um", "sigma_y_um", "sigma_z_um", "age_frames", "hits", "misses",
        "localization_row",
    )  # fmt: skip

    frame: np.ndarray = column("i8", "", "camera frame index", wire=None)
    t_s: np.ndarray = column("f8", "s", "frame time", wire=None, hdf5=False, csv_format="repr")
    track_id: np.ndarray = column("i8", "", "track id, unique in a run, from 1")
    x_um: np.ndarray = column("f8", "µm", "filtered position x")
    y_um: np.ndarray = column("f8", "µm", "filtered position y")
    z_um: np.ndarray = column("f8", "µm", "filtered position z (defocus)")
    vx_um_s: np.ndarray = column("f8", "µm/s", "filtered velocity x")
    vy_um_s: np.ndarray = column("f8", "µm/s", "filtered velocity y")
    vz_um_s: np.ndarray = column("f8", "µm/s", "filtered velocity z")
    sigma_x_um: np.ndarray = column("f8", "µm", "position standard deviation x")
    sigma_y_um: np.ndarray = column("f8", "µm", "position standard deviation y")
    sigma_z_um: np.ndarray = column("f8", "µm", "position standard deviation z")
    status: np.ndarray = column("u1", "", "tentative or confirmed", enum=TrackStatus)
    age_frames: np.ndarray = column("i8", "", "frames since birth, the birth frame counting 1")
    misses: np.ndarray = column("i8", "", "consecutive frames without a localization")
    hits: np.ndarray = column(
        "i8", "", "frames with an assigned localization", wire="optional", hdf5=False
    )
    localization_row: np.ndarray = column(
        "i8", "", "input row assigned this frame, -1 if none", wire=None, hdf5=False
    )

    def __len__(self) -> int:
        return len(self.track_id)

    @property
    def confirmed(self) -> np.ndarray:
        ok: np.ndarray = self.status == TrackStatus.CONFIRMED.code
        return ok

    def columns(self) -> dict[str, np.ndarray]:
        """Every field as a column, by name."""
        return to_columns(self)

    def select(self, mask: np.ndarray) -> Tracks:
        return Tracks(*(getattr(self, f.name)[mask] for f in fields(self)))

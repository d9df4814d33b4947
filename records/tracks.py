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
    """A track's lifecycle state after a frame. Stored as its `code` (the HDF5 enum), sent and
    written in CSV as its value.

    A confirmed track that found no localization in this frame is ``coasting``: its position
    is the filter's prediction, not a measurement. What a controller steers on is
    ``confirmed`` only; ``coasting`` says the track is still alive (and may resume as
    ``confirmed``) until its ``max_misses``-th consecutive miss or until its prediction
    leaves the field of view.
    """

    TENTATIVE = "tentative"
    CONFIRMED = "confirmed"
    COASTING = "coasting"

    @property
    def code(self) -> int:
        return _CODES[self]

    @classmethod
    def of_code(cls, code: int) -> TrackStatus:
        return _BY_CODE[int(code)]

    @classmethod
    def of_confirmed(cls, confirmed: np.ndarray, misses: np.ndarray | None = None) -> np.ndarray:
        """Status codes of a boolean "is confirmed" mask; with ``misses`` (consecutive
        misses now), a confirmed track with a miss is coasting."""
        conf = np.asarray(confirmed, dtype=bool)
        codes = np.where(conf, _CODES[cls.CONFIRMED], _CODES[cls.TENTATIVE])
        if misses is not None:
            coasting = conf & (np.asarray(misses).reshape(conf.shape) > 0)
            codes = np.where(coasting, _CODES[cls.COASTING], codes)
        return codes.astype(np.uint8)

    @classmethod
    def is_confirmed(cls, codes: np.ndarray) -> np.ndarray:
        """Which rows are confirmed tracks, coasting or not (status codes in)."""
        c = np.asarray(codes)
        ok: np.ndarray = (c == _CODES[cls.CONFIRMED]) | (c == _CODES[cls.COASTING])
        return ok


# Codes are stored in files: never renumber, only add.
_CODES = {TrackStatus.TENTATIVE: 0, TrackStatus.CONFIRMED: 1, TrackStatus.COASTING: 2}
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
    status: np.ndarray = column(
        "u1",
        "",
        "tentative, confirmed (updated this frame) or coasting (confirmed, missed this frame: "
        "predicted)",
        enum=TrackStatus,
    )
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
        """Rows of confirmed tracks, coasting ones included (steer on ``status`` confirmed)."""
        return TrackStatus.is_confirmed(self.status)

    @property
    def coasting(self) -> np.ndarray:
        """Rows of confirmed tracks that missed this frame (their position is predicted)."""
        ok: np.ndarray = self.status == TrackStatus.COASTING.code
        return ok

    def columns(self) -> dict[str, np.ndarray]:
        """Every field as a column, by name."""
        return to_columns(self)

    def select(self, mask: np.ndarray) -> Tracks:
        return Tracks(*(getattr(self, f.name)[mask] for f in fields(self)))

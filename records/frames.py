"""Frame metadata: what the recorder keeps about every recorded camera frame."""

# ruff: noqa: RUF009  (`column` returns a `dataclasses.field`, which ruff cannot see)
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from focaltrack.records.columns import column

__all__ = ["FrameMeta"]


@dataclass(frozen=True, slots=True, eq=False)  # arrays: compare fields explicitly
class FrameMeta:
    """Metadata of recorded frames, one row per frame (a recording's ``frame_meta`` group).

    The names are those of `focaltrack.drivers.base.Frame`, whose attributes the recorder
    reads by these names. On the wire the frame index is the header's ``frame``.
    """

    index: np.ndarray = column("i8", "", "camera frame index", wire=None, csv=False)
    t_acq_s: np.ndarray = column("f8", "s", "acquisition time, UNIX epoch", wire=None, csv=False)
    stage_z_um: np.ndarray = column(
        "f8", "µm", "focus drive position at acquisition", wire=None, csv=False
    )
    exposure_ms: np.ndarray = column("f8", "ms", "exposure time", wire=None, csv=False)

    def __len__(self) -> int:
        return len(self.index)

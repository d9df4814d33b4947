"""Measured calibration data: the file format, import, bead finding, the noise model.

`format` (the `Calibration` file and its `NoiseModel`), `importing` (TIFF/HDF5 z-stacks
recorded elsewhere), `beads` (finding the bead), `noise` (the camera noise model),
`drift` (following the bead through the slices), `process` (`process_stack`: raw stack to
calibration), `preprocess` (the noise model applied to frames: network input), `figure`
(the PNG a microscopist checks). The names most callers need are re-exported here.
"""

from __future__ import annotations

from focaltrack.calibration.format import (
    SCHEMA_VERSION,
    Calibration,
    CalibrationError,
    NoiseModel,
    summary,
)
from focaltrack.calibration.importing import load_stack_file
from focaltrack.calibration.process import process_stack

__all__ = [
    "SCHEMA_VERSION",
    "Calibration",
    "CalibrationError",
    "NoiseModel",
    "load_stack_file",
    "process_stack",
    "summary",
]

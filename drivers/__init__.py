"""The only code that touches a microscope: one driver over an MMCore-like core."""

from __future__ import annotations

from focaltrack.drivers.base import (
    CameraInfo,
    CameraTimeoutError,
    Driver,
    DriverError,
    Frame,
    StageTimeoutError,
    StreamEnded,
)
from focaltrack.drivers.factory import open_driver
from focaltrack.drivers.micromanager import MicroManagerDriver
from focaltrack.drivers.simcore import SimulatedCore

__all__ = [
    "CameraInfo",
    "CameraTimeoutError",
    "Driver",
    "DriverError",
    "Frame",
    "MicroManagerDriver",
    "SimulatedCore",
    "StageTimeoutError",
    "StreamEnded",
    "open_driver",
]

"""The only code that touches a microscope: the `Driver` Protocol and its implementations."""

from __future__ import annotations

from focaltrack.drivers.base import (
    CameraInfo,
    CameraTimeoutError,
    Driver,
    DriverError,
    Frame,
    SimulatorHooks,
    StageTimeoutError,
    StreamEnded,
)
from focaltrack.drivers.factory import open_driver, open_simulator
from focaltrack.drivers.micromanager import MicroManagerDriver
from focaltrack.drivers.replay import ReplayCamera
from focaltrack.drivers.simcore import SimulatedCore
from focaltrack.drivers.simulated import SimulatedMicroscope

__all__ = [
    "CameraInfo",
    "CameraTimeoutError",
    "Driver",
    "DriverError",
    "Frame",
    "MicroManagerDriver",
    "ReplayCamera",
    "SimulatedCore",
    "SimulatedMicroscope",
    "SimulatorHooks",
    "StageTimeoutError",
    "StreamEnded",
    "open_driver",
    "open_simulator",
]

"""The driver boundary: one small Protocol, and a second one for the simulator's extras.

`Driver` is the only way in: `MicroManagerDriver` (focaltrack.drivers.micromanager) works on
any MMCore-like core, pycromanager's ``Core`` (real hardware) or ``SimulatedCore``
(focaltrack.drivers.simcore); `ReplayCamera` (focaltrack.drivers.replay) streams frames
rendered beforehand. Callers hold a `Driver` and never reach into a core or its lock.

`SimulatorHooks` is what only the simulated microscope can do (its ground truth, its sample):
a caller that wants it checks ``isinstance(driver, SimulatorHooks)``, and a real microscope
simply is not one. `focaltrack.drivers.factory.open_simulator` builds the simulated
microscope from plain parameters.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from focaltrack.common.errors import FocaltrackError

if TYPE_CHECKING:
    import numpy as np

    from focaltrack.drivers.simcore import SimFrameTruth
    from focaltrack.sim.scene import Scene


class DriverError(FocaltrackError, RuntimeError):
    """A hardware fault the caller can report: a stage timeout, a camera that stopped."""


class StageTimeoutError(DriverError):
    """The focus stage did not reach the requested position within its timeout."""


class CameraTimeoutError(DriverError):
    """The camera delivered no frame within the timeout."""


class StreamEnded(DriverError):
    """The stream is over: a finite sequence delivered all its frames, or it was stopped."""


@dataclass(frozen=True, slots=True)
class CameraInfo:
    """What the analysis needs to know about the camera, in physical units."""

    width: int
    height: int
    bit_depth: int
    pixel_size_um: float  # in the sample plane (camera pixel / magnification)
    exposure_ms: float
    name: str = "camera"
    focus_device: str = "Z"


@dataclass(frozen=True, slots=True)
class Frame:
    """One camera image with the facts needed to place it in time and space.

    ``index`` is the camera's own image number: gaps in it are dropped frames.
    ``t_acq_s`` is the acquisition time, UNIX epoch seconds.
    """

    pixels: np.ndarray  # 2-D, uint16 (or uint8), rows = y, columns = x
    index: int
    t_acq_s: float
    stage_z_um: float
    exposure_ms: float


@runtime_checkable
class Driver(Protocol):
    """A microscope as the rest of focaltrack sees it."""

    def describe(self) -> CameraInfo: ...

    def move_z(self, z_um: float, *, timeout_s: float = 5.0, settle_s: float = 0.0) -> None:
        """Move the focus drive to ``z_um`` and wait until it is there (or raise)."""
        ...

    def get_z(self) -> float: ...

    def set_exposure_ms(self, exposure_ms: float) -> None:
        """Set the camera exposure (a `DriverError` where the camera refuses it)."""
        ...

    def snap(self, *, timeout_s: float = 5.0) -> Frame: ...

    def start_stream(self, interval_ms: float = 0.0, *, n_frames: int | None = None) -> None:
        """Start streaming; ``n_frames`` makes it a finite sequence that ends in `StreamEnded`."""
        ...

    def next_frame(self, *, timeout_s: float = 1.0) -> Frame:
        """The next streamed frame, or `CameraTimeoutError` after ``timeout_s``."""
        ...

    def frames(self, *, timeout_s: float = 1.0) -> Iterator[Frame]: ...

    def stop_stream(self) -> None: ...

    @property
    def dropped_frames(self) -> int:
        """Frames lost so far in streaming (gaps in the camera's image numbers)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class SimulatorHooks(Protocol):
    """What only the simulated microscope offers; check with ``isinstance(driver, ...)``."""

    def frame_truths(self) -> list[SimFrameTruth]:
        """Ground truth of the recent frames (emitters, focus, drift), oldest first."""
        ...

    def swap_scene(self, scene: Scene | None) -> Scene | None:
        """Put ``scene`` (None: background only) in front of the camera; returns the old one."""
        ...

    def still_bead(self, photons: float) -> AbstractContextManager[None]:
        """For a ``with`` block: one still bead in focus near the field centre instead of the
        sample (what a calibration looks at), the sample back afterwards."""
        ...

    def stick_stage(self, stuck: bool) -> None:
        """Fault injection: while stuck, the stage accepts moves but stays put and busy."""
        ...

    def stall_camera(self, stalled: bool) -> None:
        """Fault injection: while stalled, the camera delivers no frames."""
        ...

"""`SimulatedMicroscope`: the real `MicroManagerDriver` over a `SimulatedCore`, plus the hooks
only a simulator has (`focaltrack.drivers.base.SimulatorHooks`).

Built by `focaltrack.drivers.factory.open_simulator`. Everything a real microscope does goes
through the same `MicroManagerDriver` code; the hooks give the simulated sample's ground
truth and let a calibration look at one still bead.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from focaltrack.drivers.micromanager import MicroManagerDriver
from focaltrack.drivers.simcore import SimFrameTruth, SimulatedCore

if TYPE_CHECKING:
    from focaltrack.sim.scene import Scene

__all__ = ["BEAD_OFFSET_PX", "SimulatedMicroscope"]

#: Where a still bead sits relative to the frame centre, px (x, y): off the pixel grid on
#: purpose, so a calibration has to find sub-pixel centres.
BEAD_OFFSET_PX = (0.3, -0.2)


class SimulatedMicroscope(MicroManagerDriver):
    """A `Driver` and `SimulatorHooks` over a `SimulatedCore` (closed with the driver)."""

    def __init__(self, core: SimulatedCore, **driver_options: Any) -> None:
        super().__init__(core, on_close=core.close, **driver_options)
        self._sim = core

    def frame_truths(self) -> list[SimFrameTruth]:
        return list(self._sim.truth)

    def swap_scene(self, scene: Scene | None) -> Scene | None:
        # Under the driver's lock: no core call of the frame loop sees half a swap.
        with self._locked():
            old = self._sim.scene
            self._sim.scene = scene
        return old

    # The fault flags are plain attributes the core polls (a stalled frame loop waits on
    # one), so they are set without the driver's lock.
    def stick_stage(self, stuck: bool) -> None:
        self._sim.stage_stuck = bool(stuck)

    def stall_camera(self, stalled: bool) -> None:
        self._sim.camera_stalled = bool(stalled)

    @contextmanager
    def still_bead(self, photons: float) -> Iterator[None]:
        from focaltrack.sim.scene import Scene

        core = self._sim
        px = core.optics.pixel_size_um
        x = (core.width / 2 + BEAD_OFFSET_PX[0]) * px
        y = (core.height / 2 + BEAD_OFFSET_PX[1]) * px
        saved = self.swap_scene(Scene.static([[x, y, float(self.get_z())]], float(photons)))
        try:
            yield
        finally:
            self.swap_scene(saved)

"""The service's microscope: `open_service_driver` builds the configured `Driver` (the
simulated microscope from ``[sim]`` through `focaltrack.drivers.factory.open_simulator`, or
Micro-Manager from ``[driver]``), and `sim_bead` puts one still bead in front of a simulated
camera for a calibration (a real microscope already looks at its bead).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

from focaltrack.drivers.base import Driver, DriverError, SimulatorHooks
from focaltrack.sim.optics import SIM_BEAD_PHOTONS

if TYPE_CHECKING:
    from focaltrack.daemon.config import ServiceConfig

__all__ = ["open_service_driver", "sim_bead"]


def open_service_driver(cfg: ServiceConfig) -> Driver:
    """The driver ``cfg.driver`` names; the simulator is built from ``cfg.sim``."""
    from focaltrack.drivers.factory import open_driver, open_simulator

    d = cfg.driver
    px = d.pixel_size_um if d.pixel_size_um > 0 else None
    if d.kind == "sim":
        s = cfg.sim
        lo, hi = s.z_range_um[0], s.z_range_um[1]
        return open_simulator(
            width=s.width,
            height=s.height,
            n_emitters=s.n_emitters,
            motion=s.motion,
            diffusion_um2_s=s.diffusion_um2_s,
            velocity_um_s=list(s.velocity_um_s),
            z_range_um=(float(lo), float(hi)),
            seed=s.seed,
            exposure_ms=d.exposure_ms,
            pixel_size_um=px,
        )
    if d.attach:
        return open_driver("micromanager", attach=True, port=d.port, pixel_size_um=px)
    if not d.mm_app_path or not d.mm_config:
        raise DriverError(
            "driver.kind = 'micromanager' needs driver.mm_app_path and driver.mm_config "
            "(or driver.attach = true to use a running Micro-Manager)"
        )
    return open_driver(
        "micromanager", mm_app_path=d.mm_app_path, mm_config=d.mm_config, pixel_size_um=px
    )


def sim_bead(driver: Driver) -> AbstractContextManager[None]:
    """For a ``with`` block around a calibration: on the simulated microscope, one still bead
    in focus near the field centre instead of the moving sample; elsewhere nothing."""
    if isinstance(driver, SimulatorHooks):
        return driver.still_bead(SIM_BEAD_PHOTONS)
    return nullcontext()

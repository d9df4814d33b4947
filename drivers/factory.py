"""`open_driver`: one call that gives a `MicroManagerDriver` over a simulated or a real core.

* ``open_simulator(...)``: the simulated microscope (`SimulatedMicroscope`) from plain
  parameters: the frame, the moving sample or one still bead, the stage. The one place it
  is assembled; ``open_driver("sim", ...)`` is the same call.
* ``open_driver("micromanager", mm_app_path=..., mm_config=...)``: MMCore in this process
  through pycromanager's Python backend (``start_headless(..., python_backend=True)``), then
  ``Core()``. ``buffer_size_mb`` sets the circular buffer (pycromanager's default is 1 GB).
* ``open_driver("micromanager", attach=True)``: ``Core()`` against a running Micro-Manager
  whose ZMQ server is enabled (port 4827 by default), bounded by ``attach_timeout_s``.

pycromanager is imported only on the Micro-Manager paths, so the simulator needs none of it.
Micro-Manager's errors are reported in one line (`DriverError`); its full, often multi-line
text goes to the log.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from focaltrack.drivers.base import DriverError
from focaltrack.drivers.micromanager import MicroManagerDriver
from focaltrack.drivers.simcore import SimulatedCore
from focaltrack.drivers.simulated import BEAD_OFFSET_PX, SimulatedMicroscope

if TYPE_CHECKING:
    from focaltrack.sim.optics import Optics
    from focaltrack.sim.psf import PSFModel
    from focaltrack.sim.scene import Motion, Scene

__all__ = ["DEFAULT_BUFFER_SIZE_MB", "DEFAULT_MM_PORT", "open_driver", "open_simulator"]

log = logging.getLogger("focaltrack.drivers")

DEFAULT_BUFFER_SIZE_MB = 256
DEFAULT_MM_PORT = 4827

# start_headless keeps its cores in a process-wide list and Core() returns the first one:
# one headless core per process.
_headless_lock = threading.Lock()
_headless_started = False


def open_driver(
    kind: Literal["sim", "micromanager"],
    *,
    mm_app_path: str | os.PathLike[str] | None = None,
    mm_config: str | os.PathLike[str] | None = None,
    attach: bool = False,
    port: int = DEFAULT_MM_PORT,
    attach_timeout_s: float = 5.0,
    buffer_size_mb: int = DEFAULT_BUFFER_SIZE_MB,
    pixel_size_um: float | None = None,
    z_tolerance_um: float = 0.05,
    **sim_options: Any,
) -> MicroManagerDriver:
    """Open a driver; see the module docstring. ``sim_options`` go to `open_simulator`."""
    if kind == "sim":
        if mm_app_path is not None or mm_config is not None or attach:
            raise ValueError("mm_app_path, mm_config and attach are for kind='micromanager'")
        return open_simulator(
            pixel_size_um=pixel_size_um, z_tolerance_um=z_tolerance_um, **sim_options
        )
    if kind != "micromanager":
        raise ValueError(f"kind must be 'sim' or 'micromanager', got {kind!r}")
    if sim_options:
        raise ValueError(f"options {sorted(sim_options)} are for the simulator (kind='sim') only")
    if attach:
        if mm_app_path is not None or mm_config is not None:
            raise ValueError(
                "attach=True uses the running Micro-Manager's own configuration; "
                "do not pass mm_app_path or mm_config"
            )
        core = _attach(port, attach_timeout_s)
        return MicroManagerDriver(core, pixel_size_um=pixel_size_um, z_tolerance_um=z_tolerance_um)

    if mm_app_path is None or mm_config is None:
        raise ValueError(
            "kind='micromanager' needs mm_app_path (the Micro-Manager installation folder) "
            "and mm_config (a .cfg hardware configuration), or attach=True"
        )
    if int(buffer_size_mb) < 1:
        raise ValueError(f"buffer_size_mb must be >= 1, got {buffer_size_mb!r}")
    app = Path(mm_app_path).expanduser().resolve()
    cfg = Path(mm_config).expanduser()
    if not cfg.is_absolute():  # relative to the working directory, not to the MM folder
        cfg = cfg.resolve()
    if not app.is_dir():
        raise DriverError(f"Micro-Manager folder {app} does not exist")
    if not cfg.is_file():
        raise DriverError(f"Micro-Manager configuration {cfg} does not exist")
    core = _start_headless(app, cfg, int(buffer_size_mb))

    def stop() -> None:
        global _headless_started
        from pycromanager import stop_headless

        with _headless_lock:
            stop_headless()
            _headless_started = False

    try:
        return MicroManagerDriver(
            core, pixel_size_um=pixel_size_um, z_tolerance_um=z_tolerance_um, on_close=stop
        )
    except BaseException:
        stop()
        raise


def open_simulator(
    *,
    width: int = 512,
    height: int = 512,
    exposure_ms: float = 10.0,
    pixel_size_um: float | None = None,
    n_emitters: int = 0,
    motion: Motion | str = "brownian",
    diffusion_um2_s: float = 1.0,
    velocity_um_s: float | Sequence[float] = 75.0,
    z_range_um: tuple[float, float] = (0.0, 100.0),
    bead_photons: float | None = None,
    bead_xy_px: tuple[float, float] | None = None,
    bead_z_um: float = 0.0,
    seed: int = 0,
    stage_speed_um_s: float = 2000.0,
    drift_um_per_um: tuple[float, float] = (0.0, 0.0),
    optics: Optics | None = None,
    psf_model: PSFModel | None = None,
    scene: Scene | None = None,
    z_tolerance_um: float = 0.05,
    **core_options: Any,
) -> SimulatedMicroscope:
    """The simulated microscope: a ``width`` × ``height`` px camera over the sample below.

    The sample is, in this order of precedence: ``scene`` as given; one still bead of
    ``bead_photons`` at ``bead_xy_px`` (default: the frame centre + `BEAD_OFFSET_PX`) and
    depth ``bead_z_um`` (a calibration's); ``n_emitters`` moving emitters
    (`focaltrack.sim.scene.Scene`: ``motion``, ``diffusion_um2_s``, ``velocity_um_s``) over
    the whole frame and ``z_range_um``; none (background only) when ``n_emitters`` is 0.
    Optics default to ``psf_model``'s, else the simulator's (with its aberrations); the PSF
    library is loaded (or built once per machine) here, before any snap waits on it.
    ``pixel_size_um`` is what the driver reports (None: the optics' sample pixel); other
    ``core_options`` go to `SimulatedCore` (fault injection, buffer size, …).
    """
    from focaltrack.sim.optics import SIM_ABERRATIONS, Optics
    from focaltrack.sim.scene import Scene

    if optics is None:
        optics = psf_model.optics if psf_model is not None else Optics(aberrations=SIM_ABERRATIONS)
    px = optics.pixel_size_um
    if scene is None and bead_photons is not None:
        bx, by = bead_xy_px or (width / 2 + BEAD_OFFSET_PX[0], height / 2 + BEAD_OFFSET_PX[1])
        scene = Scene.static([[bx * px, by * px, float(bead_z_um)]], float(bead_photons))
    elif scene is None and n_emitters > 0:
        scene = Scene(
            field_um=(width * px, height * px),
            z_range_um=(float(z_range_um[0]), float(z_range_um[1])),
            n_emitters=n_emitters,
            motion=motion,
            diffusion_um2_s=diffusion_um2_s,
            velocity_um_s=velocity_um_s,
            seed=seed,
        )
    core = SimulatedCore(
        scene,
        optics=optics,
        psf_model=psf_model,
        width=width,
        height=height,
        exposure_ms=exposure_ms,
        stage_speed_um_s=stage_speed_um_s,
        drift_um_per_um=drift_um_per_um,
        seed=seed,
        **core_options,
    )
    try:
        return SimulatedMicroscope(core, pixel_size_um=pixel_size_um, z_tolerance_um=z_tolerance_um)
    except BaseException:
        core.close()
        raise


def _start_headless(app: Path, cfg: Path, buffer_size_mb: int) -> Any:
    global _headless_started
    from pycromanager import Core, start_headless

    with _headless_lock:
        if _headless_started:
            raise DriverError(
                "a headless Micro-Manager core is already running in this process; "
                "close its driver first"
            )
        try:
            start_headless(str(app), str(cfg), python_backend=True, buffer_size_mb=buffer_size_mb)
        except Exception as exc:
            raise mm_start_error(app, cfg, exc) from exc
        _headless_started = True
        return Core()


# MMCore's words for an adapter built against another device (or module) interface:
# "Incompatible device interface version (required = 75; found = 71)", and in later
# releases "(MMCore requires 75; device adapter has 71)".
_INTERFACE_MISMATCH = re.compile(
    r"Incompatible (?:device|module) interface version\s*"
    r"\((?:required = |MMCore requires )(\d+); (?:found = |device adapter has )(\d+)\)"
)


def mm_start_error(app: Path, cfg: Path, exc: BaseException) -> DriverError:
    """One line for a failed MMCore start: the configuration line MMCore names and its
    innermost reason, and a hint when the adapters were built for another device interface.
    MMCore's whole message goes to the log."""
    text = str(exc).strip() or type(exc).__name__
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    summary = lines[0]
    # MMCore nests its causes: 'Failed to load device adapter "X" [ ... [ the reason ] ]'.
    inner = re.findall(r"\[\s*([^\[\]]+?)\s*\]", text)
    if inner and inner[-1] not in summary:
        summary = f"{summary}: {inner[-1]}"
    elif len(lines) > 1:
        summary = f"{summary}: {lines[-1]}"
    message = f"could not start Micro-Manager headless from {app} with {cfg}: {summary}"
    mismatch = _INTERFACE_MISMATCH.search(text)
    if mismatch:
        needed, found = mismatch.groups()
        message += (
            f"; the device adapters were built for interface {found} and this "
            f"{_pymmcore_version()} needs {needed}: install a Micro-Manager build for "
            f"interface {needed}, or the pymmcore release whose fourth version number is {found}"
        )
    if len(lines) > 1 or inner:
        log.info("Micro-Manager's message in full:\n%s", text)
        message += " (Micro-Manager's full message is in the log)"
    return DriverError(message)


def _pymmcore_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"pymmcore {version('pymmcore')}"
    except PackageNotFoundError:
        return "pymmcore"


def _attach(port: int, timeout_s: float) -> Any:
    """``Core()`` over the Java bridge, failing within about ``timeout_s`` if nobody answers."""
    from mmpycorex import core as _mmcore_mod

    message = (
        f"no Micro-Manager answered on port {port} within {timeout_s} s: "
        f"is Micro-Manager running with its ZMQ server enabled on port {port}? "
        "(Tools > Options > Run server on port 4827)"
    )
    result: dict[str, Any] = {}

    def connect() -> None:
        try:
            # The bridge's own socket timeout (ms) bounds the connect handshake.
            result["core"] = _mmcore_mod.ZMQRemoteMMCoreJ(
                port=port, timeout=max(int(timeout_s * 1000), 1)
            )
        except BaseException as exc:
            result["error"] = exc

    _quiet_bridge_threads()
    t = threading.Thread(target=connect, name="focaltrack-mm-attach", daemon=True)
    t.start()
    t.join(timeout_s + 2.0)
    if t.is_alive() or "core" not in result:
        err = result.get("error")
        raise DriverError(message + (f" ({err})" if err else "")) from err
    return result["core"]


#: pyjavaz names its socket thread so; when the connect fails, the thread raises after the
#: waiting caller has the error (and then fails to join itself), and Python prints both
#: tracebacks on stderr before focaltrack's own one-line message.
_BRIDGE_THREAD = "BridgeSocketThread_port"


class _QuietBridgeThreads:
    """A `threading.excepthook` that logs pyjavaz's bridge-thread errors at debug level and
    hands every other thread's to the hook it replaced."""

    def __init__(self, previous: Any) -> None:
        self.previous = previous

    def __call__(self, args: threading.ExceptHookArgs) -> None:
        thread = args.thread
        if thread is not None and thread.name.startswith(_BRIDGE_THREAD):
            log.debug(
                "pyjavaz's %s ended with %s: %s",
                thread.name,
                args.exc_type.__name__,
                args.exc_value,
                exc_info=args.exc_value,
            )
            return
        self.previous(args)


def _quiet_bridge_threads() -> None:
    # Installed when first needed and kept: the bridge thread may fail after _attach returns.
    if not isinstance(threading.excepthook, _QuietBridgeThreads):
        threading.excepthook = _QuietBridgeThreads(threading.excepthook)

"""`open_driver`: one call that gives a `MicroManagerDriver` over a simulated or a real core.

* ``open_driver("sim", ...)``: a `SimulatedCore` built from the keyword options.
* ``open_driver("micromanager", mm_app_path=..., mm_config=...)``: MMCore in this process
  through pycromanager's Python backend (``start_headless(..., python_backend=True)``), then
  ``Core()``. ``buffer_size_mb`` sets the circular buffer (pycromanager's default is 1 GB).
* ``open_driver("micromanager", attach=True)``: ``Core()`` against a running Micro-Manager
  whose ZMQ server is enabled (port 4827 by default), bounded by ``attach_timeout_s``.

pycromanager is imported only on the Micro-Manager paths, so the simulator needs none of it.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Literal

from focaltrack.drivers.base import DriverError
from focaltrack.drivers.micromanager import MicroManagerDriver

__all__ = ["DEFAULT_BUFFER_SIZE_MB", "DEFAULT_MM_PORT", "open_driver"]

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
    """Open a driver; see the module docstring. ``sim_options`` go to `SimulatedCore`."""
    if kind == "sim":
        if mm_app_path is not None or mm_config is not None or attach:
            raise ValueError("mm_app_path, mm_config and attach are for kind='micromanager'")
        from focaltrack.drivers.simcore import SimulatedCore

        core = SimulatedCore(**sim_options)
        return MicroManagerDriver(
            core, pixel_size_um=pixel_size_um, z_tolerance_um=z_tolerance_um, on_close=core.close
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
            raise DriverError(
                f"could not start Micro-Manager headless from {app} with {cfg}: {exc}. "
                "The installation's device adapters must match pymmcore's device interface "
                "version (pymmcore 12.5.1.75.0: interface 75, a recent nightly build)."
            ) from exc
        _headless_started = True
        return Core()


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

    t = threading.Thread(target=connect, name="focaltrack-mm-attach", daemon=True)
    t.start()
    t.join(timeout_s + 2.0)
    if t.is_alive() or "core" not in result:
        err = result.get("error")
        raise DriverError(message + (f" ({err})" if err else "")) from err
    return result["core"]

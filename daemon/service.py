"""The service: a small `Service` that composes its parts and runs their life cycle.

    svc = Service(load_config(None, overrides={"network.control_port": 0, ...}))
    svc.start()                      # opens the driver, restores state, binds; returns
    svc.endpoints                    # {"control": "tcp://127.0.0.1:41234", "pub": ..., ...}
    ...
    svc.stop(); svc.join()

The parts, each in its own module, each given only what it needs:

* `focaltrack.daemon.transport` — the ZeroMQ context, CURVE keys and authenticator, binding;
* `focaltrack.daemon.control` — the wire: the ROUTER socket and the ``focaltrack-control``
  thread that dispatches requests through the handler table that `Service` builds
  (``cmd`` -> handler), mapping errors to reply codes;
* `focaltrack.daemon.publisher` — the PUB socket behind one lock, sequence numbers, events,
  heartbeats;
* `focaltrack.daemon.state` — the state machine, the current calibration and model, the
  last error (shared by the parts below);
* `focaltrack.daemon.live` — the live session: the driver and analysis threads
  (`focaltrack.daemon.pipeline`), publishing each analysed frame, the focus, the model in
  use, and the recording (`focaltrack.daemon.recording`);
* `focaltrack.daemon.analysis` — a model bundle loaded as the live analysis' model;
* `focaltrack.daemon.job_runner` — the calibration thread and the training process;
* `focaltrack.daemon.notify` — systemd's READY / STOPPING / WATCHDOG;
* `focaltrack.daemon.metrics` — the Prometheus registry and its HTTP server.

Threads (all daemon threads; `stop` ends them, bounded): the control thread (which also
sends the ``hb`` heartbeat about once a second and feeds the systemd watchdog while idle)
and its small worker pool; the live pipeline's driver and analysis threads; a calibration
thread while calibrating; a monitor thread per training process; the recorder's writer
thread while recording; the metrics HTTP server.

The files the service writes live in the workspace (`focaltrack.daemon.workspace`). One
service per workspace: `start` takes ``<workspace>/run/service.lock``
(`focaltrack.daemon.lock`) before it opens the microscope or loads a model, and a second
service on the same workspace stops there with `WorkspaceInUse`.
``<workspace>/run/endpoints.json`` holds the bound endpoints and the pid while it runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from focaltrack.common.files import write_json_atomic
from focaltrack.daemon import __version__
from focaltrack.daemon.config import ServiceConfig, check_exposure, workspace_dir
from focaltrack.daemon.control import ControlServer, Handler
from focaltrack.daemon.job_runner import JobRunner
from focaltrack.daemon.live import LiveSession
from focaltrack.daemon.lock import ENDPOINTS_FILE, WorkspaceLock
from focaltrack.daemon.metrics import MetricsServer, ServiceMetrics
from focaltrack.daemon.notify import Notifier, sd_notify
from focaltrack.daemon.protocol import ProtocolError, State
from focaltrack.daemon.publisher import Publisher
from focaltrack.daemon.recording import RecordingSession
from focaltrack.daemon.state import ServiceState, utc_iso
from focaltrack.daemon.transport import ServiceError, Transport
from focaltrack.daemon.workspace import Workspace
from focaltrack.drivers.base import DriverError
from focaltrack.drivers.micromanager import NoPixelSizeError

if TYPE_CHECKING:
    from focaltrack.drivers.base import CameraInfo, Driver

log = logging.getLogger("focaltrack.service")

__all__ = ["Service", "ServiceError", "sd_notify"]

#: Commands answered on the control thread itself (cheap, never touch the driver).
_INLINE = frozenset({"status", "job", "cancel"})
#: How a service is given the pixel size Micro-Manager lacks.
PIXEL_SIZE_REMEDY = (
    "set [driver] pixel_size_um (camera pixel / magnification, in µm) in the configuration, "
    "or start focaltrack serve with --pixel-size UM"
)


class Service:
    """The focaltrack service (see the module docstring).

    ``driver``: an already opened driver to use instead of the one ``config.driver`` names
    (tests, benchmarks); the service closes it on `stop`. ``train_overrides``: preset
    fields to override in every training run (tests use a tiny one).
    """

    def __init__(
        self,
        config: ServiceConfig,
        *,
        driver: Driver | None = None,
        train_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        self._driver = driver
        self._train_overrides = dict(train_overrides) if train_overrides else None
        self.metrics = ServiceMetrics(states=[s.value for s in State])
        self._publisher = Publisher(self.metrics)
        self._shared = ServiceState(self._publisher, self.metrics)
        self._notifier = Notifier()
        # The parts that need the workspace and the open driver are made by `start`.
        self._live: LiveSession | None = None
        self._jobs: JobRunner | None = None
        self._control: ControlServer | None = None
        self._transport: Transport | None = None
        self._metrics_server: MetricsServer | None = None
        self._stopped = threading.Event()
        self._started = False
        self._stop_lock = threading.Lock()
        self._t_start = time.monotonic()
        self._endpoints: dict[str, str] = {}
        self._camera: CameraInfo | None = None
        self._lock: WorkspaceLock | None = None
        self.ws: Workspace | None = None
        self.exit_code = 0

    # ================================================================ lifecycle

    @property
    def endpoints(self) -> dict[str, str]:
        """control, pub (ZeroMQ endpoints) and metrics (HTTP URL), with the bound ports."""
        return dict(self._endpoints)

    @property
    def state(self) -> State:
        return self._shared.state

    def start(self) -> None:
        """Check the settings (the CURVE keys read), lock the workspace, open the driver,
        bind the sockets and the metrics endpoint, restore the last calibration and model,
        start serving. Raises `ConfigError` (unsafe bind, bad settings, unusable keys),
        `WorkspaceInUse` (another service runs there), `DriverError`, `ServiceError`."""
        if self._started:
            raise ServiceError("the service was already started")
        self._started = True
        warning = check_exposure(self.config.network)  # ConfigError before anything is opened
        if warning:
            log.warning("%s", warning)
        try:
            # The whole configuration is checked before anything slow: the key files are read
            # here, not after a model has been restored.
            self._transport = Transport(self.config.network)
            self.ws = Workspace(workspace_dir(self.config).resolve())
            self._lock = WorkspaceLock.acquire(self.ws.root, started_utc=utc_iso())
            self._open_driver()
            control, live = self._compose(self.ws)
            # Bound before the model is restored, so a port in use is reported at once;
            # requests wait in the socket until the control thread starts below.
            self._bind(control)
            self._restore(self.ws, live)
        except BaseException:
            self._teardown()
            self._shared.closing.set()
            self._stopped.set()
            raise
        self._write_endpoints_file(self.ws)
        log.info(
            "focaltrack %s serving: control %s, pub %s, metrics %s; workspace %s; state %s, "
            "calibration %s, model %s",
            __version__,
            self._endpoints["control"],
            self._endpoints["pub"],
            self._endpoints["metrics"],
            self.ws.root,
            self._shared.state.value,
            self._shared.calibration or "none",
            self._shared.model_name or "none",
        )
        # Requests that arrive before the control thread runs wait in the socket.
        self._notifier.send("READY=1")
        control.start()

    def _open_driver(self) -> None:
        driver = self._driver
        if driver is None:
            from focaltrack.daemon.microscope import open_service_driver

            log.info("opening the %s driver", self.config.driver.kind)
            try:
                driver = self._driver = open_service_driver(self.config)
            except NoPixelSizeError as e:  # it names the Python API's way to give one
                raise e.with_remedy(PIXEL_SIZE_REMEDY) from None
        d = self.config.driver
        if d.exposure_ms > 0:
            try:
                driver.set_exposure_ms(float(d.exposure_ms))
            except DriverError as e:
                log.warning("could not set the exposure to %g ms: %s", d.exposure_ms, e)
        c = self._camera = driver.describe()
        log.info(
            "camera %s: %d×%d px, %d bit, %.4g µm/px, exposure %g ms",
            c.name,
            c.width,
            c.height,
            c.bit_depth,
            c.pixel_size_um,
            c.exposure_ms,
        )

    def _compose(self, ws: Workspace) -> tuple[ControlServer, LiveSession]:
        """Make the parts (the driver is open) and the control server's handler table."""
        cfg, shared, pub, metrics = self.config, self._shared, self._publisher, self.metrics
        camera, driver = self._camera, self._driver
        assert camera is not None and driver is not None, "open the driver first"
        recording = RecordingSession(
            ws, cfg.recording, state=shared, publisher=pub, metrics=metrics
        )
        live = self._live = LiveSession(
            driver,
            camera,
            driver_config=cfg.driver,
            analysis=cfg.analysis,
            ws=ws,
            state=shared,
            publisher=pub,
            metrics=metrics,
            recording=recording,
            watchdog=self._notifier.watchdog,
            tracker=cfg.tracker,
        )
        jobs = self._jobs = JobRunner(
            driver,
            camera,
            ws=ws,
            driver_config=cfg.driver,
            analysis=cfg.analysis,
            train=cfg.train,
            state=shared,
            publisher=pub,
            metrics=metrics,
            use_model=live.load_and_use,
            train_overrides=self._train_overrides,
        )
        handlers: dict[str, Handler] = {
            "status": self._cmd_status,
            "calibrate": jobs.calibrate,
            "calibrations": self._cmd_calibrations,
            "train": jobs.train,
            "models": self._cmd_models,
            "load_model": live.load_model_command,
            "start": live.start,
            "stop": live.stop_command,
            "record_start": live.record_start,
            "record_stop": recording.stop_command,
            "move_z": live.move_z,
            "get_z": live.get_z,
            "job": jobs.job,
            "cancel": jobs.cancel,
            "shutdown": self._cmd_shutdown,
        }
        control = self._control = ControlServer(
            handlers,
            inline=_INLINE,
            metrics=metrics,
            closing=shared.closing,
            tick=self._tick,
            on_crash=self._on_control_crash,
        )
        return control, live

    def _restore(self, ws: Workspace, live: LiveSession) -> None:
        st = ws.read_state()  # names whose files are gone are dropped (with a warning)
        if st.calibration:
            self._shared.calibration = st.calibration
            log.info("restored calibration %s", st.calibration)
        model = st.model
        if model:
            try:
                self._shared.model = live.load_model(model)
                log.info("restored model %s", model)
            except (ProtocolError, ValueError, OSError) as e:  # WorkspaceError is a ValueError
                log.warning("could not restore the last model %s: %s", model, e)

    def _bind(self, control: ControlServer) -> None:
        net = self.config.network
        transport = self._transport
        assert transport is not None, "made by start"
        control_ep = control.bind(transport, net.control_port)
        pub_ep = self._publisher.bind(transport, net.pub_port, net.pub_hwm)
        try:
            self._metrics_server = self.metrics.serve(net.bind.strip("[]"), net.metrics_port)
        except OSError as e:
            raise ServiceError(f"cannot serve metrics on {net.bind}:{net.metrics_port}: {e}") from e
        self._endpoints = {
            "control": control_ep.replace("0.0.0.0", "127.0.0.1"),
            "pub": pub_ep.replace("0.0.0.0", "127.0.0.1"),
            "metrics": self._metrics_server.url,
        }

    def _write_endpoints_file(self, ws: Workspace) -> None:
        run = ws.root / "run"
        run.mkdir(parents=True, exist_ok=True)
        data = {**self._endpoints, "pid": os.getpid(), "started_utc": utc_iso()}
        write_json_atomic(run / ENDPOINTS_FILE, data)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop acquisition, flush files, cancel jobs, close sockets and the driver.
        Safe to call from any thread, more than once."""
        shared = self._shared
        with self._stop_lock:
            if self._stopped.is_set() or shared.closing.is_set():
                return
            shared.closing.set()
        self._notifier.send("STOPPING=1")
        log.info("shutting down")
        shared.enter_stopping()
        deadline = time.monotonic() + timeout_s
        # Wait for a start/stop/calibrate request under way (bounded), so no pipeline is
        # created behind our back; later ones see `closing` and refuse.
        got = shared.transition.acquire(timeout=min(5.0, timeout_s / 3))
        try:
            if self._live is not None:
                self._live.stop(timeout_s=max(deadline - time.monotonic(), 1.0))
        finally:
            if got:
                shared.transition.release()
        if self._jobs is not None:
            self._jobs.cancel_all(timeout_s=max(deadline - time.monotonic(), 0.5))
        if self._control is not None:
            self._control.join(max(deadline - time.monotonic(), 0.5))
        self._teardown()
        self._stopped.set()
        log.info("stopped")

    def _teardown(self) -> None:
        if self._metrics_server is not None:
            with contextlib.suppress(Exception):
                self._metrics_server.close()
            self._metrics_server = None
        self._publisher.close()
        if self._control is not None:
            self._control.close()
        if self._transport is not None:  # after every socket is closed
            self._transport.close()
            self._transport = None
        if self._driver is not None:
            with contextlib.suppress(Exception):
                self._driver.close()
        if self._lock is not None:
            # Only the lock's holder wrote the file: a service refused the workspace leaves
            # the running one's file alone (even in the same process).
            ep = self._lock.root / "run" / ENDPOINTS_FILE
            with contextlib.suppress(OSError, ValueError):
                if json.loads(ep.read_text()).get("pid") == os.getpid():
                    ep.unlink()
            self._lock.release()
            self._lock = None

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait until the service has stopped (after `stop` or a ``shutdown`` request)."""
        return self._stopped.wait(timeout_s)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def request_shutdown(self) -> None:
        """Stop from another thread without waiting (signal handlers, ``shutdown``)."""
        if not self._shared.closing.is_set():
            threading.Thread(target=self.stop, name="focaltrack-shutdown", daemon=True).start()

    def _on_control_crash(self) -> None:
        self.exit_code = 1
        self.request_shutdown()

    # ================================================================ heartbeat

    def _counts(self) -> dict[str, int]:
        if self._live is None:
            return {"acquired": 0, "analysed": 0, "camera": 0, "analysis_behind": 0}
        return self._live.counts()

    def _tick(self) -> None:
        """Once a second on the control thread: the heartbeat, and the watchdog unless the
        live frame loop feeds it."""
        c = self._counts()
        live, shared = self._live, self._shared
        self._publisher.heartbeat(
            state=shared.state,
            frames_acquired=c["acquired"],
            frames_analysed=c["analysed"],
            frames_dropped=c["camera"] + c["analysis_behind"],
            model=shared.model_name,
            calibration=shared.calibration,
            recording=live.recording.name if live else None,
            uptime_s=time.monotonic() - self._t_start,
        )
        if live is None or not live.running:
            self._notifier.watchdog()

    # ================================================================ service commands

    def _cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        counts = self._counts()
        live, shared = self._live, self._shared
        c = live.camera if live else None
        return {
            "state": shared.state.value,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": time.monotonic() - self._t_start,
            "calibration": shared.calibration,
            "model": shared.model_name,
            "recording": live.recording.info() if live else None,
            "frames_acquired": counts["acquired"],
            "frames_analysed": counts["analysed"],
            "frames_dropped": counts["camera"] + counts["analysis_behind"],
            "frames_dropped_by_reason": {
                "camera": counts["camera"],
                "analysis_behind": counts["analysis_behind"],
            },
            "endpoints": self.endpoints,
            "workspace": str(self.ws.root) if self.ws else None,
            "driver": {
                "kind": self.config.driver.kind,
                "camera": c.name if c else None,
                "width": c.width if c else None,
                "height": c.height if c else None,
                "pixel_size_um": c.pixel_size_um if c else None,
                "exposure_ms": c.exposure_ms if c else None,
            },
            "jobs": self._jobs.recent(10) if self._jobs else [],
            "last_error": shared.last_error,
        }

    def _cmd_calibrations(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.ws is not None
        return {"calibrations": self.ws.list_calibrations(), "current": self._shared.calibration}

    def _cmd_models(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self.ws is not None
        return {"models": self.ws.list_models(), "current": self._shared.model_name}

    def _cmd_shutdown(self, args: dict[str, Any]) -> dict[str, Any]:
        self.request_shutdown()
        return {"state": State.STOPPING.value}

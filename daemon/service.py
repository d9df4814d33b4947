"""The service: state machine, control ROUTER, PUB socket, jobs, live pipeline, metrics.

    svc = Service(load_config(None, overrides={"network.control_port": 0, ...}))
    svc.start()                      # opens the driver, restores state, binds; returns
    svc.endpoints                    # {"control": "tcp://127.0.0.1:41234", "pub": ..., ...}
    ...
    svc.stop(); svc.join()

Threads (all daemon threads; `stop` ends them, bounded):

* ``focaltrack-control`` owns the ROUTER socket: it reads requests, answers the quick ones
  (``status``, ``job``, ``cancel``, ``calibrations``, ``models``) at once and hands every
  other one to a small worker pool, whose replies come back through an inproc wake-up
  socket — so a slow ``move_z`` or ``load_model`` never holds up another client. It also
  sends the ``hb`` heartbeat about once a second and feeds the systemd watchdog while idle.
* the live pipeline's driver and analysis threads (`focaltrack.daemon.pipeline`);
* a calibration thread while calibrating; a monitor thread per training process;
* the recorder's writer thread while recording; the metrics HTTP server.

The PUB socket is shared by the threads that publish, behind one lock (a ZeroMQ socket may
be used from several threads when every use is serialised).

State machine (`State`): ``idle`` ⇄ ``live`` (start / stop), ``idle`` → ``calibrating`` →
``idle`` (a calibration job), ``live`` → ``error`` on a camera fault (the stream is restarted
with back-off; back to ``live`` when frames come again, or it stays ``error`` until ``stop``
or ``start``), anything → ``stopping`` on shutdown. Training is a job, not a state, and may
run during live analysis; when it ends the new model is loaded if the request asked for it.

The files the service writes live in the workspace (`focaltrack.daemon.workspace`);
``<workspace>/run/endpoints.json`` holds the bound endpoints and the pid while it runs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import zmq

from focaltrack.common.errors import FocaltrackError
from focaltrack.daemon import __version__
from focaltrack.daemon.config import ConfigError, ServiceConfig, check_exposure, workspace_dir
from focaltrack.daemon.jobs import Job, JobTable, TrainProcess, TrainRequest
from focaltrack.daemon.metrics import ServiceMetrics
from focaltrack.daemon.pipeline import AnalysisModel, LivePipeline, SimBeadSwap
from focaltrack.daemon.protocol import (
    ErrorCode,
    EventKind,
    JobKind,
    JobState,
    ProtocolError,
    Request,
    Sequencer,
    State,
    Topic,
    dumps,
    encode_message,
    error_reply,
    event_header,
    hb_header,
    loc_header,
    ok_reply,
    parse_request,
    request_id,
    track_header,
)
from focaltrack.daemon.workspace import NotFound, Workspace, WorkspaceError
from focaltrack.drivers.base import DriverError

if TYPE_CHECKING:
    from focaltrack.drivers.base import Frame
    from focaltrack.models.localizer import Localizations
    from focaltrack.models.tracker import TrackFrame

log = logging.getLogger("focaltrack.service")

__all__ = ["Service", "ServiceError", "sd_notify"]

#: Commands answered on the control thread itself (cheap, never touch the driver).
_INLINE = frozenset({"status", "job", "cancel"})
HEARTBEAT_S = 1.0
ENDPOINTS_FILE = "endpoints.json"


class ServiceError(FocaltrackError, RuntimeError):
    """The service could not start (the message says why)."""


def _utc_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sd_notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` (``READY=1``, ``WATCHDOG=1``, ``STOPPING=1``, ...) to systemd's
    notification socket if ``NOTIFY_SOCKET`` is set; True if sent. No systemd package needed."""
    env = os.environ if env is None else env
    addr = env.get("NOTIFY_SOCKET")
    if not addr or not hasattr(socket, "AF_UNIX"):
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.debug("sd_notify(%s) failed: %s", message, e)
        return False


@dataclass(frozen=True, slots=True)
class _LoadedModel:
    name: str
    path: Path
    meta: dict[str, Any]
    analysis: AnalysisModel


def _zmq_endpoint(host: str, port: int) -> str:
    h = host.strip()
    if h == "localhost":
        h = "127.0.0.1"
    if ":" in h and not h.startswith("["):
        h = f"[{h}]"
    return f"tcp://{h}:{port if port else '*'}"


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
        driver: Any = None,
        train_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        self._driver = driver
        self._train_overrides = dict(train_overrides) if train_overrides else None
        self.metrics = ServiceMetrics(states=[s.value for s in State])
        self._state = State.IDLE
        self._state_lock = threading.RLock()
        self._transition = threading.Lock()  # start / stop / calibrate / shutdown, one at a time
        self._seq = Sequencer()
        # Re-entrant: an event's sequence number is taken and the event sent under it, so
        # events from different threads go out in sequence order.
        self._pub_lock = threading.RLock()
        self._jobs = JobTable(self._on_job_change)
        self._executor: ThreadPoolExecutor | None = None
        self._ctx: zmq.Context[Any] | None = None
        self._router: zmq.Socket[bytes] | None = None
        self._pub: zmq.Socket[bytes] | None = None
        self._wake_rx: zmq.Socket[bytes] | None = None
        self._wake_tx: zmq.Socket[bytes] | None = None
        self._wake_lock = threading.Lock()
        self._replies: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self._auth: Any = None
        self._metrics_server: Any = None
        self._control_thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._stopped = threading.Event()
        self._started = False
        self._stop_lock = threading.Lock()
        self._t_start = time.monotonic()
        self._pipeline: LivePipeline | None = None
        self._model: _LoadedModel | None = None
        self._calibration: str | None = None
        self._recorder: Any = None
        self._recording_name: str | None = None
        self._recording_lock = threading.Lock()
        self._totals = {"acquired": 0, "analysed": 0, "camera": 0, "analysis_behind": 0}
        self._calibration_thread: threading.Thread | None = None
        self._last_error: dict[str, str] | None = None
        self._endpoints: dict[str, str] = {}
        self._train_procs: dict[str, TrainProcess] = {}
        self._last_watchdog = 0.0
        # systemd hands NOTIFY_SOCKET to the process it started; read it once so that every
        # message of this service goes to the socket it announced READY on, even if the
        # environment changes later (several services in one process, as in the tests).
        self._notify_env = {k: v for k, v in os.environ.items() if k == "NOTIFY_SOCKET"}
        self._camera: Any = None
        self.ws: Any = None
        self.exit_code = 0
        self.metrics.set_state(self._state.value)

    # ================================================================ lifecycle

    @property
    def endpoints(self) -> dict[str, str]:
        """control, pub (ZeroMQ endpoints) and metrics (HTTP URL), with the bound ports."""
        return dict(self._endpoints)

    @property
    def state(self) -> State:
        return self._state

    def start(self) -> None:
        """Check the exposure settings, open the workspace and the driver, restore the last
        calibration and model, bind the sockets and the metrics endpoint, start serving.
        Raises `ConfigError` (unsafe bind, bad settings), `DriverError`, `ServiceError`."""
        if self._started:
            raise ServiceError("the service was already started")
        self._started = True
        net = self.config.network
        warning = check_exposure(net)  # ConfigError before anything is opened
        if warning:
            log.warning("%s", warning)
        try:
            self.ws = Workspace(workspace_dir(self.config).resolve())
            self._open_driver()
            self._restore()
            self._bind()
        except BaseException:
            self._teardown()
            self._closing.set()
            self._stopped.set()
            raise
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="focaltrack-cmd")
        self._control_thread = threading.Thread(
            target=self._control_loop, name="focaltrack-control", daemon=True
        )
        self._write_endpoints_file()
        log.info(
            "focaltrack %s serving: control %s, pub %s, metrics %s; workspace %s; state %s, "
            "calibration %s, model %s",
            __version__,
            self._endpoints["control"],
            self._endpoints["pub"],
            self._endpoints["metrics"],
            self.ws.root,
            self._state.value,
            self._calibration or "none",
            self._model.name if self._model else "none",
        )
        # Requests that arrive before the control thread runs wait in the socket.
        sd_notify("READY=1", self._notify_env)
        self._control_thread.start()

    def _open_driver(self) -> None:
        if self._driver is None:
            from focaltrack.daemon.pipeline import open_service_driver

            log.info("opening the %s driver", self.config.driver.kind)
            self._driver = open_service_driver(self.config)
        self._camera = self._driver.describe()
        d = self.config.driver
        if d.exposure_ms > 0:
            try:
                from focaltrack.drivers.calibrate import _set_exposure

                _set_exposure(self._driver, d.exposure_ms)
                self._camera = self._driver.describe()
            except DriverError as e:
                log.warning("could not set the exposure to %g ms: %s", d.exposure_ms, e)
        c = self._camera
        log.info(
            "camera %s: %d×%d px, %d bit, %.4g µm/px, exposure %g ms",
            c.name,
            c.width,
            c.height,
            c.bit_depth,
            c.pixel_size_um,
            c.exposure_ms,
        )

    def _restore(self) -> None:
        st = self.ws.read_state()  # names whose files are gone are dropped (with a warning)
        if st.calibration:
            self._calibration = st.calibration
            log.info("restored calibration %s", st.calibration)
        model = st.model
        if model:
            try:
                self._model = self._load_model(model)
                log.info("restored model %s", model)
            except (ProtocolError, ValueError, OSError) as e:  # WorkspaceError is a ValueError
                log.warning("could not restore the last model %s: %s", model, e)

    def _bind(self) -> None:
        net = self.config.network
        self._ctx = zmq.Context()
        ctx = self._ctx
        curve = bool(net.curve_server_secret_file)
        public = secret = None
        if curve:
            from zmq.auth import load_certificate
            from zmq.auth.thread import ThreadAuthenticator

            try:
                public, secret = load_certificate(net.curve_server_secret_file)
            except (OSError, ValueError) as e:
                raise ConfigError(
                    f"network.curve_server_secret_file: cannot read {net.curve_server_secret_file}"
                    f": {e}"
                ) from e
            if secret is None:
                raise ConfigError(
                    f"network.curve_server_secret_file: {net.curve_server_secret_file} holds no "
                    "secret key (use the .key_secret file from zmq.auth.create_certificates)"
                )
            self._auth = ThreadAuthenticator(ctx)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=net.curve_allowed_clients_dir)
        ipv6 = ":" in net.bind

        def make(kind: int) -> zmq.Socket[bytes]:
            s = ctx.socket(kind)
            s.setsockopt(zmq.LINGER, 0)
            if ipv6:
                s.setsockopt(zmq.IPV6, 1)
            if curve:
                s.curve_secretkey = secret
                s.curve_publickey = public
                s.curve_server = True
            return s

        def bind(s: zmq.Socket[bytes], port: int, what: str) -> str:
            ep = _zmq_endpoint(net.bind, port)
            try:
                s.bind(ep)
            except zmq.ZMQError as e:
                raise ServiceError(f"cannot bind the {what} socket to {ep}: {e}") from e
            return s.getsockopt_string(zmq.LAST_ENDPOINT)

        self._router = make(zmq.ROUTER)
        self._router.setsockopt(zmq.RCVHWM, 1000)
        # Requests are small (the protocol answers bad_request above 64 KiB); a peer sending
        # more than 16 MiB in one message is disconnected instead of buffered.
        self._router.setsockopt(zmq.MAXMSGSIZE, 16 << 20)
        self._router.setsockopt(zmq.SNDHWM, 1000)
        control = bind(self._router, net.control_port, "control")
        self._pub = make(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, net.pub_hwm)
        pub = bind(self._pub, net.pub_port, "publish")
        self._wake_rx = ctx.socket(zmq.PAIR)
        self._wake_rx.setsockopt(zmq.LINGER, 0)
        addr = f"inproc://focaltrack-wake-{id(self)}"
        self._wake_rx.bind(addr)
        self._wake_tx = ctx.socket(zmq.PAIR)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.connect(addr)
        try:
            self._metrics_server = self.metrics.serve(net.bind.strip("[]"), net.metrics_port)
        except OSError as e:
            raise ServiceError(f"cannot serve metrics on {net.bind}:{net.metrics_port}: {e}") from e
        self._endpoints = {
            "control": control.replace("0.0.0.0", "127.0.0.1"),
            "pub": pub.replace("0.0.0.0", "127.0.0.1"),
            "metrics": self._metrics_server.url,
        }

    def _write_endpoints_file(self) -> None:
        run = self.ws.root / "run"
        run.mkdir(parents=True, exist_ok=True)
        data = {**self._endpoints, "pid": os.getpid(), "started_utc": _utc_iso()}
        tmp = run / f".{ENDPOINTS_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, run / ENDPOINTS_FILE)

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop acquisition, flush files, cancel jobs, close sockets and the driver.
        Safe to call from any thread, more than once."""
        with self._stop_lock:
            if self._stopped.is_set() or self._closing.is_set():
                return
            self._closing.set()
        sd_notify("STOPPING=1", self._notify_env)
        log.info("shutting down")
        with self._state_lock:
            self._state = State.STOPPING
        self.metrics.set_state(State.STOPPING.value)
        self._event(EventKind.STATE, state=State.STOPPING)
        deadline = time.monotonic() + timeout_s
        # Wait for a start/stop/calibrate request under way (bounded), so no pipeline is
        # created behind our back; later ones see _closing and refuse.
        got = self._transition.acquire(timeout=min(5.0, timeout_s / 3))
        try:
            self._stop_live(timeout_s=max(deadline - time.monotonic(), 1.0))
        finally:
            if got:
                self._transition.release()
        for job in self._jobs.active():
            job.cancel_event.set()
            if job.cancel_hook is not None:
                with contextlib.suppress(Exception):
                    job.cancel_hook()
        cal = self._calibration_thread
        if cal is not None:  # it returns the focus home; let it finish before closing
            cal.join(max(deadline - time.monotonic(), 0.5))
        ct = self._control_thread
        if ct is not None and ct is not threading.current_thread():
            ct.join(max(deadline - time.monotonic(), 0.5))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        self._teardown()
        self._stopped.set()
        log.info("stopped")

    def _teardown(self) -> None:
        if self._metrics_server is not None:
            with contextlib.suppress(Exception):
                self._metrics_server.close()
            self._metrics_server = None
        # Other threads publish and wake the control loop under these locks.
        with self._pub_lock:
            pub, self._pub = self._pub, None
        with self._wake_lock:
            tx, self._wake_tx = self._wake_tx, None
        router, self._router = self._router, None
        rx, self._wake_rx = self._wake_rx, None
        for sock in (router, pub, rx, tx):
            if sock is not None:
                with contextlib.suppress(Exception):
                    sock.close(linger=0)
        if self._auth is not None:
            with contextlib.suppress(Exception):
                self._auth.stop()
            self._auth = None
        if self._ctx is not None:
            with contextlib.suppress(Exception):
                self._ctx.term()
            self._ctx = None
        if self._driver is not None:
            with contextlib.suppress(Exception):
                self._driver.close()
        if self.ws is not None:
            ep = self.ws.root / "run" / ENDPOINTS_FILE
            with contextlib.suppress(OSError, ValueError):
                if json.loads(ep.read_text()).get("pid") == os.getpid():
                    ep.unlink()

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait until the service has stopped (after `stop` or a ``shutdown`` request)."""
        return self._stopped.wait(timeout_s)

    @property
    def stopped(self) -> bool:
        return self._stopped.is_set()

    def request_shutdown(self) -> None:
        """Stop from another thread without waiting (signal handlers, ``shutdown``)."""
        if not self._closing.is_set():
            threading.Thread(target=self.stop, name="focaltrack-shutdown", daemon=True).start()

    # ================================================================ state and publishing

    def _set_state(self, state: State) -> None:
        with self._state_lock:
            if self._state is state:
                return
            if self._closing.is_set() and state is not State.STOPPING:
                return  # shutting down: stays "stopping"
            self._state = state
        self.metrics.set_state(state.value)
        log.info("state: %s", state.value)
        self._event(EventKind.STATE, state=state)

    def _publish(self, header: dict[str, Any], payload: bytes | None = None) -> None:
        frames = encode_message(header, payload)
        with self._pub_lock:
            pub = self._pub
            if pub is None:
                return
            try:
                pub.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                return  # PUB drops at the high-water mark anyway
        self.metrics.published_messages.labels(topic=header["topic"]).inc()

    def _publish_safe(self, header: dict[str, Any]) -> None:
        try:
            self._publish(header)
        except Exception as e:  # publishing must never take the caller down
            log.warning("publish %s failed: %s", header.get("topic"), e)

    def _event(self, kind: EventKind, **fields: Any) -> None:
        with self._pub_lock:
            self._publish_safe(event_header(seq=self._seq.next(Topic.EVENT), kind=kind, **fields))

    def _error_event(
        self, code: ErrorCode, message: str, kind: EventKind = EventKind.ERROR
    ) -> None:
        self._last_error = {"code": code.value, "message": message, "t_utc": _utc_iso()}
        fields: dict[str, Any] = {"error": {"code": code, "message": message}}
        if kind is EventKind.DRIVER:
            fields["state"] = self._state
        self._event(kind, **fields)

    def _on_job_change(self, job: Job, significant: bool) -> None:
        self.metrics.job_progress.labels(kind=job.kind.value).set(job.progress)
        if significant:
            log.info("job %s: %s %s", job.id, job.state.value, job.message)
        self._event(EventKind.JOB, job=job.info())

    def _heartbeat(self) -> None:
        acquired, analysed, dropped = self._counters()
        rec = self._recording_name
        self._publish_safe(
            hb_header(
                seq=self._seq.next(Topic.HB),
                state=self._state,
                frames_acquired=acquired,
                frames_analysed=analysed,
                frames_dropped=dropped,
                model=self._model.name if self._model else None,
                calibration=self._calibration,
                recording=rec,
                uptime_s=time.monotonic() - self._t_start,
            )
        )

    def _counts(self) -> dict[str, int]:
        """Frames over the service's life: acquired, analysed, dropped by reason."""
        c = dict(self._totals)
        p = self._pipeline
        if p is not None:
            for k, v in p.counts().items():
                c[k] += v
        return c

    def _counters(self) -> tuple[int, int, int]:
        c = self._counts()
        return c["acquired"], c["analysed"], c["camera"] + c["analysis_behind"]

    def _watchdog(self) -> None:
        now = time.monotonic()
        if now - self._last_watchdog >= 1.0:
            self._last_watchdog = now
            sd_notify("WATCHDOG=1", self._notify_env)

    # ================================================================ control loop

    def _control_loop(self) -> None:
        try:
            self._control_loop_inner()
        except Exception:  # a bug: without the control thread nobody can reach the service
            log.critical("the control loop failed; shutting down", exc_info=True)
            self.exit_code = 1
            self.request_shutdown()

    def _control_loop_inner(self) -> None:
        router, wake = self._router, self._wake_rx
        assert router is not None and wake is not None
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        next_hb = time.monotonic()
        while not self._closing.is_set():
            now = time.monotonic()
            if now >= next_hb:
                self._heartbeat()
                next_hb = now + HEARTBEAT_S
                p = self._pipeline
                if p is None or not p.running:  # while live, the frame loop feeds it
                    self._watchdog()
            timeout_ms = max(1, int((next_hb - time.monotonic()) * 1000))
            try:
                events = dict(poller.poll(min(timeout_ms, 200)))
            except zmq.ZMQError as e:
                if self._closing.is_set():
                    break
                log.error("control poll failed: %s", e)
                continue
            if wake in events:
                with contextlib.suppress(zmq.Again):
                    while True:
                        wake.recv(zmq.NOBLOCK)
            self._send_replies(router)
            if router in events:
                for _ in range(100):  # bounded burst, then heartbeats and replies again
                    try:
                        frames = router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except zmq.ZMQError as e:
                        log.warning("control receive failed: %s", e)
                        break
                    self._on_message(frames)
                    self._send_replies(router)
        self._send_replies(router)  # e.g. the reply to "shutdown"

    def _send_replies(self, router: zmq.Socket[bytes]) -> None:
        while True:
            try:
                frames = self._replies.get_nowait()
            except queue.Empty:
                return
            try:
                router.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.ZMQError as e:  # the peer is gone (unroutable) or its queue is full
                log.debug("reply dropped: %s", e)

    def _post_reply(self, envelope: list[bytes], reply: dict[str, Any]) -> None:
        try:
            body = dumps(reply)
        except (TypeError, ValueError) as e:
            body = dumps(
                error_reply(ErrorCode.INTERNAL, f"reply not serialisable: {e}", reply.get("id"))
            )
        ok = reply.get("ok") is True
        self.metrics.control_requests.labels(outcome="ok" if ok else "error").inc()
        self._replies.put([*envelope, body])
        if threading.current_thread() is not self._control_thread:
            with self._wake_lock:
                tx = self._wake_tx
                if tx is not None:
                    with contextlib.suppress(zmq.ZMQError):
                        tx.send(b"", zmq.NOBLOCK)

    def _on_message(self, frames: list[bytes]) -> None:
        # ROUTER: [identity, (b"" from REQ/DEALER-with-delimiter), body...]
        if len(frames) < 2:
            self.metrics.control_requests.labels(outcome="dropped").inc()
            return
        identity, rest = frames[0], frames[1:]
        if rest[0] == b"":
            envelope, body = [identity, b""], rest[1:]
        else:
            envelope, body = [identity], rest
        if len(body) != 1:
            self._post_reply(
                envelope,
                error_reply(
                    ErrorCode.BAD_REQUEST,
                    f"a request is exactly one JSON frame (after the optional empty delimiter); "
                    f"got {len(body)}",
                    request_id(body[0]) if body else None,
                ),
            )
            return
        raw = body[0]
        try:
            req = parse_request(raw)
        except ProtocolError as e:
            self._post_reply(envelope, error_reply(e.code, e.message, request_id(raw)))
            return
        if req.cmd in _INLINE:
            self._post_reply(envelope, self._execute(req))
            return
        ex = self._executor
        if ex is None:
            self._post_reply(envelope, error_reply(ErrorCode.WRONG_STATE, "shutting down", req.id))
            return
        try:
            ex.submit(lambda: self._post_reply(envelope, self._execute(req)))
        except RuntimeError:
            self._post_reply(envelope, error_reply(ErrorCode.WRONG_STATE, "shutting down", req.id))

    def _execute(self, req: Request) -> dict[str, Any]:
        handler: Callable[[dict[str, Any]], Any] | None = getattr(self, f"_cmd_{req.cmd}", None)
        if handler is None:  # a command in the table without a handler is a bug
            return error_reply(ErrorCode.INTERNAL, f"{req.cmd} is not implemented", req.id)
        t0 = time.monotonic()
        try:
            return ok_reply(handler(req.args), req.id)
        except ProtocolError as e:
            return error_reply(e.code, e.message, req.id)
        except NotFound as e:
            return error_reply(ErrorCode.NOT_FOUND, str(e), req.id)
        except WorkspaceError as e:
            return error_reply(ErrorCode.BAD_ARGS, str(e), req.id)
        except DriverError as e:
            return error_reply(ErrorCode.DRIVER_ERROR, str(e), req.id)
        except Exception as e:
            log.exception("command %s failed", req.cmd)
            return error_reply(ErrorCode.INTERNAL, f"{type(e).__name__}: {e}", req.id)
        finally:
            dt = time.monotonic() - t0
            if dt > 2.0 and req.cmd != "move_z":
                log.warning("command %s took %.1f s", req.cmd, dt)

    # ================================================================ commands

    def _cmd_status(self, args: dict[str, Any]) -> dict[str, Any]:
        counts = self._counts()
        c = self._camera
        rec = None
        r = self._recorder
        if r is not None and self._recording_name:
            rec = {
                "name": self._recording_name,
                "path": str(r.path),
                "frames": r.frames_written,
                "dropped": r.dropped,
            }
        return {
            "state": self._state.value,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": time.monotonic() - self._t_start,
            "calibration": self._calibration,
            "model": self._model.name if self._model else None,
            "recording": rec,
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
            "jobs": [j.info() for j in self._jobs.all()[-10:]],
            "last_error": self._last_error,
        }

    def _cmd_job(self, args: dict[str, Any]) -> dict[str, Any]:
        job = self._jobs.get(args["id"])
        if job is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no job {args['id']!r}")
        return job.info()

    def _cmd_cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        job = self._jobs.get(args["id"])
        if job is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no job {args['id']!r}")
        if not job.state.finished:
            job.cancel_event.set()
            if job.cancel_hook is not None:
                threading.Thread(
                    target=job.cancel_hook, name="focaltrack-cancel", daemon=True
                ).start()
            self._jobs.update(job, message="cancelling")
        return job.info()

    def _cmd_calibrations(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"calibrations": self.ws.list_calibrations(), "current": self._calibration}

    def _cmd_models(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "models": self.ws.list_models(),
            "current": self._model.name if self._model else None,
        }

    def _cmd_get_z(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"z_um": float(self._driver.get_z())}

    def _cmd_move_z(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._state is State.CALIBRATING:
            raise ProtocolError(
                ErrorCode.WRONG_STATE, "a calibration is moving the focus; wait or cancel it"
            )
        timeout = args.get("timeout_s", self.config.driver.stage_timeout_s)
        try:
            self._driver.move_z(float(args["z_um"]), timeout_s=float(timeout))
        except DriverError as e:
            self._error_event(ErrorCode.DRIVER_ERROR, str(e), EventKind.DRIVER)
            raise
        return {"z_um": float(self._driver.get_z())}

    def _cmd_shutdown(self, args: dict[str, Any]) -> dict[str, Any]:
        self.request_shutdown()
        return {"state": State.STOPPING.value}

    # ---------------------------------------------------------------- models
    def _load_model(self, name: str) -> _LoadedModel:
        """Load a bundle from the workspace (ProtocolError not_found / bad_args)."""
        from focaltrack.models.bundle import read_meta
        from focaltrack.models.localizer import Localizer, LocalizerError

        path = self.ws.find_model(name)  # NotFound -> not_found
        a = self.config.analysis
        px = self._camera.pixel_size_um if self._camera else None
        try:
            meta = read_meta(path)
            loc = Localizer.from_bundle(
                path,
                device=a.device or None,
                threads=a.threads or None,
                pixel_size_um=px,
                passes=a.passes,
            )
        except (LocalizerError, ValueError) as e:
            raise ProtocolError(ErrorCode.BAD_ARGS, f"model {name!r}: {e}") from e
        make_tracker = self._tracker_factory(meta)
        return _LoadedModel(name, path, meta, AnalysisModel(name, loc, make_tracker))

    def _tracker_factory(self, meta: dict[str, Any]) -> Callable[[], Any]:
        from focaltrack.models.tracker import KalmanTracker, TrackerConfig, noise_from_validation

        a = self.config.analysis
        lat, ax = a.tracker_sigma_lateral_um, a.tracker_sigma_axial_um
        if lat <= 0 or ax <= 0:
            try:
                v_lat, v_ax = noise_from_validation(meta)
            except ValueError:
                d = TrackerConfig()
                v_lat, v_ax = d.sigma_lateral_um, d.sigma_axial_um
            lat = lat if lat > 0 else v_lat
            ax = ax if ax > 0 else v_ax
        window = max(a.tracker_confirm_window, a.tracker_confirm_hits)
        cfg = TrackerConfig(
            motion=a.tracker_motion,
            sigma_lateral_um=float(lat),
            sigma_axial_um=float(ax),
            accel_um_s2=a.tracker_accel_um_s2,
            diffusion_um2_s=a.tracker_diffusion_um2_s,
            confirm_hits=a.tracker_confirm_hits,
            confirm_window=window,
            max_misses=a.tracker_max_misses,
        )
        return lambda: KalmanTracker(cfg)

    def _use_model(self, loaded: _LoadedModel) -> None:
        self._model = loaded
        p = self._pipeline
        if p is not None:
            p.swap_model(loaded.analysis)
        self.ws.update_state(model=loaded.name)
        cal = (loaded.meta.get("calibration") or {}).get("sha256")
        self._event(
            EventKind.MODEL,
            model={"name": loaded.name, "path": str(loaded.path), "calibration_sha256": cal},
        )
        log.info("model %s loaded", loaded.name)

    def _cmd_load_model(self, args: dict[str, Any]) -> dict[str, Any]:
        loaded = self._load_model(args["name"])
        self._use_model(loaded)
        return {"model": loaded.name}

    # ---------------------------------------------------------------- live
    def _cmd_start(self, args: dict[str, Any]) -> dict[str, Any]:
        with self._transition:
            if self._closing.is_set():
                raise ProtocolError(ErrorCode.WRONG_STATE, "the service is shutting down")
            if self._state is State.LIVE:
                return {"state": State.LIVE.value}
            if self._state not in (State.IDLE, State.ERROR):
                raise ProtocolError(
                    ErrorCode.WRONG_STATE, f"cannot start while {self._state.value}"
                )
            if self._model is None:
                raise ProtocolError(
                    ErrorCode.WRONG_STATE,
                    "no model loaded: train one (train) or load one (load_model) first",
                )
            if self._pipeline is not None:  # left over from a failed camera
                self._retire_pipeline(timeout_s=5.0)
            interval = args.get("interval_ms", self.config.driver.interval_ms)
            a = self.config.analysis
            p = LivePipeline(
                self._driver,
                self._model.analysis,
                self,
                self.metrics,
                interval_ms=float(interval),
                queue_frames=a.queue_frames,
                frame_timeout_s=self.config.driver.frame_timeout_s,
                on_raw_frame=self._on_raw_frame,
                on_fault=self._on_camera_fault,
                on_recovered=self._on_camera_recovered,
                on_failed=self._on_camera_failed,
                on_analysis_error=self._on_analysis_error,
                watchdog=self._watchdog,
            )
            try:
                p.start()
            except DriverError as e:
                self._error_event(ErrorCode.DRIVER_ERROR, str(e), EventKind.DRIVER)
                raise
            self._pipeline = p
            self._set_state(State.LIVE)
            return {"state": State.LIVE.value}

    def _cmd_stop(self, args: dict[str, Any]) -> dict[str, Any]:
        with self._transition:
            if self._state is State.CALIBRATING:
                raise ProtocolError(
                    ErrorCode.WRONG_STATE, "calibrating: cancel the calibration job instead"
                )
            self._stop_live(timeout_s=10.0)
            return {"state": self._state.value}

    def _stop_live(self, timeout_s: float) -> None:
        if self._pipeline is None:
            if self._state is State.ERROR:
                self._set_state(State.IDLE)
            return
        if not self._closing.is_set():
            self._set_state(State.STOPPING)
        self._retire_pipeline(timeout_s)
        if not self._closing.is_set():
            self._set_state(State.IDLE)

    def _retire_pipeline(self, timeout_s: float) -> None:
        p = self._pipeline
        if p is None:
            return
        p.stop(timeout_s=timeout_s * 0.5)
        self._stop_recording(timeout_s=timeout_s * 0.5)
        for k, v in p.counts().items():
            self._totals[k] += v
        self._pipeline = None

    # called from the pipeline threads
    def on_frame_result(
        self,
        frame: Frame,
        locs: Localizations,
        tracks: TrackFrame,
        inference_s: float,
        model_name: str,
    ) -> None:
        model = model_name
        cols = tracks.as_columns()
        z = frame.stage_z_um
        self._publish(
            loc_header(
                seq=self._seq.next(Topic.LOC),
                frame=frame.index,
                t_acq_s=frame.t_acq_s,
                stage_z_um=z,
                x_um=locs.x_um,
                y_um=locs.y_um,
                z_um=locs.z_um,
                score=locs.score,
                model=model,
                inference_s=inference_s,
            )
        )
        self._publish(
            track_header(
                seq=self._seq.next(Topic.TRACK),
                frame=frame.index,
                t_acq_s=frame.t_acq_s,
                stage_z_um=z,
                columns=cols,
            )
        )
        latency = time.time() - frame.t_acq_s
        if math.isfinite(latency) and latency >= 0:
            self.metrics.frame_to_publish_seconds.observe(latency)
        r = self._recorder
        if r is not None:
            loc_cols = {
                "x_um": locs.x_um,
                "y_um": locs.y_um,
                "z_um": locs.z_um,
                "score": locs.score,
            }
            if not r.add_results(frame.index, loc_cols, cols) and r.running:
                self.metrics.recording_dropped.inc()

    def _on_raw_frame(self, frame: Frame) -> None:
        r = self._recorder
        if r is not None and not r.add_frame(frame) and r.running:
            self.metrics.recording_dropped.inc()

    def _set_state_from(self, expected: tuple[State, ...], state: State) -> bool:
        """`_set_state` only if the state is one of ``expected`` (pipeline callbacks must not
        undo a ``stop`` that is under way)."""
        with self._state_lock:
            if self._state not in expected:
                return False
            self._set_state(state)
            return True

    def _on_camera_fault(self, message: str, attempt: int) -> None:
        if not self._set_state_from((State.LIVE, State.ERROR), State.ERROR):
            return
        self._error_event(
            ErrorCode.DRIVER_ERROR,
            f"{message} (restarting the stream, attempt {attempt})",
            EventKind.DRIVER,
        )

    def _on_camera_recovered(self) -> None:
        log.info("camera: frames are coming again")
        self._set_state_from((State.ERROR,), State.LIVE)

    def _on_camera_failed(self, message: str) -> None:
        if not self._set_state_from((State.LIVE, State.ERROR), State.ERROR):
            return
        self._error_event(
            ErrorCode.DRIVER_ERROR, f"live analysis stopped: {message}", EventKind.DRIVER
        )

    def _on_analysis_error(self, message: str) -> None:
        self._error_event(ErrorCode.INTERNAL, message)

    # ---------------------------------------------------------------- recording
    def _cmd_record_start(self, args: dict[str, Any]) -> dict[str, Any]:
        from focaltrack.daemon.recorder import Recorder, RecorderError

        with self._recording_lock:
            if self._state is not State.LIVE or self._pipeline is None:
                raise ProtocolError(
                    ErrorCode.WRONG_STATE,
                    f"record_start needs live analysis (state is {self._state.value}): start first",
                )
            if self._recorder is not None:
                raise ProtocolError(
                    ErrorCode.BUSY, f"already recording {self._recording_name}: record_stop first"
                )
            name = args.get("name") or self.ws.new_name("rec")
            path = self.ws.recording_path(name)
            if path.exists():
                raise ProtocolError(ErrorCode.BAD_ARGS, f"recording {name!r} already exists")
            c = self._camera
            model = self._model
            cal_sha = ""
            if model is not None:
                cal_sha = str((model.meta.get("calibration") or {}).get("sha256") or "")
            r = Recorder(
                path,
                frame_shape=(c.height, c.width),
                frame_dtype="uint8" if c.bit_depth <= 8 else "uint16",
                frames=bool(args.get("frames", True)),
                calibration_sha256=cal_sha,
                model=model.name if model else "",
                pixel_size_um=c.pixel_size_um,
                attrs={
                    "calibration": self._calibration or "",
                    "camera": c.name,
                    "focaltrack_version": __version__,
                },
                flush_interval_s=self.config.recording.flush_interval_s,
                queue_frames=self.config.recording.queue_frames,
                on_frames_written=self.metrics.recording_frames.inc,
            )
            try:
                r.start()
            except RecorderError as e:
                raise ProtocolError(ErrorCode.BAD_ARGS, str(e)) from e
            self._recorder = r
            self._recording_name = name
        self._event(
            EventKind.RECORDING,
            recording={"name": name, "path": str(path), "active": True, "frames": 0},
        )
        log.info("recording to %s", path)
        return {"recording": name, "path": str(path)}

    def _cmd_record_stop(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._recorder is None:
            raise ProtocolError(ErrorCode.WRONG_STATE, "not recording")
        summary = self._stop_recording(timeout_s=10.0)
        if summary is None:
            raise ProtocolError(ErrorCode.WRONG_STATE, "not recording")
        name, s = summary
        out: dict[str, Any] = {
            "recording": name,
            "path": s.path,
            "frames": s.frames,
            "localizations": s.localizations,
            "dropped": s.dropped,
        }
        if s.error:
            out["error"] = s.error
        return out

    def _stop_recording(self, timeout_s: float) -> tuple[str, Any] | None:
        with self._recording_lock:
            r, name = self._recorder, self._recording_name
            self._recorder = None
            self._recording_name = None
        if r is None or name is None:
            return None
        s = r.stop(timeout_s=timeout_s)
        log.info(
            "recording %s closed: %d frames, %d localizations, %d dropped",
            name,
            s.frames,
            s.localizations,
            s.dropped,
        )
        self._event(
            EventKind.RECORDING,
            recording={"name": name, "path": s.path, "active": False, "frames": s.frames},
        )
        if s.error:
            self._error_event(ErrorCode.INTERNAL, f"recording {name}: {s.error}")
        return name, s

    # ---------------------------------------------------------------- calibration
    def _cmd_calibrate(self, args: dict[str, Any]) -> dict[str, Any]:
        from focaltrack.drivers.calibrate import z_grid

        c = self._camera
        window = int(args["window_px"])
        if window > min(c.width, c.height):
            raise ProtocolError(
                ErrorCode.BAD_ARGS,
                f"calibrate: window_px {window} is larger than the {c.width}×{c.height} frame",
            )
        try:
            z_grid(float(args["z_range_um"]), float(args["z_step_um"]))
        except ValueError as e:
            raise ProtocolError(ErrorCode.BAD_ARGS, f"calibrate: {e}") from e
        name = args.get("name") or self.ws.new_name("cal")
        if self.ws.calibration_path(name).exists():
            raise ProtocolError(ErrorCode.BAD_ARGS, f"calibration {name!r} already exists")
        with self._transition:
            if self._jobs.active(JobKind.CALIBRATE):
                raise ProtocolError(ErrorCode.BUSY, "a calibration is already running")
            if self._state is not State.IDLE:
                raise ProtocolError(
                    ErrorCode.WRONG_STATE,
                    f"calibrating needs the camera; the service is {self._state.value}"
                    + (": stop live analysis first" if self._state is State.LIVE else ""),
                )
            self._set_state(State.CALIBRATING)
            job = self._jobs.create(JobKind.CALIBRATE)
        t = threading.Thread(
            target=self._run_calibration,
            args=(job, name, args),
            name="focaltrack-calibrate",
            daemon=True,
        )
        self._calibration_thread = t
        t.start()
        return {"job": job.id}

    def _run_calibration(self, job: Job, name: str, args: dict[str, Any]) -> None:
        from focaltrack.drivers.calibrate import (
            AcquisitionCancelled,
            acquire_focal_stack,
            calibration_from_raw,
        )

        self._jobs.update(job, state=JobState.RUNNING, message="acquiring the focal stack")
        d = self.config.driver

        def progress(done: int, total: int, dz: float) -> None:
            # Acquisition is ~90 % of the work; processing and saving the rest.
            self._jobs.update(
                job,
                progress=0.9 * done / max(total, 1),
                message=f"slice {done}/{total} (+{dz:g} µm)",
            )

        try:
            with SimBeadSwap(self._driver).bead():
                raw = acquire_focal_stack(
                    self._driver,
                    z_range_um=float(args["z_range_um"]),
                    z_step_um=float(args["z_step_um"]),
                    n_average=int(args["averages"]),
                    settle_s=float(args["settle_s"]),
                    timeout_s=d.stage_timeout_s,
                    exposure_ms=args.get("exposure_ms"),
                    progress=progress,
                    cancel=job.cancel_event,
                )
            self._jobs.update(job, progress=0.92, message="processing the focal stack")
            cal = calibration_from_raw(
                raw,
                window_px=int(args["window_px"]),
                pixel_size_um=d.pixel_size_um if d.pixel_size_um > 0 else None,
                source=f"{d.kind}:{raw.camera.name}",
            )
            if job.cancel_event.is_set():
                raise AcquisitionCancelled("calibration cancelled")
            path = self.ws.calibration_path(name)
            cal.save(path)
            self._calibration = name
            self.ws.update_state(calibration=name)
            self._jobs.update(
                job,
                state=JobState.DONE,
                message=f"calibration {name}: {len(cal.z_um)} slices",
                result={
                    "calibration": name,
                    "path": str(path),
                    "sha256": cal.sha256,
                    "n_slices": len(cal.z_um),
                    "pixel_size_um": float(cal.pixel_size_um),
                },
            )
        except AcquisitionCancelled:
            self._jobs.update(job, state=JobState.CANCELLED, message="cancelled")
        except DriverError as e:
            self._jobs.update(
                job, state=JobState.FAILED, message=str(e), error_code=ErrorCode.DRIVER_ERROR.value
            )
            self._error_event(ErrorCode.DRIVER_ERROR, f"calibration: {e}", EventKind.DRIVER)
        except Exception as e:
            if not isinstance(e, ValueError):
                log.exception("calibration failed")
            self._jobs.update(job, state=JobState.FAILED, message=f"{type(e).__name__}: {e}")
        finally:
            with self._transition:
                if self._state is State.CALIBRATING:
                    self._set_state(State.IDLE)

    # ---------------------------------------------------------------- training
    def _cmd_train(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._closing.is_set():
            raise ProtocolError(ErrorCode.WRONG_STATE, "the service is shutting down")
        cal = args.get("calibration") or self._calibration
        if not cal:
            raise ProtocolError(
                ErrorCode.NOT_FOUND, "no calibration: calibrate first or name one (calibration=)"
            )
        cal_path = self.ws.find_calibration(cal)  # NotFound -> not_found
        name = args.get("name") or self.ws.new_name("model")
        out = self.ws.model_path(name)
        if out.exists():
            raise ProtocolError(ErrorCode.BAD_ARGS, f"model {name!r} already exists")
        if self._jobs.active(JobKind.TRAIN):
            raise ProtocolError(ErrorCode.BUSY, "a training run is already going on")
        a = self.config.analysis
        req = TrainRequest(
            calibration_path=str(cal_path),
            out_path=str(out),
            preset=str(args.get("preset") or self.config.train.preset),
            seed=int(args.get("seed", self.config.train.seed)),
            device=a.device or None,
            threads=a.threads or None,
            overrides=self._train_overrides,
        )
        job = self._jobs.create(JobKind.TRAIN)
        proc = TrainProcess(req)
        job.cancel_hook = proc.cancel
        self._train_procs[job.id] = proc
        try:
            proc.start()
        except Exception as e:
            self._train_procs.pop(job.id, None)
            self._jobs.update(job, state=JobState.FAILED, message=f"could not start: {e}")
            raise
        self._jobs.update(
            job, state=JobState.RUNNING, message=f"training {name} from {cal} ({req.preset})"
        )
        threading.Thread(
            target=self._monitor_training,
            args=(job, proc, name, bool(args["load"])),
            name="focaltrack-train-monitor",
            daemon=True,
        ).start()
        return {"job": job.id}

    def _monitor_training(self, job: Job, proc: TrainProcess, name: str, load: bool) -> None:
        def progress(frac: float, msg: str) -> None:
            self._jobs.update(job, progress=frac, message=msg)

        def line(msg: str) -> None:
            log.info("%s", msg)

        try:
            while not proc.poll(0.25, progress, line):
                if self._closing.is_set() and not job.cancel_event.is_set():
                    proc.cancel()
            if proc.cancelled or job.cancel_event.is_set():
                proc.cleanup_partial()
                self._jobs.update(job, state=JobState.CANCELLED, message="cancelled")
                return
            if proc.error is not None or proc.result is None:
                proc.cleanup_partial()
                msg = proc.error or "training ended without a result"
                self._jobs.update(job, state=JobState.FAILED, message=msg)
                self._error_event(ErrorCode.INTERNAL, f"training {name}: {msg}")
                return
            result: dict[str, Any] = {
                "model": name,
                "path": str(self.ws.model_path(name)),
                "validation": proc.result.get("validation"),
                "loaded": False,
            }
            if load and not self._closing.is_set():
                try:
                    self._use_model(self._load_model(name))
                    result["loaded"] = True
                except (ProtocolError, ValueError, OSError) as e:
                    result["load_error"] = str(e)
                    self._error_event(ErrorCode.INTERNAL, f"loading model {name}: {e}")
            self._jobs.update(job, state=JobState.DONE, message=f"model {name}", result=result)
        except Exception as e:
            log.exception("training monitor failed")
            self._jobs.update(job, state=JobState.FAILED, message=f"{type(e).__name__}: {e}")
        finally:
            proc.close()
            self._train_procs.pop(job.id, None)

"""The wire of the service: the control socket (ROUTER, made by `Transport` with CURVE
when configured) and the control thread that reads requests and dispatches them through a
handler table.

``focaltrack-control`` owns the ROUTER socket: it reads requests, answers the quick ones
(``inline``: status, job, cancel) at once and hands every other one to a small worker pool,
whose replies come back through an inproc wake-up socket, so a slow ``move_z`` or
``load_model`` never holds up another client. About once a second it calls ``tick`` (the
service's heartbeat and, while idle, the systemd watchdog).

A handler takes the request's checked arguments and returns the reply's ``result``; it
raises `ProtocolError` for a refusal with a code. Workspace and driver errors map to their
codes here, anything else to ``internal``.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import zmq

from focaltrack.daemon.protocol import (
    ErrorCode,
    ProtocolError,
    Request,
    dumps,
    error_reply,
    ok_reply,
    parse_request,
    request_id,
)
from focaltrack.daemon.workspace import NotFound, WorkspaceError
from focaltrack.drivers.base import DriverError

if TYPE_CHECKING:
    from focaltrack.daemon.metrics import ServiceMetrics
    from focaltrack.daemon.transport import Transport

log = logging.getLogger("focaltrack.service")

__all__ = ["HEARTBEAT_S", "MAX_MESSAGE_BYTES", "ControlServer", "Handler"]

HEARTBEAT_S = 1.0
#: The control socket's ZMQ_MAXMSGSIZE: a larger frame disconnects its peer unanswered.
MAX_MESSAGE_BYTES = 16 << 20

#: A command handler: the request's arguments -> the reply's result.
Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ControlServer:
    """The control socket and thread: `bind`, `start`; at the end `join` (after
    ``closing`` is set) and `close`."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        *,
        inline: frozenset[str],
        metrics: ServiceMetrics,
        closing: threading.Event,
        tick: Callable[[], None],
        on_crash: Callable[[], None],
    ) -> None:
        self._handlers = dict(handlers)
        self._inline = inline
        self._metrics = metrics
        self._closing = closing
        self._tick = tick
        self._on_crash = on_crash
        self._router: zmq.Socket[bytes] | None = None
        self._wake_rx: zmq.Socket[bytes] | None = None
        self._wake_tx: zmq.Socket[bytes] | None = None
        self._wake_lock = threading.Lock()
        self._replies: queue.SimpleQueue[list[bytes]] = queue.SimpleQueue()
        self._executor: ThreadPoolExecutor | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ sockets
    def bind(self, transport: Transport, port: int) -> str:
        """Create and bind the ROUTER socket and the inproc wake-up pair; the bound
        endpoint. Raises `ServiceError` (cannot bind); `close` cleans up."""
        router = self._router = transport.socket(zmq.ROUTER)
        router.setsockopt(zmq.RCVHWM, 1000)
        # Requests are small (the protocol answers bad_request above 64 KiB); a peer sending
        # a bigger message than this is disconnected instead of buffered: ZeroMQ drops the
        # connection before the message is read, so nothing can be answered
        # (docs/protocol.md says so).
        router.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        router.setsockopt(zmq.SNDHWM, 1000)
        endpoint = transport.bind(router, port, "control")
        ctx = transport.ctx
        self._wake_rx = ctx.socket(zmq.PAIR)
        self._wake_rx.setsockopt(zmq.LINGER, 0)
        addr = f"inproc://focaltrack-wake-{id(self)}"
        self._wake_rx.bind(addr)
        self._wake_tx = ctx.socket(zmq.PAIR)
        self._wake_tx.setsockopt(zmq.LINGER, 0)
        self._wake_tx.connect(addr)
        return endpoint

    def close(self) -> None:
        """Close the sockets (the control thread has ended)."""
        with self._wake_lock:  # worker threads wake the control loop under it
            tx, self._wake_tx = self._wake_tx, None
        router, self._router = self._router, None
        rx, self._wake_rx = self._wake_rx, None
        for sock in (router, rx, tx):
            if sock is not None:
                with contextlib.suppress(Exception):
                    sock.close(linger=0)

    # ------------------------------------------------------------------ thread
    def start(self) -> None:
        """Start the worker pool and the control thread (requests that came before wait in
        the socket)."""
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="focaltrack-cmd")
        self._thread = threading.Thread(target=self._loop, name="focaltrack-control", daemon=True)
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        """Wait for the control thread (it ends once ``closing`` is set), drop queued work."""
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout_s)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> None:
        try:
            self._loop_inner()
        except Exception:  # a bug: without the control thread nobody can reach the service
            log.critical("the control loop failed; shutting down", exc_info=True)
            self._on_crash()

    def _loop_inner(self) -> None:
        router, wake = self._router, self._wake_rx
        assert router is not None and wake is not None
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        next_hb = time.monotonic()
        while not self._closing.is_set():
            now = time.monotonic()
            if now >= next_hb:
                self._tick()
                next_hb = now + HEARTBEAT_S
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

    # ------------------------------------------------------------------ replies
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
        self._metrics.control_requests.labels(outcome="ok" if ok else "error").inc()
        self._replies.put([*envelope, body])
        if threading.current_thread() is not self._thread:
            with self._wake_lock:
                tx = self._wake_tx
                if tx is not None:
                    with contextlib.suppress(zmq.ZMQError):
                        tx.send(b"", zmq.NOBLOCK)

    # ------------------------------------------------------------------ requests
    def _on_message(self, frames: list[bytes]) -> None:
        # ROUTER: [identity, (b"" from REQ/DEALER-with-delimiter), body...]
        if len(frames) < 2:
            self._metrics.control_requests.labels(outcome="dropped").inc()
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
        if req.cmd in self._inline:
            self._post_reply(envelope, self.execute(req))
            return
        ex = self._executor
        if ex is None:
            self._post_reply(envelope, error_reply(ErrorCode.WRONG_STATE, "shutting down", req.id))
            return
        try:
            ex.submit(lambda: self._post_reply(envelope, self.execute(req)))
        except RuntimeError:
            self._post_reply(envelope, error_reply(ErrorCode.WRONG_STATE, "shutting down", req.id))

    def execute(self, req: Request) -> dict[str, Any]:
        """Run ``req``'s handler; the reply (ok with its result, or the error)."""
        handler = self._handlers.get(req.cmd)
        if handler is None:  # a command in the protocol without a handler is a bug
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

"""The service's wire alone: `ControlServer` on a loopback ROUTER with a handler table of
stand-ins (no driver, no model) — replies and their error codes, inline commands answered
while a slow one runs, the heartbeat tick, and the handler table of the real `Service`
covering every protocol command."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
import zmq.utils.monitor

from focaltrack.daemon.client import ControlClient
from focaltrack.daemon.config import load_config
from focaltrack.daemon.control import MAX_MESSAGE_BYTES, ControlServer, Handler
from focaltrack.daemon.metrics import ServiceMetrics
from focaltrack.daemon.protocol import COMMANDS, MAX_REQUEST_BYTES, ErrorCode, ProtocolError
from focaltrack.daemon.transport import Transport
from focaltrack.daemon.workspace import NotFound
from focaltrack.drivers.base import DriverError


class _Wire:
    def __init__(self, handlers: dict[str, Handler]) -> None:
        net = load_config(None, env={}, overrides={"network.control_port": 0}).network
        self.closing = threading.Event()
        self.ticks = threading.Semaphore(0)
        self.transport = Transport(net)
        self.server = ControlServer(
            handlers,
            inline=frozenset({"status"}),
            metrics=ServiceMetrics(states=["idle"]),
            closing=self.closing,
            tick=self.ticks.release,
            on_crash=lambda: None,
        )
        endpoint = self.server.bind(self.transport, 0)
        self.server.start()
        self.client = ControlClient(endpoint, timeout_s=5.0, retries=1)

    def close(self) -> None:
        self.client.close()
        self.closing.set()
        self.server.join(5.0)
        self.server.close()
        self.transport.close()


@pytest.fixture
def wire() -> Iterator[tuple[_Wire, threading.Event]]:
    release = threading.Event()

    def move_z(args: dict[str, Any]) -> dict[str, Any]:
        release.wait(5.0)  # a slow stage
        return {"z_um": float(args["z_um"])}

    def get_z(args: dict[str, Any]) -> dict[str, Any]:
        raise DriverError("the stage is gone")

    def models(args: dict[str, Any]) -> dict[str, Any]:
        raise NotFound("no models folder")

    def record_stop(args: dict[str, Any]) -> dict[str, Any]:
        raise ProtocolError(ErrorCode.WRONG_STATE, "not recording")

    def start(args: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("a bug")

    w = _Wire(
        {
            "status": lambda args: {"state": "idle"},
            "move_z": move_z,
            "get_z": get_z,
            "models": models,
            "record_stop": record_stop,
            "start": start,
        }
    )
    try:
        yield w, release
    finally:
        release.set()
        w.close()


def _code(reply: dict[str, Any]) -> str:
    assert reply["ok"] is False, reply
    return str(reply["error"]["code"])


def test_replies_and_error_codes(wire: tuple[_Wire, threading.Event]) -> None:
    w, _ = wire
    assert w.client.call("status") == {"state": "idle"}
    assert _code(w.client.request("get_z")) == ErrorCode.DRIVER_ERROR.value
    assert _code(w.client.request("models")) == ErrorCode.NOT_FOUND.value
    assert _code(w.client.request("record_stop")) == ErrorCode.WRONG_STATE.value
    assert _code(w.client.request("start")) == ErrorCode.INTERNAL.value
    # In the protocol, not in this table: a bug, answered rather than dropped.
    reply = w.client.request("calibrations")
    assert _code(reply) == ErrorCode.INTERNAL.value
    assert "not implemented" in reply["error"]["message"]
    assert _code(w.client.request("no_such_command")) == ErrorCode.UNKNOWN_COMMAND.value
    assert w.ticks.acquire(timeout=5.0), "no heartbeat tick"


def test_inline_command_answered_while_a_slow_one_runs(
    wire: tuple[_Wire, threading.Event],
) -> None:
    w, release = wire
    slow: dict[str, Any] = {}
    t = threading.Thread(
        target=lambda: slow.update(w.client.request("move_z", {"z_um": 3.0}, timeout_s=10)),
    )
    other = ControlClient(w.client.endpoint, timeout_s=2.0, retries=1)
    try:
        t.start()
        assert other.call("status") == {"state": "idle"}  # while move_z waits
        release.set()
        t.join(10.0)
        assert slow["ok"] is True and slow["result"] == {"z_um": 3.0}
    finally:
        other.close()


@pytest.fixture
def dealer(wire: tuple[_Wire, threading.Event]) -> Iterator[zmq.Socket[bytes]]:
    ctx = zmq.Context()
    d: zmq.Socket[bytes] = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(wire[0].client.endpoint)
    try:
        yield d
    finally:
        d.close()
        ctx.term()


def _ask(d: zmq.Socket[bytes], *frames: bytes) -> dict[str, Any]:
    d.send_multipart([b"", *frames])
    assert d.poll(30_000), "no reply"
    empty, body = d.recv_multipart()
    assert empty == b""
    reply: dict[str, Any] = json.loads(body)
    return reply


def test_every_reply_has_an_id_even_for_unreadable_requests(dealer: zmq.Socket[bytes]) -> None:
    assert _ask(dealer, b'{"cmd": "status", "id": "s1"}')["id"] == "s1"
    assert _ask(dealer, b'{"cmd": "nope", "id": "u1"}')["id"] == "u1"
    assert _ask(dealer, b'{"cmd": "status"}') == {
        "ok": True,
        "result": {"state": "idle"},
        "id": None,
    }
    for frames in ([b"not json"], [b"{}", b"{}"], [b'{"id": 3}'], [b'{"id": "x" "y"}']):
        reply = _ask(dealer, *frames)
        assert reply["ok"] is False and "id" in reply and reply["id"] is None, frames


def test_requests_too_large(dealer: zmq.Socket[bytes]) -> None:
    """Up to the socket's 16 MiB limit a large request is read and refused with
    ``bad_request``; beyond it ZeroMQ drops the connection unread (docs/protocol.md), the
    client's socket reconnects by itself and the service answers the next request."""
    pad = b"x" * (MAX_REQUEST_BYTES + 1)
    reply = _ask(dealer, b'{"cmd": "status", "id": "big", "args": {"x": "' + pad + b'"}}')
    assert reply["error"]["code"] == ErrorCode.BAD_REQUEST.value and reply["id"] == "big"
    assert str(MAX_REQUEST_BYTES) in reply["error"]["message"]
    pad = b"x" * MAX_MESSAGE_BYTES
    mon = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        dealer.send_multipart([b"", b'{"cmd": "status", "id": "huge", "args": {"x": "' + pad])
        assert mon.poll(30_000), "the service kept a connection that sent over 16 MiB"
        event = zmq.utils.monitor.recv_monitor_message(mon)
        assert event["event"] == zmq.EVENT_DISCONNECTED
    finally:
        dealer.disable_monitor()
        mon.close()
    # Reconnected: answered, and nothing came for the huge request.
    assert _ask(dealer, b'{"cmd": "status", "id": "after"}')["id"] == "after"
    assert not dealer.poll(0)


def test_service_handler_table_covers_every_command(tmp_path: Any) -> None:
    from focaltrack.daemon.service import Service

    cfg = load_config(None, env={}, overrides={"workspace.dir": str(tmp_path)})
    svc = Service(cfg)
    svc._open_driver()  # the simulated microscope, not streaming
    from focaltrack.daemon.workspace import Workspace

    control, _ = svc._compose(Workspace(tmp_path))  # the table, nothing bound or started
    try:
        assert set(control._handlers) == set(COMMANDS)
    finally:
        assert svc._driver is not None
        svc._driver.close()

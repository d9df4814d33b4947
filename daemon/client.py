"""A small Python client for the service: control calls and a subscriber.

    from focaltrack.daemon.client import ControlClient, Subscriber

    with ControlClient("tcp://127.0.0.1:5560") as ctl:
        print(ctl.call("status")["state"])
        ctl.call("move_z", z_um=12.5)

    with Subscriber("tcp://127.0.0.1:5561", topics=("track", "hb")) as sub:
        topic, header, payload = sub.recv(timeout_s=2.0)

:class:`ControlClient` uses a DEALER socket and the "lazy pirate" pattern: each attempt waits at
most ``timeout_s`` for the reply; on a timeout the socket is closed (``LINGER`` 0, so nothing
queued survives) and rebuilt, and the request is sent again, ``retries`` attempts in all, then
:class:`TimeoutError`. Only commands marked idempotent in the protocol table (status, get_z,
move_z, job, calibrations, models) and unknown ones are resent; the others (``train``,
``start``, ...) get one attempt, because a lost reply does not mean the service did nothing:
ask ``status`` before trying again. ``request(..., retries=N)`` overrides this. Replies carry
the request id, so a late reply to an earlier request is never taken for the current one.

:class:`Subscriber` subscribes to whole topics (no topic is a prefix of another), counts
sequence gaps per topic (messages lost to the high-water mark or a slow reader) and can keep
only the newest message per topic, which is what a controller that steers wants.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import zmq

from focaltrack.common.errors import FocaltrackError
from focaltrack.daemon.protocol import COMMANDS, Topic, decode_message, make_request

Message = tuple[str, dict[str, Any], bytes | None]


class ControlError(FocaltrackError):
    """The service answered ``ok: false``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def load_curve_client(
    server_public_file: str | os.PathLike[str], client_secret_file: str | os.PathLike[str]
) -> dict[str, bytes]:
    """CURVE options for a client: the server's public key file and our secret key file
    (as written by ``zmq.auth.create_certificates``). Pass as ``curve=`` to either class."""
    import zmq.auth

    server_public, _ = zmq.auth.load_certificate(str(server_public_file))
    public, secret = zmq.auth.load_certificate(str(client_secret_file))
    if secret is None:
        raise ValueError(f"{client_secret_file} holds no secret key (use the .key_secret file)")
    return {"server_public": server_public, "public": public, "secret": secret}


def _apply_curve(sock: zmq.Socket[bytes], curve: Mapping[str, bytes] | None) -> None:
    if curve:
        sock.curve_serverkey = curve["server_public"]
        sock.curve_publickey = curve["public"]
        sock.curve_secretkey = curve["secret"]


class ControlClient:
    """Request/reply to the service's control ROUTER, with timeouts and reconnects."""

    def __init__(
        self,
        endpoint: str,
        *,
        timeout_s: float = 5.0,
        retries: int = 3,
        curve: Mapping[str, bytes] | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if retries < 1:
            raise ValueError(f"retries must be ≥ 1, got {retries}")
        self.endpoint = endpoint
        self.timeout_s = float(timeout_s)
        self.retries = int(retries)
        self._curve = curve
        self._ctx = context or zmq.Context.instance()
        self._ids = itertools.count()
        self._prefix = os.urandom(4).hex()
        self._sock: zmq.Socket[bytes] | None = None
        #: How many times the socket was rebuilt after a timeout.
        self.reconnects = 0

    def _socket(self) -> zmq.Socket[bytes]:
        if self._sock is None:
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SNDTIMEO, max(1, int(self.timeout_s * 1000)))
            _apply_curve(s, self._curve)
            if "[" in self.endpoint:
                s.setsockopt(zmq.IPV6, 1)
            s.connect(self.endpoint)
            self._sock = s
        return self._sock

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def request(
        self,
        cmd: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
        retries: int | None = None,
    ) -> dict[str, Any]:
        """Send one request and return the whole reply object (``ok`` true or false)."""
        timeout = self.timeout_s if timeout_s is None else float(timeout_s)
        if retries is not None:
            attempts = int(retries)
        else:
            known = COMMANDS.get(cmd)
            # Resending e.g. "train" after a lost reply could start a second job.
            attempts = self.retries if known is None or known.idempotent else 1
        rid = f"{self._prefix}-{next(self._ids)}"
        body = make_request(cmd, args, rid)
        for attempt in range(attempts):
            if attempt:
                self._drop_socket()  # lazy pirate: a fresh socket, nothing stale queued
                self.reconnects += 1
            sock = self._socket()
            try:
                sock.send_multipart([b"", body])
            except zmq.Again:
                continue
            deadline = time.monotonic() + timeout
            while (left := deadline - time.monotonic()) > 0:
                if not sock.poll(max(1, int(left * 1000)), zmq.POLLIN):
                    break
                frames = sock.recv_multipart()
                reply = _parse_reply(frames)
                if reply is not None and reply.get("id") in (rid, None):
                    return reply
                # a late reply to an earlier request: ignore and keep waiting
        self._drop_socket()
        raise TimeoutError(
            f"no reply to {cmd!r} from {self.endpoint} after {attempts} attempt(s) of "
            f"{timeout:g} s (is the service running?)"
        )

    def call(self, cmd: str, **args: Any) -> Any:
        """``result`` of a command; :class:`ControlError` if the service says no."""
        reply = self.request(cmd, args)
        if reply.get("ok") is True:
            return reply.get("result")
        err = reply.get("error") or {}
        raise ControlError(str(err.get("code", "internal")), str(err.get("message", reply)))

    def close(self) -> None:
        self._drop_socket()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_reply(frames: list[bytes]) -> dict[str, Any] | None:
    if frames and frames[0] == b"":
        frames = frames[1:]
    if len(frames) != 1:
        return None
    try:
        obj = json.loads(frames[0])
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and isinstance(obj.get("ok"), bool) else None


class Subscriber:
    """SUB socket on the service's PUB, decoding ``[topic, header(, payload)]`` messages.

    ``topics`` empty means all topics. With ``conflate_newest``, :meth:`recv` first drains
    what is queued and returns only the newest message of each topic (oldest topic first);
    the rest are counted in ``discarded[topic]``. ``lost[topic]`` counts messages missing from the
    sequence numbers (dropped at a high-water mark); ``malformed`` counts undecodable ones.
    """

    def __init__(
        self,
        endpoint: str,
        topics: Iterable[str] = (),
        *,
        conflate_newest: bool = False,
        rcvhwm: int = 1000,
        curve: Mapping[str, bytes] | None = None,
        context: zmq.Context[zmq.Socket[bytes]] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.topics = tuple(Topic(t).value for t in topics)
        self.conflate_newest = conflate_newest
        self._ctx = context or zmq.Context.instance()
        self._sock: zmq.Socket[bytes] = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.RCVHWM, int(rcvhwm))
        _apply_curve(self._sock, curve)
        if "[" in endpoint:
            self._sock.setsockopt(zmq.IPV6, 1)
        for t in self.topics or (t.value for t in Topic):
            self._sock.setsockopt(zmq.SUBSCRIBE, t.encode("ascii"))
        self._sock.connect(endpoint)
        self._pending: dict[str, Message] = {}
        self._last_seq: dict[str, int] = {}
        self.lost: dict[str, int] = {}
        self.received: dict[str, int] = {}
        self.discarded: dict[str, int] = {}
        self.malformed = 0

    @property
    def socket(self) -> zmq.Socket[bytes]:
        return self._sock

    def _read_one(self) -> Message | None:
        """One message from the socket (already known to be readable); None if malformed."""
        frames = self._sock.recv_multipart()
        try:
            topic, header, payload = decode_message(frames)
            seq = int(header["seq"])
        except (ValueError, KeyError, TypeError):
            self.malformed += 1
            return None
        last = self._last_seq.get(topic)
        if last is not None and seq > last + 1:
            self.lost[topic] = self.lost.get(topic, 0) + (seq - last - 1)
        self._last_seq[topic] = seq
        self.received[topic] = self.received.get(topic, 0) + 1
        return topic, header, payload

    def _drain_into_pending(self) -> None:
        while self._sock.poll(0, zmq.POLLIN):
            msg = self._read_one()
            if msg is None:
                continue
            if msg[0] in self._pending:
                del self._pending[msg[0]]
                self.discarded[msg[0]] = self.discarded.get(msg[0], 0) + 1
            self._pending[msg[0]] = msg

    def recv(self, timeout_s: float | None = None) -> Message:
        """The next message (the newest per topic with ``conflate_newest``);
        :class:`TimeoutError` if none arrives within ``timeout_s`` (None = wait forever)."""
        deadline = None if timeout_s is None else time.monotonic() + float(timeout_s)
        while True:
            if self.conflate_newest:
                self._drain_into_pending()
            if self._pending:
                topic = next(iter(self._pending))
                return self._pending.pop(topic)
            if deadline is None:
                wait_ms = -1
            else:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no message from {self.endpoint} within {timeout_s:g} s")
                wait_ms = max(1, int(left * 1000))
            if not self._sock.poll(wait_ms, zmq.POLLIN):
                continue  # the deadline check above raises
            if self.conflate_newest:
                continue  # drained at the top of the loop
            msg = self._read_one()
            if msg is not None:
                return msg

    def drain_newest(self) -> dict[str, Message]:
        """Everything queued now, without waiting: the newest message of each topic
        (the older ones are counted in ``discarded``)."""
        self._drain_into_pending()
        out = dict(self._pending)
        self._pending.clear()
        return out

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def endpoint(host: str, port: int) -> str:
    """``tcp://host:port`` (IPv6 literals bracketed; ``0.0.0.0``/``*`` -> loopback)."""
    if host in ("*", "0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def endpoints_from_config(config_path: str | os.PathLike[str] | None) -> tuple[str, str]:
    """(control, pub) endpoints a local client should use for a service run with this config
    (the environment's ``FOCALTRACK_NETWORK_*`` apply too)."""
    from focaltrack.daemon.config import load_config

    cfg = load_config(Path(config_path) if config_path else None)
    net = cfg.network
    return endpoint(net.bind, net.control_port), endpoint(net.bind, net.pub_port)


# ----------------------------------------------------------------------------- CLI helpers


def connection_from_args(args: Any, *, need: str) -> tuple[str, dict[str, bytes] | None]:
    """(endpoint, curve options) for ``need`` = "control" or "pub" from parsed arguments.

    The endpoint: ``--control``/``--pub`` as given; else the one the workspace's
    ``run/endpoints.json`` names (``--workspace``, else the configured workspace), which a
    running service wrote, port 0 or not; else the configured port (``--config``, the
    ``FOCALTRACK_*`` environment, the defaults). Raises ValueError with a message a user can
    act on: no service on an explicit ``--workspace``, or a dead one named there.
    """
    explicit = getattr(args, need, None)
    if explicit:
        ep = explicit
    else:
        from focaltrack.daemon.config import load_config, workspace_dir

        cfg = load_config(args.config)
        given = getattr(args, "workspace", None)
        ws = Path(given).expanduser() if given else workspace_dir(cfg)
        found = _from_workspace(ws, need, explicit_workspace=bool(given))
        if found is not None:
            ep = found
        else:
            port = cfg.network.control_port if need == "control" else cfg.network.pub_port
            if port == 0:
                raise ValueError(
                    f"network.{need}_port is 0 (any free port) in this configuration and no "
                    f"service runs on the workspace {ws}: pass --workspace with the service's "
                    f"workspace, or --{need} with the endpoint it logged at start"
                )
            ep = endpoint(cfg.network.bind, port)
    if not ep.startswith(("tcp://", "ipc://", "inproc://")):
        raise ValueError(f"--{need} {ep!r} is not an endpoint like tcp://127.0.0.1:5560")
    curve = None
    if args.curve_server_key or args.curve_client_key:
        if not (args.curve_server_key and args.curve_client_key):
            raise ValueError("CURVE needs both --curve-server-key and --curve-client-key")
        try:
            curve = load_curve_client(args.curve_server_key, args.curve_client_key)
        except OSError as e:
            raise ValueError(f"cannot read CURVE keys: {e}") from None
    return ep, curve


def _from_workspace(ws: Path, need: str, *, explicit_workspace: bool) -> str | None:
    """The ``need`` endpoint that ``ws/run/endpoints.json`` names, or None when there is no
    such file (an error instead for a workspace the user named). A file whose service is no
    longer running is an error either way: its ports may belong to anything by now."""
    from focaltrack.daemon.lock import service_status

    svc = service_status(ws)
    if svc is None:
        if explicit_workspace:
            raise ValueError(
                f"no focaltrack service is running on the workspace {ws} "
                "(no run/endpoints.json there)"
            )
        return None
    pid = "an unknown pid" if svc.pid is None else f"pid {svc.pid}"
    if not svc.running:
        raise ValueError(
            f"the service that {ws / 'run' / 'endpoints.json'} names ({pid}) is not running: "
            "it did not stop cleanly; start it again with focaltrack serve"
        )
    ep = svc.endpoints.get(need)
    if not ep:
        raise ValueError(f"{ws / 'run' / 'endpoints.json'} names no {need} endpoint ({pid})")
    return ep

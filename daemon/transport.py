"""The ZeroMQ side shared by the service's sockets: one context, CURVE, and binding.

`Transport` makes the sockets of the control server (ROUTER) and the publisher (PUB) with
the same settings: no linger, IPv6 when the bind address is one, and, when
``network.curve_server_secret_file`` is set, CURVE server keys with a ZAP authenticator that
admits the public keys in ``network.curve_allowed_clients_dir``. Every key file is read when
`Transport` is made, which the service does before it opens anything else.
"""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Any

import zmq

from focaltrack.common.errors import FocaltrackError
from focaltrack.daemon.config import ConfigError

if TYPE_CHECKING:
    from focaltrack.daemon.config import NetworkConfig

log = logging.getLogger("focaltrack.service")

__all__ = ["ServiceError", "Transport", "zmq_endpoint"]


class ServiceError(FocaltrackError, RuntimeError):
    """The service could not start (the message says why)."""


def zmq_endpoint(host: str, port: int) -> str:
    h = host.strip()
    if h == "localhost":
        h = "127.0.0.1"
    if ":" in h and not h.startswith("["):
        h = f"[{h}]"
    return f"tcp://{h}:{port if port else '*'}"


class Transport:
    """The context (and the CURVE authenticator) of one service; `close` ends them once
    every socket made here is closed. Raises `ConfigError` when the key file is unusable."""

    def __init__(self, net: NetworkConfig) -> None:
        self._net = net
        self.ctx: zmq.Context[Any] = zmq.Context()
        self._auth: Any = None
        self._public: bytes | None = None
        self._secret: bytes | None = None
        self._curve = bool(net.curve_server_secret_file)
        if self._curve:
            try:
                self._start_curve(net)
            except BaseException:
                self.close()
                raise

    def _start_curve(self, net: NetworkConfig) -> None:
        from zmq.auth import load_certificate, load_certificates
        from zmq.auth.thread import ThreadAuthenticator

        try:
            self._public, self._secret = load_certificate(net.curve_server_secret_file)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"network.curve_server_secret_file: cannot read {net.curve_server_secret_file}: {e}"
            ) from e
        if self._secret is None:
            raise ConfigError(
                f"network.curve_server_secret_file: {net.curve_server_secret_file} holds no "
                "secret key (use the .key_secret file from zmq.auth.create_certificates)"
            )
        # The authenticator would only log a client key it cannot read, and admit nobody.
        clients_dir = net.curve_allowed_clients_dir
        try:
            allowed = load_certificates(clients_dir)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"network.curve_allowed_clients_dir: cannot read the client keys in "
                f"{clients_dir}: {e}"
            ) from e
        if not allowed:
            log.warning(
                "network.curve_allowed_clients_dir %s holds no client public key (*.key): "
                "no client can connect",
                clients_dir,
            )
        self._auth = ThreadAuthenticator(self.ctx)
        self._auth.start()
        self._auth.configure_curve(domain="*", location=net.curve_allowed_clients_dir)

    def socket(self, kind: int) -> zmq.Socket[bytes]:
        """A network socket of ``kind`` (a CURVE server when keys are configured)."""
        s: zmq.Socket[bytes] = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        if ":" in self._net.bind:
            s.setsockopt(zmq.IPV6, 1)
        if self._curve:
            s.curve_secretkey = self._secret
            s.curve_publickey = self._public
            s.curve_server = True
        return s

    def bind(self, s: zmq.Socket[bytes], port: int, what: str) -> str:
        """Bind ``s`` to ``network.bind``:``port`` (0: any free port); the bound endpoint.
        Raises `ServiceError` naming ``what`` socket when it cannot."""
        ep = zmq_endpoint(self._net.bind, port)
        try:
            s.bind(ep)
        except zmq.ZMQError as e:
            raise ServiceError(f"cannot bind the {what} socket to {ep}: {e}") from e
        return s.getsockopt_string(zmq.LAST_ENDPOINT)

    def close(self) -> None:
        if self._auth is not None:
            with contextlib.suppress(Exception):
                self._auth.stop()
            self._auth = None
        with contextlib.suppress(Exception):
            self.ctx.term()

"""systemd notifications without the systemd package: ``READY=1``, ``STOPPING=1`` and the
rate-limited ``WATCHDOG=1`` keep-alive (`Notifier`), over the ``NOTIFY_SOCKET`` datagram
socket systemd hands to the process it started."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

log = logging.getLogger("focaltrack.service")

__all__ = ["Notifier", "sd_notify"]


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


class Notifier:
    """The notifications of one service. ``watchdog`` may be called as often as wanted (the
    frame loop calls it per frame); it sends at most one keep-alive a second."""

    def __init__(self) -> None:
        # systemd hands NOTIFY_SOCKET to the process it started; read it once so that every
        # message of this service goes to the socket it announced READY on, even if the
        # environment changes later (several services in one process, as in the tests).
        self._env = {k: v for k, v in os.environ.items() if k == "NOTIFY_SOCKET"}
        self._last_watchdog = 0.0
        self._lock = threading.Lock()

    def send(self, message: str) -> bool:
        return sd_notify(message, self._env)

    def watchdog(self) -> None:
        now = time.monotonic()
        with self._lock:  # the control and the driver thread both call it
            if now - self._last_watchdog < 1.0:
                return
            self._last_watchdog = now
        self.send("WATCHDOG=1")

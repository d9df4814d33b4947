"""The PUB side of the service: one socket shared by every thread that publishes, the
per-topic sequence numbers, events and heartbeats.

A ZeroMQ socket may be used from several threads when every use is serialised: every send
goes through `Publisher` under one lock. The socket is taken away under the same lock before
it is closed, so a late publisher finds none and drops its message instead of touching a
closed socket.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import zmq

from focaltrack.daemon.protocol import (
    EventKind,
    Sequencer,
    Topic,
    encode_message,
    event_header,
    hb_header,
)

if TYPE_CHECKING:
    from focaltrack.daemon.metrics import ServiceMetrics
    from focaltrack.daemon.transport import Transport

log = logging.getLogger("focaltrack.service")

__all__ = ["Publisher"]


class Publisher:
    """Publishes headers (and an optional payload) on the attached PUB socket; counts them in
    ``focaltrack_published_messages_total``. Never blocks: at the high-water mark the message
    is dropped, as PUB would do anyway."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics
        self._seq = Sequencer()
        # Re-entrant: an event's sequence number is taken and the event sent under it, so
        # events from different threads go out in sequence order.
        self._lock = threading.RLock()
        self._pub: zmq.Socket[bytes] | None = None

    def bind(self, transport: Transport, port: int, hwm: int) -> str:
        """Create and bind the PUB socket (send high-water mark ``hwm`` messages per
        subscriber); the bound endpoint. Raises `ServiceError` when it cannot bind."""
        sock = transport.socket(zmq.PUB)
        sock.setsockopt(zmq.SNDHWM, hwm)
        with self._lock:
            self._pub = sock
        return transport.bind(sock, port, "publish")

    def close(self) -> None:
        """Stop publishing and close the socket (later messages are dropped)."""
        with self._lock:
            pub, self._pub = self._pub, None
        if pub is not None:
            with contextlib.suppress(Exception):
                pub.close(linger=0)

    def next_seq(self, topic: Topic) -> int:
        """The next sequence number of ``topic`` (taken by the caller building a header)."""
        return self._seq.next(topic)

    def publish(self, header: Mapping[str, Any], payload: bytes | None = None) -> None:
        frames = encode_message(header, payload)
        with self._lock:
            pub = self._pub
            if pub is None:
                return
            try:
                pub.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                return  # PUB drops at the high-water mark anyway
        self._metrics.published_messages.labels(topic=header["topic"]).inc()

    def publish_safe(self, header: Mapping[str, Any]) -> None:
        try:
            self.publish(header)
        except Exception as e:  # publishing must never take the caller down
            log.warning("publish %s failed: %s", header.get("topic"), e)

    def event(self, kind: EventKind, **fields: Any) -> None:
        """An ``event`` message of ``kind`` (see `protocol.event_header` for the fields)."""
        with self._lock:
            self.publish_safe(event_header(seq=self._seq.next(Topic.EVENT), kind=kind, **fields))

    def heartbeat(self, **fields: Any) -> None:
        """An ``hb`` message (see `protocol.hb_header` for the fields)."""
        self.publish_safe(hb_header(seq=self._seq.next(Topic.HB), **fields))

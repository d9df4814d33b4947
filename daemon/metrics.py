"""Prometheus metrics of the service: one registry, served over HTTP by the main process.

Every name starts with ``focaltrack_``, is in base units (seconds) and counters end in
``_total``. No label carries a per-frame or per-track value; the label sets are small and
fixed (drop reason, job kind, state, request outcome), and every label value is created at
start so a scrape shows zeros instead of missing series.

    metrics = ServiceMetrics()
    server = metrics.serve("127.0.0.1", 0)   # port 0: a free port
    metrics.frames_acquired.inc()
    ...
    server.close()

The HTTP server is prometheus_client's own WSGI server on a daemon thread; ``/metrics`` (and
any other path) answers the text exposition format.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import start_wsgi_server

log = logging.getLogger(__name__)

__all__ = [
    "DROP_REASONS",
    "LATENCY_BUCKETS_S",
    "LOCALIZATION_BUCKETS",
    "MetricsServer",
    "ServiceMetrics",
]

#: Frame-to-publish and inference latency buckets: 0.5 ms .. 1 s, six of them below 10 ms.
LATENCY_BUCKETS_S: tuple[float, ...] = (
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.2,
    0.5,
    1.0,
)
#: Localizations per analysed frame.
LOCALIZATION_BUCKETS: tuple[float, ...] = (0, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000)
#: Why a frame was not analysed: lost by the camera / its buffer, or skipped because the
#: analysis was behind (it always works on the newest frame).
DROP_REASONS: tuple[str, ...] = ("camera", "analysis_behind")
JOB_KINDS: tuple[str, ...] = ("calibrate", "train")
REQUEST_OUTCOMES: tuple[str, ...] = ("ok", "error", "dropped")


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """A running HTTP endpoint: ``url`` has the actual port; `close` stops it."""

    host: str
    port: int
    _server: object
    _thread: threading.Thread

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self, timeout_s: float = 2.0) -> None:
        srv = self._server
        srv.shutdown()  # type: ignore[attr-defined]
        srv.server_close()  # type: ignore[attr-defined]
        self._thread.join(timeout_s)


class ServiceMetrics:
    """All metrics of one service, in their own `CollectorRegistry` (never the global one,
    so several services in one process, as in the tests, do not collide)."""

    def __init__(self, states: Iterable[str] = ()) -> None:
        # No ``*_created`` series: they double the exposition and nothing here reads them.
        disable_created_metrics()
        r = self.registry = CollectorRegistry()
        self.frames_acquired = Counter(
            "focaltrack_frames_acquired", "Frames received from the camera.", registry=r
        )
        self.frames_analysed = Counter(
            "focaltrack_frames_analysed", "Frames localized, tracked and published.", registry=r
        )
        self.frames_dropped = Counter(
            "focaltrack_frames_dropped",
            "Frames not analysed: lost by the camera (reason=camera) or skipped because the "
            "analysis was behind and took a newer frame (reason=analysis_behind).",
            ["reason"],
            registry=r,
        )
        for reason in DROP_REASONS:
            self.frames_dropped.labels(reason=reason)
        self.frame_to_publish_seconds = Histogram(
            "focaltrack_frame_to_publish_seconds",
            "From the frame's acquisition time stamp to its track message on the PUB socket.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "focaltrack_inference_seconds",
            "Localizer time per frame (both networks and decoding).",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.localizations_per_frame = Histogram(
            "focaltrack_localizations_per_frame",
            "Emitters localized in each analysed frame.",
            buckets=LOCALIZATION_BUCKETS,
            registry=r,
        )
        self.live_tracks = Gauge(
            "focaltrack_live_tracks", "Tracks alive after the last analysed frame.", registry=r
        )
        self.job_progress = Gauge(
            "focaltrack_job_progress",
            "Progress 0..1 of the latest job of each kind.",
            ["kind"],
            registry=r,
        )
        for kind in JOB_KINDS:
            self.job_progress.labels(kind=kind)
        self.state = Gauge(
            "focaltrack_state",
            "1 for the service's current state, 0 for the others.",
            ["state"],
            registry=r,
        )
        self._states = tuple(states)
        for s in self._states:
            self.state.labels(state=s)
        self.control_requests = Counter(
            "focaltrack_control_requests",
            "Control requests answered (ok / error) or dropped as unusable (no identity).",
            ["outcome"],
            registry=r,
        )
        for outcome in REQUEST_OUTCOMES:
            self.control_requests.labels(outcome=outcome)
        self.recording_frames = Counter(
            "focaltrack_recording_frames", "Frames written to recordings.", registry=r
        )
        self.recording_dropped = Counter(
            "focaltrack_recording_dropped",
            "Items the recorder could not take because its queue was full.",
            registry=r,
        )
        self.published_messages = Counter(
            "focaltrack_published_messages",
            "Messages sent on the PUB socket, by topic.",
            ["topic"],
            registry=r,
        )
        for topic in ("loc", "track", "event", "hb"):
            self.published_messages.labels(topic=topic)

    def set_state(self, state: str) -> None:
        """Make ``state`` the one state gauge at 1."""
        names = set(self._states) | {state}
        for s in names:
            self.state.labels(state=s).set(1.0 if s == state else 0.0)

    def serve(self, host: str, port: int) -> MetricsServer:
        """Start the HTTP endpoint on ``host:port`` (0: a free port); `OSError` if taken."""
        server, thread = start_wsgi_server(int(port), addr=host, registry=self.registry)
        thread.name = "focaltrack-metrics-http"
        actual = int(server.server_port)
        log.debug("metrics on %s:%d", host, actual)
        return MetricsServer(host, actual, server, thread)

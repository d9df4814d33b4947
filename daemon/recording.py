"""The recording of a live session: ``record_start`` / ``record_stop`` around one
`focaltrack.daemon.recorder.Recorder` (the HDF5 writer and its thread), the frames and
results fed to it from the pipeline threads, and the ``recording`` events."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from focaltrack.daemon import __version__
from focaltrack.daemon.protocol import ErrorCode, EventKind, ProtocolError

if TYPE_CHECKING:
    from focaltrack.daemon.analysis import LoadedModel
    from focaltrack.daemon.config import RecordingConfig
    from focaltrack.daemon.metrics import ServiceMetrics
    from focaltrack.daemon.publisher import Publisher
    from focaltrack.daemon.recorder import Recorder, RecordingSummary
    from focaltrack.daemon.repair import Repaired
    from focaltrack.daemon.state import ServiceState
    from focaltrack.daemon.workspace import Workspace
    from focaltrack.drivers.base import CameraInfo, Frame
    from focaltrack.records import Localizations, Tracks

log = logging.getLogger("focaltrack.service")

__all__ = ["RecordingSession"]


class RecordingSession:
    """At most one recording at a time, into ``<workspace>/recordings``. Drops (a full
    writer queue) count in ``focaltrack_recording_dropped_total``.

    Made when the service starts, it first repairs the recordings that a crash left open
    (`focaltrack.daemon.repair`), so that every program opens them; ``repaired`` lists them.
    """

    def __init__(
        self,
        ws: Workspace,
        config: RecordingConfig,
        *,
        state: ServiceState,
        publisher: Publisher,
        metrics: ServiceMetrics,
    ) -> None:
        self._ws = ws
        self._config = config
        self._state = state
        self._publisher = publisher
        self._metrics = metrics
        self._recorder: Recorder | None = None
        self._name: str | None = None
        self._lock = threading.Lock()
        from focaltrack.daemon.repair import repair_crashed_recordings

        # Now, before this service records anything: none of them is its own live file.
        self.repaired: list[Repaired] = repair_crashed_recordings(ws.recordings_dir)

    @property
    def name(self) -> str | None:
        """The recording under way, or None."""
        return self._name

    @property
    def active(self) -> bool:
        return self._recorder is not None

    def info(self) -> dict[str, Any] | None:
        """``status``'s ``recording``: name, path, frames written, dropped (None if none)."""
        r = self._recorder
        if r is None or not self._name:
            return None
        return {
            "name": self._name,
            "path": str(r.path),
            "frames": r.frames_written,
            "dropped": r.dropped,
        }

    def start(
        self,
        args: dict[str, Any],
        *,
        require_live: Callable[[], None],
        camera: CameraInfo,
        model: LoadedModel | None,
    ) -> dict[str, Any]:
        """The ``record_start`` command. ``require_live`` raises when there is no live
        session to record (checked under the recording lock)."""
        from focaltrack.daemon.recorder import Recorder, RecorderError

        with self._lock:
            require_live()
            if self._recorder is not None:
                raise ProtocolError(
                    ErrorCode.BUSY, f"already recording {self._name}: record_stop first"
                )
            name = args.get("name") or self._ws.new_name("rec")
            path = self._ws.recording_path(name)
            if path.exists():
                raise ProtocolError(ErrorCode.BAD_ARGS, f"recording {name!r} already exists")
            c = camera
            cal_sha = ""
            if model is not None:
                cal_sha = str(model.calibration_sha256 or "")
            r = Recorder(
                path,
                frame_shape=(c.height, c.width),
                frame_dtype="uint8" if c.bit_depth <= 8 else "uint16",
                frames=bool(args.get("frames", True)),
                calibration_sha256=cal_sha,
                model=model.name if model else "",
                pixel_size_um=c.pixel_size_um,
                attrs={
                    "calibration": self._state.calibration or "",
                    "camera": c.name,
                    "focaltrack_version": __version__,
                },
                flush_interval_s=self._config.flush_interval_s,
                queue_frames=self._config.queue_frames,
                on_frames_written=self._metrics.recording_frames.inc,
            )
            try:
                r.start()
            except RecorderError as e:
                raise ProtocolError(ErrorCode.BAD_ARGS, str(e)) from e
            self._recorder = r
            self._name = name
        self._publisher.event(
            EventKind.RECORDING,
            recording={"name": name, "path": str(path), "active": True, "frames": 0},
        )
        log.info("recording to %s", path)
        return {"recording": name, "path": str(path)}

    def stop_command(self, args: dict[str, Any]) -> dict[str, Any]:
        """The ``record_stop`` command: close the file; its summary."""
        if self._recorder is None:
            raise ProtocolError(ErrorCode.WRONG_STATE, "not recording")
        summary = self.stop(timeout_s=10.0)
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

    def stop(self, timeout_s: float) -> tuple[str, RecordingSummary] | None:
        """Stop the recording if there is one: (its name, the writer's summary)."""
        with self._lock:
            r, name = self._recorder, self._name
            self._recorder = None
            self._name = None
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
        self._publisher.event(
            EventKind.RECORDING,
            recording={"name": name, "path": s.path, "active": False, "frames": s.frames},
        )
        if s.error:
            self._state.report_error(ErrorCode.INTERNAL, f"recording {name}: {s.error}")
        return name, s

    # ------------------------------------------------------------------ pipeline threads
    def add_frame(self, frame: Frame) -> None:
        r = self._recorder
        if r is not None and not r.add_frame(frame) and r.running:
            self._metrics.recording_dropped.inc()

    def add_results(self, frame_index: int, locs: Localizations, tracks: Tracks) -> None:
        r = self._recorder
        if r is not None and not r.add_results(frame_index, locs, tracks) and r.running:
            self._metrics.recording_dropped.inc()

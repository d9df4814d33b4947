"""The live session: the camera and focus, the analysis pipeline and what it publishes.

`LiveSession` answers ``start`` / ``stop`` (one `LivePipeline`: a driver thread and an
analysis thread, see `focaltrack.daemon.pipeline`), ``record_start`` / ``record_stop``
(through its `RecordingSession`), ``load_model``, ``get_z`` and ``move_z``. It is the
pipeline's sink: each analysed frame goes out as a ``loc`` and a ``track`` message and to
the recording; camera faults move the state to ``error`` and back.
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

from focaltrack.daemon.analysis import LoadedModel, load_model
from focaltrack.daemon.pipeline import LivePipeline
from focaltrack.daemon.protocol import (
    ErrorCode,
    EventKind,
    ProtocolError,
    State,
    Topic,
)
from focaltrack.drivers.base import DriverError
from focaltrack.records.wire import loc_message, track_message

if TYPE_CHECKING:
    from collections.abc import Callable

    from focaltrack.daemon.config import AnalysisConfig, DriverConfig
    from focaltrack.daemon.metrics import ServiceMetrics
    from focaltrack.daemon.publisher import Publisher
    from focaltrack.daemon.recording import RecordingSession
    from focaltrack.daemon.state import ServiceState
    from focaltrack.daemon.workspace import Workspace
    from focaltrack.drivers.base import CameraInfo, Driver, Frame
    from focaltrack.records import Localizations, Tracks

log = logging.getLogger("focaltrack.service")

__all__ = ["LiveSession"]


class LiveSession:
    """Live analysis for one service. The state transitions it makes hold
    ``state.transition``; the pipeline callbacks only move between ``live`` and ``error``."""

    def __init__(
        self,
        driver: Driver,
        camera: CameraInfo,
        *,
        driver_config: DriverConfig,
        analysis: AnalysisConfig,
        ws: Workspace,
        state: ServiceState,
        publisher: Publisher,
        metrics: ServiceMetrics,
        recording: RecordingSession,
        watchdog: Callable[[], None],
        tracker: Any = None,
    ) -> None:
        self.driver = driver
        self.camera = camera
        self._driver_config = driver_config
        self._analysis = analysis
        self._ws = ws
        self._state = state
        self._publisher = publisher
        self._metrics = metrics
        self.recording = recording
        self._watchdog = watchdog
        self._tracker = tracker  # the [tracker] section (ServiceConfig.tracker); None: defaults
        self._pipeline: LivePipeline | None = None
        # Frames of the pipelines already retired, added to the running one's counts.
        self._totals = {"acquired": 0, "analysed": 0, "camera": 0, "analysis_behind": 0}

    # ------------------------------------------------------------------ counts
    @property
    def running(self) -> bool:
        """True while the pipeline's threads run (they feed the systemd watchdog then)."""
        p = self._pipeline
        return p is not None and p.running

    def counts(self) -> dict[str, int]:
        """Frames over the service's life: acquired, analysed, dropped by reason."""
        c = dict(self._totals)
        p = self._pipeline
        if p is not None:
            for k, v in p.counts().items():
                c[k] += v
        return c

    # ------------------------------------------------------------------ start / stop
    def start(self, args: dict[str, Any]) -> dict[str, Any]:
        """The ``start`` command."""
        st = self._state
        with st.transition:
            if st.closing.is_set():
                raise ProtocolError(ErrorCode.WRONG_STATE, "the service is shutting down")
            if st.state is State.LIVE:
                return {"state": State.LIVE.value}
            if st.state not in (State.IDLE, State.ERROR):
                raise ProtocolError(ErrorCode.WRONG_STATE, f"cannot start while {st.state.value}")
            model = st.model
            if model is None:
                raise ProtocolError(
                    ErrorCode.WRONG_STATE,
                    "no model loaded: train one (train) or load one (load_model) first",
                )
            if self._pipeline is not None:  # left over from a failed camera
                self._retire_pipeline(timeout_s=5.0)
            interval = args.get("interval_ms", self._driver_config.interval_ms)
            p = LivePipeline(
                self.driver,
                model.analysis,
                self,
                self._metrics,
                interval_ms=float(interval),
                queue_frames=self._analysis.queue_frames,
                frame_timeout_s=self._driver_config.frame_timeout_s,
                on_raw_frame=self.recording.add_frame,
                on_fault=self._on_camera_fault,
                on_recovered=self._on_camera_recovered,
                on_failed=self._on_camera_failed,
                on_analysis_error=self._on_analysis_error,
                watchdog=self._watchdog,
            )
            try:
                p.start()
            except DriverError as e:
                st.report_error(ErrorCode.DRIVER_ERROR, str(e), EventKind.DRIVER)
                raise
            self._pipeline = p
            st.set(State.LIVE)
            return {"state": State.LIVE.value}

    def stop_command(self, args: dict[str, Any]) -> dict[str, Any]:
        """The ``stop`` command."""
        st = self._state
        with st.transition:
            if st.state is State.CALIBRATING:
                raise ProtocolError(
                    ErrorCode.WRONG_STATE, "calibrating: cancel the calibration job instead"
                )
            self.stop(timeout_s=10.0)
            return {"state": st.state.value}

    def stop(self, timeout_s: float) -> None:
        """End live analysis and its recording (the caller holds ``state.transition``)."""
        st = self._state
        if self._pipeline is None:
            if st.state is State.ERROR:
                st.set(State.IDLE)
            return
        if not st.closing.is_set():
            st.set(State.STOPPING)
        self._retire_pipeline(timeout_s)
        if not st.closing.is_set():
            st.set(State.IDLE)

    def _retire_pipeline(self, timeout_s: float) -> None:
        p = self._pipeline
        if p is None:
            return
        p.stop(timeout_s=timeout_s * 0.5)
        self.recording.stop(timeout_s=timeout_s * 0.5)
        for k, v in p.counts().items():
            self._totals[k] += v
        self._pipeline = None

    # ------------------------------------------------------------------ recording
    def record_start(self, args: dict[str, Any]) -> dict[str, Any]:
        """The ``record_start`` command (needs live analysis)."""

        def require_live() -> None:
            st = self._state
            if st.state is not State.LIVE or self._pipeline is None:
                raise ProtocolError(
                    ErrorCode.WRONG_STATE,
                    f"record_start needs live analysis (state is {st.state.value}): start first",
                )

        return self.recording.start(
            args, require_live=require_live, camera=self.camera, model=self._state.model
        )

    # ------------------------------------------------------------------ models
    def load_model(self, name: str) -> LoadedModel:
        """Load bundle ``name`` from the workspace for this camera (not yet in use)."""
        return load_model(
            self._ws, name, self._analysis, self.camera.pixel_size_um, tracker=self._tracker
        )

    def use_model(self, loaded: LoadedModel) -> None:
        """Make ``loaded`` the current model: live analysis switches to it at the next frame;
        it is remembered in the workspace and announced."""
        self._state.model = loaded
        p = self._pipeline
        if p is not None:
            p.swap_model(loaded.analysis)
        self._ws.update_state(model=loaded.name)
        self._publisher.event(
            EventKind.MODEL,
            model={
                "name": loaded.name,
                "path": str(loaded.path),
                "calibration_sha256": loaded.calibration_sha256,
            },
        )
        log.info("model %s loaded", loaded.name)

    def load_and_use(self, name: str) -> None:
        self.use_model(self.load_model(name))

    def load_model_command(self, args: dict[str, Any]) -> dict[str, Any]:
        """The ``load_model`` command."""
        loaded = self.load_model(args["name"])
        self.use_model(loaded)
        return {"model": loaded.name}

    # ------------------------------------------------------------------ focus
    def get_z(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"z_um": float(self.driver.get_z())}

    def move_z(self, args: dict[str, Any]) -> dict[str, Any]:
        if self._state.state is State.CALIBRATING:
            raise ProtocolError(
                ErrorCode.WRONG_STATE, "a calibration is moving the focus; wait or cancel it"
            )
        timeout = args.get("timeout_s", self._driver_config.stage_timeout_s)
        try:
            self.driver.move_z(float(args["z_um"]), timeout_s=float(timeout))
        except DriverError as e:
            self._state.report_error(ErrorCode.DRIVER_ERROR, str(e), EventKind.DRIVER)
            raise
        return {"z_um": float(self.driver.get_z())}

    # ------------------------------------------------------------------ pipeline threads
    def on_frame_result(
        self,
        frame: Frame,
        locs: Localizations,
        tracks: Tracks,
        inference_s: float,
        model_name: str,
    ) -> None:
        """`FrameSink`: publish one analysed frame (the records as ``loc`` and ``track``
        messages), record it."""
        pub = self._publisher
        z = frame.stage_z_um
        pub.publish(
            loc_message(
                locs,
                seq=pub.next_seq(Topic.LOC),
                frame=frame.index,
                t_acq_s=frame.t_acq_s,
                stage_z_um=z,
                model=model_name,
                inference_s=inference_s,
            )
        )
        pub.publish(
            track_message(
                tracks,
                seq=pub.next_seq(Topic.TRACK),
                frame=frame.index,
                t_acq_s=frame.t_acq_s,
                stage_z_um=z,
            )
        )
        latency = time.time() - frame.t_acq_s
        if math.isfinite(latency) and latency >= 0:
            self._metrics.frame_to_publish_seconds.observe(latency)
        if self.recording.active:
            self.recording.add_results(frame.index, locs, tracks)

    def _on_camera_fault(self, message: str, attempt: int) -> None:
        if not self._state.set_from((State.LIVE, State.ERROR), State.ERROR):
            return
        self._state.report_error(
            ErrorCode.DRIVER_ERROR,
            f"{message} (restarting the stream, attempt {attempt})",
            EventKind.DRIVER,
        )

    def _on_camera_recovered(self) -> None:
        log.info("camera: frames are coming again")
        self._state.set_from((State.ERROR,), State.LIVE)

    def _on_camera_failed(self, message: str) -> None:
        if not self._state.set_from((State.LIVE, State.ERROR), State.ERROR):
            return
        self._state.report_error(
            ErrorCode.DRIVER_ERROR, f"live analysis stopped: {message}", EventKind.DRIVER
        )

    def _on_analysis_error(self, message: str) -> None:
        self._state.report_error(ErrorCode.INTERNAL, message)

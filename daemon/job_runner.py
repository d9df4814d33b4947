"""The service's jobs: a calibration (a thread: it needs the camera, so the service is
``calibrating`` meanwhile) and a training run (a child process, `TrainProcess`, watched by a
monitor thread; it may run during live analysis). `JobRunner` answers ``calibrate``,
``train``, ``job`` and ``cancel``; every change of a job goes out as a ``job`` event.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from focaltrack.daemon.jobs import Job, JobTable, TrainProcess, TrainRequest
from focaltrack.daemon.microscope import sim_bead
from focaltrack.daemon.protocol import (
    ErrorCode,
    EventKind,
    JobKind,
    JobState,
    ProtocolError,
    State,
)
from focaltrack.drivers.base import DriverError

if TYPE_CHECKING:
    from focaltrack.daemon.config import AnalysisConfig, DriverConfig, TrainConfig
    from focaltrack.daemon.metrics import ServiceMetrics
    from focaltrack.daemon.publisher import Publisher
    from focaltrack.daemon.state import ServiceState
    from focaltrack.daemon.workspace import Workspace
    from focaltrack.drivers.base import CameraInfo, Driver

log = logging.getLogger("focaltrack.service")

__all__ = ["JobRunner"]


class JobRunner:
    """Starts, tracks and cancels the jobs of one service.

    ``use_model(name)`` loads a trained model and makes it current (a training run asked
    with ``load``); it raises `ProtocolError`, `ValueError` or `OSError` when it cannot.
    ``train_overrides``: preset fields to override in every training run (tests).
    """

    def __init__(
        self,
        driver: Driver,
        camera: CameraInfo,
        *,
        ws: Workspace,
        driver_config: DriverConfig,
        analysis: AnalysisConfig,
        train: TrainConfig,
        state: ServiceState,
        publisher: Publisher,
        metrics: ServiceMetrics,
        use_model: Callable[[str], None],
        train_overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self._driver = driver
        self._camera = camera
        self._ws = ws
        self._driver_config = driver_config
        self._analysis = analysis
        self._train = train
        self._state = state
        self._publisher = publisher
        self._metrics = metrics
        self._use_model = use_model
        self._train_overrides = dict(train_overrides) if train_overrides else None
        self.table = JobTable(self._on_job_change)
        self._calibration_thread: threading.Thread | None = None
        self._train_procs: dict[str, TrainProcess] = {}

    def _on_job_change(self, job: Job, significant: bool) -> None:
        self._metrics.job_progress.labels(kind=job.kind.value).set(job.progress)
        if significant:
            log.info("job %s: %s %s", job.id, job.state.value, job.message)
        self._publisher.event(EventKind.JOB, job=job.info())

    def recent(self, n: int) -> list[dict[str, Any]]:
        return [j.info() for j in self.table.all()[-n:]]

    # ------------------------------------------------------------------ job, cancel
    def job(self, args: dict[str, Any]) -> dict[str, Any]:
        """The ``job`` command."""
        job = self.table.get(args["id"])
        if job is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no job {args['id']!r}")
        return job.info()

    def cancel(self, args: dict[str, Any]) -> dict[str, Any]:
        """The ``cancel`` command (answered at once; the job ends on its own thread)."""
        job = self.table.get(args["id"])
        if job is None:
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no job {args['id']!r}")
        if not job.state.finished:
            job.cancel_event.set()
            if job.cancel_hook is not None:
                threading.Thread(
                    target=job.cancel_hook, name="focaltrack-cancel", daemon=True
                ).start()
            self.table.update(job, message="cancelling")
        return job.info()

    def cancel_all(self, timeout_s: float) -> None:
        """Shutdown: cancel every active job; wait (bounded) for a calibration, which
        returns the focus home before it ends."""
        for job in self.table.active():
            job.cancel_event.set()
            if job.cancel_hook is not None:
                with contextlib.suppress(Exception):
                    job.cancel_hook()
        cal = self._calibration_thread
        if cal is not None:
            cal.join(timeout_s)

    # ------------------------------------------------------------------ calibration
    def calibrate(self, args: dict[str, Any]) -> dict[str, Any]:
        """The ``calibrate`` command: check, enter ``calibrating``, start the thread."""
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
        name = args.get("name") or self._ws.new_name("cal")
        if self._ws.calibration_path(name).exists():
            raise ProtocolError(ErrorCode.BAD_ARGS, f"calibration {name!r} already exists")
        st = self._state
        with st.transition:
            if self.table.active(JobKind.CALIBRATE):
                raise ProtocolError(ErrorCode.BUSY, "a calibration is already running")
            if st.state is not State.IDLE:
                raise ProtocolError(
                    ErrorCode.WRONG_STATE,
                    f"calibrating needs the camera; the service is {st.state.value}"
                    + (": stop live analysis first" if st.state is State.LIVE else ""),
                )
            st.set(State.CALIBRATING)
            job = self.table.create(JobKind.CALIBRATE)
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

        jobs, st = self.table, self._state
        jobs.update(job, state=JobState.RUNNING, message="acquiring the focal stack")
        d = self._driver_config

        def progress(done: int, total: int, dz: float) -> None:
            # Acquisition is ~90 % of the work; processing and saving the rest.
            jobs.update(
                job,
                progress=0.9 * done / max(total, 1),
                message=f"slice {done}/{total} (+{dz:g} µm)",
            )

        try:
            with sim_bead(self._driver):
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
            jobs.update(job, progress=0.92, message="processing the focal stack")
            cal = calibration_from_raw(
                raw,
                window_px=int(args["window_px"]),
                pixel_size_um=d.pixel_size_um if d.pixel_size_um > 0 else None,
                source=f"{d.kind}:{raw.camera.name}",
            )
            if job.cancel_event.is_set():
                raise AcquisitionCancelled("calibration cancelled")
            path = self._ws.calibration_path(name)
            cal.save(path)
            st.calibration = name
            self._ws.update_state(calibration=name)
            jobs.update(
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
            jobs.update(job, state=JobState.CANCELLED, message="cancelled")
        except DriverError as e:
            jobs.update(
                job, state=JobState.FAILED, message=str(e), error_code=ErrorCode.DRIVER_ERROR.value
            )
            st.report_error(ErrorCode.DRIVER_ERROR, f"calibration: {e}", EventKind.DRIVER)
        except Exception as e:
            if not isinstance(e, ValueError):
                log.exception("calibration failed")
            jobs.update(job, state=JobState.FAILED, message=f"{type(e).__name__}: {e}")
        finally:
            with st.transition:
                if st.state is State.CALIBRATING:
                    st.set(State.IDLE)

    # ------------------------------------------------------------------ training
    def train(self, args: dict[str, Any]) -> dict[str, Any]:
        """The ``train`` command: start the child process and its monitor thread."""
        st = self._state
        if st.closing.is_set():
            raise ProtocolError(ErrorCode.WRONG_STATE, "the service is shutting down")
        cal = args.get("calibration") or st.calibration
        if not cal:
            raise ProtocolError(
                ErrorCode.NOT_FOUND, "no calibration: calibrate first or name one (calibration=)"
            )
        cal_path = self._ws.find_calibration(cal)  # NotFound -> not_found
        name = args.get("name") or self._ws.new_name("model")
        out = self._ws.model_path(name)
        if out.exists():
            raise ProtocolError(ErrorCode.BAD_ARGS, f"model {name!r} already exists")
        if self.table.active(JobKind.TRAIN):
            raise ProtocolError(ErrorCode.BUSY, "a training run is already going on")
        a = self._analysis
        req = TrainRequest(
            calibration_path=str(cal_path),
            out_path=str(out),
            preset=str(args.get("preset") or self._train.preset),
            seed=int(args.get("seed", self._train.seed)),
            device=a.device or None,
            threads=a.threads or None,
            overrides=self._train_overrides,
        )
        job = self.table.create(JobKind.TRAIN)
        proc = TrainProcess(req)
        job.cancel_hook = proc.cancel
        self._train_procs[job.id] = proc
        try:
            proc.start()
        except Exception as e:
            self._train_procs.pop(job.id, None)
            self.table.update(job, state=JobState.FAILED, message=f"could not start: {e}")
            raise
        self.table.update(
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
        jobs, st = self.table, self._state

        def progress(frac: float, msg: str) -> None:
            jobs.update(job, progress=frac, message=msg)

        def line(msg: str) -> None:
            log.info("%s", msg)

        try:
            while not proc.poll(0.25, progress, line):
                if st.closing.is_set() and not job.cancel_event.is_set():
                    proc.cancel()
            if proc.cancelled or job.cancel_event.is_set():
                proc.cleanup_partial()
                jobs.update(job, state=JobState.CANCELLED, message="cancelled")
                return
            if proc.error is not None or proc.result is None:
                proc.cleanup_partial()
                msg = proc.error or "training ended without a result"
                jobs.update(job, state=JobState.FAILED, message=msg)
                st.report_error(ErrorCode.INTERNAL, f"training {name}: {msg}")
                return
            result: dict[str, Any] = {
                "model": name,
                "path": str(self._ws.model_path(name)),
                "validation": proc.result.get("validation"),
                "loaded": False,
            }
            if load and not st.closing.is_set():
                try:
                    self._use_model(name)
                    result["loaded"] = True
                except (ProtocolError, ValueError, OSError) as e:
                    result["load_error"] = str(e)
                    st.report_error(ErrorCode.INTERNAL, f"loading model {name}: {e}")
            jobs.update(job, state=JobState.DONE, message=f"model {name}", result=result)
        except Exception as e:
            log.exception("training monitor failed")
            jobs.update(job, state=JobState.FAILED, message=f"{type(e).__name__}: {e}")
        finally:
            proc.close()
            self._train_procs.pop(job.id, None)

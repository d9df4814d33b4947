"""Long work of the service as jobs: a calibration (a thread; it needs the camera) and
training (a separate process, so the live loop never stalls on it).

A `Job` is created ``queued``, runs, and ends ``done`` (with a result), ``failed`` (with a
message) or ``cancelled``. Every change goes to ``on_change(job)`` (the service publishes it
as a ``job`` event, throttled for progress), and `JobTable` keeps the recent ones for the
``job`` command.

Training runs `focaltrack.models.train.train` in a child started with the multiprocessing
"spawn" method (a fresh interpreter: no inherited threads, sockets or CUDA state). Its
log lines and progress come back over a multiprocessing queue. `TrainProcess.cancel`
terminates the child; the bundle is written atomically (a temporary folder renamed at the
end), so a cancelled run leaves no model behind, and the temporary folder is removed.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing as mp
import queue
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from focaltrack.common.errors import FocaltrackError
from focaltrack.daemon.protocol import JobKind, JobState, job_info

log = logging.getLogger(__name__)

__all__ = ["Job", "JobCancelled", "JobTable", "TrainProcess", "TrainRequest"]

#: Jobs kept for the ``job`` command (finished ones beyond this are forgotten, oldest first).
MAX_JOBS_KEPT = 50


class JobCancelled(FocaltrackError):
    """Raised inside a job's work when it was cancelled."""


@dataclass
class Job:
    """One job (mutable; its `info` is the wire form)."""

    id: str
    kind: JobKind
    state: JobState = JobState.QUEUED
    progress: float = 0.0
    message: str = ""
    result: Any = None
    error_code: str | None = None
    created_s: float = field(default_factory=time.time)
    finished_s: float | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    cancel_hook: Callable[[], None] | None = None

    def info(self) -> dict[str, Any]:
        return job_info(self.id, self.kind, self.state, self.progress, self.message, self.result)


class JobTable:
    """Thread-safe registry of jobs; ``on_change(job, final)`` after every update."""

    def __init__(self, on_change: Callable[[Job, bool], None]) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._on_change = on_change
        self._last_pub: dict[str, float] = {}

    def create(self, kind: JobKind) -> Job:
        with self._lock:
            jid = f"{kind.value}-{next(self._ids)}-{int(time.time())}"
            job = Job(jid, kind)
            self._jobs[jid] = job
            finished = [j for j in self._jobs.values() if j.state.finished]
            for old in finished[: max(0, len(self._jobs) - MAX_JOBS_KEPT)]:
                del self._jobs[old.id]
        self._on_change(job, True)
        return job

    def get(self, jid: str) -> Job | None:
        with self._lock:
            return self._jobs.get(jid)

    def all(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def active(self, kind: JobKind | None = None) -> list[Job]:
        return [j for j in self.all() if not j.state.finished and (kind is None or j.kind is kind)]

    def update(
        self,
        job: Job,
        *,
        state: JobState | None = None,
        progress: float | None = None,
        message: str | None = None,
        result: Any = None,
        error_code: str | None = None,
    ) -> None:
        """Change a job; a finished job never changes again. Progress-only updates are
        passed on at most ~4 times a second."""
        with self._lock:
            if job.state.finished:
                return
            if state is not None:
                job.state = state
            if progress is not None:
                job.progress = min(max(float(progress), 0.0), 1.0)
            if message is not None:
                job.message = message
            if result is not None:
                job.result = result
            if error_code is not None:
                job.error_code = error_code
            final = job.state.finished
            if final:
                job.finished_s = time.time()
                if job.state is JobState.DONE:
                    job.progress = 1.0
            now = time.monotonic()
            significant = final or state is not None or message is not None
            if not significant and now - self._last_pub.get(job.id, 0.0) < 0.25:
                return
            self._last_pub[job.id] = now
        self._on_change(job, significant)


# ============================================================================ training


@dataclass(frozen=True, slots=True)
class TrainRequest:
    calibration_path: str
    out_path: str
    preset: str
    seed: int
    device: str | None = None
    threads: int | None = None
    overrides: dict[str, Any] | None = None


#: Share of the whole run per phase (lateral, axial; the rest is validation and saving).
_PHASES = {"lateral": (0.0, 0.45), "axial": (0.45, 0.35)}


class _QueueProgress:
    """Training's ``progress`` callback in the child: each step as a fraction of the whole
    run, sent to the parent at most every ``interval_s`` (and at the end of a phase)."""

    def __init__(self, q: Any, interval_s: float = 0.2) -> None:
        self.q = q
        self.interval_s = interval_s
        self._last = -math.inf  # the first step is always sent

    def __call__(self, phase: str, step: int, steps: int) -> None:
        now = time.monotonic()
        if step < steps and now - self._last < self.interval_s:
            return
        self._last = now
        start, span = _PHASES.get(phase, (0.0, 0.0))
        self.q.put(("progress", start + span * step / max(steps, 1), f"{phase} {step}/{steps}"))


def _exit_with_parent() -> None:  # pragma: no cover - runs in the child
    """End this process when the service that started it is gone (e.g. after ``kill -9``,
    which gives it no chance to terminate us): on POSIX the orphan is re-parented."""
    import os

    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=watch, name="focaltrack-parent-watch", daemon=True).start()


def _train_child(req: TrainRequest, q: Any) -> None:  # pragma: no cover - runs in the child
    _exit_with_parent()
    try:
        from focaltrack.calibration import Calibration
        from focaltrack.models.train import train

        cal = Calibration.load(req.calibration_path)

        def log_line(msg: str) -> None:
            q.put(("log", msg))
            if "validation" in msg and "done" not in msg:
                q.put(("progress", 0.95, "validated"))
            elif "axial done" in msg:
                q.put(("progress", 0.8, "validating"))

        res = train(
            cal,
            req.out_path,
            preset=req.preset,
            seed=req.seed,
            device=req.device,
            threads=req.threads,
            progress=_QueueProgress(q),
            log=log_line,
            overrides=req.overrides,
            calibration_path=req.calibration_path,
        )
        val = (res.meta.get("validation") or {}).get("by_snr") or {}
        q.put(("done", {"path": str(res.path), "validation": val}))
    except BaseException as e:
        q.put(("error", f"{type(e).__name__}: {e}"))


class TrainProcess:
    """One training run in a spawned child. `poll` drains its messages; call it until
    `finished`. ``on_progress(fraction, message)``, ``on_log(line)``."""

    def __init__(self, req: TrainRequest) -> None:
        ctx = mp.get_context("spawn")
        self.req = req
        self._q: Any = ctx.Queue()
        self._proc = ctx.Process(
            target=_train_child, args=(req, self._q), name="focaltrack-train", daemon=True
        )
        self.result: dict[str, Any] | None = None
        self.error: str | None = None
        self.cancelled = False

    def start(self) -> None:
        self._proc.start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def poll(
        self,
        timeout_s: float,
        on_progress: Callable[[float, str], None],
        on_log: Callable[[str], None],
    ) -> bool:
        """Handle messages for up to ``timeout_s``; True once the run has finished."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                msg = self._q.get(timeout=max(left, 0.0)) if left > 0 else self._q.get_nowait()
            except queue.Empty:
                break
            except (EOFError, OSError):
                break
            kind = msg[0]
            if kind == "progress":
                on_progress(float(msg[1]), str(msg[2]))
            elif kind == "log":
                on_log(str(msg[1]))
            elif kind == "done":
                self.result = msg[1]
            elif kind == "error":
                self.error = str(msg[1])
            if self.result is not None or self.error is not None:
                self._proc.join(10.0)
                return True
        if not self._proc.is_alive() and self._proc.exitcode is not None:
            # Drain what the child sent just before it ended.
            try:
                while True:
                    msg = self._q.get_nowait()
                    if msg[0] == "done":
                        self.result = msg[1]
                    elif msg[0] == "error":
                        self.error = str(msg[1])
            except (queue.Empty, EOFError, OSError):
                pass
            if self.result is None and self.error is None:
                self.error = (
                    "cancelled"
                    if self.cancelled
                    else f"the training process ended with exit code {self._proc.exitcode}"
                )
            return True
        return False

    def cancel(self) -> None:
        """Terminate the child (SIGTERM, then SIGKILL after 5 s) and remove any partial
        bundle folder it left."""
        self.cancelled = True
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(5.0)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5.0)
        self.cleanup_partial()

    def cleanup_partial(self) -> None:
        out = Path(self.req.out_path)
        for tmp in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(tmp, ignore_errors=True)

    def close(self) -> None:
        try:
            self._q.close()
            self._q.join_thread()
        except (OSError, ValueError, AssertionError):
            pass

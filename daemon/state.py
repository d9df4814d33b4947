"""What the service is doing and what it works with, shared by its parts.

`ServiceState` holds the state machine (`State`), the lock that serialises transitions, the
shutdown flag, the current calibration and model, and the last error. Changes of state and
errors go out as events through the `Publisher`.

State machine: ``idle`` ⇄ ``live`` (start / stop), ``idle`` → ``calibrating`` → ``idle`` (a
calibration job), ``live`` → ``error`` on a camera fault (the stream is restarted with
back-off; back to ``live`` when frames come again, or it stays ``error`` until ``stop`` or
``start``), anything → ``stopping`` on shutdown. Training is a job, not a state.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from focaltrack.daemon.protocol import ErrorCode, EventKind, State

if TYPE_CHECKING:
    from focaltrack.daemon.analysis import LoadedModel
    from focaltrack.daemon.metrics import ServiceMetrics
    from focaltrack.daemon.publisher import Publisher

log = logging.getLogger("focaltrack.service")

__all__ = ["ServiceState", "utc_iso"]


def utc_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ServiceState:
    """The shared state of one service (see the module docstring).

    ``transition`` is held by start, stop, calibrate and shutdown, one at a time; ``closing``
    is set once shutdown began (later requests that would start something refuse).
    ``calibration`` and ``model`` are the current calibration's name and the loaded model;
    their writers also record them in the workspace's state file.
    """

    def __init__(self, publisher: Publisher, metrics: ServiceMetrics) -> None:
        self._publisher = publisher
        self._metrics = metrics
        self._state = State.IDLE
        self.lock = threading.RLock()
        self.transition = threading.Lock()
        self.closing = threading.Event()
        self.calibration: str | None = None
        self.model: LoadedModel | None = None
        self.last_error: dict[str, str] | None = None
        metrics.set_state(self._state.value)

    @property
    def state(self) -> State:
        return self._state

    @property
    def model_name(self) -> str | None:
        m = self.model
        return m.name if m else None

    def set(self, state: State) -> None:
        """Enter ``state`` and publish it (nothing but ``stopping`` once shutting down)."""
        with self.lock:
            if self._state is state:
                return
            if self.closing.is_set() and state is not State.STOPPING:
                return  # shutting down: stays "stopping"
            self._state = state
        self._metrics.set_state(state.value)
        log.info("state: %s", state.value)
        self._publisher.event(EventKind.STATE, state=state)

    def set_from(self, expected: tuple[State, ...], state: State) -> bool:
        """`set` only if the state is one of ``expected`` (pipeline callbacks must not undo a
        ``stop`` that is under way)."""
        with self.lock:
            if self._state not in expected:
                return False
            self.set(state)
            return True

    def enter_stopping(self) -> None:
        """Enter ``stopping`` (shutdown: ``closing`` is already set) and publish it."""
        with self.lock:
            self._state = State.STOPPING
        self._metrics.set_state(State.STOPPING.value)
        self._publisher.event(EventKind.STATE, state=State.STOPPING)

    def report_error(
        self, code: ErrorCode, message: str, kind: EventKind = EventKind.ERROR
    ) -> None:
        """Remember the error (``status``'s ``last_error``) and publish it as an event;
        ``driver`` events also carry the state it left the service in."""
        self.last_error = {"code": code.value, "message": message, "t_utc": utc_iso()}
        fields: dict[str, Any] = {"error": {"code": code, "message": message}}
        if kind is EventKind.DRIVER:
            fields["state"] = self._state
        self._publisher.event(kind, **fields)

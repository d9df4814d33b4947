"""The wire protocol of the service: control requests and replies, published messages.

Everything a client or the service needs to agree on lives here, as data:

* :data:`COMMANDS` — every control command with its arguments (type, default, range, choices),
  so request validation (:func:`parse_request`) and the request JSON Schema
  (:func:`request_schema`) come from the same table;
* :class:`ErrorCode`, :class:`State`, :class:`Topic`, :class:`EventKind`, :class:`JobState`;
* builders for every published header (:func:`loc_header`, :func:`track_header`,
  :func:`event_header`, :func:`hb_header`), a per-topic :class:`Sequencer`, and
  :func:`encode_message` / :func:`decode_message` for the multipart frames;
* :func:`validate` — check a header against the JSON Schemas shipped in
  ``focaltrack/daemon/schemas/`` (regenerate them with
  ``python -m focaltrack.daemon.protocol --write-schemas``; a test checks they are current).

The page for people writing clients in other languages is docs/protocol.md.
"""

from __future__ import annotations

import functools
import json
import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from importlib import resources
from typing import Any

from focaltrack.common.errors import FocaltrackError

SCHEMA_VERSION = 1
#: Longest request id echoed back (characters).
MAX_ID_LENGTH = 128
#: Largest control request accepted (bytes).
MAX_REQUEST_BYTES = 65536


class ErrorCode(str, Enum):
    BAD_JSON = "bad_json"  #: the request is not UTF-8 JSON
    BAD_REQUEST = "bad_request"  #: not an object with a string "cmd" (or bad "args"/"id")
    UNKNOWN_COMMAND = "unknown_command"
    BAD_ARGS = "bad_args"  #: unknown, missing, wrong type or out of range argument
    WRONG_STATE = "wrong_state"  #: e.g. start without a model, calibrate while live
    NOT_FOUND = "not_found"  #: no such calibration, model or job
    BUSY = "busy"  #: the resource is taken (a calibration is already running)
    DRIVER_ERROR = "driver_error"  #: the microscope failed or timed out
    INTERNAL = "internal"  #: a bug; the message says what


class State(str, Enum):
    IDLE = "idle"
    CALIBRATING = "calibrating"
    LIVE = "live"
    ERROR = "error"
    STOPPING = "stopping"


class Topic(str, Enum):
    LOC = "loc"
    TRACK = "track"
    EVENT = "event"
    HB = "hb"

    @property
    def wire(self) -> bytes:
        return self.value.encode("ascii")


class EventKind(str, Enum):
    STATE = "state"
    JOB = "job"
    ERROR = "error"
    DRIVER = "driver"
    MODEL = "model"
    RECORDING = "recording"


class JobKind(str, Enum):
    CALIBRATE = "calibrate"
    TRAIN = "train"


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobState.DONE, JobState.FAILED, JobState.CANCELLED)


class ProtocolError(FocaltrackError):
    """A request the service answers with ``{"ok": false, "error": {code, message}}``."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(message)
        self.code = ErrorCode(code)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.value}: {self.message}"


# ----------------------------------------------------------------------------- commands


class ArgType(str, Enum):
    INT = "integer"
    NUMBER = "number"
    STRING = "string"
    BOOL = "boolean"


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: Marks an argument that must be given.
REQUIRED: Any = _Required()


@dataclass(frozen=True, slots=True)
class Arg:
    """One argument of a command.

    ``default`` is :data:`REQUIRED` (must be given), ``None`` (optional: absent means "the
    service decides", and the validated args omit it) or a value filled in when absent.
    """

    name: str
    type: ArgType
    help: str
    default: Any = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    choices: tuple[str, ...] | None = None
    max_length: int | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": self.type.value, "description": self.help}
        if self.minimum is not None:
            s["minimum"] = self.minimum
        if self.maximum is not None:
            s["maximum"] = self.maximum
        if self.exclusive_minimum is not None:
            s["exclusiveMinimum"] = self.exclusive_minimum
        if self.choices is not None:
            s["enum"] = list(self.choices)
        if self.max_length is not None:
            s["minLength"] = 1
            s["maxLength"] = self.max_length
        if self.default is not REQUIRED and self.default is not None:
            s["default"] = self.default
        return s

    def check(self, cmd: str, value: Any) -> Any:
        """The value, normalised (int -> float for numbers), or :class:`ProtocolError`."""

        def bad(msg: str) -> ProtocolError:
            return ProtocolError(ErrorCode.BAD_ARGS, f"{cmd}: argument {self.name!r} {msg}")

        t = self.type
        if t is ArgType.BOOL:
            if not isinstance(value, bool):
                raise bad(f"must be true or false, got {_short(value)}")
            return value
        if t is ArgType.STRING:
            if not isinstance(value, str):
                raise bad(f"must be a string, got {_short(value)}")
            if self.max_length is not None and not 1 <= len(value) <= self.max_length:
                raise bad(f"must be 1..{self.max_length} characters long")
            if self.choices is not None and value not in self.choices:
                raise bad(f"must be one of {', '.join(self.choices)}; got {_short(value)}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            kind = "an integer" if t is ArgType.INT else "a number"
            raise bad(f"must be {kind}, got {_short(value)}")
        if t is ArgType.INT:
            if isinstance(value, float):
                raise bad(f"must be an integer, got {_short(value)}")
        else:
            value = float(value)
            if not math.isfinite(value):
                raise bad(f"must be finite, got {value}")
        if self.minimum is not None and value < self.minimum:
            raise bad(f"must be ≥ {self.minimum}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise bad(f"must be ≤ {self.maximum}, got {value}")
        if self.exclusive_minimum is not None and value <= self.exclusive_minimum:
            raise bad(f"must be > {self.exclusive_minimum}, got {value}")
        return value


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    help: str
    result: str  #: what the result holds (for docs and --help)
    args: tuple[Arg, ...] = ()
    #: Returns ``{"job": id}`` at once; progress and result come as ``job`` events.
    is_job: bool = False
    #: Sending it twice does no harm, so a client may resend it after a timeout.
    idempotent: bool = False
    arg_map: Mapping[str, Arg] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "arg_map", {a.name: a for a in self.args})

    def validate_args(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """Checked args with defaults filled in (optional args without default left out)."""
        unknown = [k for k in args if k not in self.arg_map]
        if unknown:
            known = ", ".join(self.arg_map) or "none"
            raise ProtocolError(
                ErrorCode.BAD_ARGS,
                f"{self.name}: unknown argument {_short(unknown[0])} (arguments: {known})",
            )
        out: dict[str, Any] = {}
        for a in self.args:
            if a.name in args:
                out[a.name] = a.check(self.name, args[a.name])
            elif a.required:
                raise ProtocolError(
                    ErrorCode.BAD_ARGS, f"{self.name}: missing required argument {a.name!r}"
                )
            elif a.default is not None:
                out[a.name] = a.default
        return out


_NAME = 128  # longest calibration / model / recording name

COMMANDS: dict[str, Command] = {
    c.name: c
    for c in (
        Command(
            "status",
            "state, endpoints, current calibration and model, counters, jobs",
            "object: state, uptime_s, calibration, model, recording, frames_acquired, "
            "frames_analysed, frames_dropped, endpoints, jobs, ...",
            idempotent=True,
        ),
        Command(
            "calibrate",
            "acquire a bead focal stack and make it the current calibration (a job)",
            '{"job": id}; the job result is {"calibration": name, "path": ...}',
            (
                Arg(
                    "z_range_um",
                    ArgType.NUMBER,
                    "focus travel above the bead, µm",
                    100.0,
                    exclusive_minimum=0,
                    maximum=1000,
                ),
                Arg(
                    "z_step_um",
                    ArgType.NUMBER,
                    "focus step, µm",
                    2.0,
                    exclusive_minimum=0,
                    maximum=100,
                ),
                Arg(
                    "averages", ArgType.INT, "frames averaged per step", 4, minimum=1, maximum=1000
                ),
                Arg(
                    "exposure_ms",
                    ArgType.NUMBER,
                    "exposure, ms; absent = driver.exposure_ms",
                    None,
                    exclusive_minimum=0,
                    maximum=60000,
                ),
                Arg(
                    "settle_s",
                    ArgType.NUMBER,
                    "wait after each focus move, s",
                    0.1,
                    minimum=0,
                    maximum=60,
                ),
                Arg(
                    "window_px",
                    ArgType.INT,
                    "side of the cut-out around the bead, pixels",
                    128,
                    minimum=8,
                    maximum=4096,
                ),
                Arg(
                    "name",
                    ArgType.STRING,
                    "calibration name; absent = cal-<timestamp>",
                    None,
                    max_length=_NAME,
                ),
            ),
            is_job=True,
        ),
        Command(
            "calibrations",
            "list the calibrations in the workspace",
            '{"calibrations": [{name, path, created, sha256, pixel_size_um, ...}], '
            '"current": name|null}',
            idempotent=True,
        ),
        Command(
            "train",
            "train a model from a calibration in a separate process (a job)",
            '{"job": id}; the job result is {"model": name, "path": ...}',
            (
                Arg(
                    "calibration",
                    ArgType.STRING,
                    "calibration name; absent = the current one",
                    None,
                    max_length=_NAME,
                ),
                Arg(
                    "preset",
                    ArgType.STRING,
                    "training preset",
                    "quick",
                    choices=("quick", "default"),
                ),
                Arg("seed", ArgType.INT, "random seed", 0, minimum=0, maximum=2**31 - 1),
                Arg("load", ArgType.BOOL, "load the model when training finishes", True),
                Arg(
                    "name",
                    ArgType.STRING,
                    "model name; absent = model-<timestamp>",
                    None,
                    max_length=_NAME,
                ),
            ),
            is_job=True,
        ),
        Command(
            "models",
            "list the model bundles in the workspace",
            '{"models": [{name, path, created, calibration_sha256, pixel_size_um, ...}], '
            '"current": name|null}',
            idempotent=True,
        ),
        Command(
            "load_model",
            "load a model bundle (live analysis switches to it at the next frame)",
            '{"model": name}',
            (Arg("name", ArgType.STRING, "model name", REQUIRED, max_length=_NAME),),
        ),
        Command(
            "start",
            "start live acquisition and analysis (needs a model)",
            '{"state": "live"}',
            (
                Arg(
                    "interval_ms",
                    ArgType.NUMBER,
                    "frame interval, ms; absent = driver.interval_ms",
                    None,
                    minimum=0,
                    maximum=60000,
                ),
            ),
        ),
        Command("stop", "stop live acquisition", '{"state": "idle"}'),
        Command(
            "record_start",
            "record frames, localizations and tracks to HDF5 while live",
            '{"recording": name, "path": str}',
            (
                Arg(
                    "name",
                    ArgType.STRING,
                    "recording name; absent = rec-<timestamp>",
                    None,
                    max_length=_NAME,
                ),
                Arg("frames", ArgType.BOOL, "also store the camera frames", True),
            ),
        ),
        Command(
            "record_stop",
            "stop recording and close the file",
            '{"recording": name, "path": str, "frames": int}',
        ),
        Command(
            "move_z",
            "move the focus drive to an absolute position",
            '{"z_um": float} (the position reached)',
            (
                Arg(
                    "z_um",
                    ArgType.NUMBER,
                    "target focus position, µm",
                    REQUIRED,
                    minimum=-1e5,
                    maximum=1e5,
                ),
                Arg(
                    "timeout_s",
                    ArgType.NUMBER,
                    "longest wait; absent = driver.stage_timeout_s",
                    None,
                    exclusive_minimum=0,
                    maximum=600,
                ),
            ),
            idempotent=True,
        ),
        Command("get_z", "read the focus drive position", '{"z_um": float}', idempotent=True),
        Command(
            "job",
            "progress and result of a job",
            "job object: {id, kind, state, progress, message, result}",
            (Arg("id", ArgType.STRING, "job id", REQUIRED, max_length=_NAME),),
            idempotent=True,
        ),
        Command(
            "cancel",
            "cancel a running job (nothing half-written is left behind)",
            "job object after cancelling",
            (Arg("id", ArgType.STRING, "job id", REQUIRED, max_length=_NAME),),
        ),
        Command("shutdown", "stop everything and exit the service", '{"state": "stopping"}'),
    )
}


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


# ----------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Request:
    cmd: str
    args: dict[str, Any]
    id: str | None = None


def request_id(raw: bytes | str) -> str | None:
    """The request's id if one can be read from it, else None (for error replies)."""
    try:
        obj = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return None
    if isinstance(obj, dict):
        rid = obj.get("id")
        if isinstance(rid, str) and len(rid) <= MAX_ID_LENGTH:
            return rid
    return None


def parse_request(raw: bytes | str) -> Request:
    """Decode and validate one request frame, or raise :class:`ProtocolError`."""
    if len(raw) > MAX_REQUEST_BYTES:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"request is {len(raw)} bytes; the limit is {MAX_REQUEST_BYTES}"
        )
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        obj = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ProtocolError(ErrorCode.BAD_JSON, f"request is not UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "request must be a JSON object")
    extra = [k for k in obj if k not in ("cmd", "args", "id")]
    if extra:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f"unknown request field {_short(extra[0])} (cmd, args, id)"
        )
    rid = obj.get("id")
    if rid is not None and not (isinstance(rid, str) and len(rid) <= MAX_ID_LENGTH):
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, f'"id" must be a string of at most {MAX_ID_LENGTH} characters'
        )
    cmd = obj.get("cmd")
    if not isinstance(cmd, str):
        raise ProtocolError(ErrorCode.BAD_REQUEST, 'request needs a string "cmd"')
    command = COMMANDS.get(cmd)
    if command is None:
        raise ProtocolError(
            ErrorCode.UNKNOWN_COMMAND,
            f"unknown command {_short(cmd)} (commands: {', '.join(COMMANDS)})",
        )
    args = obj.get("args", {})
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, '"args" must be a JSON object')
    return Request(cmd, command.validate_args(args), rid)


def split_envelope(frames: Sequence[bytes]) -> tuple[list[bytes], bytes | None] | None:
    """Split what a ROUTER received into ``(envelope, body)``.

    A DEALER peer arrives as ``[identity, body]``, a REQ peer (and our DEALER client) as
    ``[identity, b"", body]``; reply with ``send_multipart([*envelope, reply_bytes])``.
    ``body`` is None when the frames are routable but not one request frame (answer
    ``bad_request``); the whole result is None when there is nothing to route a reply to
    (drop and count).
    """
    if len(frames) < 2 or len(frames[0]) == 0:
        return None
    if len(frames[1]) == 0:
        envelope = [bytes(frames[0]), b""]
        rest = frames[2:]
    else:
        envelope = [bytes(frames[0])]
        rest = frames[1:]
    return envelope, (bytes(rest[0]) if len(rest) == 1 else None)


def make_request(cmd: str, args: Mapping[str, Any] | None = None, id: str | None = None) -> bytes:
    obj: dict[str, Any] = {"cmd": cmd, "args": dict(args or {})}
    if id is not None:
        obj["id"] = id
    return dumps(obj)


def ok_reply(result: Any, id: str | None = None) -> dict[str, Any]:
    return {"ok": True, "result": result, "id": id}


def error_reply(code: ErrorCode | str, message: str, id: str | None = None) -> dict[str, Any]:
    return {"ok": False, "error": {"code": ErrorCode(code).value, "message": message}, "id": id}


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON; NaN/inf are refused (other languages cannot read them)."""
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, default=_json_default).encode()


def _json_default(o: Any) -> Any:
    if isinstance(o, Enum):
        return o.value
    tolist = getattr(o, "tolist", None)  # numpy scalars and arrays
    if tolist is not None:
        return tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


# ----------------------------------------------------------------------------- publishing


class Sequencer:
    """Per-topic sequence numbers from 0 (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._next: dict[str, int] = {}

    def next(self, topic: Topic | str) -> int:
        key = Topic(topic).value
        with self._lock:
            n = self._next.get(key, 0)
            self._next[key] = n + 1
            return n

    def peek(self, topic: Topic | str) -> int:
        with self._lock:
            return self._next.get(Topic(topic).value, 0)


def _floats(values: Iterable[Any]) -> list[float | None]:
    """Plain floats; a non-finite value becomes null (JSON has no NaN)."""
    out: list[float | None] = []
    for v in _tolist(values):
        f = float(v)
        out.append(f if math.isfinite(f) else None)
    return out


def _ints(values: Iterable[Any]) -> list[int]:
    return [int(v) for v in _tolist(values)]


def _tolist(values: Iterable[Any]) -> list[Any]:
    tolist = getattr(values, "tolist", None)
    return list(tolist()) if tolist is not None else list(values)


def _common(topic: Topic, seq: int, t_pub_s: float | None) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "topic": topic.value,
        "seq": int(seq),
        "t_pub_s": time.time() if t_pub_s is None else float(t_pub_s),
    }


def _frame(frame: int, t_acq_s: float, stage_z_um: float | None) -> dict[str, Any]:
    z = None if stage_z_um is None or not math.isfinite(stage_z_um) else float(stage_z_um)
    return {"frame": int(frame), "t_acq_s": float(t_acq_s), "stage_z_um": z}


def _columns(h: dict[str, Any], names: Sequence[str], cols: Mapping[str, Any]) -> int:
    lengths = set()
    for name in names:
        h[name] = _floats(cols[name])
        lengths.add(len(h[name]))
    if len(lengths) > 1:
        raise ValueError(f"columns have different lengths: {sorted(lengths)}")
    return lengths.pop() if lengths else 0


def loc_header(
    *,
    seq: int,
    frame: int,
    t_acq_s: float,
    stage_z_um: float | None,
    x_um: Iterable[float],
    y_um: Iterable[float],
    z_um: Iterable[float],
    score: Iterable[float],
    model: str | None = None,
    inference_s: float | None = None,
    t_pub_s: float | None = None,
) -> dict[str, Any]:
    """One analysed frame's localizations as columns (z is the defocus, µm)."""
    h = _common(Topic.LOC, seq, t_pub_s) | _frame(frame, t_acq_s, stage_z_um)
    cols = {"x_um": x_um, "y_um": y_um, "z_um": z_um, "score": score}
    n = _columns(h, ("x_um", "y_um", "z_um", "score"), cols)
    h["n"] = n
    h["model"] = model
    if inference_s is not None:
        h["inference_s"] = float(inference_s)
    return h


TRACK_FLOAT_COLUMNS = (
    "x_um", "y_um", "z_um", "vx_um_s", "vy_um_s", "vz_um_s",
    "sigma_x_um", "sigma_y_um", "sigma_z_um",
)  # fmt: skip


def track_header(
    *,
    seq: int,
    frame: int,
    t_acq_s: float,
    stage_z_um: float | None,
    columns: Mapping[str, Any],
    t_pub_s: float | None = None,
) -> dict[str, Any]:
    """The tracks alive at a frame. ``columns`` is ``TrackFrame.as_columns()`` (or the same
    names): track_id, x/y/z_um, v*_um_s, sigma_*_um, ``confirmed`` (bool) or ``status``,
    age_frames, misses (and optionally hits)."""
    h = _common(Topic.TRACK, seq, t_pub_s) | _frame(frame, t_acq_s, stage_z_um)
    n = _columns(h, TRACK_FLOAT_COLUMNS, columns)
    h["track_id"] = _ints(columns["track_id"])
    if "status" in columns:
        h["status"] = [str(s) for s in _tolist(columns["status"])]
    else:
        h["status"] = [
            "confirmed" if bool(c) else "tentative" for c in _tolist(columns["confirmed"])
        ]
    h["age_frames"] = _ints(columns["age_frames"])
    h["misses"] = _ints(columns["misses"])
    if "hits" in columns:
        h["hits"] = _ints(columns["hits"])
    for name in ("track_id", "status", "age_frames", "misses", "hits"):
        if name in h and len(h[name]) != n:
            raise ValueError(f"track column {name} has {len(h[name])} values, expected {n}")
    h["n"] = n
    return h


def job_info(
    id: str,
    kind: JobKind | str,
    state: JobState | str,
    progress: float = 0.0,
    message: str = "",
    result: Any = None,
) -> dict[str, Any]:
    """The job object used in ``job``/``cancel`` replies and ``job`` events."""
    p = float(progress)
    return {
        "id": id,
        "kind": JobKind(kind).value,
        "state": JobState(state).value,
        "progress": min(max(p, 0.0), 1.0) if math.isfinite(p) else 0.0,
        "message": message,
        "result": result,
    }


def event_header(
    *,
    seq: int,
    kind: EventKind | str,
    state: State | str | None = None,
    job: Mapping[str, Any] | None = None,
    error: Mapping[str, Any] | None = None,
    message: str | None = None,
    model: Mapping[str, Any] | None = None,
    recording: Mapping[str, Any] | None = None,
    t_pub_s: float | None = None,
) -> dict[str, Any]:
    """An event. Per kind (see docs/protocol.md): ``state`` needs ``state``; ``job`` needs
    ``job`` (:func:`job_info`); ``error`` and ``driver`` need ``error`` {code, message}
    (``driver`` also carries the resulting ``state``); ``model`` needs ``model`` {name, ...};
    ``recording`` needs ``recording`` {name, path, active, frames}."""
    kind = EventKind(kind)
    h = _common(Topic.EVENT, seq, t_pub_s)
    h["kind"] = kind.value
    if state is not None:
        h["state"] = State(state).value
    if job is not None:
        h["job"] = dict(job)
    if error is not None:
        h["error"] = {"code": ErrorCode(error["code"]).value, "message": str(error["message"])}
    if message is not None:
        h["message"] = message
    if model is not None:
        h["model"] = dict(model)
    if recording is not None:
        h["recording"] = dict(recording)
    return h


def hb_header(
    *,
    seq: int,
    state: State | str,
    frames_acquired: int,
    frames_analysed: int,
    frames_dropped: int,
    model: str | None,
    uptime_s: float,
    calibration: str | None = None,
    recording: str | None = None,
    t_pub_s: float | None = None,
) -> dict[str, Any]:
    """The heartbeat, about once a second, whatever the state."""
    h = _common(Topic.HB, seq, t_pub_s)
    h.update(
        state=State(state).value,
        frames_acquired=int(frames_acquired),
        frames_analysed=int(frames_analysed),
        frames_dropped=int(frames_dropped),
        model=model,
        calibration=calibration,
        recording=recording,
        uptime_s=float(uptime_s),
    )
    return h


def encode_message(
    header: Mapping[str, Any], payload: bytes | memoryview | None = None
) -> list[bytes | memoryview]:
    """The multipart frames ``[topic, header JSON(, payload)]`` for ``send_multipart``."""
    frames: list[bytes | memoryview] = [Topic(header["topic"]).wire, dumps(header)]
    if payload is not None:
        frames.append(payload)
    return frames


def decode_message(frames: Sequence[bytes]) -> tuple[str, dict[str, Any], bytes | None]:
    """``(topic, header, payload|None)`` from received frames; ValueError if malformed."""
    if len(frames) not in (2, 3):
        raise ValueError(f"expected 2 or 3 frames, got {len(frames)}")
    topic = bytes(frames[0]).decode("ascii", errors="replace")
    header = json.loads(bytes(frames[1]))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    if header.get("topic") != topic:
        raise ValueError(f"topic frame {topic!r} differs from header topic {header.get('topic')!r}")
    return topic, header, (bytes(frames[2]) if len(frames) == 3 else None)


# ----------------------------------------------------------------------------- schemas

_ID = "https://focaltrack.invalid/schemas/"
_DRAFT = "https://json-schema.org/draft/2020-12/schema"


def _num_array() -> dict[str, Any]:
    return {"type": "array", "items": {"type": ["number", "null"]}}


def _int_array(minimum: int | None = 0) -> dict[str, Any]:
    items: dict[str, Any] = {"type": "integer"}
    if minimum is not None:
        items["minimum"] = minimum
    return {"type": "array", "items": items}


def _common_props(topic: Topic) -> dict[str, Any]:
    return {
        "schema_version": {"const": SCHEMA_VERSION},
        "topic": {"const": topic.value},
        "seq": {"type": "integer", "minimum": 0, "description": "per-topic counter from 0"},
        "t_pub_s": {"type": "number", "description": "publish time, UNIX epoch s"},
    }


_FRAME_PROPS = {
    "frame": {"type": "integer", "minimum": 0, "description": "camera frame index"},
    "t_acq_s": {"type": "number", "description": "acquisition time, UNIX epoch s"},
    "stage_z_um": {
        "type": ["number", "null"],
        "description": "focus drive position at acquisition, µm (null if unknown)",
    },
}
_COMMON_REQ = ["schema_version", "topic", "seq", "t_pub_s"]
_FRAME_REQ = ["frame", "t_acq_s", "stage_z_um"]

_ERROR_OBJ = {
    "type": "object",
    "additionalProperties": False,
    "required": ["code", "message"],
    "properties": {
        "code": {"enum": [c.value for c in ErrorCode]},
        "message": {"type": "string"},
    },
}
_JOB_OBJ = {
    "type": "object",
    "additionalProperties": False,
    "required": ["id", "kind", "state", "progress", "message", "result"],
    "properties": {
        "id": {"type": "string"},
        "kind": {"enum": [k.value for k in JobKind]},
        "state": {"enum": [s.value for s in JobState]},
        "progress": {"type": "number", "minimum": 0, "maximum": 1},
        "message": {"type": "string"},
        "result": {},
    },
}
_STATE_ENUM = {"enum": [s.value for s in State]}


def _obj(props: dict[str, Any], required: list[str], title: str, name: str) -> dict[str, Any]:
    return {
        "$schema": _DRAFT,
        "$id": _ID + name,
        "title": title,
        "type": "object",
        "additionalProperties": False,
        "required": required,
        "properties": props,
    }


def topic_schema(topic: Topic | str) -> dict[str, Any]:
    """The JSON Schema of one topic's header."""
    t = Topic(topic)
    props = _common_props(t)
    req = list(_COMMON_REQ)
    if t is Topic.LOC:
        props |= _FRAME_PROPS
        props |= {
            "n": {"type": "integer", "minimum": 0, "description": "number of localizations"},
            "x_um": _num_array(),
            "y_um": _num_array(),
            "z_um": _num_array(),
            "score": _num_array(),
            "model": {"type": ["string", "null"], "description": "model that produced them"},
            "inference_s": {"type": "number", "minimum": 0},
        }
        req += [*_FRAME_REQ, "n", "x_um", "y_um", "z_um", "score"]
        return _obj(props, req, "loc: one analysed frame's localizations", "loc.json")
    if t is Topic.TRACK:
        props |= _FRAME_PROPS
        props["n"] = {"type": "integer", "minimum": 0, "description": "number of tracks"}
        props["track_id"] = _int_array(0)
        for c in TRACK_FLOAT_COLUMNS:
            props[c] = _num_array()
        props["status"] = {"type": "array", "items": {"enum": ["tentative", "confirmed"]}}
        props["age_frames"] = _int_array(0)
        props["misses"] = _int_array(0)
        props["hits"] = _int_array(0)
        req += [*_FRAME_REQ, "n", "track_id", *TRACK_FLOAT_COLUMNS, "status", "age_frames"]
        req += ["misses"]
        return _obj(props, req, "track: the tracks alive at one frame", "track.json")
    if t is Topic.EVENT:
        props |= {
            "kind": {"enum": [k.value for k in EventKind]},
            "state": _STATE_ENUM,
            "job": _JOB_OBJ,
            "error": _ERROR_OBJ,
            "message": {"type": "string"},
            "model": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": ["string", "null"]}},
            },
            "recording": {
                "type": "object",
                "required": ["name", "active"],
                "properties": {
                    "name": {"type": "string"},
                    "path": {"type": "string"},
                    "active": {"type": "boolean"},
                    "frames": {"type": "integer", "minimum": 0},
                },
            },
        }
        s = _obj(props, [*req, "kind"], "event: state changes, jobs, errors", "event.json")
        needs = {
            "state": ["state"],
            "job": ["job"],
            "error": ["error"],
            "driver": ["error", "state"],
            "model": ["model"],
            "recording": ["recording"],
        }
        s["allOf"] = [
            {"if": {"properties": {"kind": {"const": k}}}, "then": {"required": v}}
            for k, v in needs.items()
        ]
        return s
    props |= {
        "state": _STATE_ENUM,
        "frames_acquired": {"type": "integer", "minimum": 0},
        "frames_analysed": {"type": "integer", "minimum": 0},
        "frames_dropped": {"type": "integer", "minimum": 0},
        "model": {"type": ["string", "null"]},
        "calibration": {"type": ["string", "null"]},
        "recording": {"type": ["string", "null"]},
        "uptime_s": {"type": "number", "minimum": 0},
    }
    req += ["state", "frames_acquired", "frames_analysed", "frames_dropped", "model", "uptime_s"]
    return _obj(props, req, "hb: heartbeat, about once a second", "hb.json")


def request_schema() -> dict[str, Any]:
    """JSON Schema of a control request, generated from :data:`COMMANDS`."""
    branches = []
    for c in COMMANDS.values():
        args = {
            "type": "object",
            "additionalProperties": False,
            "properties": {a.name: a.schema() for a in c.args},
            "required": [a.name for a in c.args if a.required],
        }
        branches.append(
            {
                "if": {"properties": {"cmd": {"const": c.name}}},
                "then": {"properties": {"args": args}},
            }
        )
    s = _obj(
        {
            "cmd": {"enum": list(COMMANDS)},
            "args": {"type": "object"},
            "id": {"type": "string", "maxLength": MAX_ID_LENGTH},
        },
        ["cmd"],
        "control request",
        "request.json",
    )
    s["allOf"] = branches
    return s


def reply_schema() -> dict[str, Any]:
    """JSON Schema of a control reply."""
    rid = {"type": ["string", "null"], "maxLength": MAX_ID_LENGTH}
    return {
        "$schema": _DRAFT,
        "$id": _ID + "reply.json",
        "title": "control reply",
        "oneOf": [
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["ok", "result"],
                "properties": {"ok": {"const": True}, "result": {}, "id": rid},
            },
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["ok", "error"],
                "properties": {"ok": {"const": False}, "error": _ERROR_OBJ, "id": rid},
            },
        ],
        "$defs": {"job": _JOB_OBJ},
    }


def all_schemas() -> dict[str, dict[str, Any]]:
    """File name -> schema, as shipped in ``focaltrack/daemon/schemas/``."""
    from focaltrack.daemon.config import config_schema

    out = {f"{t.value}.json": topic_schema(t) for t in Topic}
    out["request.json"] = request_schema()
    out["reply.json"] = reply_schema()
    out["config.json"] = config_schema()
    return out


def schema_text(schema: Mapping[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


@functools.cache
def shipped_schema(name: str) -> dict[str, Any]:
    """A schema file as shipped (``loc``, ``request``, ``config``, ...; ``.json`` optional)."""
    fname = name if name.endswith(".json") else f"{name}.json"
    text = resources.files("focaltrack.daemon").joinpath("schemas", fname).read_text("utf-8")
    return json.loads(text)


@functools.cache
def _validator(name: str) -> Any:
    import jsonschema

    schema = shipped_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


class SchemaError(FocaltrackError, ValueError):
    """A message or reply does not satisfy its schema."""


def _check(name: str, obj: Any) -> None:
    import jsonschema

    err = jsonschema.exceptions.best_match(_validator(name).iter_errors(obj))
    if err is not None:
        where = "/".join(str(p) for p in err.absolute_path) or "(top)"
        raise SchemaError(f"{name}: {where}: {err.message}")


def validate(topic: Topic | str, header: Mapping[str, Any]) -> None:
    """Check a published header against its shipped schema and the column lengths (== n).

    Raises :class:`SchemaError` naming the first problem.
    """
    t = Topic(topic)
    _check(f"{t.value}.json", header)
    if t in (Topic.LOC, Topic.TRACK):
        n = header["n"]
        for key, value in header.items():
            if isinstance(value, list) and len(value) != n:
                raise SchemaError(f"{t.value}.json: {key} has {len(value)} values but n = {n}")


def validate_request(obj: Any) -> None:
    _check("request.json", obj)


def validate_reply(obj: Any) -> None:
    _check("reply.json", obj)


def main(argv: Sequence[str] | None = None) -> int:  # pragma: no cover - maintenance tool
    import argparse
    from pathlib import Path

    p = argparse.ArgumentParser(description="write or check the shipped JSON Schemas")
    p.add_argument("--write-schemas", action="store_true")
    a = p.parse_args(argv)
    folder = Path(__file__).with_name("schemas")
    stale = []
    for name, schema in all_schemas().items():
        path = folder / name
        text = schema_text(schema)
        if not path.exists() or path.read_text("utf-8") != text:
            stale.append(name)
            if a.write_schemas:
                folder.mkdir(exist_ok=True)
                path.write_text(text, "utf-8")
    verb = "wrote" if a.write_schemas else "stale"
    print(f"{verb}: {', '.join(stale) or 'none'}")
    return 1 if stale and not a.write_schemas else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from focaltrack.daemon import protocol as P
from focaltrack.daemon import schemagen as S
from focaltrack.daemon.protocol import ErrorCode, ProtocolError

REPO = Path(__file__).resolve().parents[1]
REQUEST_VALIDATOR = jsonschema.Draft202012Validator(P.shipped_schema("request"))


def _req(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def _code(raw: bytes | str) -> ErrorCode:
    with pytest.raises(ProtocolError) as ei:
        P.parse_request(raw)
    return ei.value.code


def test_shipped_schemas_are_current_and_valid() -> None:
    folder = REPO / "daemon" / "schemas"
    for name, schema in S.all_schemas().items():
        assert (folder / name).read_text("utf-8") == S.schema_text(schema), f"{name} is stale"
        jsonschema.Draft202012Validator.check_schema(schema)
    assert sorted(p.name for p in folder.glob("*.json")) == sorted(S.all_schemas())


def test_every_command_with_defaults() -> None:
    required = {"load_model": {"name": "m"}, "move_z": {"z_um": 1}, "job": {"id": "j"}}
    required["cancel"] = {"id": "j"}
    for name in P.COMMANDS:
        obj = {"cmd": name, "args": required.get(name, {}), "id": "r1"}
        req = P.parse_request(_req(obj))
        assert req.cmd == name and req.id == "r1"
        REQUEST_VALIDATOR.validate(obj)
    r = P.parse_request(_req({"cmd": "calibrate"}))
    assert r.args == {
        "z_range_um": 100.0,
        "z_step_um": 2.0,
        "averages": 4,
        "settle_s": 0.1,
        "window_px": 128,
    }
    assert "exposure_ms" not in r.args  # optional without default: service decides
    t = P.parse_request(_req({"cmd": "train", "args": {"preset": "default"}}))
    assert t.args == {"preset": "default", "seed": 0, "load": True}
    m = P.parse_request(_req({"cmd": "move_z", "args": {"z_um": 3}}))
    assert m.args == {"z_um": 3.0} and isinstance(m.args["z_um"], float)


@pytest.mark.parametrize(
    ("cmd", "args", "needle"),
    [
        ("calibrate", {"averages": "4"}, "averages"),  # type
        ("calibrate", {"averages": 2.5}, "averages"),
        ("calibrate", {"averages": True}, "averages"),  # bool is not an int
        ("calibrate", {"averages": 0}, "averages"),  # range
        ("calibrate", {"z_step_um": 0}, "z_step_um"),
        ("calibrate", {"z_step_um": -1.0}, "z_step_um"),
        ("calibrate", {"exposure_ms": 0}, "exposure_ms"),
        ("calibrate", {"window_px": 100000}, "window_px"),
        ("calibrate", {"zrange": 3}, "zrange"),  # unknown
        ("train", {"preset": "fast"}, "preset"),  # choices
        ("train", {"load": "yes"}, "load"),
        ("train", {"seed": -1}, "seed"),
        ("train", {"calibration": ""}, "calibration"),
        ("load_model", {}, "name"),  # missing required
        ("load_model", {"name": 3}, "name"),
        ("move_z", {}, "z_um"),
        ("move_z", {"z_um": None}, "z_um"),
        ("move_z", {"z_um": 1e9}, "z_um"),
        ("move_z", {"z_um": 1, "timeout_s": 0}, "timeout_s"),
        ("start", {"interval_ms": -1}, "interval_ms"),
        ("record_start", {"frames": 1}, "frames"),
        ("job", {"id": 7}, "id"),
        ("status", {"verbose": True}, "verbose"),
        ("stop", {"x": 1}, "x"),
    ],
)
def test_bad_args(cmd: str, args: dict[str, Any], needle: str) -> None:
    obj = {"cmd": cmd, "args": args}
    with pytest.raises(ProtocolError) as ei:
        P.parse_request(_req(obj))
    assert ei.value.code is ErrorCode.BAD_ARGS
    assert needle in ei.value.message and cmd in ei.value.message
    # The shipped request schema rejects the same request.
    assert not REQUEST_VALIDATOR.is_valid(obj)


@pytest.mark.parametrize(
    ("raw", "wire"),
    [
        (b'{"cmd": "calibrate", "args": {"averages": true}}', "must be an integer, got true"),
        (b'{"cmd": "train", "args": {"load": null}}', '"load" must be true or false, got null'),
        (b'{"cmd": "train", "args": {"preset": false}}', "got false"),
        (b'{"cmd": "train", "args": {"preset": "fast"}}', 'got "fast"'),
        (b'{"cmd": "move_z", "args": {"z_um": 1000000000}}', "got 1000000000"),
        (b'{"cmd": "move_z", "args": {"z_um": NaN}}', "got NaN"),
        (b'{"cmd": "load_model"}', 'missing required argument "name"'),
        (b'{"cmd": "status", "args": {"verbose": true}}', 'unknown argument "verbose"'),
        (b'{"cmd": "status", "Verbose": true}', 'unknown request field "Verbose"'),
        (b'{"cmd": "launch"}', 'unknown command "launch"'),
    ],
)
def test_error_messages_spell_values_as_json(raw: bytes, wire: str) -> None:
    # A client compares these with the JSON it sent: Python's True / None / 'x' would mislead.
    with pytest.raises(ProtocolError) as ei:
        P.parse_request(raw)
    assert wire in ei.value.message
    for python in ("True", "False", "None", "'"):
        assert python not in ei.value.message


def test_non_finite_number_is_bad_args() -> None:
    assert _code(b'{"cmd": "move_z", "args": {"z_um": NaN}}') is ErrorCode.BAD_ARGS
    assert _code(b'{"cmd": "move_z", "args": {"z_um": Infinity}}') is ErrorCode.BAD_ARGS


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"", ErrorCode.BAD_JSON),
        (b"{not json", ErrorCode.BAD_JSON),
        (b"\xff\xfe", ErrorCode.BAD_JSON),
        (b"[" * 100000, ErrorCode.BAD_REQUEST),  # too large
        (b"[" * 5000 + b"]" * 5000, ErrorCode.BAD_JSON),  # nesting too deep
        (b"[1, 2]", ErrorCode.BAD_REQUEST),
        (b'"status"', ErrorCode.BAD_REQUEST),
        (b"{}", ErrorCode.BAD_REQUEST),
        (b'{"cmd": 3}', ErrorCode.BAD_REQUEST),
        (b'{"cmd": "status", "args": [1]}', ErrorCode.BAD_REQUEST),
        (b'{"cmd": "status", "id": 5}', ErrorCode.BAD_REQUEST),
        (b'{"cmd": "status", "extra": 1}', ErrorCode.BAD_REQUEST),
        (b'{"cmd": "launch"}', ErrorCode.UNKNOWN_COMMAND),
    ],
)
def test_malformed_requests(raw: bytes, code: ErrorCode) -> None:
    assert _code(raw) is code


def test_request_id_recovered_for_error_replies() -> None:
    assert P.request_id(b'{"cmd": "nope", "id": "abc"}') == "abc"
    assert P.request_id(b"garbage") is None
    assert P.request_id(b'{"id": 3}') is None


def test_replies_validate() -> None:
    P.validate_reply(P.ok_reply({"state": "idle"}, "x"))
    P.validate_reply(P.ok_reply(None))
    P.validate_reply(P.error_reply(ErrorCode.WRONG_STATE, "no model", None))
    with pytest.raises(P.SchemaError):
        P.validate_reply({"ok": False, "error": {"code": "oops", "message": "m"}, "id": None})
    with pytest.raises(ValueError):
        P.error_reply("oops", "m")
    assert json.loads(P.dumps(P.ok_reply(np.float32(1.5)))) == {
        "ok": True,
        "result": 1.5,
        "id": None,
    }


def test_every_reply_carries_id() -> None:
    # The service answers every routable request with an "id" (null when there was none or
    # the request was unreadable), so the shipped reply schema requires it.
    shipped = jsonschema.Draft202012Validator(P.shipped_schema("reply"))
    for reply in (P.ok_reply({}), P.error_reply(ErrorCode.BAD_JSON, "m")):
        assert "id" in reply and reply["id"] is None
        assert shipped.is_valid(reply)
        assert not shipped.is_valid({k: v for k, v in reply.items() if k != "id"})
        with pytest.raises(P.SchemaError):
            P.validate_reply({k: v for k, v in reply.items() if k != "id"})


def _hb() -> dict[str, Any]:
    return P.hb_header(seq=0, state="idle", frames_acquired=0, frames_analysed=0,
                       frames_dropped=0, model=None, uptime_s=1.0)  # fmt: skip


#: A field each message declares (to check that an open schema still checks those).
_DECLARED = {"loc": "n", "track": "frame", "hb": "state", "event": "kind", "reply": "ok"}


def test_shipped_client_schemas_accept_fields_a_later_revision_adds() -> None:
    # docs/protocol.md: fields may be added within a schema_version, clients ignore the
    # ones they do not know; a client validating with the schema it shipped with must too.
    job = P.job_info("j1", "train", "running", progress=0.5, message="epoch 3")
    tracks = P.track_header(seq=0, frame=4, t_acq_s=1.0, stage_z_um=0.0,
                            columns=_track_columns(2))  # fmt: skip
    later = {
        "loc": dict(_loc(0), fit_iterations=[9, 12, 7]),
        "track": dict(tracks, sigma_vx_um_s=[1.0, 2.0]),
        "hb": dict(_hb(), temperature_c=21.5),
        "event": dict(P.event_header(seq=0, kind="job", job=dict(job, eta_s=4.0)), host="a"),
        "reply": dict(P.error_reply(ErrorCode.BUSY, "m", "r1"), retry_after_s=1.0),
    }
    later["reply"]["error"]["detail"] = {"holder": "calibrate"}
    for name, message in later.items():
        shipped = jsonschema.Draft202012Validator(P.shipped_schema(name))
        assert shipped.is_valid(message), name
        # ... while the declared fields are still checked,
        assert not shipped.is_valid(dict(message, **{_DECLARED[name]: "sleeping"}))
        # ... and the service itself sends nothing undeclared (validate is strict).
        with pytest.raises(P.SchemaError):
            if name == "reply":
                P.validate_reply(message)
            else:
                P.validate(name, message)
    # What the service receives stays closed: an unknown request field is an error.
    assert not REQUEST_VALIDATOR.is_valid({"cmd": "status", "extra": 1})
    assert not REQUEST_VALIDATOR.is_valid({"cmd": "status", "args": {"verbose": True}})
    for name in ("request", "config"):
        assert '"additionalProperties": false' in json.dumps(P.shipped_schema(name))


def test_split_envelope() -> None:
    assert P.split_envelope([b"id", b"{}"]) == ([b"id"], b"{}")
    assert P.split_envelope([b"id", b"", b"{}"]) == ([b"id", b""], b"{}")
    assert P.split_envelope([b"id", b"a", b"b"]) == ([b"id"], None)
    assert P.split_envelope([b"id", b""]) == ([b"id", b""], None)
    assert P.split_envelope([b"id"]) is None


def _loc(seq: int, n: int = 3) -> dict[str, Any]:
    rng = np.random.default_rng(seq)
    return P.loc_header(
        seq=seq,
        frame=10 + seq,
        t_acq_s=1.7e9,
        stage_z_um=-2.0,
        x_um=rng.uniform(0, 100, n),
        y_um=rng.uniform(0, 100, n).astype(np.float32),
        z_um=rng.uniform(0, 100, n),
        score=rng.uniform(0, 1, n),
        model="m1",
        inference_s=0.004,
    )


def _track_columns(n: int) -> dict[str, np.ndarray]:
    cols = {c: np.linspace(0, 1, n) for c in P.TRACK_FLOAT_COLUMNS}
    cols["track_id"] = np.arange(n, dtype=np.int64)
    cols["confirmed"] = np.arange(n) % 2 == 0
    cols["age_frames"] = np.arange(n, dtype=np.int64) + 1
    cols["hits"] = np.ones(n, dtype=np.int64)
    cols["misses"] = np.zeros(n, dtype=np.int64)
    cols["localization_index"] = np.arange(n)
    return cols


def test_builders_validate_against_shipped_schemas() -> None:
    seqs = P.Sequencer()
    loc = _loc(seqs.next("loc"))
    P.validate("loc", loc)
    assert loc["n"] == 3 and loc["seq"] == 0 and loc["schema_version"] == P.SCHEMA_VERSION
    empty = P.loc_header(
        seq=1, frame=0, t_acq_s=0.0, stage_z_um=None, x_um=[], y_um=[], z_um=[], score=[]
    )
    P.validate("loc", empty)
    tr = P.track_header(
        seq=seqs.next("track"), frame=4, t_acq_s=1.0, stage_z_um=0.0, columns=_track_columns(4)
    )
    P.validate("track", tr)
    assert tr["status"] == ["confirmed", "tentative", "confirmed", "tentative"]
    assert "localization_index" not in tr
    job = P.job_info("j1", "train", "running", progress=1.7, message="epoch 3")
    assert job["progress"] == 1.0
    events = [
        P.event_header(seq=0, kind="state", state=P.State.LIVE),
        P.event_header(seq=1, kind="job", job=job),
        P.event_header(seq=2, kind="error", error={"code": "internal", "message": "x"}),
        P.event_header(
            seq=3,
            kind="driver",
            state="error",
            error={"code": "driver_error", "message": "camera stalled"},
            message="restarting stream (2/3)",
        ),
        P.event_header(seq=4, kind="model", model={"name": "m1", "path": "/x"}),
        P.event_header(
            seq=5, kind="recording", recording={"name": "r", "path": "/r.h5", "active": True}
        ),
    ]
    for e in events:
        P.validate("event", e)
    hb = P.hb_header(
        seq=0,
        state="idle",
        frames_acquired=0,
        frames_analysed=0,
        frames_dropped=0,
        model=None,
        uptime_s=1.5,
    )
    P.validate("hb", hb)
    for h in [loc, tr, *events, hb]:
        frames = P.encode_message(h)
        topic, back, payload = P.decode_message([bytes(f) for f in frames])
        assert topic == h["topic"] and back == h and payload is None
        json.loads(frames[1])  # strict JSON, no NaN


def test_validation_catches_bad_headers() -> None:
    loc = _loc(0)
    bad_len = dict(loc, x_um=[1.0])
    with pytest.raises(P.SchemaError, match="x_um"):
        P.validate("loc", bad_len)
    with pytest.raises(P.SchemaError):
        P.validate("loc", dict(loc, seq=-1))
    with pytest.raises(P.SchemaError):
        P.validate("loc", dict(loc, extra=1))
    with pytest.raises(P.SchemaError):
        P.validate("loc", {k: v for k, v in loc.items() if k != "t_acq_s"})
    with pytest.raises(P.SchemaError, match="job"):
        P.validate("event", P.event_header(seq=0, kind="job"))
    with pytest.raises(P.SchemaError):
        P.validate("hb", dict(P.hb_header(seq=0, state="idle", frames_acquired=0,
                                           frames_analysed=0, frames_dropped=0, model=None,
                                           uptime_s=0.0), state="sleeping"))  # fmt: skip
    with pytest.raises(ValueError):
        P.event_header(seq=0, kind="party")
    with pytest.raises(ValueError, match="lengths"):
        P.loc_header(seq=0, frame=0, t_acq_s=0, stage_z_um=0, x_um=[1], y_um=[], z_um=[], score=[])


def test_non_finite_values_become_null() -> None:
    h = P.loc_header(
        seq=0,
        frame=0,
        t_acq_s=0.0,
        stage_z_um=float("nan"),
        x_um=[np.nan],
        y_um=[np.inf],
        z_um=[1.0],
        score=[0.5],
    )
    assert h["x_um"] == [None] and h["y_um"] == [None] and h["stage_z_um"] is None
    P.validate("loc", h)
    P.dumps(h)


def test_sequencer_per_topic_and_thread_safe() -> None:
    s = P.Sequencer()
    assert [s.next("loc") for _ in range(3)] == [0, 1, 2]
    assert s.next(P.Topic.TRACK) == 0 and s.peek("loc") == 3
    got: list[int] = []
    lock = threading.Lock()

    def work() -> None:
        mine = [s.next("hb") for _ in range(500)]
        with lock:
            got.extend(mine)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert sorted(got) == list(range(2000))


def test_topics_are_not_prefixes_of_each_other() -> None:
    names = [t.value for t in P.Topic]
    for a in names:
        for b in names:
            assert a == b or not b.startswith(a)


def test_docs_cover_every_command_argument_code_and_field() -> None:
    doc = (REPO / "docs" / "protocol.md").read_text("utf-8")
    for c in P.COMMANDS.values():
        assert f"`{c.name}`" in doc, c.name
        for a in c.args:
            assert f"`{a.name}`" in doc, f"{c.name}.{a.name}"
    for code in ErrorCode:
        assert f"`{code.value}`" in doc, code
    for state in P.State:
        assert f"`{state.value}`" in doc, state
    for kind in P.EventKind:
        assert f"`{kind.value}`" in doc, kind
    for t in P.Topic:
        for field in S.topic_schema(t)["properties"]:
            assert f"`{field}`" in doc, f"{t.value}.{field}"

"""The JSON Schemas shipped in ``focaltrack/daemon/schemas/``, generated.

``loc`` and ``track`` come from their records (`focaltrack.records.wire`), ``request`` from
the command table (`focaltrack.daemon.protocol.COMMANDS`), ``config`` from the service
configuration; ``event``, ``hb`` and ``reply`` are declared here. Regenerate the files with
``python -m focaltrack.daemon.schemagen --write-schemas`` (a test checks they are current).

Two forms of each schema. The *strict* form (`strict_schemas`) closes every object it
declares: what the service sends must be exactly what is documented, and
`focaltrack.daemon.protocol.validate` checks the service's messages with it. The *shipped*
form of what clients receive (`CLIENT_SIDE`: the published headers and the replies) is the
strict one opened (`open_for_clients`: no ``additionalProperties: false``), because a
client validating with the schema it was built against must keep working when a later
revision of the same ``schema_version`` adds an optional field (docs/protocol.md: "ignore
fields you do not know"). What the service receives stays closed: ``request.json`` (an
unknown request field or argument is an error) and ``config.json`` (an unknown key is an
error).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from focaltrack.daemon.protocol import (
    COMMANDS,
    MAX_ID_LENGTH,
    ErrorCode,
    EventKind,
    JobKind,
    JobState,
    State,
    Topic,
)
from focaltrack.records.wire import (
    ENVELOPE_REQUIRED,
    SCHEMA_DRAFT,
    SCHEMA_ID,
    envelope_props,
    loc_schema,
    schema_object,
    track_schema,
)

__all__ = [
    "CLIENT_SIDE",
    "all_schemas",
    "open_for_clients",
    "reply_schema",
    "request_schema",
    "schema_text",
    "strict_schemas",
    "topic_schema",
]

#: The shipped schemas of what clients receive, opened for fields a later revision adds.
CLIENT_SIDE: frozenset[str] = frozenset(
    {"loc.json", "track.json", "event.json", "hb.json", "reply.json"}
)

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


def topic_schema(topic: Topic | str) -> dict[str, Any]:
    """The JSON Schema of one topic's header (``loc`` and ``track`` from their records)."""
    t = Topic(topic)
    if t is Topic.LOC:
        return loc_schema()
    if t is Topic.TRACK:
        return track_schema()
    props = envelope_props(t.value)
    req = list(ENVELOPE_REQUIRED)
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
        s = schema_object(props, [*req, "kind"], "event: state changes, jobs, errors", "event.json")
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
    return schema_object(props, req, "hb: heartbeat, about once a second", "hb.json")


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
    s = schema_object(
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
        "$schema": SCHEMA_DRAFT,
        "$id": SCHEMA_ID + "reply.json",
        "title": "control reply",
        "oneOf": [
            # Every reply carries "id" (null when the request had none or was unreadable).
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["ok", "result", "id"],
                "properties": {"ok": {"const": True}, "result": {}, "id": rid},
            },
            {
                "type": "object",
                "additionalProperties": False,
                "required": ["ok", "error", "id"],
                "properties": {"ok": {"const": False}, "error": _ERROR_OBJ, "id": rid},
            },
        ],
        "$defs": {"job": _JOB_OBJ},
    }


def strict_schemas() -> dict[str, dict[str, Any]]:
    """File name -> schema, every declared object closed (what the service must send)."""
    from focaltrack.daemon.config import config_schema

    out = {f"{t.value}.json": topic_schema(t) for t in Topic}
    out["request.json"] = request_schema()
    out["reply.json"] = reply_schema()
    out["config.json"] = config_schema()
    return out


def open_for_clients(schema: Any) -> Any:
    """``schema`` without ``"additionalProperties": false`` at any depth (a copy): fields
    it does not declare are allowed, the declared ones are checked as before."""
    if isinstance(schema, dict):
        return {
            k: open_for_clients(v)
            for k, v in schema.items()
            if not (k == "additionalProperties" and v is False)
        }
    if isinstance(schema, list):
        return [open_for_clients(v) for v in schema]
    return schema


def all_schemas() -> dict[str, dict[str, Any]]:
    """File name -> schema, as shipped in ``focaltrack/daemon/schemas/`` (`CLIENT_SIDE`
    opened, the others strict)."""
    return {
        name: open_for_clients(s) if name in CLIENT_SIDE else s
        for name, s in strict_schemas().items()
    }


def schema_text(schema: Mapping[str, Any]) -> str:
    return json.dumps(schema, indent=2, ensure_ascii=False) + "\n"


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

"""The wire form of the records: the ``loc`` and ``track`` PUB headers and their JSON Schemas.

Every published header starts with the envelope (``schema_version``, the topic's version in
`SCHEMA_VERSIONS`; ``topic``, ``seq``, ``t_pub_s``); ``loc`` and ``track`` then carry the
frame (``frame``, ``t_acq_s``, ``stage_z_um``), ``n`` and one JSON array per wire column of
their record (`focaltrack.records.columns.Column.wire`): floats as numbers (a non-finite
value as null, JSON has no NaN), ints as integers, enums as their values. `LocHeader` and
`TrackHeader` are the typed form of those headers (a test checks them against the generated
schemas).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any, Literal, TypedDict, cast

import numpy as np

from focaltrack.records.columns import Column, check_lengths, columns_of, fill_absent, to_columns
from focaltrack.records.localizations import Localizations
from focaltrack.records.tracks import Tracks

__all__ = [
    "SCHEMA_VERSIONS",
    "TRACK_SCHEMA_VERSION",
    "WIRE_SCHEMA_VERSION",
    "LocHeader",
    "TrackHeader",
    "envelope",
    "loc_message",
    "loc_schema",
    "track_message",
    "track_schema",
]

#: Version of the ``loc``, ``event`` and ``hb`` headers. A topic's version is raised only
#: when a field of its header changes meaning or goes (docs/protocol.md), so the topics'
#: versions differ.
WIRE_SCHEMA_VERSION = 1
#: Version of the ``track`` header. 2: ``status`` gained ``"coasting"`` (a confirmed track
#: that missed this frame, sent as ``"confirmed"`` in version 1), so ``"confirmed"`` now
#: means "confirmed and updated by this frame's localization".
TRACK_SCHEMA_VERSION = 2
#: Each topic's header version.
SCHEMA_VERSIONS: dict[str, int] = {
    "loc": WIRE_SCHEMA_VERSION,
    "track": TRACK_SCHEMA_VERSION,
    "event": WIRE_SCHEMA_VERSION,
    "hb": WIRE_SCHEMA_VERSION,
}


# The optional keys go in a total=False subclass: with postponed annotations Python cannot
# see NotRequired[...] when it builds the TypedDict, so __required_keys__ would list them.
class _LocRequired(TypedDict):
    schema_version: Literal[1]
    topic: Literal["loc"]
    seq: int
    t_pub_s: float
    frame: int
    t_acq_s: float
    stage_z_um: float | None
    n: int
    x_um: list[float | None]
    y_um: list[float | None]
    z_um: list[float | None]
    score: list[float | None]
    sigma_x_um: list[float | None]
    sigma_y_um: list[float | None]
    sigma_z_um: list[float | None]
    photons: list[float | None]
    background: list[float | None]
    flags: list[int]


class LocHeader(_LocRequired, total=False):
    """``loc``: one analysed frame's localizations, version 1."""

    model: str | None
    inference_s: float


class _TrackRequired(TypedDict):
    schema_version: Literal[2]
    topic: Literal["track"]
    seq: int
    t_pub_s: float
    frame: int
    t_acq_s: float
    stage_z_um: float | None
    n: int
    track_id: list[int]
    x_um: list[float | None]
    y_um: list[float | None]
    z_um: list[float | None]
    vx_um_s: list[float | None]
    vy_um_s: list[float | None]
    vz_um_s: list[float | None]
    sigma_x_um: list[float | None]
    sigma_y_um: list[float | None]
    sigma_z_um: list[float | None]
    status: list[Literal["tentative", "confirmed", "coasting"]]
    age_frames: list[int]
    misses: list[int]


class TrackHeader(_TrackRequired, total=False):
    """``track``: the tracks alive at one frame, version 2."""

    hits: list[int]


# ----------------------------------------------------------------------------- headers


def envelope(topic: str, seq: int, t_pub_s: float | None) -> dict[str, Any]:
    """The fields every published header starts with (``schema_version``: the topic's)."""
    return {
        "schema_version": SCHEMA_VERSIONS.get(topic, WIRE_SCHEMA_VERSION),
        "topic": topic,
        "seq": int(seq),
        "t_pub_s": time.time() if t_pub_s is None else float(t_pub_s),
    }


def _frame(frame: int, t_acq_s: float, stage_z_um: float | None) -> dict[str, Any]:
    z = None if stage_z_um is None or not math.isfinite(stage_z_um) else float(stage_z_um)
    return {"frame": int(frame), "t_acq_s": float(t_acq_s), "stage_z_um": z}


#: Below this many rows a Python loop beats numpy's per-call overhead.
_SMALL = 64


def _encode(c: Column, values: Any) -> list[Any]:
    """One column as JSON values (runs for every column of every published frame)."""
    if not hasattr(values, "__len__"):  # an iterator
        values = list(values)
    if c.kind == "float":
        if len(values) < _SMALL:
            isfinite = math.isfinite
            if isinstance(values, np.ndarray) and values.dtype.kind == "f":
                return [x if isfinite(x) else None for x in values.ravel().tolist()]
            fs = [float(x) for x in values]
            return [f if isfinite(f) else None for f in fs]
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        ok = np.isfinite(v)
        if ok.all():
            return v.tolist()
        out = v.astype(object)
        out[~ok] = None
        return out.tolist()
    if c.kind == "int":
        if isinstance(values, np.ndarray) and values.dtype.kind in "iu":
            return values.ravel().tolist()
        return [int(x) for x in values]
    a = np.asarray(values).reshape(-1)
    assert c.enum is not None
    if a.dtype.kind in "USO":  # values already
        return [str(x) for x in a.tolist()]
    # codes, the stored form
    values_of = [m.value for m in c.enum]
    return [values_of[i] for i in a.astype(np.intp).tolist()]


def wire_columns(record: Any, cols: Mapping[str, Any]) -> dict[str, list[Any]]:
    """The wire columns of a record class from ``cols`` (by field name; an optional column
    may be absent, and a column with an `absent <Column.absent>` value is that value where
    ``cols`` lacks it), encoded for JSON; ValueError if their lengths differ."""
    out: dict[str, list[Any]] = {}
    specs = columns_of(record)
    if any(c.absent is not None and c.name not in cols for c in specs):
        first = next(c.name for c in specs if c.wire == "required" and c.name in cols)
        rows = cols[first]
        if not hasattr(rows, "__len__"):  # an iterator: read it once
            cols = {**cols, first: list(rows)}
        cols = fill_absent(record, cols, len(cols[first]))
    for c in specs:
        if c.wire is None or (c.wire == "optional" and c.name not in cols):
            continue
        out[c.name] = _encode(c, cols[c.name])
    check_lengths(out)
    return out


def loc_message(
    locs: Localizations | Mapping[str, Any],
    *,
    seq: int,
    frame: int,
    t_acq_s: float,
    stage_z_um: float | None,
    model: str | None = None,
    inference_s: float | None = None,
    t_pub_s: float | None = None,
) -> LocHeader:
    """The ``loc`` header of one frame's localizations (a record, or its columns by name)."""
    cols = to_columns(locs) if isinstance(locs, Localizations) else locs
    h = envelope("loc", seq, t_pub_s) | _frame(frame, t_acq_s, stage_z_um)
    h |= wire_columns(Localizations, cols)
    h["n"] = len(h["x_um"])
    h["model"] = model
    if inference_s is not None:
        h["inference_s"] = float(inference_s)
    return cast(LocHeader, h)


def track_message(
    tracks: Tracks | Mapping[str, Any],
    *,
    seq: int,
    frame: int,
    t_acq_s: float,
    stage_z_um: float | None,
    t_pub_s: float | None = None,
) -> TrackHeader:
    """The ``track`` header of the tracks alive at a frame (a record, or its columns)."""
    cols = to_columns(tracks) if isinstance(tracks, Tracks) else tracks
    h = envelope("track", seq, t_pub_s) | _frame(frame, t_acq_s, stage_z_um)
    h |= wire_columns(Tracks, cols)
    h["n"] = len(h["track_id"])
    return cast(TrackHeader, h)


# ----------------------------------------------------------------------------- schemas

SCHEMA_ID = "https://focaltrack.invalid/schemas/"
SCHEMA_DRAFT = "https://json-schema.org/draft/2020-12/schema"

ENVELOPE_REQUIRED = ["schema_version", "topic", "seq", "t_pub_s"]
_FRAME_REQUIRED = ["frame", "t_acq_s", "stage_z_um"]
_FRAME_PROPS: dict[str, Any] = {
    "frame": {"type": "integer", "minimum": 0, "description": "camera frame index"},
    "t_acq_s": {"type": "number", "description": "acquisition time, UNIX epoch s"},
    "stage_z_um": {
        "type": ["number", "null"],
        "description": "focus drive position at acquisition, µm (null if unknown)",
    },
}


def envelope_props(topic: str) -> dict[str, Any]:
    return {
        "schema_version": {"const": SCHEMA_VERSIONS.get(topic, WIRE_SCHEMA_VERSION)},
        "topic": {"const": topic},
        "seq": {"type": "integer", "minimum": 0, "description": "per-topic counter from 0"},
        "t_pub_s": {"type": "number", "description": "publish time, UNIX epoch s"},
    }


def schema_object(
    props: dict[str, Any], required: list[str], title: str, name: str
) -> dict[str, Any]:
    """A closed object schema (no properties beyond ``props``), the strict form of a shipped
    file (`focaltrack.daemon.schemagen` ships the ones clients receive opened)."""
    return {
        "$schema": SCHEMA_DRAFT,
        "$id": SCHEMA_ID + name,
        "title": title,
        "type": "object",
        "additionalProperties": False,
        "required": required,
        "properties": props,
    }


def column_schema(c: Column) -> dict[str, Any]:
    """The JSON Schema of one wire column (an array, one item per row)."""
    if c.kind == "float":
        items: dict[str, Any] = {"type": ["number", "null"]}
    elif c.kind == "int":
        items = {"type": "integer", "minimum": 0}
    else:
        assert c.enum is not None
        items = {"enum": [m.value for m in c.enum]}
    return {"type": "array", "items": items}


def _columns_schema(record: Any) -> tuple[dict[str, Any], list[str]]:
    props, req = {}, []
    for c in columns_of(record):
        if c.wire is not None:
            props[c.name] = column_schema(c)
            if c.wire == "required":
                req.append(c.name)
    return props, req


def loc_schema() -> dict[str, Any]:
    """The JSON Schema of the ``loc`` header (shipped as ``loc.json``)."""
    cols, cols_req = _columns_schema(Localizations)
    props = envelope_props("loc") | _FRAME_PROPS
    props["n"] = {"type": "integer", "minimum": 0, "description": "number of localizations"}
    props |= cols
    props["model"] = {"type": ["string", "null"], "description": "model that produced them"}
    props["inference_s"] = {"type": "number", "minimum": 0}
    req = [*ENVELOPE_REQUIRED, *_FRAME_REQUIRED, "n", *cols_req]
    return schema_object(props, req, "loc: one analysed frame's localizations", "loc.json")


def track_schema() -> dict[str, Any]:
    """The JSON Schema of the ``track`` header (shipped as ``track.json``)."""
    cols, cols_req = _columns_schema(Tracks)
    props = envelope_props("track") | _FRAME_PROPS
    props["n"] = {"type": "integer", "minimum": 0, "description": "number of tracks"}
    props |= cols
    req = [*ENVELOPE_REQUIRED, *_FRAME_REQUIRED, "n", *cols_req]
    return schema_object(props, req, "track: the tracks alive at one frame", "track.json")


def wire_float_columns(record: Any) -> tuple[str, ...]:
    """Names of the record's float columns on the wire."""
    return tuple(c.name for c in columns_of(record) if c.wire and c.kind == "float")

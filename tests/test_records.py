"""The records are the one declaration of their fields: the JSON Schemas, the PUB headers,
the recorder's HDF5 datasets and the offline commands' CSV columns all agree with them, and a
field added to a record appears in every one of them."""

from __future__ import annotations

import csv
import dataclasses
import typing
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from focaltrack.daemon import protocol as P
from focaltrack.daemon import recorder as R
from focaltrack.daemon import schemagen
from focaltrack.daemon.commands import localize as localize_cmd
from focaltrack.daemon.commands import track as track_cmd
from focaltrack.drivers.base import Frame
from focaltrack.models.tracker import KalmanTracker, TrackerConfig, link_table
from focaltrack.records import (
    STATUS_CODES,
    FrameMeta,
    Localizations,
    LocHeader,
    TrackHeader,
    Tracks,
    TrackStatus,
    column,
    columns_of,
    csv_columns,
    hdf5_columns,
    to_columns,
)
from focaltrack.records import wire as W

REPO = Path(__file__).resolve().parents[1]
RECORDS = (FrameMeta, Localizations, Tracks)


def _locs(frame: int = 7, n: int = 4) -> Localizations:
    rng = np.random.default_rng(frame)
    return Localizations(
        frame,
        rng.uniform(0, 50, n),
        rng.uniform(0, 50, n),
        rng.uniform(-10, 10, n),
        rng.uniform(0, 1, n),
    )


def _tracks(frames: int = 6) -> Tracks:
    """The record of a real tracker after a few frames (every status present)."""
    tracker = KalmanTracker(TrackerConfig(confirm_hits=3, confirm_window=5))
    rng = np.random.default_rng(3)
    start = rng.uniform(0, 40, (3, 3))
    for k in range(frames):
        xyz = start + 0.5 * k
        if k == frames - 1:
            # the first emitter is missed (its track coasts); a newborn, tentative
            xyz = np.vstack([xyz[1:], [[90.0, 90.0, 0.0]]])
        out = tracker.update_frame(xyz, 0.01 * k)
    return out.record(frame=frames - 1)


# ----------------------------------------------------------------------------- declarations


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: r.__name__)
def test_every_field_is_declared_with_dtype_and_unit_in_its_name(record: type) -> None:
    cols = columns_of(record)
    assert [c.name for c in cols] == [f.name for f in dataclasses.fields(record)]
    for c in cols:
        np.dtype(c.dtype)  # a numpy dtype
        assert c.doc
        # the unit is in the name: x_um, vx_um_s, t_s, exposure_ms (counts and ids have none;
        # photo-electrons are counts: ``photons``, ``background`` per pixel)
        units = {"µm": "_um", "µm/s": "_um_s", "s": "_s", "ms": "_ms", "": ""}
        suffix = {**units, "e⁻": "photons", "e⁻/px": "background"}[c.unit]
        assert c.name.endswith(suffix), c.name


def test_one_status_map() -> None:
    # Files hold the codes: existing ones never change. The wire and CSV encoders write
    # member i for code i, so the codes are the declaration order.
    assert STATUS_CODES == {"tentative": 0, "confirmed": 1, "coasting": 2}
    assert [TrackStatus.of_code(c) for c in STATUS_CODES.values()] == list(TrackStatus)
    assert [s.code for s in TrackStatus] == list(range(len(TrackStatus)))
    assert TrackStatus.of_confirmed(np.array([True, False])).tolist() == [1, 0]
    conf, misses = np.array([True, True, False, False]), np.array([0, 2, 0, 1])
    assert TrackStatus.of_confirmed(conf, misses).tolist() == [1, 2, 0, 0]
    assert TrackStatus.is_confirmed(np.array([0, 1, 2])).tolist() == [False, True, True]


# ----------------------------------------------------------------------------- wire


@pytest.mark.parametrize(
    ("name", "generate"), [("loc", W.loc_schema), ("track", W.track_schema)], ids=["loc", "track"]
)
def test_shipped_schemas_are_the_generated_ones(name: str, generate: Any) -> None:
    shipped = (REPO / "daemon" / "schemas" / f"{name}.json").read_text("utf-8")
    # Shipped open (clients ignore fields a later revision adds), generated closed (what the
    # service sends is exactly what the records declare).
    assert shipped == schemagen.schema_text(schemagen.open_for_clients(generate()))
    assert schemagen.topic_schema(name) == generate()


@pytest.mark.parametrize(
    ("record", "header", "schema"),
    [(Localizations, LocHeader, W.loc_schema), (Tracks, TrackHeader, W.track_schema)],
    ids=["loc", "track"],
)
def test_wire_typeddict_schema_and_record_agree(record: type, header: Any, schema: Any) -> None:
    s = schema()
    hints = typing.get_type_hints(header)
    assert set(hints) == set(s["properties"])
    assert set(header.__required_keys__) == set(s["required"])
    on_wire = [c for c in columns_of(record) if c.wire is not None]
    # every wire column of the record is a schema property and a TypedDict key, as a list
    for c in on_wire:
        assert s["properties"][c.name]["type"] == "array"
        assert typing.get_origin(hints[c.name]) is list
        assert (c.name in s["required"]) == (c.wire == "required")
    # and nothing else in the header is an array
    arrays = {k for k, v in s["properties"].items() if v.get("type") == "array"}
    assert arrays == {c.name for c in on_wire}
    version = W.SCHEMA_VERSIONS[s["properties"]["topic"]["const"]]
    assert hints["schema_version"] == typing.Literal[version]
    assert s["properties"]["schema_version"] == {"const": version}


def test_each_topic_has_its_own_schema_version() -> None:
    """Only the track header changed (status gained coasting): only its version moved."""
    assert W.SCHEMA_VERSIONS == {"loc": 1, "track": 2, "event": 1, "hb": 1}
    assert W.TRACK_SCHEMA_VERSION == 2 and W.WIRE_SCHEMA_VERSION == P.SCHEMA_VERSION == 1
    for topic, version in W.SCHEMA_VERSIONS.items():
        assert schemagen.topic_schema(topic)["properties"]["schema_version"] == {"const": version}
        assert W.envelope(topic, 0, 1.0)["schema_version"] == version
    assert P.event_header(seq=0, kind="state", state="idle")["schema_version"] == 1


def test_loc_header_from_the_record_validates_and_round_trips() -> None:
    locs = _locs()
    h = W.loc_message(
        locs, seq=3, frame=locs.frame, t_acq_s=1.7e9, stage_z_um=5.0, model="m", t_pub_s=2.0
    )
    P.validate("loc", h)
    topic, back, payload = P.decode_message(P.encode_message(h))
    assert topic == "loc" and payload is None and back == h
    assert back["n"] == len(locs) and back["frame"] == locs.frame
    for c in columns_of(Localizations):
        if c.wire is not None:  # null (JSON) is NaN
            got = np.array(back[c.name], dtype=np.float64)
            np.testing.assert_allclose(got, getattr(locs, c.name), rtol=1e-7)
    # the legacy keyword builder gives the same header
    legacy = P.loc_header(
        seq=3, frame=7, t_acq_s=1.7e9, stage_z_um=5.0, model="m", t_pub_s=2.0,
        x_um=locs.x_um, y_um=locs.y_um, z_um=locs.z_um, score=locs.score,
    )  # fmt: skip
    assert legacy == h


def test_track_header_from_the_record_validates_and_round_trips() -> None:
    tracks = _tracks()
    assert set(tracks.status.tolist()) == {0, 1, 2}
    h = W.track_message(tracks, seq=0, frame=5, t_acq_s=1.0, stage_z_um=None, t_pub_s=2.0)
    P.validate("track", h)
    # the track that missed this frame is coasting, on the wire by name, with its misses
    coasting = [i for i, s in enumerate(h["status"]) if s == "coasting"]
    assert len(coasting) == 1 and h["misses"][coasting[0]] == 1
    assert h["schema_version"] == W.TRACK_SCHEMA_VERSION == 2
    _, back, _ = P.decode_message(P.encode_message(h))
    assert back == h and back["n"] == len(tracks)
    for c in columns_of(Tracks):
        if c.wire is None:  # not a column on the wire (frame is the header's scalar)
            assert not isinstance(back.get(c.name), list)
        elif c.enum is not None:
            assert [STATUS_CODES[s] for s in back[c.name]] == getattr(tracks, c.name).tolist()
        else:
            np.testing.assert_allclose(back[c.name], getattr(tracks, c.name))
    # the service's path: TrackFrame.as_columns() -> track_header, and the legacy bool column
    assert P.track_header(seq=0, frame=5, t_acq_s=1.0, stage_z_um=None, t_pub_s=2.0,
                          columns=tracks.columns()) == h  # fmt: skip
    legacy = {k: v for k, v in tracks.columns().items() if k != "status"}
    legacy["confirmed"] = tracks.confirmed
    assert P.track_header(seq=0, frame=5, t_acq_s=1.0, stage_z_um=None, t_pub_s=2.0,
                          columns=legacy) == h  # fmt: skip
    assert P.TRACK_FLOAT_COLUMNS == tuple(
        c.name for c in columns_of(Tracks) if c.wire and c.kind == "float"
    )


def test_non_finite_floats_go_out_as_null() -> None:
    locs = dataclasses.replace(_locs(n=2), x_um=np.array([np.nan, 1.0]))
    h = W.loc_message(locs, seq=0, frame=0, t_acq_s=0.0, stage_z_um=float("inf"))
    assert h["x_um"][0] is None and h["stage_z_um"] is None
    P.validate("loc", h)


# ----------------------------------------------------------------------------- files


def _record_file(path: Path, locs: Localizations, tracks: Tracks) -> None:
    r = R.Recorder(path, frame_shape=(4, 5))
    r.start()
    r.add_frame(Frame(np.zeros((4, 5), np.uint16), locs.frame, 1.0, 2.0, 10.0))
    r.add_results(locs.frame, locs, tracks)
    r.stop()


def test_recorder_datasets_are_the_records_hdf5_columns(tmp_path: Path) -> None:
    locs, tracks = _locs(), _tracks()
    _record_file(tmp_path / "rec.h5", locs, tracks)
    with h5py.File(tmp_path / "rec.h5", "r") as f:
        for group, record in (
            ("frame_meta", FrameMeta),
            ("localizations", Localizations),
            ("tracks", Tracks),
        ):
            want = hdf5_columns(record)
            assert set(f[group]) == set(want), group
            for name, dt in want.items():
                ds = f[group][name]
                if dt == "enum":
                    assert h5py.check_enum_dtype(ds.dtype) == STATUS_CODES
                else:
                    assert ds.dtype == np.dtype(dt), f"{group}/{name}"
        np.testing.assert_allclose(f["localizations/x_um"][()], locs.x_um)
        assert f["localizations/frame"][()].tolist() == [locs.frame] * len(locs)
        assert f["tracks/status"][()].tolist() == tracks.status.tolist()
        assert f["tracks/frame"][()].tolist() == [locs.frame] * len(tracks)
    assert dict(R.FRAME_META_COLUMNS) == hdf5_columns(FrameMeta)
    assert dict(R.LOC_COLUMNS) == hdf5_columns(Localizations)
    assert dict(R.TRACK_COLUMNS) == hdf5_columns(Tracks)


def test_csv_headers_are_the_records_csv_columns(tmp_path: Path) -> None:
    assert tuple(localize_cmd.COLUMNS) == csv_columns(Localizations)
    assert tuple(track_cmd.CSV_COLUMNS) == csv_columns(Tracks)
    localize_cmd.write_localizations(tmp_path / "l.csv", [_locs(0), _locs(1, 0)], {})
    with (tmp_path / "l.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == csv_columns(Localizations) and len(rows) == 1 + 4
    table = link_table(np.repeat(np.arange(8), 2), np.arange(48.0).reshape(16, 3), fps=10.0)
    track_cmd.write_tracks(table, tmp_path / "t.csv", TrackerConfig())
    with (tmp_path / "t.csv").open() as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == csv_columns(Tracks) and len(rows) == 1 + len(table)
    assert {r[rows[0].index("status")] for r in rows[1:]} <= set(STATUS_CODES)
    track_cmd.write_tracks(table, tmp_path / "t.h5", TrackerConfig())
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert set(f["tracks"]) == {*csv_columns(Tracks), "cov_xyz_um2"}


def test_coasting_rows_keep_their_status_in_the_track_files(tmp_path: Path) -> None:
    frames, xyz = [], []
    for k in range(8):
        for e in range(2):
            if (k, e) != (5, 1):  # the second emitter is missed in frame 5
                frames.append(k)
                xyz.append([10.0 + 0.5 * k, 20.0 * e, 0.0])
    table = link_table(np.array(frames), np.array(xyz), fps=100.0)
    coasting = table.coasting
    assert coasting.sum() == 1 and table.frame[coasting].tolist() == [5]
    assert table.confirmed[coasting].all()  # a coasting track is a confirmed one
    track_cmd.write_tracks(table, tmp_path / "t.csv", TrackerConfig())
    with (tmp_path / "t.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [r["status"] for r in rows] == [TrackStatus.of_code(c).value for c in table.status]
    assert [r["misses"] for r in rows if r["status"] == "coasting"] == ["1"]
    track_cmd.write_tracks(table, tmp_path / "t.h5", TrackerConfig())
    with h5py.File(tmp_path / "t.h5", "r") as f:
        assert h5py.check_enum_dtype(f["tracks/status"].dtype) == STATUS_CODES
        assert f["tracks/status"][()].tolist() == table.status.tolist()


def test_every_format_keeps_its_historical_names() -> None:
    """What files and subscribers already read: the schema-1 names, in their order."""
    assert csv_columns(Localizations)[:5] == ("frame", "x_um", "y_um", "z_um", "score")
    assert tuple(hdf5_columns(FrameMeta)) == ("index", "t_acq_s", "stage_z_um", "exposure_ms")
    assert csv_columns(Tracks)[-1] == "localization_row"
    assert "localization_row" not in W.track_schema()["properties"]


# ----------------------------------------------------------------------------- one edit


def _with_extra_field(record: type, name: str, **flags: Any) -> type:
    """``record`` with one more float column, as adding it to the class would give."""
    spec = column("f8", "µm", "a new column", **flags)
    return dataclasses.make_dataclass(
        record.__name__, [(name, np.ndarray, spec)], bases=(record,), frozen=True, eq=False
    )


@pytest.mark.parametrize(
    ("record", "module_attr", "schema", "group"),
    [
        (Localizations, "Localizations", W.loc_schema, "localizations"),
        (Tracks, "Tracks", W.track_schema, "tracks"),
    ],
    ids=["loc", "track"],
)
def test_a_field_added_to_a_record_appears_everywhere(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    record: type,
    module_attr: str,
    schema: Any,
    group: str,
) -> None:
    ext = _with_extra_field(record, "sigma_new_um")
    monkeypatch.setattr(W, module_attr, ext)
    monkeypatch.setattr(R, module_attr, ext)
    key = "LOC_COLUMNS" if record is Localizations else "TRACK_COLUMNS"
    monkeypatch.setattr(R, key, hdf5_columns(ext))
    # schema: a required array
    s = schema()
    assert s["properties"]["sigma_new_um"] == {
        "type": "array",
        "items": {"type": ["number", "null"]},
    }
    assert "sigma_new_um" in s["required"]
    # header: sent, and valid against the new schema
    base = _locs() if record is Localizations else _tracks()
    n = len(base)
    rec = ext(**{f.name: getattr(base, f.name) for f in dataclasses.fields(record)},
              sigma_new_um=np.full(n, 0.25))  # fmt: skip
    if record is Localizations:
        h: Any = W.loc_message(rec, seq=0, frame=7, t_acq_s=1.0, stage_z_um=0.0)
    else:
        h = W.track_message(rec, seq=0, frame=7, t_acq_s=1.0, stage_z_um=0.0)
    assert h["sigma_new_um"] == [0.25] * n
    import jsonschema

    jsonschema.validate(h, s)
    # HDF5 and CSV
    assert hdf5_columns(ext)["sigma_new_um"] == "f8"
    assert csv_columns(ext)[-1] == "sigma_new_um"
    assert to_columns(rec)["sigma_new_um"].tolist() == [0.25] * n
    locs = rec if record is Localizations else _locs()
    tracks = rec if record is Tracks else _tracks()
    _record_file(tmp_path / "rec.h5", locs, tracks)
    with h5py.File(tmp_path / "rec.h5", "r") as f:
        assert f[group]["sigma_new_um"][()].tolist() == [0.25] * n

"""The fit's columns of a localization (issue #13): σ per axis, photons, background and flags,
in the record, the ``loc`` message, the recording and the CSV, and files and headers from
before them still read (as NaN and NOT_FITTED)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import h5py
import jsonschema
import numpy as np
import pytest

from focaltrack.daemon import protocol as P
from focaltrack.daemon import recorder as R
from focaltrack.daemon.commands import localize as localize_cmd
from focaltrack.daemon.commands import track as track_cmd
from focaltrack.drivers.base import Frame
from focaltrack.records import Localizations, LocFlag, columns_of
from focaltrack.records import wire as W
from focaltrack.records.localizations import FIT_COLUMNS

NAN = math.nan


def _fitted(frame: int = 3) -> Localizations:
    """Four localizations: two fits, one that did not converge, one the networks' only."""
    return Localizations(
        frame,
        np.array([1.0, 2.0, 3.0, 4.0]),
        np.array([5.0, 6.0, 7.0, 8.0]),
        np.array([10.0, 20.0, 30.0, 99.0]),
        np.array([0.9, 0.8, 0.7, 0.6]),
        sigma_x_um=np.array([0.012, 0.03, 0.2, NAN]),
        sigma_y_um=np.array([0.013, 0.031, 0.25, NAN]),
        sigma_z_um=np.array([0.05, 0.09, 1.5, NAN]),
        photons=np.array([5000.0, 1200.0, 300.0, NAN]),
        background=np.array([10.5, 11.0, 9.25, NAN]),
        flags=np.array(
            [0, LocFlag.BRIGHT, LocFlag.NOT_CONVERGED | LocFlag.Z_AT_RANGE_END, LocFlag.NOT_FITTED],
            dtype=np.uint16,
        ),
    )


def _old_locs(frame: int = 3, n: int = 3) -> Localizations:
    """A record as the networks alone give it (no fit columns given)."""
    return Localizations(frame, np.arange(n) + 1.0, np.arange(n) + 2.0, np.zeros(n), np.ones(n))


def test_left_out_fit_columns_are_nan_and_flagged_not_fitted() -> None:
    old = _old_locs()
    for name in FIT_COLUMNS:
        v = getattr(old, name)
        assert v.dtype == np.float32 and v.shape == (3,) and np.isnan(v).all(), name
    assert old.flags.dtype == np.uint16 and old.flags.tolist() == [LocFlag.NOT_FITTED] * 3
    assert len(Localizations.empty(0).flags) == 0
    # σ given, flags not: NOT_FITTED exactly where a σ is unknown
    part = Localizations(
        0, np.zeros(2), np.zeros(2), np.zeros(2), np.ones(2),
        sigma_x_um=np.array([0.1, NAN]), sigma_y_um=np.array([0.1, 0.1]),
        sigma_z_um=np.array([0.2, 0.2]),
    )  # fmt: skip
    assert part.flags.tolist() == [0, LocFlag.NOT_FITTED]
    np.testing.assert_allclose(part.sigma_xyz_um[0], [0.1, 0.1, 0.2], rtol=1e-7)
    assert part.sigma_x_um.dtype == np.float32  # stored as declared
    assert part.sigma_xyz_um.shape == (2, 3)
    # flags given are kept
    assert _fitted().flags.tolist() == [0, 16, 6, 1]
    spec = {c.name: c for c in columns_of(Localizations)}
    assert [spec[n].dtype for n in (*FIT_COLUMNS, "flags")] == ["f4"] * 5 + ["u2"]
    assert [int(b) for b in LocFlag] == [1, 2, 4, 8, 16]


def test_loc_message_carries_the_fit_columns_and_validates() -> None:
    locs = _fitted()
    h = W.loc_message(locs, seq=0, frame=3, t_acq_s=1.0, stage_z_um=12.0, t_pub_s=2.0)
    P.validate("loc", h)  # the strict schema
    jsonschema.validate(h, P.shipped_schema("loc"))  # what clients have
    _, back, _ = P.decode_message(P.encode_message(h))
    assert back == h
    for name in FIT_COLUMNS:
        got = back[name]
        assert got[3] is None, name  # NaN goes out as null
        want = getattr(locs, name)[:3].astype(np.float64)
        np.testing.assert_allclose(got[:3], want, rtol=1e-7, err_msg=name)
    assert back["flags"] == [0, 16, 6, 1] and all(type(f) is int for f in back["flags"])
    # a float in the flags column, or a negative one, is not a valid header
    for bad in ([0.5, 0, 0, 0], [-1, 0, 0, 0]):
        with pytest.raises(P.SchemaError):
            P.validate("loc", {**h, "flags": bad})
    # every fit column is required: a service sends them in every loc message
    assert set(W.loc_schema()["required"]) >= {*FIT_COLUMNS, "flags"}


def test_columns_without_the_fit_go_out_as_null_and_not_fitted() -> None:
    # the four-column builder (and any mapping from before the fit) gets the absent values
    h = P.loc_header(seq=0, frame=1, t_acq_s=1.0, stage_z_um=None, x_um=[1.0, 2.0],
                     y_um=[1.0, 2.0], z_um=[0.0, 0.0], score=[0.5, 0.5])  # fmt: skip
    P.validate("loc", h)
    assert all(h[name] == [None, None] for name in FIT_COLUMNS)
    assert h["flags"] == [1, 1]
    # a generator of positions is read once
    g = W.loc_message({"x_um": (v for v in [1.0]), "y_um": [2.0], "z_um": [3.0],
                       "score": [1.0]}, seq=0, frame=0, t_acq_s=0.0, stage_z_um=None)  # fmt: skip
    assert g["x_um"] == [1.0] and g["flags"] == [1] and g["n"] == 1
    assert W.loc_message(_old_locs(n=2), seq=0, frame=3, t_acq_s=1.0, stage_z_um=None,
                         t_pub_s=h["t_pub_s"])["flags"] == [1, 1]  # fmt: skip


def _record(path: Path, *results: tuple[int, object]) -> None:
    r = R.Recorder(path, frame_shape=(4, 5), frames=False)
    r.start()
    for i, (frame, locs) in enumerate(results):
        r.add_frame(Frame(np.zeros((4, 5), np.uint16), frame, 1.0 + 0.01 * i, 2.0, 10.0))
        r.add_results(frame, locs, None)  # type: ignore[arg-type]
    r.stop()


def test_recording_keeps_the_fit_columns_and_reads_files_without_them(tmp_path: Path) -> None:
    fitted = _fitted(3)
    legacy = {"x_um": np.array([40.0]), "y_um": np.array([41.0]), "z_um": np.array([2.0]),
              "score": np.array([0.5])}  # fmt: skip
    path = tmp_path / "rec.h5"
    _record(path, (3, fitted), (4, legacy))
    with h5py.File(path, "r") as f:
        g = f["localizations"]
        for name in FIT_COLUMNS:
            assert g[name].dtype == np.float32
            want = getattr(fitted, name).astype(np.float32)  # stored as the column's dtype
            np.testing.assert_array_equal(g[name][:4], want, err_msg=name)
            assert np.isnan(g[name][4]), name  # the mapping without it
        assert g["flags"].dtype == np.uint16
        assert g["flags"][()].tolist() == [0, 16, 6, 1, 1]
        assert g["flags"].attrs["bits"] == (
            "1 not_fitted, 2 not_converged, 4 z_at_range_end, 8 xy_at_window_edge, 16 bright"
        )
    # read back by `focaltrack track`: its σ per axis
    table = track_cmd.read_localizations(path)
    assert table.sigma_xyz_um is not None
    np.testing.assert_allclose(table.sigma_xyz_um[0], [0.012, 0.013, 0.05], rtol=1e-6)
    assert np.isnan(table.sigma_xyz_um[3:]).all()
    # a recording from before the fit columns: no σ, still read and tracked
    with h5py.File(path, "r+") as f:
        for name in (*FIT_COLUMNS, "flags"):
            del f["localizations"][name]
    old = track_cmd.read_localizations(path)
    assert old.sigma_xyz_um is None and len(old.frame) == 5
    np.testing.assert_array_equal(old.xyz_um, table.xyz_um)


def test_csv_has_the_fit_columns_and_track_reads_csvs_with_or_without_them(
    tmp_path: Path,
) -> None:
    out = tmp_path / "locs.csv"
    localize_cmd.write_localizations(out, [_fitted(3), _old_locs(4, 1)], {})
    with out.open() as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[:11] == ["frame", "x_um", "y_um", "z_um", "score", *FIT_COLUMNS, "flags"]
    assert [r["flags"] for r in rows] == ["0", "16", "6", "1", "1"]
    assert rows[0]["sigma_x_um"] == "0.01200" and rows[0]["photons"] == "5000.0"
    assert rows[3]["sigma_z_um"] == "nan" and rows[4]["background"] == "nan"
    table = track_cmd.read_localizations(out)
    assert table.sigma_xyz_um is not None
    np.testing.assert_allclose(table.sigma_xyz_um[:3], _fitted().sigma_xyz_um[:3], atol=1e-5)
    assert np.isnan(table.sigma_xyz_um[3:]).all()
    # the HDF5 output has them as datasets
    localize_cmd.write_localizations(tmp_path / "locs.h5", [_fitted(3)], {})
    with h5py.File(tmp_path / "locs.h5", "r") as f:
        assert f["localizations/flags"][()].tolist() == [0, 16, 6, 1]
        assert f["localizations/sigma_z_um"].dtype == np.float32
    # a CSV from before them (five columns), or with only some σ columns
    old = tmp_path / "old.csv"
    old.write_text("frame,x_um,y_um,z_um,score\n0,1.0,2.0,3.0,0.5\n1,1.1,2.0,3.0,0.5\n")
    assert track_cmd.read_localizations(old).sigma_xyz_um is None
    part = tmp_path / "part.csv"
    part.write_text("frame,x_um,y_um,z_um,sigma_z_um\n0,1.0,2.0,3.0,0.25\n")
    s = track_cmd.read_localizations(part).sigma_xyz_um
    assert s is not None and np.isnan(s[0, :2]).all() and s[0, 2] == 0.25

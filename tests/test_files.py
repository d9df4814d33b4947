"""The atomic write and the JSON helpers of focaltrack.common.files."""

from __future__ import annotations

import json
import math
import os
from enum import Enum
from pathlib import Path

import numpy as np
import pytest

from focaltrack.common.files import (
    atomic_path,
    clean,
    fmt,
    json_default,
    write_json_atomic,
    write_text_atomic,
)


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    p.write_text("old")
    write_text_atomic(p, "new")
    assert p.read_text() == "new"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(p) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert p.read_text() == "old"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.txt"]


def test_mode(tmp_path: Path) -> None:
    p = write_text_atomic(tmp_path / "m", "x", mode=0o640, fsync=True)
    assert p.stat().st_mode & 0o777 == 0o640
    umask = os.umask(0o022)
    try:
        q = write_text_atomic(tmp_path / "d", "x")
    finally:
        os.umask(umask)
    assert q.stat().st_mode & 0o777 == 0o644  # as a plain open() would make it, not 0o600


class Colour(str, Enum):
    RED = "red"


def test_json_helpers(tmp_path: Path) -> None:
    obj = {
        "i": np.int64(3),
        "f": np.float32(0.5),
        "nan": float("nan"),
        "np_inf": np.float64("inf"),
        "a": np.arange(3),
        "t": (1, np.bool_(True)),
        "e": Colour.RED,
        "p": Path("/x/y"),
        "nested": [{"n": np.float32("nan")}],
    }
    c = clean(obj)
    assert c["i"] == 3 and type(c["i"]) is int
    assert c["nan"] is None and c["np_inf"] is None and c["nested"][0]["n"] is None
    assert c["a"] == [0, 1, 2] and c["t"] == [1, True] and type(c["t"][1]) is bool
    p = write_json_atomic(tmp_path / "o.json", c)
    back = json.loads(p.read_text())
    assert back["e"] == "red" and back["p"] == "/x/y" and back["f"] == 0.5
    assert p.read_text().endswith("\n")
    with pytest.raises(ValueError):  # strict JSON: NaN refused when not cleaned
        write_json_atomic(tmp_path / "bad.json", {"x": math.nan})
    assert not (tmp_path / "bad.json").exists()
    with pytest.raises(TypeError, match="not JSON serialisable"):
        json_default(object())


def test_fmt() -> None:
    assert fmt(None) == "-"
    assert fmt(float("nan"), missing="nan") == "nan"
    assert fmt(1.23456) == "1.235"
    assert fmt(np.float32(2.5), ".1f", unit=" ms") == "2.5 ms"
    assert fmt(7) == "7" and fmt("x") == "x"
    assert fmt(np.int64(4)) == "4"

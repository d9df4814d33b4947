"""Column specifications: each field of a record declared once, read by every format.

A record is a frozen dataclass whose fields are numpy columns (one row per localization or
per track) or scalars that hold for every row (the frame of one frame's localizations).
Each field is declared with `column`, which puts a `Column` in the dataclass field's
metadata: its dtype, unit and meaning, and where it appears — on the wire (the PUB header of
its topic), in the recorder's HDF5 tables, in the CSV of the offline commands. The wire
encoder, the JSON Schemas, the HDF5 datasets and the CSV headers all read these
(`columns_of`), so a new field is one line in its record.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal

import numpy as np

__all__ = [
    "FLUSHED",
    "Column",
    "column",
    "columns_of",
    "concat",
    "csv_columns",
    "csv_rows",
    "fill_absent",
    "flushed_counts",
    "hdf5_columns",
    "to_columns",
]

_KEY = "focaltrack.column"

#: A recording's root dataset of the rows on disk for certain, written by its recorder after
#: each flush: (frames, localizations, track rows). HDF5 can show a live file's new rows
#: before their values reach the disk, so a follower reads up to these counts.
FLUSHED = "flushed"

#: ``"required"``: in every header of the topic; ``"optional"``: in the schema, sent when
#: known; ``None``: not on the wire.
WireUse = Literal["required", "optional"] | None


@dataclass(frozen=True, slots=True)
class Column:
    """One field of a record (see the module docstring)."""

    name: str
    #: numpy dtype string of the column (``"f8"``, ``"i8"``, ``"u1"`` ...); for an `Enum`
    #: column the dtype of its codes.
    dtype: str
    #: Unit of the values (``"µm"``, ``"µm/s"``, ``"s"``; ``""`` for counts, ids, scores).
    unit: str
    doc: str
    wire: WireUse = "required"
    hdf5: bool = True
    csv: bool = True
    #: How a float is written in CSV: a printf format (``"%.4f"``, ``"%.6g"``) or ``"repr"``
    #: (the shortest exact form); ints are always written whole, enums as their values.
    csv_format: str = "%.6g"
    #: The codes of an enum column (stored as its codes, sent and written as its values).
    enum: type[Enum] | None = None
    #: The value of every row where a source lacks the column: a file written, or columns
    #: given by name, before the column existed (`fill_absent`). None: always present.
    absent: Any = None
    #: ``"float"``, ``"int"`` or ``"enum"``: how the wire and CSV write it (from the above).
    kind: Literal["float", "int", "enum"] = field(init=False)

    def __post_init__(self) -> None:
        kind = "enum" if self.enum else "float" if np.dtype(self.dtype).kind == "f" else "int"
        object.__setattr__(self, "kind", kind)


def column(
    dtype: str,
    unit: str,
    doc: str,
    *,
    wire: WireUse = "required",
    hdf5: bool = True,
    csv: bool = True,
    csv_format: str = "%.6g",
    enum: type[Enum] | None = None,
    default: Any = dataclasses.MISSING,
    absent: Any = None,
) -> Any:
    """A dataclass field carrying its `Column` (the name is taken from the attribute);
    ``default``: the value of a field that callers may leave out; such a field is keyword-only,
    so that columns without a default can still be added after it. ``absent``: see
    `Column.absent`."""
    spec = Column("", dtype, unit, doc, wire, hdf5, csv, csv_format, enum, absent)
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata={_KEY: spec})
    return dataclasses.field(default=default, kw_only=True, metadata={_KEY: spec})


def columns_of(record: Any) -> tuple[Column, ...]:
    """The `Column` of every field of a record class (or instance), in declaration order."""
    return _columns_of(record if isinstance(record, type) else type(record))


@functools.cache  # asked per published frame: read the dataclass fields once per class
def _columns_of(record: type) -> tuple[Column, ...]:
    out = []
    for f in dataclasses.fields(record):
        spec = f.metadata.get(_KEY)
        if spec is not None:
            out.append(dataclasses.replace(spec, name=f.name))
    return tuple(out)


def hdf5_columns(record: Any) -> dict[str, str]:
    """Dataset name → dtype of the record's HDF5 table (enum columns: ``"enum"``)."""
    return {c.name: ("enum" if c.enum else c.dtype) for c in columns_of(record) if c.hdf5}


def csv_columns(record: Any) -> tuple[str, ...]:
    """The CSV header of the record: its `CSV_ORDER` where it has one (the order files have
    had since their first version), then every other CSV column in declaration order."""
    names = [c.name for c in columns_of(record) if c.csv]
    legacy = [n for n in getattr(record, "CSV_ORDER", ()) if n in names]
    return (*legacy, *(n for n in names if n not in legacy))


def to_columns(record: Any) -> dict[str, np.ndarray]:
    """Every field as a 1-D column of the record's length; scalar fields repeated per row."""
    values = {c.name: getattr(record, c.name) for c in columns_of(record)}
    n = next((len(v) for v in values.values() if isinstance(v, np.ndarray)), 0)
    for c in columns_of(record):
        v = values[c.name]
        if not isinstance(v, np.ndarray):
            values[c.name] = np.full(n, v, dtype=np.dtype(c.dtype))
        elif v.ndim != 1:
            values[c.name] = v.reshape(-1)
    return values


def fill_absent(record: Any, cols: Mapping[str, Any], n: int) -> dict[str, Any]:
    """``cols`` (by name, ``n`` rows) with each column of the record that it lacks and that
    has an `absent <Column.absent>` value added as that value on every row."""
    out = dict(cols)
    for c in columns_of(record):
        if c.absent is not None and c.name not in out:
            out[c.name] = np.full(n, c.absent, dtype=np.dtype(c.dtype))
    return out


def concat(records: Iterable[Any], cls: type[Any] | None = None) -> dict[str, np.ndarray]:
    """The rows of several records as one set of columns (empty columns when none)."""
    parts = [to_columns(r) for r in records]
    if not parts:
        if cls is None:
            raise ValueError("concat of no records needs the record class")
        return {c.name: np.zeros(0, dtype=np.dtype(c.dtype)) for c in columns_of(cls)}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def csv_rows(record: Any, cols: Mapping[str, Any]) -> list[list[str]]:
    """The CSV cells (header excluded) of columns of a record class, in `csv_columns` order:
    ints whole, floats by their ``csv_format``, enums as their values."""
    names = csv_columns(record)
    spec = {c.name: c for c in columns_of(record)}
    text = [_csv_cells(spec[n], cols[n]) for n in names]
    return [list(row) for row in zip(*text, strict=True)]


def _csv_cells(c: Column, values: Any) -> list[str]:
    v = np.asarray(values).reshape(-1)
    if c.enum is not None:
        members = list(c.enum)
        if v.dtype.kind in "USO":
            return [str(x) for x in v.tolist()]
        return [str(members[int(x)].value) for x in v.tolist()]
    if c.kind == "int" or v.dtype.kind in "iub":
        return [str(int(x)) for x in v.tolist()]
    if c.csv_format == "repr":
        return [repr(float(x)) for x in v.tolist()]
    fmt = c.csv_format
    return [fmt % float(x) for x in v.tolist()]


def check_lengths(cols: Mapping[str, Any]) -> int:
    """The common length of the columns; ValueError naming the lengths if they differ."""
    lengths = {len(v) for v in cols.values()}
    if len(lengths) > 1:
        raise ValueError(f"columns have different lengths: {sorted(lengths)}")
    return lengths.pop() if lengths else 0


def flushed_counts(f: Any) -> tuple[int | None, int | None, int | None]:
    """(frames, localizations, track rows) a recording's writer vouched for (`FLUSHED`) in
    the open HDF5 file ``f``; None each in a file without the count (written before it was
    added), which has only its datasets' lengths."""
    ds = f.get(FLUSHED)
    if ds is None or getattr(ds, "shape", None) != (3,):
        return None, None, None
    frames, locs, tracks = (int(v) for v in ds[()])
    return frames, locs, tracks

"""Records: frame metadata, localizations and tracks, defined once.

Each record is a frozen dataclass of numpy columns whose names carry their units; every
field is declared once, with its dtype, unit, meaning and the formats it appears in
(`columns.column`). The PUB headers and their JSON Schemas (`wire`), the recorder's HDF5
datasets and the CSV columns of the offline commands are generated from those declarations.
"""

from focaltrack.records.columns import (
    FLUSHED,
    Column,
    column,
    columns_of,
    concat,
    csv_columns,
    fill_absent,
    flushed_counts,
    hdf5_columns,
    to_columns,
)
from focaltrack.records.frames import FrameMeta
from focaltrack.records.localizations import Localizations, LocFlag
from focaltrack.records.tracks import STATUS_CODES, Tracks, TrackStatus
from focaltrack.records.wire import (
    SCHEMA_VERSIONS,
    TRACK_SCHEMA_VERSION,
    WIRE_SCHEMA_VERSION,
    LocHeader,
    TrackHeader,
)

__all__ = [
    "FLUSHED",
    "SCHEMA_VERSIONS",
    "STATUS_CODES",
    "TRACK_SCHEMA_VERSION",
    "WIRE_SCHEMA_VERSION",
    "Column",
    "FrameMeta",
    "LocFlag",
    "LocHeader",
    "Localizations",
    "TrackHeader",
    "TrackStatus",
    "Tracks",
    "column",
    "columns_of",
    "concat",
    "csv_columns",
    "fill_absent",
    "flushed_counts",
    "hdf5_columns",
    "to_columns",
]

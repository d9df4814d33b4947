"""Small file and JSON helpers: the atomic write, JSON-safe values, one number formatter.

An atomic write puts the data in a temporary file beside the target (same directory, so the
same file system) and renames it over the target only when it is complete: a reader sees the
old file or the new one, never half of one, and a crash leaves at most a hidden
``.NAME.*.tmp`` file behind.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike[str], *, mode: int | None = None, fsync: bool = False
) -> Iterator[Path]:
    """Yield a fresh temporary path beside ``path``; rename it over ``path`` on success.

    For writers that want a file name (h5py, ``savefig``, ``np.savez``). On an exception
    the temporary file is deleted and the target is left as it was.

    ``mode``: the permission bits of the result. ``None`` gives what a plain ``open`` would
    (``0o666`` less the umask) — ``mkstemp`` alone makes the file private (``0o600``).
    ``fsync``: flush the data to disk before the rename (state that must survive a power
    cut, at the price of a disk round trip).
    """
    target = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, _default_mode() if mode is None else mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _default_mode() -> int:
    umask = os.umask(0)  # the only way to read it is to set it
    os.umask(umask)
    return 0o666 & ~umask


def write_text_atomic(
    path: str | os.PathLike[str],
    text: str,
    *,
    mode: int | None = None,
    fsync: bool = False,
    encoding: str = "utf-8",
) -> Path:
    """Write ``text`` to ``path`` atomically (see `atomic_path` for ``mode`` and ``fsync``)."""
    target = Path(path)
    with atomic_path(target, mode=mode, fsync=fsync) as tmp:
        tmp.write_text(text, encoding=encoding)
    return target


def write_json_atomic(
    path: str | os.PathLike[str],
    obj: Any,
    *,
    indent: int | None = 2,
    mode: int | None = None,
    fsync: bool = False,
) -> Path:
    """Write ``obj`` as strict JSON (NaN refused; numpy, enums and paths converted by
    `json_default`), with a final newline, atomically."""
    text = json.dumps(obj, indent=indent, allow_nan=False, default=json_default)
    return write_text_atomic(path, text + "\n", mode=mode, fsync=fsync)


def json_default(o: Any) -> Any:
    """``default=`` for `json.dumps`: enum members by value, paths as strings, numpy scalars
    and arrays as Python numbers and lists. Anything else is an error, as without it."""
    if isinstance(o, Enum):
        return o.value
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    tolist: Callable[[], Any] | None = getattr(o, "tolist", None)  # numpy scalars and arrays
    if tolist is not None:
        return tolist()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def clean(o: Any) -> Any:
    """A copy fit for strict JSON: NaN and ±inf become ``None`` (JSON has no such numbers),
    numpy scalars and arrays become Python values and lists, tuples become lists;
    dictionaries and lists are walked recursively."""
    if isinstance(o, dict):
        return {k: clean(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [clean(v) for v in o]
    if isinstance(o, bool | str) or o is None:
        return o
    if isinstance(o, float):  # np.float64 is a float too
        return float(o) if math.isfinite(o) else None
    tolist: Callable[[], Any] | None = getattr(o, "tolist", None)
    if tolist is not None:  # numpy scalar (incl. np.bool_, np.float32) or array
        return clean(tolist())
    return o


def fmt(value: Any, spec: str = ".3f", *, missing: str = "-", unit: str = "") -> str:
    """One value for a table or a printed line.

    ``None`` and a non-finite float print as ``missing``; a float (numpy's too) with
    ``spec`` and then ``unit``; anything else (ints, strings) with ``str`` and ``unit``.
    """
    if value is None:
        return missing
    if isinstance(value, float) or (
        hasattr(value, "dtype") and getattr(value.dtype, "kind", "") == "f"
    ):
        v = float(value)
        return f"{v:{spec}}{unit}" if math.isfinite(v) else missing
    return f"{value}{unit}"

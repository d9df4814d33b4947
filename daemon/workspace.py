"""The service's workspace: calibrations, model bundles, recordings and the current choice.

Layout under the root (``workspace.dir``, or the per-user data folder)::

    calibrations/<name>.h5      calibration files (focaltrack.calibration.Calibration)
    models/<name>/              model bundles (focaltrack.models.bundle)
    recordings/<name>.h5        recordings
    state.json                  {"calibration": name|null, "model": name|null}

Names are letters, digits, ``.``, ``_`` and ``-`` (at most 128, not starting with ``.``);
generated names are UTC timestamps such as ``cal-20261121-085012`` (``-2``, ``-3``... if
taken). ``state.json`` is written atomically (temporary file, then rename), so a crash leaves
the old or the new state, never half of one; an unreadable state file reads as "nothing
chosen" with a warning rather than stopping the service.

Listing reads only metadata (HDF5 attributes, ``bundle.json``): no torch import.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from focaltrack.common.errors import FocaltrackError
from focaltrack.common.files import write_text_atomic

log = logging.getLogger("focaltrack.workspace")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
STATE_FILE = "state.json"


class WorkspaceError(FocaltrackError, ValueError):
    """A bad name or an unusable workspace folder."""


class NotFound(WorkspaceError):
    """No calibration, model or recording of that name."""


@dataclass(frozen=True, slots=True)
class WorkspaceState:
    calibration: str | None = None
    model: str | None = None


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith((".h5", ".tmp")):
        raise WorkspaceError(
            f"{what} {name!r} is not valid: use letters, digits, '.', '_' and '-' "
            "(at most 128, starting with a letter or digit, no .h5 suffix)"
        )
    return name


class Workspace:
    def __init__(self, root: str | os.PathLike[str], *, create: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.calibrations_dir = self.root / "calibrations"
        self.models_dir = self.root / "models"
        self.recordings_dir = self.root / "recordings"
        self.state_path = self.root / STATE_FILE
        if create:
            try:
                for d in (self.calibrations_dir, self.models_dir, self.recordings_dir):
                    d.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise WorkspaceError(f"cannot create workspace {self.root}: {e}") from None
        elif not self.root.is_dir():
            raise WorkspaceError(f"workspace {self.root} does not exist")

    def __repr__(self) -> str:
        return f"Workspace({str(self.root)!r})"

    # -------------------------------------------------------------- paths and names

    def calibration_path(self, name: str) -> Path:
        return self.calibrations_dir / f"{check_name(name, 'calibration name')}.h5"

    def model_path(self, name: str) -> Path:
        return self.models_dir / check_name(name, "model name")

    def recording_path(self, name: str) -> Path:
        return self.recordings_dir / f"{check_name(name, 'recording name')}.h5"

    def find_calibration(self, name: str) -> Path:
        p = self.calibration_path(name)
        if not p.is_file():
            raise NotFound(f"no calibration named {name!r} in {self.calibrations_dir}")
        return p

    def find_model(self, name: str) -> Path:
        p = self.model_path(name)
        if not (p / "COMPLETE").is_file():
            raise NotFound(f"no complete model bundle named {name!r} in {self.models_dir}")
        return p

    def new_name(self, prefix: str, *, now_s: float | None = None) -> str:
        """A free UTC timestamp name like ``cal-20261121-085012`` (prefix cal/model/rec)."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(time.time() if now_s is None else now_s))
        base = f"{prefix}-{stamp}"
        taken = {
            p.name.removesuffix(".h5")
            for d in (self.calibrations_dir, self.models_dir, self.recordings_dir)
            if d.is_dir()
            for p in d.iterdir()
        }
        name, k = base, 1
        while name in taken:
            k += 1
            name = f"{base}-{k}"
        return name

    # -------------------------------------------------------------- listings

    def list_calibrations(self) -> list[dict[str, Any]]:
        """Calibrations, oldest first: name, path, created, sha256, pixel_size_um, z_step_um,
        n_slices, source, size_bytes (unreadable files are listed with an ``error``)."""
        out = []
        for p in sorted(self.calibrations_dir.glob("*.h5")):
            if p.name.startswith("."):
                continue
            item: dict[str, Any] = {"name": p.stem, "path": str(p), "size_bytes": _size(p)}
            try:
                import h5py

                with h5py.File(p, "r") as f:
                    a = f.attrs
                    item.update(
                        created=_text(a.get("created_utc")),
                        sha256=_text(a.get("sha256")),
                        pixel_size_um=_num(a.get("pixel_size_um")),
                        z_step_um=_num(a.get("z_step_um")),
                        n_slices=int(f["z_um"].shape[0]) if "z_um" in f else None,
                        source=_text(a.get("source")),
                    )
            except (OSError, KeyError, ValueError) as e:
                item["error"] = f"unreadable: {e}"
            out.append(item)
        return sorted(out, key=lambda d: (d.get("created") or "", d["name"]))

    def list_models(self) -> list[dict[str, Any]]:
        """Complete model bundles, oldest first: name, path, created, calibration_sha256,
        pixel_size_um, preset, validation (the bundle's held-out metrics)."""
        out = []
        for p in sorted(self.models_dir.iterdir()) if self.models_dir.is_dir() else []:
            if p.name.startswith(".") or not p.is_dir() or not (p / "COMPLETE").is_file():
                continue
            item: dict[str, Any] = {"name": p.name, "path": str(p)}
            try:
                meta = json.loads((p / "bundle.json").read_text("utf-8"))
                cal = meta.get("calibration") or {}
                training = meta.get("training") or {}
                item.update(
                    created=meta.get("created_utc"),
                    calibration_sha256=cal.get("sha256"),
                    pixel_size_um=meta.get("pixel_size_um"),
                    preset=training.get("preset"),
                    validation=meta.get("validation"),
                )
            except (OSError, ValueError, AttributeError) as e:
                item["error"] = f"unreadable bundle.json: {e}"
            out.append(item)
        return sorted(out, key=lambda d: (d.get("created") or "", d["name"]))

    def list_recordings(self) -> list[dict[str, Any]]:
        return [
            {"name": p.stem, "path": str(p), "size_bytes": _size(p)}
            for p in sorted(self.recordings_dir.glob("*.h5"))
            if not p.name.startswith(".")
        ]

    # -------------------------------------------------------------- state

    def read_state(self) -> WorkspaceState:
        """The last chosen calibration and model; names whose files are gone are dropped."""
        try:
            data = json.loads(self.state_path.read_text("utf-8"))
        except FileNotFoundError:
            return WorkspaceState()
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable %s: %s", self.state_path, e)
            return WorkspaceState()
        if not isinstance(data, dict):
            log.warning("ignoring %s: not a JSON object", self.state_path)
            return WorkspaceState()
        cal, model = data.get("calibration"), data.get("model")
        try:
            cal = None if cal is None else self.find_calibration(cal).stem
        except WorkspaceError as e:
            log.warning("state.json names a calibration that is not usable: %s", e)
            cal = None
        try:
            model = None if model is None else self.find_model(model).name
        except WorkspaceError as e:
            log.warning("state.json names a model that is not usable: %s", e)
            model = None
        return WorkspaceState(cal, model)

    def write_state(self, state: WorkspaceState) -> None:
        """Atomically replace state.json."""
        for value, what in ((state.calibration, "calibration"), (state.model, "model")):
            if value is not None:
                check_name(value, f"{what} name")
        text = json.dumps({"calibration": state.calibration, "model": state.model}, indent=2)
        # fsync: the service's choice of model must survive a power cut
        write_text_atomic(self.state_path, text + "\n", fsync=True)

    def update_state(self, **changes: str | None) -> WorkspaceState:
        """Change ``calibration`` and/or ``model`` and write; returns the new state."""
        unknown = set(changes) - {"calibration", "model"}
        if unknown:
            raise TypeError(f"unknown state field(s): {sorted(unknown)}")
        cur = self.read_state()
        new = WorkspaceState(
            changes.get("calibration", cur.calibration), changes.get("model", cur.model)
        )
        self.write_state(new)
        return new


def _size(p: Path) -> int | None:
    try:
        return p.stat().st_size
    except OSError:
        return None


def _text(v: Any) -> str | None:
    if v is None:
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


def _num(v: Any) -> float | None:
    return None if v is None else float(v)

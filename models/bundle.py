"""Model bundles: the two trained networks with everything needed to use them correctly.

A bundle is a directory::

    model/
      bundle.json      metadata (below)
      lateral.pt       LateralNet state_dict (torch.save)
      axial.pt         AxialNet state_dict (torch.save)
      calibration.h5   a copy of the calibration it was trained from
      COMPLETE         written last; a bundle without it is rejected

``bundle.json``: ``kind`` ("focaltrack.model"), ``schema_version``, ``created_utc``,
``calibration`` (``sha256`` of the calibration content, ``source``, ``file`` name),
``pixel_size_um``, ``z_um`` (the calibration z grid = the axial network's bins),
``bit_depth``, ``noise`` (offset, read noise, gain), ``preprocess`` (the constants of
`focaltrack.calibration.preprocess.Preprocess`), ``lateral`` / ``axial`` (architecture configs),
``decode`` (thresholds and merge radii chosen on validation data), ``training`` (preset
name, all settings, seed, ``world_size`` (the processes of a data-parallel training; a
bundle without it was trained by one, see `training_world_size`) and ``backend``, device,
durations, synthesizer throughput), ``validation``
(metrics on held-out synthetic frames), ``versions`` (focaltrack, torch, numpy, python).

Writing is atomic: the bundle is assembled in a temporary directory beside the target and
renamed into place only when complete, so an interrupted training leaves no directory
that `load_bundle` accepts (a leftover ``.NAME.tmp-*`` directory is safe to delete).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from focaltrack.calibration import Calibration, CalibrationError
from focaltrack.common.errors import FocaltrackError
from focaltrack.common.files import json_default
from focaltrack.models.nets import AxialConfig, AxialNet, LateralConfig, LateralNet

BUNDLE_SCHEMA_VERSION = 2
#: 1: axial network without per-bin lateral offsets (still read and applied as trained)
READABLE_SCHEMA_VERSIONS = (1, 2)
BUNDLE_KIND = "focaltrack.model"
FILES = ("bundle.json", "lateral.pt", "axial.pt", "calibration.h5")
MARKER = "COMPLETE"


class BundleError(FocaltrackError, ValueError):
    """A model bundle that cannot be written or read: the message names the problem."""


@dataclass
class ModelBundle:
    path: Path
    meta: dict[str, Any]
    calibration: Calibration
    lateral: LateralNet
    axial: AxialNet


def save_bundle(
    out: str | os.PathLike[str],
    *,
    calibration: Calibration,
    lateral: LateralNet,
    axial: AxialNet,
    meta: dict[str, Any],
    overwrite: bool = False,
) -> Path:
    """Write a bundle atomically (temporary directory beside ``out``, then rename)."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise BundleError(f"output directory {parent} does not exist")
    if out.exists() and not overwrite:
        raise BundleError(f"{out} already exists (use --force to replace it)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        calibration.save(tmp / "calibration.h5")
        torch.save(_cpu_state(lateral), tmp / "lateral.pt")
        torch.save(_cpu_state(axial), tmp / "axial.pt")
        meta = dict(meta)
        meta.setdefault("kind", BUNDLE_KIND)
        meta.setdefault("schema_version", BUNDLE_SCHEMA_VERSION)
        meta["lateral"] = lateral.cfg.to_dict()
        meta["axial"] = axial.cfg.to_dict()
        (tmp / "bundle.json").write_text(json.dumps(meta, indent=2, default=json_default))
        (tmp / MARKER).write_text(meta.get("created_utc", "") + "\n")
        _fsync_dir(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}


def _fsync_dir(d: Path) -> None:
    for p in d.iterdir():
        with open(p, "rb") as f:
            os.fsync(f.fileno())


def training_world_size(meta: dict[str, Any]) -> int:
    """How many data-parallel processes trained the bundle (1 for bundles from before
    ``training.world_size`` was recorded): with the seed, what reproduces the training."""
    training = meta.get("training") or {}
    return int(training.get("world_size") or 1)


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Validate the directory layout and return bundle.json (no weights loaded)."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"model {path} does not exist")
    if not path.is_dir():
        raise BundleError(f"model {path} is not a directory (a model bundle is a directory)")
    missing = [f for f in (*FILES, MARKER) if not (path / f).is_file()]
    if missing:
        raise BundleError(
            f"model {path} is incomplete (missing {', '.join(missing)}): was its training "
            "interrupted? Train it again."
        )
    try:
        meta = json.loads((path / "bundle.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"model {path}: bundle.json is unreadable: {e}") from e
    if not isinstance(meta, dict) or meta.get("kind") != BUNDLE_KIND:
        raise BundleError(f"{path} is not a focaltrack model bundle")
    version = meta.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        raise BundleError(
            f"model {path} has bundle schema version {version}; this focaltrack reads "
            f"versions {', '.join(map(str, READABLE_SCHEMA_VERSIONS))}"
        )
    return meta


def load_bundle(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> ModelBundle:
    """Load and check a bundle; the networks come back in eval mode on ``device``."""
    path = Path(path)
    meta = read_meta(path)
    try:
        cal = Calibration.load(path / "calibration.h5")
    except CalibrationError as e:
        raise BundleError(f"model {path}: its calibration copy is unusable: {e}") from e
    want = meta.get("calibration", {}).get("sha256")
    if cal.sha256 != want:
        raise BundleError(
            f"model {path}: calibration.h5 (sha256 {cal.sha256[:12]}…) is not the calibration "
            f"the networks were trained from ({str(want)[:12]}…)"
        )
    try:
        lateral = LateralNet(LateralConfig.from_dict(meta["lateral"]))
        axial = AxialNet(AxialConfig.from_dict(meta["axial"]))
        for net, name in ((lateral, "lateral.pt"), (axial, "axial.pt")):
            state = torch.load(path / name, map_location="cpu", weights_only=True)
            net.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError, OSError, EOFError) as e:
        raise BundleError(f"model {path}: weights could not be loaded: {e}") from e
    if axial.cfg.n_bins != len(cal.z_um):
        raise BundleError(
            f"model {path}: axial network has {axial.cfg.n_bins} bins for "
            f"{len(cal.z_um)} calibration slices"
        )
    lateral.to(device).eval()
    axial.to(device).eval()
    return ModelBundle(path, meta, cal, lateral, axial)

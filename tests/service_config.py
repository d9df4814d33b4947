"""Test-only: a service configuration on loopback with every port 0 (any free one), and a
workspace that already holds a calibration and a trained model."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from focaltrack.daemon.config import ServiceConfig, load_config
from focaltrack.daemon.workspace import Workspace, WorkspaceState


def loopback_config(ws: Path, **overrides: Any) -> ServiceConfig:
    """Defaults, no environment, workspace ``ws``, ports 0; ``overrides`` by dotted key
    (``**{"sim.n_emitters": 1}``)."""
    base = {
        "network.control_port": 0,
        "network.pub_port": 0,
        "network.metrics_port": 0,
        "workspace.dir": str(ws),
    }
    return load_config(None, env={}, overrides={**base, **overrides})


def workspace_with_model(
    root: Path,
    train_overrides: Mapping[str, Any],
    *,
    calibration: str = "cal-tiny",
    model: str = "tiny",
) -> Workspace:
    """A workspace at ``root`` as a service leaves it after ``calibrate z_range_um=10
    z_step_um=2`` and ``train preset=quick`` (with ``train_overrides``): a 6-slice
    calibration of the simulated microscope (0–10 µm, a 128-px window), a model trained on
    it in this process, and state.json naming both, so a service started there restores
    them. Seconds instead of a calibration job and a training subprocess."""
    from cnn_fixtures import make_calibration

    from focaltrack.models.train import train

    ws = Workspace(root)
    cal_path = ws.calibration_path(calibration)
    cal = make_calibration(np.arange(0.0, 11.0, 2.0))
    cal.save(cal_path)
    train(
        cal,
        ws.model_path(model),
        preset="quick",
        seed=0,
        progress=False,
        log=lambda _msg: None,
        overrides=dict(train_overrides),
        calibration_path=str(cal_path),
    )
    ws.write_state(WorkspaceState(calibration, model))
    return ws

"""Test-only: a service configuration on loopback with every port 0 (any free one)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from focaltrack.daemon.config import ServiceConfig, load_config


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

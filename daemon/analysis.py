"""The models the service analyses with: a bundle from the workspace, loaded as the live
pipeline's `AnalysisModel` (the localizer configured from ``[analysis]`` and a tracker
factory configured from ``[tracker]`` and the model's validation noise)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from focaltrack.daemon.config import TrackerSection, tracker_settings
from focaltrack.daemon.pipeline import AnalysisModel
from focaltrack.daemon.protocol import ErrorCode, ProtocolError

if TYPE_CHECKING:
    from focaltrack.daemon.config import AnalysisConfig
    from focaltrack.daemon.workspace import Workspace
    from focaltrack.models.tracker import KalmanTracker, TrackerConfig

__all__ = ["LoadedModel", "load_model", "tracker_config"]

log = logging.getLogger("focaltrack.analysis")


@dataclass(frozen=True, slots=True)
class LoadedModel:
    name: str
    path: Path
    meta: dict[str, Any]
    analysis: AnalysisModel

    @property
    def calibration_sha256(self) -> Any:
        """The calibration the model was trained from, as its bundle records it (or None)."""
        return (self.meta.get("calibration") or {}).get("sha256")


def load_model(
    ws: Workspace,
    name: str,
    analysis: AnalysisConfig,
    pixel_size_um: float | None,
    tracker: Any = None,
) -> LoadedModel:
    """Load bundle ``name`` from the workspace (`NotFound`; `ProtocolError` bad_args when it
    cannot be read). ``tracker``: the ``[tracker]`` section (`ServiceConfig.tracker`);
    ``None`` is its defaults. Imports torch on first use."""
    from focaltrack.models.bundle import read_meta
    from focaltrack.models.localizer import Localizer, LocalizerError

    path = ws.find_model(name)  # NotFound -> not_found
    a = analysis
    try:
        meta = read_meta(path)
        loc = Localizer.from_bundle(
            path,
            device=a.device or None,
            threads=a.threads or None,
            pixel_size_um=pixel_size_um,
            passes=a.passes or None,
            fit=None if a.fit == "model" else a.fit,
        )
    except (LocalizerError, ValueError) as e:
        raise ProtocolError(ErrorCode.BAD_ARGS, f"model {name!r}: {e}") from e
    cfg = tracker_config(TrackerSection() if tracker is None else tracker, meta)
    make_tracker = _tracker_factory(cfg)
    return LoadedModel(name, path, meta, AnalysisModel(name, loc, make_tracker))


def _tracker_factory(cfg: TrackerConfig) -> Callable[[], KalmanTracker]:
    from focaltrack.models.tracker import KalmanTracker

    return lambda: KalmanTracker(cfg)


def tracker_config(tracker: Any, meta: dict[str, Any]) -> TrackerConfig:
    """The live tracker's settings: the ``[tracker]`` section (`ServiceConfig.tracker`)
    through `TrackerConfig.from_settings`, the one way ``focaltrack track`` takes too; a
    measurement noise left at 0 comes from the model's validation (``meta``, its
    bundle.json), or is the tracker's default when the model has none."""
    from focaltrack.models.tracker_config import TrackerConfig, noise_from_validation

    try:
        noise: tuple[float, float] | None = noise_from_validation(meta)
    except ValueError as e:
        log.info("tracker noise: %s; the defaults are used where [tracker] gives none", e)
        noise = None
    return TrackerConfig.from_settings(tracker_settings(tracker), noise)

"""The models the service analyses with: a bundle from the workspace, loaded as the live
pipeline's `AnalysisModel` (the localizer and a tracker factory configured from
``[analysis]``)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from focaltrack.daemon.pipeline import AnalysisModel
from focaltrack.daemon.protocol import ErrorCode, ProtocolError

if TYPE_CHECKING:
    from focaltrack.daemon.config import AnalysisConfig
    from focaltrack.daemon.workspace import Workspace
    from focaltrack.models.tracker import KalmanTracker, TrackerConfig

__all__ = ["LoadedModel", "load_model", "tracker_config"]


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
    ws: Workspace, name: str, analysis: AnalysisConfig, pixel_size_um: float | None
) -> LoadedModel:
    """Load bundle ``name`` from the workspace (`NotFound`; `ProtocolError` bad_args when it
    cannot be read). Imports torch on first use."""
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
            passes=a.passes,
        )
    except (LocalizerError, ValueError) as e:
        raise ProtocolError(ErrorCode.BAD_ARGS, f"model {name!r}: {e}") from e
    cfg = tracker_config(analysis, meta)
    make_tracker = _tracker_factory(cfg)
    return LoadedModel(name, path, meta, AnalysisModel(name, loc, make_tracker))


def _tracker_factory(cfg: TrackerConfig) -> Callable[[], KalmanTracker]:
    from focaltrack.models.tracker import KalmanTracker

    return lambda: KalmanTracker(cfg)


def tracker_config(analysis: AnalysisConfig, meta: dict[str, Any]) -> TrackerConfig:
    """The live tracker's settings: ``[analysis] tracker_*``; a measurement noise left at 0
    comes from the model's validation (or the tracker's default when it has none)."""
    from focaltrack.models.tracker import MotionModel, TrackerConfig, noise_from_validation

    a = analysis
    lat, ax = a.tracker_sigma_lateral_um, a.tracker_sigma_axial_um
    if lat <= 0 or ax <= 0:
        try:
            v_lat, v_ax = noise_from_validation(meta)
        except ValueError:
            d = TrackerConfig()
            v_lat, v_ax = d.sigma_lateral_um, d.sigma_axial_um
        lat = lat if lat > 0 else v_lat
        ax = ax if ax > 0 else v_ax
    window = max(a.tracker_confirm_window, a.tracker_confirm_hits)
    return TrackerConfig(
        motion=MotionModel(a.tracker_motion),
        sigma_lateral_um=float(lat),
        sigma_axial_um=float(ax),
        accel_um_s2=a.tracker_accel_um_s2,
        diffusion_um2_s=a.tracker_diffusion_um2_s,
        confirm_hits=a.tracker_confirm_hits,
        confirm_window=window,
        max_misses=a.tracker_max_misses,
    )

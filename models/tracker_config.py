"""The tracker's parameters (`TrackerConfig`) and the localization noise they are set from.

Split from `focaltrack.models.tracker` (which re-exports every name here) so that a
configuration can be built, checked and read without the tracking algorithm.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

__all__ = [
    "ACCEL_REFERENCE_S",
    "MotionModel",
    "TrackerConfig",
    "noise_from_errors",
    "noise_from_validation",
]

#: Reference time of the acceleration noise parameter, see `TrackerConfig.accel_um_s2`.
ACCEL_REFERENCE_S = 1.0


class MotionModel(str, Enum):
    """Motion model of every track."""

    CONSTANT_VELOCITY = "constant_velocity"
    """State (x, y, z, vx, vy, vz); white-noise acceleration drives the velocity."""
    RANDOM_WALK = "random_walk"
    """State (x, y, z); Brownian motion with diffusion coefficient ``diffusion_um2_s``."""


@dataclass(frozen=True, slots=True)
class TrackerConfig:
    """Tracker parameters; every dimensional one carries its unit in its name.

    The defaults suit the seed paper's case: cells at ~75 µm/s imaged at 100 fps, localized
    to ~0.3 µm laterally and ~1.5 µm axially.
    """

    motion: MotionModel = MotionModel.CONSTANT_VELOCITY
    #: Measurement noise, standard deviation per lateral axis (x and y each), µm.
    sigma_lateral_um: float = 0.3
    #: Measurement noise, standard deviation along z, µm.
    sigma_axial_um: float = 1.5
    #: Constant velocity: white-noise acceleration, µm/s². The continuous-time spectral
    #: density is ``q = accel_um_s2² × 1 s`` (µm²/s³) per axis, so over an interval T the
    #: velocity drifts by ``accel_um_s2 · √(T · 1 s)`` (one standard deviation) whatever the
    #: frame rate: 100 µm/s² lets the velocity wander ~10 µm/s per 10 ms, ~100 µm/s per second.
    accel_um_s2: float = 100.0
    #: Random walk: diffusion coefficient per axis, µm²/s (position variance grows 2·D·dt).
    diffusion_um2_s: float = 1.0
    #: Constant velocity: standard deviation of a new track's velocity per axis, µm/s.
    init_velocity_std_um_s: float = 100.0
    #: Probability that a true localization falls inside its track's gate (χ², 3 dof).
    gate_probability: float = 0.9999
    #: A tentative track is confirmed after this many hits (M) ...
    confirm_hits: int = 3
    #: ... within its first this-many frames (N); if it cannot get there it is deleted.
    confirm_window: int = 5
    #: A confirmed track is deleted at this many consecutive misses (K).
    max_misses: int = 5
    #: At most this many localizations per frame are used (highest scores first).
    max_localizations_per_frame: int = 10_000
    #: At most this many new tracks start per frame (highest scores first).
    max_births_per_frame: int = 500
    #: No births once this many tracks are alive.
    max_tracks: int = 10_000

    def __post_init__(self) -> None:
        object.__setattr__(self, "motion", MotionModel(self.motion))
        positive = {
            "sigma_lateral_um": self.sigma_lateral_um,
            "sigma_axial_um": self.sigma_axial_um,
            "init_velocity_std_um_s": self.init_velocity_std_um_s,
        }
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value}")
        for name, value in {
            "accel_um_s2": self.accel_um_s2,
            "diffusion_um2_s": self.diffusion_um2_s,
        }.items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {value}")
        if not 0 < self.gate_probability < 1:
            raise ValueError(f"gate_probability must be in (0, 1), got {self.gate_probability}")
        if not 1 <= self.confirm_hits <= self.confirm_window:
            raise ValueError(
                "need 1 <= confirm_hits <= confirm_window, got "
                f"{self.confirm_hits} and {self.confirm_window}"
            )
        for name in (
            "max_misses",
            "max_localizations_per_frame",
            "max_births_per_frame",
            "max_tracks",
        ):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def gate_d2(self) -> float:
        """Gate on the squared Mahalanobis distance (χ² quantile, 3 degrees of freedom)."""
        from scipy.stats import chi2  # scipy.stats is slow to import; keep the CLI start fast

        return float(chi2.ppf(self.gate_probability, 3))

    @property
    def dim_x(self) -> int:
        return 6 if self.motion is MotionModel.CONSTANT_VELOCITY else 3

    def measurement_noise_um2(self) -> np.ndarray:
        """R, the (3, 3) measurement covariance in µm²."""
        return np.diag([self.sigma_lateral_um**2, self.sigma_lateral_um**2, self.sigma_axial_um**2])

    def transition(self, dt_s: float) -> tuple[np.ndarray, np.ndarray]:
        """F and Q for a step of ``dt_s`` seconds (state order x, y, z[, vx, vy, vz])."""
        if self.motion is MotionModel.RANDOM_WALK:
            return np.eye(3), np.eye(3) * (2.0 * self.diffusion_um2_s * dt_s)
        # filterpy pulls in scipy.stats (~1 s): imported here, not at module load, so the
        # CLI starts fast.
        from filterpy.common import Q_continuous_white_noise

        f = np.eye(6)
        f[0:3, 3:6] = np.eye(3) * dt_s
        q = Q_continuous_white_noise(
            dim=2,
            dt=dt_s,
            spectral_density=self.accel_um_s2**2 * ACCEL_REFERENCE_S,
            block_size=3,
            order_by_dim=False,
        )
        return f, np.asarray(q, dtype=np.float64)

    def initial_covariance(self) -> np.ndarray:
        p = np.zeros((self.dim_x, self.dim_x))
        p[:3, :3] = self.measurement_noise_um2()
        if self.motion is MotionModel.CONSTANT_VELOCITY:
            p[3:, 3:] = np.eye(3) * self.init_velocity_std_um_s**2
        return p


def noise_from_errors(errors_um: np.ndarray) -> tuple[float, float]:
    """Per-axis lateral and axial standard deviations (µm) from (N, 3) localization errors.

    Feed it a localizer's measured errors against ground truth (``MatchResult.errors_um``):
    ``replace(config, sigma_lateral_um=..., sigma_axial_um=...)``. Lateral pools x and y.
    """
    e = np.asarray(errors_um, dtype=np.float64).reshape(-1, 3)
    e = e[np.all(np.isfinite(e), axis=1)]
    if len(e) < 2:
        raise ValueError("need at least two finite localization errors to estimate noise")
    lateral = float(np.sqrt(np.mean(e[:, :2] ** 2)))
    axial = float(np.sqrt(np.mean(e[:, 2] ** 2)))
    return lateral, axial


def noise_from_validation(meta: dict) -> tuple[float, float]:  # type: ignore[type-arg]
    """Per-axis lateral and axial σ (µm) from a model bundle's validation report.

    ``meta`` is ``bundle.json`` (`focaltrack.models.bundle.read_meta`); its
    ``validation.by_snr`` holds the localizer's lateral (radial) and axial RMSE against
    ground truth per SNR point. Returns the median over the SNR points of
    ``rmse_lateral_um / √2`` and ``rmse_axial_um``.
    """
    points = (meta.get("validation") or {}).get("by_snr") or {}

    def finite(key: str) -> list[float]:
        vals = (p.get(key) for p in points.values() if isinstance(p, dict))
        return [
            float(v) for v in vals if isinstance(v, (int, float)) and math.isfinite(v) and v > 0
        ]

    lat, ax = finite("rmse_lateral_um"), finite("rmse_axial_um")
    if not lat or not ax:
        raise ValueError("the model's bundle.json has no validation RMSE to take the noise from")
    return float(np.median(lat)) / math.sqrt(2.0), float(np.median(ax))

"""The tracker's parameters (`TrackerConfig`) and the localization noise they are set from.

Split from `focaltrack.models.tracker` (which re-exports `TrackerConfig`, `MotionModel` and
the noise helpers) so that a configuration can be built, checked and read without the
tracking algorithm. `TrackerConfig.from_settings` is the one way from settings (the
service's ``[tracker]`` section, the options of ``focaltrack track``) to a `TrackerConfig`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

import numpy as np

from focaltrack.common.errors import FocaltrackError

__all__ = [
    "ACCEL_REFERENCE_S",
    "NOISE_FROM_MODEL",
    "NOISE_SETTINGS",
    "MotionModel",
    "TrackerConfig",
    "TrackerConfigError",
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


class TrackerConfigError(FocaltrackError, ValueError):
    """A tracker parameter is out of range; ``names`` are the parameters at fault."""

    def __init__(self, names: tuple[str, ...], message: str) -> None:
        super().__init__(message)
        self.names = names


def _param(default: Any, help: str) -> Any:
    """A parameter: its default and the one line that describes it wherever it is set (the
    service's ``[tracker]`` section, the options of ``focaltrack track``)."""
    return field(default=default, metadata={"help": help})


#: The measurement-noise parameters: set to `NOISE_FROM_MODEL` (or left out) in the settings
#: given to `TrackerConfig.from_settings`, they are taken from the model.
NOISE_SETTINGS = ("sigma_lateral_um", "sigma_axial_um")
#: The value of a `NOISE_SETTINGS` setting that means "from the model's validation" (TOML
#: has no null, so the service's config file says 0).
NOISE_FROM_MODEL = 0.0


@dataclass(frozen=True, slots=True)
class TrackerConfig:
    """Tracker parameters; every dimensional one carries its unit in its name.

    The defaults suit the seed paper's case: cells at ~75 µm/s imaged at 100 fps, localized
    to ~0.3 µm laterally and ~1.5 µm axially. The service's ``[tracker]`` section and the
    options of ``focaltrack track`` are generated from these fields (names, defaults, help).
    """

    # An enum member is immutable: sharing the default is safe.
    motion: MotionModel = _param(MotionModel.CONSTANT_VELOCITY, "motion model of every track")  # noqa: RUF009
    sigma_lateral_um: float = _param(
        0.3, "measurement noise, standard deviation per lateral axis (x and y each), µm"
    )
    sigma_axial_um: float = _param(1.5, "measurement noise, standard deviation along z, µm")
    use_localization_sigma: bool = _param(
        True,
        "take a localization's own σ (its fit's sigma_x_um, sigma_y_um, sigma_z_um, where "
        "finite) as its measurement noise instead of sigma_lateral_um / sigma_axial_um",
    )
    localization_sigma_floor_um: float = _param(
        0.02,
        "a localization's own σ is used as at least this (the model and calibration errors "
        "that the fit's Cramér–Rao bound leaves out), µm",
    )
    # The continuous-time spectral density is ``q = accel_um_s2² × 1 s`` (µm²/s³) per axis,
    # so over an interval T the velocity drifts by ``accel_um_s2 · √(T · 1 s)`` (one standard
    # deviation) whatever the frame rate: 100 µm/s² lets the velocity wander ~10 µm/s per
    # 10 ms, ~100 µm/s per second.
    accel_um_s2: float = _param(
        100.0,
        "constant velocity: white-noise acceleration, µm/s² (the velocity wanders by "
        "accel·√(T·1 s) over a time T)",
    )
    diffusion_um2_s: float = _param(
        1.0, "random walk: diffusion coefficient per axis, µm²/s (position variance grows 2·D·dt)"
    )
    init_velocity_std_um_s: float = _param(
        100.0, "constant velocity: standard deviation of a new track's velocity per axis, µm/s"
    )
    gate_probability: float = _param(
        0.9999, "probability that a true localization falls inside its track's gate (χ², 3 dof)"
    )
    max_speed_um_s: float = _param(
        200.0,
        "constant velocity: fastest plausible emitter speed (3D), µm/s; a localization that "
        "would update a track to a faster velocity is not assigned to it; 0 = no limit",
    )
    confirm_hits: int = _param(3, "M: hits that confirm a tentative track ...")
    confirm_window: int = _param(
        5, "N: ... within its first N frames; a tentative track that cannot get there is deleted"
    )
    max_misses: int = _param(5, "K: consecutive misses that delete a confirmed track")
    field_margin_um: float = _param(
        10.0,
        "a track whose predicted position is further than this outside the field of view "
        "(the camera's frame) ends, µm",
    )
    max_localizations_per_frame: int = _param(
        10_000, "localizations used per frame at most (highest scores first)"
    )
    max_births_per_frame: int = _param(500, "new tracks per frame at most (highest scores first)")
    max_tracks: int = _param(10_000, "no births once this many tracks are alive")

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "motion", MotionModel(self.motion))
        except ValueError:
            choices = ", ".join(m.value for m in MotionModel)
            raise TrackerConfigError(
                ("motion",), f"motion must be one of {choices}, got {self.motion!r}"
            ) from None
        positive = {
            "sigma_lateral_um": self.sigma_lateral_um,
            "sigma_axial_um": self.sigma_axial_um,
            "init_velocity_std_um_s": self.init_velocity_std_um_s,
        }
        for name, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise TrackerConfigError((name,), f"{name} must be a positive number, got {value}")
        use = self.use_localization_sigma
        if not isinstance(use, bool | np.bool_):
            raise TrackerConfigError(
                ("use_localization_sigma",),
                f"use_localization_sigma must be true or false, got {use!r}",
            )
        for name, value in {
            "localization_sigma_floor_um": self.localization_sigma_floor_um,
            "accel_um_s2": self.accel_um_s2,
            "diffusion_um2_s": self.diffusion_um2_s,
            "max_speed_um_s": self.max_speed_um_s,
            "field_margin_um": self.field_margin_um,
        }.items():
            if not (math.isfinite(value) and value >= 0):
                raise TrackerConfigError(
                    (name,), f"{name} must be a non-negative number, got {value}"
                )
        if not 0 < self.gate_probability < 1:
            raise TrackerConfigError(
                ("gate_probability",),
                f"gate_probability must be in (0, 1), got {self.gate_probability}",
            )
        if not 1 <= self.confirm_hits <= self.confirm_window:
            raise TrackerConfigError(
                ("confirm_hits", "confirm_window"),
                "need 1 <= confirm_hits <= confirm_window, got "
                f"{self.confirm_hits} and {self.confirm_window}",
            )
        for name in (
            "max_misses",
            "max_localizations_per_frame",
            "max_births_per_frame",
            "max_tracks",
        ):
            if int(getattr(self, name)) < 1:
                raise TrackerConfigError(
                    (name,), f"{name} must be at least 1, got {getattr(self, name)}"
                )

    @classmethod
    def from_settings(
        cls, settings: Mapping[str, Any], model_noise_um: tuple[float, float] | None = None
    ) -> TrackerConfig:
        """The config from ``settings`` named as the fields, as the service's ``[tracker]``
        section and the options of ``focaltrack track`` give them.

        A field left out takes its default, except the measurement noise (`NOISE_SETTINGS`):
        left out, ``None`` or `NOISE_FROM_MODEL` (0), each axis is taken from
        ``model_noise_um`` (lateral, axial: `noise_from_validation` of the model), or is
        the default when there is none. Raises `TrackerConfigError` naming the settings at
        fault.
        """
        known = [f.name for f in fields(cls)]
        unknown = [name for name in settings if name not in known]
        if unknown:
            raise TrackerConfigError(
                tuple(unknown),
                f"unknown tracker setting(s) {', '.join(unknown)} (known: {', '.join(known)})",
            )
        kw = dict(settings)
        for name, from_model in zip(NOISE_SETTINGS, model_noise_um or (None, None), strict=True):
            if kw.get(name) in (None, NOISE_FROM_MODEL):
                if from_model is None:
                    kw.pop(name, None)
                else:
                    kw[name] = float(from_model)
        return cls(**kw)

    @property
    def gate_d2(self) -> float:
        """Gate on the squared Mahalanobis distance (χ² quantile, 3 degrees of freedom)."""
        from scipy.stats import chi2  # scipy.stats is slow to import; keep the CLI start fast

        return float(chi2.ppf(self.gate_probability, 3))

    @property
    def dim_x(self) -> int:
        return 6 if self.motion is MotionModel.CONSTANT_VELOCITY else 3

    def measurement_noise_um2(self) -> np.ndarray:
        """R, the (3, 3) measurement covariance in µm² (of a localization without its own σ)."""
        return np.diag([self.sigma_lateral_um**2, self.sigma_lateral_um**2, self.sigma_axial_um**2])

    def measurement_variances_um2(self, sigma_xyz_um: np.ndarray | None, n: int) -> np.ndarray:
        """(n, 3) the diagonal of each localization's R, µm²: its own σ per axis squared
        (at least ``localization_sigma_floor_um``) where ``use_localization_sigma`` and that
        σ is finite and positive, else the configured noise (`measurement_noise_um2`)."""
        r = np.tile(np.diag(self.measurement_noise_um2()), (n, 1))
        if sigma_xyz_um is None or not self.use_localization_sigma:
            return r
        s = np.asarray(sigma_xyz_um, dtype=np.float64)
        if s.shape != (n, 3):
            raise ValueError(f"localization σ must be ({n}, 3) (x, y, z in µm), got {s.shape}")
        floor = self.localization_sigma_floor_um
        with np.errstate(over="ignore", invalid="ignore"):
            v = np.maximum(s, floor) ** 2
        own = np.isfinite(v) & (v > 0) & (s > 0)  # NaN compares False: not its own
        return np.where(own, v, r)

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

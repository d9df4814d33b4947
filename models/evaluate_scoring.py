"""Scoring one evaluation point: what is evaluated, the point's spec and result, the scores.

Scores come from `focaltrack.models.metrics` (the scorer the demo uses too): one-to-one
(Hungarian) matching within a 3D tolerance, Jaccard = TP / (TP + FP + FN), precision, recall,
lateral / axial / 3D RMSE over matched pairs, pooled over a point's frames
(`match_frames`, `pooled_summary`). `score_frames_with_ci` adds what only the evaluation
needs: frame-bootstrap 95 % intervals and the matched pairs for the depth plots.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from focaltrack.models.metrics import MatchResult, match_frames, pooled_summary, tolerance_key
from focaltrack.sim.snr import Exposure

if TYPE_CHECKING:
    from focaltrack.models.evaluate_bounds import PointBounds

__all__ = [
    "FrameLocalizer",
    "PointResult",
    "PointSpec",
    "as_xyz_um",
    "score_frames_with_ci",
    "tol_text",
]


@runtime_checkable
class FrameLocalizer(Protocol):
    """Anything that turns one camera frame into localizations.

    The result may be a `focaltrack.models.localizer.Localizations`, any object with an
    ``xyz_um`` (N, 3) attribute or ``x_um``/``y_um``/``z_um`` columns, or an (N, 3) array;
    x, y in µm from the pixel index (column, row) × pixel size, z in the calibration's
    convention.
    """

    def localize(self, frame: np.ndarray, *, frame_index: int = 0) -> Any: ...


def as_xyz_um(result: Any) -> np.ndarray:
    """The (N, 3) positions in µm of one frame's localizations, whatever their container."""
    if isinstance(result, np.ndarray):
        arr = result
    elif hasattr(result, "xyz_um"):
        arr = np.asarray(result.xyz_um)
    elif all(hasattr(result, k) for k in ("x_um", "y_um", "z_um")):
        arr = np.column_stack(
            [np.asarray(result.x_um), np.asarray(result.y_um), np.asarray(result.z_um)]
        )
    else:
        raise TypeError(f"cannot read positions from a {type(result).__name__}")
    arr = np.asarray(arr, dtype=np.float64)
    return arr.reshape(0, 3) if arr.size == 0 else arr


@dataclass(frozen=True, slots=True)
class PointSpec:
    experiment: str
    label: str
    n_emitters: int
    snr_db: float
    frames: int
    intensity_range: tuple[float, float] = (0.1, 1.0)


@dataclass(frozen=True, slots=True)
class PointResult:
    spec: PointSpec
    exposure: Exposure
    image_snr_db: float
    seconds_per_frame: float
    saturated_pixel_fraction: float
    scores: dict[str, dict[str, Any]]  # tolerance label → summary
    # tolerance → (K, 7): truth x, y, z, error x, y, z, the truth's index in the point
    pairs: dict[str, np.ndarray] = field(default_factory=dict)
    #: Cramér–Rao bounds and matched-filter SNR of the point's emitters (None: no model)
    bounds: PointBounds | None = None

    def to_json(self) -> dict[str, Any]:
        s = self.spec
        return {
            "label": s.label,
            "n_emitters": s.n_emitters,
            "snr_db": s.snr_db,
            "frames": s.frames,
            "intensity_range": list(s.intensity_range),
            "photons_per_intensity": self.exposure.photons_per_intensity,
            "background_photons": self.exposure.background_photons,
            "image_snr_db": self.image_snr_db,
            "seconds_per_frame": self.seconds_per_frame,
            "saturated_pixel_fraction": self.saturated_pixel_fraction,
            "ideal_recall": None if self.bounds is None else self.bounds.ideal_recall,
            "scores": self.scores,
        }


def tol_text(key: str) -> str:
    """A tolerance key (`focaltrack.models.metrics.tolerance_key`) for people: ``10um`` →
    ``10 µm``."""
    return key.removesuffix("um") + " µm"


def _bootstrap_ci(
    per_frame: Sequence[MatchResult], rng: np.random.Generator, n_boot: int = 400
) -> dict[str, list[float]]:
    """95 % intervals of the pooled scores, resampling frames."""
    n = len(per_frame)
    if n < 2:
        return {}
    tp = np.array([r.tp for r in per_frame], dtype=np.float64)
    fp = np.array([r.fp for r in per_frame], dtype=np.float64)
    fn = np.array([r.fn for r in per_frame], dtype=np.float64)
    e = [r.errors_um for r in per_frame]
    sq_lat = np.array([np.sum(x[:, 0] ** 2 + x[:, 1] ** 2) for x in e])
    sq_ax = np.array([np.sum(x[:, 2] ** 2) for x in e])
    idx = rng.integers(0, n, size=(n_boot, n))
    out: dict[str, list[float]] = {}
    with np.errstate(invalid="ignore", divide="ignore"):
        t, p, f = tp[idx].sum(1), fp[idx].sum(1), fn[idx].sum(1)
        denom = t + p + f
        jac = np.where(denom > 0, t / np.where(denom > 0, denom, 1), 1.0)
        out["jaccard"] = [float(np.quantile(jac, 0.025)), float(np.quantile(jac, 0.975))]
        ok = t > 0
        if ok.sum() >= 10:
            for name, sq in (
                ("rmse_lateral_um", sq_lat[idx].sum(1)),
                ("rmse_axial_um", sq_ax[idx].sum(1)),
                ("rmse_3d_um", (sq_lat + sq_ax)[idx].sum(1)),
            ):
                r = np.sqrt(sq[ok] / t[ok])
                out[name] = [float(np.quantile(r, 0.025)), float(np.quantile(r, 0.975))]
    return out


def bias_and_spread(errors_um: np.ndarray) -> dict[str, Any]:
    """The mean error of matched pairs (``errors_um``: (K, 3) x, y, z µm) and the RMS about
    it, lateral and axial: an RMSE is their root sum of squares. A constant offset (the
    calibration bead's centre against the emitters' true positions, which one bead cannot
    tell) is in the mean; what the noise and the crowd add is in the spread. ``None``
    without pairs, as an RMSE."""
    if len(errors_um) == 0:
        return {"mean_error_um": None, "spread_lateral_um": None, "spread_axial_um": None}
    m = errors_um.mean(axis=0)
    d = errors_um - m
    return {
        "mean_error_um": [float(v) for v in m],
        "spread_lateral_um": float(np.sqrt(np.mean(d[:, 0] ** 2 + d[:, 1] ** 2))),
        "spread_axial_um": float(np.sqrt(np.mean(d[:, 2] ** 2))),
    }


def score_frames_with_ci(
    preds: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    tolerances_um: Iterable[float],
    rng: np.random.Generator | None = None,
) -> tuple[dict[str, dict[str, Any]], dict[str, np.ndarray]]:
    """`focaltrack.models.metrics` pooled scores per tolerance, plus frame-bootstrap 95 %
    intervals (``ci95``) and, per tolerance, the matched pairs as rows (truth x, y, z,
    error x, y, z, the truth's index among all frames' truths concatenated). An RMSE
    without any match is ``None``, as in `pooled_summary`.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    scores: dict[str, dict[str, Any]] = {}
    pairs: dict[str, np.ndarray] = {}
    starts = np.cumsum([0] + [len(t) for t in truths])[:-1]
    for tol in tolerances_um:
        key = tolerance_key(tol)
        per_frame = match_frames(preds, truths, tol)
        s = pooled_summary(per_frame, tol)
        # the report has always listed tolerance_um after the scores: keep results.json as it was
        s["tolerance_um"] = s.pop("tolerance_um")
        s["ci95"] = _bootstrap_ci(per_frame, rng)
        scores[key] = s
        rows = [
            np.column_stack([t[r.true_idx], r.errors_um, r.true_idx + first])
            for r, t, first in zip(per_frame, truths, starts, strict=True)
        ]
        pairs[key] = np.concatenate(rows, axis=0) if rows else np.zeros((0, 7))
    return scores, pairs

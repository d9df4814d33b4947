"""Localization metrics shared by `evaluate`, the tests and the benchmarks.

A detection is a true positive when it is matched one-to-one to a ground-truth emitter
(Hungarian assignment, `scipy.optimize.linear_sum_assignment`) within a 3D tolerance.
Jaccard = TP / (TP + FP + FN), as in seed 002 eq. (1). RMSEs are over matched pairs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment


@dataclass(frozen=True, slots=True)
class MatchResult:
    """Matches between predictions and truth; ``errors_um`` is (pred − truth) per pair."""

    pred_idx: np.ndarray  # (K,) int, indices into the predictions
    true_idx: np.ndarray  # (K,) int, indices into the truth
    errors_um: np.ndarray  # (K, 3) float, x, y, z
    n_pred: int
    n_true: int

    @property
    def tp(self) -> int:
        return len(self.pred_idx)

    @property
    def fp(self) -> int:
        return self.n_pred - self.tp

    @property
    def fn(self) -> int:
        return self.n_true - self.tp

    @property
    def jaccard(self) -> float:
        denom = self.tp + self.fp + self.fn
        return 1.0 if denom == 0 else self.tp / denom

    @property
    def precision(self) -> float:
        return 1.0 if self.n_pred == 0 else self.tp / self.n_pred

    @property
    def recall(self) -> float:
        return 1.0 if self.n_true == 0 else self.tp / self.n_true

    @property
    def rmse_lateral_um(self) -> float:
        return _rms(np.hypot(self.errors_um[:, 0], self.errors_um[:, 1]))

    @property
    def rmse_axial_um(self) -> float:
        return _rms(self.errors_um[:, 2])

    @property
    def rmse_3d_um(self) -> float:
        return _rms(np.linalg.norm(self.errors_um, axis=1))

    def summary(self) -> dict[str, float | int]:
        return {
            "tp": self.tp,
            "fp": self.fp,
            "fn": self.fn,
            "jaccard": self.jaccard,
            "precision": self.precision,
            "recall": self.recall,
            "rmse_lateral_um": self.rmse_lateral_um,
            "rmse_axial_um": self.rmse_axial_um,
            "rmse_3d_um": self.rmse_3d_um,
        }


def _rms(v: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(v)))) if len(v) else float("nan")


def _as_points(a: np.ndarray | Iterable[Iterable[float]], name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 3)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must be an (N, 3) array of x, y, z in µm, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return arr


def match(
    pred_um: np.ndarray | Iterable[Iterable[float]],
    true_um: np.ndarray | Iterable[Iterable[float]],
    tolerance_um: float,
) -> MatchResult:
    """Match predictions to truth one-to-one within ``tolerance_um`` (3D Euclidean).

    The assignment maximises the number of matches within tolerance and, among those,
    minimises the summed distance.
    """
    if not tolerance_um > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance_um}")
    pred = _as_points(pred_um, "predictions")
    true = _as_points(true_um, "truth")
    empty = np.zeros(0, dtype=np.int64)
    if len(pred) == 0 or len(true) == 0:
        return MatchResult(empty, empty, np.zeros((0, 3)), len(pred), len(true))
    d = np.linalg.norm(pred[:, None, :] - true[None, :, :], axis=2)
    within = d <= tolerance_um
    # A forbidden pair costs more than any set of allowed pairs could save, so the
    # solver first maximises the count of allowed matches, then minimises distance.
    forbidden = tolerance_um * (min(d.shape) + 1) * 2.0
    cost = np.where(within, d, forbidden)
    r, c = linear_sum_assignment(cost)
    keep = within[r, c]
    r, c = r[keep], c[keep]
    return MatchResult(r, c, pred[r] - true[c], len(pred), len(true))


def combine(results: Iterable[MatchResult]) -> MatchResult:
    """Pool per-frame matches into one result (indices are no longer meaningful)."""
    results = list(results)
    if not results:
        empty = np.zeros(0, dtype=np.int64)
        return MatchResult(empty, empty, np.zeros((0, 3)), 0, 0)
    return MatchResult(
        np.concatenate([r.pred_idx for r in results]),
        np.concatenate([r.true_idx for r in results]),
        np.concatenate([r.errors_um for r in results], axis=0),
        sum(r.n_pred for r in results),
        sum(r.n_true for r in results),
    )

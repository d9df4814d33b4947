"""Localization metrics shared by `evaluate`, the demo, the tests and the benchmarks.

A detection is a true positive when it is matched one-to-one to a ground-truth emitter
(Hungarian assignment, `scipy.optimize.linear_sum_assignment`) within a 3D tolerance.
Jaccard = TP / (TP + FP + FN), as in seed 002 eq. (1). RMSEs are over matched pairs.

Scoring many frames: `match_frames` matches each frame (optionally counting only what lies
inside a lateral region, `match_in_region`), `pooled_summary` pools one tolerance's
matches into the summary numbers, and `score_frames` does both for several tolerances.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


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
    # imported here: scipy.optimize takes ~1 s to import, and every CLI command loads
    # this module (the demo's scoring) at start-up
    from scipy.optimize import linear_sum_assignment

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


#: Seed 002's matching radius and a tighter one (≈ the lateral resolution).
DEFAULT_TOLERANCES_UM: tuple[float, ...] = (10.0, 2.0)

#: A lateral region (x0, x1, y0, y1) in µm.
Region = tuple[float, float, float, float]


def tolerance_key(tolerance_um: float) -> str:
    """The JSON key of a tolerance: ``10um``."""
    return f"{tolerance_um:g}um"


def _in_region(xyz: np.ndarray, region_um: Region) -> np.ndarray:
    x0, x1, y0, y1 = region_um
    if len(xyz) == 0:
        return np.zeros(0, dtype=bool)
    return (xyz[:, 0] >= x0) & (xyz[:, 0] <= x1) & (xyz[:, 1] >= y0) & (xyz[:, 1] <= y1)


def match_in_region(
    pred_um: np.ndarray, true_um: np.ndarray, tolerance_um: float, region_um: Region
) -> MatchResult:
    """One frame's matches, scoring only what lies inside ``region_um`` (x0, x1, y0, y1).

    Everything is matched (`match`), so a detection just inside the region can pair with an
    emitter just outside; then: a pair counts when its true emitter is inside (TP); an
    unmatched true emitter inside is a FN; an unmatched detection inside is a FP;
    detections paired with emitters outside are not counted either way. (Used where part of
    an emitter's image can fall off the frame, e.g. near the edges of a camera frame.)
    """
    pred = np.asarray(pred_um, dtype=np.float64).reshape(-1, 3)
    true = np.asarray(true_um, dtype=np.float64).reshape(-1, 3)
    m = match(pred, true, tolerance_um)
    inside_t = _in_region(true, region_um)
    inside_p = _in_region(pred, region_um)
    keep = inside_t[m.true_idx] if m.tp else np.zeros(0, dtype=bool)
    matched = np.zeros(len(pred), dtype=bool)
    matched[m.pred_idx] = True
    fp = int(np.count_nonzero(inside_p & ~matched))
    tp_pred, tp_true = m.pred_idx[keep], m.true_idx[keep]
    return MatchResult(
        tp_pred, tp_true, m.errors_um[keep], n_pred=len(tp_pred) + fp, n_true=int(inside_t.sum())
    )


def match_frames(
    preds: Sequence[np.ndarray],
    truths: Sequence[np.ndarray],
    tolerance_um: float,
    *,
    region_um: Region | None = None,
) -> list[MatchResult]:
    """Each frame's matches (frame i of ``preds`` against frame i of ``truths``); with
    ``region_um``, only what lies inside the region counts (`match_in_region`)."""
    if region_um is None:
        return [match(p, t, tolerance_um) for p, t in zip(preds, truths, strict=True)]
    return [
        match_in_region(p, t, tolerance_um, region_um) for p, t in zip(preds, truths, strict=True)
    ]


def pooled_summary(per_frame: Iterable[MatchResult], tolerance_um: float) -> dict[str, Any]:
    """One tolerance's frames pooled: ``tolerance_um`` and `MatchResult.summary`, with NaN
    (an RMSE without any match) as ``None`` so that it is strict JSON."""
    s = combine(per_frame).summary()
    return {
        "tolerance_um": float(tolerance_um),
        **{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in s.items()},
    }


def score_frames(
    preds: Mapping[int, np.ndarray] | Sequence[np.ndarray],
    truths: Mapping[int, np.ndarray] | Sequence[np.ndarray],
    tolerances_um: Iterable[float] = DEFAULT_TOLERANCES_UM,
    *,
    region_um: Region | None = None,
) -> dict[str, Any]:
    """Pooled Jaccard, precision, recall and RMSE per tolerance over the frames in both.

    ``preds`` and ``truths``: (N, 3) µm points per frame, as mappings from a frame index
    (only frames in both are scored) or as equally long sequences. Returns
    ``{"frames": n, "by_tolerance": {"10um": pooled_summary, ...}}``.
    """
    p = preds if isinstance(preds, Mapping) else dict(enumerate(preds))
    t = truths if isinstance(truths, Mapping) else dict(enumerate(truths))
    if not isinstance(preds, Mapping) and len(p) != len(t):
        raise ValueError(f"{len(p)} predicted frames but {len(t)} truth frames")
    frames = sorted(set(p) & set(t))
    pf, tf = [p[f] for f in frames], [t[f] for f in frames]
    by_tol = {
        tolerance_key(tol): pooled_summary(match_frames(pf, tf, tol, region_um=region_um), tol)
        for tol in tolerances_um
    }
    return {"frames": len(frames), "by_tolerance": by_tol}

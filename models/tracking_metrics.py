"""Tracking metrics: CLEAR MOT, IDF1, the particle-tracking-challenge measures, smoothing gain.

All take trajectories as columns (`Trajectories`: frame, id, x/y/z in µm) and a distance in
µm; none cares which tracker made them.

- `clear_mot` — CLEAR MOT (Bernardin & Stiefelhagen 2008): per frame, correspondences from
  the previous frame are kept while still within ``tolerance_um``, the rest are matched by the
  Hungarian method (`focaltrack.models.metrics.match`). MOTA = 1 − (FN + FP + IDSW) / GT,
  MOTP = mean 3D distance of matches. An ID switch is a truth object matched to a different
  track id than the one it was last matched to; a fragmentation is a truth object whose
  matching resumes after an interruption (Li et al. 2009). Mostly tracked / mostly lost:
  matched in ≥ 80 % / ≤ 20 % of its frames. py-motmetrics differs in one rule: it first
  re-pairs an object with the track it was *ever* last matched to, so after a gap the two
  can pair differently; ``keep="last_match"`` follows it (tests/test_tracking_metrics.py
  compares the two).
- `identity_scores` — IDF1, IDP, IDR (Ristani et al., ECCV 2016 workshops): truth and
  estimated trajectories are paired one-to-one for the whole sequence (a truth trajectory
  may stay unpaired) so as to maximise IDTP, the points where a pair is present in the same
  frame within ``tolerance_um``; IDFN = truth points − IDTP, IDFP = estimated points − IDTP,
  IDF1 = 2 IDTP / (truth points + estimated points). Unlike MOTA it charges a tracker for
  every frame an identity is wrong, not once per switch.
- `chenouard` — Chenouard et al., Nat. Methods 11, 281 (2014): truth and estimated tracks
  are paired one-to-one (or to a dummy) by optimal assignment minimising the summed track
  distance ``d(θ, ω) = Σ_t min(‖θ(t) − ω(t)‖, ε)``, a time point where only one of the two
  exists costing ε. α = 1 − d(X, Y) / d(X, ∅) ∈ [0, 1] scores the pairing; β = (d(X, ∅) −
  d(X, Y)) / (d(X, ∅) + d(Ȳ, ∅)) also penalises the spurious (unpaired) estimated tracks Ȳ.
  Points: Jaccard TP / (TP + FN + FP) with TP the paired points closer than ε; tracks:
  Jaccard of tracks with TP the truth tracks paired to an estimated one, FN those paired to a
  dummy, FP the spurious tracks. RMSE over the TP points.
- `smoothing_gain` — RMSE of track positions against truth divided by the RMSE of the raw
  localizations against truth, over the truth points both matched (per frame, within
  ``tolerance_um``); below 1 means the tracker smooths.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy.optimize import linear_sum_assignment

from focaltrack.models.metrics import match


@dataclass(frozen=True, slots=True, eq=False)  # arrays: compare fields explicitly
class Trajectories:
    """Points of many trajectories: row i is object ``id[i]`` at ``frame[i]``."""

    frame: np.ndarray  # (n,) int64
    id: np.ndarray  # (n,) int64
    xyz_um: np.ndarray  # (n, 3)

    @classmethod
    def of(cls, frame, ids, xyz_um) -> Trajectories:  # type: ignore[no-untyped-def]
        f = np.asarray(frame).astype(np.int64, copy=False).reshape(-1)
        i = np.asarray(ids).astype(np.int64, copy=False).reshape(-1)
        p = np.asarray(xyz_um, dtype=np.float64).reshape(-1, 3)
        if not len(f) == len(i) == len(p):
            raise ValueError(f"frame, id and xyz lengths differ: {len(f)}, {len(i)}, {len(p)}")
        if not np.all(np.isfinite(p)):
            raise ValueError("trajectories contain NaN or infinite coordinates")
        key = f * (int(i.max(initial=0)) + 1) + i if len(i) else f
        if len(np.unique(key)) != len(key):
            raise ValueError("an id appears twice in one frame")
        return cls(f, i, p)

    def __len__(self) -> int:
        return len(self.frame)

    def select(self, mask: np.ndarray) -> Trajectories:
        return Trajectories(self.frame[mask], self.id[mask], self.xyz_um[mask])


def _frames(a: Trajectories) -> dict[int, np.ndarray]:
    """Row indices per frame."""
    if not len(a):
        return {}
    order = np.argsort(a.frame, kind="stable")
    fr = a.frame[order]
    cut = np.flatnonzero(np.diff(fr)) + 1
    return {int(a.frame[g[0]]): g for g in np.split(order, cut)}


@dataclass(frozen=True, slots=True)
class ClearMot:
    mota: float
    motp_um: float
    gt: int  # truth points
    tp: int
    fp: int
    fn: int
    id_switches: int
    fragmentations: int
    mostly_tracked: int
    mostly_lost: int
    n_truth_tracks: int
    n_tracks: int

    def summary(self) -> dict[str, float | int]:
        return asdict(self)


def clear_mot(
    truth: Trajectories,
    tracks: Trajectories,
    tolerance_um: float,
    *,
    keep: Literal["previous_frame", "last_match"] = "previous_frame",
) -> ClearMot:
    """CLEAR MOT of ``tracks`` against ``truth`` (see the module docstring).

    ``keep``: which pairs are kept before the Hungarian step — the previous frame's
    (Bernardin & Stiefelhagen 2008, the default), or each object's last pair however long
    ago, as py-motmetrics does (``"last_match"``, for comparing with it).
    """
    if not tolerance_um > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance_um}")
    if keep not in ("previous_frame", "last_match"):
        raise ValueError(f"keep must be 'previous_frame' or 'last_match', got {keep!r}")
    tf, kf = _frames(truth), _frames(tracks)
    current: dict[int, int] = {}  # truth id -> track id, this frame's correspondences
    last: dict[int, int] = {}  # truth id -> track id it was last matched to
    tracked_frames: dict[int, int] = {}
    seen_frames: dict[int, int] = {}
    state: dict[int, str] = {}  # truth id -> "tracked" | "interrupted" (absent: never)
    frag = idsw = tp = fp = fn = 0
    dist_sum = 0.0
    for f in sorted(set(tf) | set(kf)):
        ti = tf.get(f, np.zeros(0, dtype=np.int64))
        ki = kf.get(f, np.zeros(0, dtype=np.int64))
        t_ids, k_ids = truth.id[ti], tracks.id[ki]
        t_pos, k_pos = truth.xyz_um[ti], tracks.xyz_um[ki]
        t_row = {int(g): r for r, g in enumerate(t_ids)}
        k_row = {int(h): r for r, h in enumerate(k_ids)}
        pairs: dict[int, int] = {}  # truth row -> track row
        kept = current if keep == "previous_frame" else last
        for g, h in kept.items():  # keep those correspondences while they hold
            if g in t_row and h in k_row:
                r, c = t_row[g], k_row[h]
                if np.linalg.norm(t_pos[r] - k_pos[c]) <= tolerance_um:
                    pairs[r] = c
        free_t = np.array([r for r in range(len(ti)) if r not in pairs], dtype=np.int64)
        used = set(pairs.values())
        free_k = np.array([c for c in range(len(ki)) if c not in used], dtype=np.int64)
        if len(free_t) and len(free_k):
            m = match(k_pos[free_k], t_pos[free_t], tolerance_um)
            for p_, q_ in zip(m.pred_idx, m.true_idx, strict=True):
                pairs[int(free_t[q_])] = int(free_k[p_])
        current = {}
        for r, c in pairs.items():
            g, h = int(t_ids[r]), int(k_ids[c])
            if g in last and last[g] != h:
                idsw += 1
            last[g] = h
            current[g] = h
            dist_sum += float(np.linalg.norm(t_pos[r] - k_pos[c]))
        tp += len(pairs)
        fn += len(ti) - len(pairs)
        fp += len(ki) - len(pairs)
        for r, g in enumerate(t_ids.tolist()):
            hit = r in pairs
            seen_frames[g] = seen_frames.get(g, 0) + 1
            tracked_frames[g] = tracked_frames.get(g, 0) + hit
            if hit:
                frag += state.get(g) == "interrupted"
                state[g] = "tracked"
            elif state.get(g) == "tracked":
                state[g] = "interrupted"
    gt = tp + fn
    ratios = [tracked_frames[g] / seen_frames[g] for g in seen_frames]
    return ClearMot(
        mota=1.0 - (fn + fp + idsw) / gt if gt else float("nan"),
        motp_um=dist_sum / tp if tp else float("nan"),
        gt=gt,
        tp=tp,
        fp=fp,
        fn=fn,
        id_switches=idsw,
        fragmentations=frag,
        mostly_tracked=sum(r >= 0.8 for r in ratios),
        mostly_lost=sum(r <= 0.2 for r in ratios),
        n_truth_tracks=len(seen_frames),
        n_tracks=len(np.unique(tracks.id)),
    )


@dataclass(frozen=True, slots=True)
class IdentityScores:
    idf1: float
    idp: float  # IDTP / estimated points
    idr: float  # IDTP / truth points
    idtp: int
    idfp: int
    idfn: int

    def summary(self) -> dict[str, float | int]:
        return asdict(self)


def identity_scores(
    truth: Trajectories, tracks: Trajectories, tolerance_um: float
) -> IdentityScores:
    """IDF1, IDP and IDR of ``tracks`` against ``truth`` (see the module docstring)."""
    if not tolerance_um > 0:
        raise ValueError(f"tolerance must be positive, got {tolerance_um}")
    g_ids, g_inv = np.unique(truth.id, return_inverse=True)
    e_ids, e_inv = np.unique(tracks.id, return_inverse=True)
    overlap = np.zeros((len(g_ids), len(e_ids)), dtype=np.int64)  # frames within tolerance
    tf, kf = _frames(truth), _frames(tracks)
    for f in set(tf) & set(kf):
        ti, ki = tf[f], kf[f]
        d = np.linalg.norm(truth.xyz_um[ti][:, None, :] - tracks.xyz_um[ki][None, :, :], axis=2)
        np.add.at(overlap, (g_inv[ti][:, None], e_inv[ki][None, :]), d <= tolerance_um)
    idtp = 0
    if overlap.size:
        r, c = linear_sum_assignment(overlap, maximize=True)
        idtp = int(overlap[r, c].sum())
    n_g, n_e = len(truth), len(tracks)
    return IdentityScores(
        idf1=2 * idtp / (n_g + n_e) if n_g + n_e else float("nan"),
        idp=idtp / n_e if n_e else float("nan"),
        idr=idtp / n_g if n_g else float("nan"),
        idtp=idtp,
        idfp=n_e - idtp,
        idfn=n_g - idtp,
    )


@dataclass(frozen=True, slots=True)
class Chenouard:
    alpha: float
    beta: float
    jaccard_points: float
    jaccard_tracks: float
    rmse_um: float
    gate_um: float
    paired_tracks: int
    missed_tracks: int  # truth tracks paired to a dummy
    spurious_tracks: int  # estimated tracks paired to nothing

    def summary(self) -> dict[str, float | int]:
        return asdict(self)


def chenouard(truth: Trajectories, tracks: Trajectories, gate_um: float) -> Chenouard:
    """Particle-tracking-challenge measures with gate ε = ``gate_um`` (module docstring)."""
    if not gate_um > 0:
        raise ValueError(f"gate must be positive, got {gate_um}")
    eps = float(gate_um)
    g_ids, g_inv = np.unique(truth.id, return_inverse=True)
    e_ids, e_inv = np.unique(tracks.id, return_inverse=True)
    g_len = np.bincount(g_inv, minlength=len(g_ids)).astype(np.float64)
    e_len = np.bincount(e_inv, minlength=len(e_ids)).astype(np.float64)
    # saving[i, j] = Σ over co-present frames of 2ε − min(dist, ε); d(i, j) = ε(|i|+|j|) − saving
    saving = np.zeros((len(g_ids), len(e_ids)))
    tf, kf = _frames(truth), _frames(tracks)
    per_frame: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for f in set(tf) & set(kf):
        ti, ki = tf[f], kf[f]
        d = np.linalg.norm(truth.xyz_um[ti][:, None, :] - tracks.xyz_um[ki][None, :, :], axis=2)
        np.add.at(saving, (g_inv[ti][:, None], e_inv[ki][None, :]), 2 * eps - np.minimum(d, eps))
        per_frame.append((g_inv[ti], e_inv[ki], d))
    d_x_empty = eps * g_len.sum()
    paired_g = np.zeros(0, dtype=np.int64)
    paired_e = np.zeros(0, dtype=np.int64)
    if len(g_ids) and len(e_ids):
        # pairing i with j instead of a dummy changes the total by ε|j| − saving[i, j]
        gain = e_len[None, :] * eps - saving
        cost = np.minimum(gain, 0.0)
        r, c = linear_sum_assignment(cost)
        keep = cost[r, c] < 0
        paired_g, paired_e = r[keep], c[keep]
    d_xy = d_x_empty + float((e_len[paired_e] * eps - saving[paired_g, paired_e]).sum())
    spurious = np.ones(len(e_ids), dtype=bool)
    spurious[paired_e] = False
    d_y_empty = eps * float(e_len[spurious].sum())
    # points
    partner = np.full(len(g_ids), -1, dtype=np.int64)
    partner[paired_g] = paired_e
    sq_err: list[np.ndarray] = []
    tp = 0
    for gi, ei, d in per_frame:
        want = partner[gi]
        hit = (want[:, None] == ei[None, :]) & (want[:, None] >= 0) & (d < eps)
        rr, cc = np.nonzero(hit)
        tp += len(rr)
        sq_err.append(d[rr, cc] ** 2)
    n_g, n_e = int(g_len.sum()), int(e_len.sum())
    fn, fp = n_g - tp, n_e - tp
    errs = np.concatenate(sq_err) if sq_err else np.zeros(0)
    n_pair = len(paired_g)
    denom_t = len(g_ids) + int(spurious.sum())
    return Chenouard(
        alpha=1.0 - d_xy / d_x_empty if d_x_empty else float("nan"),
        beta=(d_x_empty - d_xy) / (d_x_empty + d_y_empty) if d_x_empty else float("nan"),
        jaccard_points=tp / (tp + fn + fp) if (tp + fn + fp) else 1.0,
        jaccard_tracks=n_pair / denom_t if denom_t else 1.0,
        rmse_um=float(np.sqrt(errs.mean())) if len(errs) else float("nan"),
        gate_um=eps,
        paired_tracks=n_pair,
        missed_tracks=len(g_ids) - n_pair,
        spurious_tracks=int(spurious.sum()),
    )


@dataclass(frozen=True, slots=True)
class SmoothingGain:
    gain_3d: float  # RMSE_tracks / RMSE_localizations, 3D
    gain_lateral: float
    gain_axial: float
    rmse_tracks_3d_um: float
    rmse_localizations_3d_um: float
    rmse_tracks_lateral_um: float
    rmse_localizations_lateral_um: float
    rmse_tracks_axial_um: float
    rmse_localizations_axial_um: float
    n_points: int

    def summary(self) -> dict[str, float | int]:
        return asdict(self)


def smoothing_gain(
    truth: Trajectories,
    tracks: Trajectories,
    loc_frame: np.ndarray,
    loc_xyz_um: np.ndarray,
    tolerance_um: float,
) -> SmoothingGain:
    """Track RMSE / localization RMSE over truth points that both matched (per frame)."""
    tf, kf = _frames(truth), _frames(tracks)
    loc = Trajectories.of(loc_frame, np.arange(len(loc_frame)), loc_xyz_um)
    lf = _frames(loc)
    e_trk: list[np.ndarray] = []
    e_loc: list[np.ndarray] = []
    for f, ti in tf.items():
        if f not in kf or f not in lf:
            continue
        tpos = truth.xyz_um[ti]
        mk = match(tracks.xyz_um[kf[f]], tpos, tolerance_um)
        ml = match(loc.xyz_um[lf[f]], tpos, tolerance_um)
        common, ik, il = np.intersect1d(mk.true_idx, ml.true_idx, return_indices=True)
        if len(common):
            e_trk.append(mk.errors_um[ik])
            e_loc.append(ml.errors_um[il])
    a = np.concatenate(e_trk) if e_trk else np.zeros((0, 3))
    b = np.concatenate(e_loc) if e_loc else np.zeros((0, 3))

    def rms(v: np.ndarray) -> float:
        return float(np.sqrt(np.mean(v**2))) if v.size else float("nan")

    def ratio(x: float, y: float) -> float:
        return x / y if y > 0 else float("nan")

    t3, l3 = rms(np.linalg.norm(a, axis=1)), rms(np.linalg.norm(b, axis=1))
    tl, ll = rms(np.hypot(a[:, 0], a[:, 1])), rms(np.hypot(b[:, 0], b[:, 1]))
    ta, la = rms(a[:, 2]), rms(b[:, 2])
    return SmoothingGain(
        gain_3d=ratio(t3, l3),
        gain_lateral=ratio(tl, ll),
        gain_axial=ratio(ta, la),
        rmse_tracks_3d_um=t3,
        rmse_localizations_3d_um=l3,
        rmse_tracks_lateral_um=tl,
        rmse_localizations_lateral_um=ll,
        rmse_tracks_axial_um=ta,
        rmse_localizations_axial_um=la,
        n_points=len(a),
    )

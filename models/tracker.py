"""Kalman-filter tracking of 3D localizations, frame by frame.

`KalmanTracker.update(xyz_um, t_s)` takes one frame's localizations (µm) and its time (s)
and returns the tracks alive after that frame. Each track is a linear Kalman filter —
the model of `filterpy.kalman.KalmanFilter`, and `KalmanTracker.kalman_filter(track_id)`
hands any track out as one — but the per-frame work (predict, gating, update) runs on all
tracks at once over stacked arrays, so one frame with a few hundred tracks costs about a
millisecond. The batched arithmetic is the same as filterpy's `predict` and Joseph-form
`update`; tests check that the two agree.

Per frame:

1. **Predict** every track to ``t_s`` with the step ``dt = t_s − t_prev`` (frame timestamps,
   so a dropped frame is just a longer step). Times must strictly increase.
2. **Gate**: squared Mahalanobis distance ``d² = yᵀ S⁻¹ y`` of every localization from every
   track's predicted position (``S = H P Hᵀ + R``, R that localization's own: see below);
   pairs with ``d²`` above the χ²(3) quantile of ``gate_probability`` are forbidden. Only
   pairs inside the gate's bounding box are evaluated (a sorted-window search along x or y),
   so the work grows with the candidates, not with tracks × localizations.
3. **Assign** globally with `scipy.optimize.linear_sum_assignment`, confirmed tracks first,
   then tentative ones on what is left. Leaving a track and a localization unassigned costs
   the gate threshold, so any gated pair is better than none, but a track that clearly owns a
   localization is not robbed of it to make one more (worse) pair. Pairs that only one
   track gates and that gate only one localization are assigned without the solver; small
   ambiguous clusters are solved densely one by one, a large ambiguous set (a flood of
   detections) in one sparse solve (`min_weight_full_bipartite_matching`).
4. **Update** assigned tracks (Joseph form, with the localization's R); unassigned tracks
   coast on their prediction.
5. **Lifecycle**: unassigned localizations start tentative tracks; a tentative track becomes
   confirmed once it has ``confirm_hits`` hits within its first ``confirm_window`` frames, and
   is deleted as soon as that is no longer possible; a confirmed track is deleted at its
   ``max_misses``-th consecutive miss.

Measurement noise: R of a localization is diag(σ²) of its own σ per axis (``sigma_xyz_um``:
the fit's Cramér–Rao bound, floored at ``localization_sigma_floor_um``) where it is given
and finite and ``use_localization_sigma`` holds, else the configured ``sigma_lateral_um`` /
``sigma_axial_um``; a track born from a localization starts with that R as its position
covariance. A precise localization pulls its track harder and narrows it more; an uncertain
one has a wider gate and moves its track less.

Bad input: rows with NaN or infinite coordinates are dropped and counted
(`rejected_count`), never reaching a filter; an empty frame only advances the tracks; a
frame with more than ``max_localizations_per_frame`` localizations is cut to that many
(highest scores first when scores are given, otherwise input order; the rest are counted in
`dropped_count`), and at most ``max_births_per_frame`` tracks start per frame, so a burst of
spurious detections costs bounded work.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix, csr_matrix
from scipy.sparse.csgraph import connected_components, min_weight_full_bipartite_matching

from focaltrack.models.kalman_batch import innovation_cov, inv_sym3, kf_update
from focaltrack.models.track_types import Track, TrackFrame, TrackTable
from focaltrack.models.tracker_config import (
    ACCEL_REFERENCE_S,
    MotionModel,
    TrackerConfig,
    noise_from_errors,
    noise_from_validation,
)
from focaltrack.records.tracks import TrackStatus

if TYPE_CHECKING:
    from filterpy.kalman import KalmanFilter

log = logging.getLogger(__name__)

__all__ = [
    "ACCEL_REFERENCE_S",
    "KalmanTracker",
    "MotionModel",
    "Track",
    "TrackFrame",
    "TrackStatus",
    "TrackTable",
    "TrackerConfig",
    "UpdateStats",
    "defocus_to_depth",
    "link_iter",
    "link_table",
    "noise_from_errors",
    "noise_from_validation",
    "tracks_at_focus",
]

#: Above this many ambiguous gated pairs, one sparse assignment replaces per-cluster solves.
_SPARSE_SOLVER_PAIRS = 400


@dataclass(slots=True)
class _State:
    """Stacked state of all live tracks (row i = one track)."""

    x: np.ndarray  # (T, d)
    p: np.ndarray  # (T, d, d)
    id: np.ndarray  # (T,) int64
    age: np.ndarray
    hits: np.ndarray
    misses: np.ndarray
    confirmed: np.ndarray  # (T,) bool

    @classmethod
    def empty(cls, d: int) -> _State:
        z = np.zeros(0, dtype=np.int64)
        return cls(np.zeros((0, d)), np.zeros((0, d, d)), z, z, z, z, np.zeros(0, dtype=bool))

    def take(self, keep: np.ndarray) -> _State:
        return _State(
            self.x[keep],
            self.p[keep],
            self.id[keep],
            self.age[keep],
            self.hits[keep],
            self.misses[keep],
            self.confirmed[keep],
        )


@dataclass(slots=True)
class UpdateStats:
    """What the last `update` did (counts for that frame)."""

    n_input: int = 0
    n_rejected: int = 0  # non-finite rows
    n_dropped: int = 0  # over max_localizations_per_frame
    n_assigned: int = 0
    n_births: int = 0
    n_deleted: int = 0  # tracks ended this frame, those that left the field included
    n_left_field: int = 0  # tracks whose prediction left the field (plus margin)
    n_speed_refused: int = 0  # gated pairs refused for a velocity above max_speed_um_s
    n_solver_pairs: int = 0  # pairs that went through linear_sum_assignment
    extra: dict[str, float] = field(default_factory=dict)


class KalmanTracker:
    """Frame-by-frame multi-target tracker; see the module docstring for the algorithm."""

    def __init__(
        self, config: TrackerConfig | None = None, *, field_um: tuple[float, float] | None = None
    ) -> None:
        self.config = config or TrackerConfig()
        c = self.config
        self._r = c.measurement_noise_um2()
        self._gate = c.gate_d2
        # Only the constant-velocity state has a velocity to bound.
        cv = c.motion is MotionModel.CONSTANT_VELOCITY
        self._max_speed2 = c.max_speed_um_s**2 if cv and c.max_speed_um_s > 0 else math.inf
        self._field_lo: np.ndarray | None = None
        self._field_hi: np.ndarray | None = None
        self._field_um: tuple[float, float] | None = None
        self.field_um = field_um
        self._p0 = c.initial_covariance()
        self._state = _State.empty(c.dim_x)
        self._next_id = 1
        self._t: float | None = None
        self._last_dt: float = 0.0
        self._fq_cache: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        #: Localizations rejected for NaN/inf coordinates, all frames so far.
        self.rejected_count = 0
        #: Localizations dropped over ``max_localizations_per_frame``, all frames so far.
        self.dropped_count = 0
        self.frame_count = 0
        #: Tracks ended because their prediction left the field (plus the margin), all frames.
        self.left_field_count = 0
        self.last_stats = UpdateStats()

    # ------------------------------------------------------------------ public API
    @property
    def field_um(self) -> tuple[float, float] | None:
        """The field of view as (width, height) in µm: x from 0 to width, y from 0 to height,
        the coordinates of the localizations (a camera frame: its columns and rows × the pixel
        size). A track whose predicted x or y lies more than ``field_margin_um`` outside it
        ends. None (the default): no bounds."""
        return self._field_um

    @field_um.setter
    def field_um(self, value: tuple[float, float] | None) -> None:
        if value is None:
            self._field_um = self._field_lo = self._field_hi = None
            return
        w, h = (float(v) for v in value)
        if not all(math.isfinite(v) and v > 0 for v in (w, h)):
            raise ValueError(f"field_um must be two positive numbers (width, height), got {value}")
        m = self.config.field_margin_um
        self._field_um = (w, h)
        self._field_lo = np.array([-m, -m])
        self._field_hi = np.array([w + m, h + m])

    @property
    def t_s(self) -> float | None:
        """Time of the last frame, or None before the first."""
        return self._t

    def __len__(self) -> int:
        return len(self._state.id)

    def update(
        self,
        xyz_um: np.ndarray,
        t_s: float,
        scores: np.ndarray | None = None,
        sigma_xyz_um: np.ndarray | None = None,
    ) -> list[Track]:
        """Advance to time ``t_s`` with this frame's (N, 3) localizations; return live tracks.
        ``sigma_xyz_um``: (N, 3) each localization's σ per axis, µm (NaN where unknown), its
        measurement noise (module docstring)."""
        return self.update_frame(xyz_um, t_s, scores, sigma_xyz_um).tracks()

    def update_frame(
        self,
        xyz_um: np.ndarray,
        t_s: float,
        scores: np.ndarray | None = None,
        sigma_xyz_um: np.ndarray | None = None,
    ) -> TrackFrame:
        """As `update`, returning columns (faster; what the service and the CLI use)."""
        c = self.config
        t_s = float(t_s)
        if not math.isfinite(t_s):
            raise ValueError(f"frame time must be finite, got {t_s}")
        if self._t is not None and not t_s > self._t:
            raise ValueError(
                f"frame times must strictly increase: got t={t_s!r} s after t={self._t!r} s"
            )
        z, idx, stats = self._clean(xyz_um, scores)
        rv = c.measurement_variances_um2(sigma_xyz_um, stats.n_input)[idx]  # (n, 3) diag R
        st = self._state
        dt = 0.0 if self._t is None else t_s - self._t
        self._t = t_s
        self._last_dt = dt
        self.frame_count += 1

        # 1. predict (all tracks share dt, F and Q)
        if len(st.id) and dt > 0:
            f, ft, q = self._transition(dt)
            st.x = st.x @ ft
            st.p = f @ st.p @ ft + q
        if self._field_lo is not None and self._field_hi is not None and len(st.id):
            # A track predicted outside the field cannot be seen again there: end it now
            # rather than let it coast (and be published) out where nothing is measured.
            xy = st.x[:, :2]
            out = np.any((xy < self._field_lo) | (xy > self._field_hi), axis=1)
            if out.any():
                st = self._state = st.take(~out)
                stats.n_left_field = int(out.sum())
                self.left_field_count += stats.n_left_field
        n_t = len(st.id)

        # 2.-3. gate and assign
        track_of = np.full(len(z), -1, dtype=np.int64)  # localization -> track row
        if n_t and len(z):
            rows, cols, d2 = self._gate_pairs(st, z, rv, stats)
            conf = st.confirmed[rows]
            r1, c1 = self._assign(rows[conf], cols[conf], d2[conf], stats)
            track_of[c1] = r1
            rest = ~conf & (track_of[cols] < 0)
            r2, c2 = self._assign(rows[rest], cols[rest], d2[rest], stats)
            track_of[c2] = r2
        assigned = np.flatnonzero(track_of >= 0)
        det_of = np.full(n_t, -1, dtype=np.int64)  # track row -> localization
        det_of[track_of[assigned]] = assigned
        stats.n_assigned = len(assigned)

        # 4. update assigned tracks (Joseph form, as filterpy.KalmanFilter.update)
        if len(assigned):
            rws = track_of[assigned]
            r_a = rv[assigned]
            sinv = inv_sym3(innovation_cov(st.p[rws], r_a))
            x_new, p_new = kf_update(st.x[rws], st.p[rws], z[assigned], r_a, sinv)
            st.x[rws] = x_new
            st.p[rws] = p_new

        # 5. lifecycle
        hit = det_of >= 0
        st.age = st.age + 1
        st.hits = st.hits + hit
        st.misses = np.where(hit, 0, st.misses + 1)
        newly = ~st.confirmed & (st.age <= c.confirm_window) & (st.hits >= c.confirm_hits)
        st.confirmed = st.confirmed | newly
        hopeless = ~st.confirmed & (st.hits + (c.confirm_window - st.age) < c.confirm_hits)
        dead = (st.confirmed & (st.misses >= c.max_misses)) | hopeless
        loc_index = np.where(hit, idx[np.maximum(det_of, 0)] if len(idx) else -1, -1)
        loc_index = loc_index.astype(np.int64)
        if dead.any():
            keep = ~dead
            st = st.take(keep)
            loc_index = loc_index[keep]
        stats.n_deleted = int(dead.sum()) + stats.n_left_field

        births = np.flatnonzero(track_of < 0)
        room = max(0, min(c.max_births_per_frame, c.max_tracks - len(st.id)))
        if len(births) > room:
            if scores is not None:
                s = np.asarray(scores, dtype=np.float64)[idx[births]]
                births = births[np.argsort(-s, kind="stable")[:room]]
            else:
                births = births[:room]
            births = np.sort(births)
        if len(births):
            nb = len(births)
            xb = np.zeros((nb, c.dim_x))
            xb[:, :3] = z[births]
            ids = np.arange(self._next_id, self._next_id + nb, dtype=np.int64)
            self._next_id += nb
            one = np.ones(nb, dtype=np.int64)
            pb = np.broadcast_to(self._p0, (nb, c.dim_x, c.dim_x)).copy()
            pb[:, [0, 1, 2], [0, 1, 2]] = rv[births]  # the localization's own R
            born = _State(
                xb,
                pb,
                ids,
                one,
                one,
                np.zeros(nb, dtype=np.int64),
                np.full(nb, c.confirm_hits <= 1),
            )
            st = _concat(st, born)
            loc_index = np.concatenate([loc_index, idx[births].astype(np.int64)])
        stats.n_births = len(births)
        self._state = st
        self.last_stats = stats
        return self._frame(loc_index)

    def reset(self) -> None:
        """Drop every track and forget the time, keeping the id counter (ids stay unique).

        For a pause in acquisition: tracks coasting through a long gap grow gates wide
        enough to catch anything, so start afresh instead.
        """
        self._state = _State.empty(self.config.dim_x)
        self._t = None
        self._last_dt = 0.0

    def predict(self, t_s: float) -> TrackFrame:
        """Where the live tracks will be at a later time ``t_s`` (no state change).

        For latency compensation: predict to the time a stage move will land.
        """
        if self._t is None:
            raise ValueError("no frame yet: nothing to predict from")
        dt = float(t_s) - self._t
        if not dt >= 0:
            raise ValueError(f"can only predict forward: t={t_s} s is before t={self._t} s")
        st = self._state
        if dt > 0 and len(st.id):
            f, q = self.config.transition(dt)
            x, p = st.x @ f.T, f @ st.p @ f.T + q
        else:
            x, p = st.x, st.p
        return self._frame(np.full(len(st.id), -1, dtype=np.int64), x, p, float(t_s))

    def kalman_filter(self, track_id: int) -> KalmanFilter:
        """A `filterpy.kalman.KalmanFilter` holding this track's current state.

        ``x`` (column vector) and ``P`` are copies of the track's state after the last frame;
        ``F`` and ``Q`` are those of the last step, ``H`` and ``R`` the measurement model.
        Stepping it with ``predict()``/``update(z)`` reproduces what the tracker would do.
        """
        rows = np.flatnonzero(self._state.id == track_id)
        if not len(rows):
            raise KeyError(f"no live track with id {track_id}")
        i = rows[0]
        d = self.config.dim_x
        from filterpy.kalman import KalmanFilter

        kf = KalmanFilter(dim_x=d, dim_z=3)
        kf.x = self._state.x[i].reshape(d, 1).copy()
        kf.P = self._state.p[i].copy()
        kf.F, kf.Q = self.config.transition(self._last_dt)
        kf.H = np.eye(3, d)
        kf.R = self._r.copy()
        return kf

    # ------------------------------------------------------------------ internals
    def _transition(self, dt: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """F, Fᵀ (contiguous) and Q for a step, cached: at a steady frame rate dt repeats."""
        fq = self._fq_cache.get(dt)
        if fq is None:
            if len(self._fq_cache) > 64:
                self._fq_cache.clear()
            f, q = self.config.transition(dt)
            fq = self._fq_cache[dt] = (f, np.ascontiguousarray(f.T), q)
        return fq

    def _clean(
        self, xyz_um: np.ndarray, scores: np.ndarray | None
    ) -> tuple[np.ndarray, np.ndarray, UpdateStats]:
        z = np.asarray(xyz_um, dtype=np.float64)
        if z.size == 0:
            z = z.reshape(0, 3)
        if z.ndim != 2 or z.shape[1] != 3:
            raise ValueError(
                f"localizations must be an (N, 3) array of x, y, z in µm, got {z.shape}"
            )
        n = len(z)
        stats = UpdateStats(n_input=n)
        s: np.ndarray | None = None
        if scores is not None:
            s = np.asarray(scores, dtype=np.float64).reshape(-1)
            if len(s) != n:
                raise ValueError(f"got {len(s)} scores for {n} localizations")
            finite = np.all(np.isfinite(z), axis=1) & np.isfinite(s)
        else:
            finite = np.all(np.isfinite(z), axis=1)
        idx = np.flatnonzero(finite)
        stats.n_rejected = n - len(idx)
        self.rejected_count += stats.n_rejected
        cap = self.config.max_localizations_per_frame
        if len(idx) > cap:
            if s is not None:
                order = np.argsort(-s[idx], kind="stable")[:cap]
                idx = np.sort(idx[order])
            else:
                idx = idx[:cap]
            stats.n_dropped = len(finite) - stats.n_rejected - cap
            self.dropped_count += stats.n_dropped
            log.warning("frame at t=%s s: %d localizations, only %d used", self._t, n, cap)
        return z[idx], idx, stats

    def _gate_pairs(
        self, st: _State, z: np.ndarray, rv: np.ndarray, stats: UpdateStats
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(track row, localization, d²) for every pair inside the gate whose update would
        leave the track's speed at most ``max_speed_um_s``; ``rv``: (N, 3) each
        localization's R (diagonal), so S = P + R per pair.

        Pre-gate on one lateral axis: inside the gate ``|y_a| ≤ √(gate · S_aa)`` for every
        axis a, so sorting the localizations along x (or y) and cutting a window per track
        finds every candidate in O((T + N) log N + candidates) instead of T × N. The window
        takes the largest R of the localizations it searches: those are searched in groups
        of R within a factor 4, so one uncertain localization widens only its group's.
        """
        m = st.x[:, :3]
        p_diag = st.p[:, [0, 1, 2], [0, 1, 2]]
        ax = 0 if np.ptp(z[:, 0]) >= np.ptp(z[:, 1]) else 1
        r_ax = rv[:, ax]
        group = np.floor(np.log2(r_ax / r_ax.min()) / 2).astype(np.int64)
        parts_r, parts_c = [], []
        for g in np.unique(group).tolist():  # one group unless the localizations' σ differ
            sel = np.flatnonzero(group == g)
            order = sel[np.argsort(z[sel, ax], kind="stable")]
            zs = z[order, ax]
            half = np.sqrt(self._gate * (p_diag[:, ax] + r_ax[sel].max()))
            lo = np.searchsorted(zs, m[:, ax] - half, side="left")
            hi = np.searchsorted(zs, m[:, ax] + half, side="right")
            counts = hi - lo
            total = int(counts.sum())
            if total:
                offs = np.arange(total) - np.repeat(np.cumsum(counts) - counts, counts)
                parts_r.append(np.repeat(np.arange(len(m)), counts))
                parts_c.append(order[np.repeat(lo, counts) + offs])
        if not parts_r:
            e = np.zeros(0, dtype=np.int64)
            return e, e, np.zeros(0)
        rows, cols = np.concatenate(parts_r), np.concatenate(parts_c)
        y = z[cols] - m[rows]
        inbox = np.all(y * y <= self._gate * (p_diag[rows] + rv[cols]), axis=1)
        rows, cols, y = rows[inbox], cols[inbox], y[inbox]
        sinv = inv_sym3(innovation_cov(st.p[rows], rv[cols]))
        d2 = np.einsum("ka,kab,kb->k", y, sinv, y)
        keep = d2 <= self._gate
        rows, cols, d2 = rows[keep], cols[keep], d2[keep]
        if self._max_speed2 < math.inf and len(rows):
            # The velocity this pair's update would give (x' = x + K y, K = P Hᵀ S⁻¹, as
            # `kf_update`). The position gate alone admits any speed the velocity
            # uncertainty allows: a new track's (init_velocity_std_um_s per axis), or a
            # coasting track's, whose covariance grows every missed frame; one wrong
            # association then gives it a velocity no emitter has, and it coasts away on it.
            y = y[keep]
            kv = st.p[rows, 3:6, :3] @ sinv[keep]
            v = st.x[rows, 3:6] + np.einsum("kab,kb->ka", kv, y)
            ok = np.einsum("ka,ka->k", v, v) <= self._max_speed2
            stats.n_speed_refused = int(len(ok) - ok.sum())
            rows, cols, d2 = rows[ok], cols[ok], d2[ok]
        return rows, cols, d2

    def _assign(
        self, rows: np.ndarray, cols: np.ndarray, d2: np.ndarray, stats: UpdateStats
    ) -> tuple[np.ndarray, np.ndarray]:
        """Optimal assignment over gated pairs; cost d² − gate (non-assignment costs 0)."""
        if not len(rows):
            return rows, cols
        rc = np.bincount(rows)[rows]
        cc = np.bincount(cols)[cols]
        lone = (rc == 1) & (cc == 1)
        out_r, out_c = [rows[lone]], [cols[lone]]
        amb = ~lone
        if amb.any():
            ar, ac, ad = rows[amb], cols[amb], d2[amb]
            ur, ri = np.unique(ar, return_inverse=True)
            uc, ci = np.unique(ac, return_inverse=True)
            nr, nc = len(ur), len(uc)
            stats.n_solver_pairs += len(ar)
            if len(ar) > _SPARSE_SOLVER_PAIRS:
                # One sparse solve over everything (a flood of detections): each track row
                # gets a private dummy column = staying unassigned. Weights are shifted to
                # be positive (zeros would read as missing edges); the shift is the same
                # for every full matching, so the optimum is that of d² − gate.
                w = csr_matrix(
                    (
                        np.concatenate([ad + 1.0, np.full(nr, self._gate + 1.0)]),
                        (
                            np.concatenate([ri, np.arange(nr)]),
                            np.concatenate([ci, nc + np.arange(nr)]),
                        ),
                    ),
                    shape=(nr, nc + nr),
                )
                a, b = min_weight_full_bipartite_matching(w)
                ok = b < nc
                out_r.append(ur[a[ok]])
                out_c.append(uc[b[ok]])
            else:
                # Clusters of tracks competing for localizations: dense solve per cluster.
                graph = coo_matrix((np.ones(len(ri)), (ri, nr + ci)), shape=(nr + nc, nr + nc))
                _, label = connected_components(graph, directed=False)
                comp = label[ri]
                order = np.argsort(comp, kind="stable")
                bounds = np.flatnonzero(np.diff(comp[order])) + 1
                for grp in np.split(order, bounds):
                    gr, gc = ri[grp], ci[grp]
                    lr, lri = np.unique(gr, return_inverse=True)
                    lcol, lci = np.unique(gc, return_inverse=True)
                    cost = np.zeros((len(lr), len(lcol)))
                    cost[lri, lci] = ad[grp] - self._gate
                    a, b = linear_sum_assignment(cost)
                    ok = cost[a, b] < 0
                    out_r.append(ur[lr[a[ok]]])
                    out_c.append(uc[lcol[b[ok]]])
        return np.concatenate(out_r), np.concatenate(out_c)

    def _frame(
        self,
        loc_index: np.ndarray,
        x: np.ndarray | None = None,
        p: np.ndarray | None = None,
        t_s: float | None = None,
    ) -> TrackFrame:
        st = self._state
        x = st.x if x is None else x
        p = st.p if p is None else p
        xyz = x[:, :3]
        if self.config.motion is MotionModel.CONSTANT_VELOCITY:
            vel = x[:, 3:6]
        else:
            vel = np.zeros_like(xyz)
        cov = p[:, :3, :3]
        status = TrackStatus.of_confirmed(st.confirmed, st.misses)
        cols = [xyz, vel, cov, st.id, status, st.age, st.hits, st.misses, loc_index]
        cols = [np.array(a, copy=True) for a in cols]  # detached from the live state
        for a in cols:
            a.flags.writeable = False
        xyz, vel, cov, ids, status, age, hits, misses, li = cols
        t = t_s if t_s is not None else (self._t if self._t is not None else math.nan)
        return TrackFrame(t, ids, xyz, vel, cov, status, age, hits, misses, li)


def _concat(a: _State, b: _State) -> _State:
    return _State(
        np.concatenate([a.x, b.x]),
        np.concatenate([a.p, b.p]),
        np.concatenate([a.id, b.id]),
        np.concatenate([a.age, b.age]),
        np.concatenate([a.hits, b.hits]),
        np.concatenate([a.misses, b.misses]),
        np.concatenate([a.confirmed, b.confirmed]),
    )


def link_iter(
    frames: Iterable[tuple[float, np.ndarray]]
    | Iterable[tuple[float, np.ndarray, np.ndarray]]
    | Iterable[tuple[float, np.ndarray, np.ndarray | None, np.ndarray]],
    config: TrackerConfig | None = None,
) -> Iterator[TrackFrame]:
    """Track a stream of ``(t_s, xyz_um)``, ``(t_s, xyz_um, scores)`` or ``(t_s, xyz_um,
    scores, sigma_xyz_um)`` frames, yielding each frame's `TrackFrame` as it is processed
    (trackpy's ``link_iter`` for Kalman tracks)."""
    tracker = KalmanTracker(config)
    for item in frames:
        t_s, xyz = item[0], item[1]
        scores = item[2] if len(item) > 2 else None
        sigma = item[3] if len(item) > 3 else None
        yield tracker.update_frame(xyz, t_s, scores, sigma)


def link_table(
    frame: np.ndarray,
    xyz_um: np.ndarray,
    t_s: np.ndarray | None = None,
    *,
    fps: float | None = None,
    scores: np.ndarray | None = None,
    config: TrackerConfig | None = None,
    tracker: KalmanTracker | None = None,
    frame_range: tuple[int, int] | None = None,
    stage_z_um: np.ndarray | None = None,
    frame_meta: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    sigma_xyz_um: np.ndarray | None = None,
) -> TrackTable:
    """Track a whole table of localizations (one row each, grouped by ``frame``).

    Frame times come from ``t_s`` (per row; equal within a frame) or from ``fps`` as
    ``frame / fps``. Every frame number between the first and the last is processed, those
    with no rows as empty frames; with ``t_s`` their times are interpolated linearly in frame
    number between their neighbours. ``frame_range=(first, last)`` (with ``fps``) processes
    that range instead, so leading and trailing empty frames count too. Errors name the
    offending frame.

    ``stage_z_um`` (per row, equal within a frame; NaN where unknown): the focus each frame
    was taken at. Then z is tracked in absolute depth as the live service does
    (`focaltrack.models.analyser.FrameAnalyser`); a frame without rows keeps the focus of the
    frame before it.

    ``frame_meta=(frames, t_s, stage_z_um)``: exactly the frames to process, with their times
    and focus (a recording's analysed frames; ``t_s``, ``fps`` and ``stage_z_um`` are then
    not given). Rows of other frames are an error.

    ``sigma_xyz_um``: (N, 3) each localization's σ per axis, µm (NaN where unknown), its
    measurement noise where finite (`KalmanTracker.update_frame`).
    """
    # The analyser imports this module; it is the one place that turns a frame's
    # localizations and focus into tracks, live and here.
    from focaltrack.models.analyser import FrameAnalyser
    from focaltrack.records import Localizations

    frame = np.asarray(frame).astype(np.int64, copy=False).reshape(-1)
    xyz = np.asarray(xyz_um, dtype=np.float64).reshape(-1, 3)
    if len(xyz) != len(frame):
        raise ValueError(f"{len(frame)} frame numbers for {len(xyz)} localizations")
    if frame_meta is not None:
        if t_s is not None or fps is not None or stage_z_um is not None:
            raise ValueError("frame_meta gives the times and focus; no t_s, fps or stage_z_um")
    elif (t_s is None) == (fps is None):
        raise ValueError("give exactly one of frame times (t_s) and fps")
    tracker = KalmanTracker(config) if tracker is None else tracker
    order = np.argsort(frame, kind="stable")
    fr_sorted = frame[order]
    if not len(frame) and frame_range is None and frame_meta is None:
        return TrackTable.empty()
    frames, starts = np.unique(fr_sorted, return_index=True)
    ends = np.append(starts[1:], len(fr_sorted))
    all_z: np.ndarray | None = None
    if frame_meta is not None:
        all_frames = np.asarray(frame_meta[0], dtype=np.int64).reshape(-1)
        all_t = np.asarray(frame_meta[1], dtype=np.float64).reshape(-1)
        all_z = np.asarray(frame_meta[2], dtype=np.float64).reshape(-1)
        if not len(all_frames) == len(all_t) == len(all_z):
            raise ValueError("frame_meta: frames, times and focus differ in length")
        if np.any(np.diff(all_frames) <= 0):
            raise ValueError("frame_meta: frame numbers must strictly increase")
        lost = np.setdiff1d(frames, all_frames)
        if len(lost):
            raise ValueError(f"frame {lost[0]}: localizations of a frame not in frame_meta")
    elif t_s is not None:
        t = np.asarray(t_s, dtype=np.float64).reshape(-1)[order]
        t_frames = t[starts]
        for f, a, b in zip(frames, starts, ends, strict=True):
            if not np.all(t[a:b] == t[a]):
                raise ValueError(f"frame {f}: rows disagree on t_s")
        bad = ~np.isfinite(t_frames)
        if bad.any():
            raise ValueError(f"frame {frames[bad][0]}: t_s is not finite")
        dif = np.diff(t_frames)
        if np.any(dif <= 0):
            k = int(np.flatnonzero(dif <= 0)[0])
            raise ValueError(
                f"frame {frames[k + 1]}: t_s={t_frames[k + 1]!r} s does not come after frame "
                f"{frames[k]} at t_s={t_frames[k]!r} s (times must strictly increase)"
            )
        if frame_range is not None:
            raise ValueError("frame_range needs fps (times of frames outside the table)")
        all_frames = np.arange(frames[0], frames[-1] + 1)
        all_t = np.interp(all_frames, frames, t_frames)
    else:
        if not (fps is not None and math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number, got {fps}")
        if frame_range is not None:
            first, last = int(frame_range[0]), int(frame_range[1])
            if len(frames) and (frames[0] < first or frames[-1] > last):
                raise ValueError(f"frames {frames[0]}..{frames[-1]} outside {frame_range}")
        else:
            first, last = int(frames[0]), int(frames[-1])
        all_frames = np.arange(first, last + 1)
        all_t = all_frames / float(fps)
    sc = None if scores is None else np.asarray(scores, dtype=np.float64).reshape(-1)[order]
    sz = None if stage_z_um is None else np.asarray(stage_z_um, dtype=np.float64).reshape(-1)
    if sz is not None and len(sz) != len(frame):
        raise ValueError(f"{len(sz)} stage positions for {len(frame)} localizations")
    sz = None if sz is None else sz[order]
    sig = None
    if sigma_xyz_um is not None:
        sig = np.asarray(sigma_xyz_um, dtype=np.float64).reshape(-1, 3)
        if len(sig) != len(frame):
            raise ValueError(f"{len(sig)} localization σ rows for {len(frame)} localizations")
        sig = sig[order]
    analyser = FrameAnalyser(None, tracker)
    parts: list[tuple[int, TrackFrame]] = []
    focus = math.nan
    j = 0
    for k, (f, tf) in enumerate(zip(all_frames.tolist(), all_t.tolist(), strict=True)):
        if all_z is not None:
            focus = float(all_z[k])
        if j < len(frames) and frames[j] == f:
            a, b = starts[j], ends[j]
            j += 1
            if sz is not None:
                focus = float(sz[a])
                if not np.array_equal(sz[a:b], sz[a:b][:1].repeat(b - a), equal_nan=True):
                    raise ValueError(f"frame {f}: rows disagree on stage_z_um")
        else:
            a = b = 0
        p = xyz[order[a:b]]
        s = np.full((b - a, 3), math.nan) if sig is None else sig[a:b]
        locs = Localizations(
            f,
            p[:, 0],
            p[:, 1],
            p[:, 2],
            np.ones(b - a) if sc is None else sc[a:b],
            sigma_x_um=s[:, 0],
            sigma_y_um=s[:, 1],
            sigma_z_um=s[:, 2],
            stage_z_um=focus,
        )
        try:
            res = analyser.track_only(locs, f, tf, focus, with_scores=sc is not None)
        except ValueError as e:
            raise ValueError(f"frame {f}: {e}") from e
        li = res.localization_row
        rows = np.where(li >= 0, order[a:b][np.maximum(li, 0)] if b > a else -1, -1)
        parts.append((f, replace(res, localization_row=np.asarray(rows, dtype=np.int64))))
    return TrackTable.from_frames(parts)


# ------------------------------------------------------- tracking across focus moves
# Localizations report z as the defocus d = f − z_abs (the calibration's convention), which
# jumps by the size of every focus move. The live service tracks the absolute depth
# z_abs = f − d instead, so that a move_z (a focus lock, say) does not look like motion of
# every emitter, and converts the tracks back to the defocus at each frame's focus position
# for publishing. The map d ↔ f − d is its own inverse.


def defocus_to_depth(xyz_um: np.ndarray, focus_um: float) -> np.ndarray:
    """(N, 3) positions with z as defocus → z as absolute depth ``focus − z`` (and back)."""
    out = np.array(xyz_um, dtype=np.float64, copy=True).reshape(-1, 3)
    out[:, 2] = focus_um - out[:, 2]
    return out


def tracks_at_focus(frame: TrackFrame, focus_um: float) -> TrackFrame:
    """Tracks kept in absolute depth → the same tracks with z as defocus at ``focus_um``.

    z flips sign (z = f − z_abs), so vz and the xz/yz covariances flip sign too.
    """
    flip = np.array([1.0, 1.0, -1.0])
    vel = frame.velocity_um_s * flip
    cov = frame.cov_xyz_um2 * flip[:, None] * flip[None, :]
    return replace(
        frame, xyz_um=defocus_to_depth(frame.xyz_um, focus_um), velocity_um_s=vel, cov_xyz_um2=cov
    )

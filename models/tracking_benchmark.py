"""Score a tracker on simulated scenes, and time one update.

`evaluate_scene` simulates one named scene (`focaltrack.sim.tracking_scenes`), runs the
Kalman tracker over the simulated localizations and scores the confirmed tracks with CLEAR
MOT, IDF1, the particle-tracking-challenge measures and the smoothing gain
(`focaltrack.models.tracking_metrics`). `time_update` times one tracker update with many
live tracks. ``focaltrack evaluate-tracking`` prints and writes what these return.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from focaltrack.models.tracker import KalmanTracker, TrackerConfig, link_table
from focaltrack.models.tracking_metrics import (
    Trajectories,
    chenouard,
    clear_mot,
    identity_scores,
    smoothing_gain,
)
from focaltrack.sim.tracking_scenes import SCENES, SPEED_UM_S, observe, simulate


def config_dict(config: TrackerConfig) -> dict[str, Any]:
    """The tracker configuration as JSON-ready values (the motion model by name)."""
    d = asdict(config)
    d["motion"] = config.motion.value
    return d


def evaluate_scene(
    name: str,
    config: TrackerConfig,
    *,
    frames: int,
    fps: float,
    seed: int,
    sigma_um: tuple[float, float],
    miss_probability: float,
    false_positives: float,
    tolerance_um: float,
) -> dict[str, Any]:
    """Simulate, track and score one scene; the result is one scene of the JSON report."""
    points, info = simulate(name, frames, fps, seed)
    truth = Trajectories.of(*points)
    rng = np.random.default_rng([seed, SCENES.index(name)])
    box = (np.asarray(info["box_um"][0]), np.asarray(info["box_um"][1]))
    loc_frame, loc_xyz = observe(
        points, frames, rng, sigma_um, miss_probability, false_positives, box
    )
    # The field of view, as live (where the scene has one: not the crossing paths).
    field = info.get("field_um")
    tracker = KalmanTracker(config, field_um=None if field is None else (field[0], field[1]))
    t0 = time.perf_counter()
    table = link_table(loc_frame, loc_xyz, fps=fps, tracker=tracker, frame_range=(0, frames - 1))
    wall = time.perf_counter() - t0
    conf = table.select(table.confirmed)
    est = Trajectories.of(conf.frame, conf.track_id, conf.xyz_um)
    mot = clear_mot(truth, est, tolerance_um)
    ch = chenouard(truth, est, tolerance_um)
    ident = identity_scores(truth, est, tolerance_um)
    gain = smoothing_gain(truth, est, loc_frame, loc_xyz, tolerance_um)
    return {
        "scene": name,
        "scene_info": info,
        "motion_model": config.motion.value,
        "tracker_config": config_dict(config),
        "frames": frames,
        "fps": fps,
        "n_truth_tracks": len(np.unique(truth.id)),
        "n_localizations": len(loc_frame),
        "n_tracks_started": len(np.unique(table.track_id)),
        "n_tracks_confirmed": len(np.unique(conf.track_id)),
        "n_tracks_left_field": tracker.left_field_count,
        "clear_mot": mot.summary(),
        "chenouard": ch.summary(),
        "identity": ident.summary(),
        "smoothing": gain.summary(),
        "tracker_ms_per_frame": 1e3 * wall / frames,
    }


def time_update(
    config: TrackerConfig, *, n: int = 200, iterations: int = 300, fps: float = 100.0, seed: int = 0
) -> dict[str, Any]:
    """Time one update with ``n`` live confirmed tracks and ``n`` localizations: the
    columnar ``update_frame`` and the object-returning ``update``, alternately."""
    rng = np.random.default_rng(seed)
    start = rng.uniform(0, 200, (n, 3)) * [1, 1, 0.25]
    v = rng.normal(size=(n, 3))
    v *= SPEED_UM_S / np.linalg.norm(v, axis=1, keepdims=True)
    sig = np.array([config.sigma_lateral_um, config.sigma_lateral_um, config.sigma_axial_um])
    warm = 10
    total = warm + 2 * iterations
    zs = [start + v * (k / fps) + rng.normal(0, sig, (n, 3)) for k in range(total)]
    tracker = KalmanTracker(config)
    for k in range(warm):
        tracker.update_frame(zs[k], k / fps)
    cols, objs = [], []
    for k in range(warm, total):
        t0 = time.perf_counter()
        if k % 2:
            tracker.update(zs[k], k / fps)
            objs.append(time.perf_counter() - t0)
        else:
            tracker.update_frame(zs[k], k / fps)
            cols.append(time.perf_counter() - t0)
    live = len(tracker)

    def stats(v: list[float]) -> dict[str, float]:
        a = np.asarray(v) * 1e3
        return {
            "median_ms": float(np.median(a)),
            "p90_ms": float(np.percentile(a, 90)),
            "p99_ms": float(np.percentile(a, 99)),
        }

    return {
        "tracks": live,
        "localizations": n,
        "iterations": iterations,
        "update_frame": stats(cols),
        "update": stats(objs),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }

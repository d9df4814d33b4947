"""Ground truth and simulated localizer output for scoring the tracker.

Named scenes (`SCENES`): Brownian motion, directed flow at 75 µm/s, a small field where
emitters keep entering and leaving (all from `focaltrack.sim.scene.Scene`), and pairs of
emitters on straight paths that cross 1 µm apart (`crossing`). `observe` turns the truth
into what a localizer would report: Gaussian noise (lateral and axial σ), missed
detections and uniformly scattered false positives — no images, so a tracker is scored
apart from the localizer. Used by ``focaltrack evaluate-tracking``
(`focaltrack.models.tracking_benchmark`).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

SCENES = ("brownian", "flow", "enter_leave", "crossing")
SPEED_UM_S = 75.0  # seed 002: zebrafish blood cells


class TruthPoints(NamedTuple):
    """Points of many trajectories as columns: row i is emitter ``id[i]`` at ``frame[i]``."""

    frame: np.ndarray  # (n,) int
    id: np.ndarray  # (n,) int
    xyz_um: np.ndarray  # (n, 3)


def simulate(name: str, frames: int, fps: float, seed: int) -> tuple[TruthPoints, dict[str, Any]]:
    """Ground truth of one named scene: its points and a description (for the report)."""
    from focaltrack.sim.scene import Motion, Scene

    if name == "crossing":
        return crossing(frames, fps, seed)
    a = np.deg2rad(20.0)
    flow_v = SPEED_UM_S * np.array([math.cos(a), math.sin(a), 0.0])
    if name == "brownian":
        kw: dict[str, Any] = dict(
            field_um=(60.0, 60.0),
            z_range_um=(0.0, 20.0),
            n_emitters=20,
            motion=Motion.BROWNIAN,
            diffusion_um2_s=1.0,
        )
    elif name == "flow":
        kw = dict(
            field_um=(200.0, 200.0),
            z_range_um=(0.0, 30.0),
            n_emitters=20,
            motion=Motion.FLOW,
            velocity_um_s=flow_v,
            diffusion_um2_s=0.1,
        )
    elif name == "enter_leave":
        kw = dict(
            field_um=(40.0, 40.0),
            z_range_um=(0.0, 20.0),
            n_emitters=10,
            motion=Motion.FLOW,
            velocity_um_s=flow_v,
            diffusion_um2_s=0.1,
        )
    else:
        raise ValueError(f"unknown scene {name!r}; choose from {', '.join(SCENES)}")
    scene = Scene(**kw, seed=seed)
    fr, ids, xyz = [], [], []
    gt = scene.truth()
    for k in range(frames):
        if k:
            gt = scene.step(1.0 / fps)
        fr.append(np.full(len(gt), k))
        ids.append(gt.ids)
        xyz.append(gt.xyz_um)
    truth = TruthPoints(np.concatenate(fr), np.concatenate(ids), np.concatenate(xyz))
    info = {
        "motion": scene.motion.value,
        "box_um": [scene.lo.tolist(), scene.hi.tolist()],
        "n_emitters": int(kw["n_emitters"]),
        "diffusion_um2_s": float(kw["diffusion_um2_s"]),
        "velocity_um_s": scene.velocity_um_s.tolist() if scene.motion is Motion.FLOW else None,
        "entered": int(scene.entered_total),
        "left": int(scene.left_total),
        # The camera's view of the scene (x, y from 0): emitters leave it, as live.
        "field_um": [float(kw["field_um"][0]), float(kw["field_um"][1])],
    }
    return truth, info


def crossing(frames: int, fps: float, seed: int) -> tuple[TruthPoints, dict[str, Any]]:
    """Pairs of emitters at 75 µm/s on straight paths that pass 1 µm apart at one depth."""
    rng = np.random.default_rng(seed)
    n_pairs, spacing, approach = 8, 80.0, 1.0
    t = np.arange(frames) / fps
    fr, ids, xyz = [], [], []
    for i in range(n_pairs):
        centre = np.array([(i % 4) * spacing, (i // 4) * spacing, rng.uniform(0, 30)])
        ang = np.deg2rad(rng.uniform(20.0, 180.0))
        rot = rng.uniform(0, 2 * np.pi)
        d1 = np.array([math.cos(rot), math.sin(rot), 0.0])
        d2 = np.array([math.cos(rot + ang), math.sin(rot + ang), 0.0])
        v1, v2 = SPEED_UM_S * d1, SPEED_UM_S * d2
        normal = np.cross(v1 - v2, [0.0, 0.0, 1.0])
        normal *= approach / np.linalg.norm(normal)
        t_cross = t[len(t) // 2] + rng.uniform(-0.2, 0.2) * t[-1]
        for j, (v, off) in enumerate(((v1, 0.0 * normal), (v2, normal))):
            fr.append(np.arange(frames))
            ids.append(np.full(frames, 2 * i + j))
            xyz.append(centre + off + (t - t_cross)[:, None] * v)
    truth = TruthPoints(np.concatenate(fr), np.concatenate(ids), np.concatenate(xyz))
    lo, hi = truth.xyz_um.min(axis=0), truth.xyz_um.max(axis=0)
    info = {
        "motion": "crossing",
        "box_um": [lo.tolist(), hi.tolist()],
        "n_emitters": 2 * n_pairs,
        "speed_um_s": SPEED_UM_S,
        "closest_approach_um": approach,
        "crossing_angles_deg": "uniform 20–180",
    }
    return truth, info


def observe(
    truth: TruthPoints,
    frames: int,
    rng: np.random.Generator,
    sigma_um: tuple[float, float],
    miss_probability: float,
    false_positives: float,
    box_um: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """A simulated localizer's output, sorted by frame: (frame, xyz) with noise σ (lateral
    per axis, axial), misses, and a Poisson number of false positives per frame, uniform
    in ``box_um`` (lo, hi)."""
    frame_all = np.asarray(truth.frame)
    xyz_all = np.asarray(truth.xyz_um, dtype=np.float64).reshape(-1, 3)
    keep = rng.random(len(frame_all)) >= miss_probability
    sig = np.array([sigma_um[0], sigma_um[0], sigma_um[1]])
    xyz = xyz_all[keep] + rng.normal(0.0, sig, (int(keep.sum()), 3))
    fr = frame_all[keep]
    n_fp = rng.poisson(false_positives, frames)
    lo, hi = box_um
    fp_xyz = lo + rng.random((int(n_fp.sum()), 3)) * (hi - lo)
    fp_fr = np.repeat(np.arange(frames), n_fp)
    frame = np.concatenate([fr, fp_fr])
    xyz = np.concatenate([xyz, fp_xyz])
    order = np.argsort(frame, kind="stable")
    return frame[order], xyz[order]

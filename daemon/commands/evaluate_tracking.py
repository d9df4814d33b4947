"""``focaltrack evaluate-tracking``: score the Kalman tracker on simulated scenes.

Ground truth comes from `focaltrack.sim.scene.Scene` (Brownian motion, directed flow at
75 µm/s, a small field where emitters keep entering and leaving) and from pairs of emitters
on crossing straight paths built here. Localizations are the truth plus Gaussian noise
(lateral and axial σ), with missed detections and uniformly scattered false positives —
no images, so this isolates the tracker from the localizer. Writes ``results.json`` and
``README.md`` into ``--out`` and prints a table, plus the time of one tracker update with
200 live tracks and 200 localizations. See docs/tracking.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from focaltrack.daemon.argtypes import positive_float, positive_int
from focaltrack.daemon.commands.track import (
    _config_dict,
    _non_negative_float,
    add_tracker_arguments,
    config_from_args,
)

if TYPE_CHECKING:
    from focaltrack.models.tracker import TrackerConfig
    from focaltrack.models.tracking_metrics import Trajectories

log = logging.getLogger("focaltrack.evaluate_tracking")

SCENES = ("brownian", "flow", "enter_leave", "crossing")
SPEED_UM_S = 75.0  # seed 002: zebrafish blood cells


def _scene_list(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [n for n in names if n not in SCENES]
    if not names or bad:
        raise argparse.ArgumentTypeError(
            f"unknown scene(s) {', '.join(bad) or text!r}; choose from {', '.join(SCENES)}"
        )
    return names


def _probability01(text: str) -> float:
    v = float(text)
    if not 0 <= v < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return v


def register(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate-tracking",
        help="score the tracker on simulated scenes (MOTA, α/β, smoothing gain, timing)",
        description=(
            "Track simulated ground truth (Brownian, flow at 75 µm/s, emitters entering and "
            "leaving, crossing paths) seen through a noisy localizer with missed detections "
            "and false positives; report CLEAR MOT (MOTA, ID switches, fragmentations), the "
            "Chenouard et al. 2014 measures (α, β, Jaccard of points and tracks), the "
            "smoothing gain, and the time of one update with 200 tracks × 200 localizations."
        ),
    )
    p.add_argument("--out", required=True, type=Path, help="report directory (created)")
    p.add_argument("--scenes", type=_scene_list, default=SCENES, help=",".join(SCENES))
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument("--frames", type=positive_int, default=300, help="frames per scene (300)")
    p.add_argument("--fps", type=positive_float, default=100.0, help="frame rate, Hz (100)")
    p.add_argument(
        "--noise-um",
        type=str,
        default="0.3,1.5",
        metavar="LAT_UM,AX_UM",
        help="simulated localization noise σ, lateral per axis and axial, µm (0.3,1.5)",
    )
    p.add_argument(
        "--miss-probability",
        type=_probability01,
        default=0.05,
        help="probability that an emitter is not detected in a frame (0.05)",
    )
    p.add_argument(
        "--false-positives",
        type=_non_negative_float,
        default=2.0,
        help="mean false positives per frame, uniform in the scene's volume (2)",
    )
    p.add_argument(
        "--tolerance-um",
        type=positive_float,
        default=5.0,
        help="match distance for MOTA / gate ε for α, β / smoothing gain, µm (5)",
    )
    p.add_argument(
        "--timing-iterations",
        type=positive_int,
        default=300,
        help="updates timed for the 200 × 200 benchmark (300)",
    )
    add_tracker_arguments(p)
    p.set_defaults(func=run)


# --------------------------------------------------------------------------- scenes
def simulate(name: str, frames: int, fps: float, seed: int) -> tuple[Trajectories, dict]:
    """Ground truth of one named scene: trajectories and a description."""
    from focaltrack.models.tracking_metrics import Trajectories
    from focaltrack.sim.scene import Motion, Scene

    if name == "crossing":
        return _crossing(frames, fps, seed)
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
    truth = Trajectories.of(np.concatenate(fr), np.concatenate(ids), np.concatenate(xyz))
    info = {
        "motion": scene.motion.value,
        "box_um": [scene.lo.tolist(), scene.hi.tolist()],
        "n_emitters": int(kw["n_emitters"]),
        "diffusion_um2_s": float(kw["diffusion_um2_s"]),
        "velocity_um_s": scene.velocity_um_s.tolist() if scene.motion is Motion.FLOW else None,
        "entered": int(scene.entered_total),
        "left": int(scene.left_total),
    }
    return truth, info


def _crossing(frames: int, fps: float, seed: int) -> tuple[Trajectories, dict]:
    """Pairs of emitters at 75 µm/s on straight paths that pass 1 µm apart at one depth."""
    from focaltrack.models.tracking_metrics import Trajectories

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
    truth = Trajectories.of(np.concatenate(fr), np.concatenate(ids), np.concatenate(xyz))
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
    truth: Trajectories,
    frames: int,
    rng: np.random.Generator,
    sigma_um: tuple[float, float],
    miss_probability: float,
    false_positives: float,
    box_um: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """A simulated localizer's output: (frame, xyz) with noise, misses and false positives."""
    keep = rng.random(len(truth)) >= miss_probability
    sig = np.array([sigma_um[0], sigma_um[0], sigma_um[1]])
    xyz = truth.xyz_um[keep] + rng.normal(0.0, sig, (int(keep.sum()), 3))
    fr = truth.frame[keep]
    n_fp = rng.poisson(false_positives, frames)
    lo, hi = box_um
    fp_xyz = lo + rng.random((int(n_fp.sum()), 3)) * (hi - lo)
    fp_fr = np.repeat(np.arange(frames), n_fp)
    frame = np.concatenate([fr, fp_fr])
    xyz = np.concatenate([xyz, fp_xyz])
    order = np.argsort(frame, kind="stable")
    return frame[order], xyz[order]


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
    """Simulate, track and score one scene."""
    from focaltrack.models.tracker import KalmanTracker, link_table
    from focaltrack.models.tracking_metrics import (
        Trajectories,
        chenouard,
        clear_mot,
        smoothing_gain,
    )

    truth, info = simulate(name, frames, fps, seed)
    rng = np.random.default_rng([seed, SCENES.index(name)])
    box = (np.asarray(info["box_um"][0]), np.asarray(info["box_um"][1]))
    loc_frame, loc_xyz = observe(
        truth, frames, rng, sigma_um, miss_probability, false_positives, box
    )
    tracker = KalmanTracker(config)
    t0 = time.perf_counter()
    table = link_table(loc_frame, loc_xyz, fps=fps, tracker=tracker, frame_range=(0, frames - 1))
    wall = time.perf_counter() - t0
    conf = table.select(table.confirmed)
    est = Trajectories.of(conf.frame, conf.track_id, conf.xyz_um)
    mot = clear_mot(truth, est, tolerance_um)
    ch = chenouard(truth, est, tolerance_um)
    gain = smoothing_gain(truth, est, loc_frame, loc_xyz, tolerance_um)
    return {
        "scene": name,
        "scene_info": info,
        "motion_model": config.motion.value,
        "tracker_config": _config_dict(config),
        "frames": frames,
        "fps": fps,
        "n_truth_tracks": len(np.unique(truth.id)),
        "n_localizations": len(loc_frame),
        "n_tracks_started": len(np.unique(table.track_id)),
        "n_tracks_confirmed": len(np.unique(conf.track_id)),
        "clear_mot": mot.summary(),
        "chenouard": ch.summary(),
        "smoothing": gain.summary(),
        "tracker_ms_per_frame": 1e3 * wall / frames,
    }


def time_update(
    config: TrackerConfig, *, n: int = 200, iterations: int = 300, fps: float = 100.0, seed: int = 0
) -> dict[str, Any]:
    """Time one update with ``n`` live confirmed tracks and ``n`` localizations."""
    from focaltrack.models.tracker import KalmanTracker

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


# --------------------------------------------------------------------------- report
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.3f}"
    return str(v)


ROWS = (
    ("MOTA", "clear_mot", "mota"),
    ("MOTP (µm)", "clear_mot", "motp_um"),
    ("ID switches", "clear_mot", "id_switches"),
    ("fragmentations", "clear_mot", "fragmentations"),
    ("mostly tracked / truth tracks", None, "mt"),
    ("α (Chenouard)", "chenouard", "alpha"),
    ("β (Chenouard)", "chenouard", "beta"),
    ("Jaccard, points", "chenouard", "jaccard_points"),
    ("Jaccard, tracks", "chenouard", "jaccard_tracks"),
    ("smoothing gain, 3D", "smoothing", "gain_3d"),
    ("smoothing gain, lateral", "smoothing", "gain_lateral"),
    ("smoothing gain, axial", "smoothing", "gain_axial"),
    ("RMSE tracks / locs, 3D (µm)", None, "rmse"),
    ("confirmed tracks", None, "n_conf"),
    ("tracker time per frame (ms)", None, "ms"),
)


def _cell(r: dict[str, Any], group: str | None, key: str) -> str:
    if group:
        return _fmt(r[group][key])
    if key == "mt":
        return f"{r['clear_mot']['mostly_tracked']} / {r['n_truth_tracks']}"
    if key == "rmse":
        s = r["smoothing"]
        return f"{s['rmse_tracks_3d_um']:.3f} / {s['rmse_localizations_3d_um']:.3f}"
    if key == "n_conf":
        return str(r["n_tracks_confirmed"])
    return _fmt(r["tracker_ms_per_frame"])


def summary_text(report: dict[str, Any]) -> str:
    res = report["scenes"]
    names = [r["scene"] for r in res]
    w0 = max(len(n) for n, _, _ in ROWS)
    cells = [[_cell(r, g, k) for r in res] for _, g, k in ROWS]
    widths = [max(len(names[i]), *(len(c[i]) for c in cells)) for i in range(len(names))]
    lines = ["  ".join([" " * w0, *(n.rjust(w) for n, w in zip(names, widths, strict=True))])]
    for (label, _, _), row in zip(ROWS, cells, strict=True):
        lines.append(
            "  ".join([label.ljust(w0), *(c.rjust(w) for c, w in zip(row, widths, strict=True))])
        )
    tm = report["timing"]
    lines.append(
        f"one update, {tm['tracks']} tracks × {tm['localizations']} localizations: "
        f"{tm['update_frame']['median_ms']:.2f} ms median "
        f"(p90 {tm['update_frame']['p90_ms']:.2f} ms) returning columns, "
        f"{tm['update']['median_ms']:.2f} ms returning Track objects"
    )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    res = report["scenes"]
    s = report["settings"]
    out = [
        "# Tracking evaluation",
        "",
        f"Simulated localizations: σ = {s['noise_um'][0]} µm lateral (per axis), "
        f"{s['noise_um'][1]} µm axial; {100 * s['miss_probability']:g} % missed detections; "
        f"{s['false_positives']} false positives per frame (Poisson mean, uniform in the "
        f"scene's box); {s['frames']} frames at {s['fps']:g} fps; seed {s['seed']}. "
        f"Confirmed track rows only. Match distance / gate ε: {s['tolerance_um']} µm.",
        "",
        "| measure | " + " | ".join(r["scene"] for r in res) + " |",
        "| --- |" + " ---: |" * len(res),
    ]
    for label, g, k in ROWS:
        out.append(f"| {label} | " + " | ".join(_cell(r, g, k) for r in res) + " |")
    out += ["", "## Scenes", ""]
    for r in res:
        info = ", ".join(f"{k}: {v}" for k, v in r["scene_info"].items())
        out.append(f"- **{r['scene']}** (tracker model {r['motion_model']}): {info}")
    tm = report["timing"]
    out += [
        "",
        "## Update time",
        "",
        f"{tm['tracks']} live tracks × {tm['localizations']} localizations, "
        f"{tm['iterations']} updates each, `time.perf_counter`, on {tm['cpu']} "
        f"(Python {tm['python']}, numpy {tm['numpy']}):",
        "",
        "| call | median (ms) | p90 (ms) | p99 (ms) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for key, label in (
        ("update_frame", "`update_frame` (columns)"),
        ("update", "`update` (Tracks)"),
    ):
        t = tm[key]
        out.append(f"| {label} | {t['median_ms']:.3f} | {t['p90_ms']:.3f} | {t['p99_ms']:.3f} |")
    out += [
        "",
        "Definitions: docs/tracking.md. MOTA = 1 − (FN + FP + IDSW)/GT; α, β, Jaccard after "
        "Chenouard et al., Nat. Methods 11, 281 (2014); smoothing gain = RMSE of confirmed "
        "track positions / RMSE of the raw localizations, over the truth points both matched.",
        "",
    ]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    parts = args.noise_um.split(",")
    try:
        noise = (float(parts[0]), float(parts[1]))
    except (ValueError, IndexError):
        raise ValueError(f"--noise-um: expected LAT_UM,AX_UM, got {args.noise_um!r}") from None
    if len(parts) != 2 or not all(math.isfinite(v) and v > 0 for v in noise):
        raise ValueError(f"--noise-um: expected two positive numbers, got {args.noise_um!r}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    # the tracker is told the simulated noise unless --model-noise says otherwise
    base = config_from_args(args, sigma_lateral_um=noise[0], sigma_axial_um=noise[1])
    results = []
    for name in args.scenes:
        cfg = base
        if args.motion is None and name == "brownian":
            cfg = replace(base, motion="random_walk")
        if args.diffusion_um2_s is None and name == "brownian":
            cfg = replace(cfg, diffusion_um2_s=1.0)
        log.info("scene %s: %d frames", name, args.frames)
        results.append(
            evaluate_scene(
                name,
                cfg,
                frames=args.frames,
                fps=args.fps,
                seed=args.seed,
                sigma_um=noise,
                miss_probability=args.miss_probability,
                false_positives=args.false_positives,
                tolerance_um=args.tolerance_um,
            )
        )
    timing = time_update(base, iterations=args.timing_iterations, fps=args.fps, seed=args.seed)
    report = {
        "schema_version": "1",
        "settings": {
            "frames": args.frames,
            "fps": args.fps,
            "seed": args.seed,
            "noise_um": list(noise),
            "miss_probability": args.miss_probability,
            "false_positives": args.false_positives,
            "tolerance_um": args.tolerance_um,
        },
        "scenes": results,
        "timing": timing,
    }
    (out / "results.json").write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    (out / "README.md").write_text(markdown(report))
    print(summary_text(report))
    print(f"report: {out / 'README.md'}", file=sys.stdout)
    return 0


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o)}")

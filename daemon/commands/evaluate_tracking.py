"""``focaltrack evaluate-tracking``: score the Kalman tracker on simulated scenes.

The scenes and the simulated localizer are `focaltrack.sim.tracking_scenes` (Brownian
motion, directed flow at 75 µm/s, emitters entering and leaving, crossing paths; noise,
misses and false positives, no images); simulating, tracking and scoring one scene is
`focaltrack.models.tracking_benchmark.evaluate_scene`. This command parses the options,
writes ``results.json`` and ``README.md`` into ``--out`` and prints a table, plus the time of
one tracker update with 200 live tracks and 200 localizations. See docs/tracking.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from focaltrack.common.files import fmt, json_default, write_text_atomic
from focaltrack.daemon.argtypes import positive_float, positive_int
from focaltrack.daemon.commands.track import (
    _non_negative_float,
    add_tracker_arguments,
    config_from_args,
)
from focaltrack.sim.tracking_scenes import SCENES

log = logging.getLogger("focaltrack.evaluate_tracking")


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


# --------------------------------------------------------------------------- report
ROWS = (
    ("MOTA", "clear_mot", "mota"),
    ("MOTP (µm)", "clear_mot", "motp_um"),
    ("ID switches", "clear_mot", "id_switches"),
    ("fragmentations", "clear_mot", "fragmentations"),
    ("IDF1", "identity", "idf1"),
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
        return fmt(r[group][key], missing="nan")
    if key == "mt":
        return f"{r['clear_mot']['mostly_tracked']} / {r['n_truth_tracks']}"
    if key == "rmse":
        s = r["smoothing"]
        return f"{s['rmse_tracks_3d_um']:.3f} / {s['rmse_localizations_3d_um']:.3f}"
    if key == "n_conf":
        return str(r["n_tracks_confirmed"])
    return fmt(r["tracker_ms_per_frame"], missing="nan")


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
    from focaltrack.models.tracker import MotionModel
    from focaltrack.models.tracking_benchmark import evaluate_scene, time_update

    # the tracker is told the simulated noise unless --model-noise says otherwise
    base = config_from_args(args, sigma_lateral_um=noise[0], sigma_axial_um=noise[1])
    results = []
    for name in args.scenes:
        cfg = base
        if args.motion is None and name == "brownian":
            cfg = replace(base, motion=MotionModel.RANDOM_WALK)
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
    # not strict JSON: a NaN score (an empty scene's MOTA) stays NaN, as Python reads it
    text = json.dumps(report, indent=2, default=json_default) + "\n"
    write_text_atomic(out / "results.json", text)
    write_text_atomic(out / "README.md", markdown(report))
    print(summary_text(report))
    print(f"report: {out / 'README.md'}", file=sys.stdout)
    return 0

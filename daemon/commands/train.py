"""``focaltrack train``: train both networks from a calibration alone; writes a model bundle.

See docs/models.md (presets, the synthesizer, the bundle format). ``--nproc N`` or torchrun:
data-parallel training (`focaltrack.models.distributed`, docs/scaling.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from focaltrack.daemon.argtypes import positive_int

# The preset names, spelled out so that building the CLI does not import torch;
# tests/test_cnn.py checks them against focaltrack.models.train.PRESETS.
PRESET_NAMES = ("ci", "quick", "default", "long")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "train",
        help="train the lateral and axial networks from a calibration",
        description=(
            "Train the lateral detection and axial localization networks from a focal-stack "
            "calibration alone (synthetic training data drawn on the fly), validate them on "
            "held-out synthetic frames and write a model bundle directory. Uses a CUDA GPU "
            "when there is one. Deterministic for a given --seed on a CPU."
        ),
    )
    p.add_argument("--calibration", required=True, type=Path, help="calibration file (.h5)")
    p.add_argument("--out", required=True, type=Path, help="model bundle directory to write")
    p.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default="default",
        help="training length: ci (unit tests), quick (demo, ~3 min on 2 CPU cores), "
        "default (real use, ~12 min on 2 CPU cores), long (twice default's steps, ~23 min, "
        "a few percent more emitters found); far less on a GPU",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N"
    )
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: all cores, ≤ 8)")
    p.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        help="train data-parallel (DDP) in N processes on this machine: one per GPU (NCCL), "
        "or sharing the CPU cores (gloo); the preset's global batch is shared out. Under "
        "torchrun leave it out (torchrun starts the processes)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from focaltrack.calibration import Calibration
    from focaltrack.models import distributed
    from focaltrack.models.bundle import read_meta
    from focaltrack.models.train import PRESETS, check_out, train, train_distributed

    launched = distributed.from_env()
    if launched is not None and args.nproc > 1:
        raise ValueError(
            "--nproc under torchrun: torchrun has started the processes; leave --nproc out"
        )
    cal = Calibration.load(args.calibration)
    kwargs: dict[str, Any] = {
        "preset": args.preset,
        "seed": args.seed,
        "device": args.device,
        "threads": args.threads,
        "overwrite": args.force,
        "progress": not args.no_progress,
        "calibration_path": str(args.calibration),
    }
    if launched is not None:
        result = train_distributed(launched, cal, args.out, **kwargs)
        if not launched.is_main:
            return 0  # rank 0 reports
        path, meta = result.path, result.meta
    elif args.nproc > 1:
        # refused here rather than once per process
        check_out(args.out, args.force)
        preset = PRESETS[args.preset]
        for r in range(args.nproc):
            rank = distributed.Rank(r, args.nproc, r)
            distributed.rank_device(args.device, rank)  # a GPU for every rank
            distributed.rank_batch(min(preset.lateral_batch, preset.axial_batch), rank)
        distributed.launch(args.nproc, train_distributed, cal, args.out, **kwargs)
        path = args.out
        meta = read_meta(path)
    else:
        result = train(cal, args.out, **kwargs)
        path, meta = result.path, result.meta
    v = meta["validation"]["by_snr"]
    print(f"model: {path}", file=sys.stdout)
    for k, r in v.items():
        print(
            f"  validation {k:>5}: Jaccard {_f(r['jaccard'])}  RMSE xy {_f(r['rmse_lateral_um'])} "
            f"µm  z {_f(r['rmse_axial_um'])} µm",
            file=sys.stdout,
        )
    return 0


def _f(v: float | None) -> str:
    return "  n/a" if v is None else f"{v:.3f}"

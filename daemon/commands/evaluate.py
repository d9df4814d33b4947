"""``focaltrack evaluate``: score a trained model on the simulated microscope (seed 002 §3.2).

Writes ``results.json``, ``README.md`` (tables, the SNR definition, the target checks) and
PNG plots into ``--out``, and prints a compact table. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from focaltrack.daemon.argtypes import non_negative_float, positive_int

log = logging.getLogger("focaltrack.evaluate")


def _non_negative_int(text: str) -> int:
    v = int(text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be non-negative, got {v}")
    return v


def _float_list(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers: {e}") from e
    if not vals or not all(math.isfinite(v) for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got {text!r}")
    return vals


def _int_list(text: str) -> tuple[int, ...]:
    vals = _float_list(text)
    if any(v != int(v) or v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"expected comma-separated counts >= 1, got {text!r}")
    return tuple(int(v) for v in vals)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a model on the simulated microscope (SNR and density sweeps)",
        description=(
            "Reproduce seed 002 §3.2 on the simulated microscope: Jaccard index, precision, "
            "recall and lateral/axial/3D RMSE against the SNR (20 emitters in 100×100×100 "
            "µm³) and against the number of emitters per frame, plus isolated bright "
            "emitters. Frames come from the simulated microscope's own PSF model and camera; "
            "the model only ever saw its calibration."
        ),
    )
    p.add_argument("--model", required=True, type=Path, help="model bundle directory")
    p.add_argument("--out", required=True, type=Path, help="report directory (created)")
    p.add_argument(
        "--frames", type=positive_int, default=None, metavar="N", help="frames per point (50)"
    )
    p.add_argument(
        "--isolated-frames",
        type=_non_negative_int,
        default=None,
        metavar="N",
        help="frames of the isolated-emitter point, 0 to skip (200)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (0)")
    p.add_argument(
        "--snr-db",
        type=_float_list,
        default=None,
        metavar="LIST",
        help="SNR points, dB (0,5,10,15,20,30)",
    )
    p.add_argument(
        "--densities",
        type=_int_list,
        default=None,
        metavar="LIST",
        help="emitters per frame (1,2,4,8,16,32,64,100)",
    )
    p.add_argument(
        "--density-snr-db",
        type=float,
        default=None,
        metavar="DB",
        help="SNR of the density sweep (20)",
    )
    p.add_argument(
        "--isolated-snr-db",
        type=float,
        default=None,
        metavar="DB",
        help="SNR of the isolated point (20)",
    )
    p.add_argument(
        "--tolerances-um",
        type=_float_list,
        default=None,
        metavar="LIST",
        help="match tolerances, µm; the first is the one the targets use (10,2)",
    )
    p.add_argument(
        "--background-photons",
        type=float,
        default=None,
        metavar="PHOTONS",
        help="background photons per pixel per frame (20)",
    )
    p.add_argument("--quick", action="store_true", help="a few frames per point (smoke test)")
    p.add_argument(
        "--no-bounds",
        dest="bounds",
        action="store_false",
        help="skip the Cramér–Rao bounds and the ideal recall (they cost ~0.1 s per frame)",
    )
    p.add_argument(
        "--passes",
        type=positive_int,
        default=None,
        help="localizer passes (1: networks alone; 2+: fit, subtract, search the residual; "
        "default: the model's setting)",
    )
    p.add_argument(
        "--fit",
        choices=("spline", "none"),
        default=None,
        help="the localizer's last step: spline (the Poisson MLE fit of the calibration) or "
        "none (default: the model's setting)",
    )
    p.add_argument(
        "--matched-filter-snr",
        type=non_negative_float,
        default=None,
        metavar="SNR",
        help="the threshold of the fit residual's matched filter (docs/models.md); 0: off, "
        "the analysis without it (default: the model's setting)",
    )
    p.add_argument(
        "--matched-filter-rounds",
        type=positive_int,
        default=None,
        metavar="N",
        help="rounds of the residual's matched filter, each a search and a fit "
        "(default: the model's setting)",
    )
    p.add_argument("--device", default=None, help="torch device for the model (auto)")
    p.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    created = not out.exists()
    try:
        return _run(args)
    except BaseException:
        # Nothing half-written: a report directory this run created and left empty goes.
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _run(args: argparse.Namespace) -> int:
    from focaltrack.models import evaluate as ev

    # Cheap checks first: a typo must not cost a model load and minutes of work.
    out = ev.check_writable(args.out)
    model_dir = Path(args.model)
    if not model_dir.exists():
        raise FileNotFoundError(f"model bundle {model_dir} does not exist")
    if not model_dir.is_dir():
        raise NotADirectoryError(f"model bundle {model_dir} is not a directory")

    overrides: dict[str, Any] = {"seed": args.seed, "bounds": args.bounds}
    for name in (
        "frames",
        "isolated_frames",
        "snr_db",
        "densities",
        "density_snr_db",
        "isolated_snr_db",
        "tolerances_um",
        "background_photons",
    ):
        v = getattr(args, name)
        if v is not None:
            overrides[name] = v
    settings = ev.Settings.quick(**overrides) if args.quick else ev.Settings(**overrides)

    from focaltrack.models.localizer import Localizer

    mic = ev.Microscope()
    # The frames' pixel size is the simulated microscope's: a model calibrated at another
    # pixel size is refused by the localizer (it was not calibrated on this microscope).
    loc = Localizer.from_bundle(
        model_dir,
        device=args.device,
        threads=args.threads,
        pixel_size_um=mic.pixel_size_um,
        passes=args.passes,
        fit=args.fit,
    )
    if args.matched_filter_snr is not None:
        loc.decode = dataclasses.replace(loc.decode, matched_filter_snr=args.matched_filter_snr)
    if args.matched_filter_rounds is not None:
        loc.decode = dataclasses.replace(
            loc.decode, matched_filter_rounds=args.matched_filter_rounds
        )
    info = model_info(loc, model_dir)
    z = np.asarray(loc.z_um, dtype=float)
    n_frames = sum(s.frames for s in settings.specs())
    log.info(
        "evaluating %s on %d simulated frames (depth %g–%g µm)", model_dir, n_frames, z[0], z[-1]
    )
    report = ev.evaluate(
        loc,
        settings,
        z_range_um=(float(z[0]), float(z[-1])),
        microscope=mic,
        model_info=info,
        calibration=loc.calibration,  # the model of the Cramér–Rao bounds and ideal recall
    )
    paths = ev.write_report(report, out)
    print(ev.summary_text(report))
    print(f"report: {paths['markdown']} ({report.wall_s:.0f} s)", file=sys.stdout)
    return 0


def model_info(loc: Any, model_dir: Path) -> dict[str, Any]:
    """What the report records about the model: its calibration hash, preset, ranges."""
    z = np.asarray(loc.z_um, dtype=float)
    info: dict[str, Any] = {
        "path": str(model_dir.resolve()),
        "pixel_size_um": float(loc.pixel_size_um),
        "z_range_um": [float(z[0]), float(z[-1])],
        "z_step_um": float(np.median(np.diff(z))) if len(z) > 1 else None,
        "n_z_bins": len(z),
    }
    cal = getattr(loc, "calibration", None)
    if cal is not None:
        info["calibration_sha256"] = cal.sha256
        info["calibration_source"] = getattr(cal, "source", None)
    meta = getattr(loc, "meta", None)
    if isinstance(meta, dict):
        info["bundle_created_utc"] = meta.get("created_utc")
        training = meta.get("training")
        if isinstance(training, dict):
            info["preset"] = training.get("preset")
            info["training"] = {k: v for k, v in training.items() if _scalar(v)}
        for key in ("decode", "validation"):
            if isinstance(meta.get(key), dict):
                info[key] = {k: v for k, v in meta[key].items() if _scalar(v)}
    dec = getattr(loc, "decode", None)
    if dec is not None and hasattr(dec, "__dataclass_fields__"):  # as applied (--passes)
        info["decode"] = {k: getattr(dec, k) for k in dec.__dataclass_fields__}
    return info


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (str, int, float, bool))

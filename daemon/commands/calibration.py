"""``focaltrack calibration show CAL.h5 [--png CAL.png]``: look at a calibration.

Prints a short text summary (slices, z grid, bead, noise model, photometry, drift) and
writes a PNG a microscopist checks at a glance (see `focaltrack.calibration.figure`).
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("calibration", help="inspect a calibration file")
    verbs = p.add_subparsers(dest="calibration_command", metavar="SUBCOMMAND", required=True)
    show = verbs.add_parser(
        "show",
        help="print a summary and draw a figure of a calibration",
        description="Print a summary of a calibration file and draw its figure (PNG): XZ/YZ "
        "sections, slices at several depths, intensity vs z, the noise model.",
    )
    show.add_argument("calibration", type=Path, help="calibration file (.h5)")
    show.add_argument(
        "--png", type=Path, default=None, help="figure to write (default: beside the file, .png)"
    )
    show.add_argument("--dpi", type=int, default=110, help="figure resolution (default 110)")
    show.set_defaults(func=run_show)


def run_show(args: argparse.Namespace) -> int:
    from focaltrack.calibration import Calibration, summary
    from focaltrack.calibration.figure import render_figure

    png: Path = args.png if args.png is not None else args.calibration.with_suffix(".png")
    if not png.parent.is_dir():
        raise ValueError(f"output directory {png.parent} does not exist (for --png {png})")
    cal = Calibration.load(args.calibration)
    print(f"calibration: {args.calibration}")
    print(summary(cal))
    render_figure(cal, png, dpi=int(args.dpi))
    print(f"figure:      {png}")
    return 0

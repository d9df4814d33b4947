"""``focaltrack recording repair FILE [FILE...]``: make recordings left open by a crash open
everywhere.

The service repairs the recordings in its workspace when it starts; this is for files copied
elsewhere (or a workspace whose service will not start again soon). See
`focaltrack.daemon.repair` for what is changed and what is refused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("recording", help="look after recordings (repair after a crash)")
    verbs = p.add_subparsers(dest="recording_command", metavar="SUBCOMMAND", required=True)
    repair = verbs.add_parser(
        "repair",
        help="clear the 'open for writing' mark a crash left in recordings",
        description="Make recordings that a crash left open (kill -9, a power cut) open in "
        "every program: clear HDF5's 'open for writing' mark as h5clear -s does, keep the "
        "frames that reached the disk and mark the recording incomplete (complete = false, "
        "n_frames = the frames recovered). A file that opens as it is is left untouched; a "
        "file still being written, or anything but a focaltrack recording, is refused.",
    )
    repair.add_argument("files", nargs="+", type=Path, metavar="FILE", help="recording (.h5)")
    repair.set_defaults(func=run_repair)


def run_repair(args: argparse.Namespace) -> int:
    """Each file in turn; one line each. Exit 2 when any was refused (the others are still
    repaired)."""
    from focaltrack.daemon.repair import RepairError, repair_recording

    failed = False
    for path in args.files:
        try:
            r = repair_recording(path)
        except (RepairError, OSError) as e:
            print(f"focaltrack recording repair: error: {e}", file=sys.stderr)
            failed = True
            continue
        if r is None:
            print(f"{path}: nothing to repair (it opens as it is)")
        else:
            print(f"{path}: repaired: {r.frames} frames recovered, marked incomplete")
    return 2 if failed else 0

"""`focaltrack` command line.

Each verb lives in its own module under ``focaltrack.daemon.commands`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` to a callable taking the
parsed namespace and returning an exit code. Verbs are discovered, so adding one is adding
a module.

Errors a user can act on (every ``FocaltrackError``: bad files, bad values, hardware faults;
and the OS's file errors) are printed as one line naming the problem, exit status 2;
``--debug`` shows the traceback instead. An error that says how to give a value the Python
way (Micro-Manager's missing pixel size) names the verb's option instead.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from collections.abc import Sequence

from focaltrack.common.errors import FocaltrackError
from focaltrack.daemon import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="focaltrack",
        description="Real-time 3D localization and tracking on a wide-field microscope.",
    )
    parser.add_argument("--version", action="version", version=f"focaltrack {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    from focaltrack.daemon import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2) if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("focaltrack: interrupted", file=sys.stderr)
        return 130
    except (FocaltrackError, ValueError, OSError) as e:
        if args.debug:
            raise
        print(
            f"focaltrack {args.command}: error: {_for_the_command_line(e, args)}", file=sys.stderr
        )
        return 2


def _for_the_command_line(e: BaseException, args: argparse.Namespace) -> BaseException:
    """``e``, its remedy put in the verb's terms where the verb has the option for it."""
    from focaltrack.drivers.micromanager import NoPixelSizeError

    if isinstance(e, NoPixelSizeError) and hasattr(args, "pixel_size"):
        return e.with_remedy("pass --pixel-size UM (camera pixel / magnification, in µm)")
    return e


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

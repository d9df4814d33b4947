"""``focaltrack status``: ask a running service how it is doing.

    focaltrack status                       # the service of the configured workspace
    focaltrack status --workspace out/demo/workspace
    focaltrack status --config focaltrack.toml
    focaltrack status --control tcp://lab-pc:5560 --curve-server-key server.key \\
        --curve-client-key me.key_secret
    focaltrack status --json

The service is found as `focaltrack.daemon.client.connection_from_args` says: ``--control``,
else the workspace's ``run/endpoints.json`` (written by the running service), else the
configured port. Exit status 0 when the service answered; 2 when it said no, did not answer,
or is not running.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from focaltrack.common.files import fmt

#: Shown first, in this order; everything else follows alphabetically.
_ORDER = (
    "state",
    "uptime_s",
    "driver",
    "calibration",
    "model",
    "recording",
    "frames_acquired",
    "frames_analysed",
    "frames_dropped",
    "endpoints",
    "jobs",
)


def add_connection_args(parser: argparse.ArgumentParser, *, pub: bool) -> None:
    """``--control``/``--pub`` endpoints, ``--workspace`` or ``--config`` to find them, CURVE
    key files."""
    g = parser.add_argument_group("connection")
    g.add_argument(
        "--control",
        metavar="ENDPOINT",
        help="control endpoint, e.g. tcp://127.0.0.1:5560 (default: the one the workspace's "
        "run/endpoints.json names, else the configured port)",
    )
    if pub:
        g.add_argument(
            "--pub",
            metavar="ENDPOINT",
            help="publish endpoint, e.g. tcp://127.0.0.1:5561 (default: as for --control)",
        )
    g.add_argument(
        "--workspace",
        metavar="DIR",
        help="the service's workspace, whose run/endpoints.json says where it listens "
        "(default: the configured workspace)",
    )
    g.add_argument("--config", metavar="FILE", help="the service's TOML file, to find its ports")
    g.add_argument(
        "--curve-server-key",
        metavar="FILE",
        help="the service's CURVE public key file (when it binds beyond loopback)",
    )
    g.add_argument("--curve-client-key", metavar="FILE", help="this client's CURVE secret key file")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "status",
        help="show a running service's state, model, counters and endpoints",
        description="Ask a running `focaltrack serve` for its status over the control socket.",
    )
    add_connection_args(p, pub=False)
    p.add_argument("--timeout", type=float, default=3.0, metavar="S", help="reply timeout, s")
    p.add_argument("--json", action="store_true", help="print the raw result as JSON")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from focaltrack.daemon.client import ControlClient, ControlError, connection_from_args

    if not args.timeout > 0:
        raise ValueError(f"--timeout must be > 0, got {args.timeout}")
    ep, curve = connection_from_args(args, need="control")
    try:
        with ControlClient(ep, timeout_s=args.timeout, retries=2, curve=curve) as client:
            result = client.call("status")
    except ControlError as e:
        print(f"focaltrack status: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(f"service at {ep}")
        print(format_status(result))
    return 0


def _fmt(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(", ", ": "))
    return fmt(value, ".6g", missing="-")


def format_status(result: Any) -> str:
    """Human-readable lines for a status result (any keys; known ones first)."""
    if not isinstance(result, dict):
        return _fmt(result)
    keys = [k for k in _ORDER if k in result]
    keys += sorted(k for k in result if k not in _ORDER)
    width = max((len(k) for k in keys), default=0)
    lines = []
    for k in keys:
        v = result[k]
        if k == "uptime_s" and isinstance(v, int | float):
            lines.append(f"  {k:<{width}}  {_duration(float(v))}")
        elif k == "jobs" and isinstance(v, list):
            lines.append(f"  {k:<{width}}  {len(v) or 'none'}")
            for job in v:
                if isinstance(job, dict):
                    pct = job.get("progress")
                    pct_s = f"{100 * pct:.0f}%" if isinstance(pct, int | float) else "?"
                    lines.append(
                        f"      {job.get('id')} {job.get('kind')} "
                        f"{job.get('state')} {pct_s} {job.get('message') or ''}".rstrip()
                    )
                else:
                    lines.append(f"      {_fmt(job)}")
        elif isinstance(v, dict) and v and all(not isinstance(x, dict | list) for x in v.values()):
            lines.append(f"  {k}")
            sub_w = max(len(s) for s in v)
            for s, x in v.items():
                lines.append(f"      {s:<{sub_w}}  {_fmt(x)}")
        else:
            lines.append(f"  {k:<{width}}  {_fmt(v)}")
    return "\n".join(lines)


def _duration(s: float) -> str:
    if s < 120:
        return f"{s:.1f} s"
    m, sec = divmod(int(s), 60)
    h, m = divmod(m, 60)
    d, h = divmod(h, 24)
    return (f"{d}d " if d else "") + f"{h:02d}:{m:02d}:{sec:02d}"

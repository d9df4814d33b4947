"""``focaltrack ctl CMD [key=value ...]``: send one control command to a running service.

    focaltrack ctl calibrate averages=8 z_step_um=1
    focaltrack ctl train preset=quick --wait
    focaltrack ctl start
    focaltrack ctl move_z z_um=12.5
    focaltrack ctl load_model name='"20261121"'   # a name that looks like a number: quote it
    focaltrack ctl --list                          # every command and its arguments

Each value is read as JSON when it parses (``5``, ``2.5``, ``true``, ``null``, ``"text"``)
and as a plain string otherwise. The result is printed as JSON. ``--wait`` follows a job
(``calibrate``, ``train``) until it ends, printing its progress to stderr.

The service is found as for ``focaltrack status``: ``--control``, else the workspace's
``run/endpoints.json``, else the configured port.

Exit status: 0 done; 1 the job failed or was cancelled (``--wait``); 2 an error: the service
said no (its error code and message are printed), bad arguments here, no reply, or no
service running.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from focaltrack.daemon.commands.status import add_connection_args


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "ctl",
        help="send a control command to a running service (focaltrack ctl --list)",
        description="Send one control command to a running `focaltrack serve` and print "
        "the result as JSON. Arguments are key=value; values are JSON when they parse, "
        "else strings.",
    )
    p.add_argument("cmd", nargs="?", metavar="CMD", help="command (see --list)")
    p.add_argument("params", nargs="*", metavar="KEY=VALUE", help="command arguments")
    add_connection_args(p, pub=False)
    p.add_argument("--timeout", type=float, default=10.0, metavar="S", help="reply timeout, s")
    p.add_argument("--list", action="store_true", help="list the commands and their arguments")
    p.add_argument("--wait", action="store_true", help="follow a job until it finishes")
    p.add_argument(
        "--poll", type=float, default=0.5, metavar="S", help="job polling interval for --wait"
    )
    p.set_defaults(func=run)


def parse_params(params: list[str]) -> dict[str, Any]:
    """``["a=1", "b=x"]`` -> ``{"a": 1, "b": "x"}`` (JSON when it parses, else the string)."""
    out: dict[str, Any] = {}
    for item in params:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"argument {item!r} is not key=value")
        if key in out:
            raise ValueError(f"argument {key!r} given twice")
        try:
            out[key] = json.loads(text)
        except ValueError:
            out[key] = text
    return out


def command_list() -> str:
    from focaltrack.daemon.protocol import COMMANDS, REQUIRED

    lines = []
    for c in COMMANDS.values():
        lines.append(f"{c.name:<13} {c.help}{' [job]' if c.is_job else ''}")
        for a in c.args:
            if a.default is REQUIRED:
                d = "required"
            elif a.default is None:
                d = "optional"
            else:
                d = f"default {json.dumps(a.default)}"
            rng = []
            if a.choices:
                rng.append("|".join(a.choices))
            if a.minimum is not None:
                rng.append(f"≥ {_num(a.minimum)}")
            if a.exclusive_minimum is not None:
                rng.append(f"> {_num(a.exclusive_minimum)}")
            if a.maximum is not None:
                rng.append(f"≤ {_num(a.maximum)}")
            extra = f"; {', '.join(rng)}" if rng else ""
            lines.append(f"    {a.name}: {a.type.value}, {d}{extra} — {a.help}")
        lines.append(f"    -> {c.result}")
    return "\n".join(lines)


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e12 else f"{v:g}"


def run(args: argparse.Namespace) -> int:
    if args.list:
        print(command_list())
        return 0
    if not args.cmd:
        raise ValueError("name a command (focaltrack ctl --list shows them)")
    for name in ("timeout", "poll"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name} must be > 0, got {getattr(args, name)}")
    params = parse_params(args.params)
    from focaltrack.daemon.client import ControlClient, ControlError, connection_from_args
    from focaltrack.daemon.protocol import COMMANDS, JobState

    if args.wait and args.cmd in COMMANDS and not COMMANDS[args.cmd].is_job:
        raise ValueError(f"--wait is for jobs (calibrate, train), not {args.cmd!r}")
    ep, curve = connection_from_args(args, need="control")
    with ControlClient(ep, timeout_s=args.timeout, curve=curve) as client:
        try:
            result = client.call(args.cmd, **params)
        except ControlError as e:
            print(f"focaltrack ctl {args.cmd}: {e}", file=sys.stderr)
            return 2
        print(json.dumps(result, indent=2, sort_keys=True))
        if not args.wait:
            return 0
        job_id = result.get("job") if isinstance(result, dict) else None
        if not isinstance(job_id, str):
            raise ValueError(f"--wait: the reply holds no job id: {result!r}")
        last = None
        while True:
            try:
                job = client.call("job", id=job_id)
            except ControlError as e:
                print(f"focaltrack ctl job {job_id}: {e}", file=sys.stderr)
                return 2
            line = (
                f"{job.get('id')} {job.get('kind')} {job.get('state')} "
                f"{100 * float(job.get('progress') or 0):.0f}% {job.get('message') or ''}"
            ).rstrip()
            if line != last:
                print(line, file=sys.stderr)
                last = line
            if JobState(job.get("state")).finished:
                print(json.dumps(job, indent=2, sort_keys=True))
                return 0 if job.get("state") == JobState.DONE.value else 1
            time.sleep(args.poll)

"""``focaltrack watch [TOPIC ...]``: print what a running service publishes.

    focaltrack watch                  # every topic: loc, track, event, hb
    focaltrack watch event hb         # state changes, jobs, errors and the heartbeat
    focaltrack watch track --newest   # keep up: show only the newest message when behind
    focaltrack watch loc --json -n 100 > loc.jsonl

One line per message; ``--json`` prints each header as one JSON line (with the topic and,
when there is one, the binary payload's length as ``payload_bytes``). Lost messages (gaps in a
topic's sequence numbers) are reported as they are noticed. Ctrl-C ends it. The service is
found as for ``focaltrack status``: ``--pub``, else the workspace's ``run/endpoints.json``,
else the configured port.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from focaltrack.daemon.commands.status import add_connection_args

TOPICS = ("loc", "track", "event", "hb")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "watch",
        help="print the messages a running service publishes (loc, track, event, hb)",
        description="Subscribe to a running `focaltrack serve` and print what it publishes.",
    )
    p.add_argument(
        "topics", nargs="*", metavar="TOPIC", help=f"topics to show ({', '.join(TOPICS)}; all)"
    )
    add_connection_args(p, pub=True)
    p.add_argument("-n", "--count", type=int, metavar="N", help="stop after N messages")
    p.add_argument("--duration", type=float, metavar="S", help="stop after S seconds")
    p.add_argument(
        "--timeout",
        type=float,
        metavar="S",
        help="give up (exit 1) when nothing arrives for S seconds; the heartbeat comes ~1/s",
    )
    p.add_argument("--newest", action="store_true", help="when behind, skip to the newest")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    for t in args.topics:
        if t not in TOPICS:
            raise ValueError(f"unknown topic {t!r}; topics are {', '.join(TOPICS)}")
    for name in ("count", "duration", "timeout"):
        v = getattr(args, name)
        if v is not None and not v > 0:
            raise ValueError(f"--{name} must be > 0, got {v}")
    from focaltrack.daemon.client import Subscriber, connection_from_args

    ep, curve = connection_from_args(args, need="pub")
    end = None if args.duration is None else time.monotonic() + args.duration
    shown = 0
    reported_lost: dict[str, int] = {}
    with Subscriber(ep, topics=args.topics, conflate_newest=args.newest, curve=curve) as sub:
        if not args.json:
            print(f"watching {', '.join(args.topics or TOPICS)} at {ep}", file=sys.stderr)
        try:
            while args.count is None or shown < args.count:
                wait = args.timeout
                if end is not None:
                    left = end - time.monotonic()
                    if left <= 0:
                        break
                    wait = left if wait is None else min(wait, left)
                try:
                    topic, header, payload = sub.recv(timeout_s=wait)
                except TimeoutError:
                    if end is not None and time.monotonic() >= end:
                        break
                    print(
                        f"focaltrack watch: nothing from {ep} for {args.timeout:g} s "
                        "(is the service running?)",
                        file=sys.stderr,
                    )
                    return 1
                lost = sub.lost.get(topic, 0)
                if lost != reported_lost.get(topic, 0) and not args.json:
                    print(
                        f"-- {lost - reported_lost.get(topic, 0)} {topic} message(s) lost",
                        file=sys.stderr,
                    )
                    reported_lost[topic] = lost
                if args.json:
                    out = dict(header)
                    if payload is not None:
                        out["payload_bytes"] = len(payload)
                    print(json.dumps(out, separators=(",", ":")), flush=True)
                else:
                    print(format_message(topic, header, payload), flush=True)
                shown += 1
        except KeyboardInterrupt:
            pass
        if not args.json:
            lost_total = sum(sub.lost.values())
            skipped = sum(sub.discarded.values())
            print(
                f"{shown} message(s); {lost_total} lost; {skipped} skipped as not newest",
                file=sys.stderr,
            )
    return 0


def _f(v: Any, fmt: str = ".3g") -> str:
    return format(v, fmt) if isinstance(v, int | float) else "-"


def format_message(topic: str, h: dict[str, Any], payload: bytes | None) -> str:
    """One human-readable line for a message."""
    head = f"{topic:<5} #{h.get('seq', '?'):<6}"
    now = time.time()
    if topic in ("loc", "track"):
        lat = h.get("t_pub_s", 0) - h.get("t_acq_s", 0) if "t_acq_s" in h else None
        parts = [f"frame {h.get('frame')}", f"n {h.get('n')}"]
        if topic == "track":
            status = h.get("status") or []
            parts.append(f"confirmed {sum(1 for s in status if s == 'confirmed')}")
            parts.append(f"coasting {sum(1 for s in status if s == 'coasting')}")
        parts.append(f"z_stage {_f(h.get('stage_z_um'), '.2f')} µm")
        if lat is not None:
            parts.append(f"acq->pub {1000 * lat:.1f} ms")
        parts.append(f"age {1000 * (now - h.get('t_pub_s', now)):.0f} ms")
        text = "  ".join(parts)
    elif topic == "hb":
        text = (
            f"state {h.get('state')}  acquired {h.get('frames_acquired')}  analysed "
            f"{h.get('frames_analysed')}  dropped {h.get('frames_dropped')}  model "
            f"{h.get('model') or '-'}  up {_f(h.get('uptime_s'), '.0f')} s"
        )
    elif topic == "event":
        kind = h.get("kind")
        bits = [f"{kind}"]
        if "state" in h:
            bits.append(f"state={h['state']}")
        job = h.get("job")
        if isinstance(job, dict):
            pct = job.get("progress")
            bits.append(
                f"job {job.get('id')} {job.get('kind')} {job.get('state')} "
                f"{_f(100 * pct if isinstance(pct, int | float) else None, '.0f')}%"
            )
            if job.get("message"):
                bits.append(str(job["message"]))
            if job.get("result") is not None:
                bits.append(f"result={json.dumps(job['result'])}")
        err = h.get("error")
        if isinstance(err, dict):
            bits.append(f"error {err.get('code')}: {err.get('message')}")
        for key in ("model", "recording"):
            if isinstance(h.get(key), dict):
                bits.append(f"{key}={json.dumps(h[key])}")
        if h.get("message") and not isinstance(job, dict):
            bits.append(str(h["message"]))
        text = "  ".join(bits)
    else:
        text = json.dumps(h)
    if payload is not None:
        text += f"  (+{len(payload)} B payload)"
    return head + text

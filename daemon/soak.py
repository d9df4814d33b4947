"""``focaltrack bench --soak DURATION``: the live pipeline for minutes or hours at the camera's
rate, watched the way a lab's clients watch it.

The service runs in this process as for ``focaltrack bench`` (see
`focaltrack.daemon.commands.bench`), at one frame size, the camera at ``--fps``, with:

* a subscriber on its PUB socket draining ``loc``, ``track`` and ``hb``: the frame-to-publish
  latency (``t_pub_s − t_acq_s`` of every ``loc`` message) and the messages lost per topic;
* a control client on a thread of its own asking ``status`` once a second and timing each
  reply: the longest (and when), p50 / p99, and how many got no reply within
  `STATUS_TIMEOUT_S`;
* this process's resident memory (RSS: service, subscriber and poller together) sampled every
  few seconds.

**Warm-up.** The first 10 % of the run, at most 60 s (`warmup_s`), is left out: the first
frames build kernels for each new number of detections, allocator pools fill and the tracker
reaches its steady number of tracks. Drops, frame rates, latency and RSS growth are measured
after it; ``status`` is polled through the whole run, since a slow reply at any time is what a
client sees. RSS growth is the last post-warm-up sample minus the first, in MiB and %, and the
slope of a straight line fitted to the post-warm-up samples (MiB/min), over all of them and
over their last half: a leak keeps its slope in the last half, a one-off step early on
(allocator pools, caches) leaves the last half flat.

**Camera.** ``--camera replay`` (the default) streams frames of the simulated microscope's
moving scene, rendered beforehand, at exactly ``--fps``; ``--camera sim`` renders them live, at
whatever rate the simulator manages next to the analysis. The report gives the simulator's
render time per frame, which is what caps the live one: 10–21 ms at 256² with 20 emitters on
the 2-core development VM, so with the analysis on the same cores it streamed ~24 fps, not 100.

Nothing the soak keeps grows with the run: latencies and reply times go into fixed histograms,
RSS samples into arrays sized for the run beforehand, so its own bookkeeping does not show up
as a leak.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np

from focaltrack.common.files import clean
from focaltrack.daemon.commands.bench import (
    FLOW_UM_S,
    REPLAY_FRAMES,
    analysis_text,
    bench_service,
    device_text,
    sayer,
)
from focaltrack.sim.scene import render_flow_frames

__all__ = ["Histogram", "StatusPoller", "format_summary", "rss_reader", "run_soak", "slope"]

WARMUP_FRACTION = 0.1
WARMUP_MAX_S = 60.0
STATUS_PERIOD_S = 1.0
#: A ``status`` reply later than this counts as unanswered (the service answers it on its
#: control thread without touching the camera: milliseconds when healthy).
STATUS_TIMEOUT_S = 2.0
#: RSS every DURATION/50, within these bounds: a 10-minute soak gets a sample each 5 s.
RSS_MIN_INTERVAL_S = 0.5
RSS_MAX_INTERVAL_S = 5.0
#: The subscriber's receive queue: ~50 s of messages at 100 fps; a backlog beyond it is lost
#: (and counted) rather than held in this process's memory, which is being measured.
SUB_HWM = 10000
MIB = 1024.0 * 1024.0


# =========================================================================== pieces


class Histogram:
    """Durations counted in fixed 0.1-ms bins up to `SPAN_S` (longer ones in the last bin) and
    the exact maximum: percentiles to 0.1 ms in constant memory, however long the run."""

    BIN_S = 1e-4
    SPAN_S = 10.0

    def __init__(self) -> None:
        self.counts = np.zeros(round(self.SPAN_S / self.BIN_S) + 1, dtype=np.int64)
        self.n = 0
        self.max_s = 0.0

    def add(self, seconds: float) -> None:
        i = min(max(int(seconds / self.BIN_S), 0), len(self.counts) - 1)
        self.counts[i] += 1
        self.n += 1
        self.max_s = max(self.max_s, seconds)

    def percentile_ms(self, q: float) -> float | None:
        """The ``q``-th percentile (nearest rank) in ms: its bin's middle, at most the max;
        the max itself when it falls in the last bin (everything beyond `SPAN_S`)."""
        if self.n == 0:
            return None
        rank = max(1, math.ceil(q / 100.0 * self.n))
        i = int(np.searchsorted(np.cumsum(self.counts), rank))
        if i >= len(self.counts) - 1:
            return self.max_s * 1000.0
        # rounded to the µs, but never above the exact max (rounding could put it there)
        return min(round((i + 0.5) * self.BIN_S * 1000.0, 3), self.max_s * 1000.0)

    def max_ms(self) -> float | None:
        return self.max_s * 1000.0 if self.n else None


def rss_reader() -> tuple[Callable[[], int] | None, str]:
    """A function giving this process's resident set size in bytes, and what it reads:
    ``/proc/self/statm`` (Linux; the current RSS, one small read); else psutil where it is
    installed (macOS, Windows; not a dependency); else ``getrusage``'s ``ru_maxrss``, which is
    the *peak* RSS (growth of the peak still shows a leak); else none."""
    statm = Path("/proc/self/statm")
    page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def from_proc() -> int:
        return int(statm.read_text().split()[1]) * page

    try:
        from_proc()
    except (OSError, ValueError, IndexError):
        pass
    else:
        return from_proc, "/proc/self/statm"
    try:
        psutil = importlib.import_module("psutil")
    except ImportError:
        pass
    else:
        proc = psutil.Process()
        return (lambda: int(proc.memory_info().rss)), "psutil"
    try:
        resource = importlib.import_module("resource")
    except ImportError:
        return None, "none"
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere

    def peak() -> int:
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale

    return peak, "getrusage (peak RSS)"


def slope(t_s: np.ndarray, values: np.ndarray) -> float | None:
    """Slope of the least-squares line through (``t_s``, ``values``), per minute."""
    if len(t_s) < 2 or not np.ptp(t_s) > 0:
        return None
    return float(np.polyfit(np.asarray(t_s) / 60.0, np.asarray(values), 1)[0])


class StatusPoller:
    """Asks ``status`` every `STATUS_PERIOD_S` on a thread and a control socket of its own
    (ZeroMQ sockets belong to one thread), timing each round trip. After a reply slower than
    the period the next request goes at once, then the cadence resumes."""

    def __init__(self, endpoint: str, *, timeout_s: float = STATUS_TIMEOUT_S) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.replies = Histogram()
        self.asked = 0
        self.unanswered = 0
        self.errors = 0  # replies with ok false
        self.longest_at_s: float | None = None
        self.failure: BaseException | None = None
        self._t0 = 0.0
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="focaltrack-soak-status")

    def start(self, t0: float) -> None:
        self._t0 = t0
        self._thread.start()

    def stop(self) -> None:
        self._halt.set()
        if self._thread.is_alive():
            self._thread.join(self.timeout_s + 10.0)

    def _run(self) -> None:
        from focaltrack.daemon.client import ControlClient

        ctl = ControlClient(self.endpoint, timeout_s=self.timeout_s, retries=1)
        try:
            due = time.monotonic()
            while not self._halt.wait(max(0.0, due - time.monotonic())):
                self.asked += 1
                t = time.perf_counter()
                try:
                    reply = ctl.request("status", timeout_s=self.timeout_s, retries=1)
                except TimeoutError:
                    self.unanswered += 1
                else:
                    dt = time.perf_counter() - t
                    if reply.get("ok") is not True:
                        self.errors += 1
                    else:
                        if dt > self.replies.max_s:
                            self.longest_at_s = time.monotonic() - self._t0
                        self.replies.add(dt)
                due = max(due + STATUS_PERIOD_S, time.monotonic())
        except BaseException as e:  # reported by run_soak, which holds the thread's result
            self.failure = e
        finally:
            ctl.close()

    def summary(self) -> dict[str, Any]:
        return {
            "period_s": STATUS_PERIOD_S,
            "timeout_s": self.timeout_s,
            "asked": self.asked,
            "answered": self.replies.n,
            "unanswered": self.unanswered,
            "errors": self.errors,
            "longest_ms": self.replies.max_ms(),
            "longest_at_s": self.longest_at_s,
            "p50_ms": self.replies.percentile_ms(50),
            "p99_ms": self.replies.percentile_ms(99),
        }


# =========================================================================== the soak


def run_soak(
    model: Path,
    *,
    duration_s: float,
    size: int = 256,
    n_emitters: int = 20,
    fps: float = 100.0,
    camera: str = "replay",
    device: str = "",
    threads: int = 0,
    passes: int = 1,
    fit: str = "spline",
    stream: IO[str] = sys.stdout,
) -> dict[str, Any]:
    """Soak ``model`` live for ``duration_s`` (see the module doc); prints progress and a
    summary and returns the report."""
    from focaltrack.daemon.client import Subscriber
    from focaltrack.models.bundle import read_meta
    from focaltrack.sim.optics import SIM_ABERRATIONS, Optics
    from focaltrack.sim.psf import PSFModel

    meta = read_meta(model)
    optics = Optics(aberrations=SIM_ABERRATIONS)
    period_s = 1.0 / fps
    warmup_s = min(WARMUP_MAX_S, WARMUP_FRACTION * duration_s)
    rss_every_s = min(RSS_MAX_INTERVAL_S, max(RSS_MIN_INTERVAL_S, duration_s / 50.0))
    note_every_s = max(10.0, duration_s / 10.0)
    read_rss, rss_source = rss_reader()
    dev_text = device_text(device, threads)
    say = sayer(stream)
    say(
        f"focaltrack bench --soak — {duration_s:g} s live at {size}×{size}, {n_emitters} "
        f"emitters flowing at {FLOW_UM_S:g} µm/s, camera {fps:g} fps "
        f"({'replayed frames' if camera == 'replay' else 'live simulator'})"
    )
    say(f"  model {model} ({(meta.get('training') or {}).get('preset', '?')} preset)")
    say(f"  inference on {dev_text}, {analysis_text(passes, fit)}")
    say(
        f"  warm-up: the first {warmup_s:g} s (10 % of the run, at most {WARMUP_MAX_S:g} s) "
        f"left out; status asked every {STATUS_PERIOD_S:g} s; RSS ({rss_source}) every "
        f"{rss_every_s:g} s"
    )
    frames, render_s = render_flow_frames(
        size,
        n_emitters,
        REPLAY_FRAMES,
        period_s,
        psf_model=PSFModel.shared(optics),
        velocity_um_s=FLOW_UM_S,
    )
    # Rendered for the replay camera; with the live simulator only their render time is used,
    # which says what caps it.
    render_ms = float(np.median(render_s) * 1000.0)
    say(
        f"  the simulator renders a frame in {render_ms:.1f} ms "
        f"(≤ {1000.0 / max(render_ms, 1e-3):.0f} fps on a core of its own)"
    )

    latency = Histogram()
    n_rss = math.ceil(duration_s / rss_every_s) + 4
    rss_t = np.full(n_rss, np.nan)
    rss_b = np.full(n_rss, np.nan)
    k = 0

    def sample(t: float) -> None:
        nonlocal k
        if read_rss is not None and k < n_rss:
            rss_t[k], rss_b[k] = t, read_rss()
            k += 1

    with bench_service(
        model,
        frames,
        size,
        n_emitters=n_emitters,
        period_s=period_s,
        camera=camera,
        device=device,
        threads=threads,
        passes=passes,
        fit=fit,
        pixel_size_um=optics.pixel_size_um,
    ) as (ep, ctl):
        sub = Subscriber(ep["pub"], topics=("loc", "track", "hb"), rcvhwm=SUB_HWM)
        poller = StatusPoller(ep["control"])
        try:
            time.sleep(0.3)  # the subscription reaches the publisher
            ctl.call("start", interval_ms=period_s * 1000.0)
            t0 = time.monotonic()
            poller.start(t0)
            t_warm, t_end = t0 + warmup_s, t0 + duration_s
            ends = time.strftime("%H:%M:%S", time.localtime(time.time() + duration_s))
            say(f"  running until {ends}")
            next_rss, next_note = t0, t0 + note_every_s
            s0: dict[str, Any] | None = None
            received0: dict[str, int] = {}
            lost0: dict[str, int] = {}
            t_meas0 = t_warm
            while True:
                now = time.monotonic()
                if s0 is None and now >= t_warm:
                    s0 = ctl.call("status")
                    received0, lost0 = dict(sub.received), dict(sub.lost)
                    t_meas0 = time.monotonic()
                    sample(t_meas0 - t0)  # the baseline of the growth: the warm-up's end
                if now >= t_end:
                    break
                if now >= next_rss:
                    sample(now - t0)
                    # Ticks missed while busy are skipped, not made up in a burst.
                    next_rss += rss_every_s * (1 + (now - next_rss) // rss_every_s)
                if now >= next_note:
                    rss_now = f"{rss_b[k - 1] / MIB:.1f} MiB" if k else "-"
                    say(
                        f"  {now - t0:6.0f} s  RSS {rss_now}  loc received "
                        f"{sub.received.get('loc', 0)}  status longest "
                        f"{poller.replies.max_s * 1000.0:.1f} ms, unanswered {poller.unanswered}"
                    )
                    next_note += note_every_s
                wake = min(next_rss, next_note, t_end, t_warm if s0 is None else t_end)
                try:
                    topic, h, _ = sub.recv(timeout_s=max(wake - now, 0.001))
                except TimeoutError:
                    continue
                if topic == "loc" and s0 is not None:
                    latency.add(float(h["t_pub_s"]) - float(h["t_acq_s"]))
            s1 = ctl.call("status")
            measured_s = time.monotonic() - t_meas0
            sample(time.monotonic() - t0)
            poller.stop()
            ctl.call("stop")
        finally:
            poller.stop()
            sub.close()
    if poller.failure is not None:
        raise poller.failure
    assert s0 is not None  # taken before the loop can end: t_warm < t_end
    report = {
        "kind": "focaltrack.bench.soak",
        "schema_version": 1,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": str(model),
        "device": dev_text,
        "localizer_passes": passes,
        "localizer_fit": fit,
        "camera": camera,
        "size_px": size,
        "emitters": n_emitters,
        "fps_asked": fps,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "measured_s": measured_s,
        "render_ms": render_ms,
        "cpu_count": os.cpu_count(),
        "frames": _frames(s0, s1, measured_s),
        "latency_ms": {
            "count": latency.n,
            "p50": latency.percentile_ms(50),
            "p99": latency.percentile_ms(99),
            "max": latency.max_ms(),
        },
        "subscriber": {
            "received": _delta(sub.received, received0),
            "lost": _delta(sub.lost, lost0),
            "malformed": sub.malformed,
        },
        "status": poller.summary(),
        "rss": _rss_summary(rss_t[:k], rss_b[:k], warmup_s, rss_source, rss_every_s),
    }
    report = clean(report)
    say("")
    for line in format_summary(report):
        say(line)
    return report


def _delta(now: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {t: n - before.get(t, 0) for t, n in sorted(now.items())}


def _frames(s0: dict[str, Any], s1: dict[str, Any], measured_s: float) -> dict[str, Any]:
    acquired = int(s1["frames_acquired"]) - int(s0["frames_acquired"])
    analysed = int(s1["frames_analysed"]) - int(s0["frames_analysed"])
    d0 = s0.get("frames_dropped_by_reason") or {}
    d1 = s1.get("frames_dropped_by_reason") or {}
    return {
        "acquired": acquired,
        "analysed": analysed,
        "camera_fps": acquired / measured_s,
        "analysed_fps": analysed / measured_s,
        "dropped_by_reason": {r: int(n) - int(d0.get(r, 0)) for r, n in sorted(d1.items())},
    }


def _rss_summary(
    t_s: np.ndarray, rss_b: np.ndarray, warmup_s: float, source: str, every_s: float
) -> dict[str, Any]:
    mib = rss_b / MIB
    after = t_s >= warmup_s
    ta, ma = t_s[after], mib[after]
    out: dict[str, Any] = {
        "source": source,
        "interval_s": every_s,
        "samples": len(ma),
        "start_mib": float(mib[0]) if len(mib) else None,
        "after_warmup_mib": float(ma[0]) if len(ma) else None,
        "end_mib": float(ma[-1]) if len(ma) else None,
        "peak_mib": float(mib.max()) if len(mib) else None,
        "growth_mib": None,
        "growth_pct": None,
        "slope_mib_per_min": slope(ta, ma),
        "slope_last_half_mib_per_min": slope(ta[len(ta) // 2 :], ma[len(ma) // 2 :]),
        "series_s_mib": np.stack([t_s, mib], axis=1).round(3).tolist(),
    }
    if len(ma) >= 2:
        out["growth_mib"] = float(ma[-1] - ma[0])
        out["growth_pct"] = float(100.0 * (ma[-1] - ma[0]) / ma[0])
    return out


def format_summary(report: dict[str, Any]) -> list[str]:
    """The soak's report in a few lines."""

    def f(v: Any, spec: str = ".1f", unit: str = "") -> str:
        return "-" if v is None else f"{v:{spec}}{unit}"

    fr, lat, st = report["frames"], report["latency_ms"], report["status"]
    sub, rss = report["subscriber"], report["rss"]
    drops = ", ".join(f"{r} {n}" for r, n in fr["dropped_by_reason"].items()) or "none"
    received = ", ".join(f"{t} {n}" for t, n in sub["received"].items()) or "nothing"
    lost = sum(sub["lost"].values())
    lines = [
        f"soak result: {report['measured_s']:.0f} s after {report['warmup_s']:g} s of warm-up",
        f"  frames      acquired {fr['acquired']} ({fr['camera_fps']:.1f}/s), analysed "
        f"{fr['analysed']} ({fr['analysed_fps']:.1f}/s); dropped: {drops}",
        f"  latency     frame→publish p50 {f(lat['p50'])} / p99 {f(lat['p99'])} / max "
        f"{f(lat['max'])} ms over {lat['count']} loc messages",
        f"  subscriber  received {received}; lost {lost}"
        + (f" ({', '.join(f'{t} {n}' for t, n in sub['lost'].items() if n)})" if lost else ""),
        f"  status      {st['answered']} of {st['asked']} answered within {st['timeout_s']:g} s "
        f"(whole run), longest {f(st['longest_ms'])} ms at {f(st['longest_at_s'], '.0f')} s, "
        f"p99 {f(st['p99_ms'])} ms" + (f", {st['errors']} error replies" if st["errors"] else ""),
    ]
    if rss["samples"] >= 2:
        lines.append(
            f"  RSS         {f(rss['after_warmup_mib'])} → {f(rss['end_mib'])} MiB after warm-up: "
            f"{f(rss['growth_mib'], '+.1f')} MiB ({f(rss['growth_pct'], '+.1f')} %); slope "
            f"{f(rss['slope_mib_per_min'], '+.3f')} MiB/min (last half "
            f"{f(rss['slope_last_half_mib_per_min'], '+.3f')}); {rss['samples']} samples, "
            f"peak {f(rss['peak_mib'])} MiB, {f(rss['start_mib'])} MiB at start"
        )
    else:
        lines.append(f"  RSS         not measured ({rss['source']}, {rss['samples']} samples)")
    return lines

"""``focaltrack demo``: the whole product on the simulated microscope, in a few minutes.

    focaltrack demo [--out out/demo] [--duration-s 20] [--preset quick]

It starts the service in this process on the simulated microscope (emitters flowing at
75 µm/s with some Brownian motion, so the scene moves like seed 002's blood cells), then talks
to it only like an outside client, over its real ZeroMQ sockets on loopback:

1. ``calibrate`` (a job; its progress comes as ``event`` messages) — the simulator puts one
   still bead in front of the camera for it;
2. ``train`` the chosen preset (a job, in a separate process) and ``load_model`` the result;
3. ``start`` live analysis, subscribe to ``loc``, ``track`` and ``hb`` and print a live view
   once a second: frames/s, frame-to-publish latency p50/p99, emitters, tracks, drops;
4. ``stop``, and score what was **published** against the simulator's ground truth: the
   simulated camera keeps the true position of every emitter in every frame it rendered
   (`SimulatorHooks.frame_truths`), matched to the published messages by frame index. Jaccard and
   RMSE at seed 002's 10 µm tolerance and a tighter 2 µm one (as ``focaltrack evaluate``),
   for the localizations and for the confirmed tracks.

The live phase is recorded (``record_start`` / ``record_stop``, frames included) into the
workspace's ``recordings/``. Into ``--out`` it writes ``calibration.png`` (the calibration at
a glance), ``recording.png`` (what was localized and tracked: ``focaltrack show`` of that
recording, with the service's counters), ``summary.json`` (settings, timings, rates,
latencies, accuracy) and ``workspace/`` (the service workspace: calibration, model,
``state.json``, the recording), so that afterwards
``focaltrack serve --driver sim --workspace out/demo/workspace`` starts with that calibration
and model loaded (for ``deploy/examples/focus_lock.py``, say).

Frame size: 256 × 256 by default. On the 2-core CPU this was built on, the simulator needs
~50 ms to render one 256² frame with 20 emitters (~110 ms at 512²) and the CNNs, ~100 ms a
frame, share the same two cores, so a bigger frame only makes the live view slower without
showing more; with a GPU, try ``--size 512``. The camera runs at ``--interval-ms`` (default
100 ms, 10 fps), about what this CPU can render and analyse together; when the analysis falls
behind it works on the newest frame and counts the others as dropped, as the live view shows.
``focaltrack bench`` measures how fast the pipeline itself can go.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from focaltrack.common.errors import FocaltrackError
from focaltrack.common.files import clean, fmt, write_json_atomic
from focaltrack.common.progress import progress_bar
from focaltrack.drivers.base import CameraInfo, SimulatorHooks

# the scoring is models.metrics', the ground truth sim.frame_truth's (match_in_region is
# named here for the demo's tests)
from focaltrack.models.metrics import DEFAULT_TOLERANCES_UM, score_frames
from focaltrack.models.metrics import match_in_region as match_in_region
from focaltrack.sim.frame_truth import alignment_error_s, truth_by_frame, visible_truth

if TYPE_CHECKING:
    from focaltrack.daemon.client import ControlClient, Subscriber

log = logging.getLogger("focaltrack.demo")

#: Seed 002's matching radius and a tighter one (≈ the lateral resolution), as `evaluate`.
TOLERANCES_UM: tuple[float, ...] = DEFAULT_TOLERANCES_UM
#: Emitters (true or detected) closer than this to the frame edge are not scored: part of
#: their image is outside the frame.
EDGE_MARGIN_UM = 5.0
#: Flow speed of the demo scene (seed 002: blood cells at ≈ 75 µm/s).
FLOW_UM_S = 75.0
PRESETS = ("quick", "default")


class DemoError(FocaltrackError, RuntimeError):
    """A step of the demo failed (a job failed or was cancelled); the message says which."""


# =========================================================================== settings


@dataclass(frozen=True, slots=True)
class DemoSettings:
    out: Path
    duration_s: float = 20.0
    preset: str = "quick"
    size_px: int = 256
    n_emitters: int = 20
    interval_ms: float = 100.0
    exposure_ms: float = 10.0
    flow_um_s: float = FLOW_UM_S
    diffusion_um2_s: float = 1.0
    seed: int = 0
    #: An existing model bundle to use instead of training one.
    model: Path | None = None
    cal_z_step_um: float = 2.0
    cal_averages: int = 4
    #: Preset fields overridden in training (tests use a tiny run); not on the command line.
    train_overrides: Mapping[str, Any] | None = None
    job_timeout_s: float = 3600.0

    def check(self) -> None:
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError(f"--duration-s must be > 0, got {self.duration_s:g}")
        if self.preset not in PRESETS:
            raise ValueError(f"--preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if not 128 <= self.size_px <= 4096:
            raise ValueError(
                f"--size must be 128..4096 px (the calibration cuts a 128 px window), "
                f"got {self.size_px}"
            )
        if not 0 <= self.n_emitters <= 10000:
            raise ValueError(f"--emitters must be 0..10000, got {self.n_emitters}")
        if not (math.isfinite(self.interval_ms) and 0 <= self.interval_ms <= 60000):
            raise ValueError(f"--interval-ms must be 0..60000, got {self.interval_ms:g}")
        if self.model is not None:
            if not (self.model / "bundle.json").is_file():
                raise ValueError(f"--model {self.model} is not a model bundle (no bundle.json)")
        out = self.out
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} exists and is not a directory")
        parent = out if out.exists() else _existing_parent(out)
        if not os.access(parent, os.W_OK):
            raise ValueError(f"--out {out}: cannot write in {parent}")


def _xyz_um(header: Mapping[str, Any]) -> np.ndarray:
    """(N, 3) positions from a loc or track header's x_um, y_um, z_um columns."""
    cols = [np.asarray(header[k], dtype=np.float64) for k in ("x_um", "y_um", "z_um")]
    return np.stack(cols, axis=1).reshape(-1, 3)


def _existing_parent(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


# =========================================================================== CLI


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "demo",
        help="calibrate, train, track live and score it, all on the simulated microscope",
        description=(
            "Start the service on the simulated microscope with a moving scene, then, over "
            "its real sockets like any client: calibrate, train a model, go live, print a "
            "live view once a second, and score what was published against the simulator's "
            "ground truth (Jaccard, RMSE). Writes calibration.png, recording.png (the live "
            "phase's recording drawn), summary.json and the service workspace into --out. "
            "A few minutes on a laptop CPU."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder")
    p.add_argument("--duration-s", type=float, default=20.0, metavar="S", help="live analysis time")
    p.add_argument("--preset", choices=PRESETS, default="quick", help="training preset")
    p.add_argument(
        "--size", type=int, default=256, metavar="PX", help="camera frame side (default 256)"
    )
    p.add_argument("--emitters", type=int, default=20, help="emitters in the scene")
    p.add_argument(
        "--interval-ms",
        type=float,
        default=100.0,
        metavar="MS",
        help="camera frame interval while live (default 100 ms = 10 fps; 0 = as fast as "
        "the simulator renders)",
    )
    p.add_argument("--seed", type=int, default=0, help="scene and training seed")
    p.add_argument(
        "--model",
        type=Path,
        default=None,
        metavar="DIR",
        help="use this model bundle instead of training one (the calibration still runs)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = DemoSettings(
        out=args.out,
        duration_s=float(args.duration_s),
        preset=str(args.preset),
        size_px=int(args.size),
        n_emitters=int(args.emitters),
        interval_ms=float(args.interval_ms),
        seed=int(args.seed),
        model=args.model,
    )
    settings.check()
    if not getattr(args, "verbose", 0):
        # The service logs every state change at INFO; the demo prints its own account.
        logging.getLogger("focaltrack").setLevel(logging.WARNING)
    from focaltrack.daemon.client import ControlError

    try:
        with _sigterm_as_interrupt():  # `kill` stops the service (and training) cleanly too
            run_demo(settings, stream=sys.stdout)
    except (ControlError, DemoError, TimeoutError) as e:
        print(f"focaltrack demo: {e}", file=sys.stderr)
        return 1
    return 0


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# =========================================================================== scoring


def scoring_region(
    shape_px: tuple[int, int], pixel_size_um: float, margin_um: float = EDGE_MARGIN_UM
) -> tuple[float, float, float, float]:
    h, w = shape_px
    return (
        margin_um,
        (w - 1) * pixel_size_um - margin_um,
        margin_um,
        (h - 1) * pixel_size_um - margin_um,
    )


# =========================================================================== live view


def percentile_ms(values_s: Sequence[float], q: float) -> float | None:
    if not values_s:
        return None
    return float(np.percentile(np.asarray(values_s, dtype=np.float64), q) * 1000.0)


@dataclass
class LiveStats:
    """What the subscriber saw: per-frame published results and a running live view."""

    t0: float = field(default_factory=time.monotonic)
    loc_xyz: dict[int, np.ndarray] = field(default_factory=dict)
    track_xyz: dict[int, np.ndarray] = field(default_factory=dict)
    t_acq_s: dict[int, float] = field(default_factory=dict)
    latency_s: list[float] = field(default_factory=list)
    inference_s: list[float] = field(default_factory=list)
    n_locs: list[int] = field(default_factory=list)
    n_confirmed: list[int] = field(default_factory=list)
    seq_gaps: dict[str, int] = field(default_factory=dict)
    hb: dict[str, Any] = field(default_factory=dict)
    hb_first: dict[str, Any] | None = None
    hb_t: float = 0.0
    hb_first_t: float = 0.0
    # the current one-second window
    _win_latency: list[float] = field(default_factory=list)
    _win_frames: int = 0
    _win_t0: float = field(default_factory=time.monotonic)
    _last_seq: dict[str, int] = field(default_factory=dict)
    last_locs: int = 0
    last_tracks: int = 0
    last_frame: int | None = None

    def add(self, topic: str, header: Mapping[str, Any], now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        seq = int(header.get("seq", -1))
        last = self._last_seq.get(topic)
        if last is not None and seq > last + 1:
            self.seq_gaps[topic] = self.seq_gaps.get(topic, 0) + seq - last - 1
        self._last_seq[topic] = seq
        if topic == "loc":
            frame = int(header["frame"])
            xyz = _xyz_um(header)
            self.loc_xyz[frame] = xyz[np.all(np.isfinite(xyz), axis=1)]
            self.t_acq_s[frame] = float(header["t_acq_s"])
            lat = float(header["t_pub_s"]) - float(header["t_acq_s"])
            self.latency_s.append(lat)
            self._win_latency.append(lat)
            if header.get("inference_s") is not None:
                self.inference_s.append(float(header["inference_s"]))
            self.n_locs.append(int(header["n"]))
            self.last_locs = int(header["n"])
            self.last_frame = frame
            self._win_frames += 1
        elif topic == "track":
            frame = int(header["frame"])
            status = header.get("status") or []
            conf = np.array([s == "confirmed" for s in status], dtype=bool)
            xyz = _xyz_um(header)
            xyz = xyz[conf] if len(conf) == len(xyz) else xyz[:0]
            self.track_xyz[frame] = xyz[np.all(np.isfinite(xyz), axis=1)]
            self.n_confirmed.append(len(xyz))
            self.last_tracks = len(xyz)
        elif topic == "hb":
            if self.hb_first is None:
                self.hb_first = dict(header)
                self.hb_first_t = now
            self.hb = dict(header)
            self.hb_t = now

    def window_line(self, now: float, truth_in_view: int | None = None) -> str:
        """One line of the live view, for the window since the previous line."""
        dt = max(now - self._win_t0, 1e-9)
        fps = self._win_frames / dt
        p50 = percentile_ms(self._win_latency, 50)
        p99 = percentile_ms(self._win_latency, 99)
        lat = "   -   /   -  " if p50 is None else f"{p50:6.1f} / {p99:6.1f}"
        truth = "" if truth_in_view is None else f" (true {truth_in_view:3d})"
        hb = self.hb
        line = (
            f"{now - self.t0:5.1f} s  {fps:5.1f} frames/s  latency p50/p99 {lat} ms  "
            f"emitters {self.last_locs:3d}{truth}  tracks {self.last_tracks:3d}  "
            f"dropped {int(hb.get('frames_dropped', 0)):5d}"
        )
        self._win_latency = []
        self._win_frames = 0
        self._win_t0 = now
        return line

    def summary(self, duration_s: float) -> dict[str, Any]:
        n = len(self.latency_s)
        hb0, hb1 = self.hb_first or {}, self.hb
        span = self.hb_t - self.hb_first_t
        acquired = int(hb1.get("frames_acquired", 0)) - int(hb0.get("frames_acquired", 0))
        return {
            "frames_published": n,
            "analysed_fps": n / duration_s if duration_s > 0 else None,
            "camera_fps": acquired / span if span > 0 else None,
            "latency_ms": {
                "p50": percentile_ms(self.latency_s, 50),
                "p90": percentile_ms(self.latency_s, 90),
                "p99": percentile_ms(self.latency_s, 99),
                "max": percentile_ms(self.latency_s, 100),
            },
            "inference_ms": {
                "p50": percentile_ms(self.inference_s, 50),
                "p99": percentile_ms(self.inference_s, 99),
            },
            "localizations_per_frame": float(np.mean(self.n_locs)) if self.n_locs else None,
            "confirmed_tracks_per_frame": (
                float(np.mean(self.n_confirmed)) if self.n_confirmed else None
            ),
            "messages_lost_by_topic": dict(self.seq_gaps),
        }


# =========================================================================== jobs


#: A job's bar: label, bar, percent, time since the job started, the job's message.
JOB_BAR = "{desc} [{bar:24}] {percentage:5.1f} %  {elapsed}{postfix}"


def wait_job(
    ctl: ControlClient,
    events: Subscriber,
    job_id: str,
    label: str,
    stream: IO[str],
    *,
    timeout_s: float,
) -> dict[str, Any]:
    """Follow a job through its ``event`` messages (polling ``job`` as a fallback) until it
    finishes; returns the final job object. Raises `DemoError` if it failed."""
    # a tqdm bar on a terminal; in a log, a line per 10 % or every 15 s
    bar = progress_bar(1.0, f"  {label:<10}", stream=stream, bar_format=JOB_BAR)
    deadline = time.monotonic() + timeout_s
    next_poll = time.monotonic() + 2.0
    job: dict[str, Any] = {"state": "queued", "progress": 0.0, "message": ""}
    while True:
        now = time.monotonic()
        if now > deadline:
            raise TimeoutError(f"{label} did not finish within {timeout_s:g} s")
        try:
            topic, header, _ = events.recv(timeout_s=0.5)
        except TimeoutError:
            topic, header = "", {}
        if topic == "event" and header.get("kind") == "job":
            j = header.get("job") or {}
            if j.get("id") == job_id:
                job = j
                next_poll = time.monotonic() + 2.0
        if time.monotonic() >= next_poll:  # events can be lost (slow joiner, HWM): ask
            job = ctl.call("job", id=job_id)
            next_poll = time.monotonic() + 2.0
        state = str(job.get("state"))
        done = state in ("done", "failed", "cancelled")
        bar.set_postfix_str(str(job.get("message") or ""), refresh=False)
        bar.update(min(max(float(job.get("progress") or 0.0), 0.0), 1.0) - bar.n)
        if done:
            bar.close()
            if state != "done":
                raise DemoError(f"{label} {state}: {job.get('message')}")
            return job


# =========================================================================== the demo


def _say(stream: IO[str], text: str = "") -> None:
    stream.write(text + "\n")
    stream.flush()


def demo_config(s: DemoSettings, workspace: Path) -> Any:
    """The service configuration of the demo: simulator, moving scene, loopback, free ports.

    The environment is ignored on purpose (a ``FOCALTRACK_*`` variable meant for a real
    service must not change the demo), and ports are 0 so a running service is no obstacle.
    """
    from focaltrack.daemon.config import load_config

    return load_config(
        None,
        env={},
        overrides={
            "driver.kind": "sim",
            "driver.exposure_ms": s.exposure_ms,
            "driver.interval_ms": s.interval_ms,
            "sim.width": s.size_px,
            "sim.height": s.size_px,
            "sim.n_emitters": s.n_emitters,
            "sim.motion": "flow",
            "sim.velocity_um_s": (s.flow_um_s, 0.0, 0.0),
            "sim.diffusion_um2_s": s.diffusion_um2_s,
            "sim.seed": s.seed,
            "network.bind": "127.0.0.1",
            "network.control_port": 0,
            "network.pub_port": 0,
            "network.metrics_port": 0,
            "workspace.dir": str(workspace),
            "train.preset": s.preset,
            "train.seed": s.seed,
            # the camera-rate configuration on a CPU (`localize --passes 1 --fit none`
            # offline): the networks alone, no fit (the model's default fits every
            # localization and runs a residual pass: a few frames/s on 2 cores)
            "analysis.passes": 1,
            "analysis.fit": "none",
        },
    )


def _import_model(src: Path, workspace: Path) -> str:
    """Copy a bundle into the workspace's models folder (checked, atomically) unless an
    earlier run did; returns its name."""
    from focaltrack.daemon.commands.models import import_model
    from focaltrack.daemon.workspace import Workspace

    name = f"imported-{src.resolve().name}"[:128]
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)
    ws = Workspace(workspace)
    if not ws.model_path(name).exists():
        import_model(src, ws, name, force=False)
    return name


def run_demo(s: DemoSettings, *, stream: IO[str] = sys.stdout) -> dict[str, Any]:
    """Run the demo; returns the summary (also written to ``out/summary.json``)."""
    from focaltrack.daemon.client import ControlClient, Subscriber
    from focaltrack.daemon.microscope import open_service_driver
    from focaltrack.daemon.service import Service

    s.check()
    out = s.out
    out.mkdir(parents=True, exist_ok=True)
    workspace = out / "workspace"
    timings: dict[str, float] = {}
    t_all = time.monotonic()
    fps = 1000.0 / max(s.interval_ms, s.exposure_ms)
    _say(stream, "focaltrack demo — the simulated microscope, end to end")
    _say(
        stream,
        f"  scene: {s.n_emitters} emitters flowing at {s.flow_um_s:g} µm/s along x, "
        f"Brownian D = {s.diffusion_um2_s:g} µm²/s, defocus 0–100 µm; camera "
        f"{s.size_px}×{s.size_px} px, up to {fps:g} fps",
    )
    cfg = demo_config(s, workspace)
    model_name = _import_model(s.model, workspace) if s.model is not None else None

    t = time.monotonic()
    driver = open_service_driver(cfg)  # ours, so the simulator's ground truth is at hand
    if not isinstance(driver, SimulatorHooks):  # demo_config always asks for the simulator
        driver.close()
        raise FocaltrackError(f"the demo needs the simulated microscope, got {type(driver)}")
    cam_info = driver.describe()
    svc = Service(cfg, driver=driver, train_overrides=s.train_overrides)
    svc.start()
    timings["service_start_s"] = time.monotonic() - t
    ep = svc.endpoints
    _say(stream, f"  service: control {ep['control']}, pub {ep['pub']}, metrics {ep['metrics']}")
    # Generous: load_model imports torch and builds the networks, slow on a busy CPU.
    ctl = ControlClient(ep["control"], timeout_s=60.0, retries=1)
    events = Subscriber(ep["pub"], topics=("event",))
    live: Subscriber | None = None
    try:
        camera = ctl.call("status")["driver"]
        px = float(camera["pixel_size_um"])
        shape = (int(camera["height"]), int(camera["width"]))

        # ------------------------------------------------------------- 1. calibrate
        _say(stream)
        _say(
            stream,
            f"1. calibrate: a bead focal stack, focus 0 → +100 µm in {s.cal_z_step_um:g} µm "
            f"steps, {s.cal_averages} frames each",
        )
        t = time.monotonic()
        job_id = ctl.call("calibrate", z_step_um=s.cal_z_step_um, averages=s.cal_averages)["job"]
        job = wait_job(ctl, events, job_id, "calibrate", stream, timeout_s=s.job_timeout_s)
        timings["calibrate_s"] = time.monotonic() - t
        cal_info = job.get("result") or {}
        cal_png = out / "calibration.png"
        _calibration_figure(Path(cal_info["path"]), cal_png)
        _say(
            stream,
            f"   calibration {cal_info.get('calibration')}: {cal_info.get('n_slices')} slices, "
            f"{px:.3g} µm/px; figure {cal_png}",
        )

        # ------------------------------------------------------------- 2. train + load
        _say(stream)
        if model_name is None:
            _say(stream, f"2. train the {s.preset!r} preset from it (a separate process)")
            t = time.monotonic()
            job_id = ctl.call("train", preset=s.preset, seed=s.seed, load=False)["job"]
            job = wait_job(ctl, events, job_id, "train", stream, timeout_s=s.job_timeout_s)
            timings["train_s"] = time.monotonic() - t
            result = job.get("result") or {}
            model_name = str(result["model"])
            validation = result.get("validation") or {}
            _say(stream, f"   model {model_name}; on held-out synthetic frames: "
                 + _validation_text(validation))  # fmt: skip
        else:
            _say(stream, f"2. use the given model {s.model} (imported as {model_name})")
            validation = {}
        ctl.call("load_model", name=model_name)
        _say(stream, f"   load_model {model_name}: ok")
        z_range = _model_z_range(workspace / "models" / model_name)

        # ------------------------------------------------------------- 3. live
        _say(stream)
        _say(stream, f"3. live for {s.duration_s:g} s; subscribed to loc, track, hb:")
        _say(
            stream,
            "   analysis: the networks alone (analysis.passes 1, fit none: camera rate on a "
            "CPU; the model's default adds the spline fit and its σ, at a few frames/s here)",
        )
        live = Subscriber(ep["pub"], topics=("loc", "track", "hb"))
        time.sleep(0.3)  # let the subscription reach the publisher (slow joiner)
        stats = LiveStats()
        ctl.call("start", interval_ms=s.interval_ms)
        ctl.call("record_start")  # as a user would; drawn at the end (recording.png)
        t_live0 = time.monotonic()
        stats.t0 = stats._win_t0 = t_live0
        next_line = t_live0 + 1.0
        t_end = t_live0 + s.duration_s
        while (now := time.monotonic()) < t_end:
            try:
                topic, header, _ = live.recv(timeout_s=max(min(next_line, t_end) - now, 0.001))
                stats.add(topic, header)
            except TimeoutError:
                pass
            _drain(events)
            now = time.monotonic()
            if now >= next_line:
                _say(
                    stream,
                    "   "
                    + stats.window_line(now, _truth_in_view(driver, cam_info, stats, z_range)),
                )
                next_line += 1.0
        live_s = time.monotonic() - t_live0
        status_live = ctl.call("status")
        rec = ctl.call("record_stop")
        ctl.call("stop")
        t_stop = time.monotonic()
        while time.monotonic() - t_stop < 0.5:  # what was published before the stop
            try:
                topic, header, _ = live.recv(timeout_s=0.1)
                stats.add(topic, header)
            except TimeoutError:
                break
        timings["live_s"] = live_s

        # ------------------------------------------------------------- 4. score
        _say(stream)
        _say(stream, "4. what was published, against the simulator's ground truth")
        truth = truth_by_frame(driver.frame_truths(), shape, px, z_range)
        region = scoring_region(shape, px)
        loc_score = score_frames(stats.loc_xyz, truth.xyz_um, TOLERANCES_UM, region_um=region)
        track_score = score_frames(stats.track_xyz, truth.xyz_um, TOLERANCES_UM, region_um=region)
        align = alignment_error_s(stats.t_acq_s, truth.t_sim_s)
        live_summary = stats.summary(live_s)
        drops = status_live.get("frames_dropped_by_reason") or {}
        live_summary.update(
            frames_acquired=int(status_live.get("frames_acquired", 0)),
            frames_analysed=int(status_live.get("frames_analysed", 0)),
            frames_dropped=int(status_live.get("frames_dropped", 0)),
            frames_dropped_by_reason=drops,
            latency_note="t_pub_s - t_acq_s of each loc message; the simulated camera stamps "
            "a frame at the start of its slot, so this includes rendering it",
        )
        for line in _score_lines(loc_score, track_score, live_summary):
            _say(stream, "   " + line)
        if align is not None and align > 0.5 * max(s.interval_ms, s.exposure_ms) / 1000.0:
            _say(stream, f"   warning: frame ↔ truth alignment is off by up to {align:.3f} s")
        t = time.monotonic()
        rec_png = out / "recording.png"
        _recording_figure(Path(rec["path"]), rec_png, live_summary)
        timings["recording_figure_s"] = time.monotonic() - t
        _say(
            stream,
            f"   recording {rec['recording']}: {rec['frames']} frames, {rec['localizations']} "
            f"localizations; figure {rec_png}",
        )
        timings["total_s"] = time.monotonic() - t_all

        summary = clean(
            {
                "kind": "focaltrack.demo",
                "schema_version": 1,
                "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "settings": {
                    "frame_px": [shape[1], shape[0]],
                    "pixel_size_um": px,
                    "emitters": s.n_emitters,
                    "flow_um_s": [s.flow_um_s, 0.0, 0.0],
                    "diffusion_um2_s": s.diffusion_um2_s,
                    "defocus_range_um": list(z_range),
                    "interval_ms": s.interval_ms,
                    "exposure_ms": s.exposure_ms,
                    "duration_s": s.duration_s,
                    "preset": s.preset if s.model is None else None,
                    "model_given": str(s.model) if s.model is not None else None,
                    "seed": s.seed,
                    "edge_margin_um": EDGE_MARGIN_UM,
                },
                "calibration": cal_info,
                "model": {"name": model_name, "validation": validation},
                "live": live_summary,
                "accuracy": {
                    "localizations": loc_score,
                    "confirmed_tracks": track_score,
                    "truth_streams": truth.n_streams,
                    "frame_alignment_spread_s": align,
                },
                "timings_s": timings,
                "files": {
                    "calibration_png": str(cal_png),
                    "recording": str(rec["path"]),
                    "recording_png": str(rec_png),
                    "workspace": str(workspace),
                },
                "endpoints": ep,
            }
        )
        path = out / "summary.json"
        write_json_atomic(path, summary, mode=0o644)  # the summary is for sharing
        _say(stream)
        _say(stream, f"wrote {cal_png}, {rec_png} and {path} in {timings['total_s']:.0f} s.")
        _say(
            stream,
            f"Next: focaltrack serve --driver sim --sim-size {s.size_px} --workspace {workspace}  "
            "(restores this calibration and model)",
        )
        return summary
    finally:
        for sock in (live, events):
            if sock is not None:
                sock.close()
        ctl.close()
        svc.stop()
        svc.join(30.0)


def _drain(sub: Subscriber) -> None:
    """Discard what is queued (the demo's event subscriber is only read during jobs)."""
    try:
        sub.drain_newest()
    except Exception as e:  # never let the display take the demo down
        log.debug("drain failed: %s", e)


def _truth_in_view(
    driver: SimulatorHooks, info: CameraInfo, stats: LiveStats, z_range_um: tuple[float, float]
) -> int | None:
    """True emitters in view in the newest published frame (the simulator knows)."""
    if stats.last_frame is None:
        return None
    for e in reversed(driver.frame_truths()):  # a copy: the camera thread appends meanwhile
        if e.sequence_frame == stats.last_frame:
            cam = (info.height, info.width)
            return len(visible_truth(e, cam, info.pixel_size_um, z_range_um))
        if 0 <= e.sequence_frame < stats.last_frame:
            break
    return None


def _calibration_figure(cal_path: Path, png: Path) -> None:
    from focaltrack.calibration import Calibration
    from focaltrack.calibration.figure import render_figure

    render_figure(Calibration.load(cal_path), png)


def _recording_figure(rec: Path, png: Path, live: Mapping[str, Any]) -> None:
    """`focaltrack show` of the live phase's recording, with what the service counted and
    the subscriber measured over the whole live phase (a recording keeps no latency)."""
    from focaltrack.daemon.commands.show import draw_recording

    drops = live.get("frames_dropped_by_reason") or {}
    why = ", ".join(f"{k} {v}" for k, v in drops.items())
    lat = live["latency_ms"]
    service = (
        ("frames acquired", str(live.get("frames_acquired"))),
        ("frames analysed", f"{live.get('frames_analysed')} "
         f"({fmt(live.get('analysed_fps'), '.1f')} frames/s published)"),
        ("frames dropped", f"{live.get('frames_dropped')}" + (f" ({why})" if why else "")),
        ("latency p50 / p99", f"{fmt(lat['p50'], '.1f')} / {fmt(lat['p99'], '.1f')} ms "
         "(acquisition → publication)"),
    )  # fmt: skip
    section = ("the live phase (service status, subscriber)", service)
    draw_recording(rec, png, counters_first=(section,))


def _model_z_range(bundle: Path) -> tuple[float, float]:
    """The calibrated defocus range of a model (its z bins), µm."""
    try:
        meta = json.loads((bundle / "bundle.json").read_text())
        z = [float(v) for v in meta["z_um"]]
        return (min(z), max(z))
    except (OSError, ValueError, KeyError, TypeError):
        return (0.0, 100.0)


def _validation_text(by_snr: Mapping[str, Any]) -> str:
    parts = []
    for key, v in by_snr.items():
        if isinstance(v, dict) and v.get("jaccard") is not None:
            parts.append(f"Jaccard {v['jaccard']:.2f} at {key.replace('dB', ' dB')}")
    return ", ".join(parts) if parts else "no validation numbers"


def _score_lines(
    loc: Mapping[str, Any], track: Mapping[str, Any], live: Mapping[str, Any]
) -> list[str]:
    lines = [
        f"frames: {live.get('frames_acquired')} acquired, {live.get('frames_analysed')} "
        f"analysed ({fmt(live.get('analysed_fps'), '.1f')} frames/s), dropped "
        + ", ".join(f"{k} {v}" for k, v in (live.get("frames_dropped_by_reason") or {}).items()),
        f"frame-to-publish latency: p50 {fmt(live['latency_ms']['p50'], '.1f')} ms, "
        f"p99 {fmt(live['latency_ms']['p99'], '.1f')} ms (inference p50 "
        f"{fmt(live['inference_ms']['p50'], '.1f')} ms; the simulated camera stamps a frame "
        "at the start of its slot, so this includes the time it takes to render it)",
    ]
    for what, sc in (("localizations", loc), ("confirmed tracks", track)):
        lines.append(f"{what} ({sc['frames']} frames scored):")
        for key, v in sc["by_tolerance"].items():
            lines.append(
                f"  within {key.replace('um', ' µm'):>6}: Jaccard {fmt(v['jaccard'], '.2f')}  "
                f"precision {fmt(v['precision'], '.2f')}  recall {fmt(v['recall'], '.2f')}  "
                f"RMSE lateral {fmt(v['rmse_lateral_um'], '.2f')} µm, axial "
                f"{fmt(v['rmse_axial_um'], '.2f')} µm  (TP {v['tp']}, FP {v['fp']}, FN {v['fn']})"
            )
    return lines

"""``focaltrack bench``: how fast the live pipeline analyses, and what limits it.

    focaltrack bench [--sizes 256,512] [--emitters 20] [--duration-s 10] [--model DIR]
                     [--fps 100] [--camera replay|sim] [--device cuda] [--json FILE]
    focaltrack bench --soak 10m [--sizes 256] [--fps 100] [--camera replay|sim] ...

For each frame size it measures, in this order:

1. **render**: how long the simulator takes to render one frame of the moving scene
   (20 emitters flowing at 75 µm/s) — what caps a *simulated* camera;
2. **localizer only**: `Localizer.localize` on those frames, nothing else running — the
   analysis' own cost per frame on this device;
3. **live**: the real live pipeline — the service in this process, a camera streaming at
   ``--fps``, the driver thread, the drop-oldest queue, localizer, Kalman tracker, PUB — with a
   subscriber on the real socket: frames/s analysed, frames dropped (by reason) and the
   frame-to-publish latency (``t_pub_s − t_acq_s`` of every ``loc`` message) p50 / p99.

The camera for the live run is, by default, a **replay camera**: frames of the moving scene
rendered beforehand and streamed at exactly ``--fps`` (wrapping around after ~1 s of scene),
so the measurement is the pipeline's and not the simulator's — rendering a 512² frame takes
~0.1 s on a laptop CPU, which would cap a simulated camera at ~10 fps and eat the cores the
analysis needs. ``--camera sim`` streams from the simulated microscope itself instead (its
frame rate is then what it can render, and it competes with the analysis for the CPU).

``--soak DURATION`` runs the live pipeline alone, at one size (256 unless ``--sizes`` says),
for DURATION (seconds, or ``90s``, ``10m``, ``1h``) with a subscriber on every data topic and
``status`` asked once a second, and reports what a long run shows: RSS growth after the
warm-up (and its slope), drops, latency p50 / p99 / max and the longest ``status`` reply
(`focaltrack.daemon.soak`).

It needs a trained model: ``--model DIR``, else the current model of ``--workspace`` (default:
the service's per-user workspace), else the one ``focaltrack demo`` left in
``out/demo/workspace``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from focaltrack.common.files import clean, write_text_atomic
from focaltrack.drivers.base import Driver
from focaltrack.drivers.replay import ReplayCamera
from focaltrack.sim.scene import render_flow_frames

if TYPE_CHECKING:
    from focaltrack.daemon.client import ControlClient

log = logging.getLogger("focaltrack.bench")

FLOW_UM_S = 75.0
#: Frames rendered for the replay camera (a second of scene at 100 fps), and for timing.
REPLAY_FRAMES = 100
LOCALIZER_FRAMES = 20
WARMUP_S = 2.0
# =========================================================================== results


@dataclass(frozen=True, slots=True)
class SizeResult:
    size_px: int
    render_ms: float
    localizer_ms_p50: float
    localizer_ms_p90: float
    camera_fps: float
    analysed_fps: float
    dropped_camera: int
    dropped_behind: int
    frames_acquired: int
    frames_analysed: int
    latency_ms_p50: float | None
    latency_ms_p99: float | None
    inference_ms_p50: float | None
    localizations_per_frame: float | None
    measured_s: float

    @property
    def keeps_up(self) -> bool:
        return self.dropped_behind == 0 and self.analysed_fps >= 0.97 * self.camera_fps

    def limit(self, fps_asked: float, camera: str) -> str:
        """What limits the analysed frame rate, in words."""
        if self.keeps_up:
            s = f"keeps up with the camera at {self.camera_fps:.0f} fps"
            if camera == "sim" and self.camera_fps < 0.9 * fps_asked:
                s += (
                    f" — the simulator is the bottleneck: rendering takes {self.render_ms:.0f} ms"
                    " a frame on the shared cores"
                )
            return s
        cap = 1000.0 / self.localizer_ms_p50 if self.localizer_ms_p50 > 0 else math.inf
        s = (
            f"analysis-bound: the localizer alone needs {self.localizer_ms_p50:.0f} ms a frame "
            f"(≤ {cap:.0f} fps), so the newest frame is analysed and the rest are dropped"
        )
        live = self.inference_ms_p50
        if live is not None and live > 1.5 * self.localizer_ms_p50:
            s += (
                f"; live it took {live:.0f} ms: the camera thread"
                + (f" (the simulator renders a frame in {self.render_ms:.0f} ms)"
                   if camera == "sim" else "")
                + " and the analysis share the CPU"
            )  # fmt: skip
        return s

    def as_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__}
        d["keeps_up"] = self.keeps_up
        return clean(d)


def _pct_ms(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q) * 1000.0)


def format_table(results: Sequence[SizeResult]) -> list[str]:
    def f(v: float | None, spec: str = ".1f") -> str:
        return "-" if v is None else format(v, spec)

    head = (
        f"{'frame':>9}  {'camera':>8}  {'analysed':>8}  {'dropped':>13}  "
        f"{'latency p50/p99':>16}  {'inference':>9}  {'localizer':>9}  {'render':>7}"
    )
    units = (
        f"{'px':>9}  {'fps':>8}  {'fps':>8}  {'behind/camera':>13}  "
        f"{'ms':>16}  {'p50 ms':>9}  {'only ms':>9}  {'ms':>7}"
    )
    lines = [head, units]
    for r in results:
        lat = f"{f(r.latency_ms_p50)} / {f(r.latency_ms_p99)}"
        lines.append(
            f"{f'{r.size_px}×{r.size_px}':>9}  {r.camera_fps:8.1f}  {r.analysed_fps:8.1f}  "
            f"{f'{r.dropped_behind}/{r.dropped_camera}':>13}  {lat:>16}  "
            f"{f(r.inference_ms_p50):>9}  {r.localizer_ms_p50:9.1f}  {r.render_ms:7.1f}"
        )
    return lines


# =========================================================================== CLI


def _sizes(text: str) -> list[int]:
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--sizes must be comma-separated integers, got {text!r}"
        ) from None
    if not sizes or any(not 128 <= s <= 4096 for s in sizes):
        raise argparse.ArgumentTypeError(f"--sizes must be within 128..4096 px, got {text!r}")
    return sizes


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "bench",
        help="frames/s and frame-to-publish latency of the live pipeline per frame size",
        description=(
            "Measure the live pipeline (service in this process, subscriber on its socket) "
            "with 20 emitters flowing at 75 µm/s: frames/s analysed, drops, frame-to-publish "
            "latency p50/p99, inference time; plus the localizer alone and the simulator's "
            "render time, to say what limits it. Uses the GPU when there is one."
        ),
    )
    p.add_argument(
        "--sizes", type=_sizes, default=None, help="frame sides (px; default 256,512; --soak: 256)"
    )
    p.add_argument("--emitters", type=int, default=20, help="emitters in the scene")
    p.add_argument(
        "--duration-s",
        type=float,
        default=None,
        metavar="S",
        help="measured live time per size (default 10)",
    )
    p.add_argument(
        "--soak",
        type=soak_duration,
        default=None,
        metavar="DURATION",
        help=(
            "instead: run live for DURATION (600, 90s, 10m, 1h) at one size with a subscriber "
            "and a status poll each second; report RSS growth after warm-up, drops, latency "
            "p50/p99/max and the longest status reply"
        ),
    )
    p.add_argument(
        "--fps", type=float, default=100.0, help="camera frame rate asked for (default 100)"
    )
    p.add_argument(
        "--camera",
        choices=("replay", "sim"),
        default="replay",
        help="replay pre-rendered frames at --fps (default) or stream the simulator live",
    )
    p.add_argument("--model", type=Path, default=None, metavar="DIR", help="model bundle")
    p.add_argument(
        "--workspace", type=Path, default=None, metavar="DIR", help="take its current model"
    )
    p.add_argument(
        "--device", default="", help="torch device (cpu, cuda, cuda:1); default: automatic"
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads for inference; 0 = auto")
    p.add_argument(
        "--passes",
        type=int,
        default=0,
        help="localizer passes, as the service's analysis.passes (default 0: the model's "
        "setting, what the service runs by default; 1: the networks alone)",
    )
    p.add_argument(
        "--fit",
        choices=("model", "spline", "none"),
        default="model",
        help="the localizer's last step, as the service's analysis.fit (default: the model's "
        "setting; none: the networks' positions, the camera-rate configuration on a CPU)",
    )
    p.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write JSON")
    p.set_defaults(func=run)


def model_analysis(model: Path, passes: int, fit: str) -> tuple[int, str]:
    """The passes and last step the service runs ``model`` with under ``analysis.passes``
    and ``analysis.fit`` (0 and "model": the bundle's own setting, as `Localizer` reads it)."""
    from focaltrack.models.bundle import read_meta
    from focaltrack.models.localizer import DecodeSettings

    dec = DecodeSettings.from_meta(read_meta(model).get("decode"))
    return passes or dec.passes, dec.fit if fit == "model" else fit


def find_model(model: Path | None, workspace: Path | None) -> Path:
    """The bundle to benchmark: given, or a workspace's current model (see module doc)."""
    if model is not None:
        if not (model / "bundle.json").is_file():
            raise ValueError(f"--model {model} is not a model bundle (no bundle.json in it)")
        return model
    from focaltrack.daemon.config import default_workspace_dir

    places = [workspace] if workspace is not None else [default_workspace_dir()]
    if workspace is None:
        places.append(Path("out/demo/workspace"))
    for ws in places:
        assert ws is not None
        try:
            state = json.loads((ws / "state.json").read_text())
        except (OSError, ValueError):
            continue
        name = state.get("model") if isinstance(state, dict) else None
        if isinstance(name, str) and (ws / "models" / name / "bundle.json").is_file():
            return ws / "models" / name
    raise ValueError(
        "no model to benchmark: give --model DIR (a bundle from `focaltrack train`), or "
        "--workspace DIR of a service that has one; `focaltrack demo` leaves one in "
        f"out/demo/workspace (looked in: {', '.join(str(p) for p in places)})"
    )


def soak_duration(text: str) -> float:
    """``--soak``'s length in seconds: a number of seconds, or one with a unit s, m or h."""
    t = text.strip().lower()
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(t[-1:], None)
    try:
        value = float(t[:-1] if scale is not None else t) * (scale or 1.0)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"--soak takes a duration > 0 in seconds or with a unit (90s, 10m, 1h), got {text!r}"
        )
    return value


def run(args: argparse.Namespace) -> int:
    if args.soak is not None and args.duration_s is not None:
        raise ValueError("--soak DURATION is the soak's length: leave out --duration-s")
    if args.soak is not None and args.sizes is not None and len(args.sizes) != 1:
        raise ValueError(f"--soak runs one frame size, got --sizes {args.sizes}")
    duration_s = 10.0 if args.duration_s is None else args.duration_s
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"--duration-s must be > 0, got {duration_s:g}")
    if not (math.isfinite(args.fps) and 0 < args.fps <= 10000):
        raise ValueError(f"--fps must be in (0, 10000], got {args.fps:g}")
    if not 0 <= args.emitters <= 10000:
        raise ValueError(f"--emitters must be 0..10000, got {args.emitters}")
    if args.threads < 0:
        raise ValueError(f"--threads must be ≥ 0, got {args.threads}")
    if not 0 <= args.passes <= 4:
        raise ValueError(f"--passes must be 0..4, got {args.passes}")
    if args.json is not None and not args.json.parent.is_dir():
        raise ValueError(f"--json {args.json}: folder {args.json.parent} does not exist")
    model = find_model(args.model, args.workspace)
    args.passes, args.fit = model_analysis(model, args.passes, args.fit)
    if not getattr(args, "verbose", 0):
        logging.getLogger("focaltrack").setLevel(logging.WARNING)
    if args.soak is not None:
        from focaltrack.daemon.soak import run_soak

        report = run_soak(
            model,
            size=(args.sizes or [256])[0],
            n_emitters=args.emitters,
            duration_s=args.soak,
            fps=args.fps,
            camera=args.camera,
            device=args.device,
            threads=args.threads,
            passes=args.passes,
            fit=args.fit,
            stream=sys.stdout,
        )
    else:
        report = run_bench(
            model,
            sizes=args.sizes or [256, 512],
            n_emitters=args.emitters,
            duration_s=duration_s,
            fps=args.fps,
            camera=args.camera,
            device=args.device,
            threads=args.threads,
            passes=args.passes,
            fit=args.fit,
            stream=sys.stdout,
        )
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


# =========================================================================== the bench


def device_text(device: str, threads: int) -> str:
    import torch

    from focaltrack.models.localizer import default_device, default_threads

    dev = device or default_device()
    if dev.startswith("cuda"):
        return f"{dev} ({torch.cuda.get_device_name(torch.device(dev))})"
    n = threads or default_threads()
    return f"cpu ({n} inference threads of {os.cpu_count()} logical CPUs)"


def analysis_text(passes: int, fit: str) -> str:
    """What the localizer runs, for the bench's and the soak's headers."""
    last = "spline MLE fit" if fit == "spline" else "none"
    return f"{passes} localizer pass{'es' if passes > 1 else ''}, last step: {last}"


def run_bench(
    model: Path,
    *,
    sizes: Sequence[int] = (256, 512),
    n_emitters: int = 20,
    duration_s: float = 10.0,
    fps: float = 100.0,
    camera: str = "replay",
    device: str = "",
    threads: int = 0,
    passes: int = 1,
    fit: str = "spline",
    stream: IO[str] = sys.stdout,
) -> dict[str, Any]:
    """Benchmark ``model`` at each frame size; prints a table and returns a report."""
    from focaltrack.models.bundle import read_meta
    from focaltrack.sim.optics import SIM_ABERRATIONS, Optics
    from focaltrack.sim.psf import PSFModel

    meta = read_meta(model)
    optics = Optics(aberrations=SIM_ABERRATIONS)
    psf = PSFModel.shared(optics)
    dev_text = device_text(device, threads)
    period_s = 1.0 / fps
    say = sayer(stream)
    say(
        f"focaltrack bench — {n_emitters} emitters flowing at {FLOW_UM_S:g} µm/s, camera "
        f"{fps:g} fps ({'replayed frames' if camera == 'replay' else 'live simulator'}), "
        f"{duration_s:g} s per size after {WARMUP_S:g} s warm-up"
    )
    say(f"  model {model} ({(meta.get('training') or {}).get('preset', '?')} preset)")
    say(f"  inference on {dev_text}, {analysis_text(passes, fit)}")
    results: list[SizeResult] = []
    for size in sizes:
        say(f"  {size}×{size}: rendering {REPLAY_FRAMES} frames ...")
        frames, render_s = render_flow_frames(
            size, n_emitters, REPLAY_FRAMES, period_s, psf_model=psf, velocity_um_s=FLOW_UM_S
        )
        render_ms = float(np.median(render_s) * 1000.0)
        say(f"  {size}×{size}: localizer alone ...")
        loc_ms = _time_localizer(model, frames, device, threads, optics.pixel_size_um, passes, fit)
        say(f"  {size}×{size}: live pipeline for {duration_s:g} s ...")
        live = _live_run(
            model,
            frames,
            size,
            n_emitters=n_emitters,
            period_s=period_s,
            duration_s=duration_s,
            camera=camera,
            device=device,
            threads=threads,
            passes=passes,
            fit=fit,
            pixel_size_um=optics.pixel_size_um,
        )
        results.append(
            SizeResult(
                size_px=size,
                render_ms=render_ms,
                localizer_ms_p50=float(np.percentile(loc_ms, 50)),
                localizer_ms_p90=float(np.percentile(loc_ms, 90)),
                **live,
            )
        )
        del frames
    say("")
    for line in format_table(results):
        say(line)
    say("")
    for r in results:
        say(f"{r.size_px}×{r.size_px}: {r.limit(fps, camera)}.")
    ncpu = os.cpu_count() or 1
    if not dev_text.startswith("cuda") and ncpu <= 4:
        say(
            f"This machine has {ncpu} logical CPUs: the camera thread, the analysis (torch "
            "threads) and the subscriber share them, and other programs running at the same "
            "time lower these numbers."
        )
    return {
        "kind": "focaltrack.bench",
        "schema_version": 1,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": str(model),
        "device": dev_text,
        "localizer_passes": passes,
        "localizer_fit": fit,
        "camera": camera,
        "fps_asked": fps,
        "emitters": n_emitters,
        "duration_s": duration_s,
        "cpu_count": ncpu,
        "results": [r.as_dict() | {"limit": r.limit(fps, camera)} for r in results],
    }


def sayer(stream: IO[str]) -> Callable[[str], None]:
    def say(text: str) -> None:
        stream.write(text + "\n")
        stream.flush()

    return say


def _time_localizer(
    model: Path,
    frames: np.ndarray,
    device: str,
    threads: int,
    pixel_size_um: float,
    passes: int = 1,
    fit: str = "spline",
) -> list[float]:
    """Milliseconds per frame of `Localizer.localize` alone (after a warm-up), as the service
    runs it: the model loaded on one thread, applied on another (the analysis thread).
    torch's intra-op thread setting belongs to the thread that made it, and on a busy
    2-core CPU two threads spinning on one frame can be several times slower than one."""
    from focaltrack.models.localizer import Localizer

    loc = Localizer.from_bundle(
        model,
        device=device or None,
        threads=threads or None,
        pixel_size_um=pixel_size_um,
        passes=passes,
        fit=fit,
    )
    out: list[float] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            out.extend(_localizer_times(loc, frames))
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=work, name="focaltrack-bench-localizer")
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return out


def _localizer_times(loc: Any, frames: np.ndarray) -> list[float]:
    n = min(LOCALIZER_FRAMES, len(frames))
    # A first pass over the very frames timed below: the first call with each new number of
    # detections (the axial network's batch size) builds kernels for that shape, which a
    # running service has long done.
    for i in range(n):
        loc.localize(frames[i], frame_index=i)
    out = []
    for i in range(n):
        t = time.perf_counter()
        loc.localize(frames[i], frame_index=i)
        out.append((time.perf_counter() - t) * 1000.0)
    return out


def _live_run(
    model: Path,
    frames: np.ndarray,
    size: int,
    *,
    n_emitters: int,
    period_s: float,
    duration_s: float,
    camera: str,
    device: str,
    threads: int,
    pixel_size_um: float,
    passes: int = 1,
    fit: str = "spline",
) -> dict[str, Any]:
    from focaltrack.daemon.client import Subscriber

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
        pixel_size_um=pixel_size_um,
    ) as (ep, ctl):
        sub = Subscriber(ep["pub"], topics=("loc",), rcvhwm=100000)
        try:
            time.sleep(0.3)  # the subscription reaches the publisher
            ctl.call("start", interval_ms=period_s * 1000.0)
            t_warm = time.monotonic() + WARMUP_S
            while time.monotonic() < t_warm:
                _drain(sub)
                time.sleep(0.05)
            _drain(sub)
            s0 = ctl.call("status")
            t0 = time.monotonic()
            latency: list[float] = []
            inference: list[float] = []
            n_locs: list[int] = []
            while (left := t0 + duration_s - time.monotonic()) > 0:
                try:
                    _, h, _ = sub.recv(timeout_s=left)
                except TimeoutError:
                    break
                latency.append(float(h["t_pub_s"]) - float(h["t_acq_s"]))
                if h.get("inference_s") is not None:
                    inference.append(float(h["inference_s"]))
                n_locs.append(int(h["n"]))
            s1 = ctl.call("status")
            measured = time.monotonic() - t0
            ctl.call("stop")
        finally:
            sub.close()
    d0 = s0.get("frames_dropped_by_reason") or {}
    d1 = s1.get("frames_dropped_by_reason") or {}
    acquired = int(s1["frames_acquired"]) - int(s0["frames_acquired"])
    analysed = int(s1["frames_analysed"]) - int(s0["frames_analysed"])
    return {
        "camera_fps": acquired / measured,
        "analysed_fps": analysed / measured,
        "dropped_camera": int(d1.get("camera", 0)) - int(d0.get("camera", 0)),
        "dropped_behind": int(d1.get("analysis_behind", 0)) - int(d0.get("analysis_behind", 0)),
        "frames_acquired": acquired,
        "frames_analysed": analysed,
        "latency_ms_p50": _pct_ms(latency, 50),
        "latency_ms_p99": _pct_ms(latency, 99),
        "inference_ms_p50": _pct_ms(inference, 50),
        "localizations_per_frame": float(np.mean(n_locs)) if n_locs else None,
        "measured_s": measured,
    }


@contextmanager
def bench_service(
    model: Path,
    frames: np.ndarray,
    size: int,
    *,
    n_emitters: int,
    period_s: float,
    camera: str,
    device: str,
    threads: int,
    passes: int,
    pixel_size_um: float,
    fit: str = "spline",
) -> Iterator[tuple[dict[str, str], ControlClient]]:
    """The service in this process, on a throw-away workspace holding ``model`` (loaded),
    its camera the replay of ``frames`` or the simulator (``camera="sim"``), every socket on
    a free port: yields its endpoints and a control client; stops it on the way out."""
    from focaltrack.daemon.client import ControlClient
    from focaltrack.daemon.config import load_config
    from focaltrack.daemon.microscope import open_service_driver
    from focaltrack.daemon.service import Service

    with tempfile.TemporaryDirectory(prefix="focaltrack-bench-") as tmp:
        ws = Path(tmp)
        (ws / "models").mkdir()
        shutil.copytree(model, ws / "models" / "bench")
        cfg = load_config(
            None,
            env={},
            overrides={
                "driver.kind": "sim",
                "driver.exposure_ms": min(10.0, period_s * 1000.0),
                "sim.width": size,
                "sim.height": size,
                "sim.n_emitters": n_emitters,
                "sim.motion": "flow",
                "sim.velocity_um_s": (FLOW_UM_S, 0.0, 0.0),
                "network.control_port": 0,
                "network.pub_port": 0,
                "network.metrics_port": 0,
                "workspace.dir": str(ws),
                "analysis.device": device,
                "analysis.threads": threads,
                "analysis.passes": passes,
                "analysis.fit": fit,
            },
        )
        if camera == "replay":
            driver: Driver = ReplayCamera(
                frames, pixel_size_um=pixel_size_um, exposure_ms=cfg.driver.exposure_ms
            )
        else:
            driver = open_service_driver(cfg)
        svc = Service(cfg, driver=driver)
        svc.start()
        ctl = ControlClient(svc.endpoints["control"], timeout_s=30.0, retries=1)
        try:
            ctl.call("load_model", name="bench")
            yield svc.endpoints, ctl
        finally:
            ctl.close()
            svc.stop()
            svc.join(30.0)


def _drain(sub: Any) -> None:
    try:
        while True:
            sub.recv(timeout_s=0.001)
    except TimeoutError:
        pass

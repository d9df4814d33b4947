"""Training both networks from a calibration alone, with synthetic data drawn on the fly.

`train` draws batches from `focaltrack.sim.synth.Synthesizer`, trains `LateralNet`
(dense focal loss on the 1/4-resolution detection map + L1 on sub-pixel offsets at the
emitter cells) and then `AxialNet` (binary cross-entropy against soft triangle z targets),
validates on held-out synthetic frames (thresholds chosen on one set, metrics reported on
another), and writes a bundle atomically (`focaltrack.models.bundle`).

Presets (steps × batch; wall time on the 2-core development CPU, see docs/models.md):
``ci`` for unit tests, ``quick`` for the demo, ``default`` for real use. AdamW with a
one-cycle learning-rate schedule. Deterministic for a given seed on a CPU (same torch
build and thread count); on a GPU bit-exactness is not guaranteed (atomic adds).

Data-parallel training (`train_distributed`, ``focaltrack train --nproc N`` or torchrun;
`focaltrack.models.distributed`): every rank draws its own batches (its own seed stream),
DDP averages the gradients, rank 0 validates and writes the bundle. A preset keeps its
meaning: the same steps and the same *global* batch, shared out over the ranks (so the
learning-rate schedule and the number of examples seen do not depend on the world size).
BatchNorm stays per rank: each rank's statistics are over its share of the batch times
every pixel of the feature map (thousands of values per channel even at a batch of 2),
so synchronising them (SyncBatchNorm) would buy little for one collective per layer per
step; DDP hands rank 0's running statistics to all ranks before each step, and rank 0's
are saved.
"""

from __future__ import annotations

import json
import math
import platform
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn.functional as F

from focaltrack.calibration import Calibration
from focaltrack.common.files import fmt
from focaltrack.common.version import __version__
from focaltrack.models import distributed
from focaltrack.models.bundle import BUNDLE_KIND, BUNDLE_SCHEMA_VERSION, ModelBundle, save_bundle
from focaltrack.models.localizer import Candidates, DecodeSettings, Localizer, decode_candidates
from focaltrack.models.metrics import MatchResult, combine, match
from focaltrack.models.nets import AxialConfig, AxialNet, LateralConfig, LateralNet
from focaltrack.sim.synth import SynthConfig, Synthesizer

VALIDATION_TOLERANCE_UM = 10.0  # seed 002's matching radius


@dataclass(frozen=True)
class Preset:
    name: str
    lateral_steps: int
    lateral_batch: int
    lateral_patch: int
    axial_steps: int
    axial_batch: int
    lateral_lr: float = 4e-3
    axial_lr: float = 1.5e-3
    weight_decay: float = 1e-4
    offset_weight: float = 1.0
    # small: the z-bin BCE is a mean over 51 mostly-empty bins, the offset L1 a mean over
    # labelled bins; at weight ~1 the offsets dominate the shared features and the z logits
    # learn far more slowly (measured: no z peak after 400 steps vs. p ≈ 0.7 without)
    axial_offset_weight: float = 0.05
    val_frames: int = 12  # per SNR, per set (tuning set and report set)
    val_snr_db: tuple[float, ...] = (0.0, 10.0, 20.0)
    val_size: int = 256
    val_emitters: int = 20  # in a 100 × 100 µm region, as in seed 002
    val_background_e: float = 14.4  # e⁻/px: 20 photons at QE 0.72, as `evaluate` uses
    # fit the calibration's pupil first, where it has none (`focaltrack.calibration.pupil`):
    # the training images and the bundle's models are then drawn without the stack's noise;
    # 1.5–5 min for a 128² × 51 calibration (off for the unit tests' small model)
    pupil_fit: bool = True
    lateral: LateralConfig = field(default_factory=LateralConfig)
    axial: AxialConfig = field(default_factory=AxialConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("lateral", "axial", "synth")}
        d["val_snr_db"] = list(self.val_snr_db)
        d["lateral"] = self.lateral.to_dict()
        d["axial"] = {k: v for k, v in self.axial.to_dict().items() if k != "n_bins"}
        d["synth"] = self.synth.to_dict()
        return d


PRESETS: dict[str, Preset] = {
    # ci: a small model for the isolated-bright-emitter regime (unit tests, ~1 min)
    "ci": Preset("ci", lateral_steps=400, lateral_batch=12, lateral_patch=128,
                 axial_steps=400, axial_batch=32, val_frames=3, val_emitters=6,
                 val_snr_db=(10.0, 20.0, 30.0), pupil_fit=False,
                 lateral=LateralConfig(stem=(16, 24), widths=(32, 48, 64)),
                 synth=SynthConfig(snr_db=(8.0, 34.0), density_per_100um=(0.5, 6.0),
                                   background_e=(3.0, 60.0))),
    "quick": Preset("quick", lateral_steps=900, lateral_batch=16, lateral_patch=128,
                    axial_steps=900, axial_batch=32, val_frames=6),
    "default": Preset("default", lateral_steps=2800, lateral_batch=16, lateral_patch=160,
                      axial_steps=4000, axial_batch=32),
    # long: twice the default's steps (23 min on 2 CPU cores): Jaccard +0.03–0.05
    "long": Preset("long", lateral_steps=5600, lateral_batch=16, lateral_patch=160,
                   axial_steps=8000, axial_batch=32),
}  # fmt: skip


#: What ``train(progress=...)`` takes: draw a bar on stderr (True), nothing (False), or
#: call ``(phase, step, steps)`` after every step (the service's training job, which sends
#: the numbers to its parent process instead of text).
Progress = bool | Callable[[str, int, int], None]


class ProgressBar:
    """Training progress with loss, rate and ETA: a tqdm bar on a terminal, a line per 10 %
    in a log (`focaltrack.common.progress`); ``on_step(phase, step, steps)`` if given."""

    FORMAT = (
        "{desc} [{bar:24}] {n_fmt}/{total_fmt} {rate_fmt} elapsed {elapsed} ETA {remaining}"
        "{postfix}"
    )

    def __init__(
        self,
        total: int,
        desc: str,
        stream: TextIO | None = None,
        enabled: bool = True,
        on_step: Callable[[str, int, int], None] | None = None,
    ):
        from focaltrack.common.progress import progress_bar

        self.total, self.desc, self.enabled, self.on_step = total, desc, enabled, on_step
        self.n = 0
        self._bar = progress_bar(
            total, desc, stream=stream, enabled=enabled, bar_format=self.FORMAT
        )

    def update(self, n: int, **stats: float) -> None:
        if self.enabled:
            self._bar.set_postfix_str(" ".join(f"{k} {v:.4g}" for k, v in stats.items()), False)
            self._bar.update(n - self.n)
        self.n = n
        if self.on_step is not None:
            self.on_step(self.desc.strip(), n, self.total)
        if n >= self.total:
            self._bar.close()


def _log_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- losses
def lateral_loss(
    out: torch.Tensor,
    heat: torch.Tensor,
    offset: torch.Tensor,
    positive: torch.Tensor,
    offset_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Focal loss (CenterNet form: negatives down-weighted near emitters) + offset L1."""
    logit = out[:, :1]
    p = torch.sigmoid(logit)
    pos = positive.float()
    n_pos = pos.sum().clamp_min(1.0)
    log_p = F.logsigmoid(logit)
    log_1mp = F.logsigmoid(-logit)
    pos_loss = -((1 - p) ** 2 * log_p * pos).sum()
    neg_loss = -((1 - heat) ** 4 * p**2 * log_1mp * (1 - pos)).sum()
    focal = (pos_loss + neg_loss) / n_pos
    off = (F.l1_loss(out[:, 1:], offset, reduction="none") * pos).sum() / n_pos
    return focal + offset_weight * off, focal, off


def axial_loss(
    out: torch.Tensor,
    target: torch.Tensor,
    offset: torch.Tensor | None = None,
    offset_weight: float = 1.0,
) -> torch.Tensor:
    """BCE on the z-bin logits (channel 0) + L1 on the per-bin lateral offsets (channels
    1–2, when the network has them), weighted by each bin's target so that a bin counts as
    much as it belongs to an emitter."""
    bce = F.binary_cross_entropy_with_logits(out[:, 0], target)
    if out.shape[1] == 1 or offset is None:
        return bce
    l1 = (F.l1_loss(out[:, 1:], offset, reduction="none").sum(1) * target).sum()
    return bce + offset_weight * l1 / target.sum().clamp_min(1.0)


# --------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    path: Path | None
    meta: dict[str, Any]
    lateral: LateralNet
    axial: AxialNet


def check_out(out: str | Path, overwrite: bool) -> Path:
    """``out`` as a path, refused early (before any training) if it cannot be written."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ValueError(f"{out} already exists (use --force to replace it)")
    if not out.parent.is_dir():
        raise ValueError(f"output directory {out.parent} does not exist")
    return out


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    d = torch.device(device)
    if d.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but no CUDA GPU is available")
    return d


def train(
    calibration: Calibration,
    out: str | Path | None,
    *,
    preset: str | Preset = "default",
    seed: int = 0,
    device: str | None = None,
    threads: int | None = None,
    overwrite: bool = False,
    progress: Progress = True,
    log: Callable[[str], None] = _log_stderr,
    overrides: dict[str, Any] | None = None,
    calibration_path: str | None = None,
    rank: distributed.Rank | None = None,
) -> TrainResult:
    """Train both networks from ``calibration`` and write a bundle to ``out`` (if given).

    ``rank``: this process's place in a data-parallel run whose process group is up (see
    `train_distributed`); None (or a world of one) trains alone. Only rank 0 logs, shows
    progress, validates and writes: the other ranks return a result without a path and
    without ``meta["validation"]``.
    """
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        preset = PRESETS[preset]
    if overrides:
        preset = replace(preset, **overrides)
    if out is not None:
        out = check_out(out, overwrite)
    rk = distributed.SINGLE if rank is None else rank
    if rank is not None and not distributed.is_initialized():
        raise ValueError("train(rank=...) needs the process group: use train_distributed")
    if not rk.is_main:
        progress, log = False, _quiet
    dev = resolve_device(device) if rank is None else distributed.rank_device(device, rk)
    if dev.type == "cpu":
        from focaltrack.models.localizer import default_threads

        torch.set_num_threads(
            threads or (default_threads() if rank is None else distributed.rank_threads(rk))
        )
    lat_batch = distributed.rank_batch(preset.lateral_batch, rk)
    ax_batch = distributed.rank_batch(preset.axial_batch, rk)
    # the same initial weights on every rank (DDP also broadcasts rank 0's)
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    if preset.pupil_fit:
        # every rank fits the same stack the same way (a data-parallel run pays it per rank)
        from focaltrack.calibration.pupil import with_pupil

        calibration = with_pupil(calibration, log_line=lambda s: log(f"train: {s}"))
    synth = Synthesizer(calibration, preset.synth, device=dev, seed=distributed.rank_seed(seed, rk))
    n_bins = len(calibration.z_um)
    lateral = LateralNet(preset.lateral).to(dev)
    axial = AxialNet(replace(preset.axial, n_bins=n_bins)).to(dev)
    log(
        f"train: preset {preset.name}, seed {seed}, device {dev}"
        + (f" ({torch.get_num_threads()} threads)" if dev.type == "cpu" else "")
        + f"; calibration {calibration.sha256[:12]} ({len(calibration.z_um)} slices "
        f"{calibration.z_um[0]:g}…{calibration.z_um[-1]:g} µm, {calibration.pixel_size_um:g} µm px)"
        + (
            f"; {rk.world_size} processes ({distributed.backend()}), batch per process "
            f"{lat_batch} lateral, {ax_batch} axial"
            if rank is not None
            else ""
        )
    )

    # ---- lateral
    t0 = time.perf_counter()
    lat_hist = _fit(
        lateral,
        steps=preset.lateral_steps,
        lr=preset.lateral_lr,
        wd=preset.weight_decay,
        batch_fn=lambda: synth.lateral_batch(lat_batch, preset.lateral_patch, lateral.stride),
        loss_fn=lambda net, b: lateral_loss(net(b.x), b.heat, b.offset, b.positive,
                                            preset.offset_weight)[0],
        desc="lateral",
        progress=progress,
        ddp=rank is not None,
    )  # fmt: skip
    t_lat = time.perf_counter() - t0
    lat_synth_rate = synth.windows_per_s
    lat_px_rate = lat_synth_rate * preset.lateral_patch**2 / 128**2
    log(
        f"train: lateral done in {t_lat:.0f} s, final loss {lat_hist[-1]:.4f}; synthesizer "
        f"{lat_synth_rate:.0f} patches/s of {preset.lateral_patch}² px "
        f"(≈ {lat_px_rate:.0f} 128² windows/s)"
    )
    # ---- axial
    synth.windows_drawn, synth.seconds = 0, 0.0
    t0 = time.perf_counter()
    ax_hist = _fit(
        axial,
        steps=preset.axial_steps,
        lr=preset.axial_lr,
        wd=preset.weight_decay,
        batch_fn=lambda: synth.axial_batch(ax_batch, axial.cfg.window),
        loss_fn=lambda net, b: axial_loss(net(b.x), b.target, b.offset, preset.axial_offset_weight),
        desc="axial  ",
        progress=progress,
        ddp=rank is not None,
    )
    t_ax = time.perf_counter() - t0
    ax_synth_rate = synth.windows_per_s
    log(
        f"train: axial done in {t_ax:.0f} s, final loss {ax_hist[-1]:.4f}; synthesizer "
        f"{ax_synth_rate:.0f} windows/s ({axial.cfg.window}² px)"
    )
    lateral.eval()
    axial.eval()
    if not rk.is_main:
        return TrainResult(None, _meta_of_rank(rk, seed, lat_hist, ax_hist), lateral, axial)

    meta: dict[str, Any] = {
        "kind": BUNDLE_KIND,
        "schema_version": BUNDLE_SCHEMA_VERSION,
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "calibration": {
            "sha256": calibration.sha256,
            "source": calibration.source,
            "file": "calibration.h5",
            "original_path": calibration_path,
            "created_utc": calibration.created_utc,
        },
        "pixel_size_um": calibration.pixel_size_um,
        "z_um": [float(z) for z in calibration.z_um],
        "bit_depth": int(calibration.bit_depth),
        "noise": {
            "offset_adu": calibration.noise.offset_adu,
            "read_noise_adu": calibration.noise.read_noise_adu,
            "gain_e_per_adu": _finite_or_none(calibration.noise.gain_e_per_adu),
        },
        "preprocess": asdict(synth.pre),
        "decode": asdict(DecodeSettings()),
        "training": {
            "preset": preset.name,
            "settings": preset.to_dict(),
            "seed": seed,
            "world_size": rk.world_size,
            "backend": distributed.backend() if rank is not None else None,
            "device": str(dev),
            "threads": torch.get_num_threads() if dev.type == "cpu" else None,
            "lateral_seconds": round(t_lat, 2),
            "axial_seconds": round(t_ax, 2),
            "lateral_final_loss": lat_hist[-1],
            "axial_final_loss": ax_hist[-1],
            "synth_lateral_patches_per_s": round(lat_synth_rate, 1),
            "synth_axial_windows_per_s": round(ax_synth_rate, 1),
        },
        "versions": _versions(),
    }
    # ---- validation: choose thresholds on one synthetic set, report on another
    t0 = time.perf_counter()
    bundle = ModelBundle(Path("."), meta, calibration, lateral, axial)
    loc = Localizer(bundle, device=str(dev), threads=threads)
    tune = _validation_set(loc, calibration, preset, seed + 7919, dev)
    decode = _tune_decode(tune, loc)
    meta["decode"] = asdict(decode)
    report = _validation_set(loc, calibration, preset, seed + 104729, dev)
    meta["validation"] = _report(report, loc, decode)
    meta["training"]["validation_seconds"] = round(time.perf_counter() - t0, 2)
    meta["training"]["total_seconds"] = round(time.perf_counter() - t_start, 2)
    v = meta["validation"]
    log(
        f"train: validation (synthetic frames, {preset.val_emitters} emitters in 100 × 100 µm, "
        "tolerance 10 µm): "
        + "; ".join(
            f"{k}: Jaccard {fmt(r['jaccard'], '.3f', missing='n/a')}, "
            f"RMSE xy {fmt(r['rmse_lateral_um'], '.2f', missing='n/a')} µm, "
            f"z {fmt(r['rmse_axial_um'], '.2f', missing='n/a')} µm"
            for k, r in v["by_snr"].items()
        )
        + f"; thresholds lateral {decode.lateral_threshold:g}, axial {decode.axial_threshold:g}"
    )
    path = None
    if out is not None:
        path = save_bundle(
            out, calibration=calibration, lateral=lateral, axial=axial, meta=meta,
            overwrite=overwrite,
        )  # fmt: skip
        log(f"train: wrote {path} in {meta['training']['total_seconds']:.0f} s total")
    return TrainResult(path, meta, lateral, axial)


def _quiet(msg: str) -> None:
    """The log of ranks other than 0: rank 0 speaks for the run."""


def _meta_of_rank(
    rk: distributed.Rank, seed: int, lat_hist: list[float], ax_hist: list[float]
) -> dict[str, Any]:
    return {
        "training": {
            "seed": seed,
            "rank": rk.rank,
            "world_size": rk.world_size,
            "lateral_final_loss": lat_hist[-1],
            "axial_final_loss": ax_hist[-1],
        }
    }


def train_distributed(
    rank: distributed.Rank, calibration: Calibration, out: str | Path | None, **kwargs: Any
) -> TrainResult:
    """`train` as rank ``rank`` of a data-parallel run: joins the process group the
    launcher's variables describe (`focaltrack.models.distributed.launch` or torchrun),
    trains, and leaves the group. ``kwargs`` are `train`'s."""
    dev = distributed.rank_device(kwargs.get("device"), rank)
    distributed.init_process_group(rank, dev)
    try:
        return train(calibration, out, rank=rank, **kwargs)
    finally:
        distributed.shutdown()


def _fit(
    net: torch.nn.Module,
    *,
    steps: int,
    lr: float,
    wd: float,
    batch_fn: Callable[[], Any],
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    desc: str,
    progress: Progress,
    ddp: bool = False,
) -> list[float]:
    net.train()
    # ~2x faster convolutions on CPUs (torch's stubs leave out the documented keyword)
    net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    # in DDP (``ddp``: one rank of a data-parallel run): the forward/backward through the
    # wrapper averages the gradients over the ranks; the optimiser steps the same parameters
    model = distributed.wrap(net, next(net.parameters()).device) if ddp else net
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.15, div_factor=10.0,
        final_div_factor=100.0,
    )  # fmt: skip
    batches = Prefetch(batch_fn, steps)
    try:
        hist = _steps(model, opt, sched, batches, loss_fn, steps, desc, progress)
    finally:
        batches.close()
    if not hist:
        hist.append(float("nan"))
    return hist


class Prefetch:
    """Draws batches in a background thread, one or two ahead of the training loop.

    The synthesizer is largely single-threaded (Poisson sampling, one strided add per
    emitter), the network's steps are multi-threaded: overlapping them keeps both cores
    busy. One producer, in order, from one generator: the batches are the same as drawn
    inline, so a seed still reproduces a training run.
    """

    def __init__(self, fn: Callable[[], Any], n: int, depth: int = 2) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(fn, n), daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], Any], n: int) -> None:
        for _ in range(n):
            try:
                item = fn()
            except BaseException as e:  # handed to the consumer, raised there
                item = _Failed(e)
            while not self._stop.is_set():
                try:
                    self._q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if self._stop.is_set() or isinstance(item, _Failed):
                return

    def get(self) -> Any:
        item = self._q.get()
        if isinstance(item, _Failed):
            raise item.error
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class _Failed:
    error: BaseException


def _steps(
    net: torch.nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    batches: Prefetch,
    loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
    steps: int,
    desc: str,
    progress: Progress,
) -> list[float]:
    on_step = None if isinstance(progress, bool) else progress
    bar = ProgressBar(steps, desc, enabled=progress is True, on_step=on_step)
    hist: list[float] = []
    ema = float("nan")
    for i in range(steps):
        batch = batches.get()
        loss = loss_fn(net, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        sched.step()
        v = float(loss.detach())
        if not math.isfinite(v):
            raise RuntimeError(f"{desc.strip()} training diverged (loss {v}) at step {i}")
        ema = v if not math.isfinite(ema) else 0.95 * ema + 0.05 * v
        hist.append(ema)
        bar.update(i + 1, loss=ema, lr=sched.get_last_lr()[0])
    return hist


@dataclass
class _ValSet:
    snr_db: list[float]
    cands: list[Candidates]
    truth_um: list[np.ndarray]


def _validation_set(
    loc: Localizer, cal: Calibration, preset: Preset, seed: int, dev: torch.device
) -> _ValSet:
    """Frames like seed 002's test: ``val_emitters`` in a 100 × 100 µm region (z over the
    calibration range), intensities 0.1–1, at each validation SNR."""
    synth = Synthesizer(cal, preset.synth, device=dev, seed=seed)
    size = preset.val_size
    side = min(100.0 / cal.pixel_size_um, size - 1.0)
    x0 = (size - 1 - side) / 2
    region = (x0, x0, x0 + side, x0 + side)
    snrs: list[float] = []
    cands: list[Candidates] = []
    truth: list[np.ndarray] = []
    for snr in preset.val_snr_db:
        adu, em = synth.frames(
            preset.val_frames, (size, size), preset.val_emitters, snr_db=snr, region_px=region,
            background_e=preset.val_background_e,
        )  # fmt: skip
        frames = adu.cpu().numpy().astype(np.uint16)
        cands += loc.candidates(frames)
        for i in range(preset.val_frames):
            e = em.of_image(i)
            truth.append(
                np.stack(
                    [e["x_px"] * cal.pixel_size_um, e["y_px"] * cal.pixel_size_um, e["z_um"]], 1
                )
            )
            snrs.append(snr)
    return _ValSet(snrs, cands, truth)


def _evaluate(
    vs: _ValSet, loc: Localizer, st: DecodeSettings, only_snr: float | None = None
) -> MatchResult:
    res = []
    for snr, c, t in zip(vs.snr_db, vs.cands, vs.truth_um, strict=True):
        if only_snr is not None and snr != only_snr:
            continue
        x, y, z, _ = decode_candidates(c, loc._z, st)
        pred = np.stack([x * loc.pixel_size_um, y * loc.pixel_size_um, z], 1)
        res.append(match(pred, t, VALIDATION_TOLERANCE_UM))
    return combine(res)


def _tune_decode(vs: _ValSet, loc: Localizer) -> DecodeSettings:
    """Thresholds, then merge radii, maximising the mean Jaccard over the validation SNRs."""
    snrs = sorted(set(vs.snr_db))

    def score(st: DecodeSettings) -> float:
        return float(np.mean([_evaluate(vs, loc, st, s).jaccard for s in snrs]))

    best, best_j = DecodeSettings(), -1.0
    for lt in (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6):
        for at in (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8):
            st = replace(best, lateral_threshold=lt, axial_threshold=at)
            j = score(st)
            if j > best_j + 1e-9:
                best, best_j = st, j
    for mp in (4.0, 8.0):  # px: one emitter found from two windows lands within this
        for mu in (4.0, 6.0):
            st = replace(best, merge_px=mp, merge_um=mu)
            j = score(st)
            if j > best_j + 1e-9:
                best, best_j = st, j
    return best


def _report(vs: _ValSet, loc: Localizer, st: DecodeSettings) -> dict[str, Any]:
    by_snr = {}
    for s in sorted(set(vs.snr_db)):
        r = _evaluate(vs, loc, st, s).summary()
        by_snr[f"{s:g}dB"] = {k: _finite_or_none(float(v)) for k, v in r.items()}
    return {
        "frames": "synthetic (training synthesizer, held-out seed)",
        "n_frames": len(vs.snr_db),
        "emitters_per_frame": loc.meta["training"]["settings"]["val_emitters"],
        "tolerance_um": VALIDATION_TOLERANCE_UM,
        "by_snr": by_snr,
    }


def _finite_or_none(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _versions() -> dict[str, str]:
    return {
        "focaltrack": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def describe(meta: dict[str, Any]) -> str:
    return json.dumps(meta, indent=2)

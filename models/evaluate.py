"""Evaluate a 3D localizer on the simulated microscope: seed 002 §3.2, reproduced.

Three experiments, each a list of *points*; a point is ``frames`` independent wide-field
frames, each with fresh random emitters, localized one by one and matched to the truth:

(a) **SNR sweep** — 20 emitters in a 100 × 100 × 100 µm³ volume, intensities uniform in
    0.1–1, at several SNRs (seed 002 Fig. 3);
(b) **density sweep** — 1 to 100 emitters in the same volume at one fixed SNR (Fig. 4);
(c) **isolated bright emitters** — one intensity-1 emitter per frame at a high SNR, many
    frames: the axial precision the axial network reaches when nothing else is in view.

Frames are rendered with the simulated microscope's own physics (`focaltrack.sim.render`:
the `focaltrack.sim` PSF model *with its aberrations*, the sCMOS camera model), the same
physics the simulated core images; the localizer was trained only from a calibration
acquired from that microscope — the split a real lab has. Scores come from
`focaltrack.models.metrics`: one-to-one (Hungarian) matching within a 3D tolerance,
Jaccard = TP / (TP + FP + FN), precision, recall, lateral / axial / 3D RMSE over matched
pairs; every point is scored at each tolerance (the paper's 10 µm and a tighter one).

SNR (the paper gives only "Poisson noise levels" in dB; this is our definition, see
docs/evaluation.md and `focaltrack.sim.snr`): the peak-pixel SNR of the reference emitter.

What physics allows at each point — the Cramér–Rao bounds of the calibration model, the
RMSE's ratio to them, the recall of an ideal detector — comes from
`focaltrack.models.evaluate_bounds` when a calibration is given (a `Localizer`'s own).

Modules: this one runs the experiments (`Settings`, `run_point`, `evaluate`);
`focaltrack.models.evaluate_scoring` scores a point; `focaltrack.models.evaluate_bounds`
bounds it; `focaltrack.models.evaluate_report` holds the `Report` and writes it. The names a
caller needs are importable from here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from focaltrack.calibration import Calibration
from focaltrack.models.evaluate_bounds import BoundModel
from focaltrack.models.evaluate_report import (
    REPORT_KIND,
    SCHEMA_VERSION,
    TARGETS,
    Report,
    check_writable,
    markdown,
    summary_text,
    write_report,
)
from focaltrack.models.evaluate_scoring import (
    FrameLocalizer,
    PointResult,
    PointSpec,
    as_xyz_um,
    bias_and_spread,
    score_frames_with_ci,
)
from focaltrack.models.metrics import DEFAULT_TOLERANCES_UM, tolerance_key
from focaltrack.sim.render import FrameEmitters, Geometry, Microscope, Renderer, random_scene
from focaltrack.sim.snr import (
    SNR_DEFINITION,
    Exposure,
    exposure_for_snr,
    signal_for_snr_e,
    snr_db_of,
)

if TYPE_CHECKING:
    from focaltrack.sim.psf import PSFModel

# The experiments' public names, including those of the modules they are built from.
__all__ = [
    "DEFAULT_DENSITIES",
    "DEFAULT_DENSITY_SNR_DB",
    "DEFAULT_ISOLATED_SNR_DB",
    "DEFAULT_SNR_DB",
    "DEFAULT_TOLERANCES_UM",
    "REPORT_KIND",
    "SCHEMA_VERSION",
    "SNR_DEFINITION",
    "TARGETS",
    "Exposure",
    "FrameEmitters",
    "FrameLocalizer",
    "Geometry",
    "Microscope",
    "PointResult",
    "PointSpec",
    "Renderer",
    "Report",
    "Settings",
    "as_xyz_um",
    "check_writable",
    "evaluate",
    "exposure_for_snr",
    "markdown",
    "random_scene",
    "run_point",
    "score_frames_with_ci",
    "signal_for_snr_e",
    "snr_db_of",
    "summary_text",
    "write_report",
]


log = logging.getLogger(__name__)

DEFAULT_SNR_DB: tuple[float, ...] = (0.0, 5.0, 10.0, 15.0, 20.0, 30.0)
DEFAULT_DENSITIES: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 100)
#: The density sweep runs where noise is not what limits detection, so it measures crowding.
DEFAULT_DENSITY_SNR_DB = 20.0
#: Bright, yet below saturation for all but emitters within ~1 µm of focus (16-bit camera).
DEFAULT_ISOLATED_SNR_DB = 20.0


@dataclass(frozen=True, slots=True)
class Settings:
    frames: int = 50
    isolated_frames: int = 200
    seed: int = 0
    snr_db: tuple[float, ...] = DEFAULT_SNR_DB
    snr_n_emitters: int = 20
    densities: tuple[int, ...] = DEFAULT_DENSITIES
    density_snr_db: float = DEFAULT_DENSITY_SNR_DB
    isolated_snr_db: float = DEFAULT_ISOLATED_SNR_DB
    tolerances_um: tuple[float, ...] = DEFAULT_TOLERANCES_UM
    intensity_range: tuple[float, float] = (0.1, 1.0)
    field_um: float = 100.0
    margin_um: float = 10.0
    background_photons: float = 20.0  # the simulated core's default
    #: Sparse density points get more frames, so every point scores at least this many
    #: emitters (1 emitter per frame: 200 frames, not 50).
    min_emitters: int = 200
    batch: int = 8
    #: The Cramér–Rao bounds and ideal recall of every point (`evaluate_bounds`; needs a
    #: calibration): ≈ 0.08 s per frame of 20 emitters, 0.55 s of 100, on one core.
    bounds: bool = True

    def __post_init__(self) -> None:
        if self.frames < 1 or self.isolated_frames < 0 or self.min_emitters < 0:
            raise ValueError(
                "frames must be at least 1; isolated frames and minimum emitters non-negative"
            )
        if not self.tolerances_um or any(not t > 0 for t in self.tolerances_um):
            raise ValueError(f"tolerances must be positive, got {self.tolerances_um}")
        if any(n < 1 for n in self.densities) or self.snr_n_emitters < 1:
            raise ValueError("emitter counts must be at least 1")
        lo, hi = self.intensity_range
        if not 0 < lo <= hi:
            raise ValueError(f"intensity range must satisfy 0 < lo <= hi, got {lo}, {hi}")
        if self.field_um <= 0 or self.margin_um < 0 or self.background_photons < 0:
            raise ValueError("field must be positive; margin and background non-negative")

    @classmethod
    def quick(cls, **kw: Any) -> Settings:
        """A few frames per point and a thinned sweep: seconds, for tests and smoke runs."""
        base: dict[str, Any] = {
            "frames": 3,
            "isolated_frames": 6,
            "snr_db": (0.0, 10.0, 30.0),
            "densities": (1, 8, 32),
            "min_emitters": 0,
        }
        base.update(kw)
        return cls(**base)

    def specs(self) -> list[PointSpec]:
        out = [
            PointSpec(
                "snr",
                f"{s:g} dB",
                self.snr_n_emitters,
                float(s),
                self.frames,
                self.intensity_range,
            )
            for s in self.snr_db
        ]
        out += [
            PointSpec(
                "density",
                f"{n} / frame",
                int(n),
                self.density_snr_db,
                max(self.frames, math.ceil(self.min_emitters / n)),
                self.intensity_range,
            )
            for n in self.densities
        ]
        if self.isolated_frames:
            out.append(
                PointSpec(
                    "isolated",
                    "1 bright / frame",
                    1,
                    self.isolated_snr_db,
                    self.isolated_frames,
                    (1.0, 1.0),
                )
            )
        return out


def _localize_all(localizer: FrameLocalizer, frames: np.ndarray, batch: int) -> list[np.ndarray]:
    batch_fn = getattr(localizer, "localize_batch", None)
    out: list[np.ndarray] = []
    if callable(batch_fn) and batch > 1:
        for i in range(0, len(frames), batch):
            out += [as_xyz_um(r) for r in batch_fn(frames[i : i + batch], first_index=i)]
    else:
        out = [as_xyz_um(localizer.localize(f, frame_index=i)) for i, f in enumerate(frames)]
    if len(out) != len(frames):
        raise RuntimeError(f"localizer returned {len(out)} results for {len(frames)} frames")
    return out


def run_point(
    localizer: FrameLocalizer,
    spec: PointSpec,
    *,
    renderer: Renderer,
    geometry: Geometry,
    settings: Settings,
    rng: np.random.Generator,
    peak_fraction: float,
    bound_model: BoundModel | None = None,
) -> PointResult:
    """Render ``spec.frames`` frames, localize them, score against the truth (and, with a
    ``bound_model``, against the Cramér–Rao bounds of the calibration model)."""
    mic = renderer.microscope
    exp = exposure_for_snr(
        spec.snr_db,
        peak_fraction=peak_fraction,
        microscope=mic,
        background_photons=settings.background_photons,
    )
    px = geometry.pixel_size_um
    qe = mic.camera.quantum_efficiency
    noise_e2 = qe * exp.background_photons + mic.noise_floor_e2
    frames = np.empty((spec.frames, *geometry.shape), dtype=np.uint16)
    truths: list[np.ndarray] = []
    truth_photons: list[np.ndarray] = []
    sig2 = var = 0.0
    for i in range(spec.frames):
        scene = random_scene(rng, spec.n_emitters, geometry, spec.intensity_range)
        truth_photons.append(scene.intensity * exp.photons_per_intensity)
        photons = renderer.expected_photons(
            scene.xyz_um[:, 0] / px,
            scene.xyz_um[:, 1] / px,
            scene.xyz_um[:, 2],
            truth_photons[-1],
        )
        s_e = qe * photons
        sig2 += float(np.sum(s_e * s_e))
        var += float(np.sum(s_e) + s_e.size * noise_e2)
        frames[i] = renderer.expose(photons, exp.background_photons, rng)
        truths.append(scene.xyz_um)
    t0 = time.perf_counter()
    preds = _localize_all(localizer, frames, settings.batch)
    spf = (time.perf_counter() - t0) / spec.frames
    scores, pairs = score_frames_with_ci(preds, truths, settings.tolerances_um, rng)
    for key, s in scores.items():
        s.update(bias_and_spread(pairs[key][:, 3:6]))
    bounds = None
    if bound_model is not None:
        bounds = bound_model.point(truths, truth_photons, exp.background_photons, geometry.shape)
        for key, s in scores.items():
            s.update(bounds.summary(pairs[key][:, 6], s["rmse_lateral_um"], s["rmse_axial_um"]))
    image_snr = 10 * math.log10(sig2 / var) if sig2 > 0 and var > 0 else float("nan")
    saturated = float(np.mean(frames >= mic.camera.max_adu))
    return PointResult(spec, exp, image_snr, spf, saturated, scores, pairs, bounds)


def evaluate(
    localizer: FrameLocalizer,
    settings: Settings | None = None,
    *,
    z_range_um: tuple[float, float],
    microscope: Microscope | None = None,
    model_info: dict[str, Any] | None = None,
    progress: Callable[[PointResult], None] | None = None,
    psf: PSFModel | None = None,
    calibration: Calibration | None = None,
) -> Report:
    """Run all experiments of ``settings`` on ``localizer``; returns the `Report`.

    ``calibration``: the model the Cramér–Rao bounds and the ideal recall are computed
    from (`focaltrack.models.evaluate_bounds`); default the localizer's ``calibration``
    if it has one; without one the report has no bounds.
    """
    settings = settings or Settings()
    microscope = microscope or Microscope()
    geometry = Geometry(
        pixel_size_um=microscope.pixel_size_um,
        field_um=settings.field_um,
        margin_um=settings.margin_um,
        z_range_um=(float(z_range_um[0]), float(z_range_um[1])),
    )
    if not geometry.z_range_um[1] > geometry.z_range_um[0]:
        raise ValueError(f"empty depth range {z_range_um}")
    renderer = Renderer(microscope, geometry.shape, psf)
    peak = renderer.peak_fraction(geometry.z_ref_um)
    t0 = time.perf_counter()
    if calibration is None and isinstance(getattr(localizer, "calibration", None), Calibration):
        calibration = localizer.calibration  # type: ignore[attr-defined]
    bound_model = (
        BoundModel(calibration, microscope, renderer, z_range_um=geometry.z_range_um)
        if calibration is not None and settings.bounds
        else None
    )
    points: list[PointResult] = []
    for k, spec in enumerate(settings.specs()):
        # Each point has its own stream: a point's frames do not depend on which others run.
        rng = np.random.default_rng(
            [
                settings.seed,
                _stable_id(spec.experiment),
                round(spec.snr_db * 100) + 10**6,
                spec.n_emitters,
            ]
        )
        res = run_point(
            localizer,
            spec,
            renderer=renderer,
            geometry=geometry,
            settings=settings,
            rng=rng,
            peak_fraction=peak,
            bound_model=bound_model,
        )
        points.append(res)
        log.info(
            "evaluate %d/%d %s %s: J=%.3f",
            k + 1,
            len(settings.specs()),
            spec.experiment,
            spec.label,
            res.scores[tolerance_key(settings.tolerances_um[0])]["jaccard"],
        )
        if progress is not None:
            progress(res)
    return Report(
        settings=settings,
        microscope=microscope,
        geometry=geometry,
        model=dict(model_info or {}),
        points=points,
        wall_s=time.perf_counter() - t0,
        bounds=None if bound_model is None else bound_model.info(),
    )


def _stable_id(name: str) -> int:
    return sum((i + 1) * ord(c) for i, c in enumerate(name))

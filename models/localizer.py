"""The localizer: raw camera frames in, 3D localizations out (frame by frame or in batches).

Per frame (DESIGN.md "Data flow"):

1. checks: 2-D, finite, integer values within the calibration's bit depth;
2. `Preprocess` (the synthesizer's exact function: offset, gain, asinh) on the device;
3. `LateralNet` once over the whole frame (edge-padded to a multiple of 32), 3×3 max-pool
   peak finding on the 1/4-resolution probability map, sub-pixel offsets added;
4. one window per detection (128 × 128 px, centred on the detection's pixel), gathered
   with one advanced-indexing call, through `AxialNet` as one batch;
5. z peaks: local maxima of the z-bin probabilities whose *mass* (Σ p over the peak ± 2
   bins, ≈ 1 for a present emitter) passes the axial threshold, separated by ≥ 3 bins; z is
   the probability-weighted mean over the same bins (sub-bin: exact for the triangle
   targets the network is trained on); several peaks → several emitters;
6. lateral position of each z peak: the window centre plus the axial network's offset for
   that peak (probability-weighted over the same bins), so emitters found in one window
   each get their own position; a bundle without offsets (schema 1) uses the lateral
   detector's sub-pixel position for every peak;
7. duplicates (one emitter found from two windows) within ``merge_px`` laterally and
   ``merge_um`` axially are merged, keeping the higher score;
8. with ``passes`` ≥ 2: the found emitters are fitted (least squares of the PSF table),
   subtracted, and the networks run again on the residual, finding emitters their
   neighbours hid;
9. the last step (``fit="spline"``, the default): every emitter fitted by Poisson maximum
   likelihood of the calibration's cubic spline, from the networks' positions
   (`focaltrack.models.refine`): each localization at the photons' precision with its
   σ_x, σ_y, σ_z (the Cramér–Rao bound at the fit), photons, background and flags; with
   ``passes`` ≥ 2, a matched filter of the calibration's deep slices then searches the
   fit's residual for the deep rings the networks still missed
   (`focaltrack.models.residual_search`), which are fitted with their neighbours; those
   the fit cannot tell from noise (photons under ``min_significance`` σ) are dropped.
   ``fit="none"``: the networks' (or the residual passes') positions, flagged NOT_FITTED.

``score`` = lateral probability × min(1, axial mass), in [0, 1]; for an emitter the
matched filter found, min(1, SNR / (2 × its threshold)).
Coordinates: x = column × pixel size, y = row × pixel size (centre of pixel (0, 0) is
(0, 0)); z in the calibration's convention (distance from the focal plane, µm).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from focaltrack.calibration import Calibration
from focaltrack.calibration.preprocess import Preprocess
from focaltrack.common.errors import FocaltrackError
from focaltrack.models.bundle import ModelBundle, load_bundle
from focaltrack.models.nets import AxialNet, LateralNet, fuse_batchnorm
from focaltrack.models.psf_fit import PSFFit, PSFFitter
from focaltrack.models.refine import Refined, SplineRefiner, concat_refined
from focaltrack.models.residual_search import MatchedFilter
from focaltrack.records import Localizations as Localizations  # the localizer's result type

PIXEL_SIZE_TOLERANCE = 0.01  # relative
FIT_CHOICES = ("spline", "none")
#: A matched-filter find with less than this share of the photons of a brighter emitter
#: whose light it lies in is that emitter's model error, not an emitter (`_under_brighter`)
FIND_MIN_RATIO = 0.1
#: Two fitted emitters closer than this (px, laterally) and than one calibration step in z
#: are one emitter fitted twice (`_duplicates`)
DUPLICATE_PX = 2.0


class LocalizerError(FocaltrackError, ValueError):
    """Frames or settings the model cannot be applied to: the message says why."""


@dataclass(frozen=True, slots=True)
class DecodeSettings:
    lateral_threshold: float = 0.4
    axial_threshold: float = 0.5
    min_peak_separation_bins: int = 3
    merge_px: float = 4.0
    merge_um: float = 4.0
    # passes ≥ 2: fit the calibration PSF to what was found, subtract it, run the networks on
    # the rest (passes − 1 times), then report every emitter at its fitted position. 2 by
    # default, live and offline (the service's `analysis.passes` = 0 runs the model's
    # setting); `passes = 1` with `fit = "none"` is the networks alone, at camera rate
    passes: int = 2
    residual_threshold: float = 0.3  # min score of an emitter found in a residual
    # an emitter found in a residual this close to an earlier one (both) is the misfit's
    # remainder, not a new emitter: a deep ring fitted 1 px off leaves a ring-shaped residue
    residual_exclusion_px: float = 6.0
    residual_exclusion_um: float = 10.0
    residual_exclusion_frac: float = 0.08  # lateral reach per µm of defocus (see `_near`)
    fit_sweeps: int = 2
    search_px: int = 3  # final fit: whole-pixel search before Gauss–Newton (`PSFFitter.fit`)
    residual_search_px: int = 0  # the fits whose residual is searched
    # passes ≥ 2: an emitter whose fitted amplitude is less than this many standard errors
    # above zero is dropped (`PSFFitter.significance`): most false positives, few emitters
    min_significance: float = 6.0
    # passes ≥ 2 and fit "spline": the spline fit's residual is searched by a matched
    # filter of the calibration's deep slices (`focaltrack.models.residual_search`) for
    # emitters the networks missed: peaks of at least this SNR, the highest within
    # ``matched_filter_nms_px``, added and the frame fitted again, ``matched_filter_rounds``
    # times; the fit's significance cut drops the finds it does not keep. 0: off. A second
    # round finds what the first one's finds hid (their peaks suppress others within
    # ``matched_filter_nms_px``): +0.02 Jaccard at 10 and 20 dB and with 32 per frame on
    # `evaluate`'s frames, for about 1.3× the frame's time (docs/models.md)
    matched_filter_snr: float = 5.0
    matched_filter_nms_px: int = 31
    matched_filter_rounds: int = 2
    # the last step: "spline" fits every localization by Poisson maximum likelihood of the
    # calibration's spline PSF (`focaltrack.models.refine`: positions at the photons'
    # precision, each with its σ, photons, background and flags); "none" reports the
    # networks' (one pass) or the residual passes' least-squares positions, flagged
    # NOT_FITTED
    fit: str = "spline"

    @classmethod
    def from_meta(cls, d: dict[str, Any] | None) -> DecodeSettings:
        d = d or {}
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


@dataclass
class Candidates:
    """One frame's network outputs before thresholds (detections at a low threshold)."""

    y_px: torch.Tensor  # (M,)
    x_px: torch.Tensor
    p_lat: torch.Tensor
    p_ax: torch.Tensor  # (M, Z)
    off_ax: torch.Tensor | None = None  # (M, 2, Z) per-bin (dy, dx) / offset_scale
    crop_y: torch.Tensor | None = None  # (M,) window centre pixel (row)
    crop_x: torch.Tensor | None = None  # (M,) window centre pixel (column)
    offset_scale: float = 1.0  # px per offset unit (the training label radius)
    extra: dict[str, Any] = field(default_factory=dict)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when set (e.g. to share a machine), else all usable cores (≤ 8)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


class Localizer:
    """Applies a trained bundle to frames. Usable frame by frame by the service."""

    candidate_threshold = 0.05  # lateral peaks kept for decoding (thresholds apply later)

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        device: str | None = None,
        threads: int | None = None,
        pixel_size_um: float | None = None,
        force: bool = False,
        passes: int | None = None,
        fit: str | None = None,
    ) -> None:
        self.device = torch.device(device or default_device())
        if self.device.type == "cpu":
            torch.set_num_threads(threads or default_threads())
        self.bundle = bundle
        self.meta = bundle.meta
        self.calibration: Calibration = bundle.calibration
        self.z_um: np.ndarray = np.asarray(self.calibration.z_um, dtype=np.float64)
        self.bit_depth: int = int(self.calibration.bit_depth)
        self.model_pixel_size_um = float(self.calibration.pixel_size_um)
        self.force = force
        if pixel_size_um is not None:
            rel = abs(pixel_size_um - self.model_pixel_size_um) / self.model_pixel_size_um
            if rel > PIXEL_SIZE_TOLERANCE and not force:
                raise LocalizerError(
                    f"frames have {pixel_size_um:g} µm pixels but the model was trained for "
                    f"{self.model_pixel_size_um:g} µm (calibration "
                    f"{self.calibration.sha256[:12]}); calibrate and train at this pixel size, "
                    "or override with --force (coordinates then use the frames' pixel size)"
                )
        self.pixel_size_um: float = float(pixel_size_um or self.model_pixel_size_um)
        self.pre = Preprocess(**self.meta["preprocess"])
        self.decode = _overridden(
            DecodeSettings.from_meta(self.meta.get("decode")), passes=passes, fit=fit
        )
        self.lateral: LateralNet = bundle.lateral
        self.axial: AxialNet = bundle.axial
        cl = torch.channels_last
        # torch's stubs leave out Module.to's documented ``memory_format`` keyword.
        lat_net = fuse_batchnorm(_clone(bundle.lateral))
        ax_net = fuse_batchnorm(_clone(bundle.axial))
        self._lat = lat_net.to(self.device, memory_format=cl)  # type: ignore[call-overload]
        self._ax = ax_net.to(self.device, memory_format=cl)  # type: ignore[call-overload]
        self._lat.eval()
        self._ax.eval()
        self.stride = self.lateral.stride
        self.window = self.axial.cfg.window
        self._z = torch.as_tensor(self.z_um, dtype=torch.float32, device=self.device)
        synth = self.meta.get("training", {}).get("settings", {}).get("synth", {})
        self.offset_scale = float(synth.get("axial_label_radius_px", 1.0))

    @classmethod
    def from_bundle(
        cls,
        path: str | os.PathLike[str],
        *,
        device: str | None = None,
        threads: int | None = None,
        pixel_size_um: float | None = None,
        force: bool = False,
        passes: int | None = None,
        fit: str | None = None,
    ) -> Localizer:
        """Load a bundle. ``pixel_size_um``: the frames' pixel size, checked against the
        model's (1 % tolerance) unless ``force``; ``passes``: overrides the bundle's (1: the
        networks alone; ≥ 2: also fit, subtract and search the residual); ``fit``: the last
        step, ``"spline"`` (default) or ``"none"`` (see `DecodeSettings.fit`)."""
        bundle = load_bundle(Path(path), device="cpu")
        return cls(
            bundle,
            device=device,
            threads=threads,
            pixel_size_um=pixel_size_um,
            force=force,
            passes=passes,
            fit=fit,
        )

    # ------------------------------------------------------------------ checks
    def check_frames(self, frames: np.ndarray) -> np.ndarray:
        """(N, H, W) raw frames, validated; returns them as an array."""
        a = np.asarray(frames)
        if a.ndim != 3:
            raise LocalizerError(f"frames must be (N, H, W), got shape {a.shape}")
        if a.shape[0] == 0:
            raise LocalizerError("no frames to localize")
        if min(a.shape[1:]) < 8:
            raise LocalizerError(f"frames of {a.shape[1]}×{a.shape[2]} px are too small")
        if a.dtype.kind not in "uif":
            raise LocalizerError(f"frames must be numeric images, got dtype {a.dtype}")
        max_adu = (1 << self.bit_depth) - 1
        if a.dtype.kind == "f":
            if not np.all(np.isfinite(a)):
                raise LocalizerError("frames contain NaN or infinite values")
        elif a.dtype.itemsize * 8 < self.bit_depth and not self.force:
            raise LocalizerError(
                f"frames are {a.dtype.itemsize * 8}-bit ({a.dtype}) but the model's calibration "
                f"was {self.bit_depth}-bit: wrong camera setting? (override with --force)"
            )
        if not self.force and a.size:
            lo, hi = float(a.min()), float(a.max())
            if hi > max_adu or lo < 0:
                raise LocalizerError(
                    f"frame values {lo:g}…{hi:g} ADU are outside the calibration's "
                    f"{self.bit_depth}-bit range 0…{max_adu}: wrong bit depth or not raw "
                    "camera frames (override with --force)"
                )
        return a

    # -------------------------------------------------------------- inference
    def localize(
        self,
        frame: np.ndarray,
        *,
        frame_index: int = 0,
        threshold: float | None = None,
        passes: int | None = None,
        fit: str | None = None,
    ) -> Localizations:
        """One (H, W) raw ADU frame → its localizations. ``threshold``: lateral detection
        threshold (default: the bundle's, chosen on validation data); ``passes``, ``fit``:
        see `localize_batch`."""
        a = np.asarray(frame)
        if a.ndim != 2:
            raise LocalizerError(f"a frame must be a 2-D (H, W) image, got shape {a.shape}")
        return self.localize_batch(
            a[None], first_index=frame_index, threshold=threshold, passes=passes, fit=fit
        )[0]

    def localize_batch(
        self,
        frames: np.ndarray,
        *,
        first_index: int = 0,
        threshold: float | None = None,
        passes: int | None = None,
        fit: str | None = None,
    ) -> list[Localizations]:
        """(N, H, W) raw ADU frames → one `Localizations` per frame. ``passes``: 1 for the
        networks alone, ≥ 2 to fit, subtract and search the residual; ``fit``: the last
        step, ``"spline"`` or ``"none"`` (defaults: this localizer's settings)."""
        a = self.check_frames(frames)
        settings = _overridden(self.decode, threshold=threshold, passes=passes, fit=fit)
        # only detections above the threshold go through the axial network
        x = self._input(a)
        cands = self._candidates(x, settings.lateral_threshold)
        locs = [self.to_localizations(c, first_index + i, settings) for i, c in enumerate(cands)]
        if settings.passes == 1 and settings.fit == "none":
            return locs
        px = self.pixel_size_um
        xyz = [np.stack([lc.x_um / px, lc.y_um / px, lc.z_um], 1) for lc in locs]
        score = [np.asarray(lc.score) for lc in locs]
        e = self._electrons(a)
        if settings.passes > 1:
            xyz, score = self._residual_passes(e, xyz, score, settings)
            if settings.fit == "none":
                return self._least_squares(e, locs, xyz, score, settings)
        return [
            self._fit_spline(a[i], e[i], lc.frame, xyz[i], score[i], settings)
            for i, lc in enumerate(locs)
        ]

    # ------------------------------------------------------------- the last step
    @cached_property
    def refiner(self) -> SplineRefiner:
        """The spline maximum-likelihood fit (built on first use)."""
        return SplineRefiner(self.calibration, device=self.device)

    def _fit_spline(
        self,
        frame: np.ndarray,
        e: torch.Tensor,
        frame_index: int,
        xyz_px: np.ndarray,
        score: np.ndarray,
        st: DecodeSettings,
    ) -> Localizations:
        """One frame's localizations fitted (`focaltrack.models.refine`; ``frame`` raw
        ADU, ``e`` the same in photo-electrons); those the fit cannot tell from noise
        (photons under ``min_significance`` σ) are dropped: the networks' false positives,
        most of them.

        The fit starts where the least-squares fit of the PSF table puts each emitter
        (`PSFFitter.fit`, with its whole-pixel search: up to 8 px for a lone ring 100 µm
        deep, whose networks' position can be that far off and whose likelihood has
        local optima a pixel apart): isolated bright emitters on `evaluate`'s frames
        0.39 / 0.85 µm lateral / axial RMSE from the networks' positions, 0.15 / 0.36 µm
        from these."""
        if len(xyz_px):
            start = self._fit(self.fitter, e, xyz_px, st, st.search_px)
            xyz_px = torch.stack([start.x_px, start.y_px, start.z_um], 1).double().cpu().numpy()
        r = self.refiner.fit(frame, xyz_px)
        if st.passes > 1 and st.matched_filter_snr > 0:
            r, score = self._search_residual(frame, e, r, score, st)
        if st.min_significance > 0 and len(score):
            keep = r.significance >= st.min_significance
            r, score = r.take(keep), score[keep]
        if len(score) > 1:
            # two starts that converged onto one emitter: each was fitted against the
            # other's model of the sweep before, so both keep its whole light (seen with
            # two rounds of the matched filter: 3–6 of 30–60 false positives on
            # `evaluate`'s crowded frames, at the same place, z and photons)
            keep = ~_duplicates(r, DUPLICATE_PX, self.refiner.psf.z_step_um)
            r, score = r.take(keep), score[keep]
        px = self.pixel_size_um
        return Localizations(
            frame_index,
            r.x_px * px,
            r.y_px * px,
            r.z_um,
            score,
            sigma_x_um=r.sigma_x_px * px,
            sigma_y_um=r.sigma_y_px * px,
            sigma_z_um=r.sigma_z_um,
            photons=r.photons,
            background=r.background,
            flags=r.flags,
        )

    # ------------------------------------------------------------ residual passes
    @cached_property
    def fitter(self) -> PSFFitter:
        """The calibration-PSF fitter (built on first use: a 100-MB table)."""
        return PSFFitter(self.calibration, device=self.device)

    @torch.inference_mode()
    def _residual_passes(
        self,
        e: torch.Tensor,
        xyz: list[np.ndarray],
        score: list[np.ndarray],
        st: DecodeSettings,
    ) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Fit what was found (least squares of the PSF table), subtract it, search the
        residual; repeat: every frame's emitters (x px, y px, z µm) and scores, the new
        ones after the networks'. ``e``: the frames in photo-electrons. Batched over frames
        for the networks, per frame for the fit."""
        fitter = self.fitter
        px = self.pixel_size_um
        xyz, score = list(xyz), list(score)
        for _ in range(st.passes - 1):
            residual = torch.stack(
                [
                    fitter.residual(
                        e[i], self._fit(fitter, e[i], xyz[i], st, st.residual_search_px)
                    )
                    for i in range(len(e))
                ]
            )
            cands = self._candidates(torch.asinh(residual / self.pre.s0_e), st.lateral_threshold)
            found = 0
            for i, c in enumerate(cands):
                x2, y2, z2, s2 = decode_candidates(c, self._z, st)
                new = s2 >= st.residual_threshold
                if len(xyz[i]) and new.any():
                    new &= ~_near(np.stack([x2, y2, z2], 1), xyz[i], st, px).any(1)
                if new.any():
                    xyz[i] = np.concatenate([xyz[i], np.stack([x2, y2, z2], 1)[new]])
                    score[i] = np.concatenate([score[i], s2[new]])
                    found += int(new.sum())
            if not found:
                break
        return xyz, score

    @cached_property
    def matched_filter(self) -> MatchedFilter:
        """The residual's matched filter (built on first use)."""
        return MatchedFilter(self.calibration, device=self.device)

    def _search_residual(
        self, frame: np.ndarray, e: torch.Tensor, r: Refined, score: np.ndarray, st: DecodeSettings
    ) -> tuple[Refined, np.ndarray]:
        """One frame's fit ``r`` with the emitters the matched filter finds in its residual
        (`focaltrack.models.residual_search`) added and the frame fitted again:
        ``st.matched_filter_rounds`` rounds of subtract, search, fit. A find's score is its
        SNR over twice the threshold, at most 1 (0.5 at the threshold).

        The residual is the spline fit's (the frame less every fitted emitter and the
        median of their backgrounds): a search of the least-squares table fit's residual
        found as many emitters at 10 dB but, at 20 dB, the remainders of bright deep
        rings that model leaves (Jaccard 0.83 → 0.75 on 20 emitters)."""
        refiner, mf = self.refiner, self.matched_filter
        px = self.pixel_size_um
        read_var = float(self.pre.read_noise_e) ** 2
        ee = e.to(refiner.device, torch.float32)
        shape = (int(ee.shape[0]), int(ee.shape[1]))
        for _ in range(max(0, st.matched_filter_rounds)):
            xyz = np.stack([r.x_px, r.y_px, r.z_um], 1)
            if len(xyz):
                image = _light(refiner, shape, r).to(torch.float32)
                back = float(np.median(r.background))
            else:
                image = torch.zeros_like(ee)
                back = float(torch.median(ee))
            found, snr = mf.search(
                ee - image - back,
                (image + back).clamp_min(0.0) + read_var,
                threshold=st.matched_filter_snr,
                nms_px=st.matched_filter_nms_px,
            )
            if len(xyz) and len(found):
                new = ~_near(found, xyz, st, px).any(1)
                found, snr = found[new], snr[new]
            if not len(found):
                break
            s = np.minimum(1.0, snr / (2.0 * st.matched_filter_snr))
            # fitted again: the finds and the emitters whose windows overlap theirs; the
            # others are held at their fit, their light taken from the frame (in a 512²
            # frame of 20 emitters most of them: the search then costs half as much)
            again = _overlapping(
                xyz, found, refiner.window_for(xyz[:, 2]), refiner.window_for(found[:, 2])
            )
            hold = np.nonzero(~again)[0]
            held = _light(refiner, shape, r.take(hold)) if len(hold) else None
            refit = np.nonzero(again)[0]
            sub = refiner.fit(frame, np.concatenate([xyz[refit], found]), held=held)
            r = concat_refined(r.take(hold), sub)
            score = np.concatenate([score[hold], score[refit], s.astype(score.dtype)])
            keep = ~_under_brighter(r, len(hold) + len(refit), refiner.window_for(r.z_um))
            if not keep.all():
                r, score = r.take(keep), score[keep]
        return r, score

    def _electrons(self, frames: np.ndarray) -> torch.Tensor:
        """Raw ADU frames (N, H, W) in photo-electrons on the device (the preprocessing's
        offset and gain)."""
        a = torch.from_numpy(np.ascontiguousarray(frames).astype(np.float32, copy=False))
        return (a.to(self.device) - self.pre.offset_adu) * self.pre.gain_e_per_adu

    @torch.inference_mode()
    def _least_squares(
        self,
        e: torch.Tensor,
        locs: list[Localizations],
        xyz: list[np.ndarray],
        score: list[np.ndarray],
        st: DecodeSettings,
    ) -> list[Localizations]:
        """``fit="none"`` after residual passes: the PSF table's least-squares positions
        (the method before the spline fit), flagged NOT_FITTED (no σ). ``e``: the frames
        in photo-electrons."""
        fitter = self.fitter
        px = self.pixel_size_um
        out = []
        for i, lc in enumerate(locs):
            fit = self._fit(fitter, e[i], xyz[i], st, st.search_px)
            if st.min_significance > 0 and len(xyz[i]):
                # drop what the fit cannot tell from noise (see `PSFFitter.significance`),
                # then fit the rest again without it
                sig = fitter.significance(fit, self.pre.read_noise_e).cpu().numpy()
                keep = sig >= st.min_significance
                if not keep.all():
                    xyz[i], score[i] = xyz[i][keep], score[i][keep]
                    fit = self._fit(fitter, e[i], xyz[i], st, st.search_px)
            x = fit.x_px.double().cpu().numpy()
            y = fit.y_px.double().cpu().numpy()
            z = fit.z_um.double().cpu().numpy()
            out.append(Localizations(lc.frame, x * px, y * px, z, score[i]))
        return out

    @staticmethod
    def _fit(
        fitter: PSFFitter, e: torch.Tensor, xyz_px: np.ndarray, st: DecodeSettings, search: int
    ) -> PSFFit:
        p = torch.as_tensor(xyz_px, dtype=torch.float32, device=fitter.device).reshape(-1, 3)
        return fitter.fit(e, p[:, 0], p[:, 1], p[:, 2], sweeps=st.fit_sweeps, search_px=search)

    def candidates(self, frames: np.ndarray, min_p_lat: float | None = None) -> list[Candidates]:
        """Network outputs for (N, H, W) checked frames: lateral peaks with probability
        ≥ ``min_p_lat`` (default: a low candidate threshold, for choosing thresholds) and
        their axial outputs."""
        thr = self.candidate_threshold if min_p_lat is None else min_p_lat
        return self._candidates(self._input(frames), thr)

    def _input(self, frames: np.ndarray) -> torch.Tensor:
        """Raw ADU frames → the networks' input (N, H, W) on the device."""
        x = torch.from_numpy(np.ascontiguousarray(frames).astype(np.float32, copy=False))
        return self.pre(x.to(self.device))

    @torch.inference_mode()
    def _candidates(self, x: torch.Tensor, thr: float) -> list[Candidates]:
        """Network outputs for preprocessed (N, H, W) input: lateral peaks ≥ ``thr``."""
        n, h, w = x.shape
        s = self.stride
        mult = self.lateral.multiple
        ph, pw = (-h) % mult, (-w) % mult
        # pad to a multiple of 32 by repeating the last row/column: a band of zeros would be
        # a dark stripe the network never saw in training (its patches are multiples of 32)
        xp = F.pad(x[:, None], (0, pw, 0, ph), mode="replicate") if ph or pw else x[:, None]
        lat = self._lat(xp)
        prob = torch.sigmoid(lat[:, 0])
        peak = (F.max_pool2d(prob[:, None], 3, 1, 1)[:, 0] == prob) & (prob >= thr)
        fi, ci, cj = torch.nonzero(peak, as_tuple=True)
        half = (s - 1) / 2
        y = ci.float() * s + half + lat[fi, 1, ci, cj] * s
        xx = cj.float() * s + half + lat[fi, 2, ci, cj] * s
        p_lat = prob[fi, ci, cj]
        inside = (y > -0.5) & (y < h - 0.5) & (xx > -0.5) & (xx < w - 0.5)
        fi, y, xx, p_lat = fi[inside], y[inside], xx[inside], p_lat[inside]
        # windows centred on the detections' pixels (the synthesizer's convention)
        win = self.window
        c = win // 2
        padded = F.pad(x, (c, win - c, c, win - c))
        ry = torch.round(y).long().clamp_(0, h - 1)
        rx = torch.round(xx).long().clamp_(0, w - 1)
        nz = len(self.z_um)
        off: torch.Tensor | None = None
        if len(fi):
            # one strided view per detection, then one stack (a gather with (N, S, S) index
            # tensors moves 3 × 8 bytes of indices per pixel and is several times slower)
            crops = torch.stack(
                [
                    padded[f, r : r + win, q : q + win]
                    for f, r, q in zip(fi.tolist(), ry.tolist(), rx.tolist(), strict=True)
                ]
            )
            out_ax = self._ax(crops[:, None])
            p_ax = torch.sigmoid(out_ax[:, 0])
            if out_ax.shape[1] == 3:
                off = out_ax[:, 1:]
        else:
            p_ax = torch.zeros((0, nz), device=self.device)
            if self.axial.cfg.offsets:
                off = torch.zeros((0, 2, nz), device=self.device)
        out: list[Candidates] = []
        for i in range(n):
            m = fi == i
            out.append(
                Candidates(
                    y[m], xx[m], p_lat[m], p_ax[m],
                    off_ax=None if off is None else off[m],
                    crop_y=ry[m].float(), crop_x=rx[m].float(),
                    offset_scale=self.offset_scale,
                )
            )  # fmt: skip
        return out

    def to_localizations(
        self, c: Candidates, frame_index: int, settings: DecodeSettings | None = None
    ) -> Localizations:
        st = settings or self.decode
        x_px, y_px, z, score = decode_candidates(c, self._z, st)
        px = self.pixel_size_um
        return Localizations(
            frame=int(frame_index),
            x_um=x_px * px,
            y_um=y_px * px,
            z_um=z,
            score=score,
        )


def decode_candidates(
    c: Candidates, z_grid: torch.Tensor, st: DecodeSettings
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Thresholds, z peaks (sub-bin), duplicate merging → pixel x, y, z µm, score."""
    keep = c.p_lat >= st.lateral_threshold
    p = c.p_ax[keep]
    if p.shape[0] == 0:
        e = np.zeros(0)
        return e, e.copy(), e.copy(), e.copy()
    m, nz = p.shape
    h = st.min_peak_separation_bins - 1  # half-width of a peak's window, in bins
    lo = torch.full((m, 1), -1.0, device=p.device)
    left = torch.cat([lo, p[:, :-1]], 1)
    right = torch.cat([p[:, 1:], lo], 1)
    # mass: Σ p over the peak's window (≈ 1 per present emitter, however spread)
    kern = torch.ones(1, 1, 2 * h + 1, device=p.device)
    mass = F.conv1d(p[:, None], kern, padding=h)[:, 0]
    is_peak = (p >= left) & (p > right) & (mass >= st.axial_threshold)
    # keep the strongest peak within ± h bins
    qp = torch.where(is_peak, mass, torch.zeros_like(mass))
    is_peak &= F.max_pool1d(qp[:, None], 2 * h + 1, 1, h)[:, 0] == qp
    di, bi = torch.nonzero(is_peak, as_tuple=True)
    # sub-bin z: probability-weighted mean over the peak's window
    off = torch.arange(-h, h + 1, device=p.device)
    idx = bi[:, None] + off[None, :]
    valid = (idx >= 0) & (idx < nz)
    idx = idx.clamp(0, nz - 1)
    w = p[di[:, None], idx] * valid
    z = (w * z_grid[idx]).sum(1) / w.sum(1).clamp_min(1e-6)
    score = c.p_lat[keep][di] * mass[di, bi].clamp_max(1.0)
    if c.off_ax is not None and c.crop_y is not None and c.crop_x is not None:
        # each peak's own position: window centre + its offset, weighted like z
        o = c.off_ax[keep].permute(0, 2, 1)[di[:, None], idx]  # (P, window, 2)
        ws = w.sum(1).clamp_min(1e-6)
        y = c.crop_y[keep][di] + (w * o[..., 0]).sum(1) / ws * c.offset_scale
        x = c.crop_x[keep][di] + (w * o[..., 1]).sum(1) / ws * c.offset_scale
    else:
        y = c.y_px[keep][di]
        x = c.x_px[keep][di]
    if len(z) > 1:
        # merge duplicates: a weaker localization near a stronger one is dropped
        order = torch.argsort(score, descending=True)
        x, y, z, score = x[order], y[order], z[order], score[order]
        dxy = torch.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :])
        dz = (z[:, None] - z[None, :]).abs()
        close = (dxy <= st.merge_px) & (dz <= st.merge_um)
        close = torch.triu(close, diagonal=1)  # i < j: i is stronger
        # greedy: j dropped if close to any kept stronger i (iterate; N is small)
        dropped = torch.zeros(len(z), dtype=torch.bool, device=z.device)
        for j in torch.nonzero(close.any(0)).flatten().tolist():
            if bool((close[:, j] & ~dropped).any()):
                dropped[j] = True
        keep2 = ~dropped
        x, y, z, score = x[keep2], y[keep2], z[keep2], score[keep2]
    return (
        x.double().cpu().numpy(),
        y.double().cpu().numpy(),
        z.double().cpu().numpy(),
        score.double().cpu().numpy(),
    )


def _near(a: np.ndarray, b: np.ndarray, st: DecodeSettings, px_um: float) -> np.ndarray:
    """(A, B) bool: residual finds ``a`` (x px, y px, z µm) too close to earlier ``b`` to be
    new emitters. The lateral reach grows with defocus: a ring fitted slightly off leaves a
    remainder that the networks see as an emitter a few µm away, and rings grow with |z|."""
    dxy = np.hypot(a[:, None, 0] - b[None, :, 0], a[:, None, 1] - b[None, :, 1])
    reach = np.maximum(
        st.residual_exclusion_px, st.residual_exclusion_frac * np.abs(a[:, 2]) / px_um
    )
    dz = np.abs(a[:, None, 2] - b[None, :, 2])
    return (dxy < reach[:, None]) & (dz < st.residual_exclusion_um)


def _light(refiner: SplineRefiner, shape: tuple[int, int], r: Refined) -> torch.Tensor:
    """(H, W) Σ photons · PSF of the fitted emitters ``r`` (e⁻, without background)."""
    t = (torch.as_tensor(v) for v in (r.x_px, r.y_px, r.z_um, r.photons))
    return refiner.psf.render(shape, *t)


def _within(a: np.ndarray, b: np.ndarray, reach: np.ndarray) -> np.ndarray:
    """(A, B) bool: points ``a`` (A, ≥ 2: x, y px) less than ``reach`` (broadcast to
    (A, B)) from points ``b`` along both x and y."""
    dx = np.abs(a[:, None, 0] - b[None, :, 0])
    dy = np.abs(a[:, None, 1] - b[None, :, 1])
    return (dx < reach) & (dy < reach)


def _overlapping(
    xyz: np.ndarray, found: np.ndarray, window_px: np.ndarray, found_window_px: np.ndarray
) -> np.ndarray:
    """(n,) bool: the emitters ``xyz`` (x px, y px, z) whose fit windows (``window_px``)
    overlap the window of any of ``found``."""
    reach = 0.5 * (np.asarray(window_px)[:, None] + np.asarray(found_window_px)[None, :])
    return np.asarray(_within(xyz, found, reach).any(1))


def _duplicates(r: Refined, reach_px: float, reach_um: float) -> np.ndarray:
    """(n,) bool: the fits to drop as duplicates. Greedily, the most significant fit is
    kept and those within ``reach_px`` laterally and ``reach_um`` in z of it dropped, then
    the most significant of the rest, and so on (ties: the earlier row kept); a fit that
    is dropped drops no other. Computed in rounds over the close pairs (a k-d tree's), each
    keeping every fit that no remaining one beats, so the loop runs as many times as the
    longest chain of close fits, not once per fit."""
    from scipy.spatial import cKDTree

    n = len(r.x_px)
    ok = np.nonzero(np.isfinite(r.x_px) & np.isfinite(r.y_px) & np.isfinite(r.z_um))[0]
    tree = cKDTree(np.column_stack([r.x_px[ok], r.y_px[ok]]))
    pairs = ok[tree.query_pairs(reach_px, output_type="ndarray")].reshape(-1, 2)
    i, j = pairs[:, 0], pairs[:, 1]  # i < j
    close = np.abs(r.z_um[i] - r.z_um[j]) < reach_um
    i, j = i[close], j[close]
    sig = r.significance
    i_wins = sig[i] >= sig[j]  # ties: the earlier row (i < j)
    win, lose = np.where(i_wins, i, j), np.where(i_wins, j, i)
    kept = np.zeros(n, dtype=bool)
    alive = np.ones(n, dtype=bool)
    while alive.any():
        blocked = np.zeros(n, dtype=bool)
        blocked[lose[alive[win]]] = True
        now = alive & ~blocked
        kept |= now
        dropped = np.zeros(n, dtype=bool)
        dropped[lose[now[win]]] = True
        alive &= ~now & ~dropped
    return ~kept


def _under_brighter(r: Refined, first: int, window_px: np.ndarray) -> np.ndarray:
    """(n,) bool: the matched filter's finds (rows from ``first`` on) with less than
    `FIND_MIN_RATIO` of the photons of an emitter whose fit window (``window_px``, its
    light) holds them. The calibration model is off by a few per cent of an emitter's
    light; on a bright ring those few per cent mimic a faint emitter, which the fit keeps
    (its photons are many σ above zero: the σ counts the noise, not the model's error)."""
    out = np.zeros(len(r.x_px), dtype=bool)
    if first >= len(r.x_px):
        return out
    xy = np.column_stack([r.x_px, r.y_px])
    inside = _within(xy[first:], xy, 0.5 * np.asarray(window_px, dtype=np.float64)[None, :])
    brighter = r.photons[first:, None] < FIND_MIN_RATIO * r.photons[None, :]
    out[first:] = (inside & brighter).any(1)
    return out


def _clone(net: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(net).cpu().eval()


def _overridden(
    st: DecodeSettings,
    *,
    threshold: float | None = None,
    passes: int | None = None,
    fit: str | None = None,
) -> DecodeSettings:
    """``st`` with the lateral threshold, passes and last step given (None: kept), checked."""
    over: dict[str, Any] = {}
    if threshold is not None:
        over["lateral_threshold"] = float(threshold)
    if passes is not None:
        if int(passes) < 1:
            raise LocalizerError(f"passes must be ≥ 1, got {passes}")
        over["passes"] = int(passes)
    if fit is not None:
        over["fit"] = fit
    out = DecodeSettings(**{**_asdict(st), **over}) if over else st
    if out.fit not in FIT_CHOICES:
        raise LocalizerError(f"fit must be one of {', '.join(FIT_CHOICES)}, got {out.fit!r}")
    return out


def _asdict(s: DecodeSettings) -> dict[str, Any]:
    return {k: getattr(s, k) for k in s.__dataclass_fields__}


def nan_to_none(v: float) -> float | None:
    return None if not math.isfinite(v) else v

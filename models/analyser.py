"""One frame analyser: frame + stage position → localizations → tracks, live and offline.

The live service (daemon/pipeline.py) and the offline commands (`focaltrack localize`,
`focaltrack track`) all go through `FrameAnalyser`, so that a recording tracked offline gives
the tracks the service published while recording it.

The tracker works in absolute depth (``defocus_to_depth``: z_abs = stage z − defocus) so that
a focus move is not seen as motion of every emitter; the tracks come back as defocus at the
frame's focus (``tracks_at_focus``), like the localizations. A frame whose stage position is
unknown (NaN: a TIFF) is tracked in defocus as it is.

A tracker without a field of view takes the first analysed frame's (its width and height ×
the localizer's pixel size), so that live tracks end where they leave the camera's view;
offline, ``focaltrack track`` gives the tracker a recording's field itself.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import TYPE_CHECKING

import numpy as np

from focaltrack.models.tracker import KalmanTracker, defocus_to_depth, tracks_at_focus

if TYPE_CHECKING:
    from focaltrack.models.localizer import Localizer
    from focaltrack.models.track_types import TrackFrame
    from focaltrack.records import Localizations

__all__ = ["FrameAnalyser"]


class FrameAnalyser:
    """A localizer (optional: offline linking needs none) and one tracker run, frame by frame.

    Frames must come in strictly increasing ``t_acq_s`` (the tracker's rule)."""

    def __init__(self, localizer: Localizer | None, tracker: KalmanTracker) -> None:
        self.localizer = localizer
        self.tracker = tracker
        #: Seconds the localizer took on the last `analyse`d frame.
        self.last_inference_s = 0.0

    def analyse(
        self, pixels: np.ndarray, frame: int, t_acq_s: float, stage_z_um: float
    ) -> tuple[Localizations, TrackFrame]:
        """Localize one frame and track: its localizations (with ``stage_z_um``) and the
        tracks alive after it, z as defocus at this frame's focus."""
        if self.localizer is None:
            raise ValueError("this analyser has no localizer; use track_only")
        if self.tracker.field_um is None:
            px = self.localizer.pixel_size_um
            h, w = pixels.shape[-2:]
            self.tracker.field_um = (w * px, h * px)
        t0 = time.perf_counter()
        locs = self.localizer.localize(pixels, frame_index=frame)
        self.last_inference_s = time.perf_counter() - t0
        locs = dataclasses.replace(locs, stage_z_um=float(stage_z_um))
        return locs, self.track_only(locs, frame, t_acq_s, stage_z_um)

    def track_only(
        self,
        locs: Localizations,
        frame: int,
        t_acq_s: float,
        stage_z_um: float,
        *,
        with_scores: bool = True,
    ) -> TrackFrame:
        """Track one frame's existing localizations (offline linking). Rows with NaN or
        infinite values are left out and counted by the tracker (``rejected_count``);
        ``localization_row`` of the result indexes ``locs``' rows. ``with_scores=False``: the
        scores are not known (the tracker then keeps input order where scores would rank)."""
        del frame  # the tracks' frame is the caller's (`TrackFrame.record(frame)`)
        focus = float(stage_z_um)
        known = math.isfinite(focus)
        xyz = defocus_to_depth(locs.xyz_um, focus) if known else locs.xyz_um
        tracks = self.tracker.update_frame(
            xyz,
            t_acq_s,
            np.asarray(locs.score) if with_scores else None,
            locs.sigma_xyz_um,  # σ is the same in absolute depth: z ↦ f − z keeps it
        )
        return tracks_at_focus(tracks, focus) if known else tracks

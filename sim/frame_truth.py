"""The simulated microscope's ground truth in the coordinates the service publishes.

The simulated camera keeps, for every frame it renders, the true position of every
emitter, the focus and the sample's lateral drift (`focaltrack.drivers.simcore.SimFrameTruth`).
`truth_by_frame` turns that record into what a perfect localizer would have published for
each frame index — camera x, y and defocus z, on the frame and inside the calibrated range —
so published results can be scored against it (``focaltrack demo``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from focaltrack.sim.scene import GroundTruth


class RenderedFrameTruth(Protocol):
    """What the simulated camera records about one rendered frame (`SimFrameTruth`)."""

    @property
    def sequence_frame(self) -> int: ...  # frame number since the sequence started; -1: snap

    @property
    def t_sim_s(self) -> float: ...  # scene time

    @property
    def focus_z_um(self) -> float: ...

    @property
    def offset_xy_um(self) -> tuple[float, float]: ...  # lateral drift of the sample image

    @property
    def scene(self) -> GroundTruth | None: ...  # absolute positions, before drift


def visible_truth(
    entry: RenderedFrameTruth,
    shape_px: tuple[int, int],
    pixel_size_um: float,
    z_range_um: tuple[float, float],
) -> np.ndarray:
    """The emitters of one rendered frame in published coordinates, (N, 3) µm.

    x, y: position on the camera (the sample's lateral drift included), kept when the
    centre falls on the frame; z: defocus ``focus − z_abs``, kept inside the calibrated range.
    """
    scene = entry.scene
    if scene is None or len(scene) == 0:
        return np.zeros((0, 3))
    h, w = shape_px
    xyz = np.asarray(scene.xyz_um, dtype=np.float64)
    x = xyz[:, 0] + entry.offset_xy_um[0]
    y = xyz[:, 1] + entry.offset_xy_um[1]
    d = entry.focus_z_um - xyz[:, 2]
    half = 0.5 * pixel_size_um
    keep = (
        (x >= -half)
        & (x <= (w - 0.5) * pixel_size_um)
        & (y >= -half)
        & (y <= (h - 0.5) * pixel_size_um)
        & (d >= z_range_um[0])
        & (d <= z_range_um[1])
    )
    return np.stack([x[keep], y[keep], d[keep]], axis=1)


@dataclass(frozen=True, slots=True)
class TruthFrames:
    """Ground truth per published frame index, for the first stream of a driver's life."""

    xyz_um: dict[int, np.ndarray]
    t_sim_s: dict[int, float]
    n_streams: int


def truth_by_frame(
    truths: Iterable[RenderedFrameTruth],
    shape_px: tuple[int, int],
    pixel_size_um: float,
    z_range_um: tuple[float, float],
) -> TruthFrames:
    """Map the simulator's rendered frames to the driver's frame indices.

    The driver numbers a stream's frames from (last index + 1); a fresh driver's first
    stream starts at 0, and the camera's sequence frame ``k`` is its ``k``-th frame, so
    frame index = sequence frame for that stream. Snaps (sequence frame −1, the
    calibration's) are skipped; later streams (a camera restart) are left out, since their
    offset depends on frames the driver never delivered.
    """
    xyz: dict[int, np.ndarray] = {}
    t_sim: dict[int, float] = {}
    n_streams = 0
    prev = -1
    for e in truths:
        k = int(e.sequence_frame)
        if k < 0:
            continue
        if k <= prev or (prev < 0 and n_streams == 0):
            n_streams += 1
        prev = k
        if n_streams == 1:
            xyz[k] = visible_truth(e, shape_px, pixel_size_um, z_range_um)
            t_sim[k] = float(e.t_sim_s)
    return TruthFrames(xyz, t_sim, n_streams)


def alignment_error_s(t_acq_s: Mapping[int, float], t_sim_s: Mapping[int, float]) -> float | None:
    """Spread (max − min) of ``t_acq − t_sim`` over the frames both know, seconds.

    The simulated camera stamps frame ``k`` at its slot time and advances the scene by the
    same slots, so with the right frame ↔ truth mapping the difference is one constant; a
    spread of a frame period or more means the mapping is off.
    """
    common = sorted(set(t_acq_s) & set(t_sim_s))
    if not common:
        return None
    diff = np.array([t_acq_s[i] - t_sim_s[i] for i in common])
    return float(diff.max() - diff.min())

"""Moving emitters with ground truth: the sample the simulated microscope looks at.

Coordinates: micrometres in the sample. ``x, y`` lateral with pixel ``(row r, column c)``
centred at ``(x, y) = (c, r) · pixel_size``; ``z`` absolute depth in the same units as the
focus drive, so an emitter at ``z`` seen with the focus at ``f`` has defocus ``f − z``
(`focaltrack.sim.psf`). Brightness: detected photons per exposure.

Motion models (`Motion`):

* ``STATIC`` — nothing moves.
* ``BROWNIAN`` — free 3-D diffusion, each step ``N(0, 2·D·dt)`` per axis, so the mean squared
  displacement is ``6·D·t``; emitters reflect off the ends of the depth range.
* ``FLOW`` — directed motion at ``velocity_um_s`` (a vector, or a speed along +x), plus
  diffusion if ``diffusion_um2_s > 0``. Seed 002's blood cells: ≈ 75 µm/s at 100 fps, i.e.
  0.75 µm (≈ 1.2 px) per frame.

Emitters leave when they cross the lateral field (or, in flow, the depth range); each gets a
new id-less successor if ``keep_count`` (the default), so the count stays constant: in flow the
newcomer enters at the upstream boundary (a uniformly drawn point traced back against the
flow, which weights the faces by their flux), in Brownian motion just inside a random point
of the lateral boundary. Ids are never reused. `Scene.truth` returns the `GroundTruth` of the
current instant; `render_frame` turns it into a camera frame.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

import numpy as np

from focaltrack.sim.optics import CameraModel

if TYPE_CHECKING:
    from focaltrack.sim.psf import PSFModel

__all__ = ["GroundTruth", "Motion", "Scene", "render_flow_frames", "render_frame"]


class Motion(str, Enum):
    STATIC = "static"
    BROWNIAN = "brownian"
    FLOW = "flow"


@dataclass(frozen=True, slots=True)
class GroundTruth:
    """Every emitter at one instant: stable ids, absolute positions (µm), photons/exposure."""

    t_s: float
    ids: np.ndarray  # (N,) int64
    xyz_um: np.ndarray  # (N, 3) x, y, z
    photons: np.ndarray  # (N,)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def x_um(self) -> np.ndarray:
        return self.xyz_um[:, 0]

    @property
    def y_um(self) -> np.ndarray:
        return self.xyz_um[:, 1]

    @property
    def z_um(self) -> np.ndarray:
        return self.xyz_um[:, 2]

    def defocus_um(self, focus_um: float) -> np.ndarray:
        """Defocus of each emitter with the focus at ``focus_um``: ``focus − z``."""
        return focus_um - self.xyz_um[:, 2]


class Scene:
    """Emitters in a box ``[0, w] × [0, h] × [z_lo, z_hi]`` µm that move with time.

    ``Scene(field_um=(w, h), z_range_um=(lo, hi), n_emitters=20, motion=Motion.BROWNIAN,
    diffusion_um2_s=1.0, velocity_um_s=75.0, photons_range=(2000, 20000), seed=0)``;
    ``step(dt_s)`` advances time, ``truth()`` is the ground truth now. ``positions_um`` and
    ``photons`` are the current state (what `focaltrack.drivers.SimulatedCore` reads).
    """

    def __init__(
        self,
        field_um: tuple[float, float] = (332.8, 332.8),
        z_range_um: tuple[float, float] = (0.0, 100.0),
        n_emitters: int = 20,
        motion: Motion | str = Motion.BROWNIAN,
        *,
        diffusion_um2_s: float = 1.0,
        velocity_um_s: float | Sequence[float] = 75.0,
        photons_range: tuple[float, float] = (2000.0, 20000.0),
        seed: int | np.random.Generator | None = None,
        rng: np.random.Generator | None = None,
        keep_count: bool = True,
        origin_um: tuple[float, float] = (0.0, 0.0),
    ) -> None:
        w, h = float(field_um[0]), float(field_um[1])
        lo, hi = float(z_range_um[0]), float(z_range_um[1])
        if not (w > 0 and h > 0):
            raise ValueError(f"field must be positive, got {field_um}")
        if not hi >= lo:
            raise ValueError(f"z range must be ascending, got {z_range_um}")
        if n_emitters < 0:
            raise ValueError(f"n_emitters must be >= 0, got {n_emitters}")
        if diffusion_um2_s < 0:
            raise ValueError(f"diffusion must be >= 0, got {diffusion_um2_s}")
        p0, p1 = float(photons_range[0]), float(photons_range[1])
        if not (0 <= p0 <= p1):
            raise ValueError(f"photons_range must be 0 <= lo <= hi, got {photons_range}")
        self.motion = Motion(motion)
        self.lo = np.array([origin_um[0], origin_um[1], lo], dtype=np.float64)
        self.hi = np.array([origin_um[0] + w, origin_um[1] + h, hi], dtype=np.float64)
        self.diffusion_um2_s = float(diffusion_um2_s)
        v = np.asarray(velocity_um_s, dtype=np.float64)
        self.velocity_um_s = np.array([float(v), 0.0, 0.0]) if v.ndim == 0 else v.reshape(3)
        self.photons_range = (p0, p1)
        self.keep_count = bool(keep_count)
        self.rng = rng if rng is not None else np.random.default_rng(seed)
        self.t_s = 0.0
        self.n_target = int(n_emitters)
        self._next_id = 0
        self.ids = np.zeros(0, dtype=np.int64)
        self.positions_um = np.zeros((0, 3))
        self.photons = np.zeros(0)
        self.entered_total = 0
        self.left_total = 0
        if n_emitters:
            self._add(self._uniform(n_emitters))

    # ------------------------------------------------------------------ constructors

    @classmethod
    def static(
        cls,
        xyz_um: np.ndarray | Sequence[Sequence[float]],
        photons: np.ndarray | float,
        *,
        field_um: tuple[float, float] | None = None,
        z_range_um: tuple[float, float] | None = None,
    ) -> Scene:
        """Fixed emitters at given positions (µm) and photons: nothing moves or leaves."""
        xyz = np.asarray(xyz_um, dtype=np.float64).reshape(-1, 3)
        ph = np.broadcast_to(np.asarray(photons, dtype=np.float64), (len(xyz),)).copy()
        if field_um is None:
            top = xyz[:, :2].max(axis=0) if len(xyz) else np.ones(2)
            field_um = (float(max(top[0], 0.0)) + 1.0, float(max(top[1], 0.0)) + 1.0)
        if z_range_um is None:
            z_range_um = (
                (float(xyz[:, 2].min()), float(xyz[:, 2].max())) if len(xyz) else (0.0, 0.0)
            )
        s = cls(
            field_um=field_um,
            z_range_um=z_range_um,
            n_emitters=0,
            motion=Motion.STATIC,
            keep_count=False,
            seed=0,
        )
        s.n_target = len(xyz)
        s._add(xyz, ph)
        return s

    # ------------------------------------------------------------------ state

    def __len__(self) -> int:
        return len(self.ids)

    def truth(self) -> GroundTruth:
        return GroundTruth(
            t_s=self.t_s,
            ids=self.ids.copy(),
            xyz_um=self.positions_um.copy(),
            photons=self.photons.copy(),
        )

    def _uniform(self, n: int) -> np.ndarray:
        return self.lo + self.rng.random((n, 3)) * (self.hi - self.lo)

    def _draw_photons(self, n: int) -> np.ndarray:
        p0, p1 = self.photons_range
        return p0 + self.rng.random(n) * (p1 - p0)

    def _add(self, xyz: np.ndarray, photons: np.ndarray | None = None) -> None:
        n = len(xyz)
        if n == 0:
            return
        ph = self._draw_photons(n) if photons is None else np.asarray(photons, dtype=np.float64)
        self.ids = np.concatenate([self.ids, np.arange(self._next_id, self._next_id + n)])
        self._next_id += n
        self.positions_um = np.concatenate([self.positions_um, xyz], axis=0)
        self.photons = np.concatenate([self.photons, ph])

    # ------------------------------------------------------------------ dynamics

    def step(self, dt_s: float) -> GroundTruth:
        """Advance by ``dt_s`` seconds; returns the new ground truth."""
        dt = float(dt_s)
        if dt < 0:
            raise ValueError(f"dt must be >= 0, got {dt_s}")
        if dt == 0 or self.motion is Motion.STATIC:
            self.t_s += dt
            return self.truth()
        pos = self.positions_um
        if self.motion is Motion.FLOW:
            pos = pos + self.velocity_um_s * dt
        if self.diffusion_um2_s > 0:
            pos = pos + self.rng.normal(0.0, math.sqrt(2.0 * self.diffusion_um2_s * dt), pos.shape)
        if self.motion is Motion.BROWNIAN:
            pos[:, 2] = _reflect(pos[:, 2], self.lo[2], self.hi[2])
            inside = _inside(pos[:, :2], self.lo[:2], self.hi[:2])
        else:
            if self.diffusion_um2_s > 0 and self.velocity_um_s[2] == 0:
                pos[:, 2] = _reflect(pos[:, 2], self.lo[2], self.hi[2])
            inside = _inside(pos, self.lo, self.hi)
        self.positions_um = pos
        self.t_s += dt
        n_out = int((~inside).sum())
        if n_out:
            self.left_total += n_out
            self.ids = self.ids[inside]
            self.positions_um = self.positions_um[inside]
            self.photons = self.photons[inside]
        if self.keep_count and len(self.ids) < self.n_target:
            k = self.n_target - len(self.ids)
            self._add(self._entering(k, dt))
            self.entered_total += k
        return self.truth()

    def _entering(self, n: int, dt: float) -> np.ndarray:
        """Positions of ``n`` newcomers just inside the boundary they cross."""
        size = self.hi - self.lo
        if self.motion is Motion.FLOW and np.linalg.norm(self.velocity_um_s) > 0:
            v = self.velocity_um_s
            p = self._uniform(n)
            # Trace a uniform point back against the flow to the box boundary (entry points
            # weighted by flux), then let it come in for a random part of the last step.
            with np.errstate(divide="ignore", invalid="ignore"):
                t_back = np.where(
                    v > 0, (p - self.lo) / v, np.where(v < 0, (p - self.hi) / v, np.inf)
                )
            entry = p - v * t_back.min(axis=1)[:, None]
            q = entry + v * (self.rng.random(n) * dt)[:, None]
            return np.clip(q, self.lo, self.hi)
        # Diffusive entry: a random point of the lateral boundary, a little inside.
        per = 2.0 * (size[0] + size[1])
        s = self.rng.random(n) * per
        depth = np.abs(self.rng.normal(0.0, math.sqrt(2.0 * self.diffusion_um2_s * dt), n))
        depth = np.minimum(depth, 0.5 * size[:2].min())
        xy = np.empty((n, 2))
        for i in range(n):
            u = s[i]
            if u < size[0]:
                xy[i] = (u, depth[i])
            elif u < 2 * size[0]:
                xy[i] = (u - size[0], size[1] - depth[i])
            elif u < 2 * size[0] + size[1]:
                xy[i] = (depth[i], u - 2 * size[0])
            else:
                xy[i] = (size[0] - depth[i], u - 2 * size[0] - size[1])
        z = self.rng.random(n) * size[2]
        return self.lo + np.column_stack([xy, z])


def _inside(p: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return np.all((p >= lo) & (p <= hi), axis=1)


def _reflect(z: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Fold values into [lo, hi] by mirror reflection at both ends."""
    span = hi - lo
    if span <= 0:
        return np.full_like(z, lo)
    u = np.mod(z - lo, 2.0 * span)
    return lo + np.where(u > span, 2.0 * span - u, u)


# ----------------------------------------------------------------------------------------
# Frames
# ----------------------------------------------------------------------------------------


def render_frame(
    truth: GroundTruth,
    psf_model: PSFModel,
    camera: CameraModel | None,
    rng: np.random.Generator | int | None,
    focus_um: float,
    shape: tuple[int, int],
    *,
    pixel_size_um: float | None = None,
    background_photons: float | np.ndarray = 0.0,
    offset_xy_um: tuple[float, float] = (0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray]:
    """A camera frame of ``truth`` with the focus at ``focus_um``.

    Emitter ``(x, y, z)`` lands at pixel ``((x + ox) / p, (y + oy) / p)`` (column, row) with
    defocus ``focus_um − z``; ``p`` is the PSF model's sample pixel unless ``pixel_size_um``
    overrides it. Returns ``(frame, defocus_um)``: the noisy integer frame (uint16 for a
    16-bit camera) and each emitter's defocus.
    """
    from focaltrack.sim.camera import expose

    p = float(pixel_size_um) if pixel_size_um is not None else psf_model.pixel_size_um
    xyz = truth.xyz_um
    defocus = focus_um - xyz[:, 2]
    expected = psf_model.render(
        shape,
        (xyz[:, 0] + offset_xy_um[0]) / p,
        (xyz[:, 1] + offset_xy_um[1]) / p,
        defocus,
        truth.photons,
    )
    frame = expose(expected, camera, rng, background_photons=background_photons)
    return frame, defocus


def render_flow_frames(
    size_px: int,
    n_emitters: int,
    n_frames: int,
    frame_period_s: float,
    *,
    psf_model: PSFModel,
    velocity_um_s: float = 75.0,
    seed: int = 0,
) -> tuple[np.ndarray, list[float]]:
    """``n_frames`` square frames of emitters flowing along +x at ``velocity_um_s`` (defocus
    0–100 µm, 20 background photons), as the simulated camera renders them, and the render
    time of each (s): what a replayed camera streams and what caps a simulated one."""
    px = psf_model.pixel_size_um
    scene = Scene(
        field_um=(size_px * px, size_px * px),
        z_range_um=(-100.0, 0.0),
        n_emitters=n_emitters,
        motion=Motion.FLOW,
        velocity_um_s=(velocity_um_s, 0.0, 0.0),
        diffusion_um2_s=1.0,
        seed=seed,
    )
    camera = CameraModel()
    rng = np.random.default_rng(seed)
    out = np.empty((n_frames, size_px, size_px), dtype=np.uint16)
    times: list[float] = []
    for i in range(n_frames):
        if i:
            scene.step(frame_period_s)
        t = time.perf_counter()
        img, _ = render_frame(
            scene.truth(), psf_model, camera, rng, 0.0, (size_px, size_px), background_photons=20.0
        )
        times.append(time.perf_counter() - t)
        out[i] = img
    return out, times

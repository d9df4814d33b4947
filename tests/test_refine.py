"""The localizer's last step (`focaltrack.models.refine`): a frame's emitters fitted from
rough starts by Poisson maximum likelihood of the calibration spline, with σ, photons and
flags. Frames are drawn from the spline model itself (Poisson plus read noise), so the fit
must reach the Cramér–Rao bound where its start is in the right basin."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_mle import sim_calibration

from focaltrack.calibration import Calibration
from focaltrack.models.crlb import joint_crlb
from focaltrack.models.refine import SplineRefiner, window_sizes
from focaltrack.records import LocFlag

SHAPE = (128, 128)


@pytest.fixture(scope="module")
def cal() -> Calibration:
    return sim_calibration(40.0, window=64)


@pytest.fixture(scope="module")
def refiner(cal: Calibration) -> SplineRefiner:
    return SplineRefiner(cal)


def draw_frame(
    refiner: SplineRefiner, truth: np.ndarray, rng: np.random.Generator, background: float = 5.0
) -> tuple[np.ndarray, float]:
    """A raw frame (ADU) of emitters ``truth`` (n, 4: x, y, z, photons) and the read-noise
    variance (e⁻²) it was drawn with."""
    noise = refiner.calibration.noise
    t = torch.as_tensor(truth, dtype=torch.float64)
    mu = refiner.psf.render(SHAPE, t[:, 0], t[:, 1], t[:, 2], t[:, 3]).double() + background
    read_var = (noise.read_noise_adu * noise.gain_e_per_adu) ** 2
    e = rng.poisson(mu.clamp_min(0).numpy()) + rng.normal(0, math.sqrt(read_var), SHAPE)
    adu = np.rint(e / noise.gain_e_per_adu + noise.offset_adu).clip(0, 65535)
    return adu.astype(np.uint16), read_var


def test_window_sizes_hold_the_light_of_each_depth(cal: Calibration) -> None:
    sizes = window_sizes(cal)
    assert sizes.shape == (len(cal.z_um),)
    assert sizes.min() >= 16 and sizes.max() <= min(cal.window_px)
    # rings grow with defocus: the deepest slice needs a larger window than the focus
    assert sizes[-1] > sizes[0]


def test_isolated_emitters_reach_the_bound_with_their_sigma(refiner: SplineRefiner) -> None:
    rng = np.random.default_rng(0)
    err, bound, sigma = [], [], []
    for _ in range(40):  # 5 emitters a frame, far apart: 200 fits
        truth = np.column_stack(
            [
                rng.uniform(-0.5, 0.5, 5) + np.array([20, 60, 100, 40, 90]),
                rng.uniform(-0.5, 0.5, 5) + np.array([20, 30, 20, 100, 95]),
                rng.uniform(1.0, 12.0, 5),
                np.full(5, 3000.0),
            ]
        )
        frame, read_var = draw_frame(refiner, truth, rng)
        start = truth[:, :3] + np.column_stack([rng.normal(0, 0.3, (5, 2)), rng.normal(0, 0.5, 5)])
        r = refiner.fit(frame, start)
        err.append(np.column_stack([r.x_px, r.y_px, r.z_um]) - truth[:, :3])
        sigma.append(np.column_stack([r.sigma_x_px, r.sigma_y_px, r.sigma_z_um]))
        theta = torch.as_tensor(np.column_stack([truth, np.full(5, 5.0)]))
        joint, _ = joint_crlb(
            refiner.psf,
            theta,
            torch.zeros(5, dtype=torch.long),
            shape=SHAPE,
            n_frames=1,
            window=(32, 32),
            read_var=read_var,
        )
        bound.append(joint[:, :3].sqrt().numpy())
    e, b, s = np.concatenate(err), np.concatenate(bound), np.concatenate(sigma)
    ratio = np.sqrt((e**2).mean(0)) / np.sqrt((b**2).mean(0))
    assert np.all(ratio < 1.2) and np.all(ratio > 0.8), ratio
    # each fit's σ is the bound at its fit: ≈ the bound at the truth, ≈ the error spread
    np.testing.assert_allclose(np.sqrt((s**2).mean(0)), np.sqrt((b**2).mean(0)), rtol=0.15)


def test_a_focused_emitter_on_a_ring_keeps_its_light(refiner: SplineRefiner) -> None:
    # a ring 36 µm out (radius ≈ 20 px) and a focused emitter on it: each fitted against
    # the frame less the other, both land where they are
    rng = np.random.default_rng(1)
    errs = []
    for _ in range(20):
        truth = np.array([[64.3, 63.8, 36.0, 20000.0], [64.0, 84.2, 3.0, 1500.0]])
        frame, _ = draw_frame(refiner, truth, rng)
        start = truth[:, :3] + np.array([[0.4, -0.3, 0.8], [-0.3, 0.3, -0.6]])
        r = refiner.fit(frame, start)
        errs.append(np.column_stack([r.x_px, r.y_px, r.z_um]) - truth[:, :3])
        np.testing.assert_allclose(r.photons, truth[:, 3], rtol=0.15)
    e = np.stack(errs)  # (20, 2, 3)
    rms = np.sqrt((e**2).mean(0))
    assert np.all(rms[:, :2] < 0.3), rms  # px
    assert np.all(rms[:, 2] < 0.6), rms  # µm


def test_bad_input_is_reported_with_a_flag(refiner: SplineRefiner) -> None:
    rng = np.random.default_rng(2)
    # deeper than a short calibration reaches, saturated, and nothing at all: all three
    # reported at finite positions, flagged; none dropped
    short = SplineRefiner(sim_calibration(30.0, window=64))
    truth = np.array([[30.0, 30.0, 36.0, 3000.0], [90.0, 90.0, 5.0, 4.0e6], [30.0, 95.0, 8.0, 0.0]])
    frame, _ = draw_frame(refiner, truth, rng)
    start = np.array([[30.2, 29.8, 33.0], [90.2, 89.9, 5.5], [30.0, 95.0, 8.0]])
    r = short.fit(frame, start)
    assert len(r.x_px) == 3
    assert np.isfinite(np.column_stack([r.x_px, r.y_px, r.z_um])).all()
    assert r.flags[0] & LocFlag.Z_AT_RANGE_END and r.z_um[0] == pytest.approx(30.0)
    # its x and y stayed near the truth, well inside the window: only the z flag
    assert not r.flags[0] & LocFlag.XY_AT_WINDOW_EDGE
    assert np.isfinite(r.sigma_x_px[0])
    assert r.flags[1] & LocFlag.BRIGHT
    assert not r.flags[2] & LocFlag.BRIGHT
    assert r.significance[2] < 5  # nothing there, and it says so
    empty = short.fit(frame, np.zeros((0, 3)))
    assert len(empty.x_px) == 0 and empty.flags.dtype.kind == "i"


def test_emitters_fitted_with_a_neighbour_held(refiner: SplineRefiner) -> None:
    """`fit(..., held=)`: an emitter fitted with its neighbour's light held (taken from the
    frame, counted in the variance) lands where the fit of both puts it; without the held
    light, the neighbour's light pulls it off."""
    rng = np.random.default_rng(7)
    truth = np.array([[60.0, 60.0, 20.0, 20000.0], [66.0, 62.0, 10.0, 20000.0]])
    frame, _ = draw_frame(refiner, truth, rng)
    both = refiner.fit(frame, truth[:, :3] + 0.3)
    t = torch.as_tensor(np.column_stack([both.x_px, both.y_px, both.z_um, both.photons]))
    held = refiner.psf.render(SHAPE, t[1:, 0], t[1:, 1], t[1:, 2], t[1:, 3])
    one = refiner.fit(frame, truth[:1, :3] + 0.3, held=held)
    alone = refiner.fit(frame, truth[:1, :3] + 0.3)
    d_held = np.hypot(one.x_px[0] - both.x_px[0], one.y_px[0] - both.y_px[0])
    d_alone = np.hypot(alone.x_px[0] - both.x_px[0], alone.y_px[0] - both.y_px[0])
    assert d_held < 0.5 * both.sigma_x_px[0] + 0.02, (d_held, both.sigma_x_px[0])
    assert d_alone > 3 * d_held, (d_alone, d_held)
    assert one.photons[0] == pytest.approx(both.photons[0], rel=0.05)

"""The batched Poisson maximum-likelihood fit (`focaltrack.models.mle`) on the simulated
microscope's calibration (as `cnn_fixtures.make_calibration` makes it: aberrated rings,
2-µm slices): data drawn from the spline model itself, so the fit must reach the
Cramér–Rao bound."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cnn_fixtures import OPTICS, make_calibration

from focaltrack.calibration import Calibration, NoiseModel
from focaltrack.models.crlb import JointLayout, crlb, joint_crlb, joint_model
from focaltrack.models.mle import electrons, fit_frames, fit_windows
from focaltrack.sim.psf import PSFModel
from focaltrack.sim.spline_psf import SplinePSF

F64 = torch.float64
SIZE = (32, 32)
READ_VAR = 2.0  # e⁻²


def sim_calibration(z_max_um: float, window: int = 96) -> Calibration:
    """`cnn_fixtures.make_calibration` for slices 0 … ``z_max_um`` every 2 µm: the same
    slices, from a PSF library that spans only them (built in a fraction of the time)."""
    z = np.arange(0.0, z_max_um + 1.0, 2.0)
    lib = PSFModel(OPTICS, z_min_um=0.0, z_max_um=float(z[-1]), dz_um=2.0, cache=False)
    return make_calibration(z, window, library=lib)


@pytest.fixture(scope="module")
def psf() -> SplinePSF:
    return SplinePSF(sim_calibration(60.0), dtype=F64)


def emitters(
    rng: np.random.Generator, n: int, photons: float, z: tuple[float, float]
) -> torch.Tensor:
    """(n, 5) θ: random sub-pixel positions around (50, 50), z uniform in ``z``."""
    return torch.tensor(
        np.column_stack(
            [
                50.0 + rng.uniform(-0.5, 0.5, n),
                50.0 + rng.uniform(-0.5, 0.5, n),
                rng.uniform(*z, n),
                np.full(n, photons),
                np.full(n, 5.0),
            ]
        ),
        dtype=F64,
    )


def draw_windows(
    psf: SplinePSF, theta: torch.Tensor, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows (n, h, w) around each emitter: Poisson photo-electrons of the model plus
    Gaussian read noise; and their top-left pixels."""
    origin = psf.windows_at(theta[:, 0], theta[:, 1], SIZE)
    v = psf.evaluate(theta[:, 0], theta[:, 1], theta[:, 2], origin, SIZE, derivatives=False)
    mu = theta[:, 3, None, None] * v.value + theta[:, 4, None, None]
    data = rng.poisson(mu.clamp_min(0).numpy()) + rng.normal(0, math.sqrt(READ_VAR), mu.shape)
    return torch.tensor(data, dtype=F64), origin


def rms(x: torch.Tensor) -> float:
    return float(x.pow(2).mean().sqrt())


def test_fit_reaches_the_cramer_rao_bound_and_reports_its_sigma(psf: SplinePSF) -> None:
    rng = np.random.default_rng(7)
    truth = emitters(rng, 240, photons=4000.0, z=(10.0, 50.0))
    data, origin = draw_windows(psf, truth, rng)
    start = truth[:, :3] + torch.tensor(
        rng.uniform(-1, 1, (240, 3)) * np.array([0.5, 0.5, 1.5]), dtype=F64
    )
    fit = fit_windows(psf, data, origin, start, read_var=READ_VAR)
    assert float(fit.converged.double().mean()) >= 0.95
    assert not bool(fit.at_bound.any())
    bound = crlb(psf, truth, window=SIZE, read_var=READ_VAR).sqrt()
    err = fit.theta - truth
    for k in range(3):  # x, y, z: RMSE / √CRLB within ±15 %
        ratio = rms(err[:, k] / bound[:, k])
        assert 0.85 <= ratio <= 1.15, (k, ratio)
        # the σ each fit reports is the spread of its errors
        assert 0.85 <= rms(err[:, k] / fit.sigma[:, k]) <= 1.15
        assert float(fit.sigma[:, k].mean()) == pytest.approx(float(bound[:, k].mean()), rel=0.1)
    assert rms(err[:, 3] / bound[:, 3]) < 1.2  # photons
    assert float(fit.deviance.mean()) == pytest.approx(SIZE[0] * SIZE[1], rel=0.1)


def test_a_start_two_pixels_off_converges(psf: SplinePSF) -> None:
    rng = np.random.default_rng(3)
    n = 80
    truth = emitters(rng, n, photons=4000.0, z=(10.0, 50.0))
    data, origin = draw_windows(psf, truth, rng)
    angle = rng.uniform(0, 2 * math.pi, n)
    r = rng.uniform(1.0, 2.0, n)
    off = np.column_stack([r * np.cos(angle), r * np.sin(angle), rng.uniform(-2.0, 2.0, n)])
    fit = fit_windows(psf, data, origin, truth[:, :3] + torch.tensor(off), read_var=READ_VAR)
    near = fit_windows(psf, data, origin, truth[:, :3], read_var=READ_VAR)
    assert float(fit.converged.double().mean()) >= 0.95
    # the same optimum as a fit started at the truth
    same = (fit.theta[:, :3] - near.theta[:, :3]).abs() < 0.1 * fit.sigma[:, :3]
    assert float(same.all(1).double().mean()) >= 0.95


def test_batch_equals_one_at_a_time(psf: SplinePSF) -> None:
    rng = np.random.default_rng(11)
    truth = emitters(rng, 4, photons=2000.0, z=(5.0, 55.0))
    data, origin = draw_windows(psf, truth, rng)
    start = truth[:, :3] + 0.3
    batch = fit_windows(psf, data, origin, start, read_var=READ_VAR)
    for i in range(4):
        s = slice(i, i + 1)
        one = fit_windows(psf, data[s], origin[s], start[s], read_var=READ_VAR)
        torch.testing.assert_close(batch.theta[s], one.theta, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(batch.sigma[s], one.sigma, rtol=1e-6, atol=1e-9)


def frames_of(
    psf: SplinePSF,
    truth: torch.Tensor,
    start: torch.Tensor,
    frame: torch.Tensor,
    n_frames: int,
    shape: tuple[int, int],
    size: tuple[int, int],
    rng: np.random.Generator,
) -> torch.Tensor:
    """Frames drawn from the joint model at the truth on the windows a fit from ``start``
    uses (the background: the truth's, in every window)."""
    origin = psf.windows_at(start[:, 0], start[:, 1], size)
    layout = JointLayout.build(frame, origin, size, shape, n_frames, F64)
    mu = joint_model(psf, layout, truth).canvas[:-1].reshape(n_frames, *shape)
    data = rng.poisson(mu.numpy()) + rng.normal(0, math.sqrt(READ_VAR), mu.shape)
    return torch.tensor(data, dtype=F64)


def pair_scene(
    rng: np.random.Generator, n_frames: int, a: list[float], b: list[float], jitter: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two emitters per frame at ``a`` and ``b`` (θ) moved by ± ``jitter`` px; starts 0.5 px
    and 1 µm off; frame indices."""
    base = torch.tensor([a, b], dtype=F64).repeat(n_frames, 1)
    truth = base.clone()
    truth[:, :2] += torch.tensor(rng.uniform(-jitter, jitter, (2 * n_frames, 2)))
    start = truth[:, :3] + torch.tensor(rng.uniform(-1, 1, (2 * n_frames, 3)) * [0.5, 0.5, 1.0])
    frame = torch.arange(n_frames).repeat_interleave(2)
    return truth, start, frame


def joint_vs_separate(
    psf: SplinePSF, seed: int, a: list[float], b: list[float], size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised errors (err / √joint CRLB, (n, 3)) of joint and of separate fits of a
    pair per frame, and the joint/alone bound ratio."""
    rng = np.random.default_rng(seed)
    n_frames, shape = 100, (64, 64)
    truth, start, frame = pair_scene(rng, n_frames, a, b, jitter=0.5)
    frames = frames_of(psf, truth, start, frame, n_frames, shape, size, rng)
    bound, alone = joint_crlb(
        psf, truth, frame, shape=shape, n_frames=n_frames, window=size, read_var=READ_VAR
    )
    joint = fit_frames(psf, frames, start, frame, window=size, read_var=READ_VAR, joint=True)
    apart = fit_frames(psf, frames, start, frame, window=size, read_var=READ_VAR, joint=False)
    assert float(joint.converged.double().mean()) >= 0.95
    s = bound[:, :3].sqrt()
    return (joint.theta - truth)[:, :3] / s, (apart.theta - truth)[:, :3] / s, bound / alone


def test_joint_fit_of_a_neighbour_pair(psf: SplinePSF) -> None:
    # two emitters 4 px apart at similar depths: each other's light is in both windows
    a = [30.0, 32.0, 20.0, 3000.0, 5.0]
    b = [34.0, 32.5, 24.0, 3000.0, 5.0]
    joint, apart, cost = joint_vs_separate(psf, 5, a, b, (40, 40))
    assert float(cost[:, 0].min()) > 1.2  # the neighbour costs precision: the joint bound
    for k in range(3):
        assert 0.8 <= rms(joint[:, k]) <= 1.2, (k, rms(joint[:, k]))
    # alone, each takes some of the other's light: along the pair's axis, and in depth
    assert rms(apart[:, 0]) > 3.0 * rms(joint[:, 0])
    assert rms(apart[:, 2]) > 1.3 * rms(joint[:, 2])


def test_joint_fit_of_a_deep_ring_under_a_focused_emitter(psf: SplinePSF) -> None:
    # a ring 45 µm out of focus (radius ≈ 25 px) and a focused emitter on it
    a = [32.0, 32.0, 45.0, 20000.0, 5.0]
    b = [32.0, 32.0 + 24.0, 2.0, 1500.0, 5.0]
    joint, apart, _ = joint_vs_separate(psf, 9, a, b, (56, 56))
    for e in (0, 1):
        j, s = joint[e::2], apart[e::2]
        assert rms(j) <= 1.2, (e, rms(j))
        # alone: the ring's light pulls the focused emitter (and its light, the ring)
        # towards each other (y), and both in depth
        assert rms(s[:, 1]) > 1.3 * rms(j[:, 1]), (e, rms(s[:, 1]), rms(j[:, 1]))
        assert rms(s[:, 2]) > 1.5 * rms(j[:, 2]), (e, rms(s[:, 2]), rms(j[:, 2]))


def test_bad_input_is_flagged_not_lost(psf: SplinePSF) -> None:
    # an emitter deeper than a short calibration reaches, and a window with no emitter:
    # both reported with finite values, the first held and flagged at the calibration's end
    short = SplinePSF(sim_calibration(30.0), dtype=F64)
    rng = np.random.default_rng(2)
    truth = torch.tensor([[50.0, 50.0, 34.0, 3000.0, 5.0], [50.2, 49.7, 20.0, 0.0, 5.0]])
    data, origin = draw_windows(psf, truth.to(F64), rng)
    start = torch.tensor([[50.3, 49.8, 29.0], [50.0, 50.0, math.nan]], dtype=F64)
    fit = fit_windows(short, data, origin, start, read_var=READ_VAR)
    assert bool(torch.isfinite(fit.theta).all())
    assert not bool(torch.isnan(fit.sigma).any())
    assert bool(fit.at_bound[0]) and float(fit.z_um[0]) == pytest.approx(30.0)
    assert not bool(fit.xy_at_bound[0])  # its z is at the bound, not its x or y
    assert bool(fit.converged[0])  # held at the bound, not wandering to max_iter
    assert float(fit.photons[1]) < 5 * float(fit.sigma[1, 3])  # nothing there, and it says so


def test_electrons_from_adu() -> None:
    adu = torch.tensor([[100.0, 110.0], [140.0, 100.0]])
    e, rv = electrons(adu, NoiseModel(offset_adu=100.0, read_noise_adu=3.0, gain_e_per_adu=0.5))
    torch.testing.assert_close(e, torch.tensor([[0.0, 5.0], [20.0, 0.0]], dtype=F64))
    assert rv == pytest.approx(2.25)
    e, rv = electrons(adu, NoiseModel(offset_adu=100.0, read_noise_adu=3.0))  # gain unknown
    assert float(e[1, 0]) == 40.0 and rv == pytest.approx(9.0)

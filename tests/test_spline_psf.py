"""The tricubic spline PSF (`focaltrack.sim.spline_psf`): it passes through the stack,
shifts exactly, has the derivatives of its values, and is batched correctly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import erf

from focaltrack.calibration import Calibration, NoiseModel
from focaltrack.sim.spline_psf import (
    SplinePSF,
    angular_projection,
    denoised,
    model_stack,
    not_a_knot_matrix,
)

WINDOW = 31  # odd: the emitter on the centre pixel (15, 15), `Calibration.centre_px`
Z = np.arange(0.0, 21.0, 2.0)


def gaussian_stack(
    z_um: np.ndarray,
    sigma_px: float = 1.6,
    z_r_um: float = 8.0,
    window: int = WINDOW,
    pixel_integrated: bool = True,
) -> np.ndarray:
    """(Z, W, W) Gaussian spots of width σ(z) = σ₀ √(1 + (z / z_r)²), each summing to 1 over
    the plane, centred on pixel (W//2, W//2): integrated over each pixel, or sampled."""
    c = np.arange(window) - window // 2
    out = []
    for z in z_um:
        s = sigma_px * math.sqrt(1.0 + (z / z_r_um) ** 2)
        if pixel_integrated:
            p = 0.5 * (erf((c + 0.5) / (math.sqrt(2) * s)) - erf((c - 0.5) / (math.sqrt(2) * s)))
        else:
            p = np.exp(-0.5 * (c / s) ** 2) / (math.sqrt(2 * math.pi) * s)
        out.append(np.outer(p, p))
    return np.array(out)


def calibration(stack: np.ndarray, z_um: np.ndarray) -> Calibration:
    return Calibration(
        psf=stack.astype(np.float32),
        z_um=z_um,
        pixel_size_um=0.65,
        noise=NoiseModel(offset_adu=100.0, read_noise_adu=1.5, gain_e_per_adu=0.5),
        source="test: Gaussian spots",
    )


def at(psf: SplinePSF, x: float, y: float, z: float, origin: tuple[int, int], size: int):
    t = torch.tensor
    return psf.evaluate(
        t([x], dtype=torch.float64),
        t([y], dtype=torch.float64),
        t([z], dtype=torch.float64),
        t([origin]),
        (size, size),
    )


def test_not_a_knot_reproduces_cubics() -> None:
    # the not-a-knot interpolant of a cubic is that cubic, end intervals included
    n = 9
    i = np.arange(n, dtype=np.float64)
    f = 0.3 * i**3 - 2.0 * i**2 + i - 4.0
    c = not_a_knot_matrix(n) @ f
    for u in (0.0, 0.25, 3.6, 7.9, 8.0):
        k = min(math.floor(u), n - 2)
        t = u - k
        w = np.array(
            [(1 - t) ** 3, 3 * t**3 - 6 * t**2 + 4, -3 * t**3 + 3 * t**2 + 3 * t + 1, t**3]
        )
        assert float(w @ c[k : k + 4]) / 6 == pytest.approx(0.3 * u**3 - 2 * u**2 + u - 4, abs=1e-9)


def test_passes_through_the_stack() -> None:
    rng = np.random.default_rng(1)
    stack = gaussian_stack(Z) + 1e-3 * rng.standard_normal((len(Z), WINDOW, WINDOW))
    # (the noise added here stays: the spline interpolates the stack it is given)
    psf = SplinePSF(calibration(stack, Z), dtype=torch.float64, denoise=False)
    # an emitter at frame (40, 30) puts the window's centre pixel on that pixel
    for k in (0, 3, len(Z) - 1):
        got = at(psf, 40.0, 30.0, float(Z[k]), (30 - 15, 40 - 15), WINDOW).value[0].numpy()
        np.testing.assert_allclose(got, stack[k], atol=1e-9)


def test_subpixel_shift_and_z_between_slices_are_smooth() -> None:
    # a smooth spot sampled every pixel and every 2 µm: the spline at a quarter-pixel shift
    # and between slices is the spot there, to a small fraction of its peak (a bilinear
    # shift of the same stack is off by several %)
    psf = SplinePSF(calibration(gaussian_stack(Z, sigma_px=2.0, pixel_integrated=False), Z))
    x, y, z = 20.25, 20.6, 5.0
    got = at(psf, x, y, z, (5, 5), WINDOW).value[0].numpy()
    s = 2.0 * math.sqrt(1.0 + (z / 8.0) ** 2)
    c = np.arange(5, 5 + WINDOW)
    want = np.outer(np.exp(-0.5 * ((c - y) / s) ** 2), np.exp(-0.5 * ((c - x) / s) ** 2)) / (
        2 * math.pi * s * s
    )
    peak = want.max()
    assert np.abs(got - want).max() < 0.01 * peak
    assert got.sum() == pytest.approx(1.0, abs=2e-3)


def test_derivatives_are_those_of_the_values() -> None:
    psf = SplinePSF(calibration(gaussian_stack(Z), Z), dtype=torch.float64)
    x, y, z, o = 20.3, 19.8, 7.1, (5, 6)
    p = at(psf, x, y, z, o, 24)
    h = 1e-5
    for name, dx, dy, dz in (("dx", h, 0, 0), ("dy", 0, h, 0), ("dz", 0, 0, h)):
        plus = at(psf, x + dx, y + dy, z + dz, o, 24).value
        minus = at(psf, x - dx, y - dy, z - dz, o, 24).value
        numeric = (plus - minus) / (2 * h)
        analytic = getattr(p, name)
        assert float(analytic.abs().max()) > 1e-3  # the test tests something
        torch.testing.assert_close(analytic, numeric, atol=1e-7, rtol=1e-5)


def test_batch_equals_one_at_a_time_and_zero_outside() -> None:
    psf = SplinePSF(calibration(gaussian_stack(Z), Z))
    x = torch.tensor([10.2, 50.7, 33.3, 200.0])
    y = torch.tensor([12.9, 40.1, 33.5, 7.0])
    z = torch.tensor([0.0, 13.3, 20.0, 4.0])
    origin = torch.tensor([[0, 0], [30, 40], [20, 20], [0, 0]])  # the last far from its emitter
    batch = psf.evaluate(x, y, z, origin, (20, 22))
    for i in range(4):
        one = psf.evaluate(x[i : i + 1], y[i : i + 1], z[i : i + 1], origin[i : i + 1], (20, 22))
        for name in ("value", "dx", "dy", "dz"):
            torch.testing.assert_close(getattr(batch, name)[i], getattr(one, name)[0])
    assert float(batch.value[3].abs().max()) == 0.0
    assert float(batch.value[:3].amax(dim=(1, 2)).min()) > 0.005


def test_non_uniform_z_is_resampled() -> None:
    z = np.array([0.0, 2.0, 4.1, 6.0, 7.9, 10.0, 12.0, 14.0])
    stack = gaussian_stack(z)
    psf = SplinePSF(calibration(stack, z))
    assert psf.z_step_um == pytest.approx(2.0)
    got = at(psf, 15.0, 15.0, 4.1, (0, 0), WINDOW).value[0].numpy()
    np.testing.assert_allclose(got, stack[2], atol=1e-3 * stack[2].max())
    # a last step the median does not divide: the grid still ends on the last slice
    z2 = np.array([0.0, 2.0, 4.0, 6.0, 8.0, 10.0, 12.0, 14.9])
    stack2 = gaussian_stack(z2)
    psf2 = SplinePSF(calibration(stack2, z2))
    assert psf2.z_range_um == pytest.approx((0.0, 14.9))
    last = at(psf2, 15.0, 15.0, 14.9, (0, 0), WINDOW).value[0].numpy()
    np.testing.assert_allclose(last, stack2[-1], atol=1e-3 * stack2[-1].max())


def test_render_puts_each_emitter_light_in_the_frame() -> None:
    psf = SplinePSF(calibration(gaussian_stack(Z), Z), dtype=torch.float64)
    x = torch.tensor([20.4, 60.0, -0.5])
    y = torch.tensor([30.0, 25.5, -0.5])  # the last one on the frame's corner: ¼ in it
    z = torch.tensor([3.0, 18.0, 0.0])
    n = torch.tensor([1000.0, 500.0, 100.0])
    frame = psf.render((64, 80), x, y, z, n)
    assert frame.shape == (64, 80)
    assert float(frame[:45, :45].sum()) == pytest.approx(1000.0 + 100.0 * 0.25, rel=0.02)
    assert float(frame[:, 45:].sum()) == pytest.approx(500.0, rel=0.02)


def test_a_noisy_stack_is_denoised_and_a_clean_one_kept() -> None:
    # a bead stack's empty pixels are noise: the model (`denoise`, the default) is nearer
    # the noise-free spot than the stack, and a stack without noise is kept as it is
    rng = np.random.default_rng(3)
    clean = gaussian_stack(Z, window=63)
    noisy = clean + 2e-4 * rng.standard_normal(clean.shape)
    for stack, err_max in ((clean, 1e-9), (noisy, None)):
        psf = SplinePSF(calibration(stack, Z), dtype=torch.float64)
        got = np.stack([at(psf, 31.0, 31.0, float(z), (0, 0), 63).value[0].numpy() for z in Z])
        err = np.sqrt(((got - clean) ** 2).mean())
        if err_max is not None:
            assert psf.noise_level < 1e-12 and err < err_max
        else:
            assert psf.noise_level == pytest.approx(2e-4, rel=0.1)
            assert err < 0.5 * np.sqrt(((noisy - clean) ** 2).mean())


def test_the_model_stack_is_denoised_once_per_calibration() -> None:
    """`model_stack` keeps its result by content: a second model of the same calibration
    (another object with the same stack) gets the same read-only array, another stack and
    ``denoise=False`` their own."""
    rng = np.random.default_rng(4)
    noisy = gaussian_stack(Z, window=63) + 2e-4 * rng.standard_normal((len(Z), 63, 63))
    a, noise = model_stack(calibration(noisy, Z))
    b, _ = model_stack(calibration(noisy.copy(), Z))
    assert b is a and not a.flags.writeable and noise > 0
    raw, _ = model_stack(calibration(noisy, Z), denoise=False)
    assert raw is not a and np.array_equal(raw, noisy.astype(np.float32).astype(np.float64))
    other, _ = model_stack(calibration(noisy * 2.0, Z))
    assert other is not a and np.allclose(other, 2.0 * a, atol=1e-6)


def astigmatic_rings(z_um: np.ndarray, window: int = 64, a: float = 0.03) -> np.ndarray:
    """(Z, W, W) rings of radius 2 + 0.8 z px, stretched along x and squeezed along y
    by ``a`` (astigmatism: angular order 2), each summing to 1, centred on (W//2, W//2)."""
    c = np.arange(window) - window // 2
    yy, xx = np.meshgrid(c, c, indexing="ij")
    rho = np.hypot(xx / (1 + a), yy / (1 - a))
    out = np.stack([np.exp(-0.5 * ((rho - 2.0 - 0.8 * z) / 1.2) ** 2) for z in z_um])
    return out / out.sum((1, 2), keepdims=True)


def test_angular_projection_keeps_rings_and_removes_noise() -> None:
    """`angular_projection`: an aberrated ring (low angular order) passes unchanged; the
    noise of a bead stack is mostly of higher orders, so `denoised` with the bead's centre
    is nearer the clean stack than without it."""
    z = np.arange(20.0, 71.0, 5.0)  # rings 18–58 px in radius: each pixel near the noise
    clean = astigmatic_rings(z, window=128)
    centre = (64.0, 64.0)
    kept = angular_projection(clean, centre)
    assert np.sqrt(((kept - clean) ** 2).mean()) < 0.02 * np.sqrt((clean**2).mean())
    rng = np.random.default_rng(11)
    noise = 0.2 * clean.max((1, 2)).min()  # a fifth of the dimmest ring's peak
    noisy = clean + noise * rng.standard_normal(clean.shape)
    err_wiener = np.sqrt(((denoised(noisy, noise) - clean) ** 2).mean())
    err_both = np.sqrt(((denoised(noisy, noise, centre) - clean) ** 2).mean())
    assert err_both < 0.8 * err_wiener, (err_both, err_wiener)

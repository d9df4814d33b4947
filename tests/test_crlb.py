"""Cramér–Rao bounds of the spline PSF model (`focaltrack.models.crlb`): the closed form of
a Gaussian spot, and the joint Fisher information of emitters that share pixels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad
from test_spline_psf import Z, calibration, gaussian_stack

from focaltrack.models import crlb as crlb_module
from focaltrack.models.crlb import (
    JointLayout,
    crlb,
    joint_crlb,
    joint_fisher,
    joint_model,
)
from focaltrack.sim.spline_psf import SplinePSF

F64 = torch.float64
KNOWN_BACKGROUND = (True, True, True, True, False)  # x, y, z, photons free


def gaussian_psf(sigma_px: float) -> SplinePSF:
    return SplinePSF(calibration(gaussian_stack(Z, sigma_px=sigma_px), Z), dtype=F64)


def width_at(sigma_px: float, z_um: float) -> float:
    return sigma_px * math.sqrt(1.0 + (z_um / 8.0) ** 2)  # `gaussian_stack`'s σ(z)


@pytest.mark.parametrize("sigma_px", [1.2, 2.0])
def test_lateral_bound_without_background_is_sigma_a_squared_over_n(sigma_px: float) -> None:
    # Thompson et al. 2002 / Mortensen et al. 2010 with no background: var = σ_a² / N,
    # σ_a² = σ² + a²/12 (a = 1 px); and the photons' bound is Poisson's, N
    psf = gaussian_psf(sigma_px)
    n = 1e4
    z = 6.0  # a slice: σ there is known exactly
    theta = torch.tensor([[40.0, 30.0, z, n, 0.0]], dtype=F64)
    var = crlb(psf, theta, window=(31, 31), free=KNOWN_BACKGROUND)[0]
    s = width_at(sigma_px, z)
    want = (s * s + 1.0 / 12.0) / n
    assert float(var[0]) == pytest.approx(want, rel=0.01)
    assert float(var[1]) == pytest.approx(want, rel=0.01)
    assert float(var[3]) == pytest.approx(n, rel=0.02)
    assert float(var[4]) == 0.0  # fixed


def test_lateral_bound_with_background_is_mortensen() -> None:
    # Mortensen et al. 2010 (Nat. Methods 7, 377), eq. (5), Poisson MLE with background b per
    # pixel: var = σ_a²/N · [1 + ∫₀¹ ln t / (1 + t/τ) dt]⁻¹, τ = 2π σ_a² b / (N a²)
    psf = gaussian_psf(1.6)
    n, b, z = 2000.0, 10.0, 6.0
    theta = torch.tensor([[40.0, 30.0, z, n, b]], dtype=F64)
    var = crlb(psf, theta, window=(31, 31))[0]
    s = width_at(1.6, z)
    sa2 = s * s + 1.0 / 12.0
    tau = 2 * math.pi * sa2 * b / n
    integral = quad(lambda t: math.log(t) / (1.0 + t / tau), 0.0, 1.0)[0]
    want = sa2 / n / (1.0 + integral)
    assert want > 1.5 * sa2 / n  # the background matters here
    assert float(var[0]) == pytest.approx(want, rel=0.01)


def test_read_noise_and_crowding_raise_the_bound() -> None:
    psf = gaussian_psf(1.6)
    theta = torch.tensor([[30.0, 30.0, 6.0, 2000.0, 5.0]], dtype=F64)
    quiet = crlb(psf, theta, window=(31, 31))[0]
    noisy = crlb(psf, theta, window=(31, 31), read_var=4.0)[0]
    assert bool((noisy[:4] > quiet[:4]).all())
    pair = torch.tensor([[30.0, 30.0, 6.0, 2000.0, 5.0], [32.5, 30.0, 6.0, 2000.0, 5.0]], dtype=F64)
    frame = torch.zeros(2, dtype=torch.long)
    joint, alone = joint_crlb(psf, pair, frame, shape=(64, 64), n_frames=1, window=(31, 31))
    assert bool((joint[:, 0] > 1.5 * alone[:, 0]).all())  # along the pair's axis
    assert float(alone[0, 0]) == pytest.approx(float(quiet[0]), rel=1e-9)


def test_joint_bound_of_isolated_emitters_is_the_single_bound() -> None:
    psf = gaussian_psf(1.6)
    theta = torch.tensor(
        [
            [20.0, 20.0, 3.0, 900.0, 4.0],
            [60.3, 50.6, 15.0, 3000.0, 2.0],
            [20.0, 20.0, 9.0, 500.0, 1.0],
        ],
        dtype=F64,
    )
    frame = torch.tensor([0, 0, 1])  # the third alone in its own frame
    joint, alone = joint_crlb(
        psf, theta, frame, shape=(80, 80), n_frames=2, window=(25, 25), read_var=2.0
    )
    torch.testing.assert_close(joint, alone, rtol=1e-9, atol=0.0)
    single = crlb(psf, theta, window=(25, 25), read_var=2.0)
    torch.testing.assert_close(joint, single, rtol=1e-9, atol=0.0)


@pytest.mark.parametrize("chunk", [crlb_module.PAIR_CHUNK_ELEMENTS, 5 * 15 * 15])
def test_joint_fisher_is_the_dense_one(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # every emitter's model and derivatives written into whole frames (finite differences of
    # the rendered frames, the background field counted by hand), and Σ ∂μ ∂μᵀ / (μ + σ²)
    # over the covered pixels: the pairwise assembly must give the same matrix, windows cut
    # by the frame's edge and emitters in two frames included (the pairs all at once, and
    # one at a time)
    monkeypatch.setattr(crlb_module, "PAIR_CHUNK_ELEMENTS", chunk)
    psf = gaussian_psf(1.6)
    theta = torch.tensor(
        [
            [10.0, 12.0, 4.0, 800.0, 3.0],
            [16.4, 15.2, 11.0, 1200.0, 5.0],
            [2.2, 20.5, 7.5, 600.0, 1.0],  # window cut by the frame's left edge
            [20.0, 20.0, 5.0, 900.0, 2.0],  # alone in frame 1
        ],
        dtype=F64,
    )
    frame = torch.tensor([0, 0, 0, 1])
    shape, size, rv = (32, 36), (15, 15), 1.5
    origin = psf.windows_at(theta[:, 0], theta[:, 1], size)
    layout = JointLayout.build(frame, origin, size, shape, 2, F64)

    def dense(th: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(2, *shape, dtype=F64)
        for e in range(4):
            one = psf.evaluate(
                th[e : e + 1, 0], th[e : e + 1, 1], th[e : e + 1, 2], origin[e : e + 1], size
            )
            r0, c0 = (int(v) for v in origin[e])
            for i in range(size[0]):
                for j in range(size[1]):
                    r, c = r0 + i, c0 + j
                    if 0 <= r < shape[0] and 0 <= c < shape[1]:
                        out[frame[e], r, c] += th[e, 3] * one.value[0, i, j]
        cover = torch.zeros(2, *shape, dtype=F64)
        bsum = torch.zeros(2, *shape, dtype=F64)
        for e in range(4):
            r0, c0 = (int(v) for v in origin[e])
            r1, c1 = max(r0, 0), max(c0, 0)
            cover[frame[e], r1 : r0 + size[0], c1 : c0 + size[1]] += 1
            bsum[frame[e], r1 : r0 + size[0], c1 : c0 + size[1]] += th[e, 4]
        return out + torch.where(cover > 0, bsum / cover.clamp_min(1), torch.zeros_like(bsum))

    model = joint_model(psf, layout, theta)
    mu = dense(theta)
    torch.testing.assert_close(model.canvas[:-1].reshape(2, *shape), mu)
    h = 1e-6
    jac = torch.zeros(4, 5, 2, *shape, dtype=F64)
    for e in range(4):
        for k in range(5):
            step = torch.zeros_like(theta)
            step[e, k] = h * max(1.0, abs(float(theta[e, k])))
            jac[e, k] = (dense(theta + step) - dense(theta - step)) / (2 * step[e, k])
    covered = layout.covered.reshape(2, *shape)
    info = joint_fisher(layout, model.jac, model.mu + rv)
    for f, members in ((0, [0, 1, 2]), (1, [3])):
        j = jac[members][:, :, f].reshape(5 * len(members), -1)
        w = (covered[f] / (mu[f] + rv)).reshape(-1)
        want = (j * w) @ j.T
        got = info[f, : 5 * len(members), : 5 * len(members)]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8 * float(want.abs().max()))
    assert float(info[1, 5:, 5:].diagonal().sub(1.0).abs().max()) == 0.0  # unused slots
    assert np.isfinite(info.numpy()).all()

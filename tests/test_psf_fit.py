"""The calibration-PSF fit behind the localizer's residual passes (`focaltrack.models.psf_fit`).

Frames are rendered by the simulated microscope's physics (its PSF model at continuous
positions, camera noise), the model is the calibration acquired from it: the fit has to
bridge the same gap as in the lab.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cnn_fixtures import CAMERA, PIXEL_UM, make_calibration, render_frame

from focaltrack.models.psf_fit import PSFFitter

SHAPE = (160, 160)
PHOTONS = 4e5  # bright: the test is about the model and the fit, not about noise


@pytest.fixture(scope="module")
def fitter() -> PSFFitter:
    return PSFFitter(make_calibration())


def _electrons(frame: np.ndarray) -> torch.Tensor:
    return (torch.as_tensor(frame, dtype=torch.float32) - CAMERA.offset_adu) * CAMERA.gain_e_per_adu


def _fit(fitter: PSFFitter, frame: np.ndarray, start_um: np.ndarray, sweeps: int = 3):
    p = torch.as_tensor(start_um / [PIXEL_UM, PIXEL_UM, 1.0], dtype=torch.float32)
    return fitter.fit(_electrons(frame), p[:, 0], p[:, 1], p[:, 2], sweeps=sweeps)


def _xyz_um(fit) -> np.ndarray:
    return np.stack(
        [fit.x_px.numpy() * PIXEL_UM, fit.y_px.numpy() * PIXEL_UM, fit.z_um.numpy()], 1
    ).astype(np.float64)


@pytest.mark.parametrize("z_um", [12.3, 37.9, 61.1])
def test_fit_moves_a_displaced_start_onto_the_emitter(fitter, z_um):
    rng = np.random.default_rng(int(z_um * 10))
    truth = np.array([[50.3, 47.9, z_um]])
    frame = render_frame(SHAPE, truth, np.array([PHOTONS]), rng)
    start = truth + np.array([[0.45, -0.4, 1.4]])  # ≈ 0.7 px and 0.7 calibration steps off
    fit = _fit(fitter, frame, start)
    err = _xyz_um(fit) - truth
    assert np.hypot(err[0, 0], err[0, 1]) < 0.12, err  # from 0.6 µm to a fraction of a pixel
    assert abs(err[0, 2]) < 0.5, err  # from 1.4 µm to below the 2-µm bins' 0.58 µm floor
    assert float(fit.amplitude_e[0]) > 0


def test_amplitudes_and_background_follow_the_light(fitter):
    rng = np.random.default_rng(3)
    truth = np.array([[40.0, 40.0, 20.0], [70.0, 65.0, 30.0]])
    frame = render_frame(SHAPE, truth, np.array([PHOTONS, PHOTONS / 4]), rng)
    fit = _fit(fitter, frame, truth)
    ratio = float(fit.amplitude_e[0] / fit.amplitude_e[1])
    assert ratio == pytest.approx(4.0, rel=0.1)
    background_e = 20.0 * CAMERA.quantum_efficiency  # render_frame's 20 photons/px
    assert float(fit.background_e[0]) == pytest.approx(background_e, rel=0.15)


def test_residual_keeps_the_background_and_removes_the_emitters(fitter):
    rng = np.random.default_rng(4)
    truth = np.array([[35.0, 60.0, 5.0], [60.0, 50.0, 45.0], [55.0, 40.0, 80.0]])
    frame = render_frame(SHAPE, truth, np.full(3, PHOTONS), rng)
    e = _electrons(frame)
    fit = _fit(
        fitter, frame, truth + np.array([[0.3, 0.2, 1.0], [-0.3, 0.3, -1.0], [0.2, -0.3, 1.5]])
    )
    res = fitter.residual(e, fit)
    bg = 20.0 * CAMERA.quantum_efficiency
    light = float(((e - bg) ** 2).sum())
    left = float(((res - bg) ** 2).sum())
    # what is left is the calibration model's own error (z interpolated between slices,
    # ¼-pixel phases): a few per cent of the light of emitters this bright
    assert left < 0.05 * light, (left, light)
    assert float(res.mean()) == pytest.approx(bg, rel=0.1)


def test_overlapping_emitters_are_fitted_together(fitter):
    """An in-focus emitter on the ring of a deeply defocused one: each fitted against the
    frame minus the other, both land on their emitters."""
    rng = np.random.default_rng(5)
    truth = np.array([[50.0, 50.0, 85.0], [50.0 + 0.36 * 85 * 0.9, 50.0, 3.0]])
    frame = render_frame(SHAPE, truth, np.array([PHOTONS, PHOTONS / 10]), rng)
    fit = _fit(fitter, frame, truth + np.array([[0.4, -0.4, 1.5], [-0.3, 0.3, 1.0]]))
    err = _xyz_um(fit) - truth
    assert np.all(np.hypot(err[:, 0], err[:, 1]) < 0.3), err
    assert np.all(np.abs(err[:, 2]) < 1.0), err


def test_edge_emitters_and_empty_starts_are_harmless(fitter):
    rng = np.random.default_rng(6)
    truth = np.array([[1.0, 50.0, 10.0]])  # on the frame's left edge: half its light is off
    frame = render_frame(SHAPE, truth, np.array([PHOTONS]), rng)
    # the second start has no emitter: its amplitude must not go negative and its
    # position must stay where it was put
    start = np.array([[1.3, 50.2, 11.0], [80.0, 80.0, 40.0]])
    fit = _fit(fitter, frame, start)
    assert torch.isfinite(fit.x_px).all() and torch.isfinite(fit.z_um).all()
    err = _xyz_um(fit)[0] - truth[0]
    assert np.hypot(err[0], err[1]) < 0.3, err
    assert float(fit.amplitude_e[1]) <= 0.02 * float(fit.amplitude_e[0])
    none = fitter.fit(_electrons(frame), *(torch.zeros(0) for _ in range(3)))
    assert len(none.x_px) == 0
    assert torch.equal(fitter.residual(_electrons(frame), none), _electrons(frame))


def test_search_reaches_a_deep_ring_that_gauss_newton_alone_cannot(fitter):
    """A ring 90 µm out of focus, started 2.5 px off (a typical network error that deep):
    Gauss–Newton stalls in a dark gap of the ring; the whole-pixel search gets there."""
    rng = np.random.default_rng(8)
    truth = np.array([[52.0, 51.0, 90.0]])
    frame = render_frame(SHAPE, truth, np.array([PHOTONS]), rng)
    start = truth + np.array([[2.5 * PIXEL_UM * 0.8, -2.5 * PIXEL_UM * 0.6, -1.5]])
    p = torch.as_tensor(start / [PIXEL_UM, PIXEL_UM, 1.0], dtype=torch.float32)
    e = _electrons(frame)
    searched = fitter.fit(e, p[:, 0], p[:, 1], p[:, 2], sweeps=3, search_px=3)
    plain = fitter.fit(e, p[:, 0], p[:, 1], p[:, 2], sweeps=3, search_px=0)
    err_s = _xyz_um(searched)[0] - truth[0]
    err_p = _xyz_um(plain)[0] - truth[0]
    assert np.hypot(err_s[0], err_s[1]) < 0.3 and abs(err_s[2]) < 1.0, err_s
    assert np.hypot(err_p[0], err_p[1]) > np.hypot(err_s[0], err_s[1]), (err_p, err_s)


def test_significance_is_high_for_an_emitter_and_noise_like_for_empty_starts(fitter):
    """An emitter of a few thousand photons stands well above nothing; starts on empty
    background get amplitudes of pure noise: significance ~ |N(0, 1)| where positive."""
    rng = np.random.default_rng(9)
    truth = np.array([[40.0, 40.0, 40.0]])
    frame = render_frame(SHAPE, truth, np.array([3000.0]), rng)
    gx, gy = np.meshgrid([100.0, 120.0, 140.0], np.arange(10.0, 151.0, 20.0))
    empty = np.column_stack([gx.ravel() * PIXEL_UM, gy.ravel() * PIXEL_UM, np.full(gx.size, 10.0)])
    start = np.concatenate([truth, empty])
    p = torch.as_tensor(start / [PIXEL_UM, PIXEL_UM, 1.0], dtype=torch.float32)
    # amplitudes only (no search, no Gauss–Newton): the statistic's own distribution
    fit = fitter.fit(_electrons(frame), p[:, 0], p[:, 1], p[:, 2], sweeps=0, search_px=0)
    sig = fitter.significance(fit, CAMERA.read_noise_e).numpy()
    assert sig[0] > 10, sig[0]
    noise = sig[1:]
    assert np.all(noise >= 0) and noise.max() < 5.0, noise
    assert 0.15 < float(np.mean(noise**2)) < 1.5, noise  # E = 1/2 for a half-normal-or-zero
    # brighter emitter, larger significance: ~ √photons once its own shot noise dominates
    frame4 = render_frame(SHAPE, truth, np.array([12000.0]), rng)
    fit4 = fitter.fit(_electrons(frame4), p[:1, 0], p[:1, 1], p[:1, 2], sweeps=0, search_px=0)
    sig4 = float(fitter.significance(fit4, CAMERA.read_noise_e)[0])
    assert 1.5 < sig4 / sig[0] < 4.5, (sig4, sig[0])
    none = fitter.fit(_electrons(frame), *(torch.zeros(0) for _ in range(3)))
    assert len(fitter.significance(none, CAMERA.read_noise_e)) == 0

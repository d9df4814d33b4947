"""The pupil fitted to a calibration stack (`focaltrack.calibration.pupil`): it recovers
the optics of a stack drawn from known ones, draws the model stack without the noise, is
stored in the calibration file, and is used only where it explains the stack."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from calib_synth import synth_stack

from focaltrack.calibration import process_stack
from focaltrack.calibration.format import Calibration, NoiseModel
from focaltrack.calibration.pupil import (
    MAX_CHI2,
    NOLL,
    PupilFit,
    describe,
    fit_pupil,
    pixel_variance,
    pupil_of,
    with_pupil,
)
from focaltrack.sim.optics import Aberrations, Optics
from focaltrack.sim.psf import psf_stack
from focaltrack.sim.spline_psf import calibration_noise, denoised, model_stack

ABERR = Aberrations(
    spherical_waves=0.06, astigmatism_waves=-0.04, coma_x_waves=0.03, coma_y_waves=-0.02
)
OPTICS = Optics(aberrations=ABERR)
WINDOW = 48
PHOTONS = 3.0e5
READ_E = 2.0


@pytest.fixture(scope="module")
def stacks():
    """A bead 0…20 µm deep (11 slices) drawn from known optics, with and without noise, the
    bead 0.3 px right of and 0.2 px above the centre pixel."""
    z = np.arange(11) * 2.0
    clean = psf_stack(OPTICS, z, window_px=WINDOW, offset_px=(0.3, -0.2)).astype(np.float64)
    rng = np.random.default_rng(5)
    noisy = rng.poisson(clean * PHOTONS) + rng.normal(0.0, READ_E, clean.shape)
    scale = float(noisy.reshape(len(z), -1).sum(1).max())
    cal = Calibration(
        psf=(noisy / scale).astype(np.float32),
        z_um=z,
        pixel_size_um=OPTICS.pixel_size_um,
        noise=NoiseModel(offset_adu=0.0, read_noise_adu=READ_E, gain_e_per_adu=1.0),
        source="test",
        n_averages=1,
        bead_signal_adu=scale,
        extra={"centre_x_px": WINDOW // 2 + 0.3, "centre_y_px": WINDOW // 2 - 0.2},
    )
    return cal, clean / float(clean.reshape(len(z), -1).sum(1).max())


@pytest.fixture(scope="module")
def fitted(stacks):
    return fit_pupil(stacks[0])


def test_the_fit_recovers_the_optics(fitted):
    f = fitted
    assert f.acceptable and f.chi2 < 1.5  # the noise, nothing more
    # NA/n is what the rings' growth pins; NA/λ and n/λ can trade off a little
    assert f.kmax / f.kn == pytest.approx(OPTICS.na / OPTICS.n_sample, rel=0.01)
    assert f.kmax == pytest.approx(OPTICS.na / OPTICS.wavelength_um, rel=0.05)
    assert f.kn == pytest.approx(OPTICS.n_sample / OPTICS.wavelength_um, rel=0.05)
    z = dict(zip(NOLL, f.zernike_waves, strict=True))
    # Noll 6: astigmatism at 0°, 8: coma along x, 7: along y, 11: spherical; signs and axes
    # as drawn (the defocus sign is fixed, so a swap or a flip fails here)
    assert z[11] == pytest.approx(ABERR.spherical_waves, abs=0.01)
    assert z[6] == pytest.approx(ABERR.astigmatism_waves, abs=0.01)
    assert z[8] == pytest.approx(ABERR.coma_x_waves, abs=0.006)
    assert z[7] == pytest.approx(ABERR.coma_y_waves, abs=0.006)
    assert all(abs(z[j]) < 0.01 for j in (5, 9, 10, 12, 13, 14, 15, 22))  # none drawn
    assert (f.x_px, f.y_px) == pytest.approx((WINDOW // 2 + 0.3, WINDOW // 2 - 0.2), abs=0.05)


def test_the_drawn_model_is_the_clean_stack_not_the_noisy_one(stacks, fitted):
    cal, clean = stacks
    with_fit = dataclasses.replace(cal, extra={**cal.extra, **fitted.to_extra()})
    model, _ = model_stack(with_fit)

    def err(a: np.ndarray, sl: slice) -> float:
        return float(np.sqrt(np.mean((a[sl] - clean[sl]) ** 2)))

    # within half a percent of each slice's light in focus, where the noise is smallest;
    # a third of the noise's error or less in the dim defocused slices
    assert err(model, slice(None)) < 0.5 * err(cal.psf, slice(None))
    assert err(model, slice(5, None)) < 0.4 * err(cal.psf, slice(5, None))
    # without the pupil, the stack denoised as before
    plain, _ = model_stack(cal)
    assert not np.allclose(plain, model)


def test_stored_in_the_file_and_described(stacks, fitted, tmp_path):
    cal = stacks[0]
    with_fit = with_pupil(cal, every=3, iterations=(2, 2))  # a quick one: only stored here
    assert PupilFit.from_extra(with_fit.extra) is not None
    assert with_pupil(with_fit) is with_fit  # fitted once
    assert with_fit.sha256 == cal.sha256  # the stack itself is untouched
    stored = dataclasses.replace(cal, extra={**cal.extra, **fitted.to_extra()})
    path = stored.save(tmp_path / "cal.h5")
    back = PupilFit.from_extra(Calibration.load(path).extra)
    assert back is not None and back.key() == fitted.key()
    line = describe(fitted)
    assert "NA/λ" in line and "used for the model" in line


def test_a_stack_the_pupil_cannot_explain_keeps_its_own_model():
    # Gaussian spots that widen with depth are no pupil's image: the fit's χ² says so
    s = synth_stack(nz=11, dz_um=2.0, shape=(120, 120), beads=((60.3, 58.6, 1.0),))
    cal = process_stack(
        s.mean,
        s.z_um,
        0.65,
        var_stack=s.var,
        max_frame=s.max_frame,
        n_averages=3,
        window_px=48,
    )
    fit = fit_pupil(cal, iterations=(10, 20))
    assert not fit.acceptable and fit.chi2 > MAX_CHI2
    stored = dataclasses.replace(cal, extra={**cal.extra, **fit.to_extra()})
    assert pupil_of(stored) is None
    # the stack's own model: what the denoiser makes of it, not a drawn pupil
    noise = calibration_noise(np.asarray(cal.psf, dtype=np.float64), cal.centre_px)
    np.testing.assert_allclose(
        model_stack(stored)[0], denoised(np.asarray(cal.psf, np.float64), noise, cal.centre_px)
    )
    assert "not used" in describe(fit)


def test_an_incomplete_noise_model_gives_finite_weights(stacks):
    # an imported stack has no gain, a hand-made calibration may lack the bead's signal or
    # the read noise: the weights then come from the stack itself, finite and positive
    cal = stacks[0]
    known = pixel_variance(cal)
    for noise, signal in (
        (dataclasses.replace(cal.noise, gain_e_per_adu=math.nan), cal.bead_signal_adu),
        (cal.noise, math.nan),
        (cal.noise, 0.0),
        (dataclasses.replace(cal.noise, read_noise_adu=math.nan), cal.bead_signal_adu),
    ):
        var = pixel_variance(dataclasses.replace(cal, noise=noise, bead_signal_adu=signal))
        assert np.all(np.isfinite(var)) and np.all(var > 0)
        # the read term from the window's corners: the model's own where it is known
        assert float(var.min()) == pytest.approx(float(known.min()), rel=0.5)
    fit = fit_pupil(dataclasses.replace(cal, bead_signal_adu=math.nan), every=3, iterations=(3, 3))
    assert math.isfinite(fit.chi2)


def test_malformed_entries_are_read_as_no_pupil(fitted):
    extra = fitted.to_extra()
    for broken in (
        {k: v for k, v in extra.items() if k != "pupil_zernike_noll"},
        {**extra, "pupil_zernike_waves": np.zeros(3)},
        {**extra, "pupil_amplitude": np.zeros(1)},
        {**extra, "pupil_kn": "n/a"},
    ):
        assert PupilFit.from_extra(broken) is None


def test_an_unknown_basis_is_not_read():
    fit = PupilFit(0.8, 2.4, 10.0, 10.0, 0.0, 1.0, 0.0, (0.0,) * len(NOLL), (0.0, 0.0), 1.0)
    extra = fit.to_extra()
    assert PupilFit.from_extra(extra) == fit
    extra["pupil_zernike_noll"] = np.arange(4, 4 + len(NOLL))
    assert PupilFit.from_extra(extra) is None
    assert not dataclasses.replace(fit, chi2=math.nan).acceptable


def test_training_fits_the_pupil_once_and_the_bundle_keeps_it(stacks, tmp_path):
    from focaltrack.models.bundle import load_bundle
    from focaltrack.models.train import train

    cal = stacks[0]
    micro = {"lateral_steps": 2, "axial_steps": 2, "lateral_batch": 2, "axial_batch": 2,
             "val_frames": 1, "val_size": 96, "pupil_fit": True}  # fmt: skip
    lines: list[str] = []
    train(cal, tmp_path / "m", preset="ci", progress=False, log=lines.append, overrides=micro)
    assert any(line.startswith("train: fitting the calibration's pupil") for line in lines)
    assert any(line.startswith("train: pupil: NA/λ") for line in lines)
    kept = load_bundle(tmp_path / "m").calibration
    assert kept.sha256 == cal.sha256 and pupil_of(kept) is not None


def test_a_three_slice_calibration_is_left_as_it_is(stacks):
    cal = stacks[0]
    short = dataclasses.replace(cal, psf=cal.psf[:3], z_um=cal.z_um[:3])
    assert with_pupil(short) is short

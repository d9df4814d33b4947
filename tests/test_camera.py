"""Camera noise: frame statistics follow the offset + gain model; saturation; pixel type."""

from __future__ import annotations

import numpy as np
import pytest

from focaltrack.sim.camera import adu_to_photons, expected_adu, expose, variance_adu
from focaltrack.sim.optics import CameraModel


@pytest.mark.parametrize(
    "cam",
    [
        CameraModel(),  # ORCA-Flash4.0 V2-like: 100 ADU offset, 0.46 e-/ADU, 1.6 e- read
        CameraModel(offset_adu=400.0, gain_e_per_adu=2.0, read_noise_e=6.0, quantum_efficiency=0.9),
    ],
)
@pytest.mark.parametrize("photons", [0.0, 3.0, 150.0])
def test_mean_and_variance_follow_the_model(cam, photons):
    rng = np.random.default_rng(11)
    frame = expose(np.full((256, 256), photons), cam, rng)
    assert frame.dtype == np.uint16 and frame.shape == (256, 256)
    f = frame.astype(np.float64)
    mean = cam.offset_adu + cam.quantum_efficiency * photons / cam.gain_e_per_adu
    var = (cam.quantum_efficiency * photons + cam.read_noise_e**2) / cam.gain_e_per_adu**2
    var += 1.0 / 12.0  # rounding to integer ADU
    n = f.size
    assert f.mean() == pytest.approx(mean, abs=5 * np.sqrt(var / n) + 0.01)
    assert f.var() == pytest.approx(var, rel=0.03)
    assert float(expected_adu(photons, cam)) == pytest.approx(mean)
    assert float(variance_adu(photons, cam)) == pytest.approx(var)


def test_background_adds_to_signal():
    cam = CameraModel()
    rng = np.random.default_rng(1)
    a = expose(np.full((200, 200), 30.0), cam, rng, background_photons=20.0).astype(float)
    b = expose(np.full((200, 200), 50.0), cam, rng).astype(float)
    assert a.mean() == pytest.approx(b.mean(), rel=0.01)
    assert a.var() == pytest.approx(b.var(), rel=0.05)
    # photons back from ADU: unbiased
    assert adu_to_photons(a, cam).mean() == pytest.approx(50.0, rel=0.01)


def test_saturation_clips_at_full_scale():
    cam = CameraModel()
    rng = np.random.default_rng(2)
    photons = np.array([[0.0, 1e3, 1e5, 1e9]])
    frame = expose(photons, cam, rng)
    assert frame.dtype == np.uint16
    assert frame[0, 2] == frame[0, 3] == 65535
    assert frame[0, 1] < 65535
    assert expose(np.full((4, 4), 1e12), cam, rng).min() == 65535


def test_eight_bit_camera_and_negative_expectations():
    cam = CameraModel(bit_depth=8, offset_adu=10.0, gain_e_per_adu=1.0)
    frame = expose(np.array([[-5.0, 0.0, 1e6]]), cam, np.random.default_rng(0))
    assert frame.dtype == np.uint8
    assert frame[0, 2] == 255
    assert frame[0, 0] < 30  # a negative expectation counts as no light


def test_reproducible_with_seed():
    cam = CameraModel()
    img = np.random.default_rng(5).uniform(0, 100, (32, 32))
    a = expose(img, cam, np.random.default_rng(9))
    b = expose(img, cam, 9)
    np.testing.assert_array_equal(a, b)

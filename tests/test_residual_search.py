"""The residual's matched filter (`focaltrack.models.residual_search`): a deep ring whose
pixels are each near the noise is found where it is, at about its depth and with the SNR a
detector that knew its position would give it; noise alone gives (almost) nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_mle import sim_calibration

from focaltrack.calibration import Calibration
from focaltrack.models.residual_search import TEMPLATE_SPACING_UM, Z_FROM_FRACTION, MatchedFilter
from focaltrack.sim.spline_psf import SplinePSF

SHAPE = (160, 160)
BACKGROUND_E = 10.0
READ_VAR_E2 = 4.0
THRESHOLD = 5.0
NMS_PX = 31


@pytest.fixture(scope="module")
def cal() -> Calibration:
    return sim_calibration(60.0, window=96)


@pytest.fixture(scope="module")
def mf(cal: Calibration) -> MatchedFilter:
    return MatchedFilter(cal)


@pytest.fixture(scope="module")
def psf(cal: Calibration) -> SplinePSF:
    return SplinePSF(cal, dtype=torch.float64)


def residual(psf: SplinePSF, truth: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
    """A frame (e⁻) of emitters ``truth`` (n, 4: x, y, z, photons) on the background, with
    Poisson and read noise, less the background: what the filter sees once every found
    emitter is subtracted."""
    t = torch.as_tensor(truth, dtype=torch.float64).reshape(-1, 4)
    mu = psf.render(SHAPE, t[:, 0], t[:, 1], t[:, 2], t[:, 3]) + BACKGROUND_E
    e = rng.poisson(mu.numpy()) + rng.normal(0.0, math.sqrt(READ_VAR_E2), SHAPE)
    return torch.as_tensor(e - BACKGROUND_E, dtype=torch.float32)


def variance() -> torch.Tensor:
    return torch.full(SHAPE, BACKGROUND_E + READ_VAR_E2)


def test_templates_are_the_deep_slices(mf: MatchedFilter, cal: Calibration) -> None:
    z = np.asarray(cal.z_um)
    first = z[z >= z[0] + Z_FROM_FRACTION * (z[-1] - z[0])][0]
    step = float(np.median(np.diff(z)))
    assert mf.z_um[0] == pytest.approx(first)
    np.testing.assert_allclose(np.diff(mf.z_um), round(TEMPLATE_SPACING_UM / step) * step)
    assert mf.templates.shape == (len(mf.z_um), *cal.psf.shape[1:])
    # each template is its slice, denoised: the same light where the ring is
    k = int(np.argmin(np.abs(z - mf.z_um[-1])))
    assert float(mf.templates[-1].sum()) == pytest.approx(float(cal.psf[k].sum()), rel=0.05)


def test_a_ring_under_the_noise_is_found_where_it_is(mf: MatchedFilter, psf: SplinePSF) -> None:
    rng = np.random.default_rng(3)
    hits, peak_snr = 0, []
    for _ in range(10):
        x, y = rng.uniform(50.0, 110.0, 2)
        z = rng.uniform(30.0, 55.0)
        photons = 1200.0
        truth = np.array([[x, y, z, photons]])
        # the brightest pixel of the ring: below 2 σ of one pixel's noise
        one = psf.render(SHAPE, *(torch.as_tensor(truth[:, i]) for i in range(4)))
        peak_snr.append(float(one.max()) / math.sqrt(BACKGROUND_E + READ_VAR_E2 + one.max()))
        found, snr = mf.search(
            residual(psf, truth, rng), variance(), threshold=THRESHOLD, nms_px=NMS_PX
        )
        assert len(found) >= 1
        best = found[np.argmax(snr)]
        # its SNR: that of a detector knowing where it is, Σ s μ / √(Σ s² v), within 30 %
        s = one.double() / photons
        known = float((s * one).sum() / torch.sqrt((s * s * (BACKGROUND_E + READ_VAR_E2)).sum()))
        assert snr.max() == pytest.approx(known, rel=0.3)
        if np.hypot(best[0] - x, best[1] - y) <= 2.0 and abs(best[2] - z) <= 6.0:
            hits += 1
    assert max(peak_snr) < 1.5, peak_snr  # each pixel alone: within its noise
    assert hits >= 8


def test_noise_alone_gives_almost_nothing(mf: MatchedFilter, psf: SplinePSF) -> None:
    rng = np.random.default_rng(4)
    found = sum(
        len(
            mf.search(
                residual(psf, np.zeros((0, 4)), rng),
                variance(),
                threshold=THRESHOLD,
                nms_px=NMS_PX,
            )[0]
        )
        for _ in range(20)
    )
    assert found <= 2


def test_a_faint_find_in_a_bright_emitters_light_is_its_model_error() -> None:
    """`localizer._under_brighter`: a find with under a tenth of the photons of a brighter
    emitter whose window holds it is dropped; one outside that window, one bright enough,
    and the networks' own emitters are kept."""
    from focaltrack.models.localizer import FIND_MIN_RATIO, _under_brighter
    from focaltrack.models.refine import Refined

    x = np.array([100.0, 110.0, 200.0, 104.0, 96.0])
    photons = np.array([50000.0, 1000.0, 1000.0, 0.5 * 50000.0, 1000.0])
    zeros = np.zeros(len(x))
    r = Refined(x, zeros + 100.0, zeros + 60.0, photons, zeros, zeros, zeros, zeros,
                np.zeros(len(x), dtype=np.int64), zeros + 50.0)  # fmt: skip
    window = np.full(len(x), 64)
    # rows 0 and 1 are the networks', 2–4 the filter's finds
    drop = _under_brighter(r, 2, window)
    assert FIND_MIN_RATIO == pytest.approx(0.1)
    assert drop.tolist() == [False, False, False, False, True]
    assert not _under_brighter(r, len(x), window).any()


def test_one_emitter_fitted_twice_is_reported_once() -> None:
    """`localizer._duplicates`: of two fits within 2 px and one calibration step in z, the
    less significant is dropped; a neighbour 3 px away, or at the same x, y but 5 µm deeper,
    is another emitter and kept."""
    from focaltrack.models.localizer import DUPLICATE_PX, _duplicates
    from focaltrack.models.refine import Refined

    x = np.array([100.0, 100.8, 103.0, 100.0, 50.0, 50.0])
    z = np.array([60.0, 60.5, 60.0, 65.0, 30.0, 30.0])
    sig = np.array([40.0, 45.0, 30.0, 30.0, 20.0, 20.0])
    zeros = np.zeros(len(x))
    r = Refined(x, zeros + 100.0, z, zeros + 1e4, zeros, zeros, zeros, zeros,
                np.zeros(len(x), dtype=np.int64), sig)  # fmt: skip
    drop = _duplicates(r, DUPLICATE_PX, 2.0)
    # row 0 loses to row 1 (more significant), 2 and 3 are other emitters; of the tie
    # 4 / 5 the first is kept
    assert drop.tolist() == [True, False, False, False, False, True]
    assert not _duplicates(r.take(np.array([0, 2, 3, 4])), DUPLICATE_PX, 2.0).any()
    # greedy: of a chain A > B > C with B close to both and A far from C, B goes and C
    # stays (B, dropped by A, drops nothing)
    x3 = np.array([0.0, 1.5, 3.0])
    z3 = np.zeros(3)
    r3 = Refined(x3, z3, z3, z3 + 1e4, z3, z3, z3, z3, np.zeros(3, dtype=np.int64),
                 np.array([30.0, 20.0, 10.0]))  # fmt: skip
    assert _duplicates(r3, DUPLICATE_PX, 2.0).tolist() == [False, True, False]
    # a fit without a finite position is nobody's duplicate (and kept for its flags)
    r3.x_px[0] = np.nan
    assert _duplicates(r3, DUPLICATE_PX, 2.0).tolist() == [False, False, True]


def test_the_localizer_adds_what_the_filter_finds_and_keeps_its_rows(tmp_path) -> None:
    """`Localizer._search_residual` on a frame whose bright emitter was fitted and whose
    two deep ones were missed: both are found and fitted, each row keeps its own score (the
    fitted emitter's; the finds' between 0.5 and 1), and each lies where its emitter is."""
    from cnn_fixtures import save_untrained_bundle

    from focaltrack.models.localizer import DecodeSettings, Localizer

    path, cal = save_untrained_bundle(tmp_path / "model")
    loc = Localizer.from_bundle(path, device="cpu")
    shape = (192, 192)
    truth = np.array([[60.0, 60.0, 10.0, 40000.0], [130.0, 70.0, 60.0, 8000.0],
                      [90.0, 140.0, 80.0, 8000.0]])  # fmt: skip
    t = torch.as_tensor(truth, dtype=torch.float64)
    psf = loc.refiner.psf
    mu = psf.render(shape, t[:, 0], t[:, 1], t[:, 2], t[:, 3]).double().numpy() + 10.0
    rng = np.random.default_rng(5)
    noise = cal.noise
    e = rng.poisson(mu) + rng.normal(0.0, noise.read_noise_adu * noise.gain_e_per_adu, shape)
    adu = np.rint(e / noise.gain_e_per_adu + noise.offset_adu).clip(0, 65535).astype(np.uint16)
    fitted = loc.refiner.fit(adu, truth[:1, :3] + 0.3)
    st = DecodeSettings()
    r, score = loc._search_residual(adu, loc._electrons(adu[None])[0], fitted, np.array([0.9]), st)
    assert len(r.x_px) == len(score) == 3, (r, score)
    xy = np.column_stack([r.x_px, r.y_px])
    for i, (x, y) in enumerate(truth[:, :2]):
        k = int(np.argmin(np.hypot(xy[:, 0] - x, xy[:, 1] - y)))
        assert np.hypot(xy[k, 0] - x, xy[k, 1] - y) < 1.0, (i, xy)
        assert abs(r.z_um[k] - truth[i, 2]) < 3.0, (i, r.z_um)
        if i == 0:
            assert score[k] == pytest.approx(0.9)
        else:
            assert 0.5 <= score[k] <= 1.0

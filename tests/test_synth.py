"""The training-data synthesizer: renders, noise and labels agree with the emitters drawn."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cnn_fixtures import make_calibration

from focaltrack.calibration import NoiseModel
from focaltrack.calibration.preprocess import DEFAULT_GAIN_E_PER_ADU, Preprocess
from focaltrack.sim.spline_psf import SplinePSF, model_stack
from focaltrack.sim.synth import (
    Emitters,
    SynthConfig,
    Synthesizer,
    axial_targets,
    axial_targets_with_offsets,
    lateral_targets,
)


@pytest.fixture(scope="module")
def cal():
    return make_calibration()


@pytest.fixture(scope="module")
def synth(cal):
    return Synthesizer(cal, seed=3)


def _em(**cols: list[float]) -> Emitters:
    n = len(cols["x_px"])
    return Emitters(
        b=torch.as_tensor(cols.get("b", [0] * n)),
        x_px=torch.as_tensor(cols["x_px"], dtype=torch.float32),
        y_px=torch.as_tensor(cols["y_px"], dtype=torch.float32),
        z_um=torch.as_tensor(cols["z_um"], dtype=torch.float32),
        intensity=torch.as_tensor(cols.get("intensity", [1.0] * n), dtype=torch.float32),
    )


@pytest.fixture(scope="module")
def stack_synth(cal):
    return Synthesizer(cal, config=SynthConfig(psf_model="stack"), seed=3)


def _one(x: float, y: float, z: float, amp: float = 1.0) -> tuple[torch.Tensor, ...]:
    return (
        torch.tensor([0]),
        torch.tensor([x]),
        torch.tensor([y]),
        torch.tensor([z]),
        torch.tensor([amp]),
    )


@pytest.mark.parametrize("model", ["spline", "stack"])
def test_render_reproduces_calibration_slice(cal, synth, stack_synth, model):
    """An emitter on the calibration's centre pixel at a calibration z is that slice of the
    model: the denoised stack the spline interpolates, or the raw stack."""
    table = (synth if model == "spline" else stack_synth).table
    assert table.model == model
    ref = model_stack(cal)[0] if model == "spline" else cal.psf.astype(np.float64)
    cy, cx = table.centre
    h, w = cal.window_px
    for k in (0, 10, 50):
        img = table.render((h, w), 1, *_one(cx, cy, float(cal.z_um[k]), 2.0))[0].numpy()
        np.testing.assert_allclose(img, 2.0 * ref[k], atol=1e-5 * ref[k].max() + 1e-9)


@pytest.mark.parametrize("model", ["spline", "stack"])
def test_render_places_and_interpolates(cal, synth, stack_synth, model):
    """Sub-pixel shifts move the centroid; between slices, z interpolates (the stack table
    linearly; the spline table is the localizer's spline itself, at every z and phase)."""
    table = (synth if model == "spline" else stack_synth).table
    size = 256
    x0, y0 = 100.0, 120.0
    a = table.render((size, size), 1, *_one(x0, y0, 30.0))[0].numpy().astype(np.float64)
    b = table.render((size, size), 1, *_one(x0 + 0.5, y0 - 0.25, 30.0))[0].numpy()
    yy, xx = np.mgrid[:size, :size]

    def centroid(im: np.ndarray) -> tuple[float, float]:
        return float((im * xx).sum() / im.sum()), float((im * yy).sum() / im.sum())

    (ax, ay), (bx, by) = centroid(a), centroid(b.astype(np.float64))
    assert bx - ax == pytest.approx(0.5, abs=0.02)
    assert by - ay == pytest.approx(-0.25, abs=0.02)
    # z = 31 µm lies halfway between the 30 and 32 µm slices
    mid = table.render((size, size), 1, *_one(x0, y0, 31.0))[0]
    if model == "stack":
        k30, k32 = (int(np.argmin(abs(cal.z_um - z))) for z in (30.0, 32.0))
        c30 = table.render((size, size), 1, *_one(x0, y0, 30.0))[0]
        c32 = table.render((size, size), 1, *_one(x0, y0, 32.0))[0]
        assert k32 == k30 + 1
        np.testing.assert_allclose(mid.numpy(), (0.5 * (c30 + c32)).numpy(), atol=1e-7)
    else:
        spline = SplinePSF(cal)
        for x, y, got in ((x0, y0, mid), (x0 + 0.5, y0 - 0.25, None)):
            want = spline.render(
                (size, size),
                torch.tensor([x]),
                torch.tensor([y]),
                torch.tensor([31.0]),
                torch.ones(1),
                window=cal.window_px,
            )
            if got is None:
                got = table.render((size, size), 1, *_one(x, y, 31.0))[0]
            np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6 * float(want.max()))


def test_a_three_slice_calibration_draws_from_the_stack(cal):
    """A cubic spline needs 4 slices; a shorter calibration (which `Calibration` allows)
    still trains, from the stack table, and the table says which it is."""
    from focaltrack.calibration import Calibration

    short = Calibration(
        psf=cal.psf[:3].copy(),
        z_um=cal.z_um[:3].copy(),
        pixel_size_um=cal.pixel_size_um,
        noise=cal.noise,
        source="three slices",
        bit_depth=cal.bit_depth,
    )
    table = Synthesizer(short).table
    assert table.model == "stack" and table.table.shape[0] == 5


def test_unknown_psf_model_is_an_error(cal):
    with pytest.raises(ValueError, match="'spline' or 'stack'"):
        Synthesizer(cal, config=SynthConfig(psf_model="pupil"))


def test_emitters_outside_spill_light_in(synth):
    """An emitter centred outside the image still contributes its overlapping light."""
    img = synth.table.render(
        (64, 64), 1, torch.tensor([0]), torch.tensor([-20.0]), torch.tensor([32.0]),
        torch.tensor([80.0]), torch.ones(1),
    )[0]  # fmt: skip
    assert float(img.sum()) > 0.05
    assert float(img[:, :10].sum()) > float(img[:, -10:].sum())


def _cell(v: float, s: int) -> int:
    return math.floor(v + 0.5) // s


def test_lateral_labels_agree_with_emitters(synth):
    batch = synth.lateral_batch(4, 128)
    em = batch.emitters
    s = 4
    inside = (em.x_px >= -0.5) & (em.x_px < 127.5) & (em.y_px >= -0.5) & (em.y_px < 127.5)
    assert int(inside.sum()) > 0
    rows = list(
        zip(em.b[inside].tolist(), em.x_px[inside].tolist(), em.y_px[inside].tolist(), strict=True)
    )
    cells = [(b, _cell(y, s), _cell(x, s)) for b, x, y in rows]
    for b, i, j in cells:
        assert bool(batch.positive[b, 0, i, j])
        assert float(batch.heat[b, 0, i, j]) == 1.0
    assert int(batch.positive.sum()) == len(set(cells))
    # offsets reconstruct positions exactly for cells holding one emitter
    half = (s - 1) / 2
    for (b, x, y), cell in zip(rows, cells, strict=True):
        if cells.count(cell) == 1:
            _, i, j = cell
            assert i * s + half + s * float(batch.offset[b, 0, i, j]) == pytest.approx(y, abs=1e-4)
            assert j * s + half + s * float(batch.offset[b, 1, i, j]) == pytest.approx(x, abs=1e-4)
    assert float(batch.heat.max()) <= 1.0 and float(batch.heat.min()) >= 0.0
    assert batch.x.shape == (4, 1, 128, 128) and torch.isfinite(batch.x).all()


def test_lateral_targets_outside_emitters_are_not_labels():
    em = _em(x_px=[-3.0, 130.0, 10.2], y_px=[5.0, 5.0, 20.7], z_um=[1.0, 2.0, 3.0])
    _, _, pos = lateral_targets(em, 1, 128, 4)
    assert int(pos.sum()) == 1
    assert bool(pos[0, 0, 21 // 4, 10 // 4])


def test_axial_targets_encode_z_between_bins():
    z_grid = torch.arange(0.0, 101.0, 2.0)
    em = _em(x_px=[64.0, 65.0, 64.0, 90.0], y_px=[64.0, 63.0, 64.0, 64.0],
             z_um=[31.2, 70.0, 10.0, 50.0], b=[0, 0, 1, 1])  # fmt: skip
    t = axial_targets(em, 2, 64.0, 4.0, z_grid)
    # window 0: two emitters at the centre → two triangles; weighted means recover z
    assert t[0, 15] == pytest.approx(0.4, abs=1e-5) and t[0, 16] == pytest.approx(0.6, abs=1e-5)
    z = float((t[0, 15:17] * z_grid[15:17]).sum() / t[0, 15:17].sum())
    assert z == pytest.approx(31.2, abs=1e-4)
    assert t[0, 35] == pytest.approx(1.0)
    assert float(t[0].sum()) == pytest.approx(2.0, abs=1e-5)
    # window 1: the emitter 26 px away is not a label
    assert t[1, 5] == pytest.approx(1.0) and float(t[1].sum()) == pytest.approx(1.0)


def test_axial_offsets_belong_to_the_emitter_owning_each_bin():
    z_grid = torch.arange(0.0, 101.0, 2.0)
    # window 0: a centre emitter at z 31.2 and a neighbour 8 px away at z 33.0 (sharing bin
    # 16 with it) and a far one (not a label); window 1: nothing near
    em = _em(x_px=[64.0, 72.0, 64.0, 90.0], y_px=[62.0, 64.0, 80.0, 64.0],
             z_um=[31.2, 33.0, 50.0, 50.0], b=[0, 0, 0, 1])  # fmt: skip
    t, off = axial_targets_with_offsets(em, 2, 64.0, 10.0, z_grid)
    assert off.shape == (2, 2, 51)
    # bin 15 (z 30) belongs to the centre emitter only: (dy, dx) = (-2, 0) / 10
    assert off[0, :, 15].tolist() == pytest.approx([-0.2, 0.0])
    # bin 16 (z 32): weights 0.6 (centre) and 0.5 (neighbour) → the centre emitter's
    assert t[0, 16] == pytest.approx(0.6, abs=1e-5)
    assert off[0, :, 16].tolist() == pytest.approx([-0.2, 0.0])
    # bin 17 (z 34) belongs to the neighbour: (0, 8) / 10
    assert off[0, :, 17].tolist() == pytest.approx([0.0, 0.8])
    # the emitter 16 px away (radius 10) is neither a label nor an offset
    assert float(t[0, 25]) == 0.0 and off[0, :, 25].tolist() == [0.0, 0.0]
    assert float(off[1].abs().sum()) == 0.0 and float(t[1].sum()) == 0.0
    assert torch.equal(t, axial_targets(em, 2, 64.0, 10.0, z_grid))


def test_axial_batch_labels_the_centre_emitter(synth):
    b = synth.axial_batch(16)
    em = b.emitters
    for i in range(16):
        m = em.b == i
        d = torch.hypot(em.x_px[m] - b.centre_px, em.y_px[m] - b.centre_px)
        near = em.z_um[m][d <= synth.config.axial_label_radius_px]
        # every near emitter's z is where the target says
        r = synth.config.axial_label_radius_px
        for z, y, x in zip(near.tolist(), em.y_px[m][d <= r].tolist(),
                           em.x_px[m][d <= r].tolist(), strict=True):  # fmt: skip
            k = int(np.clip(round(z / 2.0), 0, 50))
            assert float(b.target[i, k]) >= 0.5 - 1e-6
            alone = int(((near - z).abs() < 2.0).sum()) == 1  # no other claim on bin k
            if alone:
                want = [(y - b.centre_px) / r, (x - b.centre_px) / r]
                assert b.offset[i, :, k].tolist() == pytest.approx(want, abs=1e-5)
        if len(near) == 0:
            assert float(b.target[i].max()) == 0.0


def test_snr_construction_matches_definition(synth):
    snr = torch.tensor([0.0, 10.0, 20.0])
    bg = torch.tensor([0.0, 14.4, 100.0])
    k = synth.photons_for_snr(snr, bg)
    s_peak = k * synth.table.reference_peak
    got = 20 * torch.log10(s_peak / torch.sqrt(s_peak + bg + synth.pre.read_noise_e**2))
    np.testing.assert_allclose(got.numpy(), snr.numpy(), atol=1e-4)


def test_noise_statistics_follow_the_camera_model(cal):
    synth = Synthesizer(cal, seed=1)
    flat = torch.zeros((2, 128, 128))
    adu = synth.expose(
        flat, snr_db=torch.tensor([10.0, 10.0]), background_e=torch.tensor([0.0, 50.0])
    )
    n = cal.noise
    e = (adu - n.offset_adu) * n.gain_e_per_adu
    assert float(e[0].mean()) == pytest.approx(0.0, abs=0.1)
    # read noise (plus ADU rounding) only
    assert float(e[0].std()) == pytest.approx(
        math.sqrt((n.read_noise_adu * n.gain_e_per_adu) ** 2 + n.gain_e_per_adu**2 / 12), rel=0.05
    )
    assert float(e[1].mean()) == pytest.approx(50.0, rel=0.02)
    assert float(e[1].var()) == pytest.approx(50.0 + 1.6**2, rel=0.1)


def test_deterministic_for_a_seed(cal):
    a = Synthesizer(cal, seed=7).lateral_batch(2, 64)
    b = Synthesizer(cal, seed=7).lateral_batch(2, 64)
    c = Synthesizer(cal, seed=8).lateral_batch(2, 64)
    assert torch.equal(a.adu, b.adu) and torch.equal(a.heat, b.heat)
    assert not torch.equal(a.adu, c.adu)


def test_preprocess_unknown_gain_falls_back():
    p = Preprocess.from_noise(NoiseModel(offset_adu=100.0, read_noise_adu=2.0))
    assert p.gain_e_per_adu == DEFAULT_GAIN_E_PER_ADU
    y = p(torch.tensor([100.0, 110.0, 1000.0]))
    assert float(y[0]) == 0.0 and 0 < float(y[1]) < float(y[2])


def test_config_round_trips_to_json():
    d = SynthConfig().to_dict()
    assert d["snr_db"] == [-4.0, 34.0] and isinstance(d["phases"], int)


def test_throughput_is_measured(cal):
    s = Synthesizer(cal, seed=0)
    s.lateral_batch(2, 64)
    assert s.windows_drawn == 2 and s.windows_per_s > 0

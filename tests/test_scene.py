"""Scenes: motion statistics, ids, emitters leaving and entering, and frames from truth."""

from __future__ import annotations

import numpy as np
import pytest

from focaltrack.sim.optics import SIM_ABERRATIONS, CameraModel, Optics
from focaltrack.sim.psf import PSFModel
from focaltrack.sim.scene import GroundTruth, Motion, Scene, render_frame


def test_brownian_msd_is_6dt():
    d = 2.0
    s = Scene(
        field_um=(1e5, 1e5), z_range_um=(-1e5, 1e5), n_emitters=3000,
        motion=Motion.BROWNIAN, diffusion_um2_s=d, seed=4,
    )  # fmt: skip
    t0 = s.truth()
    dt, steps = 0.01, 50
    for _ in range(steps):
        s.step(dt)
    t1 = s.truth()
    np.testing.assert_array_equal(t0.ids, t1.ids)  # nobody left a field this large
    msd = float(np.mean(np.sum((t1.xyz_um - t0.xyz_um) ** 2, axis=1)))
    t = dt * steps
    # 3000 emitters x 3 axes: relative standard error of the MSD ≈ sqrt(2/9000) ≈ 1.5 %
    assert msd == pytest.approx(6 * d * t, rel=0.06)
    assert s.t_s == pytest.approx(t)


def test_flow_displacement_is_v_t_and_ids_are_stable():
    v = np.array([75.0, -10.0, 5.0])
    s = Scene(
        field_um=(300, 300), z_range_um=(0, 100), n_emitters=40, motion=Motion.FLOW,
        velocity_um_s=v, diffusion_um2_s=0.0, seed=1,
    )  # fmt: skip
    before = s.truth()
    after = s.step(0.01)  # 100 fps
    common, ia, ib = np.intersect1d(before.ids, after.ids, return_indices=True)
    assert len(common) >= 35
    np.testing.assert_allclose(
        after.xyz_um[ib] - before.xyz_um[ia], np.tile(v * 0.01, (len(ia), 1))
    )
    # three steps later, the survivors are exactly 3 v dt further
    for _ in range(3):
        s.step(0.01)
    later = s.truth()
    common, ia, ib = np.intersect1d(after.ids, later.ids, return_indices=True)
    np.testing.assert_allclose(later.xyz_um[ib] - after.xyz_um[ia], np.tile(v * 0.03, (len(ia), 1)))


def test_flow_emitters_leave_downstream_and_enter_upstream_count_constant():
    n = 25
    s = Scene(
        field_um=(100, 80), z_range_um=(0, 50), n_emitters=n, motion=Motion.FLOW,
        velocity_um_s=75.0, diffusion_um2_s=0.0, seed=7,
    )  # fmt: skip
    seen_max = int(s.ids.max())
    counts = []
    for _ in range(400):  # 4 s at 100 fps: the field is crossed three times
        prev = set(s.ids.tolist())
        tr = s.step(0.01)
        counts.append(len(tr))
        new = ~np.isin(tr.ids, list(prev))
        if new.any():
            assert tr.ids[new].min() > seen_max  # ids never reused
            seen_max = int(tr.ids.max())
            # newcomers appear at the upstream edge (x = 0), within one step of travel
            assert np.all(tr.xyz_um[new, 0] <= 75.0 * 0.01 + 1e-9)
        assert len(set(tr.ids.tolist())) == len(tr)
    assert set(counts) == {n}
    assert s.entered_total == s.left_total > 2 * n


def test_brownian_emitters_leave_and_reenter_without_keep_count_they_only_leave():
    kw = dict(
        field_um=(20, 20), z_range_um=(0, 10), n_emitters=50,
        motion=Motion.BROWNIAN, diffusion_um2_s=20.0,
    )  # fmt: skip
    keep = Scene(**kw, seed=3)
    drop = Scene(**kw, seed=3, keep_count=False)
    for _ in range(100):
        keep.step(0.01)
        drop.step(0.01)
    assert len(keep) == 50 and keep.left_total > 0 and keep.entered_total == keep.left_total
    assert len(drop) < 50 and drop.entered_total == 0
    for s in (keep, drop):
        xyz = s.truth().xyz_um
        assert np.all((xyz[:, 2] >= 0) & (xyz[:, 2] <= 10))  # reflected in depth
        assert np.all((xyz[:, :2] >= 0) & (xyz[:, :2] <= 20))


def test_static_scene_and_truth_copies():
    xyz = np.array([[10.0, 20.0, 5.0], [30.0, 40.0, 50.0]])
    s = Scene.static(xyz, [1000.0, 2000.0])
    tr = s.step(1.0)
    np.testing.assert_array_equal(tr.xyz_um, xyz)
    np.testing.assert_array_equal(tr.ids, [0, 1])
    np.testing.assert_array_equal(tr.photons, [1000.0, 2000.0])
    tr.xyz_um[0, 0] = -1  # the truth is a copy
    assert s.positions_um[0, 0] == 10.0
    np.testing.assert_array_equal(tr.defocus_um(20.0), [15.0, -30.0])
    assert isinstance(tr, GroundTruth) and len(tr) == 2
    assert Scene(n_emitters=5, motion="static", seed=0).step(0.1).xyz_um.shape == (5, 3)


def test_scene_rejects_bad_arguments():
    with pytest.raises(ValueError):
        Scene(field_um=(0, 10))
    with pytest.raises(ValueError):
        Scene(z_range_um=(10, 0))
    with pytest.raises(ValueError):
        Scene(diffusion_um2_s=-1)
    with pytest.raises(ValueError):
        Scene(motion="teleport")
    with pytest.raises(ValueError):
        Scene(n_emitters=3).step(-0.1)


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    return PSFModel(
        Optics(aberrations=SIM_ABERRATIONS),
        z_min_um=-4.0,
        z_max_um=4.0,
        dz_um=1.0,
        cache_path=tmp_path_factory.mktemp("psf") / "m.npz",
    )


def test_render_frame_from_truth(small_model):
    cam = CameraModel()
    p = small_model.pixel_size_um
    s = Scene.static([[40 * p, 45 * p, 10.0], [60 * p, 50.3 * p, 12.0]], [5e4, 5e4])
    frame, defocus = render_frame(
        s.truth(), small_model, cam, np.random.default_rng(0), 10.0, (96, 100),
        background_photons=10.0,
    )  # fmt: skip
    assert frame.dtype == np.uint16 and frame.shape == (96, 100)
    np.testing.assert_allclose(defocus, [0.0, -2.0])
    assert np.unravel_index(frame.argmax(), frame.shape) == (45, 40)
    # photons are conserved through the camera: sum of (ADU - offset) * gain / QE
    sig = (frame.astype(float) - cam.offset_adu) * cam.gain_e_per_adu / cam.quantum_efficiency
    expected = 1e5 * 0.99 + 10.0 * frame.size  # both fully inside, ≥ 99 % in window
    assert sig.sum() == pytest.approx(expected, rel=0.02)

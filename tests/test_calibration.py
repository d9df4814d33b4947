"""Focal-stack calibration: processing, noise model, file import, acquisition, recovery."""

from __future__ import annotations

import math
import os
import threading

import h5py
import numpy as np
import pytest
import tifffile
from calib_synth import synth_stack

from focaltrack.calibration import (
    Calibration,
    CalibrationError,
    load_stack_file,
    process_stack,
    summary,
)
from focaltrack.calibration.beads import find_bead
from focaltrack.calibration.drift import smooth_drift


def _centroid(img: np.ndarray) -> tuple[float, float]:
    p = np.clip(img, 0, None).astype(np.float64)
    yy, xx = np.mgrid[: img.shape[0], : img.shape[1]]
    return float((p * xx).sum() / p.sum()), float((p * yy).sum() / p.sum())


# ------------------------------------------------------------------ processing


@pytest.fixture(scope="module")
def synth():
    return synth_stack()


@pytest.fixture(scope="module")
def cal(synth):
    return process_stack(
        synth.mean,
        synth.z_um,
        0.65,
        var_stack=synth.var,
        max_frame=synth.max_frame,
        n_averages=3,
        source="synthetic",
    )


def test_bead_found_and_tracked_through_drift(synth, cal):
    xs = cal.extra["bead_x_per_slice_px"]
    ys = cal.extra["bead_y_per_slice_px"]
    assert np.abs(xs - synth.truth_xy[:, 0]).max() < 0.25
    assert np.abs(ys - synth.truth_xy[:, 1]).max() < 0.25
    assert cal.bead_xy_px == pytest.approx(tuple(synth.truth_xy[0]), abs=0.1)
    assert cal.extra["focus_index"] == 0


def test_drift_removed_is_smooth_and_closer_to_the_truth_than_each_centroid(synth, cal):
    # The synthetic stage drifts linearly; each slice's centroid scatters about it.
    dx, dy = cal.extra["drift_x_px"], cal.extra["drift_y_px"]
    tx, ty = synth.truth_xy[:, 0], synth.truth_xy[:, 1]
    fx, fy = cal.extra["bead_x_per_slice_px"], cal.extra["bead_y_per_slice_px"]
    assert np.abs(dx - tx).max() < 0.1 and np.abs(dy - ty).max() < 0.1
    assert np.sqrt(np.mean((dx - tx) ** 2 + (dy - ty) ** 2)) < np.sqrt(
        np.mean((fx - tx) ** 2 + (fy - ty) ** 2)
    )
    assert np.abs(np.diff(dx, 3)).max() < 1e-9  # a quadratic in acquisition order


def test_a_stage_jump_is_reported(synth, caplog):
    # The last six slices moved 3 px at once (a knock): the smooth drift does not follow
    # a jump; the processing centres those slices on their own centres and says where.
    mean = synth.mean.copy()
    mean[15:] = np.roll(mean[15:], 3, axis=2)
    with caplog.at_level("WARNING", logger="focaltrack.calibration.process"):
        cal = process_stack(mean, synth.z_um, 0.65, n_averages=3, source="synthetic")
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "off the smooth drift" in msg and "z 75" in msg
    # the jumped slices are centred on their own centres: the bead 3 px over, followed
    found, drift = cal.extra["bead_x_per_slice_px"], cal.extra["drift_x_px"]
    np.testing.assert_allclose(drift[15:], found[15:])
    assert np.all(np.abs(found[15:] - synth.truth_xy[15:, 0] - 3.0) < 0.25)


def test_no_jump_is_reported_for_a_smooth_drift(synth, caplog):
    with caplog.at_level("WARNING", logger="focaltrack.calibration.process"):
        process_stack(synth.mean, synth.z_um, 0.65, n_averages=3, source="synthetic")
    assert "off the smooth drift" not in caplog.text


def test_smooth_drift_weights_by_scatter_and_ignores_a_wild_slice():
    rng = np.random.default_rng(0)
    k = np.arange(51.0)
    truth = 10.0 + 0.05 * k - 4e-4 * k**2
    # centroids precise near focus, 20× noisier deep down, and one slice 3 px off
    noise = np.where(k < 20, 0.005, 0.1) * rng.standard_normal(k.size)
    found = truth + noise
    found[40] += 3.0
    fy, fx = smooth_drift(found, found[::-1].copy())
    deep = k >= 20
    assert np.sqrt(np.mean((fy - truth)[deep] ** 2)) < 0.5 * np.sqrt(np.mean(noise[deep] ** 2))
    np.testing.assert_allclose(fx, fy[::-1], atol=1e-9)  # each axis on its own
    assert np.abs(fy - truth)[:20].max() < 0.01  # the precise slices hold the fit
    # too few slices for the polynomial: the centres as found
    short = np.array([1.0, 1.3, 0.9, 1.2])
    for a in smooth_drift(short, short):
        np.testing.assert_array_equal(a, short)


def test_bead_sits_in_the_centre_pixel_of_every_slice(cal):
    h, w = cal.psf.shape[1:]
    assert (h, w) == (128, 128)
    cx0, cy0 = cal.centre_px
    # The focal slice's sub-pixel position, kept (never interpolated) for every slice.
    bx, by = cal.bead_xy_px
    assert (cx0, cy0) == pytest.approx((64 + bx - round(bx), 64 + by - round(by)), abs=1e-9)
    assert abs(cx0 - 64) <= 0.5 and abs(cy0 - 64) <= 0.5
    for k in range(cal.psf.shape[0]):
        cx, cy = _centroid(cal.psf[k])
        assert abs(cx - cx0) < 0.3 and abs(cy - cy0) < 0.3, (k, cx, cy)
    y0, x0, ch, cw = cal.crop_box
    assert (ch, cw) == (128, 128)
    assert y0 == round(by) - 64 and x0 == round(bx) - 64


def test_photometry_is_one_scale_for_all_slices(synth, cal):
    integ = cal.psf.reshape(cal.psf.shape[0], -1).sum(axis=1)
    assert integ.max() == pytest.approx(1.0, abs=1e-5)
    # The synthetic bead keeps all its light inside the window up to ~60 µm of defocus:
    # the integrals there agree to the noise; slices are never normalised one by one.
    inside = synth.z_um <= 60
    assert integ[inside].min() > 0.97
    # ...and the peak falls with defocus as the light spreads.
    peak = cal.psf.reshape(cal.psf.shape[0], -1).max(axis=1)
    assert peak[0] > 50 * peak[-1]
    # The bead signal is the detected light in ADU: photons / gain.
    assert cal.bead_signal_adu == pytest.approx(2.0e5 / 0.5, rel=0.03)
    # Background is gone: the window's border averages to ~0.
    border = np.concatenate([cal.psf[:5, :4, :].ravel(), cal.psf[:5, -4:, :].ravel()])
    assert abs(border.mean()) < 2e-6


def test_noise_model_with_temporal_variance(synth, cal):
    n = cal.noise
    assert n.offset_adu == pytest.approx(synth.offset_adu, abs=0.5)
    assert n.read_noise_adu == pytest.approx(synth.read_noise_adu, rel=0.03)
    assert n.gain_e_per_adu == pytest.approx(synth.gain_e_per_adu, rel=0.1)


def test_noise_model_from_single_frames_uses_spatial_noise(synth):
    cal = process_stack(synth.frames0, synth.z_um, 0.65)
    assert cal.noise.offset_adu == pytest.approx(synth.offset_adu, abs=1.0)
    assert cal.noise.read_noise_adu == pytest.approx(synth.read_noise_adu, rel=0.08)
    assert math.isnan(cal.noise.gain_e_per_adu)
    # An averaged stack's spatial noise is scaled back to one frame.
    cal3 = process_stack(synth.mean, synth.z_um, 0.65, n_averages=3)
    assert cal3.noise.read_noise_adu == pytest.approx(synth.read_noise_adu, rel=0.08)


def test_window_size_is_configurable(synth):
    cal = process_stack(synth.mean, synth.z_um, 0.65, window_px=64, var_stack=synth.var)
    assert cal.psf.shape == (synth.mean.shape[0], 64, 64)
    assert _centroid(cal.psf[0]) == pytest.approx(cal.centre_px, abs=0.3)
    assert cal.centre_px == pytest.approx((32, 32), abs=0.5)


def test_brightest_isolated_bead_is_chosen():
    s = synth_stack(
        nz=6, shape=(200, 400), beads=((300.2, 100.4, 1.0), (100.0, 100.0, 0.5)), n_avg=1
    )
    loc = find_bead(s.mean)
    assert (loc.x_px, loc.y_px) == pytest.approx((300.2, 100.4), abs=0.15)
    # Brightest bead crowded by a neighbour: the isolated dimmer one is used instead.
    s = synth_stack(
        nz=6,
        shape=(200, 400),
        beads=((300.0, 100.0, 1.0), (320.0, 110.0, 0.8), (100.3, 100.0, 0.5)),
        n_avg=1,
    )
    loc = find_bead(s.mean)
    assert (loc.x_px, loc.y_px) == pytest.approx((100.3, 100.0), abs=0.15)


def test_refuses_a_stack_with_no_bead():
    s = synth_stack(nz=6, photons=0.0, n_avg=1)
    with pytest.raises(CalibrationError, match="no bead found"):
        process_stack(s.mean, s.z_um, 0.65)


def test_refuses_two_overlapping_beads():
    s = synth_stack(nz=6, beads=((100.0, 100.0, 1.0), (112.0, 95.0, 0.7)), n_avg=1)
    with pytest.raises(CalibrationError, match="two overlapping beads"):
        process_stack(s.mean, s.z_um, 0.65)


def test_refuses_a_saturated_bead():
    s = synth_stack(nz=6, photons=2.0e6, n_avg=1)
    assert s.frames0.max() == 65535
    with pytest.raises(CalibrationError, match="saturated"):
        process_stack(s.frames0, s.z_um, 0.65, bit_depth=16)
    # Averaging hides clipping in the mean; the raw maximum still shows it.
    s = synth_stack(nz=6, photons=2.0e6, n_avg=2)
    with pytest.raises(CalibrationError, match="saturated"):
        process_stack(s.mean, s.z_um, 0.65, max_frame=s.max_frame, n_averages=2)
    # A 12-bit camera saturates at 4095.
    s = synth_stack(nz=6, photons=2.0e4, n_avg=1, offset_adu=100)
    assert 4095 <= s.frames0.max() < 65535
    with pytest.raises(CalibrationError, match="12-bit full scale"):
        process_stack(np.minimum(s.frames0, 4095), s.z_um, 0.65, bit_depth=12)


def test_refuses_a_bead_at_the_frame_edge():
    s = synth_stack(nz=6, beads=((20.0, 100.0, 1.0),), n_avg=1)
    with pytest.raises(CalibrationError, match="too close to the frame edge"):
        process_stack(s.mean, s.z_um, 0.65)


def test_refuses_bad_geometry(synth):
    with pytest.raises(CalibrationError, match="at least 3 slices"):
        process_stack(synth.mean[:2], synth.z_um[:2], 0.65)
    with pytest.raises(CalibrationError, match="ascending"):
        process_stack(synth.mean, synth.z_um[::-1], 0.65)
    with pytest.raises(CalibrationError, match="pixel size"):
        process_stack(synth.mean, synth.z_um, 0.0)
    with pytest.raises(CalibrationError, match="window"):
        process_stack(synth.mean, synth.z_um, 0.65, window_px=400)


# ------------------------------------------------------------------ file format


def test_save_load_round_trip(tmp_path, cal):
    old = os.umask(0o022)
    try:
        path = cal.save(tmp_path / "cal.h5")
    finally:
        os.umask(old)
    back = Calibration.load(path)
    np.testing.assert_array_equal(back.psf, cal.psf)
    np.testing.assert_array_equal(back.z_um, cal.z_um)
    assert back.noise == cal.noise
    assert back.bead_xy_px == cal.bead_xy_px and back.crop_box == cal.crop_box
    assert back.sha256 == cal.sha256
    np.testing.assert_array_equal(
        back.extra["bead_x_per_slice_px"], cal.extra["bead_x_per_slice_px"]
    )
    assert back.extra["focus_index"] == 0
    with h5py.File(path) as f:
        assert f.attrs["schema_version"] == 1
        assert f.attrs["z_step_um"] == pytest.approx(5.0)
        assert f["psf"].dtype == np.float32
    assert "noise model" in summary(back)
    # Readable by the lab, not only by its writer (mkstemp makes 0600 files).
    assert os.stat(path).st_mode & 0o777 == 0o644


def test_save_refuses_a_missing_directory_and_leaves_nothing(tmp_path, cal):
    with pytest.raises(CalibrationError, match="does not exist"):
        cal.save(tmp_path / "nope" / "cal.h5")
    assert not (tmp_path / "nope").exists()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ stack import


def test_load_tiff_and_hdf5_stacks(tmp_path, synth):
    tifffile.imwrite(tmp_path / "s.tif", synth.frames0)
    np.testing.assert_array_equal(load_stack_file(tmp_path / "s.tif"), synth.frames0)
    tifffile.imwrite(tmp_path / "ij.tif", synth.frames0[:, None], imagej=True)  # ZCYX, C=1
    assert load_stack_file(tmp_path / "ij.tif").shape == synth.frames0.shape
    with h5py.File(tmp_path / "one.h5", "w") as f:
        f["group/stack"] = synth.frames0
        f["other"] = np.zeros(5)
    assert load_stack_file(tmp_path / "one.h5").shape == synth.frames0.shape
    with h5py.File(tmp_path / "two.h5", "w") as f:
        f["a"] = synth.frames0
        f["b"] = synth.frames0
    with pytest.raises(CalibrationError, match="several 3-D datasets"):
        load_stack_file(tmp_path / "two.h5")
    assert load_stack_file(tmp_path / "two.h5", dataset="b").shape == synth.frames0.shape
    with pytest.raises(CalibrationError, match="no dataset named 'c'"):
        load_stack_file(tmp_path / "two.h5", dataset="c")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_bytes(b"hello, not an image"), "neither a TIFF nor an HDF5"),
        (lambda p: p.write_bytes(b"II*\x00" + b"\xff" * 64), "not a readable TIFF"),
        (lambda p: tifffile.imwrite(p, np.zeros((64, 64), np.uint16)), "single 64×64 image"),
        (
            lambda p: tifffile.imwrite(p, np.zeros((64, 64, 3), np.uint8), photometric="rgb"),
            "colour",
        ),
        (lambda p: tifffile.imwrite(p, np.zeros((2, 64, 64), np.uint16)), "at least 3"),
        (
            lambda p: tifffile.imwrite(p, np.zeros((3, 4, 32, 32), np.uint16), imagej=True),
            "not a single z-stack",
        ),
    ],
    ids=["missing", "directory", "garbage", "broken-tiff", "2d", "rgb", "2-slices", "tzyx"],
)
def test_load_refuses_bad_files(tmp_path, make, message):
    path = tmp_path / "stack.tif"
    make(path)
    with pytest.raises(CalibrationError, match=message):
        load_stack_file(path)


def test_load_refuses_hdf5_without_a_stack(tmp_path):
    with h5py.File(tmp_path / "x.h5", "w") as f:
        f["img"] = np.zeros((32, 32))
    with pytest.raises(CalibrationError, match="no 3-D dataset"):
        load_stack_file(tmp_path / "x.h5")


# ------------------------------------------------------------------ acquisition


@pytest.fixture(scope="module")
def sim_psf():
    """The simulated microscope's PSF library, on the z grid of these tests (fast to build)."""
    from focaltrack.sim.optics import SIM_ABERRATIONS, Optics
    from focaltrack.sim.psf import PSFModel

    return PSFModel(
        Optics(aberrations=SIM_ABERRATIONS), z_min_um=0, z_max_um=100, dz_um=2, cache=False
    )


def _sim_driver(psf_model, **kw):
    from focaltrack.drivers.factory import open_simulator

    size = kw.pop("size", 160)
    opts = dict(
        bead_xy_px=kw.pop("bead_xy_px", (size / 2 + 0.3, size / 2 - 0.4)),
        bead_photons=kw.pop("photons", 3.0e4),
        psf_model=psf_model,
        width=size,
        height=size,
        exposure_ms=0.5,
        stage_speed_um_s=5000.0,
    )
    opts.update(kw)
    return open_simulator(**opts)


def test_acquire_steps_the_focus_and_returns_home(sim_psf):
    from focaltrack.drivers.calibrate import acquire_focal_stack

    seen = []
    with _sim_driver(sim_psf, focus_z_um=10.0) as drv:
        raw = acquire_focal_stack(
            drv,
            z_range_um=8,
            z_step_um=2,
            n_average=3,
            settle_s=0.0,
            progress=lambda i, n, z: seen.append((i, n, z)),
        )
        assert drv.get_z() == pytest.approx(10.0)
    assert raw.mean.shape == (5, 160, 160) and raw.var.shape == (5, 160, 160)
    np.testing.assert_allclose(raw.z_um, [0, 2, 4, 6, 8])
    np.testing.assert_allclose(raw.z_readback_um, raw.z_um, atol=0.06)
    assert raw.z_start_um == pytest.approx(10.0)
    assert raw.max_frame.dtype == np.uint16
    assert raw.var[0].mean() > 1.0  # temporal noise was measured
    assert seen[0] == (0, 5, 0.0) and seen[-1] == (5, 5, 8.0) and len(seen) == 6


def test_acquire_cancel_and_stage_timeout_return_home(sim_psf):
    from focaltrack.drivers.base import StageTimeoutError
    from focaltrack.drivers.calibrate import AcquisitionCancelled, acquire_focal_stack

    cancel = threading.Event()

    def progress(i, n, z):
        if i == 2:
            cancel.set()

    with _sim_driver(sim_psf, size=64, focus_z_um=10.0) as drv:
        with pytest.raises(AcquisitionCancelled):
            acquire_focal_stack(drv, z_range_um=20, settle_s=0, progress=progress, cancel=cancel)
        assert drv.get_z() == pytest.approx(10.0)
    with _sim_driver(sim_psf, size=64, stage_speed_um_s=1.0, focus_z_um=10.0) as drv:
        with pytest.raises(StageTimeoutError, match=r"did not reach z = 12\.000 µm"):
            acquire_focal_stack(drv, z_range_um=20, settle_s=0, timeout_s=0.2)


def test_acquire_rejects_bad_settings(sim_psf):
    from focaltrack.drivers.calibrate import acquire_focal_stack, z_grid

    assert len(z_grid(100, 2)) == 51
    with pytest.raises(ValueError, match="z step"):
        z_grid(100, 0)
    with pytest.raises(ValueError, match="at least 3"):
        z_grid(2, 2)
    with _sim_driver(sim_psf, size=64) as drv:
        with pytest.raises(ValueError, match="averaged"):
            acquire_focal_stack(drv, n_average=0)
        with pytest.raises(ValueError, match="settle"):
            acquire_focal_stack(drv, settle_s=-1)


# ------------------------------------------------------------------ recovery


def _ncc(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64) - a.mean()
    b = b.astype(np.float64) - b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def test_calibration_from_the_simulator_recovers_its_own_psf(sim_psf):
    """Acquire through the driver from the simulated microscope (a drifting bead, camera
    noise, the full 0…100 µm stack) and compare with the PSF it renders with."""
    from scipy import ndimage

    from focaltrack.drivers.calibrate import acquire_focal_stack, calibration_from_raw

    px = sim_psf.optics.pixel_size_um
    bead = (128.3, 127.6)
    drift = (0.012, -0.007)  # µm of lateral image motion per µm of focus travel
    with _sim_driver(
        sim_psf, size=256, bead_xy_px=bead, photons=8.0e4, drift_um_per_um=drift
    ) as drv:
        raw = acquire_focal_stack(drv, n_average=4, settle_s=0.0)
    cal = calibration_from_raw(raw)
    assert cal.psf.shape == (51, 128, 128)
    np.testing.assert_allclose(cal.z_um, np.arange(51) * 2.0)

    # The bead centre, slice by slice, follows the true (drifting) position within a pixel.
    tx = bead[0] + drift[0] * cal.z_um / px
    ty = bead[1] + drift[1] * cal.z_um / px
    assert np.abs(cal.extra["bead_x_per_slice_px"] - tx).max() < 1.0
    assert np.abs(cal.extra["bead_y_per_slice_px"] - ty).max() < 1.0
    assert math.dist(cal.bead_xy_px, bead) < 0.5

    # The simulator's PSF with the bead where the calibration keeps it (centre pixel).
    cx, cy = cal.centre_px
    assert abs(cx - 64) <= 0.5 and abs(cy - 64) <= 0.5
    truth = sim_psf.psf_stack(cal.z_um, window_px=128, offset_px=(cx - 64, cy - 64))
    smooth = [ndimage.gaussian_filter(a.astype(np.float64), 2.0) for a in (cal.psf, truth)]
    for k in range(51):
        # Chance level for 128² pixels is ~0.01; the far slices carry the most noise
        # (≈ 6 signal vs 15 background photons per pixel at 100 µm), hence 0.75.
        assert _ncc(cal.psf[k], truth[k]) > (0.95 if cal.z_um[k] <= 30 else 0.75), k
        assert _ncc(smooth[0][k], smooth[1][k]) > 0.98, k
    # Each slice matches the simulator's PSF at its own defocus (z convention and spacing).
    for k in range(0, 51, 5):
        best = int(np.argmax([_ncc(smooth[0][k], smooth[1][j]) for j in range(51)]))
        assert abs(best - k) <= 1, (k, best)
    # One photometric scale: slice integrals follow the light left in the window.
    integ = cal.psf.reshape(51, -1).sum(axis=1)
    np.testing.assert_allclose(integ / integ[0], truth.sum(axis=(1, 2)) / truth[0].sum(), atol=0.03)
    # The camera behind it: offset 100 ADU + 20 photons·0.72/0.46; read 1.6 e⁻ + shot.
    assert cal.noise.offset_adu == pytest.approx(100 + 20 * 0.72 / 0.46, abs=1.0)
    assert cal.noise.read_noise_adu == pytest.approx(math.sqrt(1.6**2 + 14.4) / 0.46, rel=0.05)
    assert cal.noise.gain_e_per_adu == pytest.approx(0.46, rel=0.15)

"""The PSF model against physical facts that a wrong model would fail, and the library renderer.

Facts (scalar diffraction, uniform circular pupil):
- in focus, the first dark ring of the Airy pattern is at 0.61 λ/NA;
- the light is conserved through defocus (the window holds all but a thin diffraction tail);
- far from focus the image is the geometric shadow of the pupil: a disk whose radius grows
  linearly with defocus at slope tan(asin(NA/n_sample)) (0.360 for 0.45 NA in water, where an
  air-defocus model would give 0.504).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

from focaltrack.sim.optics import SIM_ABERRATIONS, Optics
from focaltrack.sim.psf import PSFModel, blur_radius_um, cache_dir, psf_stack


def radial_profile(img: np.ndarray, cx: float, cy: float, step: float = 0.25):
    """Azimuthal mean in rings of width ``step`` px: (radii px, mean values)."""
    yy, xx = np.indices(img.shape)
    r = np.hypot(xx - cx, yy - cy)
    b = np.floor(r / step).astype(int)
    s = np.bincount(b.ravel(), img.ravel())
    c = np.bincount(b.ravel())
    ok = c > 0
    return ((np.arange(len(s)) + 0.5) * step)[ok], (s / np.maximum(c, 1))[ok]


def centroid(img: np.ndarray) -> tuple[float, float]:
    yy, xx = np.indices(img.shape)
    t = img.sum()
    return float((img * xx).sum() / t), float((img * yy).sum() / t)


# ------------------------------------------------------------------------------ physics


@pytest.mark.parametrize(
    "optics",
    [
        # 0.45 NA behind a 100x tube: 0.065 µm pixels, zero at 10.7 px
        Optics(na=0.45, magnification=100.0),
        # 1.4 NA oil, index-matched sample, 0.0325 µm pixels: zero at 6.9 px
        Optics(na=1.4, magnification=200.0, n_immersion=1.518, n_sample=1.518),
    ],
    ids=["0.45NA-100x", "1.4NA-oil"],
)
def test_first_dark_ring_at_0_61_lambda_over_na(optics):
    img = psf_stack(optics, 0.0, window_px=65)[0]
    assert img.argmax() == np.ravel_multi_index((32, 32), img.shape)
    r, prof = radial_profile(img, 32.0, 32.0, step=0.25)
    # first local minimum after the central peak
    i = next(k for k in range(2, len(prof) - 1) if prof[k] <= prof[k - 1] and prof[k] < prof[k + 1])
    a, b, c = prof[i - 1], prof[i], prof[i + 1]
    r_min = (r[i] + 0.25 * 0.5 * (a - c) / (a - 2 * b + c)) * optics.pixel_size_um
    expected = 0.61 * optics.wavelength_um / optics.na
    assert r_min == pytest.approx(expected, rel=0.04)
    # and it is dark: < 2 % of the peak (pixel integration and ring width fill it a little)
    assert b < 0.02 * prof[0]


def test_energy_conserved_through_defocus():
    """Default (aberrated) optics: the 191-px window holds the light at every defocus."""
    optics = Optics(aberrations=SIM_ABERRATIONS)
    z = np.array([-100.0, -50.0, 0.0, 25.0, 50.0, 100.0])
    stack = psf_stack(optics, z, window_px=191, focal_depth_um=50.0)
    sums = stack.sum(axis=(1, 2))
    assert np.all(sums > 0.995), sums
    assert np.all(sums < 1.0 + 1e-3), sums
    assert sums.max() - sums.min() < 0.005
    # the light really spreads: peak drops by > 1000x from focus to 100 µm
    peaks = stack.max(axis=(1, 2))
    assert peaks[2] > 1000 * peaks[-1]


def test_ring_radius_grows_linearly_at_sample_side_marginal_slope():
    """Edge of the defocused disk (where the light falls to 1/4 of the inside level, the
    geometric shadow edge of a Fresnel edge) moves at tan(asin(NA/n_sample)) per µm."""
    optics = Optics()  # 10x / 0.45 air objective, emitters in water (n = 1.33)
    z = np.array([20.0, 40.0, 60.0, 80.0])
    w = 151
    stack = psf_stack(optics, z, window_px=w)
    p = optics.pixel_size_um
    radii = []
    for img, zz in zip(stack, z, strict=True):
        r, prof = radial_profile(img, w // 2, w // 2, step=0.5)
        guess = blur_radius_um(optics, zz) / p
        inside = prof[r < 0.8 * guess].mean()
        radii.append(r[np.nonzero(prof >= 0.25 * inside)[0].max()] * p)
    slope, icept = np.polyfit(z, radii, 1)
    resid = np.asarray(radii) - (slope * z + icept)
    expected = math.tan(math.asin(optics.na / optics.n_sample))  # 0.3596
    assert slope == pytest.approx(expected, rel=0.03)
    assert np.abs(resid).max() < 0.5  # µm: linear
    air = math.tan(math.asin(optics.na / optics.n_immersion))  # 0.504: not this one
    assert abs(slope - air) > 0.1


def test_defocus_is_not_paraxial_and_mismatch_is_small_at_low_na():
    """At d = 100 µm the exact k_z defocus differs from the paraxial one (so the model is
    not the paraxial approximation); the mismatch aberration at 50 µm depth changes the
    in-focus peak by only a few percent at 0.45 NA."""
    o = Optics()
    exact = psf_stack(o, 100.0, window_px=151)[0]
    assert exact.sum() > 0.99
    a = psf_stack(o, 0.0, window_px=33, focal_depth_um=0.0)[0]
    b = psf_stack(o, 0.0, window_px=33, focal_depth_um=50.0)[0]
    assert b.max() < a.max()
    assert b.max() > 0.9 * a.max()


# ------------------------------------------------------------------------------ library


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("psfcache") / "small.npz"
    m = PSFModel(
        Optics(aberrations=SIM_ABERRATIONS),
        z_min_um=-15.0,
        z_max_um=15.0,
        dz_um=1.0,
        cache_path=path,
    )
    return m


def test_library_matches_direct_evaluation(model):
    w = model.window_px
    for z, off in [(0.0, (0.37, -0.21)), (3.1, (0.5, 0.5)), (-12.4, (0.9, 0.1))]:
        lib = model.psf_stack([z], offset_px=off)[0]
        ref = psf_stack(model.optics, [z], window_px=w, offset_px=off, focal_depth_um=50.0)[0]
        assert np.abs(lib - ref).sum() < 0.03  # L1, in units of the emitter's light
        assert np.abs(lib - ref).max() < 0.03 * ref.max()


def test_library_energy_and_render_sum(model):
    e = model.energy(model.z_um)
    assert np.all(e > 0.99) and np.all(e <= 1.0 + 1e-3)
    rng = np.random.default_rng(3)
    n = 30
    x = rng.uniform(60, 190, n)
    y = rng.uniform(60, 190, n)
    z = rng.uniform(-15, 15, n)
    ph = rng.uniform(1e3, 1e4, n)
    img = model.render((256, 256), x, y, z, ph)
    assert img.dtype == np.float64 and img.min() >= 0
    assert img.sum() == pytest.approx(float((ph * model.energy(z)).sum()), rel=2e-3)


@pytest.mark.parametrize("z", [0.0, 2.3, -7.75, 14.2])
def test_subpixel_shift_moves_centroid(model, z):
    base = model.render((96, 96), 40.0, 47.0, z, 1.0)
    cx0, cy0 = centroid(base)
    for dx, dy in [(0.1, 0.0), (0.25, 0.6), (0.5, -0.33), (0.77, 0.05), (1.43, -2.2)]:
        img = model.render((96, 96), 40.0 + dx, 47.0 + dy, z, 1.0)
        cx, cy = centroid(img)
        assert cx - cx0 == pytest.approx(dx, abs=0.02)
        assert cy - cy0 == pytest.approx(dy, abs=0.02)


def test_emitters_partly_or_wholly_outside_the_frame(model):
    h, w = 64, 80
    full = model.render((h, w), 40.0, 30.0, 5.0, 1000.0).sum()
    xs = np.array([-3.0, w + 2.5, 40.0, -500.0, 10.0, np.nan])
    ys = np.array([30.0, -4.2, h - 0.5, 20.0, 1e9, 3.0])
    img = model.render((h, w), xs, ys, np.full(6, 5.0), np.full(6, 1000.0))
    assert np.isfinite(img).all() and img.min() >= 0
    assert 0 < img.sum() < 3 * full
    # one emitter half out: about half its light
    half = model.render((h, w), -0.5, 30.0, 0.0, 1000.0).sum()
    assert half == pytest.approx(0.5 * full, rel=0.05)
    assert model.render((h, w), -500.0, 30.0, 0.0, 1000.0).sum() == 0.0
    assert model.render((1, 1), 0.0, 0.0, 0.0, 1.0).sum() > 0.1


def test_defocus_outside_the_grid_is_clamped_and_interpolation_is_linear(model):
    lo, hi = model.z_range_um
    a = model.psf_stack([hi, hi + 50.0, lo - 1.0, lo])
    np.testing.assert_array_equal(a[0], a[1])
    np.testing.assert_array_equal(a[2], a[3])
    z0 = model.z_um[10]
    mid = model.psf_stack([z0, z0 + model.dz_um / 2, z0 + model.dz_um])
    np.testing.assert_allclose(mid[1], 0.5 * (mid[0] + mid[2]), atol=1e-7)


def test_disk_cache_roundtrip(model, tmp_path):
    assert model.cache_file is not None and model.cache_file.exists()
    same = PSFModel(
        model.optics, z_min_um=-15.0, z_max_um=15.0, dz_um=1.0, cache_path=model.cache_file
    )
    assert same.source == "memory" and same._flat is model._flat  # shared in-process
    PSFModel.clear_memory_cache()
    again = PSFModel(
        model.optics, z_min_um=-15.0, z_max_um=15.0, dz_um=1.0, cache_path=model.cache_file
    )
    assert again.loaded_from_cache and again.source == "disk"
    a = model.render((64, 64), 31.3, 30.8, 4.2, 100.0)
    b = again.render((64, 64), 31.3, 30.8, 4.2, 100.0)
    np.testing.assert_array_equal(a, b)
    # a damaged cache file is rebuilt, not trusted
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    small = PSFModel(Optics(), z_min_um=-1.0, z_max_um=1.0, cache_path=bad)
    assert small.source == "built" and small.energy(0.0)[0] > 0.99
    PSFModel.clear_memory_cache()
    assert PSFModel(Optics(), z_min_um=-1.0, z_max_um=1.0, cache_path=bad).source == "disk"


def test_cache_file_is_for_everyone_and_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """The library is shared by the lab's users (0644 whatever the writer's umask), appears
    complete or not at all, and a write that fails only costs a rebuild next time."""
    kw = dict(z_min_um=-1.0, z_max_um=1.0)
    PSFModel.clear_memory_cache()
    old = os.umask(0o077)
    try:
        m = PSFModel(Optics(), cache_path=tmp_path / "lib.npz", **kw)
    finally:
        os.umask(old)
    assert m.source == "built"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lib.npz"]
    assert (tmp_path / "lib.npz").stat().st_mode & 0o777 == 0o644

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)
    PSFModel.clear_memory_cache()
    failed = PSFModel(Optics(), cache_path=tmp_path / "sub" / "other.npz", **kw)
    assert failed.source == "built" and failed.energy(0.0)[0] > 0.99
    assert list((tmp_path / "sub").iterdir()) == []  # no temporary left behind
    PSFModel.clear_memory_cache()


def test_render_speed_50_emitters_512(model):
    rng = np.random.default_rng(0)
    n = 50
    args = (rng.uniform(0, 512, n), rng.uniform(0, 512, n), rng.uniform(-15, 15, n))
    model.render((512, 512), *args, 1000.0)
    t0 = time.perf_counter()
    model.render((512, 512), *args, 1000.0)
    assert time.perf_counter() - t0 < 1.0  # ~0.02–0.05 s here; loose for loaded CI boxes


def test_shared_instances_and_concurrent_construction(tmp_path, monkeypatch):
    """`shared` returns one instance per configuration; threads building the same model at
    once get one library (no deadlock, no duplicate build)."""
    import threading

    monkeypatch.setenv("FOCALTRACK_CACHE", str(tmp_path))
    PSFModel.clear_memory_cache()
    kw = dict(z_min_um=-2.0, z_max_um=2.0, dz_um=1.0)
    got: list[PSFModel] = []

    def make() -> None:
        got.append(PSFModel.shared(Optics(), **kw))

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(got) == 4 and all(m is got[0] for m in got)
    assert PSFModel.shared(Optics(), **kw) is got[0]
    assert got[0].cache_file is not None and got[0].cache_file.parent == tmp_path
    assert PSFModel(Optics(), **kw)._flat is got[0]._flat  # library shared in-process
    PSFModel.clear_memory_cache()


def test_the_cache_folder_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FOCALTRACK_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("FOCALTRACK_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "focaltrack"


def test_the_test_session_caches_in_a_folder_of_its_own():
    """conftest.py points the cache at a temporary folder of this session: the tests never
    write PSF libraries into the user's ~/.cache."""
    if os.environ.get("FOCALTRACK_TEST_CACHE"):
        pytest.skip("FOCALTRACK_TEST_CACHE names a folder to keep between runs")
    d = cache_dir()
    assert d.is_dir() and d.name.startswith("focaltrack-test-cache-")
    assert Path.home() / ".cache" not in d.parents


@pytest.mark.parametrize(
    "kw",
    [
        dict(z_min_um=5.0, z_max_um=5.0),
        dict(z_min_um=0.0, z_max_um=float("nan")),
        dict(z_min_um=0.0, z_max_um=1.0, dz_um=0.0),
        dict(z_min_um=0.0, z_max_um=1.0, dz_um=5.0),
        dict(z_min_um=0.0, z_max_um=1.0, oversample=4),
    ],
)
def test_model_rejects_bad_grids(kw):
    with pytest.raises(ValueError):
        PSFModel(Optics(), cache=False, **kw)


def test_render_rejects_wrong_out_shape(model):
    with pytest.raises(ValueError, match="shape"):
        model.render((10, 10), 1.0, 1.0, 0.0, 1.0, out=np.zeros((5, 5)))

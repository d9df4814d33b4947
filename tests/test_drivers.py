"""The driver through `SimulatedCore`: the real `MicroManagerDriver` code on a simulated core."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from focaltrack.drivers import (
    CameraInfo,
    CameraTimeoutError,
    Driver,
    DriverError,
    MicroManagerDriver,
    ReplayCamera,
    SimulatedCore,
    SimulatorHooks,
    StageTimeoutError,
    open_driver,
    open_simulator,
)
from focaltrack.drivers.simcore import TaggedImage
from focaltrack.sim.optics import Optics
from focaltrack.sim.scene import Scene


class GaussianPSF:
    """A fast stand-in for `PSFModel` (what `render_frame` uses of it): a Gaussian spot
    that widens with defocus. The driver tests need a bead that responds to the focus,
    not the PSF library (whose build takes longer than this whole file)."""

    pixel_size_um = Optics().pixel_size_um

    def render(self, shape, x_px, y_px, defocus_um, photons=1.0, out=None):
        h, w = shape
        out = np.zeros((h, w)) if out is None else out
        yy, xx = np.mgrid[0:h, 0:w]
        n = len(np.atleast_1d(x_px))
        ph = np.broadcast_to(np.asarray(photons, dtype=float), (n,))
        for x, y, d, p in zip(
            np.atleast_1d(x_px), np.atleast_1d(y_px), np.atleast_1d(defocus_um), ph, strict=True
        ):
            s = 1.0 + 0.36 * abs(d) / self.pixel_size_um
            out += p / (2 * np.pi * s * s) * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))
        return out


@pytest.fixture(scope="module")
def psf_model() -> GaussianPSF:
    return GaussianPSF()


def bead(x_um: float = 20.0, y_um: float = 15.0, z_um: float = 0.0) -> Scene:
    return Scene.static([(x_um, y_um, z_um)], photons=5000.0)


def make(**kw) -> tuple[MicroManagerDriver, SimulatedCore]:
    opts = dict(width=64, height=48, exposure_ms=1.0, seed=1)
    opts.update(kw)
    core = SimulatedCore(**opts)
    return MicroManagerDriver(core, on_close=core.close), core


@pytest.fixture
def sim():
    drv, core = make()
    yield drv, core
    core.camera_stalled = False
    drv.close()


# ---------------------------------------------------------------- describe


def test_describe_reports_the_camera_in_physical_units(sim):
    drv, core = sim
    info = drv.describe()
    assert isinstance(drv, Driver)
    assert info == CameraInfo(
        width=64,
        height=48,
        bit_depth=16,
        pixel_size_um=pytest.approx(0.65),
        exposure_ms=1.0,
        name="SimCamera",
        focus_device="SimZ",
    )
    core.set_exposure(7.5)
    assert drv.describe().exposure_ms == 7.5


def test_missing_pixel_size_needs_the_option():
    core = SimulatedCore(width=32, height=32, pixel_size_um=0.0)
    with pytest.raises(DriverError, match="pixel_size_um"):
        MicroManagerDriver(core)
    drv = MicroManagerDriver(core, pixel_size_um=0.325)
    assert drv.describe().pixel_size_um == 0.325
    drv.close()
    core.close()


# ---------------------------------------------------------------- focus


def test_stage_moves_at_finite_speed_and_frames_carry_z():
    drv, core = make(stage_speed_um_s=400.0)
    try:
        assert drv.get_z() == 0.0
        t = time.monotonic()
        drv.move_z(20.0, timeout_s=2.0)
        assert time.monotonic() - t >= 0.045  # 20 µm at 400 µm/s
        assert drv.get_z() == pytest.approx(20.0)
        assert not core.device_busy("SimZ")
        assert drv.snap().stage_z_um == pytest.approx(20.0)
        drv.move_z(-5.0, settle_s=0.01)
        assert drv.get_z() == pytest.approx(-5.0)
    finally:
        drv.close()


@pytest.mark.parametrize("fault", ["stuck", "too_slow"])
def test_stage_that_does_not_arrive_raises_stage_timeout(fault):
    drv, core = make(stage_speed_um_s=20.0)
    core.stage_stuck = fault == "stuck"
    try:
        t = time.monotonic()
        with pytest.raises(StageTimeoutError, match=r"did not reach z = 50\.000"):
            drv.move_z(50.0, timeout_s=0.15)
        assert 0.15 <= time.monotonic() - t < 1.0
    finally:
        drv.close()


# ---------------------------------------------------------------- snap


def test_snap_returns_fresh_2d_frames_that_respond_to_focus(psf_model):
    drv, core = make(scene=bead(), psf_model=psf_model, background_photons=5.0)
    try:
        a = drv.snap()
        b = drv.snap()
        assert a.pixels.shape == (48, 64) and a.pixels.dtype == np.uint16
        assert (a.index, b.index) == (0, 1)
        assert a.pixels is not b.pixels
        a.pixels[:] = 0
        assert core.get_image().max() > 0  # get_image hands out copies
        assert a.exposure_ms == 1.0
        assert abs(a.t_acq_s - time.time()) < 5
        in_focus = drv.snap().pixels.max()
        drv.move_z(15.0)
        defocused = drv.snap().pixels.max()
        assert in_focus > defocused + 50  # defocus = focus - z spreads the bead
        assert core.truth[-1].focus_z_um == pytest.approx(15.0)
    finally:
        drv.close()


def test_snap_on_a_stalled_camera_times_out(sim):
    drv, core = sim
    core.camera_stalled = True
    t = time.monotonic()
    with pytest.raises(CameraTimeoutError, match="snapped image"):
        drv.snap(timeout_s=0.1)
    assert time.monotonic() - t < 0.5
    core.camera_stalled = False
    assert drv.snap(timeout_s=2.0).pixels.shape == (48, 64)


def test_snap_while_streaming_is_refused(sim):
    drv, _ = sim
    drv.start_stream()
    with pytest.raises(DriverError, match="stop_stream"):
        drv.snap()
    drv.stop_stream()


# ---------------------------------------------------------------- streaming


def test_sequence_numbers_and_timestamps_are_consistent(sim):
    drv, core = sim
    t_before = time.time()
    drv.start_stream(interval_ms=2.0)
    frames = [drv.next_frame(timeout_s=1.0) for _ in range(40)]
    t_after = time.time()
    drv.stop_stream()
    assert [f.index for f in frames] == list(range(40))
    assert drv.dropped_frames == 0
    t = np.array([f.t_acq_s for f in frames])
    # The camera's clock: 2 ms frame slots. (A simulated camera that falls far behind on a
    # loaded machine skips slots, as a real one at its maximum rate makes fewer frames.)
    slots = np.diff(t) / 0.002
    assert np.allclose(slots, np.round(slots), atol=1e-3) and np.all(slots >= 0.999)
    assert round(slots.sum()) == 39 + core.skipped_slots
    assert t_before <= t[0] and t[-1] <= t_after + 0.01
    assert all(f.pixels.shape == (48, 64) for f in frames)
    assert all(f.exposure_ms == 1.0 and f.stage_z_um == 0.0 for f in frames)
    assert not core.is_sequence_running()


def test_finite_sequence_ends_the_iterator(sim):
    drv, _ = sim
    drv.start_stream(n_frames=12)
    frames = list(drv.frames(timeout_s=1.0))
    assert [f.index for f in frames] == list(range(12))
    assert not drv.streaming


def test_index_continues_across_streams(sim):
    drv, _ = sim
    drv.start_stream(n_frames=3)
    first = list(drv.frames())
    drv.start_stream(n_frames=3)
    second = list(drv.frames())
    assert [f.index for f in first + second] == list(range(6))


def _overflow_and_drain(drv: MicroManagerDriver, core: SimulatedCore) -> list:
    """Read a few frames, stop reading until the buffer overflowed twice, then drain."""
    core.stall_after_frames = 5  # no overflow before the first frames are read
    drv.start_stream(interval_ms=1.0)
    frames = [drv.next_frame(timeout_s=1.0) for _ in range(5)]
    deadline = time.monotonic() + 5.0
    while not core.camera_stalled and time.monotonic() < deadline:
        time.sleep(0.001)
    core.camera_stalled = False
    deadline = time.monotonic() + 5.0
    while core.buffer_clears < 2 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert core.buffer_clears >= 2
    # Make the camera stop a little after the overflow (the reset must not be the last
    # thing in the stream), then drain everything that is left.
    n_target = core.frames_produced + 3
    deadline = time.monotonic() + 5.0
    while core.frames_produced < n_target and time.monotonic() < deadline:
        time.sleep(0.001)
    core.camera_stalled = True
    time.sleep(0.01)
    while True:
        try:
            frames.append(drv.next_frame(timeout_s=0.1))
        except CameraTimeoutError:
            break
    drv.stop_stream()
    return frames


@pytest.mark.parametrize(
    "variant",
    ["camera_clock", "core_clock", "numbers_jump"],
)
def test_buffer_overflow_is_detected_and_counted(variant):
    drv, core = make(
        buffer_capacity=8,
        camera_supplies_elapsed=variant != "core_clock",
        numbers_survive_clear=variant == "numbers_jump",
    )
    try:
        frames = _overflow_and_drain(drv, core)
        idx = np.array([f.index for f in frames])
        t = np.array([f.t_acq_s for f in frames])
        lost = core.frames_produced - len(frames)
        assert lost >= 2 * 8  # two clears, each discarding a full buffer
        assert np.all(np.diff(idx) > 0)
        assert drv.dropped_frames == idx[-1] + 1 - len(frames)  # gaps in index = drops
        if variant == "core_clock":
            # Elapsed time restarts with the buffer (and has 1 ms steps): drops are
            # estimated from the core's wall-clock stamps, never below a full buffer.
            # (How close the estimate gets depends on the simulated camera's pacing,
            # which a loaded CI machine disturbs, so only the bounds are checked.)
            assert np.all(np.diff(t) >= 0)
            assert 8 <= drv.dropped_frames < 10 * lost
        elif variant == "numbers_jump":
            assert np.all(np.diff(t) > 0)
            assert drv.dropped_frames == lost
            assert idx[-1] == core.frames_produced - 1
        else:
            # Counted from the camera's clock: exact, unless the simulated camera fell so
            # far behind (a loaded machine) that it skipped frame slots, which count too.
            assert np.all(np.diff(t) > 0)
            assert lost <= drv.dropped_frames <= lost + core.skipped_slots
    finally:
        core.camera_stalled = False
        drv.close()


def test_finite_sequence_overflow_stops_with_an_error():
    drv, core = make(buffer_capacity=4)
    try:
        drv.start_stream(interval_ms=1.0, n_frames=100)
        deadline = time.monotonic() + 5.0
        while core.is_sequence_running() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert core.is_buffer_overflowed()
        got = []
        with pytest.raises(DriverError, match="overflowed"):
            while True:
                got.append(drv.next_frame(timeout_s=1.0))
        assert len(got) == 4
    finally:
        drv.close()


@pytest.mark.parametrize("render_s", [0.0, 0.05], ids=["fast_camera", "slow_camera"])
def test_stalled_camera_times_out_then_recovers(sim, render_s, monkeypatch):
    """The camera stalls itself (the one-shot ``stall_after_frames``) after its first frame,
    so no frame can be on its way when the timeout is measured. Setting ``camera_stalled``
    from here instead let a frame the camera was already rendering (slow on a loaded
    machine: the ``slow_camera`` case) arrive inside the timeout, and nothing was raised."""
    drv, core = sim
    if render_s:
        render = core._render

        def slow_render(dt_s: float, sequence_frame: int) -> np.ndarray:
            time.sleep(render_s)
            return render(dt_s, sequence_frame)

        monkeypatch.setattr(core, "_render", slow_render)
    core.stall_after_frames = 1
    drv.start_stream()
    assert drv.next_frame(timeout_s=30.0).index == 0
    # Wait for the camera to take up its stall (the one-shot is spent once the flag is up):
    # lifting the stall before that would be undone by the camera.
    deadline = time.monotonic() + 30.0
    while not core.camera_stalled and time.monotonic() < deadline:
        time.sleep(0.001)
    assert core.camera_stalled and core.stall_after_frames is None
    t = time.monotonic()
    with pytest.raises(CameraTimeoutError, match=r"no frame within 0\.1 s"):
        drv.next_frame(timeout_s=0.1)
    assert time.monotonic() - t < 0.5
    assert core.frames_produced == 1 and core.get_remaining_image_count() == 0
    core.camera_stalled = False
    drv.next_frame(timeout_s=30.0)
    drv.stop_stream()


def test_next_frame_without_stream_is_an_error(sim):
    drv, _ = sim
    with pytest.raises(DriverError, match="start_stream"):
        drv.next_frame()


# ---------------------------------------------------------------- the core lock


def test_core_lock_serialises_calls_from_several_threads():
    drv, core = make(call_latency_s=0.0005)
    errors: list[BaseException] = []
    stop = threading.Event()

    def hammer(fn) -> None:
        try:
            while not stop.is_set():
                fn()
        except BaseException as exc:  # reported below
            errors.append(exc)

    def stream() -> None:
        try:
            drv.start_stream()
            while not stop.is_set():
                drv.next_frame(timeout_s=1.0)
            drv.stop_stream()
        except BaseException as exc:
            errors.append(exc)

    def mover() -> None:
        zs = iter([1.0, 2.0, 3.0] * 1000)
        hammer(lambda: drv.move_z(next(zs), timeout_s=2.0))

    threads = [
        threading.Thread(target=stream),
        threading.Thread(target=mover),
        threading.Thread(target=hammer, args=(drv.get_z,)),
        threading.Thread(target=hammer, args=(drv.describe,)),
    ]
    for th in threads:
        th.start()
    time.sleep(0.4)
    stop.set()
    for th in threads:
        th.join(5.0)
    drv.close()
    assert not errors
    assert core.api_calls > 50
    assert core.concurrent_calls == 0

    # The detector works: the same calls without the driver's lock do overlap.
    raw = SimulatedCore(width=16, height=16, call_latency_s=0.0005)
    stop.clear()
    threads = [threading.Thread(target=hammer, args=(raw.get_position,)) for _ in range(3)]
    for th in threads:
        th.start()
    time.sleep(0.1)
    stop.set()
    for th in threads:
        th.join(5.0)
    raw.close()
    assert raw.concurrent_calls > 0


# ---------------------------------------------------------------- core compatibility


class FlatCore(SimulatedCore):
    """Like the Java bridge: flat pixel arrays and tags that are not all strings."""

    def get_image(self, *args):
        return super().get_image().ravel()

    def pop_next_tagged_image(self):
        img = super().pop_next_tagged_image()
        tags = dict(img.tags, ImageNumber=int(img.tags["ImageNumber"]))
        return TaggedImage(tags, img.pix.ravel())


def test_flat_pixels_and_numeric_tags_are_accepted():
    core = FlatCore(width=40, height=30, exposure_ms=1.0)
    drv = MicroManagerDriver(core, on_close=core.close)
    try:
        assert drv.snap().pixels.shape == (30, 40)
        drv.start_stream(n_frames=3)
        frames = list(drv.frames())
        assert [f.pixels.shape for f in frames] == [(30, 40)] * 3
        assert [f.index for f in frames] == [0, 1, 2]
    finally:
        drv.close()


def test_tags_are_strings_like_pymmcore(sim):
    _, core = sim
    core.start_sequence_acquisition(2, 0.0, True)
    deadline = time.monotonic() + 2.0
    while core.get_remaining_image_count() < 2 and time.monotonic() < deadline:
        time.sleep(0.001)
    img = core.pop_next_tagged_image()
    assert img.pix.ndim == 2
    for key in ("ImageNumber", "ElapsedTime-ms", "Width", "Height", "PixelType", "Camera"):
        assert isinstance(img.tags[key], str)
    assert img.tags["PixelType"] == "GRAY16"
    core.pop_next_tagged_image()
    with pytest.raises(IndexError):
        core.pop_next_tagged_image()


def test_lateral_drift_follows_focus_travel(psf_model):
    core = SimulatedCore(
        bead(),
        psf_model=psf_model,
        width=64,
        height=48,
        exposure_ms=0.0,
        background_photons=0.0,
        drift_um_per_um=(0.05, -0.02),
    )
    drv = MicroManagerDriver(core, on_close=core.close)
    try:
        drv.move_z(10.0)
        drv.snap()
        assert core.truth[-1].offset_xy_um == pytest.approx((0.5, -0.2))
    finally:
        drv.close()


# ---------------------------------------------------------------- factory


def test_open_driver_sim_and_argument_checks(tmp_path):
    drv = open_driver("sim", width=32, height=32, exposure_ms=1.0)
    assert isinstance(drv.core, SimulatedCore)
    assert drv.snap().pixels.shape == (32, 32)
    drv.close()
    with pytest.raises(ValueError, match="kind"):
        open_driver("hamamatsu")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mm_app_path"):
        open_driver("micromanager")
    with pytest.raises(ValueError, match="simulator"):
        open_driver("micromanager", attach=True, width=10)
    with pytest.raises(ValueError, match="attach"):
        open_driver("micromanager", attach=True, mm_config="x.cfg")
    with pytest.raises(ValueError, match="micromanager"):
        open_driver("sim", mm_app_path=tmp_path)
    with pytest.raises(DriverError, match="does not exist"):
        open_driver("micromanager", mm_app_path=tmp_path / "nope", mm_config="x.cfg")
    with pytest.raises(DriverError, match="does not exist"):
        open_driver("micromanager", mm_app_path=tmp_path, mm_config=tmp_path / "x.cfg")


def test_attach_with_nothing_listening_fails_fast_with_a_clear_message():
    # In a subprocess: pycromanager's bridge thread reports the failed connect as an
    # unhandled thread exception, which pytest (warnings as errors) would turn into a
    # failure of an unrelated test. A free port, so a real Micro-Manager is never touched.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "from focaltrack.drivers import open_driver, DriverError\n"
        "try:\n"
        f"    open_driver('micromanager', attach=True, port={port}, attach_timeout_s=1.0)\n"
        "except DriverError as e:\n"
        "    print('MSG:', e)\n"
    )
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert time.monotonic() - t < 20
    assert "MSG:" in out.stdout, out.stderr[-2000:]
    assert "ZMQ server enabled on port" in out.stdout


def test_scene_advances_with_the_camera_clock(psf_model):
    scene = Scene(
        field_um=(40.0, 30.0),
        z_range_um=(-5.0, 5.0),
        n_emitters=5,
        motion="flow",
        velocity_um_s=100.0,
        diffusion_um2_s=0.0,
        seed=3,
    )
    drv, core = make(scene=scene, psf_model=psf_model)
    try:
        drv.start_stream(interval_ms=2.0, n_frames=6)
        frames = list(drv.frames())
        seq = [t for t in core.truth if t.sequence_frame >= 0]
        assert [t.sequence_frame for t in seq] == list(range(6)) == [f.index for f in frames]
        assert np.allclose(np.diff([t.t_sim_s for t in seq]), 0.002)
        a, b = seq[0].scene, seq[1].scene
        common, ia, ib = np.intersect1d(a.ids, b.ids, return_indices=True)
        assert len(common) > 0
        assert np.allclose(b.xyz_um[ib] - a.xyz_um[ia], [0.2, 0.0, 0.0])  # 100 µm/s × 2 ms
    finally:
        drv.close()


def test_stop_stream_from_another_thread_ends_frames(sim):
    drv, _ = sim
    drv.start_stream(interval_ms=1.0)
    timer = threading.Timer(0.05, drv.stop_stream)
    timer.start()
    n = sum(1 for _ in drv.frames(timeout_s=1.0))
    timer.join()
    assert n > 0 and not drv.streaming


def test_simulator_hooks_only_on_the_simulator():
    """Simulator-only hooks sit behind `SimulatorHooks`; a replay camera is a plain `Driver`."""
    with open_simulator(width=32, height=32, exposure_ms=1.0) as drv:
        assert isinstance(drv, Driver) and isinstance(drv, SimulatorHooks)
        assert drv.swap_scene(None) is None
        drv.move_z(5.0)
        with drv.still_bead(1000.0):
            bead = drv.swap_scene(None)
            assert bead is not None and len(bead) == 1
            drv.swap_scene(bead)
            (x, y, z), photons = bead.truth().xyz_um[0], bead.truth().photons[0]
            px = drv.describe().pixel_size_um
            assert (x / px, y / px, z) == pytest.approx((16.3, 15.8, 5.0))
            assert photons == pytest.approx(1000.0)
        assert drv.swap_scene(None) is None  # the sample (none) is back
        drv.set_exposure_ms(2.5)
        assert drv.describe().exposure_ms == pytest.approx(2.5)
    replay = ReplayCamera(np.zeros((2, 16, 16), np.uint16), pixel_size_um=0.5)
    assert isinstance(replay, Driver) and not isinstance(replay, SimulatorHooks)
    replay.close()

"""The service end to end: real sockets on 127.0.0.1 (every port 0), the simulated microscope,
real torch, real files.

* in-process `Service`: a control session with a barrage of malformed requests; the demo flow
  (calibrate, train in a subprocess, start, ``loc``/``track`` messages that satisfy the
  schemas with increasing sequence numbers), a camera fault and its recovery, a metrics
  scrape over HTTP, recording;
* the real ``focaltrack serve`` in a subprocess: a recording read with h5py in SWMR mode while
  it is written and after ``kill -9``, a restart that restores the calibration and model from
  state.json, SIGTERM -> exit 0 with the recording complete, and a refused non-loopback bind.

To stay within the time budget on a 2-core machine: a 160 × 160 px simulated camera with a
few emitters, a 6-slice calibration (0–10 µm), and training with a tiny override of the ci
preset (3 steps per network); the model is therefore useless for accuracy (that is
test_cnn's business), but everything around it runs for real. The ports of a subprocess come
from ``<workspace>/run/endpoints.json``, which ``focaltrack serve`` writes once it serves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families
from service_config import loopback_config, workspace_with_model

from focaltrack.daemon import protocol
from focaltrack.daemon.client import ControlClient, ControlError, Subscriber
from focaltrack.daemon.config import ConfigError
from focaltrack.daemon.service import Service
from focaltrack.drivers.base import SimulatorHooks

SIM_PX = 160
TINY_TRAINING = {
    "lateral_steps": 3,
    "lateral_batch": 2,
    "lateral_patch": 64,
    "axial_steps": 3,
    "axial_batch": 4,
    "val_frames": 1,
    "val_snr_db": (20.0,),
    "val_size": 64,
    "val_emitters": 2,
    "pupil_fit": False,
}


def _config(ws: Path, **extra: Any):
    sim = {"sim.width": SIM_PX, "sim.height": SIM_PX, "sim.n_emitters": 4}
    return loopback_config(ws, **{**sim, **extra})


def _sim(svc: Service) -> SimulatorHooks:
    """The service's simulated microscope, through its fault-injection hooks."""
    driver = svc._driver
    assert isinstance(driver, SimulatorHooks)
    return driver


def _wait_for(cond, timeout_s: float, what: str, poll_s: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(poll_s)


def _call_once(ctl: ControlClient, cmd: str, **args: Any) -> Any:
    """A job request sent once (a retry could start a second job), with a long timeout."""
    reply = ctl.request(cmd, args, timeout_s=60, retries=1)
    if not reply["ok"]:
        raise ControlError(reply["error"]["code"], reply["error"]["message"])
    return reply["result"]


def _wait_job(ctl: ControlClient, jid: str, timeout_s: float) -> dict[str, Any]:
    def done():
        j = ctl.call("job", id=jid)
        return j if j["state"] in ("done", "failed", "cancelled") else None

    return _wait_for(done, timeout_s, f"job {jid}", poll_s=0.2)


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# ======================================================================== in-process


@pytest.fixture
def trained(tmp_path):
    """A running service, fresh: the test calibrates and trains it through its control API.
    (The driver's frame timeout stays at its 2 s default: a frame that a loaded machine
    delays by more than a shorter one would be a camera fault the test does not expect.)"""
    svc = Service(_config(tmp_path / "ws"), train_overrides=TINY_TRAINING)
    svc.start()
    try:
        yield svc
    finally:
        svc.stop()
        assert svc.join(20)


def test_control_session_survives_malformed_requests(tmp_path):
    svc = Service(_config(tmp_path))
    svc.start()
    ctx = zmq.Context.instance()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(svc.endpoints["control"])
    try:
        with ControlClient(svc.endpoints["control"], timeout_s=5) as ctl:
            st = ctl.call("status")
            assert st["state"] == "idle" and st["model"] is None
            assert st["endpoints"] == svc.endpoints
            assert st["driver"]["width"] == SIM_PX
            with pytest.raises(ControlError) as e:
                ctl.call("start")
            assert e.value.code == "wrong_state" and "model" in e.value.message
            for cmd, args, code in [
                ("load_model", {"name": "nope"}, "not_found"),
                ("load_model", {"name": "../etc"}, "bad_args"),
                ("train", {}, "not_found"),  # no calibration yet
                ("job", {"id": "no-such-job"}, "not_found"),
                ("cancel", {"id": "no-such-job"}, "not_found"),
                ("record_start", {}, "wrong_state"),
                ("record_stop", {}, "wrong_state"),
                ("calibrate", {"window_px": 4096}, "bad_args"),
                ("calibrate", {"z_range_um": 1.0, "z_step_um": 2.0}, "bad_args"),
            ]:
                with pytest.raises(ControlError) as e:
                    ctl.call(cmd, **args)
                assert e.value.code == code, (cmd, args, e.value)

        def ask(*frames: bytes) -> dict[str, Any] | None:
            raw.send_multipart(list(frames))
            if not raw.poll(5000):
                return None
            reply = raw.recv_multipart()
            if reply and reply[0] == b"":
                reply = reply[1:]
            assert len(reply) == 1
            obj = json.loads(reply[0])
            protocol.validate_reply(obj)
            return obj

        nested = b"[" * 100_000 + b"]" * 100_000
        cases: list[tuple[tuple[bytes, ...], str]] = [
            ((b"", b"not json"), "bad_json"),
            ((b"", b"\xff\xfe\x00\x80garbage"), "bad_json"),
            ((b"", nested), "bad_request"),  # over the size limit
            ((b"", b"[" * 5000 + b"]" * 5000), "bad_json"),  # too deep for the parser
            ((b"", b"[1, 2]"), "bad_request"),
            ((b"", b"42"), "bad_request"),
            ((b"", b"null"), "bad_request"),
            ((b"", b"{}"), "bad_request"),
            ((b"", b'{"cmd": 5}'), "bad_request"),
            ((b"", b'{"cmd": "launch_rockets"}'), "unknown_command"),
            ((b"", b'{"cmd": "status", "args": []}'), "bad_request"),
            ((b"", b'{"cmd": "status", "extra": 1}'), "bad_request"),
            ((b"", b'{"cmd": "status", "id": 7}'), "bad_request"),
            ((b"", b'{"cmd": "move_z", "args": {"z_um": "high"}}'), "bad_args"),
            ((b"", b'{"cmd": "move_z", "args": {"z_um": 1e9}}'), "bad_args"),
            ((b"", b'{"cmd": "move_z", "args": {"z_um": NaN}}'), "bad_args"),
            ((b"", b'{"cmd": "move_z", "args": {}}'), "bad_args"),
            ((b"", b'{"cmd": "calibrate", "args": {"averages": 0}}'), "bad_args"),
            ((b"", b'{"cmd": "calibrate", "args": {"averages": 2.5}}'), "bad_args"),
            ((b"", b'{"cmd": "train", "args": {"preset": "huge"}}'), "bad_args"),
            ((b"", b'{"cmd": "train", "args": {"load": "yes"}}'), "bad_args"),
            ((b"", b'{"cmd": "start", "args": {"bogus": 1}}'), "bad_args"),
            ((b"", b'{"cmd": "job"}'), "bad_args"),
            ((b"", b'{"cmd": "status"}', b"extra frame"), "bad_request"),
            ((b"",), "bad_request"),  # a delimiter and nothing else
            ((b'{"cmd": "status"}', b"{}"), "bad_request"),  # no delimiter, two frames
        ]
        for frames, code in cases:
            reply = ask(*frames)
            assert reply is not None, frames
            assert reply["ok"] is False and reply["error"]["code"] == code, (frames[:2], reply)
        # The id is echoed on errors whenever it can be read.
        reply = ask(b"", b'{"cmd": "nope", "id": "abc"}')
        assert reply is not None and reply["id"] == "abc"
        # Binary junk, with and without the REQ-style delimiter.
        rng = np.random.default_rng(5)
        for i in range(60):
            junk = rng.integers(0, 256, int(rng.integers(1, 300)), dtype=np.uint8).tobytes()
            reply = ask(b"", junk) if i % 2 else ask(junk)
            assert reply is not None and reply["ok"] is False
        # A request without a delimiter (plain DEALER) works too.
        reply = ask(b'{"cmd": "status", "id": "x1"}')
        assert reply is not None and reply["ok"] and reply["id"] == "x1"
        # A REQ socket (envelope with delimiter) gets its reply.
        req = ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(svc.endpoints["control"])
        req.send(b'{"cmd": "get_z"}')
        assert req.poll(5000)
        r = json.loads(req.recv())
        req.close()
        assert r["ok"] and r["result"]["z_um"] == pytest.approx(0.0)
        with ControlClient(svc.endpoints["control"], timeout_s=5) as ctl:
            st = ctl.call("status")
            assert st["state"] == "idle" and st["model"] is None
            assert ctl.call("move_z", z_um=3.0)["z_um"] == pytest.approx(3.0, abs=0.05)
            # A stuck stage: move_z fails with driver_error after its timeout, and while it
            # waits the control channel keeps answering other requests.
            _sim(svc).stick_stage(True)
            try:
                raw.send_multipart([b"", b'{"cmd": "move_z", "args": {"z_um": 9, "timeout_s": 2}}'])
                t0 = time.monotonic()
                assert ctl.call("status")["state"] == "idle"
                assert time.monotonic() - t0 < 1.5
                assert raw.poll(10_000)
                reply = json.loads(raw.recv_multipart()[-1])
                assert (
                    reply["error"]["code"] == "driver_error"
                    and "9.000" in reply["error"]["message"]
                )
            finally:
                _sim(svc).stick_stage(False)
            assert ctl.call("status")["last_error"]["code"] == "driver_error"
        m = _scrape(svc.endpoints["metrics"])
        assert m[("focaltrack_control_requests_total", (("outcome", "error"),))] >= len(cases) + 60
    finally:
        raw.close()
        svc.stop()
    assert svc.join(10)
    assert not (tmp_path / "run" / "endpoints.json").exists()


def test_calibrate_train_live_publish(trained):
    svc = trained
    ep = svc.endpoints
    with (
        ControlClient(ep["control"], timeout_s=10) as ctl,
        Subscriber(ep["pub"], topics=("loc", "track", "event", "hb")) as sub,
    ):
        # A heartbeat proves the subscription has reached the PUB socket (slow joiner).
        _wait_for(lambda: _recv_topic(sub, "hb"), 10, "a heartbeat", poll_s=0)
        j = _call_once(ctl, "calibrate", z_range_um=10.0, z_step_um=2.0, averages=1, settle_s=0.0)
        assert ctl.call("status")["state"] in ("calibrating", "idle")
        with pytest.raises(ControlError) as e:
            ctl.call("start")
        assert e.value.code == "wrong_state"
        job = _wait_job(ctl, j["job"], 60)
        assert job["state"] == "done", job
        cal = job["result"]["calibration"]
        assert job["result"]["n_slices"] == 6
        cals = ctl.call("calibrations")
        assert cals["current"] == cal and [c["name"] for c in cals["calibrations"]] == [cal]

        j = _call_once(ctl, "train", preset="quick", name="tiny")
        with pytest.raises(ControlError) as e:
            ctl.call("train", preset="quick")
        assert e.value.code == "busy"
        job = _wait_job(ctl, j["job"], 150)
        assert job["state"] == "done", job
        assert job["result"]["model"] == "tiny" and job["result"]["loaded"]
        assert ctl.call("status")["model"] == "tiny"
        assert [m["name"] for m in ctl.call("models")["models"]] == ["tiny"]

        # Job events: progress from 0 to 1 for both jobs, each validating against the schema.
        events = []
        while True:
            try:
                topic, h, _ = sub.recv(timeout_s=0.01)
            except TimeoutError:
                break
            protocol.validate(topic, h)
            if topic == "event":
                events.append(h)
        jobs = [e["job"] for e in events if e["kind"] == "job"]
        for kind in ("calibrate", "train"):
            mine = [jj for jj in jobs if jj["kind"] == kind]
            assert mine and mine[-1]["state"] == "done" and mine[-1]["progress"] == 1.0, kind
            assert any(0 < jj["progress"] < 1 for jj in mine), kind
        assert any(e["kind"] == "model" and e["model"]["name"] == "tiny" for e in events)

        assert ctl.call("start", interval_ms=20.0) == {"state": "live"}
        seen: dict[str, list[dict[str, Any]]] = {"loc": [], "track": [], "hb": [], "event": []}
        deadline = time.monotonic() + 30
        while min(len(seen["loc"]), len(seen["track"])) < 15 or not seen["hb"]:
            assert time.monotonic() < deadline, {k: len(v) for k, v in seen.items()}
            try:
                topic, h, payload = sub.recv(timeout_s=1.0)
            except TimeoutError:
                continue
            assert payload is None
            protocol.validate(topic, h)
            seen[topic].append(h)
        for topic in ("loc", "track"):
            msgs = seen[topic]
            seqs = [h["seq"] for h in msgs]
            frames = [h["frame"] for h in msgs]
            assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            assert frames == sorted(frames) and len(set(frames)) == len(frames)
            assert all(h["t_pub_s"] >= h["t_acq_s"] for h in msgs)
        assert seen["loc"][0]["model"] == "tiny"
        assert seen["hb"][-1]["model"] == "tiny"
        assert any(h["state"] == "live" for h in seen["hb"])

        # The focus can be moved while live (the driver thread keeps its own lock).
        assert ctl.call("move_z", z_um=2.0)["z_um"] == pytest.approx(2.0, abs=0.05)
        assert ctl.call("get_z")["z_um"] == pytest.approx(2.0, abs=0.05)
        with pytest.raises(ControlError) as e:
            ctl.call("calibrate")
        assert e.value.code == "wrong_state"

        # Metrics over HTTP: every name, counters going up while live.
        m1 = _scrape(ep["metrics"])
        _wait_for(
            lambda: (
                _scrape(ep["metrics"])[("focaltrack_frames_analysed_total", ())]
                > m1[("focaltrack_frames_analysed_total", ())] + 3
            ),
            20,
            "frames analysed to go up",
        )
        m2 = _scrape(ep["metrics"])
        for name in (
            "focaltrack_frames_acquired_total",
            "focaltrack_frames_analysed_total",
            "focaltrack_recording_frames_total",
            "focaltrack_live_tracks",
            "focaltrack_frame_to_publish_seconds_count",
            "focaltrack_inference_seconds_count",
            "focaltrack_localizations_per_frame_count",
        ):
            assert (name, ()) in m2, name
        assert (
            m2[("focaltrack_frames_acquired_total", ())]
            > m1[("focaltrack_frames_acquired_total", ())]
        )
        assert m2[("focaltrack_frame_to_publish_seconds_count", ())] > 0
        buckets = [
            float(dict(k[1])["le"])
            for k in m2
            if k[0] == "focaltrack_frame_to_publish_seconds_bucket"
        ]
        assert sum(b < 0.01 for b in buckets) >= 4 and min(buckets) <= 0.0005
        for reason in ("camera", "analysis_behind"):
            assert ("focaltrack_frames_dropped_total", (("reason", reason),)) in m2
        assert m2[("focaltrack_state", (("state", "live"),))] == 1.0
        assert m2[("focaltrack_state", (("state", "idle"),))] == 0.0
        assert m2[("focaltrack_job_progress", (("kind", "train"),))] == 1.0
        assert m2[("focaltrack_control_requests_total", (("outcome", "ok"),))] > 10

        # A camera that stops delivering: a driver event, state error, then recovery.
        # (Watched through status, which answers at once, while the subscriber may still be
        # reading older frames; the stall is lifted before the restarts run out.)
        _sim(svc).stall_camera(True)
        try:
            _wait_for(lambda: ctl.call("status")["state"] == "error", 10, "state error")
        finally:
            _sim(svc).stall_camera(False)
        _wait_for(lambda: ctl.call("status")["state"] == "live", 20, "recovery")
        h = _next_event(sub, lambda h: h["kind"] == "driver", 20)
        assert h["state"] == "error" and h["error"]["code"] == "driver_error"
        assert "no frame" in h["error"]["message"]
        _next_event(sub, lambda h: h["kind"] == "state" and h["state"] == "live", 20)
        assert ctl.call("status")["last_error"]["code"] == "driver_error"

        # Recording in-process: frames and results land in the file.
        rec = ctl.call("record_start", name="inproc")
        with pytest.raises(ControlError) as e:
            ctl.call("record_start")
        assert e.value.code == "busy"
        _wait_for(lambda: ctl.call("status")["recording"]["frames"] >= 5, 20, "recorded frames")
        out = ctl.call("record_stop")
        assert out["recording"] == "inproc" and out["frames"] >= 5
        with h5py.File(rec["path"], "r") as f:
            assert f.attrs["complete"] and f.attrs["model"] == "tiny"
            n = f["frames"].shape[0]
            assert n == out["frames"] == f["frame_meta/index"].shape[0]
            assert f["frames"].shape[1:] == (SIM_PX, SIM_PX)
            assert (
                f.attrs["calibration_sha256"]
                == ctl.call("models")["models"][0]["calibration_sha256"]
            )
        assert ctl.call("stop") == {"state": "idle"}
        assert ctl.call("stop") == {"state": "idle"}  # idempotent
        st = ctl.call("status")
        assert st["frames_analysed"] > 15 and st["frames_acquired"] >= st["frames_analysed"]


def _recv_topic(sub: Subscriber, topic: str) -> dict[str, Any] | None:
    try:
        t, h, _ = sub.recv(timeout_s=0.5)
    except TimeoutError:
        return None
    return h if t == topic else None


def _next_event(sub: Subscriber, pred, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            topic, h, _ = sub.recv(timeout_s=0.5)
        except TimeoutError:
            continue
        if topic == "event" and pred(h):
            protocol.validate(topic, h)
            return h
    raise AssertionError("timed out waiting for an event")


@pytest.fixture(scope="module")
def tiny_workspace(tmp_path_factory):
    """A workspace holding a calibration and the model "tiny" trained on it, both named in
    state.json: what test_calibrate_train_live_publish makes through the service, made
    directly (tests copy it before starting a service there)."""
    return workspace_with_model(tmp_path_factory.mktemp("tiny-ws"), TINY_TRAINING)


def test_cancel_training_leaves_nothing(tiny_workspace, tmp_path):
    shutil.copytree(tiny_workspace.root, tmp_path / "ws")
    # A training far too long to end by itself: the cancel always meets it running.
    svc = Service(
        _config(tmp_path / "ws"), train_overrides={**TINY_TRAINING, "lateral_steps": 10**6}
    )
    svc.start()
    try:
        ctl = ControlClient(svc.endpoints["control"], timeout_s=10)
        with ctl:
            assert ctl.call("calibrations")["current"]
            j = _call_once(ctl, "train", name="cancelled-model")
            _wait_for(
                lambda: ctl.call("job", id=j["job"])["progress"] > 0, 120, "training progress"
            )
            info = ctl.call("cancel", id=j["job"])
            assert info["id"] == j["job"]
            job = _wait_job(ctl, j["job"], 30)
            assert job["state"] == "cancelled"
            models = svc.ws.models_dir
            assert not (models / "cancelled-model").exists()
            assert not list(models.glob(".cancelled-model*"))
            assert ctl.call("status")["model"] == "tiny"
    finally:
        svc.stop()
    assert svc.join(20)


def test_tracker_section_reaches_the_live_tracker(tiny_workspace, tmp_path):
    """[tracker] settings (the old [analysis] tracker_* spelling too) are what the live
    tracker of the restored model runs with; the noise left at 0 comes from the model."""
    from focaltrack.models.tracker_config import MotionModel

    shutil.copytree(tiny_workspace.root, tmp_path / "ws")
    cfg = _config(
        tmp_path / "ws",
        **{
            "tracker.max_misses": 9,
            "tracker.motion": "random_walk",
            "analysis.tracker_confirm_window": 7,  # the deprecated spelling, mapped
        },
    )
    svc = Service(cfg)
    svc.start()
    try:
        model = svc._shared.model
        assert model is not None and model.name == "tiny"
        tc = model.analysis.analyser().tracker.config
        assert (tc.max_misses, tc.motion, tc.confirm_window) == (9, MotionModel.RANDOM_WALK, 7)
        assert tc.sigma_lateral_um > 0 and tc.sigma_axial_um > 0
    finally:
        svc.stop()
    assert svc.join(20)


def test_refuses_a_non_loopback_bind_without_keys(tmp_path):
    cfg = _config(tmp_path, **{"network.bind": "0.0.0.0"})
    svc = Service(cfg)
    with pytest.raises(ConfigError, match=r"network\.bind"):
        svc.start()


def test_unusable_curve_keys_are_refused_before_the_microscope_opens(tmp_path, monkeypatch):
    import zmq.auth

    keys, allowed, broken = tmp_path / "keys", tmp_path / "allowed", tmp_path / "broken"
    for d in (keys, allowed, broken):
        d.mkdir()
    public, secret = zmq.auth.create_certificates(keys, "server")
    zmq.auth.create_certificates(allowed, "lab-pc")
    (broken / "lab-pc.key").write_text("this is not a certificate\n")

    def opened(self: Service) -> None:
        raise AssertionError("the microscope was opened before the key files were read")

    monkeypatch.setattr(Service, "_open_driver", opened)
    cases = [
        ({"network.curve_server_secret_file": str(public)}, "holds no secret key"),
        (
            {"network.curve_allowed_clients_dir": str(broken)},
            r"curve_allowed_clients_dir: cannot read the client keys",
        ),
    ]
    for overrides, match in cases:
        net = {
            "network.curve_server_secret_file": str(secret),
            "network.curve_allowed_clients_dir": str(allowed),
            **overrides,
        }
        svc = Service(_config(tmp_path / "ws", **net))
        with pytest.raises(ConfigError, match=match):
            svc.start()
        assert svc.stopped


def test_curve_allow_list_and_systemd_notify(tmp_path, monkeypatch):
    import socket

    import zmq.auth

    from focaltrack.daemon.client import load_curve_client

    keys, allowed, others = tmp_path / "keys", tmp_path / "allowed", tmp_path / "others"
    for d in (keys, allowed, others):
        d.mkdir()
    _, server_secret = zmq.auth.create_certificates(keys, "server")
    zmq.auth.create_certificates(allowed, "lab-pc")
    zmq.auth.create_certificates(others, "stranger")
    (allowed / "lab-pc.key_secret").rename(keys / "lab-pc.key_secret")  # only public keys

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(10)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    svc = Service(
        _config(
            tmp_path / "ws",
            **{
                "network.curve_server_secret_file": str(server_secret),
                "network.curve_allowed_clients_dir": str(allowed),
            },
        )
    )
    try:
        svc.start()
        assert notify.recv(100) == b"READY=1"
        assert notify.recv(100) == b"WATCHDOG=1"  # fed while idle by the control loop
        ctl_ep = svc.endpoints["control"]
        good = load_curve_client(keys / "server.key", keys / "lab-pc.key_secret")
        with ControlClient(ctl_ep, timeout_s=5, curve=good) as ctl:
            assert ctl.call("status")["state"] == "idle"
        stranger = load_curve_client(keys / "server.key", others / "stranger.key_secret")
        for curve in (stranger, None):
            with ControlClient(ctl_ep, timeout_s=0.5, retries=1, curve=curve) as ctl:
                with pytest.raises(TimeoutError):
                    ctl.call("status")
        with Subscriber(svc.endpoints["pub"], topics=("hb",), curve=good) as sub:
            topic, h, _ = sub.recv(timeout_s=5)
            assert topic == "hb" and h["state"] == "idle"
    finally:
        svc.stop()
        notify.close()
    assert svc.join(10)


def test_systemd_notify_goes_to_the_socket_the_service_started_with(tmp_path, monkeypatch):
    """A service started without NOTIFY_SOCKET never writes to one set later in the same
    process (CI once saw another test's service feed its watchdog into this socket)."""
    import socket

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    svc = Service(_config(tmp_path / "ws"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(1.5)  # longer than the 1 s watchdog period
    try:
        svc.start()
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        with pytest.raises(TimeoutError):
            notify.recv(100)
    finally:
        svc.stop()
        notify.close()
    assert svc.join(10)


# ======================================================================== subprocess


def _env() -> dict[str, str]:
    from focaltrack.daemon.config import SECTIONS

    prefixes = tuple(f"FOCALTRACK_{s.upper()}_" for s in SECTIONS)
    return {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}


def _serve_command(ws: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "focaltrack.daemon.cli",
        "serve",
        "--workspace",
        str(ws),
        "--control-port",
        "0",
        "--pub-port",
        "0",
        "--metrics-port",
        "0",
        "--sim-size",
        str(SIM_PX),
        "--sim-emitters",
        "4",
        *extra,
    ]


def _serve(ws: Path, *extra: str) -> subprocess.Popen[bytes]:
    cmd = _serve_command(ws, *extra)
    with open(ws / "serve.log", "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=log)


def _endpoints(ws: Path, proc: subprocess.Popen[bytes], timeout_s: float = 90) -> dict[str, Any]:
    path = ws / "run" / "endpoints.json"

    def ready():
        if proc.poll() is not None:
            log = (ws / "serve.log").read_text(errors="replace")
            raise AssertionError(f"serve exited with {proc.returncode}:\n{log[-3000:]}")
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        return data if data["pid"] == proc.pid else None

    return _wait_for(ready, timeout_s, "focaltrack serve to write endpoints.json", poll_s=0.1)


def _cli(argv: list[str]) -> int:
    from focaltrack.daemon.cli import main

    return main(argv)


def test_one_serve_per_workspace(tmp_path, capsys):
    """A second `focaltrack serve` on a workspace exits 2 with one line naming the running
    service's pid and endpoints, before it opens anything, and leaves that service and its
    run/endpoints.json alone; the client verbs find the service through the workspace, and
    say so when it has died."""
    ws = tmp_path / "ws"
    ws.mkdir()
    first = _serve(ws)
    try:
        ep = _endpoints(ws, first)
        before = (ws / "run" / "endpoints.json").read_bytes()
        second = subprocess.run(
            _serve_command(ws), env=_env(), capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"pid {first.pid}" in lines[0] and "in use by another focaltrack service" in lines[0]
        for name in ("control", "pub", "metrics"):
            assert ep[name] in lines[0]
        assert (ws / "run" / "endpoints.json").read_bytes() == before
        with ControlClient(ep["control"], timeout_s=10) as ctl:
            assert ctl.call("status")["pid"] == first.pid
        assert _cli(["status", "--workspace", str(ws), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["pid"] == first.pid
        first.kill()
        assert first.wait(10) == -signal.SIGKILL
        # Its endpoints.json stays behind; the clients tell a dead service from a silent one.
        assert _cli(["ctl", "status", "--workspace", str(ws)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"(pid {first.pid}) is not running" in err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)


def test_serve_recording_survives_kill9_and_restart_restores_state(tiny_workspace, tmp_path):
    src = tiny_workspace
    ws = tmp_path / "ws"
    (ws / "models").mkdir(parents=True)
    (ws / "calibrations").mkdir()
    shutil.copytree(src.models_dir / "tiny", ws / "models" / "tiny")
    cal = src.read_state().calibration
    shutil.copy(src.calibration_path(cal), ws / "calibrations" / f"{cal}.h5")
    (ws / "state.json").write_text(json.dumps({"calibration": cal, "model": "tiny"}))

    proc = _serve(ws)
    try:
        ep = _endpoints(ws, proc)
        with ControlClient(ep["control"], timeout_s=10) as ctl:
            st = ctl.call("status")
            assert (st["model"], st["calibration"]) == ("tiny", cal)
            ctl.call("start", interval_ms=20.0)
            rec = ctl.call("record_start", name="crash")
        path = Path(rec["path"])
        # Follow the live file from this process (SWMR reader, the writer in the service).
        with h5py.File(path, "r", libver="latest", swmr=True) as f:
            ds = f["frames"]

            def n_frames() -> int:
                ds.refresh()
                return ds.shape[0]

            n1 = _wait_for(n_frames, 30, "frames in the live file")
            _wait_for(lambda: n_frames() > n1, 30, "the live file to grow")
            seen = n_frames()
            assert f.attrs["complete"] == False  # noqa: E712 - numpy bool
            # Killed while it is still appending: the file has grown since we looked.
            _wait_for(lambda: n_frames() > seen, 30, "the live file to grow again")
        proc.kill()  # SIGKILL: no chance to flush or close anything
        assert proc.wait(10) == -signal.SIGKILL
        killed = proc.pid
        with h5py.File(path, "r", libver="latest", swmr=True) as f:
            # The rows the writer vouched for after its last flush (the lengths may run
            # ahead of them: the kill can come between a write and its flush).
            n = int(f["flushed"][0])
            assert n > 0 and f["frames"].shape[0] >= n
            idx = f["frame_meta/index"][:n]
            assert np.all(np.diff(idx) > 0)
            assert not f.attrs["complete"]
            px = f["frames"][n - 1]
            assert px.dtype == np.uint16 and px.max() > 0
        # `focaltrack localize` reads the crashed recording's frames the writer vouched for.
        from focaltrack.daemon.commands.localize import read_frames

        frames = read_frames(path)
        assert frames.shape[0] == n and frames[n - 1].max() > 0

        # Restart in the same workspace: calibration and model restored from state.json.
        proc = _serve(ws)
        ep = _endpoints(ws, proc)
        with ControlClient(ep["control"], timeout_s=10) as ctl:
            st = ctl.call("status")
            assert (st["model"], st["calibration"], st["state"]) == ("tiny", cal, "idle")
            ctl.call("start", interval_ms=20.0)
            rec2 = ctl.call("record_start", name="clean")
            _wait_for(lambda: ctl.call("status")["recording"]["frames"] > 3, 30, "frames")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert not (ws / "run" / "endpoints.json").exists()
        with h5py.File(rec2["path"], "r") as f:  # closed cleanly: a plain open works
            assert f.attrs["complete"] and f.attrs["n_frames"] == f["frames"].shape[0] > 3
        log = (ws / "serve.log").read_text(errors="replace")
        assert "restored model tiny" in log and "serving: control tcp://127.0.0.1:" in log
        # The lock the killed service left was taken over, with a warning; a clean stop
        # leaves nothing to take over.
        assert f"left by pid {killed}, which did not stop cleanly" in log
        assert (ws / "run" / "service.lock").read_text() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serve_refuses_a_non_loopback_bind(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "focaltrack.daemon.cli",
            "serve",
            "--workspace",
            str(tmp_path),
            "--bind",
            "0.0.0.0",
            "--control-port",
            "0",
            "--pub-port",
            "0",
            "--metrics-port",
            "0",
        ],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "network.bind" in proc.stderr and "curve" in proc.stderr.lower()

"""The client against tiny real servers on loopback (random ports, bounded waits)."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from focaltrack.daemon import protocol as P
from focaltrack.daemon.client import ControlClient, ControlError, Subscriber
from focaltrack.daemon.lock import WorkspaceLock


class TinyRouter:
    """A ROUTER that answers with ``handler(n, request) -> reply | [replies] | None``
    (None = stay silent; a reply without an "id" key gets the request's)."""

    def __init__(self, handler: Callable[[int, P.Request], Any]) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.handler = handler
        self.seen: list[P.Request] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(20, zmq.POLLIN):
                continue
            frames = self.sock.recv_multipart()
            split = P.split_envelope(frames)
            if split is None or split[1] is None:
                continue
            envelope, body = split
            try:
                req = P.parse_request(body)
            except P.ProtocolError as e:
                replies = [P.error_reply(e.code, e.message, P.request_id(body))]
            else:
                self.seen.append(req)
                out = self.handler(len(self.seen) - 1, req)
                replies = [] if out is None else out if isinstance(out, list) else [out]
                for r in replies:
                    r.setdefault("id", req.id)
            for r in replies:
                self.sock.send_multipart([*envelope, P.dumps(r)])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def router() -> Iterator[Callable[..., TinyRouter]]:
    made: list[TinyRouter] = []

    def make(handler: Callable[[int, P.Request], dict[str, Any] | None]) -> TinyRouter:
        made.append(TinyRouter(handler))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_call_ok_and_error(router: Callable[..., TinyRouter]) -> None:
    def handler(n: int, req: P.Request) -> dict[str, Any]:
        if req.cmd == "start":
            return P.error_reply(P.ErrorCode.WRONG_STATE, "no model loaded")
        return P.ok_reply({"cmd": req.cmd, "args": req.args})

    srv = router(handler)
    with ControlClient(srv.endpoint, timeout_s=2.0) as c:
        res = c.call("move_z", z_um=5)
        assert res == {"cmd": "move_z", "args": {"z_um": 5.0}}
        with pytest.raises(ControlError) as ei:
            c.call("start")
        assert ei.value.code == "wrong_state" and "no model" in ei.value.message
        with pytest.raises(ControlError) as ei2:
            c.call("calibrate", averages=0)  # validated by the server, answered bad_args
        assert ei2.value.code == "bad_args"
        reply = c.request("nope")
        assert reply["ok"] is False and reply["error"]["code"] == "unknown_command"
        P.validate_reply(reply)
        assert c.reconnects == 0


def test_slow_server_lazy_pirate_reconnects(router: Callable[..., TinyRouter]) -> None:
    # The first attempt is never answered; the retry on a fresh socket is.
    srv = router(lambda n, req: None if n == 0 else P.ok_reply({"attempt": n}))
    with ControlClient(srv.endpoint, timeout_s=0.3, retries=3) as c:
        t0 = time.monotonic()
        assert c.call("status") == {"attempt": 1}
        assert c.reconnects == 1
        assert time.monotonic() - t0 < 2.0
        # Same request id on both attempts; the client survives to make more calls.
        assert srv.seen[0].id == srv.seen[1].id
        assert c.call("get_z") == {"attempt": 2}


def test_non_idempotent_commands_are_not_resent(router: Callable[..., TinyRouter]) -> None:
    # The server ignores the requests named "lost" and get_z, and answers the rest. Only those
    # silences are waited out (0.2 s each); every reply that must come has 30 s, so a loaded
    # machine cannot fail the test, and the attempt counts are the client's own.
    def handler(n: int, req: P.Request) -> dict[str, Any] | None:
        if req.args.get("name") == "lost" or req.cmd == "get_z":
            return None
        return P.ok_reply({"job": "j"})

    srv = router(handler)
    with ControlClient(srv.endpoint, timeout_s=30.0, retries=3) as c:
        with pytest.raises(TimeoutError, match="after 1 attempt"):
            c.request("train", {"name": "lost"}, timeout_s=0.2)
        # The socket was rebuilt all the same, and the next call works.
        assert c.call("train", name="found") == {"job": "j"}
        lost = [r for r in srv.seen if r.args.get("name") == "lost"]
        assert len(lost) <= 1  # sent once (it may even have been lost with the old socket)
        # An explicit retries= overrides, both ways.
        with pytest.raises(TimeoutError, match="after 2 attempt"):
            c.request("train", {"name": "lost"}, timeout_s=0.2, retries=2)
        with pytest.raises(TimeoutError, match="after 1 attempt"):
            c.request("get_z", timeout_s=0.2, retries=1)
        assert c.request("start", retries=2)["ok"] is True


def test_late_reply_to_an_old_request_is_ignored(router: Callable[..., TinyRouter]) -> None:
    # A stale reply (another request's id) and garbage arrive before the real reply.
    def handler(n: int, req: P.Request) -> list[dict[str, Any]]:
        stale = {"ok": True, "result": "stale", "id": "someone-else"}
        return [stale, P.ok_reply({"n": n})]

    srv = router(handler)
    with ControlClient(srv.endpoint, timeout_s=2.0) as c:
        assert c.call("status") == {"n": 0}
        assert c.call("status") == {"n": 1}
        assert c.reconnects == 0


def test_dead_server_times_out_after_retries() -> None:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    s.close(linger=0)  # nothing listens there now
    try:
        with ControlClient(f"tcp://127.0.0.1:{port}", timeout_s=0.15, retries=2) as c:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError, match="2 attempt"):
                c.call("status")
            elapsed = time.monotonic() - t0
            assert 0.25 < elapsed < 2.0
            assert c.reconnects == 1
    finally:
        ctx.term()


def test_server_restart_is_survived(router: Callable[..., TinyRouter]) -> None:
    srv = router(lambda n, req: P.ok_reply("first"))
    endpoint = srv.endpoint
    with ControlClient(endpoint, timeout_s=0.3, retries=2) as c:
        assert c.call("status") == "first"
        srv.close()
        with pytest.raises(TimeoutError):
            c.call("status")
        # A new server on the same port (the daemon restarted).
        ctx = zmq.Context()
        s = ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.LINGER, 0)
        s.bind(endpoint)
        try:
            result: list[Any] = []
            t = threading.Thread(target=lambda: result.append(c.call("status")))
            t.start()
            assert s.poll(3000, zmq.POLLIN)
            envelope, body = P.split_envelope(s.recv_multipart()) or ([], b"")
            req = P.parse_request(body or b"")
            s.send_multipart([*envelope, P.dumps(P.ok_reply("second", req.id))])
            t.join(timeout=5)
            assert result == ["second"]
        finally:
            s.close(linger=0)
            ctx.term()


def test_client_rejects_bad_settings() -> None:
    with pytest.raises(ValueError):
        ControlClient("tcp://127.0.0.1:1", timeout_s=0)
    with pytest.raises(ValueError):
        ControlClient("tcp://127.0.0.1:1", retries=0)


# ----------------------------------------------------------------------------- subscriber


class Pub:
    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.seq = P.Sequencer()

    def hb(self, seq: int | None = None) -> None:
        h = P.hb_header(
            seq=self.seq.next("hb") if seq is None else seq,
            state="live",
            frames_acquired=1,
            frames_analysed=1,
            frames_dropped=0,
            model="m",
            uptime_s=1.0,
        )
        self.sock.send_multipart(P.encode_message(h))

    def loc(self, seq: int, frame: int) -> None:
        h = P.loc_header(
            seq=seq, frame=frame, t_acq_s=1.0, stage_z_um=0.0, x_um=[1], y_um=[2], z_um=[3],
            score=[1],
        )  # fmt: skip
        self.sock.send_multipart(P.encode_message(h, payload=b"\x00\x01"))

    def close(self) -> None:
        self.sock.close(linger=0)
        self.ctx.term()


@pytest.fixture
def pub() -> Iterator[Pub]:
    p = Pub()
    yield p
    p.close()


def _join(pub: Pub, sub: Subscriber) -> None:
    """Beat the slow-joiner: publish heartbeats until the subscriber sees one."""
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        pub.hb()
        try:
            topic, _, _ = sub.recv(timeout_s=0.02)
        except TimeoutError:
            continue
        if topic == "hb":
            sub.drain_newest()
            return
    raise AssertionError("subscriber never joined")


SENTINEL_SEQ = 1_000_000  # a heartbeat sequence number no join heartbeat has


def _all_arrived(sub: Subscriber) -> dict[str, Any]:
    """drain_newest until the sentinel heartbeat (``pub.hb(seq=SENTINEL_SEQ)``, published
    last; TCP keeps order) arrives. Heartbeats from `_join` may still be in flight, so the
    sentinel is told apart by its sequence number, not its topic."""
    got: dict[str, Any] = {}
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        got.update(sub.drain_newest())
        if "hb" in got and got["hb"][1]["seq"] == SENTINEL_SEQ:
            break
        sub.socket.poll(20, zmq.POLLIN)
    return got


def test_subscriber_recv_topics_payload_and_gaps(pub: Pub) -> None:
    with Subscriber(pub.endpoint, topics=("loc", "hb")) as sub:
        _join(pub, sub)
        for seq in (0, 1, 5):
            pub.loc(seq, frame=seq)
        got = [sub.recv(timeout_s=2.0) for _ in range(3)]
        assert [h["seq"] for _, h, _ in got] == [0, 1, 5]
        topic, header, payload = got[0]
        assert topic == "loc" and payload == b"\x00\x01"
        P.validate("loc", header)
        assert sub.lost.get("loc") == 3
        with pytest.raises(TimeoutError):
            sub.recv(timeout_s=0.05)


def test_subscriber_filters_topics(pub: Pub) -> None:
    with Subscriber(pub.endpoint, topics=("hb",)) as sub:
        _join(pub, sub)
        pub.loc(0, 0)
        pub.hb()
        topic, _, _ = sub.recv(timeout_s=2.0)
        assert topic == "hb"
        assert "loc" not in sub.received


def test_drain_newest_keeps_the_newest_per_topic(pub: Pub) -> None:
    with Subscriber(pub.endpoint) as sub:
        _join(pub, sub)
        for i in range(50):
            pub.loc(i, frame=100 + i)
        pub.hb(seq=SENTINEL_SEQ)
        got = _all_arrived(sub)
        assert set(got) == {"loc", "hb"}
        assert got["loc"][1]["seq"] == 49 and got["loc"][1]["frame"] == 149
        assert sub.lost.get("loc", 0) == 0
        assert sub.drain_newest() == {}


def test_conflate_newest_recv(pub: Pub) -> None:
    with Subscriber(pub.endpoint, conflate_newest=True) as sub, Subscriber(pub.endpoint) as probe:
        _join(pub, sub)
        _join(pub, probe)
        sub.drain_newest()
        for i in range(20):
            pub.loc(i, frame=i)
        pub.hb(seq=SENTINEL_SEQ)
        # When the probe has everything, so (nearly always) has `sub`; its order is the
        # same either way, which is all the assertions below rely on.
        _all_arrived(probe)
        seen: list[tuple[str, int]] = []
        deadline = time.monotonic() + 5.0
        while ("hb", SENTINEL_SEQ) not in seen and time.monotonic() < deadline:
            topic, header, _ = sub.recv(timeout_s=2.0)
            seen.append((topic, header["seq"]))
        locs = [s for t, s in seen if t == "loc"]
        assert locs and locs[-1] == 19 and locs == sorted(locs)
        assert len(locs) + sub.discarded.get("loc", 0) == 20
        assert sub.discarded.get("loc", 0) > 0


def test_malformed_messages_are_counted_not_raised(pub: Pub) -> None:
    with Subscriber(pub.endpoint, topics=("loc", "hb")) as sub:
        _join(pub, sub)
        pub.sock.send_multipart([b"loc", b"{not json"])
        pub.sock.send_multipart([b"loc", b'{"topic": "hb", "seq": 0}'])
        pub.sock.send_multipart([b"loc"])
        pub.loc(0, 0)
        topic, header, _ = sub.recv(timeout_s=2.0)
        assert topic == "loc" and header["seq"] == 0
        assert sub.malformed == 3


# ----------------------------------------------------------------------------- CLI verbs


def _cli(argv: list[str]) -> int:
    from focaltrack.daemon.cli import main

    return main(argv)


def test_ctl_parse_params() -> None:
    from focaltrack.daemon.commands.ctl import parse_params

    assert parse_params(["a=1", "b=2.5", "c=true", "d=null", "e=text", 'f="12"', "g=[1,2]"]) == {
        "a": 1,
        "b": 2.5,
        "c": True,
        "d": None,
        "e": "text",
        "f": "12",
        "g": [1, 2],
    }
    assert parse_params(["name=a=b"]) == {"name": "a=b"}
    for bad in (["novalue"], ["=3"], ["a=1", "a=2"]):
        with pytest.raises(ValueError):
            parse_params(bad)


def test_ctl_status_verbs_against_a_router(
    router: Callable[..., TinyRouter], capsys: pytest.CaptureFixture[str]
) -> None:
    jobs = {"n": 0}

    def handler(n: int, req: P.Request) -> dict[str, Any]:
        if req.cmd == "status":
            return P.ok_reply({"state": "idle", "uptime_s": 3.0, "model": None, "jobs": []})
        if req.cmd == "train":
            return P.ok_reply({"job": "j1"})
        if req.cmd == "job":
            jobs["n"] += 1
            state = "done" if jobs["n"] >= 2 else "running"
            return P.ok_reply(P.job_info("j1", "train", state, progress=jobs["n"] / 2))
        if req.cmd == "start":
            return P.error_reply("wrong_state", "no model loaded")
        return P.ok_reply({"cmd": req.cmd, "args": req.args})

    srv = router(handler)
    ep = ["--control", srv.endpoint]
    assert _cli(["status", *ep]) == 0
    out = capsys.readouterr().out
    assert "state" in out and "idle" in out
    assert _cli(["status", "--json", *ep]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "idle"
    assert _cli(["ctl", "move_z", "z_um=2.5", *ep]) == 0
    assert json.loads(capsys.readouterr().out) == {"cmd": "move_z", "args": {"z_um": 2.5}}
    assert _cli(["ctl", "start", *ep]) == 2  # an error reply: 2, as every other error
    assert "wrong_state" in capsys.readouterr().err
    assert _cli(["ctl", "train", "preset=quick", "--wait", "--poll", "0.01", *ep]) == 0
    captured = capsys.readouterr()
    assert "j1 train running" in captured.err and '"state": "done"' in captured.out
    assert _cli(["ctl", "frobnicate", *ep]) == 2
    assert "unknown_command" in capsys.readouterr().err
    assert _cli(["ctl", "--list"]) == 0
    assert "move_z" in capsys.readouterr().out
    assert _cli(["ctl", "get_z", "oops", *ep]) == 2
    assert "key=value" in capsys.readouterr().err


def test_cli_no_service_and_port_zero(
    tmp_path: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FOCALTRACK_WORKSPACE_DIR", str(tmp_path / "ws"))  # no service there
    port = _free_port()
    ep = f"tcp://127.0.0.1:{port}"
    assert _cli(["status", "--control", ep, "--timeout", "0.1"]) == 2
    assert "no reply" in capsys.readouterr().err
    monkeypatch.setenv("FOCALTRACK_NETWORK_CONTROL_PORT", "0")
    assert _cli(["status", "--timeout", "0.1"]) == 2
    assert "--control" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text(f"[network]\ncontrol_port = {port}\n")
    monkeypatch.delenv("FOCALTRACK_NETWORK_CONTROL_PORT")
    assert _cli(["status", "--config", str(cfg), "--timeout", "0.1"]) == 2
    assert f":{port}" in capsys.readouterr().err


def _free_port() -> int:
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    s.close(linger=0)
    ctx.term()
    return port


def _as_a_service(ws: Path, control: str, pub: str) -> WorkspaceLock:
    """Make ``ws`` look as a running service leaves it: its lock held (by this process) and
    run/endpoints.json naming ``control`` and ``pub``."""
    lock = WorkspaceLock.acquire(ws, started_utc="2026-12-07T00:00:00Z")
    eps = {"control": control, "pub": pub, "metrics": "http://127.0.0.1:1/metrics"}
    (ws / "run" / "endpoints.json").write_text(json.dumps({**eps, "pid": os.getpid()}))
    return lock


def test_client_verbs_find_the_service_through_the_workspace(
    router: Callable[..., TinyRouter],
    pub: Pub,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """status, ctl and watch need no endpoint: the workspace's run/endpoints.json names it,
    whatever ports the configuration has (here 0, "any free port")."""
    srv = router(lambda n, req: P.ok_reply({"state": "idle"} if req.cmd == "status" else {}))
    monkeypatch.setenv("FOCALTRACK_NETWORK_CONTROL_PORT", "0")
    monkeypatch.setenv("FOCALTRACK_NETWORK_PUB_PORT", "0")
    ws, other = tmp_path / "ws", tmp_path / "other"
    lock = _as_a_service(ws, srv.endpoint, pub.endpoint)
    try:
        assert _cli(["status", "--workspace", str(ws), "--json"]) == 0
        assert json.loads(capsys.readouterr().out) == {"state": "idle"}
        # The configured workspace is the default one.
        monkeypatch.setenv("FOCALTRACK_WORKSPACE_DIR", str(ws))
        assert _cli(["ctl", "move_z", "z_um=1"]) == 0
        assert srv.seen[-1].cmd == "move_z" and json.loads(capsys.readouterr().out) == {}
        argv = ["watch", "hb", "-n", "1", "--json", "--timeout", "5"]
        result: list[int] = []
        t = threading.Thread(target=lambda: result.append(_cli(argv)))
        t.start()
        deadline = time.monotonic() + 10.0
        while t.is_alive() and time.monotonic() < deadline:
            pub.hb()
            t.join(timeout=0.02)
        t.join(timeout=5)
        assert result == [0]
        assert json.loads(capsys.readouterr().out.splitlines()[0])["topic"] == "hb"
        # A workspace named on the command line with no service: one line, exit 2.
        other.mkdir()
        assert _cli(["status", "--workspace", str(other)]) == 2
        err = capsys.readouterr().err.strip()
        assert (
            len(err.splitlines()) == 1
            and f"no focaltrack service is running on the workspace {other}" in err
        )
    finally:
        lock.release()
    # The service died (its lock is free) and left endpoints.json behind: said in one line,
    # exit 2, instead of waiting for a reply from ports that may belong to anything by now.
    for argv in (["status"], ["ctl", "get_z"], ["watch"]):
        assert _cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"(pid {os.getpid()}) is not running" in err


def test_watch_prints_messages(pub: Pub, capsys: pytest.CaptureFixture[str]) -> None:
    result: list[int] = []
    argv = ["watch", "loc", "event", "--pub", pub.endpoint, "-n", "3", "--json", "--timeout", "5"]
    t = threading.Thread(target=lambda: result.append(_cli(argv)))
    t.start()
    # Publish until the watcher has joined and seen its three messages (bounded).
    deadline = time.monotonic() + 5.0
    seq = P.Sequencer()
    while t.is_alive() and time.monotonic() < deadline:
        pub.loc(seq.next("loc"), frame=1)
        ev = P.event_header(seq=seq.next("event"), kind="state", state="live")
        pub.sock.send_multipart(P.encode_message(ev))
        pub.hb()
        t.join(timeout=0.02)
    t.join(timeout=5)
    assert result == [0]
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3 and {x["topic"] for x in lines} <= {"loc", "event"}
    loc = next(x for x in lines if x["topic"] == "loc")
    assert loc["payload_bytes"] == 2


def test_watch_human_lines_and_timeout(pub: Pub, capsys: pytest.CaptureFixture[str]) -> None:
    from focaltrack.daemon.commands.watch import format_message

    h = P.track_header(seq=4, frame=9, t_acq_s=1.0, stage_z_um=2.0, columns=_track_cols(2))
    assert "frame 9" in format_message("track", h, None)
    job = P.job_info("j", "train", "running", 0.5, "epoch 2")
    assert "50%" in format_message("event", P.event_header(seq=0, kind="job", job=job), None)
    assert _cli(["watch", "hb", "--pub", pub.endpoint, "--timeout", "0.1"]) == 1
    assert "nothing from" in capsys.readouterr().err
    assert _cli(["watch", "bogus", "--pub", pub.endpoint]) == 2


def _track_cols(n: int) -> dict[str, Any]:
    cols: dict[str, Any] = {c: [0.5] * n for c in P.TRACK_FLOAT_COLUMNS}
    cols.update(track_id=list(range(n)), confirmed=[True] * n, age_frames=[1] * n, misses=[0] * n)
    return cols


def test_docs_python_example_steers(pub: Pub, router: Callable[..., TinyRouter]) -> None:
    """The 15-line example in docs/protocol.md runs and sends a correct move_z."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "protocol.md").read_text("utf-8")
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)  # type: ignore[union-attr]
    assert len(code.strip().splitlines()) <= 15
    srv = router(lambda n, req: P.ok_reply({"z_um": req.args["z_um"]}))
    code = code.replace("tcp://127.0.0.1:5561", pub.endpoint)
    code = code.replace("tcp://127.0.0.1:5560", srv.endpoint)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        cols = _track_cols(2)
        cols["confirmed"] = [False, True]
        cols["z_um"] = [10.0, 30.0]
        deadline = time.monotonic() + 10.0
        seq = 0
        while not srv.seen and time.monotonic() < deadline and proc.poll() is None:
            pub.hb()
            h = P.track_header(seq=seq, frame=seq, t_acq_s=1.0, stage_z_um=5.0, columns=cols)
            pub.sock.send_multipart(P.encode_message(h))
            seq += 1
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.communicate(timeout=5)
    assert srv.seen, "the example never sent a request"
    req = srv.seen[0]
    # Track 1 (the confirmed one) is at defocus 30 with the focus at 5: move to 5 + 50 - 30.
    assert req.cmd == "move_z" and req.args["z_um"] == pytest.approx(25.0)


def test_format_status() -> None:
    from focaltrack.daemon.commands.status import format_status

    job = P.job_info("j1", "train", "running", 0.4, "epoch 3")
    text = format_status(
        {"state": "live", "uptime_s": 4000.0, "driver": {"kind": "sim"}, "jobs": [job], "x": 1}
    )
    lines = text.splitlines()
    assert lines[0].split() == ["state", "live"]
    assert "01:06:40" in text and "j1 train running 40% epoch 3" in text
    assert lines[-1].split() == ["x", "1"]


def test_curve_client_against_an_allow_list(tmp_path: Any) -> None:
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    from focaltrack.daemon.client import load_curve_client

    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    server_pub, server_sec = zmq.auth.create_certificates(str(keys), "server")
    client_pub, client_sec = zmq.auth.create_certificates(str(keys), "client")
    _, other_sec = zmq.auth.create_certificates(str(keys), "stranger")
    (allowed / "client.key").write_bytes((keys / "client.key").read_bytes())
    ctx = zmq.Context()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(allowed))
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    pub_key, sec_key = zmq.auth.load_certificate(server_sec)
    s.curve_publickey, s.curve_secretkey, s.curve_server = pub_key, sec_key, True
    port = s.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if s.poll(20, zmq.POLLIN):
                env, body = P.split_envelope(s.recv_multipart()) or ([], b"")
                req = P.parse_request(body or b"")
                s.send_multipart([*env, P.dumps(P.ok_reply("hello", req.id))])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    ep = f"tcp://127.0.0.1:{port}"
    try:
        with ControlClient(ep, timeout_s=2.0, curve=load_curve_client(server_pub, client_sec)) as c:
            assert c.call("status") == "hello"
        stranger = load_curve_client(server_pub, other_sec)
        with ControlClient(ep, timeout_s=0.3, retries=1, curve=stranger) as c:
            with pytest.raises(TimeoutError):
                c.call("status")
        with pytest.raises(ValueError, match="secret"):
            load_curve_client(server_pub, client_pub)
    finally:
        stop.set()
        t.join(timeout=5)
        s.close(linger=0)
        auth.stop()
        ctx.term()

#!/usr/bin/env python3
"""A feedback subscriber: keep one tracked emitter in focus by moving the focus drive.

    focaltrack serve --driver sim --workspace out/demo/workspace    # after `focaltrack demo`
    python deploy/examples/focus_lock.py --start --setpoint-um 50 --duration-s 30

What it does, once per `track` message it acts on:

1. **Drain.** Read every message waiting on the socket and keep only the newest `track`
   message: a steering loop must act on the present, not work through a backlog (PUB drops
   silently at its high-water mark anyway).
2. **Pick.** Stay locked on the same track id while it lives (while it is ``coasting``,
   not seen in this frame, hold the focus: its position is only the tracker's prediction).
   Otherwise lock onto the
   confirmed track that has lived longest and was seen in this frame (``misses == 0``): a
   long-lived track is a real emitter that the tracker follows well. (Track messages carry
   no brightness; a steadier track is also the better-localized one.)
3. **Steer.** The track's ``z_um`` is its defocus ``d = f − z_abs`` (µm), where ``f`` is the
   focus-drive position and ``z_abs`` the emitter's own depth. To bring ``d`` to the
   setpoint ``s``, the focus must go to ``f + (s − d)``. The loop moves a fraction of that
   (proportional gain ``k``), limited to ``max_rate_um_s`` times the time since the last
   command, and not at all inside a dead band (the localizer's axial precision is a few µm;
   chasing its noise would shake the sample):

       target = stage_z_um + clip(k · (s − d), ± max_rate_um_s · Δt)

   ``stage_z_um`` is the focus position of the frame in the message, so a message from
   before the last move (still in flight) asks for the same target again instead of adding
   a second correction: the loop cannot wind up on latency.
4. **Send** ``move_z {z_um: target}`` on the control socket and wait for the reply (the
   service waits until the stage is there, bounded by its stage timeout).

It also listens to the ``hb`` heartbeat and stops steering when none came for 3 s (the
service stopped, or the network is down): a controller must not act on a stale picture.

Everything that decides is in `FocusLock.step`, a pure function of the message (a dict
with the fields of docs/protocol.md); the loop around it is a few lines of ZeroMQ. To port it,
keep the two apart the same way: the controller is plain arithmetic over lists.

On the simulated microscope the scene responds to the stage (an emitter at depth ``z_abs``
is rendered with defocus ``focus − z_abs``), so this script really closes the loop: watch the
locked track's ``d`` settle at the setpoint while the emitter drifts in depth. Emitters flow
through the field in a few seconds there, so the lock hops from track to track.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Seconds without a heartbeat after which the stream is stale and the loop stops steering.
STALE_S = 3.0


@dataclass(frozen=True, slots=True)
class FocusLockConfig:
    setpoint_um: float = 50.0  # defocus to hold the tracked emitter at (calibrated: 0..100)
    gain: float = 0.5  # fraction of the error corrected per command
    max_rate_um_s: float = 50.0  # focus speed limit
    max_dt_s: float = 0.2  # longest Δt the rate limit grants (after a pause or a gap)
    deadband_um: float = 1.5  # errors smaller than this are left alone
    min_age_frames: int = 5  # a candidate must have lived this many frames
    z_range_um: tuple[float, float] = (0.0, 100.0)  # calibrated defocus range

    def __post_init__(self) -> None:
        if not (0.0 < self.gain <= 1.0):
            raise ValueError(f"gain must be in (0, 1], got {self.gain}")
        for name in ("max_rate_um_s", "max_dt_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if not self.deadband_um >= 0:
            raise ValueError(f"deadband_um must be >= 0, got {self.deadband_um}")
        lo, hi = self.z_range_um
        if not (lo <= self.setpoint_um <= hi):
            raise ValueError(f"setpoint {self.setpoint_um} µm is outside the range {lo}..{hi} µm")


@dataclass(frozen=True, slots=True)
class Decision:
    """What one `track` message led to. ``move_to_um`` is None when nothing is sent."""

    frame: int
    track_id: int | None
    defocus_um: float | None
    error_um: float | None  # setpoint − defocus
    move_to_um: float | None
    reason: str  # "move", "deadband", "coasting", "no_track", "stale"


class FocusLock:
    """The controller: one call of `step` per `track` message; no I/O."""

    def __init__(self, config: FocusLockConfig | None = None) -> None:
        self.config = config or FocusLockConfig()
        self.locked_id: int | None = None
        self._last_frame: int | None = None
        self._last_command_t_s: float | None = None

    def choose(self, msg: Mapping[str, Any]) -> int | None:
        """Index (into the message's columns) of the track to follow, or None."""
        ids: Sequence[int] = msg["track_id"]
        status: Sequence[str] = msg["status"]
        age: Sequence[int] = msg["age_frames"]
        misses: Sequence[int] = msg["misses"]
        z: Sequence[float] = msg["z_um"]
        lo, hi = self.config.z_range_um
        if self.locked_id is not None:
            for i, tid in enumerate(ids):
                if tid == self.locked_id and status[i] == "confirmed":
                    return i
                if tid == self.locked_id and status[i] == "coasting":
                    return None  # alive but not seen this frame: keep the lock, do not steer
            self.locked_id = None  # it ended (left the field or was lost): pick another
        best: int | None = None
        for i in range(len(ids)):
            if status[i] != "confirmed" or misses[i] != 0 or age[i] < self.config.min_age_frames:
                continue
            if z[i] is None or not (lo <= z[i] <= hi):  # null: not a finite number
                continue
            if best is None or age[i] > age[best] or (age[i] == age[best] and ids[i] < ids[best]):
                best = i
        if best is not None:
            self.locked_id = int(ids[best])
        return best

    def step(self, msg: Mapping[str, Any]) -> Decision:
        """Decide on one `track` message (its header as a dict)."""
        frame = int(msg["frame"])
        if self._last_frame is not None:
            if frame == self._last_frame:  # the same frame again: nothing new
                return Decision(frame, self.locked_id, None, None, None, "stale")
            if frame < self._last_frame:  # frame numbers restarted: the service restarted
                self.locked_id = None
                self._last_command_t_s = None
        self._last_frame = frame
        i = self.choose(msg)
        z = msg["z_um"][i] if i is not None else None
        if i is None and self.locked_id is not None:  # its position is only predicted
            return Decision(frame, self.locked_id, None, None, None, "coasting")
        if i is None or z is None:
            return Decision(frame, None, None, None, None, "no_track")
        cfg = self.config
        d = float(z)
        error = cfg.setpoint_um - d
        tid = self.locked_id
        if abs(error) <= cfg.deadband_um:
            return Decision(frame, tid, d, error, None, "deadband")
        t = float(msg["t_acq_s"])
        dt = cfg.max_dt_s if self._last_command_t_s is None else t - self._last_command_t_s
        dt = min(max(dt, 0.0), cfg.max_dt_s)
        limit = cfg.max_rate_um_s * dt
        if limit <= 0:
            return Decision(frame, tid, d, error, None, "stale")
        correction = max(-limit, min(limit, cfg.gain * error))
        self._last_command_t_s = t
        return Decision(frame, tid, d, error, float(msg["stage_z_um"]) + correction, "move")


# ------------------------------------------------------------------------------ the loop


def run(
    control: str,
    pub: str,
    config: FocusLockConfig,
    *,
    duration_s: float,
    start: bool,
    stage_timeout_s: float,
) -> int:
    from focaltrack.daemon.client import ControlClient, ControlError, Subscriber

    ctl = ControlClient(control, timeout_s=max(5.0, stage_timeout_s + 2.0))
    sub = Subscriber(pub, topics=("track", "hb"))
    try:
        state = ctl.call("status")["state"]
        if state != "live":
            if not start:
                print(f"the service is {state!r}, not live: start it, or pass --start")
                return 1
            ctl.call("start")
        lock = FocusLock(config)
        now = time.monotonic()
        t_end, t_print, last_hb = now + duration_s, 0.0, now
        moves = 0
        decision: Decision | None = None
        while (now := time.monotonic()) < t_end:
            # 1. Drain: wait a little for news, then keep only the newest message per topic.
            newest: dict[str, Any] = {}
            try:
                msg = sub.recv(timeout_s=0.5)
                newest[msg[0]] = msg
            except TimeoutError:
                pass
            newest.update(sub.drain_newest())
            now = time.monotonic()
            if "hb" in newest:
                last_hb = now
            if now - last_hb > STALE_S:  # no heartbeat: the service is gone, stop steering
                print(f"no heartbeat for {now - last_hb:.0f} s: not steering")
                continue
            if "track" not in newest:
                continue
            header = newest["track"][1]
            # 2.-3. Pick and steer (pure arithmetic).
            decision = lock.step(header)
            # 4. Send.
            if decision.move_to_um is not None:
                try:
                    ctl.call("move_z", z_um=decision.move_to_um)
                    moves += 1
                except ControlError as e:  # e.g. a stage timeout: report it, keep going
                    print(f"move_z refused: {e}")
            if now - t_print >= 1.0:
                t_print = now
                d = "-" if decision.defocus_um is None else f"{decision.defocus_um:6.1f}"
                print(
                    f"frame {decision.frame:6d}  track {decision.track_id!s:>6}  "
                    f"d {d} µm  setpoint {config.setpoint_um:g} µm  "
                    f"stage {header['stage_z_um']:8.2f} µm  moves {moves}"
                )
        return 0
    finally:
        sub.close()
        ctl.close()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--control", default="tcp://127.0.0.1:5560", help="control endpoint")
    p.add_argument("--pub", default="tcp://127.0.0.1:5561", help="publish endpoint")
    d = FocusLockConfig()  # the defaults
    p.add_argument("--setpoint-um", type=float, default=d.setpoint_um, help="defocus to hold")
    p.add_argument("--gain", type=float, default=d.gain, help="proportional gain, (0, 1]")
    p.add_argument("--max-rate-um-s", type=float, default=d.max_rate_um_s, help="speed limit")
    p.add_argument("--deadband-um", type=float, default=d.deadband_um, help="errors ignored")
    p.add_argument("--duration-s", type=float, default=30.0, help="run this long, then exit")
    p.add_argument("--start", action="store_true", help="start live analysis if it is not on")
    p.add_argument("--stage-timeout-s", type=float, default=5.0)
    a = p.parse_args(argv)
    if not (math.isfinite(a.duration_s) and a.duration_s > 0):
        p.error(f"--duration-s must be > 0, got {a.duration_s}")
    try:
        cfg = FocusLockConfig(
            setpoint_um=a.setpoint_um,
            gain=a.gain,
            max_rate_um_s=a.max_rate_um_s,
            deadband_um=a.deadband_um,
        )
    except ValueError as e:
        p.error(str(e))
    from focaltrack.daemon.client import ControlError

    try:
        return run(
            a.control,
            a.pub,
            cfg,
            duration_s=a.duration_s,
            start=a.start,
            stage_timeout_s=a.stage_timeout_s,
        )
    except KeyboardInterrupt:
        return 130
    except TimeoutError as e:
        print(f"focus_lock: the service does not answer: {e}", file=sys.stderr)
        return 1
    except ControlError as e:
        print(f"focus_lock: the service said no: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

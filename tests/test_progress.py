"""Progress display: tqdm on a terminal, plain lines in a log; the train job's callback."""

from __future__ import annotations

import io
import queue

from focaltrack.common.progress import progress_bar


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_per_tenth_and_one_at_the_end():
    s = io.StringIO()
    bar = progress_bar(200, "work", stream=s, bar_format="{desc} {n_fmt}/{total_fmt}")
    for _ in range(200):
        bar.update(1)
    bar.close()
    lines = s.getvalue().splitlines()
    assert "\r" not in s.getvalue()
    assert lines[0] == "work 1/200" and lines[-1] == "work 200/200"
    assert len(lines) == 11  # 1, 20, 40, ... 180, 200: one line each tenth


def test_a_log_line_after_the_interval_and_at_close():
    s = io.StringIO()
    bar = progress_bar(1.0, "job", stream=s, bar_format="{desc} {n:.2f}", log_interval_s=0.0)
    bar.update(0.01)
    bar.update(0.01)  # not a new tenth, but the interval (0 s) has passed
    bar.close()  # closing shows where it stopped, once
    assert s.getvalue().splitlines() == ["job 0.01", "job 0.02"]


def test_a_terminal_gets_a_tqdm_bar_drawn_in_place():
    s = _Tty()
    bar = progress_bar(10, "tty", stream=s, min_redraw_s=0.0)
    for _ in range(10):
        bar.update(1)
    bar.close()
    text = s.getvalue()
    assert "\r" in text and "10/10" in text and text.endswith("\n")


def test_disabled_shows_nothing():
    s = io.StringIO()
    bar = progress_bar(10, "off", stream=s, enabled=False)
    bar.update(5)
    bar.close()
    assert s.getvalue() == ""


def test_the_train_job_sends_fractions_of_the_whole_run():
    from focaltrack.daemon.jobs import _QueueProgress

    q: queue.Queue = queue.Queue()
    cb = _QueueProgress(q, interval_s=3600.0)
    cb("lateral", 1, 100)  # the first step is sent
    cb("lateral", 2, 100)  # throttled
    cb("lateral", 100, 100)  # the end of a phase always
    cb("axial", 50, 100)  # throttled
    cb("axial", 100, 100)
    got = [q.get_nowait() for _ in range(q.qsize())]
    assert [m[2] for m in got] == ["lateral 1/100", "lateral 100/100", "axial 100/100"]
    assert [round(m[1], 4) for m in got] == [0.0045, 0.45, 0.8]

"""``focaltrack bench --soak DURATION``: the soak's parts, its argument checks, and a short soak
through the command line on the session's trained model."""

from __future__ import annotations

import argparse
import json
import logging
import mmap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from focaltrack.daemon.cli import main
from focaltrack.daemon.commands.bench import soak_duration
from focaltrack.daemon.soak import Histogram, format_summary, rss_reader, slope

# ============================================================================ parts


def test_soak_duration_takes_seconds_or_a_unit():
    assert soak_duration("600") == 600.0
    assert soak_duration("90s") == 90.0
    assert soak_duration("10m") == 600.0
    assert soak_duration(" 1.5H ") == 5400.0
    for bad in ("0", "-5", "10x", "", "m", "inf", "nan", "10ms"):
        with pytest.raises(argparse.ArgumentTypeError, match="--soak takes a duration"):
            soak_duration(bad)


def test_histogram_percentiles_in_constant_memory():
    h = Histogram()
    assert h.percentile_ms(50) is None and h.max_ms() is None
    size = h.counts.nbytes
    for ms in range(1, 101):  # 1 … 100 ms
        h.add(ms / 1000.0)
    assert h.n == 100 and h.counts.nbytes == size
    assert h.percentile_ms(50) == pytest.approx(50.0, abs=0.1)
    assert h.percentile_ms(99) == pytest.approx(99.0, abs=0.1)
    assert h.max_ms() == pytest.approx(100.0)
    h.add(30.0)  # beyond the histogram's span: the last bin, and the exact maximum
    assert h.percentile_ms(100) == pytest.approx(30000.0) == h.max_ms()


def test_rss_reader_sees_this_process_grow():
    read, source = rss_reader()
    assert read is not None, source
    before = read()
    assert before > 10 * 2**20
    # Fresh pages straight from the kernel: a numpy array may reuse heap pages that an
    # earlier test left resident (glibc raises its mmap threshold after a large free), and
    # then resident memory does not grow.
    size = 64 * 2**20
    block = mmap.mmap(-1, size)
    try:
        block.write(b"\x01" * size)  # touched, so resident
        if source == "/proc/self/statm":
            assert read() - before > 48 * 2**20
    finally:
        block.close()


def test_slope_shows_a_leak_and_not_an_early_step():
    t = np.arange(0.0, 600.0, 5.0)
    leak = 400.0 + 2.0 * t / 60.0  # 2 MiB/min
    assert slope(t, leak) == pytest.approx(2.0)
    assert slope(t[len(t) // 2 :], leak[len(t) // 2 :]) == pytest.approx(2.0)
    step = np.where(t < 60.0, 400.0, 410.0)
    assert slope(t[len(t) // 2 :], step[len(t) // 2 :]) == pytest.approx(0.0, abs=1e-9)
    assert slope(t[:1], step[:1]) is None


def test_summary_lines_name_what_was_measured():
    report: dict[str, Any] = {
        "measured_s": 540.0,
        "warmup_s": 60.0,
        "frames": {
            "acquired": 54000,
            "analysed": 35000,
            "camera_fps": 100.0,
            "analysed_fps": 64.8,
            "dropped_by_reason": {"analysis_behind": 19000, "camera": 0},
        },
        "latency_ms": {"count": 35000, "p50": 17.05, "p99": 26.35, "max": 81.0},
        "subscriber": {"received": {"hb": 540, "loc": 35000}, "lost": {"loc": 3}, "malformed": 0},
        "status": {
            "asked": 600,
            "answered": 599,
            "unanswered": 1,
            "errors": 0,
            "timeout_s": 2.0,
            "longest_ms": 12.3,
            "longest_at_s": 312.0,
            "p50_ms": 1.2,
            "p99_ms": 4.1,
        },
        "rss": {
            "source": "/proc/self/statm",
            "samples": 109,
            "start_mib": 380.0,
            "after_warmup_mib": 412.3,
            "end_mib": 418.0,
            "peak_mib": 420.1,
            "growth_mib": 5.7,
            "growth_pct": 1.38,
            "slope_mib_per_min": 0.01,
            "slope_last_half_mib_per_min": 0.0,
        },
    }
    text = "\n".join(format_summary(report))
    assert "analysis_behind 19000" in text and "64.8/s" in text
    assert "p50 17.1 / p99 26.4 / max 81.0 ms" in text
    assert "lost 3 (loc 3)" in text
    assert "599 of 600 answered" in text and "longest 12.3 ms at 312 s" in text
    assert "412.3 → 418.0 MiB" in text and "+5.7 MiB (+1.4 %)" in text and "+0.010" in text


# ============================================================================ CLI


def test_soak_refuses_bad_arguments(tmp_path, capsys):
    assert main(["bench", "--soak", "10m", "--duration-s", "5"]) == 2
    assert "leave out --duration-s" in capsys.readouterr().err
    assert main(["bench", "--soak", "10m", "--sizes", "256,512"]) == 2
    assert "one frame size" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["bench", "--soak", "ten minutes"])
    assert e.value.code == 2
    assert main(["bench", "--soak", "5", "--model", str(tmp_path)]) == 2
    assert "not a model bundle" in capsys.readouterr().err


def test_a_short_soak_through_the_cli(tmp_path: Path, trained_model: Any, capsys) -> None:
    out = tmp_path / "soak.json"
    duration = 8
    level = logging.getLogger("focaltrack").level  # bench quietens the package's logging
    try:
        rc = main(
            ["bench", "--soak", f"{duration}s", "--model", str(trained_model.bundle),
             "--json", str(out)]
        )  # fmt: skip
    finally:
        logging.getLogger("focaltrack").setLevel(level)
    assert rc == 0
    printed = capsys.readouterr().out
    assert "soak result" in printed and "longest" in printed and "RSS" in printed
    r = json.loads(out.read_text())
    assert r["kind"] == "focaltrack.bench.soak" and r["size_px"] == 256 and r["fps_asked"] == 100
    assert r["duration_s"] == duration and 0 < r["warmup_s"] < duration
    assert 0 < r["measured_s"] <= duration and r["render_ms"] > 0

    st = r["status"]
    assert st["answered"] >= duration - 2
    assert st["answered"] + st["unanswered"] + st["errors"] == st["asked"]
    assert st["longest_ms"] >= st["p99_ms"] >= st["p50_ms"] > 0
    assert 0 <= st["longest_at_s"] <= duration + st["timeout_s"]

    rss = r["rss"]
    assert rss["source"] and rss["samples"] >= 2
    assert rss["after_warmup_mib"] > 0 and rss["end_mib"] > 0
    assert rss["peak_mib"] >= max(rss["after_warmup_mib"], rss["end_mib"])
    assert rss["growth_mib"] == pytest.approx(rss["end_mib"] - rss["after_warmup_mib"])
    assert rss["slope_mib_per_min"] is not None
    times = [t for t, _ in rss["series_s_mib"]]
    assert times == sorted(times) and times[0] < r["warmup_s"] <= times[-1]

    lat = r["latency_ms"]
    assert lat["count"] > 0 and lat["max"] >= lat["p99"] >= lat["p50"] > 0

    fr = r["frames"]
    assert fr["acquired"] >= fr["analysed"] > 0 and fr["analysed_fps"] > 0
    assert set(fr["dropped_by_reason"]) == {"camera", "analysis_behind"}
    assert all(n >= 0 for n in fr["dropped_by_reason"].values())
    assert r["subscriber"]["received"]["loc"] > 0 and r["subscriber"]["malformed"] == 0

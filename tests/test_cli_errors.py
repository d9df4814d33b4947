"""Errors in the user's terms: one line, the caller's own way to fix it, details in the log.

* Micro-Manager without a pixel size: the Python API, `focaltrack calibrate` and the service
  each name their own way to give one;
* a failed MMCore start (a real one: pymmcore with a configuration naming an adapter that is
  not there) is one line, with the device-interface hint only for an interface mismatch;
* a failed ``--attach`` prints focaltrack's message and no traceback of pyjavaz's thread;
* a 3- or 4-plane TIFF that tifffile wrote as separate "RGB" planes is a stack for the
  calibration import, as it is for `focaltrack localize`.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from service_config import loopback_config

from focaltrack.drivers.base import DriverError
from focaltrack.drivers.micromanager import MicroManagerDriver, NoPixelSizeError
from focaltrack.drivers.simcore import SimulatedCore


def _cli(argv: list[str]) -> int:
    from focaltrack.daemon.cli import main

    return main(argv)


def _core_without_pixel_size() -> SimulatedCore:
    return SimulatedCore(width=32, height=32, pixel_size_um=0.0)


def test_no_pixel_size_names_the_callers_way_to_give_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cores: list[SimulatedCore] = []

    def micromanager_without_pixel_size(*_a: Any, pixel_size_um: float | None = None, **_k: Any):
        cores.append(_core_without_pixel_size())
        return MicroManagerDriver(cores[-1], pixel_size_um=pixel_size_um)

    try:
        # The Python API: the driver's own argument.
        with pytest.raises(NoPixelSizeError, match=r"open_driver\(\.\.\., pixel_size_um=\.\.\.\)"):
            micromanager_without_pixel_size()
        # focaltrack calibrate: its --pixel-size option, in one line.
        monkeypatch.setattr(
            "focaltrack.drivers.factory.open_driver", micromanager_without_pixel_size
        )
        argv = [
            "calibrate",
            "--driver",
            "micromanager",
            "--attach",
            "--out",
            str(tmp_path / "c.h5"),
        ]
        assert _cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1
        assert "pass --pixel-size UM" in err and "open_driver" not in err
        # The service: [driver] pixel_size_um or serve --pixel-size.
        from focaltrack.daemon.service import Service

        monkeypatch.setattr(
            "focaltrack.daemon.microscope.open_service_driver",
            lambda cfg: micromanager_without_pixel_size(),
        )
        svc = Service(loopback_config(tmp_path / "ws"))
        with pytest.raises(NoPixelSizeError) as e:
            svc.start()
        text = str(e.value)
        assert "[driver] pixel_size_um" in text and "--pixel-size" in text
        assert "open_driver" not in text
    finally:
        for core in cores:
            core.close()


def test_serve_takes_the_pixel_size_option(tmp_path: Path) -> None:
    from focaltrack.daemon.cli import build_parser
    from focaltrack.daemon.commands.serve import overrides_from_args

    args = build_parser().parse_args(["serve", "--pixel-size", "0.325"])
    assert overrides_from_args(args)["driver.pixel_size_um"] == 0.325


def test_a_missing_adapter_is_one_line_without_the_interface_hint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A real MMCore start (pymmcore through pycromanager's Python backend) on a folder
    without the adapter the configuration names."""
    from focaltrack.drivers.factory import open_driver

    (tmp_path / "mm").mkdir()
    cfg = tmp_path / "demo.cfg"
    cfg.write_text("Device,Camera,DemoCamera,DCam\nProperty,Core,Initialize,1\n")
    caplog.set_level(logging.INFO, logger="focaltrack.drivers")
    with pytest.raises(DriverError) as e:
        open_driver("micromanager", mm_app_path=tmp_path / "mm", mm_config=cfg)
    text = str(e.value)
    assert "\n" not in text
    assert "Device,Camera,DemoCamera,DCam" in text and "DemoCamera" in text
    assert "interface" not in text
    # MMCore's whole (multi-line) message is in the log.
    full = [r.getMessage() for r in caplog.records if "in full" in r.getMessage()]
    assert full and "Failed to load device adapter" in full[0] and full[0].count("\n") >= 2


@pytest.mark.parametrize(
    "words",
    [
        "Incompatible device interface version (required = 75; found = 71)",
        "Incompatible device interface version (MMCore requires 75; device adapter has 71)",
    ],
)
def test_an_interface_mismatch_gets_the_hint(words: str) -> None:
    from focaltrack.drivers.factory import mm_start_error

    mmcore = (
        "Line 7: Device,DHub,DemoCamera,DHub\n"
        'Failed to load device "DHub" from adapter module "DemoCamera" [ Failed to load device '
        f'adapter "DemoCamera" from "/mm/libmmgr_dal_DemoCamera" [ {words} ] ]\n'
    )
    text = str(mm_start_error(Path("/mm"), Path("/mm/x.cfg"), OSError(mmcore)))
    assert "\n" not in text
    assert "built for interface 71" in text and "needs 75" in text
    assert "Line 7: Device,DHub,DemoCamera,DHub" in text


def test_a_failed_attach_prints_no_traceback() -> None:
    # In a child process: what reaches stderr is the point. A free port, so a real
    # Micro-Manager is never touched; the child waits for pyjavaz's thread to end.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = (
        "import sys, threading\n"
        "from focaltrack.drivers import open_driver, DriverError\n"
        "try:\n"
        f"    open_driver('micromanager', attach=True, port={port}, attach_timeout_s=0.5)\n"
        "except DriverError as e:\n"
        "    print('focaltrack: error:', e, file=sys.stderr)\n"
        "for t in threading.enumerate():\n"
        "    if t.name.startswith('BridgeSocketThread'):\n"
        "        t.join(30)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith("focaltrack: error: no Micro-Manager answered")


def test_a_stack_of_four_float_planes_is_four_slices_for_the_calibration(tmp_path: Path) -> None:
    import tifffile

    from focaltrack.calibration import load_stack_file
    from focaltrack.daemon.commands.localize import read_frames

    rng = np.random.default_rng(0)
    stack = rng.uniform(100, 1000, (4, 32, 40)).astype(np.float32)
    path = tmp_path / "stack.tif"
    with warnings.catch_warnings():  # tifffile's default for this shape: separate RGB planes
        warnings.simplefilter("ignore", DeprecationWarning)
        tifffile.imwrite(path, stack)
    with tifffile.TiffFile(path) as tif:
        assert tif.series[0].axes == "SYX"  # what the user's file looks like
    got = load_stack_file(path)
    assert got.shape == (4, 32, 40) and np.array_equal(got, stack)
    assert np.array_equal(read_frames(path), got)
    # Interleaved samples are a colour picture still.
    rgb = tmp_path / "rgb.tif"
    tifffile.imwrite(rgb, rng.integers(0, 255, (32, 40, 3), dtype=np.uint8), photometric="rgb")
    with pytest.raises(ValueError, match="colour"):
        load_stack_file(rgb)

"""``focaltrack calibrate``: a focal-stack calibration from a microscope or from a file.

    focaltrack calibrate --driver sim --out cal.h5
    focaltrack calibrate --driver micromanager --mm-app-path DIR --mm-config FILE --out cal.h5
    focaltrack calibrate --driver micromanager --attach --out cal.h5
    focaltrack calibrate --from-file stack.tif --z-step 2 --pixel-size 0.65 --out cal.h5

Everything a user can get wrong is checked before the stage moves (values, output
directory, input file); the calibration file appears only when complete.
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

# sim.optics holds only value types: the CLI, which imports every command, stays fast.
from focaltrack.sim.optics import SIM_BEAD_PHOTONS

if TYPE_CHECKING:
    from focaltrack.calibration import Calibration
    from focaltrack.drivers.base import Driver

log = logging.getLogger("focaltrack.calibrate")

#: Sim stage drift: the sample image moves this many µm laterally per µm of focus travel.
SIM_DRIFT_UM_PER_UM = (0.012, -0.007)


def _positive(kind: type, what: str) -> Any:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {text!r}") from None
        if not (math.isfinite(v) and v > 0):
            raise argparse.ArgumentTypeError(f"{what} must be > 0, got {text}")
        return v

    return parse


def _non_negative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(v) and v >= 0):
        raise argparse.ArgumentTypeError(f"must be ≥ 0, got {text}")
    return v


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "calibrate",
        help="acquire or import a bead focal-stack calibration (writes HDF5)",
        description=(
            "Acquire a focal stack of one sub-resolution bead (focus to +100 µm in 2 µm "
            "steps by default) from the simulated or a real microscope, or import one "
            "recorded elsewhere, and write the calibration HDF5 the training step uses. "
            "Put one isolated bead in focus at the centre of the field before starting."
        ),
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--driver", choices=("sim", "micromanager"), help="acquire from this microscope"
    )
    src.add_argument(
        "--from-file",
        metavar="STACK",
        type=Path,
        help="import a z-stack (multi-page TIFF or HDF5), first slice in focus, z ascending",
    )
    p.add_argument("--out", required=True, type=Path, help="calibration file to write (.h5)")
    g = p.add_argument_group("focal stack")
    g.add_argument(
        "--z-range",
        type=_positive(float, "--z-range"),
        default=100.0,
        metavar="UM",
        help="focus travel above the bead's focus (default 100 µm)",
    )
    g.add_argument(
        "--z-step",
        type=float,
        default=2.0,
        metavar="UM",
        help="focus step, also the slice spacing of an imported stack (default 2 µm)",
    )
    g.add_argument(
        "--averages",
        type=_positive(int, "--averages"),
        default=None,
        metavar="N",
        help="frames averaged per z step (default 4); for --from-file: frames averaged "
        "in each slice of the file (default 1)",
    )
    g.add_argument(
        "--settle",
        type=_non_negative,
        default=0.1,
        metavar="S",
        help="wait after each focus move before snapping (default 0.1 s)",
    )
    g.add_argument(
        "--stage-timeout",
        type=_positive(float, "--stage-timeout"),
        default=5.0,
        metavar="S",
        help="longest wait for the focus stage to reach a position (default 5 s)",
    )
    g.add_argument(
        "--exposure-ms",
        type=_positive(float, "--exposure-ms"),
        default=None,
        metavar="MS",
        help="set the camera exposure first (default: leave it as it is)",
    )
    g.add_argument(
        "--window",
        type=_positive(int, "--window"),
        default=128,
        metavar="PX",
        help="side of the square PSF window cut around the bead (default 128 px)",
    )
    g.add_argument(
        "--pixel-size",
        type=_positive(float, "--pixel-size"),
        default=None,
        metavar="UM",
        help="pixel size in the sample (µm); with --from-file: over what the file states "
        "(OME, Micro-Manager, ImageJ, TIFF resolution, HDF5 pixel_size_um), needed where it "
        "states none; else overrides the driver's",
    )
    g.add_argument(
        "--gain",
        type=_positive(float, "--gain"),
        default=None,
        metavar="E_PER_ADU",
        help="--from-file: the camera's conversion gain (photo-electrons per ADU, from its "
        "data sheet), which a stack of averages cannot show; the pupil fit that training "
        "makes weighs the stack's pixels with it (without it, from the stack itself)",
    )
    g.add_argument(
        "--bit-depth",
        type=_positive(int, "--bit-depth"),
        default=None,
        metavar="BITS",
        help="--from-file: the camera's bit depth for the saturation check (default: from "
        "the pixel type, 16 for float data)",
    )
    g.add_argument(
        "--dataset", default=None, help="--from-file HDF5: the dataset holding the stack"
    )
    mm = p.add_argument_group("Micro-Manager (--driver micromanager)")
    mm.add_argument("--mm-app-path", type=Path, help="Micro-Manager installation folder")
    mm.add_argument("--mm-config", type=Path, help="hardware configuration (.cfg)")
    mm.add_argument(
        "--attach",
        action="store_true",
        help="use a running Micro-Manager (its ZMQ server on, port 4827)",
    )
    mm.add_argument("--mm-port", type=int, default=4827, help="ZMQ server port for --attach")
    sim = p.add_argument_group("simulated microscope (--driver sim)")
    sim.add_argument("--sim-size", type=_positive(int, "--sim-size"), default=256, metavar="PX")
    sim.add_argument(
        "--sim-photons",
        type=_positive(float, "--sim-photons"),
        default=SIM_BEAD_PHOTONS,
        help="bead photons per exposure",
    )
    sim.add_argument(
        "--sim-stage-speed",
        type=_positive(float, "--sim-stage-speed"),
        default=2000.0,
        metavar="UM_PER_S",
    )
    sim.add_argument("--sim-seed", type=int, default=0)
    p.set_defaults(func=run)


def _check_common(args: argparse.Namespace) -> None:
    if not (math.isfinite(args.z_step) and args.z_step > 0):
        raise ValueError(f"--z-step must be > 0 µm, got {args.z_step:g}")
    if args.window < 16:
        raise ValueError(f"--window must be at least 16 px, got {args.window}")
    out: Path = args.out
    if not out.parent.is_dir():
        raise ValueError(f"output directory {out.parent} does not exist (for --out {out})")
    if out.is_dir():
        raise ValueError(f"--out {out} is a directory; give a file name like cal.h5")


def run(args: argparse.Namespace) -> int:
    from focaltrack.calibration import load_stack_file, process_stack, summary

    _check_common(args)
    if args.from_file is None and getattr(args, "gain", None) is not None:
        raise ValueError("--gain is for --from-file (an acquisition measures the gain itself)")
    if args.from_file is not None:
        for opt in ("mm_app_path", "mm_config"):
            if getattr(args, opt) is not None:
                raise ValueError(f"--{opt.replace('_', '-')} is for --driver micromanager")
        if args.attach:
            raise ValueError("--attach is for --driver micromanager")
        import numpy as np

        from focaltrack.calibration.pixelsize import read_pixel_size

        stack = load_stack_file(args.from_file, dataset=args.dataset)  # its errors first
        pixel_size = args.pixel_size
        if pixel_size is None:
            stated = read_pixel_size(args.from_file, args.dataset)
            if stated is None:
                raise ValueError(
                    f"--from-file needs --pixel-size where the file states none ("
                    f"{args.from_file.name} does not): µm per pixel in the sample, e.g. 0.65 "
                    "for 6.5 µm camera pixels behind a 10x objective"
                )
            pixel_size = stated.um
            log.info("pixel size %g µm from %s (%s)", stated.um, args.from_file.name, stated.source)
        if args.bit_depth is not None:
            bits = int(args.bit_depth)
        elif np.issubdtype(stack.dtype, np.integer):
            bits = 8 * stack.dtype.itemsize
        else:
            bits = 16
        n_avg = 1 if args.averages is None else int(args.averages)
        z = np.arange(stack.shape[0], dtype=np.float64) * float(args.z_step)
        source = f"file:{args.from_file.resolve()}" + (f":{args.dataset}" if args.dataset else "")
        cal = process_stack(
            stack,
            z,
            float(pixel_size),
            window_px=int(args.window),
            bit_depth=bits,
            source=source,
            n_averages=int(n_avg),
            extra={"input_dtype": str(stack.dtype)},
        )
        if args.gain is not None:
            import dataclasses

            cal = dataclasses.replace(
                cal, noise=dataclasses.replace(cal.noise, gain_e_per_adu=float(args.gain))
            )
    else:
        cal = _acquire(args)
    cal.save(args.out)
    print(summary(cal))
    print(f"wrote {args.out}")
    return 0


def _acquire(args: argparse.Namespace) -> Calibration:
    from focaltrack.drivers.calibrate import acquire_focal_stack, calibration_from_raw, z_grid
    from focaltrack.drivers.factory import open_driver

    z_grid(args.z_range, args.z_step)  # validate before touching the hardware
    if args.driver == "sim":
        for opt in ("mm_app_path", "mm_config"):
            if getattr(args, opt) is not None:
                raise ValueError(f"--{opt.replace('_', '-')} is for --driver micromanager")
        if args.attach:
            raise ValueError("--attach is for --driver micromanager")
        driver: Driver = _open_sim(args)
        source = "sim"
    else:
        if args.attach:
            driver = open_driver(
                "micromanager",
                attach=True,
                port=args.mm_port,
                pixel_size_um=args.pixel_size,
            )
        else:
            if args.mm_app_path is None or args.mm_config is None:
                raise ValueError(
                    "--driver micromanager needs --mm-app-path and --mm-config "
                    "(or --attach to use a running Micro-Manager)"
                )
            driver = open_driver(
                "micromanager",
                mm_app_path=args.mm_app_path,
                mm_config=args.mm_config,
                pixel_size_um=args.pixel_size,
            )
        source = "micromanager"
    try:
        n_steps = len(z_grid(args.z_range, args.z_step))
        every = max(1, n_steps // 10)

        def progress(done: int, total: int, dz: float) -> None:
            if done and (done % every == 0 or done == total):
                log.info("focal stack: %d/%d slices (z = +%g µm)", done, total, dz)

        raw = acquire_focal_stack(
            driver,
            z_range_um=args.z_range,
            z_step_um=args.z_step,
            n_average=4 if args.averages is None else int(args.averages),
            settle_s=args.settle,
            timeout_s=args.stage_timeout,
            exposure_ms=args.exposure_ms,
            progress=progress,
        )
    except BaseException:
        try:
            driver.close()
        except Exception as e:  # keep the error that stopped the acquisition
            log.warning("closing the driver after the error failed too: %s", e)
        raise
    driver.close()
    return calibration_from_raw(
        raw,
        window_px=int(args.window),
        pixel_size_um=args.pixel_size,
        source=f"{source}:{raw.camera.name}",
    )


def _open_sim(args: argparse.Namespace) -> Driver:
    from focaltrack.drivers.factory import open_simulator

    size = int(args.sim_size)
    if size < args.window:
        raise ValueError(f"--sim-size {size} px is smaller than the --window {args.window} px")
    # One still bead in focus at z = 0, off the pixel grid (the calibration must find
    # sub-pixel centres). Stage drift moves its image as the focus goes up. The simulator's
    # PSF library is loaded (or, the first time, built: ~20 s) before the first snap.
    return open_simulator(
        width=size,
        height=size,
        bead_photons=float(args.sim_photons),
        bead_z_um=0.0,
        pixel_size_um=args.pixel_size,
        stage_speed_um_s=float(args.sim_stage_speed),
        drift_um_per_um=SIM_DRIFT_UM_PER_UM,
        seed=int(args.sim_seed),
        exposure_ms=args.exposure_ms if args.exposure_ms is not None else 50.0,
    )

"""Test-only helpers for the CNN tests: a calibration and "physics" frames.

The calibration is what `focaltrack calibrate` would produce on the simulated microscope,
built directly (fast): the sim's PSF model with its aberrations, slices 0–100 µm every
2 µm, cropped to 128 × 128 and normalised as `focaltrack.calibration.format` says, with the
sim camera's noise model. Frames for accuracy tests are rendered by the sim physics
(`PSFModel.render` at continuous positions + `camera.expose`), never by the training
synthesizer: the split a lab has.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np

from focaltrack.calibration import Calibration, NoiseModel
from focaltrack.sim import camera as sim_camera
from focaltrack.sim.optics import SIM_ABERRATIONS, CameraModel, Optics
from focaltrack.sim.psf import PSFModel

CAMERA = CameraModel()
OPTICS = Optics(aberrations=SIM_ABERRATIONS)
PIXEL_UM = OPTICS.pixel_size_um

_MODEL: PSFModel | None = None


def psf_model() -> PSFModel:
    global _MODEL
    if _MODEL is None:
        _MODEL = PSFModel(OPTICS)
    return _MODEL


def make_calibration(
    z_um: np.ndarray | None = None, window: int = 128, library: PSFModel | None = None
) -> Calibration:
    """The simulated microscope's calibration at ``z_um``; ``library``: a PSF library to cut
    the slices from (default the shared full-range one)."""
    z = np.arange(0.0, 101.0, 2.0) if z_um is None else np.asarray(z_um, dtype=np.float64)
    lib = psf_model() if library is None else library
    psf = lib.psf_stack(z, window_px=window).astype(np.float64)
    psf /= psf.sum(axis=(1, 2)).max()
    return Calibration(
        psf=psf.astype(np.float32),
        z_um=z,
        pixel_size_um=PIXEL_UM,
        noise=NoiseModel(
            offset_adu=CAMERA.offset_adu,
            read_noise_adu=CAMERA.read_noise_e / CAMERA.gain_e_per_adu,
            gain_e_per_adu=CAMERA.gain_e_per_adu,
        ),
        source="test fixture (sim PSF model)",
        bit_depth=CAMERA.bit_depth,
    )


def save_untrained_bundle(out: Path) -> tuple[Path, Calibration]:
    """A real bundle at ``out`` (real files, real networks) with untrained weights: cheap,
    and enough to drive a command that reads bundles; returns its path and calibration."""
    import torch

    from focaltrack.calibration.preprocess import Preprocess
    from focaltrack.models.bundle import save_bundle
    from focaltrack.models.nets import AxialConfig, AxialNet, LateralNet

    cal = make_calibration()
    torch.manual_seed(0)
    pre = Preprocess.from_noise(cal.noise)
    meta = {
        "created_utc": "2026-01-01T00:00:00Z",
        "calibration": {"sha256": cal.sha256, "source": cal.source, "file": "calibration.h5"},
        "pixel_size_um": cal.pixel_size_um,
        "z_um": cal.z_um.tolist(),
        "bit_depth": cal.bit_depth,
        "preprocess": {k: getattr(pre, k) for k in ("offset_adu", "gain_e_per_adu", "s0_e")},
        "training": {"preset": "untrained", "seed": 0},
    }
    path = save_bundle(
        out,
        calibration=cal,
        lateral=LateralNet(),
        axial=AxialNet(AxialConfig(n_bins=len(cal.z_um))),
        meta=meta,
    )
    return path, cal


def photons_for_peak_snr(snr_db: float, background_photons: float, z_ref_um: float = 50.0) -> float:
    """Photons of an intensity-1 emitter whose brightest pixel (pixel-centred, at
    ``z_ref_um``) has S / sqrt(S + B + σ_r²) = 10^(dB/20) (electrons): `evaluate`'s SNR."""
    m = psf_model()
    peak = float(m.psf_stack([z_ref_um], window_px=129).max())
    qe = CAMERA.quantum_efficiency
    t2 = 10 ** (snr_db / 10)
    noise2 = qe * background_photons + CAMERA.read_noise_e**2
    s = 0.5 * (t2 + math.sqrt(t2 * t2 + 4 * t2 * noise2))
    return s / (qe * peak)


def render_frame(
    shape: tuple[int, int],
    xyz_um: np.ndarray,
    photons: np.ndarray,
    rng: np.random.Generator,
    background_photons: float = 20.0,
) -> np.ndarray:
    """Sim physics: exact PSF at continuous (x, y, z), Poisson + read noise → uint16 ADU."""
    xyz = np.asarray(xyz_um, dtype=np.float64).reshape(-1, 3)
    expected = psf_model().render(
        shape, xyz[:, 0] / PIXEL_UM, xyz[:, 1] / PIXEL_UM, xyz[:, 2], np.asarray(photons)
    )
    return sim_camera.expose(expected, CAMERA, rng, background_photons=background_photons)


# --------------------------------------------------------------------------------------
# The session's CI-sized model (the `trained_model` fixture in conftest.py trains it once,
# by running this file in a child process)
# --------------------------------------------------------------------------------------


def train_ci_model(out_dir: Path) -> tuple[Path, Path]:
    """Save `make_calibration` to ``out_dir/cal.h5`` and train the ``ci`` preset (seed 0)
    on it through the CLI into ``out_dir/model``; (calibration path, bundle path)."""
    from focaltrack.daemon.cli import main

    cal_path = out_dir / "cal.h5"
    make_calibration().save(cal_path)
    model = out_dir / "model"
    rc = main(
        ["train", "--calibration", str(cal_path), "--out", str(model), "--preset", "ci",
         "--seed", "0", "--no-progress"]
    )  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"focaltrack train exited with {rc}")
    return cal_path, model


def _exit_with_parent() -> None:
    """End this child when the test session that started it is gone (killed, or ended
    without tearing its fixtures down): an orphan is re-parented."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def random_scene(
    rng: np.random.Generator,
    n: int,
    shape: tuple[int, int],
    margin_px: float = 20.0,
    min_sep_um: float = 0.0,
) -> np.ndarray:
    """(n, 3) µm positions uniform in the frame (minus a margin), z in 0–100 µm, with a
    minimum 3D separation (rejection sampling)."""
    h, w = shape
    out: list[np.ndarray] = []
    while len(out) < n:
        p = np.array(
            [
                rng.uniform(margin_px, w - 1 - margin_px) * PIXEL_UM,
                rng.uniform(margin_px, h - 1 - margin_px) * PIXEL_UM,
                rng.uniform(0.0, 100.0),
            ]
        )
        if all(np.linalg.norm(p - q) >= min_sep_um for q in out):
            out.append(p)
    return np.array(out).reshape(-1, 3)


if __name__ == "__main__":
    # `python cnn_fixtures.py DIR`: the session's training, run as a child of the test
    # session so that it overlaps the other tests (see conftest.py).
    _exit_with_parent()
    os.nice(5)  # the tests in the foreground, some of them timed, come first
    train_ci_model(Path(sys.argv[1]))

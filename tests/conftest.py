"""Session setup shared by every test module; any single module or test runs alone.

* **The PSF library cache.** `focaltrack.sim.psf.cache_dir` reads ``$FOCALTRACK_CACHE``
  (else ``~/.cache/focaltrack``). The session points it at a temporary folder, made when
  pytest starts and removed when it ends, so the tests never write into the user's
  ``~/.cache``; child processes (``focaltrack serve``, training) inherit it. The first test
  that needs the simulator's library builds it there (≈ 10 s). To keep a library between
  runs, set ``FOCALTRACK_TEST_CACHE=DIR``: the session uses DIR and leaves it in place.
* **`trained_model`**: the ``ci`` preset trained once per session (through the CLI, seed 0)
  on `cnn_fixtures.make_calibration`. It is the longest thing the suite does (≈ 1 min), so
  when any collected test requests it, the training starts in a child process at the first
  test and the modules that use it run last: the training overlaps the rest of the suite.
  Running one of them alone simply waits for it.
* Numerical mistakes (overflow, 0/0) fail tests instead of passing silently.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest

CACHE_ENV = "FOCALTRACK_CACHE"  # read by focaltrack.sim.psf.cache_dir
KEEP_CACHE_ENV = "FOCALTRACK_TEST_CACHE"
_CACHE = pytest.StashKey[tuple[str | None, Path | None]]()
_TRAINING_TIMEOUT_S = 1800.0  # ≈ 1 min on 2 idle cores; generous for a loaded machine


def pytest_configure(config: pytest.Config) -> None:
    keep = os.environ.get(KEEP_CACHE_ENV)
    if keep:
        folder, made = Path(keep), None
        folder.mkdir(parents=True, exist_ok=True)
    else:
        folder = made = Path(tempfile.mkdtemp(prefix="focaltrack-test-cache-"))
    config.stash[_CACHE] = (os.environ.get(CACHE_ENV), made)
    os.environ[CACHE_ENV] = str(folder)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _CACHE not in config.stash:
        return
    old, made = config.stash[_CACHE]
    if old is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = old
    if made is not None:
        shutil.rmtree(made, ignore_errors=True)


def _uses_trained_model(item: pytest.Item) -> bool:
    return "trained_model" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Modules with a test that needs the trained model go last (whole modules, in their
    # order, so that module fixtures are set up once): the training runs meanwhile.
    late = {item.path for item in items if _uses_trained_model(item)}
    items[:] = [i for i in items if i.path not in late] + [i for i in items if i.path in late]


@pytest.fixture(autouse=True)
def _strict_numpy() -> Iterator[None]:
    old = np.seterr(all="raise", under="ignore")
    yield
    np.seterr(**old)


# ------------------------------------------------------------------ the trained model


class TrainedModel(NamedTuple):
    calibration: Path  # the calibration it was trained on (HDF5)
    bundle: Path  # the model bundle folder


class _Training:
    """`cnn_fixtures.train_ci_model` in a child process (its output in ``train.log``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.log = folder / "train.log"
        script = Path(__file__).with_name("cnn_fixtures.py")
        with open(self.log, "wb") as log:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(
                [sys.executable, str(script), str(folder)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def result(self, timeout_s: float) -> TrainedModel:
        try:
            rc = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.stop()
            raise AssertionError(f"the session's training took over {timeout_s:g} s") from None
        bundle = self.folder / "model"
        if rc != 0 or not (bundle / "COMPLETE").is_file():
            tail = self.log.read_text(errors="replace")[-3000:]
            raise AssertionError(f"the session's training failed (exit {rc}):\n{tail}")
        return TrainedModel(self.folder / "cal.h5", bundle)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="session", autouse=True)
def _background_training(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[_Training | None]:
    """Starts the session's training at the first test when a collected test needs it."""
    if not any(_uses_trained_model(item) for item in request.session.items):
        yield None
        return
    run = _Training(tmp_path_factory.mktemp("cnn"))
    try:
        yield run
    finally:
        run.stop()


@pytest.fixture(scope="session")
def trained_model(
    _background_training: _Training | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TrainedModel]:
    """The ``ci`` model trained once per session: (calibration path, bundle path). Tests
    copy the bundle before changing anything in it."""
    run = _background_training
    own = run is None  # requested without being collected (getfixturevalue): train now
    if run is None:
        run = _Training(tmp_path_factory.mktemp("cnn"))
    try:
        yield run.result(_TRAINING_TIMEOUT_S)
    finally:
        if own:
            run.stop()


@pytest.fixture
def scenes(monkeypatch):
    """Every scene the evaluation draws, in order, for the oracle to read back."""
    from collections import deque

    from focaltrack.models import evaluate as ev

    q: deque = deque()
    real = ev.random_scene

    def recording(*a, **k):
        s = real(*a, **k)
        q.append(s)
        return s

    monkeypatch.setattr(ev, "random_scene", recording)
    return q

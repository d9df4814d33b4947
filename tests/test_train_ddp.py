"""Data-parallel training (DDP, gloo on the CPU): `focaltrack train --nproc N`, torchrun's
variables, and what each rank draws.

The multi-process runs use the ``ci`` preset cut to a few steps (the training function's
``overrides``): what is tested is that the ranks agree and the bundle is right, not what
the networks learned (tests/test_cnn.py does that). Each spawned rank takes one thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from cnn_fixtures import make_calibration

from focaltrack.daemon.cli import main
from focaltrack.models import distributed
from focaltrack.models.bundle import load_bundle, training_world_size
from focaltrack.models.distributed import DistributedError, Rank
from focaltrack.models.localizer import Localizer
from focaltrack.models.train import TrainResult, train, train_distributed

# a global batch of 4 (2 per rank), a few steps of each network
MICRO = {"lateral_steps": 3, "axial_steps": 3, "lateral_batch": 4, "axial_batch": 4,
         "val_frames": 1, "val_size": 128, "pupil_fit": False}  # fmt: skip


def _digest(result: TrainResult) -> str:
    h = hashlib.sha256()
    for net in (result.lateral, result.axial):
        for name, p in net.named_parameters():
            h.update(name.encode())
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _recording(rank: Rank, report_dir: Path, fn: Any, *args: Any, **kwargs: Any) -> None:
    """A rank that runs ``fn`` and writes its weights' digest and first loss for the test
    (the weights after the last step; every step ends with the same parameters on every
    rank only if the gradients were averaged)."""
    result = fn(rank, *args, **kwargs)
    (report_dir / f"rank{rank.rank}.json").write_text(
        json.dumps(
            {
                "digest": _digest(result),
                "lateral_final_loss": result.meta["training"]["lateral_final_loss"],
                "path": None if result.path is None else str(result.path),
            }
        )
    )


def _reports(d: Path, n: int) -> list[dict[str, Any]]:
    return [json.loads((d / f"rank{i}.json").read_text()) for i in range(n)]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """`focaltrack train --nproc 2` as a user runs it, its ranks' training cut short and
    recorded by wrapping the launch it makes: (bundle, report dir, stdout)."""
    d = tmp_path_factory.mktemp("ddp")
    cal = d / "cal.h5"
    make_calibration().save(cal)
    reports = d / "reports"
    reports.mkdir()
    real_launch = distributed.launch
    calls: list[int] = []

    def launch(nproc: int, fn: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(nproc)
        kwargs["overrides"] = MICRO
        kwargs["threads"] = 1
        real_launch(nproc, _recording, reports, fn, *args, **kwargs)

    mp = pytest.MonkeyPatch()
    mp.setattr(distributed, "launch", launch)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            rc = main(
                ["train", "--calibration", str(cal), "--out", str(d / "model"), "--preset",
                 "ci", "--seed", "3", "--nproc", "2", "--no-progress"]
            )  # fmt: skip
    finally:
        mp.undo()
    assert rc == 0 and calls == [2]
    return d / "model", reports, out.getvalue()


def test_two_processes_write_a_loadable_bundle_that_records_the_world_size(cli_run):
    model, _, stdout = cli_run
    assert f"model: {model}" in stdout and "validation" in stdout
    bundle = load_bundle(model)
    assert training_world_size(bundle.meta) == 2
    assert bundle.meta["training"]["backend"] == "gloo"
    assert bundle.meta["training"]["seed"] == 3
    # the preset's global batch is recorded; each rank drew its share
    assert bundle.meta["training"]["settings"]["lateral_batch"] == 4
    loc = Localizer(bundle, device="cpu", threads=1)
    assert loc.candidates(np.zeros((1, 128, 128), np.uint16))  # it runs
    assert not [p for p in model.parent.iterdir() if p.name.startswith(".model")]


def test_the_ranks_draw_different_batches_and_end_with_the_same_weights(cli_run):
    model, reports, _ = cli_run
    r0, r1 = _reports(reports, 2)
    # different data on each rank (its own seed stream) ...
    assert r0["lateral_final_loss"] != r1["lateral_final_loss"]
    # ... and, the gradients averaged, the same parameters after the steps (the BatchNorm
    # running statistics are left out: each rank updates its own in its last forward)
    assert r0["digest"] == r1["digest"]
    # rank 0 wrote the bundle, and what it wrote is what it trained
    assert r0["path"] == str(model) and r1["path"] is None
    saved = load_bundle(model)
    digest = _digest(TrainResult(None, {}, saved.lateral, saved.axial))
    assert digest == r0["digest"]


def test_a_seed_and_world_size_reproduce_the_run(cli_run, tmp_path):
    _, reports, _ = cli_run
    again = tmp_path / "reports"
    again.mkdir()
    distributed.launch(
        2, _recording, again, train_distributed, make_calibration(), None, preset="ci",
        seed=3, progress=False, overrides=MICRO, threads=1,
    )  # fmt: skip
    assert _reports(again, 2)[0]["digest"] == _reports(reports, 2)[0]["digest"]


def test_one_process_through_ddp_trains_as_a_plain_run(tmp_path):
    cal = make_calibration()
    kw: dict[str, Any] = {"preset": "ci", "seed": 4, "progress": False, "overrides": MICRO,
                          "threads": 1}  # fmt: skip
    distributed.launch(1, _recording, tmp_path, train_distributed, cal, None, **kw)
    plain = train(cal, None, log=lambda m: None, **kw)
    assert _reports(tmp_path, 1)[0]["digest"] == _digest(plain)
    assert plain.meta["training"]["world_size"] == 1


def test_a_failing_rank_is_reported_by_number(tmp_path):
    with pytest.raises(DistributedError, match=r"process 1 failed: .*only rank 1"):
        distributed.launch(2, _fail_on_rank_1)


def _fail_on_rank_1(rank: Rank) -> None:
    if rank.rank == 1:
        raise RuntimeError("only rank 1")


# ------------------------------------------------------------------ the per-rank rules
def test_a_world_of_one_keeps_the_seed_and_ranks_get_independent_streams():
    assert distributed.rank_seed(7, Rank(0, 1, 0)) == 7
    two = [distributed.rank_seed(7, Rank(r, 2, r)) for r in range(2)]
    four = [distributed.rank_seed(7, Rank(r, 4, r)) for r in range(4)]
    assert len(set(two)) == 2 and len(set(four)) == 4 and 7 not in two
    assert two == [distributed.rank_seed(7, Rank(r, 2, r)) for r in range(2)]
    assert two != [distributed.rank_seed(8, Rank(r, 2, r)) for r in range(2)]
    assert all(0 <= s < 2**63 for s in two + four)
    assert distributed.rank_seed(-1, Rank(0, 2, 0)) != distributed.rank_seed(1, Rank(0, 2, 0))
    torch.Generator().manual_seed(max(four))  # a seed torch takes


def test_the_global_batch_is_shared_out():
    assert [distributed.rank_batch(16, Rank(r, 2, r)) for r in range(2)] == [8, 8]
    assert [distributed.rank_batch(16, Rank(r, 3, r)) for r in range(3)] == [6, 5, 5]
    assert distributed.rank_batch(16, Rank(0, 1, 0)) == 16
    with pytest.raises(ValueError, match="at most one process per batch element"):
        distributed.rank_batch(4, Rank(0, 5, 0))


def test_threads_are_shared_out():
    assert distributed.rank_threads(Rank(0, 2, 0), cores=16) == 8
    assert distributed.rank_threads(Rank(0, 4, 0), cores=2) == 1
    # torchrun over 2 machines of 2 ranks each: a machine's cores go to its 2 ranks
    assert distributed.rank_threads(Rank(3, 4, 1, local_world_size=2), cores=16) == 8


def test_torchrun_variables_are_detected():
    assert distributed.from_env({}) is None
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29500"}  # fmt: skip
    assert distributed.from_env(env) == Rank(1, 2, 1)
    assert distributed.from_env({**env, "LOCAL_WORLD_SIZE": "1"}) == Rank(1, 2, 1, 1)
    with pytest.raises(DistributedError, match="MASTER_PORT"):
        distributed.from_env({k: v for k, v in env.items() if k != "MASTER_PORT"})
    with pytest.raises(DistributedError, match="outside"):
        distributed.from_env({**env, "RANK": "2"})


def test_nproc_under_torchrun_is_refused(tmp_path, monkeypatch, capsys):
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                 "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}.items():  # fmt: skip
        monkeypatch.setenv(k, v)
    rc = main(["train", "--calibration", str(tmp_path / "c.h5"), "--out",
               str(tmp_path / "m"), "--nproc", "2"])  # fmt: skip
    assert rc == 2
    assert "leave --nproc out" in capsys.readouterr().err


def test_an_existing_output_is_refused_before_any_process_starts(tmp_path, monkeypatch, capsys):
    cal = tmp_path / "cal.h5"
    make_calibration().save(cal)
    (tmp_path / "model").mkdir()
    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("launched"))
    rc = main(["train", "--calibration", str(cal), "--out", str(tmp_path / "model"),
               "--nproc", "2"])  # fmt: skip
    assert rc == 2 and "already exists" in capsys.readouterr().err


def test_more_processes_than_a_batch_has_elements_are_refused_before_starting(
    tmp_path, monkeypatch, capsys
):
    cal = tmp_path / "cal.h5"
    make_calibration().save(cal)
    monkeypatch.setattr(distributed, "launch", lambda *a, **k: pytest.fail("launched"))
    rc = main(["train", "--calibration", str(cal), "--out", str(tmp_path / "model"),
               "--preset", "ci", "--nproc", "13", "--device", "cpu"])  # fmt: skip
    assert rc == 2 and "13 processes for a batch of 12" in capsys.readouterr().err


def test_a_bundle_without_a_world_size_was_trained_by_one_process():
    assert training_world_size({"training": {"seed": 0}}) == 1
    assert training_world_size({}) == 1
    assert training_world_size({"training": {"world_size": 4}}) == 4

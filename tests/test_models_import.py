"""``focaltrack models import``: a bundle from ``train --out`` into a service workspace."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from focaltrack.daemon.cli import main
from focaltrack.daemon.workspace import Workspace
from focaltrack.models.bundle import load_bundle


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real bundle with untrained weights (what is imported is files, not accuracy)."""
    from cnn_fixtures import save_untrained_bundle

    return save_untrained_bundle(tmp_path_factory.mktemp("trained") / "beads-60x")[0]


def _hidden(ws: Path) -> list[str]:
    return [p.name for p in (ws / "models").iterdir() if p.name.startswith(".")]


def _one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("focaltrack models: error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    return err


def test_import_into_a_workspace_the_service_reads(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = tmp_path / "ws"
    assert main(["models", "import", str(bundle), "--workspace", str(ws)]) == 0
    out = capsys.readouterr().out
    assert "load_model name=beads-60x" in out
    w = Workspace(ws)
    path = w.find_model("beads-60x")  # complete, where the service looks
    assert [m["name"] for m in w.list_models()] == ["beads-60x"]
    assert load_bundle(path).meta["training"]["preset"] == "untrained"
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in bundle.iterdir())
    assert _hidden(ws) == []
    # Under another name, next to it.
    assert main(["models", "import", str(bundle), "--workspace", str(ws), "--name", "b2"]) == 0
    assert [m["name"] for m in w.list_models()] == ["b2", "beads-60x"]


def test_default_workspace_is_the_configured_one(
    bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FOCALTRACK_WORKSPACE_DIR", str(tmp_path / "configured"))
    assert main(["models", "import", str(bundle)]) == 0
    Workspace(tmp_path / "configured").find_model("beads-60x")


def test_an_existing_name_needs_force(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = tmp_path / "ws"
    argv = ["models", "import", str(bundle), "--workspace", str(ws)]
    assert main(argv) == 0
    mark = ws / "models" / "beads-60x" / "old-copy"
    mark.write_text("the bundle imported first")
    capsys.readouterr()
    assert main(argv) == 2
    _one_line_error(capsys, "beads-60x", "--force")
    assert mark.exists()  # untouched
    assert main([*argv, "--force"]) == 0
    assert not mark.exists()  # replaced by the new copy
    Workspace(ws).find_model("beads-60x")
    assert _hidden(ws) == []
    # The workspace's own bundle onto itself: refused, not deleted.
    own = ws / "models" / "beads-60x"
    capsys.readouterr()
    assert main(["models", "import", str(own), "--workspace", str(ws), "--force"]) == 2
    _one_line_error(capsys, "already")
    Workspace(ws).find_model("beads-60x")


def test_bad_bundles_and_names_are_refused_and_leave_nothing(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = tmp_path / "ws"
    broken = tmp_path / "broken"
    shutil.copytree(bundle, broken)
    (broken / "COMPLETE").unlink()  # an interrupted training
    assert main(["models", "import", str(broken), "--workspace", str(ws)]) == 2
    _one_line_error(capsys, str(broken), "incomplete")
    assert not (ws / "models").exists() or list((ws / "models").iterdir()) == []
    odd = tmp_path / "my model"
    shutil.copytree(bundle, odd)
    assert main(["models", "import", str(odd), "--workspace", str(ws)]) == 2
    _one_line_error(capsys, "my model", "--name")
    assert main(["models", "import", str(odd), "--workspace", str(ws), "--name", ".x"]) == 2
    _one_line_error(capsys, "not valid")
    assert main(["models", "import", str(tmp_path / "nothing"), "--workspace", str(ws)]) == 2
    _one_line_error(capsys, "does not exist")
    assert list((ws / "models").iterdir()) == []


def test_the_verb_does_not_import_torch_to_build_the_cli() -> None:
    # Every `focaltrack` invocation builds all verbs' parsers.
    import subprocess
    import sys

    code = (
        "import sys, argparse\n"
        "from focaltrack.daemon.commands import models\n"
        "p = argparse.ArgumentParser(); models.register(p.add_subparsers())\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)

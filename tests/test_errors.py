"""One root for focaltrack's own errors, and the CLI's exit status for it."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

from focaltrack.common.errors import FocaltrackError
from focaltrack.daemon import cli

# The namespace's sub-packages (the editable install maps each folder on its own, so the
# namespace itself cannot be walked).
SUBPACKAGES = ("common", "records", "calibration", "sim", "drivers", "models", "daemon")


def _focaltrack_exceptions() -> list[type[BaseException]]:
    found: list[type[BaseException]] = []
    names: list[str] = []
    for sub in SUBPACKAGES:
        package = importlib.import_module(f"focaltrack.{sub}")
        names.append(package.__name__)
        names += [i.name for i in pkgutil.walk_packages(package.__path__, f"{package.__name__}.")]
    for name in names:
        module = importlib.import_module(name)
        for obj in vars(module).values():
            if (
                isinstance(obj, type)
                and issubclass(obj, BaseException)
                and obj.__module__.startswith("focaltrack.")
            ):
                found.append(obj)
    return found


def test_every_focaltrack_exception_derives_from_the_root() -> None:
    classes = _focaltrack_exceptions()
    assert len(classes) >= 10, classes  # the walk really found the package's errors
    strays = sorted(c.__qualname__ for c in classes if not issubclass(c, FocaltrackError))
    assert strays == []


def test_cli_maps_a_focaltrack_error_to_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    class Boom(FocaltrackError):
        pass

    def fail(_args: object) -> int:
        raise Boom("the thing is wrong")

    parser = cli.build_parser()
    args = parser.parse_args(["status"])
    args.func = fail
    monkeypatch.setattr(cli, "build_parser", lambda: _Fixed(parser, args))
    assert cli.main(["status"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "focaltrack status: error: the thing is wrong"


class _Fixed:
    """A parser stand-in that returns prepared arguments (the verb's function replaced)."""

    def __init__(self, parser: object, args: object) -> None:
        self._parser, self._args = parser, args

    def parse_args(self, _argv: object) -> object:
        return self._args

    def print_help(self, *_a: object) -> None:  # pragma: no cover - not reached
        pass

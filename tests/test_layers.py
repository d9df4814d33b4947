"""The package's layers import only downwards (docs/architecture.md, "Layers").

Every module's imports are read with `ast`: module-level ones, the lazy ones inside
functions, and those under ``if TYPE_CHECKING:`` (a type-only import is still a dependency
of the code that reads it). Nothing is imported, so this runs in a fraction of a second.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Layer of each sub-package, lowest first. A module may import its own layer and any layer
#: with a lower rank; drivers and models share a rank, so neither imports the other.
RANK: dict[str, int] = {
    "common": 0,
    "records": 1,
    "calibration": 2,
    "sim": 3,
    "drivers": 4,
    "models": 4,
    "daemon": 5,
}


def module_name(path: Path) -> str:
    """``sim/psf.py`` -> ``focaltrack.sim.psf``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["focaltrack", *parts])


def imported_names(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``tree``, wherever it stands.

    Relative imports are resolved against ``module``; ``importlib.import_module("...")``
    with a literal name counts too.
    """
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield node.lineno, name
            # `from focaltrack import sim` imports the sub-package `focaltrack.sim`
            if name == "focaltrack":
                for alias in node.names:
                    yield node.lineno, f"focaltrack.{alias.name}"
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            yield node.lineno, node.args[0].value


def layer_of(name: str) -> str | None:
    parts = name.split(".")
    if len(parts) >= 2 and parts[0] == "focaltrack":
        return parts[1]
    return None


def package_files() -> dict[str, Path]:
    return {module_name(p): p for layer in RANK for p in sorted((ROOT / layer).rglob("*.py"))}


def layer_violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Imports in ``source`` (the text of ``module``) that break the layering."""
    own = layer_of(module)
    assert own in RANK, module
    out = []
    for line, name in sorted(imported_names(ast.parse(source), module, is_package)):
        if name.split(".")[0] in RANK:
            out.append(f"{module}:{line}: bare import of {name!r} (use focaltrack.{name})")
            continue
        target = layer_of(name)
        if target is None or target == own:
            continue
        if target not in RANK:
            out.append(f"{module}:{line}: imports {name}, which is in no layer")
        elif RANK[target] >= RANK[own]:
            out.append(f"{module}:{line}: {own} may not import {target} ({name})")
    return out


def test_every_package_has_a_layer() -> None:
    """A new sub-package must be given its place in `RANK` (and in docs/architecture.md)."""
    with (ROOT / "pyproject.toml").open("rb") as fh:
        packages = tomllib.load(fh)["tool"]["setuptools"]["packages"]
    assert sorted(p.removeprefix("focaltrack.") for p in packages) == sorted(RANK)


def test_no_layer_imports_a_higher_or_sibling_layer() -> None:
    files = package_files()
    assert len(files) > 50  # the walk found the package
    bad = []
    for module, path in files.items():
        bad += layer_violations(path.read_text(encoding="utf-8"), module, path.stem == "__init__")
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_check_sees_lazy_relative_and_type_only_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from focaltrack.models.tracker import KalmanTracker\n"
        "def f():\n"
        "    from focaltrack.daemon import __version__\n"
        "    import importlib\n"
        "    importlib.import_module('focaltrack.drivers.factory')\n"
        "from ..models import nets\n"
        "from focaltrack import daemon\n"
        "import sim.psf\n"
        "from focaltrack.common.errors import FocaltrackError\n"
        "from focaltrack.sim.scene import Scene\n"
    )
    bad = layer_violations(source, "focaltrack.sim.example")
    assert [b.split(":")[1] for b in bad] == ["3", "5", "7", "8", "9", "10"], bad
    # the same imports from the top layer are all allowed, but the bare one
    bad = layer_violations(source, "focaltrack.daemon.example")
    assert [b.split(":")[1] for b in bad] == ["10"], bad


def test_no_import_cycle_at_module_level() -> None:
    """The modules' load-time imports form no cycle (lazy and type-only imports may point
    back up inside a layer; load-time ones may not)."""
    files = package_files()
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in _load_time_imports(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            graph[module].update(n for n in names if n in files and n != module)
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _load_time_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports that run when the module loads: not in a function, not under TYPE_CHECKING."""

    def walk(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
        for node in body:
            if isinstance(node, ast.Import | ast.ImportFrom):
                yield node
            elif isinstance(node, ast.If):
                if "TYPE_CHECKING" not in ast.unparse(node.test):
                    yield from walk(node.body)
                yield from walk(node.orelse)
            elif isinstance(node, ast.Try):
                for part in (node.body, node.orelse, node.finalbody):
                    yield from walk(part)
                for handler in node.handlers:
                    yield from walk(handler.body)
            elif isinstance(node, ast.ClassDef):
                yield from walk(node.body)

    yield from walk(tree.body)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path that returns to its start, or None."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    done: set[str] = set()
    path: list[str] = []
    on_path: set[str] = set()

    def visit(v: str) -> list[str] | None:
        path.append(v)
        on_path.add(v)
        for w in sorted(graph[v]):
            if w in on_path:
                return [*path[path.index(w) :], w]
            if w not in done:
                found = visit(w)
                if found:
                    return found
        on_path.discard(path.pop())
        done.add(v)
        return None

    for v in sorted(graph):
        if v not in done:
            found = visit(v)
            if found:
                return found
    return None

"""``focaltrack models import BUNDLE``: give the service a model trained elsewhere.

`focaltrack train --out DIR` (or another workspace, another machine) writes a model bundle,
a directory; the service loads models by name from its workspace's ``models/<name>/``. This
copies a bundle there, checked and atomically, under its folder's name or ``--name``::

    focaltrack models import out/model                        # the configured workspace
    focaltrack models import out/model --workspace /data/ws --name beads-60x
    focaltrack ctl load_model name=beads-60x                  # a running service has it at once

`import_model` does the copying for this verb and for ``focaltrack demo --model``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from focaltrack.daemon.workspace import Workspace


def import_model(src: str | os.PathLike[str], ws: Workspace, name: str, *, force: bool) -> Path:
    """Copy the model bundle ``src`` to ``ws``'s ``models/<name>/``; the new bundle's path.

    The bundle is checked first as the service will load it (`load_bundle`: complete, the
    weights readable, the calibration copy the one it was trained from), so a broken bundle
    is refused naming the user's path. The copy is made beside the target under a hidden
    name (the workspace lists no name starting with ``.``), flushed, and renamed into place:
    a running service never sees half a bundle. An existing ``name`` is refused
    (`WorkspaceError`) unless ``force``; then the old bundle is moved aside, the new one
    renamed in and the old one deleted (a running service keeps the copy it has loaded).
    """
    from focaltrack.daemon.workspace import WorkspaceError
    from focaltrack.models.bundle import load_bundle, read_meta

    src = Path(src)
    dst = ws.model_path(name)  # checks the name
    load_bundle(src)
    if dst.exists() or dst.is_symlink():
        if src.resolve() == dst.resolve():
            raise WorkspaceError(f"{src} is the workspace's model {name} already")
        if not force:
            raise WorkspaceError(
                f"the workspace {ws.root} has a model named {name} already: "
                "pass --force to replace it, or --name to import it under another name"
            )
    ws.models_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=ws.models_dir, prefix=f".{name}.tmp-"))
    old: Path | None = None
    try:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        read_meta(tmp)  # the copy is complete
        for p in tmp.iterdir():  # on disk before the rename makes it visible
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        if force and dst.exists():
            old = tmp.with_name(f".{name}.old-{tmp.name.rsplit('-', 1)[-1]}")
            os.replace(dst, old)
        os.replace(tmp, dst)  # fails, not clobbers, if another bundle took the name meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not dst.exists():
            os.replace(old, dst)  # the replaced bundle back where it was
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dst


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("models", help="look after the service's models (import a bundle)")
    verbs = p.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)
    imp = verbs.add_parser(
        "import",
        help="copy a model bundle (focaltrack train --out) into a service workspace",
        description="Copy a model bundle — the directory `focaltrack train --out` writes — "
        "into the workspace's models/ folder, where the service finds it by name "
        "(`focaltrack ctl load_model name=NAME`; a running service sees it at once). The "
        "bundle is checked first and copied atomically.",
    )
    imp.add_argument("bundle", type=Path, metavar="BUNDLE", help="model bundle directory")
    imp.add_argument(
        "--workspace",
        metavar="DIR",
        help="the service's workspace (default: the configured workspace)",
    )
    imp.add_argument(
        "--config", metavar="FILE", help="the service's TOML file, to find its workspace"
    )
    imp.add_argument(
        "--name", help="the model's name in the workspace (default: the bundle folder's name)"
    )
    imp.add_argument(
        "--force", action="store_true", help="replace a model of that name in the workspace"
    )
    imp.set_defaults(func=run_import)


def run_import(args: argparse.Namespace) -> int:
    """One line: where the model went and how to load it. Errors (a bad or incomplete
    bundle, a bad or taken name) are `FocaltrackError`s: one line, exit status 2."""
    from focaltrack.daemon.workspace import Workspace, WorkspaceError, check_name

    if args.workspace:
        root = Path(args.workspace).expanduser()
    else:
        from focaltrack.daemon.config import load_config, workspace_dir

        root = workspace_dir(load_config(args.config))
    name = args.name
    if name is None:
        name = args.bundle.resolve().name
        try:
            check_name(name)
        except WorkspaceError:
            raise WorkspaceError(
                f'the bundle\'s folder name "{name}" is not a model name: pass --name NAME '
                "(letters, digits, '.', '_', '-'; starting with a letter or digit)"
            ) from None
    ws = Workspace(root)
    path = import_model(args.bundle, ws, name, force=args.force)
    print(
        f"model {name} imported into {path}; load it with: focaltrack ctl load_model name={name}",
        file=sys.stdout,
    )
    return 0

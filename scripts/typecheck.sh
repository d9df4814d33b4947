#!/usr/bin/env bash
# mypy over the whole package, as CI runs it; exits non-zero on any error.
#
# The editable install maps the code folders (common/, records/, ...) to `focaltrack.*`
# through an import hook that mypy cannot follow, so a plain `mypy` sees every cross-module
# import as an untyped Any. Here the package is laid out as mypy expects, in a symlink tree
# (.typecheck/focaltrack/<pkg> -> the folder), and checked from there.
set -euo pipefail
cd "$(dirname "$0")/.."
PKGS=(common records calibration sim drivers models daemon)
tree=.typecheck/focaltrack
mkdir -p "$tree"
args=()
for p in "${PKGS[@]}"; do
    ln -sfn "../../$p" "$tree/$p"
    args+=(-p "focaltrack.$p")
done
# Its own cache: a cache shared with a plain `mypy` run would hold the same modules under
# other paths.
MYPYPATH=.typecheck exec .venv/bin/mypy --config-file pyproject.toml \
    --cache-dir .typecheck/.mypy_cache "${args[@]}" "$@"

#!/usr/bin/env bash
# Create .venv and install focaltrack (editable) with its test tools.
# On a machine without CUDA, torch is pinned to the CPU build (constraints/cpu.txt);
# with an NVIDIA GPU, pip keeps whatever CUDA build of torch it finds or picks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${FOCALTRACK_VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi

constraints=()
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then
    constraints=(-c constraints/cpu.txt)
fi

# Re-install only when the requirements changed, so repeated runs start fast.
stamp="$VENV/.focaltrack-installed"
want=$(cat pyproject.toml constraints/cpu.txt | sha256sum | cut -d' ' -f1)${constraints[*]:+-cpu}
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
    # pip's chatter goes to a log; on failure the log is shown.
    if ! "$VENV/bin/python" -m pip install "${constraints[@]}" -e ".[dev]" >"$VENV/pip.log" 2>&1; then
        tail -n 40 "$VENV/pip.log" >&2
        echo "setup: pip install failed; full log in $VENV/pip.log" >&2
        exit 1
    fi
    echo "$want" >"$stamp"
fi

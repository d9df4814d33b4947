#!/usr/bin/env bash
# Quick start, first command: set up and run the demo on the simulated microscope.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/focaltrack demo --out "${1:-out/demo}"

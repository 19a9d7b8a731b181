#!/usr/bin/env bash
# Create .venv, install mrs with its test extra, and fetch the demo checkpoints.
# Idempotent: re-running only installs what changed and re-verifies the models.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch==2.13.0 (the test extra's reference) resolves to the CPU build on this machine's disk.
.venv/bin/python -m pip install --quiet -e ".[test]"
.venv/bin/python tools/fetch_models.py

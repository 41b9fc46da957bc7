#!/usr/bin/env bash
# Set up (if needed) and run the main example end to end.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ -f examples/hf/train.py ]; then
  .venv/bin/python examples/hf/train.py "$@"
else
  .venv/bin/python examples/plain_pytorch.py "$@"
fi

#!/usr/bin/env bash
# Set up (if needed) and run the main example end to end: a tiny GPT-2 with transformers.Trainer,
# interrupted and resumed bit for bit, then the best-model strategy and a sharded export.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python examples/hf/train.py "$@"

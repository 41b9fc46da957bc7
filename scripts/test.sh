#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite, then the linters.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
.venv/bin/mkdocs build --strict --quiet --site-dir "$(mktemp -d)"  # the docs site, warnings as errors
.venv/bin/ruff check .
.venv/bin/mypy ckpt_callbacks
.venv/bin/mypy --strict ckpt_callbacks/core  # the core is held to the strict rules

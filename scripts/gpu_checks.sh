#!/usr/bin/env bash
# The checks that need a GPU, in one go (under 10 minutes: each part has its own timeout): the HF Trainer with
# FSDP2/FSDP1 (sharded and full state dict) and DeepSpeed ZeRO-1/2/3 through the callback
# (tests/hf/test_sharded_gpu.py, which skips every case without CUDA), then the GPU benchmark guard
# (benchmarks/gpu.py: pinned staging, stall per save, bitwise resume with CUDA RNG) when this branch has it.
#
#   PYTHON=/path/to/python bash scripts/gpu_checks.sh      # default: .venv/bin/python, else python3
#
# PYTHON must have a CUDA build of torch, transformers, accelerate, pytest, safetensors and xxhash (this repository
# is put on PYTHONPATH); deepspeed is optional (the ZeRO cases skip without it), the reshard 2 -> 1 needs 2 GPUs.
# Refuses to run without a CUDA device: everything would skip and prove nothing. With $OUT set (the device runner's
# output folder), the test report (junit XML) and the benchmark results are copied there.
# Exit status: 0 when every check that ran passed.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" - <<'PY' || exit 2
import sys
import torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_checks.sh: no CUDA device visible to torch {torch.__version__}: nothing to check here.")
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.device_count()} x {torch.cuda.get_device_name()}")
try:
    import deepspeed
    print(f"deepspeed {deepspeed.__version__}")
except ImportError:
    print("deepspeed is not installed: the ZeRO cases will skip")
PY
git log -1 --oneline 2>/dev/null || true
report="${OUT:-/tmp}/gpu_checks_tests.xml"
status=0

echo "== HF FSDP / DeepSpeed through the callback (tests/hf/test_sharded_gpu.py)"
PYTHONPATH="$PWD" CUBLAS_WORKSPACE_CONFIG=:4096:8 timeout 400 "$PYTHON" -m pytest -q -p no:cacheprovider -rs \
  --junitxml="$report" -k "not ddp" tests/hf/test_sharded_gpu.py || status=1

echo "== GPU benchmark guard (benchmarks/gpu.py)"
if [ -f benchmarks/gpu.py ]; then
  PYTHONPATH="$PWD" timeout 150 "$PYTHON" benchmarks/run.py --only gpu --sizes 124M --repeats 2 || status=1
  if [ -n "${OUT:-}" ] && [ -f benchmarks/results/latest.json ]; then cp benchmarks/results/latest.json "$OUT/gpu_benchmark.json"; fi
else
  echo "benchmarks/gpu.py is not on this branch: the GPU benchmark guard is skipped"
fi
exit $status

#!/bin/sh
# The device check of the GPU path (docs/kernels.md, "GPU path: Triton kernels"), one short run
# for the GPU machine that is lent now and then (torch + CUDA + triton, no network):
#   1. correctness of the Triton kernels on CUDA against the PyTorch reference,
#   2. one attention layer, one decode step: Triton block selection vs SDPA (dense) at 8k, 32k,
#      128k tokens, batch 1 and 16,
#   3. TorchRunner decode tokens/s, dense vs block selection, `small` and SmolLM2 shapes, 8k context.
# Prints JSON, then tables; writes both to $OUT (default build/gpu_check). Under 5 minutes.
# Without CUDA it runs the same code on CPU through Triton's interpreter at tiny sizes (--quick):
# that only shows the script works. Extra arguments go to `python -m ragtop.bench.gpu`.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
OUT=${OUT:-build/gpu_check}
mkdir -p "$OUT"
MODE=""
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA device: Triton's interpreter on CPU, tiny sizes (not a speed measurement)" >&2
  export TRITON_INTERPRET=1
  MODE=--quick
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$OUT/nvidia-smi.txt" || true
rc=0
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" timeout "${GPU_CHECK_TIMEOUT:-290}" "$PY" -m ragtop.bench.gpu $MODE \
  --json "$OUT/gpu_check.json" "$@" >"$OUT/gpu_check.txt" || rc=$?
cat "$OUT/gpu_check.txt"
exit $rc

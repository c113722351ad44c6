#!/usr/bin/env bash
# Kernel checks for a machine with a CUDA GPU, run from anywhere in the repo:
#
#     OUT=/some/dir bash bench/gpu_kernels.sh
#
# 1. the GPU-marked kernel tests: the dispatcher in fp32 (TF32 off and on), fp16 and bf16
#    against the reference;
# 2. every other kernel test with the Triton kernels compiled for the GPU (TRITON_INTERPRET unset;
#    the CPU-path tests run too);
# 3. bench/kernels.py on CUDA.
# Writes junit XML, logs and kernels_cuda.json under $OUT (default bench/results). Exit status is
# non-zero when any step fails; every step runs regardless.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
unset TRITON_INTERPRET
export PYTHONUNBUFFERED=1

# peftserve may not be installed on that machine: lay out the package as pyproject maps it.
if ! "$PY" -c "import peftserve.kernels" 2>/dev/null; then
  shim="$(mktemp -d)"
  mkdir "$shim/peftserve"
  for entry in server/*; do ln -s "$PWD/$entry" "$shim/peftserve/"; done
  ln -sfn "$PWD/kernels" "$shim/peftserve/kernels"
  ln -sfn "$PWD/clients" "$shim/peftserve/client"
  export PYTHONPATH="$shim${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PY" - <<'PY' 2>&1 | tee "$OUT/kernels_env.log" || exit 1
import torch, triton
assert torch.cuda.is_available(), "no CUDA device"
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
PY

status=0
"$PY" -m pytest tests/kernels -m gpu -q -rs -p no:cacheprovider \
  --junitxml="$OUT/kernels_gpu_tests.xml" 2>&1 | tee "$OUT/kernels_gpu_tests.log" || status=1
"$PY" -m pytest tests/kernels -m "not gpu" -q -rs -p no:cacheprovider \
  --junitxml="$OUT/kernels_compiled_tests.xml" 2>&1 | tee "$OUT/kernels_compiled_tests.log" || status=1
"$PY" bench/kernels.py --out "$OUT/kernels_cuda.json" 2>&1 | tee "$OUT/kernels_bench.log" || status=1
exit "$status"

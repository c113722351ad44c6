#!/usr/bin/env bash
# Which of the C++ ops' refused calls crash on this host, and why:
#
#     OUT=DIR bash bench/native_cases.sh
#
# On the H200 machine's Intel host the self-test's refused call (a message with a dtype) raised,
# but tests/kernels/test_lowrank_rows.py's refused calls died of SIGSEGV at the first message
# that prints a tensor's sizes (bench/results/gpu_2026-12-04b). This shows the compiler and its
# link line, builds the kernels into a kernel cache of its own, runs the C++ ops' test files
# with xdist workers that may crash (each crash names its test and a new worker goes on), shows
# the build's linked runtime and any C++ runtime it carries itself, and, when a worker crashed,
# one crashing call's native backtrace under cuda-gdb (the image has no gdb). Every part has a
# time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/native_cases}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
source bench/package_path.sh  # peftserve on PYTHONPATH where it is not installed
export OMP_NUM_THREADS=4 PYTHONUNBUFFERED=1
CASE="tests/kernels/test_lowrank_rows.py::test_lora_rows_refuse_bad_arguments[<lambda>-A must be0]"
FILES=(tests/kernels/test_lowrank_rows.py tests/kernels/test_native_arguments.py
  tests/kernels/test_cpp_runtime.py tests/unit/test_cpu_fused_ops.py
  tests/unit/test_cpu_paged_attention.py tests/kernels/test_screened_head.py)

{
  echo "c++: $(command -v c++) -> $(readlink -f "$(command -v c++)")"
  echo "g++: $(command -v g++) -> $(readlink -f "$(command -v g++)")"
  for c in c++ g++; do
    f="$(readlink -f "$(command -v $c)")"
    file "$f" 2>/dev/null
    if head -c 2 "$f" | grep -q '#!'; then echo "--- $f:"; head -c 1500 "$f"; echo; fi
  done
  echo 'int main(){}' > /tmp/nc_main.cpp
  echo "--- c++ link line:"
  c++ -v -shared -fPIC -o /tmp/nc_x.so /tmp/nc_main.cpp 2>&1 | grep -E "collect2|ld " | tail -2
} > "$OUT/compiler.txt" 2>&1
cat "$OUT/compiler.txt"

cache=/tmp/nc_cache
rm -rf "$cache"
export PEFTSERVE_KERNEL_CACHE="$cache"
timeout -k 5 150 "$PY" -X faulthandler -c \
  "from peftserve.kernels import cpu_ext; print(cpu_ext.load(), cpu_ext.unavailable_reason())" \
  > "$OUT/selftest.log" 2>&1
echo "selftest: exit $?" >> "$OUT/selftest.log"
timeout -k 5 120 "$PY" -m pytest -q -rfE -p no:cacheprovider -p no:benchmark \
  ${XDIST--n 6 --max-worker-restart 200} --timeout 60 "${FILES[@]}" > "$OUT/tests.log" 2>&1
echo "tests: exit $?" >> "$OUT/tests.log"
for so in "$cache"/kernels/*/peftserve_cpu.so; do
  echo "$so"
  readelf -d "$so" | grep -E "NEEDED|RPATH|RUNPATH"
  echo "C++ runtime functions it defines itself (a private runtime):"
  nm -D --defined-only "$so" | grep -E " T (__cxa_|__gxx_|_Unwind|_ZNSo|_ZNSt6locale|_ZSt)" \
    | head -20
done > "$OUT/lib.txt" 2>&1
tail -3 "$OUT/selftest.log"
grep -E "node down|passed|failed|error" "$OUT/tests.log" | tail -30
cat "$OUT/lib.txt"

# A crashing call's native backtrace, when a worker crashed
gdb="$(command -v cuda-gdb || true)"
if [ -n "$gdb" ] && grep -q "node down" "$OUT/tests.log"; then
  timeout -k 5 120 "$gdb" -q -batch -ex run -ex "bt 30" -ex "x/4i \$pc" -ex "info registers rip" \
    --args "$PY" -m pytest -q -p no:xdist -p no:cacheprovider "$CASE" 2>&1 \
    | grep -vE "New Thread|Thread .* exited|libthread_db|^\[Detaching" > "$OUT/gdb.txt"
  grep -nE "^#|SIGSEGV|=>" "$OUT/gdb.txt" | head -40
fi

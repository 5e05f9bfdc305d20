# The two entry points of the README's quick start. Each sets up .venv first (idempotent).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BOARD ?= ulx3s

.PHONY: setup bitstream test lint clean

# Where pip's default index gives the CUDA build of torch (PyPI on Linux x86-64), name
# PyTorch's CPU index: make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# torch first: anything that asks for torch later finds it satisfied.
	$(BIN)/pip install torch==2.13.0 $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))

setup: $(BIN)/python
	$(BIN)/pip install -e ".[test]"

# The board's default build (hw/board.py): on the ULX3S-85F the full accelerator, on the
# iCEBreaker the GEMM-only device. BUILD_OPTIONS adds hw.build options.
BUILD_OPTIONS ?=

bitstream: setup
	$(BIN)/python -m hw.build --board $(BOARD) $(BUILD_OPTIONS)

# One pytest worker per core (pytest-xdist); each test file runs whole on one worker, so that
# a file's simulated board (a module fixture) is built and started once. The files are handed
# out in tests/conftest.py's order, the slowest first. The slowest tests are listed at the end
# (CI's time budget is 20 minutes).
test: setup
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -n auto --dist loadfile --no-loadscope-reorder --durations=25

lint: setup
	$(BIN)/python -m ruff check .

clean:
	rm -rf sim_build build bitstreams/*/work

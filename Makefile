# The two entry points of the README's quick start. Each sets up .venv first (idempotent).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
BOARD ?= ulx3s

.PHONY: setup bitstream test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# The CPU wheel first: anything that asks for torch later finds it satisfied.
	$(BIN)/pip install torch==2.13.0

setup: $(BIN)/python
	$(BIN)/pip install -e ".[test]"

# The full accelerator does not route on the ULX3S yet (docs/builds.md): the quick start
# builds the GEMM-only device; `python -m hw.build --board ulx3s` tries the full one. On the
# ECP5 nextpnr's electrostatic placer: with the default HeAP placer router2 did not converge
# on the GEMM-only device of commit 83b96c8 (docs/builds.md).
BUILD_OPTIONS_ulx3s := --no-layer-program "--nextpnr-opts=--placer static"
BUILD_OPTIONS_icebreaker := --no-layer-program
BUILD_OPTIONS ?= $(BUILD_OPTIONS_$(BOARD))

bitstream: setup
	$(BIN)/python -m hw.build --board $(BOARD) $(BUILD_OPTIONS)

test: setup
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest

lint: setup
	$(BIN)/python -m ruff check .

clean:
	rm -rf sim_build build bitstreams/*/work

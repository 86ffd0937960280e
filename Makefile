# The one place that knows how to install, test and benchmark loraserve.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test bench-engine demo

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# torch is pinned first and alone: 2.13.0 is the CPU build on the development machines' disk; letting a
# resolver pick torch would pull several GB of CUDA wheels on a CPU-only install.
install: $(BIN)/python
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[test]'
	@test -x /usr/bin/chromium || echo "note: the console's browser tests (tests/test_console.py) need Debian's chromium: apt-get install chromium (.ci/run does); without it they skip"

test:
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench-engine:
	HF_HUB_OFFLINE=1 $(BIN)/python -m bench.engine_bench

# Retrain the demo that ships (demo/base and adapters/{reverse,upper,rot13}): about an hour on 2 CPU cores.
demo:
	HF_HUB_OFFLINE=1 $(BIN)/loraserve build-demo

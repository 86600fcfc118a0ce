# The two entry points of the README. Each sets up .venv when needed, then acts.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast serve setup clean

setup: $(STAMP)

# torch first and pinned: this machine serves exactly these builds from local disk
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

serve: $(STAMP)
	$(BIN)/fusionserve serve

clean:
	rm -rf $(VENV) build *.egg-info

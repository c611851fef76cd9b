# make test | make bench | make build | make wheel | make clean
#
#   VENV=path       virtual environment to create and use (default .venv)
#   PYTHON=path     use this interpreter as is: no venv, no dependency install
#                   (e.g. an offline GPU machine: make test PYTHON=python3)
#   PYTEST_ARGS=... extra pytest arguments, e.g. PYTEST_ARGS="-k viterbi -x"
#   CUDA_HOME, TORCH_CUDA_ARCH_LIST, MAX_JOBS and FLASHSEMICRF_* reach setup.py.
#
# make wheel: a binary wheel in $(WHEEL_DIR), versioned 0.1.0+torch<x.y>cu<cuda>
#   WHEEL_ARCHS=all     GPU architectures: every one from 8.0 up that the
#                       installed torch was built for, plus PTX for the newest;
#                       or a list, e.g. WHEEL_ARCHS=9.0 for a quick local build
#   WHEEL_CPU_ARCH=...  -march of the C++ kernel (default x86-64-v3 on x86-64:
#                       any CPU with AVX2; "none" for the baseline; never
#                       "native" for a wheel that leaves this machine)
#   WHEEL_DIR=dist

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := test

VENV ?= .venv
PYTEST_ARGS ?=
# ninja for the build, then the dependencies and the [test] and [bench] extras
# as pyproject.toml lists them (read here, so they are listed in one place;
# evaluated when the dependency step runs, with the venv's Python).
DEPS = ninja $(shell $(PYTHON) -c 'import re, shlex; t = open("pyproject.toml").read(); table = lambda name: t.split("[" + name + "]", 1)[1].split("\n[", 1)[0]; array = lambda key, name: re.findall(r"\"([^\"]+)\"", re.search(r"(?ms)^" + key + r"\s*=\s*\[(.*?)\]", table(name)).group(1)); extras = "project.optional-dependencies"; print(" ".join(map(shlex.quote, array("dependencies", "project") + array("test", extras) + array("bench", extras))))')

ifeq ($(origin PYTHON),undefined)
PYTHON := $(VENV)/bin/python
DEPS_STAMP := $(VENV)/.flashsemicrf-deps
BUILD_STAMP := $(VENV)/.flashsemicrf-build
else
# A given interpreter is used as it is; the build step then always runs
# (ninja keeps it incremental).
DEPS_STAMP :=
BUILD_STAMP := build-always
endif

ifeq ($(origin CUDA_HOME),undefined)
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME := /usr/local/cuda
endif
endif

# No GPU to query: give torch one architecture instead of every one it knows.
ifeq ($(origin TORCH_CUDA_ARCH_LIST),undefined)
ifeq ($(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu),)
export TORCH_CUDA_ARCH_LIST := 9.0
endif
endif

PIP_FLAGS := $(if $(filter true,$(CI)),--progress-bar off,)
CSRC := $(wildcard csrc/*.h csrc/*.cpp csrc/*/*.h csrc/*/*.cuh csrc/*/*.cpp csrc/*/*.cu)

WHEEL_ARCHS ?= all
WHEEL_CPU_ARCH ?= $(if $(filter x86_64,$(shell uname -m)),x86-64-v3,none)
WHEEL_DIR ?= dist

.PHONY: test bench build wheel clean build-always

test: $(BUILD_STAMP)
	@rc=0; $(PYTHON) -m pytest -q $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests (exit 5)" >&2; fi; \
	exit $$rc

bench: $(BUILD_STAMP)
	$(PYTHON) -m bench

build: $(BUILD_STAMP)

$(VENV)/bin/python:
	python3 -m venv $(VENV)

$(VENV)/.flashsemicrf-deps: | $(VENV)/bin/python
	$(PYTHON) -m pip install $(PIP_FLAGS) "setuptools>=64" wheel $(DEPS)
	touch $@

# The full compiler output goes to build/build.log; shown here: what setup.py
# chose, one line per compiled file, compiler warnings, the log's tail on failure.
define build_ext
	@mkdir -p build
	@echo "building flashsemicrf._C (CUDA_HOME=$${CUDA_HOME:-unset}, TORCH_CUDA_ARCH_LIST=$${TORCH_CUDA_ARCH_LIST:-unset}, log: build/build.log)"
	@if $(PYTHON) -m pip install $(PIP_FLAGS) --no-build-isolation --no-deps -v -e . \
		> build/build.log 2>&1; then \
	  sed -n -E 's/^ +//; s/^(\[[0-9]+\/[0-9]+\]) ([^ ]+) .* -c ([^ ]+) .*/\1 \2 \3/p; /^flashsemicrf setup|warning:/p' \
	    build/build.log | cut -c1-240 | awk '!seen[$$0]++'; \
	else \
	  tail -n 80 build/build.log; echo "make: building flashsemicrf._C failed" >&2; exit 1; \
	fi
endef

$(VENV)/.flashsemicrf-build: $(DEPS_STAMP) setup.py pyproject.toml $(CSRC)
	$(build_ext)
	touch $@

build-always: $(DEPS_STAMP)
	$(build_ext)

# No build isolation: the wheel must be built against the torch it will run
# with. The CUDA kernels are required when nvcc is there (a wheel silently
# without them would be worse than a failed build).
wheel: $(DEPS_STAMP)
	@mkdir -p build $(WHEEL_DIR)
	@echo "building a wheel into $(WHEEL_DIR) (WHEEL_ARCHS=$(WHEEL_ARCHS), WHEEL_CPU_ARCH=$(WHEEL_CPU_ARCH), log: build/wheel.log)"
	@if FLASHSEMICRF_CUDA_ARCH_LIST="$(WHEEL_ARCHS)" FLASHSEMICRF_CPU_ARCH="$(WHEEL_CPU_ARCH)" \
	    FLASHSEMICRF_FORCE_CUDA=$(if $(CUDA_HOME),1,) \
	    $(PYTHON) -m pip wheel $(PIP_FLAGS) --no-build-isolation --no-deps -v -w $(WHEEL_DIR) . \
	    > build/wheel.log 2>&1; then \
	  sed -n -E 's/^ +//; /^flashsemicrf setup|^Created wheel|warning:/p' build/wheel.log \
	    | grep -v byte-compiling | cut -c1-240 | awk '!seen[$$0]++'; \
	else \
	  tail -n 80 build/wheel.log; echo "make: building the wheel failed" >&2; exit 1; \
	fi

clean:
	rm -rf build *.egg-info flashsemicrf/*.egg-info .pytest_cache
	rm -f flashsemicrf/_C*.so flashsemicrf/_C*.pyd flashsemicrf/_build_info.py $(VENV)/.flashsemicrf-build
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

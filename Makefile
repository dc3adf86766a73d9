# fastkd developer entry points. `make test` and `make demo` work on a fresh machine that has
# only Python: they create .venv, install torch 2.13.0, the tools and the package (with its
# native extension), then run. Every tool is installed at the version in constraints.txt (what
# CI last passed with), so a new upstream release cannot break these commands; `make
# test-latest` tries the newest releases in .venv-latest and prints what changed.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip
TOOLS  := numpy triton pytest hypothesis pytest-benchmark scikit-learn tqdm ruff ninja transformers \
          accelerate peft safetensors tokenizers
PINS   := constraints.txt
NATIVE := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: test test-latest pins demo bench cpu-roofline lint cuda-check gpu-check gpu-wheels clean

# pip moves an installed package to its pinned version, so an old .venv follows the file too.
$(VENV)/.tools: $(PINS)
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -c $(PINS) torch $(TOOLS)
	touch $@

$(VENV)/.built: $(VENV)/.tools $(NATIVE)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

test: $(VENV)/.built
	TRITON_INTERPRET=1 $(VPY) -m pytest -q tests

# The suite against the newest release of every tool (torch stays 2.13.0: a newer one is a
# multi-GB CUDA wheel here). Not part of CI. Prints the packages that differ from the pins;
# once it passes, `make pins` writes them into constraints.txt.
LATEST := .venv-latest
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	grep '^torch==' $(PINS) > $(LATEST)/torch-only.txt
	$(LATEST)/bin/python -m pip install --upgrade --upgrade-strategy eager -c $(LATEST)/torch-only.txt torch $(TOOLS)
	$(LATEST)/bin/python -m pip install --no-build-isolation --no-deps -e .
	$(LATEST)/bin/python scripts/pins.py diff --constraints $(PINS)
	TRITON_INTERPRET=1 $(LATEST)/bin/python -m pytest -q tests; status=$$?; \
	  $(LATEST)/bin/python scripts/pins.py diff --constraints $(PINS); exit $$status

pins:
	test -x $(LATEST)/bin/python || { echo "run make test-latest first"; exit 1; }
	$(LATEST)/bin/python scripts/pins.py write --constraints $(PINS)

demo: $(VENV)/.built
	$(VPY) -m fastkd demo

# Bench-only tooling (plots) stays out of `make test`. BENCH_ARGS e.g. "--preset cpu-goals --plot".
# The repository's results live in bench/results/ (a user's `fastkd bench` writes ./fastkd-bench/).
BENCH_ARGS ?= --plot
bench: $(VENV)/.built
	$(VPY) -c "import matplotlib" 2>/dev/null || $(PIP) install matplotlib
	$(VPY) -m fastkd bench --out bench/results $(BENCH_ARGS)

# The dense cpu kernel in a training loop (fresh gradient / inplace_backward) against the copy
# roofline measured in the same run, N = 256..8192, V = 32000 (issue 15, item 2).
cpu-roofline: $(VENV)/.built
	$(VPY) -c "import matplotlib" 2>/dev/null || $(PIP) install matplotlib
	$(VPY) -m fastkd.bench.cpu_roofline --out bench/results/cpu-roofline $(ROOFLINE_ARGS)

lint: $(VENV)/.tools
	$(VENV)/bin/ruff check fastkd kernels tests bench scripts

# Compiles every .cu file standalone for Hopper (no GPU needed) and prints ptxas usage.
cuda-check:
	bash csrc/cuda/check_compile.sh

# One-shot GPU validation (scripts/gpu_check.py): builds the CUDA extension offline with the
# machine's own torch, runs the GPU tests and `fastkd bench --preset gpu-goals` with the peers,
# and writes CSV, plots and gpu-check.md into $$OUT (else bench/results/). It uses python3 (the
# GPU image's torch), or GPU_PYTHON. `make gpu-check DRY_RUN=1` needs no GPU: it prints the
# plan and checks every import, file and option of the real run (CI runs it).
# `make gpu-wheels` (where a package index is reachable) downloads the pinned Liger-Kernel and
# Cut Cross-Entropy wheels into .gpu-wheels/ (git-ignored; carry it to the GPU machine).
DRY_RUN ?= 0
GPU_PYTHON ?= $(if $(filter 1,$(DRY_RUN)),$(VPY),python3)
gpu-check: $(if $(filter 1,$(DRY_RUN)),$(VENV)/.built,)
	DRY_RUN=$(DRY_RUN) GPU_PYTHON=$(GPU_PYTHON) bash scripts/gpu_check.sh

gpu-wheels:
	WHEELS=1 GPU_PYTHON=$(if $(wildcard $(VPY)),$(VPY),$(PYTHON)) bash scripts/gpu_check.sh

clean:
	rm -rf build *.egg-info fastkd/*.so $(VENV) $(LATEST)

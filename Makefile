# fastkd developer entry points. `make test` and `make demo` work on a fresh machine that has
# only Python: they create .venv, install torch (2.13.0 when none is present), the tools and
# the package (with its native extension), then run.
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip
TOOLS  := numpy triton pytest hypothesis pytest-benchmark scikit-learn tqdm ruff ninja transformers \
          accelerate peft safetensors tokenizers
NATIVE := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h)

.PHONY: test demo bench cpu-roofline lint cuda-check gpu-check gpu-wheels clean

$(VENV)/.tools:
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	$(PIP) install $(TOOLS)
	touch $@

$(VENV)/.built: $(VENV)/.tools $(NATIVE)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

test: $(VENV)/.built
	TRITON_INTERPRET=1 $(VPY) -m pytest -q tests

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
	$(VPY) -m bench.cpu_roofline --out bench/results/cpu-roofline $(ROOFLINE_ARGS)

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
	rm -rf build *.egg-info fastkd/*.so $(VENV)

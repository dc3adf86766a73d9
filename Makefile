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

.PHONY: test demo bench lint cuda-check clean

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

lint: $(VENV)/.tools
	$(VENV)/bin/ruff check fastkd kernels tests bench

# Compiles every .cu file standalone for Hopper (no GPU needed) and prints ptxas usage.
cuda-check:
	bash csrc/cuda/check_compile.sh

clean:
	rm -rf build *.egg-info fastkd/*.so $(VENV)

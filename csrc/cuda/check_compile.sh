#!/usr/bin/env bash
# Standalone compile check of the CUDA kernels; needs nvcc, no GPU, no torch.
#
#  1. every csrc/cuda/*.cu for sm_90a (Hopper, cluster path) and sm_80 (generic fallback),
#     with setup.py's nvcc flags, printing ptxas resource usage per kernel; fails on any
#     compiler error or on spills / stack frames in a dense_kd kernel;
#  2. the pure host planner (csrc/cuda/plan_check.cpp) is built and run;
#  3. when a torch with headers is importable: a syntax-only compile of dense_kd_api.cpp
#     (the CPU wheel ships c10/cuda headers but not the generated cuda_cmake_macros.h, so
#     C10_CUDA_NO_CMAKE_CONFIGURE_FILE is defined for this check only).
# Usage: bash csrc/cuda/check_compile.sh   (from anywhere; `make cuda-check`)
set -euo pipefail
cd "$(dirname "$0")/../.."

NVCC=${NVCC:-nvcc}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "cuda-check: nvcc not found (set NVCC=/path/to/nvcc)" >&2
  exit 1
fi
OUT=$(mktemp -d /tmp/fastkd-cuda-check.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
# setup.py's nvcc flags plus the ones torch's CUDAExtension always adds (COMMON_NVCC_FLAGS).
FLAGS=(-O3 -std=c++17 --use_fast_math -lineinfo -Xptxas -v -I csrc
       -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
       -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
       --expt-relaxed-constexpr -Xcompiler -fPIC)
ARCHS=("compute_90a,code=sm_90a" "compute_80,code=sm_80")
start=$(date +%s)
"$NVCC" --version | tail -n 2

# 1. Kernels: all (file, arch) pairs, two at a time.
jobs=()
for src in csrc/cuda/*.cu; do
  for arch in "${ARCHS[@]}"; do
    jobs+=("$src|$arch")
  done
done
compile_one() {
  local src=${1%%|*} arch=${1##*|}
  local tag
  tag="$(basename "$src" .cu)_${arch##*=}"
  if "$NVCC" "${FLAGS[@]}" "-gencode=arch=$arch" -c "$src" -o "$OUT/$tag.o" \
      >"$OUT/$tag.log" 2>&1; then
    echo ok >"$OUT/$tag.status"
  else
    echo fail >"$OUT/$tag.status"
  fi
}
export -f compile_one
export NVCC OUT
export FLAGS_STR="${FLAGS[*]}"
printf '%s\n' "${jobs[@]}" | xargs -P "${CUDA_CHECK_JOBS:-2}" -I{} \
  bash -c 'FLAGS=($FLAGS_STR); compile_one "$@"' _ {}

failed=0
for status in "$OUT"/*.status; do
  tag=$(basename "$status" .status)
  if [ "$(cat "$status")" != ok ]; then
    echo "FAILED: $tag" >&2
    cat "$OUT/$tag.log" >&2
    failed=1
  elif grep -qi "warning" "$OUT/$tag.log"; then
    echo "warnings in $tag:"
    grep -i -A3 "warning" "$OUT/$tag.log" | head -40
  fi
done
[ "$failed" = 0 ] || exit 1

# ptxas report: one line per (arch, kernel): registers, spill stores / loads, stack frame.
python3 - "$OUT" <<'PY'
import glob, os, re, subprocess, sys
rows, bad = [], []
for log in sorted(glob.glob(os.path.join(sys.argv[1], "*.log"))):
    entry, stack = None, None
    for line in open(log):
        m = re.search(r"Compiling entry function '(\w+)' for '(\w+)'", line)
        if m:
            entry, arch = m.group(1), m.group(2)
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and entry:
            stack, stores, loads = map(int, m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and entry:
            rows.append((arch, entry, int(m.group(1)), stores, loads, stack))
            if "dense_kd" in entry and (stores or loads or stack):
                bad.append(entry)
            entry = None
def short(name):
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
    except OSError:
        return name
    out = out.replace("fastkd::cuda_detail::", "").replace("(fastkd::DenseKDParams", "(")
    return re.sub(r"\(.*\)$", "", out)
print(f"{'arch':7} {'regs':>4} {'spill st/ld':>11} {'stack':>5}  kernel")
for arch, entry, regs, st, ld, stack in rows:
    print(f"{arch:7} {regs:4d} {st:5d}/{ld:<5d} {stack:5d}  {short(entry)}")
print(f"{len(rows)} kernels")
if bad:
    print("FAILED: spills or stack frames in hot kernels:", *map(short, bad), sep="\n  ")
    sys.exit(1)
PY

# 2. Planner check (host only, runs without a GPU).
"$NVCC" -std=c++17 -O1 -I csrc -x cu csrc/cuda/dense_kd.cu csrc/cuda/plan_check.cpp \
  -o "$OUT/plan_check"
"$OUT/plan_check"

# 3. Syntax-only compile of the torch-aware file.
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
TORCH_INC=$("$PY" -c "import torch.utils.cpp_extension as c; print(c.include_paths()[0])" \
  2>/dev/null || true)
CUDA_INC=${CUDA_HOME:+$CUDA_HOME/include}
[ -n "$CUDA_INC" ] && [ -f "$CUDA_INC/cuda_runtime.h" ] || CUDA_INC=$(dirname "$(dirname "$(readlink -f "$(command -v "$NVCC")")")")/include
[ -f "$CUDA_INC/cuda_runtime.h" ] || CUDA_INC=/usr/local/cuda/include
if [ -n "$TORCH_INC" ] && [ -f "$TORCH_INC/c10/cuda/CUDAGuard.h" ]; then
  "${CXX:-g++}" -fsyntax-only -std=c++17 -Wno-c++20-extensions -DFASTKD_WITH_CUDA \
    -DC10_CUDA_NO_CMAKE_CONFIGURE_FILE -I "$TORCH_INC" \
    -I "$TORCH_INC/torch/csrc/api/include" -I "$CUDA_INC" -I csrc csrc/cuda/dense_kd_api.cpp
  echo "dense_kd_api.cpp: syntax check ok (torch headers at $TORCH_INC)"
else
  echo "dense_kd_api.cpp: syntax check skipped (no torch with c10/cuda headers)"
fi
echo "cuda-check passed in $(( $(date +%s) - start )) s"

"""Cost models (bytes, FLOPs) per benchmark row and the device's measured ceilings.

Byte floors, dense loss (student / teacher logits (N, V) of `b` bytes each, teacher not
differentiated):
    fwd      2*N*V*b   read student and teacher once
    bwd      2*N*V*b   read one saved (N, V) tensor (the fused gradient, or the logits to
                       recompute from), write the gradient once
    fwd+bwd  3*N*V*b   read student and teacher once, write the gradient once
Sparse (top-k teacher) loss: the teacher is k log-probs of `b` bytes plus k int64 indices per
token, so the teacher's 1*N*V*b above becomes N*k*(b + 8).
FLOP floors, fused-linear loss (student hidden (N, Hs), teacher hidden (N, Ht), heads (V, H)):
    fwd      2*N*V*(Hs + Ht)    student and teacher logits
    bwd      2*N*V*(2*Hs)       grad-hidden and grad-weight of the student
    fwd+bwd  2*N*V*(3*Hs + Ht)
The softmax / divergence arithmetic is O(N*V) and negligible beside the matmuls.

Ceilings are measured by the harness on the machine itself (never datasheet numbers): copy
bandwidth as (bytes read + bytes written) / time of a large tensor copy, and the matmul rate of
a large square product in the row's dtype. A ceiling is the best the device reached, so each
is the fastest of its repetitions (other load only ever slows a run down). They are cached
per device in `<results>/<device-slug>-ceilings.json` (`--remeasure-ceilings` refreshes them).
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Dict, Optional

import torch

MODES = ("fwd", "bwd", "fwd+bwd")
INDEX_BYTES = 8


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def dense_bytes(mode: str, n: int, v: int, itemsize: int) -> int:
    """Byte floor of the dense distillation loss for one call of `mode`."""
    _check_mode(mode)
    passes = {"fwd": 2, "bwd": 2, "fwd+bwd": 3}[mode]
    return passes * n * v * itemsize


def sparse_bytes(mode: str, n: int, v: int, k: int, itemsize: int) -> int:
    """Byte floor of the top-k-teacher loss: the student as in the dense loss, the teacher k
    (log-prob, int64 index) pairs per token."""
    _check_mode(mode)
    teacher = n * k * (itemsize + INDEX_BYTES)
    student = n * v * itemsize
    if mode == "fwd":
        return student + teacher
    if mode == "bwd":
        return 2 * student
    return 2 * student + teacher


def fused_linear_flops(mode: str, n: int, v: int, hs: int, ht: int) -> int:
    """FLOP floor of the fused-linear distillation loss for one call of `mode`."""
    _check_mode(mode)
    widths = {"fwd": hs + ht, "bwd": 2 * hs, "fwd+bwd": 3 * hs + ht}[mode]
    return 2 * n * v * widths


def roofline_pct(floor_seconds: float, measured_seconds: float) -> float:
    """Percent of the roofline reached: the floor's time over the measured time."""
    if measured_seconds <= 0:
        raise ValueError(f"measured_seconds must be > 0, got {measured_seconds}")
    return 100.0 * floor_seconds / measured_seconds


# --- measured ceilings -------------------------------------------------------------------

def _best_ms(fn: Callable[[], None], device: torch.device, reps: int) -> float:
    fn()  # warm-up: allocation, library handles, kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return min(s.elapsed_time(e) for s, e in events)
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return min(samples)


def measure_copy_gbps(device: torch.device) -> float:
    """Copy bandwidth in GB/s: (read + write bytes) of a large float32 copy over its time."""
    nbytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = _best_ms(lambda: dst.copy_(src), device, reps=20 if device.type == "cuda" else 8)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense matmul rate in TFLOP/s of a square product of random `dtype` matrices."""
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    ms = _best_ms(lambda: torch.mm(a, b), device, reps=20 if device.type == "cuda" else 3)
    return 2 * size**3 / (ms * 1e-3) / 1e12


class Ceilings:
    """The device's measured copy bandwidth and matmul rates, cached in a JSON file."""

    def __init__(self, path: str, device: torch.device, remeasure: bool = False):
        self.path, self.device = path, device
        self.data: Dict[str, object] = {}
        if os.path.exists(path) and not remeasure:
            with open(path) as f:
                self.data = json.load(f)

    def _save(self) -> None:
        self.data["measured"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.data["torch"] = torch.__version__
        if self.device.type == "cpu":
            self.data["threads"] = torch.get_num_threads()
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "w") as f:
            json.dump(self.data, f, indent=2, sort_keys=True)
            f.write("\n")

    def copy_gbps(self) -> float:
        if "copy_gbps" not in self.data:
            self.data["copy_gbps"] = round(measure_copy_gbps(self.device), 2)
            self._save()
        return float(self.data["copy_gbps"])

    def matmul_tflops(self, dtype: torch.dtype) -> float:
        key = f"matmul_tflops_{str(dtype).replace('torch.', '')}"
        if key not in self.data:
            self.data[key] = round(measure_matmul_tflops(self.device, dtype), 4)
            self._save()
        return float(self.data[key])


def row_metrics(loss: str, mode: str, dtype: torch.dtype, n: int, v: int, hs: int, ht: int,
                median_ms: float, ceilings: Optional[Ceilings]) -> tuple:
    """(gbps, tflops, roofline_pct) of one row; None where the row's model does not apply.

    Dense and sparse losses are judged by bytes (GB/s against copy bandwidth), the
    fused-linear loss by FLOPs (TFLOP/s against the matmul rate in the row's dtype).
    For sparse rows `ht` holds k, the teacher entries per token.
    """
    seconds = median_ms * 1e-3
    itemsize = torch.empty((), dtype=dtype).element_size()
    if loss == "fused_linear_distillation":
        flops = fused_linear_flops(mode, n, v, hs, ht)
        pct = None
        if ceilings is not None:
            pct = roofline_pct(flops / (ceilings.matmul_tflops(dtype) * 1e12), seconds)
        return None, flops / seconds / 1e12, pct
    if loss == "sparse_distillation":
        nbytes = sparse_bytes(mode, n, v, ht, itemsize)
    else:
        nbytes = dense_bytes(mode, n, v, itemsize)
    pct = None
    if ceilings is not None:
        pct = roofline_pct(nbytes / (ceilings.copy_gbps() * 1e9), seconds)
    return nbytes / seconds / 1e9, None, pct

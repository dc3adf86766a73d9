"""The demo's deployment check: a dynamically int8-quantised copy of the distilled student,
its serialised size and its batch inference latency, beside the float32 model.

Dynamic quantisation (`torch.ao.quantization.quantize_dynamic`, every `nn.Linear`, qint8)
stores each weight matrix as int8 with one per-tensor scale and zero point, keeps the biases
in float32, and quantises the activations on the fly per batch; ReLU runs in float32. It needs
no calibration data, which is why the demo can apply it after training with nothing else.
"""

from __future__ import annotations

import copy
import io
import statistics
import time
import warnings
from contextlib import contextmanager
from typing import Dict, Iterator, List

import torch
from torch import nn


@contextmanager
def _quiet_quantization_deprecations() -> Iterator[None]:
    """torch 2.13 still ships eager dynamic quantisation but warns, on every call, that it
    will move to torchao. The demo keeps to torch alone, so those two warnings are silenced
    here only (and nothing else is)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions",
                                category=UserWarning)
        yield


def quantize_int8(model: nn.Module) -> nn.Module:
    """A dynamically int8-quantised copy of `model` (every nn.Linear; the input is untouched),
    in eval mode. CPU only: the quantised linear kernels (fbgemm / onednn) are CPU kernels."""
    from torch.ao.quantization import quantize_dynamic

    with _quiet_quantization_deprecations():
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def serialized_bytes(model: nn.Module) -> int:
    """Bytes of `torch.save(model.state_dict())` written to an in-memory buffer (the size of a
    checkpoint of the weights, pickle framing included)."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


@contextmanager
def _single_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def latency_samples_s(model: nn.Module, batch: torch.Tensor, repeats: int = 50,
                      warmup: int = 10) -> List[float]:
    """Wall times in seconds of `repeats` calls `model(batch)` on one CPU thread, in eval mode.

    batch: (B, features). `warmup` untimed calls first (allocator, packed-weight caches).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    model.eval()
    times = []
    with _single_thread():
        for _ in range(warmup):
            model(batch)
        for _ in range(repeats):
            start = time.perf_counter()
            model(batch)
            times.append(time.perf_counter() - start)
    return times


def median_latency_s(model: nn.Module, batch: torch.Tensor, repeats: int = 50,
                     warmup: int = 10) -> float:
    """Median of `latency_samples_s`: the median, not the mean, because the machine is shared
    and other jobs add a long tail."""
    return statistics.median(latency_samples_s(model, batch, repeats, warmup))


def deployment_stats(model: nn.Module, batch: torch.Tensor,
                     repeats: int = 50) -> Dict[str, float]:
    """{"bytes": serialised size, "latency_s": median and "best_latency_s": fastest of
    `repeats` calls model(batch) on one thread, "batch_rows": len(batch)}."""
    times = latency_samples_s(model, batch, repeats)
    return {"bytes": float(serialized_bytes(model)), "latency_s": statistics.median(times),
            "best_latency_s": min(times), "batch_rows": float(len(batch))}


def format_deployment(per_seed: list) -> list:
    """Lines of a table: per model, its serialised size, the median over seeds of the
    per-seed median latency with the [min, max] of those medians, and the fastest single call
    of all (closest to an idle machine). per_seed: a list (one per seed) of
    {model name: deployment_stats(...)}."""
    names = list(per_seed[0])
    width = max(len(name) for name in names)
    batch_rows = int(per_seed[0][names[0]]["batch_rows"])
    lines = [f"deployment (CPU, 1 thread, batch of {batch_rows} test rows; latency_us = median "
             f"of {len(per_seed)} per-seed medians, [min, max] of them, best = fastest call):",
             f"{'model':<{width}} {'bytes':>8} {'latency_us':>10} {'[min, max]':>17} "
             f"{'best_us':>8}"]
    for name in names:
        size = int(per_seed[0][name]["bytes"])
        latencies = [1e6 * seed[name]["latency_s"] for seed in per_seed]
        best = min(1e6 * seed[name]["best_latency_s"] for seed in per_seed)
        lines.append(f"{name:<{width}} {size:8d} {statistics.median(latencies):10.1f} "
                     f"[{min(latencies):7.1f}, {max(latencies):7.1f}] {best:8.1f}")
    return lines

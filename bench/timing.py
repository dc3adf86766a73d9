"""Timing and peak-memory measurement for one benchmark step.

A *step* is built by `prepare(inputs) -> call`: `prepare` does the untimed part (clearing
gradients and, for mode "bwd", running the forward) and returns the zero-argument callable
whose run is timed. Every repetition gets a fresh forward, so backward-once losses (fastkd
scales its stored gradient in place) are timed correctly.

GPU: CUDA events around the call, an L2 flush (a 256 MiB buffer zeroed) before each repetition,
in the style of `triton.testing.do_bench` (which cannot take an untimed per-repetition
`prepare`, hence our own loop). CPU: `time.perf_counter` around the call, inputs rotated
among several sets whose total exceeds twice the last-level cache, so a repetition never finds
its inputs in cache left over from the previous one. Both report the median and the 20% / 80%
quantiles (linear interpolation, as numpy's default).

Peak memory is measured in a separate, untimed run of one step. GPU: `max_memory_allocated`
minus the allocated bytes before the step. CPU: PyTorch has no CPU peak counter, so the step
runs under `torch.profiler` with `profile_memory=True` and the peak of the running sum of
every allocation / free the c10 CPU allocator reported is taken (it sees ATen, torch.compile
generated code and fastkd's native kernels' tensors; memory a kernel mallocs itself is not
seen). Both count what the step allocates beyond its inputs: activations, saved tensors and
the gradients it produces.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import time
from typing import Callable, List, Sequence

import torch

L2_FLUSH_BYTES = 256 << 20


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) of `values` by linear interpolation between order stats."""
    if not values:
        raise ValueError("values must not be empty")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    ordered = sorted(float(x) for x in values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(samples_ms: Sequence[float]) -> tuple:
    """(median, p20, p80) in milliseconds."""
    return quantile(samples_ms, 0.5), quantile(samples_ms, 0.2), quantile(samples_ms, 0.8)


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """Size of the CPU's last-level cache from sysfs (default 32 MiB when unreadable)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    best = 0
    try:
        for index in os.listdir(base):
            with open(os.path.join(base, index, "size")) as f:
                text = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        return default
    return best or default


def rotation_count(set_bytes: int, cache_bytes: int, max_sets: int = 4) -> int:
    """How many input sets to rotate among so that together they exceed 2x the cache."""
    if set_bytes <= 0:
        return max_sets
    return int(max(1, min(max_sets, math.ceil(2 * cache_bytes / set_bytes))))


def time_cpu(prepare: Callable, input_sets: Sequence, reps: int, warmup: int) -> List[float]:
    """Wall-clock milliseconds of `reps` timed calls, rotating among `input_sets`."""
    for i in range(warmup):
        prepare(input_sets[i % len(input_sets)])()
    samples = []
    for i in range(reps):
        call = prepare(input_sets[i % len(input_sets)])
        start = time.perf_counter()
        out = call()
        elapsed = time.perf_counter() - start
        del out, call  # freed outside the timed region
        samples.append(elapsed * 1e3)
    return samples


def time_cuda(prepare: Callable, input_sets: Sequence, reps: int, warmup: int) -> List[float]:
    """CUDA-event milliseconds of `reps` calls, each after an L2 flush."""
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.int8, device="cuda")
    for i in range(warmup):
        prepare(input_sets[i % len(input_sets)])()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        call = prepare(input_sets[i % len(input_sets)])
        flush.zero_()
        starts[i].record()
        out = call()
        ends[i].record()
        del out, call
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


@contextlib.contextmanager
def _quiet_stderr():
    """Silences file descriptor 2 (the profiler's C++ side prints trace start/stop lines)."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def allocation_peak(deltas: Sequence[int]) -> int:
    """Peak of the running sum of allocation (+) / free (-) byte deltas, never below 0."""
    running = peak = 0
    for delta in deltas:
        running += delta
        peak = max(peak, running)
    return peak


def cpu_peak_bytes(step: Callable[[], None]) -> int:
    """Peak bytes the CPU allocator held during `step()` beyond what it held before."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    return allocation_peak([e.nbytes() for e in events])


def cuda_peak_bytes(step: Callable[[], None]) -> int:
    """Peak CUDA bytes allocated during `step()` beyond those allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - baseline)


def peak_bytes(prepare: Callable, inputs, device: torch.device,
               reset: Callable[[object], None]) -> int:
    """Peak extra bytes of one whole step (prepare included: the forward of mode "bwd").

    `reset(inputs)` runs first, outside the measured region (it drops gradients left by an
    earlier step, whose freeing would otherwise offset the new allocations).
    """
    reset(inputs)
    gc.collect()

    def step():
        out = prepare(inputs)()
        del out

    return cuda_peak_bytes(step) if device.type == "cuda" else cpu_peak_bytes(step)

"""Time and peak memory of the fused-linear loss against the eager lm-head + loss formula.

    python examples/measure_fused_linear.py --n 8192 --h 256 --v 32000 --reps 3

Eager: `logits = h @ W.T` for student and teacher, the textbook loss (log_softmax, KL, CE),
autograd. Fused: `fastkd.fused_linear_distillation_loss`. Both fwd+bwd in float32 on CPU.
Peak memory = growth of the process's resident set during one step (see `peak_bytes`),
inputs and parameters existing before it, the gradients it creates counted (and also
subtracted, as "without the returned grads"), in units of one [N, V] float32 tensor.
Time = median wall time of `reps` interleaved steps. The machine may be shared: the load
average is printed.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import os
import statistics
import time

import torch
import torch.nn.functional as F

import fastkd


def eager_loss(hs, ws, ht, wt, y, temperature, alpha):
    s = hs @ ws.t()
    with torch.no_grad():
        t = ht @ wt.t()
    logp_s = F.log_softmax(s / temperature, dim=-1)
    logp_t = F.log_softmax(t / temperature, dim=-1)
    kl = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    ce = F.cross_entropy(s, y, reduction="none", ignore_index=-100)
    valid = y != -100
    rows = torch.where(valid, alpha * ce + (1 - alpha) * temperature**2 * kl, 0.0)
    return rows.sum() / valid.sum().clamp(min=1)


def fused_loss(hs, ws, ht, wt, y, temperature, alpha, chunk_size=None):
    return fastkd.fused_linear_distillation_loss(hs, ws, ht, wt, y, temperature=temperature,
                                                 alpha=alpha, chunk_size=chunk_size)


def step(fn, inputs):
    hs, ws = inputs[0], inputs[1]
    hs.grad = ws.grad = None
    fn(*inputs).backward()


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def peak_bytes(fn, inputs) -> int:
    """Peak resident-memory growth of one step (Linux): free heap pages are handed back to the
    OS first (malloc_trim) and the high-water mark is reset (clear_refs 5), so every page the
    step touches beyond the baseline counts. An upper bound of the tensors alive at once."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    step(fn, inputs)
    return _status_bytes("VmHWM") - base


def timed_step(fn, inputs) -> float:
    start = time.perf_counter()
    step(fn, inputs)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--h", type=int, default=256)
    parser.add_argument("--v", type=int, default=32000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--chunks", type=str, default="auto", help="comma list, 'auto'=None")
    parser.add_argument("--skip-eager", action="store_true")
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    n, h, v = args.n, args.h, args.v
    hs = torch.randn(n, h, generator=g).requires_grad_()
    ws = (torch.randn(v, h, generator=g) / h**0.5 * 3).requires_grad_()
    ht = torch.randn(n, h, generator=g)
    wt = torch.randn(v, h, generator=g) / h**0.5 * 3
    y = torch.randint(0, v, (n,), generator=g)
    inputs = (hs, ws, ht, wt, y, 2.0, 0.5)
    unit = n * v * 4
    grads = (hs.numel() + ws.numel()) * 4
    print(f"N={n} H={h} V={v} fp32, torch {torch.__version__}, threads "
          f"{torch.get_num_threads()}, backend {fastkd.resolve_backend('auto', hs)}, "
          f"load {os.getloadavg()}")
    losses = {} if args.skip_eager else {"eager": eager_loss}
    for c in args.chunks.split(","):
        chunk = None if c == "auto" else int(c)
        losses[f"fused chunk={c}"] = functools.partial(fused_loss, chunk_size=chunk)
    times = {name: [] for name in losses}
    for _ in range(args.reps):  # interleaved, so contention hits every variant alike
        for name, fn in losses.items():
            times[name].append(timed_step(fn, inputs))
    eager_time = statistics.median(times["eager"]) if "eager" in times else None
    for name, fn in losses.items():
        t = statistics.median(times[name])
        peak = peak_bytes(fn, inputs)
        ratio = f" = {t / eager_time:.2f}x eager" if eager_time else ""
        print(f"{name}: median {t:.2f} s of {[round(x, 2) for x in times[name]]}{ratio}; "
              f"peak {peak / 2**20:.0f} MiB = {peak / unit:.3f} x [N,V] fp32, without the "
              f"returned grads {(peak - grads) / 2**20:.0f} MiB = {(peak - grads) / unit:.3f}")
    print(f"load after: {os.getloadavg()}")


if __name__ == "__main__":
    main()

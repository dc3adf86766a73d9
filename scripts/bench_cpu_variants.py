"""Wall-clock comparison of the CPU kernel builds (AVX2 vs AVX-512) of fastkd::dense_kd and
fastkd::sparse_kd, with a copy probe of the same size (docs/cpu_kernel.md, "AVX-512 variant").

Each round starts one fresh process per build (ATEN_CPU_CAPABILITY=avx2 / avx512, which must
be set before torch loads) and the rounds interleave them, so a change in the load of a shared
machine hits both builds alike. Every process times each case `--reps` times after one warm-up
call and reports the median; the summary is the median over rounds of those medians.

    python scripts/bench_cpu_variants.py --threads 2 --rounds 5
    python scripts/bench_cpu_variants.py --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from fastkd._kernel_args import KernelArgs

CASES = ("copy fp32", "dense fwd fp32", "dense fwd+grad fp32", "dense fwd bf16",
         "dense fwd+grad bf16", "topk fwd fp32", "topk fwd+grad fp32", "topk fwd bf16",
         "topk fwd+grad bf16")


def _timed(fn, reps: int) -> float:
    """Median wall-clock milliseconds of `reps` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


# KL, T = 2, alpha = 0.5 with a target (ce_weight = 1 - alpha, div_weight = alpha T^2).
DENSE_ARGS = KernelArgs(temperature=2.0, ce_weight=0.5, div_weight=2.0, divergence=0,
                        param_a=0.0, param_b=0.0, ignore_index=-100, label_smoothing=0.0,
                        softcap=0.0)
TOPK_ARGS = DENSE_ARGS  # renormalize=False: tail "bucket"


def _calls(s, t, grad, target, logprobs, indices) -> dict:
    from fastkd.ops.native import dense_kd_native
    from fastkd.ops.sparse_native import sparse_kd_native

    return {
        "dense fwd": lambda: dense_kd_native(s, t, target, None, None, None, DENSE_ARGS),
        "dense fwd+grad": lambda: dense_kd_native(s, t, target, grad, None, None, DENSE_ARGS),
        "topk fwd": lambda: sparse_kd_native(s, logprobs, indices, target, None, None,
                                             TOPK_ARGS),
        "topk fwd+grad": lambda: sparse_kd_native(s, logprobs, indices, target, grad, None,
                                                  TOPK_ARGS),
    }


def _worker(n: int, vocab: int, k: int, threads: int, reps: int) -> dict:
    import torch

    from fastkd.ops.native import cpu_kernel_variant

    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    student32 = torch.randn(n, vocab, generator=gen) * 3
    teacher32 = torch.randn(n, vocab, generator=gen) * 3
    target = torch.randint(0, vocab, (n,), generator=gen)
    logprobs, indices = torch.log_softmax(teacher32, -1).topk(k, dim=-1)
    out = {"variant": cpu_kernel_variant("dense_kd"),
           "sparse_variant": cpu_kernel_variant("sparse_kd")}
    copy_dst = torch.empty_like(student32)
    out["copy fp32"] = _timed(lambda: copy_dst.copy_(student32), reps)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        s, t = student32.to(dtype), teacher32.to(dtype)
        grad = torch.empty_like(s)  # reused, as a training loop with a gradient cache does
        for case, fn in _calls(s, t, grad, target, logprobs, indices).items():
            out[f"{case} {name}"] = _timed(fn, reps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--k", type=int, default=64, help="top-k width of the sparse kernel")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--variants", default="avx2,avx512")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.n, args.vocab, args.k, args.threads, args.reps)))
        return
    variants = args.variants.split(",")
    results = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            cmd = [sys.executable, __file__, "--worker", f"--n={args.n}",
                   f"--vocab={args.vocab}", f"--k={args.k}", f"--threads={args.threads}",
                   f"--reps={args.reps}"]
            env = dict(os.environ, ATEN_CPU_CAPABILITY=v)
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            assert row["variant"] == v and row["sparse_variant"] == v, row
            results[v].append(row)
            print(f"round {r} {v}: " + ", ".join(f"{c} {row[c]:.1f}" for c in CASES),
                  file=sys.stderr, flush=True)
    print(f"N={args.n} V={args.vocab} k={args.k} threads={args.threads}, median over "
          f"{args.rounds} rounds of the median of {args.reps} calls (ms)")
    print("| case | " + " | ".join(variants) + " | ratio |")
    print("| --- |" + " --- |" * (len(variants) + 1))
    for c in CASES:
        med = [statistics.median(row[c] for row in results[v]) for v in variants]
        ratio = med[0] / med[-1] if med[-1] else float("nan")
        print(f"| {c} | " + " | ".join(f"{m:.1f}" for m in med) + f" | {ratio:.2f}x |")


if __name__ == "__main__":
    main()

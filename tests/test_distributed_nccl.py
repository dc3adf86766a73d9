"""The vocab-parallel losses on NCCL: 2 processes, one CUDA GPU each.

The same collectives as the gloo tests (all_gather, all_reduce), on CUDA tensors. Each rank
computes the tensor-parallel loss and gradients on its GPU and, on the same GPU, the
single-process loss on the full tensors; it saves the largest relative differences, which
the parent checks (fp32: 1e-5). Skipped, with the reason, on machines with fewer than 2
CUDA GPUs.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from oracle import random_logits, random_target

import fastkd
from fastkd.distributed import (
    vocab_parallel_distillation_loss,
    vocab_parallel_fused_linear_distillation_loss,
    vocab_parallel_sparse_distillation_loss,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not (torch.cuda.is_available() and torch.cuda.device_count() >= 2
                            and dist.is_nccl_available()),
                       reason="NCCL multi-rank tests need >= 2 CUDA GPUs and NCCL (found "
                              f"{torch.cuda.device_count() if torch.cuda.is_available() else 0})"),
]

WORLD, N, V, H = 2, 64, 1001, 32  # uneven slices: 501 + 500


def _rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def _split(rank):
    full = -(-V // WORLD)
    return rank * full, min(V, (rank + 1) * full)


def _dense(rank, dev, div):
    lo, hi = _split(rank)
    s, t = random_logits(N, V, seed=1).to(dev), random_logits(N, V, seed=2).to(dev)
    y = random_target(N, vocab=V, ignore_fraction=0.2, seed=3).to(dev)
    kw = dict(divergence=div, temperature=2.0, alpha=0.3)
    ss = s[:, lo:hi].clone().requires_grad_(True)
    ts = t[:, lo:hi].clone().requires_grad_(True)
    loss = vocab_parallel_distillation_loss(ss, ts, y, vocab_start_index=lo, **kw)
    loss.backward()
    sf, tf = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
    ref = fastkd.distillation_loss(sf, tf, y, backend="torch", **kw)
    ref.backward()
    return max(_rel(loss, ref), _rel(ss.grad, sf.grad[:, lo:hi]),
               _rel(ts.grad, tf.grad[:, lo:hi]))


def _fused(rank, dev):
    lo, hi = _split(rank)
    hs, ws = random_logits(N, H, scale=1.0, seed=4).to(dev), random_logits(V, H, seed=5).to(dev)
    ht, wt = random_logits(N, H, scale=1.0, seed=6).to(dev), random_logits(V, H, seed=7).to(dev)
    y = random_target(N, vocab=V, ignore_fraction=0.2, seed=8).to(dev)
    kw = dict(divergence="jsd", temperature=2.0, alpha=0.3)
    h1, w1 = hs.clone().requires_grad_(True), ws[lo:hi].clone().requires_grad_(True)
    loss = vocab_parallel_fused_linear_distillation_loss(h1, w1, ht, wt[lo:hi], y,
                                                         vocab_start_index=lo, chunk_size=16,
                                                         **kw)
    loss.backward()
    h2, w2 = hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)
    ref = fastkd.fused_linear_distillation_loss(h2, w2, ht, wt, y, backend="torch", **kw)
    ref.backward()
    return max(_rel(loss, ref), _rel(h1.grad, h2.grad), _rel(w1.grad, w2.grad[lo:hi]))


def _sparse(rank, dev):
    lo, hi = _split(rank)
    s, t = random_logits(N, V, seed=9).to(dev), random_logits(N, V, seed=10).to(dev)
    lp, idx = torch.log_softmax(t / 2.0, -1).topk(16, dim=-1)
    y = random_target(N, vocab=V, ignore_fraction=0.2, seed=11).to(dev)
    kw = dict(divergence="kl", temperature=2.0, alpha=0.3, tail="bucket")
    ss = s[:, lo:hi].clone().requires_grad_(True)
    loss = vocab_parallel_sparse_distillation_loss(ss, lp, idx, y, vocab_start_index=lo, **kw)
    loss.backward()
    sf = s.clone().requires_grad_(True)
    ref = fastkd.sparse_distillation_loss(sf, lp, idx, y, backend="torch", **kw)
    ref.backward()
    return max(_rel(loss, ref), _rel(ss.grad, sf.grad[:, lo:hi]))


def _dtensor(rank, dev):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    mesh = init_device_mesh("cuda", (WORLD,))
    s, t = random_logits(N, V, seed=12).to(dev), random_logits(N, V, seed=13).to(dev)
    y = random_target(N, vocab=V, ignore_fraction=0.2, seed=14).to(dev)
    sd = distribute_tensor(s, mesh, [Shard(-1)]).requires_grad_(True)
    loss = fastkd.distillation_loss(sd, distribute_tensor(t, mesh, [Shard(-1)]), y,
                                    divergence="tvd")
    loss.backward()
    sf = s.clone().requires_grad_(True)
    ref = fastkd.distillation_loss(sf, t, y, divergence="tvd", backend="torch")
    ref.backward()
    return max(_rel(loss.to_local(), ref), _rel(sd.grad.full_tensor(), sf.grad))


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=120))
    dev = torch.device("cuda", rank)
    try:
        errors = {f"dense-{d}": _dense(rank, dev, d) for d in ("kl", "reverse_kl", "jsd", "tvd")}
        errors.update(fused=_fused(rank, dev), sparse=_sparse(rank, dev),
                      dtensor=_dtensor(rank, dev))
        torch.save(errors, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_vocab_parallel_nccl_matches_single_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=WORLD,
             join=True)
    for rank in range(WORLD):
        errors = torch.load(tmp_path / f"rank{rank}.pt")
        assert len(errors) == 7
        bad = {k: v for k, v in errors.items() if not v <= 1e-5}
        assert not bad, f"rank {rank}: relative errors above 1e-5: {bad}"

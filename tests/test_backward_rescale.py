"""The reduction weight folded into the kernels, and the backward rescale it lets CPU skip.

On CPU in eager mode the losses pass the reduction's factor (1 / count for "mean", 1 for
"sum") into the kernel's loss weights, so the gradient the kernel writes is final and the
backward's per-row rescale (`fastkd.ops.dense.scale_rows_`) skips its pass over (N, V) when
the incoming gradient is exactly 1. Checked here: the skip happens (no in-place multiply of
the gradient buffer during ``loss.backward()``), it does not happen when the incoming
gradient is not 1, and in every case loss and gradient equal the float64 oracle (mean over
non-ignored rows, ``num_items_in_batch`` as a number or a tensor, sum, all rows ignored).
Also the CPU gradient cache that hands the buffer one step frees to the next step.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from oracle import oracle_with_grads, random_logits, random_target
from test_sparse import sparse_oracle

import fastkd
from fastkd._dispatch import unavailable_reason
from fastkd.ops.dense import new_gradient, scale_rows_

CPU = torch.device("cpu")
BACKENDS = ["torch"] + [b for b in ("cpu", "triton")
                        if unavailable_reason(b, CPU, torch.float32) is None]
N, V = 24, 301
KW = dict(temperature=2.0, alpha=0.4, divergence="kl", label_smoothing=0.1)


def backward_multiplies(loss: torch.Tensor, upstream: float, monkeypatch) -> list:
    """Runs the backward of ``upstream * loss``; returns the shapes of the (N, V) tensors
    multiplied in place meanwhile (a TorchFunctionMode does not reach the autograd engine's
    calls into backward, so Tensor.mul_ itself is wrapped)."""
    shapes, original = [], torch.Tensor.mul_

    def recording_mul_(self, *args, **kwargs):
        shapes.append(tuple(self.shape))
        return original(self, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "mul_", recording_mul_)
        (loss * upstream if upstream != 1.0 else loss).backward()
    return [shape for shape in shapes if shape[-1:] == (V,)]


def test_scale_rows_skips_exact_ones_and_scales_otherwise():
    grad = random_logits(4, 7)
    before = grad.clone()
    assert scale_rows_(grad, torch.ones(()).expand(4)) is grad
    assert torch.equal(grad, before)
    factors = torch.tensor([1.0, 0.5, 2.0, 1.0])
    scale_rows_(grad, factors)
    assert torch.equal(grad, before * factors[:, None])


REDUCTIONS = [
    dict(reduction="mean"),
    dict(reduction="sum"),
    dict(reduction="mean", num_items_in_batch=37),
    dict(reduction="mean", num_items_in_batch=torch.tensor(11)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduce", REDUCTIONS, ids=lambda r: "-".join(map(str, r.values())))
@pytest.mark.parametrize("upstream", [1.0, 0.375])
def test_dense_loss_and_gradient_with_the_weight_folded(backend, reduce, upstream,
                                                       monkeypatch):
    student, teacher = random_logits(N, V, seed=1), random_logits(N, V, seed=2)
    target = random_target(N, vocab=V, ignore_fraction=0.3, seed=3)
    s = student.clone().requires_grad_(True)
    t = teacher.clone().requires_grad_(True)
    loss = fastkd.distillation_loss(s, t, target, backend=backend, **KW, **reduce)
    multiplies = backward_multiplies(loss, upstream, monkeypatch)
    ref, ref_gs, ref_gt = oracle_with_grads(student, teacher, target, **KW, **reduce)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), upstream * ref_gs, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(t.grad.double(), upstream * ref_gt, rtol=1e-4, atol=1e-7)
    # Folded: no rescale pass for an incoming 1; one per gradient buffer otherwise (the
    # "torch" reference differentiates its formula with autograd: no stored gradient).
    if backend != "torch":
        assert multiplies == ([] if upstream == 1.0 else [(N, V), (N, V)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored_gives_zero_loss_and_gradient(backend):
    student, teacher = random_logits(N, V, seed=4), random_logits(N, V, seed=5)
    target = torch.full((N,), -100)
    s = student.clone().requires_grad_(True)
    loss = fastkd.distillation_loss(s, teacher, target, backend=backend, **KW)
    loss.backward()
    assert loss.item() == 0.0
    assert not s.grad.any()


def test_reduction_none_rescales_by_the_users_weights():
    """reduction="none" gives per-row values: the incoming gradient is the user's, applied
    in backward."""
    student, teacher = random_logits(N, V, seed=6), random_logits(N, V, seed=7)
    target = random_target(N, vocab=V, ignore_fraction=0.2, seed=8)
    s = student.clone().requires_grad_(True)
    rows = fastkd.distillation_loss(s, teacher, target, reduction="none", **KW)
    weights = torch.linspace(0.5, 1.5, N)
    (rows * weights).sum().backward()
    summed = oracle_with_grads(student, teacher, target, teacher_grad=False, reduction="sum",
                               **KW)[1]
    torch.testing.assert_close(s.grad.double(), summed * weights.double()[:, None],
                               rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("upstream", [1.0, 0.375])
def test_topk_loss_and_gradient_with_the_weight_folded(backend, upstream, monkeypatch):
    student = random_logits(N, V, seed=9)
    logprobs, indices = torch.log_softmax(random_logits(N, V, seed=10) / 2.0, -1).topk(16)
    target = random_target(N, vocab=V, ignore_fraction=0.3, seed=11)
    s = student.clone().requires_grad_(True)
    kw = dict(temperature=2.0, alpha=0.4, tail="bucket")
    loss = fastkd.sparse_distillation_loss(s, logprobs, indices, target, backend=backend, **kw)
    multiplies = backward_multiplies(loss, upstream, monkeypatch)
    ref, ref_grad = sparse_oracle(student, logprobs.double(), indices, target, **kw)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.grad.double(), upstream * ref_grad, rtol=1e-4, atol=1e-7)
    if backend != "torch":
        assert multiplies == ([] if upstream == 1.0 else [(N, V)])


# --- The CPU gradient cache (csrc/cpu/gradient_cache.cpp) -----------------------------------

BIG = (320, 32768)  # 40 MiB of float32: above the cache's 16 MiB threshold


def test_gradient_cache_hands_a_freed_block_to_the_next_step():
    if _native_missing():
        pytest.skip(_native_missing())
    cache = torch.ops.fastkd
    cache.cpu_gradient_cache_release()
    like = torch.empty(BIG)
    grad = new_gradient(like)
    assert grad.shape == like.shape and grad.dtype == like.dtype and grad.is_contiguous()
    pointer = grad.data_ptr()
    assert cache.cpu_gradient_cache_bytes() == 0
    del grad  # the tensor dies: its block is kept, not unmapped
    assert cache.cpu_gradient_cache_bytes() >= like.nbytes
    again = new_gradient(like)
    assert again.data_ptr() == pointer and cache.cpu_gradient_cache_bytes() == 0
    small = new_gradient(torch.empty(64, 32000))  # 8 MiB, below the threshold: at::empty
    del again, small
    assert cache.cpu_gradient_cache_release() >= like.nbytes
    assert cache.cpu_gradient_cache_bytes() == 0


def test_gradient_cache_blocks_are_seen_by_the_profiler_memory_view():
    """The benchmarks' CPU peak memory comes from the profiler's allocation events: a cached
    gradient must still count as allocated while it lives."""
    if _native_missing():
        pytest.skip(_native_missing())
    from fastkd.bench.timing import cpu_peak_bytes

    like = torch.empty(BIG)
    assert cpu_peak_bytes(lambda: new_gradient(like)) >= like.nbytes


def test_gradient_cache_off_with_zero_limit():
    if _native_missing():
        pytest.skip(_native_missing())
    script = ("import torch, fastkd; from fastkd.ops.dense import new_gradient\n"
              f"g = new_gradient(torch.empty{BIG}); del g\n"
              "print(torch.ops.fastkd.cpu_gradient_cache_bytes())\n")
    env = dict(os.environ, FASTKD_CPU_GRADIENT_CACHE_MB="0")
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300, check=True)
    assert out.stdout.strip() == "0"


def _native_missing():
    return unavailable_reason("cpu", CPU, torch.float32)

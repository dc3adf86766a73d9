"""`torch.compile(fullgraph=True)` of the loss: same loss and gradients as eager.

fullgraph=True turns any graph break (a host sync, a data-dependent Python branch in
validation or in the autograd Function) into an error. Two compiles only: compiling is slow
on a small CPU machine.
"""

from __future__ import annotations

import pytest
import torch
from oracle import random_logits, random_target

import fastkd


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def run(fn, student, teacher, target, teacher_grad):
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_(teacher_grad)
    loss = fn(s, t, target)
    loss.backward()
    return loss.detach(), s.grad, t.grad


def assert_same(compiled, eager):
    for what, a, b in zip(("loss", "student grad", "teacher grad"), compiled, eager):
        if b is None:
            assert a is None, what
            continue
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=what)


def test_compiled_function_kl_with_ignored_target():
    student = random_logits(3, 4, 50, seed=1)
    teacher = random_logits(3, 4, 50, seed=2)
    target = random_target(3, 4, vocab=50, ignore_fraction=0.3, seed=1)
    assert bool((target == -100).any()) and bool((target != -100).any())

    def loss_fn(s, t, y):
        return fastkd.distillation_loss(s, t, y, temperature=2.0, alpha=0.3,
                                        label_smoothing=0.1, backend="torch")

    compiled = torch.compile(loss_fn, fullgraph=True)
    got = run(compiled, student, teacher, target, teacher_grad=False)
    assert got[1] is not None and bool((got[1][target == -100] == 0).all())
    assert_same(got, run(loss_fn, student, teacher, target, teacher_grad=False))


def test_compiled_module_jsd_without_target_teacher_grad():
    student = random_logits(6, 40, seed=3)
    teacher = random_logits(6, 40, seed=4)
    crit = fastkd.DistillationLoss(temperature=1.5, divergence="jsd", beta=0.3,
                                   reduction="sum", backend="torch")
    compiled = torch.compile(crit, fullgraph=True)
    got = run(compiled, student, teacher, None, teacher_grad=True)
    assert got[2] is not None
    assert_same(got, run(crit, student, teacher, None, teacher_grad=True))


def test_compiled_components_on_a_causal_slice_mixed_dtypes():
    """fullgraph through the per-outer-index loop of a causal slice, a bf16 student against a
    float32 teacher, int32 labels and return_components."""
    student = random_logits(2, 6, 30, dtype=torch.bfloat16, seed=5)
    teacher = random_logits(2, 6, 30, seed=6)
    target = random_target(2, 5, vocab=30, ignore_fraction=0.3, seed=7).to(torch.int32)

    def loss_fn(s, t, y):
        loss, ce, div = fastkd.distillation_loss(s[:, :-1], t[:, 1:], y, temperature=2.0,
                                                 alpha=0.4, backend="torch",
                                                 return_components=True)
        return loss + 0.0 * (ce + div)  # the components are part of the graph

    compiled = torch.compile(loss_fn, fullgraph=True)
    got = run(compiled, student, teacher, target, teacher_grad=True)
    expected = run(loss_fn, student, teacher, target, teacher_grad=True)
    assert got[1].dtype == torch.bfloat16 and got[2].dtype == torch.float32
    assert bool((got[1][:, -1] == 0).all())  # the last position is outside the slice
    assert_same(got, expected)


def test_compiled_fused_linear_components_mixed_dtypes():
    """fullgraph through the chunked fused-linear loss with a bf16 student head, a float32
    teacher head and return_components (aot_eager: the Function and its chunk loop)."""
    g = torch.Generator().manual_seed(8)
    hidden = torch.randn(10, 8, generator=g).bfloat16()
    weight = (torch.randn(24, 8, generator=g) * 0.8).bfloat16()
    t_hidden, t_weight = torch.randn(10, 12, generator=g), torch.randn(24, 12, generator=g)
    target = random_target(10, vocab=24, ignore_fraction=0.2, seed=9)

    def step(h, w, y):
        loss, ce, div = fastkd.fused_linear_distillation_loss(
            h, w, t_hidden, t_weight, y, temperature=2.0, alpha=0.3, chunk_size=4,
            backend="torch", return_components=True)
        return loss, ce, div

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss, ce, div = fn(h, w, target)
        loss.backward()
        results.append((loss.detach(), ce, div, h.grad, w.grad))
    for what, a, b in zip(("loss", "ce", "divergence", "hidden grad", "weight grad"),
                          *results):
        assert a.dtype == b.dtype, what
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=what)
    assert results[0][3].dtype == torch.bfloat16 and results[0][0].dtype == torch.float32

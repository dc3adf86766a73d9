"""`fastkd.DistillationLoss`: the functional loss with keywords fixed at construction."""

from __future__ import annotations

import pytest
import torch
from oracle import random_logits, random_target
from torch import nn

import fastkd

CONFIGS = [
    dict(temperature=2.0, alpha=0.1),
    dict(temperature=4.0, alpha=0.0, divergence="jsd", beta=0.2, scale_by_t2=False),
    dict(divergence="reverse_kl", label_smoothing=0.1, softcap=6.0, reduction="sum"),
    dict(divergence="tvd", ignore_index=3, reduction="none"),
]


def inputs(seed=0):
    student = random_logits(3, 5, 17, seed=seed)
    teacher = random_logits(3, 5, 17, seed=seed + 1)
    target = random_target(3, 5, vocab=17, ignore_fraction=0.3, seed=seed)
    return student, teacher, target


def loss_and_grads(fn, student, teacher, target, **kw):
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_()
    loss = fn(s, t, target, **kw)
    loss.sum().backward()
    return loss.detach(), s.grad, t.grad


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c.values())))
def test_module_equals_functional(config):
    student, teacher, target = inputs()
    ignore_index = config.get("ignore_index", -100)
    target = torch.where(target == -100, ignore_index, target)
    crit = fastkd.DistillationLoss(backend="torch", **config)
    got = loss_and_grads(crit, student, teacher, target)
    expected = loss_and_grads(fastkd.distillation_loss, student, teacher, target,
                              backend="torch", **config)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


def test_keywords_are_stored():
    config = dict(temperature=3.0, alpha=0.25, divergence="jsd", beta=0.3, scale_by_t2=False,
                  ignore_index=-1, label_smoothing=0.05, softcap=20.0, reduction="sum",
                  backend="torch", inplace_backward=True, return_components=True)
    crit = fastkd.DistillationLoss(**config)
    for key, value in config.items():
        assert crit.keywords(None)[key] == value, key
        assert f"{key}={value!r}" in repr(crit)


@pytest.mark.parametrize("with_target", [True, False], ids=["target", "no-target"])
def test_return_components_on_every_module(with_target):
    """The modules return (loss, ce, divergence) like their functional forms."""
    student, teacher, target = inputs(seed=6)
    target = target if with_target else None
    crit = fastkd.DistillationLoss(temperature=2.0, alpha=0.3, backend="torch",
                                   return_components=True)
    loss, ce, div = crit(student, teacher, target)
    expected = fastkd.distillation_loss(student, teacher, target, temperature=2.0, alpha=0.3,
                                        backend="torch")
    assert torch.equal(loss, expected)
    mix = 0.3 * ce + 0.7 * 4 * div if with_target else 4 * div
    torch.testing.assert_close(loss, mix, rtol=1e-6, atol=1e-7)
    hidden, weight = random_logits(3, 5, 8, scale=1.0, seed=7), random_logits(17, 8, seed=8)
    fused = fastkd.FusedLinearDistillationLoss(temperature=2.0, alpha=0.3, backend="torch",
                                               return_components=True)
    got = fused(hidden, weight, hidden, weight * 0.5, target)
    want = fastkd.distillation_loss(hidden @ weight.T, hidden @ (weight * 0.5).T, target,
                                    temperature=2.0, alpha=0.3, backend="torch",
                                    return_components=True)
    assert len(got) == 3
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert "return_components=True" in repr(fused)
    sparse = fastkd.SparseDistillationLoss(return_components=True, backend="torch")
    assert sparse.call["return_components"] is True


def test_defaults_match_functional_signature():
    crit = fastkd.DistillationLoss()
    assert crit.options == fastkd._options.LossOptions()
    assert crit.call == dict(backend="auto", inplace_backward=False, return_components=False)


def test_module_has_no_state():
    crit = fastkd.DistillationLoss(temperature=2.0)
    assert list(crit.parameters()) == [] and crit.state_dict() == {}


@pytest.mark.parametrize("num_items", [23, torch.tensor(23)], ids=["int", "tensor"])
def test_num_items_in_batch_passes_through(num_items):
    student, teacher, target = inputs(seed=4)
    crit = fastkd.DistillationLoss(temperature=2.0, backend="torch")
    got = crit(student, teacher, target, num_items_in_batch=num_items)
    summed = fastkd.distillation_loss(student, teacher, target, temperature=2.0,
                                      reduction="sum", backend="torch")
    torch.testing.assert_close(got, summed / 23, rtol=1e-6, atol=0)
    assert not torch.allclose(got, crit(student, teacher, target))


def test_module_without_target():
    student, teacher, _ = inputs(seed=5)
    crit = fastkd.DistillationLoss(temperature=2.0, backend="torch")
    expected = fastkd.distillation_loss(student, teacher, temperature=2.0, backend="torch")
    assert torch.equal(crit(student, teacher), expected)


def test_training_step_reduces_loss():
    """A tiny student (one linear layer) distilled from a fixed random teacher MLP with SGD:
    the distillation loss decreases, and the student's parameters get finite gradients."""
    gen = torch.Generator().manual_seed(0)
    features, classes = 12, 7
    x = torch.randn(64, features, generator=gen)
    teacher = nn.Sequential(nn.Linear(features, 32), nn.Tanh(), nn.Linear(32, classes))
    student = nn.Linear(features, classes)
    with torch.no_grad():
        for p in list(teacher.parameters()) + list(student.parameters()):
            p.copy_(torch.randn(p.shape, generator=gen))
        y = teacher(x).argmax(-1)
        teacher_logits = teacher(x)
    crit = fastkd.DistillationLoss(temperature=2.0, alpha=0.3, backend="torch")
    opt = torch.optim.SGD(student.parameters(), lr=0.2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = crit(student(x), teacher_logits, y)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in student.parameters())
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.7 * losses[0], losses

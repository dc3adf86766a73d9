"""fastkd.training helpers against hand-written objectives (float64 oracle)."""

import pytest
import torch
import torch.nn.functional as F
from oracle import divergence_rows, oracle_loss, random_logits, random_target

import fastkd
from fastkd import training


@pytest.mark.parametrize("divergence", ["jsd", "kl"])
def test_mutual_distillation_matches_joint_objective(divergence):
    n, v, T, alpha = 6, 19, 2.0, 0.4
    a = random_logits(n, v, seed=1).requires_grad_(True)
    b = random_logits(n, v, seed=2).requires_grad_(True)
    y = random_target(n, vocab=v, ignore_fraction=0.3, seed=3)
    loss = training.mutual_distillation_loss(a, b, y, temperature=T, alpha=alpha,
                                             divergence=divergence)
    ga, gb = torch.autograd.grad(loss, (a, b))

    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    valid = y != -100
    ce = [F.cross_entropy(z, torch.where(valid, y, 0), reduction="none") for z in (a64, b64)]
    d = divergence_rows(a64, b64, T, divergence, 0.5)
    rows = torch.where(valid, alpha / 2 * (ce[0] + ce[1]) + (1 - alpha) * T * T * d, 0.0)
    expected = rows.sum() / valid.sum()
    ea, eb = torch.autograd.grad(expected, (a64, b64))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ga.double(), ea, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gb.double(), eb, rtol=1e-5, atol=1e-6)


def test_mutual_distillation_requires_two_learners():
    a, b = random_logits(2, 5, seed=1).requires_grad_(True), random_logits(2, 5, seed=2)
    with pytest.raises(ValueError, match="logits_b"):
        training.mutual_distillation_loss(a, b)
    with pytest.raises(ValueError, match="alpha"):
        training.mutual_distillation_loss(a, b.requires_grad_(), alpha=1.5)


def test_ema_teacher_update_rule():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    teacher = training.EMATeacher(student, decay=0.9)
    before = [p.clone() for p in teacher.model.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student[1].running_mean.fill_(0.5)
    teacher.update(student)
    for old, new, cur in zip(before, teacher.model.parameters(), student.parameters()):
        torch.testing.assert_close(new, 0.9 * old + 0.1 * cur)
    torch.testing.assert_close(teacher.model[1].running_mean, torch.full((3,), 0.5))
    assert not any(p.requires_grad for p in teacher.model.parameters())
    out = teacher(torch.randn(5, 4))
    assert not out.requires_grad
    with pytest.raises(ValueError, match="decay"):
        training.EMATeacher(student, decay=1.0)


def test_self_distillation_sum_over_heads():
    n, v, T, alpha = 5, 11, 3.0, 0.3
    heads = [random_logits(n, v, seed=s).requires_grad_(True) for s in (4, 5, 6)]
    y = random_target(n, vocab=v, seed=7)
    loss = training.self_distillation_loss(heads, y, temperature=T, alpha=alpha)
    grads = torch.autograd.grad(loss, heads)

    h64 = [h.detach().double().requires_grad_() for h in heads]
    expected = F.cross_entropy(h64[-1], y) + sum(
        oracle_loss(h, h64[-1].detach(), y, temperature=T, alpha=alpha) for h in h64[:-1])
    expected_grads = torch.autograd.grad(expected, h64)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="head_logits"):
        training.self_distillation_loss(heads[:1], y)
    assert fastkd.training is training

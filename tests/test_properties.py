"""Mathematical properties of the losses (reference backend), checked with hypothesis.

KL(p||p) = 0, loss >= 0, JSD_beta <= binary entropy of beta (ln 2 at beta = 0.5), TVD <= 1,
the Hinton et al. high-temperature gradient limit, softmax shift invariance and consistent
reductions. Small shapes and bounded example counts keep this fast; float64 throughout so the
tolerances are rounding-level.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import fastkd

DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd")
SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def logit_pairs(draw, max_rows=4, max_vocab=12, bound=30.0):
    """(student, teacher) float64 tensors (N, V), N <= max_rows, 2 <= V <= max_vocab."""
    n = draw(st.integers(1, max_rows))
    v = draw(st.integers(2, max_vocab))
    elements = st.floats(-bound, bound, allow_nan=False, allow_infinity=False)
    student = draw(arrays(np.float64, (n, v), elements=elements))
    teacher = draw(arrays(np.float64, (n, v), elements=elements))
    return torch.from_numpy(student), torch.from_numpy(teacher)


def loss_and_grads(student, teacher, target=None, **kw):
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_()
    loss = fastkd.distillation_loss(s, t, target, backend="torch", **kw)
    gs, gt = torch.autograd.grad(loss.sum(), (s, t))
    return loss.detach(), gs, gt


@SETTINGS
@given(pair=logit_pairs(), divergence=st.sampled_from(DIVERGENCES),
       temperature=st.floats(0.25, 10.0), beta=st.floats(0.05, 0.95),
       softcap=st.sampled_from([None, 5.0]))
def test_same_distribution_has_zero_loss_and_gradient(pair, divergence, temperature, beta,
                                                      softcap):
    """D(p, p) = 0 and p = q is a stationary point, for every divergence."""
    logits = pair[0]
    loss, gs, gt = loss_and_grads(logits, logits.clone(), temperature=temperature,
                                  divergence=divergence, beta=beta, softcap=softcap,
                                  reduction="none")
    assert loss.abs().max() <= 1e-12
    assert gs.abs().max() <= 1e-12 and gt.abs().max() <= 1e-12


@SETTINGS
@given(pair=logit_pairs(), divergence=st.sampled_from(DIVERGENCES),
       temperature=st.floats(0.25, 10.0), beta=st.floats(0.05, 0.95),
       alpha=st.floats(0.0, 1.0), label_smoothing=st.floats(0.0, 1.0),
       labels=st.lists(st.integers(-1, 11), min_size=4, max_size=4))
def test_loss_is_nonnegative(pair, divergence, temperature, beta, alpha, label_smoothing,
                             labels):
    student, teacher = pair
    n, vocab = student.shape
    target = torch.tensor([y % vocab if y >= 0 else -100 for y in labels[:n]])
    loss = fastkd.distillation_loss(student, teacher, target, temperature=temperature,
                                    alpha=alpha, divergence=divergence, beta=beta,
                                    label_smoothing=label_smoothing, reduction="none",
                                    backend="torch")
    # Rounding can leave a true zero (identical rows) a few ulps of |logits|/T below zero.
    assert loss.min() >= -1e-10


def binary_entropy(beta: float) -> float:
    return -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)


@SETTINGS
@given(pair=logit_pairs(), temperature=st.floats(0.05, 10.0),
       beta=st.one_of(st.just(0.5), st.floats(0.01, 0.99)))
def test_jsd_bounded_by_binary_entropy(pair, temperature, beta):
    """JSD_beta <= h(beta) = -beta ln beta - (1-beta) ln(1-beta); h(0.5) = ln 2."""
    loss = fastkd.distillation_loss(*pair, temperature=temperature, divergence="jsd",
                                    beta=beta, scale_by_t2=False, reduction="none",
                                    backend="torch")
    assert loss.max() <= binary_entropy(beta) + 1e-12


@SETTINGS
@given(pair=logit_pairs(), temperature=st.floats(0.05, 10.0))
def test_tvd_at_most_one(pair, temperature):
    loss = fastkd.distillation_loss(*pair, temperature=temperature, divergence="tvd",
                                    scale_by_t2=False, reduction="none", backend="torch")
    assert loss.max() <= 1.0 + 1e-12


@pytest.mark.parametrize("divergence,bound", [("jsd", math.log(2)), ("tvd", 1.0)])
def test_disjoint_supports_reach_the_bound(divergence, bound):
    """Disjoint supports (-inf elsewhere) are the extreme case: JSD = ln 2, TVD = 1."""
    student = torch.tensor([[1.0, 2.0, -math.inf, -math.inf]], dtype=torch.float64)
    teacher = torch.tensor([[-math.inf, -math.inf, 0.5, -1.0]], dtype=torch.float64)
    loss = fastkd.distillation_loss(student, teacher, divergence=divergence,
                                    scale_by_t2=False, backend="torch")
    assert abs(loss.item() - bound) <= 1e-15


@SETTINGS
@given(pair=logit_pairs(bound=10.0), temperature=st.floats(1e3, 1e4))
def test_hinton_high_temperature_gradient_limit(pair, temperature):
    """d(T^2 KL)/dz_s -> (z_s - mean z_s - z_t + mean z_t) / V as T -> inf (Hinton et al.).

    Expanding softmax(z/T) to second order in c = (z - mean z)/T bounds the deviation by
    2 * max|z - mean z|^2 / (T V), which is the tolerance (plus float64 rounding x T)."""
    student, teacher = pair
    vocab = student.shape[-1]
    s = student.clone().requires_grad_()
    loss = fastkd.distillation_loss(s, teacher, temperature=temperature, reduction="sum",
                                    backend="torch")
    (grad,) = torch.autograd.grad(loss, s)
    dev_s = student - student.mean(-1, keepdim=True)
    dev_t = teacher - teacher.mean(-1, keepdim=True)
    limit = (dev_s - dev_t) / vocab
    spread = torch.maximum(dev_s.abs().amax(-1), dev_t.abs().amax(-1))
    tolerance = 2 * spread**2 / (temperature * vocab) + 1e-15 * temperature
    assert bool(((grad - limit).abs().amax(-1) <= tolerance).all())


@SETTINGS
@given(pair=logit_pairs(), divergence=st.sampled_from(DIVERGENCES),
       temperature=st.floats(0.25, 10.0), label_smoothing=st.floats(0.0, 0.5),
       shifts=st.lists(st.floats(-50.0, 50.0), min_size=8, max_size=8))
def test_shift_invariance_and_zero_sum_gradients(pair, divergence, temperature,
                                                 label_smoothing, shifts):
    """Softmax ignores a per-row constant, so the loss does and each gradient row sums to 0."""
    student, teacher = pair
    n = student.shape[0]
    target = torch.arange(n) % student.shape[1]
    kw = dict(temperature=temperature, divergence=divergence, label_smoothing=label_smoothing,
              reduction="none")
    loss, gs, gt = loss_and_grads(student, teacher, target, **kw)
    shift = torch.tensor(shifts, dtype=torch.float64)
    moved = loss_and_grads(student + shift[:n, None], teacher + shift[n:2 * n, None], target,
                           **kw)[0]
    scale = 1.0 + loss.abs().max()
    assert (moved - loss).abs().max() <= 1e-10 * scale
    assert gs.sum(-1).abs().max() <= 1e-12 * (1.0 + gs.abs().max())
    assert gt.sum(-1).abs().max() <= 1e-12 * (1.0 + gt.abs().max())


@SETTINGS
@given(pair=logit_pairs(max_rows=6), divergence=st.sampled_from(DIVERGENCES),
       ignored=st.lists(st.booleans(), min_size=6, max_size=6),
       num_items=st.integers(1, 50))
def test_reductions_are_consistent(pair, divergence, ignored, num_items):
    """sum == none.sum() == mean * (non-ignored count); mean with num_items == sum / it."""
    student, teacher = pair
    n = student.shape[0]
    target = torch.arange(n) % student.shape[1]
    target[torch.tensor(ignored[:n])] = -100
    count = int((target != -100).sum())

    def loss(**kw):
        return fastkd.distillation_loss(student, teacher, target, temperature=2.0,
                                        divergence=divergence, backend="torch", **kw)

    rows, total, mean = loss(reduction="none"), loss(reduction="sum"), loss(reduction="mean")
    scale = 1e-12 * (1.0 + rows.abs().sum())
    assert abs(rows.sum() - total) <= scale
    assert abs(mean * max(count, 1) - total) <= scale
    if count == 0:
        assert mean == 0 and total == 0
    assert abs(loss(reduction="mean", num_items_in_batch=num_items) - total / num_items) <= scale

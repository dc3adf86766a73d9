"""Independent float64 oracle: the textbook formulas, differentiated by autograd.

Written from docs/semantics.md §1 without importing fastkd, so a bug in the library's reference
cannot hide in its own test. Every backend's test compares against `oracle_loss` and the
gradients autograd gives through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _xlogy_diff(p, logp, logr):
    """sum p * (logp - logr), with the 0 * log 0 = 0 convention.

    The masked entries are replaced before the product too, so no NaN leaks into gradients
    through the unselected branch of `where`."""
    live = p > 0
    safe = torch.where(live, logp, 0.0) - torch.where(live, logr, 0.0)
    return torch.where(live, p * safe, 0.0).sum(-1)


def _log_mix(lam, p, q):
    """log(lam * p + (1 - lam) * q), with 1 in place of an m = 0 (p = q = 0 there), so no
    0 * inf NaN reaches a gradient through the unselected branch of a where."""
    m = lam * p + (1 - lam) * q
    return torch.log(torch.where(m > 0, m, 1.0))


def akl_head(p, mu=0.5):
    """Head of AKL (Wu et al. 2025): {i : p_i >= tau}, tau the largest value whose
    upper set {p >= tau} holds mass >= mu. The ascending sort's suffix sums give S(v) for
    each value v; tau is the largest sorted value with S >= mu (ties: all in)."""
    p = p.detach()
    ascending = torch.sort(p, dim=-1).values
    suffix = ascending.flip(-1).cumsum(-1).flip(-1)
    candidates = torch.where(suffix >= mu, ascending, torch.full_like(ascending, -1.0))
    tau = candidates.max(-1, keepdim=True).values
    tau = torch.where(tau < 0, ascending[..., :1], tau)  # rounding below mu: everything
    return p >= tau


def _akl(p_s, logp_s, p_t, logp_t):
    head = akl_head(p_t)
    gap = (p_t - p_s).detach().abs()
    total = gap.sum(-1)
    w_head = torch.where(total > 0, (gap * head).sum(-1) / torch.where(total > 0, total, 1.0),
                         1.0)
    w_tail = 1 - w_head
    fkl, rkl = _xlogy_diff(p_t, logp_t, logp_s), _xlogy_diff(p_s, logp_s, logp_t)
    return w_head * fkl + torch.where(w_tail > 0, w_tail * rkl, 0.0)


def _alpha_beta(p_s, logp_s, p_t, logp_t, a, b):
    """Cichocki-Cruces-Amari AB-divergence of (teacher p, student q), a, b > 0."""
    pa_qb = torch.exp(a * logp_t + b * logp_s)
    terms = pa_qb - a / (a + b) * torch.exp((a + b) * logp_t) \
        - b / (a + b) * torch.exp((a + b) * logp_s)
    return -terms.sum(-1) / (a * b)


def divergence_rows(s, t, temperature, divergence, beta, skew=0.1, alpha_beta=None):
    """D(p_t, p_s) per row for (..., V) float64 logits (already softcapped). `skew`: the
    skew divergences' lambda; `alpha_beta`: (a, b) of the AB-divergence."""
    logp_s = F.log_softmax(s / temperature, dim=-1)
    logp_t = F.log_softmax(t / temperature, dim=-1)
    p_s, p_t = logp_s.exp(), logp_t.exp()
    if divergence == "kl":
        return _xlogy_diff(p_t, logp_t, logp_s)
    if divergence == "reverse_kl":
        return _xlogy_diff(p_s, logp_s, logp_t)
    if divergence == "jsd":
        m = beta * p_t + (1 - beta) * p_s
        # log of a masked-out m = 0 (p_t = p_s = 0 there) would send 0 * inf = NaN into the
        # gradient through the unselected branch of _xlogy_diff's where.
        logm = torch.log(torch.where(m > 0, m, 1.0))
        return beta * _xlogy_diff(p_t, logp_t, logm) + (1 - beta) * _xlogy_diff(p_s, logp_s, logm)
    if divergence == "tvd":
        return 0.5 * (p_t - p_s).abs().sum(-1)
    if divergence == "skew_kl":  # KL(p_t || lam p_t + (1 - lam) p_s)
        return _xlogy_diff(p_t, logp_t, _log_mix(skew, p_t, p_s))
    if divergence == "skew_reverse_kl":  # KL(p_s || (1 - lam) p_t + lam p_s)
        return _xlogy_diff(p_s, logp_s, _log_mix(1 - skew, p_t, p_s))
    if divergence == "akl":
        return _akl(p_s, logp_s, p_t, logp_t)
    if divergence == "alpha_beta":
        return _alpha_beta(p_s, logp_s, p_t, logp_t, *alpha_beta)
    raise ValueError(divergence)


def oracle_loss(student, teacher, target=None, *, temperature=1.0, alpha=0.5, divergence="kl",
                beta=0.5, skew=0.1, alpha_beta=None, scale_by_t2=True, ignore_index=-100,
                label_smoothing=0.0, softcap=None, reduction="mean", num_items_in_batch=None,
                dtype=torch.float64):
    """The loss of docs/semantics.md §1 in float64 (differentiable in student and teacher).

    `dtype` other than float64 evaluates the same eager formula in that dtype: the
    "same-dtype eager formula" whose error bounds a low-precision kernel (docs/semantics.md §10)."""
    s, t = student.to(dtype), teacher.to(dtype)
    if softcap is not None:
        s, t = softcap * torch.tanh(s / softcap), softcap * torch.tanh(t / softcap)
    k = temperature**2 if scale_by_t2 else 1.0
    d = divergence_rows(s, t, temperature, divergence, beta, skew, alpha_beta)
    if target is None:
        rows = k * d
        count = torch.tensor(float(rows.numel()), dtype=torch.float64)
    else:
        valid = target != ignore_index
        safe = torch.where(valid, target, 0)
        ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), safe.reshape(-1), reduction="none",
                             label_smoothing=label_smoothing).reshape(target.shape)
        terms = (1 - alpha) * k * d
        if alpha != 0:
            terms = terms + alpha * ce
        rows = torch.where(valid, terms, 0.0)
        count = valid.sum().double()
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if num_items_in_batch is not None:
        return rows.sum() / num_items_in_batch
    return rows.sum() / count.clamp(min=1)


def oracle_with_grads(student, teacher, target=None, teacher_grad=True, dtype=torch.float64,
                      **kw):
    """(loss, d loss/d student, d loss/d teacher or None), all float64, for a scalar loss
    (reduction="none" is summed with fixed random weights so every row's gradient counts).
    `dtype` evaluates the formula in that dtype instead (gradients then come in it)."""
    s = student.detach().to(dtype).requires_grad_(True)
    t = teacher.detach().to(dtype).requires_grad_(teacher_grad)
    loss = oracle_loss(s, t, target, dtype=dtype, **kw)
    scalar = loss if loss.dim() == 0 else (loss * row_weights(loss.shape)).sum()
    inputs = (s, t) if teacher_grad else (s,)
    grads = torch.autograd.grad(scalar, inputs)
    return loss.detach(), grads[0], (grads[1] if teacher_grad else None)


def row_weights(shape):
    """Fixed, non-uniform weights used to reduce a reduction='none' loss to a scalar."""
    g = torch.Generator().manual_seed(1234)
    return torch.rand(shape, generator=g, dtype=torch.float64) + 0.5


def random_logits(*shape, scale=3.0, dtype=torch.float32, seed=0):
    """Normal logits of realistic scale (std `scale`), never zeros or uniform [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)


def random_target(*shape, vocab, ignore_fraction=0.0, ignore_index=-100, seed=0):
    g = torch.Generator().manual_seed(seed + 7919)
    y = torch.randint(0, vocab, shape, generator=g)
    if ignore_fraction > 0:
        mask = torch.rand(shape, generator=g) < ignore_fraction
        y = torch.where(mask, torch.full_like(y, ignore_index), y)
    return y

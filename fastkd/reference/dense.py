"""Pure-PyTorch dense distillation: the `torch` backend and the CPU fallback.

Per row of student logits `s` and teacher logits `t` (length V), with `cap(z) = c*tanh(z/c)`
when a softcap `c` is set and `a = cap(z) / T`:

    p_s = softmax(a_s)    p_t = softmax(a_t)    q = softmax(cap(s))        (CE at temperature 1)
    row = ce_weight * CE(q, y; label_smoothing) + div_weight * D(p_t, p_s)

and the gradient of `row` with respect to `s` (and `t`, when asked) in closed form:

    dCE/dcap(s)  = q - (1 - eps) * onehot(y) - eps / V
    dD/da_s      kl: p_s - p_t            reverse_kl: p_s * (log p_s - log p_t - D)
                 jsd: (1-b) * p_s * (log p_s - log m - KL(p_s||m))
                 tvd: p_s * (g - <p_s, g>),  g = sign(p_s - p_t) / 2
                 skew_kl, skew_reverse_kl, akl, alpha_beta: g - p_s * sum(g), g_i = p_s,i *
                 dD/dp_s,i (the formulas of `_new_divergence_and_grads`)
    ds = cap'(s) * (ce_weight * dCE/dcap(s) + div_weight / T * dD/da_s)

This is the same contract every kernel backend implements (see `fastkd/ops/dense.py`): it
writes the gradients into preallocated buffers and returns per-row values, so one autograd
Function serves all backends. Student and teacher are each read in their own dtype and may
have any row stride; each gradient is written in its input's dtype. Arithmetic is float32 for
fp32/bf16/fp16 inputs and float64 when either input is float64; rows are processed in chunks
so only a few chunk-sized temporaries exist at once, never several `[N, V]` float32 tensors.
With a `terms` buffer the unweighted CE and divergence of each row are written too.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._kernel_args import KernelArgs

#: Divergence codes shared by every backend (index = code passed to the kernels).
DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl", "akl",
               "alpha_beta")
KL, REVERSE_KL, JSD, TVD, SKEW_KL, SKEW_REVERSE_KL, AKL, ALPHA_BETA = range(8)
#: AKL's head mass mu (fixed, as in Wu et al. 2025).
AKL_HEAD_MASS = 0.5

#: Elements per chunk: ~8 float32 temporaries of this size live at once (~64 MiB).
CHUNK_ELEMENTS = 1 << 21


def _capped(z: torch.Tensor, softcap: float):
    """Returns cap(z) and cap'(z) (None when no softcap)."""
    if softcap <= 0.0:
        return z, None
    th = torch.tanh(z / softcap)
    return softcap * th, 1.0 - th * th


def _xlogy_diff(p, logp, logr):
    """sum_j p_j * (logp_j - logr_j) per row, with 0 where p_j == 0 (no 0 * inf NaN)."""
    return torch.where(p > 0, p * (logp - logr), 0.0).sum(-1, keepdim=True)


def _softmax_chain(g, p):
    """dD/da from g = p * dD/dp (the softmax's chain rule): g - p * sum(g)."""
    return g - p * g.sum(-1, keepdim=True)


def _log_mix(weight, logp, logq):
    """log(weight * p + (1 - weight) * q) from log p, log q; weight 0 gives log q exactly."""
    dtype = logp.dtype
    return torch.logaddexp(logp + torch.log(torch.tensor(weight, dtype=dtype)),
                           logq + torch.log(torch.tensor(1.0 - weight, dtype=dtype)))


def _skew(lam, p, logp, q, logq, need_p):
    """KL(p || m), m = lam * p + (1 - lam) * q, and (dD/da_q, dD/da_p or None).

    g = q dD/dq = -(1 - lam) p q / m;  h = p dD/dp = p (log p - log m) + p - lam p^2 / m
    (terms with p = 0 are 0). skew_kl is (p, q) = (teacher, student); skew_reverse_kl,
    KL(q_s || lam q_s + (1 - lam) p_t), is the same with the roles swapped."""
    logm = _log_mix(lam, logp, logq)
    live = p > 0
    d = _xlogy_diff(p, logp, logm)
    g = torch.where(live, -(1.0 - lam) * torch.exp(logp + logq - logm), 0.0)
    grad_q = _softmax_chain(g, q)
    grad_p = None
    if need_p:
        h = torch.where(live, p * (logp - logm) + p - lam * torch.exp(2 * logp - logm), 0.0)
        grad_p = _softmax_chain(h, p)
    return d, grad_q, grad_p


def akl_head(p_t: torch.Tensor, mu: float = AKL_HEAD_MASS) -> torch.Tensor:
    """(n, V) bool: AKL's head {i : p_i >= tau}, tau the largest value with
    sum_{p_i >= tau} p_i >= mu. Exact: the descending sort's first prefix reaching mu gives
    tau, and the head is chosen by value (ties all in)."""
    sorted_p = torch.sort(p_t, dim=-1, descending=True).values
    reached = torch.cumsum(sorted_p, dim=-1) >= mu
    # the first position reaching mu (the last one if rounding keeps the total below mu)
    first = torch.where(reached.any(-1, keepdim=True), reached.float().argmax(-1, keepdim=True),
                        p_t.shape[-1] - 1)
    tau = sorted_p.gather(-1, first)
    return p_t >= tau


def _new_divergence_and_grads(divergence, param_a, param_b, logp_s, logp_t, p_s, p_t,
                              need_teacher):
    """skew_kl, skew_reverse_kl, akl, alpha_beta (docs/semantics.md): (D, dD/da_s, dD/da_t)."""
    grad_t = None
    if divergence == SKEW_KL:  # KL(p_t || lam p_t + (1 - lam) p_s)
        d, grad_s, grad_t = _skew(param_a, p_t, logp_t, p_s, logp_s, need_teacher)
    elif divergence == SKEW_REVERSE_KL:  # KL(p_s || lam p_s + (1 - lam) p_t)
        d, grad_t, grad_s = _skew(param_a, p_s, logp_s, p_t, logp_t, True)
        grad_t = grad_t if need_teacher else None
    elif divergence == AKL:
        head = akl_head(p_t)
        gap = (p_t - p_s).abs()
        g_head = torch.where(head, gap, 0.0).sum(-1, keepdim=True)
        total = gap.sum(-1, keepdim=True)
        # detached weights (as the authors' code): w_h = 1, w_t = 0 when p_t == p_s
        w_h = torch.where(total > 0, g_head / torch.where(total > 0, total, 1.0), 1.0)
        w_t = 1.0 - w_h
        fkl = _xlogy_diff(p_t, logp_t, logp_s)
        rkl = _xlogy_diff(p_s, logp_s, logp_t)
        # a zero weight keeps its (possibly infinite) KL out, as a zero loss weight does
        d = w_h * fkl + torch.where(w_t > 0, w_t * rkl, 0.0)
        grad_s = w_h * (p_s - p_t) + torch.where(
            (p_s > 0) & (w_t > 0), w_t * p_s * (logp_s - logp_t - rkl), 0.0)
        if need_teacher:
            grad_t = torch.where(p_t > 0, w_h * p_t * (logp_t - logp_s - fkl), 0.0) \
                + w_t * (p_t - p_s)
    elif divergence == ALPHA_BETA:
        a, b = param_a, param_b
        # p^a q^b as exp(a log p + b log q): 0 where either is 0, no 0 * log 0
        cross = torch.exp(a * logp_t + b * logp_s)
        pow_t, pow_s = torch.exp((a + b) * logp_t), torch.exp((a + b) * logp_s)
        d = -(cross - a / (a + b) * pow_t - b / (a + b) * pow_s).sum(-1, keepdim=True) / (a * b)
        grad_s = _softmax_chain(-(cross - pow_s) / a, p_s)
        if need_teacher:
            grad_t = _softmax_chain(-(cross - pow_t) / b, p_t)
    else:
        raise ValueError(f"divergence code must be in 0..{len(DIVERGENCES) - 1}, got "
                         f"{divergence}")
    return d, grad_s, grad_t


def _divergence_and_grads(divergence, param_a, param_b, a_s, a_t, need_teacher):
    """Returns (D [n,1], dD/da_s [n,V], dD/da_t [n,V] or None). `param_a`, `param_b`: the
    divergence's parameters (jsd: beta; skew_*: lambda; alpha_beta: alpha, beta)."""
    logp_s = torch.log_softmax(a_s, dim=-1)
    logp_t = torch.log_softmax(a_t, dim=-1)
    p_s, p_t = logp_s.exp(), logp_t.exp()
    grad_t = None
    if divergence == KL:
        d = _xlogy_diff(p_t, logp_t, logp_s)
        grad_s = p_s - p_t
        if need_teacher:
            grad_t = torch.where(p_t > 0, p_t * (logp_t - logp_s - d), 0.0)
    elif divergence == REVERSE_KL:
        d = _xlogy_diff(p_s, logp_s, logp_t)
        grad_s = torch.where(p_s > 0, p_s * (logp_s - logp_t - d), 0.0)
        if need_teacher:
            grad_t = p_t - p_s
    elif divergence == JSD:
        beta = param_a
        # log m = log(b * p_t + (1 - b) * p_s), computed in log space for accuracy.
        logm = _log_mix(beta, logp_t, logp_s)
        kl_t = _xlogy_diff(p_t, logp_t, logm)
        kl_s = _xlogy_diff(p_s, logp_s, logm)
        d = beta * kl_t + (1.0 - beta) * kl_s
        grad_s = (1.0 - beta) * torch.where(p_s > 0, p_s * (logp_s - logm - kl_s), 0.0)
        if need_teacher:
            grad_t = beta * torch.where(p_t > 0, p_t * (logp_t - logm - kl_t), 0.0)
    elif divergence == TVD:
        diff = p_s - p_t
        d = 0.5 * diff.abs().sum(-1, keepdim=True)
        g = 0.5 * torch.sign(diff)
        grad_s = p_s * (g - (p_s * g).sum(-1, keepdim=True))
        if need_teacher:
            grad_t = p_t * ((p_t * g).sum(-1, keepdim=True) - g)
    else:
        return _new_divergence_and_grads(divergence, param_a, param_b, logp_s, logp_t, p_s,
                                         p_t, need_teacher)
    return d, grad_s, grad_t


def _masked(x: torch.Tensor, valid) -> torch.Tensor:
    """x with the ignored rows zeroed (`valid` (c, 1) bool, or None: every row counts)."""
    return x if valid is None else torch.where(valid, x, 0.0)


def store_chunk(start: int, stop: int, loss, ce_term, div_term, valid, rows, terms,
                grad_student, d_zs, dcap_s) -> None:
    """Writes one chunk's rows, its unweighted (CE, D) terms (when `terms` is given) and
    its student gradient (times the softcap derivative `dcap_s`, when given); ignored rows
    get zeros."""
    rows[start:stop] = _masked(loss, valid)[:, 0]
    if terms is not None:
        terms[start:stop] = _masked(torch.cat([ce_term, div_term], dim=-1), valid)
    if grad_student is not None:
        d_zs = d_zs * dcap_s if dcap_s is not None else d_zs
        grad_student[start:stop] = _masked(d_zs, valid)


def _cross_entropy_and_grad(z, y, label_smoothing):
    """CE at temperature 1 with label smoothing (PyTorch's convention) and dCE/dz."""
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    z_y = z.gather(-1, y.unsqueeze(-1))
    q = torch.exp(z - lse)
    grad = q.scatter_add(-1, y.unsqueeze(-1),
                         torch.full_like(z_y, -(1.0 - label_smoothing)))
    ce = lse - (1.0 - label_smoothing) * z_y
    if label_smoothing > 0.0:
        vocab = z.shape[-1]
        ce = ce - label_smoothing * z.mean(-1, keepdim=True)
        grad = grad - label_smoothing / vocab
    return ce, grad


def dense_kd_rows(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: Optional[torch.Tensor],
    grad_student: Optional[torch.Tensor],
    grad_teacher: Optional[torch.Tensor],
    terms: Optional[torch.Tensor],
    args: KernelArgs,
) -> torch.Tensor:
    """Per-row weighted distillation loss; gradients written into the given buffers.

    Parameters
    ----------
    student : (N, V) fp32/bf16/fp16/float64 with ``stride(1) == 1`` and any row stride.
    teacher : (N, V) in its own floating dtype (may differ from the student's) and its own
        row stride, ``stride(1) == 1``.
    target : (N,) int64, or None (no CE term, no ignored rows).
    grad_student, grad_teacher : (N, V) buffers in the student's / teacher's dtype (any row
        stride), or None (not computed). ``grad_student`` may be ``student`` itself.
    terms : (N, 2) float32 buffer (float64 when computing in float64), or None. When given,
        ``terms[:, 0]`` receives the unweighted cross-entropy of each row (0 without a target
        or for ignored rows) and ``terms[:, 1]`` the unweighted divergence (0 for ignored
        rows), both computed even where their weight is 0, so that
        ``rows == ce_weight * terms[:, 0] + div_weight * terms[:, 1]``.
    args : `fastkd._kernel_args.KernelArgs`, the scalars (``softcap <= 0``: off;
        teacher_scale and renormalize are not read).

    Returns
    -------
    rows : (N,) float32, or float64 when either input is float64 (arithmetic in that type).
        Ignored rows are 0 with 0 gradients.
    """
    temperature, ce_weight, div_weight = args.temperature, args.ce_weight, args.div_weight
    softcap = args.softcap
    n, vocab = student.shape
    wide = torch.float64 in (student.dtype, teacher.dtype)
    compute = torch.float64 if wide else torch.float32
    rows = torch.empty(n, dtype=compute, device=student.device)
    want_ce = target is not None and (ce_weight != 0.0 or terms is not None)
    want_div = div_weight != 0.0 or terms is not None
    chunk = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        z_s, dcap_s = _capped(student[start:stop].to(compute), softcap)
        loss = torch.zeros(stop - start, 1, dtype=compute, device=student.device)
        ce_term = div_term = loss
        d_zs = torch.zeros_like(z_s) if grad_student is not None else None
        d_zt = None
        if want_div:
            z_t, dcap_t = _capped(teacher[start:stop].to(compute), softcap)
            need_t = grad_teacher is not None and div_weight != 0.0
            div_term, g_as, g_at = _divergence_and_grads(
                args.divergence, args.param_a, args.param_b, z_s / temperature,
                z_t / temperature, need_t)
            if div_weight != 0.0:  # a zero-weight (possibly infinite) term stays out
                loss = loss + div_weight * div_term
                if d_zs is not None:
                    d_zs = d_zs + (div_weight / temperature) * g_as
                if g_at is not None:
                    d_zt = (div_weight / temperature) * g_at
                    if dcap_t is not None:
                        d_zt = d_zt * dcap_t
        valid = None
        if target is not None:
            y = target[start:stop]
            valid = (y != args.ignore_index).unsqueeze(-1)
            if want_ce:
                ce_term, g_ce = _cross_entropy_and_grad(z_s, torch.where(valid[:, 0], y, 0),
                                                        args.label_smoothing)
                if ce_weight != 0.0:
                    loss = loss + ce_weight * ce_term
                    if d_zs is not None:
                        d_zs = d_zs + ce_weight * g_ce
        store_chunk(start, stop, loss, ce_term, div_term, valid, rows, terms, grad_student,
                    d_zs, dcap_s)
        if grad_teacher is not None:
            d_zt = torch.zeros_like(z_s) if d_zt is None else d_zt
            grad_teacher[start:stop] = _masked(d_zt, valid)
    return rows

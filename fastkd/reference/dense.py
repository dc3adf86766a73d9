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
DIVERGENCES = ("kl", "reverse_kl", "jsd", "tvd")
KL, REVERSE_KL, JSD, TVD = range(4)

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


def _divergence_and_grads(divergence, beta, a_s, a_t, need_teacher):
    """Returns (D [n,1], dD/da_s [n,V], dD/da_t [n,V] or None)."""
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
        # log m = log(b * p_t + (1 - b) * p_s), computed in log space for accuracy.
        logm = torch.logaddexp(logp_t + torch.log(torch.tensor(beta, dtype=a_s.dtype)),
                               logp_s + torch.log(torch.tensor(1.0 - beta, dtype=a_s.dtype)))
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
        raise ValueError(f"divergence code must be in 0..3, got {divergence}")
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
    softcap, beta = args.softcap, args.param_a
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
            div_term, g_as, g_at = _divergence_and_grads(args.divergence, beta, z_s / temperature,
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

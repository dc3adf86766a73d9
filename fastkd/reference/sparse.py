"""Pure-PyTorch top-k (offline) teacher distillation: the `torch` implementation.

The teacher is stored as its top-k log-probabilities `lt` at the distillation temperature T and
their vocabulary indices `idx` (unique per row). The student row `s` (length V) gives
`a = cap(s) / T`, `log q = log_softmax(a)` over the FULL vocabulary, and the k+1 categories

    student:  log q[idx_1..k],   log q_tail = logsumexp(a over columns not in idx) - logsumexp(a)
    teacher:  tail="bucket":       lt_1..k,  p_tail = 1 - sum exp(lt)   (0 when k = V)
              tail="renormalize":  lt - logsumexp(lt),  p_tail = 0

A teacher stored at another temperature T_stored is re-tempered first: lt = (T_stored / T) *
log p_stored (`teacher_scale`), which the renormalised tail renormalises; this is exact for
"renormalize" (the bucket's tail mass at T is unknown, so the API refuses that combination).
Rows whose target is ignore_index may hold anything in the top-k (they are not used).

The student tail is summed over the uncovered columns in log space (no `1 - sum` cancellation,
exactly empty when k = V). The divergence is the dense formula applied to these k+1 categories:

    bucket       coarse-graining of the dense divergence: a lower bound of it for every
                 divergence (data processing), equal to it when k = V.
    renormalize  the divergence between the renormalised teacher (zero mass off its top-k) and
                 the student's full distribution, so kl = sum p~ (log p~ - log q) (the usual
                 sparse-KD term), tvd = 0.5 (sum |p~ - q| + q_tail), jsd the exact dense JSD of
                 those two distributions. reverse_kl would be +inf whenever the student has mass
                 off the top-k, so it is the generalised KL of non-negative measures:
                 sum q (log q - log p~) + q_tail (>= 0, zero iff q = p~ on the top-k).

Gradient, with g_i = dD/dlog q_i (closed form per divergence) and G = sum_i g_i:

    dD/da_v = g_j [v = idx_j] + g_tail * exp(a_v - lse_tail) [v uncovered] - G * softmax(a)_v

CE (temperature 1, label smoothing), softcap and the per-row weighting are exactly those of
`dense_kd_rows`, whose helpers are reused. Rows are processed in chunks of ~2M elements, so only
a few chunk-sized float32 temporaries exist at once, never an [N, V] float32 copy.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .._kernel_args import KernelArgs
from .dense import (
    CHUNK_ELEMENTS,
    JSD,
    KL,
    REVERSE_KL,
    TVD,
    _capped,
    _cross_entropy_and_grad,
    _xlogy_diff,
    store_chunk,
)

TAILS = ("bucket", "renormalize")


def _teacher_categories(logprobs: torch.Tensor, renormalize: bool, vocab: int) -> torch.Tensor:
    """(c, k) teacher log-probs at T -> (c, k+1) log-probs of the k entries and the tail."""
    lse = torch.logsumexp(logprobs, dim=-1, keepdim=True)
    if renormalize:
        return torch.cat([logprobs - lse, torch.full_like(lse, -math.inf)], dim=-1)
    if logprobs.shape[-1] == vocab:
        log_tail = torch.full_like(lse, -math.inf)  # no column is left for a tail
    else:
        # Missing mass 1 - sum p; a top-k that sums to >= 1 by rounding has an empty tail.
        log_tail = torch.log(torch.clamp(-torch.expm1(lse), min=0.0))
    return torch.cat([logprobs, log_tail], dim=-1)


def _category_divergence(logp, logq, divergence: int, beta: float, renormalize: bool):
    """D [c, 1] over (c, k+1) categories and g = dD/dlog q [c, k+1]."""
    p, q = logp.exp(), logq.exp()
    if divergence == KL:
        return _xlogy_diff(p, logp, logq), -p
    if divergence == REVERSE_KL:
        if renormalize:  # generalised KL: the tail term q*log(q/0) becomes q_tail
            d = _xlogy_diff(q[:, :-1], logq[:, :-1], logp[:, :-1]) + q[:, -1:]
            g = torch.where(q > 0, q * (logq - logp + 1.0), 0.0)
            return d, torch.cat([g[:, :-1], q[:, -1:]], dim=-1)
        d = _xlogy_diff(q, logq, logp)
        return d, torch.where(q > 0, q * (logq - logp + 1.0), 0.0)
    if divergence == JSD:
        logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
        d = beta * _xlogy_diff(p, logp, logm) + (1.0 - beta) * _xlogy_diff(q, logq, logm)
        return d, (1.0 - beta) * torch.where(q > 0, q * (logq - logm), 0.0)
    if divergence == TVD:
        d = 0.5 * (p - q).abs().sum(-1, keepdim=True)
        return d, 0.5 * q * torch.sign(q - p)
    raise ValueError(f"divergence code must be in 0..3, got {divergence}")


def _sparse_divergence_and_grad(a, logprobs, indices, divergence, beta, renormalize, need_grad):
    """a: (c, V) tempered student logits -> (D [c, 1], dD/da [c, V] or None)."""
    k = indices.shape[-1]
    logz = torch.logsumexp(a, dim=-1, keepdim=True)
    covered = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, indices, True)
    a_tail = a.masked_fill(covered, -math.inf)
    lse_tail = torch.logsumexp(a_tail, dim=-1, keepdim=True)  # -inf when nothing is left
    logq = torch.cat([a.gather(-1, indices), lse_tail], dim=-1) - logz
    logp = _teacher_categories(logprobs, renormalize, a.shape[-1])
    d, g = _category_divergence(logp, logq, divergence, beta, renormalize)
    if not need_grad:
        return d, None
    grad = torch.exp(a - logz).mul_(-g.sum(-1, keepdim=True))
    grad.scatter_add_(-1, indices, g[:, :k])
    safe_tail = torch.where(torch.isfinite(lse_tail), lse_tail, 0.0)
    grad.add_(torch.exp(a_tail - safe_tail).mul_(g[:, k:]))  # exp(-inf) = 0 on covered columns
    return d, grad


def _readable_rows(logprobs, indices, valid):
    """Ignored rows may hold anything (garbage indices, NaN): give them in-range unique
    indices so the gathers stay valid; their results are masked out afterwards."""
    if valid is None:
        return logprobs, indices
    k = indices.shape[-1]
    spare = torch.arange(k, device=indices.device).expand_as(indices)
    filler = -math.log(k + 1)  # a valid bucket teacher (mass k / (k + 1))
    return torch.where(valid, logprobs, filler), torch.where(valid, indices, spare)


def sparse_kd_rows(
    student: torch.Tensor,
    topk_logprobs: torch.Tensor,
    topk_indices: torch.Tensor,
    target: Optional[torch.Tensor],
    grad_student: Optional[torch.Tensor],
    terms: Optional[torch.Tensor],
    args: KernelArgs,
) -> torch.Tensor:
    """Per-row weighted top-k-teacher loss; the student gradient written into a buffer.

    Parameters
    ----------
    student : (N, V) floating, ``stride(1) == 1``, any row stride.
    topk_logprobs : (N, k) teacher log-probs at the stored temperature (any floating dtype).
    topk_indices : (N, k) int64 or int32, unique per row (rows whose target is ignore_index
        may hold anything: they are not used).
    target : (N,) int64 or None.
    grad_student : (N, V) buffer in the student's dtype, or None; it may alias ``student``.
    terms : (N, 2) buffer or None; receives the unweighted (CE, D) of every row (CE 0 without
        a target, both 0 for ignored rows), evaluated even where a weight is 0.
    args : `fastkd._kernel_args.KernelArgs`, the scalars as for `dense_kd_rows`, and:
        renormalize, tail "renormalize" (else "bucket"); teacher_scale, the factor on the
        stored log-probs (re-tempering ``T_stored / T``; the renormalised tail then
        renormalises them).

    Returns
    -------
    rows : (N,) float32 (float64 for float64 students); ignored rows are 0 with 0 gradient.
    """
    temperature, ce_weight, div_weight = args.temperature, args.ce_weight, args.div_weight
    n, vocab = student.shape
    compute = torch.float64 if student.dtype == torch.float64 else torch.float32
    rows = torch.empty(n, dtype=compute, device=student.device)
    div_value = div_weight != 0.0 or terms is not None
    ce_value = target is not None and (ce_weight != 0.0 or terms is not None)
    chunk = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        z_s, dcap_s = _capped(student[start:stop].to(compute), args.softcap)
        loss = torch.zeros(stop - start, 1, dtype=compute, device=student.device)
        d_zs = torch.zeros_like(z_s) if grad_student is not None else None
        valid = None
        if target is not None:
            y = target[start:stop]
            valid = (y != args.ignore_index).unsqueeze(-1)
        d = ce = torch.zeros_like(loss)
        if div_value:
            logprobs, indices = _readable_rows(topk_logprobs[start:stop].to(compute),
                                               topk_indices[start:stop].long(), valid)
            d, g_a = _sparse_divergence_and_grad(
                z_s / temperature, logprobs * args.teacher_scale, indices, args.divergence,
                args.param_a, args.renormalize, d_zs is not None and div_weight != 0.0)
            loss = loss + div_weight * d
            if d_zs is not None and div_weight != 0.0:
                d_zs = d_zs + (div_weight / temperature) * g_a
        if ce_value:
            ce, g_ce = _cross_entropy_and_grad(z_s, torch.where(valid[:, 0], y, 0),
                                               args.label_smoothing)
            loss = loss + ce_weight * ce
            if d_zs is not None and ce_weight != 0.0:
                d_zs = d_zs + ce_weight * g_ce
        store_chunk(start, stop, loss, ce, d, valid, rows, terms, grad_student, d_zs, dcap_s)
    return rows

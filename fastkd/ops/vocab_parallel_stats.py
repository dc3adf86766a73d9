"""Per-shard maths of the vocab-parallel distillation loss (pure PyTorch, no communication).

Each rank holds the logits of a contiguous vocabulary slice. The loss of docs/semantics.md §1 needs
only per-row global quantities, built from per-row partial statistics of every slice:

  phase 1 (every divergence): per slice, for a = cap(z)/T of student and teacher and for
    z = cap(s) at T=1 (CE), the local max `m` and `S = sum exp(a - m)`; for kl the cross sum
    `W = sum exp(a_t - m_t) * ((a_t - m_t) - (a_s - m_s))` (reverse_kl: s and t swapped);
    the target's logit if the target lies in this slice (else 0); the slice's sum of logits
    (label smoothing). `combine_stats` merges the `[world, N, k]` gather with the
    max-rescaling trick into global log-sum-exps, the kl / reverse_kl value, CE's terms.
  phase 2 (jsd, tvd only): those need normalised probabilities, so each slice sums
    p*(log p - log m) (jsd) or |p_s - p_t|, <p_s, g>, <p_t, g> (tvd) given the global
    log-sum-exps; the caller sums these `[N, c]` partials over ranks.
  gradient: with the global statistics each slice's gradient is local (no communication):
    the formulas of `fastkd.reference.dense` with the global normalisers (the kl /
    reverse_kl bracket log p - log q - KL reuses the statistics' local differences, so it
    cancels as exactly as the single-process formula, see `_combine_kl`).

Arithmetic over [N, V_local] is float32 (float64 for float64 inputs), chunked over rows;
the per-row combination of the gathered statistics is float64.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from ..reference.dense import (
    CHUNK_ELEMENTS,
    JSD,
    KL,
    REVERSE_KL,
    TVD,
    _capped,
    _masked,
    _xlogy_diff,
    store_chunk,
)


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float64, else float32."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def stat_names(has_div: bool, divergence: int, has_ce: bool, label_smoothing: float,
               temperature: float) -> tuple:
    """Column names of the phase-1 statistics for these options (same on every rank).
    has_div / has_ce: whether the divergence / CE is computed (weighted, or for `terms`)."""
    names = []
    if has_div:
        names += ["m_s", "S_s", "m_t", "S_t"]
        if divergence in (KL, REVERSE_KL):
            names.append("W")
    if has_ce:
        if not (has_div and temperature == 1.0):  # at T=1 the CE lse is the student's lse
            names += ["m_z", "S_z"]
        names.append("z_y")
        if label_smoothing > 0.0:
            names.append("sum_z")
    return tuple(names)


def phase2_width(has_div: bool, divergence: int) -> int:
    """Columns of the phase-2 partial sums (0: no second collective)."""
    if not has_div:
        return 0
    return {JSD: 2, TVD: 3}.get(divergence, 0)


def _local_max_sumexp(a: torch.Tensor):
    """(n, v) -> (shift (n, 1) finite, S (n, 1), e = exp(a - shift)); S = 0 for an all--inf
    (or empty) slice, whose shift is 0 so nothing turns into NaN."""
    if a.shape[-1] == 0:
        zero = a.new_zeros(a.shape[0], 1)
        return zero, zero, a
    m = a.amax(-1, keepdim=True)
    shift = torch.where(torch.isfinite(m), m, 0.0)
    e = torch.exp(a - shift)
    return shift, e.sum(-1, keepdim=True), e


def _cross_sum(e_p, a_p, shift_p, a_q, shift_q):
    """sum exp(a_p - m_p) * ((a_p - m_p) - (a_q - m_q)) over entries where e_p > 0."""
    diff = (a_p - shift_p) - (a_q - shift_q)
    return torch.where(e_p > 0, e_p * diff, 0.0).sum(-1, keepdim=True)


def _local_target_logit(z, y, vocab_start_index):
    """z[y - start] where the (global) target lies in this slice, else 0. y: (n,)."""
    if z.shape[-1] == 0:
        return z.new_zeros(z.shape[0], 1)
    local = y - vocab_start_index
    inside = (local >= 0) & (local < z.shape[-1])
    picked = z.gather(-1, torch.where(inside, local, 0).unsqueeze(-1))
    return torch.where(inside.unsqueeze(-1), picked, 0.0)


def _chunk_stats(z_s, z_t, y, names, temperature, divergence, vocab_start_index):
    cols: Dict[str, torch.Tensor] = {}
    if "m_s" in names:
        a_s, a_t = z_s / temperature, z_t / temperature
        cols["m_s"], cols["S_s"], e_s = _local_max_sumexp(a_s)
        cols["m_t"], cols["S_t"], e_t = _local_max_sumexp(a_t)
        if divergence == KL:
            cols["W"] = _cross_sum(e_t, a_t, cols["m_t"], a_s, cols["m_s"])
        elif divergence == REVERSE_KL:
            cols["W"] = _cross_sum(e_s, a_s, cols["m_s"], a_t, cols["m_t"])
    if "m_z" in names:
        cols["m_z"], cols["S_z"], _ = _local_max_sumexp(z_s)
    if "z_y" in names:
        cols["z_y"] = _local_target_logit(z_s, y, vocab_start_index)
    if "sum_z" in names:
        cols["sum_z"] = z_s.sum(-1, keepdim=True)
    return torch.cat([cols[k] for k in names], dim=-1)


def _row_chunks(n: int, vocab: int):
    chunk = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def shard_stats(student, teacher, target, names, temperature, divergence, softcap,
                vocab_start_index) -> torch.Tensor:
    """Phase 1. student, teacher: (N, V_local); target: (N,) global labels or None.
    Returns (N, len(names)) in the compute dtype."""
    n, vocab = student.shape
    compute = compute_dtype(student.dtype, teacher.dtype)
    out = torch.empty(n, len(names), dtype=compute, device=student.device)
    need_teacher = "m_t" in names
    for start, stop in _row_chunks(n, vocab):
        z_s, _ = _capped(student[start:stop].to(compute), softcap)
        z_t = _capped(teacher[start:stop].to(compute), softcap)[0] if need_teacher else None
        y = None if target is None else target[start:stop]
        out[start:stop] = _chunk_stats(z_s, z_t, y, names, temperature, divergence,
                                       vocab_start_index)
    return out


def _combine_lse(m, S):
    """Per-rank (shift, sum-exp) pairs, both (W, N, 1) -> global log-sum-exp, rescaled total
    and global max, each (N, 1)."""
    live = S > 0
    top = torch.where(live, m, -math.inf).amax(0)
    top = torch.where(torch.isfinite(top), top, 0.0)
    total = torch.where(live, torch.exp(m - top) * S, 0.0).sum(0)
    return top + torch.log(total), total, top


def _combine_kl(col, own, p: str, q: str, tops, totals):
    """KL(p||q) per row (N, 1) from every rank's cross sum W, and this rank's `bracket`
    offset (N, 1): log p_p - log p_q - KL = x + bracket on this slice, where
    x = (a_p - m_p) - (a_q - m_q) is the local difference the statistics summed.

    Uses KL = E_p[(a_p - M_p) - (a_q - M_q)] - log total_p + log total_q (M: global maxima,
    total: rescaled sum-exps), whose terms are O(logit range): no cancellation between large
    log-sum-exps. Taking the gradient's bracket from the same rounded x makes it cancel
    exactly where the single-process formula does (a one-hot p at |logits| ~ 1e4)."""
    s_p = col["S_" + p]
    rel = {x: col["m_" + x] - tops[x] for x in (p, q)}
    offset = torch.where(s_p > 0, s_p * (rel[p] - rel[q]), 0.0)
    factor = torch.where(s_p > 0, torch.exp(rel[p]), 0.0)
    cross = torch.where(factor > 0, factor * (col["W"] + offset), 0.0).sum(0)
    log_ratio = torch.log(totals[q]) - torch.log(totals[p])
    kl = cross / totals[p] + log_ratio
    own_rel = (own["m_" + p] - tops[p]) - (own["m_" + q] - tops[q])
    return kl, own_rel + log_ratio - kl


def combine_stats(gathered: torch.Tensor, own: torch.Tensor, names,
                  divergence: int) -> Dict[str, torch.Tensor]:
    """gathered: (W, N, k) phase-1 statistics of every rank; own: (N, k) this rank's.
    Returns per-row globals, each (N, 1): logz_s, logz_t (of cap(z)/T), logz_z (of cap(s)),
    d and this rank's bracket (kl / reverse_kl, see `_combine_kl`), z_y, sum_z.

    Combined in float64 (a few ops per row, negligible next to the [N, V] passes): the
    rescaled cross sums then add up exactly, so the kl value carries one rounding."""
    out_dtype = gathered.dtype
    gathered, own = gathered.to(torch.float64), own.to(torch.float64)
    col = {k: gathered[..., i:i + 1] for i, k in enumerate(names)}
    out: Dict[str, torch.Tensor] = {}
    if "m_s" in col:
        tops, totals = {}, {}
        for x in ("s", "t"):
            logz, totals[x], tops[x] = _combine_lse(col["m_" + x], col["S_" + x])
            out["logz_" + x] = logz
        if divergence in (KL, REVERSE_KL):
            p, q = ("t", "s") if divergence == KL else ("s", "t")
            own_col = {k: own[:, i:i + 1] for i, k in enumerate(names)}
            out["d"], out["bracket"] = _combine_kl(col, own_col, p, q, tops, totals)
            out["m_s"], out["m_t"] = own_col["m_s"], own_col["m_t"]
    if "z_y" in col:
        if "m_z" in col:
            out["logz_z"] = _combine_lse(col["m_z"], col["S_z"])[0]
        else:
            out["logz_z"] = out["logz_s"]
        out["z_y"] = col["z_y"].sum(0)
    if "sum_z" in col:
        out["sum_z"] = col["sum_z"].sum(0)
    return {k: v.to(out_dtype) for k, v in out.items()}


def _log_probs(z_s, z_t, temperature, glob):
    logp_s = z_s / temperature - glob["logz_s"]
    logp_t = z_t / temperature - glob["logz_t"]
    return logp_s, logp_t, logp_s.exp(), logp_t.exp()


def _log_mixture(logp_s, logp_t, beta):
    """log(beta * p_t + (1 - beta) * p_s), in log space for accuracy."""
    return torch.logaddexp(logp_t + math.log(beta), logp_s + math.log1p(-beta))


def _chunk_phase2(z_s, z_t, temperature, divergence, beta, glob):
    logp_s, logp_t, p_s, p_t = _log_probs(z_s, z_t, temperature, glob)
    if divergence == JSD:
        logm = _log_mixture(logp_s, logp_t, beta)
        return torch.cat([_xlogy_diff(p_t, logp_t, logm), _xlogy_diff(p_s, logp_s, logm)], -1)
    diff = p_s - p_t
    g = 0.5 * torch.sign(diff)
    return torch.cat([diff.abs().sum(-1, keepdim=True), (p_s * g).sum(-1, keepdim=True),
                      (p_t * g).sum(-1, keepdim=True)], -1)


def shard_phase2_sums(student, teacher, temperature, divergence, beta, softcap,
                      glob) -> torch.Tensor:
    """Phase 2 (jsd: [KL(p_t||m), KL(p_s||m)]; tvd: [sum|p_s-p_t|, <p_s,g>, <p_t,g>]) partial
    sums over this slice, (N, 2 or 3); the caller sums them over ranks."""
    n, vocab = student.shape
    compute = compute_dtype(student.dtype, teacher.dtype)
    out = torch.empty(n, phase2_width(True, divergence), dtype=compute, device=student.device)
    for start, stop in _row_chunks(n, vocab):
        z_s, _ = _capped(student[start:stop].to(compute), softcap)
        z_t, _ = _capped(teacher[start:stop].to(compute), softcap)
        rows = {k: v[start:stop] for k, v in glob.items()}
        out[start:stop] = _chunk_phase2(z_s, z_t, temperature, divergence, beta, rows)
    return out


def attach_phase2(glob: Dict[str, torch.Tensor], sums: torch.Tensor, divergence: int,
                  beta: float) -> None:
    """Stores the rank-summed phase-2 sums (N, c) and the divergence value in `glob`."""
    if divergence == JSD:
        glob["kl_t"], glob["kl_s"] = sums[:, 0:1], sums[:, 1:2]
        glob["d"] = beta * glob["kl_t"] + (1.0 - beta) * glob["kl_s"]
    else:
        glob["d"] = 0.5 * sums[:, 0:1]
        glob["ps_g"], glob["pt_g"] = sums[:, 1:2], sums[:, 2:3]


def _kl_bracket(z_p, z_q, temperature, glob, p: str):
    """log p_p - log p_q - KL(p||q) on this slice, from the same local differences the
    statistics summed (see `_combine_kl`)."""
    q = "t" if p == "s" else "s"
    x = (z_p / temperature - glob["m_" + p]) - (z_q / temperature - glob["m_" + q])
    return x + glob["bracket"]


def _divergence_grads(z_s, z_t, temperature, divergence, beta, glob, need_teacher):
    """dD/da_s and dD/da_t (or None) on this slice, given the global row statistics."""
    logp_s, logp_t, p_s, p_t = _log_probs(z_s, z_t, temperature, glob)
    grad_t = None
    if divergence == KL:
        grad_s = p_s - p_t
        if need_teacher:
            grad_t = torch.where(p_t > 0, p_t * _kl_bracket(z_t, z_s, temperature, glob, "t"),
                                 0.0)
    elif divergence == REVERSE_KL:
        grad_s = torch.where(p_s > 0, p_s * _kl_bracket(z_s, z_t, temperature, glob, "s"), 0.0)
        if need_teacher:
            grad_t = p_t - p_s
    elif divergence == JSD:
        logm = _log_mixture(logp_s, logp_t, beta)
        grad_s = (1.0 - beta) * torch.where(p_s > 0, p_s * (logp_s - logm - glob["kl_s"]), 0.0)
        if need_teacher:
            grad_t = beta * torch.where(p_t > 0, p_t * (logp_t - logm - glob["kl_t"]), 0.0)
    else:
        g = 0.5 * torch.sign(p_s - p_t)
        grad_s = p_s * (g - glob["ps_g"])
        if need_teacher:
            grad_t = p_t * (glob["pt_g"] - g)
    return grad_s, grad_t


def _ce_rows_and_grad(z_s, y, glob, label_smoothing, vocab_start_index, vocab_size):
    """CE per row (N, 1) and dCE/dcap(s) on this slice; vocab_size is the GLOBAL size."""
    ce = glob["logz_z"] - (1.0 - label_smoothing) * glob["z_y"]
    grad = torch.exp(z_s - glob["logz_z"])
    local = y - vocab_start_index
    inside = (local >= 0) & (local < z_s.shape[-1])
    if z_s.shape[-1]:
        hit = torch.where(inside, -(1.0 - label_smoothing), 0.0).to(grad.dtype).unsqueeze(-1)
        grad = grad.scatter_add(-1, torch.where(inside, local, 0).unsqueeze(-1), hit)
    if label_smoothing > 0.0:
        ce = ce - label_smoothing * glob["sum_z"] / vocab_size
        grad = grad - label_smoothing / vocab_size
    return ce, grad


def shard_rows_and_grads(student, teacher, target, grad_student, grad_teacher, glob,
                         temperature, ce_weight, div_weight, divergence, beta, ignore_index,
                         label_smoothing, softcap, vocab_start_index,
                         vocab_size: Optional[torch.Tensor], terms=None) -> torch.Tensor:
    """Per-row loss (N,) (identical on every rank) and this slice's gradients, written into
    grad_student / grad_teacher ((N, V_local) or None). vocab_size: global V (0-dim tensor).
    terms: None or (N, 2): the unweighted CE and divergence of each row are written there
    (0 for ignored rows; CE 0 without target); `glob` must then hold both terms' statistics
    (`stat_names(..., want_terms=True)`)."""
    n, vocab = student.shape
    compute = compute_dtype(student.dtype, teacher.dtype)
    rows = torch.empty(n, dtype=compute, device=student.device)
    want_terms = terms is not None
    has_ce = target is not None and (ce_weight != 0.0 or want_terms)
    has_div = div_weight != 0.0 or want_terms
    need_grads = div_weight != 0.0 and (grad_student is not None or grad_teacher is not None)
    for start, stop in _row_chunks(n, vocab):
        part = {k: v[start:stop] for k, v in glob.items()}
        z_s, dcap_s = _capped(student[start:stop].to(compute), softcap)
        loss = torch.zeros(stop - start, 1, dtype=compute, device=student.device)
        ce_term = div_term = torch.zeros_like(loss)
        d_zs = torch.zeros_like(z_s) if grad_student is not None else None
        d_zt = None
        if has_div:
            div_term = part["d"]
            if div_weight != 0.0:
                loss = loss + div_weight * div_term
            z_t, dcap_t = _capped(teacher[start:stop].to(compute), softcap)
            if need_grads:
                g_as, g_at = _divergence_grads(z_s, z_t, temperature, divergence, beta, part,
                                               grad_teacher is not None)
                if d_zs is not None:
                    d_zs = d_zs + (div_weight / temperature) * g_as
                if g_at is not None:
                    d_zt = (div_weight / temperature) * g_at
                    d_zt = d_zt * dcap_t if dcap_t is not None else d_zt
        valid = None
        if target is not None:
            y = target[start:stop]
            valid = (y != ignore_index).unsqueeze(-1)
            if has_ce:
                ce_term, g_ce = _ce_rows_and_grad(z_s, y, part, label_smoothing,
                                                  vocab_start_index, vocab_size)
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

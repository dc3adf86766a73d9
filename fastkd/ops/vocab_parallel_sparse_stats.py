"""Per-shard maths of the vocab-parallel top-k (offline) teacher loss (no communication).

The top-k loss (its reference: `fastkd.reference.sparse`) needs, per row, the student's
log-probabilities `log q` at the k teacher indices and of the tail bucket (the columns not in
the top-k), all over the GLOBAL vocabulary. Each rank holds the student logits of one
vocabulary slice and the (replicated) top-k teacher with GLOBAL indices; it contributes
per-row statistics:

    m_a, S_a      local max / sum-exp of a = cap(s) / T          -> global log Z
    m_u, S_u      the same over the slice's columns not in the top-k -> global tail lse
    n_u           how many of the slice's columns are not in the top-k (k == V detection)
    m_z, S_z      of cap(s) at T = 1 (CE; omitted when T == 1: then a = cap(s))
    z_y, sum_z    the target's logit if in this slice (else 0), the slice's sum (smoothing)
    a_1..a_k      a at the top-k indices in this slice, 0 for indices elsewhere

Summed or max-combined over ranks they give exactly the quantities the single-process
reference computes; the divergence over the k + 1 categories and its gradient
g = dD/dlog q are then computed identically on every rank (they are per-row values), and
each rank's gradient slice follows locally:

    dD/da_v = g_j [v = idx_j] + g_tail * exp(a_v - lse_tail) [v uncovered] - G * softmax(a)_v
"""

from __future__ import annotations

import math
from typing import Dict

import torch

from ..reference.dense import CHUNK_ELEMENTS, _capped, store_chunk
from ..reference.sparse import _category_divergence, _teacher_categories
from .vocab_parallel_stats import (
    _ce_rows_and_grad,
    _combine_lse,
    _local_max_sumexp,
    _local_target_logit,
    compute_dtype,
)


def sparse_stat_names(has_div: bool, has_ce: bool, label_smoothing: float,
                      temperature: float, k: int) -> tuple:
    """Column names of the statistics (same on every rank for the same options)."""
    names = []
    if has_div:
        names += ["m_a", "S_a", "m_u", "S_u", "n_u"]
    if has_ce:
        if not (has_div and temperature == 1.0):
            names += ["m_z", "S_z"]
        names.append("z_y")
        if label_smoothing > 0.0:
            names.append("sum_z")
    if has_div:
        names += [f"a_{j}" for j in range(k)]
    return tuple(names)


def _covered_mask(inside, safe, vocab: int) -> torch.Tensor:
    """(c, V_local) bool: columns of this slice that are top-k entries."""
    hits = torch.zeros(safe.shape[0], max(vocab, 1), dtype=torch.int32, device=safe.device)
    hits.scatter_add_(-1, safe, inside.to(torch.int32))
    return hits[:, :vocab] > 0


def sparse_shard_stats(student, indices, target, names, temperature, softcap,
                       vocab_start_index) -> torch.Tensor:
    """student (N, V_local), indices (N, k) global int64, target (N,) | None ->
    (N, len(names)) statistics in the compute dtype."""
    n, vocab = student.shape
    compute = compute_dtype(student.dtype)
    out = torch.empty(n, len(names), dtype=compute, device=student.device)
    chunk = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        z, _ = _capped(student[start:stop].to(compute), softcap)
        cols: Dict[str, torch.Tensor] = {}
        if "m_a" in names:
            a = z / temperature
            idx = indices[start:stop]
            inside = ((idx >= vocab_start_index) & (idx < vocab_start_index + vocab))
            safe = torch.where(inside, idx - vocab_start_index, 0)
            covered = _covered_mask(inside, safe, vocab)
            cols["m_a"], cols["S_a"], _ = _local_max_sumexp(a)
            cols["m_u"], cols["S_u"], _ = _local_max_sumexp(a.masked_fill(covered, -math.inf))
            cols["n_u"] = (~covered).sum(-1, keepdim=True).to(compute)
            picked = a.gather(-1, safe) if vocab else torch.zeros_like(safe, dtype=compute)
            a_idx = torch.where(inside, picked, 0.0)
        if "m_z" in names:
            cols["m_z"], cols["S_z"], _ = _local_max_sumexp(z)
        if "z_y" in names:
            cols["z_y"] = _local_target_logit(z, target[start:stop], vocab_start_index)
        if "sum_z" in names:
            cols["sum_z"] = z.sum(-1, keepdim=True)
        parts = [cols[k] for k in names if not k.startswith("a_")]
        if "m_a" in names:
            parts.append(a_idx)
        out[start:stop] = torch.cat(parts, dim=-1)
    return out


def combine_sparse_stats(gathered: torch.Tensor, names, topk_logprobs: torch.Tensor,
                         divergence: int, beta: float, renormalize: bool,
                         compute: torch.dtype) -> Dict[str, torch.Tensor]:
    """gathered (W, N, k') statistics of every rank -> per-row globals: logz, lse_tail,
    d (N, 1) and g (N, k + 1) = dD/dlog q; logz_z, z_y, sum_z for CE."""
    col = {k: gathered[..., i:i + 1] for i, k in enumerate(names) if not k.startswith("a_")}
    out: Dict[str, torch.Tensor] = {}
    if "m_a" in col:
        first = names.index("a_0")
        out["logz"] = _combine_lse(col["m_a"], col["S_a"])[0]
        out["lse_tail"] = _combine_lse(col["m_u"], col["S_u"])[0]
        a_idx = gathered[..., first:].sum(0)
        logq = torch.cat([a_idx, out["lse_tail"]], dim=-1) - out["logz"]
        logp = _teacher_categories(topk_logprobs.to(compute), renormalize, -1)
        if not renormalize:  # k == V (nothing uncovered anywhere): no teacher tail either
            none_left = col["n_u"].sum(0) == 0
            logp[:, -1:] = torch.where(none_left, -math.inf, logp[:, -1:])
        out["d"], out["g"] = _category_divergence(logp, logq, divergence, beta, renormalize)
    if "z_y" in col:
        out["logz_z"] = (_combine_lse(col["m_z"], col["S_z"])[0] if "m_z" in col
                         else out["logz"])
        out["z_y"] = col["z_y"].sum(0)
    if "sum_z" in col:
        out["sum_z"] = col["sum_z"].sum(0)
    return out


def sparse_shard_rows_and_grads(student, indices, target, grad_student, glob, temperature,
                                ce_weight, div_weight, ignore_index, label_smoothing, softcap,
                                vocab_start_index, vocab_size, terms=None) -> torch.Tensor:
    """Per-row loss (N,) (the same on every rank); this slice's gradient into grad_student
    ((N, V_local) or None); the unweighted (CE, D) into terms ((N, 2) or None)."""
    n, vocab = student.shape
    compute = compute_dtype(student.dtype)
    rows = torch.empty(n, dtype=compute, device=student.device)
    chunk = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        part = {k: v[start:stop] for k, v in glob.items()}
        z, dcap = _capped(student[start:stop].to(compute), softcap)
        loss = torch.zeros(stop - start, 1, dtype=compute, device=student.device)
        ce_term = div_term = torch.zeros_like(loss)
        d_z = torch.zeros_like(z) if grad_student is not None else None
        if "d" in part:
            div_term = part["d"]
            if div_weight != 0.0:
                loss = loss + div_weight * div_term
                if d_z is not None:
                    d_z = d_z + (div_weight / temperature) * _divergence_grad(
                        z / temperature, indices[start:stop], part, vocab_start_index)
        valid = None
        if target is not None:
            y = target[start:stop]
            valid = (y != ignore_index).unsqueeze(-1)
            if "z_y" in part:
                ce_term, g_ce = _ce_rows_and_grad(z, y, part, label_smoothing,
                                                  vocab_start_index, vocab_size)
                if ce_weight != 0.0:
                    loss = loss + ce_weight * ce_term
                    if d_z is not None:
                        d_z = d_z + ce_weight * g_ce
        store_chunk(start, stop, loss, ce_term, div_term, valid, rows, terms, grad_student,
                    d_z, dcap)
    return rows


def _divergence_grad(a, indices, glob, vocab_start_index) -> torch.Tensor:
    """dD/da on this slice (c, V_local) from the per-row g = dD/dlog q (c, k + 1)."""
    vocab = a.shape[-1]
    g = glob["g"]
    k = g.shape[-1] - 1
    grad = torch.exp(a - glob["logz"]) * (-g.sum(-1, keepdim=True))
    if vocab == 0:
        return grad
    inside = (indices >= vocab_start_index) & (indices < vocab_start_index + vocab)
    safe = torch.where(inside, indices - vocab_start_index, 0)
    covered = _covered_mask(inside, safe, vocab)
    grad = grad.scatter_add(-1, safe, torch.where(inside, g[:, :k], 0.0))
    tail = glob["lse_tail"]
    safe_tail = torch.where(torch.isfinite(tail), tail, 0.0)
    tail_share = torch.exp(a.masked_fill(covered, -math.inf) - safe_tail)
    return grad + tail_share * g[:, k:]

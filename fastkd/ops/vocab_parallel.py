"""Vocab-parallel kernel: per-shard statistics, the collectives, the local gradient slice.

`vocab_parallel_kd_rows` has the dense kernel contract (`fastkd.reference.dense_kd_rows`)
once its communication arguments are bound, so the shared `DenseDistillationFunction`
serves it: the forward pass writes this rank's gradient slice (computed from the global
per-row statistics), and backward is a per-row rescale with NO communication, for every
divergence and CE (the cost: the gradient slice is computed even if backward never runs).

Collectives per call (N rows, float32; float64 for float64 inputs):
  1. one `all_gather` of the (N + 1, k) phase-1 statistics (k = 3..9 columns, see
     `fastkd.reference.vocab_parallel.stat_names`); the extra row carries this rank's
     (vocab_start_index, V_local), so every rank learns the global vocabulary and checks
     the slices' layout without another collective.
  2. jsd and tvd only: one `all_reduce(SUM)` of (N, 2) (jsd) or (N, 3) (tvd) partial sums
     over the normalised probabilities.
Both exist on gloo and NCCL (no all_gather_into_tensor).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..reference.vocab_parallel import (
    attach_phase2,
    combine_stats,
    phase2_width,
    shard_phase2_sums,
    shard_rows_and_grads,
    shard_stats,
    stat_names,
)


def _all_gather_stacked(local: torch.Tensor, group) -> torch.Tensor:
    """(R, k) on every rank -> (world, R, k), identical on every rank."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.stack(parts)


def check_vocab_layout(layout: torch.Tensor, target: Optional[torch.Tensor],
                       ignore_index: int) -> None:
    """layout: (world, 2) rows of (vocab_start_index, V_local) of every rank.

    Eager only (one host sync, replacing the label-range check of the dense loss). The data
    is identical on every rank, so every rank raises the same error: none is left waiting
    in a later collective."""
    starts, sizes = layout[:, 0], layout[:, 1]
    order = torch.argsort(starts)
    tiled_starts = torch.cumsum(sizes[order], 0) - sizes[order]
    gaps = (starts[order] != tiled_starts).any()
    vocab = sizes.sum()
    if target is None or target.numel() == 0:
        bad_any = torch.zeros((), dtype=torch.bool, device=layout.device)
    else:
        bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
        bad_any = bad.any()
    layout_bad, target_bad = torch.stack([gaps, bad_any]).tolist()
    if layout_bad:
        slices = [(int(a), int(a) + int(b)) for a, b in layout.tolist()]
        raise ValueError("vocab_start_index: the ranks' slices [vocab_start_index, "
                         "vocab_start_index + V_local) must tile [0, V) without gap or overlap;"
                         f" got {slices} (rank order)")
    if target_bad:
        first = target[bad][0].item()
        raise ValueError(f"target holds label {first} outside the global vocabulary "
                         f"[0, {int(vocab.item())}) that is not ignore_index={ignore_index}")


def vocab_parallel_kd_rows(student, teacher, target, grad_student, grad_teacher,
                           temperature, ce_weight, div_weight, divergence, beta, ignore_index,
                           label_smoothing, softcap, *, vocab_start_index: int, group=None,
                           check: bool = True) -> torch.Tensor:
    """Dense-kernel contract on a vocabulary slice (bind the keywords with functools.partial).

    student, teacher: (N, V_local) slices of the global (N, V) logits starting at column
    vocab_start_index; target: (N,) GLOBAL labels, replicated on every rank, or None.
    Returns the global per-row loss (N,), the same on every rank; grad_* get this slice's
    gradient. Must be called by every rank of `group` with the same N and options."""
    has_div = div_weight != 0.0
    has_ce = target is not None and ce_weight != 0.0
    names = stat_names(has_div, divergence, has_ce, label_smoothing, temperature)
    local = shard_stats(student, teacher, target, names, temperature, divergence, softcap,
                        vocab_start_index)
    # One more row with this rank's slice, padded to the statistics' width (k >= 3).
    layout_row = local.new_zeros(1, local.shape[1])
    layout_row[0, 0], layout_row[0, 1] = float(vocab_start_index), float(student.shape[1])
    gathered = _all_gather_stacked(torch.cat([local, layout_row]), group)
    layout = gathered[:, -1, :2]
    if check:
        check_vocab_layout(layout, target, ignore_index)
    glob = combine_stats(gathered[:, :-1], local, names, divergence)
    if phase2_width(has_div, divergence):
        sums = shard_phase2_sums(student, teacher, temperature, divergence, beta, softcap, glob)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        attach_phase2(glob, sums, divergence, beta)
    return shard_rows_and_grads(student, teacher, target, grad_student, grad_teacher, glob,
                                temperature, ce_weight, div_weight, divergence, beta,
                                ignore_index, label_smoothing, softcap, vocab_start_index,
                                layout[:, 1].sum())

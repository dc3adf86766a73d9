"""Vocab-parallel kernel: per-shard statistics, the collectives, the local gradient slice.

`vocab_parallel_kd_rows` has the dense kernel contract (`fastkd.reference.dense_kd_rows`)
once its communication arguments are bound, so the shared `DenseDistillationFunction`
serves it: the forward pass writes this rank's gradient slice (computed from the global
per-row statistics), and backward is a per-row rescale with NO communication, for every
divergence and CE (the cost: the gradient slice is computed even if backward never runs).

Collectives per call (N rows, float32; float64 for float64 inputs) of the dense kernel:
  1. one `all_gather` of the (N + 1, k) phase-1 statistics (k = 3..9 columns, see
     `fastkd.ops.vocab_parallel_stats.stat_names`); the extra row carries this rank's
     (vocab_start_index, V_local), so every rank learns the global vocabulary and checks
     the slices' layout without another collective.
  2. jsd and tvd only: one `all_reduce(SUM)` of (N, 2) (jsd) or (N, 3) (tvd) partial sums
     over the normalised probabilities.
Both exist on gloo and NCCL (no all_gather_into_tensor).
The top-k kernel `vocab_parallel_sparse_kd_rows` needs one all_gather of (N + 1, c + k)
statistics (c = 5..9 columns, `fastkd.ops.vocab_parallel_sparse_stats`) and nothing else.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.distributed as dist

from .._kernel_args import KernelArgs
from .dense import consume_once, new_gradient, scale_rows_
from .vocab_parallel_sparse_stats import (
    combine_sparse_stats,
    sparse_shard_rows_and_grads,
    sparse_shard_stats,
    sparse_stat_names,
)
from .vocab_parallel_stats import (
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
                       ignore_index: int, indices: Optional[torch.Tensor] = None) -> None:
    """layout: (world, 2) rows of (vocab_start_index, V_local) of every rank; indices: the
    top-k teacher's global indices or None.

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
    index_bad = torch.zeros((), dtype=torch.bool, device=layout.device)
    if indices is not None and indices.numel():
        index_bad = ((indices < 0) | (indices >= vocab)).any()
    layout_bad, target_bad, index_bad = torch.stack([gaps, bad_any, index_bad]).tolist()
    if layout_bad:
        slices = [(int(a), int(a) + int(b)) for a, b in layout.tolist()]
        raise ValueError("vocab_start_index: the ranks' slices [vocab_start_index, "
                         "vocab_start_index + V_local) must tile [0, V) without gap or overlap;"
                         f" got {slices} (rank order)")
    if target_bad:
        first = target[bad][0].item()
        raise ValueError(f"target holds label {first} outside the global vocabulary "
                         f"[0, {int(vocab.item())}) that is not ignore_index={ignore_index}")
    if index_bad:
        raise ValueError(f"teacher_topk_indices must lie in the global vocabulary "
                         f"[0, {int(vocab.item())}), got min {indices.min().item()}, "
                         f"max {indices.max().item()}")


def _gather_with_layout(local: torch.Tensor, vocab_start_index: int, local_vocab: int,
                        group):
    """Appends this rank's (vocab_start_index, V_local) as one more row (padded to the
    statistics' width, >= 2) and all-gathers: (world, N, k) statistics, (world, 2) layout."""
    width = max(local.shape[1], 2)
    if local.shape[1] < width:
        local = torch.cat([local, local.new_zeros(local.shape[0], width - local.shape[1])], 1)
    layout_row = local.new_zeros(1, width)
    layout_row[0, 0], layout_row[0, 1] = float(vocab_start_index), float(local_vocab)
    gathered = _all_gather_stacked(torch.cat([local, layout_row]), group)
    return gathered[:, :-1], gathered[:, -1, :2]


def _scalars(args: KernelArgs) -> tuple:
    """(temperature, ce_weight, div_weight, divergence, beta, ignore_index,
    label_smoothing, softcap) of the vocabulary-parallel maths (jsd's beta is param_a)."""
    return (args.temperature, args.ce_weight, args.div_weight, args.divergence, args.param_a,
            args.ignore_index, args.label_smoothing, args.softcap)


def vocab_parallel_kd_rows(student, teacher, target, grad_student, grad_teacher, terms,
                           args: KernelArgs, *, vocab_start_index: int,
                           group=None, check: bool = True,
                           checked_target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Dense-kernel contract on a vocabulary slice (bind the keywords with functools.partial).

    student, teacher: (N, V_local) slices of the global (N, V) logits starting at column
    vocab_start_index; target: (N,) GLOBAL labels, replicated on every rank, or None;
    terms: None or (N, 2) float32, receives the unweighted (CE, divergence) per row.
    Returns the global per-row loss (N,), the same on every rank; grad_* get this slice's
    gradient (grad_student may be student itself). Must be called by every rank of `group`
    with the same N and options. check: validate the slices' layout and the label range
    (of checked_target when given, e.g. all rows of a chunked caller; else of target)."""
    temperature, ce_weight, div_weight, divergence, beta, ignore_index, label_smoothing, \
        softcap = _scalars(args)
    want_terms = terms is not None
    has_div = div_weight != 0.0 or want_terms
    has_ce = target is not None and (ce_weight != 0.0 or want_terms)
    names = stat_names(has_div, divergence, has_ce, label_smoothing, temperature)
    local = shard_stats(student, teacher, target, names, temperature, divergence, softcap,
                        vocab_start_index)
    stats, layout = _gather_with_layout(local, vocab_start_index, student.shape[1], group)
    if check:
        check_vocab_layout(layout, target if checked_target is None else checked_target,
                           ignore_index)
    glob = combine_stats(stats[..., :len(names)], local, names, divergence)
    if phase2_width(has_div, divergence):
        sums = shard_phase2_sums(student, teacher, temperature, divergence, beta, softcap, glob)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        attach_phase2(glob, sums, divergence, beta)
    return shard_rows_and_grads(student, teacher, target, grad_student, grad_teacher, glob,
                                temperature, ce_weight, div_weight, divergence, beta,
                                ignore_index, label_smoothing, softcap, vocab_start_index,
                                layout[:, 1].sum(), terms)


def vocab_parallel_sparse_kd_rows(student, topk_logprobs, topk_indices, target, grad_student,
                                  terms, args: KernelArgs, *, vocab_start_index: int,
                                  group=None, check: bool = True) -> torch.Tensor:
    """Top-k kernel contract (`fastkd.reference.sparse.sparse_kd_rows`) on a vocabulary
    slice: student (N, V_local) columns [vocab_start_index, +V_local) of the global logits;
    topk_logprobs (N, k), topk_indices (N, k) GLOBAL int64 indices and target (N,) | None,
    replicated on every rank. One all_gather of (N + 1, c + k) statistics per call.
    Returns the global per-row loss (N,); grad_student gets this slice's gradient."""
    temperature, ce_weight, div_weight, divergence, beta, ignore_index, label_smoothing, \
        softcap = _scalars(args)
    if args.teacher_scale != 1.0:  # re-tempered; the renormalize tail renormalises the k
        topk_logprobs = (topk_logprobs.to(torch.promote_types(topk_logprobs.dtype,
                                                              torch.float32))
                         * args.teacher_scale)
    want_terms = terms is not None
    has_div = div_weight != 0.0 or want_terms
    has_ce = target is not None and (ce_weight != 0.0 or want_terms)
    names = sparse_stat_names(has_div, has_ce, label_smoothing, temperature,
                              topk_indices.shape[1])
    local = sparse_shard_stats(student, topk_indices, target, names, temperature, softcap,
                               vocab_start_index)
    stats, layout = _gather_with_layout(local, vocab_start_index, student.shape[1], group)
    if check:
        check_vocab_layout(layout, target, ignore_index, topk_indices)
    glob = combine_sparse_stats(stats[..., :len(names)], names, topk_logprobs, divergence,
                                beta, args.renormalize, local.dtype)
    return sparse_shard_rows_and_grads(student, topk_indices, target, grad_student, glob,
                                       temperature, ce_weight, div_weight, ignore_index,
                                       label_smoothing, softcap, vocab_start_index,
                                       layout[:, 1].sum(), terms)


class VocabParallelRowsFunction(torch.autograd.Function):
    """rows = call(grad_student, grad_teacher): the kernel writes this slice's gradients in
    the forward pass (no communication in backward, which rescales them per row)."""

    @staticmethod
    def forward(ctx, student, teacher, call: Callable, need_student: bool,
                need_teacher: bool, inplace_backward: bool):
        if need_student:
            grad_student = student if inplace_backward else new_gradient(student)
        else:
            grad_student = None
        grad_teacher = new_gradient(teacher) if need_teacher else None
        rows = call(grad_student, grad_teacher)
        ctx.save_for_backward(grad_student, grad_teacher)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):
        consume_once(ctx)
        grads = [None if g is None else scale_rows_(g, grad_rows) for g in ctx.saved_tensors]
        return grads[0], grads[1], None, None, None, None


def vocab_parallel_rows(student, teacher, call: Callable, teacher_differentiable: bool,
                        inplace_backward: bool = False) -> torch.Tensor:
    """(N,) rows of `call(grad_student, grad_teacher)`, differentiable in student (and in
    teacher when teacher_differentiable and it requires grad)."""
    grad_on = torch.is_grad_enabled()
    need_s = grad_on and student.requires_grad
    need_t = grad_on and teacher_differentiable and teacher.requires_grad
    if not (need_s or need_t):
        with torch.no_grad():
            return call(None, None)
    return VocabParallelRowsFunction.apply(student, teacher, call, need_s, need_t,
                                           inplace_backward)

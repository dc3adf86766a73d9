"""Vocab-parallel (tensor-parallel lm-head) distillation losses over `torch.distributed`.

Each rank of a process group holds one contiguous vocabulary slice
`[vocab_start_index, vocab_start_index + V_local)` of the student (and teacher) logits or
lm-head rows; slices may be uneven and in any rank order, but must tile `[0, V)`. Only
per-row statistics cross ranks (see `fastkd.ops.vocab_parallel` for the collectives); every
rank returns the same global loss, equal to the single-process loss on the concatenated
logits, and its backward gives the gradient of its own slice without communication.

Entry points: `vocab_parallel_distillation_loss` (logit shards),
`vocab_parallel_fused_linear_distillation_loss` (lm-head shards, logits never whole),
`vocab_parallel_sparse_distillation_loss` (top-k teacher). `fastkd.distillation_loss` and
`fastkd.fused_linear_distillation_loss` reach them for DTensor inputs sharded on the
vocabulary through `fastkd._dtensor` (the one routing module). Every rank of the group must
call them with the same leading shapes, targets and keywords. Semantics: `docs/semantics.md`.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist

from ._dispatch import CLASSIC_DIVERGENCES
from ._inputs import autocast_head
from ._options import LossOptions, TopKOptions, takes_options
from ._reduction import flat_target, host_reduction_weight, reduce_rows, valid_count
from ._validation import (
    TOPK_MASS_TOLERANCE,
    check_chunk_size,
    check_floating,
    check_logits_pair,
    check_target,
    check_topk_shapes,
)
from .ops.dense import autocast_off
from .ops.vocab_parallel import (
    vocab_parallel_kd_rows,
    vocab_parallel_rows,
    vocab_parallel_sparse_kd_rows,
)
from .ops.vocab_parallel_fused import agreed_chunk_rows, vocab_parallel_fused_rows
from .ops.vocab_parallel_stats import compute_dtype

__all__ = ["vocab_parallel_distillation_loss", "vocab_parallel_fused_linear_distillation_loss",
           "vocab_parallel_sparse_distillation_loss"]

def _check_vocab_parallel_divergence(divergence: str) -> None:
    """The vocab-parallel statistics exist for the classic divergences only (this round)."""
    if divergence not in CLASSIC_DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} has no vocab-parallel form yet (these "
                         f"losses take {CLASSIC_DIVERGENCES}); gather the logits and use "
                         "fastkd.distillation_loss for it")


def _check_vocab_start(vocab_start_index) -> None:
    if not isinstance(vocab_start_index, int) or isinstance(vocab_start_index, bool):
        raise TypeError(f"vocab_start_index must be an int, got {vocab_start_index!r}")
    if vocab_start_index < 0:
        raise ValueError(f"vocab_start_index must be >= 0, got {vocab_start_index}")


def _check_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("the vocab-parallel losses need an initialised torch.distributed "
                           "process group (dist.init_process_group)")


def _terms_buffer(n: int, dtypes: tuple, device, wanted: bool):
    if not wanted:
        return None
    return torch.empty(n, 2, dtype=compute_dtype(*dtypes), device=device)


def _finish(rows_or_total, terms, valid, reduction, num_items_in_batch, lead_shape,
            summed: bool = False, weight=None):
    """Reduces the loss (rows (N,), or an already summed scalar) and, with `terms`, the
    unweighted components the same way: loss or (loss, ce, divergence). `weight`: the rows
    already carry the reduction's factor (`host_reduction_weight`): the loss is their sum."""
    if weight is not None:
        loss = rows_or_total.sum()
    elif summed:
        loss = reduce_rows(rows_or_total.reshape(1), valid, reduction, num_items_in_batch,
                           lead_shape)
    else:
        loss = reduce_rows(rows_or_total, valid, reduction, num_items_in_batch, lead_shape)
    if terms is None:
        return loss
    parts = (reduce_rows(terms[:, i].contiguous(), valid, reduction, num_items_in_batch,
                         lead_shape).detach() for i in (0, 1))
    return (loss, *parts)


def _flat_logits(name: str, logits: torch.Tensor, inplace_backward: bool) -> torch.Tensor:
    flat = logits.reshape(-1, logits.shape[-1]).contiguous()
    if inplace_backward and flat.data_ptr() != logits.data_ptr():
        raise ValueError(f"inplace_backward=True needs {name} whose rows merge into one "
                         "contiguous (N, V_local) view; this tensor would be copied")
    return flat


@takes_options(LossOptions)
def vocab_parallel_distillation_loss(
    student_logits_shard: torch.Tensor,
    teacher_logits_shard: torch.Tensor,
    target: Optional[torch.Tensor],
    *,
    vocab_start_index: int,
    group=None,
    options: LossOptions,
    inplace_backward: bool = False,
    return_components: bool = False,
):
    """`fastkd.distillation_loss` with the vocabulary split over the ranks of `group`.

    Parameters
    ----------
    student_logits_shard, teacher_logits_shard : Tensor (..., V_local), floating
        This rank's columns [vocab_start_index, vocab_start_index + V_local) of the global
        logits.
    target : Tensor (...) of integer GLOBAL labels, identical on every rank, or None
    vocab_start_index : int
        First global vocabulary column of this rank's slice.
    group : ProcessGroup or None
        The ranks sharing the vocabulary (None: the default group). Every rank of it must
        call with the same leading shape, target and keywords.
    inplace_backward : bool
        Write the student gradient into `student_logits_shard`'s buffer.
    return_components : bool
        Also return the unweighted CE and divergence, detached and reduced like the loss.
    temperature, alpha, divergence, ..., num_items_in_batch
        As `fastkd.distillation_loss` (label smoothing spreads over the GLOBAL vocabulary;
        "mean" divides by the global count of non-ignored tokens).

    Returns
    -------
    Tensor
        The global loss (float32 scalar, or (...) for reduction="none"; float64 for float64
        inputs), the same on every rank; its backward gives this slice's gradient (the
        teacher's too when its shard requires grad). With return_components:
        (loss, ce, divergence).
    """
    check_logits_pair(student_logits_shard, teacher_logits_shard, target)
    reduction, num_items_in_batch = options.reduction, options.num_items_in_batch
    _check_vocab_start(vocab_start_index)
    _check_vocab_parallel_divergence(options.divergence)
    lead_shape, local_vocab = student_logits_shard.shape[:-1], student_logits_shard.shape[-1]
    if target is not None:
        # The label range needs the global vocabulary: checked after the statistics' gather.
        check_target(target, lead_shape, None, options.ignore_index)
    _check_process_group()

    student = _flat_logits("student_logits_shard", student_logits_shard, inplace_backward)
    teacher = teacher_logits_shard.reshape(-1, local_vocab).contiguous()
    labels = flat_target(target)
    valid = valid_count(labels, options.ignore_index)
    weight = host_reduction_weight(student, valid, reduction, num_items_in_batch)
    args = options.kernel_args(target is not None, weight)
    terms = _terms_buffer(student.shape[0], (student.dtype, teacher.dtype), student.device,
                          return_components)
    kernel = functools.partial(vocab_parallel_kd_rows, vocab_start_index=vocab_start_index,
                               group=group, check=not torch.compiler.is_compiling())

    def call(grad_student, grad_teacher):
        return kernel(student, teacher, labels, grad_student, grad_teacher, terms, args)

    with autocast_off(student.device):
        rows = vocab_parallel_rows(student, teacher, call, True, inplace_backward)
    return _finish(rows, terms, valid, reduction, num_items_in_batch, lead_shape,
                   weight=weight)


def _check_head_shard(prefix: str, hidden, weight, bias) -> None:
    """hidden (..., H), weight shard (V_local, H), bias shard (V_local,) | None."""
    check_floating(f"{prefix}_hidden", hidden)
    check_floating(f"{prefix}_weight_shard", weight)
    if hidden.dim() < 1:
        raise ValueError(f"{prefix}_hidden must have at least one dimension (..., H)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}_weight_shard must have shape (V_local, "
                         f"{hidden.shape[-1]}) like rows of nn.Linear.weight (H = "
                         f"{prefix}_hidden's last dimension), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}_weight_shard dtype {weight.dtype} must equal "
                        f"{prefix}_hidden dtype {hidden.dtype}")
    if bias is not None:
        check_floating(f"{prefix}_bias_shard", bias)
        if bias.shape != weight.shape[:1] or bias.dtype != weight.dtype:
            raise ValueError(f"{prefix}_bias_shard must have shape ({weight.shape[0]},) and "
                             f"dtype {weight.dtype}, got {tuple(bias.shape)} {bias.dtype}")


@takes_options(LossOptions)
def vocab_parallel_fused_linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight_shard: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight_shard: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    *,
    vocab_start_index: int,
    group=None,
    student_bias_shard: Optional[torch.Tensor] = None,
    teacher_bias_shard: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    options: LossOptions,
    return_components: bool = False,
):
    """`fastkd.fused_linear_distillation_loss` with both lm-heads split over the vocabulary.

    Parameters
    ----------
    student_hidden : Tensor (..., Hs), floating, replicated on every rank of `group`
    student_weight_shard : Tensor (V_local, Hs), rows [vocab_start_index, +V_local) of the
        student head (as `ColwiseParallel` shards an `nn.Linear`); student_bias_shard:
        (V_local,) or None.
    teacher_hidden : Tensor (..., Ht), replicated; teacher_weight_shard (V_local, Ht) and
        teacher_bias_shard (V_local,) | None: the SAME rows of the teacher head.
    target : Tensor (...) of integer GLOBAL labels, or None
    vocab_start_index : int
    group : ProcessGroup or None (the default group)
    chunk_size : int or None
        Rows of logits per chunk, the same on every rank (None: agreed by one all_reduce).
    return_components : bool
        Also return the unweighted CE and divergence (detached, reduced like the loss).
    temperature, alpha, divergence, ..., num_items_in_batch
        As `fastkd.distillation_loss`.

    Returns
    -------
    Tensor
        The global loss (float32; float64 for float64 inputs), the same on every rank.
        Backward: the FULL gradient of student_hidden on every rank (summed over the group,
        as ColwiseParallel's backward does) and this rank's weight / bias shard gradients.
        The teacher is a constant. Each rank holds at most one (chunk, V_local) block of
        logits per head; one all_gather of per-row statistics per chunk (jsd / tvd: one
        all_reduce more) and one all_reduce of the (N, Hs) hidden gradient per step.
    """
    reduction, num_items = options.reduction, options.num_items_in_batch
    _check_head_shard("student", student_hidden, student_weight_shard, student_bias_shard)
    _check_head_shard("teacher", teacher_hidden, teacher_weight_shard, teacher_bias_shard)
    lead_shape = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != lead_shape:
        raise ValueError(f"teacher_hidden leading shape {tuple(teacher_hidden.shape[:-1])} "
                         f"must equal student_hidden's {tuple(lead_shape)}")
    if teacher_weight_shard.shape[0] != student_weight_shard.shape[0]:
        raise ValueError(f"teacher_weight_shard has {teacher_weight_shard.shape[0]} rows but "
                         f"student_weight_shard has {student_weight_shard.shape[0]}; both "
                         "heads must be split at the same vocabulary rows")
    _check_vocab_start(vocab_start_index)
    _check_vocab_parallel_divergence(options.divergence)
    check_chunk_size(chunk_size)
    if target is not None:
        check_target(target, lead_shape, None, options.ignore_index)
    _check_process_group()
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    n, local_vocab = hidden.shape[0], student_weight_shard.shape[0]
    labels = flat_target(target)
    chunk = chunk_size or agreed_chunk_rows(n, local_vocab, hidden.element_size(),
                                            hidden.device, group)
    args = options.kernel_args(target is not None)
    kernel = functools.partial(vocab_parallel_kd_rows, vocab_start_index=vocab_start_index,
                               group=group)
    teacher = (teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight_shard,
               teacher_bias_shard)
    terms = _terms_buffer(n, (hidden.dtype, teacher_hidden.dtype), hidden.device,
                          return_components)
    # Under torch.autocast the head matmuls behave like nn.Linear's; the loss stays float32.
    hidden, s_weight, s_bias = autocast_head(hidden, student_weight_shard, student_bias_shard)
    teacher = autocast_head(*teacher)
    with autocast_off(hidden.device):
        out = vocab_parallel_fused_rows(hidden, s_weight, s_bias, labels, teacher, kernel,
                                        args, chunk, reduction == "none", group, terms)
    if labels is None:
        valid = torch.full((), n, dtype=torch.int64, device=hidden.device)
    else:
        valid = (labels != args.ignore_index).sum()
    return _finish(out, terms, valid, reduction, num_items, lead_shape,
                   summed=reduction != "none")


def _check_topk_replicated(logprobs, indices, lead_shape, valid_rows) -> None:
    """Shapes, dtypes, uniqueness and mass of the replicated top-k teacher (the index range
    needs the global vocabulary: checked with the statistics' gather)."""
    check_topk_shapes(logprobs, indices, lead_shape, None)
    if torch.compiler.is_compiling() or indices.numel() == 0:
        return
    ordered = indices.sort(dim=-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise ValueError("teacher_topk_indices must be unique within each row")
    lse = torch.logsumexp(logprobs.float(), dim=-1)
    bad = ~(lse <= TOPK_MASS_TOLERANCE)
    if valid_rows is not None:
        bad = bad & valid_rows
    if bool(bad.any()):
        raise ValueError("teacher_topk_logprobs must be log-probabilities whose exp sums to "
                         f"<= 1 per row; got a row with log-sum-exp {lse[bad][0].item():.4g}")


@takes_options(TopKOptions)
def vocab_parallel_sparse_distillation_loss(
    student_logits_shard: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    *,
    vocab_start_index: int,
    group=None,
    options: TopKOptions,
    return_components: bool = False,
):
    """`fastkd.sparse_distillation_loss` with the student's vocabulary split over `group`.

    Parameters
    ----------
    student_logits_shard : Tensor (..., V_local), floating
        Columns [vocab_start_index, vocab_start_index + V_local) of the student logits.
    teacher_topk_logprobs : Tensor (..., k), floating, replicated
        The teacher's top-k log-probabilities at the distillation temperature.
    teacher_topk_indices : Tensor (..., k), int64 (or int32), replicated
        Their GLOBAL vocabulary indices, unique per row; each rank uses those in its slice.
    target : Tensor (...) of integer GLOBAL labels, or None
    vocab_start_index : int
    group : ProcessGroup or None (the default group)
    tail : "bucket" or "renormalize", as `fastkd.sparse_distillation_loss`
    teacher_temperature : float or None
        The temperature the log-probabilities were taken at (None: `temperature`). When it
        differs, they are re-tempered (scaled by teacher_temperature / temperature) and
        renormalised over the k entries: exact for tail="renormalize", refused for "bucket".
    return_components : bool
        Also return the unweighted CE and divergence (detached, reduced like the loss).
    temperature, alpha, divergence, ..., num_items_in_batch
        As `fastkd.distillation_loss`.

    Returns
    -------
    Tensor
        The global loss (as `fastkd.sparse_distillation_loss`), the same on every rank;
        backward gives this slice's student gradient. One all_gather of per-row statistics
        (about 7 + k values per row) per call.
    """
    reduction, num_items = options.reduction, options.num_items_in_batch
    check_floating("student_logits_shard", student_logits_shard)
    if student_logits_shard.dim() < 1:
        raise ValueError("student_logits_shard must have at least one dimension (..., V)")
    _check_vocab_start(vocab_start_index)
    _check_vocab_parallel_divergence(options.divergence)
    lead_shape, local_vocab = student_logits_shard.shape[:-1], student_logits_shard.shape[-1]
    ignore_index = options.ignore_index
    if target is not None:
        check_target(target, lead_shape, None, ignore_index)
    _check_topk_replicated(teacher_topk_logprobs, teacher_topk_indices, lead_shape,
                           None if target is None else target != ignore_index)
    _check_process_group()
    k = teacher_topk_logprobs.shape[-1]
    student = student_logits_shard.reshape(-1, local_vocab).contiguous()
    logprobs = teacher_topk_logprobs.reshape(-1, k).contiguous()
    indices = teacher_topk_indices.reshape(-1, k).to(torch.int64).contiguous()
    labels = flat_target(target)
    valid = valid_count(labels, ignore_index)
    weight = host_reduction_weight(student, valid, reduction, num_items)
    args = options.kernel_args(target is not None, weight)
    terms = _terms_buffer(student.shape[0], (student.dtype,), student.device,
                          return_components)
    check = not torch.compiler.is_compiling()

    def call(grad_student, _):
        return vocab_parallel_sparse_kd_rows(
            student, logprobs, indices, labels, grad_student, terms, args,
            vocab_start_index=vocab_start_index, group=group, check=check)

    with autocast_off(student.device):
        rows = vocab_parallel_rows(student, logprobs, call, False)
    return _finish(rows, terms, valid, reduction, num_items, lead_shape, weight=weight)

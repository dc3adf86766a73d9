"""Vocab-parallel (tensor-parallel lm-head) distillation loss over `torch.distributed`.

Each rank of a process group holds the student and teacher logits of one contiguous
vocabulary slice `[vocab_start_index, vocab_start_index + V_local)`; slices may be uneven
and in any rank order, but must tile `[0, V)`. Only per-row statistics cross ranks (see
`fastkd.ops.vocab_parallel` for the collectives); every rank returns the same global loss,
equal to `fastkd.distillation_loss` on the concatenated logits, and its backward gives the
gradient of its own slice without communication.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.distributed as dist

from ._validation import check_options, check_target, reduce_rows
from .functional import check_logits_pair, kernel_options
from .ops import dense_distillation_rows
from .ops.vocab_parallel import vocab_parallel_kd_rows

__all__ = ["vocab_parallel_distillation_loss"]


def _check_vocab_start(vocab_start_index) -> None:
    if not isinstance(vocab_start_index, int) or isinstance(vocab_start_index, bool):
        raise TypeError(f"vocab_start_index must be an int, got {vocab_start_index!r}")
    if vocab_start_index < 0:
        raise ValueError(f"vocab_start_index must be >= 0, got {vocab_start_index}")


def _check_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("vocab_parallel_distillation_loss needs an initialised "
                           "torch.distributed process group (dist.init_process_group)")


def vocab_parallel_distillation_loss(
    student_logits_shard: torch.Tensor,
    teacher_logits_shard: torch.Tensor,
    target: Optional[torch.Tensor],
    *,
    vocab_start_index: int,
    group=None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "kl",
    beta: float = 0.5,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    num_items_in_batch=None,
) -> torch.Tensor:
    """`fastkd.distillation_loss` with the vocabulary split over the ranks of `group`.

    student_logits_shard, teacher_logits_shard: (..., V_local), this rank's columns
    [vocab_start_index, vocab_start_index + V_local) of the global logits; target: (...)
    GLOBAL int64 labels, identical on every rank, or None. Every rank of `group` (None: the
    default group) must call this with the same leading shape, target and keywords. Returns
    the global loss (scalar, or (...) for reduction="none"), the same on every rank; backward
    gives this slice's gradient (the teacher's too when its shard requires grad).
    Label smoothing spreads eps over the GLOBAL vocabulary; "mean" divides by the global
    count of non-ignored tokens.
    """
    check_logits_pair(student_logits_shard, teacher_logits_shard, target)
    check_options(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                  ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap,
                  reduction=reduction, num_items_in_batch=num_items_in_batch)
    _check_vocab_start(vocab_start_index)
    lead_shape, local_vocab = student_logits_shard.shape[:-1], student_logits_shard.shape[-1]
    if target is not None:
        # The label range needs the global vocabulary: checked after the statistics' gather.
        check_target(target, lead_shape, None, ignore_index)
    _check_process_group()

    student = student_logits_shard.reshape(-1, local_vocab).contiguous()
    teacher = teacher_logits_shard.reshape(-1, local_vocab).contiguous()
    flat_target = None if target is None else target.reshape(-1).to(torch.int64)
    options = kernel_options(target is not None, temperature=temperature, alpha=alpha,
                             divergence=divergence, beta=beta, scale_by_t2=scale_by_t2,
                             ignore_index=ignore_index, label_smoothing=label_smoothing,
                             softcap=softcap)
    kernel = functools.partial(vocab_parallel_kd_rows, vocab_start_index=vocab_start_index,
                               group=group, check=not torch.compiler.is_compiling())
    rows = dense_distillation_rows(student, teacher, flat_target, kernel, options)
    valid = None if flat_target is None else (flat_target != ignore_index).sum()
    return reduce_rows(rows, valid, reduction, num_items_in_batch, lead_shape)

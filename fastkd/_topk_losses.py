"""The top-k (offline) teacher losses: `sparse_distillation_loss` and its fused lm-head form
(re-exported by `fastkd.functional`).

Semantics (both tails, re-tempering, reductions, errors): docs/semantics.md.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import dtensor_route, is_dtensor, kernel_for
from ._docs import fill_doc
from ._inputs import autocast_head
from ._lm_head import fused_linear_loss
from ._options import TopKOptions, takes_options
from ._reduction import flat_target, host_reduction_weight, reduce_loss, valid_count
from ._validation import (
    check_chunk_size,
    check_floating,
    check_linear_head,
    check_same_device,
    check_target,
    check_topk,
)
from .ops.dense import autocast_off
from .ops.sparse import sparse_distillation_rows, student_rows
from .reference.sparse import sparse_kd_rows

__all__ = ["fused_linear_sparse_distillation_loss", "sparse_distillation_loss"]


def _topk_rows(tensor: torch.Tensor, width: int, kernel) -> torch.Tensor:
    """(..., width) -> (N, width) without a copy where a view suffices (fused kernels read any
    row stride with contiguous columns); float64 log-probs become float32 for a fused kernel."""
    rows = tensor.reshape(-1, width)
    if rows.stride(-1) != 1 and width > 1:
        rows = rows.contiguous()
    if rows.dtype == torch.float64 and kernel is not sparse_kd_rows:
        rows = rows.float()
    return rows


def _check_topk_call(logprobs, indices, target, options: TopKOptions, lead_shape, vocab):
    """The checks of the stored top-k rows and the labels shared by the two top-k losses."""
    if target is not None:
        check_target(target, lead_shape, vocab, options.ignore_index)
    valid_rows = None if target is None else target.to(torch.int64) != options.ignore_index
    check_topk(logprobs, indices, lead_shape, vocab, valid_rows)


@fill_doc
@takes_options(TopKOptions)
def sparse_distillation_loss(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    *,
    options: TopKOptions,
    backend: str = "auto",
    inplace_backward: bool = False,
    return_components: bool = False,
):
    """Distillation from a stored top-k teacher: ``alpha * CE + (1 - alpha) * k * D_topk``.

    The student's log-sum-exp runs over its full vocabulary. The teacher gets no gradient.
    Exact definitions of both tails in docs/semantics.md.

    Parameters
    ----------
    student_logits : Tensor, shape (..., V), float32 / bfloat16 / float16 / float64
    teacher_topk_logprobs : Tensor, shape (..., k), floating
        The teacher's log-probabilities at the distillation temperature, 1 <= k <= V.
    teacher_topk_indices : Tensor, shape (..., k), int64 or int32
        Their vocabulary indices, unique within each row.
    target : Tensor or None, shape (...), any integer dtype
    tail : {"bucket", "renormalize"}, default "bucket"
        "bucket": the k entries plus one bucket holding the missing mass on both sides (a
        lower bound of the dense divergence, equal when k = V); "renormalize": the teacher
        renormalised over its k entries.
    teacher_temperature : float or None, default None
        The temperature the log-probabilities were taken at (None: ``temperature``). When it
        differs they are re-tempered, ``(T_stored / T) * log p`` renormalised over the k
        entries: exact for ``tail="renormalize"``; ``tail="bucket"`` raises ValueError (the
        tail mass at the new temperature is unknown). Rows whose target is ``ignore_index``
        are neither validated nor read (padding may hold anything).
    %(options)s
    inplace_backward : bool, default False
        Write the student gradient into ``student_logits``' own storage (as in
        `distillation_loss`); raises ValueError when the rows have no (N, V) view.

    Returns
    -------
    %(returns)s

    Raises
    ------
    %(raises)s
    """
    if is_dtensor(student_logits, teacher_topk_logprobs, teacher_topk_indices, target):
        return dtensor_route("topk_logits")(
            student_logits, teacher_topk_logprobs, teacher_topk_indices, target,
            backend=backend, inplace_backward=inplace_backward,
            return_components=return_components, **options.keywords())
    check_floating("student_logits", student_logits)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (..., V)")
    lead_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    _check_topk_call(teacher_topk_logprobs, teacher_topk_indices, target, options, lead_shape,
                     vocab)
    check_same_device(student_logits=student_logits,
                      teacher_topk_logprobs=teacher_topk_logprobs,
                      teacher_topk_indices=teacher_topk_indices, target=target)
    kernel = kernel_for("topk", backend, student_logits, divergence=options.divergence)
    k = teacher_topk_logprobs.shape[-1]
    labels = flat_target(target)
    student, copied = student_rows(student_logits)  # a view wherever one exists
    if inplace_backward and copied:
        raise ValueError("inplace_backward=True cannot write the gradient into "
                         f"student_logits: its strides {tuple(student_logits.stride())} have "
                         "no view as rows with a contiguous last dimension, so the kernel "
                         "would read a copy. Pass inplace_backward=False.")
    valid = valid_count(labels, options.ignore_index)
    weight = host_reduction_weight(student, valid, options.reduction,
                                   options.num_items_in_batch)
    with autocast_off(student.device):  # float32 arithmetic and result under autocast too
        rows = sparse_distillation_rows(
            student, _topk_rows(teacher_topk_logprobs, k, kernel),
            _topk_rows(teacher_topk_indices, k, kernel), labels, kernel,
            options.kernel_args(target is not None, weight), inplace_backward=inplace_backward,
            return_terms=return_components)
        rows, terms = rows if return_components else (rows, None)
        return reduce_loss(rows, terms, valid, options.reduction, options.num_items_in_batch,
                           lead_shape, weight)


@fill_doc
@takes_options(TopKOptions)
def fused_linear_sparse_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    options: TopKOptions,
    backend: str = "auto",
    return_components: bool = False,
    tensor_parallel: Optional[bool] = None,
):
    """``sparse_distillation_loss(h @ W.T + b, topk_logprobs, topk_indices, target)`` computed
    ``chunk_size`` rows at a time (never (N, V) logits), as `fused_linear_distillation_loss`.

    Parameters
    ----------
    student_hidden : Tensor, shape (..., H), floating
    student_weight : Tensor, shape (V, H), floating
        As ``nn.Linear.weight``; the matmul runs in the promoted dtype of hidden, weight
        and bias (like nn.Linear under ``torch.autocast``).
    teacher_topk_logprobs, teacher_topk_indices : Tensor, shape (..., k)
        The top-k teacher, as in `sparse_distillation_loss` (``teacher_temperature`` too);
        each chunk runs the backend's top-k kernel, its gradient written over the chunk's
        logits.
    target : Tensor or None, shape (...), any integer dtype
    student_bias : Tensor or None, shape (V,), floating
    tail : {"bucket", "renormalize"}, default "bucket"
    chunk_size : int or None, default None
        Rows per chunk; None: 64 MiB of chunk logits on CPU, 512 MiB on CUDA.
    tensor_parallel : bool or None, default None
        For a DTensor weight sharded ``Shard(0)``, as in `fused_linear_distillation_loss`:
        plain hidden states (or False) mean data parallel (FSDP2; the weight is gathered for
        the call); tensor parallel has no fused top-k form yet and raises.
    %(options)s

    Returns
    -------
    %(returns)s

    Raises
    ------
    %(raises)s
    """
    if is_dtensor(student_hidden, student_weight, student_bias, teacher_topk_logprobs,
                  teacher_topk_indices, target):
        return dtensor_route("topk_fused_linear")(
            student_hidden, student_weight, teacher_topk_logprobs, teacher_topk_indices,
            target, student_bias=student_bias, chunk_size=chunk_size, backend=backend,
            return_components=return_components, tensor_parallel=tensor_parallel,
            **options.keywords())
    if tensor_parallel is not None:
        raise ValueError(f"tensor_parallel={tensor_parallel!r} is only meaningful for a DTensor "
                         "head weight sharded Shard(0); this one is a plain tensor (leave it "
                         "None)")
    check_linear_head("student", student_hidden, student_weight, student_bias)
    lead_shape, vocab = student_hidden.shape[:-1], student_weight.shape[0]
    _check_topk_call(teacher_topk_logprobs, teacher_topk_indices, target, options, lead_shape,
                     vocab)
    check_same_device(student_hidden=student_hidden, student_weight=student_weight,
                      student_bias=student_bias, teacher_topk_logprobs=teacher_topk_logprobs,
                      teacher_topk_indices=teacher_topk_indices, target=target)
    check_chunk_size(chunk_size)
    kernel = kernel_for("topk", backend, student_hidden, divergence=options.divergence)
    student_hidden, student_weight, student_bias = autocast_head(student_hidden,
                                                                 student_weight, student_bias)
    k = teacher_topk_logprobs.shape[-1]
    teacher = (_topk_rows(teacher_topk_logprobs, k, kernel),
               _topk_rows(teacher_topk_indices, k, kernel), None)
    return fused_linear_loss(student_hidden, student_weight, student_bias, target, teacher,
                             kernel, options.kernel_args(target is not None), True, chunk_size,
                             options.reduction, options.num_items_in_batch, return_components)

"""Autograd Function of the top-k (offline) teacher loss, shared by every backend.

The kernel (contract of `fastkd.reference.sparse.sparse_kd_rows`: the reference, the fused C++
CPU op of `fastkd.ops.sparse_native` or the Triton op of `fastkd.ops.sparse_triton`) writes the
gradient of the per-row loss into an `(N, V)` buffer during the forward pass (the student's own
buffer with `inplace_backward`); backward rescales it per row, in place. The stored teacher is
a constant: it never receives a gradient.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .._kernel_args import KernelArgs
from .dense import consume_once, new_gradient, rows_layout, scale_rows_


def student_rows(student_logits: torch.Tensor):
    """((N, V) or (B, R, V) view of the logits with contiguous columns, copied?): the 3-D view
    serves logits whose leading dimensions cannot merge (e.g. ``logits[:, :-1]``)."""
    rows, _, copied = rows_layout(student_logits, student_logits)
    return rows, copied


def _run(kernel, student, topk_logprobs, topk_indices, target, grad, terms, args):
    """The kernel on a 2-D view, or once per outer index of a 3-D (B, R, V) view (the
    top-k, target and terms sliced by rows alike)."""
    if student.dim() == 2:
        return kernel(student, topk_logprobs, topk_indices, target, grad, terms, args)
    per = student.shape[1]
    rows = []
    for i in range(student.shape[0]):
        part = slice(i * per, (i + 1) * per)
        rows.append(kernel(student[i], topk_logprobs[part], topk_indices[part],
                           None if target is None else target[part],
                           None if grad is None else grad[i],
                           None if terms is None else terms[part], args))
    return torch.cat(rows)


class SparseDistillationFunction(torch.autograd.Function):
    """(rows, terms) = kernel(student, topk_logprobs, topk_indices, target, grad, terms, args)."""

    @staticmethod
    def forward(ctx, student, topk_logprobs, topk_indices, target, kernel: Callable,
                args: KernelArgs, inplace_backward: bool, need_terms: bool):
        # In place: each row is overwritten by its gradient after its last read.
        grad_student = student if inplace_backward else new_gradient(student)
        terms = _terms_buffer(student) if need_terms else None
        rows = _run(kernel, student, topk_logprobs, topk_indices, target, grad_student,
                    terms, args)
        ctx.save_for_backward(grad_student)
        if terms is None:
            return rows, None
        ctx.mark_non_differentiable(terms)
        return rows, terms

    @staticmethod
    def backward(ctx, grad_rows, grad_terms):
        consume_once(ctx)  # the fused gradient is scaled in place: one backward only
        (grad_student,) = ctx.saved_tensors
        grad_student = scale_rows_(grad_student, grad_rows)
        return grad_student, None, None, None, None, None, None, None


def _terms_buffer(student: torch.Tensor) -> torch.Tensor:
    dtype = torch.float64 if student.dtype == torch.float64 else torch.float32
    n = student.shape[0] * (student.shape[1] if student.dim() == 3 else 1)
    return torch.empty(n, 2, dtype=dtype, device=student.device)


def sparse_distillation_rows(student: torch.Tensor, topk_logprobs: torch.Tensor,
                             topk_indices: torch.Tensor, target: Optional[torch.Tensor],
                             kernel: Callable, args: KernelArgs, *,
                             inplace_backward: bool = False, return_terms: bool = False):
    """Per-row loss of the top-k teacher loss, differentiable in the student only.

    Parameters
    ----------
    student : (N, V) or (B, R, V) floating (see `student_rows`), contiguous columns.
    topk_logprobs : (N, k) floating; topk_indices : (N, k) int64 or int32 (N = B R).
    target : (N,) int64 or None.
    kernel : a callable with the contract of `fastkd.reference.sparse.sparse_kd_rows`.
    args : its scalars (`fastkd._kernel_args.KernelArgs`).
    inplace_backward : write the gradient into ``student``'s own buffer (its values are lost).
    return_terms : also return the unweighted per-row (CE, D), detached.

    Returns
    -------
    rows : (N,) float32 (float64 for float64 students); with ``return_terms`` the pair
    ``(rows, terms)``, terms (N, 2) of the same dtype.
    """
    if not (torch.is_grad_enabled() and student.requires_grad):
        with torch.no_grad():  # the stored teacher is a constant, even if it requires grad
            terms = _terms_buffer(student) if return_terms else None
            rows = _run(kernel, student, topk_logprobs, topk_indices, target, None, terms,
                        args)
        return (rows, terms) if return_terms else rows
    rows, terms = SparseDistillationFunction.apply(student, topk_logprobs, topk_indices, target,
                                                   kernel, args, inplace_backward,
                                                   return_terms)
    return (rows, terms) if return_terms else rows

"""The one autograd Function behind every dense distillation backend, and the row layout.

Each backend supplies a *kernel* with the contract of `fastkd.reference.dense_kd_rows`
(`fastkd._kernel_args`: tensors, then one `KernelArgs`):
it reads student/teacher logits `(N, V)` (each in its own dtype, any row stride, last
dimension contiguous) once per pass, writes the gradient of the per-row weighted loss into
preallocated buffers during the forward pass, and returns the per-row loss `(N,)` in float32;
with a `terms` buffer `(N, 2)` it also writes the unweighted CE and divergence of each row.
Backward is then a per-row rescale by the incoming gradient (skipped when it is exactly 1,
see `scale_rows_`): no second sweep over the logits and no `[N, V]` temporaries.

Rows are read where they are (`rows_layout`): `(..., V)` logits whose last dimension is
contiguous become a 2-D `(N, V)` view when their leading dimensions merge, else a 3-D
`(B, R, V)` view (e.g. `logits[:, :-1]` of `(B, T, V)`: each `logits[b, :-1]` is an `(R, V)`
matrix with a row stride) and the kernel runs once per outer index `b`. Only logits whose last
dimension is strided (or whose leading dimensions cannot be split that way) are copied.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Optional

import torch

from .._kernel_args import KernelArgs


def consume_once(ctx) -> None:
    """Marks a fused-gradient Function's saved gradient as consumed.

    The stored gradients are scaled in place in backward to keep peak memory at one [N, V]
    buffer, so a second backward through the same graph is refused rather than silently
    rescaling twice.
    """
    if getattr(ctx, "consumed", False):
        raise RuntimeError("fastkd: the distillation loss's backward can run only once per "
                           "forward (its fused gradient is scaled in place)")
    ctx.consumed = True


@functools.cache
def _cpu_gradient_cache():
    """`torch.ops.fastkd.cpu_cached_empty` when the native extension is built, else None."""
    try:
        from .. import _C  # noqa: F401  (registers the op)
    except ImportError:
        return None
    return getattr(torch.ops.fastkd, "cpu_cached_empty", None)


def new_gradient(like: torch.Tensor) -> torch.Tensor:
    """An uninitialised contiguous buffer of `like`'s shape and dtype for a fused gradient.

    CPU buffers of 16 MiB or more come from the native gradient cache in eager mode: a
    training step's gradient lands in the block the previous step freed, which is already
    mapped, instead of in fresh memory the OS must fault in and zero every step
    (csrc/cpu/gradient_cache.cpp; FASTKD_CPU_GRADIENT_CACHE_MB sets its limit, 0 turns it
    off).
    """
    if like.device.type == "cpu" and not torch.compiler.is_compiling():
        cached_empty = _cpu_gradient_cache()
        if cached_empty is not None:
            return cached_empty(list(like.shape), like.dtype)
    return torch.empty(like.shape, dtype=like.dtype, device=like.device)


def scale_rows_(grad: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
    """grad `(..., V)` times grad_rows `(...)` per row, in place.

    The pass over `grad` is skipped when every factor is exactly 1: the usual
    ``loss.backward()`` of a loss whose reduction weight the kernel already applied
    (`fastkd._reduction.host_reduction_weight`). Checked only for CPU tensors in eager mode,
    where reading the factors costs no device sync and no graph break.
    """
    if (grad.device.type == "cpu" and not torch.compiler.is_compiling()
            and bool((grad_rows == 1).all())):
        return grad
    return grad.mul_(grad_rows.reshape(grad.shape[:-1] + (1,)).to(grad.dtype))


def autocast_off(device: torch.device):
    """A context that disables torch.autocast on `device` inside the kernels (they compute
    in float32 and return float32 whatever autocast would choose); a no-op otherwise."""
    if device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any input is float64, else float32 (the kernels' arithmetic and rows)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


# --- Row layout: 2-D views, 3-D views looped over the outer index, or a copy -----------------

def _merges(sizes, strides) -> bool:
    """Whether these dimensions can be viewed as one (size-1 dimensions never matter)."""
    dims = [(n, st) for n, st in zip(sizes, strides) if n != 1]
    return all(outer == inner * n for (_, outer), (n, inner) in zip(dims, dims[1:]))


def _splits(x: torch.Tensor) -> list:
    """Split points k such that `(..., V)` views as `(prod(lead[:k]), prod(lead[k:]), V)`
    without a copy (k = 0: the 2-D view `(N, V)`), smallest first; [] when none exists."""
    if x.stride(-1) != 1:
        return []
    sizes, strides = list(x.shape[:-1]), list(x.stride()[:-1])
    return [k for k in range(max(len(sizes), 1))
            if _merges(sizes[:k], strides[:k]) and _merges(sizes[k:], strides[k:])]


def _view(x: torch.Tensor, k: int) -> torch.Tensor:
    vocab = x.shape[-1]
    if k == 0:
        return x.reshape(-1, vocab)
    lead = x.shape[:-1]
    outer = 1
    for n in lead[:k]:
        outer *= n
    return x.reshape(outer, -1, vocab)


def rows_layout(student: torch.Tensor, teacher: torch.Tensor):
    """(student view, teacher view, student_copied) for the kernels.

    Both views are 2-D `(N, V)` or both 3-D `(B, R, V)` with the same split, with
    `stride(-1) == 1` and any other strides. A tensor is copied only when it has no such view
    (last dimension strided, or leading dimensions that split no way); the teacher is also
    copied when the two have views but no split in common.
    """
    if student.numel() == 0 or teacher.numel() == 0:
        vocab = student.shape[-1]
        return student.reshape(-1, vocab), teacher.reshape(-1, vocab), False
    s_splits = _splits(student)
    copied = not s_splits
    if copied:
        student = student.contiguous()
        s_splits = _splits(student)
    t_splits = _splits(teacher)
    common = [k for k in s_splits if k in t_splits]
    if not common:
        teacher = teacher.contiguous()
        common = s_splits
    k = common[0]
    return _view(student, k), _view(teacher, k), copied


def _slices(n_outer: int, per: int, tensor: Optional[torch.Tensor]):
    return [None if tensor is None else tensor[i * per:(i + 1) * per] for i in range(n_outer)]


def run_kernel(kernel: Callable, student, teacher, target, grad_student, grad_teacher,
               terms: Optional[torch.Tensor], args: KernelArgs) -> torch.Tensor:
    """Calls `kernel` on 2-D views, or once per outer index of 3-D `(B, R, V)` views
    (target, terms and the rows sliced alike)."""
    if student.dim() == 2:
        return kernel(student, teacher, target, grad_student, grad_teacher, terms, args)
    n_outer, per = student.shape[0], student.shape[1]
    rows = []
    for i, (y, tm) in enumerate(zip(_slices(n_outer, per, target),
                                    _slices(n_outer, per, terms))):
        rows.append(kernel(student[i], teacher[i], y,
                           None if grad_student is None else grad_student[i],
                           None if grad_teacher is None else grad_teacher[i], tm, args))
    return torch.cat(rows)


def _terms_buffer(student, teacher, with_terms: bool) -> Optional[torch.Tensor]:
    if not with_terms:
        return None
    n = student.shape[0] * (student.shape[1] if student.dim() == 3 else 1)
    return torch.empty(n, 2, dtype=compute_dtype(student.dtype, teacher.dtype),
                       device=student.device)


class DenseDistillationFunction(torch.autograd.Function):
    """rows = kernel(...); d rows / d logits is computed by the kernel in the forward pass.

    Returns rows `(N,)`, or `(rows, terms)` with terms `(N, 2)` (not differentiable) when
    `with_terms`.
    """

    @staticmethod
    def forward(ctx, student, teacher, target, kernel: Callable, args: KernelArgs,
                need_student_grad: bool, need_teacher_grad: bool, inplace_backward: bool,
                with_terms: bool = False):
        if inplace_backward and need_student_grad:
            grad_student = student  # overwritten row by row after its last read
        elif need_student_grad:
            grad_student = new_gradient(student)
        else:
            grad_student = None
        grad_teacher = new_gradient(teacher) if need_teacher_grad else None
        terms = _terms_buffer(student, teacher, with_terms)
        with autocast_off(student.device):
            rows = run_kernel(kernel, student, teacher, target, grad_student, grad_teacher,
                              terms, args)
        ctx.save_for_backward(grad_student, grad_teacher)
        if terms is None:
            return rows
        ctx.mark_non_differentiable(terms)
        return rows, terms

    @staticmethod
    def backward(ctx, grad_rows, *unused_grad_terms):
        consume_once(ctx)
        grad_student, grad_teacher = ctx.saved_tensors
        for grad in (grad_student, grad_teacher):
            if grad is not None:
                scale_rows_(grad, grad_rows)
        return grad_student, grad_teacher, None, None, None, None, None, None, None


def dense_distillation_rows(student: torch.Tensor, teacher: torch.Tensor,
                            target: Optional[torch.Tensor], kernel: Callable, args: KernelArgs,
                            inplace_backward: bool = False, with_terms: bool = False):
    """Rows `(N,)` (or `(rows, terms (N, 2))` when `with_terms`) of views from `rows_layout`
    (both 2-D `(N, V)` or both 3-D `(B, R, V)`, N = B * R) and target `(N,)` | None;
    differentiable in student and teacher."""
    grad_on = torch.is_grad_enabled()
    need_s = grad_on and student.requires_grad
    need_t = grad_on and teacher.requires_grad
    if not (need_s or need_t):
        terms = _terms_buffer(student, teacher, with_terms)
        with torch.no_grad(), autocast_off(student.device):
            rows = run_kernel(kernel, student, teacher, target, None, None, terms, args)
        return rows if terms is None else (rows, terms)
    return DenseDistillationFunction.apply(student, teacher, target, kernel, args,
                                           need_s, need_t, inplace_backward, with_terms)

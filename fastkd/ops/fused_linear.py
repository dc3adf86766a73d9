"""Chunked fused-linear distillation: the lm-head matmul fused with the loss.

For a chunk of rows the student logits `h @ W.T + b` (and the teacher's) are computed in the
promoted dtype of that side's (hidden, weight, bias) (the two sides may differ; a narrower
hidden chunk is cast up, a narrower weight is cast up once per sweep), handed to a loss kernel
together with a gradient buffer (the student logits buffer itself: kernels may overwrite their
input row by row), and the chunk's logit gradient
is turned at once into grad-hidden (those rows) and accumulated into grad-weight / grad-bias in
float32 (float64 for float64 inputs), also for bf16/fp16 weights. Only chunk-sized logits exist,
never [N, V]. The teacher is a constant: no gradient flows to its hidden states or weights.

Two teacher forms share the sweep: dense (teacher hidden, weight, bias -> chunk logits, kernel
contract of `fastkd.reference.dense_kd_rows`) and sparse (top-k log-probs and indices, kernel
contract of `fastkd.reference.sparse_kd_rows`).

Reductions: for "mean"/"sum" the Function returns the summed loss; the gradients (for an
incoming gradient of 1) are complete after the forward sweep and backward only rescales them
by the scalar incoming gradient (a tensor: no host sync). For "none" the per-row incoming
gradient is known only in backward, so forward computes the rows alone and backward sweeps
again: both matmuls and the kernel run twice (about 1.5x the work of the mean/sum path), which
keeps memory at chunk size instead of storing (N, V) gradients.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .._kernel_args import KernelArgs
from .dense import autocast_off, consume_once

#: Bytes of chunk logits (student, which doubles as its gradient, plus teacher) per sweep step.
CHUNK_BUDGET_BYTES = {"cuda": 512 << 20}
DEFAULT_CHUNK_BUDGET_BYTES = 64 << 20
#: Chunks larger than this many rows are rounded down to a multiple of it (matmul tiles).
CHUNK_ROW_MULTIPLE = 64


def default_chunk_rows(n: int, vocab: int, itemsize: int, device: torch.device,
                       sparse_teacher: bool) -> int:
    """Rows per chunk when chunk_size=None.

    rows = budget // (V * itemsize * m), m = 2 (student + teacher logits) or 1 (top-k teacher),
    budget = 512 MiB on CUDA, 64 MiB elsewhere; rounded down to a multiple of 64 when larger,
    at least 1 and at most N. (CPU, V=32000, fp32, dense teacher: 256 rows, 64 MiB of logits.)
    """
    budget = CHUNK_BUDGET_BYTES.get(device.type, DEFAULT_CHUNK_BUDGET_BYTES)
    rows = budget // max(1, vocab * itemsize * (1 if sparse_teacher else 2))
    if rows > CHUNK_ROW_MULTIPLE:
        rows -= rows % CHUNK_ROW_MULTIPLE
    return int(max(1, min(rows, max(n, 1))))


def _head_dtype(hidden, weight, bias) -> torch.dtype:
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    return dtype if bias is None else torch.promote_types(dtype, bias.dtype)


def _promoted_head(weight, bias, dtype):
    """The weight and bias in the head's matmul dtype (no copy when already in it)."""
    return weight.to(dtype), None if bias is None else bias.to(dtype)


def _linear(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """(c, H) @ (V, H).T + (V,) -> (c, V) contiguous, in the weight's dtype (the hidden
    chunk is cast to it when the side's dtypes differ)."""
    hidden = hidden.to(weight.dtype)
    if bias is None:
        return torch.mm(hidden, weight.t())
    return torch.addmm(bias, hidden, weight.t())


def _chunk_rows(kernel, args, sparse, logits, teacher, start, stop, target, grad, terms):
    """Per-row loss of one chunk; the student gradient goes into `grad` (may be `logits`),
    the unweighted terms into `terms` (or None)."""
    if sparse:
        topk_logprobs, topk_indices, _ = teacher
        return kernel(logits, topk_logprobs[start:stop], topk_indices[start:stop], target,
                      grad, terms, args)
    t_hidden, t_weight, t_bias = teacher
    t_logits = _linear(t_hidden[start:stop], t_weight, t_bias)
    return kernel(logits, t_logits, target, grad, None, terms, args)


def _accumulate(grad, hidden, weight, grad_hidden, grad_weight, grad_bias):
    """Turns a chunk's logit gradient (c, V) into its hidden rows and the weight/bias sums."""
    if grad_hidden is not None:
        grad_hidden.copy_(torch.mm(grad, weight))
    if grad_weight is not None:
        acc = grad_weight.dtype
        if grad.dtype == acc and hidden.dtype == acc:
            grad_weight.addmm_(grad.t(), hidden)
        else:  # bf16/fp16: a chunk-sized float32 copy so the sum is exact to float32
            grad_weight.addmm_(grad.t().to(acc), hidden.to(acc))
    if grad_bias is not None:
        grad_bias.add_(grad.sum(0, dtype=grad_bias.dtype))


def fused_sweep(hidden, weight, bias, target, teacher, kernel: Callable, args: KernelArgs,
                sparse: bool, chunk: int, needs: tuple, row_scale=None, terms=None):
    """One pass over the rows in chunks.

    hidden (N, H), weight (V, H), bias (V,) | None, target (N,) | None; teacher: (hidden,
    weight, bias) or (topk_logprobs, topk_indices, None). Each side's matmul runs in the
    promoted dtype of its tensors. needs: which of (hidden, weight, bias) gradients to
    compute; row_scale (N,) multiplies each row's gradient; terms (N, 2) | None receives the
    unweighted per-row terms. Returns (rows (N,), grad_hidden (N, H), grad_weight (V, H),
    grad_bias (V,)) with gradients in float32 (float64 for float64 inputs) or None where
    not needed.
    """
    n, width = hidden.shape
    s_dtype = _head_dtype(hidden, weight, bias)
    weight, bias = _promoted_head(weight, bias, s_dtype)
    if not sparse:
        t_hidden, t_weight, t_bias = teacher
        t_weight, t_bias = _promoted_head(t_weight, t_bias, _head_dtype(*teacher))
        teacher = (t_hidden, t_weight, t_bias)
    acc = torch.float64 if s_dtype == torch.float64 else torch.float32
    device = hidden.device
    need_h, need_w, need_b = needs
    grad_h = torch.empty(n, width, dtype=acc, device=device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=device) if need_b else None
    any_grad = need_h or need_w or need_b
    rows = torch.empty(n, dtype=acc, device=device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        h = hidden[start:stop].to(s_dtype)
        logits = _linear(h, weight, bias)
        y = None if target is None else target[start:stop]
        grad = logits if any_grad else None
        rows[start:stop] = _chunk_rows(kernel, args, sparse, logits, teacher, start, stop,
                                       y, grad, None if terms is None else terms[start:stop])
        if not any_grad:
            continue
        if row_scale is not None:
            grad.mul_(row_scale[start:stop].unsqueeze(-1).to(grad.dtype))
        _accumulate(grad, h, weight, None if grad_h is None else grad_h[start:stop], grad_w,
                    grad_b)
    return rows, grad_h, grad_w, grad_b


def _terms_buffer(hidden, with_terms: bool):
    if not with_terms:
        return None
    dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return torch.empty(hidden.shape[0], 2, dtype=dtype, device=hidden.device)


class FusedLinearDistillationFunction(torch.autograd.Function):
    """Differentiable in student hidden, weight and bias; the teacher is a constant.

    Returns the summed loss (scalar) when per_row is False, else the rows (N,); with
    `with_terms` also the per-row unweighted terms (N, 2), not differentiable.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, teacher_a, teacher_b, teacher_c,
                kernel: Callable, args: KernelArgs, sparse: bool, chunk: int, per_row: bool,
                needs: tuple, with_terms: bool = False):
        teacher = (teacher_a, teacher_b, teacher_c)
        ctx.setup = (kernel, args, sparse, chunk, needs)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        terms = _terms_buffer(hidden, with_terms)
        if per_row:
            out = fused_sweep(hidden, weight, bias, target, teacher, kernel, args, sparse,
                              chunk, (False, False, False), terms=terms)[0]
            ctx.save_for_backward(hidden, weight, bias, target, *teacher)
        else:
            rows, grad_h, grad_w, grad_b = fused_sweep(hidden, weight, bias, target, teacher,
                                                       kernel, args, sparse, chunk, needs,
                                                       terms=terms)
            ctx.save_for_backward(grad_h, grad_w, grad_b)
            out = rows.sum()
        ctx.per_row = per_row
        if terms is None:
            return out
        ctx.mark_non_differentiable(terms)
        return out, terms

    @staticmethod
    def backward(ctx, grad_out, *unused_grad_terms):
        if ctx.per_row:
            hidden, weight, bias, target, t_a, t_b, t_c = ctx.saved_tensors
            kernel, args, sparse, chunk, needs = ctx.setup
            with autocast_off(hidden.device):
                _, grad_h, grad_w, grad_b = fused_sweep(hidden, weight, bias, target,
                                                        (t_a, t_b, t_c), kernel, args,
                                                        sparse, chunk, needs,
                                                        row_scale=grad_out)
        else:
            consume_once(ctx)  # the stored gradients are scaled in place
            grad_h, grad_w, grad_b = ctx.saved_tensors
            grad_h, grad_w, grad_b = (None if g is None else g.mul_(grad_out.to(g.dtype))
                                      for g in (grad_h, grad_w, grad_b))
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_h = None if grad_h is None else grad_h.to(h_dtype)
        grad_w = None if grad_w is None else grad_w.to(w_dtype)
        grad_b = None if grad_b is None else grad_b.to(b_dtype)
        return (grad_h, grad_w, grad_b) + (None,) * 11


def fused_linear_rows(hidden, weight, bias, target, teacher: tuple, kernel: Callable,
                      args: KernelArgs, sparse: bool, chunk: int, per_row: bool,
                      with_terms: bool = False):
    """Summed loss (scalar) or rows (N,) of the chunked fused-linear loss (see module doc);
    with `with_terms` a pair (that, terms (N, 2))."""
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    if not any(needs):
        # no_grad: a teacher that requires grad must not pull chunk logits into a graph.
        terms = _terms_buffer(hidden, with_terms)
        with torch.no_grad():
            rows = fused_sweep(hidden, weight, bias, target, teacher, kernel, args, sparse,
                               chunk, needs, terms=terms)[0]
        out = rows if per_row else rows.sum()
        return out if terms is None else (out, terms)
    t_a, t_b, t_c = (None if t is None else t.detach() for t in teacher)
    return FusedLinearDistillationFunction.apply(hidden, weight, bias, target, t_a, t_b, t_c,
                                                 kernel, args, sparse, chunk, per_row,
                                                 needs, with_terms)

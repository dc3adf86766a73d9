"""Vocab-parallel fused lm-head distillation: chunked matmul + vocab-parallel kernel.

Each rank holds rows [vocab_start_index, vocab_start_index + V_local) of the student and
teacher heads (as `ColwiseParallel` shards an lm-head) and the full, replicated hidden
states. For each chunk of `chunk` rows it computes the chunk's LOCAL logits
`h @ W_shard.T + b_shard` (c, V_local) in the input dtype, runs the vocab-parallel dense
kernel on them (one all_gather of per-row statistics; jsd / tvd one more all_reduce), and
turns the kernel's local logit gradient, written over the student chunk, into this rank's
partial grad-hidden rows and its shard's grad-weight / grad-bias (float32 accumulators).
No rank holds more than one chunk of [N, V_local] logits.

The hidden-state gradient is a sum over the vocabulary, so each rank holds a partial one;
it is all-reduced (SUM) once per sweep, so every rank returns the full gradient of the
replicated hidden states, as the backward of `ColwiseParallel` does.

Every rank must use the same chunk size (the kernels' collectives pair up chunk by chunk):
the default is agreed with one all_reduce(MIN) of an int per call.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from .._kernel_args import KernelArgs
from .dense import consume_once
from .fused_linear import _accumulate, _linear, default_chunk_rows


def agreed_chunk_rows(n: int, local_vocab: int, itemsize: int, device: torch.device,
                      group) -> int:
    """The default rows per chunk for the largest shard of the group (all_reduce MIN)."""
    rows = torch.tensor([default_chunk_rows(n, local_vocab, itemsize, device, False)],
                        dtype=torch.int64, device=device)
    dist.all_reduce(rows, op=dist.ReduceOp.MIN, group=group)
    return int(rows.item())


def vocab_parallel_sweep(hidden, weight, bias, target, teacher, kernel: Callable,
                         args: KernelArgs, chunk: int, needs: tuple, group, row_scale=None,
                         terms=None, check: bool = True):
    """One pass over the rows in chunks (see the module docstring).

    hidden (N, H) replicated; weight (V_local, H); bias (V_local,) | None; target (N,) | None
    global labels; teacher (hidden (N, Ht), weight (V_local, Ht), bias | None); kernel: the
    vocab-parallel dense kernel with its communication keywords bound; check: validate the
    slices' layout and all labels with the first chunk (eager only, one host sync).
    needs: (hidden, weight, bias) gradients wanted; row_scale (N,) multiplies each row's
    gradient; terms (N, 2) | None receives the unweighted (CE, divergence).
    Returns (rows (N,), grad_hidden (N, H) summed over the group, grad_weight (V_local, H),
    grad_bias (V_local,)), gradients in float32 (float64 for float64 inputs) or None.
    """
    n, width = hidden.shape
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    device = hidden.device
    need_h, need_w, need_b = needs
    grad_h = torch.zeros(n, width, dtype=acc, device=device) if need_h else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc, device=device) if need_b else None
    any_grad = need_h or need_w or need_b
    rows = torch.empty(n, dtype=acc, device=device)
    t_hidden, t_weight, t_bias = teacher
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        h = hidden[start:stop]
        logits = _linear(h, weight, bias)
        t_logits = _linear(t_hidden[start:stop], t_weight, t_bias)
        y = None if target is None else target[start:stop]
        grad = logits if any_grad else None  # the kernel overwrites the chunk by its gradient
        rows[start:stop] = kernel(logits, t_logits, y, grad, None,
                                  None if terms is None else terms[start:stop], args,
                                  check=check and start == 0, checked_target=target)
        if not any_grad:
            continue
        if row_scale is not None:
            grad.mul_(row_scale[start:stop].unsqueeze(-1).to(grad.dtype))
        _accumulate(grad, h, weight, None if grad_h is None else grad_h[start:stop], grad_w,
                    grad_b)
    if grad_h is not None:
        dist.all_reduce(grad_h, op=dist.ReduceOp.SUM, group=group)
    return rows, grad_h, grad_w, grad_b


class VocabParallelFusedLinearFunction(torch.autograd.Function):
    """Differentiable in the student hidden, weight shard and bias shard; the teacher is a
    constant. Returns the summed loss (scalar), or the rows (N,) when per_row."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, target, t_hidden, t_weight, t_bias, setup: tuple,
                terms):
        kernel, args, chunk, per_row, needs, group = setup
        teacher = (t_hidden, t_weight, t_bias)
        ctx.setup = setup
        ctx.dtypes = (hidden.dtype, weight.dtype)
        ctx.per_row = per_row
        if per_row:  # the per-row incoming gradient is known in backward only: sweep again
            rows = vocab_parallel_sweep(hidden, weight, bias, target, teacher, kernel, args,
                                        chunk, (False, False, False), group, terms=terms)[0]
            ctx.save_for_backward(hidden, weight, bias, target, *teacher)
            return rows
        rows, grad_h, grad_w, grad_b = vocab_parallel_sweep(
            hidden, weight, bias, target, teacher, kernel, args, chunk, needs, group,
            terms=terms)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        return rows.sum()

    @staticmethod
    def backward(ctx, grad_out):
        consume_once(ctx)
        kernel, args, chunk, _, needs, group = ctx.setup
        if ctx.per_row:
            hidden, weight, bias, target, t_h, t_w, t_b = ctx.saved_tensors
            _, grad_h, grad_w, grad_b = vocab_parallel_sweep(
                hidden, weight, bias, target, (t_h, t_w, t_b), kernel, args, chunk, needs,
                group, row_scale=grad_out, check=False)
        else:
            grad_h, grad_w, grad_b = (None if g is None else g.mul_(grad_out.to(g.dtype))
                                      for g in ctx.saved_tensors)
        h_dtype, w_dtype = ctx.dtypes
        grad_h = None if grad_h is None else grad_h.to(h_dtype)
        grad_w = None if grad_w is None else grad_w.to(w_dtype)
        grad_b = None if grad_b is None else grad_b.to(w_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None


def vocab_parallel_fused_rows(hidden, weight, bias, target, teacher: tuple, kernel: Callable,
                              args: KernelArgs, chunk: int, per_row: bool, group,
                              terms=None) -> torch.Tensor:
    """Summed loss (scalar) or rows (N,) of the vocab-parallel fused-linear loss."""
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and hidden.requires_grad, grad_on and weight.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    t_h, t_w, t_b = (None if t is None else t.detach() for t in teacher)
    if not any(needs):
        with torch.no_grad():
            rows = vocab_parallel_sweep(hidden, weight, bias, target, (t_h, t_w, t_b), kernel,
                                        args, chunk, needs, group, terms=terms)[0]
        return rows if per_row else rows.sum()
    return VocabParallelFusedLinearFunction.apply(hidden, weight, bias, target, t_h, t_w, t_b,
                                                  (kernel, args, chunk, per_row, needs,
                                                   group), terms)

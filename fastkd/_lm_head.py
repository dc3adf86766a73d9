"""The chunked lm-head (fused-linear) loss driver shared by the dense and top-k lm-head
losses: logits `chunk` rows at a time, never the (N, V) matrix."""

from __future__ import annotations

import torch

from ._kernel_args import KernelArgs
from ._reduction import flat_target, reduce_components, reduce_rows, valid_count
from .ops.dense import autocast_off
from .ops.fused_linear import _head_dtype, default_chunk_rows, fused_linear_rows


def fused_linear_loss(student_hidden, student_weight, student_bias, target, teacher, kernel,
                      args: KernelArgs, sparse: bool, chunk_size, reduction,
                      num_items_in_batch, return_components=False):
    """The reduced loss (or `(loss, ce, divergence)`) of the chunked fused-linear sweep.

    `teacher` is (hidden (N, Ht), weight, bias) for the dense teacher or (logprobs (N, k),
    indices (N, k), None) with `sparse`; None `chunk_size` is the memory-budget default.
    """
    lead_shape = student_hidden.shape[:-1]
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    labels = flat_target(target)
    n, vocab = hidden.shape[0], student_weight.shape[0]
    itemsize = _head_dtype(hidden, student_weight, student_bias).itemsize
    chunk = chunk_size or default_chunk_rows(n, vocab, itemsize, hidden.device, sparse)
    with autocast_off(hidden.device):
        out = fused_linear_rows(hidden, student_weight, student_bias, labels, teacher,
                                kernel, args, sparse, chunk, reduction == "none",
                                with_terms=return_components)
        out, terms = out if return_components else (out, None)
        valid = valid_count(labels, args.ignore_index)
        if reduction == "none":
            loss = out.reshape(lead_shape)
        else:
            count = valid if valid is not None else torch.full(
                (), n, dtype=torch.int64, device=out.device)
            loss = reduce_rows(out.reshape(1), count, reduction, num_items_in_batch,
                               lead_shape)
        if not return_components:
            return loss
        return reduce_components(loss, terms, valid, reduction, num_items_in_batch,
                                 lead_shape)

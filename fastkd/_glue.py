"""Glue shared by the public losses: loss weights and kernel options, dtype rules (float64,
autocast, per-side heads), the in-place check, DTensor detection, component reduction and the
chunked fused-linear driver of the dense and top-k lm-head losses."""

from __future__ import annotations

import math
import sys

import torch

from ._options import LossOptions
from ._validation import reduce_rows
from .ops.dense import autocast_off
from .ops.fused_linear import _head_dtype, default_chunk_rows, fused_linear_rows


def loss_weights(target_given: bool, alpha: float, temperature: float,
                 scale_by_t2: bool) -> tuple:
    """(ce_weight, div_weight) of `alpha * CE + (1 - alpha) * k * D` (`LossOptions`)."""
    return LossOptions(temperature=temperature, alpha=alpha,
                       scale_by_t2=scale_by_t2).loss_weights(target_given)


def kernel_options(target_given: bool, **keywords) -> tuple:
    """The kernels' scalar arguments (`LossOptions.kernel_args`) of the loss keywords."""
    return LossOptions.pick(keywords).kernel_args(target_given)


def _is_dtensor(*tensors) -> bool:
    """Whether any tensor is a DTensor; free (no import) when torch.distributed.tensor was
    never imported, since no DTensor can exist then (False while compiling)."""
    if torch.compiler.is_compiling():
        return False
    module = sys.modules.get("torch.distributed.tensor")
    cls = getattr(module, "DTensor", None) if module is not None else None
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def _flat_target(target):
    return None if target is None else target.reshape(-1).to(torch.int64).contiguous()


def _valid_count(flat_target, ignore_index):
    return None if flat_target is None else (flat_target != ignore_index).sum()


def _with_components(loss, terms, valid, reduction, num_items_in_batch, lead_shape):
    """(loss, ce, divergence): the per-row terms (N, 2) reduced exactly like the loss."""
    ce, div = (reduce_rows(terms[:, i].detach(), valid, reduction, num_items_in_batch,
                           lead_shape) for i in (0, 1))
    return loss, ce, div


def host_reduction_weight(student, valid, reduction, num_items_in_batch):
    """The factor the reduction applies to every row, when knowing it on the host is free
    (CPU logits, eager mode); else None. `valid`: the count of non-ignored rows
    (`_valid_count`, a 0-dim tensor), or None without a target.

    The kernels then fold it into their loss weights (`KernelArgs.weighted`): the loss is the
    plain sum of the rows they return and the gradient they write is already final, so the
    backward's per-row rescale sees factors of exactly 1 in the usual ``loss.backward()`` and
    skips its pass over `(N, V)` (`ops.dense.scale_rows_`). Elsewhere (a device sync) and
    while compiling (a data-dependent value) the rows are reduced afterwards instead.
    """
    if reduction == "none" or student.device.type != "cpu" or torch.compiler.is_compiling():
        return None
    if reduction == "sum":
        return 1.0
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.device.type != "cpu" or num_items_in_batch.numel() != 1:
            return None
        count = float(num_items_in_batch)
    elif num_items_in_batch is not None:
        count = float(num_items_in_batch)
    elif valid is None:
        count = float(max(math.prod(student.shape[:-1]), 1))
    else:
        count = float(max(int(valid), 1))
    return 1.0 / count if 0.0 < count < float("inf") else None


def _reduced(rows, terms, valid, reduction, num_items_in_batch, lead_shape, weight=None):
    """The loss reduced from per-row values (N,), or `(loss, ce, divergence)` when the
    per-row terms (N, 2) are given (None: the loss alone). `weight`: the rows already carry
    the reduction's factor (`host_reduction_weight`), so the loss is their sum; the terms
    never do."""
    if weight is None:
        loss = reduce_rows(rows, valid, reduction, num_items_in_batch, lead_shape)
    else:
        loss = rows.sum()
    if terms is None:
        return loss
    return _with_components(loss, terms, valid, reduction, num_items_in_batch, lead_shape)


def _to_float64_if_any(*tensors):
    """float64 on either side: every tensor in float64 (autograd casts the gradients back)."""
    if not any(t is not None and t.dtype == torch.float64 for t in tensors):
        return tensors
    return tuple(None if t is None else t.to(torch.float64) for t in tensors)


def _check_inplace(student_logits, copied: bool, upcast: bool) -> None:
    """inplace_backward=True needs the kernel to read (and overwrite) the user's storage."""
    overlapping = any(stride == 0 and size > 1
                      for size, stride in zip(student_logits.shape, student_logits.stride()))
    if not (copied or upcast or overlapping):
        return
    if upcast:
        why = ("its dtype is raised to float64 to match the float64 teacher, so the kernel "
               "would read a copy")
    elif overlapping:
        why = ("it is broadcast (a stride of 0), so several gradient rows would share one "
               "row of storage")
    else:
        why = (f"its strides {tuple(student_logits.stride())} have no view as rows with a "
               "contiguous last dimension, so the kernel would read a copy")
    raise ValueError(f"inplace_backward=True cannot write the gradient into student_logits: "
                     f"{why}. Pass inplace_backward=False, or logits whose last dimension "
                     "is contiguous, in the teacher's precision.")


def _autocast_head(hidden, weight, bias):
    """Under torch.autocast the lm-head matmul behaves like nn.Linear's: fp32/bf16/fp16
    hidden, weight and bias are cast to the autocast dtype (float64 is left alone); the
    loss itself is still computed in float32."""
    device = hidden.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if x is None or x.dtype == torch.float64 else x.to(dtype)
                 for x in (hidden, weight, bias))


def _fused_linear_loss(student_hidden, student_weight, student_bias, target, teacher, kernel,
                       options, sparse, chunk_size, reduction, num_items_in_batch, ignore_index,
                       return_components=False):
    """The reduced loss (or `(loss, ce, divergence)`) of the chunked fused-linear sweep.

    `teacher` is (hidden (N, Ht), weight, bias) for the dense teacher or (logprobs (N, k),
    indices (N, k), None) with `sparse`; None `chunk_size` is the memory-budget default.
    """
    lead_shape = student_hidden.shape[:-1]
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    flat_target = _flat_target(target)
    n, vocab = hidden.shape[0], student_weight.shape[0]
    itemsize = _head_dtype(hidden, student_weight, student_bias).itemsize
    chunk = chunk_size or default_chunk_rows(n, vocab, itemsize, hidden.device, sparse)
    with autocast_off(hidden.device):
        out = fused_linear_rows(hidden, student_weight, student_bias, flat_target, teacher,
                                kernel, options, sparse, chunk, reduction == "none",
                                with_terms=return_components)
        out, terms = out if return_components else (out, None)
        if reduction == "none":
            loss = out.reshape(lead_shape)
        else:
            valid = _valid_count(flat_target, ignore_index)
            if valid is None:
                valid = torch.full((), n, dtype=torch.int64, device=out.device)
            loss = reduce_rows(out.reshape(1), valid, reduction, num_items_in_batch,
                               lead_shape)
        if not return_components:
            return loss
        return _with_components(loss, terms, _valid_count(flat_target, ignore_index),
                                reduction, num_items_in_batch, lead_shape)

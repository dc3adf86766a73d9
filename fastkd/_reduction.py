"""How per-row losses become the returned loss: the reductions, their divisors and components.

`reduce_rows` is the one reduction (docs/semantics.md); `host_reduction_weight` lets a CPU
kernel apply its factor inside the kernel so that the usual ``loss.backward()`` skips the
per-row rescale pass; `reduce_loss` also reduces the unweighted (CE, divergence) terms the
same way for ``return_components``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def reduce_rows(rows: torch.Tensor, valid_count: Optional[torch.Tensor], reduction: str,
                num_items_in_batch, lead_shape: torch.Size) -> torch.Tensor:
    """Applies the loss reduction (docs/semantics.md) to per-row losses `(N,)`.

    `"mean"` divides by `num_items_in_batch` when given, else by the number of non-ignored
    rows (`valid_count`, a tensor; None means all rows), clamped to 1 so an all-ignored batch
    gives loss 0 and gradient 0 rather than NaN.
    """
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    if num_items_in_batch is not None:
        return total / num_items_in_batch
    if valid_count is None:
        return total / max(rows.numel(), 1)
    return total / valid_count.clamp(min=1).to(total.dtype)


def flat_target(target: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """(...) integer labels -> (N,) contiguous int64 (None stays None)."""
    return None if target is None else target.reshape(-1).to(torch.int64).contiguous()


def valid_count(flat: Optional[torch.Tensor], ignore_index: int) -> Optional[torch.Tensor]:
    """The 0-dim count of non-ignored labels (None without a target: every row counts)."""
    return None if flat is None else (flat != ignore_index).sum()


def host_reduction_weight(student, valid, reduction, num_items_in_batch) -> Optional[float]:
    """The factor the reduction applies to every row, when knowing it on the host is free
    (CPU logits, eager mode); else None. `valid`: `valid_count`'s value, or None.

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


def reduce_components(loss, terms, valid, reduction, num_items_in_batch, lead_shape):
    """(loss, ce, divergence): the per-row terms (N, 2) reduced exactly like the loss."""
    ce, div = (reduce_rows(terms[:, i].detach(), valid, reduction, num_items_in_batch,
                           lead_shape) for i in (0, 1))
    return loss, ce, div


def reduce_loss(rows, terms, valid, reduction, num_items_in_batch, lead_shape, weight=None):
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
    return reduce_components(loss, terms, valid, reduction, num_items_in_batch, lead_shape)

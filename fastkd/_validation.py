"""Argument checks shared by every public loss. Each error names the argument at fault."""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from .reference import DIVERGENCES

REDUCTIONS = ("mean", "sum", "none")


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def check_floating(name: str, tensor) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")


def check_same_device(**tensors) -> None:
    items = [(k, v) for k, v in tensors.items() if isinstance(v, torch.Tensor)]
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}; "
                             "all tensors must be on the same device")


def check_target(target, lead_shape: torch.Size, vocab: Optional[int], ignore_index: int,
                 name: str = "target") -> None:
    """Shape, dtype and (in eager mode only) label range of `target` (vocab=None: the caller
    checks the range itself)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int64 labels or None, "
                        f"got {type(target).__name__}")
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must hold integer class labels (int64), got dtype {target.dtype}")
    if target.shape != lead_shape:
        raise ValueError(f"{name} must have shape {tuple(lead_shape)} (the logits' leading "
                         f"dimensions), got {tuple(target.shape)}")
    # The range check reads the labels on the host: skip it while tracing for torch.compile,
    # where a data-dependent branch would break the graph.
    if vocab is None or torch.compiler.is_compiling() or target.numel() == 0:
        return
    bad = ((target < 0) | (target >= vocab)) & (target != ignore_index)
    if bool(bad.any()):
        first = target[bad][0].item()
        raise ValueError(f"{name} holds label {first} outside [0, {vocab}) that is not "
                         f"ignore_index={ignore_index}")


def check_options(*, temperature, alpha, divergence, beta, ignore_index, label_smoothing,
                  softcap, reduction, num_items_in_batch) -> None:
    if not _is_number(temperature) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if not _is_number(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if divergence == "jsd" and (not _is_number(beta) or not 0.0 < beta < 1.0):
        raise ValueError(f"beta must be a number in (0, 1) for divergence='jsd', got {beta!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not _is_number(label_smoothing) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a number in [0, 1], got {label_smoothing!r}")
    if softcap is not None and (not _is_number(softcap) or not softcap > 0):
        raise ValueError(f"softcap must be None or a number > 0, got {softcap!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    check_num_items(num_items_in_batch)


def check_num_items(num_items_in_batch) -> None:
    if num_items_in_batch is None or isinstance(num_items_in_batch, torch.Tensor):
        return
    if not _is_number(num_items_in_batch) or not num_items_in_batch > 0:
        raise ValueError("num_items_in_batch must be None, a tensor or a number > 0, "
                         f"got {num_items_in_batch!r}")


def reduce_rows(rows: torch.Tensor, valid_count: Optional[torch.Tensor], reduction: str,
                num_items_in_batch, lead_shape: torch.Size) -> torch.Tensor:
    """Applies the reduction of DESIGN.md §1 to per-row losses `(N,)`.

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

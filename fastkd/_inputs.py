"""How the public losses take their inputs: float64 promotion, autocast lm-heads, in-place
gradient writes (docs/semantics.md, "Dtypes" and "inplace_backward")."""

from __future__ import annotations

import torch


def to_float64_if_any(*tensors):
    """float64 on either side: every tensor in float64 (autograd casts the gradients back)."""
    if not any(t is not None and t.dtype == torch.float64 for t in tensors):
        return tensors
    return tuple(None if t is None else t.to(torch.float64) for t in tensors)


def check_inplace(student_logits, copied: bool, upcast: bool) -> None:
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


def autocast_head(hidden, weight, bias):
    """Under torch.autocast the lm-head matmul behaves like nn.Linear's: fp32/bf16/fp16
    hidden, weight and bias are cast to the autocast dtype (float64 is left alone); the
    loss itself is still computed in float32."""
    device = hidden.device.type
    if device not in ("cpu", "cuda") or not torch.is_autocast_enabled(device):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device)
    return tuple(None if x is None or x.dtype == torch.float64 else x.to(dtype)
                 for x in (hidden, weight, bias))

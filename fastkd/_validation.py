"""Argument checks shared by every public loss. Each error names the argument at fault."""

from __future__ import annotations

from typing import Optional

import torch

from ._options import REDUCTIONS, LossOptions, check_num_items  # noqa: F401  (re-exported)


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


def is_label_dtype(dtype: torch.dtype) -> bool:
    """Integer class labels: any integer dtype (int8/16/32/64, uint8, ...), not bool."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def check_target(target, lead_shape: torch.Size, vocab: Optional[int], ignore_index: int,
                 name: str = "target") -> None:
    """Shape, dtype and (in eager mode only) label range of `target` (vocab=None: the caller
    checks the range itself). Labels may have any integer dtype; float and bool are refused."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer class labels or None, "
                        f"got {type(target).__name__}")
    if not is_label_dtype(target.dtype):
        raise TypeError(f"{name} must hold integer class labels (any integer dtype, e.g. "
                        f"int64), got dtype {target.dtype}")
    if target.shape != lead_shape:
        raise ValueError(f"{name} must have shape {tuple(lead_shape)} (the logits' leading "
                         f"dimensions), got {tuple(target.shape)}")
    # The range check reads the labels on the host: skip it while tracing for torch.compile,
    # where a data-dependent branch would break the graph.
    if vocab is None or torch.compiler.is_compiling() or target.numel() == 0:
        return
    labels = target.to(torch.int64)  # uint8 / int8 labels compared with a negative index
    bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
    if bool(bad.any()):
        first = labels[bad][0].item()
        raise ValueError(f"{name} holds label {first} outside [0, {vocab}) that is not "
                         f"ignore_index={ignore_index}")


def check_options(**keywords) -> None:
    """The loss settings' one set of rules (`LossOptions.validate`)."""
    LossOptions(**keywords).validate()


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


def check_dims(name: str, tensor: torch.Tensor, what: str) -> None:
    if tensor.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (..., {what})")


def vocab_mismatch(teacher_name: str, teacher_vocab: int, student_name: str,
                   student_vocab: int, teacher_slice: str, student_slice: str) -> ValueError:
    """The error for two vocabularies of different sizes, saying how to align them."""
    if teacher_vocab > student_vocab:
        fix = (f"If the teacher's extra {teacher_vocab - student_vocab} columns are padding "
               f"rows of its lm-head (same tokenizer, head padded to a multiple), slice them "
               f"off: {teacher_slice}.")
    else:
        fix = (f"If the student's extra {student_vocab - teacher_vocab} columns are padding "
               f"rows of its lm-head (same tokenizer, head padded to a multiple), slice them "
               f"off: {student_slice}.")
    return ValueError(f"{teacher_name} has a vocabulary of {teacher_vocab} but {student_name} "
                      f"has {student_vocab}. {fix} Otherwise the two models use different "
                      "tokenizers: logit distillation needs one shared vocabulary (the same "
                      "tokenizer for teacher and student).")


def check_logits_pair(student_logits, teacher_logits, target) -> None:
    """Floating `(..., V)` logits with the same leading shape and vocabulary, one device.
    Their dtypes may differ (each side is read in its own)."""
    check_floating("student_logits", student_logits)
    check_floating("teacher_logits", teacher_logits)
    check_dims("student_logits", student_logits, "V")
    check_dims("teacher_logits", teacher_logits, "V")
    s_lead, t_lead = student_logits.shape[:-1], teacher_logits.shape[:-1]
    if t_lead != s_lead:
        raise ValueError(f"teacher_logits leading shape {tuple(t_lead)} must equal "
                         f"student_logits leading shape {tuple(s_lead)}: one row of logits "
                         "per token on both sides (shapes "
                         f"{tuple(teacher_logits.shape)} and {tuple(student_logits.shape)})")
    s_vocab, t_vocab = student_logits.shape[-1], teacher_logits.shape[-1]
    if t_vocab != s_vocab:
        raise vocab_mismatch("teacher_logits", t_vocab, "student_logits", s_vocab,
                             f"teacher_logits[..., :{s_vocab}]",
                             f"student_logits[..., :{t_vocab}]")
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits,
                      target=target)


def check_linear_head(prefix: str, hidden, weight, bias) -> None:
    """hidden (..., H), weight (V, H) as nn.Linear.weight, bias (V,) | None; floating, each
    in any floating dtype (the head computes in their promoted dtype)."""
    check_floating(f"{prefix}_hidden", hidden)
    check_floating(f"{prefix}_weight", weight)
    check_dims(f"{prefix}_hidden", hidden, "H")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}_weight must have shape (V, {hidden.shape[-1]}) like "
                         f"nn.Linear.weight (H = {prefix}_hidden's last dimension), got "
                         f"{tuple(weight.shape)}")
    if bias is not None:
        check_floating(f"{prefix}_bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{prefix}_bias must have shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)}")


def check_heads_pair(student_hidden, student_weight, teacher_hidden, teacher_weight) -> None:
    """Same tokens (leading shapes) and the same vocabulary (weight rows) on both sides."""
    s_lead, t_lead = student_hidden.shape[:-1], teacher_hidden.shape[:-1]
    if t_lead != s_lead:
        raise ValueError(f"teacher_hidden leading shape {tuple(t_lead)} must equal "
                         f"student_hidden leading shape {tuple(s_lead)}: one hidden state per "
                         "token on both sides")
    s_vocab, t_vocab = student_weight.shape[0], teacher_weight.shape[0]
    if t_vocab != s_vocab:
        raise vocab_mismatch("teacher_weight", t_vocab, "student_weight", s_vocab,
                             f"teacher_weight[:{s_vocab}] (and teacher_bias[:{s_vocab}])",
                             f"student_weight[:{t_vocab}] (and student_bias[:{t_vocab}])")


def check_chunk_size(chunk_size) -> None:
    if chunk_size is None:
        return
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")

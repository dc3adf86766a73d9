"""Argument checks shared by every public loss. Each error names the argument at fault."""

from __future__ import annotations

import math
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


#: A top-k teacher row's probabilities may sum to at most exp(this) (rounding of stored values).
TOPK_MASS_TOLERANCE = 1e-2


def check_topk_shapes(logprobs, indices, lead_shape, vocab: Optional[int]) -> int:
    """Dtypes and shapes of (..., k) top-k rows for a student of leading shape `lead_shape`;
    returns k. `vocab` None (a vocabulary slice, as in the vocab-parallel loss): k >= 1 only."""
    check_floating("teacher_topk_logprobs", logprobs)
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError("teacher_topk_indices must be an int64 or int32 tensor of vocabulary "
                        f"indices, got {getattr(indices, 'dtype', type(indices).__name__)}")
    if logprobs.dim() != len(lead_shape) + 1 or logprobs.shape[:-1] != lead_shape:
        raise ValueError(f"teacher_topk_logprobs must have shape {tuple(lead_shape)} + (k,) "
                         f"(the student's leading dimensions), got {tuple(logprobs.shape)}")
    if indices.shape != logprobs.shape:
        raise ValueError(f"teacher_topk_indices shape {tuple(indices.shape)} must equal "
                         f"teacher_topk_logprobs shape {tuple(logprobs.shape)}")
    k = logprobs.shape[-1]
    if vocab is None:
        if k < 1:
            raise ValueError("teacher_topk_logprobs must hold k >= 1 entries per row")
    elif not 1 <= k <= vocab:
        raise ValueError(f"teacher_topk_logprobs must hold 1 <= k <= V={vocab} entries per "
                         f"row, got k={k}")
    return k


def check_topk(logprobs, indices, lead_shape, vocab: int, valid_rows) -> None:
    """Shapes and dtypes; in eager mode also, on the rows that are not ignored, index range,
    uniqueness and mass <= 1 (vectorised). Ignored rows may hold anything."""
    k = check_topk_shapes(logprobs, indices, lead_shape, vocab)
    # Data checks read values on the host: eager mode only (see check_target).
    if torch.compiler.is_compiling() or indices.numel() == 0:
        return
    indices, logprobs = indices.reshape(-1, k), logprobs.reshape(-1, k)
    valid = None if valid_rows is None else valid_rows.reshape(-1)
    max_mass = math.exp(TOPK_MASS_TOLERANCE)
    first = _first_bad_rows_cpu(logprobs, indices, valid, vocab, max_mass)
    if first is None:
        # Per row: index out of range, repeated index, mass > 1; one host sync for all
        # three. Few passes over (N, k) (sort, compare, exp, sum), the rest on (N,) vectors.
        ordered = indices.sort(dim=-1).values
        mass = logprobs.float().exp().sum(-1)  # log-probs <= ~0: no overflow; NaN stays
        flags = torch.stack([(ordered[:, 0] < 0) | (ordered[:, -1] >= vocab),
                             (ordered[:, 1:] == ordered[:, :-1]).any(-1),
                             ~(mass <= max_mass)])
        if valid is not None:  # only the rows that are read
            flags &= valid.reshape(1, -1)
        found = flags.any(-1)
        first = (torch.where(found, flags.int().argmax(-1) + 1, 0)).tolist()
    bad_range, repeated, too_much = first
    if bad_range:
        row = indices[bad_range - 1]
        raise ValueError(f"teacher_topk_indices must lie in [0, {vocab}) on rows that are not "
                         f"ignored; row {bad_range - 1} (flattened) holds min "
                         f"{row.min().item()}, max {row.max().item()}")
    if repeated:
        raise ValueError("teacher_topk_indices must be unique within each row that is not "
                         f"ignored; row {repeated - 1} (flattened) repeats an index")
    if too_much:
        lse = torch.logsumexp(logprobs[too_much - 1].double(), dim=-1).item()
        raise ValueError("teacher_topk_logprobs must be log-probabilities (at "
                         "teacher_temperature) whose exp sums to <= 1 per row; row "
                         f"{too_much - 1} (flattened) has log-sum-exp {lse:.4g}")


def _first_bad_rows_cpu(logprobs, indices, valid, vocab, max_mass):
    """The checks in one serial C++ pass for CPU tensors (None: use the vectorised path)."""
    if indices.device.type != "cpu":
        return None
    try:
        from .ops.sparse_native import first_bad_rows
    except Exception:  # the extension is not importable: vectorised path
        return None
    return first_bad_rows(logprobs, indices, valid, vocab, max_mass)

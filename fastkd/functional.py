"""Public functional API: validation, flattening, backend resolution, weighting, reduction."""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._dispatch import BackendUnavailableError, dense_kernel, resolve_backend
from ._validation import (
    check_floating,
    check_options,
    check_same_device,
    check_target,
    reduce_rows,
)
from .ops import dense_distillation_rows
from .ops.fused_linear import default_chunk_rows, fused_linear_rows
from .ops.sparse import sparse_distillation_rows
from .reference import DIVERGENCES
from .reference.sparse import TAILS, sparse_kd_rows


def loss_weights(target_given: bool, alpha: float, temperature: float,
                 scale_by_t2: bool) -> tuple:
    """(ce_weight, div_weight) of `alpha * CE + (1 - alpha) * k * D`, k = T^2 or 1.

    With no target there is no hard term and the loss is `k * D` (alpha unused).
    """
    k = float(temperature) ** 2 if scale_by_t2 else 1.0
    if not target_given:
        return 0.0, k
    return float(alpha), (1.0 - float(alpha)) * k


def kernel_options(target_given: bool, *, temperature, alpha, divergence, beta, scale_by_t2,
                   ignore_index, label_smoothing, softcap) -> tuple:
    """The kernel's scalar arguments (temperature, ce_weight, div_weight, divergence code,
    beta, ignore_index, label_smoothing, softcap with 0 = off)."""
    ce_weight, div_weight = loss_weights(target_given, alpha, temperature, scale_by_t2)
    return (float(temperature), ce_weight, div_weight, DIVERGENCES.index(divergence),
            float(beta), int(ignore_index), float(label_smoothing),
            float(softcap) if softcap is not None else 0.0)


def check_logits_pair(student_logits, teacher_logits, target) -> None:
    check_floating("student_logits", student_logits)
    check_floating("teacher_logits", teacher_logits)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (..., V)")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits shape {tuple(teacher_logits.shape)} must equal "
                         f"student_logits shape {tuple(student_logits.shape)} (same tokens "
                         "and vocabulary; pad the smaller vocabulary with -inf)")
    if teacher_logits.dtype != student_logits.dtype:
        raise TypeError(f"teacher_logits dtype {teacher_logits.dtype} must equal "
                        f"student_logits dtype {student_logits.dtype}")
    check_same_device(student_logits=student_logits, teacher_logits=teacher_logits,
                      target=target)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "kl",
    beta: float = 0.5,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    num_items_in_batch=None,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Hinton-style distillation loss `alpha * CE + (1 - alpha) * T^2 * D(p_t, p_s)`.

    student_logits, teacher_logits: (..., V) of one floating dtype; target: (...) int64 or
    None. Returns a scalar, or (...) for reduction="none"; float32 for fp32/bf16/fp16 inputs
    and float64 for float64 inputs. See DESIGN.md §1 for the exact semantics.

    inplace_backward=True writes the gradient into student_logits' buffer (saving one
    (N, V) tensor): the logits' values are destroyed, so use it only when nothing else
    reads them after this call (e.g. logits straight from the lm-head).
    """
    check_logits_pair(student_logits, teacher_logits, target)
    check_options(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                  ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap,
                  reduction=reduction, num_items_in_batch=num_items_in_batch)
    lead_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if target is not None:
        check_target(target, lead_shape, vocab, ignore_index)
    name = resolve_backend(backend, student_logits)

    student = student_logits.reshape(-1, vocab).contiguous()
    teacher = teacher_logits.reshape(-1, vocab).contiguous()
    flat_target = None if target is None else target.reshape(-1).to(torch.int64)
    options = kernel_options(target is not None, temperature=temperature, alpha=alpha,
                             divergence=divergence, beta=beta, scale_by_t2=scale_by_t2,
                             ignore_index=ignore_index, label_smoothing=label_smoothing,
                             softcap=softcap)
    rows = dense_distillation_rows(student, teacher, flat_target, dense_kernel(name), options,
                                   inplace_backward=inplace_backward)
    valid = None if flat_target is None else (flat_target != ignore_index).sum()
    return reduce_rows(rows, valid, reduction, num_items_in_batch, lead_shape)


# --- Large-vocabulary losses: fused lm-head (chunked) and top-k (offline) teacher -------------

#: A top-k teacher row's probabilities may sum to at most exp(this) (rounding of stored values).
TOPK_MASS_TOLERANCE = 1e-2


def _check_linear_head(prefix: str, hidden, weight, bias) -> None:
    """hidden (..., H), weight (V, H) as nn.Linear.weight, bias (V,) | None; one dtype."""
    check_floating(f"{prefix}_hidden", hidden)
    check_floating(f"{prefix}_weight", weight)
    if hidden.dim() < 1:
        raise ValueError(f"{prefix}_hidden must have at least one dimension (..., H)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}_weight must have shape (V, {hidden.shape[-1]}) like "
                         f"nn.Linear.weight (H = {prefix}_hidden's last dimension), got "
                         f"{tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{prefix}_weight dtype {weight.dtype} must equal {prefix}_hidden "
                        f"dtype {hidden.dtype}")
    if bias is not None:
        check_floating(f"{prefix}_bias", bias)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"{prefix}_bias must have shape ({weight.shape[0]},), got "
                             f"{tuple(bias.shape)}")
        if bias.dtype != weight.dtype:
            raise TypeError(f"{prefix}_bias dtype {bias.dtype} must equal {prefix}_weight "
                            f"dtype {weight.dtype}")


def _check_chunk_size(chunk_size) -> None:
    if chunk_size is None:
        return
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")


def _check_tail(tail) -> None:
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")


def _check_topk(logprobs, indices, lead_shape, vocab: int, valid_rows) -> None:
    """Shapes and dtypes; in eager mode also, on the rows that are not ignored, index range,
    uniqueness and mass <= 1 (vectorised). Ignored rows may hold anything."""
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
    if not 1 <= k <= vocab:
        raise ValueError(f"teacher_topk_logprobs must hold 1 <= k <= V={vocab} entries per "
                         f"row, got k={k}")
    # Data checks read values on the host: eager mode only (see check_target).
    if torch.compiler.is_compiling() or indices.numel() == 0:
        return
    indices, logprobs = indices.reshape(-1, k), logprobs.reshape(-1, k)
    if valid_rows is not None:  # only the rows that are read
        keep = valid_rows.reshape(-1)
        indices, logprobs = indices[keep], logprobs[keep]
    if indices.numel() == 0:
        return
    if bool(((indices < 0) | (indices >= vocab)).any()):
        raise ValueError(f"teacher_topk_indices must lie in [0, {vocab}) on rows that are not "
                         f"ignored, got min {indices.min().item()}, max {indices.max().item()}")
    ordered = indices.sort(dim=-1).values
    if bool((ordered[:, 1:] == ordered[:, :-1]).any()):
        raise ValueError("teacher_topk_indices must be unique within each row that is not "
                         "ignored")
    lse = torch.logsumexp(logprobs.float(), dim=-1)
    bad = ~(lse <= TOPK_MASS_TOLERANCE)
    if bool(bad.any()):
        raise ValueError("teacher_topk_logprobs must be log-probabilities (at "
                         "teacher_temperature) whose exp sums to <= 1 per row; got a row with "
                         f"log-sum-exp {lse[bad][0].item():.4g}")


def _teacher_scale(teacher_temperature, temperature: float, tail: str) -> float:
    """T_stored / T: the factor that re-tempers stored log-probs (1 when not re-tempered)."""
    if teacher_temperature is None:
        return 1.0
    if (isinstance(teacher_temperature, bool)
            or not isinstance(teacher_temperature, (int, float))
            or not math.isfinite(teacher_temperature) or teacher_temperature <= 0):
        raise ValueError("teacher_temperature must be None or a finite number > 0, got "
                         f"{teacher_temperature!r}")
    scale = float(teacher_temperature) / float(temperature)
    if scale != 1.0 and tail == "bucket":
        raise ValueError(f"teacher_temperature={teacher_temperature} differs from "
                         f"temperature={temperature}: re-tempering needs tail='renormalize' "
                         "(the bucket's tail mass at the new temperature is unknown)")
    return scale


def _sparse_kernel(backend: str, tensor: torch.Tensor, teacher_scale: float = 1.0):
    """The top-k teacher kernel of a backend: the fused C++ op (`cpu`), the Triton op
    (`triton`), or the reference (`torch`, and `auto` where no fused kernel applies)."""
    import functools
    import os

    name = resolve_backend(backend, tensor)  # validates the name (and FASTKD_BACKEND)
    requested = backend if backend != "auto" else os.environ.get("FASTKD_BACKEND", "auto")
    if name == "cpu":
        try:
            from .ops.sparse_native import HAS_CPU, MISSING_REASON, sparse_kd_native
        except Exception as exc:  # an extension built without the top-k op
            HAS_CPU, MISSING_REASON = False, f"fastkd._C is not importable ({exc})"
        if HAS_CPU:
            kernel = sparse_kd_native
        elif requested != "auto":
            raise BackendUnavailableError("backend 'cpu' is unavailable for the top-k "
                                          f"teacher loss: {MISSING_REASON}")
        else:
            name = "torch"
    if name == "cuda":
        if requested != "auto":
            raise BackendUnavailableError("backend 'cuda' has no top-k teacher kernel; use "
                                          "'triton', 'torch' or 'auto'")
        name = "torch"
    if name == "triton":
        from .ops.sparse_triton import sparse_kd_triton as kernel
    elif name == "torch":
        kernel = sparse_kd_rows
    if teacher_scale != 1.0:
        kernel = functools.partial(kernel, teacher_scale=teacher_scale)
    return kernel


def _topk_rows(tensor: torch.Tensor, width: int, kernel) -> torch.Tensor:
    """(..., width) -> (N, width) without a copy where a view suffices (fused kernels read any
    row stride with contiguous columns); float64 log-probs become float32 for a fused kernel."""
    rows = tensor.reshape(-1, width)
    if rows.stride(-1) != 1 and width > 1:
        rows = rows.contiguous()
    if rows.dtype == torch.float64 and getattr(kernel, "func", kernel) is not sparse_kd_rows:
        rows = rows.float()
    return rows


def _flat_target(target):
    return None if target is None else target.reshape(-1).to(torch.int64).contiguous()


def _reduce_total(out, flat_target, n, ignore_index, reduction, num_items_in_batch,
                  lead_shape):
    """Reduction of the fused-linear output: rows for "none", else the summed loss."""
    if reduction == "none":
        return out.reshape(lead_shape)
    if flat_target is None:
        valid = torch.full((), n, dtype=torch.int64, device=out.device)
    else:
        valid = (flat_target != ignore_index).sum()
    return reduce_rows(out.reshape(1), valid, reduction, num_items_in_batch, lead_shape)


def _fused_linear_loss(student_hidden, student_weight, student_bias, target, teacher, kernel,
                       options, sparse, chunk_size, reduction, num_items_in_batch, ignore_index):
    lead_shape = student_hidden.shape[:-1]
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    flat_target = _flat_target(target)
    n, vocab = hidden.shape[0], student_weight.shape[0]
    chunk = chunk_size or default_chunk_rows(n, vocab, hidden.element_size(), hidden.device,
                                             sparse)
    out = fused_linear_rows(hidden, student_weight, student_bias, flat_target, teacher, kernel,
                            options, sparse, chunk, reduction == "none")
    return _reduce_total(out, flat_target, n, ignore_index, reduction, num_items_in_batch,
                         lead_shape)


def fused_linear_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    teacher_bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    temperature: float = 1.0,
    alpha: float = 0.5,
    divergence: str = "kl",
    beta: float = 0.5,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    num_items_in_batch=None,
    backend: str = "auto",
) -> torch.Tensor:
    """`distillation_loss(h_s @ W_s.T + b_s, h_t @ W_t.T + b_t, target)` without [N, V] logits.

    student_hidden (..., Hs), student_weight (V, Hs), student_bias (V,) | None; teacher_hidden
    (..., Ht), teacher_weight (V, Ht), teacher_bias (V,) | None; all of one floating dtype;
    target (...) int64 | None. Same keywords and result as `distillation_loss`.

    Logits are computed `chunk_size` rows at a time in the input dtype and fed to the backend's
    dense kernel; the chunk's gradient becomes grad-hidden and float32-accumulated grad-weight
    / grad-bias at once. chunk_size=None: 64 MiB of chunk logits (student + teacher) on CPU,
    512 MiB on CUDA, rounded down to a multiple of 64 rows (`default_chunk_rows`).
    The teacher is a constant: no gradient flows to teacher_hidden / teacher_weight /
    teacher_bias even if they require grad (use `distillation_loss` for online distillation).
    reduction="none" recomputes the chunks in backward (about 1.5x the mean/sum work).
    There is no inplace_backward keyword: each chunk's logits are always overwritten by their
    gradient.
    """
    _check_linear_head("student", student_hidden, student_weight, student_bias)
    _check_linear_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden leading shape {tuple(teacher_hidden.shape[:-1])} must "
                         f"equal student_hidden's {tuple(student_hidden.shape[:-1])}")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"teacher_weight has {teacher_weight.shape[0]} rows (vocabulary) but "
                         f"student_weight has {student_weight.shape[0]}; pad the smaller head")
    if teacher_hidden.dtype != student_hidden.dtype:
        raise TypeError(f"teacher_hidden dtype {teacher_hidden.dtype} must equal "
                        f"student_hidden dtype {student_hidden.dtype}")
    check_same_device(student_hidden=student_hidden, student_weight=student_weight,
                      student_bias=student_bias, teacher_hidden=teacher_hidden,
                      teacher_weight=teacher_weight, teacher_bias=teacher_bias, target=target)
    check_options(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                  ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap,
                  reduction=reduction, num_items_in_batch=num_items_in_batch)
    _check_chunk_size(chunk_size)
    if target is not None:
        check_target(target, student_hidden.shape[:-1], student_weight.shape[0], ignore_index)
    kernel = dense_kernel(resolve_backend(backend, student_hidden))
    options = kernel_options(target is not None, temperature=temperature, alpha=alpha,
                             divergence=divergence, beta=beta, scale_by_t2=scale_by_t2,
                             ignore_index=ignore_index, label_smoothing=label_smoothing,
                             softcap=softcap)
    teacher = (teacher_hidden.reshape(-1, teacher_hidden.shape[-1]), teacher_weight,
               teacher_bias)
    return _fused_linear_loss(student_hidden, student_weight, student_bias, target, teacher,
                              kernel, options, False, chunk_size, reduction,
                              num_items_in_batch, ignore_index)


def _check_sparse_call(student, logprobs, indices, target, tail, options, lead_shape, vocab):
    """Validation shared by the two top-k teacher losses."""
    check_options(**options)
    _check_tail(tail)
    if target is not None:
        check_target(target, lead_shape, vocab, options["ignore_index"])
    valid_rows = None if target is None else target != options["ignore_index"]
    _check_topk(logprobs, indices, lead_shape, vocab, valid_rows)


def _sparse_options(target, tail, temperature, alpha, divergence, beta, scale_by_t2,
                    ignore_index, label_smoothing, softcap) -> tuple:
    return kernel_options(target is not None, temperature=temperature, alpha=alpha,
                          divergence=divergence, beta=beta, scale_by_t2=scale_by_t2,
                          ignore_index=ignore_index, label_smoothing=label_smoothing,
                          softcap=softcap) + (tail == "renormalize",)


def sparse_distillation_loss(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    *,
    tail: str = "bucket",
    temperature: float = 1.0,
    teacher_temperature: Optional[float] = None,
    alpha: float = 0.5,
    divergence: str = "kl",
    beta: float = 0.5,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    num_items_in_batch=None,
    backend: str = "auto",
    inplace_backward: bool = False,
) -> torch.Tensor:
    """Distillation from a stored top-k teacher: `alpha * CE + (1 - alpha) * k * D_topk`.

    student_logits (..., V); teacher_topk_logprobs (..., k) the teacher's log-probabilities at
    the distillation temperature (any floating dtype); teacher_topk_indices (..., k) int64,
    unique per row; target (...) int64 | None. The student's log-sum-exp runs over its full
    vocabulary. tail="bucket": the k entries plus one bucket with the missing mass on both
    sides (a lower bound of the dense divergence, equal when k = V); tail="renormalize": the
    teacher renormalised over its k entries (exact definitions: `fastkd.reference.sparse`).
    teacher_temperature: the temperature the log-probs were taken at (None: `temperature`);
    when it differs they are re-tempered, (T_stored / T) * log p renormalised over the k
    entries (tail="renormalize" only: exact there; "bucket" raises ValueError). Indices may be
    int64 or int32, log-probs fp32/bf16/fp16; rows whose target is ignore_index are neither
    validated nor read. Backends: the fused C++ kernel (`cpu`), Triton (`triton`) or the
    reference (`torch`); the teacher gets no gradient. inplace_backward=True writes the
    gradient into student_logits' buffer (as `distillation_loss`). Returns what
    `distillation_loss` returns.
    """
    check_floating("student_logits", student_logits)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have at least one dimension (..., V)")
    lead_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    keywords = dict(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                    ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap,
                    reduction=reduction, num_items_in_batch=num_items_in_batch)
    _check_sparse_call(student_logits, teacher_topk_logprobs, teacher_topk_indices, target,
                       tail, keywords, lead_shape, vocab)
    check_same_device(student_logits=student_logits,
                      teacher_topk_logprobs=teacher_topk_logprobs,
                      teacher_topk_indices=teacher_topk_indices, target=target)
    scale = _teacher_scale(teacher_temperature, temperature, tail)
    kernel = _sparse_kernel(backend, student_logits, scale)
    k = teacher_topk_logprobs.shape[-1]
    flat_target = _flat_target(target)
    options = _sparse_options(target, tail, temperature, alpha, divergence, beta, scale_by_t2,
                              ignore_index, label_smoothing, softcap)
    student = student_logits.reshape(-1, vocab)  # a view where the leading dims merge
    if student.stride(-1) != 1 and vocab > 1:
        student = student.contiguous()
    if inplace_backward and student.data_ptr() != student_logits.data_ptr():
        raise ValueError("inplace_backward=True needs student_logits whose rows can be "
                         "viewed as (N, V) with contiguous columns (no copy)")
    rows = sparse_distillation_rows(
        student, _topk_rows(teacher_topk_logprobs, k, kernel),
        _topk_rows(teacher_topk_indices, k, kernel), flat_target, kernel, options,
        inplace_backward=inplace_backward)
    valid = None if flat_target is None else (flat_target != ignore_index).sum()
    return reduce_rows(rows, valid, reduction, num_items_in_batch, lead_shape)


def fused_linear_sparse_distillation_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    *,
    student_bias: Optional[torch.Tensor] = None,
    tail: str = "bucket",
    chunk_size: Optional[int] = None,
    temperature: float = 1.0,
    teacher_temperature: Optional[float] = None,
    alpha: float = 0.5,
    divergence: str = "kl",
    beta: float = 0.5,
    scale_by_t2: bool = True,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    softcap: Optional[float] = None,
    reduction: str = "mean",
    num_items_in_batch=None,
    backend: str = "auto",
) -> torch.Tensor:
    """`sparse_distillation_loss(h @ W.T + b, topk_logprobs, topk_indices, target)` computed
    `chunk_size` rows at a time (never [N, V] logits), as `fused_linear_distillation_loss`.

    student_hidden (..., H), student_weight (V, H), student_bias (V,) | None; the top-k
    teacher as in `sparse_distillation_loss` (teacher_temperature too). Each chunk runs the
    backend's top-k kernel, its gradient written over the chunk's logits. chunk_size=None:
    64 MiB of chunk logits on CPU, 512 MiB on CUDA (`default_chunk_rows`).
    """
    _check_linear_head("student", student_hidden, student_weight, student_bias)
    lead_shape, vocab = student_hidden.shape[:-1], student_weight.shape[0]
    keywords = dict(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                    ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap,
                    reduction=reduction, num_items_in_batch=num_items_in_batch)
    _check_sparse_call(student_hidden, teacher_topk_logprobs, teacher_topk_indices, target,
                       tail, keywords, lead_shape, vocab)
    check_same_device(student_hidden=student_hidden, student_weight=student_weight,
                      student_bias=student_bias, teacher_topk_logprobs=teacher_topk_logprobs,
                      teacher_topk_indices=teacher_topk_indices, target=target)
    _check_chunk_size(chunk_size)
    scale = _teacher_scale(teacher_temperature, temperature, tail)
    kernel = _sparse_kernel(backend, student_hidden, scale)
    k = teacher_topk_logprobs.shape[-1]
    teacher = (_topk_rows(teacher_topk_logprobs, k, kernel),
               _topk_rows(teacher_topk_indices, k, kernel), None)
    options = _sparse_options(target, tail, temperature, alpha, divergence, beta, scale_by_t2,
                              ignore_index, label_smoothing, softcap)
    return _fused_linear_loss(student_hidden, student_weight, student_bias, target, teacher,
                              kernel, options, True, chunk_size, reduction,
                              num_items_in_batch, ignore_index)

"""Public functional API: validation, flattening, backend resolution, weighting, reduction.

The exact semantics (formulas, options, reductions, dtype rules, edge cases and errors) are
documented in docs/semantics.md.
"""

from __future__ import annotations

import sys
from typing import Optional

import torch

from ._dispatch import BackendUnavailableError, dense_kernel, resolve_backend
from ._docs import fill_doc
from ._validation import check_chunk_size as _check_chunk_size
from ._validation import (
    check_floating,
    check_heads_pair,
    check_logits_pair,
    check_options,
    check_same_device,
    check_target,
    reduce_rows,
)
from ._validation import check_linear_head as _check_linear_head
from .ops import dense_distillation_rows
from .ops.dense import autocast_off, rows_layout
from .ops.fused_linear import default_chunk_rows, fused_linear_rows
from .ops.sparse import sparse_distillation_rows
from .reference import DIVERGENCES
from .reference.sparse import TAILS, sparse_kd_rows

__all__ = ["distillation_loss", "fused_linear_distillation_loss",
           "fused_linear_sparse_distillation_loss", "sparse_distillation_loss"]


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


def _to_float64_if_any(*tensors):
    """float64 on either side: every tensor in float64 (autograd casts the gradients back)."""
    if not any(t is not None and t.dtype == torch.float64 for t in tensors):
        return tensors
    return tuple(None if t is None else t.to(torch.float64) for t in tensors)


@fill_doc
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
    return_components: bool = False,
):
    """Hinton-style distillation loss ``alpha * CE + (1 - alpha) * k * D(p_t, p_s)``.

    Per token: ``p_s = softmax(s / T)``, ``p_t = softmax(t / T)``, CE the cross-entropy of
    the student at temperature 1 against ``target``; k = T^2 (or 1). Exact definitions in
    docs/semantics.md.

    Parameters
    ----------
    student_logits : Tensor, shape (..., V), float32 / bfloat16 / float16 / float64
        Read where it is: any strides with a contiguous last dimension (e.g.
        ``logits[:, :-1]``) are read without a copy.
    teacher_logits : Tensor, shape (..., V), float32 / bfloat16 / float16 / float64
        Same shape as ``student_logits``; its dtype may differ (each side is read in its
        own dtype; float64 on either side computes both in float64 on the "torch"
        backend). It gets a gradient only if it requires grad (online distillation).
    target : Tensor or None, shape (...), any integer dtype
        Class labels; None means no hard term (``loss = k * D``).
    %(options)s
    inplace_backward : bool, default False
        Write the student gradient into ``student_logits``' own storage (saves one (N, V)
        buffer; its values are destroyed, so nothing else may read them after this call).
        Raises ValueError when the logits would have to be copied first (strided last
        dimension, leading dimensions that cannot be viewed as rows, or a float64 teacher
        with a lower-precision student).

    Returns
    -------
    %(returns)s

    Raises
    ------
    %(raises)s
    """
    if _is_dtensor(student_logits, teacher_logits):
        from . import distributed

        return distributed.dtensor_distillation_loss(
            student_logits, teacher_logits, target, temperature=temperature, alpha=alpha,
            divergence=divergence, beta=beta, scale_by_t2=scale_by_t2,
            ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap,
            reduction=reduction, num_items_in_batch=num_items_in_batch, backend=backend,
            inplace_backward=inplace_backward, return_components=return_components)
    check_logits_pair(student_logits, teacher_logits, target)
    check_options(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                  ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap,
                  reduction=reduction, num_items_in_batch=num_items_in_batch)
    lead_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if target is not None:
        check_target(target, lead_shape, vocab, ignore_index)
    name = resolve_backend(backend, student_logits, teacher_logits)

    student, teacher = _to_float64_if_any(student_logits, teacher_logits)
    upcast = student is not student_logits
    student, teacher, copied = rows_layout(student, teacher)
    if inplace_backward and (copied or upcast):
        why = ("its dtype is raised to float64 to match the float64 teacher" if upcast else
               f"its strides {tuple(student_logits.stride())} have no view as rows with a "
               "contiguous last dimension")
        raise ValueError("inplace_backward=True cannot write the gradient into "
                         f"student_logits: {why}, so the kernel would read a copy. Pass "
                         "inplace_backward=False (or logits whose last dimension is "
                         "contiguous, in the teacher's precision).")
    flat_target = _flat_target(target)
    options = kernel_options(target is not None, temperature=temperature, alpha=alpha,
                             divergence=divergence, beta=beta, scale_by_t2=scale_by_t2,
                             ignore_index=ignore_index, label_smoothing=label_smoothing,
                             softcap=softcap)
    out = dense_distillation_rows(student, teacher, flat_target, dense_kernel(name), options,
                                  inplace_backward=inplace_backward,
                                  with_terms=return_components)
    rows, terms = out if return_components else (out, None)
    valid = _valid_count(flat_target, ignore_index)
    with autocast_off(rows.device):
        loss = reduce_rows(rows, valid, reduction, num_items_in_batch, lead_shape)
        if not return_components:
            return loss
        return _with_components(loss, terms, valid, reduction, num_items_in_batch,
                                lead_shape)


# --- Large-vocabulary losses: fused lm-head (chunked) and top-k (offline) teacher -------------

#: A top-k teacher row's probabilities may sum to at most exp(this) (rounding of stored values).
TOPK_MASS_TOLERANCE = 1e-2


def _check_tail(tail) -> None:
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")


def _check_topk(logprobs, indices, lead_shape, vocab: int, valid_rows) -> None:
    """Shapes and dtypes; in eager mode also index range, uniqueness and mass <= 1."""
    check_floating("teacher_topk_logprobs", logprobs)
    if not isinstance(indices, torch.Tensor) or indices.dtype not in (torch.int64, torch.int32):
        raise TypeError("teacher_topk_indices must be an int64 tensor of vocabulary indices, "
                        f"got {getattr(indices, 'dtype', type(indices).__name__)}")
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
    if bool(((indices < 0) | (indices >= vocab)).any()):
        raise ValueError(f"teacher_topk_indices must lie in [0, {vocab}), got "
                         f"min {indices.min().item()}, max {indices.max().item()}")
    ordered = indices.sort(dim=-1).values
    if bool((ordered[..., 1:] == ordered[..., :-1]).any()):
        raise ValueError("teacher_topk_indices must be unique within each row")
    lse = torch.logsumexp(logprobs.float(), dim=-1)
    bad = ~(lse <= TOPK_MASS_TOLERANCE)
    if valid_rows is not None:
        bad = bad & valid_rows
    if bool(bad.any()):
        raise ValueError("teacher_topk_logprobs must be log-probabilities (at the "
                         "distillation temperature) whose exp sums to <= 1 per row; got a "
                         f"row with log-sum-exp {lse[bad][0].item():.4g}")


def _sparse_kernel(backend: str, tensor: torch.Tensor):
    """The top-k teacher loss is implemented by the reference only (any device)."""
    name = resolve_backend(backend, tensor)  # validates the name (and FASTKD_BACKEND)
    if backend != "auto" and name != "torch":
        raise BackendUnavailableError(f"backend {backend!r} has no top-k teacher kernel; use "
                                      "backend='torch' or 'auto' (the reference, any device)")
    return sparse_kd_rows


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


def _head_dtype(*tensors) -> torch.dtype:
    """The promoted dtype of one side's (hidden, weight, bias): the lm-head matmul's."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _fused_linear_loss(student_hidden, student_weight, student_bias, target, teacher, kernel,
                       options, sparse, chunk_size, reduction, num_items_in_batch, ignore_index,
                       return_components=False):
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


@fill_doc
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
    return_components: bool = False,
):
    """``distillation_loss(h_s @ W_s.T + b_s, h_t @ W_t.T + b_t, target)`` without ever
    holding the (N, V) logits.

    Logits are computed ``chunk_size`` rows at a time and fed to the backend's dense kernel;
    each chunk's gradient becomes grad-hidden and float32-accumulated grad-weight /
    grad-bias at once. The teacher is a constant: no gradient flows to ``teacher_hidden`` /
    ``teacher_weight`` / ``teacher_bias`` even if they require grad (use
    `distillation_loss` for online distillation). ``reduction="none"`` recomputes the chunks
    in backward (about 1.5x the mean/sum work). Each chunk's logits are overwritten by their
    gradient (there is no ``inplace_backward`` keyword).

    Dtypes: each side's lm-head matmul runs in the promoted dtype of its (hidden, weight,
    bias) (e.g. bf16 hidden with an fp32 weight: fp32; nothing is cast down), and the two
    sides may differ (each side's chunk logits are read in their own dtype); float64 anywhere
    computes everything in float64 on the "torch" backend. Gradients come back in each
    input's dtype. Under ``torch.autocast`` the matmuls behave like ``nn.Linear``'s (inputs
    cast to the autocast dtype, float64 excepted) and the loss is computed and returned in
    float32.

    Parameters
    ----------
    student_hidden : Tensor, shape (..., Hs), float32 / bfloat16 / float16 / float64
    student_weight : Tensor, shape (V, Hs), floating
        As ``nn.Linear.weight`` (e.g. ``lm_head.weight``).
    teacher_hidden : Tensor, shape (..., Ht), floating
        Same leading shape as ``student_hidden``.
    teacher_weight : Tensor, shape (V, Ht), floating
        Same vocabulary V as ``student_weight``.
    target : Tensor or None, shape (...), any integer dtype
    student_bias, teacher_bias : Tensor or None, shape (V,), floating
    chunk_size : int or None, default None
        Rows per chunk. None: 64 MiB of chunk logits (student + teacher) on CPU, 512 MiB on
        CUDA, rounded down to a multiple of 64 rows.
    %(options)s

    Returns
    -------
    %(returns)s

    Raises
    ------
    %(raises)s
    """
    if _is_dtensor(student_weight, teacher_weight, student_hidden, teacher_hidden):
        from . import distributed

        return distributed.dtensor_fused_linear_distillation_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, target,
            student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=chunk_size,
            temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
            scale_by_t2=scale_by_t2, ignore_index=ignore_index,
            label_smoothing=label_smoothing, softcap=softcap, reduction=reduction,
            num_items_in_batch=num_items_in_batch, backend=backend,
            return_components=return_components)
    _check_linear_head("student", student_hidden, student_weight, student_bias)
    _check_linear_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
    check_heads_pair(student_hidden, student_weight, teacher_hidden, teacher_weight)
    check_same_device(student_hidden=student_hidden, student_weight=student_weight,
                      student_bias=student_bias, teacher_hidden=teacher_hidden,
                      teacher_weight=teacher_weight, teacher_bias=teacher_bias, target=target)
    check_options(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                  ignore_index=ignore_index, label_smoothing=label_smoothing, softcap=softcap,
                  reduction=reduction, num_items_in_batch=num_items_in_batch)
    _check_chunk_size(chunk_size)
    if target is not None:
        check_target(target, student_hidden.shape[:-1], student_weight.shape[0], ignore_index)
    student = _autocast_head(student_hidden, student_weight, student_bias)
    teacher = _autocast_head(teacher_hidden, teacher_weight, teacher_bias)
    s_h, s_w, s_b, t_h, t_w, t_b = _to_float64_if_any(*student, *teacher)
    kernel = dense_kernel(resolve_backend(backend, s_h, s_w, t_h, t_w))
    options = kernel_options(target is not None, temperature=temperature, alpha=alpha,
                             divergence=divergence, beta=beta, scale_by_t2=scale_by_t2,
                             ignore_index=ignore_index, label_smoothing=label_smoothing,
                             softcap=softcap)
    teacher = (t_h.reshape(-1, t_h.shape[-1]), t_w, t_b)
    return _fused_linear_loss(s_h, s_w, s_b, target, teacher, kernel, options, False,
                              chunk_size, reduction, num_items_in_batch, ignore_index,
                              return_components)


def _check_sparse_call(student, logprobs, indices, target, tail, options, lead_shape, vocab):
    """Validation shared by the two top-k teacher losses."""
    check_options(**options)
    _check_tail(tail)
    if target is not None:
        check_target(target, lead_shape, vocab, options["ignore_index"])
    valid_rows = None if target is None else target.to(torch.int64) != options["ignore_index"]
    _check_topk(logprobs, indices, lead_shape, vocab, valid_rows)


def _sparse_options(target, tail, temperature, alpha, divergence, beta, scale_by_t2,
                    ignore_index, label_smoothing, softcap) -> tuple:
    return kernel_options(target is not None, temperature=temperature, alpha=alpha,
                          divergence=divergence, beta=beta, scale_by_t2=scale_by_t2,
                          ignore_index=ignore_index, label_smoothing=label_smoothing,
                          softcap=softcap) + (tail == "renormalize",)


@fill_doc
def sparse_distillation_loss(
    student_logits: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    teacher_topk_indices: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    *,
    tail: str = "bucket",
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
    return_components: bool = False,
):
    """Distillation from a stored top-k teacher: ``alpha * CE + (1 - alpha) * k * D_topk``.

    The student's log-sum-exp runs over its full vocabulary. The teacher gets no gradient.
    Exact definitions of both tails in docs/semantics.md.

    Parameters
    ----------
    student_logits : Tensor, shape (..., V), float32 / bfloat16 / float16 / float64
    teacher_topk_logprobs : Tensor, shape (..., k), floating
        The teacher's log-probabilities at the distillation temperature, 1 <= k <= V.
    teacher_topk_indices : Tensor, shape (..., k), int64 or int32
        Their vocabulary indices, unique within each row.
    target : Tensor or None, shape (...), any integer dtype
    tail : {"bucket", "renormalize"}, default "bucket"
        "bucket": the k entries plus one bucket holding the missing mass on both sides (a
        lower bound of the dense divergence, equal when k = V); "renormalize": the teacher
        renormalised over its k entries.
    %(options)s

    Returns
    -------
    %(returns)s

    Raises
    ------
    %(raises)s
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
    kernel = _sparse_kernel(backend, student_logits)
    k = teacher_topk_logprobs.shape[-1]
    flat_target = _flat_target(target)
    options = _sparse_options(target, tail, temperature, alpha, divergence, beta, scale_by_t2,
                              ignore_index, label_smoothing, softcap)
    rows = sparse_distillation_rows(
        student_logits.reshape(-1, vocab).contiguous(),
        teacher_topk_logprobs.reshape(-1, k).contiguous(),
        teacher_topk_indices.reshape(-1, k).to(torch.int64).contiguous(), flat_target, kernel,
        options, **({"return_terms": True} if return_components else {}))
    rows, terms = rows if return_components else (rows, None)
    valid = None if flat_target is None else (flat_target != ignore_index).sum()
    loss = reduce_rows(rows, valid, reduction, num_items_in_batch, lead_shape)
    if not return_components:
        return loss
    return _with_components(loss, terms, valid, reduction, num_items_in_batch, lead_shape)


@fill_doc
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
    return_components: bool = False,
):
    """``sparse_distillation_loss(h @ W.T + b, topk_logprobs, topk_indices, target)`` computed
    ``chunk_size`` rows at a time (never (N, V) logits), as `fused_linear_distillation_loss`.

    Parameters
    ----------
    student_hidden : Tensor, shape (..., H), floating
    student_weight : Tensor, shape (V, H), floating
        As ``nn.Linear.weight``; the matmul runs in the promoted dtype of hidden, weight
        and bias (like nn.Linear under ``torch.autocast``).
    teacher_topk_logprobs, teacher_topk_indices : Tensor, shape (..., k)
        The top-k teacher, as in `sparse_distillation_loss`.
    target : Tensor or None, shape (...), any integer dtype
    student_bias : Tensor or None, shape (V,), floating
    tail : {"bucket", "renormalize"}, default "bucket"
    chunk_size : int or None, default None
        Rows per chunk; None: 64 MiB of chunk logits on CPU, 512 MiB on CUDA.
    %(options)s

    Returns
    -------
    %(returns)s

    Raises
    ------
    %(raises)s
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
    kernel = _sparse_kernel(backend, student_hidden)
    student_hidden, student_weight, student_bias = _autocast_head(student_hidden,
                                                                  student_weight, student_bias)
    k = teacher_topk_logprobs.shape[-1]
    teacher = (teacher_topk_logprobs.reshape(-1, k).contiguous(),
               teacher_topk_indices.reshape(-1, k).to(torch.int64).contiguous(), None)
    options = _sparse_options(target, tail, temperature, alpha, divergence, beta, scale_by_t2,
                              ignore_index, label_smoothing, softcap)
    return _fused_linear_loss(student_hidden, student_weight, student_bias, target, teacher,
                              kernel, options, True, chunk_size, reduction,
                              num_items_in_batch, ignore_index, return_components)

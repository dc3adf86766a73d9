"""Public functional API: validation, flattening, backend resolution, weighting, reduction.

The dense losses live here; the top-k (offline) teacher losses live in `fastkd._sparse_api`
and are re-exported from this module.

The exact semantics (formulas, options, reductions, dtype rules, edge cases and errors) are
documented in docs/semantics.md.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import dense_kernel, resolve_backend
from ._docs import fill_doc
from ._glue import (
    _autocast_head,
    _check_inplace,
    _flat_target,
    _fused_linear_loss,
    _is_dtensor,
    _reduced,
    _to_float64_if_any,
    _valid_count,
    host_reduction_weight,
    kernel_options,
    loss_weights,  # noqa: F401  (part of this module's namespace for other modules)
)
from ._sparse_api import (  # the top-k teacher losses, public from here
    fused_linear_sparse_distillation_loss,
    sparse_distillation_loss,
)
from ._validation import check_chunk_size as _check_chunk_size
from ._validation import (
    check_heads_pair,
    check_logits_pair,
    check_options,
    check_same_device,
    check_target,
)
from ._validation import check_linear_head as _check_linear_head
from .ops import dense_distillation_rows
from .ops.dense import autocast_off, rows_layout

__all__ = ["distillation_loss", "fused_linear_distillation_loss",
           "fused_linear_sparse_distillation_loss", "sparse_distillation_loss"]


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
    if inplace_backward:
        _check_inplace(student_logits, copied, upcast)
    flat_target = _flat_target(target)
    options = kernel_options(target is not None, temperature=temperature, alpha=alpha,
                             divergence=divergence, beta=beta, scale_by_t2=scale_by_t2,
                             ignore_index=ignore_index, label_smoothing=label_smoothing,
                             softcap=softcap)
    valid = _valid_count(flat_target, ignore_index)
    weight = host_reduction_weight(student, valid, reduction, num_items_in_batch)
    out = dense_distillation_rows(student, teacher, flat_target, dense_kernel(name),
                                  options.weighted(weight),
                                  inplace_backward=inplace_backward,
                                  with_terms=return_components)
    rows, terms = out if return_components else (out, None)
    with autocast_off(rows.device):
        return _reduced(rows, terms, valid, reduction, num_items_in_batch, lead_shape, weight)


# --- Large vocabularies: the lm-head fused in, logits chunk by chunk ----------------------------

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

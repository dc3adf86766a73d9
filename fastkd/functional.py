"""The dense distillation losses: `distillation_loss` and its fused lm-head form.

The top-k (offline) teacher losses live in `fastkd._topk_losses` and are re-exported from
this module. Every loss takes its option keywords from `fastkd._options.LossOptions`
(`takes_options`), validated once. The exact semantics (formulas, options, reductions,
dtype rules, edge cases and errors) are documented in docs/semantics.md.
"""

from __future__ import annotations

from typing import Optional

import torch

from ._dispatch import dtensor_route, is_dtensor, kernel_for
from ._docs import fill_doc
from ._inputs import autocast_head, check_inplace, to_float64_if_any
from ._lm_head import fused_linear_loss
from ._options import LossOptions, takes_options
from ._reduction import flat_target, host_reduction_weight, reduce_loss, valid_count
from ._topk_losses import (  # the top-k teacher losses, public from here
    fused_linear_sparse_distillation_loss,
    sparse_distillation_loss,
)
from ._validation import (
    check_chunk_size,
    check_heads_pair,
    check_linear_head,
    check_logits_pair,
    check_same_device,
    check_target,
)
from .ops import dense_distillation_rows
from .ops.dense import autocast_off, rows_layout

__all__ = ["distillation_loss", "fused_linear_distillation_loss",
           "fused_linear_sparse_distillation_loss", "sparse_distillation_loss"]


@fill_doc
@takes_options(LossOptions)
def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: Optional[torch.Tensor] = None,
    *,
    options: LossOptions,
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
    if is_dtensor(student_logits, teacher_logits):
        return dtensor_route("logits")(
            student_logits, teacher_logits, target, backend=backend,
            inplace_backward=inplace_backward, return_components=return_components,
            **options.keywords())
    check_logits_pair(student_logits, teacher_logits, target)
    lead_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if target is not None:
        check_target(target, lead_shape, vocab, options.ignore_index)
    kernel = kernel_for("dense", backend, student_logits, teacher_logits,
                        divergence=options.divergence)

    student, teacher = to_float64_if_any(student_logits, teacher_logits)
    upcast = student is not student_logits
    student, teacher, copied = rows_layout(student, teacher)
    if inplace_backward:
        check_inplace(student_logits, copied, upcast)
    labels = flat_target(target)
    valid = valid_count(labels, options.ignore_index)
    weight = host_reduction_weight(student, valid, options.reduction,
                                   options.num_items_in_batch)
    out = dense_distillation_rows(student, teacher, labels, kernel,
                                  options.kernel_args(target is not None, weight),
                                  inplace_backward=inplace_backward,
                                  with_terms=return_components)
    rows, terms = out if return_components else (out, None)
    with autocast_off(rows.device):
        return reduce_loss(rows, terms, valid, options.reduction, options.num_items_in_batch,
                           lead_shape, weight)


# --- Large vocabularies: the lm-head fused in, logits chunk by chunk ----------------------------

@fill_doc
@takes_options(LossOptions)
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
    options: LossOptions,
    backend: str = "auto",
    return_components: bool = False,
    tensor_parallel: Optional[bool] = None,
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
    tensor_parallel : bool or None, default None
        Only for DTensor weights sharded ``Shard(0)`` (what both FSDP2's ``fully_shard`` and
        ``ColwiseParallel`` leave). None: decided from the hidden states, plain tensors mean
        data parallel (FSDP2: each rank its own tokens; the weight is gathered for the call
        and its gradient reduce-scattered as FSDP2 does), ``Replicate()`` DTensors mean
        tensor parallel (the vocab-parallel loss). True: tensor parallel with plain hidden
        states that the caller guarantees equal on every rank. False: data parallel.
        See docs/semantics.md "FSDP2 and 2-D meshes".
    %(options)s

    Returns
    -------
    %(returns)s

    Raises
    ------
    %(raises)s
    """
    if is_dtensor(student_weight, teacher_weight, student_hidden, teacher_hidden):
        return dtensor_route("fused_linear")(
            student_hidden, student_weight, teacher_hidden, teacher_weight, target,
            student_bias=student_bias, teacher_bias=teacher_bias, chunk_size=chunk_size,
            tensor_parallel=tensor_parallel,
            backend=backend, return_components=return_components, **options.keywords())
    if tensor_parallel is not None:
        raise ValueError(f"tensor_parallel={tensor_parallel!r} is only meaningful for DTensor "
                         "head weights sharded Shard(0); these are plain tensors (leave it "
                         "None)")
    check_linear_head("student", student_hidden, student_weight, student_bias)
    check_linear_head("teacher", teacher_hidden, teacher_weight, teacher_bias)
    check_heads_pair(student_hidden, student_weight, teacher_hidden, teacher_weight)
    check_same_device(student_hidden=student_hidden, student_weight=student_weight,
                      student_bias=student_bias, teacher_hidden=teacher_hidden,
                      teacher_weight=teacher_weight, teacher_bias=teacher_bias, target=target)
    check_chunk_size(chunk_size)
    if target is not None:
        check_target(target, student_hidden.shape[:-1], student_weight.shape[0],
                     options.ignore_index)
    student = autocast_head(student_hidden, student_weight, student_bias)
    teacher = autocast_head(teacher_hidden, teacher_weight, teacher_bias)
    s_h, s_w, s_b, t_h, t_w, t_b = to_float64_if_any(*student, *teacher)
    kernel = kernel_for("dense", backend, s_h, s_w, t_h, t_w, divergence=options.divergence)
    teacher = (t_h.reshape(-1, t_h.shape[-1]), t_w, t_b)
    return fused_linear_loss(s_h, s_w, s_b, target, teacher, kernel,
                             options.kernel_args(target is not None), False, chunk_size,
                             options.reduction, options.num_items_in_batch, return_components)

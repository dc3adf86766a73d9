"""Top-k (offline) teacher losses of the public API: `sparse_distillation_loss` and
`fused_linear_sparse_distillation_loss` (re-exported by `fastkd.functional`), with their
checks of the stored top-k rows, the re-tempering factor and the choice of top-k kernel.

Semantics (both tails, re-tempering, reductions, errors): docs/semantics.md.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._dispatch import BackendUnavailableError, resolve_backend
from ._docs import fill_doc
from ._glue import (
    _autocast_head,
    _flat_target,
    _fused_linear_loss,
    _reduced,
    _valid_count,
    host_reduction_weight,
    kernel_options,
)
from ._kernel_args import KernelArgs
from ._options import teacher_scale as _teacher_scale
from ._validation import check_chunk_size as _check_chunk_size
from ._validation import (
    check_floating,
    check_options,
    check_same_device,
    check_target,
)
from ._validation import check_linear_head as _check_linear_head
from .ops.dense import autocast_off
from .ops.sparse import sparse_distillation_rows, student_rows
from .reference.sparse import TAILS, sparse_kd_rows

__all__ = ["fused_linear_sparse_distillation_loss", "sparse_distillation_loss"]

#: A top-k teacher row's probabilities may sum to at most exp(this) (rounding of stored values).
TOPK_MASS_TOLERANCE = 1e-2


def _check_tail(tail) -> None:
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")


def _check_topk_shapes(logprobs, indices, lead_shape, vocab: Optional[int]) -> int:
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


def _check_topk(logprobs, indices, lead_shape, vocab: int, valid_rows) -> None:
    """Shapes and dtypes; in eager mode also, on the rows that are not ignored, index range,
    uniqueness and mass <= 1 (vectorised). Ignored rows may hold anything."""
    k = _check_topk_shapes(logprobs, indices, lead_shape, vocab)
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


def _sparse_kernel(backend: str, tensor: torch.Tensor):
    """The top-k teacher kernel of a backend: the fused C++ op (`cpu`), the Triton op
    (`triton`), or the reference (`torch`, and `auto` where no fused kernel applies)."""
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
    return kernel


def _topk_rows(tensor: torch.Tensor, width: int, kernel) -> torch.Tensor:
    """(..., width) -> (N, width) without a copy where a view suffices (fused kernels read any
    row stride with contiguous columns); float64 log-probs become float32 for a fused kernel."""
    rows = tensor.reshape(-1, width)
    if rows.stride(-1) != 1 and width > 1:
        rows = rows.contiguous()
    if rows.dtype == torch.float64 and kernel is not sparse_kd_rows:
        rows = rows.float()
    return rows


def _check_sparse_call(student, logprobs, indices, target, tail, options, lead_shape, vocab):
    """Validation shared by the two top-k teacher losses."""
    check_options(**options)
    _check_tail(tail)
    if target is not None:
        check_target(target, lead_shape, vocab, options["ignore_index"])
    valid_rows = None if target is None else target.to(torch.int64) != options["ignore_index"]
    _check_topk(logprobs, indices, lead_shape, vocab, valid_rows)


def _sparse_options(target, tail, scale, temperature, alpha, divergence, beta, scale_by_t2,
                    ignore_index, label_smoothing, softcap) -> KernelArgs:
    return kernel_options(target is not None, temperature=temperature, alpha=alpha,
                          divergence=divergence, beta=beta, scale_by_t2=scale_by_t2,
                          ignore_index=ignore_index, label_smoothing=label_smoothing,
                          softcap=softcap)._replace(renormalize=tail == "renormalize",
                                                    teacher_scale=scale)


@fill_doc
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
    teacher_temperature : float or None, default None
        The temperature the log-probabilities were taken at (None: ``temperature``). When it
        differs they are re-tempered, ``(T_stored / T) * log p`` renormalised over the k
        entries: exact for ``tail="renormalize"``; ``tail="bucket"`` raises ValueError (the
        tail mass at the new temperature is unknown). Rows whose target is ``ignore_index``
        are neither validated nor read (padding may hold anything).
    %(options)s
    inplace_backward : bool, default False
        Write the student gradient into ``student_logits``' own storage (as in
        `distillation_loss`); raises ValueError when the rows have no (N, V) view.

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
    scale = _teacher_scale(teacher_temperature, temperature, tail)
    kernel = _sparse_kernel(backend, student_logits)
    k = teacher_topk_logprobs.shape[-1]
    flat_target = _flat_target(target)
    options = _sparse_options(target, tail, scale, temperature, alpha, divergence, beta,
                              scale_by_t2, ignore_index, label_smoothing, softcap)
    student, copied = student_rows(student_logits)  # a view wherever one exists
    if inplace_backward and copied:
        raise ValueError("inplace_backward=True cannot write the gradient into "
                         f"student_logits: its strides {tuple(student_logits.stride())} have "
                         "no view as rows with a contiguous last dimension, so the kernel "
                         "would read a copy. Pass inplace_backward=False.")
    valid = _valid_count(flat_target, ignore_index)
    weight = host_reduction_weight(student, valid, reduction, num_items_in_batch)
    with autocast_off(student.device):  # float32 arithmetic and result under autocast too
        rows = sparse_distillation_rows(
            student, _topk_rows(teacher_topk_logprobs, k, kernel),
            _topk_rows(teacher_topk_indices, k, kernel), flat_target, kernel,
            options.weighted(weight), inplace_backward=inplace_backward,
            return_terms=return_components)
        rows, terms = rows if return_components else (rows, None)
        return _reduced(rows, terms, valid, reduction, num_items_in_batch, lead_shape, weight)


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
        The top-k teacher, as in `sparse_distillation_loss` (``teacher_temperature`` too);
        each chunk runs the backend's top-k kernel, its gradient written over the chunk's
        logits.
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
    scale = _teacher_scale(teacher_temperature, temperature, tail)
    kernel = _sparse_kernel(backend, student_hidden)
    student_hidden, student_weight, student_bias = _autocast_head(student_hidden,
                                                                  student_weight, student_bias)
    k = teacher_topk_logprobs.shape[-1]
    teacher = (_topk_rows(teacher_topk_logprobs, k, kernel),
               _topk_rows(teacher_topk_indices, k, kernel), None)
    options = _sparse_options(target, tail, scale, temperature, alpha, divergence, beta,
                              scale_by_t2, ignore_index, label_smoothing, softcap)
    return _fused_linear_loss(student_hidden, student_weight, student_bias, target, teacher,
                              kernel, options, True, chunk_size, reduction,
                              num_items_in_batch, ignore_index, return_components)

"""Triton backend of the top-k teacher loss: launcher and the `fastkd::sparse_kd_triton` ops.

`sparse_kd_triton` has the kernel contract of `fastkd.reference.sparse.sparse_kd_rows`: it writes
the student gradient into the given buffer (which may be the student itself) and the per-row
(CE, D) into `terms` when given, and returns the per-row loss `(N,)` float32. The launch sits
behind `torch.library.custom_op`s with fakes, so `torch.compile(fullgraph=True)` traces through
it. The kernel and its maths are in `fastkd.kernels.sparse_kd`. With `TRITON_INTERPRET=1` the
same launch runs on CPU tensors through Triton's interpreter.

Launch: one program per row, BLOCK_V-column chunks (the whole row when V <= BLOCK_V), the k
teacher entries in one BLOCK_K = next_pow2(k) vector (k <= MAX_K). Compiled for sm_90 by the
tests (bundled ptxas), run through the interpreter; not yet timed on a GPU.
"""

from __future__ import annotations

from typing import Optional

import torch

from .._kernel_args import KernelArgs
from .triton_dense import KERNEL_DTYPES, LOG2E, _next_pow2

#: Columns per chunk of the row sweeps; warps per program.
BLOCK_V_MAX = 2048
NUM_WARPS = 8
#: Largest k: the k teacher entries are one register vector of next_pow2(k) elements.
MAX_K = 16384


def _check_inputs(student, logprobs, indices, target, grad_student, terms) -> None:
    """Shapes, dtypes and layout only (no data read, no host sync)."""
    if student.dim() != 2 or student.shape[1] < 1:
        raise ValueError(f"student must be (N, V) with V >= 1, got {tuple(student.shape)}")
    if student.dtype not in KERNEL_DTYPES:
        raise TypeError(f"student must be float32, bfloat16 or float16, got {student.dtype}")
    n, vocab = student.shape
    if logprobs.dim() != 2 or logprobs.shape[0] != n or not 1 <= logprobs.shape[1] <= vocab:
        raise ValueError(f"topk_logprobs must be (N={n}, k) with 1 <= k <= V={vocab}, got "
                         f"{tuple(logprobs.shape)}")
    if logprobs.dtype not in KERNEL_DTYPES:
        raise TypeError(f"topk_logprobs must be float32, bfloat16 or float16, got "
                        f"{logprobs.dtype}")
    if indices.shape != logprobs.shape or indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_indices must be int32/int64 of shape {tuple(logprobs.shape)}, "
                         f"got {indices.dtype} {tuple(indices.shape)}")
    named = {"student": student, "topk_logprobs": logprobs, "topk_indices": indices,
             "grad_student": grad_student}
    for name, tensor in named.items():
        if tensor is not None and (tensor.stride(1) != 1 or tensor.device != student.device):
            raise ValueError(f"{name} must have contiguous columns and be on {student.device}")
    if grad_student is not None and (grad_student.shape != student.shape
                                     or grad_student.dtype != student.dtype):
        raise ValueError(f"grad_student must be {tuple(student.shape)} {student.dtype}, got "
                         f"{tuple(grad_student.shape)} {grad_student.dtype}")
    if terms is not None and (terms.shape != (n, 2) or terms.dtype != torch.float32
                              or not terms.is_contiguous()):
        raise ValueError(f"terms must be a contiguous ({n}, 2) float32 buffer")
    if target is not None and (target.dtype != torch.int64 or target.shape != (n,)
                               or not target.is_contiguous()):
        raise ValueError(f"target must be contiguous int64 of shape ({n},)")


def launch_sparse_kd(student, topk_logprobs, topk_indices, target, grad_student, terms,
                     temperature, ce_weight, div_weight, divergence, param_a, param_b,
                     ignore_index, label_smoothing, softcap, renormalize, teacher_scale, *,
                     block_v: int = BLOCK_V_MAX) -> torch.Tensor:
    """(N, V), (N, k) x2, (N,) | None, (N, V) | None, (N, 2) | None, the op's scalars ->
    rows (N,) (param_a: jsd's beta; param_b: unused by these divergences).

    `block_v` (a power of two) sets the chunk width; tests lower it to reach several chunks.
    """
    from ..kernels import sparse_kd as kernels

    _check_inputs(student, topk_logprobs, topk_indices, target, grad_student, terms)
    if divergence not in (0, 1, 2, 3):
        raise ValueError(f"divergence code must be in 0..3, got {divergence}")
    n, vocab = student.shape
    k = topk_logprobs.shape[1]
    if k > MAX_K:
        raise ValueError(f"the Triton top-k kernel takes k <= {MAX_K} teacher entries per row, "
                         f"got k={k}; use backend='torch' for larger k")
    rows = torch.empty(n, dtype=torch.float32, device=student.device)
    if n == 0:
        return rows
    div_value = div_weight != 0.0 or terms is not None
    ce_value = target is not None and (ce_weight != 0.0 or terms is not None)
    if not (div_value or ce_value):  # nothing to evaluate: every output is 0
        for out in (rows, grad_student, terms):
            if out is not None:
                out.zero_()
        return rows
    t_eff = float(temperature) if div_value else 1.0
    ce_pow = 1 if t_eff == 1.0 else (2 if t_eff == 2.0 else 0)
    flags = dict(HAS_TARGET=target is not None, CE_VALUE=ce_value,
                 CE_GRAD=target is not None and ce_weight != 0.0,
                 HAS_SMOOTH=ce_value and label_smoothing > 0.0, DIV_VALUE=div_value,
                 DIV_GRAD=div_weight != 0.0, DIV=int(divergence), CE_POW=ce_pow,
                 HAS_SOFTCAP=softcap > 0.0, RENORM=bool(renormalize),
                 NEED_GS=grad_student is not None, NEED_TERMS=terms is not None,
                 BLOCK_V=min(int(block_v), max(16, _next_pow2(vocab))),
                 BLOCK_K=max(16, _next_pow2(k)))
    placeholder = rows  # pointer for absent tensors; the constexpr flags keep it unused
    gs = placeholder if grad_student is None else grad_student
    args = (student, topk_logprobs, topk_indices, placeholder if target is None else target,
            gs, rows, placeholder if terms is None else terms, vocab, k,
            student.stride(0), gs.stride(0) if grad_student is not None else 0,
            topk_logprobs.stride(0), topk_indices.stride(0),
            LOG2E / t_eff, float(div_weight) / float(temperature), float(ce_weight),
            float(div_weight), float(param_a), float(label_smoothing), float(softcap),
            float(teacher_scale), int(ignore_index))
    if student.is_cuda:
        with torch.cuda.device(student.device):
            kernels.sparse_kd_kernel[(n,)](*args, **flags, num_warps=NUM_WARPS)
    else:
        kernels.sparse_kd_kernel[(n,)](*args, **flags, num_warps=NUM_WARPS)
    return rows


@torch.library.custom_op("fastkd::sparse_kd_triton", mutates_args=("grad_student", "terms"))
def _sparse_kd_triton_op(student: torch.Tensor, topk_logprobs: torch.Tensor,
                         topk_indices: torch.Tensor, target: Optional[torch.Tensor],
                         grad_student: Optional[torch.Tensor], terms: Optional[torch.Tensor],
                         temperature: float, ce_weight: float, div_weight: float,
                         divergence: int, param_a: float, param_b: float, ignore_index: int,
                         label_smoothing: float, softcap: float, renormalize: bool,
                         teacher_scale: float) -> torch.Tensor:
    return launch_sparse_kd(student, topk_logprobs, topk_indices, target, grad_student, terms,
                            temperature, ce_weight, div_weight, divergence, param_a, param_b,
                            ignore_index, label_smoothing, softcap, renormalize, teacher_scale)


@_sparse_kd_triton_op.register_fake
def _sparse_kd_triton_fake(student, topk_logprobs, topk_indices, *rest):
    return student.new_empty((student.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastkd::sparse_kd_triton_loss", mutates_args=())
def _sparse_kd_triton_loss_op(student: torch.Tensor, topk_logprobs: torch.Tensor,
                              topk_indices: torch.Tensor, target: Optional[torch.Tensor],
                              temperature: float, ce_weight: float, div_weight: float,
                              divergence: int, param_a: float, param_b: float,
                              ignore_index: int, label_smoothing: float, softcap: float,
                              renormalize: bool, teacher_scale: float) -> torch.Tensor:
    # Forward only: a functional op (inductor cannot functionalise the mutating op when every
    # mutable argument is None).
    return launch_sparse_kd(student, topk_logprobs, topk_indices, target, None, None,
                            temperature, ce_weight, div_weight, divergence, param_a, param_b,
                            ignore_index, label_smoothing, softcap, renormalize, teacher_scale)


@_sparse_kd_triton_loss_op.register_fake
def _sparse_kd_triton_loss_fake(student, topk_logprobs, topk_indices, *rest):
    return student.new_empty((student.shape[0],), dtype=torch.float32)


def sparse_kd_triton(
    student: torch.Tensor,
    topk_logprobs: torch.Tensor,
    topk_indices: torch.Tensor,
    target: Optional[torch.Tensor],
    grad_student: Optional[torch.Tensor],
    terms: Optional[torch.Tensor],
    args: KernelArgs,
) -> torch.Tensor:
    """The top-k kernel contract (`fastkd.reference.sparse.sparse_kd_rows`) on Triton.

    Parameters
    ----------
    student : (N, V) float32 / bfloat16 / float16 (CUDA, or CPU with TRITON_INTERPRET=1),
        ``stride(1) == 1``, any row stride.
    topk_logprobs : (N, k) float32 / bfloat16 / float16; topk_indices : (N, k) int64 / int32.
    target : (N,) int64 or None.
    grad_student : (N, V) buffer in the student's dtype or None; may be ``student`` itself.
    terms : (N, 2) float32 contiguous buffer or None: unweighted (CE, D) per row.
    args : KernelArgs, the scalars (teacher_scale multiplies the stored log-probs:
        re-tempering; renormalize: tail "renormalize", else "bucket").

    Returns
    -------
    rows : (N,) float32, the weighted per-row loss.
    """
    scalars = args.topk_scalars()
    if grad_student is None and terms is None:
        return torch.ops.fastkd.sparse_kd_triton_loss(student, topk_logprobs, topk_indices,
                                                      target, *scalars)
    return torch.ops.fastkd.sparse_kd_triton(student, topk_logprobs, topk_indices, target,
                                             grad_student, terms, *scalars)

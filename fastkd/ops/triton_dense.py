"""Triton backend of the dense distillation loss: launcher and the `fastkd::dense_kd_triton` op.

`dense_kd_triton` has the kernel contract of `fastkd.reference.dense_kd_rows`: it writes the
gradients into the given buffers (quack style; `grad_student` may alias `student`), the
unweighted (CE, D) of every row into `terms` when given, and returns the per-row loss `(N,)`
float32. Student and teacher may have different dtypes (fp32 / bf16 / fp16) and any row
stride (`stride(1) == 1`); nothing is cast or copied on the host. The launch sits behind
`torch.library.custom_op`s with fakes, so `torch.compile(fullgraph=True)` traces through it.
The kernels are in `fastkd.kernels.dense_kd` (maths, gradient derivation and byte counts in
its header). With `TRITON_INTERPRET=1` the same launch runs on CPU tensors through Triton's
interpreter.

Launch heuristics (from ptxas register counts for sm_90 and the H100's L2 size; NOT yet
timed on a GPU; docs/triton_kernel.md has the reasoning and what to measure first):
  V <= SINGLE_LOAD_MAX_V (half of it with softcap): the single-load kernel, whole rows in
      registers at 8 elements per thread per tensor (byte floor); rows are packed several per
      program when V is small so every program has SMALL_ROW_ELEMENTS elements.
  larger V: the multi-pass kernel, one row per program, MULTIPASS_BLOCK_V-element chunks
      with the next chunk's load issued before the current one is computed.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .._kernel_args import KernelArgs

#: Largest V whose row pair stays in registers: 32 warps x 32 threads x 8 elements per
#: tensor; ptxas (sm_90) reports <= 64 registers and no spills for fp32 / bf16 without softcap.
SINGLE_LOAD_MAX_V = 8192
#: With softcap two more row-sized arrays (the cap' slopes) stay live: 8192 spills, 4096 not.
SOFTCAP_SINGLE_LOAD_MAX_V = 4096
#: Elements per program of the single-load kernel for small V (rows packed up to this).
SMALL_ROW_ELEMENTS = 2048
#: Elements per thread per tensor in the single-load kernel (sets its warp count).
ELEMENTS_PER_THREAD = 8
#: Multi-pass chunk: 4 elements per thread per tensor at 16 warps, with the next chunk's
#: load in flight during the current one's arithmetic (16 KB per SM in flight). ptxas (sm_90):
#: ~100-105 registers, no spills (4096 / 16 warps spills, 4096 / 32 warps spills a little), so
#: one row per SM: the H100's 132 rows in flight keep a row's re-read partly in L2 (50 MB).
MULTIPASS_BLOCK_V = 2048
MULTIPASS_WARPS = 16
LOG2E = 1.4426950408889634
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def _check_rows(name, tensor, shape, dtype, device, written) -> None:
    """One (N, V) operand: its shape, dtype, device and a layout the kernels index directly
    (unit column stride; any row stride, and for a gradient rows that do not overlap)."""
    if tensor.dim() != 2 or tensor.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(tensor.shape)}")
    if tensor.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {tensor.dtype}")
    if tensor.device != device:
        raise ValueError(f"{name} must be on {device}, got {tensor.device}")
    n, vocab = shape
    if vocab > 1 and tensor.stride(1) != 1:
        raise ValueError(f"{name} must have unit stride along the vocabulary (stride(1) == 1), "
                         f"got strides {tuple(tensor.stride())}")
    if written and n > 1 and tensor.stride(0) < vocab:
        raise ValueError(f"{name} rows overlap (row stride {tensor.stride(0)} < V = {vocab}): "
                         f"a gradient buffer needs one row of storage per row")


def _check_inputs(student, teacher, target, grad_student, grad_teacher, terms) -> None:
    """Shapes, dtypes and layout only (no data read, no host sync, no copy)."""
    for name, tensor in (("student", student), ("teacher", teacher)):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2:
            raise ValueError(f"{name} must be a 2-D (N, V) tensor, got "
                             f"{getattr(tensor, 'shape', type(tensor))}")
        if tensor.dtype not in KERNEL_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")
    if student.shape[1] < 1:
        raise ValueError("student must have at least one vocabulary column")
    shape, device = student.shape, student.device
    _check_rows("student", student, shape, student.dtype, device, written=False)
    _check_rows("teacher", teacher, shape, teacher.dtype, device, written=False)
    if grad_student is not None:
        _check_rows("grad_student", grad_student, shape, student.dtype, device, written=True)
    if grad_teacher is not None:
        _check_rows("grad_teacher", grad_teacher, shape, teacher.dtype, device, written=True)
    if target is not None:
        if target.dtype != torch.int64:
            raise TypeError(f"target must be int64, got {target.dtype}")
        if target.shape != shape[:1] or not target.is_contiguous() or target.device != device:
            raise ValueError(f"target must be contiguous with shape ({shape[0]},) on {device}, "
                             f"got {tuple(target.shape)} on {target.device}")
    if terms is not None:
        if terms.dtype != torch.float32:
            raise TypeError(f"terms must be float32, got {terms.dtype}")
        if terms.shape != (shape[0], 2) or not terms.is_contiguous() or terms.device != device:
            raise ValueError(f"terms must be a contiguous ({shape[0]}, 2) buffer on {device}, "
                             f"got {tuple(terms.shape)} on {terms.device}")


def _launch_config(n: int, vocab: int, softcap_on: bool, max_single_v: int,
                   block_v: int) -> tuple:
    """(single_load, grid, block constexprs, num_warps)."""
    limit = min(max_single_v, SOFTCAP_SINGLE_LOAD_MAX_V) if softcap_on else max_single_v
    if vocab <= limit:
        width = max(16, _next_pow2(vocab))
        rows_per_program = max(1, SMALL_ROW_ELEMENTS // width)
        elements = rows_per_program * width
        warps = min(32, max(4, elements // (32 * ELEMENTS_PER_THREAD)))
        grid = (math.ceil(n / rows_per_program),)
        return True, grid, {"BLOCK_N": rows_per_program, "BLOCK_V": width}, warps
    return False, (n,), {"BLOCK_V": block_v}, MULTIPASS_WARPS


def launch_dense_kd(student, teacher, target, grad_student, grad_teacher, terms, temperature,
                    ce_weight, div_weight, divergence, param_a, param_b, ignore_index,
                    label_smoothing, softcap, *, max_single_v: int = SINGLE_LOAD_MAX_V,
                    block_v: int = MULTIPASS_BLOCK_V) -> torch.Tensor:
    """(N, V) x2, (N,) | None, (N, V) | None x2, (N, 2) | None, the op's scalars -> rows (N,)
    float32 (param_a: jsd's beta; param_b: unused by these divergences).

    Every (N, V) tensor is read or written where it is, through its own row stride.
    Writes the gradients into `grad_student` / `grad_teacher` and the unweighted (CE, D) of
    each row into `terms` when given. `max_single_v` and `block_v` (a power of two) choose
    the kernel; tests lower them to reach the multi-pass path.
    """
    from ..kernels import dense_kd as kernels

    _check_inputs(student, teacher, target, grad_student, grad_teacher, terms)
    if divergence not in (0, 1, 2, 3):
        raise ValueError(f"divergence code must be in 0..3, got {divergence}")
    n, vocab = student.shape
    rows = torch.empty(n, dtype=torch.float32, device=student.device)
    # HAS_*: the term is weighted into rows and gradients; EVAL_*: it is evaluated (for its
    # weight, or for `terms`, which wants both even at weight 0; CE only with a target).
    has_ce = target is not None and ce_weight != 0.0
    has_div = div_weight != 0.0
    eval_ce = target is not None and (has_ce or terms is not None)
    eval_div = has_div or terms is not None
    if n == 0:
        return rows
    if not (eval_ce or eval_div):  # nothing to evaluate: every row and gradient is 0
        for out in (rows, grad_student, grad_teacher):
            if out is not None:
                out.zero_()
        return rows
    # Without a divergence the only softmax is the CE one, at temperature 1.
    t_eff = float(temperature) if eval_div else 1.0
    ce_pow = 1 if t_eff == 1.0 else (2 if t_eff == 2.0 else 0)
    single, grid, blocks, warps = _launch_config(n, vocab, softcap > 0.0, max_single_v,
                                                  block_v)
    flags = dict(HAS_TARGET=target is not None, EVAL_CE=eval_ce, HAS_CE=has_ce,
                 HAS_SMOOTH=eval_ce and label_smoothing > 0.0, EVAL_DIV=eval_div,
                 HAS_DIV=has_div, DIV=int(divergence), CE_POW=ce_pow,
                 HAS_SOFTCAP=softcap > 0.0, NEED_GS=grad_student is not None,
                 NEED_GT=grad_teacher is not None, TERMS=terms is not None)
    if not single:
        flags["PAIR_PASS"] = eval_div and divergence >= 2
    kernel = kernels.dense_kd_single_kernel if single else kernels.dense_kd_multipass_kernel

    def ptr_and_stride(tensor):  # absent tensors: a placeholder the constexpr flags never use
        return (rows, 0) if tensor is None else (tensor, tensor.stride(0))

    (gs, stride_gs), (gt, stride_gt) = ptr_and_stride(grad_student), ptr_and_stride(grad_teacher)
    args = (student, teacher, rows if target is None else target, gs, gt, rows,
            rows if terms is None else terms,
            n, vocab,
            student.stride(0), teacher.stride(0), stride_gs, stride_gt,
            LOG2E / t_eff, float(div_weight) / float(temperature), float(ce_weight),
            float(div_weight), float(param_a), float(label_smoothing), float(softcap),
            int(ignore_index))
    if student.is_cuda:
        with torch.cuda.device(student.device):
            kernel[grid](*args, **flags, **blocks, num_warps=warps)
    else:
        kernel[grid](*args, **flags, **blocks, num_warps=warps)
    return rows


@torch.library.custom_op("fastkd::dense_kd_triton",
                         mutates_args=("grad_student", "grad_teacher", "terms"))
def _dense_kd_triton_op(student: torch.Tensor, teacher: torch.Tensor,
                        target: Optional[torch.Tensor], grad_student: Optional[torch.Tensor],
                        grad_teacher: Optional[torch.Tensor], terms: Optional[torch.Tensor],
                        temperature: float, ce_weight: float, div_weight: float,
                        divergence: int, param_a: float, param_b: float, ignore_index: int,
                        label_smoothing: float, softcap: float) -> torch.Tensor:
    return launch_dense_kd(student, teacher, target, grad_student, grad_teacher, terms,
                           temperature, ce_weight, div_weight, divergence, param_a, param_b,
                           ignore_index, label_smoothing, softcap)


@_dense_kd_triton_op.register_fake
def _dense_kd_triton_fake(student, teacher, target, grad_student, grad_teacher, terms,
                          *scalars):
    return student.new_empty((student.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastkd::dense_kd_triton_loss", mutates_args=())
def _dense_kd_triton_loss_op(student: torch.Tensor, teacher: torch.Tensor,
                             target: Optional[torch.Tensor], temperature: float,
                             ce_weight: float, div_weight: float, divergence: int,
                             param_a: float, param_b: float, ignore_index: int,
                             label_smoothing: float, softcap: float,
                             with_terms: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    # Forward only (no gradient buffers): a functional op, because inductor cannot
    # functionalise the mutating op when every mutable argument is None. Returns
    # (rows (N,), terms (N, 2) float32); terms is (N, 0) unless `with_terms`.
    n = student.shape[0]
    terms = student.new_empty((n, 2 if with_terms else 0), dtype=torch.float32)
    rows = launch_dense_kd(student, teacher, target, None, None, terms if with_terms else None,
                           temperature, ce_weight, div_weight, divergence, param_a, param_b,
                           ignore_index, label_smoothing, softcap)
    return rows, terms


@_dense_kd_triton_loss_op.register_fake
def _dense_kd_triton_loss_fake(student, teacher, target, temperature, ce_weight, div_weight,
                               divergence, param_a, param_b, ignore_index, label_smoothing,
                               softcap, with_terms=False):
    n = student.shape[0]
    return (student.new_empty((n,), dtype=torch.float32),
            student.new_empty((n, 2 if with_terms else 0), dtype=torch.float32))


def dense_kd_triton(student: torch.Tensor, teacher: torch.Tensor, target: Optional[torch.Tensor],
                    grad_student: Optional[torch.Tensor], grad_teacher: Optional[torch.Tensor],
                    terms: Optional[torch.Tensor], args: KernelArgs) -> torch.Tensor:
    """The dense-loss kernel contract (see `fastkd.reference.dense_kd_rows`) on Triton.

    Parameters
    ----------
    student : torch.Tensor
        (N, V) float32, bfloat16 or float16 logits; `stride(1) == 1`, any row stride (a row
        slice of a larger buffer, a row of `logits[:, :-1]`): read in place, never copied.
    teacher : torch.Tensor
        (N, V) float32, bfloat16 or float16, its own dtype and row stride, `stride(1) == 1`.
    target : torch.Tensor or None
        (N,) int64 contiguous labels, or None (no cross-entropy term).
    grad_student, grad_teacher : torch.Tensor or None
        (N, V) buffers in the student's / teacher's dtype, `stride(1) == 1`, own row stride;
        receive d sum(rows) / d logits. `grad_student` may be `student` itself (in place).
    terms : torch.Tensor or None
        (N, 2) float32 contiguous buffer; receives the unweighted CE (0 without a target) and
        divergence of every row (0 for ignored rows), evaluated even at weight 0.
    args : KernelArgs
        The scalars (fastkd._kernel_args); teacher_scale and renormalize are not read.

    Returns
    -------
    torch.Tensor
        rows: (N,) float32, `ce_weight * CE + div_weight * D` per row (0 for ignored rows).
    """
    scalars = args.dense_scalars()
    if grad_student is None and grad_teacher is None:
        rows, new_terms = torch.ops.fastkd.dense_kd_triton_loss(student, teacher, target,
                                                                *scalars, terms is not None)
        if terms is not None:
            terms.copy_(new_terms)  # (N, 2): keeps the forward-only op functional
        return rows
    return torch.ops.fastkd.dense_kd_triton(student, teacher, target, grad_student,
                                            grad_teacher, terms, *scalars)

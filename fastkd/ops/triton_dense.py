"""Triton backend of the dense distillation loss: launcher and the `fastkd::dense_kd_triton` op.

`dense_kd_triton` has the kernel contract of `fastkd.reference.dense_kd_rows`: it writes the
gradients into the given buffers (quack style; `grad_student` may alias `student`) and returns
the per-row loss `(N,)` float32. The launch sits behind a `torch.library.custom_op` with a fake,
so `torch.compile(fullgraph=True)` traces through it. The kernels are in `fastkd.kernels.dense_kd`
(maths, gradient derivation and byte counts in its header). With `TRITON_INTERPRET=1` the same
launch runs on CPU tensors through Triton's interpreter.

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


def _check_inputs(student, teacher, target, grad_student, grad_teacher) -> None:
    """Shapes, dtypes and layout only (no data read, no host sync)."""
    if student.dim() != 2:
        raise ValueError(f"student must be (N, V), got shape {tuple(student.shape)}")
    if student.dtype not in KERNEL_DTYPES:
        raise TypeError(f"student must be float32, bfloat16 or float16, got {student.dtype}")
    if student.shape[1] < 1:
        raise ValueError("student must have at least one vocabulary column")
    named = {"student": student, "teacher": teacher, "grad_student": grad_student,
             "grad_teacher": grad_teacher}
    for name, tensor in named.items():
        if tensor is None:
            continue
        if tensor.shape != student.shape or tensor.dtype != student.dtype:
            raise ValueError(f"{name} must be {tuple(student.shape)} {student.dtype}, got "
                             f"{tuple(tensor.shape)} {tensor.dtype}")
        if not tensor.is_contiguous() or tensor.device != student.device:
            raise ValueError(f"{name} must be contiguous and on {student.device}")
    if target is not None:
        if target.dtype != torch.int64:
            raise TypeError(f"target must be int64, got {target.dtype}")
        if target.shape != student.shape[:1] or not target.is_contiguous():
            raise ValueError(f"target must be contiguous with shape ({student.shape[0]},), "
                             f"got {tuple(target.shape)}")


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


def launch_dense_kd(student, teacher, target, grad_student, grad_teacher, temperature,
                    ce_weight, div_weight, divergence, beta, ignore_index, label_smoothing,
                    softcap, *, max_single_v: int = SINGLE_LOAD_MAX_V,
                    block_v: int = MULTIPASS_BLOCK_V) -> torch.Tensor:
    """(N, V) x2, (N,) | None, (N, V) | None x2, options -> rows (N,) float32.

    Writes the gradients into `grad_student` / `grad_teacher` when given. `max_single_v` and
    `block_v` (a power of two) choose the kernel; tests lower them to reach the multi-pass path.
    """
    from ..kernels import dense_kd as kernels

    _check_inputs(student, teacher, target, grad_student, grad_teacher)
    if divergence not in (0, 1, 2, 3):
        raise ValueError(f"divergence code must be in 0..3, got {divergence}")
    n, vocab = student.shape
    rows = torch.empty(n, dtype=torch.float32, device=student.device)
    has_ce = target is not None and ce_weight != 0.0
    has_div = div_weight != 0.0
    if n == 0:
        return rows
    if not (has_ce or has_div):  # nothing to evaluate: every row and gradient is 0
        for out in (rows, grad_student, grad_teacher):
            if out is not None:
                out.zero_()
        return rows
    # Without a divergence the only softmax is the CE one, at temperature 1.
    t_eff = float(temperature) if has_div else 1.0
    ce_pow = 1 if t_eff == 1.0 else (2 if t_eff == 2.0 else 0)
    single, grid, blocks, warps = _launch_config(n, vocab, softcap > 0.0, max_single_v,
                                                  block_v)
    flags = dict(HAS_TARGET=target is not None, HAS_CE=has_ce,
                 HAS_SMOOTH=has_ce and label_smoothing > 0.0, HAS_DIV=has_div,
                 DIV=int(divergence), CE_POW=ce_pow, HAS_SOFTCAP=softcap > 0.0,
                 NEED_GS=grad_student is not None, NEED_GT=grad_teacher is not None)
    if not single:
        flags["PAIR_PASS"] = has_div and divergence >= 2
    kernel = kernels.dense_kd_single_kernel if single else kernels.dense_kd_multipass_kernel
    placeholder = student  # pointer for absent tensors; the constexpr flags keep it unused
    args = (student, teacher, placeholder if target is None else target,
            placeholder if grad_student is None else grad_student,
            placeholder if grad_teacher is None else grad_teacher, rows, n, vocab,
            LOG2E / t_eff, float(div_weight) / float(temperature), float(ce_weight),
            float(div_weight), float(beta), float(label_smoothing), float(softcap),
            int(ignore_index))
    if student.is_cuda:
        with torch.cuda.device(student.device):
            kernel[grid](*args, **flags, **blocks, num_warps=warps)
    else:
        kernel[grid](*args, **flags, **blocks, num_warps=warps)
    return rows


@torch.library.custom_op("fastkd::dense_kd_triton", mutates_args=("grad_student", "grad_teacher"))
def _dense_kd_triton_op(student: torch.Tensor, teacher: torch.Tensor,
                        target: Optional[torch.Tensor], grad_student: Optional[torch.Tensor],
                        grad_teacher: Optional[torch.Tensor], temperature: float,
                        ce_weight: float, div_weight: float, divergence: int, beta: float,
                        ignore_index: int, label_smoothing: float,
                        softcap: float) -> torch.Tensor:
    return launch_dense_kd(student, teacher, target, grad_student, grad_teacher, temperature,
                           ce_weight, div_weight, divergence, beta, ignore_index,
                           label_smoothing, softcap)


@_dense_kd_triton_op.register_fake
def _dense_kd_triton_fake(student, teacher, target, grad_student, grad_teacher, temperature,
                          ce_weight, div_weight, divergence, beta, ignore_index,
                          label_smoothing, softcap):
    return student.new_empty((student.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastkd::dense_kd_triton_loss", mutates_args=())
def _dense_kd_triton_loss_op(student: torch.Tensor, teacher: torch.Tensor,
                             target: Optional[torch.Tensor], temperature: float,
                             ce_weight: float, div_weight: float, divergence: int, beta: float,
                             ignore_index: int, label_smoothing: float,
                             softcap: float) -> torch.Tensor:
    # Forward only (no gradient buffers): a functional op, because inductor cannot
    # functionalise the mutating op when every mutable argument is None.
    return launch_dense_kd(student, teacher, target, None, None, temperature, ce_weight,
                           div_weight, divergence, beta, ignore_index, label_smoothing, softcap)


@_dense_kd_triton_loss_op.register_fake
def _dense_kd_triton_loss_fake(student, teacher, target, *options):
    return student.new_empty((student.shape[0],), dtype=torch.float32)


def dense_kd_triton(student: torch.Tensor, teacher: torch.Tensor, target: Optional[torch.Tensor],
                    grad_student: Optional[torch.Tensor], grad_teacher: Optional[torch.Tensor],
                    temperature: float, ce_weight: float, div_weight: float, divergence: int,
                    beta: float, ignore_index: int, label_smoothing: float,
                    softcap: float) -> torch.Tensor:
    """The dense-loss kernel contract (see `fastkd.reference.dense_kd_rows`) on Triton.

    student, teacher: (N, V) contiguous fp32/bf16/fp16; target: (N,) int64 or None;
    grad_student / grad_teacher: (N, V) buffers or None. Returns rows: (N,) float32.
    """
    options = (float(temperature), float(ce_weight), float(div_weight), int(divergence),
               float(beta), int(ignore_index), float(label_smoothing), float(softcap))
    if grad_student is None and grad_teacher is None:
        return torch.ops.fastkd.dense_kd_triton_loss(student, teacher, target, *options)
    return torch.ops.fastkd.dense_kd_triton(student, teacher, target, grad_student,
                                            grad_teacher, *options)

"""Op boundary of the native kernels: `torch.ops.fastkd.dense_kd` from the extension fastkd._C.

Importing this module loads fastkd._C (which registers the op schema and its CPU / CUDA
kernels with the dispatcher) and registers the op's fake implementation, so torch.compile and
torch.library.opcheck can trace it. Forward-only calls go through `fastkd::dense_kd_loss`, a
functional wrapper op (inductor cannot compile the mutating op with no buffer to mutate).
If fastkd._C cannot be loaded the import raises; fastkd._dispatch reports that as the reason
the `cpu` / `cuda` backends are unavailable.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _C  # noqa: F401  (loading the shared object registers the ops)
from .._kernel_args import KernelArgs

OP_NAME = "fastkd::dense_kd"


def _has_kernel(dispatch_key: str) -> bool:
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, dispatch_key))


#: The extension has a CPU / CUDA kernel for fastkd::dense_kd.
HAS_CPU = _has_kernel("CPU")
HAS_CUDA = _has_kernel("CUDA")
#: Why the CPU kernels are missing (None when they are present).
MISSING_REASON: Optional[str] = (
    None if HAS_CPU else f"fastkd._C was built without a CPU kernel for {OP_NAME}")


@torch.library.register_fake(OP_NAME)
def _dense_kd_fake(student, teacher, target, grad_student, grad_teacher, temperature,
                   ce_weight, div_weight, divergence, param_a, param_b, ignore_index,
                   label_smoothing, softcap, terms=None):
    """(N, V) logits -> (N,) float32 rows; gradient buffers and terms are written in place."""
    torch._check(student.dim() == 2, lambda: "student must be 2-D (N, V)")
    torch._check(teacher.shape == student.shape, lambda: "teacher must have student's shape")
    if terms is not None:
        torch._check(terms.shape == (student.shape[0], 2), lambda: "terms must be (N, 2)")
    return student.new_empty((student.shape[0],), dtype=torch.float32)


@torch.library.custom_op("fastkd::dense_kd_loss", mutates_args=())
def _dense_kd_loss_op(student: torch.Tensor, teacher: torch.Tensor,
                      target: Optional[torch.Tensor], temperature: float, ce_weight: float,
                      div_weight: float, divergence: int, param_a: float, param_b: float,
                      ignore_index: int, label_smoothing: float, softcap: float) -> torch.Tensor:
    # Forward only (no gradient buffers) as a functional op: inductor cannot functionalise
    # the mutating fastkd::dense_kd when every mutable argument is None.
    return torch.ops.fastkd.dense_kd(student, teacher, target, None, None, temperature,
                                     ce_weight, div_weight, divergence, param_a, param_b,
                                     ignore_index, label_smoothing, softcap)


@_dense_kd_loss_op.register_fake
def _dense_kd_loss_fake(student, teacher, target, *scalars):
    return student.new_empty((student.shape[0],), dtype=torch.float32)


def dense_kd_native(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: Optional[torch.Tensor],
    grad_student: Optional[torch.Tensor],
    grad_teacher: Optional[torch.Tensor],
    terms: Optional[torch.Tensor],
    args: KernelArgs,
) -> torch.Tensor:
    """Kernel contract of `fastkd.reference.dense_kd_rows` on the native (CPU / CUDA) op.

    Parameters
    ----------
    student, teacher : torch.Tensor
        (N, V), each float32 / bfloat16 / float16 (the two may differ), unit stride along V
        and any row stride (slices and views are read in place).
    target : torch.Tensor or None
        (N,) int64, or None for no cross-entropy term.
    grad_student, grad_teacher : torch.Tensor or None
        (N, V) buffers in the student's / teacher's dtype (any row stride) receiving
        d rows.sum() / d logits, or None; grad_student may be `student` itself (in place).
    terms : torch.Tensor or None
        (N, 2) float32 contiguous, or None. Receives the unweighted CE (0 without a target or
        for an ignored row) and divergence of every row, in the same pass.
    args : KernelArgs
        The scalars (fastkd._kernel_args); teacher_scale and renormalize are not read.

    Returns
    -------
    torch.Tensor
        (N,) float32 rows, ``ce_weight * terms[:, 0] + div_weight * terms[:, 1]``.
    """
    scalars = args.dense_scalars()
    if grad_student is None and grad_teacher is None and terms is None:
        return torch.ops.fastkd.dense_kd_loss(student, teacher, target, *scalars)
    # With `terms` the mutating op always has a buffer to mutate, so it traces and compiles
    # as it does with a gradient buffer.
    return torch.ops.fastkd.dense_kd(student, teacher, target, grad_student, grad_teacher,
                                     *scalars, terms)


def cpu_kernel_variant(op: str = "dense_kd") -> str:
    """The build of the fused CPU kernel of `op` ("dense_kd" or "sparse_kd") that runs in this
    process: "avx512", "avx2" or "default" (portable).

    The widest build that was compiled, that the CPU supports and that ATen's CPU capability
    allows; ``ATEN_CPU_CAPABILITY=avx2`` or ``=default`` (set before torch is imported)
    selects a narrower one.
    """
    return torch.ops.fastkd.cpu_kernel_variant(op)

"""Op boundary of the fused CPU top-k teacher kernel: `torch.ops.fastkd.sparse_kd`.

Importing this module loads fastkd._C (whose csrc/sparse_ops.cpp defines the op schema and
csrc/cpu/sparse_kd_cpu.cpp its CPU kernel) and registers the op's fake implementation, so
torch.compile and torch.library.opcheck can trace it. Calls without any output buffer go
through `fastkd::sparse_kd_loss`, a functional wrapper op (inductor cannot functionalise a
mutating op whose mutable arguments are all None).
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import _C  # noqa: F401  (loading the shared object registers the ops)
from .._kernel_args import KernelArgs

OP_NAME = "fastkd::sparse_kd"


def _has_kernel(dispatch_key: str) -> bool:
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, dispatch_key))
    except RuntimeError:  # the schema itself is missing (an older build of fastkd._C)
        return False


#: The extension has a CPU kernel for fastkd::sparse_kd.
HAS_CPU = _has_kernel("CPU")
#: Why the CPU kernel is missing (None when it is present).
MISSING_REASON: Optional[str] = (
    None if HAS_CPU else f"fastkd._C was built without a CPU kernel for {OP_NAME}")


def _fake_rows(student, topk_logprobs, topk_indices):
    torch._check(student.dim() == 2, lambda: "student must be 2-D (N, V)")
    torch._check(topk_logprobs.dim() == 2, lambda: "topk_logprobs must be 2-D (N, k)")
    torch._check(topk_indices.shape == topk_logprobs.shape,
                 lambda: "topk_indices must have topk_logprobs' shape")
    return student.new_empty((student.shape[0],), dtype=torch.float32)


if HAS_CPU:
    @torch.library.register_fake(OP_NAME)
    def _sparse_kd_fake(student, topk_logprobs, topk_indices, target, grad_student, terms,
                        temperature, ce_weight, div_weight, divergence, param_a, param_b,
                        ignore_index, label_smoothing, softcap, renormalize, teacher_scale):
        """(N, V), (N, k) x2 -> (N,) float32 rows; grad_student / terms written in place."""
        return _fake_rows(student, topk_logprobs, topk_indices)

    @torch.library.custom_op("fastkd::sparse_kd_loss", mutates_args=())
    def _sparse_kd_loss_op(student: torch.Tensor, topk_logprobs: torch.Tensor,
                           topk_indices: torch.Tensor, target: Optional[torch.Tensor],
                           temperature: float, ce_weight: float, div_weight: float,
                           divergence: int, param_a: float, param_b: float,
                           ignore_index: int, label_smoothing: float, softcap: float,
                           renormalize: bool, teacher_scale: float) -> torch.Tensor:
        # Forward only, as a functional op (no output buffer to mutate).
        return torch.ops.fastkd.sparse_kd(student, topk_logprobs, topk_indices, target, None,
                                          None, temperature, ce_weight, div_weight, divergence,
                                          param_a, param_b, ignore_index, label_smoothing,
                                          softcap, renormalize, teacher_scale)

    @_sparse_kd_loss_op.register_fake
    def _sparse_kd_loss_fake(student, topk_logprobs, topk_indices, target, *scalars):
        return _fake_rows(student, topk_logprobs, topk_indices)

    @torch.library.register_fake("fastkd::sparse_kd_check")
    def _sparse_kd_check_fake(topk_logprobs, topk_indices, valid, vocab, max_mass):
        return topk_logprobs.new_empty((3,), dtype=torch.int64)


def first_bad_rows(topk_logprobs: torch.Tensor, topk_indices: torch.Tensor,
                   valid: Optional[torch.Tensor], vocab: int, max_mass: float):
    """The API's eager top-k checks on CPU tensors in one serial pass (no parallel-region
    wake-ups for a small (N, k)); None when the extension lacks the op.

    Parameters
    ----------
    topk_logprobs : (N, k) floating CPU tensor; topk_indices : (N, k) int64 / int32.
    valid : (N,) bool or None: only these rows are checked.
    vocab : int, indices must lie in [0, vocab); max_mass : float, largest row exp-sum.

    Returns
    -------
    list of 3 ints or None: 1 + the first row failing the range, uniqueness and mass checks
    (0 where none fails).
    """
    if not HAS_CPU:
        return None
    return torch.ops.fastkd.sparse_kd_check(topk_logprobs, topk_indices, valid, int(vocab),
                                            float(max_mass)).tolist()


def sparse_kd_native(
    student: torch.Tensor,
    topk_logprobs: torch.Tensor,
    topk_indices: torch.Tensor,
    target: Optional[torch.Tensor],
    grad_student: Optional[torch.Tensor],
    terms: Optional[torch.Tensor],
    args: KernelArgs,
) -> torch.Tensor:
    """The top-k kernel contract (`fastkd.reference.sparse.sparse_kd_rows`) on the C++ op.

    Parameters
    ----------
    student : (N, V) float32 / bfloat16 / float16 CPU tensor, ``stride(1) == 1``, any row stride.
    topk_logprobs : (N, k) float32 / bfloat16 / float16, ``stride(1) == 1``.
    topk_indices : (N, k) int64 or int32, ``stride(1) == 1``.
    target : (N,) int64 contiguous, or None.
    grad_student : (N, V) buffer in the student's dtype (``stride(1) == 1``), or None; may be
        ``student`` itself (in-place gradient).
    terms : (N, 2) float32 contiguous buffer or None; receives the unweighted (CE, D) per row.
    args : KernelArgs, the scalars (teacher_scale multiplies the stored log-probs before use:
        re-tempering; renormalize: tail "renormalize", else "bucket").

    Returns
    -------
    rows : (N,) float32, the weighted per-row loss.
    """
    scalars = args.topk_scalars()
    if grad_student is None and terms is None:
        return torch.ops.fastkd.sparse_kd_loss(student, topk_logprobs, topk_indices, target,
                                               *scalars)
    return torch.ops.fastkd.sparse_kd(student, topk_logprobs, topk_indices, target,
                                      grad_student, terms, *scalars)

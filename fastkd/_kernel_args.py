"""The kernel contract's scalars: one `KernelArgs` value that every loss kernel takes last.

Every kernel of both families has the same shape of call, tensors first, then these scalars:

    dense:  kernel(student, teacher, target, grad_student, grad_teacher, terms, args)
    top-k:  kernel(student, topk_logprobs, topk_indices, target, grad_student, terms, args)

for the reference (`fastkd.reference.dense_kd_rows` / `sparse.sparse_kd_rows`), the native
ops (`fastkd.ops.native`, `fastkd.ops.sparse_native`) and the Triton ops. The API derives the
value once from the validated `fastkd._options.LossOptions` (`LossOptions.kernel_args`).

This module imports nothing from fastkd, so every layer may use it (as the C++ kernels all
include csrc/dense_kd_params.h).
"""

from __future__ import annotations

from typing import NamedTuple


class KernelArgs(NamedTuple):
    """Scalars of ``row = ce_weight * CE + div_weight * D`` for one kernel call.

    divergence: the index of the divergence in `fastkd.reference.DIVERGENCES`; param_a,
    param_b: its parameters (`LossOptions.divergence_params`: jsd (beta, 0), ...); softcap
    <= 0: off. teacher_scale and renormalize are read by the top-k kernels only: the factor
    on the stored log-probs (re-tempering) and tail="renormalize" (else "bucket").
    """

    temperature: float
    ce_weight: float
    div_weight: float
    divergence: int
    param_a: float
    param_b: float
    ignore_index: int
    label_smoothing: float
    softcap: float
    teacher_scale: float = 1.0
    renormalize: bool = False

    def weighted(self, weight) -> KernelArgs:
        """The same call with both loss weights multiplied by `weight` (None or 1: self)."""
        if weight is None or weight == 1.0:
            return self
        return self._replace(ce_weight=self.ce_weight * weight,
                             div_weight=self.div_weight * weight)

    def dense_scalars(self) -> tuple:
        """The dense ops' scalar arguments in their schemas' order (csrc/ops.cpp, the Triton
        ops), typed as the schemas want."""
        return (float(self.temperature), float(self.ce_weight), float(self.div_weight),
                int(self.divergence), float(self.param_a), float(self.param_b),
                int(self.ignore_index), float(self.label_smoothing), float(self.softcap))

    def topk_scalars(self) -> tuple:
        """The top-k ops' scalar arguments in their schemas' order (csrc/sparse_ops.cpp, the
        Triton op): the dense ones, then renormalize and teacher_scale."""
        return self.dense_scalars() + (bool(self.renormalize), float(self.teacher_scale))

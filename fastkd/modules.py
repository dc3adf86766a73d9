"""`nn.Module` wrappers of the functional losses: keywords fixed at construction.

Semantics of every keyword: docs/semantics.md.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as F
from ._dispatch import check_backend_name
from ._docs import fill_doc
from ._options import LossOptions, TopKOptions, takes_options


class _LossModule(nn.Module):
    """A loss with its settings fixed at construction: `self.options` holds them validated
    (one `LossOptions` / `TopKOptions`, shown by repr), `self.call` the other keywords of
    the functional form; no parameters. ``num_items_in_batch`` varies per step: `forward`
    takes it."""

    def __init__(self, options: LossOptions, **call):
        super().__init__()
        check_backend_name(call.get("backend", "auto"))
        self.options = options
        self.call = call

    def keywords(self, num_items_in_batch) -> dict:
        """The functional form's keywords for one call."""
        if num_items_in_batch is None:
            num_items_in_batch = self.options.num_items_in_batch
        return {**self.options.keywords(), "num_items_in_batch": num_items_in_batch,
                **self.call}

    def extra_repr(self) -> str:
        shown = {**{k: v for k, v in self.options.keywords().items()
                    if k != "num_items_in_batch"}, **self.call}
        return ", ".join(f"{k}={v!r}" for k, v in shown.items())


@fill_doc
class DistillationLoss(_LossModule):
    """`fastkd.distillation_loss` as a module: ``crit(student_logits, teacher_logits, target)``.

    Every keyword of `distillation_loss` is fixed at construction except
    ``num_items_in_batch``, which varies per step and is passed to `forward`.

    Parameters
    ----------
    %(options)s
    inplace_backward : bool, default False
        Write the student gradient into the logits' storage (see `distillation_loss`).

    Returns
    -------
    %(returns)s

    Raises
    ------
    %(raises)s
    """

    @takes_options(LossOptions)
    def __init__(self, *, options: LossOptions, backend: str = "auto",
                 inplace_backward: bool = False, return_components: bool = False):
        super().__init__(options, backend=backend, inplace_backward=inplace_backward,
                         return_components=return_components)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                target: Optional[torch.Tensor] = None, num_items_in_batch=None):
        """Loss of (..., V) student and teacher logits and (...) integer labels or None.

        Parameters
        ----------
        student_logits, teacher_logits : Tensor, shape (..., V), floating
        target : Tensor or None, shape (...), any integer dtype
        num_items_in_batch : int, float, tensor or None
            Divisor of the summed loss (reduction="mean" only).

        Returns
        -------
        Tensor, or ``(loss, ce, divergence)`` with ``return_components=True``.
        """
        return F.distillation_loss(student_logits, teacher_logits, target,
                                   **self.keywords(num_items_in_batch))


@fill_doc
class FusedLinearDistillationLoss(_LossModule):
    """`fastkd.fused_linear_distillation_loss` as a module.

    ``crit(student_hidden, student_weight, teacher_hidden, teacher_weight, target)``, e.g. with
    the models' final hidden states and ``lm_head.weight``; biases and ``num_items_in_batch``
    are per-call arguments of `forward`. The teacher receives no gradient.

    Parameters
    ----------
    %(options)s
    chunk_size : int or None, default None
        Rows of logits per chunk (None: a memory budget, see the functional form).

    Returns
    -------
    %(returns)s

    Raises
    ------
    %(raises)s
    """

    @takes_options(LossOptions)
    def __init__(self, *, options: LossOptions, chunk_size: Optional[int] = None,
                 backend: str = "auto", return_components: bool = False):
        super().__init__(options, chunk_size=chunk_size, backend=backend,
                         return_components=return_components)

    def forward(self, student_hidden: torch.Tensor, student_weight: torch.Tensor,
                teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                target: Optional[torch.Tensor] = None, student_bias=None, teacher_bias=None,
                num_items_in_batch=None):
        """Loss of the two lm-heads applied chunk by chunk.

        Parameters
        ----------
        student_hidden : Tensor, shape (..., Hs); student_weight : Tensor, shape (V, Hs)
        teacher_hidden : Tensor, shape (..., Ht); teacher_weight : Tensor, shape (V, Ht)
        target : Tensor or None, shape (...), any integer dtype
        student_bias, teacher_bias : Tensor or None, shape (V,)
        num_items_in_batch : int, float, tensor or None

        Returns
        -------
        Tensor, or ``(loss, ce, divergence)`` with ``return_components=True``.
        """
        return F.fused_linear_distillation_loss(
            student_hidden, student_weight, teacher_hidden, teacher_weight, target,
            student_bias=student_bias, teacher_bias=teacher_bias,
            **self.keywords(num_items_in_batch))


@fill_doc
class SparseDistillationLoss(_LossModule):
    """`fastkd.sparse_distillation_loss` as a module (top-k / offline teacher):
    ``crit(student_logits, teacher_topk_logprobs, teacher_topk_indices, target)``.

    Parameters
    ----------
    tail : {"bucket", "renormalize"}, default "bucket"
        How the teacher's mass outside its top-k is treated (see the functional form).
    %(options)s
    teacher_temperature : float or None, default None
        The temperature the stored log-probabilities were taken at (None: ``temperature``);
        re-tempering needs ``tail="renormalize"`` (see the functional form).

    Returns
    -------
    %(returns)s

    Raises
    ------
    %(raises)s
    """

    @takes_options(TopKOptions)
    def __init__(self, *, options: TopKOptions, backend: str = "auto",
                 return_components: bool = False):
        super().__init__(options, backend=backend, return_components=return_components)

    def forward(self, student_logits: torch.Tensor, teacher_topk_logprobs: torch.Tensor,
                teacher_topk_indices: torch.Tensor, target: Optional[torch.Tensor] = None,
                num_items_in_batch=None):
        """Loss of (..., V) student logits against a (..., k) top-k teacher.

        Parameters
        ----------
        student_logits : Tensor, shape (..., V), floating
        teacher_topk_logprobs : Tensor, shape (..., k), floating
        teacher_topk_indices : Tensor, shape (..., k), int64 or int32
        target : Tensor or None, shape (...), any integer dtype
        num_items_in_batch : int, float, tensor or None

        Returns
        -------
        Tensor, or ``(loss, ce, divergence)`` with ``return_components=True``.
        """
        return F.sparse_distillation_loss(student_logits, teacher_topk_logprobs,
                                          teacher_topk_indices, target,
                                          **self.keywords(num_items_in_batch))

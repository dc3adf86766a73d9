"""Small helpers that wire online and self-distillation into a user's own training loop.

Not a framework: each piece is a loss or a model wrapper the user calls in their own loop.

- `mutual_distillation_loss`: two models teach each other in one step; one fused kernel call
  returns the gradient for both (the teacher-gradient path of `distillation_loss`).
- `EMATeacher`: a frozen exponential-moving-average copy of the student as its own teacher.
- `self_distillation_loss`: the deepest of several heads teaches the shallower ones.
"""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
from torch import nn

from .functional import distillation_loss


def mutual_distillation_loss(logits_a: torch.Tensor, logits_b: torch.Tensor,
                             target: Optional[torch.Tensor] = None, *, temperature: float = 1.0,
                             alpha: float = 0.5, divergence: str = "jsd", **options):
    """Online (mutual) distillation of two peers in one step (deep mutual learning).

    ``L = alpha * (CE(a) + CE(b)) / 2 + (1 - alpha) * T^2 * D(p_b, p_a)``, or
    ``L = T^2 * D(p_b, p_a)`` without a target. The divergence term is one fused call in
    which `b` is the "teacher" whose logits require grad, so the kernel returns both peers'
    gradients in the same sweep. With the default symmetric ``"jsd"`` (beta=0.5) each peer is
    pulled toward the other equally; ``"kl"`` makes `a` match `b` in the forward-KL sense and
    `b` match `a` in the reverse one.

    Parameters
    ----------
    logits_a, logits_b : Tensor, shape (..., V), floating
        The two peers' logits; both must require grad.
    target : Tensor or None, shape (...), integer labels
    temperature : float, default 1.0
    alpha : float in [0, 1], default 0.5
        Weight of the peers' mean CE.
    divergence : {"kl", "reverse_kl", "jsd", "tvd"}, default "jsd"
    **options
        Other keywords of `fastkd.distillation_loss` (beta, ignore_index, reduction, ...;
        docs/semantics.md §1).

    Returns
    -------
    Tensor
        Scalar (or per token for reduction="none"), float32 (float64 for float64 logits);
        its backward reaches both peers.
    """
    if not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be a number in [0, 1], got {alpha!r}")
    if not (logits_a.requires_grad and logits_b.requires_grad):
        raise ValueError("logits_a and logits_b must both require grad for mutual "
                         "distillation (detach one and use distillation_loss otherwise)")
    if target is None:
        return distillation_loss(logits_a, logits_b, None, temperature=temperature,
                                 divergence=divergence, **options)
    # One fused call computes c * (a' * CE(a) + (1 - a') * kD) with both gradients, where
    # a' / (1 - a') = (alpha / 2) / (1 - alpha): a' = alpha / (2 - alpha), c = 1 - alpha / 2.
    joint = distillation_loss(logits_a, logits_b, target, temperature=temperature,
                              alpha=alpha / (2.0 - alpha), divergence=divergence, **options)
    # CE of b alone: alpha=1 gives the kernel a zero divergence weight, so `a` is unused.
    ce_b = distillation_loss(logits_b, logits_a.detach(), target, alpha=1.0, **options)
    return (1.0 - alpha / 2.0) * joint + (alpha / 2.0) * ce_b


class EMATeacher(nn.Module):
    """A frozen exponential-moving-average copy of a model, used as its teacher
    (mean-teacher style self-distillation).

    ``teacher = EMATeacher(student, decay=0.999)``; after each optimiser step call
    ``teacher.update(student)``; ``teacher(x)`` runs the EMA copy under ``no_grad``.

    Parameters
    ----------
    model : nn.Module
        The student; it is deep-copied (the copy is in eval mode and needs no grad).
    decay : float in [0, 1), default 0.999
        Weight of the old average in each update.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay!r}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Moves the average toward `model`'s current state.

        Parameters
        ----------
        model : nn.Module
            The student, with the same parameter and buffer structure as the copy.
            Parameters: ``ema = decay * ema + (1 - decay) * current``; buffers are copied.
        """
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), 1.0 - self.decay)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        """The EMA copy's output on the same inputs as the model's, without autograd."""
        return self.model(*args, **kwargs)


def self_distillation_loss(head_logits: Sequence[torch.Tensor], target: torch.Tensor, *,
                           temperature: float = 3.0, alpha: float = 0.3, **options):
    """Deep-to-shallow self-distillation ("Be Your Own Teacher", Zhang et al. 2019).

    The deepest head learns from the labels (CE); every shallower head from
    ``alpha * CE + (1 - alpha) * T^2 * KL(deepest || head)``, the deepest head's logits
    detached.

    Parameters
    ----------
    head_logits : sequence of Tensor, each shape (..., V), floating
        Logits of at least two classifier heads, shallowest first, deepest last.
    target : Tensor, shape (...), integer labels
    temperature : float, default 3.0
    alpha : float in [0, 1], default 0.3
    **options
        Other keywords of `fastkd.distillation_loss` (docs/semantics.md §1).

    Returns
    -------
    Tensor
        The sum over heads of their losses (scalar unless reduction="none").
    """
    if len(head_logits) < 2:
        raise ValueError("head_logits needs at least two heads (shallow ones and the deepest)")
    deepest = head_logits[-1]
    loss = distillation_loss(deepest, deepest.detach(), target, alpha=1.0, **options)
    for head in head_logits[:-1]:
        loss = loss + distillation_loss(head, deepest.detach(), target, temperature=temperature,
                                        alpha=alpha, **options)
    return loss

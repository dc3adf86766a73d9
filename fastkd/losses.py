"""Other distillation families: multi-teacher, decoupled (DKD), feature-, attention- and
relation-based losses, as functions and as `nn.Module`s (with their learnable regressors).

The logit-based ones reuse the fused dense kernels; the rest are plain PyTorch
(`fastkd.reference.representation`), whose tensors are small. Exact definitions, including
the degenerate cases (RKD with coinciding embeddings, the cosine at a zero vector), are in
docs/semantics.md §11. The teacher side of every feature loss is treated as a constant.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import nn

from ._dispatch import kernel_for
from ._options import LossOptions
from ._reduction import reduce_rows
from ._validation import check_floating, check_logits_pair, check_options, check_target
from .functional import distillation_loss
from .ops.multi_teacher import multi_teacher_rows
from .reference import representation as rep
from .reference.decoupled import decoupled_kd_rows


def _check_weights(weights, count: int) -> tuple:
    if weights is None:
        return (1.0 / count,) * count
    weights = tuple(float(w) for w in weights)
    if len(weights) != count or any(not w >= 0 for w in weights):
        raise ValueError(f"weights must be {count} non-negative numbers (one per teacher), "
                         f"got {weights}")
    if not math.isclose(sum(weights), 1.0, rel_tol=1e-6):
        raise ValueError(f"weights must sum to 1, got sum {sum(weights)}")
    return weights


def multi_teacher_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: Sequence[torch.Tensor],
    target: Optional[torch.Tensor] = None, *, weights: Optional[Sequence[float]] = None,
    mode: str = "sum", temperature: float = 1.0, alpha: float = 0.5, divergence: str = "kl",
    beta: float = 0.5, scale_by_t2: bool = True, ignore_index: int = -100,
    label_smoothing: float = 0.0, reduction: str = "mean", num_items_in_batch=None,
    backend: str = "auto",
) -> torch.Tensor:
    """Distillation from several teachers without stacking `[k, N, V]` copies.

    Parameters
    ----------
    student_logits : Tensor, shape (..., V), floating
    teacher_logits : sequence of Tensor, each shape (..., V), floating
        The k teachers' logits; none may require grad (teachers get no gradient).
    target : Tensor or None, shape (...), integer labels
        None: no hard term (the loss is the weighted soft term alone).
    weights : sequence of float or None
        k non-negative weights summing to 1 (default uniform 1/k).
    mode : {"sum", "mixture"}
        "sum": ``alpha * CE + (1 - alpha) * k_T * sum_i w_i D(p_t_i, p_s)``, each teacher
        streamed through the fused kernel in turn (two [N, V] buffers in all). "mixture": D
        against the mixture ``sum_i w_i p_t_i``, whose logits ``T * log(sum_i w_i p_t_i)``
        are built in one float32 [N, V] buffer. k_T = T^2 (or 1 without scale_by_t2).
    temperature, alpha, divergence, beta, scale_by_t2, ignore_index
        As in `fastkd.distillation_loss` (docs/semantics.md §1), as are label_smoothing,
        reduction, num_items_in_batch and backend.

    Returns
    -------
    Tensor
        Scalar, or shape (...) for reduction="none"; float32 (float64 for float64 inputs).
    """
    if isinstance(teacher_logits, torch.Tensor) or len(teacher_logits) == 0:
        raise TypeError("teacher_logits must be a non-empty sequence of tensors")
    if mode not in ("sum", "mixture"):
        raise ValueError(f"mode must be 'sum' or 'mixture', got {mode!r}")
    for i, teacher in enumerate(teacher_logits):
        check_logits_pair(student_logits, teacher, target)
        if teacher.requires_grad:
            raise ValueError(f"teacher_logits[{i}] requires grad; multi-teacher losses treat "
                             "teachers as constants (detach them)")
    weights = _check_weights(weights, len(teacher_logits))
    keywords = dict(temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                    ignore_index=ignore_index, label_smoothing=label_smoothing,
                    reduction=reduction, num_items_in_batch=num_items_in_batch)
    options = LossOptions(scale_by_t2=scale_by_t2, **keywords).validate()
    if mode == "mixture":
        mixture = mixture_teacher_logits(teacher_logits, weights, temperature)
        return distillation_loss(student_logits, mixture.to(student_logits.dtype), target,
                                 scale_by_t2=scale_by_t2, backend=backend, **keywords)
    lead_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if target is not None:
        check_target(target, lead_shape, vocab, ignore_index)
    kernel = kernel_for("dense", backend, student_logits, divergence=options.divergence)
    student = student_logits.reshape(-1, vocab).contiguous()
    teachers = [t.reshape(-1, vocab).contiguous() for t in teacher_logits]
    flat_target = None if target is None else target.reshape(-1).to(torch.int64)
    rows = multi_teacher_rows(student, teachers, flat_target, kernel,
                              options.kernel_args(target is not None), weights)
    valid = None if flat_target is None else (flat_target != ignore_index).sum()
    return reduce_rows(rows, valid, reduction, num_items_in_batch, lead_shape)


@torch.no_grad()
def mixture_teacher_logits(teacher_logits: Sequence[torch.Tensor], weights: Sequence[float],
                           temperature: float) -> torch.Tensor:
    """Logits whose tempered softmax is the teachers' mixture.

    Parameters
    ----------
    teacher_logits : sequence of Tensor, each shape (..., V), floating
    weights : sequence of float
        One non-negative weight per teacher, summing to 1; weight-0 teachers are skipped.
    temperature : float
        T > 0.

    Returns
    -------
    Tensor, shape (..., V), float32
        ``T * log(sum_i w_i softmax(t_i / T))``, accumulated in place in one buffer with
        log-add-exp, teacher by teacher (no gradient).
    """
    acc = None
    for teacher, weight in zip(teacher_logits, weights):
        if weight == 0:
            continue
        log_p = torch.log_softmax(teacher.float() / temperature, dim=-1).add_(math.log(weight))
        acc = log_p if acc is None else torch.logaddexp(acc, log_p, out=acc)
    return acc.mul_(temperature)


def decoupled_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      target: torch.Tensor, *, temperature: float = 4.0, alpha: float = 1.0,
                      beta: float = 8.0, ignore_index: int = -100,
                      reduction: str = "mean") -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): ``T^2 * (alpha * TCKD + beta * NCKD)`` per token.

    TCKD is the binary KL of (target, rest) probabilities, NCKD the KL among the non-target
    classes (`fastkd.reference.decoupled`). Add the hard CE term yourself (the paper weighs
    it 1). The defaults are the paper's CIFAR settings.

    Parameters
    ----------
    student_logits, teacher_logits : Tensor, shape (..., V), floating, V >= 2
    target : Tensor, shape (...), integer labels (required: DKD splits on the target class)
    temperature : float, default 4.0
    alpha, beta : float >= 0, defaults 1.0 and 8.0
        Weights of TCKD and NCKD.
    ignore_index : int, default -100
        Tokens with this label contribute 0 (and zero gradient).
    reduction : {"mean", "sum", "none"}, default "mean"
        "mean" over the tokens that are not ignored.

    Returns
    -------
    Tensor
        Scalar, or shape (...) for reduction="none".
    """
    check_logits_pair(student_logits, teacher_logits, target)
    lead_shape, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    if vocab < 2:
        raise ValueError(f"student_logits needs at least 2 classes for DKD, got V={vocab}")
    check_target(target, lead_shape, vocab, ignore_index)
    check_options(temperature=temperature, alpha=0.5, divergence="kl", beta=0.5,
                  ignore_index=ignore_index, label_smoothing=0.0, softcap=None,
                  reduction=reduction, num_items_in_batch=None)
    for name, value in (("alpha", alpha), ("beta", beta)):
        if not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{name} must be a number >= 0 for DKD, got {value!r}")
    flat_target = target.reshape(-1).to(torch.int64)
    rows = decoupled_kd_rows(student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab),
                             flat_target, temperature=temperature, alpha=alpha, beta=beta,
                             ignore_index=ignore_index)
    valid = (flat_target != ignore_index).sum()
    return reduce_rows(rows, valid, reduction, None, lead_shape)


def _check_pair(student, teacher, same_shape: bool = True) -> None:
    check_floating("student", student)
    check_floating("teacher", teacher)
    if same_shape and student.shape != teacher.shape:
        raise ValueError(f"teacher shape {tuple(teacher.shape)} must equal the (projected) "
                         f"student shape {tuple(student.shape)}")
    if not same_shape and student.shape[0] != teacher.shape[0]:
        raise ValueError(f"student and teacher must have the same batch size, got "
                         f"{student.shape[0]} and {teacher.shape[0]}")


def hint_loss(student_features, teacher_features):
    """FitNets hint: mean squared error between regressed student and teacher features.

    Parameters
    ----------
    student_features : Tensor, any shape, floating
        Already mapped to the teacher's width (see `HintLoss` for a learnable regressor).
    teacher_features : Tensor, same shape, floating
        Treated as a constant (detached).

    Returns
    -------
    Tensor
        Scalar: the mean over every element of the squared difference.
    """
    _check_pair(student_features, teacher_features)
    return rep.hint_loss(student_features, teacher_features.detach())


def hidden_state_loss(student_hidden, teacher_hidden, *, metric="cosine", mask=None):
    """Per-token hidden-state matching, averaged over the tokens that count.

    With ``metric="cosine"`` a token costs ``1 - <a, b> / sqrt((|a|^2 + 1e-12) *
    (|b|^2 + 1e-12))``: the eps on the squared norms of ``torch.nn.CosineEmbeddingLoss``,
    which DistilBERT's hidden-state term uses, so value and gradient equal DistilBERT's, also
    at an exactly zero vector (where ``F.cosine_similarity``'s gradient is 100x larger).

    Parameters
    ----------
    student_hidden : Tensor, shape (..., H), floating
        Already projected to the teacher's width H (see `HiddenStateLoss`).
    teacher_hidden : Tensor, shape (..., H), floating
        Treated as a constant (detached).
    metric : {"cosine", "mse"}, default "cosine"
        "mse": the mean over H of the squared difference per token.
    mask : Tensor or None, shape (...), bool
        True for the tokens that count (e.g. the attention mask); None counts every token.

    Returns
    -------
    Tensor
        Scalar: the mean over the counted tokens (0 when none counts); float32 for bf16 /
        fp16 inputs with the cosine metric, else the inputs' dtype.
    """
    _check_pair(student_hidden, teacher_hidden)
    if mask is not None and mask.shape != student_hidden.shape[:-1]:
        raise ValueError(f"mask must have shape {tuple(student_hidden.shape[:-1])}, "
                         f"got {tuple(mask.shape)}")
    return rep.hidden_state_loss(student_hidden, teacher_hidden.detach(), metric, mask)


def attention_transfer_loss(student_features, teacher_features, *, p=2.0):
    """Attention transfer (Zagoruyko & Komodakis 2017) between two feature maps.

    Parameters
    ----------
    student_features : Tensor, shape (B, Cs, H, W), floating
    teacher_features : Tensor, shape (B, Ct, H, W), floating
        Channels may differ; spatial sizes must match (interpolate first otherwise).
        Treated as a constant.
    p : float, default 2.0
        The attention map is ``Q = sum_c |F_c|^p`` over channels, flattened and L2-normalised.

    Returns
    -------
    Tensor
        Scalar: the mean over the batch of ``||Q_s - Q_t||_2``.
    """
    _check_pair(student_features, teacher_features, same_shape=False)
    if student_features.shape[2:] != teacher_features.shape[2:]:
        raise ValueError("student_features and teacher_features must share spatial sizes, got "
                         f"{tuple(student_features.shape[2:])} and "
                         f"{tuple(teacher_features.shape[2:])}")
    return rep.attention_transfer_loss(student_features, teacher_features.detach(), p)


def attention_map_loss(student_probs, teacher_probs, *, mask=None):
    """KL(teacher || student) between attention probabilities (MiniLM-style).

    Parameters
    ----------
    student_probs, teacher_probs : Tensor, shape (B, heads, Lq, Lk), floating
        Rows summing to 1 over Lk; keys masked to probability 0 on the teacher's side
        contribute nothing. The teacher is treated as a constant.
    mask : Tensor or None, shape (B, Lq), bool
        The query positions that count; None counts all.

    Returns
    -------
    Tensor
        Scalar: the mean of the per-row KL over batch, heads and counted queries.
    """
    _check_pair(student_probs, teacher_probs)
    if student_probs.dim() != 4:
        raise ValueError(f"student_probs must be (B, heads, Lq, Lk), got "
                         f"{tuple(student_probs.shape)}")
    if mask is not None and mask.shape != (student_probs.shape[0], student_probs.shape[2]):
        raise ValueError(f"mask must have shape (B, Lq) = "
                         f"{(student_probs.shape[0], student_probs.shape[2])}, "
                         f"got {tuple(mask.shape)}")
    return rep.attention_probs_kl(student_probs, teacher_probs.detach(), mask)


def rkd_loss(student_embeddings, teacher_embeddings, *, distance_weight=25.0,
             angle_weight=50.0):
    """Relational KD (Park et al. 2019): distance-wise plus angle-wise Huber losses.

    The distance term compares the two pairwise-distance matrices, each divided by its mean
    over distinct pairs; distances are floored at 1e-6 (lenscloth/RKD's 1e-12 on squared
    distances), so when all embeddings of one side coincide that side's matrix is 1 off the
    diagonal and passes no gradient: value and gradient equal lenscloth/RKD's (and
    mdistiller's, RepDistiller's, torchdistill's). The angle term compares the cosines of all
    triplet angles (memory O(B^2 * D): use modest batches, as the paper does).

    Parameters
    ----------
    student_embeddings : Tensor, shape (B, Ds), floating, B >= 2
    teacher_embeddings : Tensor, shape (B, Dt), floating
        Treated as a constant.
    distance_weight, angle_weight : float, defaults 25.0 and 50.0
        The paper's weights; 0 leaves a term out.

    Returns
    -------
    Tensor
        Scalar ``distance_weight * L_distance + angle_weight * L_angle``.
    """
    _check_pair(student_embeddings, teacher_embeddings, same_shape=False)
    if student_embeddings.dim() != 2 or student_embeddings.shape[0] < 2:
        raise ValueError("student_embeddings must be (B, D) with B >= 2, got "
                         f"{tuple(student_embeddings.shape)}")
    loss = student_embeddings.new_zeros(())
    if distance_weight:
        loss = loss + distance_weight * rep.rkd_distance_loss(student_embeddings,
                                                              teacher_embeddings)
    if angle_weight:
        loss = loss + angle_weight * rep.rkd_angle_loss(student_embeddings, teacher_embeddings)
    return loss


def similarity_preserving_loss(student_features, teacher_features):
    """Similarity-preserving KD (Tung & Mori 2019).

    Parameters
    ----------
    student_features : Tensor, shape (B, ...), floating
    teacher_features : Tensor, shape (B, ...), floating
        Any feature shapes with the same batch size B; treated as a constant.

    Returns
    -------
    Tensor
        Scalar ``||G_s - G_t||_F^2 / B^2``, G the row-L2-normalised ``F F^T`` of the features
        flattened to (B, -1).
    """
    _check_pair(student_features, teacher_features, same_shape=False)
    return rep.similarity_preserving_loss(student_features, teacher_features.detach())


class HintLoss(nn.Module):
    """FitNets hint with a learnable regressor from the student's width to the teacher's.

    Optimise the regressor's parameters together with the student's.

    Parameters
    ----------
    student_channels, teacher_channels : int
        Feature widths (channels for conv features, last dimension for linear ones).
    kind : {"conv", "linear"}, default "conv"
        "conv": a 1x1 convolution for (B, C, H, W) features; "linear": an ``nn.Linear`` for
        (..., C) features.

    Forward: ``(student_features, teacher_features) -> scalar``, `hint_loss` of the
    regressed student features against the teacher's.
    """

    def __init__(self, student_channels: int, teacher_channels: int, kind: str = "conv"):
        super().__init__()
        if kind == "conv":
            self.regressor = nn.Conv2d(student_channels, teacher_channels, kernel_size=1)
        elif kind == "linear":
            self.regressor = nn.Linear(student_channels, teacher_channels)
        else:
            raise ValueError(f"kind must be 'conv' or 'linear', got {kind!r}")

    def forward(self, student_features, teacher_features):
        return hint_loss(self.regressor(student_features), teacher_features)


class HiddenStateLoss(nn.Module):
    """Transformer hidden-state matching with a learnable projection.

    Parameters
    ----------
    student_dim, teacher_dim : int
        Hidden sizes; the projection is ``nn.Linear(student_dim, teacher_dim, bias=False)``,
        or the identity when they are equal.
    metric : {"cosine", "mse"}, default "cosine"
        As in `hidden_state_loss` (the cosine has DistilBERT's eps on the squared norms).

    Forward: ``(student_hidden (..., student_dim), teacher_hidden (..., teacher_dim),
    mask=None) -> scalar``, `hidden_state_loss` of the projected student hidden states.
    """

    def __init__(self, student_dim: int, teacher_dim: int, metric: str = "cosine"):
        super().__init__()
        if metric not in ("cosine", "mse"):
            raise ValueError(f"metric must be 'cosine' or 'mse', got {metric!r}")
        self.metric = metric
        self.projection = (nn.Identity() if student_dim == teacher_dim
                           else nn.Linear(student_dim, teacher_dim, bias=False))

    def forward(self, student_hidden, teacher_hidden, mask=None):
        return hidden_state_loss(self.projection(student_hidden), teacher_hidden,
                                 metric=self.metric, mask=mask)


class AttentionTransferLoss(nn.Module):
    """Attention transfer summed over pairs of feature maps.

    Parameters
    ----------
    p : float, default 2.0
        Exponent of the attention map (see `attention_transfer_loss`).

    Forward: ``(student_maps, teacher_maps) -> scalar``, each a (B, C, H, W) tensor or an
    equal-length list of them; the sum of `attention_transfer_loss` over the pairs.
    """

    def __init__(self, p: float = 2.0):
        super().__init__()
        self.p = p

    def forward(self, student_maps, teacher_maps):
        if isinstance(student_maps, torch.Tensor):
            student_maps, teacher_maps = [student_maps], [teacher_maps]
        if len(student_maps) != len(teacher_maps):
            raise ValueError("student_maps and teacher_maps must have the same length")
        return sum(attention_transfer_loss(s, t, p=self.p)
                   for s, t in zip(student_maps, teacher_maps))


class RKDLoss(nn.Module):
    """Relational KD (distance + angle) as a module; see `rkd_loss`.

    Parameters
    ----------
    distance_weight, angle_weight : float, defaults 25.0 and 50.0

    Forward: ``(student_embeddings (B, Ds), teacher_embeddings (B, Dt)) -> scalar``.
    """

    def __init__(self, distance_weight: float = 25.0, angle_weight: float = 50.0):
        super().__init__()
        self.distance_weight, self.angle_weight = distance_weight, angle_weight

    def forward(self, student_embeddings, teacher_embeddings):
        return rkd_loss(student_embeddings, teacher_embeddings,
                        distance_weight=self.distance_weight, angle_weight=self.angle_weight)


class DecoupledKDLoss(nn.Module):
    """Decoupled KD as a module; see `decoupled_kd_loss`.

    Parameters
    ----------
    temperature, alpha, beta, ignore_index, reduction
        As in `decoupled_kd_loss`.

    Forward: ``(student_logits (..., V), teacher_logits (..., V), target (...)) -> loss``.
    """

    def __init__(self, temperature: float = 4.0, alpha: float = 1.0, beta: float = 8.0,
                 ignore_index: int = -100, reduction: str = "mean"):
        super().__init__()
        self.options = dict(temperature=temperature, alpha=alpha, beta=beta,
                            ignore_index=ignore_index, reduction=reduction)

    def forward(self, student_logits, teacher_logits, target):
        return decoupled_kd_loss(student_logits, teacher_logits, target, **self.options)


class MultiTeacherDistillationLoss(nn.Module):
    """`multi_teacher_distillation_loss` as a module (keywords fixed at construction).

    Parameters
    ----------
    weights : sequence of float or None
        One weight per teacher, summing to 1 (default uniform).
    mode : {"sum", "mixture"}, default "sum"
    **options
        Any other keyword of `multi_teacher_distillation_loss` (temperature, alpha, ...).

    Forward: ``(student_logits, teacher_logits (a sequence), target=None,
    num_items_in_batch=None) -> loss``.
    """

    def __init__(self, weights: Optional[Sequence[float]] = None, mode: str = "sum", **options):
        super().__init__()
        self.options = dict(weights=weights, mode=mode, **options)

    def forward(self, student_logits, teacher_logits, target=None, num_items_in_batch=None):
        return multi_teacher_distillation_loss(student_logits, teacher_logits, target,
                                               num_items_in_batch=num_items_in_batch,
                                               **self.options)

"""Feature-, attention- and relation-based distillation losses (pure PyTorch).

These losses act on intermediate representations, whose tensors are small next to the
`[tokens x vocab]` logits, so plain PyTorch with autograd is the right implementation: there
is no large temporary to fuse away. Each function takes already-projected features (the
learnable regressors live in `fastkd.losses`) and returns a scalar.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _masked_mean(values: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean of `values` (...) over positions where `mask` (...) is True (0 when none)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1)


def hint_loss(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """FitNets hint: mean squared error between (regressed) student and teacher features.

    Parameters
    ----------
    student_features, teacher_features : Tensor, same shape (e.g. (B, C, H, W)), floating

    Returns
    -------
    Tensor
        Scalar, the mean over all elements of the squared difference.
    """
    return F.mse_loss(student_features, teacher_features)


COSINE_EPS = 1e-12     # added to each squared norm, as torch's CosineEmbeddingLoss does
RKD_DISTANCE_EPS = 1e-12   # floor of a squared pairwise distance, as lenscloth/RKD's pdist


def cosine_similarity_eps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last dimension with eps on the squared norms.

    Parameters
    ----------
    a, b : torch.Tensor
        (..., H), same shape, floating point.

    Returns
    -------
    torch.Tensor
        (...), in float32 for half-precision inputs (else their dtype):
        ``<a, b> / sqrt((|a|^2 + 1e-12) * (|b|^2 + 1e-12))``.

    This is the formula of ``torch.nn.CosineEmbeddingLoss`` (the loss DistilBERT's hidden-state
    term uses), not that of ``F.cosine_similarity`` (which divides by ``max(|a|, 1e-8)``).
    The two agree for non-zero vectors; at an exactly zero vector the value is 0 for both, but
    the gradient of this form is ``b / sqrt(1e-12 * (|b|^2 + 1e-12))``, about ``b / (1e-6 |b|)``,
    where ``F.cosine_similarity``'s is 100 times larger.
    """
    dtype = torch.promote_types(a.dtype, torch.float32)
    a, b = a.to(dtype), b.to(dtype)
    dot = (a * b).sum(-1)
    squares = ((a * a).sum(-1) + COSINE_EPS) * ((b * b).sum(-1) + COSINE_EPS)
    return dot / squares.sqrt()


def hidden_state_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor,
                      metric: str = "cosine",
                      mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-token hidden-state matching for transformers, averaged over the counted tokens.

    Parameters
    ----------
    student_hidden, teacher_hidden : torch.Tensor
        (..., H), same shape, floating point (the student already projected to H).
    metric : {"cosine", "mse"}
        "cosine": ``1 - cos(h_s, h_t)`` per token, with `cosine_similarity_eps` (eps 1e-12 on
        the squared norms, as DistilBERT's ``CosineEmbeddingLoss``: the same value and
        gradient, also at an exactly zero vector). "mse": the mean over H of the squared
        difference per token.
    mask : torch.Tensor, optional
        (...) bool, True for the tokens that count; None counts every token.

    Returns
    -------
    torch.Tensor
        Scalar: the mean over counted tokens (0 when none counts), float32 for half-precision
        inputs with the cosine metric, else the inputs' dtype.
    """
    if metric == "cosine":
        per_token = 1.0 - cosine_similarity_eps(student_hidden, teacher_hidden)
    elif metric == "mse":
        per_token = (student_hidden - teacher_hidden).pow(2).mean(-1)
    else:
        raise ValueError(f"metric must be 'cosine' or 'mse', got {metric!r}")
    return _masked_mean(per_token, mask)


def attention_map(features: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis' spatial attention map.

    Parameters
    ----------
    features : Tensor, shape (B, C, *spatial), floating
    p : float, default 2.0

    Returns
    -------
    Tensor, shape (B, prod(spatial))
        ``Q = sum_c |F_c|^p`` over channels, flattened and L2-normalised per sample.
    """
    q = features.abs().pow(p).sum(1).flatten(1)
    return F.normalize(q, dim=1)


def attention_transfer_loss(student_features: torch.Tensor, teacher_features: torch.Tensor,
                            p: float = 2.0) -> torch.Tensor:
    """Attention transfer (the paper's form, beta=2).

    Parameters
    ----------
    student_features : Tensor, shape (B, Cs, H, W), floating
    teacher_features : Tensor, shape (B, Ct, H, W), floating
        Channels may differ; spatial sizes must match (interpolate first otherwise).
    p : float, default 2.0

    Returns
    -------
    Tensor
        Scalar: the mean over the batch of ``||Q_s - Q_t||_2`` (`attention_map`).
    """
    diff = attention_map(student_features, p) - attention_map(teacher_features, p)
    return diff.norm(dim=1).mean()


def attention_probs_kl(student_probs: torch.Tensor, teacher_probs: torch.Tensor,
                       mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """KL(teacher || student) between attention probabilities, per head and query row.

    Parameters
    ----------
    student_probs, teacher_probs : Tensor, shape (B, heads, Lq, Lk), floating
        Rows summing to 1 over Lk; keys at probability 0 on the teacher's side contribute
        nothing.
    mask : Tensor or None, shape (B, Lq), bool
        The query positions that count.

    Returns
    -------
    Tensor
        Scalar: the mean over batch, heads and counted queries (0 when none counts).
    """
    live = teacher_probs > 0
    log_ratio = torch.where(live, teacher_probs, 1.0).log() - torch.where(
        live, student_probs, 1.0).log()
    per_row = torch.where(live, teacher_probs * log_ratio, 0.0).sum(-1)   # (B, heads, Lq)
    if mask is not None:
        mask = mask.unsqueeze(1).expand_as(per_row)
    return _masked_mean(per_row, mask)


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of `embeddings`, floored as in lenscloth/RKD.

    Parameters
    ----------
    embeddings : torch.Tensor
        (B, D) floating point.

    Returns
    -------
    torch.Tensor
        (B, B), the inputs' dtype: ``sqrt(max(|e_i - e_j|^2, 1e-12))`` off the diagonal and 0
        on it. The floor is the one of lenscloth/RKD's ``pdist`` (also used by mdistiller,
        RepDistiller and torchdistill): two coinciding embeddings are 1e-6 apart, and a
        distance below the floor passes no gradient. The differences are formed directly (not
        through ``|a|^2 + |b|^2 - 2<a, b>``), so coinciding rows give exactly the floor.
    """
    d = torch.cdist(embeddings, embeddings, compute_mode="donot_use_mm_for_euclid_dist")
    d = d.clamp(min=RKD_DISTANCE_EPS ** 0.5)
    off_diagonal = ~torch.eye(embeddings.shape[0], dtype=torch.bool, device=embeddings.device)
    return d * off_diagonal


def _normalised_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """`pairwise_distances` (B, B) divided by their mean over the B*(B-1) distinct pairs.

    Every off-diagonal distance is at least the floor 1e-6, so that mean is the mean over the
    positive entries that lenscloth/RKD divides by, and it is never 0: when all B embeddings
    coincide, every off-diagonal entry becomes exactly 1 (and passes no gradient).
    """
    d = pairwise_distances(embeddings)
    b = embeddings.shape[0]
    return d / (d.sum() / (b * (b - 1)))


def rkd_distance_loss(student_embeddings: torch.Tensor,
                      teacher_embeddings: torch.Tensor) -> torch.Tensor:
    """Relational KD, distance-wise (Park et al. 2019).

    Parameters
    ----------
    student_embeddings : torch.Tensor
        (B, Ds) floating point, B >= 2.
    teacher_embeddings : torch.Tensor
        (B, Dt) floating point; treated as a constant (no gradient).

    Returns
    -------
    torch.Tensor
        Scalar, the inputs' dtype: the Huber (smooth L1, beta 1) loss averaged over all B*B
        entries between the two mean-normalised distance matrices of `_normalised_distances`.
        It equals lenscloth/RKD's ``RkdDistance`` in value and gradient, including when all
        embeddings of one side coincide (that side's matrix is then 1 off the diagonal).
    """
    with torch.no_grad():
        target = _normalised_distances(teacher_embeddings.detach())
    return F.smooth_l1_loss(_normalised_distances(student_embeddings), target)


def _triplet_cosines(embeddings: torch.Tensor) -> torch.Tensor:
    """cos of the angle at j between e_i and e_k: (B, B, B) from (B, D)."""
    diff = F.normalize(embeddings.unsqueeze(0) - embeddings.unsqueeze(1), dim=2)  # e_i - e_j
    return torch.bmm(diff, diff.transpose(1, 2))


def rkd_angle_loss(student_embeddings: torch.Tensor,
                   teacher_embeddings: torch.Tensor) -> torch.Tensor:
    """Relational KD, angle-wise (Park et al. 2019).

    Parameters
    ----------
    student_embeddings : Tensor, shape (B, Ds), floating
    teacher_embeddings : Tensor, shape (B, Dt), floating; treated as a constant.

    Returns
    -------
    Tensor
        Scalar: the Huber loss between the cosines of all triplet angles (B^3 entries).
        Memory is O(B^2 * D): use modest batches, as the paper does.
    """
    with torch.no_grad():
        target = _triplet_cosines(teacher_embeddings.detach())
    return F.smooth_l1_loss(_triplet_cosines(student_embeddings), target)


def similarity_preserving_loss(student_features: torch.Tensor,
                               teacher_features: torch.Tensor) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori 2019).

    Parameters
    ----------
    student_features, teacher_features : Tensor, shape (B, ...), floating

    Returns
    -------
    Tensor
        Scalar ``||G_s - G_t||_F^2 / B^2``, G the row-L2-normalised ``F F^T`` of the
        features flattened to (B, -1).
    """
    b = student_features.shape[0]

    def gram(features):
        flat = features.reshape(b, -1)
        return F.normalize(flat @ flat.t(), dim=1)

    return (gram(student_features) - gram(teacher_features)).pow(2).sum() / (b * b)

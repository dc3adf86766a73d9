"""Degenerate inputs of the representation losses, against the formulas the community uses.

The expected values are computed here, independently of fastkd: by hand for small exact cases,
with an in-test float64 transcription of lenscloth/RKD's distance formula (squared distances
through |a|^2 + |b|^2 - 2<a, b>, floored at 1e-12, square root, diagonal 0, divided by the mean
of the positive entries, smooth L1) differentiated by autograd, and with torch's own
`nn.CosineEmbeddingLoss` (what DistilBERT's hidden-state term calls).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fastkd

TRIANGLE = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])  # sides 3, 4, 5


def community_pdist(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    square = e.pow(2).sum(1)
    d2 = (square[:, None] + square[None, :] - 2 * e @ e.t()).clamp(min=eps)
    d = d2.sqrt().clone()
    d[range(len(e)), range(len(e))] = 0
    return d


def community_rkd_distance(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        t = community_pdist(teacher)
        t = t / t[t > 0].mean()
    s = community_pdist(student)
    s = s / s[s > 0].mean()
    return F.smooth_l1_loss(s, t)


def fastkd_and_community(student: torch.Tensor, teacher: torch.Tensor):
    """(loss, student grad) of fastkd.rkd_loss (distance only, weight 1) and of the
    community formula, both in float64 from the same values."""
    ours_in = student.double().clone().requires_grad_()
    ours = fastkd.rkd_loss(ours_in, teacher.double(), distance_weight=1.0, angle_weight=0.0)
    ours.backward()
    ref_in = student.double().clone().requires_grad_()
    ref = community_rkd_distance(ref_in, teacher.double())
    ref.backward()
    return ours, ours_in.grad, ref, ref_in.grad


@pytest.mark.parametrize("point", [[0.0, 0.0], [1.5, -2.0]])
def test_rkd_distance_student_all_coinciding_by_hand(point):
    """Student normalised distances: 1 off the diagonal; teacher: 3/4, 1, 5/4 (twice each).
    Huber: four entries of 0.5 * 0.25^2 over nine -> 1/72; no gradient below the floor."""
    student = torch.tensor([point] * 3, dtype=torch.float64, requires_grad=True)
    loss = fastkd.rkd_loss(student, TRIANGLE.double(), distance_weight=1.0, angle_weight=0.0)
    loss.backward()
    assert loss.item() == pytest.approx(1.0 / 72.0, rel=1e-12)
    assert torch.equal(student.grad, torch.zeros_like(student))


def test_rkd_distance_teacher_all_coinciding_matches_community_value_and_gradient():
    teacher = torch.full((3, 5), 0.7)
    ours, ours_grad, ref, ref_grad = fastkd_and_community(TRIANGLE, teacher)
    assert ours.item() == pytest.approx(1.0 / 72.0, rel=1e-12)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-10, atol=1e-14)
    assert ours_grad.abs().max() > 1e-3, "the student does get a gradient here"


@pytest.mark.parametrize("side", ["student", "teacher"])
def test_rkd_distance_degenerate_side_matches_community_on_random_embeddings(side):
    generator = torch.Generator().manual_seed(11)
    batch = 8
    student = torch.randn(batch, 16, generator=generator)
    teacher = torch.randn(batch, 32, generator=generator) * 3.0
    if side == "student":
        student = torch.zeros_like(student)
    else:
        teacher = torch.zeros_like(teacher)
    ours, ours_grad, ref, ref_grad = fastkd_and_community(student, teacher)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=0)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-8, atol=1e-14)
    # every off-diagonal entry of the degenerate side is 1: a small loss, not ~0.4
    assert ours.item() < 0.1


def test_rkd_distance_matches_community_on_ordinary_embeddings_float32():
    generator = torch.Generator().manual_seed(3)
    student = torch.randn(12, 16, generator=generator)
    teacher = torch.randn(12, 64, generator=generator)
    ours_in = student.clone().requires_grad_()
    ours = fastkd.rkd_loss(ours_in, teacher, distance_weight=1.0, angle_weight=0.0)
    ours.backward()
    _, _, ref, ref_grad = fastkd_and_community(student, teacher)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ours_in.grad.double(), ref_grad, rtol=1e-4, atol=1e-7)


def test_rkd_distance_two_coinciding_rows_among_others_match_community():
    generator = torch.Generator().manual_seed(5)
    student = torch.randn(6, 4, generator=generator, dtype=torch.float64)
    student[3] = student[1]
    teacher = torch.randn(6, 9, generator=generator, dtype=torch.float64)
    ours, ours_grad, ref, ref_grad = fastkd_and_community(student, teacher)
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=0)
    torch.testing.assert_close(ours_grad, ref_grad, rtol=1e-6, atol=1e-12)


def cosine_embedding_reference(student: torch.Tensor, teacher: torch.Tensor,
                               mask: torch.Tensor = None):
    """DistilBERT's form: the counted tokens gathered, CosineEmbeddingLoss with target 1."""
    s = student.detach().clone().requires_grad_()
    rows_s, rows_t = s.reshape(-1, s.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
    if mask is not None:
        keep = mask.reshape(-1)
        rows_s, rows_t = rows_s[keep], rows_t[keep]
    loss = nn.CosineEmbeddingLoss(reduction="mean")(rows_s, rows_t,
                                                     torch.ones(len(rows_s), dtype=s.dtype))
    loss.backward()
    return loss, s.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cosine_hidden_state_at_a_zero_vector_matches_cosine_embedding_loss(dtype):
    generator = torch.Generator().manual_seed(7)
    student = torch.randn(2, 5, 24, generator=generator, dtype=dtype)
    teacher = torch.randn(2, 5, 24, generator=generator, dtype=dtype)
    student[0, 2] = 0.0
    student[1, 4] = 0.0
    ref, ref_grad = cosine_embedding_reference(student, teacher)
    ours_in = student.clone().requires_grad_()
    ours = fastkd.hidden_state_loss(ours_in, teacher, metric="cosine")
    ours.backward()
    tol = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-8, atol=0)
    torch.testing.assert_close(ours, ref, **tol)
    torch.testing.assert_close(ours_in.grad, ref_grad, **tol)
    # by hand at the zero token: -(1/10) * t / sqrt(1e-12 * (|t|^2 + 1e-12))
    t = teacher[0, 2].double()
    by_hand = -0.1 * t / (1e-12 * (t.pow(2).sum() + 1e-12)).sqrt()
    torch.testing.assert_close(ours_in.grad[0, 2].double(), by_hand, rtol=1e-5, atol=0)


def test_cosine_hidden_state_module_with_mask_matches_cosine_embedding_loss():
    generator = torch.Generator().manual_seed(8)
    student = torch.randn(3, 4, 16, generator=generator)
    teacher = torch.randn(3, 4, 16, generator=generator)
    student[1, 1] = 0.0
    mask = torch.rand(3, 4, generator=generator) > 0.3
    mask[1, 1] = True
    ref, ref_grad = cosine_embedding_reference(student, teacher, mask)
    ours_in = student.clone().requires_grad_()
    ours = fastkd.HiddenStateLoss(16, 16, metric="cosine")(ours_in, teacher, mask)
    ours.backward()
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours_in.grad, ref_grad, rtol=1e-6, atol=1e-7)


def test_cosine_hidden_state_bf16_is_computed_in_float32():
    generator = torch.Generator().manual_seed(9)
    student = torch.randn(6, 32, generator=generator).bfloat16()
    teacher = torch.randn(6, 32, generator=generator).bfloat16()
    student[0] = 0.0
    loss = fastkd.hidden_state_loss(student, teacher)
    ref, _ = cosine_embedding_reference(student.float(), teacher.float())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-7)

"""Multi-teacher, DKD, feature-, attention- and relation-based losses against independent
computations written here (loops and textbook formulas in float64)."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from oracle import divergence_rows, oracle_loss, random_logits, random_target

import fastkd


def _teachers(k, n, v, seed=10):
    return [random_logits(n, v, seed=seed + i) for i in range(k)]


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("with_target", [True, False])
def test_multi_teacher_sum_equals_weighted_oracle(divergence, with_target):
    n, v, weights = 6, 37, (0.5, 0.3, 0.2)
    s = random_logits(n, v, seed=1).requires_grad_(True)
    teachers = _teachers(3, n, v)
    y = random_target(n, vocab=v, ignore_fraction=0.3, seed=2) if with_target else None
    kw = dict(temperature=2.0, alpha=0.4, divergence=divergence)
    loss = fastkd.multi_teacher_distillation_loss(s, teachers, y, weights=weights, **kw)
    (grad,) = torch.autograd.grad(loss, s)

    s64 = s.detach().double().requires_grad_(True)
    expected = sum(w * oracle_loss(s64, t.double(), y, **kw) for w, t in zip(weights, teachers))
    (expected_grad,) = torch.autograd.grad(expected, s64)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-5, atol=1e-6)


def test_multi_teacher_mixture_matches_kl_to_mixture_and_identity():
    n, v, T, weights = 5, 29, 3.0, (0.25, 0.75)
    s = random_logits(n, v, seed=3)
    teachers = _teachers(2, n, v, seed=20)
    mixture = fastkd.multi_teacher_distillation_loss(s, teachers, weights=weights, mode="mixture",
                                                     temperature=T, scale_by_t2=False)
    log_ps = F.log_softmax(s.double() / T, -1)
    p_mix = sum(w * F.softmax(t.double() / T, -1) for w, t in zip(weights, teachers))
    expected = (p_mix * (p_mix.log() - log_ps)).sum(-1).mean()
    torch.testing.assert_close(mixture.double(), expected, rtol=1e-5, atol=1e-7)

    # sum_i w_i KL(p_i || p_s) = KL(p_mix || p_s) + sum_i w_i KL(p_i || p_mix)
    summed = fastkd.multi_teacher_distillation_loss(s, teachers, weights=weights, mode="sum",
                                                    temperature=T, scale_by_t2=False)
    spread = sum(w * (F.softmax(t.double() / T, -1) * (F.log_softmax(t.double() / T, -1)
                                                        - p_mix.log())).sum(-1)
                 for w, t in zip(weights, teachers)).mean()
    torch.testing.assert_close(summed.double(), expected + spread, rtol=1e-5, atol=1e-7)


def test_multi_teacher_rejects_bad_weights_and_grad_teachers():
    s, teachers = random_logits(2, 5), _teachers(2, 2, 5)
    with pytest.raises(ValueError, match="weights"):
        fastkd.multi_teacher_distillation_loss(s, teachers, weights=(0.5, 0.6))
    with pytest.raises(ValueError, match="weights"):
        fastkd.multi_teacher_distillation_loss(s, teachers, weights=(1.0,))
    with pytest.raises(ValueError, match="mode"):
        fastkd.multi_teacher_distillation_loss(s, teachers, mode="max")
    with pytest.raises(ValueError, match=r"teacher_logits\[1\]"):
        fastkd.multi_teacher_distillation_loss(s, [teachers[0], teachers[1].requires_grad_()])
    with pytest.raises(TypeError, match="teacher_logits"):
        fastkd.multi_teacher_distillation_loss(s, teachers[0])


def _dkd_by_probabilities(s, t, y, T):
    """TCKD, NCKD and p_t[y] per row from explicit probabilities (float64)."""
    ps, pt = F.softmax(s.double() / T, -1), F.softmax(t.double() / T, -1)
    rows = []
    for i in range(s.shape[0]):
        yi = int(y[i])
        b_s = torch.stack([ps[i, yi], 1 - ps[i, yi]])
        b_t = torch.stack([pt[i, yi], 1 - pt[i, yi]])
        tckd = (b_t * (b_t / b_s).log()).sum()
        keep = torch.arange(s.shape[1]) != yi
        hs, ht = ps[i, keep] / ps[i, keep].sum(), pt[i, keep] / pt[i, keep].sum()
        nckd = (ht * (ht / hs).log()).sum()
        rows.append((tckd, nckd, pt[i, yi]))
    return rows


def test_dkd_identity_and_value():
    n, v, T = 7, 11, 4.0
    s, t = random_logits(n, v, seed=5), random_logits(n, v, seed=6)
    y = random_target(n, vocab=v, seed=7)
    parts = _dkd_by_probabilities(s, t, y, T)
    kl = divergence_rows(s.double(), t.double(), T, "kl", 0.5)
    for i, (tckd, nckd, pt_y) in enumerate(parts):
        torch.testing.assert_close(kl[i], tckd + (1 - pt_y) * nckd, rtol=1e-10, atol=1e-12)
    loss = fastkd.decoupled_kd_loss(s, t, y, temperature=T, alpha=1.0, beta=8.0,
                                    reduction="none")
    expected = torch.stack([T * T * (tckd + 8.0 * nckd) for tckd, nckd, _ in parts])
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)


def test_dkd_gradient_and_ignored_rows():
    n, v = 5, 9
    s = random_logits(n, v, dtype=torch.float64, seed=8).requires_grad_(True)
    t = random_logits(n, v, dtype=torch.float64, seed=9)
    y = random_target(n, vocab=v, seed=10)
    y[2] = -100
    torch.autograd.gradcheck(lambda z: fastkd.decoupled_kd_loss(z, t, y, temperature=2.0), (s,))
    rows = fastkd.decoupled_kd_loss(s, t, y, reduction="none")
    assert rows[2] == 0
    with pytest.raises(ValueError, match="V=1"):
        fastkd.decoupled_kd_loss(s[:, :1], t[:, :1], torch.zeros(n, dtype=torch.long))


def test_hint_and_hidden_state_losses():
    torch.manual_seed(0)
    hint = fastkd.HintLoss(4, 6, kind="conv")
    fs, ft = torch.randn(2, 4, 5, 5), torch.randn(2, 6, 5, 5)
    expected = ((hint.regressor(fs) - ft) ** 2).mean()
    torch.testing.assert_close(hint(fs, ft), expected)
    hint(fs, ft).backward()
    assert hint.regressor.weight.grad is not None and hint.regressor.weight.grad.abs().sum() > 0

    hs, ht = torch.randn(3, 4, 8), torch.randn(3, 4, 12)
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    crit = fastkd.HiddenStateLoss(8, 12, metric="cosine")
    proj = crit.projection(hs)
    cos = [1 - F.cosine_similarity(proj[b, i], ht[b, i], dim=0)
           for b, i in itertools.product(range(3), range(4)) if mask[b, i]]
    torch.testing.assert_close(crit(hs, ht, mask), torch.stack(cos).mean())
    mse = fastkd.hidden_state_loss(hs, hs + 1.0, metric="mse")
    torch.testing.assert_close(mse, torch.tensor(1.0))
    with pytest.raises(ValueError, match="metric"):
        fastkd.HiddenStateLoss(8, 12, metric="l1")


def test_attention_transfer_by_hand():
    fs, ft = torch.randn(3, 4, 5, 6, dtype=torch.float64), torch.randn(3, 7, 5, 6,
                                                                      dtype=torch.float64)
    per_sample = []
    for b in range(3):
        qs = (fs[b] ** 2).sum(0).flatten()
        qt = (ft[b] ** 2).sum(0).flatten()
        per_sample.append((qs / qs.norm() - qt / qt.norm()).norm())
    expected = torch.stack(per_sample).mean()
    torch.testing.assert_close(fastkd.attention_transfer_loss(fs, ft), expected)
    loss_two = fastkd.AttentionTransferLoss()([fs, fs], [ft, ft])
    torch.testing.assert_close(loss_two, 2 * torch.stack(per_sample).mean())
    with pytest.raises(ValueError, match="spatial"):
        fastkd.attention_transfer_loss(fs, ft[:, :, :4])


def test_attention_map_kl_with_masks():
    b, h, lq, lk = 2, 3, 4, 5
    key_mask = torch.ones(b, lk, dtype=torch.bool)
    key_mask[0, -2:] = False
    scores_s = torch.randn(b, h, lq, lk, dtype=torch.float64)
    scores_t = torch.randn(b, h, lq, lk, dtype=torch.float64)
    neg = torch.where(key_mask, 0.0, float("-inf"))[:, None, None, :]
    ps, pt = F.softmax(scores_s + neg, -1), F.softmax(scores_t + neg, -1)
    query_mask = torch.tensor([[1, 1, 1, 0], [1, 0, 1, 1]], dtype=torch.bool)
    total, count = 0.0, 0
    for bi, hi, qi in itertools.product(range(b), range(h), range(lq)):
        if not query_mask[bi, qi]:
            continue
        keep = key_mask[bi]
        p, q = pt[bi, hi, qi, keep], ps[bi, hi, qi, keep]
        total, count = total + (p * (p / q).log()).sum(), count + 1
    loss = fastkd.attention_map_loss(ps, pt, mask=query_mask)
    torch.testing.assert_close(loss, total / count)
    assert torch.isfinite(loss)


def test_rkd_by_loops():
    torch.manual_seed(1)
    es, et = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)

    def distances(e):
        d = torch.tensor([[float((e[i] - e[j]).norm()) for j in range(5)] for i in range(5)],
                         dtype=torch.float64)
        return d / d[~torch.eye(5, dtype=torch.bool)].mean()

    def angles(e):
        out = torch.zeros(5, 5, 5, dtype=torch.float64)
        for i, j, k in itertools.product(range(5), repeat=3):
            u, w = e[i] - e[j], e[k] - e[j]
            if u.norm() > 0 and w.norm() > 0:
                out[j, i, k] = (u / u.norm()) @ (w / w.norm())
        return out

    expected_d = F.smooth_l1_loss(distances(es), distances(et))
    expected_a = F.smooth_l1_loss(angles(es), angles(et))
    torch.testing.assert_close(fastkd.rkd_loss(es, et, angle_weight=0.0), 25 * expected_d)
    torch.testing.assert_close(fastkd.rkd_loss(es, et, distance_weight=0.0), 50 * expected_a)
    with pytest.raises(ValueError, match="B >= 2"):
        fastkd.rkd_loss(es[:1], et[:1])


def test_similarity_preserving_by_hand():
    fs, ft = torch.randn(4, 3, 2, 2, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    gs = fs.reshape(4, -1) @ fs.reshape(4, -1).t()
    gt = ft @ ft.t()
    gs = gs / gs.norm(dim=1, keepdim=True)
    gt = gt / gt.norm(dim=1, keepdim=True)
    torch.testing.assert_close(fastkd.similarity_preserving_loss(fs, ft),
                               ((gs - gt) ** 2).sum() / 16)
    assert math.isclose(float(fastkd.similarity_preserving_loss(fs, fs)), 0.0, abs_tol=1e-12)

"""Decoupled knowledge distillation (DKD, Zhao et al. 2022), pure PyTorch.

With p = softmax(z / T), the target class y splits KL(p_t || p_s) into

    TCKD = KL(b_t || b_s),  b = [p_y, 1 - p_y]                      (target vs rest)
    NCKD = KL(p^_t || p^_s), p^_j = p_j / (1 - p_y) for j != y      (among non-targets)
    KL(p_t || p_s) = TCKD + (1 - p_t,y) * NCKD

and DKD = T^2 * (alpha * TCKD + beta * NCKD), which lets NCKD be weighted independently of the
teacher's confidence. Everything is in log space: log(1 - p_y) is the log-sum-exp over the
non-target classes, never `log(1 - exp(...))`, so confident teachers stay finite.
"""

from __future__ import annotations

import torch


def _binary_kl(log_a1, log_a0, log_b1, log_b0):
    """KL([a1, a0] || [b1, b0]) from log-probabilities (0 * log 0 = 0)."""
    def term(log_a, log_b):
        a = log_a.exp()
        return torch.where(a > 0, a * (log_a - log_b), 0.0)

    return term(log_a1, log_b1) + term(log_a0, log_b0)


def dkd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
              target: torch.Tensor, temperature: float):
    """Per-row (TCKD, NCKD, teacher target probability) for (N, V) logits and (N,) labels,
    computed in float32 (float64 for float64 inputs)."""
    compute = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    a_s = student_logits.to(compute) / temperature
    a_t = teacher_logits.to(compute) / temperature
    y = target.unsqueeze(-1)
    is_target = torch.zeros_like(a_s, dtype=torch.bool).scatter_(-1, y, True)

    def split(a):
        lse = torch.logsumexp(a, -1, keepdim=True)
        log_p_y = a.gather(-1, y) - lse
        rest = a.masked_fill(is_target, float("-inf"))
        log_rest = torch.logsumexp(rest, -1, keepdim=True) - lse        # log(1 - p_y)
        log_p_hat = torch.log_softmax(rest, -1)                          # -inf at y
        return log_p_y[:, 0], log_rest[:, 0], log_p_hat

    ly_s, lr_s, lh_s = split(a_s)
    ly_t, lr_t, lh_t = split(a_t)
    tckd = _binary_kl(ly_t, lr_t, ly_s, lr_s)
    p_hat_t = lh_t.exp()
    live = p_hat_t > 0
    nckd = torch.where(live, p_hat_t * (torch.where(live, lh_t, 0.0)
                                         - torch.where(live, lh_s, 0.0)), 0.0).sum(-1)
    return tckd, nckd, ly_t.exp()


def decoupled_kd_rows(student_logits, teacher_logits, target, *, temperature, alpha, beta,
                      ignore_index):
    """Per-row DKD loss T^2 * (alpha * TCKD + beta * NCKD), 0 for ignored rows. (N, V), (N,)."""
    valid = target != ignore_index
    safe_target = torch.where(valid, target, 0)
    tckd, nckd, _ = dkd_terms(student_logits, teacher_logits, safe_target, temperature)
    rows = temperature**2 * (alpha * tckd + beta * nckd)
    return torch.where(valid, rows, 0.0)

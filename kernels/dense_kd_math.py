"""Element-wise and per-row maths of the dense distillation kernels (`dense_kd.py`).

Every helper works on 2-D tiles `[rows, columns]` with per-row values as `[rows, 1]`, so the
single-load kernel (several whole rows) and the multi-pass kernel (one `[1, BLOCK_V]` chunk)
share them. The formulas and their derivation are in `dense_kd.py`'s header.
"""

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
TVD = tl.constexpr(3)


@triton.jit
def tanh_and_slope(y):
    """tanh(y) and 1 - tanh(y)^2, accurate for every y; exp2 only (no libdevice, so the
    interpreter runs it). The slope is 4e^{-2|y|}/(1+e^{-2|y|})^2: no 1 - th^2 cancellation."""
    a = tl.abs(y)
    t = tl.exp2(a * (-2.0 * LOG2E))
    big = (1.0 - t) / (1.0 + t)
    y2 = y * y
    # Odd Taylor series where 1 - t would cancel; error < 2e-9 relative for |y| < 1/8.
    small = a * (1.0 + y2 * (-0.3333333333333333 + y2 * (0.13333333333333333
                                                          - y2 * 0.05396825396825397)))
    th = tl.where(a < 0.125, small, big)
    th = tl.where(y < 0, -th, th)
    slope = 4.0 * t / ((1.0 + t) * (1.0 + t))
    return th, slope


@triton.jit
def logits(x, mask, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw loaded values -> (z, slope): z = cap(x) in float32 (-inf in masked lanes)."""
    x = x.to(tl.float32)
    if HAS_SOFTCAP:
        th, slope = tanh_and_slope(x / softcap)
        z = tl.where(mask, softcap * th, float("-inf"))
    else:
        z = x
        slope = 1.0
    return z, slope


@triton.jit
def load_logits(ptr, offs, mask, softcap, HAS_SOFTCAP: tl.constexpr):
    """(cap(x), cap'(x)) of the masked elements at ptr + offs; -inf elsewhere."""
    return logits(tl.load(ptr + offs, mask=mask, other=float("-inf")), mask, softcap,
                   HAS_SOFTCAP)


@triton.jit
def target_logit(s_ptr, offset, y, V, softcap, HAS_SOFTCAP: tl.constexpr):
    """cap(s[y]); NaN for a label outside [0, V) (the API rejects those before the launch)."""
    in_range = (y >= 0) & (y < V)
    x = tl.load(s_ptr + offset, mask=in_range, other=0.0).to(tl.float32)
    if HAS_SOFTCAP:
        th, _ = tanh_and_slope(x / softcap)
        x = softcap * th
    return tl.where(in_range, x, float("nan"))


@triton.jit
def online_max(m_old, z):
    """Running max over one more chunk, and the same with -inf replaced by 0 (to subtract)."""
    m_new = tl.maximum(m_old, tl.max(z, axis=1, keep_dims=True))
    return m_new, tl.where(m_new == float("-inf"), 0.0, m_new)


@triton.jit
def rescaled(m_old, m_safe, z, scale):
    """(2^((m_old - m_safe) k), 2^((z - m_safe) k)): old-sum rescale and this chunk's terms."""
    return tl.exp2((m_old - m_safe) * scale), tl.exp2((z - m_safe) * scale)


@triton.jit
def cross(e_ref, z_ref, z_other):
    """e_ref (z_ref - z_other), 0 where e_ref == 0 (no 0 * inf)."""
    return tl.where(e_ref > 0, e_ref * (z_ref - z_other), 0.0)


@triton.jit
def value_at_max(z, m, x):
    """x where z attains its max m: the reference subtracted from a kl cross sum so that its
    dominant term is exactly 0 (0 if that value is not finite: the kl is then infinite)."""
    v = tl.max(tl.where(z == m, x, float("-inf")), axis=1, keep_dims=True)
    return tl.where((v > float("-inf")) & (v < float("inf")), v, 0.0)


@triton.jit
def jsd_log_ratios(r, beta):
    """(log2(p_s/m~), log2(p_t/m~)) from r = log2(p_s/p_t), m~ = b p_t + (1-b) p_s."""
    x = tl.exp2(-tl.abs(r))
    positive = r >= 0
    lg = -tl.log2(tl.where(positive, beta * x + (1.0 - beta), beta + (1.0 - beta) * x))
    return tl.where(positive, lg, lg + r), tl.where(positive, lg - r, lg)


@triton.jit
def jsd_references(r_at_max_s, r_at_max_t, beta):
    """(rho_s, rho_t): log2(p_s/m~) at the student's max and log2(p_t/m~) at the teacher's,
    from r = log2(p_s/p_t) at those columns. The jsd sums and gradients use log-ratios minus
    these, so the dominant term of a nearly one-hot side is exactly 0 (see dense_kd.py)."""
    rho_s, _ = jsd_log_ratios(r_at_max_s, beta)
    _, rho_t = jsd_log_ratios(r_at_max_t, beta)
    return rho_s, rho_t


@triton.jit
def pair_terms(p_s, p_t, r, beta, rho_s, rho_t, DIV: tl.constexpr):
    """Per-element summands of the jsd / tvd row sums.
    jsd: (p_t (log2(p_t/m~) - rho_t), p_s (log2(p_s/m~) - rho_s), 0);
    tvd: (|p_s - p_t|, p_s g, p_t g)."""
    if DIV == JSD:
        ls, lt = jsd_log_ratios(r, beta)
        a = tl.where(p_t > 0, p_t * (lt - rho_t), 0.0)
        b = tl.where(p_s > 0, p_s * (ls - rho_s), 0.0)
        c = tl.zeros_like(a)
    else:
        g = tl.where(r > 0, 0.5, tl.where(r < 0, -0.5, 0.0))
        a = tl.abs(p_s - p_t)
        b = p_s * g
        c = p_t * g
    return a, b, c


@triton.jit
def pair_finish(sum_a, sum_b, sum_c, beta, rho_s, rho_t, DIV: tl.constexpr):
    """Row sums -> (D, r1, r2): jsd (D, K_t - ln2 rho_t, K_s - ln2 rho_s); tvd (D, G_s, G_t)."""
    if DIV == JSD:
        k_t = LN2 * sum_a
        k_s = LN2 * sum_b
        d = beta * (k_t + LN2 * rho_t) + (1.0 - beta) * (k_s + LN2 * rho_s)
        return d, k_t, k_s
    else:
        return 0.5 * sum_a, sum_b, sum_c


@triton.jit
def div_grads(p_s, p_t, dz, scale, c, r1, r2, beta, rho_s, rho_t, DIV: tl.constexpr):
    """(dD/da_s, dD/da_t) per element from dz = z_s - z_t and the row terms r1, r2.

    kl: x = z_t - z_s, r2 = x at the teacher's max, r1 = E_{p_t}[x - r2], so that
    ln(p_t/p_s) - D = ln2 k ((x - r2) - r1): C cancels exactly rather than in rounding, and
    the dominant term of r1 is exactly 0 (accuracy where p_t is nearly one-hot).
    reverse_kl: the same with x = z_s - z_t under p_s.
    jsd: r1, r2 and the log-ratios are all relative to rho_t, rho_s (jsd_references)."""
    if DIV == KL:
        g_s = p_s - p_t
        g_t = tl.where(p_t > 0, p_t * ((LN2 * scale) * ((-dz - r2) - r1)), 0.0)
    elif DIV == REVERSE_KL:
        g_s = tl.where(p_s > 0, p_s * ((LN2 * scale) * ((dz - r2) - r1)), 0.0)
        g_t = p_t - p_s
    else:
        r = dz * scale - c
        if DIV == JSD:
            ls, lt = jsd_log_ratios(r, beta)
            g_s = (1.0 - beta) * tl.where(p_s > 0, p_s * (LN2 * (ls - rho_s) - r2), 0.0)
            g_t = beta * tl.where(p_t > 0, p_t * (LN2 * (lt - rho_t) - r1), 0.0)
        else:
            g = tl.where(r > 0, 0.5, tl.where(r < 0, -0.5, 0.0))
            g_s = p_s * (g - r1)
            g_t = p_t * (r2 - g)
    return g_s, g_t


@triton.jit
def ce_row(m, z_y, z_sum, sum_1, smoothing, V, HAS_SMOOTH: tl.constexpr):
    """CE = (1-e)(m - z_y) + e (m - mean z) + ln S_1 (lse = m + ln S_1)."""
    ce = (1.0 - smoothing) * (m - z_y) + LN2 * tl.log2(sum_1)
    if HAS_SMOOTH:
        ce += smoothing * (m - z_sum / V)
    return ce


@triton.jit
def student_grad(q, is_y, g_s, slope_s, ce_weight, grad_div, smoothing, V,
                  HAS_CE: tl.constexpr, HAS_SMOOTH: tl.constexpr, HAS_DIV: tl.constexpr,
                  HAS_SOFTCAP: tl.constexpr):
    """cap'(s) (ce_weight (q - (1-e) onehot - e/V) + div_weight/T dD/da_s)."""
    ds = tl.zeros_like(g_s)
    if HAS_CE:
        ds = ce_weight * (q - tl.where(is_y, 1.0 - smoothing, 0.0))
        if HAS_SMOOTH:
            ds -= ce_weight * smoothing / V
    if HAS_DIV:
        ds += grad_div * g_s
    if HAS_SOFTCAP:
        ds *= slope_s
    return ds

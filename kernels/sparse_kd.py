"""Fused top-k (offline) teacher distillation kernel (Triton): one program per student row.

Maths (one row; z = cap(s) the student logits, length V; k teacher entries (lp_j, idx_j); T)
-------------------------------------------------------------------------------------------
    scale = log2(e) / T (T = 1 when only CE is evaluated), m = max z,
    e_v = 2^((z_v - m) scale) = exp(a_v - max a),  Z = sum_v e_v,  a = z / T.
    Student categories: log q_j = (z_idx_j - m) / T - ln Z, log q_tail = ln(tail / Z), where
      tail = Z - C, C = sum_j e_idx_j, when C <= Z / 2; otherwise that difference would cancel
      and the tail is recomputed exactly: one more pass sums the same e_v (bit-identical
      expressions) in float64 and subtracts the float64 sum of the gathered e_idx_j.
      k = V: the tail is 0 on both sides.
    Teacher: lt = teacher_scale * lp (re-tempering), renormalize: log p_j = lt_j - lse(lt),
      p_tail = 0; bucket: log p_j = lt_j, p_tail = max(0, -expm1(lse(lt))) (0 when k = V).
    D over the k + 1 categories and g_i = dD / dlog q_i as in fastkd.reference.sparse
      (kl, reverse_kl, generalised reverse_kl for renormalize, jsd, tvd), G = sum_i g_i.
    Gradient: dD/da_v = g_tail e_v / tail - G e_v / Z on uncovered columns,
      g_j - G e_idx_j / Z on covered ones; CE at T = 1 with label smoothing e (PyTorch):
      dCE/dz = softmax(z) - (1 - e) onehot(y) - e / V;
      ds = cap'(s) (ce_weight dCE/dz + div_weight / T dD/da).
    The gradient pass writes every column with the uncovered formula, then (after a block
    barrier) the k covered columns with their own value: one program owns its row, and every
    value it needs at single columns (label, top-k) is loaded before the first store, so the
    gradient may overwrite the student (in place).

Passes over the row (b = bytes per element): statistics (online max / sum-exp, V b), the exact
tail only for rows whose top-k holds more than half of the student mass (V b), the gradient
(read V b, write V b). Floor: 2 N V b plus the top-k. Ignored rows (y == ignore_index) read
nothing and write zeros.
"""

import triton
import triton.language as tl

from .dense_kd_math import LN2, LOG2E, tanh_and_slope

KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)


@triton.jit
def _capped(x, mask, softcap, HAS_SOFTCAP: tl.constexpr):
    """Raw values -> (cap(x) in float32 with -inf in masked lanes, cap'(x))."""
    x = x.to(tl.float32)
    if HAS_SOFTCAP:
        th, slope = tanh_and_slope(x / softcap)
        return tl.where(mask, softcap * th, float("-inf")), slope
    else:
        return tl.where(mask, x, float("-inf")), tl.full(x.shape, 1.0, tl.float32)


@triton.jit
def _neg_expm1(x):
    """1 - exp(x) for x <= 0, without cancellation near 0."""
    small = -x * (1.0 + x * (0.5 + x * (0.16666666666666666 + x * 0.041666666666666664)))
    return tl.where(x > -0.01, small, 1.0 - tl.exp(x))


@triton.jit
def _xlogy(p, logp, logr):
    """p (log p - log r), 0 where p == 0."""
    return tl.where(p > 0, p * (logp - logr), 0.0)


@triton.jit
def _category_terms(logp, logq, beta, DIV: tl.constexpr, GENERALISED: tl.constexpr):
    """Per-category (summand of D, g = dD / dlog q). GENERALISED: the renormalised tail of
    reverse_kl (teacher mass 0), whose term is q itself."""
    p = tl.exp(logp)
    q = tl.exp(logq)
    if DIV == KL:
        d = _xlogy(p, logp, logq)
        g = -p
    elif DIV == REVERSE_KL:
        if GENERALISED:
            d = q
            g = q
        else:
            d = _xlogy(q, logq, logp)
            g = tl.where(q > 0, q * (logq - logp + 1.0), 0.0)
    elif DIV == JSD:
        x = logp + tl.log(beta)
        w = logq + tl.log(1.0 - beta)
        hi = tl.maximum(x, w)
        lo = tl.minimum(x, w)
        hi_safe = tl.where(hi == float("-inf"), 0.0, hi)
        logm = tl.where(hi == float("-inf"), float("-inf"),
                        hi + tl.log(1.0 + tl.exp(lo - hi_safe)))
        d = beta * _xlogy(p, logp, logm) + (1.0 - beta) * _xlogy(q, logq, logm)
        g = (1.0 - beta) * _xlogy(q, logq, logm)
    else:
        d = 0.5 * tl.abs(p - q)
        g = tl.where(q > p, 0.5 * q, tl.where(q < p, -0.5 * q, 0.0))
    return d, g


@triton.jit
def _exact_tail(s_ptr, base, V, m, scale, softcap, e_covered,
                HAS_SOFTCAP: tl.constexpr, BLOCK_V: tl.constexpr):
    """sum of e over the row minus the gathered e, both in float64 (see the header)."""
    col0 = tl.arange(0, BLOCK_V)
    acc = tl.zeros([BLOCK_V], tl.float64)
    for start in range(0, V, BLOCK_V):
        cols = start + col0
        mask = cols < V
        z, _ = _capped(tl.load(s_ptr + base + cols, mask=mask, other=0.0), mask, softcap,
                       HAS_SOFTCAP)
        acc += tl.exp2((z - m) * scale).to(tl.float64)
    return (tl.sum(acc, axis=0) - tl.sum(e_covered.to(tl.float64), axis=0)).to(tl.float32)


@triton.jit
def _ce_softmax_terms(e, z, m, CE_POW: tl.constexpr):
    """exp(z - m) (temperature 1) from e = exp((z - m) / T) where possible."""
    if CE_POW == 1:
        return e
    elif CE_POW == 2:
        return e * e
    else:
        return tl.exp2((z - m) * LOG2E)


@triton.jit
def _zero_row(gs_ptr, rows_ptr, terms_ptr, row, gbase, V,
              NEED_GS: tl.constexpr, NEED_TERMS: tl.constexpr, BLOCK_V: tl.constexpr):
    """An ignored row: loss, terms and gradient 0; neither the student nor the top-k read."""
    tl.store(rows_ptr + row, 0.0)
    if NEED_TERMS:
        tl.store(terms_ptr + 2 * row, 0.0)
        tl.store(terms_ptr + 2 * row + 1, 0.0)
    if NEED_GS:
        col0 = tl.arange(0, BLOCK_V)
        zero = tl.zeros([BLOCK_V], tl.float32).to(gs_ptr.dtype.element_ty)
        for start in range(0, V, BLOCK_V):
            cols = start + col0
            tl.store(gs_ptr + gbase + cols, zero, mask=cols < V)


@triton.jit
def _row(s_ptr, lp_ptr, idx_ptr, gs_ptr, rows_ptr, terms_ptr, row, y, V, K,
         s_stride, gs_stride, lp_stride, idx_stride,
         scale, grad_div, ce_weight, div_weight, beta, smoothing, softcap, teacher_scale,
         CE_VALUE: tl.constexpr, CE_GRAD: tl.constexpr, HAS_SMOOTH: tl.constexpr,
         DIV_VALUE: tl.constexpr, DIV_GRAD: tl.constexpr, DIV: tl.constexpr,
         CE_POW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, RENORM: tl.constexpr,
         NEED_GS: tl.constexpr, NEED_TERMS: tl.constexpr,
         BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    base = row * s_stride
    col0 = tl.arange(0, BLOCK_V)
    # Single-column reads first (in-place safety): the label and the k teacher columns.
    z_y = tl.zeros([], tl.float32)
    if CE_VALUE:
        y_ok = (y >= 0) & (y < V)
        z_y, _slope_y = _capped(tl.load(s_ptr + base + y, mask=y_ok, other=0.0), y_ok,
                                softcap, HAS_SOFTCAP)
        z_y = tl.where(y_ok, z_y, float("nan"))
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < K
    idx = tl.zeros([BLOCK_K], tl.int64)
    if DIV_VALUE:
        idx = tl.load(idx_ptr + row * idx_stride + kk, mask=k_ok, other=0).to(tl.int64)
    i_ok = k_ok & (idx >= 0) & (idx < V)  # out-of-range indices are never dereferenced
    z_i = tl.full([BLOCK_K], float("-inf"), tl.float32)
    slope_i = tl.full([BLOCK_K], 1.0, tl.float32)
    lt = tl.full([BLOCK_K], float("-inf"), tl.float32)
    if DIV_VALUE:
        z_i, slope_i = _capped(tl.load(s_ptr + base + idx, mask=i_ok, other=0.0), i_ok,
                               softcap, HAS_SOFTCAP)
        lt = tl.load(lp_ptr + row * lp_stride + kk, mask=k_ok, other=float("-inf"))
        lt = lt.to(tl.float32) * teacher_scale
    # Statistics: online max and sums of the T softmax, the T = 1 softmax, the logits.
    m = tl.full([], float("-inf"), tl.float32)
    acc_s = tl.zeros([BLOCK_V], tl.float32)
    acc_1 = tl.zeros([BLOCK_V], tl.float32)
    acc_z = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + col0
        mask = cols < V
        z, _slope = _capped(tl.load(s_ptr + base + cols, mask=mask, other=0.0), mask, softcap,
                            HAS_SOFTCAP)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2((m - m_safe) * scale)
        e = tl.exp2((z - m_safe) * scale)
        acc_s = acc_s * alpha + e
        if CE_VALUE:
            if CE_POW == 2:
                acc_1 = acc_1 * (alpha * alpha) + e * e
            if CE_POW == 0:
                acc_1 = acc_1 * tl.exp2((m - m_safe) * LOG2E) + tl.exp2((z - m_safe) * LOG2E)
            if HAS_SMOOTH:
                acc_z += tl.where(mask, z, 0.0)
        m = m_new
    z_sum = tl.sum(acc_s, axis=0)
    loss = tl.zeros([], tl.float32)
    d = tl.zeros([], tl.float32)
    g_sum = tl.zeros([], tl.float32)
    tail = tl.zeros([], tl.float32)
    g_tail = tl.zeros([], tl.float32)
    e_i = tl.where(i_ok, tl.exp2((z_i - m) * scale), 0.0)
    g = tl.zeros([BLOCK_K], tl.float32)
    if DIV_VALUE:
        covered = tl.sum(e_i, axis=0)
        tail = z_sum - covered
        if covered > 0.5 * z_sum:
            tail = _exact_tail(s_ptr, base, V, m, scale, softcap, e_i, HAS_SOFTCAP, BLOCK_V)
        tail = tl.where(K >= V, 0.0, tl.maximum(tail, 0.0))
        ln_z = LN2 * tl.log2(z_sum)
        logq = tl.where(i_ok, (z_i - m) * (scale * LN2) - ln_z, float("-inf"))
        logq_tail = tl.where(tail > 0, LN2 * tl.log2(tail / z_sum), float("-inf"))
        lt_max = tl.max(lt, axis=0)
        lt_safe = tl.where(lt_max == float("-inf"), 0.0, lt_max)
        lse = lt_safe + LN2 * tl.log2(tl.sum(tl.exp2((lt - lt_safe) * LOG2E), axis=0))
        if RENORM:
            logp = lt - lse
            logp_tail = tl.full([], float("-inf"), tl.float32)
        else:
            logp = lt
            p_tail = tl.maximum(_neg_expm1(lse), 0.0)
            logp_tail = tl.where((K >= V) | (p_tail <= 0), float("-inf"),
                                 LN2 * tl.log2(p_tail))
        logp = tl.where(k_ok, logp, float("-inf"))
        d_i, g = _category_terms(logp, logq, beta, DIV, False)
        d_t, g_tail = _category_terms(logp_tail, logq_tail, beta, DIV, RENORM)
        d = tl.sum(d_i, axis=0) + d_t
        g_sum = tl.sum(g, axis=0) + g_tail
        loss += div_weight * d
    ce = tl.zeros([], tl.float32)
    sum_1 = z_sum
    if CE_VALUE:
        if CE_POW != 1:
            sum_1 = tl.sum(acc_1, axis=0)
        ce = (1.0 - smoothing) * (m - z_y) + LN2 * tl.log2(sum_1)
        if HAS_SMOOTH:
            ce += smoothing * (m - tl.sum(acc_z, axis=0) / V)
        loss += ce_weight * ce
    tl.store(rows_ptr + row, loss)
    if NEED_TERMS:
        tl.store(terms_ptr + 2 * row, ce)
        tl.store(terms_ptr + 2 * row + 1, d)
    if NEED_GS:
        gbase = row * gs_stride
        inv_z = 1.0 / z_sum
        inv_1 = 1.0 / sum_1
        coef = grad_div * (tl.where(tail > 0, g_tail / tail, 0.0) - g_sum * inv_z)
        shift = -ce_weight * smoothing / V
        for start in range(0, V, BLOCK_V):
            cols = start + col0
            mask = cols < V
            z, slope = _capped(tl.load(s_ptr + base + cols, mask=mask, other=0.0), mask,
                               softcap, HAS_SOFTCAP)
            e = tl.exp2((z - m) * scale)
            ds = tl.zeros([BLOCK_V], tl.float32)
            if DIV_GRAD:
                ds += e * coef
            if CE_GRAD:
                q1 = _ce_softmax_terms(e, z, m, CE_POW) * inv_1
                ds += ce_weight * (q1 - tl.where(cols == y, 1.0 - smoothing, 0.0)) + shift
            if HAS_SOFTCAP:
                ds *= slope
            tl.store(gs_ptr + gbase + cols, ds.to(gs_ptr.dtype.element_ty), mask=mask)
        if DIV_VALUE:
            tl.debug_barrier()  # the covered columns' stores come after the sweep's
            ds_i = tl.zeros([BLOCK_K], tl.float32)
            if DIV_GRAD:
                ds_i += grad_div * (g - g_sum * (e_i * inv_z))
            if CE_GRAD:
                q1_i = _ce_softmax_terms(e_i, z_i, m, CE_POW) * inv_1
                ds_i += ce_weight * (q1_i - tl.where(idx == y, 1.0 - smoothing, 0.0)) + shift
            if HAS_SOFTCAP:
                ds_i *= slope_i
            tl.store(gs_ptr + gbase + idx, ds_i.to(gs_ptr.dtype.element_ty), mask=i_ok)


@triton.jit
def sparse_kd_kernel(
    s_ptr, lp_ptr, idx_ptr, y_ptr, gs_ptr, rows_ptr, terms_ptr, V, K,
    s_stride, gs_stride, lp_stride, idx_stride,
    scale, grad_div, ce_weight, div_weight, beta, smoothing, softcap, teacher_scale,
    ignore_index,
    HAS_TARGET: tl.constexpr, CE_VALUE: tl.constexpr, CE_GRAD: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, DIV_VALUE: tl.constexpr, DIV_GRAD: tl.constexpr,
    DIV: tl.constexpr, CE_POW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    RENORM: tl.constexpr, NEED_GS: tl.constexpr, NEED_TERMS: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One row per program (any V, k <= BLOCK_K); ignored rows only write zeros."""
    row = tl.program_id(0).to(tl.int64)
    if HAS_TARGET:
        y = tl.load(y_ptr + row)
        if y == ignore_index:
            _zero_row(gs_ptr, rows_ptr, terms_ptr, row, row * gs_stride, V, NEED_GS,
                      NEED_TERMS, BLOCK_V)
        else:
            _row(s_ptr, lp_ptr, idx_ptr, gs_ptr, rows_ptr, terms_ptr, row, y, V, K,
                 s_stride, gs_stride, lp_stride, idx_stride, scale, grad_div, ce_weight,
                 div_weight, beta, smoothing, softcap, teacher_scale, CE_VALUE, CE_GRAD,
                 HAS_SMOOTH, DIV_VALUE, DIV_GRAD, DIV, CE_POW, HAS_SOFTCAP, RENORM, NEED_GS,
                 NEED_TERMS, BLOCK_V, BLOCK_K)
    else:
        _row(s_ptr, lp_ptr, idx_ptr, gs_ptr, rows_ptr, terms_ptr, row, -1, V, K,
             s_stride, gs_stride, lp_stride, idx_stride, scale, grad_div, ce_weight,
             div_weight, beta, smoothing, softcap, teacher_scale, CE_VALUE, CE_GRAD,
             HAS_SMOOTH, DIV_VALUE, DIV_GRAD, DIV, CE_POW, HAS_SOFTCAP, RENORM, NEED_GS,
             NEED_TERMS, BLOCK_V, BLOCK_K)

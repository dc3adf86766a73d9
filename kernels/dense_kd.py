"""Fused dense distillation kernels (Triton): softmaxes, divergence, CE and gradient per row.

Maths (one row; s, t: student / teacher logits of length V; y: label; T: temperature)
----------------------------------------------------------------------------------
    z = cap(x) = c*tanh(x/c) (softcap c, else z = x),   cap'(x) = 1 - tanh(x/c)^2
    Base 2 with log2(e) folded into one scale k = log2(e)/T:
      m = max_j z_j,  S = sum_j 2^((z_j - m) k),  p_j = 2^((z_j - m) k) / S = softmax(z/T)_j,
      log2 p_j = (z_j - m) k - log2 S.
    Differences are formed before scaling (z - m, z_s - z_t), so a log-probability ratio keeps
    float32 precision relative to itself rather than to |z|/T (this matters for |z| ~ 1e4):
      r_j = log2(p_s,j / p_t,j) = (z_s,j - z_t,j) k - C,  C = (m_s - m_t) k + log2 S_s - log2 S_t.
    D and its gradients (a = z/T; natural logs):
      kl          x = z_t - z_s, x0 = x at the teacher's max, W = sum 2^((z_t - m_t) k) (x - x0)
                  D = sum p_t ln(p_t/p_s) = ln2 (k (W / S_t + x0) + C)       (one pass, online)
                  dD/da_s = p_s - p_t,  dD/da_t = p_t (ln(p_t/p_s) - D) = p_t ln2 k (x-x0-W/S_t)
                  (x0 zeroes W's dominant term and C cancels exactly: accurate when p_t is
                  nearly one-hot, where ln(p_t/p_s) - D is a small difference)
      reverse_kl  the same with s and t swapped (x = z_s - z_t, x0 at the student's max):
                  dD/da_s = p_s (ln(p_s/p_t) - D)    dD/da_t = p_t - p_s
      jsd         m~ = b p_t + (1-b) p_s,  K_t = KL(p_t||m~),  K_s = KL(p_s||m~),
                  D = b K_t + (1-b) K_s; the m~ terms of the chain rule cancel (sum dm~ = 0):
                  dD/da_s = (1-b) p_s (ln(p_s/m~) - K_s)    dD/da_t = b p_t (ln(p_t/m~) - K_t)
                  log2(p_s/m~) = -log2(b 2^-r + 1 - b) (r >= 0; the mirrored form for r < 0,
                  so 2^|r| never overflows).
                  With l_t = ln(p_t/m~) and rho_t = l_t at the teacher's max (rho_s, l_s alike),
                  K_t = rho_t + sum p_t (l_t - rho_t) and dD/da_t = b p_t ((l_t - rho_t) -
                  (K_t - rho_t)): near a one-hot teacher the dominant l_t - rho_t is exactly 0
                  where l_t - K_t would cancel to a few ulps of l_t.
      tvd         g = sign(r)/2,  D = sum |p_s - p_t| / 2,  G_s = sum p_s g,  G_t = sum p_t g,
                  dD/da_s = p_s (g - G_s)            dD/da_t = p_t (G_t - g)
                  (softmax Jacobian: d/da_i sum_j f(p_j) = p_i (f'_i - sum_j p_j f'_j))
    CE at T = 1 with label smoothing e (PyTorch's convention), q = softmax(z), lse = m + ln S_1:
      CE = (1-e)(lse - z_y) + e (lse - mean z),      dCE/dz = q - (1-e) onehot(y) - e/V
    row = ce_weight CE + div_weight D;  terms (optional, TERMS) = (CE, D) unweighted, from the
      same statistics: both are evaluated (EVAL_CE, EVAL_DIV) even at weight 0, while only
      weighted terms (HAS_CE, HAS_DIV) enter row and gradients (no 0 * inf); CE needs a target.
    ds  = cap'(s) (ce_weight dCE/dz + div_weight/T dD/da_s),   dt = cap'(t) div_weight/T dD/da_t
    Ignored rows (y == ignore_index): row 0, gradient rows exactly 0, the logits are not read.

Online statistics (multi-pass): one block max of z per chunk, per-lane sums
S <- S 2^((m_old - m_new) k) + 2^((z - m_new) k) reduced once at the end (W rescaled alike). A
max of -inf is replaced by 0 before subtracting: -inf columns give exact zeros, never inf - inf.
The T = 1 CE softmax has the same max (max z does not depend on T) and shares exponentials:
T = 1 reuses p_s, T = 2 squares 2^((z-m) k), other T take one more exp2 (CE_POW = 1, 2, 0).

Bytes moved (b_s, b_t = bytes per student / teacher element; floor: read s and t once, write
ds once, N V (2 b_s + b_t), plus N V b_t with dt; terms add 8 N bytes)
    single-load kernel (V <= the launcher's SINGLE_LOAD_MAX_V): row pair in registers, the
        floor: N V (2 b_s + b_t) (+ N V b_t with dt).
    multi-pass kernel (any V): pass 1 reads s, t for the statistics; jsd / tvd need the
        normalised p's: one more reduction pass over s, t; the last pass re-reads s, t and
        writes the gradients: kl / reverse_kl / CE 2 reads of each + ds, jsd / tvd 3 reads of
        each + ds (with b_s = b_t = b: 5 N V b and 7 N V b), less the L2 hits: each pass walks
        the row opposite to the previous one, so it starts on the chunks just read.
    Forward only: kl / reverse_kl N V (b_s + b_t), jsd / tvd twice that. div_weight == 0:
    without terms the teacher is not read; with terms it is read by the statistics passes
    (for D), not by the gradient pass.

Layout: every (N, V) operand has unit column stride and its own row stride (stride_s,
stride_t, stride_gs, stride_gt), so rows of a strided view (a slice of a larger buffer, a row
of logits[:, :-1], a transposed batch) are read and written where they are. Offsets are
int64 (row is int64 before row * stride).

Precision: each input is loaded in its own dtype (the student and teacher may differ:
fp32 / bf16 / fp16) and converted to float32; all arithmetic is float32; each gradient is
stored in its own buffer's dtype (the student's / teacher's), through the pointer's element
type. In-place backward (grad_student aliases student) is safe: a row is written only by the
program that owns it, in its last pass, each chunk after that chunk was read.
"""

import triton
import triton.language as tl

from .dense_kd_math import (
    JSD,
    KL,
    LN2,
    LOG2E,
    REVERSE_KL,
    ce_row,
    cross,
    div_grads,
    jsd_references,
    load_logits,
    logits,
    online_max,
    pair_finish,
    pair_terms,
    rescaled,
    student_grad,
    target_logit,
    value_at_max,
)


@triton.jit
def dense_kd_single_kernel(
    s_ptr, t_ptr, y_ptr, gs_ptr, gt_ptr, rows_ptr, terms_ptr,
    N, V,
    stride_s, stride_t, stride_gs, stride_gt,
    scale, grad_div, ce_weight, div_weight, beta, smoothing, softcap, ignore_index,
    HAS_TARGET: tl.constexpr, EVAL_CE: tl.constexpr, HAS_CE: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, EVAL_DIV: tl.constexpr, HAS_DIV: tl.constexpr,
    DIV: tl.constexpr, CE_POW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    NEED_GS: tl.constexpr, NEED_GT: tl.constexpr, TERMS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """BLOCK_N whole rows per program (BLOCK_V >= V): one load, everything in registers."""
    row = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]
    col = tl.arange(0, BLOCK_V)[None, :]
    in_rows = row < N
    col_ok = col < V
    if HAS_TARGET:
        y = tl.load(y_ptr + row, mask=in_rows, other=ignore_index)
        valid = in_rows & (y != ignore_index)
    else:
        y = tl.full([BLOCK_N, 1], -1, tl.int64)
        valid = in_rows
    mask = valid & col_ok
    # Ignored rows are not read; 0 keeps their (discarded) arithmetic finite.
    z_s, slope_s = load_logits(s_ptr, row * stride_s + col, mask, softcap, HAS_SOFTCAP)
    z_s = tl.where(valid, z_s, 0.0)
    m_s = tl.max(z_s, axis=1, keep_dims=True)
    e_s = tl.exp2((z_s - m_s) * scale)
    sum_s = tl.sum(e_s, axis=1, keep_dims=True)
    inv_s = 1.0 / sum_s
    p_s = e_s * inv_s
    loss = tl.zeros([BLOCK_N, 1], tl.float32)
    ce = tl.zeros([BLOCK_N, 1], tl.float32)  # the unweighted terms
    d = tl.zeros([BLOCK_N, 1], tl.float32)
    g_s = tl.zeros_like(p_s)
    g_t = tl.zeros_like(p_s)
    if EVAL_DIV:
        z_t, slope_t = load_logits(t_ptr, row * stride_t + col, mask, softcap, HAS_SOFTCAP)
        z_t = tl.where(valid, z_t, 0.0)
        m_t = tl.max(z_t, axis=1, keep_dims=True)
        e_t = tl.exp2((z_t - m_t) * scale)
        sum_t = tl.sum(e_t, axis=1, keep_dims=True)
        inv_t = 1.0 / sum_t
        p_t = e_t * inv_t
        c = (m_s - m_t) * scale + tl.log2(sum_s) - tl.log2(sum_t)
        dz = z_s - z_t
        rho_s = tl.zeros([BLOCK_N, 1], tl.float32)  # jsd only
        rho_t = tl.zeros([BLOCK_N, 1], tl.float32)
        if DIV == KL:
            r2 = value_at_max(z_t, m_t, -dz)
            r1 = tl.sum(cross(e_t, -dz, r2), axis=1, keep_dims=True) * inv_t
            d = LN2 * (scale * (r1 + r2) + c)
        elif DIV == REVERSE_KL:
            r2 = value_at_max(z_s, m_s, dz)
            r1 = tl.sum(cross(e_s, dz, r2), axis=1, keep_dims=True) * inv_s
            d = LN2 * (scale * (r1 + r2) - c)
        else:
            rho_s, rho_t = jsd_references(value_at_max(z_s, m_s, dz) * scale - c,
                                          value_at_max(z_t, m_t, dz) * scale - c, beta)
            a, b, cc = pair_terms(p_s, p_t, dz * scale - c, beta, rho_s, rho_t, DIV)
            d, r1, r2 = pair_finish(tl.sum(a, axis=1, keep_dims=True),
                                     tl.sum(b, axis=1, keep_dims=True),
                                     tl.sum(cc, axis=1, keep_dims=True), beta, rho_s, rho_t,
                                     DIV)
        if HAS_DIV:  # a weight of 0 never multiplies an infinite D (or its gradient)
            loss += div_weight * d
            if NEED_GS or NEED_GT:
                g_s, g_t = div_grads(p_s, p_t, dz, scale, c, r1, r2, beta, rho_s, rho_t, DIV)
                if HAS_SOFTCAP:
                    g_t = g_t * slope_t
    q = p_s
    is_y = col == y
    if EVAL_CE:
        if CE_POW == 0:
            e_1 = tl.exp2((z_s - m_s) * LOG2E)
            sum_1 = tl.sum(e_1, axis=1, keep_dims=True)
            q = e_1 / sum_1
        elif CE_POW == 2:
            e_1 = e_s * e_s
            sum_1 = tl.sum(e_1, axis=1, keep_dims=True)
            q = e_1 / sum_1
        else:
            sum_1 = sum_s
        z_y = tl.sum(tl.where(is_y, z_s, 0.0), axis=1, keep_dims=True)
        z_y = tl.where((y >= 0) & (y < V), z_y, float("nan"))
        z_sum = tl.sum(tl.where(col_ok, z_s, 0.0), axis=1, keep_dims=True)
        ce = ce_row(m_s, z_y, z_sum, sum_1, smoothing, V, HAS_SMOOTH)
        if HAS_CE:
            loss += ce_weight * ce
    tl.store(rows_ptr + row, tl.where(valid, loss, 0.0), mask=in_rows)
    if TERMS:
        tl.store(terms_ptr + 2 * row, tl.where(valid, ce, 0.0), mask=in_rows)
        tl.store(terms_ptr + 2 * row + 1, tl.where(valid, d, 0.0), mask=in_rows)
    out_mask = in_rows & col_ok
    if NEED_GS:
        ds = student_grad(q, is_y, g_s, slope_s, ce_weight, grad_div, smoothing, V,
                           HAS_CE, HAS_SMOOTH, HAS_DIV, HAS_SOFTCAP)
        ds = tl.where(valid, ds, 0.0)
        tl.store(gs_ptr + (row * stride_gs + col), ds.to(gs_ptr.dtype.element_ty),
                 mask=out_mask)
    if NEED_GT:
        dt = tl.where(valid, grad_div * g_t, 0.0)
        tl.store(gt_ptr + (row * stride_gt + col), dt.to(gt_ptr.dtype.element_ty),
                 mask=out_mask)


@triton.jit
def _chunk_cols(i, n_chunks, col0, BLOCK_V: tl.constexpr, REVERSE: tl.constexpr):
    """Columns of the i-th chunk visited (last chunk first when REVERSE)."""
    if REVERSE:
        return (n_chunks - 1 - i) * BLOCK_V + col0
    else:
        return i * BLOCK_V + col0


@triton.jit
def _prefetch(ptr, base, i, n_chunks, col0, V, BLOCK_V: tl.constexpr, REVERSE: tl.constexpr):
    """Raw values of chunk i, issued one iteration ahead of their use so a chunk's load is in
    flight while the previous one is computed (i == n_chunks falls outside [0, V): no load)."""
    cols = _chunk_cols(i, n_chunks, col0, BLOCK_V, REVERSE)
    return tl.load(ptr + base + cols, mask=(cols >= 0) & (cols < V), other=float("-inf"))


@triton.jit
def _zero_row(gs_ptr, gt_ptr, rows_ptr, terms_ptr, row, base_gs, base_gt, V,
              NEED_GS: tl.constexpr, NEED_GT: tl.constexpr, TERMS: tl.constexpr,
              BLOCK_V: tl.constexpr):
    """An ignored row: loss 0, terms 0, gradient rows 0, logits not read."""
    tl.store(rows_ptr + row, 0.0)
    if TERMS:
        tl.store(terms_ptr + 2 * row + tl.arange(0, 2), tl.zeros([2], tl.float32))
    col0 = tl.arange(0, BLOCK_V)
    zero = tl.zeros([BLOCK_V], tl.float32)
    if NEED_GS or NEED_GT:
        for start in range(0, V, BLOCK_V):
            cols = start + col0
            if NEED_GS:
                tl.store(gs_ptr + base_gs + cols, zero.to(gs_ptr.dtype.element_ty), mask=cols < V)
            if NEED_GT:
                tl.store(gt_ptr + base_gt + cols, zero.to(gt_ptr.dtype.element_ty), mask=cols < V)


@triton.jit
def _multipass_row(
    s_ptr, t_ptr, gs_ptr, gt_ptr, rows_ptr, terms_ptr, row, base_s, base_t, base_gs, base_gt,
    y, V, scale, grad_div, ce_weight, div_weight, beta, smoothing, softcap,
    EVAL_CE: tl.constexpr, HAS_CE: tl.constexpr, HAS_SMOOTH: tl.constexpr,
    EVAL_DIV: tl.constexpr, HAS_DIV: tl.constexpr, DIV: tl.constexpr, CE_POW: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, NEED_GS: tl.constexpr, NEED_GT: tl.constexpr,
    TERMS: tl.constexpr, PAIR_PASS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One valid row streamed in BLOCK_V chunks: statistics, [pair sums], gradients."""
    col0 = tl.arange(0, BLOCK_V)[None, :]
    n_chunks = tl.cdiv(V, BLOCK_V)
    zero_v = tl.zeros([1, BLOCK_V], tl.float32)
    m_s = tl.full([1, 1], float("-inf"), tl.float32)
    m_t = tl.full([1, 1], float("-inf"), tl.float32)
    acc_s = zero_v
    acc_t = zero_v
    acc_1 = zero_v
    acc_w = zero_v
    acc_z = zero_v
    ref = tl.zeros([1, 1], tl.float32)  # kl / reverse_kl: reference of the cross sum acc_w
    dz_at_max_s = tl.zeros([1, 1], tl.float32)  # jsd: z_s - z_t at the student's / teacher's max
    dz_at_max_t = tl.zeros([1, 1], tl.float32)
    if EVAL_CE:  # read before any gradient store: safe when grad_student aliases student
        z_y = target_logit(s_ptr, base_s + y, y, V, softcap, HAS_SOFTCAP)
    # Pass 1 (forward): online max / sum-exp of every softmax and the kl cross term.
    next_s = _prefetch(s_ptr, base_s, 0, n_chunks, col0, V, BLOCK_V, False)
    if EVAL_DIV:
        next_t = _prefetch(t_ptr, base_t, 0, n_chunks, col0, V, BLOCK_V, False)
    for i in range(0, n_chunks):
        mask = i * BLOCK_V + col0 < V
        z_s, _ = logits(next_s, mask, softcap, HAS_SOFTCAP)
        next_s = _prefetch(s_ptr, base_s, i + 1, n_chunks, col0, V, BLOCK_V, False)
        m_s_new, m_safe = online_max(m_s, z_s)
        alpha_s, e_s = rescaled(m_s, m_safe, z_s, scale)
        if EVAL_CE:
            if CE_POW == 2:
                acc_1 = acc_1 * (alpha_s * alpha_s) + e_s * e_s
            if CE_POW == 0:
                alpha_1, e_1 = rescaled(m_s, m_safe, z_s, LOG2E)
                acc_1 = acc_1 * alpha_1 + e_1
            if HAS_SMOOTH:
                acc_z += tl.where(mask, z_s, 0.0)
        if EVAL_DIV:
            z_t, _ = logits(next_t, mask, softcap, HAS_SOFTCAP)
            next_t = _prefetch(t_ptr, base_t, i + 1, n_chunks, col0, V, BLOCK_V, False)
            m_t_new, m_safe_t = online_max(m_t, z_t)
            alpha_t, e_t = rescaled(m_t, m_safe_t, z_t, scale)
            # Cross sum relative to the value at the running max; when the max moves, the old
            # sum is re-referenced: sum e (x - new) = sum e (x - old) + (old - new) sum e.
            if DIV == KL:
                x = z_t - z_s
                ref_new = tl.where(m_t_new > m_t, value_at_max(z_t, m_t_new, x), ref)
                acc_w = alpha_t * (acc_w + acc_t * (ref - ref_new)) + cross(e_t, x, ref_new)
                ref = ref_new
            if DIV == REVERSE_KL:
                x = z_s - z_t
                ref_new = tl.where(m_s_new > m_s, value_at_max(z_s, m_s_new, x), ref)
                acc_w = alpha_s * (acc_w + acc_s * (ref - ref_new)) + cross(e_s, x, ref_new)
                ref = ref_new
            if DIV == JSD:
                dz = z_s - z_t
                dz_at_max_s = tl.where(m_s_new > m_s, value_at_max(z_s, m_s_new, dz),
                                       dz_at_max_s)
                dz_at_max_t = tl.where(m_t_new > m_t, value_at_max(z_t, m_t_new, dz),
                                       dz_at_max_t)
            acc_t = acc_t * alpha_t + e_t
            m_t = m_t_new
        acc_s = acc_s * alpha_s + e_s
        m_s = m_s_new
    sum_s = tl.sum(acc_s, axis=1, keep_dims=True)
    inv_s = 1.0 / sum_s
    loss = tl.zeros([1, 1], tl.float32)
    ce = tl.zeros([1, 1], tl.float32)  # the unweighted terms
    d = tl.zeros([1, 1], tl.float32)
    r1 = tl.zeros([1, 1], tl.float32)
    r2 = tl.zeros([1, 1], tl.float32)
    rho_s = tl.zeros([1, 1], tl.float32)
    rho_t = tl.zeros([1, 1], tl.float32)
    if EVAL_DIV:
        sum_t = tl.sum(acc_t, axis=1, keep_dims=True)
        inv_t = 1.0 / sum_t
        c = (m_s - m_t) * scale + tl.log2(sum_s) - tl.log2(sum_t)
        if DIV == KL:
            r1 = tl.sum(acc_w, axis=1, keep_dims=True) * inv_t
            r2 = ref
            d = LN2 * (scale * (r1 + r2) + c)
        elif DIV == REVERSE_KL:
            r1 = tl.sum(acc_w, axis=1, keep_dims=True) * inv_s
            r2 = ref
            d = LN2 * (scale * (r1 + r2) - c)
        else:
            # Pass 2 (backward): jsd / tvd sums need the normalised probabilities.
            if DIV == JSD:
                rho_s, rho_t = jsd_references(dz_at_max_s * scale - c, dz_at_max_t * scale - c,
                                              beta)
            acc_a = zero_v
            acc_b = zero_v
            acc_c = zero_v
            next_s = _prefetch(s_ptr, base_s, 0, n_chunks, col0, V, BLOCK_V, True)
            next_t = _prefetch(t_ptr, base_t, 0, n_chunks, col0, V, BLOCK_V, True)
            for i in range(0, n_chunks):
                mask = _chunk_cols(i, n_chunks, col0, BLOCK_V, True) < V
                z_s, _ = logits(next_s, mask, softcap, HAS_SOFTCAP)
                z_t, _ = logits(next_t, mask, softcap, HAS_SOFTCAP)
                next_s = _prefetch(s_ptr, base_s, i + 1, n_chunks, col0, V, BLOCK_V, True)
                next_t = _prefetch(t_ptr, base_t, i + 1, n_chunks, col0, V, BLOCK_V, True)
                p_s = tl.exp2((z_s - m_s) * scale) * inv_s
                p_t = tl.exp2((z_t - m_t) * scale) * inv_t
                a, b, cc = pair_terms(p_s, p_t, (z_s - z_t) * scale - c, beta, rho_s, rho_t,
                                      DIV)
                acc_a += a
                acc_b += b
                acc_c += cc
            d, r1, r2 = pair_finish(tl.sum(acc_a, axis=1, keep_dims=True),
                                     tl.sum(acc_b, axis=1, keep_dims=True),
                                     tl.sum(acc_c, axis=1, keep_dims=True), beta, rho_s,
                                     rho_t, DIV)
        if HAS_DIV:  # a weight of 0 never multiplies an infinite D
            loss += div_weight * d
    if EVAL_CE:
        if CE_POW == 1:
            sum_1 = sum_s
        else:
            sum_1 = tl.sum(acc_1, axis=1, keep_dims=True)
        inv_1 = 1.0 / sum_1
        z_sum = tl.sum(acc_z, axis=1, keep_dims=True)
        ce = ce_row(m_s, z_y, z_sum, sum_1, smoothing, V, HAS_SMOOTH)
        if HAS_CE:
            loss += ce_weight * ce
    tl.store(rows_ptr + row + tl.zeros([1, 1], tl.int64), loss)
    if TERMS:
        tl.store(terms_ptr + 2 * row + tl.zeros([1, 1], tl.int64), ce)
        tl.store(terms_ptr + 2 * row + 1 + tl.zeros([1, 1], tl.int64), d)
    if NEED_GS or NEED_GT:
        # Last pass, opposite direction to the previous one (its last chunks are in L2).
        next_s = _prefetch(s_ptr, base_s, 0, n_chunks, col0, V, BLOCK_V, not PAIR_PASS)
        if HAS_DIV:
            next_t = _prefetch(t_ptr, base_t, 0, n_chunks, col0, V, BLOCK_V, not PAIR_PASS)
        for i in range(0, n_chunks):
            cols = _chunk_cols(i, n_chunks, col0, BLOCK_V, not PAIR_PASS)
            mask = cols < V
            # The prefetch reads chunk i+1 before chunk i is stored: in place is still safe,
            # since each chunk is stored only after its own load.
            z_s, slope_s = logits(next_s, mask, softcap, HAS_SOFTCAP)
            next_s = _prefetch(s_ptr, base_s, i + 1, n_chunks, col0, V, BLOCK_V,
                               not PAIR_PASS)
            e_s = tl.exp2((z_s - m_s) * scale)
            p_s = e_s * inv_s
            g_s = zero_v
            g_t = zero_v
            if HAS_DIV:
                z_t, slope_t = logits(next_t, mask, softcap, HAS_SOFTCAP)
                next_t = _prefetch(t_ptr, base_t, i + 1, n_chunks, col0, V, BLOCK_V,
                                   not PAIR_PASS)
                p_t = tl.exp2((z_t - m_t) * scale) * inv_t
                g_s, g_t = div_grads(p_s, p_t, z_s - z_t, scale, c, r1, r2, beta, rho_s,
                                     rho_t, DIV)
                if HAS_SOFTCAP:
                    g_t = g_t * slope_t
            if NEED_GS:
                q = p_s
                if HAS_CE:
                    if CE_POW == 0:
                        q = tl.exp2((z_s - m_s) * LOG2E) * inv_1
                    elif CE_POW == 2:
                        q = e_s * e_s * inv_1
                ds = student_grad(q, cols == y, g_s, slope_s, ce_weight, grad_div, smoothing,
                                   V, HAS_CE, HAS_SMOOTH, HAS_DIV, HAS_SOFTCAP)
                tl.store(gs_ptr + base_gs + cols, ds.to(gs_ptr.dtype.element_ty), mask=mask)
            if NEED_GT:
                dt = grad_div * g_t
                tl.store(gt_ptr + base_gt + cols, dt.to(gt_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dense_kd_multipass_kernel(
    s_ptr, t_ptr, y_ptr, gs_ptr, gt_ptr, rows_ptr, terms_ptr,
    N, V,
    stride_s, stride_t, stride_gs, stride_gt,
    scale, grad_div, ce_weight, div_weight, beta, smoothing, softcap, ignore_index,
    HAS_TARGET: tl.constexpr, EVAL_CE: tl.constexpr, HAS_CE: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, EVAL_DIV: tl.constexpr, HAS_DIV: tl.constexpr,
    DIV: tl.constexpr, CE_POW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    NEED_GS: tl.constexpr, NEED_GT: tl.constexpr, TERMS: tl.constexpr,
    PAIR_PASS: tl.constexpr, BLOCK_V: tl.constexpr,
):
    """One row per program, streamed in BLOCK_V chunks (any V); ignored rows only write 0."""
    row = tl.program_id(0).to(tl.int64)
    # Each tensor has its own row stride (int64 offsets: row is int64).
    base_s = row * stride_s
    base_t = row * stride_t
    base_gs = row * stride_gs
    base_gt = row * stride_gt
    if HAS_TARGET:
        y = tl.load(y_ptr + row)
        if y == ignore_index:
            _zero_row(gs_ptr, gt_ptr, rows_ptr, terms_ptr, row, base_gs, base_gt, V, NEED_GS,
                      NEED_GT, TERMS, BLOCK_V)
        else:
            _multipass_row(s_ptr, t_ptr, gs_ptr, gt_ptr, rows_ptr, terms_ptr, row, base_s,
                           base_t, base_gs, base_gt, y, V, scale, grad_div, ce_weight,
                           div_weight, beta, smoothing, softcap, EVAL_CE, HAS_CE, HAS_SMOOTH,
                           EVAL_DIV, HAS_DIV, DIV, CE_POW, HAS_SOFTCAP, NEED_GS, NEED_GT,
                           TERMS, PAIR_PASS, BLOCK_V)
    else:
        _multipass_row(s_ptr, t_ptr, gs_ptr, gt_ptr, rows_ptr, terms_ptr, row, base_s, base_t,
                       base_gs, base_gt, -1, V, scale, grad_div, ce_weight, div_weight, beta,
                       smoothing, softcap, EVAL_CE, HAS_CE, HAS_SMOOTH, EVAL_DIV, HAS_DIV, DIV,
                       CE_POW, HAS_SOFTCAP, NEED_GS, NEED_GT, TERMS, PAIR_PASS, BLOCK_V)

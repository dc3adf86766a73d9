// Per-row maths of the dense fused distillation kernels, on float32 values only.
//
// Everything here is `__host__ __device__` and free of CUDA types, so the same code runs in
// the kernels (csrc/cuda/dense_kd_*.cu) and in a host emulation that tests it against the
// float64 oracle on a machine without a GPU (tests/test_cuda_math_emulation.py).
//
// Notation (docs/semantics.md §1, fastkd/reference/dense.py): z = cap(raw) (softcap),
// a = z / T, p_s = softmax(a_s), p_t = softmax(a_t), q = softmax(z_s) (cross-entropy at T = 1),
// r = log(p_s / p_t). Per-element gradients (chain rule through a = z / T and cap):
//   kl:         dD/da_s = p_s - p_t                  dD/da_t = p_t (-r - D)
//   reverse_kl: dD/da_s = p_s (r - D)                dD/da_t = p_t - p_s
//   jsd:        dD/da_s = (1-b) p_s (log(p_s/m) - KL(p_s||m))   (m = b p_t + (1-b) p_s)
//               dD/da_t = b p_t (log(p_t/m) - KL(p_t||m))
//               both relative to rho = log(p/m) at that side's max, KL = rho + sum p (log(p/m)
//               - rho): near a one-hot side the dominant log(p/m) - rho is exactly 0, where
//               log(p/m) - KL would cancel to a few ulps of log(p/m)
//   tvd:        dD/da_s = p_s (g - <p_s, g>)         dD/da_t = p_t (<p_t, g> - g), g = sign(r)/2
//   skew_kl, skew_reverse_kl, alpha_beta (new_terms): with g = p_s dD/dp_s, h = p_t dD/dp_t
//   per element, dD/da_s = g - p_s sum(g), dD/da_t = h - p_t sum(h); D, sum(g), sum(h) come
//   from the second reduction (tested on the host; the CUDA op does not dispatch these codes
//   yet: their generic-kernel instances spill). akl (a per-row head threshold): no maths here.
//   CE:         dCE/dz_s = q - (1 - eps) onehot(y) - eps / V
//   ds = cap'(s) (ce_w dCE/dz_s + div_w / T dD/da_s),   dt = cap'(t) div_w / T dD/da_t
// A row is reduced in pieces (vector groups, threads, warps, CTAs of a cluster): each piece
// keeps online-softmax statistics relative to its own running max, and `merge` combines two
// pieces exactly (up to rounding) in any order. -inf logits are columns of probability 0:
// every sum skips them explicitly, so no 0 * inf or inf - inf ever reaches a result.
#pragma once

#include <cmath>
#include <cstdint>

#include "dense_kd_params.h"

#if defined(__CUDACC__)
#define FASTKD_HD __host__ __device__ __forceinline__
#define FASTKD_UNROLL _Pragma("unroll")
#else
#define FASTKD_HD inline
#define FASTKD_UNROLL
#endif

namespace fastkd {
namespace kd_math {

constexpr int kKL = static_cast<int>(Divergence::kKL);
constexpr int kReverseKL = static_cast<int>(Divergence::kReverseKL);
constexpr int kJSD = static_cast<int>(Divergence::kJSD);
constexpr int kTVD = static_cast<int>(Divergence::kTVD);
constexpr int kSkewKL = static_cast<int>(Divergence::kSkewKL);
constexpr int kSkewReverseKL = static_cast<int>(Divergence::kSkewReverseKL);
constexpr int kAlphaBeta = static_cast<int>(Divergence::kAlphaBeta);

// skew_kl, skew_reverse_kl, alpha_beta: elementwise terms and their row sums (new_terms).
constexpr FASTKD_HD bool is_sum_divergence(int div) {
  return div == kSkewKL || div == kSkewReverseKL || div == kAlphaBeta;
}

// Divergences whose value needs the final log-sum-exps: one more reduction over the row.
constexpr FASTKD_HD bool needs_second_reduction(int div) {
  return div == kJSD || div == kTVD || is_sum_divergence(div);
}

constexpr float kNegInf = -INFINITY;

// Row-independent options, derived once per kernel from the params.
struct RowOptions {
  float inv_t;           // 1 / temperature
  float softcap;         // > 0 when capped
  float inv_softcap;
  bool capped;
  bool has_ce;           // CE evaluated: a target and (ce_weight != 0 or terms wanted)
  bool has_div;          // D evaluated: div_weight != 0 or terms wanted (else the teacher
                         // is never read)
  // A term enters the row and the gradient only with a non-zero weight (weighted_ce /
  // weighted_div below: derived, not stored, to keep the kernels' register count).
  bool q_from_student;   // T == 1 and has_div: the CE softmax is the student's softmax
  float ce_w;
  float div_w;
  float div_w_over_t;    // chain rule of a = z / T
  float eps;             // label smoothing
  float keep_y;          // 1 - eps
  float eps_over_v;
  float inv_v;
  float beta;            // param_a: JSD teacher weight, skew lambda, alpha_beta's alpha
  float param_b;         // alpha_beta's beta
};

FASTKD_HD RowOptions make_row_options(const DenseKDParams& p) {
  RowOptions o;
  o.inv_t = 1.0f / p.temperature;
  o.capped = p.softcap > 0.0f;
  o.softcap = p.softcap;
  o.inv_softcap = o.capped ? 1.0f / p.softcap : 0.0f;
  o.has_ce = evaluates_cross_entropy(p);
  o.has_div = evaluates_divergence(p);
  o.q_from_student = o.has_div && o.inv_t == 1.0f;
  o.ce_w = p.ce_weight;
  o.div_w = p.div_weight;
  o.div_w_over_t = p.div_weight * o.inv_t;
  o.eps = p.label_smoothing;
  o.keep_y = 1.0f - p.label_smoothing;
  o.inv_v = 1.0f / static_cast<float>(p.vocab);
  o.eps_over_v = p.label_smoothing * o.inv_v;
  o.beta = p.param_a;  // jsd, skew_*, alpha_beta
  o.param_b = p.param_b;
  return o;
}

// CE / D in the row value and the gradient: evaluated and of non-zero weight.
FASTKD_HD bool weighted_ce(const RowOptions& o) { return o.has_ce && o.ce_w != 0.0f; }
FASTKD_HD bool weighted_div(const RowOptions& o) { return o.has_div && o.div_w != 0.0f; }

// cap(raw) and cap'(raw) (softcap c: c * tanh(raw / c); identity when off).
FASTKD_HD float capped(float raw, const RowOptions& o, float& dcap) {
  if (!o.capped) {
    dcap = 1.0f;
    return raw;
  }
  const float th = tanhf(raw * o.inv_softcap);
  dcap = 1.0f - th * th;
  return o.softcap * th;
}

FASTKD_HD float capped(float raw, const RowOptions& o) {
  float unused;
  return capped(raw, o, unused);
}

// exp((m_old - m_new) * scale): the factor that moves a sum kept relative to m_old onto m_new
// (0 when m_old is -inf: such a sum is empty).
FASTKD_HD float rescale(float m_old, float m_new, float scale) {
  return m_old == kNegInf ? 0.0f : expf((m_old - m_new) * scale);
}

// sum * factor, where a factor of 0 (all terms underflowed) gives 0 even for an infinite sum.
FASTKD_HD float scaled(float sum, float factor) { return factor == 0.0f ? 0.0f : sum * factor; }

// Online-softmax statistics of a piece of one row. Maxima are of the capped logits z (not of
// z / T), so every exponent is formed as (z - m) / T: the difference comes first and keeps
// float32 precision relative to itself even for |z| ~ 1e4. max z does not depend on T, so the
// CE softmax (T = 1) shares the student's max.
struct alignas(16) RowStats {
  float ms, mt;   // running max of z_s, z_t
  float ss, st;   // sum exp((z - m) / T), student and teacher
  float sq;       // sum exp(z_s - ms) (CE softmax), when not equal to ss (T != 1)
  float x;        // KL: sum e_t (z_t - z_s); reverse KL: sum e_s (z_s - z_t); e = exp((z - m) / T)
  float sum_z;    // sum of z_s (label smoothing)
  float zy;       // z_s at the target (exactly one piece contributes)
  float dzs, dzt; // JSD: z_s - z_t at a column of the student's / teacher's max
};

FASTKD_HD RowStats empty_stats() {
  RowStats s;
  s.ms = s.mt = kNegInf;
  s.ss = s.st = s.sq = 0.0f;
  s.x = s.sum_z = s.zy = 0.0f;
  s.dzs = s.dzt = 0.0f;
  return s;
}

// The student max is needed by the divergence and by CE; the teacher's by the divergence.
FASTKD_HD bool tracks_student(const RowOptions& o) { return o.has_div || o.has_ce; }
FASTKD_HD bool tracks_ce_sum(const RowOptions& o) { return o.has_ce && !o.q_from_student; }

// JSD: the value kept with the larger of two maxima (a tie keeps the smaller value, so the
// choice is symmetric in the two pieces).
FASTKD_HD float value_at_larger(float m_a, float m_b, float v_a, float v_b) {
  return m_a > m_b ? v_a : (m_b > m_a ? v_b : fminf(v_a, v_b));
}

// JSD: z_s - z_t at a column where z attains m_new, or `kept` if the max did not grow.
template <int E>
FASTKD_HD float diff_at_max(const float (&z)[E], const float (&zs)[E], const float (&zt)[E],
                            float m_old, float m_new, float kept) {
  if (!(m_new > m_old)) return kept;
  FASTKD_UNROLL
  for (int k = 0; k < E; ++k) {
    if (z[k] == m_new) kept = zs[k] - zt[k];
  }
  return kept;
}

// a <- a (+) b. Symmetric in a and b bit for bit, so every lane of a butterfly reduction and
// every CTA of a cluster that merges the same pieces gets the same row statistics.
template <int kDiv>
FASTKD_HD void merge(RowStats& a, const RowStats& b, const RowOptions& o) {
  if (tracks_student(o)) {
    const float m = fmaxf(a.ms, b.ms);
    if (o.has_div) {
      const float fa = rescale(a.ms, m, o.inv_t), fb = rescale(b.ms, m, o.inv_t);
      a.ss = scaled(a.ss, fa) + scaled(b.ss, fb);
      if (kDiv == kReverseKL) a.x = scaled(a.x, fa) + scaled(b.x, fb);
    }
    if (tracks_ce_sum(o)) {
      a.sq = scaled(a.sq, rescale(a.ms, m, 1.0f)) + scaled(b.sq, rescale(b.ms, m, 1.0f));
    }
    if (kDiv == kJSD) a.dzs = value_at_larger(a.ms, b.ms, a.dzs, b.dzs);
    a.ms = m;
  }
  if (o.has_div) {
    const float m = fmaxf(a.mt, b.mt);
    const float fa = rescale(a.mt, m, o.inv_t), fb = rescale(b.mt, m, o.inv_t);
    a.st = scaled(a.st, fa) + scaled(b.st, fb);
    if (kDiv == kKL) a.x = scaled(a.x, fa) + scaled(b.x, fb);
    if (kDiv == kJSD) a.dzt = value_at_larger(a.mt, b.mt, a.dzt, b.dzt);
    a.mt = m;
  }
  a.sum_z += b.sum_z;
  a.zy += b.zy;
}

template <int E>
FASTKD_HD float max_of(const float (&z)[E]) {
  float m = z[0];
  FASTKD_UNROLL
  for (int k = 1; k < E; ++k) m = fmaxf(m, z[k]);
  return m;
}

// Folds a group of E elements (raw logits; valid[k] false = outside the row) into `st`.
template <int kDiv, int E>
FASTKD_HD void accumulate(RowStats& st, const float (&s_raw)[E], const float (&t_raw)[E],
                          const bool (&valid)[E], const RowOptions& o) {
  float zs[E], zt[E], es[E], et[E];
  FASTKD_UNROLL
  for (int k = 0; k < E; ++k) {
    zs[k] = valid[k] ? capped(s_raw[k], o) : kNegInf;
    zt[k] = valid[k] && o.has_div ? capped(t_raw[k], o) : kNegInf;
    es[k] = et[k] = 0.0f;
  }
  if (tracks_student(o)) {
    const float m = fmaxf(st.ms, max_of(zs));
    if (m != kNegInf) {  // else every value so far is -inf: nothing to add
      if (o.has_div) {
        const float f = rescale(st.ms, m, o.inv_t);
        float ss = st.ss * f;
        FASTKD_UNROLL
        for (int k = 0; k < E; ++k) {
          es[k] = expf((zs[k] - m) * o.inv_t);
          ss += es[k];
        }
        st.ss = ss;
        if (kDiv == kReverseKL) {
          float x = scaled(st.x, f);
          FASTKD_UNROLL
          for (int k = 0; k < E; ++k) x += es[k] > 0.0f ? es[k] * (zs[k] - zt[k]) : 0.0f;
          st.x = x;
        }
      }
      if (tracks_ce_sum(o)) {
        float sq = st.sq * rescale(st.ms, m, 1.0f);
        FASTKD_UNROLL
        for (int k = 0; k < E; ++k) sq += expf(zs[k] - m);
        st.sq = sq;
      }
      if (kDiv == kJSD) st.dzs = diff_at_max(zs, zs, zt, st.ms, m, st.dzs);
      st.ms = m;
    }
  }
  if (o.has_div) {
    const float m = fmaxf(st.mt, max_of(zt));
    if (m != kNegInf) {
      const float f = rescale(st.mt, m, o.inv_t);
      float s = st.st * f;
      FASTKD_UNROLL
      for (int k = 0; k < E; ++k) {
        et[k] = expf((zt[k] - m) * o.inv_t);
        s += et[k];
      }
      st.st = s;
      if (kDiv == kKL) {
        float x = scaled(st.x, f);
        FASTKD_UNROLL
        for (int k = 0; k < E; ++k) x += et[k] > 0.0f ? et[k] * (zt[k] - zs[k]) : 0.0f;
        st.x = x;
      }
      if (kDiv == kJSD) st.dzt = diff_at_max(zt, zs, zt, st.mt, m, st.dzt);
      st.mt = m;
    }
  }
  if (o.has_ce && o.eps > 0.0f) {
    FASTKD_UNROLL
    for (int k = 0; k < E; ++k) st.sum_z += valid[k] ? zs[k] : 0.0f;
  }
}

// Row-level scalars once the statistics of the whole row are merged. With
// log p_s = (z_s - ms) / T - log ss and log p_t = (z_t - mt) / T - log st:
//   r = log(p_s / p_t) = (z_s - z_t) / T - c,   c = (ms - mt) / T + log ss - log st.
struct RowScalars {
  float ms, mt;
  float log_ss, log_st, log_sq;
  float c;
  float d;             // divergence value (JSD / TVD: after the second reduction)
  float rho_t, rho_s;  // JSD: log(p_t / m) at the teacher's max, log(p_s / m) at the student's
  float kl_t, kl_s;    // JSD: KL(p_t || m) - rho_t, KL(p_s || m) - rho_s, m = b p_t + (1-b) p_s
  float dot_s, dot_t;  // TVD: <p_s, g>, <p_t, g>, g = sign(p_s - p_t) / 2; skew_*,
                       // alpha_beta: sum g, sum h (g = p_s dD/dp_s, h = p_t dD/dp_t)
  float sum_z, zy;
};

// (log(p_s / m), log(p_t / m)), m = beta p_t + (1 - beta) p_s, from r = log(p_s / p_t); the
// exponential is of -|r|, so it never overflows. Meaningful where the matching p > 0.
FASTKD_HD void jsd_log_ratios(float r, const RowOptions& o, float& ls, float& lt) {
  const bool positive = r >= 0.0f;
  const float x = expf(-fabsf(r));
  const float lg = -logf(positive ? o.beta * x + (1.0f - o.beta) : o.beta + (1.0f - o.beta) * x);
  ls = positive ? lg : lg + r;
  lt = positive ? lg - r : lg;
}

// rho_s = log(p_s / m) at the student's max and rho_t = log(p_t / m) at the teacher's, from
// z_s - z_t there, with the arithmetic of pair_of / jsd_log_ratios so that the dominant
// column's log(p/m) - rho is exactly 0.
FASTKD_HD void jsd_references(RowScalars& r, float dzs, float dzt, const RowOptions& o) {
  float ls, lt;
  jsd_log_ratios(dzs * o.inv_t - r.c, o, ls, lt);
  r.rho_s = ls;
  jsd_log_ratios(dzt * o.inv_t - r.c, o, ls, lt);
  r.rho_t = lt;
}

template <int kDiv>
FASTKD_HD RowScalars finish_stats(const RowStats& st, const RowOptions& o) {
  RowScalars r;
  r.ms = st.ms;
  r.mt = st.mt;
  r.log_ss = logf(st.ss);
  r.log_st = logf(st.st);
  r.log_sq = o.q_from_student ? r.log_ss : logf(st.sq);
  r.c = o.has_div ? (st.ms - st.mt) * o.inv_t + (r.log_ss - r.log_st) : 0.0f;
  // KL(p_t || p_s) = sum p_t (-r) = x / (T st) + c;  KL(p_s || p_t) = sum p_s r = x / (T ss) - c.
  if (kDiv == kKL) r.d = o.inv_t * st.x / st.st + r.c;
  else if (kDiv == kReverseKL) r.d = o.inv_t * st.x / st.ss - r.c;
  else r.d = 0.0f;
  r.rho_t = r.rho_s = r.kl_t = r.kl_s = r.dot_s = r.dot_t = 0.0f;
  if (kDiv == kJSD && o.has_div) jsd_references(r, st.dzs, st.dzt, o);
  r.sum_z = st.sum_z;
  r.zy = st.zy;
  return r;
}

// Per-element probabilities and log ratio r = log(p_s / p_t) from capped logits.
struct Pair {
  float p_s, p_t, r;
};

FASTKD_HD Pair pair_of(float zs, float zt, const RowScalars& rs, const RowOptions& o) {
  Pair q;
  q.p_s = expf((zs - rs.ms) * o.inv_t - rs.log_ss);
  q.p_t = expf((zt - rs.mt) * o.inv_t - rs.log_st);
  q.r = (zs - zt) * o.inv_t - rs.c;
  return q;
}

FASTKD_HD float half_sign(float x) { return x > 0.0f ? 0.5f : (x < 0.0f ? -0.5f : 0.0f); }

// log(e^u + e^v), -inf where both are -inf (no inf - inf NaN).
FASTKD_HD float log_add_exp(float u, float v) {
  const float hi = fmaxf(u, v), lo = fminf(u, v);
  return hi == kNegInf ? kNegInf : hi + log1pf(expf(lo - hi));
}

// KL(p || w p + (1 - w) r) at one element: its share d, g_p = p dD/dp (less the constant
// p, which cancels in the softmax chain rule) and g_r = r dD/dr, from log p and log r.
FASTKD_HD void skew_terms(float p, float lp, float lr, float w, float& d, float& g_p,
                          float& g_r) {
  const float log_w = w > 0.0f ? logf(w) : kNegInf;
  const float lpm = lp - log_add_exp(log_w + lp, log1pf(-w) + lr);
  d = p > 0.0f ? p * lpm : 0.0f;
  g_p = p > 0.0f ? d - w * expf(lp + lpm) : 0.0f;
  g_r = p > 0.0f ? -(1.0f - w) * expf(lr + lpm) : 0.0f;
}

// skew_kl (KL(p_t || l p_t + (1-l) p_s)), skew_reverse_kl (KL(p_s || l p_s + (1-l) p_t)),
// alpha_beta at one element: d (alpha_beta: before the factor -1/(a b)), g and h.
template <int kDiv>
FASTKD_HD void new_terms(float zs, float zt, const RowScalars& rs, const RowOptions& o,
                         float& d, float& g, float& h) {
  const float ls = (zs - rs.ms) * o.inv_t - rs.log_ss;  // log p_s
  const float lt = (zt - rs.mt) * o.inv_t - rs.log_st;  // log p_t
  if (kDiv == kSkewKL) {
    skew_terms(expf(lt), lt, ls, o.beta, d, h, g);
  } else if (kDiv == kSkewReverseKL) {
    skew_terms(expf(ls), ls, lt, o.beta, d, g, h);
  } else {  // alpha_beta; p^x = exp(x log p), 0 where p = 0
    const float a = o.beta, b = o.param_b;
    const float cross = expf(a * lt + b * ls);
    const float pow_t = expf((a + b) * lt), pow_s = expf((a + b) * ls);
    d = cross - a / (a + b) * pow_t - b / (a + b) * pow_s;
    g = (pow_s - cross) / a;
    h = (pow_t - cross) / b;
  }
}

// Second reduction (JSD, TVD): adds one element's terms to acc[3].
// JSD: acc = (KL(p_t||m) - rho_t, KL(p_s||m) - rho_s, -);
// TVD: acc = (sum |p_s - p_t|, <p_s, g>, <p_t, g>).
template <int kDiv>
FASTKD_HD void accumulate_second(float (&acc)[3], float s_raw, float t_raw, bool valid,
                                 const RowScalars& rs, const RowOptions& o) {
  if (!valid) return;
  const Pair q = pair_of(capped(s_raw, o), capped(t_raw, o), rs, o);
  if (kDiv == kJSD) {
    float ls, lt;
    jsd_log_ratios(q.r, o, ls, lt);
    acc[0] += q.p_t > 0.0f ? q.p_t * (lt - rs.rho_t) : 0.0f;
    acc[1] += q.p_s > 0.0f ? q.p_s * (ls - rs.rho_s) : 0.0f;
  } else if (kDiv == kTVD) {
    const float g = half_sign(q.r);
    acc[0] += fabsf(q.p_s - q.p_t);
    acc[1] += q.p_s * g;
    acc[2] += q.p_t * g;
  } else if (is_sum_divergence(kDiv)) {
    float d, g, h;
    new_terms<kDiv>(capped(s_raw, o), capped(t_raw, o), rs, o, d, g, h);
    acc[0] += d;
    acc[1] += g;
    acc[2] += h;
  }
}

template <int kDiv>
FASTKD_HD void finish_second(RowScalars& r, const float (&acc)[3], const RowOptions& o) {
  if (kDiv == kJSD) {
    r.kl_t = acc[0];
    r.kl_s = acc[1];
    r.d = o.beta * (r.rho_t + r.kl_t) + (1.0f - o.beta) * (r.rho_s + r.kl_s);
  } else if (kDiv == kTVD) {
    r.d = 0.5f * acc[0];
    r.dot_s = acc[1];
    r.dot_t = acc[2];
  } else if (is_sum_divergence(kDiv)) {
    r.d = kDiv == kAlphaBeta ? acc[0] * (-1.0f / (o.beta * o.param_b)) : acc[0];
    r.dot_s = acc[1];
    r.dot_t = acc[2];
  }
}

// The unweighted terms of a row (0 for a term that is not evaluated).
// CE = lse - (1 - eps) z_y - eps mean(z) with lse = ms + log sq, grouped as
// (1 - eps)(ms - z_y) + eps (ms - mean z) + log sq so that no large |z| cancels.
FASTKD_HD void row_terms(const RowScalars& r, const RowOptions& o, float& ce, float& d) {
  d = o.has_div ? r.d : 0.0f;
  ce = 0.0f;
  if (o.has_ce) {
    ce = o.keep_y * (r.ms - r.zy) + r.log_sq;
    if (o.eps > 0.0f) ce += o.eps * (r.ms - r.sum_z * o.inv_v);
  }
}

// The row's weighted loss; a term whose weight is 0 is left out (0 * inf would be NaN).
FASTKD_HD float row_loss_from_terms(float ce, float d, const RowOptions& o) {
  float row = 0.0f;
  if (weighted_div(o)) row += o.div_w * d;
  if (weighted_ce(o)) row += o.ce_w * ce;
  return row;
}

// Writes rows[row] and, when asked for, terms[row] (ce, d) of one finished row.
FASTKD_HD void write_row(const DenseKDParams& p, int64_t row, const RowScalars& r,
                         const RowOptions& o) {
  float ce, d;
  row_terms(r, o, ce, d);
  p.rows[row] = row_loss_from_terms(ce, d, o);
  if (p.terms != nullptr) {
    p.terms[2 * row] = ce;
    p.terms[2 * row + 1] = d;
  }
}

// An ignored row: loss and terms 0.
FASTKD_HD void write_ignored_row(const DenseKDParams& p, int64_t row) {
  p.rows[row] = 0.0f;
  if (p.terms != nullptr) p.terms[2 * row] = p.terms[2 * row + 1] = 0.0f;
}

// Gradient of the row loss at one element: d row / d raw_s -> gs, d row / d raw_t -> gt.
template <int kDiv>
FASTKD_HD void grad_element(float s_raw, float t_raw, bool is_target, const RowScalars& r,
                            const RowOptions& o, float& gs, float& gt) {
  float dcap_s, dcap_t = 1.0f;
  const float zs = capped(s_raw, o, dcap_s);
  float gsum = 0.0f, gtsum = 0.0f, p_s = 0.0f;
  if (o.has_div) {  // evaluated; it enters the gradient only with a non-zero weight
    const Pair q = pair_of(zs, capped(t_raw, o, dcap_t), r, o);
    p_s = q.p_s;
    float ds, dt;
    if (kDiv == kKL) {
      ds = q.p_s - q.p_t;
      dt = q.p_t > 0.0f ? q.p_t * (-q.r - r.d) : 0.0f;
    } else if (kDiv == kReverseKL) {
      ds = q.p_s > 0.0f ? q.p_s * (q.r - r.d) : 0.0f;
      dt = q.p_t - q.p_s;
    } else if (kDiv == kJSD) {
      float ls, lt;
      jsd_log_ratios(q.r, o, ls, lt);
      ds = (1.0f - o.beta) * (q.p_s > 0.0f ? q.p_s * ((ls - r.rho_s) - r.kl_s) : 0.0f);
      dt = o.beta * (q.p_t > 0.0f ? q.p_t * ((lt - r.rho_t) - r.kl_t) : 0.0f);
    } else if (is_sum_divergence(kDiv)) {
      float d, g, h;
      new_terms<kDiv>(zs, capped(t_raw, o), r, o, d, g, h);
      ds = g - q.p_s * r.dot_s;
      dt = h - q.p_t * r.dot_t;
    } else {
      const float g = half_sign(q.r);
      ds = q.p_s * (g - r.dot_s);
      dt = q.p_t * (r.dot_t - g);
    }
    // A select, not a branch (keeps registers): weight 0 (D evaluated only for the terms
    // output) contributes exactly 0, even where ds or dt is not finite.
    const bool weighted = weighted_div(o);
    gsum = weighted ? o.div_w_over_t * ds : 0.0f;
    gtsum = weighted ? o.div_w_over_t * dt : 0.0f;
  }
  if (weighted_ce(o)) {
    const float q = o.q_from_student ? p_s : expf(zs - r.ms - r.log_sq);
    gsum += o.ce_w * (q - o.eps_over_v - (is_target ? o.keep_y : 0.0f));
  }
  gs = gsum * dcap_s;
  gt = gtsum * dcap_t;
}

}  // namespace kd_math
}  // namespace fastkd

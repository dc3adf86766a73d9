// Per-row maths of the dense fused distillation kernels, on float32 values only.
//
// Everything here is `__host__ __device__` and free of CUDA types, so the same code runs in
// the kernels (csrc/cuda/dense_kd_*.cu) and in a host emulation that tests it against the
// float64 oracle on a machine without a GPU (tests/test_cuda_math_emulation.py).
//
// Notation (DESIGN.md §1, fastkd/reference/dense.py): z = cap(raw) (softcap), a = z / T,
// p_s = softmax(a_s), p_t = softmax(a_t), q = softmax(z_s) (cross-entropy at T = 1).
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
#else
#define FASTKD_HD inline
#endif

namespace fastkd {
namespace kd_math {

constexpr int kKL = static_cast<int>(Divergence::kKL);
constexpr int kReverseKL = static_cast<int>(Divergence::kReverseKL);
constexpr int kJSD = static_cast<int>(Divergence::kJSD);
constexpr int kTVD = static_cast<int>(Divergence::kTVD);

// Divergences whose value needs the final log-sum-exps: one more reduction over the row.
constexpr FASTKD_HD bool needs_second_reduction(int div) { return div == kJSD || div == kTVD; }

constexpr float kNegInf = -INFINITY;

// Row-independent options, derived once per kernel from the params.
struct RowOptions {
  float inv_t;           // 1 / temperature
  float softcap;         // > 0 when capped
  float inv_softcap;
  bool capped;
  bool has_ce;           // a target is given and ce_weight != 0
  bool has_div;          // div_weight != 0 (else the teacher is never read)
  bool q_from_student;   // T == 1 and has_div: the CE softmax is the student's softmax
  float ce_w;
  float div_w;
  float div_w_over_t;    // chain rule of a = z / T
  float eps;             // label smoothing
  float keep_y;          // 1 - eps
  float eps_over_v;
  float inv_v;
  float beta;            // JSD teacher weight
  float log_beta;
  float log_1m_beta;
};

FASTKD_HD RowOptions make_row_options(const DenseKDParams& p) {
  RowOptions o;
  o.inv_t = 1.0f / p.temperature;
  o.capped = p.softcap > 0.0f;
  o.softcap = p.softcap;
  o.inv_softcap = o.capped ? 1.0f / p.softcap : 0.0f;
  o.has_ce = p.target != nullptr && p.ce_weight != 0.0f;
  o.has_div = p.div_weight != 0.0f;
  o.q_from_student = o.has_div && o.inv_t == 1.0f;
  o.ce_w = p.ce_weight;
  o.div_w = p.div_weight;
  o.div_w_over_t = p.div_weight * o.inv_t;
  o.eps = p.label_smoothing;
  o.keep_y = 1.0f - p.label_smoothing;
  o.inv_v = 1.0f / static_cast<float>(p.vocab);
  o.eps_over_v = p.label_smoothing * o.inv_v;
  o.beta = p.beta;
  // Only JSD reads these; guard the logs so other divergences never see log(0).
  const bool jsd = p.divergence == kJSD;
  o.log_beta = jsd ? logf(p.beta) : 0.0f;
  o.log_1m_beta = jsd ? logf(1.0f - p.beta) : 0.0f;
  return o;
}

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

// exp(m_old - m_new): the factor that moves a sum kept relative to m_old onto m_new
// (0 when m_old is -inf: such a sum is empty).
FASTKD_HD float rescale(float m_old, float m_new) {
  return m_old == kNegInf ? 0.0f : expf(m_old - m_new);
}

// sum * factor, where a factor of 0 (all terms underflowed) gives 0 even for an infinite sum.
FASTKD_HD float scaled(float sum, float factor) { return factor == 0.0f ? 0.0f : sum * factor; }

// Online-softmax statistics of a piece of one row.
struct alignas(16) RowStats {
  float ms, ss;   // student at T: running max of a_s, sum exp(a_s - ms)
  float mt, st;   // teacher at T
  float mq, sq;   // student at T = 1 (CE), when not shared with the student stream
  float x;        // KL: sum exp(a_t - mt) (a_t - a_s); reverse KL: sum exp(a_s - ms) (a_s - a_t)
  float sum_z;    // sum of capped student logits (label smoothing)
  float zy;       // capped student logit at the target (exactly one piece contributes)
};

FASTKD_HD RowStats empty_stats() {
  RowStats s;
  s.ms = s.mt = s.mq = kNegInf;
  s.ss = s.st = s.sq = 0.0f;
  s.x = s.sum_z = s.zy = 0.0f;
  return s;
}

FASTKD_HD void merge_stream(float& m, float& s, float m2, float s2, float& f1, float& f2) {
  const float mn = fmaxf(m, m2);
  f1 = rescale(m, mn);
  f2 = rescale(m2, mn);
  s = scaled(s, f1) + scaled(s2, f2);
  m = mn;
}

// a <- a (+) b. Symmetric in a and b bit for bit, so every lane of a butterfly reduction and
// every CTA of a cluster that merges the same pieces gets the same row statistics.
template <int kDiv>
FASTKD_HD void merge(RowStats& a, const RowStats& b, const RowOptions& o) {
  float fa, fb;
  if (o.has_div) {
    merge_stream(a.ms, a.ss, b.ms, b.ss, fa, fb);
    if (kDiv == kReverseKL) a.x = scaled(a.x, fa) + scaled(b.x, fb);
    merge_stream(a.mt, a.st, b.mt, b.st, fa, fb);
    if (kDiv == kKL) a.x = scaled(a.x, fa) + scaled(b.x, fb);
  }
  if (o.has_ce && !o.q_from_student) merge_stream(a.mq, a.sq, b.mq, b.sq, fa, fb);
  a.sum_z += b.sum_z;
  a.zy += b.zy;
}

// Folds values a[0..E) (-inf = absent) into (m, s); e[k] = exp(a[k] - m_new). Returns the
// factor applied to the previous sums (1 while everything seen so far is -inf).
template <int E>
FASTKD_HD float fold_stream(float& m, float& s, const float (&a)[E], float (&e)[E]) {
  float local = a[0];
#pragma unroll
  for (int k = 1; k < E; ++k) local = fmaxf(local, a[k]);
  const float mn = fmaxf(m, local);
  if (mn == kNegInf) {
#pragma unroll
    for (int k = 0; k < E; ++k) e[k] = 0.0f;
    return 1.0f;
  }
  const float f = rescale(m, mn);
  s *= f;
#pragma unroll
  for (int k = 0; k < E; ++k) {
    e[k] = expf(a[k] - mn);
    s += e[k];
  }
  m = mn;
  return f;
}

// Folds a group of E elements (raw logits; valid[k] false = outside the row) into `st`.
template <int kDiv, int E>
FASTKD_HD void accumulate(RowStats& st, const float (&s_raw)[E], const float (&t_raw)[E],
                          const bool (&valid)[E], const RowOptions& o) {
  float zs[E];
#pragma unroll
  for (int k = 0; k < E; ++k) zs[k] = capped(s_raw[k], o);
  if (o.has_div) {
    float as[E], at[E], es[E], et[E];
#pragma unroll
    for (int k = 0; k < E; ++k) {
      as[k] = valid[k] ? zs[k] * o.inv_t : kNegInf;
      at[k] = valid[k] ? capped(t_raw[k], o) * o.inv_t : kNegInf;
    }
    const float fs = fold_stream(st.ms, st.ss, as, es);
    const float ft = fold_stream(st.mt, st.st, at, et);
    if (kDiv == kKL) {
      float x = scaled(st.x, ft);
#pragma unroll
      for (int k = 0; k < E; ++k) x += et[k] > 0.0f ? et[k] * (at[k] - as[k]) : 0.0f;
      st.x = x;
    } else if (kDiv == kReverseKL) {
      float x = scaled(st.x, fs);
#pragma unroll
      for (int k = 0; k < E; ++k) x += es[k] > 0.0f ? es[k] * (as[k] - at[k]) : 0.0f;
      st.x = x;
    }
  }
  if (o.has_ce && !o.q_from_student) {
    float zq[E], eq[E];
#pragma unroll
    for (int k = 0; k < E; ++k) zq[k] = valid[k] ? zs[k] : kNegInf;
    fold_stream(st.mq, st.sq, zq, eq);
  }
  if (o.has_ce && o.eps > 0.0f) {
#pragma unroll
    for (int k = 0; k < E; ++k) st.sum_z += valid[k] ? zs[k] : 0.0f;
  }
}

// Row-level scalars once the statistics of the whole row are merged.
struct RowScalars {
  float lse_s, lse_t, lse_q;
  float d;             // divergence value (JSD / TVD: after the second reduction)
  float kl_t, kl_s;    // JSD: KL(p_t || m), KL(p_s || m)
  float dot_s, dot_t;  // TVD: <p_s, g>, <p_t, g>, g = sign(p_s - p_t) / 2
  float sum_z, zy;
};

FASTKD_HD float lse_of(float m, float s) { return m == kNegInf ? kNegInf : m + logf(s); }

template <int kDiv>
FASTKD_HD RowScalars finish_stats(const RowStats& st, const RowOptions& o) {
  RowScalars r;
  r.lse_s = lse_of(st.ms, st.ss);
  r.lse_t = lse_of(st.mt, st.st);
  r.lse_q = o.q_from_student ? r.lse_s : lse_of(st.mq, st.sq);
  // KL(p_t || p_s) = sum p_t (a_t - a_s) - lse_t + lse_s, with sum p_t (...) = x / st.
  if (kDiv == kKL) r.d = st.x / st.st + (r.lse_s - r.lse_t);
  else if (kDiv == kReverseKL) r.d = st.x / st.ss + (r.lse_t - r.lse_s);
  else r.d = 0.0f;
  r.kl_t = r.kl_s = r.dot_s = r.dot_t = 0.0f;
  r.sum_z = st.sum_z;
  r.zy = st.zy;
  return r;
}

// log(beta * p_t + (1 - beta) * p_s) from the log-probabilities, in log space.
FASTKD_HD float jsd_log_mixture(float logp_t, float logp_s, const RowOptions& o) {
  const float u = logp_t + o.log_beta;
  const float v = logp_s + o.log_1m_beta;
  const float hi = fmaxf(u, v);
  if (hi == kNegInf) return kNegInf;
  return hi + logf(1.0f + expf(fminf(u, v) - hi));
}

FASTKD_HD float half_sign(float x) { return x > 0.0f ? 0.5f : (x < 0.0f ? -0.5f : 0.0f); }

// Second reduction (JSD, TVD): adds one element's terms to acc[3].
// JSD: acc = (KL(p_t||m), KL(p_s||m), -); TVD: acc = (sum |p_s - p_t|, <p_s, g>, <p_t, g>).
template <int kDiv>
FASTKD_HD void accumulate_second(float (&acc)[3], float s_raw, float t_raw, bool valid,
                                 const RowScalars& r, const RowOptions& o) {
  if (!valid) return;
  const float logp_s = capped(s_raw, o) * o.inv_t - r.lse_s;
  const float logp_t = capped(t_raw, o) * o.inv_t - r.lse_t;
  const float p_s = expf(logp_s);
  const float p_t = expf(logp_t);
  if (kDiv == kJSD) {
    const float logm = jsd_log_mixture(logp_t, logp_s, o);
    acc[0] += p_t > 0.0f ? p_t * (logp_t - logm) : 0.0f;
    acc[1] += p_s > 0.0f ? p_s * (logp_s - logm) : 0.0f;
  } else if (kDiv == kTVD) {
    const float g = half_sign(p_s - p_t);
    acc[0] += fabsf(p_s - p_t);
    acc[1] += p_s * g;
    acc[2] += p_t * g;
  }
}

template <int kDiv>
FASTKD_HD void finish_second(RowScalars& r, const float (&acc)[3], const RowOptions& o) {
  if (kDiv == kJSD) {
    r.kl_t = acc[0];
    r.kl_s = acc[1];
    r.d = o.beta * r.kl_t + (1.0f - o.beta) * r.kl_s;
  } else if (kDiv == kTVD) {
    r.d = 0.5f * acc[0];
    r.dot_s = acc[1];
    r.dot_t = acc[2];
  }
}

// The row's weighted loss; a term whose weight is 0 is not evaluated (0 * inf would be NaN).
FASTKD_HD float row_loss(const RowScalars& r, const RowOptions& o) {
  float row = 0.0f;
  if (o.has_div) row += o.div_w * r.d;
  if (o.has_ce) {
    float ce = r.lse_q - o.keep_y * r.zy;
    if (o.eps > 0.0f) ce -= o.eps * r.sum_z * o.inv_v;
    row += o.ce_w * ce;
  }
  return row;
}

// Gradient of the row loss at one element: d row / d raw_s -> gs, d row / d raw_t -> gt.
template <int kDiv>
FASTKD_HD void grad_element(float s_raw, float t_raw, bool is_target, const RowScalars& r,
                            const RowOptions& o, float& gs, float& gt) {
  float dcap_s, dcap_t = 1.0f;
  const float zs = capped(s_raw, o, dcap_s);
  float gsum = 0.0f, gtsum = 0.0f, p_s = 0.0f;
  if (o.has_div) {
    const float logp_s = zs * o.inv_t - r.lse_s;
    const float logp_t = capped(t_raw, o, dcap_t) * o.inv_t - r.lse_t;
    p_s = expf(logp_s);
    const float p_t = expf(logp_t);
    float ds, dt;
    if (kDiv == kKL) {
      ds = p_s - p_t;
      dt = p_t > 0.0f ? p_t * (logp_t - logp_s - r.d) : 0.0f;
    } else if (kDiv == kReverseKL) {
      ds = p_s > 0.0f ? p_s * (logp_s - logp_t - r.d) : 0.0f;
      dt = p_t - p_s;
    } else if (kDiv == kJSD) {
      const float logm = jsd_log_mixture(logp_t, logp_s, o);
      ds = (1.0f - o.beta) * (p_s > 0.0f ? p_s * (logp_s - logm - r.kl_s) : 0.0f);
      dt = o.beta * (p_t > 0.0f ? p_t * (logp_t - logm - r.kl_t) : 0.0f);
    } else {
      const float g = half_sign(p_s - p_t);
      ds = p_s * (g - r.dot_s);
      dt = p_t * (r.dot_t - g);
    }
    gsum = o.div_w_over_t * ds;
    gtsum = o.div_w_over_t * dt;
  }
  if (o.has_ce) {
    const float q = o.q_from_student ? p_s : expf(zs - r.lse_q);
    gsum += o.ce_w * (q - o.eps_over_v - (is_target ? o.keep_y : 0.0f));
  }
  gs = gsum * dcap_s;
  gt = gtsum * dcap_t;
}

}  // namespace kd_math
}  // namespace fastkd

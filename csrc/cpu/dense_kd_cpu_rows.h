// Row kernel of the fused CPU distillation loss (contract: fastkd.reference.dense_kd_rows).
//
// Included by one .cpp per CPU capability; that file defines CPU_CAPABILITY (and the
// matching CPU_CAPABILITY_* macro) first, so at::vec::Vectorized<float> is the AVX2 or the
// portable implementation and everything below lives in an inline namespace of that name:
// the variants never collide at link time.
//
// One row of V logits goes through three sweeps; only sweep A reads the inputs and only
// sweep C writes the outputs, so a gradient may overwrite the student (in-place backward):
//   A  load (converting bf16/fp16), softcap, scale by 1/T into float buffers; row maxima.
//   B  shift by the maxima, exponentiate into cached buffers, accumulate the softmax sums and
//      the divergence terms that need no normaliser (kl, reverse_kl); JSD / TVD need one
//      more sweep over the cached values once the normalisers are known.
//   C  gradient from the cached values, written once in the output dtype.
// Buffers are padded to a whole number of vectors with -inf logits (zero probability), so
// sweeps B and C run on whole vectors; masks keep 0 * inf out of every sum.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>

#include "cpu/dense_kd_cpu.h"
#include "dense_kd_params.h"

namespace fastkd::cpu {
inline namespace CPU_CAPABILITY {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

inline float lane_sum(const Vec& v) {
  alignas(64) float lanes[kLanes];
  v.store(lanes);
  float total = 0.f;
  for (int64_t i = 0; i < kLanes; ++i) total += lanes[i];
  return total;
}

inline float lane_max(const Vec& v) {
  alignas(64) float lanes[kLanes];
  v.store(lanes);
  float best = lanes[0];
  for (int64_t i = 1; i < kLanes; ++i) best = std::max(best, lanes[i]);
  return best;
}

#if defined(CPU_CAPABILITY_AVX2)
// exp(x) in ~15 AVX2 instructions, max relative error ~1.2e-7 (about 1 ulp) on normal results;
// results below FLT_MIN flush to 0, -inf gives 0 and NaN stays NaN. exp(x) = 2^n * e^r with
// n = round(x / ln 2), r = x - n ln 2 (two-part ln 2), e^r = 1 + r + r^2 q(r), q a degree-4
// least-squares fit on [-ln2/2, ln2/2] (coefficients fitted for this file). Sleef's u10 exp
// costs about twice as much and exp is the bulk of the work here.
inline Vec fast_exp(const Vec& x) {
  const __m256 clamped = _mm256_min_ps(_mm256_set1_ps(88.3f),
                                       _mm256_max_ps(_mm256_set1_ps(-88.f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(clamped, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), clamped);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 q = _mm256_set1_ps(0.0013933645f);
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.0083631761f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.0416664667f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.166665763f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.5f));
  const __m256 er = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(r, r), q, r),
                                  _mm256_set1_ps(1.f));
  // 2^n from the exponent bits; n = -127 (x <= -88) gives the bit pattern of 0.0.
  const __m256i bits = _mm256_slli_epi32(
      _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(er, _mm256_castsi256_ps(bits));
}
#else
inline Vec fast_exp(const Vec& x) { return x.exp(); }
#endif

// v where p > 0, else 0: drops the 0 * (+-inf) and NaN products of zero-probability columns.
inline Vec where_positive(const Vec& p, const Vec& v) {
  return Vec::blendv(Vec(0.f), v, p > Vec(0.f));
}

// Per-thread float32 row buffers (each `padded` floats, uninitialised).
class RowScratch {
 public:
  enum Slot { kStudentLogits, kTeacherLogits, kStudentExp, kTeacherExp, kCeExp, kLogMixture,
              kStudentCapGrad, kTeacherCapGrad, kStaging, kNumSlots };

  explicit RowScratch(int64_t vocab)
      : padded_((vocab + kLanes - 1) / kLanes * kLanes),
        storage_(new float[static_cast<size_t>(padded_ * kNumSlots)]) {}

  float* slot(Slot s) const { return storage_.get() + padded_ * static_cast<int64_t>(s); }
  int64_t padded() const { return padded_; }

 private:
  int64_t padded_;
  std::unique_ptr<float[]> storage_;
};

// Scalars of one row, filled as the sweeps go.
struct RowStats {
  float max_s = 0.f, max_t = 0.f;     // maxima of the scaled logits a = cap(z) / T
  float sum_s = 0.f, sum_t = 0.f;     // softmax normalisers (relative to the maxima)
  float sum_q = 0.f;                  // normaliser of the temperature-1 softmax (CE)
  float log_sum_s = 0.f, log_sum_t = 0.f, log_sum_q = 0.f;
  float cross = 0.f;                  // kl: sum e_t (x_t - x_s); reverse_kl: sum e_s (x_s - x_t)
  float sum_shifted_s = 0.f;          // sum over the vocabulary of x_s (label smoothing)
  float label_scaled = 0.f;           // a_s[y] before the shift
  float divergence = 0.f;             // D(p_t, p_s)
  float kl_t = 0.f, kl_s = 0.f;       // jsd: KL(p_t||m), KL(p_s||m)
  float dot_s = 0.f, dot_t = 0.f;     // tvd: <p_s, g>, <p_t, g>
};

template <typename scalar_t>
class RowKernel {
 public:
  RowKernel(const DenseKDParams& p, RowScratch& scratch)
      : p_(p), scratch_(scratch), vocab_(p.vocab), padded_(scratch.padded()),
        has_div_(p.div_weight != 0.f),
        has_ce_(p.target != nullptr && p.ce_weight != 0.f),
        softcap_(p.softcap > 0.f),
        student_scale_(has_div_ ? 1.f / p.temperature : 1.f),
        ce_ratio_(has_div_ ? p.temperature : 1.f) {
    xs_ = scratch.slot(RowScratch::kStudentLogits);
    xt_ = scratch.slot(RowScratch::kTeacherLogits);
    es_ = scratch.slot(RowScratch::kStudentExp);
    et_ = scratch.slot(RowScratch::kTeacherExp);
    eq_ = scratch.slot(RowScratch::kCeExp);
    lm_ = scratch.slot(RowScratch::kLogMixture);
    dcs_ = scratch.slot(RowScratch::kStudentCapGrad);
    dct_ = scratch.slot(RowScratch::kTeacherCapGrad);
    staging_ = scratch.slot(RowScratch::kStaging);
  }

  void run(int64_t row) {
    const int64_t label = p_.target != nullptr ? p_.target[row] : 0;
    const bool ignored = p_.target != nullptr && label == p_.ignore_index;
    if (ignored || !(has_ce_ || has_div_)) {
      write_zero_row(row);
      return;
    }
    RowStats st;
    const auto* student = static_cast<const scalar_t*>(p_.student) + row * p_.student_row_stride;
    st.max_s = load_scaled(student, xs_, p_.grad_student != nullptr ? dcs_ : nullptr,
                           student_scale_);
    if (has_ce_) st.label_scaled = xs_[label];
    if (has_div_) {
      const auto* teacher = static_cast<const scalar_t*>(p_.teacher) + row * p_.teacher_row_stride;
      st.max_t = load_scaled(teacher, xt_, p_.grad_teacher != nullptr ? dct_ : nullptr,
                             1.f / p_.temperature);
    }
    exponentiate(st);
    float value = 0.f;
    if (has_div_) value += p_.div_weight * divergence(st);
    if (has_ce_) value += p_.ce_weight * cross_entropy(st);
    p_.rows[row] = value;
    if (p_.grad_student != nullptr) write_student_grad(row, st, has_ce_ ? label : -1);
    if (p_.grad_teacher != nullptr) write_teacher_grad(row, st);
  }

 private:
  static constexpr bool kIsFloat = std::is_same_v<scalar_t, float>;

  scalar_t* grad_row(void* base, int64_t stride, int64_t row) const {
    return static_cast<scalar_t*>(base) + row * stride;
  }

  void write_zero_row(int64_t row) {
    p_.rows[row] = 0.f;
    if (p_.grad_student != nullptr) {
      std::memset(grad_row(p_.grad_student, p_.grad_student_row_stride, row), 0,
                  sizeof(scalar_t) * vocab_);
    }
    if (p_.grad_teacher != nullptr) {
      std::memset(grad_row(p_.grad_teacher, p_.grad_teacher_row_stride, row), 0,
                  sizeof(scalar_t) * vocab_);
    }
  }

  // Sweep A: out = cap(z) * scale (float32, padded with -inf), dcap = cap'(z) when asked.
  // Returns max(out).
  float load_scaled(const scalar_t* raw, float* out, float* dcap, float scale) {
    const float* src;
    if constexpr (kIsFloat) {
      src = raw;
    } else {
      at::vec::convert(raw, out, vocab_);  // widened in place, then transformed in place
      src = out;
    }
    const Vec vscale(scale), vcap(p_.softcap), vinv_cap(1.f / p_.softcap), one(1.f);
    Vec vmax(kNegInf);
    for (int64_t j = 0; j < padded_; j += kLanes) {
      const int64_t n = std::min<int64_t>(kLanes, vocab_ - j);
      Vec z = n == kLanes ? Vec::loadu(src + j) : Vec::loadu(src + j, n);
      if (softcap_) {
        const Vec th = (z * vinv_cap).tanh();
        z = th * vcap;
        if (dcap != nullptr) (one - th * th).store(dcap + j);
      }
      Vec a = z * vscale;
      if (n < kLanes) a = Vec::set(Vec(kNegInf), a, n);
      a.store(out + j);
      vmax = at::vec::maximum(vmax, a);
    }
    return lane_max(vmax);
  }

  // Sweep B: x = a - max (stored back), e = exp(x) cached, normalisers and the
  // normaliser-free divergence sums.
  void exponentiate(RowStats& st) {
    const Vec ms(st.max_s), mt(st.max_t), ratio(ce_ratio_), zero(0.f);
    const bool ce_same = ce_ratio_ == 1.f, ce_square = ce_ratio_ == 2.f;
    const bool smoothing = has_ce_ && p_.label_smoothing != 0.f;
    const int code = p_.divergence;
    Vec sum_s(0.f), sum_t(0.f), sum_q(0.f), cross(0.f), shifted(0.f);
    for (int64_t j = 0; j < padded_; j += kLanes) {
      const Vec xs = Vec::loadu(xs_ + j) - ms;
      xs.store(xs_ + j);
      const Vec es = fast_exp(xs);
      es.store(es_ + j);
      sum_s = sum_s + es;
      if (has_div_) {
        const Vec xt = Vec::loadu(xt_ + j) - mt;
        xt.store(xt_ + j);
        const Vec et = fast_exp(xt);
        et.store(et_ + j);
        sum_t = sum_t + et;
        if (code == static_cast<int>(Divergence::kKL)) {
          cross = cross + where_positive(et, et * (xt - xs));
        } else if (code == static_cast<int>(Divergence::kReverseKL)) {
          cross = cross + where_positive(es, es * (xs - xt));
        }
      }
      if (has_ce_ && !ce_same) {
        Vec eq;
        if (ce_square) {
          eq = es * es;  // exp(2x) = exp(x)^2: saves one exponential per element
        } else {
          eq = fast_exp(xs * ratio);
          eq.store(eq_ + j);
        }
        sum_q = sum_q + eq;
      }
      if (smoothing) {
        const int64_t n = std::min<int64_t>(kLanes, vocab_ - j);
        shifted = shifted + (n == kLanes ? xs : Vec::set(zero, xs, n));
      }
    }
    st.sum_s = lane_sum(sum_s);
    st.log_sum_s = std::log(st.sum_s);
    if (has_div_) {
      st.sum_t = lane_sum(sum_t);
      st.log_sum_t = std::log(st.sum_t);
      st.cross = lane_sum(cross);
    }
    if (has_ce_) {
      st.sum_q = ce_same ? st.sum_s : lane_sum(sum_q);
      st.log_sum_q = std::log(st.sum_q);
      if (smoothing) st.sum_shifted_s = lane_sum(shifted);
    }
  }

  float divergence(RowStats& st) {
    switch (static_cast<Divergence>(p_.divergence)) {
      case Divergence::kKL:
        st.divergence = st.cross / st.sum_t + (st.log_sum_s - st.log_sum_t);
        break;
      case Divergence::kReverseKL:
        st.divergence = st.cross / st.sum_s + (st.log_sum_t - st.log_sum_s);
        break;
      case Divergence::kJSD:
        jsd_sums(st);
        st.divergence = p_.beta * st.kl_t + (1.f - p_.beta) * st.kl_s;
        break;
      case Divergence::kTVD:
        tvd_sums(st);
        break;
    }
    return st.divergence;
  }

  // log m with m = beta p_t + (1 - beta) p_s; finite wherever p_t or p_s is positive.
  Vec log_mixture(const Vec& ps, const Vec& pt) const {
    return (Vec(p_.beta) * pt + Vec(1.f - p_.beta) * ps).log();
  }

  // p * (log p - log m), 0 where p == 0 or m underflowed to 0.
  static Vec xlog_ratio(const Vec& p, const Vec& log_p, const Vec& lm) {
    const Vec live = (p > Vec(0.f)) & (lm > Vec(kNegInf));
    return Vec::blendv(Vec(0.f), p * (log_p - lm), live);
  }

  // Extra sweep for JSD: KL(p_t||m) and KL(p_s||m); caches log m for the gradient.
  void jsd_sums(RowStats& st) {
    const Vec inv_s(1.f / st.sum_s), inv_t(1.f / st.sum_t);
    const Vec lzs(st.log_sum_s), lzt(st.log_sum_t);
    const bool keep = p_.grad_student != nullptr || p_.grad_teacher != nullptr;
    Vec kl_t(0.f), kl_s(0.f);
    for (int64_t j = 0; j < padded_; j += kLanes) {
      const Vec ps = Vec::loadu(es_ + j) * inv_s, pt = Vec::loadu(et_ + j) * inv_t;
      const Vec lm = log_mixture(ps, pt);
      if (keep) lm.store(lm_ + j);
      kl_t = kl_t + xlog_ratio(pt, Vec::loadu(xt_ + j) - lzt, lm);
      kl_s = kl_s + xlog_ratio(ps, Vec::loadu(xs_ + j) - lzs, lm);
    }
    st.kl_t = lane_sum(kl_t);
    st.kl_s = lane_sum(kl_s);
  }

  // g = sign(p_s - p_t) / 2, the TVD subgradient.
  static Vec half_sign(const Vec& d) {
    const Vec half(0.5f), zero(0.f);
    return (Vec::blendv(zero, half, d > zero)) - (Vec::blendv(zero, half, d < zero));
  }

  // Extra sweep for TVD: D, <p_s, g>, <p_t, g>.
  void tvd_sums(RowStats& st) {
    const Vec inv_s(1.f / st.sum_s), inv_t(1.f / st.sum_t);
    Vec abs_sum(0.f), dot_s(0.f), dot_t(0.f);
    for (int64_t j = 0; j < padded_; j += kLanes) {
      const Vec ps = Vec::loadu(es_ + j) * inv_s, pt = Vec::loadu(et_ + j) * inv_t;
      const Vec d = ps - pt, g = half_sign(d);
      abs_sum = abs_sum + d.abs();
      dot_s = at::vec::fmadd(ps, g, dot_s);
      dot_t = at::vec::fmadd(pt, g, dot_t);
    }
    st.divergence = 0.5f * lane_sum(abs_sum);
    st.dot_s = lane_sum(dot_s);
    st.dot_t = lane_sum(dot_t);
  }

  // CE at temperature 1 (PyTorch's label smoothing): with x_q = cap(z) - max cap(z) = r x_s,
  // CE = log sum exp(x_q) - (1 - eps) x_q[y] - eps * mean(x_q).
  float cross_entropy(const RowStats& st) const {
    const float eps = p_.label_smoothing;
    float ce = st.log_sum_q;
    if (eps != 1.f) ce -= (1.f - eps) * ce_ratio_ * (st.label_scaled - st.max_s);
    if (eps != 0.f) ce -= eps * ce_ratio_ * st.sum_shifted_s / static_cast<float>(vocab_);
    return ce;
  }

  // d D / d a_s for the vector at column j.
  Vec student_div_grad(int64_t j, const RowStats& st, const Vec& ps, const Vec& pt) const {
    switch (static_cast<Divergence>(p_.divergence)) {
      case Divergence::kKL:
        return ps - pt;
      case Divergence::kReverseKL: {
        const Vec c(st.log_sum_s - st.log_sum_t + st.divergence);
        return where_positive(ps, ps * (Vec::loadu(xs_ + j) - Vec::loadu(xt_ + j) - c));
      }
      case Divergence::kJSD: {
        const Vec lps = Vec::loadu(xs_ + j) - Vec(st.log_sum_s + st.kl_s);
        return Vec(1.f - p_.beta) * xlog_ratio(ps, lps, Vec::loadu(lm_ + j));
      }
      case Divergence::kTVD:
        return ps * (half_sign(ps - pt) - Vec(st.dot_s));
    }
    return Vec(0.f);
  }

  // d D / d a_t for the vector at column j.
  Vec teacher_div_grad(int64_t j, const RowStats& st, const Vec& ps, const Vec& pt) const {
    switch (static_cast<Divergence>(p_.divergence)) {
      case Divergence::kKL: {
        const Vec c(st.log_sum_t - st.log_sum_s + st.divergence);
        return where_positive(pt, pt * (Vec::loadu(xt_ + j) - Vec::loadu(xs_ + j) - c));
      }
      case Divergence::kReverseKL:
        return pt - ps;
      case Divergence::kJSD: {
        const Vec lpt = Vec::loadu(xt_ + j) - Vec(st.log_sum_t + st.kl_t);
        return Vec(p_.beta) * xlog_ratio(pt, lpt, Vec::loadu(lm_ + j));
      }
      case Divergence::kTVD:
        return pt * (Vec(st.dot_t) - half_sign(ps - pt));
    }
    return Vec(0.f);
  }

  // Writes the float32 gradient vector of column j: straight into a float32 output, or into
  // the staging row that is narrowed once the row is complete.
  void store_grad(const Vec& g, scalar_t* out, int64_t j) const {
    if constexpr (kIsFloat) {
      const int64_t n = std::min<int64_t>(kLanes, vocab_ - j);
      if (n == kLanes) {
        g.store(out + j);
      } else {
        g.store(out + j, n);
      }
    } else {
      g.store(staging_ + j);
    }
  }

  void finish_grad_row(scalar_t* out) const {
    if constexpr (!kIsFloat) at::vec::convert(staging_, out, vocab_);
  }

  // Sweep C, student: cap'(z) * (ce_w * (q - eps/V - (1-eps) onehot(y)) + div_w/T * dD/da_s).
  void write_student_grad(int64_t row, const RowStats& st, int64_t label) {
    scalar_t* out = grad_row(p_.grad_student, p_.grad_student_row_stride, row);
    const bool ce_same = ce_ratio_ == 1.f, ce_square = ce_ratio_ == 2.f;
    const float eps = p_.label_smoothing;
    const Vec inv_s(1.f / st.sum_s), inv_t(has_div_ ? 1.f / st.sum_t : 0.f);
    const Vec ce_scale(has_ce_ ? p_.ce_weight / st.sum_q : 0.f);
    const Vec ce_shift(has_ce_ ? -p_.ce_weight * eps / static_cast<float>(vocab_) : 0.f);
    const Vec div_scale(p_.div_weight / p_.temperature);
    const int64_t label_block = label >= 0 ? label - label % kLanes : -1;
    for (int64_t j = 0; j < padded_; j += kLanes) {
      const Vec es = Vec::loadu(es_ + j);
      Vec g(0.f);
      if (has_ce_) {
        const Vec eq = ce_same ? es : (ce_square ? es * es : Vec::loadu(eq_ + j));
        g = at::vec::fmadd(eq, ce_scale, ce_shift);
      }
      if (has_div_) {
        const Vec ps = es * inv_s, pt = Vec::loadu(et_ + j) * inv_t;
        g = at::vec::fmadd(div_scale, student_div_grad(j, st, ps, pt), g);
      }
      if (j == label_block) {
        alignas(64) float lanes[kLanes];
        g.store(lanes);
        lanes[label - j] -= p_.ce_weight * (1.f - eps);
        g = Vec::loadu(lanes);
      }
      if (softcap_) g = g * Vec::loadu(dcs_ + j);
      store_grad(g, out, j);
    }
    finish_grad_row(out);
  }

  // Sweep C, teacher: cap'(t) * div_w/T * dD/da_t (zero when there is no divergence term).
  void write_teacher_grad(int64_t row, const RowStats& st) {
    scalar_t* out = grad_row(p_.grad_teacher, p_.grad_teacher_row_stride, row);
    if (!has_div_) {
      std::memset(out, 0, sizeof(scalar_t) * vocab_);
      return;
    }
    const Vec inv_s(1.f / st.sum_s), inv_t(1.f / st.sum_t);
    const Vec div_scale(p_.div_weight / p_.temperature);
    for (int64_t j = 0; j < padded_; j += kLanes) {
      const Vec ps = Vec::loadu(es_ + j) * inv_s, pt = Vec::loadu(et_ + j) * inv_t;
      Vec g = div_scale * teacher_div_grad(j, st, ps, pt);
      if (softcap_) g = g * Vec::loadu(dct_ + j);
      store_grad(g, out, j);
    }
    finish_grad_row(out);
  }

  const DenseKDParams& p_;
  RowScratch& scratch_;
  const int64_t vocab_, padded_;
  const bool has_div_, has_ce_, softcap_;
  const float student_scale_;  // 1/T when the divergence needs p_s, else 1 (CE only)
  const float ce_ratio_;       // r with cap(z) - max = r * x_s
  float *xs_, *xt_, *es_, *et_, *eq_, *lm_, *dcs_, *dct_, *staging_;
};

template <typename scalar_t>
void rows_of_type(const DenseKDParams& params, int64_t begin, int64_t end) {
  RowScratch scratch(params.vocab);
  RowKernel<scalar_t> kernel(params, scratch);
  for (int64_t row = begin; row < end; ++row) kernel.run(row);
}

// The capability-specific entry point; the including .cpp gives it its exported name.
inline void dense_kd_rows_impl(const DenseKDParams& params, ElementType type, int64_t begin,
                               int64_t end) {
  switch (type) {
    case ElementType::kFloat32:
      rows_of_type<float>(params, begin, end);
      break;
    case ElementType::kBFloat16:
      rows_of_type<c10::BFloat16>(params, begin, end);
      break;
    case ElementType::kFloat16:
      rows_of_type<c10::Half>(params, begin, end);
      break;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastkd::cpu

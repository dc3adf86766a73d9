// Row kernel of the fused top-k teacher loss (contract: fastkd.reference.sparse.sparse_kd_rows).
//
// Included by one .cpp per CPU capability (like dense_kd_cpu_rows.h, whose vector helpers it
// uses). Per row, with a = cap(z) / T (T = 1 when only CE is evaluated) and x = a - max(a):
//   gather  z at the k teacher indices and at the label, before anything is written (so the
//           gradient may overwrite the student row: in-place backward);
//   A       max of the raw logits (cap is increasing: max(a) = cap(max z) / T);
//   B       e = exp(x) per column into a per-thread float32 row buffer; Z = sum e, the
//           temperature-1 normaliser of CE (exp(x)^2 when T = 2, one more exp otherwise), the
//           label-smoothing sum; tanh(z / c) is cached when softcapped.
//   tail    covered mass C = sum of e at the k indices, uncovered tail = Z - C; when C > Z/2
//           that difference would cancel, so the tail is summed directly over the row buffer
//           with the covered columns zeroed (exact 0 when k = V).
//   k+1     teacher categories (bucket or renormalised, re-tempered by teacher_scale) and
//           student categories log q_j = x_j - log Z, log q_tail = log(tail / Z): D and
//           g_i = dD / dlog q_i in closed form (see the reference), G = sum g_i.
//   C       dD/da_v = g_tail e_v / tail - G e_v / Z on uncovered columns, plus the CE gradient:
//           one vector sweep over the row buffers writes the whole gradient row once; then
//           the k covered columns are overwritten with their own value
//           (g_j - G e_j / Z, + CE). Low-precision outputs go through a float32 staging row.
// Only A and B read the row (B from cache); the logits are read from memory once.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "cpu/dense_kd_cpu_vec.h"
#include "cpu/sparse_kd_cpu.h"

namespace fastkd::cpu {
inline namespace CPU_CAPABILITY {

namespace sparse_detail {

constexpr int kSparseKL = 0, kSparseReverseKL = 1, kSparseJSD = 2;

inline float scalar_at(const void* base, ElementType type, int64_t i) {
  switch (type) {
    case ElementType::kBFloat16:
      return static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]);
    case ElementType::kFloat16:
      return static_cast<float>(static_cast<const c10::Half*>(base)[i]);
    default:
      return static_cast<const float*>(base)[i];
  }
}

// log(exp(a) + exp(b)) without overflow; -inf when both are -inf.
inline float log_add_exp(float a, float b) {
  const float hi = std::max(a, b), lo = std::min(a, b);
  if (hi == kNegInf) return kNegInf;
  return hi + std::log1p(std::exp(lo - hi));
}

// Sum of p (log p - log r) over entries with p > 0.
inline float xlogy_term(float p, float logp, float logr) {
  return p > 0.f ? p * (logp - logr) : 0.f;
}

}  // namespace sparse_detail

// Per-thread buffers: float32 rows padded to whole vectors, and (k + 1)-sized arrays.
class SparseScratch {
 public:
  SparseScratch(int64_t vocab, int64_t k)
      : padded_((vocab + kLanes - 1) / kLanes * kLanes),
        rows_(new float[static_cast<size_t>(padded_ * 4)]),
        index(k), gathered(k), exp_covered(k), logq(k + 1), logp(k + 1), g(k + 1),
        patch(padded_), covered_column(padded_), covered_vector(padded_ / kLanes) {}

  float* exp_row() const { return rows_.get(); }
  float* ce_exp_row() const { return rows_.get() + padded_; }
  float* tanh_row() const { return rows_.get() + 2 * padded_; }
  float* staging_row() const { return rows_.get() + 3 * padded_; }

 private:
  int64_t padded_;
  std::unique_ptr<float[]> rows_;

 public:
  std::vector<int64_t> index;       // the row's teacher indices
  std::vector<float> gathered;      // raw student logits at those indices
  std::vector<float> exp_covered;   // e at those indices
  std::vector<float> logq, logp, g;  // k + 1 categories (the tail last)
  // The covered columns' gradients, merged into sweep C's stores: flags are 1 at the row's
  // covered columns / vectors holding one, and back to 0 after the row.
  std::vector<float> patch;
  std::vector<uint8_t> covered_column, covered_vector;
};

// Gradients of at least this many bytes are written with streaming stores.
constexpr int64_t kSparseStreamMinBytes = int64_t{16} << 20;

template <typename scalar_t>
class SparseRowKernel {
 public:
  SparseRowKernel(const SparseKDParams& p, SparseScratch& scratch)
      : p_(p), sc_(scratch), vocab_(p.vocab), k_(p.k), full_(p.vocab / kLanes * kLanes),
        rest_(p.vocab - full_),
        div_value_(p.div_weight != 0.f || p.terms != nullptr),
        ce_value_(p.target != nullptr && (p.ce_weight != 0.f || p.terms != nullptr)),
        div_grad_(p.div_weight != 0.f),
        ce_grad_(p.target != nullptr && p.ce_weight != 0.f),
        softcap_(p.softcap > 0.f ? p.softcap : 0.f),
        scale_(div_value_ ? 1.f / p.temperature : 1.f),
        ce_ratio_(div_value_ ? p.temperature : 1.f),
        stream_(p.n_rows * p.vocab * static_cast<int64_t>(sizeof(scalar_t)) >=
                kSparseStreamMinBytes) {}

  // next_row: the row this thread computes next (-1: none), prefetched during sweep B.
  void run(int64_t row, int64_t next_row) {
    ahead_ = static_cast<const scalar_t*>(p_.student) +
             (next_row >= 0 ? next_row : row) * p_.student_row_stride;
    const int64_t label = p_.target != nullptr ? p_.target[row] : -1;
    if ((p_.target != nullptr && label == p_.ignore_index) || !(ce_value_ || div_value_)) {
      zero_row(row);
      return;
    }
    if (softcap_ > 0.f) {
      run_row<true>(row, label);
    } else {
      run_row<false>(row, label);
    }
  }

 private:
  static constexpr bool kIsFloat = std::is_same_v<scalar_t, float>;

  scalar_t* grad_row(int64_t row) const {
    return p_.grad_student == nullptr
               ? nullptr
               : static_cast<scalar_t*>(p_.grad_student) + row * p_.grad_row_stride;
  }

  void zero_row(int64_t row) {
    p_.rows[row] = 0.f;
    if (p_.terms != nullptr) p_.terms[2 * row] = p_.terms[2 * row + 1] = 0.f;
    if (scalar_t* out = grad_row(row)) std::memset(out, 0, sizeof(scalar_t) * vocab_);
  }

  // a = cap(z) * scale for one value.
  float scaled(float z) const {
    return (softcap_ > 0.f ? softcap_ * std::tanh(z / softcap_) : z) * scale_;
  }

  // Per-row quantities shared by the phases.
  struct Row {
    const scalar_t* logits;
    float max_scaled = 0.f;           // max(a)
    float sum = 0.f, log_sum = 0.f;   // Z = sum exp(x)
    float sum_q = 0.f, log_sum_q = 0.f;  // CE normaliser (temperature 1)
    float sum_x = 0.f;                // sum of x (label smoothing)
    float label_x = 0.f;              // x at the label
    float tail = 0.f;                 // sum of exp(x) over the uncovered columns
    float divergence = 0.f, g_sum = 0.f;
  };

  template <bool kSoftcap>
  void run_row(int64_t row, int64_t label) {
    Row r;
    r.logits = static_cast<const scalar_t*>(p_.student) + row * p_.student_row_stride;
    // Everything read at single columns is read before the gradient row is written.
    const float label_raw = ce_value_ ? static_cast<float>(r.logits[label]) : 0.f;
    if (div_value_) gather(row, r.logits);
    r.max_scaled = scaled(raw_max(r.logits));
    if (ce_value_) r.label_x = scaled(label_raw) - r.max_scaled;
    exponentiate<kSoftcap>(r);
    float value = 0.f, ce = 0.f;
    if (div_value_) {
      tail_sum(r);
      categories(r, row);
      value += p_.div_weight * r.divergence;
    }
    if (ce_value_) {
      ce = cross_entropy(r);
      value += p_.ce_weight * ce;
    }
    p_.rows[row] = value;
    if (p_.terms != nullptr) {
      p_.terms[2 * row] = ce;
      p_.terms[2 * row + 1] = div_value_ ? r.divergence : 0.f;
    }
    if (scalar_t* out = grad_row(row)) write_grad<kSoftcap>(r, out, ce_grad_ ? label : -1);
  }

  void gather(int64_t row, const scalar_t* logits) {
    const char* idx_base = static_cast<const char*>(p_.indices);
    for (int64_t j = 0; j < k_; ++j) {
      const int64_t at = row * p_.index_row_stride + j;
      const int64_t v = p_.indices_int64 ? reinterpret_cast<const int64_t*>(idx_base)[at]
                                         : reinterpret_cast<const int32_t*>(idx_base)[at];
      sc_.index[j] = v;
      sc_.gathered[j] = static_cast<float>(logits[v]);
    }
  }

  float raw_max(const scalar_t* logits) const {
    Vec best(kNegInf);
    for (int64_t j = 0; j < full_; j += kLanes) {
      best = at::vec::maximum(best, load_logits(logits + j, kLanes));
    }
    if (rest_ > 0) {
      best = at::vec::maximum(best, keep_lanes(load_logits(logits + full_, rest_), rest_,
                                               kNegInf));
    }
    return lane_max(best);
  }

  // Sweep B.
  template <bool kSoftcap>
  void exponentiate(Row& r) {
    const scalar_t* const logits = r.logits;
    float* const e_buf = sc_.exp_row();
    float* const eq_buf = sc_.ce_exp_row();
    float* const tanh_buf = sc_.tanh_row();
    const float mul = kSoftcap ? softcap_ * scale_ : scale_;
    const float inv_cap = kSoftcap ? 1.f / softcap_ : 0.f;
    const float max_scaled = r.max_scaled;
    const bool ce = ce_value_;
    const bool ce_square = ce && ce_ratio_ == 2.f;
    const bool ce_other = ce && ce_ratio_ != 1.f && !ce_square;
    const bool smoothing = ce && p_.label_smoothing != 0.f;
    const Vec ratio(ce_ratio_);
    const scalar_t* const ahead = ahead_;
    Vec sum_e(0.f), sum_q(0.f), sum_x(0.f);
    auto step = [&](int64_t j, int64_t n) FASTKD_INLINE {
      prefetch_l2(ahead + j);  // the next row's max sweep then reads from L2
      Vec x;
      if constexpr (kSoftcap) {
        const Vec th = (load_logits(logits + j, n) * Vec(inv_cap)).tanh();
        th.store(tanh_buf + j);
        x = at::vec::fmsub(th, Vec(mul), Vec(max_scaled));
      } else {
        x = at::vec::fmsub(load_logits(logits + j, n), Vec(mul), Vec(max_scaled));
      }
      x = keep_lanes(x, n, kNegInf);  // padded lanes: e = 0
      const Vec e = fast_exp(x);
      e.store(e_buf + j);
      sum_e = sum_e + e;
      if (ce_square) {
        sum_q = at::vec::fmadd(e, e, sum_q);
      } else if (ce_other) {
        const Vec eq = fast_exp(x * ratio);
        eq.store(eq_buf + j);
        sum_q = sum_q + eq;
      }
      if (smoothing) sum_x = sum_x + keep_lanes(x, n, 0.f);
    };
    for (int64_t j = 0; j < full_; j += kLanes) step(j, kLanes);
    if (rest_ > 0) step(full_, rest_);
    r.sum = lane_sum(sum_e);
    r.log_sum = std::log(r.sum);
    if (ce) {
      r.sum_q = ce_square || ce_other ? lane_sum(sum_q) : r.sum;
      r.log_sum_q = std::log(r.sum_q);
      if (smoothing) r.sum_x = lane_sum(sum_x);
    }
  }

  // Uncovered mass of the row buffer (see the header).
  void tail_sum(Row& r) {
    float* const e_buf = sc_.exp_row();
    float covered = 0.f;
    for (int64_t j = 0; j < k_; ++j) {
      const float e = e_buf[sc_.index[j]];
      sc_.exp_covered[j] = e;
      covered += e;
    }
    if (covered <= 0.5f * r.sum) {
      r.tail = r.sum - covered;
      return;
    }
    for (int64_t j = 0; j < k_; ++j) e_buf[sc_.index[j]] = 0.f;
    const int64_t padded = full_ + (rest_ > 0 ? kLanes : 0);
    Vec acc(0.f);
    for (int64_t j = 0; j < padded; j += kLanes) acc = acc + Vec::loadu(e_buf + j);
    r.tail = lane_sum(acc);
  }

  // The k + 1 categories, D and g = dD / dlog q (fastkd.reference.sparse._category_divergence).
  void categories(Row& r, int64_t row) {
    using namespace sparse_detail;
    const int64_t k = k_;
    float* const logq = sc_.logq.data();
    float* const logp = sc_.logp.data();
    float* const g = sc_.g.data();
    for (int64_t j = 0; j < k; ++j) {
      logq[j] = (scaled(sc_.gathered[j]) - r.max_scaled) - r.log_sum;
    }
    logq[k] = r.tail > 0.f ? std::log(r.tail / r.sum) : kNegInf;
    // Teacher: re-tempered log-probs, their log-sum-exp.
    float lp_max = kNegInf;
    for (int64_t j = 0; j < k; ++j) {
      logp[j] = p_.teacher_scale *
                scalar_at(p_.logprobs, p_.logprob_type, row * p_.logprob_row_stride + j);
      lp_max = std::max(lp_max, logp[j]);
    }
    float lse = kNegInf;
    if (lp_max > kNegInf) {
      float s = 0.f;
      for (int64_t j = 0; j < k; ++j) s += std::exp(logp[j] - lp_max);
      lse = lp_max + std::log(s);
    }
    if (p_.renormalize) {
      for (int64_t j = 0; j < k; ++j) logp[j] -= lse;
      logp[k] = kNegInf;
    } else if (k == vocab_) {
      logp[k] = kNegInf;  // no column is left for a tail
    } else {
      // Missing mass 1 - sum p; a top-k that sums to >= 1 by rounding has an empty tail.
      logp[k] = std::log(std::max(0.f, -std::expm1(lse)));
    }
    const int64_t cats = k + 1;
    float d = 0.f, g_sum = 0.f;
    const float beta = p_.param_a;
    switch (p_.divergence) {
      case kSparseKL:
        for (int64_t i = 0; i < cats; ++i) {
          const float p = std::exp(logp[i]);
          d += xlogy_term(p, logp[i], logq[i]);
          g[i] = -p;
        }
        break;
      case kSparseReverseKL:
        for (int64_t i = 0; i < cats; ++i) {
          const float q = std::exp(logq[i]);
          if (p_.renormalize && i == k) {  // generalised KL: the tail term is q_tail
            d += q;
            g[i] = q;
          } else {
            d += xlogy_term(q, logq[i], logp[i]);
            g[i] = q > 0.f ? q * (logq[i] - logp[i] + 1.f) : 0.f;
          }
        }
        break;
      case kSparseJSD: {
        const float log_b = std::log(beta), log_1b = std::log1p(-beta);
        float kl_p = 0.f, kl_q = 0.f;
        for (int64_t i = 0; i < cats; ++i) {
          const float p = std::exp(logp[i]), q = std::exp(logq[i]);
          const float logm = log_add_exp(logp[i] + log_b, logq[i] + log_1b);
          kl_p += xlogy_term(p, logp[i], logm);
          kl_q += xlogy_term(q, logq[i], logm);
          g[i] = q > 0.f ? (1.f - beta) * q * (logq[i] - logm) : 0.f;
        }
        d = beta * kl_p + (1.f - beta) * kl_q;
        break;
      }
      default:  // tvd
        for (int64_t i = 0; i < cats; ++i) {
          const float p = std::exp(logp[i]), q = std::exp(logq[i]);
          d += std::abs(p - q);
          g[i] = q > p ? 0.5f * q : (q < p ? -0.5f * q : 0.f);
        }
        d *= 0.5f;
        break;
    }
    for (int64_t i = 0; i < cats; ++i) g_sum += g[i];
    r.divergence = d;
    r.g_sum = g_sum;
  }

  // CE at temperature 1 with label smoothing: x_q = ratio * x (cap(z) - max cap(z)).
  float cross_entropy(const Row& r) const {
    const float eps = p_.label_smoothing;
    float ce = r.log_sum_q;
    if (eps != 1.f) ce -= (1.f - eps) * ce_ratio_ * r.label_x;
    if (eps != 0.f) ce -= eps * ce_ratio_ * r.sum_x / static_cast<float>(vocab_);
    return ce;
  }

  // Sweep C and the covered columns.
  template <bool kSoftcap>
  void write_grad(const Row& r, scalar_t* out, int64_t label) {
    float* const dst = kIsFloat ? reinterpret_cast<float*>(out) : sc_.staging_row();
    const float* const e_buf = sc_.exp_row();
    const float* const eq_buf = sc_.ce_exp_row();
    const float* const tanh_buf = sc_.tanh_row();
    const bool ce = ce_grad_, div = div_grad_;
    const bool ce_same = ce_ratio_ == 1.f, ce_square = ce_ratio_ == 2.f;
    const float eps = p_.label_smoothing;
    const float div_scale = p_.div_weight / p_.temperature;
    const float tail_coef = (div && r.tail > 0.f) ? sc_.g[k_] / r.tail : 0.f;
    const Vec e_coef(div ? div_scale * (tail_coef - r.g_sum / r.sum) : 0.f);
    const float ce_scale_f = ce ? p_.ce_weight / r.sum_q : 0.f;
    const float ce_shift_f = ce ? -p_.ce_weight * eps / static_cast<float>(vocab_) : 0.f;
    const Vec ce_scale(ce_scale_f), ce_shift(ce_shift_f);
    const float label_weight = p_.ce_weight * (1.f - eps);
    const int64_t label_block = label >= 0 ? label - label % kLanes : -1;
    // In place (out == the row read): plain stores hit the lines just read (see the dense
    // kernel's write_grads).
    const bool stream = kIsFloat && stream_ && static_cast<const void*>(out) != r.logits &&
                        reinterpret_cast<uintptr_t>(dst) % kStreamAlign == 0;
    // Covered columns: their own value, CE included (the sweep's value there used the
    // uncovered formula, and a zeroed row buffer when the tail was summed directly). Written
    // by the sweep itself: patching a streamed row afterwards would read every patched line
    // back from memory.
    const bool patch = div_value_;
    if (patch) {
      for (int64_t j = 0; j < k_; ++j) {
        const int64_t v = sc_.index[j];
        const float e = sc_.exp_covered[j];
        float gv = div ? div_scale * (sc_.g[j] - r.g_sum * (e / r.sum)) : 0.f;
        if (ce) {
          const float eq = ce_same ? e : (ce_square ? e * e : eq_buf[v]);
          gv += eq * ce_scale_f + ce_shift_f;
          if (v == label) gv -= label_weight;
        }
        if constexpr (kSoftcap) {
          const float th = tanh_buf[v];
          gv *= 1.f - th * th;
        }
        sc_.patch[v] = gv;
        sc_.covered_column[v] = 1;
        sc_.covered_vector[v / kLanes] = 1;
      }
    }
    const float* const patch_buf = sc_.patch.data();
    const uint8_t* const covered_column = sc_.covered_column.data();
    const uint8_t* const covered_vector = sc_.covered_vector.data();
    auto step = [&](int64_t j, int64_t n) FASTKD_INLINE {
      const Vec e = Vec::loadu(e_buf + j);
      Vec g = e * e_coef;
      if (ce) {
        const Vec eq = ce_same ? e : (ce_square ? e * e : Vec::loadu(eq_buf + j));
        g = at::vec::fmadd(eq, ce_scale, g + ce_shift);
      }
      if (j == label_block) {
        alignas(64) float lanes[kLanes];
        g.store(lanes);
        lanes[label - j] -= label_weight;
        g = Vec::loadu(lanes);
      }
      if constexpr (kSoftcap) {
        const Vec th = Vec::loadu(tanh_buf + j);
        g = g * (Vec(1.f) - th * th);
      }
      if (patch && covered_vector[j / kLanes]) {  // k of the row's V / kLanes vectors at most
        alignas(64) float lanes[kLanes];
        g.store(lanes);
        for (int64_t i = 0; i < n; ++i) {
          if (covered_column[j + i]) lanes[i] = patch_buf[j + i];
        }
        g = Vec::loadu(lanes);
      }
      if (kIsFloat && n < kLanes) {
        g.store(dst + j, n);
      } else if (stream) {
        stream_store(g, dst + j);
      } else {
        g.store(dst + j);
      }
    };
    for (int64_t j = 0; j < full_; j += kLanes) step(j, kLanes);
    if (rest_ > 0) step(full_, rest_);
    if (patch) {
      for (int64_t j = 0; j < k_; ++j) {
        const int64_t v = sc_.index[j];
        sc_.covered_column[v] = 0;
        sc_.covered_vector[v / kLanes] = 0;
      }
    }
    if constexpr (!kIsFloat) at::vec::convert(dst, out, vocab_);
  }

  const SparseKDParams& p_;
  SparseScratch& sc_;
  const int64_t vocab_, k_, full_, rest_;
  const bool div_value_, ce_value_;  // terms evaluated
  const bool div_grad_, ce_grad_;    // terms with a non-zero weight (in the gradient)
  const float softcap_;              // 0: off
  const float scale_;                // 1 / T (1 when only CE is evaluated)
  const float ce_ratio_;             // cap(z) - max cap(z) = ce_ratio * x
  const bool stream_;
  const scalar_t* ahead_ = nullptr;  // the next row's logits (prefetched)
};

template <typename scalar_t>
void sparse_rows_of_type(const SparseKDParams& params, RowQueue& queue) {
  SparseScratch scratch(params.vocab, params.k);
  SparseRowKernel<scalar_t> kernel(params, scratch);
  for_each_row(queue, [&](int64_t row, int64_t next_row) { kernel.run(row, next_row); });
  store_fence();
}

// The capability-specific entry point; the including .cpp gives it its exported name.
inline void sparse_kd_rows_impl(const SparseKDParams& params, RowQueue& queue) {
  switch (params.student_type) {
    case ElementType::kFloat32:
      sparse_rows_of_type<float>(params, queue);
      break;
    case ElementType::kBFloat16:
      sparse_rows_of_type<c10::BFloat16>(params, queue);
      break;
    case ElementType::kFloat16:
      sparse_rows_of_type<c10::Half>(params, queue);
      break;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastkd::cpu

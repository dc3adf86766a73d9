// Row kernel of the fused CPU distillation loss (contract: fastkd.reference.dense_kd_rows).
//
// Included by one .cpp per CPU capability (see dense_kd_cpu_vec.h). Per row of V logits, with
// a = cap(z) / T and x = a - max(a):
//   A  max of the raw student / teacher logits (cap is monotonic, so max(a) = cap(max z) / T).
//   B  x and e = exp(x) per column, e cached in a per-thread float32 row buffer; softmax
//      normalisers and the divergence sums that need no normaliser (kl, reverse_kl).
//      JSD and TVD take one more sweep over the cached values once the normalisers exist.
//   C  student and teacher gradients from the cached e (x recomputed from the logits where a
//      divergence needs log-probabilities), written once in the output dtype.
// Only A and B read the logits from memory (B from cache), and every column is read in C
// before its gradient is written, so the student gradient may overwrite the student logits
// (in-place backward). With softcap, tanh(z / c) is cached in B and reused by C.
// Columns past V in the last vector get x = -inf (zero probability); masks keep 0 * inf out
// of every sum.
//
// Mixed dtypes: the kernel is a template on the student's type S and the teacher type TT it
// reads, and the teacher's gradient type is a run-time value. Five instances per CPU
// capability instead of all nine (S, teacher) pairs:
//   TT = S      equal dtypes (the fast path, unchanged);
//   TT = float  a float32 teacher, read in place; or a 16-bit teacher of the other 16-bit
//               type / under a float32 student, widened once per row into a per-thread
//               float32 row buffer (V * 4 bytes, it stays in L1 / L2, so DRAM still sees each
//               teacher byte once; the sweeps that re-read the teacher read that buffer).
// The teacher gradient is written straight into a float32 output, else computed into a
// float32 staging row and narrowed once to the teacher's dtype (as the 16-bit student
// gradient already is). Rows have their own strides (params.*_row_stride).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>

#include "cpu/dense_kd_cpu.h"
#include "cpu/dense_kd_cpu_row_parts.h"
#include "cpu/dense_kd_cpu_vec.h"
#include "dense_kd_params.h"

namespace fastkd::cpu {
inline namespace CPU_CAPABILITY {

// S: the student's element type (and its gradient's); TT: the type the teacher is read as
// (S, or float for a float32 or widened teacher); teacher_type: the teacher's real dtype.
template <typename scalar_t, typename teacher_t>
class RowKernel {
 public:
  RowKernel(const DenseKDParams& p, ElementType teacher_type, const RowScratch& scratch)
      : p_(p), vocab_(p.vocab), full_(p.vocab / kLanes * kLanes), rest_(p.vocab - full_),
        has_div_(p.div_weight != 0.f), has_ce_(p.target != nullptr && p.ce_weight != 0.f),
        eval_div_(evaluates_divergence(p)), eval_ce_(evaluates_cross_entropy(p)),
        softcap_(p.softcap > 0.f ? p.softcap : 0.f),
        ce_ratio_(eval_div_ ? p.temperature : 1.f),
        stream_outputs_(p.n_rows * p.vocab * static_cast<int64_t>(sizeof(scalar_t)) >=
                        kStreamMinBytes),
        teacher_type_(teacher_type),
        widen_teacher_(std::is_same_v<teacher_t, float> && teacher_type != ElementType::kFloat32),
        teacher_grad_float_(teacher_type == ElementType::kFloat32),
        teacher_bytes_(element_bytes(teacher_type)) {
    s_.exp = scratch.slot(RowScratch::kStudentExp);
    t_.exp = scratch.slot(RowScratch::kTeacherExp);
    s_.tanh = scratch.slot(RowScratch::kStudentTanh);
    t_.tanh = scratch.slot(RowScratch::kTeacherTanh);
    s_.scale = eval_div_ ? 1.f / p.temperature : 1.f;
    t_.scale = 1.f / p.temperature;
    eq_ = scratch.slot(RowScratch::kCeExp);
    jsd_s_ = scratch.slot(RowScratch::kJsdStudent);
    jsd_t_ = scratch.slot(RowScratch::kJsdTeacher);
    staging_s_ = scratch.slot(RowScratch::kStudentStaging);
    staging_t_ = scratch.slot(RowScratch::kTeacherStaging);
    teacher_input_ = scratch.slot(RowScratch::kTeacherInput);
  }

  // next_row: the row this thread computes next (-1: none), prefetched during sweep B.
  void run(int64_t row, int64_t next_row) {
    const int64_t ahead = next_row >= 0 ? next_row : row;
    ahead_s_ = reinterpret_cast<const char*>(static_cast<const scalar_t*>(p_.student) +
                                             ahead * p_.student_row_stride);
    ahead_t_ = static_cast<const char*>(p_.teacher) +
               ahead * p_.teacher_row_stride * teacher_bytes_;
    const int64_t label = p_.target != nullptr ? p_.target[row] : 0;
    if ((p_.target != nullptr && label == p_.ignore_index) || !(eval_ce_ || eval_div_)) {
      write_zero_row(row);
      return;
    }
    s_.logits = static_cast<const scalar_t*>(p_.student) + row * p_.student_row_stride;
    s_.max_scaled = max_scaled(s_);
    RowStats st;
    if (eval_ce_) {
      st.label_shifted = scaled(static_cast<float>(s_.logits[label]), s_) - s_.max_scaled;
    }
    if (eval_div_) {
      const char* teacher_row = static_cast<const char*>(p_.teacher) +
                                row * p_.teacher_row_stride * teacher_bytes_;
      if (widen_teacher_) {
        widen_row(teacher_row, teacher_type_, teacher_input_, vocab_);
        t_.logits = reinterpret_cast<const teacher_t*>(teacher_input_);
      } else {
        t_.logits = reinterpret_cast<const teacher_t*>(teacher_row);
      }
      t_.max_scaled = max_scaled(t_);
    }
    if (softcap_ > 0.f) {
      run_divergence<true>(row, st, label);
    } else {
      run_divergence<false>(row, st, label);
    }
  }

 private:
  static constexpr bool kIsFloat = std::is_same_v<scalar_t, float>;
  using StudentSide = Side<scalar_t>;
  using TeacherSide = Side<teacher_t>;

  template <bool kSoftcap>
  void run_divergence(int64_t row, RowStats& st, int64_t label) {
    switch (p_.divergence) {
      case kKL: return run_as<kKL, kSoftcap>(row, st, label);
      case kReverseKL: return run_as<kReverseKL, kSoftcap>(row, st, label);
      case kJSD: return run_as<kJSD, kSoftcap>(row, st, label);
      case kSkewKL: return run_as<kSkewKL, kSoftcap>(row, st, label);
      case kSkewReverseKL: return run_as<kSkewReverseKL, kSoftcap>(row, st, label);
      case kAKL: return run_as<kAKL, kSoftcap>(row, st, label);
      case kAlphaBeta: return run_as<kAlphaBeta, kSoftcap>(row, st, label);
      default: return run_as<kTVD, kSoftcap>(row, st, label);
    }
  }

  template <int kDiv, bool kSoftcap>
  void run_as(int64_t row, RowStats& st, int64_t label) {
    exponentiate<kDiv, kSoftcap>(st);
    const float div = eval_div_ ? divergence<kDiv, kSoftcap>(st) : 0.f;
    const float ce = eval_ce_ ? cross_entropy(st) : 0.f;
    float value = 0.f;
    if (has_div_) value += p_.div_weight * div;
    if (has_ce_) value += p_.ce_weight * ce;
    p_.rows[row] = value;
    if (p_.terms != nullptr) {
      p_.terms[2 * row] = ce;
      p_.terms[2 * row + 1] = div;
    }
    if (p_.grad_student != nullptr || p_.grad_teacher != nullptr) {
      write_grads<kDiv, kSoftcap>(row, st, has_ce_ ? label : -1);
    }
  }

  template <typename T>
  T* out_row(void* base, int64_t stride, int64_t row) const {
    return base == nullptr ? nullptr : static_cast<T*>(base) + row * stride;
  }

  // Row `row` of the teacher gradient (its own dtype), or nullptr.
  void* teacher_grad_row(int64_t row) const {
    return p_.grad_teacher == nullptr
        ? nullptr
        : static_cast<char*>(p_.grad_teacher) + row * p_.grad_teacher_row_stride * teacher_bytes_;
  }

  void write_zero_row(int64_t row) {
    p_.rows[row] = 0.f;
    if (p_.terms != nullptr) p_.terms[2 * row] = p_.terms[2 * row + 1] = 0.f;
    if (auto* out = out_row<scalar_t>(p_.grad_student, p_.grad_student_row_stride, row)) {
      std::memset(out, 0, sizeof(scalar_t) * vocab_);
    }
    if (void* out = teacher_grad_row(row)) std::memset(out, 0, teacher_bytes_ * vocab_);
  }

  // a = cap(z) * scale for one value.
  template <typename T>
  float scaled(float z, const Side<T>& side) const {
    return (softcap_ > 0.f ? softcap_ * std::tanh(z / softcap_) : z) * side.scale;
  }

  // Sweep A: max(a) from the raw maximum (cap and scale are increasing).
  template <typename T>
  float max_scaled(const Side<T>& side) const {
    Vec best(kNegInf);
    for (int64_t j = 0; j < full_; j += kLanes) {
      best = at::vec::maximum(best, load_logits(side.logits + j, kLanes));
    }
    if (rest_ > 0) {
      best = at::vec::maximum(best, keep_lanes(load_logits(side.logits + full_, rest_), rest_,
                                               kNegInf));
    }
    return scaled(lane_max(best), side);
  }

  template <bool kSoftcap, typename T>
  ShiftedLogits<T, kSoftcap> shifted_view(const Side<T>& side) const {
    return {side.logits, side.tanh, kSoftcap ? softcap_ * side.scale : side.scale,
            side.max_scaled, kSoftcap ? 1.f / softcap_ : 0.f};
  }

  // Sweep B.
  template <int kDiv, bool kSoftcap>
  void exponentiate(RowStats& st) {
    const auto xs_at = shifted_view<kSoftcap>(s_), xt_at = shifted_view<kSoftcap>(t_);
    const int64_t full = full_, rest = rest_;
    const bool div = eval_div_, ce = eval_ce_;
    const bool ce_square = ce && ce_ratio_ == 2.f;
    const bool ce_other = ce && ce_ratio_ != 1.f && !ce_square;
    const bool smoothing = ce && p_.label_smoothing != 0.f;
    const Vec ratio(ce_ratio_);
    float* const es_buf = s_.exp;
    float* const et_buf = t_.exp;
    float* const eq_buf = eq_;
    Vec sum_s(0.f), sum_t(0.f), sum_q(0.f), cross(0.f), shifted_sum(0.f);
    LaneArgmax arg_s, arg_t;  // jsd only
    const char* const ahead_s = ahead_s_;
    const char* const ahead_t = ahead_t_;
    const int64_t teacher_bytes = teacher_bytes_;
    auto step = [&](int64_t j, int64_t n) FASTKD_INLINE {
      // Sweep A of the next row then reads from L2: its memory traffic overlaps this compute.
      prefetch_l2(ahead_s + j * static_cast<int64_t>(sizeof(scalar_t)));
      if (div) prefetch_l2(ahead_t + j * teacher_bytes);
      const Vec xs = xs_at.template at<true>(j, n);
      const Vec es = fast_exp(xs);
      es.store(es_buf + j);
      sum_s = sum_s + es;
      if (div) {
        const Vec xt = xt_at.template at<true>(j, n);
        const Vec et = fast_exp(xt);
        et.store(et_buf + j);
        sum_t = sum_t + et;
        if constexpr (kDiv == kKL) cross = cross + where_positive(et, et * (xt - xs));
        if constexpr (kDiv == kReverseKL) cross = cross + where_positive(es, es * (xs - xt));
        if constexpr (kDiv == kJSD) {
          arg_s.update(es, j);
          arg_t.update(et, j);
        }
      }
      if (ce_square) {
        sum_q = at::vec::fmadd(es, es, sum_q);  // exp(2x) = exp(x)^2: no third exponential
      } else if (ce_other) {
        const Vec eq = fast_exp(xs * ratio);
        eq.store(eq_buf + j);
        sum_q = sum_q + eq;
      }
      if (smoothing) shifted_sum = shifted_sum + keep_lanes(xs, n, 0.f);
    };
    for (int64_t j = 0; j < full; j += kLanes) step(j, kLanes);
    if (rest > 0) step(full, rest);
    s_.sum = lane_sum(sum_s);
    s_.log_sum = std::log(s_.sum);
    if (div) {
      t_.sum = lane_sum(sum_t);
      t_.log_sum = std::log(t_.sum);
      st.cross = lane_sum(cross);
      if constexpr (kDiv == kJSD) {
        st.argmax_s = arg_s.argmax(vocab_);
        st.argmax_t = arg_t.argmax(vocab_);
      }
    }
    if (ce) {
      st.sum_q = ce_square || ce_other ? lane_sum(sum_q) : s_.sum;
      st.log_sum_q = std::log(st.sum_q);
      if (smoothing) st.sum_shifted_s = lane_sum(shifted_sum);
    }
  }

  template <int kDiv, bool kSoftcap>
  float divergence(RowStats& st) {
    if constexpr (kDiv == kKL) {
      st.divergence = st.cross / t_.sum + (s_.log_sum - t_.log_sum);
    } else if constexpr (kDiv == kReverseKL) {
      st.divergence = st.cross / s_.sum + (t_.log_sum - s_.log_sum);
    } else if constexpr (kDiv == kJSD) {
      jsd_sums<kSoftcap>(st);
      st.divergence = p_.param_a * (st.rho_t + st.kl_t) + (1.f - p_.param_a) * (st.rho_s + st.kl_s);
    } else if constexpr (is_new_divergence(kDiv)) {
      new_div_sums<kDiv, kSoftcap>(st);
    } else {
      tvd_sums(st);
    }
    return st.divergence;
  }

  // Extra sweep for JSD. With r = log(p/m) per side (jsd_log_ratios) and rho = r at that
  // side's argmax, KL(p||m) = rho + sum p (r - rho) and its gradient is p ((r - rho) - that
  // sum): near a one-hot distribution the dominant r - rho is exactly 0, where subtracting
  // a float32 KL from r would cancel to a few ulps of r. r - rho is cached for sweep C.
  template <bool kSoftcap>
  void jsd_sums(RowStats& st) {
    const auto xs_at = shifted_view<kSoftcap>(s_), xt_at = shifted_view<kSoftcap>(t_);
    const float* const es_buf = s_.exp;
    const float* const et_buf = t_.exp;
    float* const qs_buf = jsd_s_;
    float* const qt_buf = jsd_t_;
    const int64_t full = full_, rest = rest_;
    const Vec inv_s(1.f / s_.sum), inv_t(1.f / t_.sum), c(s_.log_sum - t_.log_sum);
    const Vec beta(p_.param_a), one_minus_beta(1.f - p_.param_a);
    // log(p_s/m) and log(p_t/m) of n columns at j (d = log(p_s/p_t) from the logits).
    auto ratios = [&](int64_t j, int64_t n, Vec& ps, Vec& pt, Vec& ls, Vec& lt) FASTKD_INLINE {
      ps = load_logits(es_buf + j, n) * inv_s;  // n columns, the rest 0
      pt = load_logits(et_buf + j, n) * inv_t;
      const Vec d = (xs_at.template at<false>(j, n) - xt_at.template at<false>(j, n)) - c;
      jsd_log_ratios(ps, pt, d, beta, one_minus_beta, ls, lt);
    };
    {  // rho from lane 0 of the sweep's own arithmetic, so the argmax's r - rho is exactly 0
      Vec ps, pt, ls, lt;
      ratios(st.argmax_s, 1, ps, pt, ls, lt);
      st.rho_s = first_lane(ls);
      ratios(st.argmax_t, 1, ps, pt, ls, lt);
      st.rho_t = first_lane(lt);
      // Any finite rho gives the same sums; a column of probability 0 (possible only past
      // 2^24 columns, see LaneArgmax) would give an infinite one.
      if (!std::isfinite(st.rho_s)) st.rho_s = 0.f;
      if (!std::isfinite(st.rho_t)) st.rho_t = 0.f;
    }
    const Vec rho_s(st.rho_s), rho_t(st.rho_t);
    Vec kl_t(0.f), kl_s(0.f);
    auto step = [&](int64_t j, int64_t n) FASTKD_INLINE {
      Vec ps, pt, ls, lt;
      ratios(j, n, ps, pt, ls, lt);
      const Vec qs = ls - rho_s, qt = lt - rho_t;
      qs.store(qs_buf + j);
      qt.store(qt_buf + j);
      kl_s = kl_s + where_positive(ps, ps * qs);
      kl_t = kl_t + where_positive(pt, pt * qt);
    };
    for (int64_t j = 0; j < full; j += kLanes) step(j, kLanes);
    if (rest > 0) step(full, rest);
    st.kl_t = lane_sum(kl_t);
    st.kl_s = lane_sum(kl_s);
  }

  // Extra sweep for TVD: D = sum |p_s - p_t| / 2, <p_s, g>, <p_t, g>, g = sign(p_s - p_t) / 2.
  void tvd_sums(RowStats& st) {
    const Vec inv_s(1.f / s_.sum), inv_t(1.f / t_.sum);
    const float* const es_buf = s_.exp;
    const float* const et_buf = t_.exp;
    const int64_t padded = full_ + (rest_ > 0 ? kLanes : 0);
    Vec abs_sum(0.f), dot_s(0.f), dot_t(0.f);
    for (int64_t j = 0; j < padded; j += kLanes) {
      // Padded columns have e = 0 in both rows: they add nothing.
      const Vec ps = Vec::loadu(es_buf + j) * inv_s, pt = Vec::loadu(et_buf + j) * inv_t;
      const Vec d = ps - pt, g = half_sign(d);
      abs_sum = abs_sum + d.abs();
      dot_s = at::vec::fmadd(ps, g, dot_s);
      dot_t = at::vec::fmadd(pt, g, dot_t);
    }
    st.divergence = 0.5f * lane_sum(abs_sum);
    st.dot_s = lane_sum(dot_s);
    st.dot_t = lane_sum(dot_t);
  }

  NewDivConstants new_constants(const RowStats& st) const {
    NewDivConstants k = new_div_constants(s_.log_sum, t_.log_sum, p_.param_a, p_.param_b);
    k.w_head = Vec(st.w_head);
    k.w_tail = Vec(st.w_tail);
    k.sum_g = Vec(st.sum_g);
    k.sum_h = Vec(st.sum_h);
    return k;
  }

  // AKL's head threshold tau (see dense_kd_cpu_new_div.h): bisection on the cached teacher
  // probabilities, then snapped to the smallest value >= the lower bound.
  float akl_threshold() const {
    const float* const et_buf = t_.exp;
    const int64_t padded = full_ + (rest_ > 0 ? kLanes : 0);  // padding: e = 0, never head
    const float inv = 1.f / t_.sum;
    auto mass_from = [&](float tau) {  // sum of p_t >= tau (tau > 0)
      const Vec v_tau(tau), v_inv(inv);
      Vec acc(0.f);
      for (int64_t j = 0; j < padded; j += kLanes) {
        const Vec pt = Vec::loadu(et_buf + j) * v_inv;
        acc = acc + select(greater_equal(pt, v_tau), Vec(0.f), pt);
      }
      return lane_sum(acc);
    };
    float lo = 0.f, hi = inv * (1.f + 1e-6f) + 1e-30f;  // max p_t = 1 / Z_t: e = 1 there
    for (int it = 0; it < 64; ++it) {
      const float mid = 0.5f * (lo + hi);
      if (!(mid > lo && mid < hi)) break;  // adjacent floats
      if (mass_from(mid) >= kAklHeadMass) lo = mid; else hi = mid;
    }
    float tau = hi;  // the smallest p_t >= lo (lo = 0: every value is a candidate)
    for (int64_t j = 0; j < vocab_; ++j) {
      const float pt = et_buf[j] * inv;
      if (pt >= lo && pt > 0.f && pt < tau) tau = pt;
    }
    return tau;
  }

  // Sweep D of codes 4-7: D and the sums of g and h (akl: first its head and weights).
  template <int kDiv, bool kSoftcap>
  void new_div_sums(RowStats& st) {
    const auto xs_at = shifted_view<kSoftcap>(s_), xt_at = shifted_view<kSoftcap>(t_);
    const float* const es_buf = s_.exp;
    const float* const et_buf = t_.exp;
    const int64_t full = full_, rest = rest_;
    const Vec inv_s(1.f / s_.sum), inv_t(1.f / t_.sum);
    NewDivConstants k = new_constants(st);
    Vec acc_d(0.f), acc_g(0.f), acc_h(0.f), acc_ps(0.f), acc_pt(0.f);
    if constexpr (kDiv == kAKL) {
      const Vec tau(akl_threshold());
      Vec gap_head(0.f), gap_all(0.f);
      auto step = [&](int64_t j, int64_t n) FASTKD_INLINE {
        const Vec ps = load_logits(es_buf + j, n) * inv_s;
        const Vec pt = load_logits(et_buf + j, n) * inv_t;
        const Vec ls = xs_at.template at<false>(j, n) - k.log_sum_s;
        const Vec lt = xt_at.template at<false>(j, n) - k.log_sum_t;
        const Vec gap = (ps - pt).abs();
        gap_all = gap_all + gap;
        gap_head = gap_head + select(greater_equal(pt, tau), Vec(0.f), gap);
        acc_g = acc_g + where_positive(pt, pt * (lt - ls));  // FKL
        acc_h = acc_h + where_positive(ps, ps * (ls - lt));  // RKL
        acc_ps = acc_ps + ps;
        acc_pt = acc_pt + pt;
      };
      for (int64_t j = 0; j < full; j += kLanes) step(j, kLanes);
      if (rest > 0) step(full, rest);
      const float total = lane_sum(gap_all), head = lane_sum(gap_head);
      st.w_head = total > 0.f ? head / total : 1.f;
      st.w_tail = total > 0.f ? (total - head) / total : 0.f;
      const float fkl = lane_sum(acc_g), rkl = lane_sum(acc_h);
      // a zero weight keeps its (possibly infinite) KL out
      st.divergence = st.w_head * fkl + (st.w_tail > 0.f ? st.w_tail * rkl : 0.f);
      st.sum_g = (st.w_tail > 0.f ? st.w_tail * rkl : 0.f) - st.w_head * lane_sum(acc_pt);
      st.sum_h = st.w_head * fkl - st.w_tail * lane_sum(acc_ps);
      return;
    }
    auto step = [&](int64_t j, int64_t n) FASTKD_INLINE {
      const Vec ps = load_logits(es_buf + j, n) * inv_s;
      const Vec pt = load_logits(et_buf + j, n) * inv_t;
      Vec d, g, h;
      new_div_terms<kDiv>(k, ps, pt, xs_at.template at<false>(j, n),
                          xt_at.template at<false>(j, n), d, g, h);
      acc_d = acc_d + d;
      acc_g = acc_g + g;
      acc_h = acc_h + h;
    };
    for (int64_t j = 0; j < full; j += kLanes) step(j, kLanes);
    if (rest > 0) step(full, rest);
    st.divergence = lane_sum(acc_d);
    if constexpr (kDiv == kAlphaBeta) st.divergence *= -1.f / (p_.param_a * p_.param_b);
    st.sum_g = lane_sum(acc_g);
    st.sum_h = lane_sum(acc_h);
  }

  // CE at temperature 1 with PyTorch's label smoothing; with x_q = cap(z) - max cap(z) = r x_s,
  // CE = log sum exp(x_q) - (1 - eps) x_q[y] - eps mean(x_q). Zero-weight parts not evaluated.
  float cross_entropy(const RowStats& st) const {
    const float eps = p_.label_smoothing;
    float ce = st.log_sum_q;
    if (eps != 1.f) ce -= (1.f - eps) * ce_ratio_ * st.label_shifted;
    if (eps != 0.f) ce -= eps * ce_ratio_ * st.sum_shifted_s / static_cast<float>(vocab_);
    return ce;
  }

  // Row constants of the divergence gradients (locals of sweep C).
  DivGradConstants div_grad_constants(const RowStats& st) const {
    return {Vec(t_.log_sum - s_.log_sum + st.divergence),
            Vec(s_.log_sum - t_.log_sum + st.divergence),
            Vec(st.kl_s), Vec(st.kl_t), Vec(p_.param_a), Vec(1.f - p_.param_a), Vec(st.dot_s),
            Vec(st.dot_t), jsd_s_, jsd_t_, new_constants(st)};
  }

  // `direct`: dst is the float32 output itself (n lanes written; streamed past the caches
  // when `stream`); otherwise dst is a padded float32 staging row.
  static void store(const Vec& g, float* dst, int64_t j, int64_t n, bool direct, bool stream) {
    if (direct && stream && n == kLanes) {
      stream_store(g, dst + j);
    } else if (!direct || n == kLanes) {
      g.store(dst + j);
    } else {
      g.store(dst + j, n);
    }
  }

  bool streamable(const float* dst, bool direct) const {
    return direct && stream_outputs_ && reinterpret_cast<uintptr_t>(dst) % kStreamAlign == 0;
  }

  // Sweep C: d rows / d z for the student and / or the teacher:
  //   student: cap'(z_s) (ce_w (q - eps/V - (1-eps) onehot(y)) + div_w/T dD/da_s)
  //   teacher: cap'(z_t) div_w/T dD/da_t
  // Every value the loop needs is a local, so it stays in a register.
  template <int kDiv, bool kSoftcap>
  void write_grads(int64_t row, const RowStats& st, int64_t label) {
    scalar_t* const out_s = out_row<scalar_t>(p_.grad_student, p_.grad_student_row_stride, row);
    void* const out_t = has_div_ ? teacher_grad_row(row) : nullptr;
    const bool direct_t = teacher_grad_float_;
    float* const dst_s = kIsFloat ? reinterpret_cast<float*>(out_s) : staging_s_;
    float* const dst_t = direct_t ? static_cast<float*>(out_t) : staging_t_;
    const bool ce = has_ce_, div = has_div_;
    const bool ce_same = ce_ratio_ == 1.f, ce_square = ce_ratio_ == 2.f;
    // kl's teacher and reverse_kl's student gradients need both log-probabilities.
    const bool need_x = div && (kDiv == kReverseKL || (kDiv == kKL && out_t != nullptr) ||
                                is_new_divergence(kDiv));
    const auto xs_at = shifted_view<kSoftcap>(s_), xt_at = shifted_view<kSoftcap>(t_);
    const float* const es_buf = s_.exp;
    const float* const et_buf = t_.exp;
    const float* const eq_buf = eq_;
    const float* const tanh_s = s_.tanh;
    const float* const tanh_t = t_.tanh;
    const DivGradConstants k = div_grad_constants(st);
    const float eps = p_.label_smoothing;
    const Vec inv_s(1.f / s_.sum), inv_t(div ? 1.f / t_.sum : 0.f);
    const Vec ce_scale(ce ? p_.ce_weight / st.sum_q : 0.f);
    const Vec ce_shift(ce ? -p_.ce_weight * eps / static_cast<float>(vocab_) : 0.f);
    const Vec div_scale(p_.div_weight / p_.temperature);
    const float label_weight = p_.ce_weight * (1.f - eps);
    const int64_t label_block = label >= 0 ? label - label % kLanes : -1;
    const int64_t full = full_, rest = rest_;
    // An in-place gradient overwrites lines this row has just read, still in cache: plain
    // stores hit them, while a streaming store would first have to evict each one (measured:
    // the in-place step went from 5% slower than a fresh gradient to 3-5% faster).
    const bool in_place = static_cast<const void*>(dst_s) == static_cast<const void*>(s_.logits);
    const bool stream_s = streamable(dst_s, kIsFloat) && !in_place;
    const bool stream_t = streamable(dst_t, direct_t);
    auto step = [&](int64_t j, int64_t n) FASTKD_INLINE {
      const Vec es = Vec::loadu(es_buf + j);
      const Vec ps = es * inv_s;
      const Vec pt = div ? Vec::loadu(et_buf + j) * inv_t : Vec(0.f);
      // Read before this column's gradient is written (it may overwrite the student).
      const Vec xs = need_x ? xs_at.template at<false>(j, n) : Vec(0.f);
      const Vec xt = need_x ? xt_at.template at<false>(j, n) : Vec(0.f);
      if (out_t != nullptr) {
        Vec g = div_scale * teacher_div_grad<kDiv>(k, j, ps, pt, xs, xt);
        if constexpr (kSoftcap) g = g * cap_grad(tanh_t, j);
        store(g, dst_t, j, n, direct_t, stream_t);
      }
      if (out_s != nullptr) {
        Vec g(0.f);
        if (ce) {
          const Vec eq = ce_same ? es : (ce_square ? es * es : Vec::loadu(eq_buf + j));
          g = at::vec::fmadd(eq, ce_scale, ce_shift);
        }
        if (div) g = at::vec::fmadd(div_scale, student_div_grad<kDiv>(k, j, ps, pt, xs, xt), g);
        if (j == label_block) {
          alignas(64) float lanes[kLanes];
          g.store(lanes);
          lanes[label - j] -= label_weight;
          g = Vec::loadu(lanes);
        }
        if constexpr (kSoftcap) g = g * cap_grad(tanh_s, j);
        store(g, dst_s, j, n, kIsFloat, stream_s);
      }
    };
    for (int64_t j = 0; j < full; j += kLanes) step(j, kLanes);
    if (rest > 0) step(full, rest);
    if constexpr (!kIsFloat) {
      if (out_s != nullptr) at::vec::convert(staging_s_, out_s, vocab_);
    }
    if (out_t != nullptr && !direct_t) narrow_row(staging_t_, teacher_type_, out_t, vocab_);
    if (out_t == nullptr && p_.grad_teacher != nullptr) {  // no divergence: zero gradient
      std::memset(teacher_grad_row(row), 0, teacher_bytes_ * vocab_);
    }
  }

  const DenseKDParams& p_;
  const int64_t vocab_, full_, rest_;  // V, whole-vector columns, columns in the last vector
  const bool has_div_, has_ce_;    // weight != 0: in the row value and the gradients
  const bool eval_div_, eval_ce_;  // evaluated (also for the `terms` output)
  const float softcap_;   // 0: off
  const float ce_ratio_;  // r with cap(z) - max cap(z) = r x_s
  const bool stream_outputs_;  // gradients much larger than the caches: stream them
  const ElementType teacher_type_;
  const bool widen_teacher_;       // teacher rows widened into teacher_input_ first
  const bool teacher_grad_float_;  // the teacher gradient is float32: written directly
  const int64_t teacher_bytes_;
  StudentSide s_;
  TeacherSide t_;
  const char* ahead_s_ = nullptr;  // the next row's student / teacher bytes (prefetched)
  const char* ahead_t_ = nullptr;
  float *eq_, *jsd_s_, *jsd_t_, *staging_s_, *staging_t_, *teacher_input_;
};

template <typename scalar_t, typename teacher_t>
void rows_of_type(const DenseKDParams& params, ElementType teacher_type, RowQueue& queue) {
  const RowScratch scratch(params.vocab);
  RowKernel<scalar_t, teacher_t> kernel(params, teacher_type, scratch);
  for_each_row(queue, [&](int64_t row, int64_t next_row) { kernel.run(row, next_row); });
  store_fence();
}

// Equal dtypes read the teacher as the student's type; any other teacher as float (see the
// header comment): 5 instances.
template <typename scalar_t>
void rows_for_student(const DenseKDParams& params, ElementType student_type,
                      ElementType teacher_type, RowQueue& queue) {
  if (teacher_type == student_type) {
    rows_of_type<scalar_t, scalar_t>(params, teacher_type, queue);
  } else {
    rows_of_type<scalar_t, float>(params, teacher_type, queue);
  }
}

// The capability-specific entry point; the including .cpp gives it its exported name.
inline void dense_kd_rows_impl(const DenseKDParams& params, ElementType student_type,
                               ElementType teacher_type, RowQueue& queue) {
  switch (student_type) {
    case ElementType::kFloat32:
      rows_of_type<float, float>(params, teacher_type, queue);
      break;
    case ElementType::kBFloat16:
      rows_for_student<c10::BFloat16>(params, student_type, teacher_type, queue);
      break;
    case ElementType::kFloat16:
      rows_for_student<c10::Half>(params, student_type, teacher_type, queue);
      break;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastkd::cpu

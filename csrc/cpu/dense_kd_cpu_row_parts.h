// Building blocks of the fused CPU row kernel (dense_kd_cpu_rows.h): per-thread row buffers,
// one side of a row, shifted-logit loads, the row's scalars, dtype widening / narrowing, and
// the per-column divergence gradients of sweep C.
//
// Included only through dense_kd_cpu_rows.h, after CPU_CAPABILITY is defined; everything
// lives in the capability's inline namespace.
#pragma once

#include <cstdint>
#include <memory>

#include "cpu/dense_kd_cpu.h"
#include "cpu/dense_kd_cpu_new_div.h"
#include "cpu/dense_kd_cpu_vec.h"
#include "dense_kd_params.h"

namespace fastkd::cpu {
inline namespace CPU_CAPABILITY {

constexpr int kKL = static_cast<int>(Divergence::kKL);
constexpr int kReverseKL = static_cast<int>(Divergence::kReverseKL);
constexpr int kJSD = static_cast<int>(Divergence::kJSD);
constexpr int kTVD = static_cast<int>(Divergence::kTVD);

// Per-thread float32 row buffers, each padded to a whole number of vectors (uninitialised).
class RowScratch {
 public:
  enum Slot { kStudentExp, kTeacherExp, kCeExp, kJsdStudent, kJsdTeacher, kStudentTanh,
              kTeacherTanh, kStudentStaging, kTeacherStaging, kTeacherInput, kNumSlots };

  explicit RowScratch(int64_t vocab)
      : padded_((vocab + kLanes - 1) / kLanes * kLanes),
        storage_(new float[static_cast<size_t>(padded_ * kNumSlots)]) {}

  float* slot(Slot s) const { return storage_.get() + padded_ * static_cast<int64_t>(s); }

 private:
  int64_t padded_;
  std::unique_ptr<float[]> storage_;
};

// One side (student or teacher) of a row.
template <typename scalar_t>
struct Side {
  const scalar_t* logits = nullptr;
  float* exp = nullptr;       // e = exp(x), padded
  float* tanh = nullptr;      // tanh(z / c) (softcap only), padded
  float scale = 1.f;          // 1 / T, or 1 for a CE-only student
  float max_scaled = 0.f;     // max(a)
  float sum = 0.f, log_sum = 0.f;
};

// x = cap(z) * scale - max(a) of one side, from local copies (so the hot loops keep them in
// registers instead of reloading members that a float store might alias).
template <typename scalar_t, bool kSoftcap>
struct ShiftedLogits {
  const scalar_t* logits;
  float* tanh;
  float mul;         // scale, or softcap * scale
  float max_scaled;
  float inv_cap;

  // Columns [j, j + n), -inf past n. kCacheTanh: compute tanh(z / c) from the logits and
  // cache it (sweep B); otherwise reuse the cached value.
  template <bool kCacheTanh>
  FASTKD_INLINE Vec at(int64_t j, int64_t n) const {
    Vec x;
    if constexpr (kSoftcap) {
      Vec th;
      if constexpr (kCacheTanh) {
        th = (load_logits(logits + j, n) * Vec(inv_cap)).tanh();
        th.store(tanh + j);
      } else {
        th = Vec::loadu(tanh + j);
      }
      x = at::vec::fmsub(th, Vec(mul), Vec(max_scaled));
    } else {
      x = at::vec::fmsub(load_logits(logits + j, n), Vec(mul), Vec(max_scaled));
    }
    return keep_lanes(x, n, kNegInf);
  }
};

// Scalars of one row beyond the two sides.
struct RowStats {
  float sum_q = 0.f, log_sum_q = 0.f;  // normaliser of the temperature-1 softmax (CE)
  float cross = 0.f;         // kl: sum e_t (x_t - x_s); reverse_kl: sum e_s (x_s - x_t)
  float sum_shifted_s = 0.f; // sum over the vocabulary of x_s (label smoothing)
  float label_shifted = 0.f; // x_s[y]
  float divergence = 0.f;    // D(p_t, p_s)
  // jsd: rho = log(p/m) at the side's argmax, kl = KL(p||m) - rho (see jsd_sums)
  float rho_t = 0.f, rho_s = 0.f, kl_t = 0.f, kl_s = 0.f;
  int64_t argmax_s = 0, argmax_t = 0;  // jsd: columns of the largest probabilities
  float dot_s = 0.f, dot_t = 0.f;  // tvd: <p_s, g>, <p_t, g>
  // codes 4-7: sum of g = p_s dD/dp_s and h = p_t dD/dp_t; akl's detached weights
  float sum_g = 0.f, sum_h = 0.f, w_head = 1.f, w_tail = 0.f;
};

// Gradients of at least this many bytes are written with streaming stores.
constexpr int64_t kStreamMinBytes = int64_t{16} << 20;

inline int64_t element_bytes(ElementType type) {
  return type == ElementType::kFloat32 ? 4 : 2;
}

// dst[0, n) = src[0, n) widened to float32 (src of a 16-bit type).
inline void widen_row(const void* src, ElementType type, float* dst, int64_t n) {
  if (type == ElementType::kBFloat16) {
    at::vec::convert(static_cast<const c10::BFloat16*>(src), dst, n);
  } else {
    at::vec::convert(static_cast<const c10::Half*>(src), dst, n);
  }
}

// dst[0, n) = src[0, n) rounded to a 16-bit `type`.
inline void narrow_row(const float* src, ElementType type, void* dst, int64_t n) {
  if (type == ElementType::kBFloat16) {
    at::vec::convert(src, static_cast<c10::BFloat16*>(dst), n);
  } else {
    at::vec::convert(src, static_cast<c10::Half*>(dst), n);
  }
}

// Row constants of the divergence gradients (locals of sweep C).
struct DivGradConstants {
  Vec kl_shift_t;   // kl teacher: log Z_t - log Z_s + D
  Vec rkl_shift_s;  // reverse_kl student: log Z_s - log Z_t + D
  Vec jsd_kl_s, jsd_kl_t;  // jsd: KL(p||m) - rho per side
  Vec beta, one_minus_beta;
  Vec dot_s, dot_t;  // tvd
  const float* jsd_ratio_s;  // jsd: log(p/m) - rho per column
  const float* jsd_ratio_t;
  NewDivConstants nd;        // codes 4-7
};

// d D / d a_s at column j.
template <int kDiv>
inline Vec student_div_grad(const DivGradConstants& k, int64_t j, const Vec& ps,
                            const Vec& pt, const Vec& xs, const Vec& xt) {
  if constexpr (kDiv == kKL) {
    return ps - pt;
  } else if constexpr (kDiv == kReverseKL) {
    return where_positive(ps, ps * (xs - xt - k.rkl_shift_s));
  } else if constexpr (kDiv == kJSD) {
    return k.one_minus_beta *
           where_positive(ps, ps * (Vec::loadu(k.jsd_ratio_s + j) - k.jsd_kl_s));
  } else if constexpr (is_new_divergence(kDiv)) {
    Vec d, g, h;
    new_div_terms<kDiv>(k.nd, ps, pt, xs, xt, d, g, h);
    return at::vec::fnmadd(ps, k.nd.sum_g, g);
  } else {
    return ps * (half_sign(ps - pt) - k.dot_s);
  }
}

// d D / d a_t at column j.
template <int kDiv>
inline Vec teacher_div_grad(const DivGradConstants& k, int64_t j, const Vec& ps,
                            const Vec& pt, const Vec& xs, const Vec& xt) {
  if constexpr (kDiv == kKL) {
    return where_positive(pt, pt * (xt - xs - k.kl_shift_t));
  } else if constexpr (kDiv == kReverseKL) {
    return pt - ps;
  } else if constexpr (kDiv == kJSD) {
    return k.beta * where_positive(pt, pt * (Vec::loadu(k.jsd_ratio_t + j) - k.jsd_kl_t));
  } else if constexpr (is_new_divergence(kDiv)) {
    Vec d, g, h;
    new_div_terms<kDiv>(k.nd, ps, pt, xs, xt, d, g, h);
    return at::vec::fnmadd(pt, k.nd.sum_h, h);
  } else {
    return pt * (k.dot_t - half_sign(ps - pt));
  }
}

// cap'(z) = 1 - tanh(z / c)^2 from the cached tanh.
inline Vec cap_grad(const float* tanh, int64_t j) {
  const Vec th = Vec::loadu(tanh + j);
  return Vec(1.f) - th * th;
}

}  // namespace CPU_CAPABILITY
}  // namespace fastkd::cpu

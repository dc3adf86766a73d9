// Vector helpers of the fused CPU distillation kernel, on at::vec::Vectorized<float>.
//
// Included (through dense_kd_cpu_rows.h) by one .cpp per CPU capability, after that file has
// defined CPU_CAPABILITY; everything lives in an inline namespace of that name so the builds
// (portable, AVX2, AVX-512) never collide at link time.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fastkd::cpu {
inline namespace CPU_CAPABILITY {

// The sweeps' per-vector bodies are lambdas called for whole vectors and once for the last,
// partial one; GCC may otherwise leave them out of line (a call per vector).
#if defined(__GNUC__)
#define FASTKD_INLINE __attribute__((always_inline))
#else
#define FASTKD_INLINE
#endif

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

inline float first_lane(const Vec& v) {
  alignas(64) float lanes[kLanes];
  v.store(lanes);
  return lanes[0];
}

inline float lane_max(const Vec& v) {
  alignas(64) float lanes[kLanes];
  v.store(lanes);
  float best = lanes[0];
  for (int64_t i = 1; i < kLanes; ++i) {
    if (lanes[i] > best || lanes[i] != lanes[i]) best = lanes[i];  // NaN propagates
  }
  return best;
}

// n (<= kLanes) logits from p as float32; lanes >= n are 0.
template <typename T>
inline Vec load_logits(const T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return n == kLanes ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    if (n == kLanes) {
      Vec out;
      at::vec::load_to_float(p, out);
      return out;
    }
    alignas(64) float widened[kLanes] = {};
    for (int64_t i = 0; i < n; ++i) widened[i] = static_cast<float>(p[i]);
    return Vec::loadu(widened);
  }
}

// Lanes >= n replaced by `fill` (n == kLanes: v itself).
inline Vec keep_lanes(const Vec& v, int64_t n, float fill) {
  return n == kLanes ? v : Vec::set(Vec(fill), v, n);
}

// Lane-wise compares and selects. ATen's AVX-512 compare returns a lane mask that its blendv
// turns back into a bit mask (two instructions more per select than the compare and blend
// the hardware has), so the AVX-512 build keeps the bit mask (__mmask16) instead.
#if defined(CPU_CAPABILITY_AVX512)
using Mask = __mmask16;
inline Mask greater(const Vec& a, const Vec& b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
inline Mask greater_equal(const Vec& a, const Vec& b) {
  return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ);
}
inline Vec select(Mask m, const Vec& a, const Vec& b) { return _mm512_mask_blend_ps(m, a, b); }
#else
using Mask = Vec;
inline Mask greater(const Vec& a, const Vec& b) { return a > b; }
inline Mask greater_equal(const Vec& a, const Vec& b) { return a >= b; }
inline Vec select(const Mask& m, const Vec& a, const Vec& b) { return Vec::blendv(a, b, m); }
#endif
// select(m, a, b): b in the lanes where m holds, a elsewhere.

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
// Register-level primitives at this build's width (8 lanes AVX2, 16 lanes AVX-512), so that
// fast_exp / fast_log below are written once for both. AVX-512 compares give a bit mask
// (__mmask16) where AVX2 gives a lane mask; select / add_where hide that difference. The two
// functions live in this namespace too, so its names hide the C library's div / select.
namespace simd {
#if defined(CPU_CAPABILITY_AVX512)
using F = __m512;
using I = __m512i;
using M = __mmask16;
inline F set1(float a) { return _mm512_set1_ps(a); }
inline I set1i(int32_t a) { return _mm512_set1_epi32(a); }
inline F add(F a, F b) { return _mm512_add_ps(a, b); }
inline F sub(F a, F b) { return _mm512_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm512_mul_ps(a, b); }
inline F div(F a, F b) { return _mm512_div_ps(a, b); }
inline F max(F a, F b) { return _mm512_max_ps(a, b); }  // b when either is NaN
inline F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
inline F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
inline I bits(F a) { return _mm512_castps_si512(a); }
inline F from_bits(I a) { return _mm512_castsi512_ps(a); }
template <int kShift> inline I shift_left(I a) { return _mm512_slli_epi32(a, kShift); }
template <int kShift> inline I shift_right(I a) { return _mm512_srli_epi32(a, kShift); }
inline I sub_int(I a, I b) { return _mm512_sub_epi32(a, b); }
inline I and_int(I a, I b) { return _mm512_and_si512(a, b); }
inline I or_int(I a, I b) { return _mm512_or_si512(a, b); }
inline F to_float(I a) { return _mm512_cvtepi32_ps(a); }
inline M greater(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
inline M less(F a, F b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
inline F select(M m, F a, F b) { return _mm512_mask_blend_ps(m, a, b); }  // b where m
inline F add_where(M m, F a, F b) { return _mm512_mask_add_ps(a, m, a, b); }  // a + (m ? b : 0)
#else
using F = __m256;
using I = __m256i;
using M = __m256;
inline F set1(float a) { return _mm256_set1_ps(a); }
inline I set1i(int32_t a) { return _mm256_set1_epi32(a); }
inline F add(F a, F b) { return _mm256_add_ps(a, b); }
inline F sub(F a, F b) { return _mm256_sub_ps(a, b); }
inline F mul(F a, F b) { return _mm256_mul_ps(a, b); }
inline F div(F a, F b) { return _mm256_div_ps(a, b); }
inline F max(F a, F b) { return _mm256_max_ps(a, b); }  // b when either is NaN
inline F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
inline F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
inline I bits(F a) { return _mm256_castps_si256(a); }
inline F from_bits(I a) { return _mm256_castsi256_ps(a); }
template <int kShift> inline I shift_left(I a) { return _mm256_slli_epi32(a, kShift); }
template <int kShift> inline I shift_right(I a) { return _mm256_srli_epi32(a, kShift); }
inline I sub_int(I a, I b) { return _mm256_sub_epi32(a, b); }
inline I and_int(I a, I b) { return _mm256_and_si256(a, b); }
inline I or_int(I a, I b) { return _mm256_or_si256(a, b); }
inline F to_float(I a) { return _mm256_cvtepi32_ps(a); }
inline M greater(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
inline M less(F a, F b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
inline F select(M m, F a, F b) { return _mm256_blendv_ps(a, b, m); }  // b where m
inline F add_where(M m, F a, F b) { return _mm256_add_ps(a, _mm256_and_ps(m, b)); }
#endif

// exp(x) for x <= 88 in 14 instructions, max relative error ~1.2e-7 (about 1 ulp) on normal
// results; results below ~2^-126 flush to 0, -inf gives 0, NaN stays NaN.
// exp(x) = 2^n e^r, n = round(x / ln 2) by the 1.5 * 2^23 rounding trick (the same sum holds
// n + 127 in its low mantissa bits, so a shift gives the bits of 2^n), r = x - n ln 2 with a
// two-part ln 2, e^r = 1 + r + r^2 q(r) with q a degree-4 least-squares fit on
// [-ln2/2, ln2/2] (coefficients fitted for this file). Sleef's u10 exp costs about twice as
// much, and exponentials are the bulk of the work here.
inline Vec fast_exp(const Vec& vec_x) {
  const F x = vec_x;
  // max(-88, NaN) is NaN; x <= -88 gives n = -127, whose exponent bits make 2^n == 0.
  const F v = max(set1(-88.f), x);
  const F magic = set1(12583039.f);  // 1.5 * 2^23 + 127
  const F shifted = fmadd(v, set1(1.44269504f), magic);
  const F n = sub(shifted, magic);  // round(x / ln 2)
  F r = fnmadd(n, set1(0.693359375f), v);
  r = fnmadd(n, set1(-2.12194440e-4f), r);
  F q = fmadd(set1(0.0013933645f), r, set1(0.0083631761f));
  q = fmadd(q, r, set1(0.0416664667f));
  q = fmadd(q, r, set1(0.166665763f));
  q = fmadd(q, r, set1(0.5f));
  const F er = add(fmadd(mul(r, r), q, r), set1(1.f));
  return mul(er, from_bits(shift_left<23>(bits(shifted))));
}

// log(x) for x >= 0 in ~20 instructions, max error ~1.6 ulp; x below FLT_MIN (0 and
// denormals) gives -inf. x = 2^e m with m in [sqrt(1/2), sqrt(2)), log m = 2 atanh(s),
// s = (m - 1) / (m + 1), |s| <= 0.172, by its series to s^9 (truncation ~2e-9 relative).
inline Vec fast_log(const Vec& vec_x) {
  const F x = vec_x;
  const I b = bits(x);
  F e = to_float(sub_int(shift_right<23>(b), set1i(127)));
  F m = from_bits(or_int(and_int(b, set1i(0x007FFFFF)), set1i(0x3F800000)));
  const M big = greater(m, set1(1.41421356f));
  m = select(big, m, mul(m, set1(0.5f)));
  e = add_where(big, e, set1(1.f));
  const F f = sub(m, set1(1.f));
  const F s = div(f, add(f, set1(2.f)));
  const F s2 = mul(s, s);
  F poly = fmadd(set1(1.f / 9.f), s2, set1(1.f / 7.f));
  poly = fmadd(poly, s2, set1(1.f / 5.f));
  poly = fmadd(poly, s2, set1(1.f / 3.f));
  poly = mul(poly, s2);
  const F two_s = add(s, s);
  const F log_m = fmadd(two_s, poly, two_s);
  // e ln 2 in two parts (the high part times e is exact).
  const F low = fmadd(e, set1(-2.12194440e-4f), log_m);
  const F result = fmadd(e, set1(0.693359375f), low);
  return select(less(x, set1(1.17549435e-38f)), result, set1(kNegInf));
}

}  // namespace simd
using simd::fast_exp;
using simd::fast_log;
#else
inline Vec fast_exp(const Vec& x) { return x.exp(); }
inline Vec fast_log(const Vec& x) { return x.log(); }
#endif

// Store that bypasses the caches (dst aligned to kStreamAlign, a whole vector): for outputs
// far larger than the caches it saves reading every destination line first. store_fence()
// orders such stores before the results are handed to other threads.
constexpr uintptr_t kStreamAlign = sizeof(Vec);
#if defined(CPU_CAPABILITY_AVX512)
inline void stream_store(const Vec& v, float* dst) { _mm512_stream_ps(dst, v); }
inline void store_fence() { _mm_sfence(); }
#elif defined(CPU_CAPABILITY_AVX2)
inline void stream_store(const Vec& v, float* dst) { _mm256_stream_ps(dst, v); }
inline void store_fence() { _mm_sfence(); }
#else
inline void stream_store(const Vec& v, float* dst) { v.store(dst); }
inline void store_fence() {}
#endif

// Asks for the cache line at p in L2 (prefetcht1): the row kernels fetch the next row's
// logits from memory while they compute on the current row, whose sweeps run from cache.
FASTKD_INLINE inline void prefetch_l2(const void* p) { __builtin_prefetch(p, 0, 2); }

// v where p > 0, else 0: drops the 0 * (+-inf) and NaN products of zero-probability columns.
inline Vec where_positive(const Vec& p, const Vec& v) {
  return select(greater(p, Vec(0.f)), Vec(0.f), v);
}

// JSD log-ratios (log(p_s / m), log(p_t / m)), m = beta p_t + (1 - beta) p_s, from the
// probabilities and d = log(p_s / p_t), without forming m: with u = min / max of the two
// probabilities, the larger side's ratio is lg = -log(beta u + 1 - beta) (student larger) or
// -log(beta + (1 - beta) u) (teacher larger), a log of a value in [min(beta, 1 - beta), 1];
// the other side's is lg -+ |d|. So near a one-hot teacher with a small student probability
// every dominant column rounds to the same -log(beta), which the reference shift of the
// JSD sums then cancels exactly. Columns where both probabilities are 0 give NaN and where
// one is 0 that side's ratio is -inf: callers mask both with where_positive.
inline void jsd_log_ratios(const Vec& ps, const Vec& pt, const Vec& d, const Vec& beta,
                           const Vec& one_minus_beta, Vec& log_ratio_s, Vec& log_ratio_t) {
  const Mask student_larger = greater_equal(ps, pt);  // false where either is NaN
  // min / max, NaN where either is NaN (then the compare is false: ps / pt).
  const Vec u = select(student_larger, ps, pt) / select(student_larger, pt, ps);
  const Vec lg = Vec(0.f) - fast_log(select(student_larger,
                                            at::vec::fmadd(one_minus_beta, u, beta),
                                            at::vec::fmadd(beta, u, one_minus_beta)));
  log_ratio_s = select(student_larger, lg + d, lg);
  log_ratio_t = select(student_larger, lg, lg - d);
}

// Running argmax of a row's non-negative values, one candidate per lane. Column indices are
// held as floats (exact below 2^24 columns; beyond that the column found may be a neighbour
// of the maximum, which only its users' accuracy, never their result, depends on).
struct LaneArgmax {
  Vec best = Vec(-1.f);
  Vec column = Vec(0.f);
  const Vec iota = Vec::arange(0.f, 1.f);

  FASTKD_INLINE void update(const Vec& v, int64_t j) {
    const Mask better = greater(v, best);
    best = select(better, best, v);
    column = select(better, column, iota + Vec(static_cast<float>(j)));
  }

  // The column of the largest value, clamped into [0, vocab).
  int64_t argmax(int64_t vocab) const {
    alignas(64) float values[kLanes], columns[kLanes];
    best.store(values);
    column.store(columns);
    int64_t lane = 0;
    for (int64_t i = 1; i < kLanes; ++i) {
      if (values[i] > values[lane]) lane = i;
    }
    return std::clamp<int64_t>(static_cast<int64_t>(columns[lane]), 0, vocab - 1);
  }
};

// g = sign(d) / 2, the TVD subgradient (0 where d == 0).
inline Vec half_sign(const Vec& d) {
  const Vec half(0.5f), zero(0.f);
  return select(greater(d, zero), zero, half) - select(greater(zero, d), zero, half);
}

}  // namespace CPU_CAPABILITY
}  // namespace fastkd::cpu

// skew_kl, skew_reverse_kl, akl and alpha_beta (codes 4-7) of the fused CPU row kernel: the
// per-column terms and the row sweep that sums them (docs/semantics.md, the divergences).
//
// With ls = log p_s, lt = log p_t and, per column, g = p_s dD/dp_s, h = p_t dD/dp_t, the
// logit gradients are dD/da_s = g - p_s sum(g), dD/da_t = h - p_t sum(h). Sweep D (after
// sweep B's normalisers) sums D, g and h; sweep C recomputes g and h per column from the
// logits (no extra row buffer) and subtracts the sums. The "+ p" constants of g / h are
// dropped (they cancel in the softmax chain rule).
//
// AKL needs the teacher's head threshold tau (the largest value with sum_{p_t >= tau} p_t
// >= 1/2) per row: found by bisection on [0, max p_t] over the cached teacher exponentials
// (each step one sweep summing the values >= mid; it stops when mid is no longer strictly
// between the bounds, i.e. the bounds are adjacent floats, or after 64 steps), then tau is
// snapped to the smallest teacher value >= the lower bound, so the head is chosen by value
// (ties all in), as in the reference's sort.
//
// Included only through dense_kd_cpu_rows.h (inside the capability's namespace).
#pragma once

#include <cmath>
#include <cstdint>

#include "cpu/dense_kd_cpu_vec.h"
#include "dense_kd_params.h"

namespace fastkd::cpu {
inline namespace CPU_CAPABILITY {

constexpr int kSkewKL = static_cast<int>(Divergence::kSkewKL);
constexpr int kSkewReverseKL = static_cast<int>(Divergence::kSkewReverseKL);
constexpr int kAKL = static_cast<int>(Divergence::kAKL);
constexpr int kAlphaBeta = static_cast<int>(Divergence::kAlphaBeta);
constexpr bool is_new_divergence(int d) { return d >= kSkewKL && d <= kAlphaBeta; }

// AKL's head mass (fixed, Wu et al. 2025).
constexpr float kAklHeadMass = 0.5f;

// Row constants of the new divergences (locals of sweeps C and D).
struct NewDivConstants {
  Vec log_sum_s, log_sum_t;  // log Z: log p = x - log Z
  Vec log_w, log_1mw;        // skew: log lambda, log(1 - lambda) (-inf for lambda = 0)
  Vec lam, one_minus_lam;
  Vec a, b, ab_sum, inv_a, inv_b;  // alpha_beta
  Vec w_head, w_tail;        // akl (detached weights)
  Vec sum_g, sum_h;          // sums of g and h (sweep D)
};

inline NewDivConstants new_div_constants(float log_sum_s, float log_sum_t, float param_a,
                                         float param_b) {
  NewDivConstants k;
  k.log_sum_s = Vec(log_sum_s);
  k.log_sum_t = Vec(log_sum_t);
  k.log_w = Vec(std::log(param_a));
  k.log_1mw = Vec(std::log1p(-param_a));
  k.lam = Vec(param_a);
  k.one_minus_lam = Vec(1.f - param_a);
  k.a = Vec(param_a);
  k.b = Vec(param_b);
  k.ab_sum = Vec(param_a + param_b);
  k.inv_a = Vec(param_a > 0.f ? 1.f / param_a : 0.f);
  k.inv_b = Vec(param_b > 0.f ? 1.f / param_b : 0.f);
  k.w_head = Vec(1.f);
  k.w_tail = Vec(0.f);
  k.sum_g = k.sum_h = Vec(0.f);
  return k;
}

// log(e^u + e^v) with -inf where both are -inf (no inf - inf NaN).
inline Vec log_add_exp(const Vec& u, const Vec& v) {
  const Vec hi = at::vec::maximum(u, v), lo = at::vec::minimum(u, v);
  const Vec sum = hi + (fast_exp(lo - hi)).log1p();
  return select(greater(hi, Vec(kNegInf)), Vec(kNegInf), sum);
}

// KL(p || w p + (1 - w) r) per column: d, g_p = p dD/dp (minus p), g_r = r dD/dr, given
// log p, log r (skew_kl: p teacher, r student; skew_reverse_kl: p student, r teacher).
inline void skew_terms(const Vec& p, const Vec& lp, const Vec& lr, const NewDivConstants& k,
                       Vec& d, Vec& g_p, Vec& g_r) {
  const Vec lm = log_add_exp(k.log_w + lp, k.log_1mw + lr);
  const Vec lpm = lp - lm;
  d = where_positive(p, p * lpm);
  g_p = where_positive(p, d - k.lam * fast_exp(lp + lpm));
  g_r = where_positive(p, Vec(0.f) - k.one_minus_lam * fast_exp(lr + lpm));
}

// Per column of codes 4, 5, 7: d (the column's share of D), g and h. ps, pt: probabilities;
// xs, xt: shifted logits (log p = x - log Z).
template <int kDiv>
FASTKD_INLINE inline void new_div_terms(const NewDivConstants& k, const Vec& ps, const Vec& pt,
                                 const Vec& xs, const Vec& xt, Vec& d, Vec& g, Vec& h) {
  const Vec ls = xs - k.log_sum_s, lt = xt - k.log_sum_t;
  if constexpr (kDiv == kSkewKL) {
    skew_terms(pt, lt, ls, k, d, h, g);
  } else if constexpr (kDiv == kSkewReverseKL) {
    skew_terms(ps, ls, lt, k, d, g, h);
  } else if constexpr (kDiv == kAKL) {
    // D = w_h KL(p_t || p_s) + w_t KL(p_s || p_t); d is unused (sums in akl_sums)
    const Vec fkl = where_positive(pt, pt * (lt - ls)), rkl = where_positive(ps, ps * (ls - lt));
    d = Vec(0.f);
    g = k.w_tail * rkl - k.w_head * pt;
    h = k.w_head * fkl - k.w_tail * ps;
  } else {  // alpha_beta; p^x = exp(x log p), 0 where p = 0
    const Vec cross = fast_exp(k.a * lt + k.b * ls);
    const Vec pow_t = fast_exp(k.ab_sum * lt), pow_s = fast_exp(k.ab_sum * ls);
    d = cross - k.a / k.ab_sum * pow_t - k.b / k.ab_sum * pow_s;  // times -1 / (a b) later
    g = (pow_s - cross) * k.inv_a;
    h = (pow_t - cross) * k.inv_b;
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace fastkd::cpu

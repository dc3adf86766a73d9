// Generic dense distillation kernel: one CTA per row (grid-stride over rows), any GPU from
// sm_80 on, any vocabulary size.
//
// Sweeps over global memory per row:
//   1. online statistics: max / sum-exp of student and teacher at T, of the student at T = 1
//      (CE, only when T != 1), the KL / reverse-KL cross term, sum of logits (label
//      smoothing); block reduction;
//   2. JSD / TVD only: the sums that need the final log-sum-exps; block reduction;
//   3. the gradient (when asked), written in the input dtype.
// Bytes per row: (2 or 3) * (reads of student + teacher) + writes of the gradients; the
// re-reads hit L2 only when the rows in flight fit in it. The Hopper cluster kernel
// (dense_kd_cluster.cu) reads each row once; this kernel is its fallback.
//
// In-place backward (grad_student == student): every thread reads an element and writes its
// gradient in the same iteration of sweep 3, after all other sweeps (and the target logit
// read) completed behind a block barrier, so no element is written before its last read.
//
// Mixed dtypes: TS (student and its gradient) and TT (teacher and its gradient) are separate
// template parameters; both sides use the same element layout (16-byte vectors only when the
// two element sizes are equal, else coalesced scalar accesses, see dispatch_instance).
#include <cmath>

#include "dense_kd_device.cuh"

namespace fastkd {
namespace cuda_detail {

using kd_math::RowScalars;

constexpr int kGenericUnroll = 2;  // steps whose loads are in flight together per thread

template <class TS, class TT, int kDiv, bool kVector>
__global__ void __launch_bounds__(cuda::kGenericThreads)
    dense_kd_generic_kernel(const DenseKDParams p) {
  constexpr int kThreads = cuda::kGenericThreads;
  using L = Layout<TS, kVector, kThreads>;
  using LT = Layout<TT, kVector, kThreads>;
  static_assert(L::kE == LT::kE, "student and teacher need the same element layout");
  constexpr int kE = L::kE;
  constexpr int64_t kSweep = L::kStep * kGenericUnroll;
  __shared__ RowStats stats_scratch[kThreads / kWarpSize];
  __shared__ Sum3 sum_scratch[kThreads / kWarpSize];

  const RowOptions o = kd_math::make_row_options(p);
  const int tid = threadIdx.x;
  const int64_t vocab = p.vocab;

  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    const TS* s = static_cast<const TS*>(p.student) + row * p.student_row_stride;
    const TT* t = static_cast<const TT*>(p.teacher) + row * p.teacher_row_stride;
    TS* gs = p.grad_student == nullptr
                 ? nullptr
                 : static_cast<TS*>(p.grad_student) + row * p.grad_student_row_stride;
    TT* gt = p.grad_teacher == nullptr
                 ? nullptr
                 : static_cast<TT*>(p.grad_teacher) + row * p.grad_teacher_row_stride;
    const int64_t y = p.target != nullptr ? p.target[row] : -1;

    if (p.target != nullptr && y == p.ignore_index) {
      if (gs != nullptr) zero_fill<TS, kVector, kThreads>(gs, vocab);
      if (gt != nullptr) zero_fill<TT, kVector, kThreads>(gt, vocab);
      if (tid == 0) kd_math::write_ignored_row(p, row);
      continue;
    }

    // Sweep 1: online statistics. The target logit is read here, before any write.
    RowStats st = kd_math::empty_stats();
    if (tid == 0 && o.has_ce) {
      st.zy = (y >= 0 && y < vocab) ? kd_math::capped(to_float(s[y]), o) : NAN;
    }
    for (int64_t base = 0; base < vocab; base += kSweep) {
      float sv[kGenericUnroll][kE], tv[kGenericUnroll][kE] = {};
      bool ok[kGenericUnroll][kE], ok_t[kE];
#pragma unroll
      for (int u = 0; u < kGenericUnroll; ++u) {
        L::load(s, base + u * L::kStep, vocab, tid, sv[u], ok[u]);
        if (o.has_div) LT::load(t, base + u * L::kStep, vocab, tid, tv[u], ok_t);
      }
#pragma unroll
      for (int u = 0; u < kGenericUnroll; ++u) {
        kd_math::accumulate<kDiv, kE>(st, sv[u], tv[u], ok[u], o);
      }
    }
    st = block_reduce<kThreads>(st, stats_scratch, StatsMerge<kDiv>{&o});
    RowScalars r = kd_math::finish_stats<kDiv>(st, o);

    // Sweep 2 (JSD, TVD): sums over the final probabilities.
    if constexpr (kd_math::needs_second_reduction(kDiv)) {
      if (o.has_div) {
        Sum3 acc = {{0.0f, 0.0f, 0.0f}};
        for (int64_t base = 0; base < vocab; base += kSweep) {
          float sv[kGenericUnroll][kE], tv[kGenericUnroll][kE];
          bool ok[kGenericUnroll][kE];
#pragma unroll
          for (int u = 0; u < kGenericUnroll; ++u) {
            L::load(s, base + u * L::kStep, vocab, tid, sv[u], ok[u]);
            LT::load(t, base + u * L::kStep, vocab, tid, tv[u], ok[u]);
          }
#pragma unroll
          for (int u = 0; u < kGenericUnroll; ++u) {
#pragma unroll
            for (int k = 0; k < kE; ++k) {
              kd_math::accumulate_second<kDiv>(acc.v, sv[u][k], tv[u][k], ok[u][k], r, o);
            }
          }
        }
        acc = block_reduce<kThreads>(acc, sum_scratch, SumMerge{});
        kd_math::finish_second<kDiv>(r, acc.v, o);
      }
    }
    if (tid == 0) kd_math::write_row(p, row, r, o);

    // Sweep 3: gradients.
    if (gs == nullptr && gt == nullptr) continue;
    for (int64_t base = 0; base < vocab; base += kSweep) {
      float sv[kGenericUnroll][kE], tv[kGenericUnroll][kE] = {};
      bool ok[kGenericUnroll][kE], ok_t[kE];
#pragma unroll
      for (int u = 0; u < kGenericUnroll; ++u) {
        L::load(s, base + u * L::kStep, vocab, tid, sv[u], ok[u]);
        if (o.has_div) LT::load(t, base + u * L::kStep, vocab, tid, tv[u], ok_t);
      }
#pragma unroll
      for (int u = 0; u < kGenericUnroll; ++u) {
        const int64_t step = base + u * L::kStep;
        float g_s[kE], g_t[kE];
#pragma unroll
        for (int k = 0; k < kE; ++k) {
          const bool is_target = step + L::pos(tid, k) == y;
          kd_math::grad_element<kDiv>(sv[u][k], tv[u][k], is_target, r, o, g_s[k], g_t[k]);
        }
        if (gs != nullptr) L::store(gs, step, vocab, tid, g_s);
        if (gt != nullptr) LT::store(gt, step, vocab, tid, g_t);
      }
    }
  }
}

}  // namespace cuda_detail

namespace cuda {
namespace detail {

cudaError_t launch_generic(const DenseKDParams& p, DType student_dtype, DType teacher_dtype,
                           const DenseKDPlan& plan, cudaStream_t stream) {
  using namespace cuda_detail;
  return dispatch_instance(student_dtype, teacher_dtype, p.divergence, plan.vector,
                           [&](auto s_tag, auto t_tag, auto div_tag, auto vec_tag) -> cudaError_t {
    using TS = typename decltype(s_tag)::type;
    using TT = typename decltype(t_tag)::type;
    constexpr int kDiv = decltype(div_tag)::value;
    constexpr bool kVector = decltype(vec_tag)::value;
    cudaLaunchConfig_t config = {};
    config.gridDim = dim3(static_cast<unsigned>(plan.grid));
    config.blockDim = dim3(static_cast<unsigned>(plan.threads));
    config.dynamicSmemBytes = 0;
    config.stream = stream;
    return cudaLaunchKernelEx(&config, dense_kd_generic_kernel<TS, TT, kDiv, kVector>, p);
  });
}

}  // namespace detail
}  // namespace cuda
}  // namespace fastkd

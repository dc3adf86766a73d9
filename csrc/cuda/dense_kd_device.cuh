// Device-side building blocks shared by the generic and the cluster kernels: dtype
// conversion, the per-thread element layout (16-byte vectors or strided scalars), and
// warp / block reductions of the row statistics. Internal to csrc/cuda/.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "dense_kd.cuh"
#include "dense_kd_math.cuh"

namespace fastkd {
namespace cuda_detail {

using kd_math::RowOptions;
using kd_math::RowStats;

constexpr int kWarpSize = 32;

// ---- dtype conversion (float32 maths, storage in the input dtype, round to nearest even) ----
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <class T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}

// ---- element layout ----
// One "step" of a CTA covers kThreads * kE consecutive elements of a row slice; element k
// (0 <= k < kE) of thread `tid` in the step sits at offset pos(tid, k):
//   vector mode: the thread's own 16-byte vector, tid * kE + k (one 128-bit access);
//   scalar mode (rows not 16-byte aligned): k * kThreads + tid (coalesced per k).
// Vector mode requires 16-byte aligned row starts and a slice length that is a multiple of
// kE (checked on the host), so a vector is either wholly inside the slice or wholly outside.
template <class T, bool kVector, int kThreads>
struct Layout {
  static constexpr int kE = kVector ? static_cast<int>(16 / sizeof(T)) : 4;
  static constexpr int64_t kStep = static_cast<int64_t>(kThreads) * kE;

  __device__ __forceinline__ static int64_t pos(int tid, int k) {
    return kVector ? static_cast<int64_t>(tid) * kE + k
                   : static_cast<int64_t>(k) * kThreads + tid;
  }

  // out[k] = row[base + pos(tid, k)] as float, valid[k] = that index < len (else out[k] = 0).
  __device__ __forceinline__ static void load(const T* row, int64_t base, int64_t len, int tid,
                                              float (&out)[kE], bool (&valid)[kE]) {
    if constexpr (kVector) {
      const int64_t i = base + pos(tid, 0);
      const bool ok = i < len;
      uint4 raw = make_uint4(0u, 0u, 0u, 0u);
      if (ok) raw = *reinterpret_cast<const uint4*>(row + i);
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kE; ++k) {
        out[k] = to_float(e[k]);
        valid[k] = ok;
      }
    } else {
#pragma unroll
      for (int k = 0; k < kE; ++k) {
        const int64_t i = base + pos(tid, k);
        valid[k] = i < len;
        out[k] = valid[k] ? to_float(row[i]) : 0.0f;
      }
    }
  }

  // row[base + pos(tid, k)] = in[k] for the indices < len (streaming stores: written once).
  __device__ __forceinline__ static void store(T* row, int64_t base, int64_t len, int tid,
                                               const float (&in)[kE]) {
    if constexpr (kVector) {
      const int64_t i = base + pos(tid, 0);
      if (i >= len) return;
      uint4 raw;
      T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
      for (int k = 0; k < kE; ++k) e[k] = from_float<T>(in[k]);
      __stcs(reinterpret_cast<uint4*>(row + i), raw);
    } else {
#pragma unroll
      for (int k = 0; k < kE; ++k) {
        const int64_t i = base + pos(tid, k);
        if (i < len) __stcs(row + i, from_float<T>(in[k]));
      }
    }
  }
};

// Writes zeros to row[0, len) with the whole CTA (gradient rows of ignored tokens).
template <class T, bool kVector, int kThreads>
__device__ __forceinline__ void zero_fill(T* row, int64_t len) {
  using L = Layout<T, kVector, kThreads>;
  float zeros[L::kE];
#pragma unroll
  for (int k = 0; k < L::kE; ++k) zeros[k] = 0.0f;
  for (int64_t base = 0; base < len; base += L::kStep) L::store(row, base, len, threadIdx.x, zeros);
}

// ---- reductions ----
// kArgmaxDiffs: also the JSD fields (z_s - z_t at the maxima), dead for other divergences.
template <bool kArgmaxDiffs>
__device__ __forceinline__ RowStats shfl_xor(const RowStats& v, int lane_mask) {
  RowStats o;
  o.ms = __shfl_xor_sync(0xffffffffu, v.ms, lane_mask);
  o.mt = __shfl_xor_sync(0xffffffffu, v.mt, lane_mask);
  o.ss = __shfl_xor_sync(0xffffffffu, v.ss, lane_mask);
  o.st = __shfl_xor_sync(0xffffffffu, v.st, lane_mask);
  o.sq = __shfl_xor_sync(0xffffffffu, v.sq, lane_mask);
  o.x = __shfl_xor_sync(0xffffffffu, v.x, lane_mask);
  o.sum_z = __shfl_xor_sync(0xffffffffu, v.sum_z, lane_mask);
  o.zy = __shfl_xor_sync(0xffffffffu, v.zy, lane_mask);
  if (kArgmaxDiffs) {
    o.dzs = __shfl_xor_sync(0xffffffffu, v.dzs, lane_mask);
    o.dzt = __shfl_xor_sync(0xffffffffu, v.dzt, lane_mask);
  } else {
    o.dzs = o.dzt = 0.0f;
  }
  return o;
}

struct Sum3 {
  float v[3];
};

__device__ __forceinline__ Sum3 shfl_xor(const Sum3& a, int lane_mask) {
  Sum3 o;
#pragma unroll
  for (int i = 0; i < 3; ++i) o.v[i] = __shfl_xor_sync(0xffffffffu, a.v[i], lane_mask);
  return o;
}

// Merge functors (symmetric, so butterfly lanes agree bit for bit), with the lane shuffle of
// what they merge.
template <int kDiv>
struct StatsMerge {
  const RowOptions* o;
  __device__ __forceinline__ RowStats shuffled(const RowStats& v, int lane_mask) const {
    return shfl_xor<kDiv == kd_math::kJSD>(v, lane_mask);
  }
  __device__ __forceinline__ void operator()(RowStats& a, const RowStats& b) const {
    kd_math::merge<kDiv>(a, b, *o);
  }
};

struct SumMerge {
  __device__ __forceinline__ Sum3 shuffled(const Sum3& v, int lane_mask) const {
    return shfl_xor(v, lane_mask);
  }
  __device__ __forceinline__ void operator()(Sum3& a, const Sum3& b) const {
#pragma unroll
    for (int i = 0; i < 3; ++i) a.v[i] += b.v[i];
  }
};

// Butterfly over lane groups of `width` (a power of two <= 32): every lane ends with the merge
// of its group.
template <class V, class Merge>
__device__ __forceinline__ V warp_reduce(V v, Merge merge, int width = kWarpSize) {
  for (int mask = width / 2; mask > 0; mask /= 2) merge(v, merge.shuffled(v, mask));
  return v;
}

// Reduces one value per thread over the CTA; every thread gets the same result.
// scratch: kThreads / 32 slots of shared memory. Starts and ends with the CTA in step, so
// consecutive calls may reuse `scratch`.
template <int kThreads, class V, class Merge>
__device__ __forceinline__ V block_reduce(V v, V* scratch, Merge merge) {
  constexpr int kWarps = kThreads / kWarpSize;
  v = warp_reduce(v, merge);
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) scratch[warp] = v;
  __syncthreads();
  V total = scratch[0];
#pragma unroll
  for (int w = 1; w < kWarps; ++w) merge(total, scratch[w]);
  __syncthreads();
  return total;
}

// ---- host-side dispatch over the template parameters ----

template <class T> struct TypeTag { using type = T; };
template <int V> struct IntTag { static constexpr int value = V; };
template <bool V> struct BoolTag { static constexpr bool value = V; };

// Calls f(TypeTag<TS>{}, TypeTag<TT>{}, IntTag<divergence>{}, BoolTag<vector>{}) for the
// runtime values, so a launcher names each kernel template instance once. Student and
// teacher share one element layout, so 16-byte vector instances exist only for pairs of
// equal element size (the planner never asks for vectors otherwise): per kernel
// 9 pairs x 4 divergences x (2 or 1) = 56 instances (24 with one dtype for both).
template <class F>
cudaError_t dispatch_instance(cuda::DType student_dtype, cuda::DType teacher_dtype,
                              int divergence, bool vector, F&& f) {
  auto by_vector = [&](auto s_tag, auto t_tag, auto div_tag) -> cudaError_t {
    using TS = typename decltype(s_tag)::type;
    using TT = typename decltype(t_tag)::type;
    if constexpr (sizeof(TS) == sizeof(TT)) {
      if (vector) return f(s_tag, t_tag, div_tag, BoolTag<true>{});
    } else {
      if (vector) return cudaErrorInvalidValue;
    }
    return f(s_tag, t_tag, div_tag, BoolTag<false>{});
  };
  auto by_divergence = [&](auto s_tag, auto t_tag) -> cudaError_t {
    switch (divergence) {
      case kd_math::kKL: return by_vector(s_tag, t_tag, IntTag<kd_math::kKL>{});
      case kd_math::kReverseKL: return by_vector(s_tag, t_tag, IntTag<kd_math::kReverseKL>{});
      case kd_math::kJSD: return by_vector(s_tag, t_tag, IntTag<kd_math::kJSD>{});
      case kd_math::kTVD: return by_vector(s_tag, t_tag, IntTag<kd_math::kTVD>{});
      default: return cudaErrorInvalidValue;
    }
  };
  auto by_teacher = [&](auto s_tag) -> cudaError_t {
    switch (teacher_dtype) {
      case cuda::DType::kFloat32: return by_divergence(s_tag, TypeTag<float>{});
      case cuda::DType::kBFloat16: return by_divergence(s_tag, TypeTag<__nv_bfloat16>{});
      case cuda::DType::kFloat16: return by_divergence(s_tag, TypeTag<__half>{});
    }
    return cudaErrorInvalidValue;
  };
  switch (student_dtype) {
    case cuda::DType::kFloat32: return by_teacher(TypeTag<float>{});
    case cuda::DType::kBFloat16: return by_teacher(TypeTag<__nv_bfloat16>{});
    case cuda::DType::kFloat16: return by_teacher(TypeTag<__half>{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda_detail
}  // namespace fastkd

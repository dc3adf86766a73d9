// Hopper (sm_90) single-read dense distillation kernel: a thread-block cluster of C CTAs
// (C = 1..16, a power of two) owns one row at a time; CTA r keeps columns
// [r * chunk, (r + 1) * chunk) of the student and teacher rows in its shared memory.
//
// Per row:
//   1. copy the slice global -> shared with 16-byte cp.async in 4 commit groups, folding
//      each group into per-thread online statistics as soon as it lands (every thread reads
//      back only the vectors it copied itself, so no barrier is needed before that);
//   2. block reduction -> one partial per CTA; cluster.sync(); warp 0 of every CTA reads the
//      C partials through distributed shared memory (map_shared_rank) and merges them in the
//      same butterfly order, so all CTAs hold bit-identical row statistics;
//   3. JSD / TVD: a second sweep over shared memory and a second cluster exchange;
//   4. barrier_arrive (done reading remote shared memory), gradient of the slice from shared
//      memory to global memory, barrier_wait (nobody still reads our partials, so they and
//      the slice buffers may be reused for the next row, or the CTA may exit).
// HBM traffic: each logit is read once and each gradient written once (the byte floor);
// the extra sweeps are shared-memory reads. grad_student may alias student: a CTA writes only
// its own slice, after all of its copies have completed (cp.async.wait_group 0 and a block
// barrier), and no other CTA reads that slice.
//
// Mixed dtypes: the student slice (TS) and the teacher slice (TT) sit one after the other in
// shared memory, the teacher's at the next 16-byte boundary (teacher_slice_offset, used by
// the planner too); both use one element layout (vectors only for equal element sizes).
//
// Compiled to an empty body below sm_90 (setup.py also builds sm_80); the host never launches
// it there (dense_kd.cu plans the generic kernel instead).
#include <cooperative_groups.h>

#include <cmath>
#include <map>
#include <mutex>
#include <tuple>

#include "dense_kd_device.cuh"

namespace fastkd {
namespace cuda_detail {

namespace cg = cooperative_groups;
using kd_math::RowScalars;

constexpr int kCopyStages = 4;  // cp.async commit groups per slice

__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem_src)
               : "memory");
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}

// Waits until at most kCopyStages - 1 - stage commit groups are still in flight.
__device__ __forceinline__ void cp_async_wait_stage(int stage) {
  switch (stage) {
    case 0: asm volatile("cp.async.wait_group 3;\n" ::: "memory"); break;
    case 1: asm volatile("cp.async.wait_group 2;\n" ::: "memory"); break;
    case 2: asm volatile("cp.async.wait_group 1;\n" ::: "memory"); break;
    default: asm volatile("cp.async.wait_group 0;\n" ::: "memory"); break;
  }
}
static_assert(kCopyStages == 4, "cp_async_wait_stage assumes 4 stages");

// Copies steps [first, last) of this thread's slice elements from global to shared memory.
template <class T, bool kVector, int kThreads>
__device__ __forceinline__ void copy_steps(T* dst, const T* src, int64_t first, int64_t last,
                                           int64_t len) {
  using L = Layout<T, kVector, kThreads>;
  const int tid = threadIdx.x;
  for (int64_t i = first; i < last; ++i) {
    if constexpr (kVector) {
      const int64_t off = i * L::kStep + L::pos(tid, 0);
      if (off < len) cp_async_16(dst + off, src + off);
    } else {
      // Rows not 16-byte aligned: plain loads, kE in flight per thread.
      T v[L::kE];
#pragma unroll
      for (int k = 0; k < L::kE; ++k) {
        const int64_t off = i * L::kStep + L::pos(tid, k);
        if (off < len) v[k] = src[off];
      }
#pragma unroll
      for (int k = 0; k < L::kE; ++k) {
        const int64_t off = i * L::kStep + L::pos(tid, k);
        if (off < len) dst[off] = v[k];
      }
    }
  }
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// Merges one partial per cluster rank with warp 0; the result lands in `*total` (local
// shared memory) and is visible to the whole CTA after the closing __syncthreads.
template <class V, class Merge>
__device__ __forceinline__ void merge_cluster_partials(cg::cluster_group& cluster, V* partial,
                                                       V* total, V identity, Merge merge) {
  if (threadIdx.x < kWarpSize) {
    V v = identity;
    if (threadIdx.x < cluster.num_blocks()) {
      v = *cluster.map_shared_rank(partial, static_cast<int>(threadIdx.x));
    }
    v = warp_reduce(v, merge);
    if (threadIdx.x == 0) *total = v;
  }
  __syncthreads();
}
#endif  // __CUDA_ARCH__ >= 900

template <class TS, class TT, int kDiv, bool kVector>
__global__ void __launch_bounds__(cuda::kClusterThreads, 2)
    dense_kd_cluster_kernel(const DenseKDParams p, const int64_t chunk) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kThreads = cuda::kClusterThreads;
  using L = Layout<TS, kVector, kThreads>;
  using LT = Layout<TT, kVector, kThreads>;
  static_assert(L::kE == LT::kE, "student and teacher need the same element layout");
  constexpr int kE = L::kE;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ RowStats stats_scratch[kThreads / kWarpSize];
  __shared__ Sum3 sum_scratch[kThreads / kWarpSize];
  __shared__ RowStats stats_partial, stats_total;
  __shared__ Sum3 sum_partial, sum_total;

  cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int64_t csize = cluster.num_blocks();
  const int64_t cluster_id = blockIdx.x / csize;
  const int64_t n_clusters = gridDim.x / csize;
  const int tid = threadIdx.x;

  const RowOptions o = kd_math::make_row_options(p);
  const int64_t vocab = p.vocab;
  const int64_t begin = rank * chunk;
  const int64_t len = begin < vocab ? (vocab - begin < chunk ? vocab - begin : chunk) : 0;
  const int64_t n_steps = (len + L::kStep - 1) / L::kStep;
  const int64_t steps_per_stage = (n_steps + kCopyStages - 1) / kCopyStages;
  TS* s_buf = reinterpret_cast<TS*>(smem);
  // Used only when the divergence is evaluated.
  TT* t_buf = reinterpret_cast<TT*>(smem + cuda::teacher_slice_offset(chunk, sizeof(TS)));

  for (int64_t row = cluster_id; row < p.n_rows; row += n_clusters) {
    const TS* s = static_cast<const TS*>(p.student) + row * p.student_row_stride + begin;
    const TT* t = static_cast<const TT*>(p.teacher) + row * p.teacher_row_stride + begin;
    TS* gs = p.grad_student == nullptr
                 ? nullptr
                 : static_cast<TS*>(p.grad_student) + row * p.grad_student_row_stride + begin;
    TT* gt = p.grad_teacher == nullptr
                 ? nullptr
                 : static_cast<TT*>(p.grad_teacher) + row * p.grad_teacher_row_stride + begin;
    const int64_t y = p.target != nullptr ? p.target[row] : -1;

    // Ignored row: the whole cluster takes this branch (same target), no exchange needed.
    if (p.target != nullptr && y == p.ignore_index) {
      if (gs != nullptr) zero_fill<TS, kVector, kThreads>(gs, len);
      if (gt != nullptr) zero_fill<TT, kVector, kThreads>(gt, len);
      if (rank == 0 && tid == 0) kd_math::write_ignored_row(p, row);
      continue;
    }

    // 1. Slice -> shared memory, statistics folded stage by stage.
#pragma unroll 1
    for (int g = 0; g < kCopyStages; ++g) {
      const int64_t first = g * steps_per_stage;
      const int64_t last = first + steps_per_stage < n_steps ? first + steps_per_stage : n_steps;
      copy_steps<TS, kVector, kThreads>(s_buf, s, first, last, len);
      if (o.has_div) copy_steps<TT, kVector, kThreads>(t_buf, t, first, last, len);
      cp_async_commit();
    }
    RowStats st = kd_math::empty_stats();
#pragma unroll 1
    for (int g = 0; g < kCopyStages; ++g) {
      cp_async_wait_stage(g);
      const int64_t first = g * steps_per_stage;
      const int64_t last = first + steps_per_stage < n_steps ? first + steps_per_stage : n_steps;
      for (int64_t i = first; i < last; ++i) {
        float sv[kE], tv[kE] = {};
        bool ok[kE], ok_t[kE];
        L::load(s_buf, i * L::kStep, len, tid, sv, ok);
        if (o.has_div) LT::load(t_buf, i * L::kStep, len, tid, tv, ok_t);
        kd_math::accumulate<kDiv, kE>(st, sv, tv, ok, o);
      }
    }

    // 2. CTA partial (its __syncthreads also publishes every thread's copies to the CTA),
    //    then the cluster exchange.
    st = block_reduce<kThreads>(st, stats_scratch, StatsMerge<kDiv>{&o});
    if (tid == 0) {
      if (o.has_ce && y >= begin && y < begin + len) {
        st.zy = kd_math::capped(to_float(s_buf[y - begin]), o);
      } else if (o.has_ce && rank == 0 && (y < 0 || y >= vocab)) {
        st.zy = NAN;  // label out of range (unchecked under torch.compile): poison the row
      }
      stats_partial = st;
    }
    cluster.sync();
    merge_cluster_partials(cluster, &stats_partial, &stats_total, kd_math::empty_stats(),
                           StatsMerge<kDiv>{&o});
    RowScalars r = kd_math::finish_stats<kDiv>(stats_total, o);

    // 3. JSD / TVD: sums over the final probabilities, second exchange.
    if constexpr (kd_math::needs_second_reduction(kDiv)) {
      if (o.has_div) {
        Sum3 acc = {{0.0f, 0.0f, 0.0f}};
        for (int64_t i = 0; i < n_steps; ++i) {
          float sv[kE], tv[kE];
          bool ok[kE];
          L::load(s_buf, i * L::kStep, len, tid, sv, ok);
          LT::load(t_buf, i * L::kStep, len, tid, tv, ok);
#pragma unroll
          for (int k = 0; k < kE; ++k) {
            kd_math::accumulate_second<kDiv>(acc.v, sv[k], tv[k], ok[k], r, o);
          }
        }
        acc = block_reduce<kThreads>(acc, sum_scratch, SumMerge{});
        if (tid == 0) sum_partial = acc;
        cluster.sync();
        merge_cluster_partials(cluster, &sum_partial, &sum_total, Sum3{{0.0f, 0.0f, 0.0f}},
                               SumMerge{});
        kd_math::finish_second<kDiv>(r, sum_total.v, o);
      }
    }
    cluster.barrier_arrive();  // this CTA no longer reads other CTAs' shared memory
    if (rank == 0 && tid == 0) kd_math::write_row(p, row, r, o);

    // 4. Gradient of the slice, from shared memory.
    if (gs != nullptr || gt != nullptr) {
      for (int64_t i = 0; i < n_steps; ++i) {
        float sv[kE], tv[kE] = {}, g_s[kE], g_t[kE];
        bool ok[kE], ok_t[kE];
        L::load(s_buf, i * L::kStep, len, tid, sv, ok);
        if (o.has_div) LT::load(t_buf, i * L::kStep, len, tid, tv, ok_t);
#pragma unroll
        for (int k = 0; k < kE; ++k) {
          const bool is_target = begin + i * L::kStep + L::pos(tid, k) == y;
          kd_math::grad_element<kDiv>(sv[k], tv[k], is_target, r, o, g_s[k], g_t[k]);
        }
        if (gs != nullptr) L::store(gs, i * L::kStep, len, tid, g_s);
        if (gt != nullptr) LT::store(gt, i * L::kStep, len, tid, g_t);
      }
    }
    cluster.barrier_wait();  // every CTA finished reading our partials: reuse / exit is safe
  }
#endif
}

template <class TS, class TT, int kDiv, bool kVector>
cudaLaunchConfig_t cluster_config(const cuda::DenseKDPlan& plan, cudaStream_t stream,
                                  cudaLaunchAttribute* attr) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(plan.grid));
  config.blockDim = dim3(static_cast<unsigned>(plan.threads));
  config.dynamicSmemBytes = plan.smem_bytes;
  config.stream = stream;
  attr->id = cudaLaunchAttributeClusterDimension;
  attr->val.clusterDim.x = static_cast<unsigned>(plan.cluster_size);
  attr->val.clusterDim.y = 1;
  attr->val.clusterDim.z = 1;
  config.attrs = attr;
  config.numAttrs = 1;
  return config;
}

// Per-process caches: the largest dynamic shared memory already allowed per (device, kernel)
// (raised, never lowered, so concurrent launches of smaller plans stay valid) and the
// number of co-resident clusters per (device, kernel, cluster size, shared memory).
std::mutex g_cache_mutex;
std::map<std::pair<int, const void*>, size_t> g_smem_allowed;
std::map<std::tuple<int, const void*, int, size_t>, int> g_active_clusters;

template <class TS, class TT, int kDiv, bool kVector>
cudaError_t prepare_instance(const cuda::DenseKDPlan& plan, int* max_active_clusters) {
  void (*kernel)(DenseKDParams, int64_t) = dense_kd_cluster_kernel<TS, TT, kDiv, kVector>;
  const void* key = reinterpret_cast<const void*>(kernel);
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  std::lock_guard<std::mutex> lock(g_cache_mutex);
  size_t& allowed = g_smem_allowed[{device, key}];
  if (allowed < plan.smem_bytes) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(plan.smem_bytes));
    if (err != cudaSuccess) return err;
    allowed = plan.smem_bytes;
  }
  if (plan.cluster_size > 8) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err != cudaSuccess) return err;
  }
  const auto occupancy_key = std::make_tuple(device, key, plan.cluster_size, plan.smem_bytes);
  auto it = g_active_clusters.find(occupancy_key);
  if (it == g_active_clusters.end()) {
    cudaLaunchAttribute attr;
    cudaLaunchConfig_t config = cluster_config<TS, TT, kDiv, kVector>(plan, nullptr, &attr);
    int n = 0;
    err = cudaOccupancyMaxActiveClusters(&n, kernel, &config);
    if (err != cudaSuccess) return err;
    it = g_active_clusters.emplace(occupancy_key, n).first;
  }
  *max_active_clusters = it->second;
  return cudaSuccess;
}

}  // namespace cuda_detail

namespace cuda {
namespace detail {

cudaError_t prepare_cluster(const DenseKDParams& p, DType student_dtype, DType teacher_dtype,
                            const DenseKDPlan& plan, int* max_active_clusters) {
  using namespace cuda_detail;
  return dispatch_instance(student_dtype, teacher_dtype, p.divergence, plan.vector,
                           [&](auto s_tag, auto t_tag, auto div_tag, auto vec_tag) -> cudaError_t {
    using TS = typename decltype(s_tag)::type;
    using TT = typename decltype(t_tag)::type;
    return prepare_instance<TS, TT, decltype(div_tag)::value, decltype(vec_tag)::value>(
        plan, max_active_clusters);
  });
}

cudaError_t launch_cluster(const DenseKDParams& p, DType student_dtype, DType teacher_dtype,
                           const DenseKDPlan& plan, cudaStream_t stream) {
  using namespace cuda_detail;
  return dispatch_instance(student_dtype, teacher_dtype, p.divergence, plan.vector,
                           [&](auto s_tag, auto t_tag, auto div_tag, auto vec_tag) -> cudaError_t {
    using TS = typename decltype(s_tag)::type;
    using TT = typename decltype(t_tag)::type;
    constexpr int kDiv = decltype(div_tag)::value;
    constexpr bool kVector = decltype(vec_tag)::value;
    cudaLaunchAttribute attr;
    cudaLaunchConfig_t config = cluster_config<TS, TT, kDiv, kVector>(plan, stream, &attr);
    return cudaLaunchKernelEx(&config, dense_kd_cluster_kernel<TS, TT, kDiv, kVector>, p,
                              plan.chunk);
  });
}

}  // namespace detail
}  // namespace cuda
}  // namespace fastkd

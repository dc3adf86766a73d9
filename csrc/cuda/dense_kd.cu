// CUDA dense fused distillation: planner and launcher (plain C++ host code).
//
// Contract: fastkd/reference/dense.py (rows = ce_weight * CE + div_weight * D per row, the
// gradient of that written into grad_student / grad_teacher, ignored rows 0 with 0 gradient,
// -inf columns without NaN, terms of weight 0 not evaluated, float32 maths).
//
// Two kernels (details in their files and in docs/cuda_kernel.md):
//
//   cluster (dense_kd_cluster.cu, Hopper sm_90 only): a thread-block cluster of C CTAs holds
//     one row of student and teacher logits in shared memory, CTA r the columns
//     [r * chunk, (r + 1) * chunk). Row statistics are merged across the cluster through
//     distributed shared memory, the gradient is written from shared memory. HBM bytes per
//     row: V * e * (2 reads + 1 or 2 writes) (e = bytes per element; teacher gradient adds a
//     write), i.e. the byte floor 3 * N * V * e (bench/models.py) for the usual KD backward.
//
//   generic (dense_kd_generic.cu, any GPU): one CTA per row, sweeps over global memory:
//     statistics, (JSD / TVD: second reduction), gradient. HBM bytes per row up to
//     V * e * (2 * sweeps + writes): 5 * V * e for KL + gradient, 7 * V * e for JSD / TVD,
//     less when re-reads hit L2 (50 MB on H100, i.e. ~100 bf16 row pairs of V = 128256).
//
// Planning (plan_dense_kd, pure):
//   * forward only with KL / reverse KL / CE: one sweep suffices, the generic kernel already
//     reads every byte once -> generic.
//   * otherwise, on compute capability >= 9: cluster when the row fits. Bytes held per CTA:
//     chunk * e * n_tensors (n_tensors = 2 with the divergence term, 1 for CE only). C is the
//     smallest power of two in [1, 16] with <= kPreferredClusterSmem (96 KB: two CTAs of 256
//     threads per SM, so one CTA's copy-in overlaps the other's reductions and stores);
//     failing that the smallest C whose slice fits the opt-in limit (227 KB per block on
//     H100, minus statics); failing that generic (fp32 rows beyond 460800 columns, bf16
//     beyond 921600).
//     Examples (bf16, with teacher): V = 32000 -> C = 2 (62.5 KB); 128256 -> C = 8
//     (62.6 KB); 151936 -> C = 8 (74.2 KB); 262144 -> C = 16 (64 KB). fp32: 128256 -> C = 16
//     (62.6 KB); 262144 -> C = 16 (128 KB, one CTA per SM).
//   * clusters of more than 8 CTAs are non-portable (cudaFuncAttributeNonPortableClusterSize-
//     Allowed); before the first launch of a shape the launcher asks
//     cudaOccupancyMaxActiveClusters and falls back to generic when none fits.
//   * 16-byte vector accesses when every row start is 16-byte aligned, V * e % 16 == 0
//     (all real vocabularies except odd ones such as 50257) and student and teacher have the
//     same element size; else strided scalar accesses (still coalesced). Every tensor has
//     its own row stride (slices, logits[:, :-1] views).
//   * mixed dtypes: bytes per column are e_s + e_t (student, teacher), the teacher slice
//     starts at the next 16-byte boundary after the student's (teacher_slice_offset).
//   * FASTKD_CUDA_DENSE_PATH=cluster|generic and FASTKD_CUDA_CLUSTER_SIZE=1..16 (read by
//     dense_kd_api.cpp) force a path / cluster size, for tests and benchmarks.
#include <climits>
#include <map>
#include <mutex>

#include "dense_kd.cuh"
#include "dense_kd_math.cuh"

namespace fastkd {
namespace cuda {
namespace {

int64_t element_bytes(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

bool rows_aligned16(const void* ptr, int64_t row_stride, int64_t bytes, int64_t n_rows) {
  return ptr == nullptr || (aligned16(ptr) && (n_rows <= 1 || (row_stride * bytes) % 16 == 0));
}

// 16-byte vector accesses are safe for every tensor the kernels touch (one element layout for
// both sides, so the element sizes must match).
bool vector_ok(const DenseKDParams& p, int64_t bytes_s, int64_t bytes_t) {
  const bool has_div = evaluates_divergence(p);
  const int64_t n = p.n_rows;
  return bytes_s == bytes_t && (p.vocab * bytes_s) % 16 == 0 &&
         rows_aligned16(p.student, p.student_row_stride, bytes_s, n) &&
         (!has_div || rows_aligned16(p.teacher, p.teacher_row_stride, bytes_t, n)) &&
         rows_aligned16(p.grad_student, p.grad_student_row_stride, bytes_s, n) &&
         rows_aligned16(p.grad_teacher, p.grad_teacher_row_stride, bytes_t, n);
}

void fill_generic(const DenseKDParams& p, DenseKDPlan& plan) {
  plan.path = Path::kGeneric;
  plan.threads = kGenericThreads;
  plan.cluster_size = 1;
  plan.chunk = p.vocab;
  plan.smem_bytes = 0;
  plan.grid = p.n_rows < (1 << 20) ? p.n_rows : (1 << 20);  // grid-stride beyond
}

// Element sizes of the student and the teacher.
struct Bytes {
  int64_t s, t;
};

// Fills the cluster fields for cluster size `c`; false when the slice does not fit.
bool fill_cluster(const DenseKDParams& p, Bytes bytes, const DeviceLimits& dev, int c,
                  int64_t smem_cap, DenseKDPlan& plan) {
  const int64_t granule = plan.vector ? 16 / bytes.s : 1;
  const int64_t chunk = ceil_div(ceil_div(p.vocab, c), granule) * granule;
  const int64_t smem = evaluates_divergence(p)
                           ? teacher_slice_offset(chunk, bytes.s) + chunk * bytes.t
                           : chunk * bytes.s;
  const int64_t hard_cap = dev.max_smem_optin - kClusterStaticSmemReserve;
  if (smem > smem_cap || smem > hard_cap) return false;
  const int64_t max_clusters = INT_MAX / c;
  plan.path = Path::kCluster;
  plan.threads = kClusterThreads;
  plan.cluster_size = c;
  plan.chunk = chunk;
  plan.smem_bytes = static_cast<size_t>(smem);
  plan.grid = (p.n_rows < max_clusters ? p.n_rows : max_clusters) * c;
  return true;
}

bool power_of_two(int c) { return c > 0 && (c & (c - 1)) == 0; }

// Cluster configuration for the request; false (with plan.note) when none fits.
bool choose_cluster(const DenseKDParams& p, Bytes bytes, const DeviceLimits& dev,
                    int requested_size, DenseKDPlan& plan) {
  const int64_t hard_cap = dev.max_smem_optin - kClusterStaticSmemReserve;
  if (requested_size != 0) {
    if (!power_of_two(requested_size) || requested_size > kMaxClusterSize) {
      plan.note = "cluster size must be a power of two in [1, 16]";
      return false;
    }
    if (fill_cluster(p, bytes, dev, requested_size, hard_cap, plan)) return true;
    plan.note = "the row slice does not fit one CTA's shared memory at this cluster size";
    return false;
  }
  for (int c = 1; c <= kMaxClusterSize; c *= 2) {
    if (fill_cluster(p, bytes, dev, c, kPreferredClusterSmem, plan)) return true;
  }
  for (int c = 1; c <= kMaxClusterSize; c *= 2) {
    if (fill_cluster(p, bytes, dev, c, hard_cap, plan)) return true;
  }
  plan.note = "the row does not fit the shared memory of a 16-CTA cluster";
  return false;
}

std::mutex g_limits_mutex;
std::map<int, DeviceLimits> g_limits;

}  // namespace

cudaError_t device_limits(int device, DeviceLimits* out) {
  std::lock_guard<std::mutex> lock(g_limits_mutex);
  auto it = g_limits.find(device);
  if (it == g_limits.end()) {
    DeviceLimits d;
    int smem = 0;
    cudaError_t err = cudaDeviceGetAttribute(&d.cc_major, cudaDevAttrComputeCapabilityMajor, device);
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&d.cc_minor, cudaDevAttrComputeCapabilityMinor, device);
    }
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device);
    }
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    }
    if (err != cudaSuccess) return err;
    d.max_smem_optin = smem;
    it = g_limits.emplace(device, d).first;
  }
  *out = it->second;
  return cudaSuccess;
}

DenseKDPlan plan_dense_kd(const DenseKDParams& p, DType student_dtype, DType teacher_dtype,
                          const DeviceLimits& dev, const PlanRequest& request) {
  DenseKDPlan plan;
  if (p.n_rows <= 0) {
    plan.note = "no rows";
    return plan;
  }
  const Bytes bytes{element_bytes(student_dtype), element_bytes(teacher_dtype)};
  plan.vector = vector_ok(p, bytes.s, bytes.t);
  const bool has_div = evaluates_divergence(p);
  const bool rereads = p.grad_student != nullptr || p.grad_teacher != nullptr ||
                       (has_div && kd_math::needs_second_reduction(p.divergence));
  const bool hopper = dev.cc_major >= 9;

  if (request.path == Path::kCluster) {
    if (!hopper) {
      plan.note = "the cluster path needs compute capability 9.0 or newer (Hopper)";
      return plan;
    }
    if (!choose_cluster(p, bytes, dev, request.cluster_size, plan)) {
      plan.path = Path::kNone;
      return plan;
    }
    plan.note = "cluster (requested)";
    return plan;
  }
  if (request.path != Path::kGeneric && hopper && rereads) {
    DenseKDPlan cluster = plan;
    if (choose_cluster(p, bytes, dev, request.cluster_size, cluster)) {
      cluster.note = "cluster: the row fits the cluster's shared memory";
      return cluster;
    }
    plan.note = cluster.note;  // why not: kept on the generic plan
    fill_generic(p, plan);
    return plan;
  }
  fill_generic(p, plan);
  plan.note = request.path == Path::kGeneric ? "generic (requested)"
              : !hopper                      ? "generic: no thread-block clusters before sm_90"
                                             : "generic: a single sweep reads each byte once";
  return plan;
}

cudaError_t launch_dense_kd(const DenseKDParams& p, DType student_dtype, DType teacher_dtype,
                            const PlanRequest& request, cudaStream_t stream,
                            DenseKDPlan* used) {
  DenseKDPlan local;
  DenseKDPlan& plan = used != nullptr ? *used : local;
  plan = DenseKDPlan();
  if (p.n_rows <= 0) return cudaSuccess;
  int device = 0;
  DeviceLimits dev;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) err = device_limits(device, &dev);
  if (err != cudaSuccess) return err;

  plan = plan_dense_kd(p, student_dtype, teacher_dtype, dev, request);
  if (plan.path == Path::kNone) return cudaErrorInvalidConfiguration;
  if (plan.path == Path::kCluster) {
    int active = 0;
    err = detail::prepare_cluster(p, student_dtype, teacher_dtype, plan, &active);
    if (err != cudaSuccess) return err;
    if (active == 0) {
      if (request.path == Path::kCluster) {
        plan.path = Path::kNone;
        plan.note = "no cluster of this size and shared memory fits on the device";
        return cudaErrorInvalidConfiguration;
      }
      fill_generic(p, plan);
      plan.note = "generic: no cluster of the planned shape fits on the device";
    }
  }
  return plan.path == Path::kCluster
             ? detail::launch_cluster(p, student_dtype, teacher_dtype, plan, stream)
             : detail::launch_generic(p, student_dtype, teacher_dtype, plan, stream);
}

}  // namespace cuda
}  // namespace fastkd

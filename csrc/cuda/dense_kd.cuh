// Host interface of the CUDA dense fused distillation kernels (plain C++ and the CUDA
// runtime only: no torch types, so the torch-aware dense_kd_api.cpp and a standalone test
// can both use it). Design notes: the header comment of dense_kd.cu and docs/cuda_kernel.md.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "dense_kd_params.h"

namespace fastkd {
namespace cuda {

// Storage dtype of the student (and its gradient) or of the teacher (and its gradient); the
// two may differ. Accumulation is always float32.
enum class DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Byte offset of the teacher slice in the cluster kernel's shared memory: after `chunk`
// student elements, rounded up to 16 bytes (cp.async and vector loads need the alignment).
constexpr int64_t teacher_slice_offset(int64_t chunk, int64_t student_bytes) {
  return (chunk * student_bytes + 15) / 16 * 16;
}

// Which kernel runs a launch.
enum class Path : int {
  kNone = 0,     // nothing to do (no rows)
  kGeneric = 1,  // one CTA per row, 2 or 3 sweeps over global memory; any GPU (sm_80+)
  kCluster = 2,  // Hopper: the row lives in the shared memory of a thread-block cluster
};

// What the caller asks for (FASTKD_CUDA_DENSE_PATH / FASTKD_CUDA_CLUSTER_SIZE in the API).
struct PlanRequest {
  Path path = Path::kNone;  // kNone: automatic choice
  int cluster_size = 0;     // 0: automatic; else a power of two in [1, 16] (cluster path)
};

// Device properties the planner needs (read once per device).
struct DeviceLimits {
  int cc_major = 0;
  int cc_minor = 0;
  int sm_count = 0;
  int64_t max_smem_optin = 0;  // largest dynamic shared memory per block after opt-in
};

// The chosen kernel configuration for one launch.
struct DenseKDPlan {
  Path path = Path::kNone;
  bool vector = false;       // 16-byte vector accesses (else strided scalar accesses)
  int threads = 0;           // per CTA
  int cluster_size = 1;      // CTAs per row (cluster path)
  int64_t chunk = 0;         // elements of the row held by each CTA (cluster path)
  size_t smem_bytes = 0;     // dynamic shared memory per CTA
  int64_t grid = 0;          // CTAs launched
  const char* note = "";     // why this plan (or why a request could not be met)
};

// Reads (and caches) the limits of `device`.
cudaError_t device_limits(int device, DeviceLimits* out);

// Pure planning, no CUDA calls. On a request that cannot be met, returns path kNone with a
// non-empty note when n_rows > 0.
DenseKDPlan plan_dense_kd(const DenseKDParams& p, DType student_dtype, DType teacher_dtype,
                          const DeviceLimits& dev, const PlanRequest& request);

// Plans (unless `plan` is given), checks that a cluster can be scheduled (falling back to the
// generic kernel when it cannot and the path was chosen automatically), sets the kernel's
// shared-memory and cluster attributes and launches on `stream`. No host synchronisation.
// `used` (optional) receives the plan that ran. Returns the first CUDA error, or
// cudaErrorInvalidConfiguration for a request that cannot be met (see used->note).
cudaError_t launch_dense_kd(const DenseKDParams& p, DType student_dtype, DType teacher_dtype,
                            const PlanRequest& request, cudaStream_t stream,
                            DenseKDPlan* used = nullptr);

namespace detail {
// Per-path launchers (dense_kd_generic.cu, dense_kd_cluster.cu): switch on the two dtypes,
// divergence and vector mode, then launch one template instance.
cudaError_t launch_generic(const DenseKDParams& p, DType student_dtype, DType teacher_dtype,
                           const DenseKDPlan& plan, cudaStream_t stream);
cudaError_t launch_cluster(const DenseKDParams& p, DType student_dtype, DType teacher_dtype,
                           const DenseKDPlan& plan, cudaStream_t stream);
// Sets the cluster kernel's attributes for `plan` and reports how many clusters of that
// shape fit on the device at once (0: the launch would fail).
cudaError_t prepare_cluster(const DenseKDParams& p, DType student_dtype, DType teacher_dtype,
                            const DenseKDPlan& plan, int* max_active_clusters);
}  // namespace detail

// Threads per CTA of each path and the planner's shared-memory targets (see dense_kd.cu).
constexpr int kGenericThreads = 256;
constexpr int kClusterThreads = 256;
constexpr int kMaxClusterSize = 16;
constexpr int64_t kPreferredClusterSmem = 96 * 1024;  // two CTAs per H100 SM
constexpr int64_t kClusterStaticSmemReserve = 2 * 1024;  // statics + per-block reservation

}  // namespace cuda
}  // namespace fastkd

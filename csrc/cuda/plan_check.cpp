// Host-only check of the CUDA dense-kernel planner (plan_dense_kd is pure: no GPU needed).
// Built and run by check_compile.sh; exits non-zero on the first mismatch. The cases are the
// ones documented in dense_kd.cu and docs/cuda_kernel.md.
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "cuda/dense_kd.cuh"

namespace fastkd {
namespace cuda {
namespace detail {
// The planner never launches; these stand in for the kernels' translation units.
cudaError_t launch_generic(const DenseKDParams&, DType, DType, const DenseKDPlan&,
                           cudaStream_t) {
  return cudaErrorNotSupported;
}
cudaError_t launch_cluster(const DenseKDParams&, DType, DType, const DenseKDPlan&,
                           cudaStream_t) {
  return cudaErrorNotSupported;
}
cudaError_t prepare_cluster(const DenseKDParams&, DType, DType, const DenseKDPlan&, int*) {
  return cudaErrorNotSupported;
}
}  // namespace detail
}  // namespace cuda
}  // namespace fastkd

using namespace fastkd;
using namespace fastkd::cuda;

namespace {

int failures = 0;

DeviceLimits h100() { return DeviceLimits{9, 0, 132, 232448}; }
DeviceLimits a100() { return DeviceLimits{8, 0, 108, 166912}; }

// A params block with fake, 256-byte aligned addresses (never dereferenced).
DenseKDParams params(int64_t n, int64_t v, bool grads, int divergence = 0,
                     float div_weight = 4.0f) {
  DenseKDParams p;
  std::memset(&p, 0, sizeof(p));
  p.student = reinterpret_cast<const void*>(uintptr_t{1} << 20);
  p.teacher = reinterpret_cast<const void*>(uintptr_t{1} << 30);
  p.grad_student = grads ? reinterpret_cast<void*>(uintptr_t{1} << 40) : nullptr;
  p.n_rows = n;
  p.vocab = v;
  p.student_row_stride = p.teacher_row_stride = p.grad_student_row_stride = v;
  p.temperature = 2.0f;
  p.ce_weight = 0.5f;
  p.div_weight = div_weight;
  p.divergence = divergence;
  p.param_a = 0.5f;
  p.ignore_index = -100;
  return p;
}

void expect(const char* what, const DenseKDPlan& plan, Path path, int cluster, int64_t smem,
            int vector = -1) {
  const bool ok = plan.path == path && (path != Path::kCluster || plan.cluster_size == cluster) &&
                  (smem < 0 || static_cast<int64_t>(plan.smem_bytes) == smem) &&
                  (vector < 0 || plan.vector == (vector == 1));
  std::printf("%-48s %-4s path=%d C=%-2d chunk=%-7lld smem=%-7zu vector=%d grid=%lld  %s\n",
              what, ok ? "ok" : "FAIL", static_cast<int>(plan.path), plan.cluster_size,
              static_cast<long long>(plan.chunk), plan.smem_bytes, plan.vector ? 1 : 0,
              static_cast<long long>(plan.grid), plan.note);
  if (!ok) ++failures;
}

}  // namespace

int main() {
  const PlanRequest any;
  const DType bf16 = DType::kBFloat16, fp32 = DType::kFloat32;
  expect("bf16 V=32000 +grad", plan_dense_kd(params(8, 32000, true), bf16, bf16, h100(), any),
         Path::kCluster, 2, 64000, 1);
  expect("bf16 V=128256 +grad",
         plan_dense_kd(params(8192, 128256, true), bf16, bf16, h100(), any), Path::kCluster, 8,
         64128, 1);
  expect("bf16 V=151936 +grad", plan_dense_kd(params(8, 151936, true), bf16, bf16, h100(), any),
         Path::kCluster, 8, 75968, 1);
  expect("bf16 V=262144 +grad", plan_dense_kd(params(8, 262144, true), bf16, bf16, h100(), any),
         Path::kCluster, 16, 65536, 1);
  expect("fp32 V=128256 +grad", plan_dense_kd(params(8, 128256, true), fp32, fp32, h100(), any),
         Path::kCluster, 16, 64128, 1);
  expect("fp32 V=262144 +grad (one CTA per SM)",
         plan_dense_kd(params(8, 262144, true), fp32, fp32, h100(), any), Path::kCluster, 16, 131072);
  expect("fp32 V=460800 +grad (largest cluster row)",
         plan_dense_kd(params(8, 460800, true), fp32, fp32, h100(), any), Path::kCluster, 16, 230400);
  expect("fp32 V=460804 +grad (too large)",
         plan_dense_kd(params(8, 460804, true), fp32, fp32, h100(), any), Path::kGeneric, 1, 0);
  // Scalar mode: the teacher slice starts at the next 16-byte boundary after the student's.
  expect("bf16 V=50257 +grad (unaligned: scalar)",
         plan_dense_kd(params(8, 50257, true), bf16, bf16, h100(), any), Path::kCluster, 4,
         25136 + 25130, 0);
  expect("bf16 V=1 +grad", plan_dense_kd(params(8, 1, true), bf16, bf16, h100(), any),
         Path::kCluster, 1, 16 + 2, 0);
  expect("bf16 V=128256 forward KL (one sweep)",
         plan_dense_kd(params(8, 128256, false, 0), bf16, bf16, h100(), any), Path::kGeneric, 1, 0);
  expect("bf16 V=128256 forward JSD (two sweeps)",
         plan_dense_kd(params(8, 128256, false, 2), bf16, bf16, h100(), any), Path::kCluster, 8,
         64128);
  expect("bf16 V=128256 CE only (student only)",
         plan_dense_kd(params(8, 128256, true, 0, 0.0f), bf16, bf16, h100(), any), Path::kCluster, 4,
         64128);
  expect("bf16 V=128256 +grad on A100",
         plan_dense_kd(params(8, 128256, true), bf16, bf16, a100(), any), Path::kGeneric, 1, 0);
  DenseKDParams odd = params(8, 128256, true);
  odd.grad_student = reinterpret_cast<void*>((uintptr_t{1} << 40) + 2);
  expect("bf16 V=128256 misaligned gradient", plan_dense_kd(odd, bf16, bf16, h100(), any),
         Path::kCluster, 8, 64128, 0);

  PlanRequest cluster;
  cluster.path = Path::kCluster;
  expect("forced cluster on A100 -> refused",
         plan_dense_kd(params(8, 1000, true), bf16, bf16, a100(), cluster), Path::kNone, 0, -1);
  cluster.cluster_size = 3;
  expect("forced cluster size 3 -> refused",
         plan_dense_kd(params(8, 1000, true), bf16, bf16, h100(), cluster), Path::kNone, 0, -1);
  cluster.cluster_size = 1;
  expect("forced C=1, bf16 V=128256 -> refused",
         plan_dense_kd(params(8, 128256, true), bf16, bf16, h100(), cluster), Path::kNone, 0, -1);
  cluster.cluster_size = 16;
  expect("forced C=16, bf16 V=7", plan_dense_kd(params(8, 7, true), bf16, bf16, h100(), cluster),
         Path::kCluster, 16, 16 + 2, 0);
  PlanRequest generic;
  generic.path = Path::kGeneric;
  expect("forced generic", plan_dense_kd(params(8, 128256, true), bf16, bf16, h100(), generic),
         Path::kGeneric, 1, 0);
  // Mixed dtypes: bytes per column e_s + e_t, scalar accesses (one layout for both sides),
  // the teacher slice after the student's at a 16-byte boundary.
  expect("bf16 student, fp32 teacher V=128256 +grad",
         plan_dense_kd(params(8, 128256, true), bf16, fp32, h100(), any), Path::kCluster, 8,
         16032 * 2 + 16032 * 4, 0);
  expect("fp32 student, bf16 teacher V=50257 +grad",
         plan_dense_kd(params(8, 50257, true), fp32, bf16, h100(), any), Path::kCluster, 4,
         50272 + 12565 * 2, 0);
  const DType fp16 = DType::kFloat16;
  expect("bf16 student, fp16 teacher V=128256 (vectors)",
         plan_dense_kd(params(8, 128256, true), bf16, fp16, h100(), any), Path::kCluster, 8,
         64128, 1);
  // terms: the divergence is evaluated (teacher slice held) even with div_weight 0.
  DenseKDParams ce_terms = params(8, 128256, true, 0, 0.0f);
  float terms_buffer[2];
  ce_terms.terms = terms_buffer;
  expect("bf16 V=128256 CE weight only + terms", plan_dense_kd(ce_terms, bf16, bf16, h100(), any),
         Path::kCluster, 8, 64128);
  // Row strides: a stride that keeps rows 16-byte aligned keeps vectors, another does not.
  DenseKDParams strided = params(8, 32000, true);
  strided.student_row_stride = strided.grad_student_row_stride = 32008;
  strided.teacher_row_stride = 64000;
  expect("bf16 V=32000 row strides 32008 / 64000", plan_dense_kd(strided, bf16, bf16, h100(), any),
         Path::kCluster, 2, 64000, 1);
  strided.student_row_stride = 32001;
  expect("bf16 V=32000 row stride 32001", plan_dense_kd(strided, bf16, bf16, h100(), any),
         Path::kCluster, 2, 64000, 0);
  expect("no rows", plan_dense_kd(params(0, 128256, true), bf16, bf16, h100(), any), Path::kNone, 0,
         -1);
  if (failures != 0) {
    std::printf("plan_check: %d failure(s)\n", failures);
    return 1;
  }
  std::printf("plan_check: all cases ok\n");
  return 0;
}

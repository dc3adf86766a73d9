// AVX2 + FMA + F16C build of the fused top-k teacher row kernel.
//
// setup.py compiles every *_avx2.cpp with -mavx2 -mfma -mf16c (on x86-64); sparse_kd_cpu.cpp
// calls this variant only after a run-time CPU check. Built without those flags (another
// architecture) it is a stub and the portable kernel runs.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define FASTKD_BUILD_SPARSE_AVX2 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/sparse_kd_cpu_rows.h"
#else
#include "cpu/sparse_kd_cpu.h"
#endif

#include <stdexcept>

namespace fastkd::cpu {

bool sparse_avx2_variant_compiled() {
#ifdef FASTKD_BUILD_SPARSE_AVX2
  return true;
#else
  return false;
#endif
}

void sparse_kd_rows_avx2(const SparseKDParams& params, RowQueue& queue) {
#ifdef FASTKD_BUILD_SPARSE_AVX2
  AVX2::sparse_kd_rows_impl(params, queue);
#else
  (void)params;
  (void)queue;
  throw std::logic_error("fastkd: the AVX2 top-k kernel was not compiled");
#endif
}

}  // namespace fastkd::cpu

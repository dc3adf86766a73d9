// AVX2 + FMA + F16C build of the fused CPU distillation row kernel.
//
// setup.py compiles only this translation unit with -mavx2 -mfma -mf16c (on x86-64), and
// dense_kd_cpu.cpp calls it only after a run-time CPU check, so the extension still loads and
// runs on CPUs without AVX2. The ATen vector code it instantiates lives in at::vec::AVX2.
// Built without those flags (another architecture), it is a stub and the portable kernel runs.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define FASTKD_BUILD_AVX2 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "cpu/dense_kd_cpu_rows.h"
#else
#include "cpu/dense_kd_cpu.h"
#endif

#include <stdexcept>

namespace fastkd::cpu {

bool avx2_variant_compiled() {
#ifdef FASTKD_BUILD_AVX2
  return true;
#else
  return false;
#endif
}

void dense_kd_rows_avx2(const DenseKDParams& params, ElementType student, ElementType teacher,
                        RowQueue& queue) {
#ifdef FASTKD_BUILD_AVX2
  AVX2::dense_kd_rows_impl(params, student, teacher, queue);
#else
  throw std::logic_error("fastkd: the AVX2 kernel was not compiled");
#endif
}

}  // namespace fastkd::cpu

// AVX-512 (F, BW, VL, DQ) + FMA + F16C build of the fused CPU distillation row kernel.
//
// setup.py compiles only this translation unit with the AVX-512 flags (on x86-64), and
// dense_kd_cpu.cpp calls it only after a run-time CPU check, so the extension still loads and
// runs on CPUs without AVX-512. The ATen vector code it instantiates lives in at::vec::AVX512
// (Vectorized<float> has 16 lanes here). Built without those flags (another architecture),
// it is a stub and the AVX2 or portable kernel runs.
// GCC (12 here) initialises the "undefined" registers of avx512fintrin.h from themselves, so
// -Wmaybe-uninitialized flags every inlined _mm512_max_ps / _mm512_slli_epi32 (GCC PR 105593).
// Off for this file only: the same code compiles with the warning on in the AVX2 and
// portable builds.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__FMA__) && defined(__F16C__)
#define FASTKD_BUILD_AVX512 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/dense_kd_cpu_rows.h"
#else
#include "cpu/dense_kd_cpu.h"
#endif

#include <stdexcept>

namespace fastkd::cpu {

bool avx512_variant_compiled() {
#ifdef FASTKD_BUILD_AVX512
  static_assert(kLanes == 16, "the AVX-512 build must use 16-lane ATen vectors");
  return true;
#else
  return false;
#endif
}

void dense_kd_rows_avx512(const DenseKDParams& params, ElementType student,
                          ElementType teacher, RowQueue& queue) {
#ifdef FASTKD_BUILD_AVX512
  AVX512::dense_kd_rows_impl(params, student, teacher, queue);
#else
  (void)params;
  (void)student;
  (void)teacher;
  (void)queue;
  throw std::logic_error("fastkd: the AVX-512 kernel was not compiled");
#endif
}

}  // namespace fastkd::cpu

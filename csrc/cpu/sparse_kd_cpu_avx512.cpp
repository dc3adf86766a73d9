// AVX-512 (F, BW, VL, DQ) + FMA + F16C build of the fused top-k teacher row kernel.
//
// setup.py compiles every *_avx512.cpp with the AVX-512 flags (on x86-64); sparse_kd_cpu.cpp
// calls this variant only after a run-time CPU check. Built without those flags (another
// architecture) it is a stub and the AVX2 or portable kernel runs.
// GCC (12 here) initialises the "undefined" registers of avx512fintrin.h from themselves, so
// -Wmaybe-uninitialized flags every inlined _mm512_max_ps / _mm512_slli_epi32 (GCC PR 105593).
// Off for this file only: the same code compiles with the warning on in the AVX2 and
// portable builds.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
    defined(__AVX512DQ__) && defined(__FMA__) && defined(__F16C__)
#define FASTKD_BUILD_SPARSE_AVX512 1
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "cpu/sparse_kd_cpu_rows.h"
#else
#include "cpu/sparse_kd_cpu.h"
#endif

#include <stdexcept>

namespace fastkd::cpu {

bool sparse_avx512_variant_compiled() {
#ifdef FASTKD_BUILD_SPARSE_AVX512
  static_assert(kLanes == 16, "the AVX-512 build must use 16-lane ATen vectors");
  return true;
#else
  return false;
#endif
}

void sparse_kd_rows_avx512(const SparseKDParams& params, RowQueue& queue) {
#ifdef FASTKD_BUILD_SPARSE_AVX512
  AVX512::sparse_kd_rows_impl(params, queue);
#else
  (void)params;
  (void)queue;
  throw std::logic_error("fastkd: the AVX-512 top-k kernel was not compiled");
#endif
}

}  // namespace fastkd::cpu

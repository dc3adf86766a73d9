// Entry points of the fused CPU distillation kernel, one per compiled CPU capability.
//
// The row kernel (dense_kd_cpu_rows.h) is compiled twice: for the baseline x86-64 / any CPU
// (dense_kd_cpu_default.cpp) and for AVX2 + FMA + F16C (dense_kd_cpu_avx2.cpp).
// dense_kd_cpu.cpp picks one at run time and calls it from inside at::parallel_for.
// No torch types here, only the plain parameter block.
#pragma once

#include <cstdint>

#include "dense_kd_params.h"

namespace fastkd::cpu {

// Element type of student / teacher / gradients (accumulation is always float32).
enum class ElementType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Computes rows [begin, end) of params: params.rows[r] and, when the pointers are set, the
// gradient rows. Labels must already be validated (in [0, V) or ignore_index).
using DenseRowsFn = void (*)(const DenseKDParams& params, ElementType type, int64_t begin,
                             int64_t end);

void dense_kd_rows_default(const DenseKDParams& params, ElementType type, int64_t begin,
                           int64_t end);

// nullptr-equivalent behaviour: false when the compiler could not build the AVX2 variant.
bool avx2_variant_compiled();
void dense_kd_rows_avx2(const DenseKDParams& params, ElementType type, int64_t begin,
                        int64_t end);

}  // namespace fastkd::cpu

// Entry points of the fused CPU distillation kernel, one per compiled CPU capability.
//
// The row kernel (dense_kd_cpu_rows.h) is compiled three times: for the baseline x86-64 / any
// CPU (dense_kd_cpu_default.cpp), for AVX2 + FMA + F16C (dense_kd_cpu_avx2.cpp) and for
// AVX-512 F/BW/VL/DQ + FMA + F16C (dense_kd_cpu_avx512.cpp).
// dense_kd_cpu.cpp picks one at run time and calls it from inside at::parallel_for.
// No torch types here, only the plain parameter block.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "dense_kd_params.h"

namespace fastkd::cpu {

// Element type of student / teacher / gradients (accumulation is always float32).
enum class ElementType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

// Blocks of rows handed to whichever thread asks next: on a busy machine a thread that gets
// less CPU time simply takes fewer blocks (a static split would wait for the slowest).
class RowQueue {
 public:
  RowQueue(int64_t n_rows, int64_t block) : n_rows_(n_rows), block_(block) {}

  // The next [begin, end); false when every row has been handed out.
  bool next(int64_t& begin, int64_t& end) {
    begin = next_.fetch_add(block_, std::memory_order_relaxed);
    end = std::min(begin + block_, n_rows_);
    return begin < n_rows_;
  }

 private:
  std::atomic<int64_t> next_{0};
  const int64_t n_rows_, block_;
};

// Calls visit(row, next_row) for every row this thread takes from `queue`, where next_row is
// the row it computes after this one (-1 after its last). The next block is claimed before
// the current one is done, so the row kernels know the following row at a block's end too and
// can prefetch it while they compute (at most one extra block per thread at the end).
template <typename Visit>
void for_each_row(RowQueue& queue, Visit&& visit) {
  int64_t begin = 0, end = 0, next_begin = 0, next_end = 0;
  bool have = queue.next(begin, end);
  while (have) {
    const bool more = queue.next(next_begin, next_end);
    for (int64_t row = begin; row < end; ++row) {
      visit(row, row + 1 < end ? row + 1 : (more ? next_begin : -1));
    }
    begin = next_begin;
    end = next_end;
    have = more;
  }
}

// Computes rows taken from `queue` until it is empty: params.rows[r] and, when the pointers
// are set, the gradient rows and the terms. Labels must already be validated (in [0, V) or
// ignore_index). `student` / `teacher`: the dtypes of the two sides (and their gradients).
using DenseRowsFn = void (*)(const DenseKDParams& params, ElementType student,
                             ElementType teacher, RowQueue& queue);

void dense_kd_rows_default(const DenseKDParams& params, ElementType student,
                           ElementType teacher, RowQueue& queue);

// false when the compiler could not build the AVX2 variant (then it must not be called).
bool avx2_variant_compiled();
void dense_kd_rows_avx2(const DenseKDParams& params, ElementType student, ElementType teacher,
                        RowQueue& queue);

// false when the compiler could not build the AVX-512 variant (then it must not be called).
bool avx512_variant_compiled();
void dense_kd_rows_avx512(const DenseKDParams& params, ElementType student,
                          ElementType teacher, RowQueue& queue);

}  // namespace fastkd::cpu

// Portable build of the fused top-k teacher row kernel (any x86-64 or other CPU).
#define CPU_CAPABILITY DEFAULT
#include "cpu/sparse_kd_cpu_rows.h"

namespace fastkd::cpu {

void sparse_kd_rows_default(const SparseKDParams& params, RowQueue& queue) {
  DEFAULT::sparse_kd_rows_impl(params, queue);
}

}  // namespace fastkd::cpu

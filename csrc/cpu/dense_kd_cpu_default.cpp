// Portable build of the fused CPU distillation row kernel (any x86-64 or other CPU).
#define CPU_CAPABILITY DEFAULT
#include "cpu/dense_kd_cpu_rows.h"

namespace fastkd::cpu {

void dense_kd_rows_default(const DenseKDParams& params, ElementType student,
                           ElementType teacher, RowQueue& queue) {
  DEFAULT::dense_kd_rows_impl(params, student, teacher, queue);
}

}  // namespace fastkd::cpu

// Plain parameter block of the dense fused distillation kernels (CPU and CUDA).
//
// No torch types: the CUDA kernels compile standalone with nvcc from this header alone.
// Layout: student / teacher / grads are row-major (N, V) with a row stride in elements
// (int64, so N * V >= 2^31 is safe). Per-row results are float32.
#pragma once

#include <cstdint>

namespace fastkd {

// Codes match fastkd.reference.DIVERGENCES (the index of each name).
enum class Divergence : int { kKL = 0, kReverseKL = 1, kJSD = 2, kTVD = 3 };

struct DenseKDParams {
  // Inputs.
  const void* student;       // (N, V), dtype given by the launcher's template argument
  const void* teacher;       // (N, V), same dtype
  const int64_t* target;     // (N,) or nullptr: no cross-entropy term, no ignored rows
  // Outputs.
  float* rows;               // (N,) weighted per-row loss, 0 for ignored rows
  void* grad_student;        // (N, V) or nullptr (not computed); may alias `student`
  void* grad_teacher;        // (N, V) or nullptr (not computed)
  // Shapes and strides (elements).
  int64_t n_rows;
  int64_t vocab;
  int64_t student_row_stride;
  int64_t teacher_row_stride;
  int64_t grad_student_row_stride;
  int64_t grad_teacher_row_stride;
  // Options: row = ce_weight * CE + div_weight * D.
  float temperature;
  float ce_weight;
  float div_weight;
  int divergence;            // a Divergence code
  float beta;                // JSD mixture weight of the teacher
  int64_t ignore_index;
  float label_smoothing;
  float softcap;             // <= 0: off
};

}  // namespace fastkd

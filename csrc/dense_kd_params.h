// Plain parameter block of the dense fused distillation kernels (CPU and CUDA).
//
// No torch types: the CUDA kernels compile standalone with nvcc from this header alone.
// Layout: student / teacher / grads are (N, V) with unit column stride and each its own row
// stride in elements (int64, so N * V >= 2^31 is safe): slices and views such as
// logits[:, :-1] are read and written in place. Per-row results are float32.
#pragma once

#include <cstdint>

namespace fastkd {

// Codes match fastkd.reference.DIVERGENCES (the index of each name).
enum class Divergence : int {
  kKL = 0, kReverseKL = 1, kJSD = 2, kTVD = 3,
  kSkewKL = 4, kSkewReverseKL = 5, kAKL = 6, kAlphaBeta = 7,
};

struct DenseKDParams {
  // Inputs.
  const void* student;       // (N, V), dtype given by the launcher's template argument
  const void* teacher;       // (N, V), its own dtype (may differ from the student's)
  const int64_t* target;     // (N,) or nullptr: no cross-entropy term, no ignored rows
  // Outputs.
  float* rows;               // (N,) weighted per-row loss, 0 for ignored rows
  void* grad_student;        // (N, V) in the student's dtype or nullptr; may alias `student`
  void* grad_teacher;        // (N, V) in the teacher's dtype or nullptr (not computed)
  float* terms;              // (N, 2) contiguous or nullptr: unweighted CE and D per row
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
  float param_a;             // divergence parameters (LossOptions.divergence_params):
  float param_b;             //   jsd (beta = the teacher's mixture weight, 0); skew_kl,
                             //   skew_reverse_kl (lambda, 0); akl (0, 0); alpha_beta (a, b)
  int64_t ignore_index;
  float label_smoothing;
  float softcap;             // <= 0: off
};

// Which terms a row evaluates. A term of weight 0 is skipped (its value could be inf or NaN
// and 0 * inf would poison the row), unless `terms` asks for the unweighted values: then
// both are computed (CE only with a target), while rows and gradients still leave out a
// weight-0 term.
#if defined(__CUDACC__)
#define FASTKD_PARAMS_HD __host__ __device__ inline
#else
#define FASTKD_PARAMS_HD inline
#endif
FASTKD_PARAMS_HD bool evaluates_divergence(const DenseKDParams& p) {
  return p.div_weight != 0.0f || p.terms != nullptr;
}
FASTKD_PARAMS_HD bool evaluates_cross_entropy(const DenseKDParams& p) {
  return p.target != nullptr && (p.ce_weight != 0.0f || p.terms != nullptr);
}
#undef FASTKD_PARAMS_HD

}  // namespace fastkd

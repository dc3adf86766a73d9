// Fused CPU kernel of the top-k (offline) teacher distillation loss: parameter block and the
// entry points of its compiled variants (AVX-512, AVX2 + FMA + F16C, and portable).
//
// Contract: fastkd.reference.sparse.sparse_kd_rows. No torch types here.
#pragma once

#include <cstdint>

#include "cpu/dense_kd_cpu.h"  // ElementType, RowQueue

namespace fastkd::cpu {

struct SparseKDParams {
  // Inputs. Rows are row-major with a row stride in elements; columns are contiguous.
  const void* student;          // (N, V), dtype `student_type`
  const void* logprobs;         // (N, k) teacher log-probs at T_stored, dtype `logprob_type`
  const void* indices;          // (N, k) int32 or int64 vocabulary indices (unique per row)
  const int64_t* target;        // (N,) or nullptr: no cross-entropy, no ignored rows
  // Outputs.
  float* rows;                  // (N,) weighted per-row loss, 0 for ignored rows
  float* terms;                 // (N, 2) contiguous (unweighted CE, D) or nullptr
  void* grad_student;           // (N, V) in the student's dtype or nullptr; may alias student
  // Shapes and strides (elements).
  int64_t n_rows = 0, vocab = 0, k = 0;
  int64_t student_row_stride = 0, grad_row_stride = 0;
  int64_t logprob_row_stride = 0, index_row_stride = 0;
  ElementType student_type = ElementType::kFloat32;
  ElementType logprob_type = ElementType::kFloat32;
  bool indices_int64 = true;
  // Options: row = ce_weight * CE + div_weight * D.
  float temperature = 1.f, ce_weight = 0.f, div_weight = 0.f;
  int divergence = 0;           // 0 kl, 1 reverse_kl, 2 jsd, 3 tvd
  float param_a = 0.5f;         // divergence parameters, as DenseKDParams (jsd: beta, 0)
  float param_b = 0.f;
  int64_t ignore_index = -100;
  float label_smoothing = 0.f;
  float softcap = 0.f;          // <= 0: off
  bool renormalize = false;     // tail: false = bucket, true = renormalize
  float teacher_scale = 1.f;    // log p~ = teacher_scale * log p_stored (re-tempering)
};

// Computes the rows taken from `queue` until it is empty. Indices of rows that are not
// ignored must already be checked to lie in [0, V), labels in [0, V) or ignore_index.
using SparseRowsFn = void (*)(const SparseKDParams& params, RowQueue& queue);

void sparse_kd_rows_default(const SparseKDParams& params, RowQueue& queue);

// false when the compiler could not build the AVX2 variant (then it must not be called).
bool sparse_avx2_variant_compiled();
void sparse_kd_rows_avx2(const SparseKDParams& params, RowQueue& queue);

// false when the compiler could not build the AVX-512 variant (then it must not be called).
bool sparse_avx512_variant_compiled();
void sparse_kd_rows_avx512(const SparseKDParams& params, RowQueue& queue);

}  // namespace fastkd::cpu

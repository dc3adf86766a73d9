// CPU implementation of fastkd::sparse_kd: argument checks, the index / label range check of
// the rows that are read, choice of the compiled kernel variant (AVX-512, AVX2 or portable), one
// at::parallel_for over rows.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <optional>
#include <vector>

#include "cpu/cpu_host.h"
#include "cpu/sparse_kd_cpu.h"

namespace fastkd::cpu {
namespace {

constexpr const char* kOp = "fastkd::sparse_kd: ";
// Rows per block of the row queue: ~64k student elements.
constexpr int64_t kElementsPerBlock = 1 << 16;
// Inputs below this many elements stay on the calling thread.
constexpr int64_t kMinElementsToSplit = 1 << 16;

// The variant select_variant picks (cpu_host.h), chosen once per process.
SparseRowsFn select_rows_fn() {
  static const SparseRowsFn fn = [] {
    switch (select_variant(sparse_avx2_variant_compiled(), sparse_avx512_variant_compiled())) {
      case KernelVariant::kAVX512: return &sparse_kd_rows_avx512;
      case KernelVariant::kAVX2: return &sparse_kd_rows_avx2;
      default: return &sparse_kd_rows_default;
    }
  }();
  return fn;
}

// A CPU (rows, cols) tensor with contiguous columns (any row stride).
void check_matrix(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), kOp, name, " must be a CPU tensor, got device ",
                    t.device());
  TORCH_CHECK_VALUE(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, kOp, name,
                    " must have shape (", rows, ", ", cols, "), got ", t.sizes());
  TORCH_CHECK_VALUE(t.stride(1) == 1 || cols <= 1, kOp, name,
                    " must have contiguous columns (stride(1) == 1), got strides ",
                    t.strides());
}

void check_tensors(const at::Tensor& student, const at::Tensor& logprobs,
                   const at::Tensor& indices, const std::optional<at::Tensor>& target,
                   const std::optional<at::Tensor>& grad_student,
                   const std::optional<at::Tensor>& terms) {
  TORCH_CHECK_VALUE(student.dim() == 2, kOp, "student must be 2-D (N, V), got ",
                    student.dim(), " dimensions");
  const int64_t n = student.size(0), vocab = student.size(1);
  TORCH_CHECK_VALUE(vocab > 0 || n == 0, kOp, "student must have a non-empty vocabulary");
  element_type(student, kOp, "student");
  check_matrix(student, "student", n, vocab);
  TORCH_CHECK_VALUE(logprobs.dim() == 2, kOp, "topk_logprobs must be 2-D (N, k), got ",
                    logprobs.dim(), " dimensions");
  const int64_t k = logprobs.size(1);
  TORCH_CHECK_VALUE(n == 0 || (k >= 1 && k <= vocab), kOp, "topk_logprobs must hold 1 <= k",
                    " <= V = ", vocab, " entries per row, got k = ", k);
  element_type(logprobs, kOp, "topk_logprobs");
  check_matrix(logprobs, "topk_logprobs", n, k);
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kLong || indices.scalar_type() == at::kInt,
                   kOp, "topk_indices must be int64 or int32, got ", indices.scalar_type());
  check_matrix(indices, "topk_indices", n, k);
  if (target.has_value()) {
    const at::Tensor& y = *target;
    TORCH_CHECK_VALUE(y.device().is_cpu(), kOp, "target must be a CPU tensor, got ", y.device());
    TORCH_CHECK_TYPE(y.scalar_type() == at::kLong, kOp, "target must be int64, got ",
                     y.scalar_type());
    TORCH_CHECK_VALUE(y.dim() == 1 && y.size(0) == n && y.is_contiguous(), kOp,
                      "target must be contiguous with shape (", n, "), got ", y.sizes());
  }
  if (grad_student.has_value()) {
    check_matrix(*grad_student, "grad_student", n, vocab);
    TORCH_CHECK_TYPE(grad_student->scalar_type() == student.scalar_type(), kOp,
                     "grad_student must have the student's dtype ", student.scalar_type(),
                     ", got ", grad_student->scalar_type());
  }
  if (terms.has_value()) {
    check_matrix(*terms, "terms", n, 2);
    TORCH_CHECK_TYPE(terms->scalar_type() == at::kFloat, kOp, "terms must be float32, got ",
                     terms->scalar_type());
    TORCH_CHECK_VALUE(terms->is_contiguous(), kOp, "terms must be contiguous");
  }
}

void check_options(double temperature, double ce_weight, double div_weight, int64_t divergence,
                   double beta, double label_smoothing, double teacher_scale) {
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0, kOp,
                    "temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK_VALUE(std::isfinite(ce_weight) && std::isfinite(div_weight), kOp,
                    "ce_weight and div_weight must be finite, got ", ce_weight, " and ",
                    div_weight);
  TORCH_CHECK_VALUE(divergence >= 0 && divergence <= 3, kOp,
                    "divergence must be 0 (kl), 1 (reverse_kl), 2 (jsd) or 3 (tvd), got ",
                    divergence);
  TORCH_CHECK_VALUE(divergence != 2 || (beta > 0 && beta < 1), kOp,
                    "beta must be in (0, 1) for jsd, got ", beta);
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing <= 1, kOp,
                    "label_smoothing must be in [0, 1], got ", label_smoothing);
  TORCH_CHECK_VALUE(std::isfinite(teacher_scale) && teacher_scale > 0, kOp,
                    "teacher_scale must be finite and > 0, got ", teacher_scale);
}

template <typename index_t>
void check_row_indices(const SparseKDParams& p, const index_t* indices, bool any_index_read) {
  for (int64_t r = 0; r < p.n_rows; ++r) {
    if (p.target != nullptr) {
      const int64_t y = p.target[r];
      if (y == p.ignore_index) continue;  // not read: any value is allowed
      TORCH_CHECK_VALUE(y >= 0 && y < p.vocab, kOp, "target[", r, "] = ", y,
                        " is outside [0, ", p.vocab, ") and is not ignore_index=",
                        p.ignore_index);
    }
    if (!any_index_read) continue;
    const index_t* row = indices + r * p.index_row_stride;
    for (int64_t j = 0; j < p.k; ++j) {
      TORCH_CHECK_VALUE(row[j] >= 0 && row[j] < p.vocab, kOp, "topk_indices[", r, ", ", j,
                        "] = ", static_cast<int64_t>(row[j]), " is outside [0, ", p.vocab,
                        ")");
    }
  }
}

at::Tensor sparse_kd_cpu(const at::Tensor& student, const at::Tensor& logprobs,
                         const at::Tensor& indices, const std::optional<at::Tensor>& target,
                         const std::optional<at::Tensor>& grad_student,
                         const std::optional<at::Tensor>& terms, double temperature,
                         double ce_weight, double div_weight, int64_t divergence,
                         double param_a, double param_b, int64_t ignore_index,
                         double label_smoothing, double softcap, bool renormalize,
                         double teacher_scale) {
  check_tensors(student, logprobs, indices, target, grad_student, terms);
  check_options(temperature, ce_weight, div_weight, divergence, param_a, label_smoothing,
                teacher_scale);
  const int64_t n = student.size(0), vocab = student.size(1);
  at::Tensor rows = at::empty({n}, student.options().dtype(at::kFloat));
  if (n == 0) return rows;

  SparseKDParams p;
  p.student = student.data_ptr();
  p.logprobs = logprobs.data_ptr();
  p.indices = indices.data_ptr();
  p.target = target.has_value() ? target->data_ptr<int64_t>() : nullptr;
  p.rows = rows.data_ptr<float>();
  p.terms = terms.has_value() ? terms->data_ptr<float>() : nullptr;
  p.grad_student = grad_student.has_value() ? grad_student->data_ptr() : nullptr;
  p.n_rows = n;
  p.vocab = vocab;
  p.k = logprobs.size(1);
  p.student_row_stride = student.stride(0);
  p.grad_row_stride = grad_student.has_value() ? grad_student->stride(0) : 0;
  p.logprob_row_stride = logprobs.stride(0);
  p.index_row_stride = indices.stride(0);
  p.student_type = element_type(student, kOp, "student");
  p.logprob_type = element_type(logprobs, kOp, "topk_logprobs");
  p.indices_int64 = indices.scalar_type() == at::kLong;
  p.temperature = static_cast<float>(temperature);
  p.ce_weight = static_cast<float>(ce_weight);
  p.div_weight = static_cast<float>(div_weight);
  p.divergence = static_cast<int>(divergence);
  p.param_a = static_cast<float>(param_a);
  p.param_b = static_cast<float>(param_b);
  p.ignore_index = ignore_index;
  p.label_smoothing = static_cast<float>(label_smoothing);
  p.softcap = static_cast<float>(softcap);
  p.renormalize = renormalize;
  p.teacher_scale = static_cast<float>(teacher_scale);

  // The top-k is read only when the divergence is evaluated.
  const bool reads_topk = div_weight != 0 || terms.has_value();
  if (p.indices_int64) {
    check_row_indices(p, static_cast<const int64_t*>(p.indices), reads_topk);
  } else {
    check_row_indices(p, static_cast<const int32_t*>(p.indices), reads_topk);
  }
  if (!(grad_student.has_value() && grad_student->is_same(student))) {
    advise_huge_pages(grad_student);
  }
  const SparseRowsFn rows_fn = select_rows_fn();
  const int64_t block = std::max<int64_t>(1, kElementsPerBlock / vocab);
  RowQueue queue(n, block);
  const int64_t tasks = n * vocab >= kMinElementsToSplit ? at::get_num_threads() : 1;
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) { rows_fn(p, queue); });
  return rows;
}

// fastkd::sparse_kd_check (see csrc/sparse_ops.cpp): rows [begin, end); first[c] = 1 + the
// first row failing check c (range, repeats, mass), 0 when none does. Sorted copies of a
// row's indices find repeats. The mass is a float exp summed in double: the tolerance it is
// held to is far above float32 rounding.
template <typename value_t, typename index_t>
void check_topk_rows(const value_t* lp, const index_t* idx, int64_t begin, int64_t end,
                     int64_t k, const bool* valid, int64_t vocab, double max_mass,
                     int64_t* first) {
  std::vector<int64_t> sorted(static_cast<size_t>(k));
  for (int64_t r = begin; r < end; ++r) {
    if (valid != nullptr && !valid[r]) continue;
    double mass = 0;
    for (int64_t j = 0; j < k; ++j) {
      sorted[j] = static_cast<int64_t>(idx[r * k + j]);
      mass += std::exp(static_cast<float>(lp[r * k + j]));
    }
    std::sort(sorted.begin(), sorted.end());
    if (first[0] == 0 && (sorted.front() < 0 || sorted.back() >= vocab)) first[0] = r + 1;
    if (first[1] == 0 && std::adjacent_find(sorted.begin(), sorted.end()) != sorted.end()) {
      first[1] = r + 1;
    }
    if (first[2] == 0 && !(mass <= max_mass)) first[2] = r + 1;
  }
}

// The checks over all rows: serial for a small (N, k) (no parallel-region wake-ups), else in
// row ranges whose first failures are merged (the smallest row wins, as serially).
template <typename value_t, typename index_t>
void check_topk(const at::Tensor& logprobs, const at::Tensor& indices, const bool* valid,
                int64_t vocab, double max_mass, int64_t* first) {
  const int64_t n = logprobs.size(0), k = logprobs.size(1);
  const value_t* lp = logprobs.data_ptr<value_t>();
  const index_t* idx = indices.data_ptr<index_t>();
  constexpr int64_t kSerialEntries = 16384;
  if (n * k < kSerialEntries) {
    check_topk_rows(lp, idx, 0, n, k, valid, vocab, max_mass, first);
    return;
  }
  std::mutex merge;
  const int64_t grain = std::max<int64_t>(1, kSerialEntries / std::max<int64_t>(k, 1) / 4);
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    int64_t local[3] = {0, 0, 0};
    check_topk_rows(lp, idx, begin, end, k, valid, vocab, max_mass, local);
    std::lock_guard<std::mutex> lock(merge);
    for (int c = 0; c < 3; ++c) {
      if (local[c] != 0 && (first[c] == 0 || local[c] < first[c])) first[c] = local[c];
    }
  });
}

at::Tensor sparse_kd_check_cpu(const at::Tensor& logprobs_in, const at::Tensor& indices_in,
                               const std::optional<at::Tensor>& valid_in, int64_t vocab,
                               double max_mass) {
  TORCH_CHECK_VALUE(logprobs_in.dim() == 2 && indices_in.sizes() == logprobs_in.sizes(), kOp,
                    "sparse_kd_check takes (N, k) log-probs and indices of one shape");
  TORCH_CHECK_TYPE(indices_in.scalar_type() == at::kLong || indices_in.scalar_type() == at::kInt,
                   kOp, "topk_indices must be int64 or int32, got ", indices_in.scalar_type());
  const at::Tensor logprobs = logprobs_in.contiguous(), indices = indices_in.contiguous();
  at::Tensor valid;
  if (valid_in.has_value()) {
    valid = valid_in->to(at::kBool).contiguous();
    TORCH_CHECK_VALUE(valid.numel() == logprobs.size(0), kOp, "valid must have N entries");
  }
  at::Tensor first = at::zeros({3}, logprobs.options().dtype(at::kLong));
  const bool* valid_ptr = valid.defined() ? valid.data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logprobs.scalar_type(),
                                  "sparse_kd_check", [&] {
    if (indices.scalar_type() == at::kLong) {
      check_topk<scalar_t, int64_t>(logprobs, indices, valid_ptr, vocab, max_mass,
                                    first.data_ptr<int64_t>());
    } else {
      check_topk<scalar_t, int32_t>(logprobs, indices, valid_ptr, vocab, max_mass,
                                    first.data_ptr<int64_t>());
    }
  });
  return first;
}

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("sparse_kd", &fastkd::cpu::sparse_kd_cpu);
  m.impl("sparse_kd_check", &fastkd::cpu::sparse_kd_check_cpu);
}

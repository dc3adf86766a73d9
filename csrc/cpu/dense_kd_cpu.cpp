// CPU implementation of fastkd::dense_kd: argument checks, choice of the compiled kernel
// variant (AVX-512, AVX2 or portable), one at::parallel_for over rows.
//
// Student and teacher may have different dtypes (fp32 / bf16 / fp16 each); each gradient is
// written in its own input's dtype. Every (N, V) tensor needs only a unit column stride: its
// row stride is passed to the kernel, so slices and views (logits[:, :-1] of one batch
// element, big[:, :V]) are read and written where they are, never copied.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <optional>

#include "cpu/cpu_host.h"
#include "cpu/dense_kd_cpu.h"
#include "dense_kd_params.h"

namespace fastkd::cpu {
namespace {

// Rows per block of the row queue: ~64k elements (a few hundred KiB of logits).
constexpr int64_t kElementsPerBlock = 1 << 16;
// Inputs below this many elements stay on the calling thread.
constexpr int64_t kMinElementsToSplit = 1 << 16;

// The variant select_variant picks (cpu_host.h), chosen once per process.
DenseRowsFn select_rows_fn() {
  static const DenseRowsFn fn = [] {
    switch (select_variant(avx2_variant_compiled(), avx512_variant_compiled())) {
      case KernelVariant::kAVX512: return &dense_kd_rows_avx512;
      case KernelVariant::kAVX2: return &dense_kd_rows_avx2;
      default: return &dense_kd_rows_default;
    }
  }();
  return fn;
}

constexpr const char* kOp = "fastkd::dense_kd: ";

// A CPU (N, V) tensor shaped like student, of dtype `dtype`, with unit column stride and
// rows that do not overlap (any row stride >= V).
void check_matrix(const at::Tensor& t, const char* name, const at::Tensor& student,
                  at::ScalarType dtype, const char* dtype_owner) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), "fastkd::dense_kd: ", name,
                    " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK_VALUE(t.sizes() == student.sizes(), "fastkd::dense_kd: ", name, " must have shape ",
                    student.sizes(), " (like student), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "fastkd::dense_kd: ", name, " must have dtype ",
                   dtype, " (like ", dtype_owner, "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.size(1) <= 1 || t.stride(1) == 1, "fastkd::dense_kd: ", name,
                    " must have unit stride along the vocabulary (stride(1) == 1), got strides ",
                    t.strides());
  TORCH_CHECK_VALUE(t.size(0) <= 1 || t.stride(0) >= t.size(1), "fastkd::dense_kd: ", name,
                    " rows must not overlap (row stride ", t.stride(0), " < V = ", t.size(1),
                    ")");
}

void check_tensors(const at::Tensor& student, const at::Tensor& teacher,
                   const std::optional<at::Tensor>& target,
                   const std::optional<at::Tensor>& grad_student,
                   const std::optional<at::Tensor>& grad_teacher,
                   const std::optional<at::Tensor>& terms) {
  TORCH_CHECK_VALUE(student.dim() == 2, "fastkd::dense_kd: student must be 2-D (N, V), got ",
                    student.dim(), " dimensions");
  TORCH_CHECK_VALUE(student.size(1) > 0 || student.size(0) == 0,
                    "fastkd::dense_kd: student must have a non-empty vocabulary (V > 0)");
  element_type(student, kOp, "student");
  element_type(teacher, kOp, "teacher");
  check_matrix(student, "student", student, student.scalar_type(), "student");
  check_matrix(teacher, "teacher", student, teacher.scalar_type(), "teacher");
  if (target.has_value()) {
    const at::Tensor& y = *target;
    TORCH_CHECK_VALUE(y.device().is_cpu(), "fastkd::dense_kd: target must be a CPU tensor, got ",
                      y.device());
    TORCH_CHECK_TYPE(y.scalar_type() == at::kLong, "fastkd::dense_kd: target must be int64, got ",
                     y.scalar_type());
    TORCH_CHECK_VALUE(y.dim() == 1 && y.size(0) == student.size(0),
                      "fastkd::dense_kd: target must have shape (", student.size(0), "), got ",
                      y.sizes());
    TORCH_CHECK_VALUE(y.is_contiguous(), "fastkd::dense_kd: target must be contiguous");
  }
  if (grad_student.has_value()) {
    check_matrix(*grad_student, "grad_student", student, student.scalar_type(), "student");
  }
  if (grad_teacher.has_value()) {
    check_matrix(*grad_teacher, "grad_teacher", student, teacher.scalar_type(), "teacher");
  }
  if (terms.has_value()) {
    const at::Tensor& k = *terms;
    TORCH_CHECK_VALUE(k.device().is_cpu(), "fastkd::dense_kd: terms must be a CPU tensor, got ",
                      k.device());
    TORCH_CHECK_TYPE(k.scalar_type() == at::kFloat, "fastkd::dense_kd: terms must be float32, "
                     "got ", k.scalar_type());
    TORCH_CHECK_VALUE(k.dim() == 2 && k.size(0) == student.size(0) && k.size(1) == 2,
                      "fastkd::dense_kd: terms must have shape (", student.size(0), ", 2), got ",
                      k.sizes());
    TORCH_CHECK_VALUE(k.is_contiguous(), "fastkd::dense_kd: terms must be contiguous");
  }
}

// Row stride of an optional (N, V) tensor (rows of one element never need one).
int64_t row_stride(const std::optional<at::Tensor>& t) {
  return t.has_value() ? (t->size(0) > 1 ? t->stride(0) : t->size(1)) : 0;
}

void check_options(double temperature, double ce_weight, double div_weight, int64_t divergence,
                   double param_a, double param_b, double label_smoothing, bool with_terms) {
  const double beta = param_a;
  TORCH_CHECK_VALUE(std::isfinite(temperature) && temperature > 0,
                    "fastkd::dense_kd: temperature must be finite and > 0, got ", temperature);
  TORCH_CHECK_VALUE(std::isfinite(ce_weight) && std::isfinite(div_weight),
                    "fastkd::dense_kd: ce_weight and div_weight must be finite, got ", ce_weight,
                    " and ", div_weight);
  TORCH_CHECK_VALUE(divergence >= 0 && divergence <= 7,
                    "fastkd::dense_kd: divergence must be 0 (kl), 1 (reverse_kl), 2 (jsd), "
                    "3 (tvd), 4 (skew_kl), 5 (skew_reverse_kl), 6 (akl) or 7 (alpha_beta), got ",
                    divergence);
  const bool evaluated = div_weight != 0 || with_terms;
  TORCH_CHECK_VALUE(!(divergence == 4 || divergence == 5) || !evaluated ||
                        (param_a >= 0 && param_a < 1),
                    "fastkd::dense_kd: skew (param_a) must be in [0, 1), got ", param_a);
  TORCH_CHECK_VALUE(divergence != 7 || !evaluated || (param_a > 0 && param_b > 0),
                    "fastkd::dense_kd: alpha_beta needs param_a > 0 and param_b > 0, got ",
                    param_a, " and ", param_b);
  TORCH_CHECK_VALUE(divergence != 2 || (div_weight == 0 && !with_terms) || (beta > 0 && beta < 1),
                    "fastkd::dense_kd: beta must be in (0, 1) for jsd, got ", beta);
  TORCH_CHECK_VALUE(label_smoothing >= 0 && label_smoothing <= 1,
                    "fastkd::dense_kd: label_smoothing must be in [0, 1], got ", label_smoothing);
}

// Labels must be in [0, V) or ignore_index: a bad one would index outside the row.
void check_labels(const int64_t* target, int64_t n, int64_t vocab, int64_t ignore_index) {
  for (int64_t r = 0; r < n; ++r) {
    const int64_t y = target[r];
    TORCH_CHECK_VALUE(y == ignore_index || (y >= 0 && y < vocab), "fastkd::dense_kd: target[",
                      r, "] = ", y, " is outside [0, ", vocab, ") and is not ignore_index=",
                      ignore_index);
  }
}

void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

at::Tensor dense_kd_cpu(const at::Tensor& student, const at::Tensor& teacher,
                        const std::optional<at::Tensor>& target,
                        const std::optional<at::Tensor>& grad_student,
                        const std::optional<at::Tensor>& grad_teacher, double temperature,
                        double ce_weight, double div_weight, int64_t divergence,
                        double param_a, double param_b, int64_t ignore_index,
                        double label_smoothing, double softcap,
                        const std::optional<at::Tensor>& terms) {
  check_tensors(student, teacher, target, grad_student, grad_teacher, terms);
  check_options(temperature, ce_weight, div_weight, divergence, param_a, param_b,
                label_smoothing, terms.has_value());
  const int64_t n = student.size(0), vocab = student.size(1);
  at::Tensor rows = at::empty({n}, student.options().dtype(at::kFloat));
  if (n == 0) return rows;

  DenseKDParams params{};
  params.student = student.data_ptr();
  params.teacher = teacher.data_ptr();
  params.target = target.has_value() ? target->data_ptr<int64_t>() : nullptr;
  params.rows = rows.data_ptr<float>();
  params.grad_student = data_or_null(grad_student);
  params.grad_teacher = data_or_null(grad_teacher);
  params.terms = terms.has_value() ? terms->data_ptr<float>() : nullptr;
  params.n_rows = n;
  params.vocab = vocab;
  params.student_row_stride = row_stride(student);
  params.teacher_row_stride = row_stride(teacher);
  params.grad_student_row_stride = row_stride(grad_student);
  params.grad_teacher_row_stride = row_stride(grad_teacher);
  params.temperature = static_cast<float>(temperature);
  params.ce_weight = static_cast<float>(ce_weight);
  params.div_weight = static_cast<float>(div_weight);
  params.divergence = static_cast<int>(divergence);
  params.param_a = static_cast<float>(param_a);
  params.param_b = static_cast<float>(param_b);
  params.ignore_index = ignore_index;
  params.label_smoothing = static_cast<float>(label_smoothing);
  params.softcap = static_cast<float>(softcap);

  advise_huge_pages(grad_student);
  advise_huge_pages(grad_teacher);
  const ElementType student_type = element_type(student, kOp, "student");
  const ElementType teacher_type = element_type(teacher, kOp, "teacher");
  const DenseRowsFn rows_fn = select_rows_fn();
  if (params.target != nullptr) check_labels(params.target, n, vocab, ignore_index);
  // One parallel region; its tasks ignore their static ranges and drain the shared queue.
  const int64_t block = std::max<int64_t>(1, kElementsPerBlock / vocab);
  RowQueue queue(n, block);
  const int64_t tasks = n * vocab >= kMinElementsToSplit ? at::get_num_threads() : 1;
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    rows_fn(params, student_type, teacher_type, queue);
  });
  return rows;
}

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_IMPL(fastkd, CPU, m) {
  m.impl("dense_kd", &fastkd::cpu::dense_kd_cpu);
}

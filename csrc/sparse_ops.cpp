// Schema of the fused top-k (offline) teacher distillation op, added to the fastkd library.
//
// Its CPU kernel is in csrc/cpu/sparse_kd_cpu.cpp; its fake (meta) implementation and the
// functional forward-only wrapper live in Python (fastkd/ops/sparse_native.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  m.set_python_module("fastkd.ops.sparse_native");
  // Per-row weighted loss (float32); the gradient of that loss with respect to the student
  // written into grad_student when given (it may alias student); terms (N, 2) float32, when
  // given, receives the unweighted (CE, D) of every row. topk_logprobs: the teacher's
  // log-probabilities at the stored temperature, multiplied by teacher_scale before use
  // (re-tempering); topk_indices int32 or int64. divergence and its param_a, param_b: as dense_kd;
  // renormalize: tail "renormalize" (else "bucket"); softcap <= 0 means off. Rows whose
  // target is ignore_index read neither the student nor the top-k.
  m.def(
      "sparse_kd(Tensor student, Tensor topk_logprobs, Tensor topk_indices, Tensor? target, "
      "Tensor(a!)? grad_student, Tensor(b!)? terms, float temperature, float ce_weight, "
      "float div_weight, int divergence, float param_a, float param_b, int ignore_index, "
      "float label_smoothing, float softcap, bool renormalize, float teacher_scale) -> Tensor");
  // Eager validation helper of the API (CPU tensors): one pass over the (N, k) top-k rows
  // whose `valid` entry is true (all rows when absent). Returns int64 (3,): 1 + the first
  // row with an index outside [0, vocab), with a repeated index, with exp-sum > max_mass
  // (or NaN); 0 where no row fails.
  m.def(
      "sparse_kd_check(Tensor topk_logprobs, Tensor topk_indices, Tensor? valid, int vocab, "
      "float max_mass) -> Tensor");
}

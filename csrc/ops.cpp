// Registration of the fastkd operator schemas with the PyTorch dispatcher.
//
// The CPU kernels (csrc/cpu/) and the CUDA kernels (csrc/cuda/*_api.cpp) add their
// implementations with TORCH_LIBRARY_IMPL; fakes and autograd live in Python
// (fastkd/ops/native.py), so torch.compile and torch.library.opcheck see every op.
#include <Python.h>
#include <torch/library.h>

#include "cpu/cpu_host.h"  // cpu_kernel_variant

// `import fastkd._C` only needs the module to exist: loading the shared object runs the
// static registrations below.
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

TORCH_LIBRARY(fastkd, m) {
  // Fake (meta) implementations live in Python; tracing imports this module on demand.
  m.set_python_module("fastkd.ops.native");
  // Dense fused distillation: per-row weighted loss (float32), gradient of that loss written
  // into grad_student / grad_teacher when given (grad_student may alias student).
  // divergence: the index in fastkd.reference.DIVERGENCES; param_a, param_b: its parameters
  // (jsd: beta, 0; see fastkd._options.LossOptions.divergence_params). softcap <= 0 means off. target may be
  // absent (no cross-entropy term, no ignored rows). student and teacher: (N, V), each
  // fp32 / bf16 / fp16 with unit column stride and any row stride; each gradient in its
  // input's dtype. terms: optional (N, 2) float32 receiving the unweighted CE and divergence
  // of every row (both evaluated even when a weight is 0; CE only with a target).
  m.def(
      "dense_kd(Tensor student, Tensor teacher, Tensor? target, Tensor(a!)? grad_student, "
      "Tensor(b!)? grad_teacher, float temperature, float ce_weight, float div_weight, "
      "int divergence, float param_a, float param_b, int ignore_index, float label_smoothing, "
      "float softcap, Tensor(c!)? terms=None) -> Tensor");
  // The build of the CPU kernel of `op` ("dense_kd" or "sparse_kd") that runs in this
  // process: "avx512", "avx2" or "default" (see csrc/cpu/cpu_host.h). No tensors: one kernel
  // for every dispatch key.
  m.def("cpu_kernel_variant(str op) -> str", &fastkd::cpu::cpu_kernel_variant);
}

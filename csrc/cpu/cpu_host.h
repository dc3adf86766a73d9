// Host-side helpers shared by the CPU ops (dense_kd_cpu.cpp, sparse_kd_cpu.cpp): the choice of
// the compiled kernel variant, the element type of an input tensor, and the huge-page hint for
// fresh gradient buffers.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "cpu/dense_kd_cpu.h"  // ElementType

namespace fastkd::cpu {

// Whether a kernel's AVX2 variant should run: it was compiled (`compiled`), the CPU has AVX2 +
// FMA + F16C, and ATen's own capability (which honours ATEN_CPU_CAPABILITY=default) allows it.
bool use_avx2_variant(bool compiled);

// The element type of a float32 / bfloat16 / float16 tensor; any other dtype raises a
// TypeError "<op><name> must be float32, bfloat16 or float16, got <dtype>".
ElementType element_type(const at::Tensor& t, const char* op, const char* name);

// A fresh gradient buffer's pages are first touched by the kernel: with 4 KiB pages, faulting
// them in costs several times the kernel's own writes. Transparent huge pages (2 MiB) cut
// that; Linux honours the hint only where THP is in "madvise" or "always" mode. Buffers under
// 16 MiB are left alone; FASTKD_CPU_HUGEPAGES=0 turns the hint off.
void advise_huge_pages(const std::optional<at::Tensor>& buffer);

}  // namespace fastkd::cpu

// Host-side helpers shared by the CPU ops (dense_kd_cpu.cpp, sparse_kd_cpu.cpp): the choice of
// the compiled kernel variant, the element type of an input tensor, and the huge-page hint for
// fresh gradient buffers.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

#include "cpu/dense_kd_cpu.h"  // ElementType

namespace fastkd::cpu {

// The compiled builds of a row kernel (dense_kd_cpu_rows.h, sparse_kd_cpu_rows.h).
enum class KernelVariant { kDefault, kAVX2, kAVX512 };

// The variant a kernel runs, following ATen's own capability (at::get_cpu_capability(): AVX512
// on CPUs with AVX-512 VL/BW/DQ + FMA, unless ATEN_CPU_CAPABILITY=avx2 / default lowers it;
// that variable is not checked against the CPU, hence the checks here): AVX-512 when it was
// compiled, ATen says AVX512 and the CPU has AVX-512 F/BW/VL/DQ + FMA + F16C; else AVX2 when
// it was compiled, ATen says AVX2 or AVX512 and the CPU has AVX2 + FMA + F16C; the portable
// variant otherwise.
KernelVariant select_variant(bool avx2_compiled, bool avx512_compiled);

// "default", "avx2" or "avx512".
const char* variant_name(KernelVariant variant);

// The op fastkd::cpu_kernel_variant(str op): the variant name that `op` ("dense_kd" or
// "sparse_kd") runs in this process.
std::string cpu_kernel_variant(const std::string& op);

// The element type of a float32 / bfloat16 / float16 tensor; any other dtype raises a
// TypeError "<op><name> must be float32, bfloat16 or float16, got <dtype>".
ElementType element_type(const at::Tensor& t, const char* op, const char* name);

// A fresh gradient buffer's pages are first touched by the kernel: with 4 KiB pages, faulting
// them in costs several times the kernel's own writes. Transparent huge pages (2 MiB) cut
// that; Linux honours the hint only where THP is in "madvise" or "always" mode. Buffers under
// 16 MiB are left alone; FASTKD_CPU_HUGEPAGES=0 turns the hint off.
void advise_huge_pages(const std::optional<at::Tensor>& buffer);

}  // namespace fastkd::cpu

// Host-side helpers shared by the CPU ops; see cpu_host.h.
#include "cpu/cpu_host.h"

#include <ATen/Version.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <string>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#include "cpu/sparse_kd_cpu.h"  // the top-k kernel's compiled variants

namespace fastkd::cpu {
namespace {

bool cpu_has_avx2_fma() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  return cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") &&
         __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

}  // namespace

KernelVariant select_variant(bool avx2_compiled, bool avx512_compiled) {
  const std::string capability = at::get_cpu_capability();
  if (avx512_compiled && capability == "AVX512" && cpu_has_avx512()) {
    return KernelVariant::kAVX512;
  }
  if (avx2_compiled && (capability == "AVX2" || capability == "AVX512") && cpu_has_avx2_fma()) {
    return KernelVariant::kAVX2;
  }
  return KernelVariant::kDefault;
}

const char* variant_name(KernelVariant variant) {
  switch (variant) {
    case KernelVariant::kAVX512: return "avx512";
    case KernelVariant::kAVX2: return "avx2";
    default: return "default";
  }
}

std::string cpu_kernel_variant(const std::string& op) {
  if (op == "dense_kd") {
    return variant_name(select_variant(avx2_variant_compiled(), avx512_variant_compiled()));
  }
  TORCH_CHECK_VALUE(op == "sparse_kd", "fastkd::cpu_kernel_variant: op must be \"dense_kd\" or "
                    "\"sparse_kd\", got \"", op, "\"");
  return variant_name(
      select_variant(sparse_avx2_variant_compiled(), sparse_avx512_variant_compiled()));
}

ElementType element_type(const at::Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ElementType::kFloat32;
    case at::kBFloat16:
      return ElementType::kBFloat16;
    case at::kHalf:
      return ElementType::kFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, name, " must be float32, bfloat16 or float16, got ",
                       t.scalar_type());
  }
  return ElementType::kFloat32;
}

void advise_huge_pages(const std::optional<at::Tensor>& buffer) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  constexpr size_t kMinBytes = size_t{16} << 20;
  static const bool enabled = [] {
    const char* flag = std::getenv("FASTKD_CPU_HUGEPAGES");
    return flag == nullptr || std::string(flag) != "0";
  }();
  if (!enabled || !buffer.has_value() || buffer->nbytes() < kMinBytes) return;
  const auto start = reinterpret_cast<uintptr_t>(buffer->data_ptr());
  const uintptr_t begin = (start + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (start + buffer->nbytes()) & ~(kHuge - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)buffer;
#endif
}

}  // namespace fastkd::cpu

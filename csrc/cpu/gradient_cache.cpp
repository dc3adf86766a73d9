// A cache of freed CPU gradient buffers, handed back to the next step's request of the same size.
//
// Why: the fused losses write the student gradient into a fresh (N, V) buffer every training
// step. At LLM sizes that buffer (262 MB at N = 2048, V = 32000, fp32) is far above glibc's
// largest mmap threshold (32 MiB), so every step mmaps it, the kernel's first write faults
// every page in and the OS zeroes it (a third of the step's time at N = 2048, see
// docs/cpu_kernel.md), and the free munmaps it again. Blocks kept here after their tensor dies
// are already mapped: the next step's kernel writes them at memory speed.
//
// Semantics, like a caching allocator: at most FASTKD_CPU_GRADIENT_CACHE_MB (default 4096)
// megabytes of freed blocks are kept, oldest released first; 0 turns the cache off. Requests
// below 16 MiB go to at::empty. Every hand-out and every
// return is reported to the profiler like an allocation and a free, so torch.profiler's
// memory view (and the benchmarks' peak memory) sees the gradient exactly as before.
// fastkd::cpu_gradient_cache_release() frees the kept blocks.

#include <ATen/ATen.h>
#include <c10/core/Allocator.h>
#include <torch/library.h>

#include <cstdlib>
#include <deque>
#include <mutex>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace fastkd::cpu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;   // blocks are whole 2 MiB pages
// Smaller blocks are left to malloc. glibc serves blocks up to 32 MiB from its heap once its
// dynamic mmap threshold has risen past them, but not before; 16 MiB (N >= 128 at V = 32000
// in float32) takes the gradients whose faults cost a measurable share of a step.
constexpr size_t kMinBytes = size_t{16} << 20;

struct Block {
  void* ptr;
  size_t bytes;
};

class GradientCache {
 public:
  static GradientCache& instance() {
    static GradientCache* cache = new GradientCache();  // never destroyed: tensors may outlive
    return *cache;                                      // static destruction
  }

  bool serves(size_t bytes) const { return limit_ > 0 && bytes >= kMinBytes; }

  // A block of at least `bytes` (rounded up to whole huge pages): a kept one of that exact
  // size when there is one (training repeats the same shapes), else a new one.
  Block acquire(size_t bytes) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->bytes == rounded) {
          const Block block = *it;
          free_.erase(it);
          kept_bytes_ -= block.bytes;
          return block;
        }
      }
    }
    void* ptr = std::aligned_alloc(kHugePage, rounded);
    TORCH_CHECK(ptr != nullptr, "fastkd: out of memory allocating a ", rounded,
                "-byte CPU gradient buffer");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(ptr, rounded, MADV_HUGEPAGE);  // 2 MiB faults on the first step, not 4 KiB ones
#endif
    return {ptr, rounded};
  }

  // Called when the last tensor on `block` dies: keep it, dropping the oldest blocks beyond
  // the limit.
  void release(Block block) {
    std::deque<Block> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_back(block);
      kept_bytes_ += block.bytes;
      while (kept_bytes_ > limit_ && !free_.empty()) {
        kept_bytes_ -= free_.front().bytes;
        dropped.push_back(free_.front());
        free_.pop_front();
      }
    }
    for (const Block& b : dropped) std::free(b.ptr);
  }

  int64_t release_all() {
    std::deque<Block> dropped;
    int64_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      dropped.swap(free_);
      bytes = static_cast<int64_t>(kept_bytes_);
      kept_bytes_ = 0;
    }
    for (const Block& b : dropped) std::free(b.ptr);
    return bytes;
  }

  int64_t kept_bytes() {
    std::lock_guard<std::mutex> lock(mutex_);
    return static_cast<int64_t>(kept_bytes_);
  }

 private:
  GradientCache() {
    const char* value = std::getenv("FASTKD_CPU_GRADIENT_CACHE_MB");
    const long long mb = value == nullptr ? 4096 : std::atoll(value);
    limit_ = mb > 0 ? static_cast<size_t>(mb) << 20 : 0;
  }

  std::mutex mutex_;
  std::deque<Block> free_;
  size_t kept_bytes_ = 0;
  size_t limit_ = 0;
};

// Reported like c10's CPU allocator reports its own blocks (the totals are not tracked here).
void report(void* ptr, int64_t bytes) {
  c10::reportMemoryUsageToProfiler(ptr, bytes, 0, 0, c10::Device(c10::DeviceType::CPU));
}

at::Tensor cached_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  int64_t numel = 1;
  for (const int64_t n : sizes) numel *= n;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(dtype);
  GradientCache& cache = GradientCache::instance();
  if (!cache.serves(bytes)) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  const Block block = cache.acquire(bytes);
  report(block.ptr, static_cast<int64_t>(bytes));
  auto give_back = [block, bytes](void*) {
    report(block.ptr, -static_cast<int64_t>(bytes));
    GradientCache::instance().release(block);
  };
  return at::from_blob(block.ptr, sizes, give_back,
                       at::TensorOptions().dtype(dtype).device(at::kCPU));
}

int64_t release_cached() { return GradientCache::instance().release_all(); }

int64_t cached_bytes() { return GradientCache::instance().kept_bytes(); }

}  // namespace
}  // namespace fastkd::cpu

TORCH_LIBRARY_FRAGMENT(fastkd, m) {
  // Eager-only helpers of fastkd.ops.dense.new_gradient (never traced: no tensor inputs).
  m.def("cpu_cached_empty(int[] size, ScalarType dtype) -> Tensor",
        &fastkd::cpu::cached_empty);
  m.def("cpu_gradient_cache_release() -> int", &fastkd::cpu::release_cached);
  m.def("cpu_gradient_cache_bytes() -> int", &fastkd::cpu::cached_bytes);
}

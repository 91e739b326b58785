#include "output_cache.h"

#include <sys/mman.h>

#include <cstdlib>
#include <deque>
#include <mutex>
#include <utility>

#include <torch/library.h>

namespace fused_loss::cpu {
namespace {

constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kMinCachedBytes = size_t(4) << 20;  // smaller buffers are cheap to allocate

size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

class OutputCache {
 public:
  static OutputCache& get() {
    static OutputCache* cache = new OutputCache();  // never destroyed: deleters may run at exit
    return *cache;
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = free_.begin(); it != free_.end(); ++it) {
        if (it->second == bytes) {
          void* p = it->first;
          free_.erase(it);
          return p;
        }
      }
    }
    void* p = nullptr;
    if (posix_memalign(&p, kHuge, bytes) != 0) return nullptr;
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE);  // a hint; failure is harmless
#endif
    return p;
  }

  void give_back(void* p, size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    if (max_free_ == 0) {
      std::free(p);
      return;
    }
    free_.emplace_back(p, bytes);
    while (free_.size() > max_free_) {  // drop the oldest
      std::free(free_.front().first);
      free_.pop_front();
    }
  }

  int64_t release_all() {
    std::lock_guard<std::mutex> lock(mu_);
    int64_t released = 0;
    for (auto& [p, bytes] : free_) {
      std::free(p);
      released += int64_t(bytes);
    }
    free_.clear();
    return released;
  }

 private:
  OutputCache() {
    if (const char* env = std::getenv("FUSED_LOSS_CPU_CACHE_BLOCKS")) max_free_ = size_t(std::max(0L, std::atol(env)));
  }

  std::mutex mu_;
  std::deque<std::pair<void*, size_t>> free_;
  size_t max_free_ = 2;
};

}  // namespace

at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = size_t(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < kMinCachedBytes) return at::empty(sizes, options);
  const size_t block = round_up(bytes, kHuge);
  void* p = OutputCache::get().take(block);
  TORCH_CHECK(p != nullptr, "fused_loss: out of memory allocating ", block, " bytes");
  return at::from_blob(
      p, sizes, [block](void* q) { OutputCache::get().give_back(q, block); }, options);
}

int64_t empty_cache() { return OutputCache::get().release_all(); }

}  // namespace fused_loss::cpu

TORCH_LIBRARY_FRAGMENT(fused_loss, m) {
  // Not a tensor op: frees the CPU output cache (see output_cache.h). Returns bytes freed.
  m.def("empty_cache() -> int", &fused_loss::cpu::empty_cache);
}

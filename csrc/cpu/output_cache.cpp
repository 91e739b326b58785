#include "output_cache.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <mutex>
#include <utility>
#include <vector>

// Under AddressSanitizer (scripts/sanitize.sh) a cached block is off-limits while unused,
// and so is the rounding past a tensor's end: what malloc and free would catch.
#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#define FL_POISON(p, n) ASAN_POISON_MEMORY_REGION(p, n)
#define FL_UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION(p, n)
#else
#define FL_POISON(p, n) ((void)(p), (void)(n))
#define FL_UNPOISON(p, n) ((void)(p), (void)(n))
#endif

#include <c10/core/CPUAllocator.h>
#include <c10/util/strides.h>
#include <torch/library.h>

namespace fused_loss::cpu {
namespace {

constexpr size_t kHuge = size_t(2) << 20;
constexpr size_t kMinCachedBytes = size_t(4) << 20;  // smaller buffers are cheap to allocate
constexpr int64_t kDefaultMaxBytes = int64_t(1) << 30;
constexpr int64_t kDefaultMaxBlocks = 2;

size_t round_up(size_t n, size_t m) { return (n + m - 1) / m * m; }

// A non-negative integer from the environment; anything else ("1e9", "1G", "-1") is refused
// with a warning rather than read as something else.
int64_t env_or(const char* name, int64_t fallback) {
  const char* env = std::getenv(name);
  if (!env || !*env) return fallback;
  char* end = nullptr;
  const long long v = std::strtoll(env, &end, 10);
  if (*end != '\0' || v < 0) {
    TORCH_WARN("fused_loss: ", name, "=", env, " is not a non-negative integer; using ", fallback);
    return fallback;
  }
  return v;
}

// Default byte cap: 1 GiB, or an eighth of the machine's memory where that is less.
int64_t default_max_bytes() {
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
  if (pages <= 0 || page <= 0) return kDefaultMaxBytes;
  return std::min<int64_t>(kDefaultMaxBytes, int64_t(pages) * page / 8);
}

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
          held_ -= bytes;
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
    FL_POISON(p, bytes);
    std::vector<std::pair<void*, size_t>> to_free;
    {
      std::lock_guard<std::mutex> lock(mu_);
      free_.emplace_back(p, bytes);
      held_ += bytes;
      trim(to_free);
    }
    release(to_free);
  }

  int64_t release_all() {
    std::lock_guard<std::mutex> lock(mu_);
    const int64_t released = int64_t(held_);
    for (auto& [p, bytes] : free_) {
      FL_UNPOISON(p, bytes);
      std::free(p);
    }
    free_.clear();
    held_ = 0;
    return released;
  }

  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> lock(mu_);
    return {int64_t(free_.size()), int64_t(held_), max_blocks_, max_bytes_};
  }

  void set_limits(int64_t max_bytes, int64_t max_blocks) {
    std::vector<std::pair<void*, size_t>> to_free;
    {
      std::lock_guard<std::mutex> lock(mu_);
      max_bytes_ = std::max<int64_t>(0, max_bytes);
      max_blocks_ = std::max<int64_t>(0, max_blocks);
      trim(to_free);
    }
    release(to_free);
  }

 private:
  OutputCache()
      : max_bytes_(env_or("FUSED_LOSS_CPU_CACHE_BYTES", default_max_bytes())),
        max_blocks_(env_or("FUSED_LOSS_CPU_CACHE_BLOCKS", kDefaultMaxBlocks)) {}

  // Frees blocks dropped by trim, outside the lock (freeing 1 GiB takes a while).
  static void release(const std::vector<std::pair<void*, size_t>>& blocks) {
    for (auto& [p, bytes] : blocks) {
      FL_UNPOISON(p, bytes);
      std::free(p);
    }
  }

  // Drops the oldest blocks until both limits hold (mu_ held).
  void trim(std::vector<std::pair<void*, size_t>>& to_free) {
    while (!free_.empty() && (int64_t(free_.size()) > max_blocks_ || int64_t(held_) > max_bytes_)) {
      to_free.push_back(free_.front());
      held_ -= free_.front().second;
      free_.pop_front();
    }
  }

  std::mutex mu_;
  std::deque<std::pair<void*, size_t>> free_;
  size_t held_ = 0;  // bytes in free_
  int64_t max_bytes_;
  int64_t max_blocks_;
};

// A cached block handed out as a tensor's storage: it goes back to the cache when the
// storage lets go of it (the tensor is freed, or its storage is resized).
struct Block {
  void* ptr;
  size_t bytes;
};

void return_block(void* ctx) {
  auto* b = static_cast<Block*>(ctx);
  FL_UNPOISON(b->ptr, b->bytes);
  OutputCache::get().give_back(b->ptr, b->bytes);
  delete b;
}

}  // namespace

at::Tensor empty_cached(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = size_t(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < kMinCachedBytes) return at::empty(sizes, options);
  const size_t block = round_up(bytes, kHuge);
  void* p = OutputCache::get().take(block);
  TORCH_CHECK(p != nullptr, "fused_loss: out of memory allocating ", block, " bytes");
  FL_UNPOISON(p, bytes);
  FL_POISON(static_cast<char*>(p) + bytes, block - bytes);
  c10::DataPtr data(p, new Block{p, block}, &return_block, c10::Device(c10::DeviceType::CPU));
  // Resizable with the CPU allocator, as torch's own storages: code that frees a gradient
  // with untyped_storage().resize_(0) (sharded training) works on ours too.
  c10::Storage storage(c10::Storage::use_byte_size_t(), bytes, std::move(data), c10::GetCPUAllocator(),
                       /*resizable=*/true);
  return at::empty({0}, options).set_(storage, 0, sizes, c10::contiguous_strides(sizes));
}

int64_t empty_cache() { return OutputCache::get().release_all(); }

std::vector<int64_t> cache_info() { return OutputCache::get().info(); }

void set_cache_limits(int64_t max_bytes, int64_t max_blocks) { OutputCache::get().set_limits(max_bytes, max_blocks); }

}  // namespace fused_loss::cpu

TORCH_LIBRARY_FRAGMENT(fused_loss, m) {
  // Not tensor ops: the CPU output cache (see output_cache.h).
  m.def("empty_cache() -> int", &fused_loss::cpu::empty_cache);
  m.def("cpu_cache_info() -> int[]", &fused_loss::cpu::cache_info);
  m.def("set_cpu_cache_limits(int max_bytes, int max_blocks) -> ()", &fused_loss::cpu::set_cache_limits);
}

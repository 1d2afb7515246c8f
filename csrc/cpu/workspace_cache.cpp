// The CPU workspace cache (workspace_cache.h): one cache per thread, all of them listed in a registry
// so that any thread can empty them, and one budget for all of them together.
#include "workspace_cache.h"

#include <algorithm>
#include <atomic>
#include <mutex>
#include <vector>

#include <unistd.h>

namespace lstmfast::cpu {
namespace {

// Per thread: a bfloat16 LSTM backward alone holds about 15 large buffers at once (saved activations,
// float32 copies of its arguments, workspaces, float32 results, packed operands).
constexpr size_t kBlocks = 32;

// The default limit: an eighth of the machine's memory, from 512 MiB to 2 GiB. A long sequence's
// training step holds gate buffers of hundreds of MB, and fresh pages cost it dearly: GRU T=512 B=64
// H=1024 (1.3 GB of lstmfast buffers) spent 17% of its step zeroing them, and took 4.6-4.9 s a step
// with 2 GiB against 5.6-5.8 s with 512 MiB. The cache only keeps blocks that calls used at once, so
// it holds no more than a step's own buffers.
int64_t default_limit() {
  constexpr int64_t kLeast = int64_t(512) << 20, kMost = int64_t(2) << 30;
  const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  const int64_t eighth = pages > 0 && page > 0 ? static_cast<int64_t>(pages) * page / 8 : 0;
  return std::clamp(eighth, kLeast, kMost);
}

struct ThreadCache;

// Never destroyed: the caches of threads that end during process exit still unregister here.
struct Registry {
  std::mutex mutex;                  // guards `caches`; taken before any cache's own mutex
  std::vector<ThreadCache*> caches;
  std::atomic<int64_t> bytes{0};     // held by all caches together
  std::atomic<int64_t> limit{default_limit()};
};

Registry& registry() {
  static Registry* r = new Registry();
  return *r;
}

bool in_use(const at::Tensor& block) { return block.storage().use_count() > 1; }

struct ThreadCache {
  std::mutex mutex;  // guards `blocks`
  std::vector<at::Tensor> blocks;

  ThreadCache() {
    std::lock_guard<std::mutex> lock(registry().mutex);
    registry().caches.push_back(this);
  }
  ~ThreadCache() {
    std::lock_guard<std::mutex> lock(registry().mutex);
    auto& caches = registry().caches;
    caches.erase(std::find(caches.begin(), caches.end(), this));
    drop_if([](const at::Tensor&) { return true; });
  }

  // Drops the blocks for which `drop` holds; the caller holds no lock on this cache.
  template <typename Pred>
  void drop_if(Pred drop) {
    std::lock_guard<std::mutex> lock(mutex);
    drop_if_locked(drop);
  }
  template <typename Pred>
  void drop_if_locked(Pred drop) {
    // The count goes down block by block, so that `drop` may look at it.
    auto keep = std::remove_if(blocks.begin(), blocks.end(), [&](const at::Tensor& b) {
      if (!drop(b)) return false;
      registry().bytes -= static_cast<int64_t>(b.nbytes());
      return true;
    });
    blocks.erase(keep, blocks.end());
  }

  // Counts `bytes` more against the limit if they fit under it (atomically: threads racing for the
  // last room cannot both get it).
  static bool reserve(int64_t bytes) {
    Registry& r = registry();
    int64_t held = r.bytes.load();
    while (held + bytes <= r.limit.load()) {
      if (r.bytes.compare_exchange_weak(held, held + bytes)) return true;
    }
    return false;
  }

  // The smallest free block of at least `bytes`, or nullptr.
  at::Tensor* smallest_free(int64_t bytes) {
    at::Tensor* smallest = nullptr;
    for (at::Tensor& b : blocks) {
      if (!in_use(b) && static_cast<int64_t>(b.nbytes()) >= bytes &&
          (smallest == nullptr || b.nbytes() < smallest->nbytes())) {
        smallest = &b;
      }
    }
    return smallest;
  }

  at::Tensor take(int64_t bytes) {
    std::lock_guard<std::mutex> lock(mutex);
    if (at::Tensor* fits = smallest_free(bytes)) return *fits;
    at::Tensor block = at::empty({bytes}, at::kByte);
    // When even all of this cache's free blocks could not make room under the budget (other threads
    // hold the rest), the new block is simply not cached: dropping them would gain nothing.
    int64_t own_free = 0;
    for (const at::Tensor& b : blocks) {
      if (!in_use(b)) own_free += static_cast<int64_t>(b.nbytes());
    }
    if (registry().bytes.load() - own_free + bytes > registry().limit.load()) return block;
    // Make room: a full cache gives up its smallest free block, and free blocks go (smallest first)
    // while the new one would take all the caches past their limit. If that is not enough the new
    // block is not cached.
    while (true) {
      if (blocks.size() < kBlocks && reserve(bytes)) {
        blocks.push_back(block);
        return block;
      }
      const at::Tensor* victim = smallest_free(0);
      if (victim == nullptr) return block;
      drop_if_locked([victim](const at::Tensor& b) { return &b == victim; });
    }
  }
};

ThreadCache& this_thread_cache() {
  thread_local ThreadCache cache;
  return cache;
}

// Drops cached blocks on every thread (only the free ones when `free_only`) while `more` holds.
template <typename More>
void trim(bool free_only, More more) {
  Registry& r = registry();
  std::lock_guard<std::mutex> lock(r.mutex);
  for (ThreadCache* cache : r.caches) {
    if (!more()) return;
    cache->drop_if([&](const at::Tensor& b) { return more() && !(free_only && in_use(b)); });
  }
}

}  // namespace

thread_local bool temporary_results = false;

at::Tensor cached_block(int64_t bytes) {
  if (!cached_size(bytes)) return at::empty({bytes}, at::kByte);
  return this_thread_cache().take(bytes);
}

int64_t cache_bytes() { return registry().bytes.load(); }

void empty_cache() {
  trim(false, [] { return true; });
}

int64_t cache_limit() { return registry().limit.load(); }

void set_cache_limit(int64_t bytes) {
  TORCH_CHECK(bytes >= 0, "set_cpu_cache_limit: expected a number of bytes >= 0, but got ",
              std::to_string(bytes));
  Registry& r = registry();
  r.limit = bytes;
  // Free blocks first, then (only if still over) blocks in use, whose memory their users keep alive.
  trim(true, [&r] { return r.bytes.load() > r.limit.load(); });
  trim(false, [&r] { return r.bytes.load() > r.limit.load(); });
}

}  // namespace lstmfast::cpu

// The cache of large CPU buffers that lstmfast's ops reuse from call to call (scratch space, the
// activations saved for backward, and a float16 / bfloat16 call's float32 copies of its arguments and
// results), like oneDNN's scratchpad: fresh pages for every call's gates and
// gates gradients cost page faults by the hundred thousand per second of training.
//
// Each thread that runs ops has its own cache (no contention: its mutex is only ever contended by
// empty_cpu_cache or a new limit, from another thread). All caches together hold at most the limit
// (set_cpu_cache_limit; by default an eighth of the machine's memory, from 512 MiB to 2 GiB); a
// thread's cache is freed when the thread ends, and empty_cpu_cache frees every thread's blocks from
// any thread. A block is reused once nothing references its storage but the cache.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace lstmfast::cpu {

// A CPU byte tensor of at least `bytes` (exactly `bytes` when fresh); from the calling thread's cache
// when cached_size(bytes), else allocated as usual.
at::Tensor cached_block(int64_t bytes);

// Set on a thread while it runs a float16 / bfloat16 op call, whose float32 results are temporaries
// (rounded to the call's dtype, then dropped): the op then takes them from the cache too
// (lstmfast::result in layer_ops.h).
extern thread_local bool temporary_results;

// Bytes held by the caches of all threads together.
int64_t cache_bytes();
// Drops every thread's cached blocks (those still in use are freed when their last user lets go).
void empty_cache();
// The bound on cache_bytes(); setting a lower one trims the caches at once.
int64_t cache_limit();
void set_cache_limit(int64_t bytes);

// The sizes the cache serves: from 1 MiB (smaller blocks cost few page faults) up to the limit (long
// sequences' gate buffers run to hundreds of MB; see the default limit in workspace_cache.cpp).
constexpr int64_t kSmallestBlock = int64_t(1) << 20;
inline bool cached_size(int64_t bytes) { return bytes >= kSmallestBlock && bytes <= cache_limit(); }

}  // namespace lstmfast::cpu

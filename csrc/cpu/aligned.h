// Scratch vectors for the GEMMs' packed panels and rounded rows: 64-byte aligned, so that a micro-kernel's
// 64-byte loads never span two cache lines (std::vector's new gives 16 bytes: a split load at every
// step of the depth loop; own::gemm_tall, 3072 x 1024 x 4096 on one core, 115 -> 128 GFLOP/s).
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace lstmfast::cpu {

constexpr std::size_t kCacheLine = 64;

template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kCacheLine)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(kCacheLine)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
};

template <typename T>
using AlignedVector = std::vector<T, CacheLineAllocator<T>>;

}  // namespace lstmfast::cpu

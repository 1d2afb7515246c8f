// The AVX2 build of lstmfast's own GEMM (gemm.h, gemm_impl.h), for CPUs without AVX-512 (AMD EPYC up to
// Zen 3, Intel client cores): the same panels of 64 bytes, each vector of the kernels two 256-bit
// registers, and tiles of at most 6 rows x 16 floats (or 8 doubles): 12 of the 16 registers accumulate,
// 2 hold B, 1 a broadcast A. Each element of C takes the same fused multiply-adds in the same order as
// in the AVX-512 build.
#include "gemm.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace lstmfast::cpu::avx2 {
namespace {

// 8 x 8 floats transposed in registers: r[i] holds row i, then column i.
inline void transpose8(__m256 r[8]) {
  __m256 t[8], s[8];
  for (int i = 0; i < 4; ++i) {
    t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int h = 0; h < 2; ++h) {  // rows 0-3, then rows 4-7
    const __m256* u = t + 4 * h;
    s[4 * h + 0] = _mm256_shuffle_ps(u[0], u[2], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * h + 1] = _mm256_shuffle_ps(u[0], u[2], _MM_SHUFFLE(3, 2, 3, 2));
    s[4 * h + 2] = _mm256_shuffle_ps(u[1], u[3], _MM_SHUFFLE(1, 0, 1, 0));
    s[4 * h + 3] = _mm256_shuffle_ps(u[1], u[3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(s[i], s[4 + i], 0x20);
    r[4 + i] = _mm256_permute2f128_ps(s[i], s[4 + i], 0x31);
  }
}

// 4 x 4 doubles transposed in registers.
inline void transpose4(__m256d r[4]) {
  const __m256d t0 = _mm256_unpacklo_pd(r[0], r[1]), t1 = _mm256_unpackhi_pd(r[0], r[1]);
  const __m256d t2 = _mm256_unpacklo_pd(r[2], r[3]), t3 = _mm256_unpackhi_pd(r[2], r[3]);
  r[0] = _mm256_permute2f128_pd(t0, t2, 0x20);
  r[1] = _mm256_permute2f128_pd(t1, t3, 0x20);
  r[2] = _mm256_permute2f128_pd(t0, t2, 0x31);
  r[3] = _mm256_permute2f128_pd(t1, t3, 0x31);
}

// A panel's 64 bytes as two 256-bit halves of Lanes elements each; masks are prefixes of the 2 Lanes
// lanes (every mask gemm_impl.h makes keeps the low lanes).
template <typename T>
struct Half;
template <>
struct Half<float> {
  using R = __m256;
};
template <>
struct Half<double> {
  using R = __m256d;
};

template <typename T, typename MaskBits>
struct Pair {
  using R = typename Half<T>::R;
  struct V {
    R lo, hi;
  };
  static constexpr int kLanes = 32 / sizeof(T);
  using Mask = MaskBits;
  using Bits = V;
  static constexpr Mask kAll = Mask(~Mask(0));
  // The low n lanes of a half set (n may be <= 0 or >= kLanes).
  static __m256i lanes(int n) {
    if constexpr (sizeof(T) == 4) {
      return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    } else {
      return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
    }
  }
  static R load_half(const T* p) {
    if constexpr (sizeof(T) == 4) return _mm256_loadu_ps(p);
    else return _mm256_loadu_pd(p);
  }
  static R load_half(const T* p, __m256i m) {
    if constexpr (sizeof(T) == 4) return _mm256_maskload_ps(p, m);
    else return _mm256_maskload_pd(p, m);
  }
  static void store_half(T* p, R v) {
    if constexpr (sizeof(T) == 4) _mm256_storeu_ps(p, v);
    else _mm256_storeu_pd(p, v);
  }
  static void store_half(T* p, __m256i m, R v) {
    if constexpr (sizeof(T) == 4) _mm256_maskstore_ps(p, m, v);
    else _mm256_maskstore_pd(p, m, v);
  }
  static V load(Mask m, const T* p) {
    if (m == kAll) return {load_half(p), load_half(p + kLanes)};
    const int n = __builtin_popcount(static_cast<unsigned>(m));
    return {load_half(p, lanes(n)), load_half(p + kLanes, lanes(n - kLanes))};
  }
  static void store(T* p, Mask m, V v) {
    if (m == kAll) {
      store_half(p, v.lo);
      store_half(p + kLanes, v.hi);
      return;
    }
    const int n = __builtin_popcount(static_cast<unsigned>(m));
    store_half(p, lanes(n), v.lo);
    store_half(p + kLanes, lanes(n - kLanes), v.hi);
  }
  static V broadcast(T x) {
    if constexpr (sizeof(T) == 4) return {_mm256_set1_ps(x), _mm256_set1_ps(x)};
    else return {_mm256_set1_pd(x), _mm256_set1_pd(x)};
  }
  static V fma(V a, V b, V c) {
    if constexpr (sizeof(T) == 4) return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
    else return {_mm256_fmadd_pd(a.lo, b.lo, c.lo), _mm256_fmadd_pd(a.hi, b.hi, c.hi)};
  }
  static Bits load_bits(Mask m, const T* p) { return load(m, p); }
  static Bits zero_bits() { return broadcast(T(0)); }
  static void store_bits(T* p, Bits v) { store(p, kAll, v); }
  static V from_bits(Bits v) { return v; }
  // v[j] = row j of a 2 kLanes square, then column j: four kLanes x kLanes blocks transposed, the
  // off-diagonal two swapping places.
  static void transpose(V v[2 * kLanes]) {
    R block[4][kLanes];  // rows 0..kLanes-1 lo, rows kLanes.. lo, rows 0.. hi, rows kLanes.. hi
    for (int j = 0; j < kLanes; ++j) {
      block[0][j] = v[j].lo, block[1][j] = v[kLanes + j].lo;
      block[2][j] = v[j].hi, block[3][j] = v[kLanes + j].hi;
    }
    for (auto& b : block) {
      if constexpr (sizeof(T) == 4) transpose8(b);
      else transpose4(b);
    }
    for (int d = 0; d < kLanes; ++d) {
      v[d] = {block[0][d], block[1][d]};
      v[kLanes + d] = {block[2][d], block[3][d]};
    }
  }
};

template <typename T>
struct Simd;
template <>
struct Simd<float> : Pair<float, uint16_t> {};
template <>
struct Simd<double> : Pair<double, uint8_t> {};

// At most this many accumulators (each two registers) per tile: 12 of the 16 registers.
constexpr int kAccumulators = 6;
constexpr int kTileRows = 6;

}  // namespace

#define LSTMFAST_GEMM_KERNELS
#include "gemm_impl.h"
#undef LSTMFAST_GEMM_KERNELS

void pack_b_half(const uint16_t* b, int64_t k, int64_t n, int64_t ld, bool transposed, float* out,
                 int64_t panel_begin, int64_t panel_end) {
  using S = Simd<float>;
  constexpr int64_t w = kPanel<float>;
  // 16 halves from p (the first `count`; zeros after), widened exactly.
  const auto widen = [](const uint16_t* p, int64_t count) -> S::V {
    if (count >= w) {
      return {_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
              _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)))};
    }
    alignas(32) uint16_t part[w] = {};
    std::memcpy(part, p, std::max<int64_t>(count, 0) * sizeof(uint16_t));
    return {_mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(part))),
            _mm256_cvtph_ps(_mm_load_si128(reinterpret_cast<const __m128i*>(part + 8)))};
  };
  for (int64_t p = panel_begin; p < panel_end; ++p) {
    float* panel = out + p * k * w;
    const int64_t j0 = p * w, cols = std::min(w, n - j0);
    if (!transposed) {
      for (int64_t kk = 0; kk < k; ++kk) S::store_bits(panel + kk * w, widen(b + kk * ld + j0, cols));
      continue;
    }
    // As pack_b's: w x w blocks of W transposed in registers, each row's halves widened as loaded.
    for (int64_t k0 = 0; k0 < k; k0 += w) {
      const int64_t depth = std::min(w, k - k0);
      S::V v[w];
      for (int64_t j = 0; j < w; ++j) v[j] = j < cols ? widen(b + (j0 + j) * ld + k0, depth) : S::zero_bits();
      S::transpose(v);
      for (int64_t d = 0; d < depth; ++d) S::store_bits(panel + (k0 + d) * w, v[d]);
    }
  }
}

}  // namespace lstmfast::cpu::avx2

#pragma GCC pop_options

#else  // not x86-64: ops_cpu.cpp never calls these (avx2::supported() is false)

namespace lstmfast::cpu::avx2 {
#include "gemm_impl.h"
}  // namespace lstmfast::cpu::avx2

#endif

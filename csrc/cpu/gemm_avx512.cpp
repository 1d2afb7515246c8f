// The AVX-512 build of lstmfast's own GEMM (gemm.h, gemm_impl.h): register-tiled micro-kernels over B in
// panels one 512-bit vector wide, up to 24 accumulators (of 32 registers) per tile.
#include "gemm.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

#include "transpose_avx512.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,bmi2")
// (GCC 12 warns about its own intrinsics' undefined first operands in the lane shuffles of the transposes.)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace lstmfast::cpu::avx512 {
namespace {

// One 512-bit vector of T, with masks over its lanes.
template <typename T>
struct Simd;

template <>
struct Simd<float> {
  using V = __m512;
  using Mask = __mmask16;
  static constexpr Mask kAll = 0xFFFF;
  static V load(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
  static void store(float* p, Mask m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static V broadcast(float x) { return _mm512_set1_ps(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  using Bits = __m512i;
  static Bits load_bits(Mask m, const float* p) { return _mm512_maskz_loadu_epi32(m, p); }
  static Bits zero_bits() { return _mm512_setzero_si512(); }
  static void store_bits(float* p, Bits v) { _mm512_storeu_si512(p, v); }
  static void transpose(Bits v[16]) { simd::transpose16(v); }
  static V from_bits(Bits v) { return _mm512_castsi512_ps(v); }
};

template <>
struct Simd<double> {
  using V = __m512d;
  using Mask = __mmask8;
  static constexpr Mask kAll = 0xFF;
  static V load(Mask m, const double* p) { return _mm512_maskz_loadu_pd(m, p); }
  static void store(double* p, Mask m, V v) { _mm512_mask_storeu_pd(p, m, v); }
  static V broadcast(double x) { return _mm512_set1_pd(x); }
  static V fma(V a, V b, V c) { return _mm512_fmadd_pd(a, b, c); }
  using Bits = __m512i;
  static Bits load_bits(Mask m, const double* p) { return _mm512_maskz_loadu_epi64(m, p); }
  static Bits zero_bits() { return _mm512_setzero_si512(); }
  static void store_bits(double* p, Bits v) { _mm512_storeu_si512(p, v); }
  static void transpose(Bits v[8]) { simd::transpose8(v); }
  static V from_bits(Bits v) { return _mm512_castsi512_pd(v); }
};

// At most this many 512-bit accumulators per tile (of 32 registers: the rest hold B and A).
constexpr int kAccumulators = 24;
constexpr int kTileRows = 8;

}  // namespace

#define LSTMFAST_GEMM_KERNELS
#include "gemm_impl.h"
#undef LSTMFAST_GEMM_KERNELS

void pack_b_half(const uint16_t* b, int64_t k, int64_t n, int64_t ld, bool transposed, float* out,
                 int64_t panel_begin, int64_t panel_end) {
  constexpr int64_t w = kPanel<float>;
  for (int64_t p = panel_begin; p < panel_end; ++p) {
    float* panel = out + p * k * w;
    const int64_t j0 = p * w, cols = std::min(w, n - j0);
    if (!transposed) {
      // Up to four panels a row at a time (a row's 16 halves are 32 bytes: one panel at a time down the
      // rows reads at the speed of its row misses).
      const int64_t count = std::min<int64_t>(4, panel_end - p);
      __mmask16 lanes[4];
      for (int64_t i = 0; i < count; ++i) {
        const int64_t c = std::min(w, n - (p + i) * w);
        lanes[i] = c == w ? __mmask16(0xFFFF) : __mmask16((1u << c) - 1);
      }
      for (int64_t kk = 0; kk < k; ++kk) {
        for (int64_t i = 0; i < count; ++i) {
          const __m256i halves = _mm256_maskz_loadu_epi16(lanes[i], b + kk * ld + j0 + i * w);
          _mm512_storeu_ps(panel + i * k * w + kk * w, _mm512_cvtph_ps(halves));
        }
      }
      p += count - 1;
      continue;
    }
    // As pack_b's: w x w blocks of W transposed in registers, each row's halves widened as loaded.
    for (int64_t k0 = 0; k0 < k; k0 += w) {
      const int64_t depth = std::min(w, k - k0);
      const __mmask16 lanes = depth == w ? __mmask16(0xFFFF) : __mmask16((1u << depth) - 1);
      __m512i v[w];
      for (int64_t j = 0; j < w; ++j) {
        v[j] = j < cols ? _mm512_castps_si512(_mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, b + (j0 + j) * ld + k0)))
                        : _mm512_setzero_si512();
      }
      simd::transpose16(v);
      for (int64_t d = 0; d < depth; ++d) _mm512_storeu_si512(panel + (k0 + d) * w, v[d]);
    }
  }
}

}  // namespace lstmfast::cpu::avx512

#pragma GCC pop_options

#else  // not x86-64: ops_cpu.cpp never calls these (avx512::supported() is false)

namespace lstmfast::cpu::avx512 {
#include "gemm_impl.h"
}  // namespace lstmfast::cpu::avx512

#endif

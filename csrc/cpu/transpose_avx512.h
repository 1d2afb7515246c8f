// Square transposes of 512-bit vectors in registers, shared by the AVX-512 packers (gemm_avx512.cpp,
// gemm_bf16.cpp). x86-64 GCC/clang only; each function carries its own target, so a caller compiled
// for AVX-512 (or more) inlines it. Internal linkage: every translation unit has its own copy.
#pragma once

#include <immintrin.h>

namespace lstmfast::cpu::simd {

// The last two stages of both transposes (4 q vectors of q words each per 128-bit lane): u[g q + e],
// lane L, holds word L q + e of the inputs in quarter g; 128-bit lanes are exchanged twice so that
// out[i] holds word i of every input, in order (_mm512_shuffle_i32x4 moves whole 128-bit lanes,
// whatever the word size).
[[maybe_unused]] static inline __attribute__((target("avx512f"))) void exchange_lanes(const __m512i* u, __m512i* out,
                                                                                    int q) {
  for (int e = 0; e < q; ++e) {
    const __m512i even_a = _mm512_shuffle_i32x4(u[e], u[q + e], 0x88);
    const __m512i odd_a = _mm512_shuffle_i32x4(u[e], u[q + e], 0xDD);
    const __m512i even_b = _mm512_shuffle_i32x4(u[2 * q + e], u[3 * q + e], 0x88);
    const __m512i odd_b = _mm512_shuffle_i32x4(u[2 * q + e], u[3 * q + e], 0xDD);
    out[e] = _mm512_shuffle_i32x4(even_a, even_b, 0x88);
    out[2 * q + e] = _mm512_shuffle_i32x4(even_a, even_b, 0xDD);
    out[q + e] = _mm512_shuffle_i32x4(odd_a, odd_b, 0x88);
    out[3 * q + e] = _mm512_shuffle_i32x4(odd_a, odd_b, 0xDD);
  }
}

// v[i] becomes the vector of 32-bit word i of every v[j] (lane j): a 16 x 16 transpose (interleaves of
// words, then of word pairs, within 128-bit lanes; then two exchanges of 128-bit lanes).
[[maybe_unused]] static inline __attribute__((target("avx512f"))) void transpose16(__m512i v[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(v[i], v[i + 1]);
  }
  // u[4g + e], lane L: word 4L + e of v[4g .. 4g + 3].
  __m512i u[16];
  for (int g = 0; g < 16; g += 4) {
    u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  exchange_lanes(u, v, 4);
}

// The same for 64-bit words: v[i] becomes the vector of word i of every v[j], an 8 x 8 transpose.
[[maybe_unused]] static inline __attribute__((target("avx512f"))) void transpose8(__m512i v[8]) {
  // t[2g + e], 128-bit lane L: word 2L + e of v[2g] and v[2g + 1].
  __m512i t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm512_unpacklo_epi64(v[i], v[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi64(v[i], v[i + 1]);
  }
  exchange_lanes(t, v, 2);
}

}  // namespace lstmfast::cpu::simd

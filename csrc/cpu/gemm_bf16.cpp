// The AVX512-BF16 GEMM of gemm_bf16.h: register-tiled vdpbf16ps micro-kernels over B in packed panels.
#include "gemm_bf16.h"

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

namespace lstmfast::cpu::bf16 {

bool supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

}  // namespace lstmfast::cpu::bf16

// Everything below runs only after supported() said yes.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx512bf16,avx2,fma,bmi2")
// (GCC 12 warns about its own intrinsics' undefined first operands in the conversions used here.)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace lstmfast::cpu::bf16 {
namespace {

constexpr int kMaxRows = 8, kMaxPanels = 3;  // 24 accumulators, 3 B vectors and an A broadcast of 32
constexpr int64_t kDepthBlock = 1024;        // depth per pass over C: 64 KB of a panel triple

using TileFn = void (*)(int64_t pairs, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t bs, float* c,
                        int64_t ldc, bool accumulate, __mmask16 last);

// C(MR, 16 NV) (+)= A(MR, 2 pairs) B(2 pairs, 16 NV), a and b at the tile's first row, panel and pair;
// `last` masks the columns of the last panel that exist. (One flat accumulator array, indexed by
// constants after unrolling, stays in registers.)
template <int MR, int NV>
void tile(int64_t pairs, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t bs, float* c, int64_t ldc,
          bool accumulate, __mmask16 last) {
  __m512 acc[MR * NV];
#pragma GCC unroll 32
  for (int i = 0; i < MR * NV; ++i) {
    const int r = i / NV, v = i % NV;
    const __mmask16 m = accumulate ? (v == NV - 1 ? last : __mmask16(0xFFFF)) : __mmask16(0);
    acc[i] = _mm512_maskz_loadu_ps(m, c + r * ldc + v * kPanel);
  }
  for (int64_t p = 0; p < pairs; ++p) {
    __m512bh bv[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) bv[v] = (__m512bh)_mm512_loadu_si512(b + v * bs + p * 2 * kPanel);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, a + r * lda + 2 * p, sizeof(pair));
      const __m512bh av = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
      for (int v = 0; v < NV; ++v) acc[r * NV + v] = _mm512_dpbf16_ps(acc[r * NV + v], av, bv[v]);
    }
  }
#pragma GCC unroll 32
  for (int i = 0; i < MR * NV; ++i) {
    const int r = i / NV, v = i % NV;
    _mm512_mask_storeu_ps(c + r * ldc + v * kPanel, v == NV - 1 ? last : __mmask16(0xFFFF), acc[i]);
  }
}

template <int MR>
constexpr TileFn tile_of(int nv) {
  return nv == 1 ? &tile<MR, 1> : nv == 2 ? &tile<MR, 2> : &tile<MR, 3>;
}

const TileFn kTiles[kMaxRows][kMaxPanels] = {
    {tile_of<1>(1), tile_of<1>(2), tile_of<1>(3)}, {tile_of<2>(1), tile_of<2>(2), tile_of<2>(3)},
    {tile_of<3>(1), tile_of<3>(2), tile_of<3>(3)}, {tile_of<4>(1), tile_of<4>(2), tile_of<4>(3)},
    {tile_of<5>(1), tile_of<5>(2), tile_of<5>(3)}, {tile_of<6>(1), tile_of<6>(2), tile_of<6>(3)},
    {tile_of<7>(1), tile_of<7>(2), tile_of<7>(3)}, {tile_of<8>(1), tile_of<8>(2), tile_of<8>(3)}};

}  // namespace

// 16 floats of two depth rows (lo at depth 2i, hi at 2i + 1) as 16 bfloat16 pairs, one per 32-bit lane.
inline __m512i pairs_of(__m512 lo, __m512 hi) {
  const __m512i l = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(lo));
  const __m512i h = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(hi));
  return _mm512_or_si512(l, _mm512_slli_epi32(h, 16));
}

inline __mmask16 first_lanes(int64_t count) {
  return count >= 16 ? __mmask16(0xFFFF) : count <= 0 ? __mmask16(0) : __mmask16((1u << count) - 1);
}

void pack_b(const float* b, int64_t k, int64_t n, int64_t ld, bool transposed, uint16_t* out,
            int64_t panel_begin, int64_t panel_end) {
  const int64_t kp = padded_depth(k);
  for (int64_t p = panel_begin; p < panel_end; ++p) {
    uint16_t* panel = out + p * panel_stride(k);
    const int64_t j0 = p * kPanel;
    if (!transposed) {
      // Two rows of B at a time: 16 columns each, one vector of pairs.
      const __mmask16 columns = first_lanes(n - j0);
      for (int64_t kk = 0; kk < kp; kk += 2) {
        const __m512 lo = _mm512_maskz_loadu_ps(columns, b + kk * ld + j0);
        const __m512 hi = _mm512_maskz_loadu_ps(kk + 1 < k ? columns : __mmask16(0), b + (kk + 1) * ld + j0);
        _mm512_storeu_si512(panel + kk * kPanel, pairs_of(lo, hi));
      }
      continue;
    }
    // B = W^T: column j of B is row j of W, whose consecutive pairs go to lane j - j0 of each vector:
    // the panel's 16 rows of W rounded (round_rows), then their pairs moved as 32-bit words.
    const int64_t count = std::min<int64_t>(kPanel, n - j0);
    thread_local std::vector<uint32_t> rows;
    rows.resize(kPanel * kp / 2);
    round_rows(b + j0 * ld, ld, count, k, reinterpret_cast<uint16_t*>(rows.data()));
    std::fill(rows.begin() + count * kp / 2, rows.end(), 0u);
    auto* words = reinterpret_cast<uint32_t*>(panel);
    for (int64_t pair = 0; pair < kp / 2; ++pair) {
      for (int64_t c = 0; c < kPanel; ++c) words[pair * kPanel + c] = rows[c * kp / 2 + pair];
    }
  }
}

// v[i] becomes the vector of word i of every v[j] (lane j): a 16 x 16 transpose of 32-bit words in
// registers (interleaves of words, then of word pairs, within 128-bit lanes; then two exchanges of
// 128-bit lanes).
inline void transpose16(__m512i v[16]) {
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
  for (int e = 0; e < 4; ++e) {
    const __m512i even_a = _mm512_shuffle_i32x4(u[e], u[4 + e], 0x88), odd_a = _mm512_shuffle_i32x4(u[e], u[4 + e], 0xDD);
    const __m512i even_b = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0x88);
    const __m512i odd_b = _mm512_shuffle_i32x4(u[8 + e], u[12 + e], 0xDD);
    v[e] = _mm512_shuffle_i32x4(even_a, even_b, 0x88);
    v[8 + e] = _mm512_shuffle_i32x4(even_a, even_b, 0xDD);
    v[4 + e] = _mm512_shuffle_i32x4(odd_a, odd_b, 0x88);
    v[12 + e] = _mm512_shuffle_i32x4(odd_a, odd_b, 0xDD);
  }
}

void round_columns(const float* a, int64_t ld, int64_t rows, int64_t k, uint16_t* out) {
  const int64_t kp = padded_depth(k);
  // 16 rows x 16 depth pairs at a time: vector j holds pair j of the 16 rows (lane i: row r + i), and
  // after a transpose vector i holds row r + i's 16 pairs, one contiguous store. Depth outside, rows
  // inside: the 32 rows of `a` a depth block reads are read front to back.
  for (int64_t kk = 0; kk < kp; kk += 32) {
    const int64_t pairs = std::min<int64_t>(16, (kp - kk) / 2);
    for (int64_t r = 0; r < rows; r += 16) {
      const __mmask16 lanes = first_lanes(rows - r);
      const int64_t count = std::min<int64_t>(16, rows - r);
      __m512i v[16];
      for (int64_t j = 0; j < 16; ++j) {
        const int64_t d = kk + 2 * j;
        if (j >= pairs) {
          v[j] = _mm512_setzero_si512();
          continue;
        }
        const __m512 lo = _mm512_maskz_loadu_ps(lanes, a + d * ld + r);
        const __m512 hi = _mm512_maskz_loadu_ps(d + 1 < k ? lanes : __mmask16(0), a + (d + 1) * ld + r);
        v[j] = pairs_of(lo, hi);
      }
      transpose16(v);
      const __mmask16 stored = first_lanes(pairs);
      for (int64_t i = 0; i < count; ++i) _mm512_mask_storeu_epi32(out + (r + i) * kp + kk, stored, v[i]);
    }
  }
}

void round_rows(const float* a, int64_t lda, int64_t rows, int64_t k, uint16_t* out) {
  const int64_t kp = padded_depth(k);
  for (int64_t r = 0; r < rows; ++r) {
    const float* from = a + r * lda;
    uint16_t* to = out + r * kp;
    for (int64_t kk = 0; kk < kp; kk += 32) {
      // Lanes past k load as zero: the pad of an odd depth.
      const int64_t left = k - kk;
      const __mmask16 lo = left >= 16 ? __mmask16(0xFFFF) : left > 0 ? __mmask16((1u << left) - 1) : 0;
      const __mmask16 hi = left >= 32 ? __mmask16(0xFFFF) : left > 16 ? __mmask16((1u << (left - 16)) - 1) : 0;
      const __m512bh both = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, from + kk + 16),
                                                _mm512_maskz_loadu_ps(lo, from + kk));
      const int64_t count = std::min<int64_t>(32, kp - kk);
      _mm512_mask_storeu_epi16(to + kk, count == 32 ? ~__mmask32(0) : (__mmask32(1) << count) - 1,
                               (__m512i)both);
    }
  }
}

void round_rows_split(const float* a, int64_t lda, int64_t rows, int64_t k, uint16_t* high, uint16_t* low) {
  const int64_t kp = padded_depth(k);
  for (int64_t r = 0; r < rows; ++r) {
    const float* from = a + r * lda;
    for (int64_t kk = 0; kk < kp; kk += 16) {
      const __mmask16 lanes = first_lanes(k - kk), stored = first_lanes(kp - kk);
      const __m512 x = _mm512_maskz_loadu_ps(lanes, from + kk);
      const __m256i h = (__m256i)_mm512_cvtneps_pbh(x);
      const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
      const __m256i l = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(x, back));
      _mm256_mask_storeu_epi16(high + r * kp + kk, stored, h);
      _mm256_mask_storeu_epi16(low + r * kp + kk, stored, l);
    }
  }
}

void gemm(int64_t n, int64_t k, const uint16_t* a, const uint16_t* b, float* c, int64_t ldc, bool accumulate,
          int64_t rows, int64_t panel_begin, int64_t panel_end) {
  const int64_t lda = padded_depth(k), bs = panel_stride(k);
  const int64_t tail = n - (panels_of(n) - 1) * kPanel;
  const __mmask16 tail_mask = tail == kPanel ? __mmask16(0xFFFF) : __mmask16((1u << tail) - 1);
  for (int64_t d0 = 0; d0 < lda; d0 += kDepthBlock) {
    const int64_t pairs = std::min(kDepthBlock, lda - d0) / 2;
    const bool add = accumulate || d0 > 0;
    for (int64_t p = panel_begin; p < panel_end; p += kMaxPanels) {
      const int nv = static_cast<int>(std::min<int64_t>(kMaxPanels, panel_end - p));
      const __mmask16 last = p + nv == panels_of(n) ? tail_mask : __mmask16(0xFFFF);
      for (int64_t r = 0; r < rows; r += kMaxRows) {
        const int mr = static_cast<int>(std::min<int64_t>(kMaxRows, rows - r));
        kTiles[mr - 1][nv - 1](pairs, a + r * lda + d0, lda, b + p * bs + d0 * kPanel, bs,
                               c + r * ldc + p * kPanel, ldc, add, last);
      }
    }
  }
}

}  // namespace lstmfast::cpu::bf16

#pragma GCC pop_options

#else  // not x86-64: ops_cpu.cpp never calls these (supported() is false)

namespace lstmfast::cpu::bf16 {
bool supported() { return false; }
void pack_b(const float*, int64_t, int64_t, int64_t, bool, uint16_t*, int64_t, int64_t) {}
void round_rows(const float*, int64_t, int64_t, int64_t, uint16_t*) {}
void round_columns(const float*, int64_t, int64_t, int64_t, uint16_t*) {}
void round_rows_split(const float*, int64_t, int64_t, int64_t, uint16_t*, uint16_t*) {}
void gemm(int64_t, int64_t, const uint16_t*, const uint16_t*, float*, int64_t, bool, int64_t, int64_t, int64_t) {}
}  // namespace lstmfast::cpu::bf16

#endif

// The AVX512-BF16 GEMM of gemm_bf16.h: register-tiled vdpbf16ps micro-kernels over B in packed panels.
#include "gemm_bf16.h"

#include "aligned.h"

#include <algorithm>
#include <cstring>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "transpose_avx512.h"

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

// _mm512_fpclass_ps_mask's categories: +inf and -inf; those, quiet NaN and signalling NaN.
constexpr int kInfinite = 0x18, kNonFinite = 0x99;

namespace {

// Panels [panel_begin, panel_end) of a row-major B (k, n), up to kRowPanels at a time: for each pair of
// rows, the 16 columns of each of those panels (pair(kk, j0, columns, &bad): columns j0.. (`columns` the
// lanes that exist) of rows kk and kk + 1, zeros past k, as one vector of pairs, with `bad` the lanes
// that hold an infinity or NaN), so that each row is read kRowPanels x 16 columns at a time rather than
// 16 (a weight of 2 KB rows read 32 bytes a row went at the speed of its row misses).
constexpr int64_t kRowPanels = 4;
template <typename Pair>
__attribute__((always_inline)) inline void pack_rows(int64_t k, int64_t n, uint16_t* out, int64_t panel_begin,
                                                     int64_t panel_end, uint8_t* nonfinite, const Pair& pair) {
  const int64_t kp = padded_depth(k);
  for (int64_t p0 = panel_begin; p0 < panel_end; p0 += kRowPanels) {
    const int64_t count = std::min(kRowPanels, panel_end - p0);
    __mmask16 columns[kRowPanels], bad[kRowPanels] = {};
    for (int64_t i = 0; i < count; ++i) columns[i] = first_lanes(n - (p0 + i) * kPanel);
    for (int64_t kk = 0; kk < kp; kk += 2) {
      for (int64_t i = 0; i < count; ++i) {
        const int64_t p = p0 + i;
        __mmask16 lanes;
        _mm512_storeu_si512(out + p * panel_stride(k) + kk * kPanel, pair(kk, p * kPanel, columns[i], &lanes));
        bad[i] |= lanes;
      }
    }
    if (nonfinite != nullptr) {
      for (int64_t i = 0; i < count; ++i) nonfinite[p0 + i - panel_begin] = bad[i] != 0;
    }
  }
}

// Panels [panel_begin, panel_end) of B = W^T (W (n, k)): per panel, the pairs of its `count` rows of W
// moved to the panel's layout, 16 pairs of the 16 rows at a time (rows past n as zeros), transposed in
// registers. rows(j0, count) gives the panel's loader: load(c, pair), row j0 + c's 32-bit words (pairs)
// from `pair` on, zeros past the row; load.finite(), whether every value it loaded was finite.
template <typename Rows>
__attribute__((always_inline)) inline void pack_transposed(int64_t k, int64_t n, uint16_t* out,
                                                           int64_t panel_begin, int64_t panel_end,
                                                           uint8_t* nonfinite, const Rows& rows) {
  const int64_t row_words = padded_depth(k) / 2;
  for (int64_t p = panel_begin; p < panel_end; ++p) {
    const int64_t j0 = p * kPanel, count = std::min<int64_t>(kPanel, n - j0);
    auto* words = reinterpret_cast<uint32_t*>(out + p * panel_stride(k));
    const auto load = rows(j0, count);  // load(c, pair): row c's 16 words from `pair` on, zeros past it
    for (int64_t pair = 0; pair < row_words; pair += 16) {
      __m512i v[16];
      for (int64_t c = 0; c < kPanel; ++c) v[c] = c < count ? load(c, pair) : _mm512_setzero_si512();
      simd::transpose16(v);
      for (int64_t i = 0; i < std::min<int64_t>(16, row_words - pair); ++i) {
        _mm512_storeu_si512(words + (pair + i) * kPanel, v[i]);
      }
    }
    if (nonfinite != nullptr) nonfinite[p - panel_begin] = !load.finite();
  }
}

// Lanes of bfloat16 words that hold an infinity or NaN (every exponent bit set).
inline __mmask32 nonfinite_words(__m512i v) {
  const __m512i exponent = _mm512_set1_epi16(0x7F80);
  return _mm512_cmpeq_epi16_mask(_mm512_and_si512(v, exponent), exponent);
}

inline __mmask32 first_words(int64_t count) {
  return count >= 32 ? ~__mmask32(0) : count <= 0 ? __mmask32(0) : (__mmask32(1) << count) - 1;
}

}  // namespace

void pack_b(const float* b, int64_t k, int64_t n, int64_t ld, bool transposed, uint16_t* out, int64_t panel_begin,
            int64_t panel_end, uint8_t* nonfinite) {
  if (!transposed) {
    const auto pair = [&](int64_t kk, int64_t j0, __mmask16 columns, __mmask16* bad) {
      const __m512 lo = _mm512_maskz_loadu_ps(columns, b + kk * ld + j0);
      const __m512 hi = _mm512_maskz_loadu_ps(kk + 1 < k ? columns : __mmask16(0), b + (kk + 1) * ld + j0);
      *bad = _mm512_fpclass_ps_mask(lo, kNonFinite) | _mm512_fpclass_ps_mask(hi, kNonFinite);
      return pairs_of(lo, hi);
    };
    pack_rows(k, n, out, panel_begin, panel_end, nonfinite, pair);
    return;
  }
  // The panel's rows of W rounded (round_rows) into a scratch, then moved as words.
  struct Load {
    const uint32_t* rows;
    int64_t row_words;
    bool all_finite;
    __m512i operator()(int64_t c, int64_t pair) const {
      return _mm512_maskz_loadu_epi32(first_lanes(row_words - pair), rows + c * row_words + pair);
    }
    bool finite() const { return all_finite; }
  };
  thread_local AlignedVector<uint32_t> scratch;
  const int64_t row_words = padded_depth(k) / 2;
  scratch.resize(kPanel * row_words);
  pack_transposed(k, n, out, panel_begin, panel_end, nonfinite, [&](int64_t j0, int64_t count) {
    Load load{scratch.data(), row_words, true};
    round_rows(b + j0 * ld, ld, count, k, reinterpret_cast<uint16_t*>(scratch.data()), &load.all_finite);
    return load;
  });
}

void pack_b(const uint16_t* b, int64_t k, int64_t n, int64_t ld, bool transposed, uint16_t* out,
            int64_t panel_begin, int64_t panel_end, uint8_t* nonfinite) {
  if (!transposed) {
    // Two rows' 16 columns interleaved into pairs.
    const auto pair = [&](int64_t kk, int64_t j0, __mmask16 columns, __mmask16* bad) {
      const __m256i lo = _mm256_maskz_loadu_epi16(columns, b + kk * ld + j0);
      const __m256i hi = _mm256_maskz_loadu_epi16(kk + 1 < k ? columns : __mmask16(0), b + (kk + 1) * ld + j0);
      const __mmask32 words = nonfinite_words(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
      *bad = __mmask16(words | (words >> 16));
      return _mm512_or_si512(_mm512_cvtepu16_epi32(lo), _mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
    };
    pack_rows(k, n, out, panel_begin, panel_end, nonfinite, pair);
    return;
  }
  // W's rows read in place: their pairs are words already (an odd depth's last word padded with a zero).
  struct Load {
    const uint16_t* rows;
    int64_t ld, k;
    mutable __mmask32 bad;
    __m512i operator()(int64_t c, int64_t pair) const {
      const __m512i v = _mm512_maskz_loadu_epi16(first_words(k - 2 * pair), rows + c * ld + 2 * pair);
      bad |= nonfinite_words(v);
      return v;
    }
    bool finite() const { return bad == 0; }
  };
  pack_transposed(k, n, out, panel_begin, panel_end, nonfinite,
                  [&](int64_t j0, int64_t) { return Load{b + j0 * ld, ld, k, 0}; });
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
      simd::transpose16(v);
      const __mmask16 stored = first_lanes(pairs);
      for (int64_t i = 0; i < count; ++i) _mm512_mask_storeu_epi32(out + (r + i) * kp + kk, stored, v[i]);
    }
  }
}

void round_rows(const float* a, int64_t lda, int64_t rows, int64_t k, uint16_t* out, bool* finite) {
  const int64_t kp = padded_depth(k);
  __mmask16 nonfinite = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const float* from = a + r * lda;
    uint16_t* to = out + r * kp;
    for (int64_t kk = 0; kk < kp; kk += 32) {
      // Lanes past k load as zero: the pad of an odd depth.
      const int64_t left = k - kk;
      const __mmask16 lo = left >= 16 ? __mmask16(0xFFFF) : left > 0 ? __mmask16((1u << left) - 1) : 0;
      const __mmask16 hi = left >= 32 ? __mmask16(0xFFFF) : left > 16 ? __mmask16((1u << (left - 16)) - 1) : 0;
      const __m512 low_half = _mm512_maskz_loadu_ps(lo, from + kk);
      const __m512 high_half = _mm512_maskz_loadu_ps(hi, from + kk + 16);
      nonfinite |= _mm512_fpclass_ps_mask(low_half, kNonFinite) | _mm512_fpclass_ps_mask(high_half, kNonFinite);
      const __m512bh both = _mm512_cvtne2ps_pbh(high_half, low_half);
      const int64_t count = std::min<int64_t>(32, kp - kk);
      _mm512_mask_storeu_epi16(to + kk, count == 32 ? ~__mmask32(0) : (__mmask32(1) << count) - 1,
                               (__m512i)both);
    }
  }
  if (finite != nullptr) *finite = nonfinite == 0;
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
      const __mmask16 infinite = _mm512_fpclass_ps_mask(x, kInfinite);  // (inf - inf is NaN)
      const __m256i l = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_sub_ps(__mmask16(~infinite), x, back));
      _mm256_mask_storeu_epi16(high + r * kp + kk, stored, h);
      _mm256_mask_storeu_epi16(low + r * kp + kk, stored, l);
    }
  }
}

namespace {

// gemm from depth `depth_begin` (even) on: the vdpbf16ps tiles.
void dot_gemm(int64_t n, int64_t k, const uint16_t* a, const uint16_t* b, float* c, int64_t ldc, bool accumulate,
              int64_t rows, int64_t panel_begin, int64_t panel_end, int64_t depth_begin) {
  const int64_t lda = padded_depth(k), bs = panel_stride(k);
  const int64_t tail = n - (panels_of(n) - 1) * kPanel;
  const __mmask16 tail_mask = tail == kPanel ? __mmask16(0xFFFF) : __mmask16((1u << tail) - 1);
  for (int64_t d0 = depth_begin; d0 < lda; d0 += kDepthBlock) {
    const int64_t pairs = std::min(kDepthBlock, lda - d0) / 2;
    const bool add = accumulate || d0 > depth_begin;
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

// dot_gemm of A, then (when a_low) of its low terms added: each element's sum in depth order per term.
void dot_gemm_terms(int64_t n, int64_t k, const uint16_t* a, const uint16_t* a_low, const uint16_t* b, float* c,
                    int64_t ldc, bool accumulate, int64_t rows, int64_t panel_begin, int64_t panel_end,
                    int64_t depth_begin) {
  dot_gemm(n, k, a, b, c, ldc, accumulate, rows, panel_begin, panel_end, depth_begin);
  if (a_low != nullptr) dot_gemm(n, k, a_low, b, c, ldc, true, rows, panel_begin, panel_end, depth_begin);
}

}  // namespace

void gemm(int64_t n, int64_t k, const uint16_t* a, const uint16_t* a_low, const uint16_t* b, float* c,
          int64_t ldc, bool accumulate, int64_t rows, int64_t panel_begin, int64_t panel_end) {
  dot_gemm_terms(n, k, a, a_low, b, c, ldc, accumulate, rows, panel_begin, panel_end, 0);
}

// ---- AMX. Tiles 0-3 hold C (16 rows x one panel each), tiles 4 and 5 the A operand, tiles 6 and 7 panels
// of B: per 32-deep chunk, either two 16-row blocks of A against two panels (tiles 4 and 5 the blocks, C
// tiles 0-1 and 2-3 their rows), or, when A comes in two terms (high and low, tiles 4 and 5), one block
// against four panels. A tile of A is 16 rows of one chunk (rows of padded_depth(k), read in place), a
// tile of B is 16 depth pairs of one panel: the packed layout above, 64 bytes a pair. Depth past the
// last whole chunk goes through the vdpbf16ps tiles. Each element still adds its chunks in depth order
// (the low terms' after the high terms' in each chunk), whatever the tiling, so results do not depend
// on it.
namespace {

constexpr int64_t kChunk = 32;  // depth of a tile (16 pairs of bfloat16: 64 bytes a row)

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes[16] = {};  // per tile: bytes a row
  uint8_t rows[16] = {};
};

// The rows of the two row blocks' tiles as this thread last configured them in this call, so that a
// block of another height loads a new configuration and the next of the same height does not (the first
// of each call always loads: other code on this thread, oneDNN's say, may have released or reconfigured
// the tiles in between).
thread_local int configured[2] = {0, 0};

void configure(int rows0, int rows1) {
  if (rows0 == configured[0] && rows1 == configured[1]) return;
  TileConfig config;
  for (int t : {0, 1, 4}) config.rows[t] = static_cast<uint8_t>(rows0);
  for (int t : {2, 3, 5}) config.rows[t] = static_cast<uint8_t>(rows1);
  for (int t : {6, 7}) config.rows[t] = kChunk / 2;
  for (int t = 0; t < 8; ++t) config.bytes[t] = 64;
  asm volatile("ldtilecfg %0" ::"m"(config));
  configured[0] = rows0, configured[1] = rows1;
}

template <int T>
inline void tile_load(const void* base, int64_t stride) {
  asm volatile("tileloadd (%0,%1,1), %%tmm%c2" ::"r"(base), "r"(stride), "n"(T) : "memory");
}
template <int T>
inline void tile_store(void* base, int64_t stride) {
  asm volatile("tilestored %%tmm%c2, (%0,%1,1)" ::"r"(base), "r"(stride), "n"(T) : "memory");
}
template <int T>
inline void tile_zero() {
  asm volatile("tilezero %%tmm%c0" ::"n"(T));
}
template <int C, int A, int B>
inline void tile_dot() {  // C += A B (AT&T order: B, A, C)
  asm volatile("tdpbf16ps %%tmm%c2, %%tmm%c1, %%tmm%c0" ::"n"(C), "n"(A), "n"(B));
}

// Where C tile T is (its rows at c[T], ldc[T] floats apart), for the tiles a kernel uses.
struct CTiles {
  float* c[4];
  int64_t ldc[4];
};

template <int T>
inline void c_in(const CTiles& t, bool accumulate) {
  if (accumulate) tile_load<T>(t.c[T], t.ldc[T] * 4);
  else tile_zero<T>();
}

// C tiles 0..NP-1 (+)= one 16-row block of A plus its low terms (tile 5) times NP panels of B (tiles 6
// and 7 in turn), over `chunks` chunks of depth.
template <int NP>
void amx_split(int64_t chunks, const uint16_t* a, const uint16_t* a_low, int64_t lda, const uint16_t* b,
               int64_t bs, const CTiles& t, bool accumulate) {
  c_in<0>(t, accumulate);
  if constexpr (NP > 1) c_in<1>(t, accumulate);
  if constexpr (NP > 2) c_in<2>(t, accumulate);
  if constexpr (NP > 3) c_in<3>(t, accumulate);
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t d = ch * kChunk;
    tile_load<4>(a + d, lda * 2);
    tile_load<5>(a_low + d, lda * 2);
    const uint16_t* panel = b + d * kPanel;
    tile_load<6>(panel, 64);
    tile_dot<0, 4, 6>();
    tile_dot<0, 5, 6>();
    if constexpr (NP > 1) {
      tile_load<7>(panel + bs, 64);
      tile_dot<1, 4, 7>();
      tile_dot<1, 5, 7>();
    }
    if constexpr (NP > 2) {
      tile_load<6>(panel + 2 * bs, 64);
      tile_dot<2, 4, 6>();
      tile_dot<2, 5, 6>();
    }
    if constexpr (NP > 3) {
      tile_load<7>(panel + 3 * bs, 64);
      tile_dot<3, 4, 7>();
      tile_dot<3, 5, 7>();
    }
  }
  tile_store<0>(t.c[0], t.ldc[0] * 4);
  if constexpr (NP > 1) tile_store<1>(t.c[1], t.ldc[1] * 4);
  if constexpr (NP > 2) tile_store<2>(t.c[2], t.ldc[2] * 4);
  if constexpr (NP > 3) tile_store<3>(t.c[3], t.ldc[3] * 4);
}

// C tiles {0, 1} (row block 0) and, when NR = 2, {2, 3} (row block 1, 16 rows of A further) (+)= the
// blocks times NP panels of B (tiles 6 and 7), over `chunks` chunks of depth: each B tile serves both
// blocks.
template <int NR, int NP>
void amx_blocks(int64_t chunks, const uint16_t* a, int64_t lda, const uint16_t* b, int64_t bs, const CTiles& t,
                bool accumulate) {
  c_in<0>(t, accumulate);
  if constexpr (NP > 1) c_in<1>(t, accumulate);
  if constexpr (NR > 1) c_in<2>(t, accumulate);
  if constexpr (NR > 1 && NP > 1) c_in<3>(t, accumulate);
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t d = ch * kChunk;
    const uint16_t* panel = b + d * kPanel;
    tile_load<4>(a + d, lda * 2);
    if constexpr (NR > 1) tile_load<5>(a + 16 * lda + d, lda * 2);
    tile_load<6>(panel, 64);
    if constexpr (NP > 1) tile_load<7>(panel + bs, 64);
    tile_dot<0, 4, 6>();
    if constexpr (NP > 1) tile_dot<1, 4, 7>();
    if constexpr (NR > 1) tile_dot<2, 5, 6>();
    if constexpr (NR > 1 && NP > 1) tile_dot<3, 5, 7>();
  }
  tile_store<0>(t.c[0], t.ldc[0] * 4);
  if constexpr (NP > 1) tile_store<1>(t.c[1], t.ldc[1] * 4);
  if constexpr (NR > 1) tile_store<2>(t.c[2], t.ldc[2] * 4);
  if constexpr (NR > 1 && NP > 1) tile_store<3>(t.c[3], t.ldc[3] * 4);
}

using SplitFn = void (*)(int64_t, const uint16_t*, const uint16_t*, int64_t, const uint16_t*, int64_t,
                         const CTiles&, bool);
using BlocksFn = void (*)(int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, const CTiles&, bool);
const SplitFn kSplitTiles[4] = {&amx_split<1>, &amx_split<2>, &amx_split<3>, &amx_split<4>};
const BlocksFn kBlockTiles[2][2] = {{&amx_blocks<1, 1>, &amx_blocks<1, 2>}, {&amx_blocks<2, 1>, &amx_blocks<2, 2>}};

// The C tiles of row blocks [0, blocks) (16 rows each from row r, `heights` rows) x panels [p, p + np)
// of C: tile 2 * block + panel, or, for a single block, tile panel. A part-filled last panel (columns past
// n are not C's) goes through a 16 x 16 scratch block per tile: copied in when accumulating, and out.
class CBlock {
 public:
  CBlock(float* c, int64_t ldc, int64_t n, int64_t r, const int* heights, int blocks, int64_t p, int np,
         bool accumulate)
      : ldc_(ldc), heights_(heights), blocks_(blocks) {
    const int64_t last_panel = panels_of(n) - 1;
    tail_ = n - last_panel * kPanel;
    partial_ = p + np - 1 == last_panel && tail_ < kPanel ? np - 1 : -1;
    for (int b = 0; b < blocks; ++b) {
      for (int i = 0; i < np; ++i) {
        const int tile = blocks == 1 ? i : 2 * b + i;
        float* at = c + (r + 16 * b) * ldc + (p + i) * kPanel;
        if (i == partial_) {
          at_[b] = at;
          tiles.c[tile] = scratch_[b], tiles.ldc[tile] = 16;
          if (accumulate) {
            for (int row = 0; row < heights[b]; ++row) {
              _mm512_store_ps(scratch_[b] + row * 16, _mm512_maskz_loadu_ps(first_lanes(tail_), at + row * ldc));
            }
          }
        } else {
          tiles.c[tile] = at, tiles.ldc[tile] = ldc;
        }
      }
    }
  }
  // After the kernel: the scratch blocks' columns that are C's, out.
  void finish() {
    if (partial_ < 0) return;
    for (int b = 0; b < blocks_; ++b) {
      for (int row = 0; row < heights_[b]; ++row) {
        _mm512_mask_storeu_ps(at_[b] + row * ldc_, first_lanes(tail_), _mm512_load_ps(scratch_[b] + row * 16));
      }
    }
  }
  CTiles tiles;

 private:
  int64_t ldc_, tail_;
  const int* heights_;
  int blocks_, partial_;
  float* at_[2];
  alignas(64) float scratch_[2][16 * 16];
};

}  // namespace

bool amx_supported() {
  unsigned eax, ebx, ecx, edx;
  if (!supported() || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  return ((edx >> 24) & 1) && ((edx >> 22) & 1);  // AMX-TILE, AMX-BF16
}

bool amx_enable() {
  static const bool ok = [] {
    // Linux hands out the tile state only to a process that asks for it (ARCH_REQ_XCOMP_PERM for
    // XFEATURE_XTILEDATA); granted once, it holds for every thread. (Asked only when the AMX engine is
    // chosen: the grant enlarges every signal frame, so a too-small sigaltstack would fail after it.)
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return amx_supported() && syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
}

void amx_gemm(int64_t n, int64_t k, const uint16_t* a, const uint16_t* a_low, const uint16_t* b, float* c,
              int64_t ldc, bool accumulate, int64_t rows, int64_t panel_begin, int64_t panel_end) {
  const int64_t lda = padded_depth(k), bs = panel_stride(k), chunks = lda / kChunk;
  if (chunks > 0) {
    configured[0] = configured[1] = 0;
    const bool split = a_low != nullptr;
    for (int64_t r = 0; r < rows; r += split ? 16 : 32) {
      // Two terms: one block of 16 rows at a time, four panels; else up to two blocks, two panels.
      const int heights[2] = {static_cast<int>(std::min<int64_t>(16, rows - r)),
                              split ? 0 : static_cast<int>(std::clamp<int64_t>(rows - r - 16, 0, 16))};
      const int blocks = heights[1] > 0 ? 2 : 1;
      configure(heights[0], blocks == 2 ? heights[1] : heights[0]);
      const int width = split ? 4 : 2;
      for (int64_t p = panel_begin; p < panel_end; p += width) {
        const int np = static_cast<int>(std::min<int64_t>(width, panel_end - p));
        CBlock block(c, ldc, n, r, heights, blocks, p, np, accumulate);
        if (split) {
          kSplitTiles[np - 1](chunks, a + r * lda, a_low + r * lda, lda, b + p * bs, bs, block.tiles, accumulate);
        } else {
          kBlockTiles[blocks - 1][np - 1](chunks, a + r * lda, lda, b + p * bs, bs, block.tiles, accumulate);
        }
        block.finish();
      }
    }
    // The tiles back to their initial state: nothing of this call's configuration or data outlives it
    // (code that remembers what it configured last, oneDNN's and torch's brgemm, releases too), and the
    // thread's context switches and signal frames stop carrying 8 KB of tile data.
    asm volatile("tilerelease" ::: "memory");
  }
  if (chunks * kChunk < lda) {
    // The depth past the last whole chunk (each element's last terms, in the same order everywhere).
    dot_gemm_terms(n, k, a, a_low, b, c, ldc, accumulate || chunks > 0, rows, panel_begin, panel_end,
                   chunks * kChunk);
  }
}

}  // namespace lstmfast::cpu::bf16

#pragma GCC pop_options

#else  // not x86-64: ops_cpu.cpp never calls these (supported() is false)

namespace lstmfast::cpu::bf16 {
bool supported() { return false; }
void pack_b(const float*, int64_t, int64_t, int64_t, bool, uint16_t*, int64_t, int64_t, uint8_t*) {}
void pack_b(const uint16_t*, int64_t, int64_t, int64_t, bool, uint16_t*, int64_t, int64_t, uint8_t*) {}
void round_rows(const float*, int64_t, int64_t, int64_t, uint16_t*, bool*) {}
void round_columns(const float*, int64_t, int64_t, int64_t, uint16_t*) {}
void round_rows_split(const float*, int64_t, int64_t, int64_t, uint16_t*, uint16_t*) {}
bool amx_supported() { return false; }
bool amx_enable() { return false; }
void gemm(int64_t, int64_t, const uint16_t*, const uint16_t*, const uint16_t*, float*, int64_t, bool, int64_t, int64_t,
          int64_t) {}
void amx_gemm(int64_t, int64_t, const uint16_t*, const uint16_t*, const uint16_t*, float*, int64_t, bool, int64_t,
              int64_t, int64_t) {}
}  // namespace lstmfast::cpu::bf16

#endif

// The AVX512-BF16 GEMM of gemm_bf16.h: register-tiled vdpbf16ps micro-kernels over B in packed panels.
#include "gemm_bf16.h"

#include <algorithm>
#include <cstring>
#include <vector>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

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

}  // namespace

void gemm(int64_t n, int64_t k, const uint16_t* a, const uint16_t* a_low, const uint16_t* b, float* c,
          int64_t ldc, bool accumulate, int64_t rows, int64_t panel_begin, int64_t panel_end) {
  dot_gemm(n, k, a, b, c, ldc, accumulate, rows, panel_begin, panel_end, 0);
  if (a_low != nullptr) dot_gemm(n, k, a_low, b, c, ldc, true, rows, panel_begin, panel_end, 0);
}


// ---- AMX. Tiles 0-3 hold C (16 rows x one panel each), tiles 4 and 5 the A operand (its high and low
// terms), tiles 6 and 7 a panel of B in turn: per 32-deep chunk, up to four panels against one 16-row
// block of A. A tile of A is 16 rows of one chunk (rows of padded_depth(k), read in place), a tile of B
// is 16 depth pairs of one panel: the packed layout above, 64 bytes a pair. Depth past the last whole
// chunk goes through the vdpbf16ps tiles. Each element still adds its chunks in depth order (the low
// terms' after the high terms' in each chunk), whatever the tiling, so results do not depend on it.
namespace {

constexpr int64_t kChunk = 32;     // depth of a tile (16 pairs of bfloat16: 64 bytes a row)
constexpr int kAmxPanels = 4;      // C tiles

struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes[16] = {};  // per tile: bytes a row
  uint8_t rows[16] = {};
};

// The tiles as this thread last configured them in this call, so that a block of another height loads
// a new configuration and the next of the same height does not (the first of each call always loads:
// other code on this thread, oneDNN's say, may have released or reconfigured the tiles in between).
thread_local int configured_rows = 0;

void configure(int rows) {
  if (rows == configured_rows) return;
  TileConfig config;
  for (int t = 0; t < 6; ++t) config.rows[t] = static_cast<uint8_t>(rows), config.bytes[t] = 64;
  for (int t = 6; t < 8; ++t) config.rows[t] = kChunk / 2, config.bytes[t] = 64;
  asm volatile("ldtilecfg %0" ::"m"(config));
  configured_rows = rows;
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

// C tile P: loaded from c (row stride ldc floats) when accumulating, else zeroed.
template <int P>
inline void c_in(const float* c, int64_t ldc, bool accumulate) {
  if (accumulate) tile_load<P>(c, ldc * 4);
  else tile_zero<P>();
}

// C tiles 0..NP-1 (+)= the 16-row block of A (A + A_low when kSplit) times NP panels of B, over `chunks`
// chunks of depth; c[i] and ldc[i]: where C's panel i is.
template <int NP, bool kSplit>
void amx_tile(int64_t chunks, const uint16_t* a, const uint16_t* a_low, int64_t lda, const uint16_t* b,
              int64_t bs, float* const* c, const int64_t* ldc, bool accumulate) {
  if constexpr (NP > 0) c_in<0>(c[0], ldc[0], accumulate);
  if constexpr (NP > 1) c_in<1>(c[1], ldc[1], accumulate);
  if constexpr (NP > 2) c_in<2>(c[2], ldc[2], accumulate);
  if constexpr (NP > 3) c_in<3>(c[3], ldc[3], accumulate);
  const int64_t a_stride = lda * 2;
  for (int64_t ch = 0; ch < chunks; ++ch) {
    const int64_t d = ch * kChunk;
    tile_load<4>(a + d, a_stride);
    if constexpr (kSplit) tile_load<5>(a_low + d, a_stride);
    const uint16_t* panel = b + d * kPanel;
    tile_load<6>(panel, 64);
    tile_dot<0, 4, 6>();
    if constexpr (kSplit) tile_dot<0, 5, 6>();
    if constexpr (NP > 1) {
      tile_load<7>(panel + bs, 64);
      tile_dot<1, 4, 7>();
      if constexpr (kSplit) tile_dot<1, 5, 7>();
    }
    if constexpr (NP > 2) {
      tile_load<6>(panel + 2 * bs, 64);
      tile_dot<2, 4, 6>();
      if constexpr (kSplit) tile_dot<2, 5, 6>();
    }
    if constexpr (NP > 3) {
      tile_load<7>(panel + 3 * bs, 64);
      tile_dot<3, 4, 7>();
      if constexpr (kSplit) tile_dot<3, 5, 7>();
    }
  }
  if constexpr (NP > 0) tile_store<0>(c[0], ldc[0] * 4);
  if constexpr (NP > 1) tile_store<1>(c[1], ldc[1] * 4);
  if constexpr (NP > 2) tile_store<2>(c[2], ldc[2] * 4);
  if constexpr (NP > 3) tile_store<3>(c[3], ldc[3] * 4);
}

using AmxTileFn = void (*)(int64_t, const uint16_t*, const uint16_t*, int64_t, const uint16_t*, int64_t,
                           float* const*, const int64_t*, bool);
const AmxTileFn kAmxTiles[2][kAmxPanels] = {
    {&amx_tile<1, false>, &amx_tile<2, false>, &amx_tile<3, false>, &amx_tile<4, false>},
    {&amx_tile<1, true>, &amx_tile<2, true>, &amx_tile<3, true>, &amx_tile<4, true>}};

}  // namespace

bool amx_supported() {
  static const bool ok = [] {
    unsigned eax, ebx, ecx, edx;
    if (!supported() || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    const bool tile = (edx >> 24) & 1, bf16 = (edx >> 22) & 1;
    if (!tile || !bf16) return false;
    // Linux hands out the tile state only to a process that asks for it (ARCH_REQ_XCOMP_PERM for
    // XFEATURE_XTILEDATA); granted once, it holds for every thread.
    constexpr long kReqXcompPerm = 0x1023, kXtileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXtileData) == 0;
  }();
  return ok;
}

void amx_gemm(int64_t n, int64_t k, const uint16_t* a, const uint16_t* a_low, const uint16_t* b, float* c,
              int64_t ldc, bool accumulate, int64_t rows, int64_t panel_begin, int64_t panel_end) {
  const int64_t lda = padded_depth(k), bs = panel_stride(k), chunks = lda / kChunk;
  if (chunks > 0) {
    const int64_t last_panel = panels_of(n) - 1, tail = n - last_panel * kPanel;
    configured_rows = 0;
    alignas(64) float scratch[16 * 16];
    for (int64_t r = 0; r < rows; r += 16) {
      const int height = static_cast<int>(std::min<int64_t>(16, rows - r));
      configure(height);
      for (int64_t p = panel_begin; p < panel_end; p += kAmxPanels) {
        const int np = static_cast<int>(std::min<int64_t>(kAmxPanels, panel_end - p));
        float* targets[kAmxPanels];
        int64_t strides[kAmxPanels];
        bool partial = false;
        for (int i = 0; i < np; ++i) targets[i] = c + r * ldc + (p + i) * kPanel, strides[i] = ldc;
        if (p + np - 1 == last_panel && tail < kPanel) {
          // The last panel's columns past n are not C's: its tile goes through the scratch block.
          partial = true;
          float* last = targets[np - 1];
          if (accumulate) {
            for (int i = 0; i < height; ++i) {
              _mm512_store_ps(scratch + i * 16, _mm512_maskz_loadu_ps(first_lanes(tail), last + i * ldc));
            }
          }
          targets[np - 1] = scratch, strides[np - 1] = 16;
        }
        kAmxTiles[a_low != nullptr][np - 1](chunks, a + r * lda, a_low == nullptr ? nullptr : a_low + r * lda,
                                            lda, b + p * bs, bs, targets, strides, accumulate);
        if (partial) {
          float* last = c + r * ldc + (p + np - 1) * kPanel;
          for (int i = 0; i < height; ++i) {
            _mm512_mask_storeu_ps(last + i * ldc, first_lanes(tail), _mm512_load_ps(scratch + i * 16));
          }
        }
      }
    }
  }
  if (chunks * kChunk < lda) {
    // The depth past the last whole chunk (each element's last terms, in the same order everywhere).
    const bool add = accumulate || chunks > 0;
    dot_gemm(n, k, a, b, c, ldc, add, rows, panel_begin, panel_end, chunks * kChunk);
    if (a_low != nullptr) dot_gemm(n, k, a_low, b, c, ldc, true, rows, panel_begin, panel_end, chunks * kChunk);
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
bool amx_supported() { return false; }
void gemm(int64_t, int64_t, const uint16_t*, const uint16_t*, const uint16_t*, float*, int64_t, bool, int64_t, int64_t,
          int64_t) {}
void amx_gemm(int64_t, int64_t, const uint16_t*, const uint16_t*, const uint16_t*, float*, int64_t, bool, int64_t,
              int64_t, int64_t) {}
}  // namespace lstmfast::cpu::bf16

#endif

// The AVX-512 float32 GEMM of gemm.h: register-tiled micro-kernels over B packed in 16-column panels.
#include "gemm.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <utility>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,bmi2")

namespace lstmfast::cpu::avx512 {
namespace {

// At most this many 512-bit accumulators per tile (of 32 registers: the rest hold B and A).
constexpr int kAccumulators = 24;
constexpr int kMaxRows = 8, kMaxPanels = 8;
constexpr int64_t kDepthBlock = 512;

using TileFn = void (*)(int64_t k, MatrixA a, MatrixB b, float* c, int64_t ldc, bool accumulate,
                        __mmask16 last);

// C(MR, 16 NV) (+)= A(MR, k) B(k, 16 NV), a and b pointing at the tile's first row and panel; `last` masks the columns of the last panel that exist. Each C element starts from C or 0 and adds
// a(r, kk) b(kk, j) for kk = 0, 1, ... with one fused multiply-add each: the same operations whatever
// MR and NV are.
template <int MR, int NV>
void tile(int64_t k, MatrixA a, MatrixB b, float* c, int64_t ldc, bool accumulate, __mmask16 last) {
  __m512 acc[MR * NV];
#pragma GCC unroll 32
  for (int i = 0; i < MR * NV; ++i) {
    const int r = i / NV, v = i % NV;
    const __mmask16 m = accumulate ? (v == NV - 1 ? last : __mmask16(0xFFFF)) : __mmask16(0);
    acc[i] = _mm512_maskz_loadu_ps(m, c + r * ldc + v * kPanel);
  }
  const float* ap = a.data;
  const float* bp = b.data;
  const int64_t as = a.row_stride, bs = b.panel_stride;
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      bv[v] = _mm512_maskz_loadu_ps(v == NV - 1 ? last : __mmask16(0xFFFF), bp + v * bs);
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const __m512 x = _mm512_set1_ps(ap[r * as]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r * NV + v] = _mm512_fmadd_ps(x, bv[v], acc[r * NV + v]);
    }
    ap += a.depth_stride;
    bp += b.depth_stride;
  }
#pragma GCC unroll 32
  for (int i = 0; i < MR * NV; ++i) {
    const int r = i / NV, v = i % NV;
    _mm512_mask_storeu_ps(c + r * ldc + v * kPanel, v == NV - 1 ? last : __mmask16(0xFFFF), acc[i]);
  }
}

template <int MR, int NV>
constexpr TileFn tile_or_null() {
  if constexpr (MR * NV <= kAccumulators) return &tile<MR, NV>;
  else return nullptr;
}

template <int MR, int... V>
constexpr std::array<TileFn, kMaxPanels> row_of(std::integer_sequence<int, V...>) {
  return {tile_or_null<MR, V + 1>()...};
}

template <int... R>
constexpr std::array<std::array<TileFn, kMaxPanels>, kMaxRows> table_of(std::integer_sequence<int, R...>) {
  return {row_of<R + 1>(std::make_integer_sequence<int, kMaxPanels>())...};
}

constexpr auto kTiles = table_of(std::make_integer_sequence<int, kMaxRows>());

// Panels per tile for tiles of `rows` rows: as many as the accumulators allow (several independent
// accumulators also hide the multiply-add latency when there are few rows).
int panels_for(int64_t rows) { return std::min<int64_t>(kMaxPanels, kAccumulators / std::min<int64_t>(rows, kMaxRows)); }

}  // namespace

void pack_b(const float* b, int64_t k, int64_t n, int64_t ld, bool transposed, float* out,
            int64_t panel_begin, int64_t panel_end) {
  for (int64_t p = panel_begin; p < panel_end; ++p) {
    float* panel = out + p * k * kPanel;
    const int64_t j0 = p * kPanel, cols = std::min(kPanel, n - j0);
    if (!transposed) {
      for (int64_t kk = 0; kk < k; ++kk) {
        float* dst = panel + kk * kPanel;
        std::memcpy(dst, b + kk * ld + j0, cols * sizeof(float));
        std::fill(dst + cols, dst + kPanel, 0.0f);
      }
      continue;
    }
    // B(kk, j) = W(j, kk): 16 rows of W become one panel, 16 x 16 blocks at a time through L1.
    if (cols < kPanel) std::fill(panel, panel + k * kPanel, 0.0f);
    for (int64_t k0 = 0; k0 < k; k0 += kPanel) {
      const int64_t depth = std::min(kPanel, k - k0);
      for (int64_t c = 0; c < cols; ++c) {
        const float* src = b + (j0 + c) * ld + k0;
        for (int64_t d = 0; d < depth; ++d) panel[(k0 + d) * kPanel + c] = src[d];
      }
    }
  }
}

void gemm(int64_t n, int64_t k, MatrixA a, MatrixB b, float* c, int64_t ldc, bool accumulate,
          int64_t row_begin, int64_t row_end, int64_t panel_begin, int64_t panel_end) {
  if (row_end <= row_begin || panel_end <= panel_begin) return;
  const int64_t panels = panels_of(n);
  const int rows_per_tile = static_cast<int>(std::min<int64_t>(kMaxRows, row_end - row_begin));
  const int panels_per_tile = panels_for(rows_per_tile);
  // Depth blocks keep a block of A and a tile's panels in L2; a partial sum stored to C and loaded
  // back is the same float it was in the register, so blocking does not change results.
  for (int64_t k0 = 0; k0 < k; k0 += kDepthBlock) {
    const int64_t depth = std::min(kDepthBlock, k - k0);
    for (int64_t p = panel_begin; p < panel_end; p += panels_per_tile) {
      const int nv = static_cast<int>(std::min<int64_t>(panels_per_tile, panel_end - p));
      const int64_t tail = n - (p + nv - 1) * kPanel;
      const __mmask16 last = p + nv == panels && tail < kPanel ? __mmask16((1u << tail) - 1) : __mmask16(0xFFFF);
      const MatrixB bt{b.data + p * b.panel_stride + k0 * b.depth_stride, b.depth_stride, b.panel_stride};
      for (int64_t r = row_begin; r < row_end; r += rows_per_tile) {
        const int mr = static_cast<int>(std::min<int64_t>(rows_per_tile, row_end - r));
        const MatrixA at{a.data + r * a.row_stride + k0 * a.depth_stride, a.row_stride, a.depth_stride};
        kTiles[mr - 1][nv - 1](depth, at, bt, c + r * ldc + p * kPanel, ldc, accumulate || k0 > 0, last);
      }
    }
  }
}

}  // namespace lstmfast::cpu::avx512

#pragma GCC pop_options

#else  // not x86-64: ops_cpu.cpp never calls these (avx512::supported() is false)

namespace lstmfast::cpu::avx512 {
void pack_b(const float*, int64_t, int64_t, int64_t, bool, float*, int64_t, int64_t) {}
void gemm(int64_t, int64_t, MatrixA, MatrixB, float*, int64_t, bool, int64_t, int64_t, int64_t, int64_t) {}
}  // namespace lstmfast::cpu::avx512

#endif

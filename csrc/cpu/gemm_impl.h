// The body of lstmfast's own GEMM (gemm.h), compiled once per instruction set: gemm_avx512.cpp and
// gemm_avx2.cpp each include it inside their namespace (lstmfast::cpu::avx512 / avx2), after their
// includes and after defining, in an anonymous namespace there:
//   Simd<T>: one vector of a panel's 64 bytes (V; an AVX2 one is two 256-bit registers), prefix lane
//     masks (Mask, kAll), load / store / broadcast / fma, and the bit patterns the transposes move
//     (Bits, load_bits, zero_bits, store_bits, transpose of kPanel<T> of them, from_bits);
//   kAccumulators: the most V accumulators of a tile; kTileRows: the most rows of a tile (at most
//     kMaxRows).
// (gemm_tall calls this build's gemm as (gemm<T>)(...): the parentheses keep argument-dependent lookup
// from also finding namespace own's, through MatrixB's namespace.)
// No includes and no namespace of its own: the file that includes it provides both. Without
// LSTMFAST_GEMM_KERNELS defined (not x86-64: the instruction set is never chosen) it defines empty
// functions instead, for the linker.

#ifdef LSTMFAST_GEMM_KERNELS

using own::BlockSums;
using own::kDepthBlockBytes;
using own::kMaxPanels;
using own::kMaxRows;
using own::kPanel;
using own::kTallPanels;
using own::kTallRows;
using own::packed_matrix;
using own::panels_of;

static_assert(kTileRows <= kMaxRows);

// Rows x panels of a tile over B = W^T in place, at most (one panel at any number of rows). Few panels
// at a time keep few rows of W streaming: GRU T=1 H=1024 inference, one row, 2 threads, a tile's
// panels at most 8 / 4 / 2 / 1: 1.15 / 1.00 / 0.65 / 0.65 ms with AVX-512 (a prefetch of each row 4 or
// 12 blocks ahead: 0.72, 0.92). (With AVX2 the w x w block of W spills to the stack, as a packed copy.)
constexpr int kTransposedAccumulators = 2;

namespace {

// block[d] = W(j, d) for the w rows j < cols of W at `rows` (row stride ld; zeros for rows from cols on)
// and the depths d in `lanes`: a w x w block of W, transposed in registers.
template <typename T>
inline void transposed_block(const T* rows, int64_t ld, int64_t cols, typename Simd<T>::Mask lanes,
                             typename Simd<T>::Bits block[kPanel<T>]) {
#pragma GCC unroll 16
  for (int64_t j = 0; j < kPanel<T>; ++j) {
    block[j] = j < cols ? Simd<T>::load_bits(lanes, rows + j * ld) : Simd<T>::zero_bits();
  }
  Simd<T>::transpose(block);
}

template <typename T>
using TileFn = void (*)(int64_t k, MatrixA<T> a, MatrixB<T> b, T* c, int64_t ldc, bool accumulate,
                        typename Simd<T>::Mask last);

// A tile's accumulators: C(MR, w NV) at c (or zeros when not accumulating), and back into C; `last`
// masks the columns of the last panel that exist. Inlined, so that the accumulators stay in registers.
template <typename T, int MR, int NV>
[[gnu::always_inline]] inline void load_tile(typename Simd<T>::V acc[MR * NV], const T* c, int64_t ldc,
                                             bool accumulate, typename Simd<T>::Mask last) {
  using S = Simd<T>;
#pragma GCC unroll 32
  for (int i = 0; i < MR * NV; ++i) {
    const int r = i / NV, v = i % NV;
    const typename S::Mask m = accumulate ? (v == NV - 1 ? last : S::kAll) : typename S::Mask(0);
    acc[i] = S::load(m, c + r * ldc + v * kPanel<T>);
  }
}
template <typename T, int MR, int NV>
[[gnu::always_inline]] inline void store_tile(T* c, int64_t ldc, const typename Simd<T>::V acc[MR * NV],
                                              typename Simd<T>::Mask last) {
  using S = Simd<T>;
#pragma GCC unroll 32
  for (int i = 0; i < MR * NV; ++i) {
    const int r = i / NV, v = i % NV;
    S::store(c + r * ldc + v * kPanel<T>, v == NV - 1 ? last : S::kAll, acc[i]);
  }
}

// C(MR, w NV) (+)= A(MR, k) B(k, w NV), a and b pointing at the tile's first row and panel; `last` masks
// the columns of the last panel that exist. Each C element starts from C or 0 and adds a(r, kk) b(kk, j)
// for kk = 0, 1, ... with one fused multiply-add each: the same operations whatever MR and NV are.
// (The accumulators are one flat array, indexed by constants after unrolling, which GCC keeps in
// registers; a 2-D array was spilled to the stack at every step.)
template <typename T, int MR, int NV>
void tile(int64_t k, MatrixA<T> a, MatrixB<T> b, T* c, int64_t ldc, bool accumulate,
          typename Simd<T>::Mask last) {
  using S = Simd<T>;
  typename S::V acc[MR * NV];
  load_tile<T, MR, NV>(acc, c, ldc, accumulate, last);
  const T* ap = a.data;
  const T* bp = b.data;
  const int64_t as = a.row_stride, bs = b.panel_stride;
  for (int64_t kk = 0; kk < k; ++kk) {
    typename S::V bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) bv[v] = S::load(v == NV - 1 ? last : S::kAll, bp + v * bs);
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const typename S::V x = S::broadcast(ap[r * as]);
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r * NV + v] = S::fma(x, bv[v], acc[r * NV + v]);
    }
    ap += a.depth_stride;
    bp += b.depth_stride;
  }
  store_tile<T, MR, NV>(c, ldc, acc, last);
}

// tile for B = W^T read in place (b.column_stride = W's row stride, b.data at the tile's first column):
// a w x w block of W at a time, its rows loaded as vectors over depth (rows of W past the last column
// are not read: zeros), transposed in registers; then the same fused multiply-adds in the same order as
// tile's, so the same bits.
template <typename T, int MR, int NV>
void transposed_tile(int64_t k, MatrixA<T> a, MatrixB<T> b, T* c, int64_t ldc, bool accumulate,
                     typename Simd<T>::Mask last) {
  using S = Simd<T>;
  constexpr int w = static_cast<int>(kPanel<T>);
  typename S::V acc[MR * NV];
  load_tile<T, MR, NV>(acc, c, ldc, accumulate, last);
  // Columns of the last panel that exist (`last` has them as its low bits).
  const int tail = __builtin_popcount(static_cast<unsigned>(last));
  const int64_t ld = b.column_stride, as = a.row_stride, ad = a.depth_stride;
  for (int64_t k0 = 0; k0 < k; k0 += w) {
    const int depth = static_cast<int>(std::min<int64_t>(w, k - k0));
    const typename S::Mask lanes = depth == w ? S::kAll : typename S::Mask((1u << depth) - 1);
    const T* ap = a.data + k0 * ad;
#pragma GCC unroll 1
    for (int v = 0; v < NV; ++v) {
      const T* rows = b.data + v * b.panel_stride + k0;
      const int cols = v == NV - 1 ? tail : w;
      typename S::Bits block[w];
      transposed_block<T>(rows, ld, cols, lanes, block);
      // A whole block fully unrolled (its vectors stay in registers); a last partial one as a loop.
      if (depth == w) {
#pragma GCC unroll 16
        for (int d = 0; d < w; ++d) {
#pragma GCC unroll 8
          for (int r = 0; r < MR; ++r) {
            acc[r * NV + v] = S::fma(S::broadcast(ap[r * as + d * ad]), S::from_bits(block[d]), acc[r * NV + v]);
          }
        }
      } else {
        for (int d = 0; d < depth; ++d) {
#pragma GCC unroll 8
          for (int r = 0; r < MR; ++r) {
            acc[r * NV + v] = S::fma(S::broadcast(ap[r * as + d * ad]), S::from_bits(block[d]), acc[r * NV + v]);
          }
        }
      }
    }
  }
  store_tile<T, MR, NV>(c, ldc, acc, last);
}

template <typename T, int MR, int NV, bool Transposed>
constexpr TileFn<T> tile_or_null() {
  if constexpr (Transposed) {
    if constexpr (NV == 1 || MR * NV <= kTransposedAccumulators) return &transposed_tile<T, MR, NV>;
    else return nullptr;
  } else if constexpr (MR * NV <= kAccumulators) {
    return &tile<T, MR, NV>;
  } else {
    return nullptr;
  }
}

template <typename T, bool Transposed, int MR, int... V>
constexpr std::array<TileFn<T>, kMaxPanels> row_of(std::integer_sequence<int, V...>) {
  return {tile_or_null<T, MR, V + 1, Transposed>()...};
}

template <typename T, bool Transposed, int... R>
constexpr std::array<std::array<TileFn<T>, kMaxPanels>, kMaxRows> table_of(std::integer_sequence<int, R...>) {
  return {row_of<T, Transposed, R + 1>(std::make_integer_sequence<int, kMaxPanels>())...};
}

template <typename T, bool Transposed>
constexpr auto kTiles = table_of<T, Transposed>(std::make_integer_sequence<int, kMaxRows>());

}  // namespace

// As many panels as the accumulators allow (several independent accumulators also hide the
// multiply-add latency when there are few rows).
int64_t panels_per_tile(int64_t m, bool transposed) {
  const int64_t accumulators = transposed ? kTransposedAccumulators : kAccumulators;
  return std::clamp<int64_t>(accumulators / std::clamp<int64_t>(m, 1, kTileRows), 1, kMaxPanels);
}

template <typename T>
void pack_b(const T* b, int64_t k, int64_t n, int64_t ld, bool transposed, T* out, int64_t panel_begin,
            int64_t panel_end) {
  constexpr int64_t w = kPanel<T>;
  for (int64_t p = panel_begin; p < panel_end; ++p) {
    T* panel = out + p * k * w;
    const int64_t j0 = p * w, cols = std::min(w, n - j0);
    if (!transposed) {
      for (int64_t kk = 0; kk < k; ++kk) {
        T* dst = panel + kk * w;
        std::memcpy(dst, b + kk * ld + j0, cols * sizeof(T));
        std::fill(dst + cols, dst + w, T(0));
      }
      continue;
    }
    // B(kk, j) = W(j, kk): w rows of W become one panel, w x w blocks at a time transposed in registers
    // (rows past n as zeros).
    for (int64_t k0 = 0; k0 < k; k0 += w) {
      const int64_t depth = std::min(w, k - k0);
      const typename Simd<T>::Mask lanes = depth == w ? Simd<T>::kAll : typename Simd<T>::Mask((1u << depth) - 1);
      typename Simd<T>::Bits v[w];
      transposed_block<T>(b + j0 * ld + k0, ld, cols, lanes, v);
      for (int64_t d = 0; d < depth; ++d) Simd<T>::store_bits(panel + (k0 + d) * w, v[d]);
    }
  }
}

template <typename T>
void gemm(int64_t n, int64_t k, MatrixA<T> a, MatrixB<T> b, T* c, int64_t ldc, bool accumulate,
          int64_t row_begin, int64_t row_end, int64_t panel_begin, int64_t panel_end) {
  using Mask = typename Simd<T>::Mask;
  if (row_end <= row_begin || panel_end <= panel_begin) return;
  constexpr int64_t w = kPanel<T>, depth_block = kDepthBlockBytes / sizeof(T);
  const int64_t panels = panels_of<T>(n);
  const int rows_per_tile = static_cast<int>(std::min<int64_t>(kTileRows, row_end - row_begin));
  const bool transposed = b.column_stride != 1;
  const int tile_panels = static_cast<int>(panels_per_tile(rows_per_tile, transposed));
  const auto& tiles = transposed ? kTiles<T, true> : kTiles<T, false>;
  // Depth blocks keep a block of A and a tile's panels in L2; a partial sum stored to C and loaded
  // back is the same number it was in the register, so blocking does not change results.
  for (int64_t k0 = 0; k0 < k; k0 += depth_block) {
    const int64_t depth = std::min(depth_block, k - k0);
    for (int64_t p = panel_begin, step = 0; p < panel_end; p += step) {
      // Tiles of tile_panels panels, except that a remainder of one more is split evenly (3 + 1 -> 2 + 2):
      // a one-panel tile is bound by its loads.
      step = panel_end - p == tile_panels + 1 && tile_panels > 1 ? (tile_panels + 1) / 2
                                                                 : std::min<int64_t>(tile_panels, panel_end - p);
      const int nv = static_cast<int>(step);
      const int64_t tail = n - (p + nv - 1) * w;
      const Mask last = p + nv == panels && tail < w ? Mask((1u << tail) - 1) : Simd<T>::kAll;
      const MatrixB<T> bt{b.data + p * b.panel_stride + k0 * b.depth_stride, b.depth_stride, b.panel_stride,
                          b.column_stride};
      for (int64_t r = row_begin; r < row_end; r += rows_per_tile) {
        const int mr = static_cast<int>(std::min<int64_t>(rows_per_tile, row_end - r));
        const MatrixA<T> at{a.data + r * a.row_stride + k0 * a.depth_stride, a.row_stride, a.depth_stride};
        tiles[mr - 1][nv - 1](depth, at, bt, c + r * ldc + p * w, ldc, accumulate || k0 > 0, last);
      }
    }
  }
}

template <typename T>
void gemm_tall(int64_t m, int64_t n, int64_t k, MatrixA<T> a, const T* b, int64_t ldb, bool b_transposed,
               const T* packed, T* c, int64_t ldc, bool accumulate, int64_t panel_begin, int64_t panel_end,
               T* scratch, T* row_sums) {
  constexpr int64_t w = kPanel<T>, depth_block = kDepthBlockBytes / sizeof(T);
  T* a_block = scratch;                            // kTallRows rows of A: 8-row tiles of (depth, 8)
  T* b_block = scratch + depth_block * kTallRows;  // kTallPanels panels of (depth, w)
  for (int64_t k0 = 0; k0 < k; k0 += depth_block) {
    const int64_t depth = std::min(depth_block, k - k0);
    for (int64_t p0 = panel_begin; p0 < panel_end; p0 += kTallPanels) {
      const int64_t p1 = std::min(panel_end, p0 + kTallPanels), cols = std::min(n, p1 * w) - p0 * w;
      // This block of B: in the whole packed copy (panel p0 at depth k0), or packed here into b_block.
      const MatrixB<T> bt = packed != nullptr ? packed_matrix<T>(packed + (p0 * k + k0) * w, k)
                                              : packed_matrix<T>(b_block, depth);
      if (packed == nullptr) {
        const T* block = b_transposed ? b + p0 * w * ldb + k0 : b + k0 * ldb + p0 * w;
        pack_b<T>(block, depth, cols, ldb, b_transposed, b_block, 0, p1 - p0);
      }
      for (int64_t r0 = 0; r0 < m; r0 += kTallRows) {
        const int64_t rows = std::min(kTallRows, m - r0);
        const T* src = a.data + r0 * a.row_stride + k0 * a.depth_stride;
        if (a.depth_stride == 1) {
          // Row-major A (an input projection's X, dX's G) streams in place, each row one contiguous
          // run: gathering it into tiles costs more than it saves (GEMM 1024^3 on one Zen 4 core, best
          // of 5: 83 -> 99 GFLOP/s; GRU T=16 B=64 H=1024 training step 236 -> 220 ms).
          (gemm<T>)(cols, depth, {src, a.row_stride, 1}, bt, c + r0 * ldc + p0 * w, ldc, accumulate || k0 > 0, 0,
                  rows, 0, p1 - p0);
          continue;
        }
        // Where A(r0 + r, k0 + kk) goes: row r's tile, then the step, then the row within the tile.
        const auto slot = [&](int64_t r, int64_t kk) {
          return a_block + (r / kMaxRows) * kMaxRows * depth + kk * kMaxRows + r % kMaxRows;
        };
        if (a.row_stride == 1) {
          // A = G^T: a step's rows are contiguous in G; copy them a step at a time, tile by tile. The
          // first block of panels also sums each row over this depth block, in column_sums' order (runs
          // of kSumRun steps: rounding error grows with a run's length).
          const bool sum = row_sums != nullptr && p0 == panel_begin;
          BlockSums<T, kTallRows> sums;
          for (int64_t kk = 0; kk < depth; ++kk) {
            const T* from = src + kk * a.depth_stride;
            int64_t r = 0;
            for (; r + kMaxRows <= rows; r += kMaxRows) std::memcpy(slot(r, kk), from + r, kMaxRows * sizeof(T));
            for (; r < rows; ++r) *slot(r, kk) = from[r];
            if (sum) sums.add(from, rows, kk, depth);
          }
          if (sum) {
            for (int64_t i = 0; i < rows; ++i) row_sums[r0 + i] += sums.block[i];
          }
        } else {
          for (int64_t r = 0; r < rows; ++r) {
            const T* from = src + r * a.row_stride;
            for (int64_t kk = 0; kk < depth; ++kk) *slot(r, kk) = from[kk * a.depth_stride];
          }
        }
        for (int64_t t = 0; t < rows; t += kMaxRows) {
          (gemm<T>)(cols, depth, {a_block + t * depth, 1, kMaxRows}, bt, c + (r0 + t) * ldc + p0 * w, ldc,
                  accumulate || k0 > 0, 0, std::min<int64_t>(kMaxRows, rows - t), 0, p1 - p0);
        }
      }
    }
  }
}


#else  // LSTMFAST_GEMM_KERNELS

int64_t panels_per_tile(int64_t, bool) { return 1; }
void pack_b_half(const uint16_t*, int64_t, int64_t, int64_t, bool, float*, int64_t, int64_t) {}
template <typename T>
void pack_b(const T*, int64_t, int64_t, int64_t, bool, T*, int64_t, int64_t) {}
template <typename T>
void gemm(int64_t, int64_t, MatrixA<T>, MatrixB<T>, T*, int64_t, bool, int64_t, int64_t, int64_t, int64_t) {}
template <typename T>
void gemm_tall(int64_t, int64_t, int64_t, MatrixA<T>, const T*, int64_t, bool, const T*, T*, int64_t, bool, int64_t,
               int64_t, T*, T*) {}

#endif  // LSTMFAST_GEMM_KERNELS

// The float and double instances the rest of lstmfast links against.
#define LSTMFAST_INSTANTIATE(T)                                                                        \
  template void pack_b<T>(const T*, int64_t, int64_t, int64_t, bool, T*, int64_t, int64_t);          \
  template void gemm<T>(int64_t, int64_t, MatrixA<T>, MatrixB<T>, T*, int64_t, bool, int64_t, int64_t, \
                        int64_t, int64_t);                                                             \
  template void gemm_tall<T>(int64_t, int64_t, int64_t, MatrixA<T>, const T*, int64_t, bool, const T*, T*, \
                             int64_t, bool, int64_t, int64_t, T*, T*);
LSTMFAST_INSTANTIATE(float)
LSTMFAST_INSTANTIATE(double)
#undef LSTMFAST_INSTANTIATE

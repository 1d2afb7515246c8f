// lstmfast's own GEMM, float32 and float64: C(m, n) (+)= A(m, k) B(k, n), B in panels of 64 bytes (16
// floats or 8 doubles: one AVX-512 vector, two AVX2 vectors), either packed once per op call (pack_b) so
// that the micro-kernels stream it, or read in place from a row-major matrix.
//
// Every element of C is summed over k in the same order, one fused multiply-add per step, whatever tile
// shape, thread or instruction set computes it, so results do not depend on the thread count, on how
// the work is split, or on whether the AVX-512 or the AVX2 kernels run. Threading lives in ops_cpu.cpp;
// the functions here are single-threaded. gemm_impl.h is compiled once per instruction set
// (gemm_avx512.cpp, gemm_avx2.cpp), into namespaces avx512 and avx2; the functions of namespace own
// call the build that ops_cpu.cpp's chosen instruction set names (uses_avx512()).
#pragma once

#include <cstdint>

namespace lstmfast::cpu::own {

template <typename T>
constexpr int64_t kPanel = 64 / sizeof(T);  // columns per panel
constexpr int kMaxRows = 8, kMaxPanels = 8;   // the largest micro-kernel tile's rows and panels
constexpr int64_t kDepthBlockBytes = 2048;    // depth per block: 512 floats or 256 doubles
constexpr int64_t kTallPanels = 16;           // panels per block of B in gemm_tall
constexpr int64_t kTallRows = 64;             // rows per block of A in gemm_tall
constexpr int64_t kSumRun = 32;               // steps per run of gemm_tall's row sums

template <typename T>
inline int64_t panels_of(int64_t n) {
  return (n + kPanel<T> - 1) / kPanel<T>;
}
// Elements of a packed (k, n) matrix.
template <typename T>
inline int64_t packed_size(int64_t k, int64_t n) {
  return panels_of<T>(n) * kPanel<T> * k;
}

// A(r, kk) = data[r * row_stride + kk * depth_stride]: any strides, e.g. (1, ld) for a transposed
// row-major matrix (the weight gradients' G^T X reads G in place).
template <typename T>
struct MatrixA {
  const T* data;
  int64_t row_stride, depth_stride;
};

// B(kk, w p + c) = data[kk * depth_stride + p * panel_stride + c * column_stride]: packed by pack_b, a
// row-major matrix read in place, or (column_stride not 1) the transpose of a row-major W read in place,
// B = W^T: each w x w block of W is then transposed in registers as the micro-kernel reaches it, which
// costs shuffles at every use instead of a packed copy's write once (for a weight multiplied once).
template <typename T>
struct MatrixB {
  const T* data;
  int64_t depth_stride, panel_stride, column_stride = 1;
};

template <typename T>
inline MatrixB<T> packed_matrix(const T* packed, int64_t k) {
  return {packed, kPanel<T>, k * kPanel<T>};
}
template <typename T>
inline MatrixB<T> row_major_matrix(const T* b, int64_t ld) {
  return {b, ld, kPanel<T>};
}
// B = W^T for W (n, k) row-major with row stride ld.
template <typename T>
inline MatrixB<T> transposed_matrix(const T* w, int64_t ld) {
  return {w, 1, kPanel<T> * ld, ld};
}

// Elements of gemm_tall's scratch (below).
template <typename T>
constexpr int64_t gemm_tall_scratch() {
  return (kDepthBlockBytes / sizeof(T)) * (kTallRows + kTallPanels * kPanel<T>);
}

// One depth block of sums in the fixed order of every CPU bias gradient: each row's values are added into
// a run, and each run of kSumRun rows (the block's last run may be shorter) is added into the block's
// sums, in order. column_sums and gemm_tall's gather both sum through it, so they give the same bits.
// Plain C++ (any CPU): the order is per column, so vectorizing across columns does not change a bit.
template <typename T, int64_t Width>
struct BlockSums {
  T run[Width] = {}, block[Width] = {};
  // Adds row `step` (of the block's `depth`): `count` values.
  void add(const T* row, int64_t count, int64_t step, int64_t depth) {
    for (int64_t i = 0; i < count; ++i) run[i] += row[i];
    if ((step + 1) % kSumRun == 0 || step + 1 == depth) {
      for (int64_t i = 0; i < count; ++i) block[i] += run[i], run[i] = T(0);
    }
  }
};

// sums[j] = the sum of g[i * ld + j] over rows i in [0, rows), for columns j in [col_begin, col_end), in
// gemm_tall's order: rows in depth blocks, each summed by BlockSums, then the blocks' sums added in order,
// from zero.
template <typename T>
void column_sums(const T* g, int64_t rows, int64_t ld, T* sums, int64_t col_begin, int64_t col_end) {
  // Up to `width` columns per pass over the rows (a row's part is then one contiguous run).
  constexpr int64_t depth_block = kDepthBlockBytes / sizeof(T), width = 1024;
  for (int64_t j0 = col_begin; j0 < col_end; j0 += width) {
    const int64_t cols = col_end - j0 < width ? col_end - j0 : width;
    T total[width] = {};
    for (int64_t k0 = 0; k0 < rows; k0 += depth_block) {
      const int64_t depth = rows - k0 < depth_block ? rows - k0 : depth_block;
      BlockSums<T, width> block;
      for (int64_t kk = 0; kk < depth; ++kk) block.add(g + (k0 + kk) * ld + j0, cols, kk, depth);
      for (int64_t i = 0; i < cols; ++i) total[i] += block.block[i];
    }
    for (int64_t i = 0; i < cols; ++i) sums[j0 + i] = total[i];
  }
}

// Whether the AVX-512 kernels run (else the AVX2 ones): ops_cpu.cpp's chosen instruction set.
bool uses_avx512();

}  // namespace lstmfast::cpu::own

// One instruction set's kernels (gemm_impl.h), in its own namespace; callers use namespace own's.
#define LSTMFAST_GEMM_DECLARE_ISA(isa)                                                                     \
  namespace lstmfast::cpu::isa {                                                                           \
  using own::MatrixA;                                                                                      \
  using own::MatrixB;                                                                                      \
  template <typename T>                                                                                    \
  void pack_b(const T* b, int64_t k, int64_t n, int64_t ld, bool transposed, T* out, int64_t panel_begin,  \
              int64_t panel_end);                                                                          \
  void pack_b_half(const uint16_t* b, int64_t k, int64_t n, int64_t ld, bool transposed, float* out,       \
                   int64_t panel_begin, int64_t panel_end);                                                \
  int64_t panels_per_tile(int64_t m, bool transposed);                                                     \
  template <typename T>                                                                                    \
  void gemm(int64_t n, int64_t k, MatrixA<T> a, MatrixB<T> b, T* c, int64_t ldc, bool accumulate,          \
            int64_t row_begin, int64_t row_end, int64_t panel_begin, int64_t panel_end);                   \
  template <typename T>                                                                                    \
  void gemm_tall(int64_t m, int64_t n, int64_t k, MatrixA<T> a, const T* b, int64_t ldb, bool b_transposed, \
                 const T* packed, T* c, int64_t ldc, bool accumulate, int64_t panel_begin, int64_t panel_end, \
                 T* scratch, T* row_sums);                                                                 \
  }
LSTMFAST_GEMM_DECLARE_ISA(avx512)
LSTMFAST_GEMM_DECLARE_ISA(avx2)
#undef LSTMFAST_GEMM_DECLARE_ISA

namespace lstmfast::cpu::own {

// Packs panels [panel_begin, panel_end) of B (k, n): out[(p k + kk) w + c] = B(kk, w p + c) with w the
// panel width, zero past column n. B is read as b[kk * ld + j], or, when transposed, b[j * ld + kk]
// (B = W^T, W an (n, k) matrix).
template <typename T>
inline void pack_b(const T* b, int64_t k, int64_t n, int64_t ld, bool transposed, T* out, int64_t panel_begin,
                   int64_t panel_end) {
  if (uses_avx512()) avx512::pack_b<T>(b, k, n, ld, transposed, out, panel_begin, panel_end);
  else avx2::pack_b<T>(b, k, n, ld, transposed, out, panel_begin, panel_end);
}

// pack_b<float> for a B of float16 values (their bits): each widened to float32 (exactly) as it is packed.
inline void pack_b_half(const uint16_t* b, int64_t k, int64_t n, int64_t ld, bool transposed, float* out,
                        int64_t panel_begin, int64_t panel_end) {
  if (uses_avx512()) avx512::pack_b_half(b, k, n, ld, transposed, out, panel_begin, panel_end);
  else avx2::pack_b_half(b, k, n, ld, transposed, out, panel_begin, panel_end);
}

// Panels per micro-kernel tile when a product has m rows, for B packed or row-major (or, when
// transposed, for B = W^T read in place): as many as the instruction set's accumulators allow.
inline int64_t panels_per_tile(int64_t m, bool transposed = false) {
  return uses_avx512() ? avx512::panels_per_tile(m, transposed) : avx2::panels_per_tile(m, transposed);
}

// C rows [row_begin, row_end) x panels [panel_begin, panel_end) of C(m, n) = A B (+ C when accumulate),
// with k the depth. The columns of a panel past n are neither read nor written.
template <typename T>
inline void gemm(int64_t n, int64_t k, MatrixA<T> a, MatrixB<T> b, T* c, int64_t ldc, bool accumulate,
                 int64_t row_begin, int64_t row_end, int64_t panel_begin, int64_t panel_end) {
  if (uses_avx512()) avx512::gemm<T>(n, k, a, b, c, ldc, accumulate, row_begin, row_end, panel_begin, panel_end);
  else avx2::gemm<T>(n, k, a, b, c, ldc, accumulate, row_begin, row_end, panel_begin, panel_end);
}

// C rows [0, m) x panels [panel_begin, panel_end) of C = A B (+ C when accumulate) for products with many
// rows, B read in place (b[kk * ldb + j], or b[j * ldb + kk] when b_transposed), e.g. the weight
// gradients G^T X or the input projection X W_ih^T: per depth block, 16 panels of B
// at a time are packed (then reused by every row); a row-major A is read in place, any other (G^T) has
// 64 rows at a time gathered into contiguous 8-row tiles (then reused by 16 panels), so the
// micro-kernels stream contiguous memory instead of one cache line per page. Same sums in the same
// order as gemm. When `packed` is given (B packed whole by pack_b, e.g. a weight that one op call
// multiplies several times), its blocks are read in place instead and b, ldb and b_transposed are not
// used. `scratch` holds gemm_tall_scratch<T>() elements.
// With `row_sums` (only for an A with row_stride 1 and depth_stride not 1: a transposed row-major G, as
// in G^T X), row_sums[r] += the sum of A's row r, made while gathering A in column_sums' order: a weight
// gradient's bias gradient (G's column sums) without another pass over G. A caller that splits the
// panels passes row_sums to one part only.
template <typename T>
inline void gemm_tall(int64_t m, int64_t n, int64_t k, MatrixA<T> a, const T* b, int64_t ldb, bool b_transposed,
                      const T* packed, T* c, int64_t ldc, bool accumulate, int64_t panel_begin, int64_t panel_end,
                      T* scratch, T* row_sums) {
  if (uses_avx512()) {
    avx512::gemm_tall<T>(m, n, k, a, b, ldb, b_transposed, packed, c, ldc, accumulate, panel_begin, panel_end,
                         scratch, row_sums);
  } else {
    avx2::gemm_tall<T>(m, n, k, a, b, ldb, b_transposed, packed, c, ldc, accumulate, panel_begin, panel_end,
                       scratch, row_sums);
  }
}

}  // namespace lstmfast::cpu::own

// lstmfast's own float32 GEMM for AVX-512 CPUs: C(m, n) (+)= A(m, k) B(k, n), with B packed once per op
// call into panels of 16 columns (one 512-bit vector wide) so that the micro-kernels stream it.
//
// Every element of C is summed over k in the same order whatever tile shape or thread computes it, so
// results do not depend on the thread count or on how the work is split. Threading lives in
// ops_cpu.cpp; the functions here are single-threaded and compiled for AVX-512 (gemm_avx512.cpp).
#pragma once

#include <cstdint>

namespace lstmfast::cpu::avx512 {

constexpr int64_t kPanel = 16;  // columns per packed panel

inline int64_t panels_of(int64_t n) { return (n + kPanel - 1) / kPanel; }
// Floats in a packed (k, n) matrix.
inline int64_t packed_size(int64_t k, int64_t n) { return panels_of(n) * kPanel * k; }

// Packs panels [panel_begin, panel_end) of B (k, n): out[(p k + kk) 16 + c] = B(kk, 16 p + c), zero past
// column n. B is read as b[kk * ld + j], or, when transposed, b[j * ld + kk] (B = W^T, W an (n, k) matrix).
void pack_b(const float* b, int64_t k, int64_t n, int64_t ld, bool transposed, float* out,
            int64_t panel_begin, int64_t panel_end);

// A(r, kk) = data[r * row_stride + kk * depth_stride]: any strides, e.g. (1, ld) for a transposed
// row-major matrix (the weight gradients' G^T X reads G in place).
struct MatrixA {
  const float* data;
  int64_t row_stride, depth_stride;
};

// B(kk, 16 p + c) = data[kk * depth_stride + p * panel_stride + c]: packed (pack_b), or a row-major
// matrix read in place.
struct MatrixB {
  const float* data;
  int64_t depth_stride, panel_stride;
};

inline MatrixB packed_matrix(const float* packed, int64_t k) { return {packed, kPanel, k * kPanel}; }
inline MatrixB row_major_matrix(const float* b, int64_t ld) { return {b, ld, kPanel}; }

// C rows [row_begin, row_end) x panels [panel_begin, panel_end) of C(m, n) = A B (+ C when accumulate),
// with k the depth. The columns of a panel past n are neither read nor written.
void gemm(int64_t n, int64_t k, MatrixA a, MatrixB b, float* c, int64_t ldc, bool accumulate,
          int64_t row_begin, int64_t row_end, int64_t panel_begin, int64_t panel_end);

}  // namespace lstmfast::cpu::avx512

// lstmfast's bfloat16 GEMM for CPUs with AVX512-BF16 (vdpbf16ps) or AMX (tdpbf16ps): C(m, n) float32
// (+)= A(m, k) B(k, n) with A and B rounded to bfloat16 and products summed in float32. The
// reduced-precision CPU path keeps everything else float32 (ops_cpu.cpp), so only the operands of its
// products pass through here.
//
// Layouts: A is bfloat16 rows of padded_depth(k) elements (k rounded up to even, the pad zero). B is packed
// once per op call (pack_b) in panels of 16 columns; within a panel, depth pairs (2i, 2i+1) are one
// 512-bit vector holding, for each column c, B(2i, c) then B(2i + 1, c): the operand vdpbf16ps takes, and
// 16 of them one after another are an AMX tile of B.
// Each element of C adds its pairs in depth order whatever tile or thread computes it, so results do
// not depend on the thread count. Single-threaded; threading lives in ops_cpu.cpp.
#pragma once

#include <cstdint>

namespace lstmfast::cpu::bf16 {

constexpr int64_t kPanel = 16;  // columns per panel (float32 lanes of C)

// Whether the CPU (and the OS) runs AVX-512 with the BF16 extension.
bool supported();

inline int64_t padded_depth(int64_t k) { return (k + 1) & ~int64_t(1); }
inline int64_t panels_of(int64_t n) { return (n + kPanel - 1) / kPanel; }
// bfloat16 elements of a packed (k, n) matrix, and between one panel and the next.
inline int64_t panel_stride(int64_t k) { return padded_depth(k) * kPanel; }
inline int64_t packed_size(int64_t k, int64_t n) { return panels_of(n) * panel_stride(k); }

// Rounds (nearest even) and packs panels [panel_begin, panel_end) of B (k, n), read as b[kk * ld + j], or
// b[j * ld + kk] when transposed (B = W^T, W an (n, k) matrix); zero past column n and depth k. With
// `nonfinite`, also says for each panel (nonfinite[p - panel_begin]) whether it holds an infinity or NaN.
void pack_b(const float* b, int64_t k, int64_t n, int64_t ld, bool transposed, uint16_t* out,
            int64_t panel_begin, int64_t panel_end, uint8_t* nonfinite = nullptr);
// The same for a B that holds bfloat16 values already (their bits): the words moved, nothing rounded.
void pack_b(const uint16_t* b, int64_t k, int64_t n, int64_t ld, bool transposed, uint16_t* out,
            int64_t panel_begin, int64_t panel_end, uint8_t* nonfinite = nullptr);

// Rounds rows [0, rows) of A (a[r * lda + kk]) to bfloat16 rows of padded_depth(k) elements in out;
// with `finite`, also says whether every value it read was finite.
void round_rows(const float* a, int64_t lda, int64_t rows, int64_t k, uint16_t* out, bool* finite = nullptr);

// A as the sum of two bfloat16 rows: high = A rounded, low = (A - high) rounded (16 significant bits in
// all; products by a weight that is bfloat16 already then lose about what float32 products would);
// low = 0 where A is infinite (high alone is A there).
void round_rows_split(const float* a, int64_t lda, int64_t rows, int64_t k, uint16_t* high, uint16_t* low);

// The same for A read through its columns, a[kk * ld + r] (a weight gradient's G^T, with G in place).
void round_columns(const float* a, int64_t ld, int64_t rows, int64_t k, uint16_t* out);

// C rows [0, rows) x panels [panel_begin, panel_end) of C = A B (+ C when accumulate), with A as round_rows
// writes it (row stride padded_depth(k)) and B as pack_b writes it; with a_low (A's second terms, as
// round_rows_split writes them), C = (A + A_low) B. Columns past n are not touched.
void gemm(int64_t n, int64_t k, const uint16_t* a, const uint16_t* a_low, const uint16_t* b, float* c,
          int64_t ldc, bool accumulate, int64_t rows, int64_t panel_begin, int64_t panel_end);

// Whether the CPU also has AMX tiles for bfloat16 (AMX-TILE, AMX-BF16).
bool amx_supported();

// Asks the OS, once, to let this process use the tiles (Linux's arch_prctl(ARCH_REQ_XCOMP_PERM)): whether
// it may, on a CPU that has them.
bool amx_enable();

// gemm on the AMX tiles (only once amx_enable() said yes): the same operands, layouts and result.
void amx_gemm(int64_t n, int64_t k, const uint16_t* a, const uint16_t* a_low, const uint16_t* b, float* c,
              int64_t ldc, bool accumulate, int64_t rows, int64_t panel_begin, int64_t panel_end);

}  // namespace lstmfast::cpu::bf16

// CPU backend of the shared time loops: BLAS GEMMs on raw pointers, vectorized pointwise steps
// (pointwise.h) split over rows with at::parallel_for (each row's work, norms included, stays on one
// thread, so results do not depend on the thread count).
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "../layer_ops.h"
#include "pointwise.h"

// The Fortran BLAS that torch links (MKL on x86 builds) exports these; they are weak so that a torch
// without them still loads lstmfast, which then falls back to at::mm on borrowed buffers.
extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
            const float* beta, float* c, const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
            const double* alpha, const double* a, const int* lda, const double* b, const int* ldb,
            const double* beta, double* c, const int* ldc) __attribute__((weak));
}

namespace lstmfast {

namespace cpu {

namespace {
// The instruction set picked once per process: LSTMFAST_CPU_ISA if set (and supported), else the widest.
int chosen_isa() {
  static const int isa = [] {
    const bool ok[3] = {avx512::supported(), avx2::supported(), true};
    const char* names[3] = {"avx512", "avx2", "baseline"};
    if (const char* want = std::getenv("LSTMFAST_CPU_ISA"); want != nullptr && *want != '\0') {
      for (int i = 0; i < 3; ++i) {
        if (std::strcmp(want, names[i]) == 0) {
          TORCH_CHECK(ok[i], "lstmfast: LSTMFAST_CPU_ISA=", want, " but this CPU does not support it");
          return i;
        }
      }
      TORCH_CHECK(false, "lstmfast: LSTMFAST_CPU_ISA must be avx512, avx2 or baseline, but got '",
                  want, "'");
    }
    return ok[0] ? 0 : (ok[1] ? 1 : 2);
  }();
  return isa;
}
}  // namespace

template <>
const PointwiseKernels<float>& pointwise_kernels<float>() {
  static const PointwiseKernels<float>* k[3] = {&avx512::pointwise_float(), &avx2::pointwise_float(),
                                                &baseline::pointwise_float()};
  return *k[chosen_isa()];
}

template <>
const PointwiseKernels<double>& pointwise_kernels<double>() {
  static const PointwiseKernels<double>* k[3] = {
      &avx512::pointwise_double(), &avx2::pointwise_double(), &baseline::pointwise_double()};
  return *k[chosen_isa()];
}

std::string isa_name() { return pointwise_kernels<float>().isa; }

}  // namespace cpu

namespace {

using namespace kernels;

// Column-major BLAS gemm, or nullptr when torch's BLAS does not export it.
template <typename T>
auto* blas_gemm() {
  if constexpr (std::is_same_v<T, float>) return &sgemm_;
  else return &dgemm_;
}

// Row-major C(m, n) = alpha op(A) op(B) + beta C through ATen, for a torch without a Fortran BLAS.
template <typename T>
void aten_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  const auto options = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  const auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    auto t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1}, options);
    return trans ? t.t() : t;
  };
  at::Tensor out = at::from_blob(c, {m, n}, {ldc, 1}, options);
  at::addmm_out(out, beta == T(0) ? out.zero_() : out, view(a, m, k, lda, trans_a),
                view(b, k, n, ldb, trans_b), beta == T(0) ? T(1) : beta, alpha);
}

// Row-major C(m, n) = A(m, k) B(k, n) (+ C when accumulate) for float, through oneDNN's brgemm
// micro-kernels (at::native::cpublas::brgemm; it uses AVX-512 where MKL's sgemm on some CPUs does not,
// and falls back to BLAS where oneDNN has no kernel). C is cut into fixed blocks, each one brgemm call
// on one thread: the blocks do not depend on the thread count, so neither do the results.
void blocked_brgemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                    int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  // A 64 x 512 panel of A and a 512 x 256 panel of B stay in a 2 MB L2 cache together.
  constexpr int64_t kRowBlock = 64, kColBlock = 256, kDepthBlock = 512;
  const int64_t row_blocks = (m + kRowBlock - 1) / kRowBlock, col_blocks = (n + kColBlock - 1) / kColBlock;
  const auto block = [&](int64_t index) {
    const int64_t r0 = (index / col_blocks) * kRowBlock, c0 = (index % col_blocks) * kColBlock;
    const int64_t rows = std::min(kRowBlock, m - r0), cols = std::min(kColBlock, n - c0);
    for (int64_t d0 = 0; d0 < k; d0 += kDepthBlock) {
      at::native::cpublas::brgemm(rows, cols, std::min(kDepthBlock, k - d0), lda, ldb, ldc,
                                  accumulate || d0 > 0, a + r0 * lda + d0, b + d0 * ldb + c0,
                                  c + r0 * ldc + c0, false);
    }
  };
  const int64_t blocks = row_blocks * col_blocks;
  // A second thread pays off from about half a million multiply-adds per block.
  if (blocks > 1 && std::min(kRowBlock, m) * std::min(kColBlock, n) * k >= (int64_t(1) << 19)) {
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) block(i);
    });
  } else {
    for (int64_t i = 0; i < blocks; ++i) block(i);
  }
}

struct CpuBackend {
  static constexpr bool kReducedPrecision = false;
  static constexpr const char* kDtypes = "float32 or float64";

  explicit CpuBackend(const at::Tensor&) {}

  // Transposed copies of weight matrices, made once per op call (brgemm wants B as (k, n) rows).
  struct Transposed {
    const void* source;
    int64_t rows, cols, ld;
    at::Tensor copy;
  };
  std::vector<Transposed> transposed_;

  // B given as op(B) = B^T with B (n, k) of row stride ld: its (k, n) contiguous transpose.
  const float* transposed(const float* b, int64_t n, int64_t k, int64_t ld) {
    for (const auto& t : transposed_) {
      if (t.source == b && t.rows == n && t.cols == k && t.ld == ld) return t.copy.data_ptr<float>();
    }
    at::Tensor view = at::from_blob(const_cast<float*>(b), {n, k}, {ld, 1}, at::kFloat);
    transposed_.push_back({b, n, k, ld, view.t().contiguous()});
    return transposed_.back().copy.data_ptr<float>();
  }

  template <typename T>
  void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const T* a,
            int64_t lda, const T* b, int64_t ldb, double beta, T* c, int64_t ldc) {
    if (m == 0 || n == 0) return;
    if constexpr (std::is_same_v<T, float>) {
      if (!trans_a && alpha == 1.0 && (beta == 0.0 || beta == 1.0) && k > 0) {
        const float* b_rows = trans_b ? transposed(b, n, k, ldb) : b;
        blocked_brgemm(m, n, k, a, lda, b_rows, trans_b ? n : ldb, beta == 1.0, c, ldc);
        return;
      }
    }
    const T alpha_t = static_cast<T>(alpha), beta_t = static_cast<T>(beta);
    auto* gemm = blas_gemm<T>();
    if (gemm == nullptr || k == 0) {
      aten_gemm(trans_a, trans_b, m, n, k, alpha_t, a, lda, b, ldb, beta_t, c, ldc);
      return;
    }
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
    const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
    const int mi = static_cast<int>(n), ni = static_cast<int>(m), ki = static_cast<int>(k);
    const int la = static_cast<int>(ldb), lb = static_cast<int>(lda), lc = static_cast<int>(ldc);
    gemm(&ta, &tb, &mi, &ni, &ki, &alpha_t, b, &la, a, &lb, &beta_t, c, &lc);
  }

  // a (M, K) @ b (K, N). float32 goes through blocked_brgemm; a weight gradient a = g^T (g an (N, X)
  // row-major sequence buffer) is computed as (b^T g)^T, transposing the narrower b instead of g.
  static at::Tensor mm(const at::Tensor& a, const at::Tensor& b) {
    if (a.scalar_type() != at::kFloat || a.numel() == 0 || b.numel() == 0) return at::mm(a, b);
    if (!a.is_contiguous() && a.t().is_contiguous() && b.is_contiguous()) {
      return row_major_mm(b.t(), a.t()).t().contiguous();
    }
    return row_major_mm(a, b);
  }

  static at::Tensor row_major_mm(const at::Tensor& a, const at::Tensor& b) {
    const at::Tensor ac = a.contiguous(), bc = b.contiguous();
    const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
    at::Tensor c = at::empty({M, N}, a.options());
    blocked_brgemm(M, N, K, ac.data_ptr<float>(), K, bc.data_ptr<float>(), N, false, c.data_ptr<float>(), N);
    return c;
  }

  template <typename T>
  void copy(T* dst, const T* src, int64_t count) {
    if (count > 0) std::memcpy(dst, src, count * sizeof(T));
  }

  // Runs body(begin, end) over row ranges split between threads, in chunks of at least about 32k
  // elements: below that, waking a second thread costs more than it saves.
  template <typename F>
  static void for_rows(int64_t rows, int64_t width, const F& body) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1));
    if (rows <= grain) {
      body(int64_t(0), rows);
      return;
    }
    at::parallel_for(0, rows, grain, body);
  }

  template <typename T>
  void lstm_forward(const LstmForwardStep<T>& s, int64_t rows) {
    const auto& k = cpu::pointwise_kernels<T>();
    for_rows(rows, 4 * s.hidden_size, [&](int64_t begin, int64_t end) { k.lstm_forward(s, begin, end); });
  }

  template <typename T>
  void lstm_backward(const LstmBackwardStep<T>& s, int64_t rows, T* hidden_norm, T* cell_norm) {
    const auto& k = cpu::pointwise_kernels<T>();
    for_rows(rows, 4 * s.hidden_size, [&](int64_t begin, int64_t end) {
      k.lstm_backward(s, begin, end, hidden_norm, cell_norm);
    });
  }

  template <typename T>
  void rnn_forward(const RnnForwardStep<T>& s, int64_t rows) {
    const auto& k = cpu::pointwise_kernels<T>();
    for_rows(rows, s.hidden_size, [&](int64_t begin, int64_t end) { k.rnn_forward(s, begin, end); });
  }

  template <typename T>
  void rnn_backward(const RnnBackwardStep<T>& s, int64_t rows, T* hidden_norm) {
    const auto& k = cpu::pointwise_kernels<T>();
    for_rows(rows, s.hidden_size, [&](int64_t begin, int64_t end) {
      k.rnn_backward(s, begin, end, hidden_norm);
    });
  }

  template <typename T>
  void sum(const SumStep<T>& s, int64_t rows, T* norm) {
    const auto& k = cpu::pointwise_kernels<T>();
    for_rows(rows, s.width, [&](int64_t begin, int64_t end) { k.sum(s, begin, end, norm); });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(lstmfast, CPU, m) {
  m.impl("lstm_forward", &lstm_forward<CpuBackend>);
  m.impl("lstm_backward", &lstm_backward<CpuBackend>);
  m.impl("rnn_forward", &rnn_forward<CpuBackend>);
  m.impl("rnn_backward", &rnn_backward<CpuBackend>);
}

TORCH_LIBRARY_IMPL(lstmfast, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", &cpu::isa_name);
}

}  // namespace lstmfast

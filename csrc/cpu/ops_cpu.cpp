// CPU backend of the shared time loops: BLAS GEMMs on raw pointers, pointwise steps split over rows
// with at::parallel_for (each row's work, norms included, stays on one thread, so results do not
// depend on the thread count).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "../layer_ops.h"

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

struct CpuBackend {
  static constexpr bool kReducedPrecision = false;
  static constexpr const char* kDtypes = "float32 or float64";

  explicit CpuBackend(const at::Tensor&) {}

  template <typename T>
  void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const T* a,
            int64_t lda, const T* b, int64_t ldb, double beta, T* c, int64_t ldc) {
    if (m == 0 || n == 0) return;
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

  template <typename T>
  void copy(T* dst, const T* src, int64_t count) {
    if (count > 0) std::memcpy(dst, src, count * sizeof(T));
  }

  // Runs body(b) for every row, rows split between threads in chunks of about 16k elements.
  template <typename F>
  static void for_rows(int64_t rows, int64_t width, const F& body) {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) body(b);
    });
  }

  template <typename T>
  void lstm_forward(const LstmForwardStep<T>& s, int64_t rows) {
    for_rows(rows, 4 * s.hidden_size, [&](int64_t b) {
      for (int64_t j = 0; j < s.hidden_size; ++j) lstm_forward_point<T, T>(s, b, j);
    });
  }

  template <typename T>
  void lstm_backward(const LstmBackwardStep<T>& s, int64_t rows, T* hidden_norm, T* cell_norm) {
    for_rows(rows, 4 * s.hidden_size, [&](int64_t b) {
      T hidden = 0, cell = 0;
      for (int64_t j = 0; j < s.hidden_size; ++j) {
        const auto sq = lstm_backward_point<T, T>(s, b, j);
        hidden += sq.hidden;
        cell += sq.cell;
      }
      if (hidden_norm != nullptr) hidden_norm[b] = hidden;
      if (cell_norm != nullptr) cell_norm[b] = cell;
    });
  }

  template <typename T>
  void rnn_forward(const RnnForwardStep<T>& s, int64_t rows) {
    for_rows(rows, s.hidden_size, [&](int64_t b) {
      for (int64_t j = 0; j < s.hidden_size; ++j) rnn_forward_point<T, T>(s, b, j);
    });
  }

  template <typename T>
  void rnn_backward(const RnnBackwardStep<T>& s, int64_t rows, T* hidden_norm) {
    for_rows(rows, s.hidden_size, [&](int64_t b) {
      T hidden = 0;
      for (int64_t j = 0; j < s.hidden_size; ++j) hidden += rnn_backward_point<T, T>(s, b, j);
      if (hidden_norm != nullptr) hidden_norm[b] = hidden;
    });
  }

  template <typename T>
  void sum(const SumStep<T>& s, int64_t rows, T* norm) {
    for_rows(rows, s.width, [&](int64_t b) {
      T total = 0;
      for (int64_t j = 0; j < s.width; ++j) total += sum_point<T, T>(s, b, j);
      if (norm != nullptr) norm[b] = total;
    });
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(lstmfast, CPU, m) {
  m.impl("lstm_forward", &lstm_forward<CpuBackend>);
  m.impl("lstm_backward", &lstm_backward<CpuBackend>);
  m.impl("rnn_forward", &rnn_forward<CpuBackend>);
  m.impl("rnn_backward", &rnn_backward<CpuBackend>);
}

}  // namespace lstmfast

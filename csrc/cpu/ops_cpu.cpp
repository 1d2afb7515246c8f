// CPU backend of the shared time loops: BLAS GEMMs on raw pointers, vectorized pointwise steps
// (pointwise.h) split over rows with at::parallel_for (each row's work, norms included, stays on one
// thread, so results do not depend on the thread count).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

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

}  // namespace lstmfast

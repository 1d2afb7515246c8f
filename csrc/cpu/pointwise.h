// The CPU's per-step pointwise passes, vectorized, with one implementation per instruction set.
//
// pointwise_impl.h is compiled once per instruction set (pointwise_avx512.cpp, pointwise_avx2.cpp,
// pointwise_baseline.cpp), each into its own namespace; pointwise_kernels<T>() picks the best one the
// running CPU supports, once. Every element takes the same vector code path (a row's last partial
// vector is padded, not handled by scalar code), and rows are never split between threads, so results
// do not depend on the thread count.
#pragma once

#include <cstdint>

#include "../kernels/steps.h"

namespace lstmfast::cpu {

// Each function handles rows [begin, end) of one step (shapes as in kernels/steps.h); norms, when not
// nullptr, get the per-row sums of squares at index b.
template <typename T>
struct PointwiseKernels {
  const char* isa;
  void (*lstm_forward)(const kernels::LstmForwardStep<T>& s, int64_t begin, int64_t end);
  void (*lstm_backward)(const kernels::LstmBackwardStep<T>& s, int64_t begin, int64_t end,
                        T* hidden_norm, T* cell_norm);
  void (*rnn_forward)(const kernels::RnnForwardStep<T>& s, int64_t begin, int64_t end);
  void (*rnn_backward)(const kernels::RnnBackwardStep<T>& s, int64_t begin, int64_t end,
                       T* hidden_norm);
  void (*sum)(const kernels::SumStep<T>& s, int64_t begin, int64_t end, T* norm);
  void (*gru_forward)(const kernels::GruForwardStep<T>& s, int64_t begin, int64_t end);
  void (*gru_backward)(const kernels::GruBackwardStep<T>& s, int64_t begin, int64_t end,
                       T* hidden_norm);
};

#define LSTMFAST_DECLARE_ISA(ns)                          \
  namespace ns {                                          \
  const PointwiseKernels<float>& pointwise_float();       \
  const PointwiseKernels<double>& pointwise_double();     \
  bool supported();                                       \
  }
LSTMFAST_DECLARE_ISA(avx512)
LSTMFAST_DECLARE_ISA(avx2)
LSTMFAST_DECLARE_ISA(baseline)
#undef LSTMFAST_DECLARE_ISA

// The kernels for this CPU: the widest supported instruction set, or the one named by the environment
// variable LSTMFAST_CPU_ISA ("avx512", "avx2" or "baseline"; for testing every path on one machine).
template <typename T>
const PointwiseKernels<T>& pointwise_kernels();

}  // namespace lstmfast::cpu

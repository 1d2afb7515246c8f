// Pointwise passes for avx2: 256-bit vectors. See pointwise.h.
#include <algorithm>
#include <cstdint>

#include "pointwise.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

namespace lstmfast::cpu::avx2 {
bool supported() {
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
}

// Everything below is compiled for avx2 only; it lives in namespace avx2 and runs only after
// supported() said yes.
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define LSTMFAST_ISA avx2
#define LSTMFAST_ISA_NAME "avx2"
#define LSTMFAST_VEC_BYTES 32
#include "pointwise_impl.h"
#pragma GCC pop_options

#else  // not x86-64: never selected

namespace lstmfast::cpu::avx2 {
bool supported() { return false; }
const PointwiseKernels<float>& pointwise_float() { return baseline::pointwise_float(); }
const PointwiseKernels<double>& pointwise_double() { return baseline::pointwise_double(); }
}

#endif

// Pointwise passes for avx512: 512-bit vectors: 16 floats or 8 doubles per instruction. See pointwise.h.
#include <algorithm>
#include <cstdint>

#include "pointwise.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))

namespace lstmfast::cpu::avx512 {
bool supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}
}

// Everything below is compiled for avx512 only; it lives in namespace avx512 and runs only after
// supported() said yes.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,bmi2")
#define LSTMFAST_ISA avx512
#define LSTMFAST_ISA_NAME "avx512"
#define LSTMFAST_VEC_BYTES 64
#include "pointwise_impl.h"
#pragma GCC pop_options

#else  // not x86-64: never selected

namespace lstmfast::cpu::avx512 {
bool supported() { return false; }
const PointwiseKernels<float>& pointwise_float() { return baseline::pointwise_float(); }
const PointwiseKernels<double>& pointwise_double() { return baseline::pointwise_double(); }
}

#endif

// Pointwise passes for baseline: 128-bit vectors (SSE2, every x86-64 CPU; other CPUs get their compiler's 16-byte vectors). See pointwise.h.
#include <algorithm>
#include <cstdint>

#include "pointwise.h"

namespace lstmfast::cpu::baseline {
bool supported() { return true; }
}

#define LSTMFAST_ISA baseline
#define LSTMFAST_ISA_NAME "baseline"
#define LSTMFAST_VEC_BYTES 16
#include "pointwise_impl.h"

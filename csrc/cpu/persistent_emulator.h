// A test hook for the CUDA persistent kernels without a GPU: with LSTMFAST_EMULATE_PERSISTENT set to
// "MULTIPROCESSORS,SHARED_MEMORY_PER_BLOCK", the CPU ops run float32 layers through the very code of
// those kernels (cuda/persistent_body.h), one host thread per GPU thread, with barriers standing for
// __syncthreads and the grid-wide sync, on a device with those limits, whenever the plan says the kernels
// fit it (else, and for float64, the CPU time loops run as usual). Slow; for tests only: it checks the
// kernels' indexing, layout and step order, not the GPU's memory model or speed.
#pragma once

#include "../kernels/layer.h"

namespace lstmfast::cpu {

// Whether LSTMFAST_EMULATE_PERSISTENT is set (the emulation may then read any float32 argument).
bool persistent_emulation_requested();

bool emulate_persistent(const kernels::LstmForwardArgs<float>& a);
bool emulate_persistent(const kernels::LstmBackwardArgs<float, float>& a);
bool emulate_persistent(const kernels::RnnForwardArgs<float>& a);
bool emulate_persistent(const kernels::RnnBackwardArgs<float, float>& a);
bool emulate_persistent(const kernels::GruForwardArgs<float>& a);
bool emulate_persistent(const kernels::GruBackwardArgs<float, float>& a);

template <typename Args>
bool emulate_persistent(const Args&) {
  return false;  // float64
}

}  // namespace lstmfast::cpu

// The persistent CUDA kernels' decision (kernels/persistent_plan.h) as ops every build has, so that it
// can be asked and tested without a GPU; and the count of persistent launches.
#include <torch/library.h>

#include <atomic>
#include <string>

#include "kernels/persistent_plan.h"

namespace lstmfast {
namespace {

std::atomic<int64_t> launches{0};

// The plan for a layer on a device with the given limits, under `mode` ("0", "1", "auto", or "" for
// the environment variable LSTMFAST_CUDA_PERSISTENT): "persistent: ..." or "default: <why>".
std::string persistent_plan(c10::string_view cell, bool backward, int64_t hidden_size, int64_t batch,
                            int64_t steps, int64_t element_size, bool projection, bool norms,
                            int64_t sm_count, int64_t smem_per_block, int64_t smem_per_sm,
                            c10::string_view mode) {
  TORCH_CHECK(cell == "lstm" || cell == "gru" || cell == "rnn",
              "lstmfast.persistent_plan: expected cell 'lstm', 'gru' or 'rnn', but got '", std::string(cell), "'");
  bool ok = true;
  const std::string m(mode);
  const auto parsed = kernels::parse_persistent_mode(m.empty() ? std::getenv("LSTMFAST_CUDA_PERSISTENT")
                                                               : m.c_str(), &ok);
  TORCH_CHECK(ok, "lstmfast: LSTMFAST_CUDA_PERSISTENT must be 0, 1 or auto, but got '",
              m.empty() ? std::string(std::getenv("LSTMFAST_CUDA_PERSISTENT")) : m, "'");
  const auto kind = cell == "lstm" ? kernels::PersistentCell::Lstm
                   : cell == "gru"  ? kernels::PersistentCell::Gru
                                    : kernels::PersistentCell::Rnn;
  const kernels::PersistentRequest r{kind, backward, hidden_size, batch, steps, static_cast<int>(element_size),
                                     projection, norms, true};
  const kernels::DeviceLimits d{static_cast<int>(sm_count), smem_per_block, smem_per_sm, true};
  const auto p = kernels::plan_persistent(r, d, parsed);
  return p.use ? p.reason : "default: " + p.reason;
}

int64_t launch_count() { return persistent_launches(); }

}  // namespace

void count_persistent_launch() { launches.fetch_add(1, std::memory_order_relaxed); }
int64_t persistent_launches() { return launches.load(std::memory_order_relaxed); }

TORCH_LIBRARY_IMPL(lstmfast, CompositeExplicitAutograd, m) {
  m.impl("persistent_plan", &persistent_plan);
  m.impl("persistent_launches", &launch_count);
}

}  // namespace lstmfast

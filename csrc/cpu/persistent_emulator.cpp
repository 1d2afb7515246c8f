// The persistent kernels' code on host threads (see persistent_emulator.h).
#include "persistent_emulator.h"

#include <c10/util/Exception.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "../cuda/persistent_body.h"

namespace lstmfast::persistent {
thread_local EmulatedThread emulated_thread;
}

namespace lstmfast::cpu {

bool persistent_emulation_requested() {
  const char* value = std::getenv("LSTMFAST_EMULATE_PERSISTENT");
  return value != nullptr && *value != '\0';
}

namespace {

using persistent::kPersistentThreads;

bool limits_from_environment(kernels::DeviceLimits* d) {
  if (!persistent_emulation_requested()) return false;
  const char* value = std::getenv("LSTMFAST_EMULATE_PERSISTENT");
  int sms = 0;
  long long smem = 0;
  TORCH_CHECK(std::sscanf(value, "%d,%lld", &sms, &smem) == 2 && sms > 0 && smem > 0,
              "lstmfast: LSTMFAST_EMULATE_PERSISTENT must be 'multiprocessors,shared_memory_per_block', "
              "but got '", std::string(value), "'");
  *d = {sms, smem, smem + 1024, true};
  return true;
}

kernels::PersistentPlan plan(const kernels::PersistentRequest& r) {
  kernels::DeviceLimits d{};
  if (!limits_from_environment(&d)) return {};
  return kernels::plan_persistent(r, d, kernels::PersistentMode::On);
}

persistent::Steps steps_of(const kernels::Sequence& q) {
  const bool uniform = q.steps == 0 || q.batch_sizes[0] == q.batch_sizes[q.steps - 1];
  return {uniform ? nullptr : q.batch_sizes, uniform ? nullptr : q.offsets, q.steps, q.batch, q.reverse};
}

// Runs body(shared memory of the block) on blocks x kPersistentThreads host threads. Shared memory
// starts as all-ones bytes (NaN as floats), so reading what no thread wrote shows in the results.
template <typename Body>
void run_grid(const kernels::PersistentPlan& plan, const Body& body) {
  struct alignas(16) Chunk {
    unsigned char bytes[16];
  };
  const int blocks = plan.blocks, threads = blocks * kPersistentThreads;
  std::barrier<> grid(threads);
  std::vector<std::unique_ptr<std::barrier<>>> block_barriers;
  std::vector<std::vector<Chunk>> shared(blocks);
  for (int b = 0; b < blocks; ++b) {
    block_barriers.push_back(std::make_unique<std::barrier<>>(kPersistentThreads));
    shared[b].resize((plan.smem + 15) / 16);
    std::memset(shared[b].data(), 0xff, shared[b].size() * sizeof(Chunk));
  }
  std::vector<std::thread> pool;
  pool.reserve(threads);
  for (int b = 0; b < blocks; ++b) {
    for (int t = 0; t < kPersistentThreads; ++t) {
      pool.emplace_back([&, b, t] {
        persistent::emulated_thread = {t, b, block_barriers[b].get(), &grid};
        body(reinterpret_cast<unsigned char*>(shared[b].data()));
      });
    }
  }
  for (auto& thread : pool) thread.join();
  count_persistent_launch();
}

// out (rows, width; row stride ldo, default width) = x (rows, depth) w^T, w (width, depth): the
// forwards' input projection.
void project(const float* x, const float* w, float* out, int64_t rows, int64_t depth, int64_t width,
             int64_t ldo = 0) {
  if (ldo == 0) ldo = width;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t g = 0; g < width; ++g) {
      float sum = 0.f;
      for (int64_t k = 0; k < depth; ++k) sum += x[r * depth + k] * w[g * depth + k];
      out[r * ldo + g] = sum;
    }
  }
}

}  // namespace

bool emulate_persistent(const kernels::LstmForwardArgs<float>& a) {
  const auto p = plan({kernels::PersistentCell::Lstm, false, a.hidden_size, a.seq.batch, a.seq.steps, 4, a.w_hr != nullptr, false,
                       a.gate_rows == a.seq.rows});
  if (!p.use) return false;
  project(a.input, a.w_ih, a.gates, a.seq.rows, a.input_size, 4 * a.hidden_size);
  const auto params = persistent::lstm_forward_params(a, p, steps_of(a.seq));
  run_grid(p, [&](unsigned char* smem) { persistent::lstm_forward_body(params, smem); });
  return true;
}

bool emulate_persistent(const kernels::LstmBackwardArgs<float, float>& a) {
  const auto p = plan({kernels::PersistentCell::Lstm, true, a.hidden_size, a.seq.batch, a.seq.steps, 4, a.w_hr != nullptr,
                       a.grad_hidden_norm != nullptr || a.grad_cell_norm != nullptr, true});
  if (!p.use) return false;
  const auto params = persistent::lstm_backward_params(a, p, steps_of(a.seq));
  run_grid(p, [&](unsigned char* smem) { persistent::lstm_backward_body(params, smem); });
  return true;
}

bool emulate_persistent(const kernels::RnnForwardArgs<float>& a) {
  const auto p = plan({kernels::PersistentCell::Rnn, false, a.hidden_size, a.seq.batch, a.seq.steps, 4, false, false, true});
  if (!p.use) return false;
  project(a.input, a.w_ih, a.output, a.seq.rows, a.input_size, a.hidden_size);
  const auto params = persistent::rnn_forward_params(a, p, steps_of(a.seq));
  run_grid(p, [&](unsigned char* smem) { persistent::rnn_forward_body(params, smem); });
  return true;
}

bool emulate_persistent(const kernels::RnnBackwardArgs<float, float>& a) {
  const auto p = plan({kernels::PersistentCell::Rnn, true, a.hidden_size, a.seq.batch, a.seq.steps, 4, false,
                       a.grad_hidden_norm != nullptr, true});
  if (!p.use) return false;
  const auto params = persistent::rnn_backward_params(a, p, steps_of(a.seq));
  run_grid(p, [&](unsigned char* smem) { persistent::rnn_backward_body(params, smem); });
  return true;
}

bool emulate_persistent(const kernels::GruForwardArgs<float>& a) {
  const auto p = plan({kernels::PersistentCell::Gru, false, a.hidden_size, a.seq.batch, a.seq.steps, 4, false,
                       false, a.gate_rows == a.seq.rows});
  if (!p.use) return false;
  project(a.input, a.w_ih, a.gates, a.seq.rows, a.input_size, 3 * a.hidden_size, 4 * a.hidden_size);
  const auto params = persistent::gru_forward_params(a, p, steps_of(a.seq));
  run_grid(p, [&](unsigned char* smem) { persistent::gru_forward_body(params, smem); });
  return true;
}

bool emulate_persistent(const kernels::GruBackwardArgs<float, float>& a) {
  const auto p = plan({kernels::PersistentCell::Gru, true, a.hidden_size, a.seq.batch, a.seq.steps, 4, false,
                       a.grad_hidden_norm != nullptr, true});
  if (!p.use) return false;
  const auto params = persistent::gru_backward_params(a, p, steps_of(a.seq));
  run_grid(p, [&](unsigned char* smem) { persistent::gru_backward_body(params, smem); });
  return true;
}

}  // namespace lstmfast::cpu

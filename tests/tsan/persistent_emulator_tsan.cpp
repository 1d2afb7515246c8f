// ThreadSanitizer over the persistent kernels' code (csrc/cuda/persistent_body.h) run by the host
// emulator (csrc/cpu/persistent_emulator.h): one host thread per GPU thread, so a missing barrier
// between a shared-memory write and another thread's read, or between one block's global writes and
// another block's reads, is a data race TSAN reports. Not part of the test suite (it builds its own
// binary); run by hand:
//   T=$(python -c 'import torch, os; print(os.path.dirname(torch.__file__))')
//   g++ -std=c++20 -O1 -g -fsanitize=thread -I$T/include tests/tsan/persistent_emulator_tsan.cpp \
//       csrc/cpu/persistent_emulator.cpp -L$T/lib -lc10 -Wl,-rpath,$T/lib -o /tmp/persistent_tsan
//   /tmp/persistent_tsan      (prints "ok" and exits 0 when TSAN finds nothing)
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../../csrc/cpu/persistent_emulator.h"

namespace lstmfast {
void count_persistent_launch() {}
int64_t persistent_launches() { return 0; }
}  // namespace lstmfast

using namespace lstmfast;

static std::vector<float> random_vector(int64_t n, std::mt19937& g) {
  std::uniform_real_distribution<float> u(-0.3f, 0.3f);
  std::vector<float> v(n);
  for (auto& x : v) x = u(g);
  return v;
}

int main() {
  // 4 multiprocessors, 66000 bytes per block: H = 100 gives 4 blocks of 25 units, and the LSTM's
  // backward stages its rows in chunks.
  setenv("LSTMFAST_EMULATE_PERSISTENT", "4,66000", 1);
  std::mt19937 g(0);
  const int64_t T = 6, B = 5, I = 3, H = 100;
  int launched = 0;
  for (bool packed : {false, true}) {
    for (bool reverse : {false, true}) {
      std::vector<int64_t> bs = packed ? std::vector<int64_t>{5, 4, 4, 2, 1, 1} : std::vector<int64_t>(T, B);
      std::vector<int64_t> off(T);
      int64_t N = 0;
      for (int64_t t = 0; t < T; ++t) off[t] = N, N += bs[t];
      const kernels::Sequence q{bs.data(), off.data(), T, B, N, reverse};
      auto x = random_vector(N * I, g), h0 = random_vector(B * H, g), c0 = random_vector(B * H, g);
      auto grad_out = random_vector(N * H, g), grad_h = random_vector(B * H, g), grad_c = random_vector(B * H, g);
      for (int gates : {4, 3, 1}) {
        auto w_ih = random_vector(gates * H * I, g), w_hh = random_vector(gates * H * H, g);
        auto bias = random_vector(gates * H, g);
        std::vector<float> out(N * H), h = h0, c = c0, pre(N * 4 * H), cells(N * H), prev(N * H);
        std::vector<float> gh = grad_h, gc = grad_c, grad_pre(N * gates * H), grad_hidden_pre(N * gates * H);
        bool ok;
        if (gates == 4) {
          kernels::LstmForwardArgs<float> f{q, I, H, H, x.data(), w_ih.data(), w_hh.data(), nullptr, bias.data(),
                                            out.data(), h.data(), c.data(), pre.data(), N, cells.data(), nullptr,
                                            true};
          ok = cpu::emulate_persistent(f);
          kernels::LstmBackwardArgs<float, float> b{q, H, H, w_hh.data(), nullptr, out.data(), pre.data(),
                                                    cells.data(), h0.data(), c0.data(), grad_out.data(), gh.data(),
                                                    gc.data(), grad_pre.data(), prev.data(), nullptr, nullptr,
                                                    nullptr, nullptr, 0.0};
          ok = ok && cpu::emulate_persistent(b);
        } else if (gates == 3) {
          kernels::GruForwardArgs<float> f{q, I, H, x.data(), w_ih.data(), w_hh.data(), bias.data(), bias.data(),
                                           out.data(), h.data(), pre.data(), N, nullptr, true};
          ok = cpu::emulate_persistent(f);
          kernels::GruBackwardArgs<float, float> b{q, H, w_hh.data(), out.data(), pre.data(), h0.data(),
                                                   grad_out.data(), gh.data(), grad_pre.data(),
                                                   grad_hidden_pre.data(), prev.data(), nullptr, 0.0};
          ok = ok && cpu::emulate_persistent(b);
        } else {
          kernels::RnnForwardArgs<float> f{q, I, H, x.data(), w_ih.data(), w_hh.data(), bias.data(), out.data(),
                                           h.data(), kernels::Nonlinearity::Tanh};
          ok = cpu::emulate_persistent(f);
          kernels::RnnBackwardArgs<float, float> b{q, H, w_hh.data(), out.data(), h0.data(), grad_out.data(),
                                                   gh.data(), grad_pre.data(), prev.data(), nullptr,
                                                   kernels::Nonlinearity::Tanh, 0.0};
          ok = ok && cpu::emulate_persistent(b);
        }
        if (!ok) {
          std::printf("the plan refused %s packed=%d reverse=%d\n", gates == 4 ? "lstm" : gates == 3 ? "gru" : "rnn",
                      packed, reverse);
          return 1;
        }
        launched += 2;
      }
    }
  }
  std::printf("ok: %d emulated launches\n", launched);
  return 0;
}

// CPU backend of the shared time loops: BLAS GEMMs on raw pointers, vectorized pointwise steps
// (pointwise.h) split over rows with at::parallel_for (each row's work, norms included, stays on one
// thread, so results do not depend on the thread count).
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <omp.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <exception>
#include <thread>
#include <utility>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "persistent_emulator.h"
#include "../layer_ops.h"
#include "aligned.h"
#include "gemm.h"
#include "gemm_bf16.h"
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
struct Choice {
  const char* name;
  bool supported;
  const char* feature;  // what "this CPU does not support ..." names
};

// The index of the choice that the environment variable `variable` forces, or -1 when it is unset or
// empty. An unknown name, or a choice this CPU does not support, is an error.
template <size_t N>
int forced_choice(const char* variable, const std::array<Choice, N>& choices) {
  const char* want = std::getenv(variable);
  if (want == nullptr || *want == '\0') return -1;
  std::string names;
  for (size_t i = 0; i < N; ++i) {
    if (std::strcmp(want, choices[i].name) == 0) {
      TORCH_CHECK(choices[i].supported, "lstmfast: ", variable, "=", want, " but this CPU does not support ",
                  choices[i].feature);
      return static_cast<int>(i);
    }
    names += std::string(i == 0 ? "" : i + 1 == N ? " or " : ", ") + choices[i].name;
  }
  TORCH_CHECK(false, "lstmfast: ", variable, " must be ", names, ", but got '", want, "'");
}

// The instruction set picked once per process: LSTMFAST_CPU_ISA if set (and supported), else the widest.
int chosen_isa() {
  static const int isa = [] {
    const std::array<Choice, 3> isas{{{"avx512", avx512::supported(), "it"},
                                      {"avx2", avx2::supported(), "it"},
                                      {"baseline", true, "it"}}};
    const int forced = forced_choice("LSTMFAST_CPU_ISA", isas);
    return forced >= 0 ? forced : isas[0].supported ? 0 : isas[1].supported ? 1 : 2;
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

std::string isa_name() { return pointwise_kernels<float>().isa; }

// lstmfast's own GEMM (gemm.h) runs the float32 and float64 products when the AVX-512 or the AVX2
// kernels are chosen (each element summed in the same order in either build); with the baseline ones,
// torch's.
bool packed_gemm_enabled() { return chosen_isa() <= 1; }

bool own::uses_avx512() { return chosen_isa() == 0; }

// The engine of the products of a bfloat16 op call (operands rounded to bfloat16, sums in float32):
// LSTMFAST_CPU_BF16_ENGINE if set (and supported), else the fastest this CPU has: AMX tiles, else
// AVX512-BF16's vdpbf16ps (bf16::gemm / bf16::amx_gemm, on the same packed operands). "float32" rounds the
// operands to bfloat16 values and multiplies them with the float32 GEMM: the same products, on any CPU.
enum class Bf16Engine { kAmx, kAvx512Bf16, kFloat32 };

Bf16Engine bf16_engine() {
  static const Bf16Engine engine = [] {
    const std::array<Choice, 3> engines{{{"amx", bf16::amx_supported(), "AMX-BF16"},
                                         {"avx512_bf16", bf16::supported(), "AVX512-BF16"},
                                         {"float32", true, "it"}}};
    const int forced = forced_choice("LSTMFAST_CPU_BF16_ENGINE", engines);
    if (forced == 0) {
      TORCH_CHECK(bf16::amx_enable(), "lstmfast: LSTMFAST_CPU_BF16_ENGINE=amx but the OS refused this process ",
                  "the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM)");
    }
    if (forced >= 0) return static_cast<Bf16Engine>(forced);
    if (engines[0].supported && bf16::amx_enable()) return Bf16Engine::kAmx;
    return engines[1].supported ? Bf16Engine::kAvx512Bf16 : Bf16Engine::kFloat32;
  }();
  return engine;
}

// Which GEMM runs the products of an op called with `dtype` on the CPU.
std::string gemm_engine(at::ScalarType dtype) {
  const std::string wide = !packed_gemm_enabled() ? "brgemm/blas" : own::uses_avx512() ? "avx512" : "avx2";
  if (dtype == at::kBFloat16) {
    switch (bf16_engine()) {
      case Bf16Engine::kAmx: return "amx";
      case Bf16Engine::kAvx512Bf16: return "avx512_bf16";
      case Bf16Engine::kFloat32: break;
    }
    return "float32 (" + wide + ")";
  }
  if (dtype == at::kHalf) return "float32 (" + wide + ")";
  return wide;
}

// Set for the duration of a bfloat16 op call (ReducedPrecision below): the backend constructed on this
// thread then rounds its products' operands to bfloat16.
thread_local bool bf16_products = false;

// A bfloat16 or float16 call's weight matrices as the caller passed them (ReducedPrecision below), when
// lstmfast's own GEMMs multiply them (a bfloat16 engine; the own float32 GEMM for float16). In each
// one's place the loops get a float32 tensor over address space reserved without access, and the
// products pack the weight from its own bits (CpuBackend::narrow_source: bfloat16 bits in a bfloat16
// call, rounded no further; float16 bits in a float16 one, widened exactly as they are packed): every
// call is spared widening it at entry (2 bytes read, 4 written an element). Nothing else reads a weight
// in such a call; the float32 paths that take a weight check that (wide()), and any other read would
// fault rather than see stale memory.
struct NarrowWeight {
  const float* wide;  // the reserved range
  int64_t numel;
  const uint16_t* narrow;
};
using NarrowWeights = std::vector<NarrowWeight>;
thread_local NarrowWeights* narrow_weights = nullptr;  // the current reduced-precision call's, on its thread

// The entry whose float32 range holds p, or nullptr.
NarrowWeight* narrow_entry(NarrowWeights* weights, const void* p) {
  if (weights == nullptr) return nullptr;
  for (auto& w : *weights) {
    if (p >= w.wide && p < w.wide + w.numel) return &w;
  }
  return nullptr;
}

// p, for a float32 read: checked not to lie in a narrow weight.
template <typename T>
const T* wide(NarrowWeights* weights, const T* p) {
  TORCH_INTERNAL_ASSERT(narrow_entry(weights, p) == nullptr,
                        "lstmfast: internal error: a float32 read of a weight kept in its own dtype");
  return p;
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

// Row-major C(m, n) = A(m, k) B(k, n) (+ C when accumulate) for float, through oneDNN's brgemm
// micro-kernels (at::native::cpublas::brgemm; it uses AVX-512 where MKL's sgemm on some CPUs does not,
// and falls back to BLAS where oneDNN has no kernel). C is cut into fixed blocks, each one brgemm call
// on one thread: the blocks do not depend on the thread count, so neither do the results.
void blocked_brgemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                    int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  // A 64 x 512 panel of A and a 512 x 256 panel of B stay in a 2 MB L2 cache together.
  constexpr int64_t kRowBlock = 64, kColBlock = 256, kDepthBlock = 512;
  const int64_t row_blocks = (m + kRowBlock - 1) / kRowBlock, col_blocks = (n + kColBlock - 1) / kColBlock;
  const auto block = [&](int64_t index) {
    const int64_t r0 = (index / col_blocks) * kRowBlock, c0 = (index % col_blocks) * kColBlock;
    const int64_t rows = std::min(kRowBlock, m - r0), cols = std::min(kColBlock, n - c0);
    for (int64_t d0 = 0; d0 < k; d0 += kDepthBlock) {
      at::native::cpublas::brgemm(rows, cols, std::min(kDepthBlock, k - d0), lda, ldb, ldc,
                                  accumulate || d0 > 0, a + r0 * lda + d0, b + d0 * ldb + c0,
                                  c + r0 * ldc + c0, false);
    }
  };
  const int64_t blocks = row_blocks * col_blocks;
  // A second thread pays off from about half a million multiply-adds per block.
  if (blocks > 1 && std::min(kRowBlock, m) * std::min(kColBlock, n) * k >= (int64_t(1) << 19)) {
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) block(i);
    });
  } else {
    for (int64_t i = 0; i < blocks; ++i) block(i);
  }
}

// A barrier for the threads of one OpenMP team that spins (the steps it separates take microseconds),
// yielding the core after a while in case the machine is oversubscribed.
class SpinBarrier {
 public:
  void reset(int threads) {
    threads_ = threads;
    arrived_.store(0, std::memory_order_relaxed);
  }
  void wait() {
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == threads_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins < 4096) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  int threads_ = 1;
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
};

// Thrown by every thread of a team at the same point when one of them failed (see CpuBackend::run).
struct TeamAbort {};

struct CpuBackend {
  // float16 / bfloat16 calls are widened to float32 before they reach the loops (ReducedPrecision).
  static constexpr bool kReducedPrecision = false;
  static constexpr const char* kDtypes = "float32, float64, bfloat16 or float16";

  explicit CpuBackend(const at::Tensor&)
      : bf16_(cpu::bf16_products),
        engine_(bf16_ ? cpu::bf16_engine() : cpu::Bf16Engine::kFloat32),
        narrow_(cpu::narrow_weights) {}

  // A bfloat16 call: every product's operands are rounded to bfloat16 (sums stay float32).
  bool bf16_;
  cpu::Bf16Engine engine_;
  // The call's weights kept in its own dtype (cpu::NarrowWeight), looked up from any thread of a team.
  cpu::NarrowWeights* narrow_;
  // The bits (bfloat16 or float16: the call's dtype) of the matrix at b when b lies in a narrow weight
  // (same element offsets), else nullptr.
  const uint16_t* narrow_source(const float* b) const {
    const cpu::NarrowWeight* w = cpu::narrow_entry(narrow_, b);
    return w == nullptr ? nullptr : w->narrow + (b - w->wide);
  }
  // The float16 bits of the matrix at b (a float16 call's narrow weight), else nullptr.
  template <typename T>
  const uint16_t* half_source(const T* b) const {
    if constexpr (std::is_same_v<T, float>) return bf16_ ? nullptr : narrow_source(b);
    else return nullptr;
  }
  // Whether a bfloat16 call's product takes its A operand as two bfloat16 terms (high + low, 16
  // significant bits; bf16::round_rows_split): the forward's per-step products, which multiply the state
  // h_{t-1} (or m_t) by a weight's transpose (trans_b; the backward's per-step products multiply gate
  // gradients by the weight itself). Rounding h_{t-1} to 8 bits every step perturbs the forward's
  // recurrence, and a long memory amplifies that: with a forget-gate bias of 5 at T = 1024
  // (benchmarks/bf16_accuracy.py), the output's error against float64 was 4.4% and dW_hh's 170% with one
  // term, 0.17% and 2.2% with two (the backward's products gain nothing measurable from it). It doubles
  // those products' work only (on AMX both terms share each tile of the weight).
  static bool split_operand(bool step, bool trans_b) { return step && trans_b; }

  // Test hook: the CUDA persistent kernels' code emulated on host threads, only when
  // LSTMFAST_EMULATE_PERSISTENT is set (cpu/persistent_emulator.h); false: the time loops run.
  template <typename Args>
  bool whole_layer(const Args& a) {
    return cpu::emulate_persistent(a);
  }

  // ---- Threads. Outside run()'s team, each operation below splits its own work with
  // at::parallel_for. Inside a team, every thread runs the whole time loop (the same calls in the
  // same order): one parallel region per op call instead of one or two per time step. A team splits
  // each step one of two ways:
  //  - by batch rows (row_team_), when the batch is large enough and the weights small enough to sit
  //    in every core's cache: each thread owns a fixed part of the batch for the whole sequence, and
  //    a row's recurrence only involves that row, so the steps need no barrier at all;
  //  - by the weights' panels otherwise: each thread multiplies by the same panels at every step (its
  //    share of the weights stays in its own cache), and each operation ends with a barrier.
  // Every element is computed by the same code either way, so results do not depend on the thread
  // count.
  bool team_ = false, row_team_ = false;
  int64_t team_batch_ = 0;
  // Time steps of the loop being run: how many products a step's weight takes in this call.
  int64_t steps_ = 0;
  SpinBarrier barrier_;
  std::exception_ptr team_error_;

  // Runs f (a time loop over this backend whose steps multiply up to `batch` rows by a (depth, width)
  // weight) with a team of threads when lstmfast's own GEMM is in use (AVX-512 or AVX2) and a step has
  // enough work to share; otherwise f runs as is. Nothing in a time loop throws except the weight packing, which
  // makes every thread throw together.
  template <typename T, typename F>
  void run(int64_t steps, int64_t batch, int64_t width, int64_t depth, const F& f) {
    steps_ = steps;
    const int threads = at::get_num_threads();
    if (!cpu::packed_gemm_enabled() || batch * width * depth < kTeamWork || threads < 2 ||
        at::in_parallel_region()) {
      f();
      return;
    }
    row_team_ = batch >= 4 * threads && width * depth * static_cast<int64_t>(sizeof(T)) <= row_team_weight_bytes();
    team_batch_ = batch;
#pragma omp parallel num_threads(threads)
    {
#pragma omp single
      {
        barrier_.reset(omp_get_num_threads());
        team_ = true;
      }  // (implicit barrier)
      try {
        at::internal::ThreadIdGuard tid(omp_get_thread_num());
        f();
      } catch (const TeamAbort&) {
      }
    }
    team_ = row_team_ = false;
    if (team_error_) std::rethrow_exception(team_error_);
  }

  // Products of more rows than this are whole-sequence products (tall_gemm), not steps.
  static constexpr int64_t kStepRows = 128;
  // A team pays off from about this many multiply-adds per step.
  static constexpr int64_t kTeamWork = int64_t(1) << 15;
  // Weights that fit in a core's L2 cache let a team split the batch instead: each thread then
  // streams the whole weight from its own L2 at every step, with no barrier. Measured on an AMD EPYC
  // (Zen 4, 1 MB L2), B = 64: 256 kB -> 1 MB raised GRU H = 256 inference 16% and LSTM / RNN H = 256
  // training 8-9%; above the L2 size the panel split is as fast or faster. 256 kB when the L2 size is
  // unknown.
  static int64_t row_team_weight_bytes() {
    static const int64_t bytes = [] {
      const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
      return l2 > 0 ? static_cast<int64_t>(l2) : int64_t(256) << 10;
    }();
    return bytes;
  }

  // In a team, this thread's static share [begin, end) of [0, total), cut off at n.
  static std::pair<int64_t, int64_t> thread_share(int64_t total, int64_t n) {
    const int64_t threads = omp_get_num_threads(), chunk = (total + threads - 1) / threads;
    const int64_t begin = std::min(n, omp_get_thread_num() * chunk);
    return {begin, std::min(n, begin + chunk)};
  }

  // This thread's rows of a step with `rows` rows, in a row team (its part of the whole batch).
  std::pair<int64_t, int64_t> own_rows(int64_t rows) const { return thread_share(team_batch_, rows); }

  // body(begin, end) over [0, n): this thread's share in a team (then a barrier), else split into
  // chunks of at least `grain` with at::parallel_for.
  template <typename F>
  void share(int64_t n, int64_t grain, const F& body) {
    if (!team_) {
      if (n <= grain) body(int64_t(0), n);
      else at::parallel_for(0, n, grain, body);
      return;
    }
    const auto [begin, end] = thread_share(n, n);
    if (begin < end) body(begin, end);
    barrier_.wait();
  }

  // Rows of the gates workspace in inference (at least the batch): the input is projected a few steps
  // at a time, into a workspace of about 2 MB that stays in cache for the steps that read it, with at
  // least 128 rows per product.
  static int64_t inference_gate_rows(int64_t rows, int64_t batch, int64_t width) {
    const int64_t cached = (int64_t(2) << 20) / (sizeof(float) * std::max<int64_t>(width, 1));
    return std::min(rows, std::max({batch, int64_t(128), cached}));
  }

  // ---- GEMMs.

  // Row-major C(m, n) = A(m, k) B(k, n) (+ C when accumulate) through lstmfast's own GEMM (gemm.h),
  // for a product of at most kStepRows rows (one time step; taller ones go through tall_gemm). Threads
  // split B's panels, whole tiles' worth at a time; each element is computed by one micro-kernel call in
  // a fixed order.
  template <typename T>
  void packed_gemm(int64_t m, int64_t n, int64_t k, cpu::own::MatrixA<T> a, cpu::own::MatrixB<T> b,
                   bool accumulate, T* c, int64_t ldc) {
    const int64_t panels = cpu::own::panels_of<T>(n);
    // A second thread pays off from about 64k multiply-adds.
    const int64_t group = cpu::own::panels_per_tile(m, b.column_stride != 1);
    const int64_t groups = (panels + group - 1) / group;
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) / (m * group * cpu::own::kPanel<T> * k));
    share(groups, grain, [&](int64_t begin, int64_t end) {
      cpu::own::gemm<T>(n, k, a, b, c, ldc, accumulate, 0, m, begin * group, std::min(panels, end * group));
    });
  }

  // C(m, n) = A(m, k) B(k, n) for a whole-sequence product with B row-major in place (or packed whole
  // when `packed_b` is given), through own::gemm_tall: threads split A's rows or B's panels, each
  // with its own scratch. With `row_sums` (A a transposed row-major G), row_sums[r] += the sum of A's row r,
  // made by the part that multiplies B's first panels.
  template <typename T>
  void tall_gemm(int64_t m, int64_t n, int64_t k, cpu::own::MatrixA<T> a, const T* b, int64_t ldb,
                 bool b_transposed, T* c, int64_t ldc, bool accumulate, const T* packed_b = nullptr,
                 T* row_sums = nullptr) {
    namespace x = cpu::own;
    TORCH_INTERNAL_ASSERT(row_sums == nullptr || (a.row_stride == 1 && a.depth_stride != 1));
    const int64_t panels = x::panels_of<T>(n), group = x::panels_per_tile(x::kMaxRows);
    const auto run_part = [&](int64_t r0, int64_t r1, int64_t p0, int64_t p1) {
      thread_local cpu::AlignedVector<T> scratch(x::gemm_tall_scratch<T>());
      x::gemm_tall<T>(r1 - r0, n, k, {a.data + r0 * a.row_stride, a.row_stride, a.depth_stride}, b, ldb,
                      b_transposed, packed_b, c + r0 * ldc, ldc, accumulate, p0, p1, scratch.data(),
                      row_sums != nullptr && p0 == 0 ? row_sums + r0 : nullptr);
    };
    // Split whichever of A's 64-row blocks and B's tile-wide panel groups shares out more evenly (the
    // busiest thread's share of the whole; rows on a tie).
    const int64_t blocks = (m + x::kTallRows - 1) / x::kTallRows, groups = (panels + group - 1) / group;
    const int64_t threads = team_ ? omp_get_num_threads() : at::get_num_threads();
    const auto busiest = [&](int64_t units) {
      return static_cast<double>((units + threads - 1) / threads) / static_cast<double>(units);
    };
    if (busiest(blocks) <= busiest(groups)) {
      share(blocks, 1, [&](int64_t begin, int64_t end) {
        run_part(begin * x::kTallRows, std::min(m, end * x::kTallRows), 0, panels);
      });
    } else {
      share(groups, 1, [&](int64_t begin, int64_t end) { run_part(0, m, begin * group, std::min(panels, end * group)); });
    }
  }

  // Weights packed for packed_gemm, once per op call and matrix (the steps multiply by the same weights
  // T times; each panel is then one contiguous stream). The slots are published
  // with an atomic count, so that a team's threads look them up without a lock; a miss happens in
  // every thread of a team at once (they run the same calls), and is filled between two barriers.
  struct Packed {
    const void* source;
    int64_t k, n, ld;
    bool transposed, bf16;
    at::Tensor data;
    // bf16: per panel, whether its weights hold an infinity or NaN (then products take A as one term
    // there: a second term's product with an infinite weight is NaN, or an infinity of the other sign,
    // where torch.nn's one-term product is the infinity).
    std::vector<uint8_t> nonfinite;
  };
  static constexpr int kPackedSlots = 8;
  Packed packed_[kPackedSlots];
  std::atomic<int> packed_count_{0};

  // op(B) (k, n) packed: B = b (k, n) with row stride ld, or B = W^T with W = b (n, k) when transposed.
  // With bf16 (T = float only), the weight is rounded to bfloat16 (or taken as it is, a narrow weight)
  // and packed for bf16::gemm instead; the result then points at bfloat16 bits, and `nonfinite` (if
  // given) at the per-panel flags of Packed::nonfinite.
  template <typename T>
  const void* packed(const T* b, int64_t k, int64_t n, int64_t ld, bool transposed, bool bf16 = false,
                     const uint8_t** nonfinite = nullptr) {
    const int count = packed_count_.load(std::memory_order_acquire);
    for (int i = 0; i < count; ++i) {
      const Packed& p = packed_[i];
      if (p.source == b && p.k == k && p.n == n && p.ld == ld && p.transposed == transposed && p.bf16 == bf16) {
        if (nonfinite != nullptr) *nonfinite = p.nonfinite.data();
        return p.data.data_ptr();
      }
    }
    if (team_) barrier_.wait();
    if (!team_ || omp_get_thread_num() == 0) {
      try {
        TORCH_CHECK(count < kPackedSlots, "lstmfast: internal error: too many packed weights");
        packed_[count] = {b, k, n, ld, transposed, bf16,
                          bf16 ? workspace({cpu::bf16::packed_size(k, n)}, at::kBFloat16)
                               : workspace({cpu::own::packed_size<T>(k, n)}, c10::CppTypeToScalarType<T>::value)};
        if (bf16) packed_[count].nonfinite.assign(cpu::bf16::panels_of(n), 0);
      } catch (...) {
        team_error_ = std::current_exception();
      }
    }
    if (team_) barrier_.wait();
    if (team_error_) {
      if (team_) throw TeamAbort{};
      std::rethrow_exception(std::exchange(team_error_, nullptr));
    }
    void* out = packed_[count].data.data_ptr();
    if constexpr (std::is_same_v<T, float>) {
      if (bf16) {
        uint8_t* flags = packed_[count].nonfinite.data();
        const uint16_t* narrow = narrow_source(b);
        share(cpu::bf16::panels_of(n), 4, [&](int64_t begin, int64_t end) {
          auto* to = static_cast<uint16_t*>(out);
          if (narrow != nullptr) cpu::bf16::pack_b(narrow, k, n, ld, transposed, to, begin, end, flags + begin);
          else cpu::bf16::pack_b(b, k, n, ld, transposed, to, begin, end, flags + begin);
        });
        if (nonfinite != nullptr) *nonfinite = flags;
        packed_count_.store(count + 1, std::memory_order_release);
        return out;
      }
    }
    const uint16_t* half = half_source(b);
    share(cpu::own::panels_of<T>(n), 16, [&](int64_t begin, int64_t end) {
      if (half != nullptr) cpu::own::pack_b_half(half, k, n, ld, transposed, static_cast<float*>(out), begin, end);
      else cpu::own::pack_b<T>(cpu::wide(narrow_, b), k, n, ld, transposed, static_cast<T*>(out), begin, end);
    });
    packed_count_.store(count + 1, std::memory_order_release);
    return out;
  }

  // Transposed copies of weight matrices for blocked_brgemm (B as (k, n) rows), once per op call.
  struct Transposed {
    const void* source;
    int64_t rows, cols, ld;
    at::Tensor copy;
  };
  std::vector<Transposed> transposed_;

  // B given as op(B) = B^T with B (n, k) of row stride ld: its (k, n) contiguous transpose.
  const float* transposed(const float* b, int64_t n, int64_t k, int64_t ld) {
    for (const auto& t : transposed_) {
      if (t.source == b && t.rows == n && t.cols == k && t.ld == ld) return t.copy.data_ptr<float>();
    }
    at::Tensor view = at::from_blob(const_cast<float*>(b), {n, k}, {ld, 1}, at::kFloat);
    transposed_.push_back({b, n, k, ld, view.t().contiguous()});
    return transposed_.back().copy.data_ptr<float>();
  }

  // A product's weight as the micro-kernels read it, for a product of m rows (a step's, or a few
  // steps' input projection) with `uses` products by it in this call:
  //  - multiplying at most one tile's rows in all (uses * m <= 8: a decoder's token-by-token calls, a
  //    short sequence of a few rows): in place, a transposed one (W^T) transposed in registers at
  //    every use. Packing it costs a read and a write of the weight first. GRU inference, 2 threads,
  //    packed -> in place: H = 1024, B = 1: T=1 1.15 -> 0.65 ms, T=2 1.37 -> 0.89, T=8 2.89 -> 2.70;
  //    B = 4, T=2: 1.50 -> 1.16. Past 8 rows in place loses: B = 1 T=16 5.1 -> 5.2 ms, B = 4 T=8
  //    3.6 -> 3.9, H = 512 B = 8 T=8 0.96 -> 1.22;
  //  - a transposed weight (the forward's W^T) otherwise packed once per call;
  //  - a row-major one (the backward's W) in place up to 1 MB, which is as fast and saves a copy of
  //    it, and packed above (at H = 1024 a training step is 5-10% faster: in place, each step of the
  //    depth loop reads a new page).
  static bool read_in_place(int64_t m, int64_t uses) { return uses * m <= cpu::own::kMaxRows; }
  // A float16 call's narrow weight is always packed (and streamed where streams_weight says so, before).
  template <typename T>
  cpu::own::MatrixB<T> weight_matrix(const T* b, int64_t m, int64_t k, int64_t n, int64_t ldb, bool trans_b,
                                     int64_t uses) {
    if (half_source(b) != nullptr) {
      return cpu::own::packed_matrix(static_cast<const T*>(packed(b, k, n, ldb, trans_b)), k);
    }
    if (read_in_place(m, uses)) {
      return trans_b ? cpu::own::transposed_matrix(cpu::wide(narrow_, b), ldb)
                     : cpu::own::row_major_matrix(cpu::wide(narrow_, b), ldb);
    }
    if (!trans_b && k * n * static_cast<int64_t>(sizeof(T)) <= (int64_t(1) << 20)) {
      return cpu::own::row_major_matrix(cpu::wide(narrow_, b), ldb);
    }
    return cpu::own::packed_matrix(static_cast<const T*>(packed(b, k, n, ldb, trans_b)), k);
  }

  // One time step's product (row b of C depends only on row b of A): in a row team, this thread's rows
  // against the whole (packed) weight, without a barrier; otherwise gemm.
  template <typename T>
  void step_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const T* a,
                 int64_t lda, const T* b, int64_t ldb, double beta, T* c, int64_t ldc) {
    if (!row_team_ || trans_a || alpha != 1.0 || (beta != 0.0 && beta != 1.0) || k == 0 ||
        (bf16_ && engine_ == cpu::Bf16Engine::kFloat32)) {
      product(true, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      return;
    }
    if constexpr (std::is_same_v<T, float>) {
      if (bf16_) {
        const uint8_t* nonfinite = nullptr;
        const auto* weights = static_cast<const uint16_t*>(packed(b, k, n, ldb, trans_b, true, &nonfinite));
        const auto [begin, end] = own_rows(m);
        if (begin < end) {
          bf16_rows(end - begin, n, k, a + begin * lda, lda, weights, c + begin * ldc, ldc, beta == 1.0, 0,
                    cpu::bf16::panels_of(n), split_operand(true, trans_b) ? nonfinite : nullptr);
        }
        return;
      }
    }
    const cpu::own::MatrixB<T> weights = weight_matrix(b, m, k, n, ldb, trans_b, steps_);
    const auto [begin, end] = own_rows(m);
    cpu::own::gemm<T>(n, k, {a, lda, 1}, weights, c, ldc, beta == 1.0, begin, end, 0, cpu::own::panels_of<T>(n));
  }

  template <typename T>
  void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const T* a,
            int64_t lda, const T* b, int64_t ldb, double beta, T* c, int64_t ldc) {
    product(false, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }

  // gemm, for a time step's product when `step` (step_gemm's, split between threads by panels).
  template <typename T>
  void product(bool step, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const T* a,
               int64_t lda, const T* b, int64_t ldb, double beta, T* c, int64_t ldc) {
    if (m == 0 || n == 0) return;
    // In a row team the other threads may still be on earlier steps, reading what this writes.
    if (row_team_) barrier_.wait();
    if constexpr (std::is_same_v<T, float>) {
      if (bf16_ && !trans_a && alpha == 1.0 && (beta == 0.0 || beta == 1.0) && k > 0) {
        bf16_gemm(m, n, k, a, lda, b, ldb, trans_b, beta == 1.0, c, ldc, split_operand(step, trans_b),
                  step ? steps_ : 1);
        return;
      }
    }
    wide_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, step ? steps_ : 1);
  }

  // ---- bfloat16 products (a bfloat16 call; float32 buffers everywhere else).

  // Up to kBf16Block rows of A rounded to bfloat16 rows of padded_depth(k) in this thread's scratch:
  // `low` holds the second terms when split (else nullptr).
  static constexpr int64_t kBf16Block = 64;
  struct RoundedBlock {
    const uint16_t *high, *low;
  };
  static RoundedBlock round_block(const float* a, int64_t lda, int64_t rows, int64_t k, bool split) {
    thread_local cpu::AlignedVector<uint16_t> scratch;
    const int64_t kp = cpu::bf16::padded_depth(k);
    if (static_cast<int64_t>(scratch.size()) < 2 * kBf16Block * kp) scratch.resize(2 * kBf16Block * kp);
    uint16_t *high = scratch.data(), *low = high + kBf16Block * kp;
    if (split) {
      cpu::bf16::round_rows_split(a, lda, rows, k, high, low);
      return {high, low};
    }
    cpu::bf16::round_rows(a, lda, rows, k, high);
    return {high, nullptr};
  }
  // C (+)= the block times B over panels [panel_begin, panel_end), on the engine's tiles, with the low
  // terms' products too (when the block has them) on the panels whose `nonfinite` flag (B's, indexed
  // from its panel 0) is clear. Each element's sum is in the same order however the panels are grouped.
  static void block_product(const RoundedBlock& block, int64_t rows, int64_t n, int64_t k, const uint16_t* b,
                            float* c, int64_t ldc, bool accumulate, int64_t panel_begin, int64_t panel_end,
                            const uint8_t* nonfinite) {
    auto* product = cpu::bf16_engine() == cpu::Bf16Engine::kAmx ? &cpu::bf16::amx_gemm : &cpu::bf16::gemm;
    for (int64_t p = panel_begin; p < panel_end;) {
      // A run of panels that take A the same way.
      const bool one_term = block.low == nullptr || nonfinite[p];
      int64_t q = p + 1;
      while (q < panel_end && (block.low == nullptr || nonfinite[q]) == one_term) ++q;
      product(n, k, block.high, one_term ? nullptr : block.low, b, c, ldc, accumulate, rows, p, q);
      p = q;
    }
  }

  // Rows [0, rows) x panels [panel_begin, panel_end) of C = A B (+ C when accumulate) with B packed by
  // packed(..., bf16 = true): A's rows rounded to bfloat16 here, 64 at a time, into this thread's scratch.
  // `split`: nullptr for a product that takes A as one term; for one that takes it as two (two products:
  // split_operand), B's per-panel flags (Packed::nonfinite) of the panels that take one all the same.
  static void bf16_rows(int64_t rows, int64_t n, int64_t k, const float* a, int64_t lda, const uint16_t* b,
                        float* c, int64_t ldc, bool accumulate, int64_t panel_begin, int64_t panel_end,
                        const uint8_t* split = nullptr) {
    for (int64_t r = 0; r < rows; r += kBf16Block) {
      const int64_t count = std::min(kBf16Block, rows - r);
      const RoundedBlock block = round_block(a + r * lda, lda, count, k, split != nullptr);
      block_product(block, count, n, k, b, c + r * ldc, ldc, accumulate, panel_begin, panel_end, split);
    }
  }

  // C(m, n) (+)= A(m, k) op(B) with operands rounded to bfloat16 (A to two terms when split). The weight
  // op(B) is rounded and packed once per call. The engine float32 instead rounds A the same way into a
  // float32 scratch copy and multiplies it with the float32 GEMM by the weight as it is: a weight of a
  // bfloat16 call holds bfloat16 values already (widened at entry).
  void bf16_gemm(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                 bool trans_b, bool accumulate, float* c, int64_t ldc, bool split, int64_t uses) {
    if (engine_ == cpu::Bf16Engine::kFloat32) {
      thread_local cpu::AlignedVector<float> rounded;
      if (static_cast<int64_t>(rounded.size()) < m * k) rounded.resize(m * k);
      for (int64_t r = 0; r < m; ++r) {
        for (int64_t kk = 0; kk < k; ++kk) {
          const float x = a[r * lda + kk], high = static_cast<float>(c10::BFloat16(x));
          rounded[r * k + kk] = split && !std::isinf(high) ? high + static_cast<float>(c10::BFloat16(x - high)) : high;
        }
      }
      wide_gemm<float>(false, trans_b, m, n, k, 1.0, rounded.data(), k, b, ldb, accumulate ? 1.0 : 0.0, c, ldc,
                       uses);
      return;
    }
    if (streams_weight(m, uses)) {
      bf16_streamed(m, n, k, a, lda, b, ldb, trans_b, accumulate, c, ldc, split);
      return;
    }
    const uint8_t* nonfinite = nullptr;
    const auto* weights = static_cast<const uint16_t*>(packed(b, k, n, ldb, trans_b, true, &nonfinite));
    bf16_split(m, n, k, a, lda, weights, c, ldc, accumulate, nullptr, split ? nonfinite : nullptr);
  }

  // Whether a bfloat16 product, or a float16 call's product by a narrow weight, packs its weight a few
  // panels at a time and uses them at once (streamed) rather than packing it whole into memory first:
  // where this call multiplies the weight at most twice (`uses`), by at most one rounding block of rows.
  // Packing from bfloat16 or float16 bits costs about what reading the packed copy back does, so a third
  // use pays for it. GRU H = 1024 (H = 512 where said) inference, 2 threads, packed -> streamed (ms):
  //  - bfloat16: T=1 B=8 1.06 -> 0.70, B=16 1.15 -> 0.87, B=32 1.33 -> 1.09, B=64 1.84 -> 1.63; T=2 B=1
  //    1.21 -> 0.97, B=16 1.32 -> 1.24, H=512 B=4 0.38 -> 0.31; but T=3 B=8 1.37 -> 1.39, T=4 B=1 1.42
  //    -> 1.50, T=8 B=1 1.83 -> 2.39;
  //  - float16 (whose weights the float32 kernels never read in place): T=1 B=1 1.57 -> 0.76, B=8 1.65
  //    -> 0.95, B=64 3.50 -> 2.87; T=2 B=1 1.84 -> 1.16, B=16 2.54 -> 2.14; 3 or 4 uses within 3%; but
  //    T=8 B=1 2.94 -> 3.32, H=512 T=8 B=8 0.98 -> 1.32.
  static bool streams_weight(int64_t m, int64_t uses) { return uses <= 2 && m <= kBf16Block; }

  // bf16_gemm's product where streams_weight says so (streamed): A rounded once per thread.
  void bf16_streamed(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                     bool trans_b, bool accumulate, float* c, int64_t ldc, bool split) {
    namespace x = cpu::bf16;
    const uint16_t* narrow = narrow_source(b);
    streamed<uint16_t>(x::panels_of(n), x::panel_stride(k), x::kPanel, trans_b, [&] {
      const RoundedBlock rows = round_block(a, lda, m, k, split);  // (into this thread's scratch)
      return [&, rows](int64_t count, int64_t j0, uint16_t* panels) {
        uint8_t nonfinite[kStreamedPanels];
        const int64_t from = trans_b ? j0 * ldb : j0;
        if (narrow != nullptr) x::pack_b(narrow + from, k, n - j0, ldb, trans_b, panels, 0, count, nonfinite);
        else x::pack_b(b + from, k, n - j0, ldb, trans_b, panels, 0, count, nonfinite);
        block_product(rows, m, n - j0, k, panels, c + j0, ldc, accumulate, 0, count, nonfinite);
      };
    });
  }

  // C(m, n) (+)= A(m, k) op(B) with op(B) a float16 call's narrow weight (half: its float16 bits; W^T
  // when trans_b), streamed, widened as it is packed.
  void half_streamed(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const uint16_t* half, int64_t ldb,
                     bool trans_b, bool accumulate, float* c, int64_t ldc) {
    namespace x = cpu::own;
    streamed<float>(x::panels_of<float>(n), k * x::kPanel<float>, x::kPanel<float>, trans_b, [&] {
      return [&](int64_t count, int64_t j0, float* panels) {
        x::pack_b_half(half + (trans_b ? j0 * ldb : j0), k, n - j0, ldb, trans_b, panels, 0, count);
        x::gemm<float>(n - j0, k, {a, lda, 1}, x::packed_matrix<float>(panels, k), c + j0, ldc, accumulate, 0, m, 0,
                       count);
      };
    });
  }

  // A product of few rows by a weight the call multiplies at most twice (streams_weight),
  // packed a few panels at a time into each thread's scratch and used at once instead of packed whole
  // into memory first and read back: the same packed panels, so the same bits. use(count, j0, panels):
  // pack op(B)'s `count` panels from column j0 into `panels` and multiply them, made by start() once per
  // thread. A row-major B goes at least four panels at a time (its packers read four panels of a row at
  // once).
  template <typename Elem, typename Start>
  void streamed(int64_t panels, int64_t panel_elems, int64_t width, bool trans_b, const Start& start) {
    const int64_t group = std::clamp<int64_t>(kStreamedBytes / (panel_elems * static_cast<int64_t>(sizeof(Elem))),
                                              trans_b ? 1 : 4, kStreamedPanels);
    share((panels + group - 1) / group, 1, [&](int64_t begin, int64_t end) {
      thread_local cpu::AlignedVector<Elem> scratch;
      if (static_cast<int64_t>(scratch.size()) < group * panel_elems) scratch.resize(group * panel_elems);
      const auto use = start();
      for (int64_t g = begin; g < end; ++g) {
        const int64_t p0 = g * group;
        use(std::min(group, panels - p0), p0 * width, scratch.data());
      }
    });
  }
  // streamed's scratch: up to this many panels, about this many bytes.
  static constexpr int64_t kStreamedPanels = 8, kStreamedBytes = int64_t(128) << 10;

  // C(m, n) (+)= A B split between threads in units of (64 rows) x (a group of panels), each unit's
  // work at least about 64k multiply-adds where there is that much, except that in a team (whose
  // threads meet at a barrier after the product anyway) with fewer blocks than threads, each block's
  // panels are cut into even groups, one thread's each (at B = 1 a single group left one of two
  // threads idle: RNN T=128 B=1 H=256 inference 1.34x faster without that). A thread rounds
  // each 64-row block of A once for the run of its units on that block (units go block by block),
  // however many panel groups the block is cut into. With `rounded` (A already rounded to bfloat16
  // rows of padded_depth(k)), a is not read. `split` as for bf16_rows.
  void bf16_split(int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const uint16_t* b, float* c,
                  int64_t ldc, bool accumulate, const uint16_t* rounded = nullptr, const uint8_t* split = nullptr) {
    const int64_t panels = cpu::bf16::panels_of(n), blocks = (m + kBf16Block - 1) / kBf16Block;
    const int64_t block_rows = std::min(kBf16Block, m);
    int64_t group = std::clamp<int64_t>((int64_t(1) << 16) / (block_rows * cpu::bf16::kPanel * k),
                                        blocks > 1 ? 8 : 3, 24);
    if (team_ && blocks < omp_get_num_threads()) {
      const int64_t per_block = (omp_get_num_threads() + blocks - 1) / blocks;  // groups for even shares
      group = (panels + per_block - 1) / per_block;
    }
    const int64_t groups = (panels + group - 1) / group;
    const int64_t unit_work = block_rows * std::min(panels, group) * cpu::bf16::kPanel * k;
    const int64_t kp = cpu::bf16::padded_depth(k);
    share(blocks * groups, std::max<int64_t>(1, (int64_t(1) << 17) / unit_work), [&](int64_t begin, int64_t end) {
      for (int64_t u = begin; u < end;) {
        // Units [u, last) are this thread's on one block: panels [p0, p1).
        const int64_t block = u / groups, last = std::min(end, (block + 1) * groups);
        const int64_t r0 = block * kBf16Block, rows = std::min(kBf16Block, m - r0);
        const int64_t p0 = (u % groups) * group, p1 = std::min(panels, ((last - 1) % groups + 1) * group);
        const RoundedBlock rows_of_a = rounded != nullptr
                                           ? RoundedBlock{rounded + r0 * kp, nullptr}
                                           : round_block(a + r0 * lda, lda, rows, k, split != nullptr);
        block_product(rows_of_a, rows, n, k, b, c + r0 * ldc, ldc, accumulate, p0, p1, split);
        u = last;
      }
    });
  }

  // The products of float32 and float64 calls. `uses`: how many products by b this call makes
  // (weight_matrix), 1 for an input projection (a longer sequence's last chunk of a few rows then reads
  // W_ih in place though it is packed: same bits).
  template <typename T>
  void wide_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const T* a,
                 int64_t lda, const T* b, int64_t ldb, double beta, T* c, int64_t ldc, int64_t uses) {
    const bool plain = !trans_a && alpha == 1.0 && (beta == 0.0 || beta == 1.0) && k > 0;
    if constexpr (std::is_same_v<T, float>) {
      if (const uint16_t* half = half_source(b); half != nullptr && plain && streams_weight(m, uses)) {
        half_streamed(m, n, k, a, lda, half, ldb, trans_b, beta == 1.0, c, ldc);
        return;
      }
    }
    if (plain && cpu::packed_gemm_enabled() && m > kStepRows) {
      // A product of many rows: the input projection x W_ih^T. Its weight is packed once per op call
      // (an inference call projects a few steps at a time, and each thread of a row split would
      // otherwise pack all of it for every chunk); any other B is packed block by block as it goes.
      const T* packed_b = trans_b || half_source(b) != nullptr ? static_cast<const T*>(packed(b, k, n, ldb, trans_b))
                                                               : nullptr;
      tall_gemm<T>(m, n, k, {a, lda, 1}, packed_b != nullptr ? b : cpu::wide(narrow_, b), ldb, trans_b, c, ldc,
                   beta == 1.0, packed_b);
      return;
    }
    if (plain && cpu::packed_gemm_enabled()) {
      packed_gemm<T>(m, n, k, {a, lda, 1}, weight_matrix(b, m, k, n, ldb, trans_b, uses), beta == 1.0, c, ldc);
      return;
    }
    cpu::wide(narrow_, b);  // (the GEMMs below read b as float32)
    if constexpr (std::is_same_v<T, float>) {
      if (plain) {
        const float* b_rows = trans_b ? transposed(b, n, k, ldb) : b;
        blocked_brgemm(m, n, k, a, lda, b_rows, trans_b ? n : ldb, beta == 1.0, c, ldc);
        return;
      }
    }
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

  // G's column sums (a bias gradient) for G (N, X), in own::column_sums' fixed order, threads
  // splitting the columns: the same bits whatever the thread count, and whether they come from here or
  // from a weight gradient's product (mm with row_sums).
  static at::Tensor column_sums(const at::Tensor& grad) {
    const at::Tensor g = grad.stride(1) == 1 ? grad : grad.contiguous();
    at::Tensor sums = at::empty({g.size(1)}, g.options());
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "lstmfast_column_sums", [&] {
      const int64_t rows = g.size(0), ld = g.stride(0);
      const scalar_t* data = g.data_ptr<scalar_t>();
      scalar_t* out = sums.data_ptr<scalar_t>();
      at::parallel_for(0, g.size(1), 64, [&](int64_t begin, int64_t end) {
        cpu::own::column_sums<scalar_t>(data, rows, ld, out, begin, end);
      });
    });
    return sums;
  }

  // a (M, K) @ b (K, N) as a new tensor (whole-sequence products, outside any team). With lstmfast's own
  // GEMM: A is read through its strides (a weight gradient G^T X reads G in place) and B's rows in
  // place, both copied block by block into contiguous tiles (tall_gemm). Else float32 goes through
  // blocked_brgemm, where a weight gradient a = g^T (g an (N, X) row-major
  // sequence buffer) is computed as (b^T g)^T, transposing the narrower b instead of g.
  // With row_sums (zeros), also row_sums += a.sum(1) in column_sums' order: from the product's own pass
  // over a when a is a weight gradient's G^T (tall_product), else from column_sums.
  static at::Tensor mm(const at::Tensor& a, const at::Tensor& b, at::Tensor* row_sums = nullptr) {
    if (row_sums != nullptr && (a.numel() == 0 || b.numel() == 0 || cpu::bf16_products ||
                                !cpu::packed_gemm_enabled() || a.stride(0) != 1 || a.stride(1) == 1)) {
      row_sums->add_(column_sums(a.t()));
      row_sums = nullptr;
    }
    if (a.numel() == 0 || b.numel() == 0) return at::mm(a, b);
    if (cpu::bf16_products) {
      if (cpu::bf16_engine() == cpu::Bf16Engine::kFloat32) return wide_mm(bf16_values(a), bf16_values(b));
      at::Tensor c = result({a.size(0), b.size(1)}, a.options());
      bf16_product(c, a, b, false);
      return c;
    }
    return wide_mm(a, b, row_sums);
  }

  // A float32 copy of t rounded to bfloat16 values.
  static at::Tensor bf16_values(const at::Tensor& t) {
    cpu::wide(cpu::narrow_weights, t.data_ptr<float>());
    return t.to(at::kBFloat16).to(at::kFloat);
  }

  // c (contiguous) = a @ b, or c += a @ b when accumulate, through bf16::gemm: a copied to contiguous rows
  // when it is a transposed view (a weight gradient's G^T), b packed here (a sequence buffer, used once,
  // or W_ih for the input gradient: a narrow weight is packed from its bfloat16 bits), or, for a few
  // rows of a (streams_weight: a short call's input gradient dG W_ih), streamed (bf16_streamed).
  static void bf16_product(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
    CpuBackend dev(a);
    if (streams_weight(a.size(0), 1) && a.stride(1) == 1 && b.stride(1) == 1) {
      dev.bf16_streamed(a.size(0), b.size(1), a.size(1), a.data_ptr<float>(), a.stride(0), b.data_ptr<float>(),
                        b.stride(0), false, accumulate, c.data_ptr<float>(), c.size(1), false);
      return;
    }
    const at::Tensor bc = b.stride(1) == 1 ? b : b.contiguous();
    const bool columns = a.stride(1) != 1 && a.stride(0) == 1;
    const at::Tensor ac = a.stride(1) == 1 || columns ? a : a.contiguous();
    const int64_t m = a.size(0), k = a.size(1), n = b.size(1), kp = cpu::bf16::padded_depth(k);
    const auto options = a.options().dtype(at::kBFloat16);
    const at::Tensor packed = workspace({cpu::bf16::packed_size(k, n)}, options);
    const at::Tensor rounded = workspace({m * kp}, options);
    auto* b_out = reinterpret_cast<uint16_t*>(packed.data_ptr());
    auto* a_out = reinterpret_cast<uint16_t*>(rounded.data_ptr());
    const uint16_t* narrow = dev.narrow_source(bc.data_ptr<float>());
    at::parallel_for(0, cpu::bf16::panels_of(n), 4, [&](int64_t begin, int64_t end) {
      if (narrow != nullptr) cpu::bf16::pack_b(narrow, k, n, bc.stride(0), false, b_out, begin, end);
      else cpu::bf16::pack_b(bc.data_ptr<float>(), k, n, bc.stride(0), false, b_out, begin, end);
    });
    at::parallel_for(0, (m + 15) / 16, 4, [&](int64_t begin, int64_t end) {
      const int64_t r0 = begin * 16, rows = std::min(m, end * 16) - r0;
      if (columns) cpu::bf16::round_columns(ac.data_ptr<float>() + r0, ac.stride(1), rows, k, a_out + r0 * kp);
      else cpu::bf16::round_rows(ac.data_ptr<float>() + r0 * ac.stride(0), ac.stride(0), rows, k, a_out + r0 * kp);
    });
    dev.bf16_split(m, n, k, nullptr, 0, b_out, c.data_ptr<float>(), c.size(1), accumulate, a_out);
  }

  static at::Tensor wide_mm(const at::Tensor& a, const at::Tensor& b, at::Tensor* row_sums = nullptr) {
    if (cpu::packed_gemm_enabled()) {
      at::Tensor c = result({a.size(0), b.size(1)}, a.options());
      tall_product(c, a, b, false, row_sums);
      return c;
    }
    TORCH_INTERNAL_ASSERT(row_sums == nullptr);
    if (a.scalar_type() != at::kFloat) return at::mm(a, b);
    if (!a.is_contiguous() && a.t().is_contiguous() && b.is_contiguous()) {
      return row_major_mm(b.t(), a.t()).t().contiguous();
    }
    return row_major_mm(a, b);
  }

  // c += a @ b (whole-sequence products, outside any team).
  static void addmm_(at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
    if (a.numel() == 0 || b.numel() == 0) return;
    if (cpu::bf16_products) {
      if (cpu::bf16_engine() != cpu::Bf16Engine::kFloat32 && c.is_contiguous()) {
        bf16_product(c, a, b, true);
      } else {  // (the float32 GEMM, on operands rounded to bfloat16 values)
        wide_addmm_(c, bf16_values(a), bf16_values(b));
      }
      return;
    }
    wide_addmm_(c, a, b);
  }

  static void wide_addmm_(at::Tensor& c, const at::Tensor& a, const at::Tensor& b) {
    if (!cpu::packed_gemm_enabled() || !c.is_contiguous()) {
      c.addmm_(a, b);
      return;
    }
    tall_product(c, a, b, true);
  }

  // c (contiguous) = a @ b, or c += a @ b when accumulate, through tall_gemm: a read through its
  // strides, b's rows in place; with row_sums (contiguous, a's dtype; a a transposed row-major G),
  // row_sums += a.sum(1) from the same pass (tall_gemm).
  static void tall_product(at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate,
                           at::Tensor* row_sums = nullptr) {
    AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "lstmfast_tall_product", [&] {
      const at::Tensor bc = b.stride(1) == 1 ? b : b.contiguous();
      CpuBackend dev(a);
      const int64_t m = a.size(0), n = b.size(1), k = a.size(1);
      const uint16_t* half = dev.half_source(bc.data_ptr<scalar_t>());
      if constexpr (std::is_same_v<scalar_t, float>) {
        if (half != nullptr && streams_weight(m, 1) && a.stride(1) == 1 && row_sums == nullptr) {
          // A float16 call's short input gradient, dG W_ih: W_ih streamed from its float16 bits.
          dev.half_streamed(m, n, k, a.data_ptr<float>(), a.stride(0), half, bc.stride(0), false, accumulate,
                            c.data_ptr<float>(), c.size(1));
          return;
        }
      }
      if (read_in_place(m, 1) && a.stride(1) == 1 && row_sums == nullptr) {
        // A short call's input gradient, dG W_ih: b read in place once (weight_matrix), not copied
        // block by block for so few rows (same sums, same order).
        dev.packed_gemm<scalar_t>(m, n, k, {a.data_ptr<scalar_t>(), a.stride(0), 1},
                                  dev.weight_matrix(bc.data_ptr<scalar_t>(), m, k, n, bc.stride(0), false, 1),
                                  accumulate, c.data_ptr<scalar_t>(), c.size(1));
        return;
      }
      // (A float16 call's narrow W_ih packed whole: gemm_tall cannot read float16 rows in place.)
      const scalar_t* packed_b = half != nullptr ? static_cast<const scalar_t*>(dev.packed(
                                                       bc.data_ptr<scalar_t>(), k, n, bc.stride(0), false))
                                                 : nullptr;
      dev.tall_gemm<scalar_t>(m, n, k, {a.data_ptr<scalar_t>(), a.stride(0), a.stride(1)},
                              bc.data_ptr<scalar_t>(), bc.stride(0), false, c.data_ptr<scalar_t>(), c.size(1),
                              accumulate, packed_b, row_sums != nullptr ? row_sums->data_ptr<scalar_t>() : nullptr);
    });
  }

  static at::Tensor row_major_mm(const at::Tensor& a, const at::Tensor& b) {
    const at::Tensor ac = a.contiguous(), bc = b.contiguous();
    const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
    at::Tensor c = result({M, N}, a.options());
    blocked_brgemm(M, N, K, ac.data_ptr<float>(), K, bc.data_ptr<float>(), N, false, c.data_ptr<float>(), N);
    return c;
  }

  // ---- Copies and pointwise steps.

  template <typename T>
  void copy_rows(T* dst, const T* src, int64_t rows, int64_t width) {
    for_rows(rows, width, [&](int64_t begin, int64_t end) {
      if (end > begin) std::memcpy(dst + begin * width, src + begin * width, (end - begin) * width * sizeof(T));
    });
  }

  // Runs body(begin, end) over row ranges, each row on one thread: in a row team this thread's rows;
  // outside a team in chunks of at least about 32k elements (below that, waking a second thread costs
  // more than it saves).
  template <typename F>
  void for_rows(int64_t rows, int64_t width, const F& body) {
    if (row_team_) {
      const auto [begin, end] = own_rows(rows);
      if (begin < end) body(begin, end);
      return;
    }
    share(rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(width, 1)), body);
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

  template <typename T>
  void gru_forward(const GruForwardStep<T>& s, int64_t rows) {
    const auto& k = cpu::pointwise_kernels<T>();
    for_rows(rows, 3 * s.hidden_size, [&](int64_t begin, int64_t end) { k.gru_forward(s, begin, end); });
  }

  template <typename T>
  void gru_backward(const GruBackwardStep<T>& s, int64_t rows, T* hidden_norm) {
    const auto& k = cpu::pointwise_kernels<T>();
    for_rows(rows, 3 * s.hidden_size, [&](int64_t begin, int64_t end) {
      k.gru_backward(s, begin, end, hidden_norm);
    });
  }
};

// ---------------------------------------------------------------- float16 / bfloat16 calls

// An op called with float16 or bfloat16 tensors runs the float32 loops: its tensors of that dtype are
// widened to float32 at entry (exactly, into contiguous workspaces, where its float32 results go too:
// cpu::temporary_results), a bfloat16 call's products round their operands to bfloat16
// (bf16_products), and the results are rounded to the call's dtype once at the end. The cell state,
// gate pre-activations, pointwise math and weight-gradient sums stay float32 throughout, and so do the
// activations saved for backward (outputs named gates / cells: rounding the saved forget gate would
// compound over the steps of backward) and the gradient norms (float32 for these dtypes on every
// device). Weight matrices are not widened where lstmfast's own GEMMs multiply them: they are packed
// from their own bits (cpu::NarrowWeight). Written once for every op, from its schema's
// names: an op of the same form (GRU's) gets it by registering through it.
template <const char* Name, auto Op, typename Signature = decltype(Op)>
struct ReducedPrecision;

template <const char* Name, auto Op, typename Result, typename... Args>
struct ReducedPrecision<Name, Op, Result (*)(Args...)> {
  static const c10::FunctionSchema& schema() {
    static const c10::FunctionSchema& s = c10::Dispatcher::singleton().findSchemaOrThrow(Name, "").schema();
    return s;
  }
  // Saved activations: float32 in a reduced-precision call.
  static bool kept_float(const std::string& name) {
    return name == "gates" || name == "cells" || (name.size() > 5 && name.compare(name.size() - 5, 5, "_norm") == 0);
  }
  // The LSTM's cell state may come in float32 (a bfloat16 LSTM given a float32 c_0, which torch.nn's
  // oneDNN path takes): it is float32 inside anyway, and c_n and grad_c0 then stay float32, unrounded.
  static bool float_state(const std::string& name) { return name == "c0" || name == "grad_c_n"; }
  static bool state_result(const std::string& name) { return name == "c_n" || name == "grad_c0"; }
  static bool is_weight(const std::string& name) { return name == "w_ih" || name == "w_hh" || name == "w_hr"; }

  // A narrow weight's stand-in (cpu::NarrowWeight): a float32 tensor shaped like t (contiguous) over
  // address space reserved without access, released with the tensor.
  static at::Tensor reserved(const at::Tensor& t, cpu::NarrowWeights& narrow) {
    TORCH_INTERNAL_ASSERT(narrow.size() < narrow.capacity());
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t bytes = (static_cast<size_t>(t.numel()) * sizeof(float) + page - 1) / page * page;
    void* p = mmap(nullptr, bytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(p != MAP_FAILED, "lstmfast: could not reserve ", bytes, " bytes of address space: ",
                std::strerror(errno));
    narrow.push_back({static_cast<const float*>(p), t.numel(), reinterpret_cast<const uint16_t*>(t.data_ptr())});
    return at::from_blob(p, t.sizes(), [bytes](void* q) { munmap(q, bytes); }, t.options().dtype(at::kFloat));
  }

  static Result call(Args... args) {
    at::ScalarType dtype = at::kFloat;
    bool found = false;
    const auto first = [&](const auto& arg) {
      using A = std::decay_t<decltype(arg)>;
      if constexpr (std::is_same_v<A, at::Tensor>) {
        if (!found) dtype = arg.scalar_type(), found = true;
      }
    };
    (first(args), ...);
    if (dtype != at::kHalf && dtype != at::kBFloat16) return Op(args...);

    const std::string op = [] {
      std::string n = Name;
      return n.replace(n.find("::"), 2, ".");
    }();
    int index = 0;
    bool float_c0 = false;
    // (At most three weights: reserved up front, so that the entries do not move.)
    cpu::NarrowWeights narrow;
    narrow.reserve(3);
    const bool keep_narrow = (dtype == at::kBFloat16 ? cpu::bf16_engine() != cpu::Bf16Engine::kFloat32
                                                     : cpu::packed_gemm_enabled()) &&
                             !cpu::persistent_emulation_requested();
    const auto widen = [&](const auto& arg) {
      using A = std::decay_t<decltype(arg)>;
      const int i = index++;
      const auto one = [&](const at::Tensor& t) {
        if (!t.is_floating_point()) return t;
        const std::string& name = schema().arguments()[i].name();
        if (t.scalar_type() == dtype) {
          if (keep_narrow && is_weight(name) && t.is_contiguous() && t.numel() > 0) return reserved(t, narrow);
          return workspace(t.sizes(), t.options().dtype(at::kFloat)).copy_(t);
        }
        const bool may_be_float = kept_float(name) || float_state(name);
        // (A mismatch is reported in the op's words; saved activations are float32 here.)
        TORCH_CHECK(may_be_float && t.scalar_type() == at::kFloat, op, ": expected ", name,
                    " to have dtype ", str(dtype), " (the dtype of input)", may_be_float ? " or Float" : "",
                    ", but got ", str(t.scalar_type()));
        float_c0 = float_c0 || name == "c0";
        return t;
      };
      if constexpr (std::is_same_v<A, at::Tensor>) {
        return one(arg);
      } else if constexpr (std::is_same_v<A, OptTensor>) {
        return arg.has_value() ? OptTensor(one(*arg)) : OptTensor();
      } else {
        return arg;
      }
    };
    // (Braced: the arguments are widened in order, so `index` counts them.)
    std::tuple<std::decay_t<Args>...> wide{widen(args)...};

    struct Restore {
      bool products = cpu::bf16_products, temporary = cpu::temporary_results;
      cpu::NarrowWeights* weights = cpu::narrow_weights;
      ~Restore() { cpu::bf16_products = products, cpu::temporary_results = temporary, cpu::narrow_weights = weights; }
    } restore;
    cpu::bf16_products = dtype == at::kBFloat16;
    cpu::narrow_weights = &narrow;
    cpu::temporary_results = true;
    Result result = std::apply(Op, wide);

    const auto& returns = schema().returns();
    [&]<size_t... I>(std::index_sequence<I...>) {
      const auto keep = [&](const std::string& name) { return kept_float(name) || (float_c0 && state_result(name)); };
      ((std::get<I>(result) = keep(returns[I].name()) ? std::get<I>(result) : std::get<I>(result).to(dtype)), ...);
    }(std::make_index_sequence<std::tuple_size_v<Result>>{});
    return result;
  }
};

constexpr char kLstmForward[] = "lstmfast::lstm_forward", kLstmBackward[] = "lstmfast::lstm_backward";
constexpr char kRnnForward[] = "lstmfast::rnn_forward", kRnnBackward[] = "lstmfast::rnn_backward";
constexpr char kGruForward[] = "lstmfast::gru_forward", kGruBackward[] = "lstmfast::gru_backward";

}  // namespace

TORCH_LIBRARY_IMPL(lstmfast, CPU, m) {
  m.impl("lstm_forward", &ReducedPrecision<kLstmForward, &lstm_forward<CpuBackend>>::call);
  m.impl("lstm_backward", &ReducedPrecision<kLstmBackward, &lstm_backward<CpuBackend>>::call);
  m.impl("rnn_forward", &ReducedPrecision<kRnnForward, &rnn_forward<CpuBackend>>::call);
  m.impl("rnn_backward", &ReducedPrecision<kRnnBackward, &rnn_backward<CpuBackend>>::call);
  m.impl("gru_forward", &ReducedPrecision<kGruForward, &gru_forward<CpuBackend>>::call);
  m.impl("gru_backward", &ReducedPrecision<kGruBackward, &gru_backward<CpuBackend>>::call);
}

TORCH_LIBRARY_IMPL(lstmfast, CompositeExplicitAutograd, m) {
  m.impl("cpu_isa", &cpu::isa_name);
  m.impl("cpu_gemm_engine", &cpu::gemm_engine);
  m.impl("cpu_cache_bytes", &cpu::cache_bytes);
  m.impl("empty_cpu_cache", &cpu::empty_cache);
  m.impl("cpu_cache_limit", &cpu::cache_limit);
  m.impl("set_cpu_cache_limit", &cpu::set_cache_limit);
}

}  // namespace lstmfast

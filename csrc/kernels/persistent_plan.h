// When the persistent CUDA kernels (cuda/persistent.cu) can run a layer, and with what geometry.
// Plain C++ (no CUDA): the CUDA backend calls it with the device's limits, and the CPU build exposes
// it as the op lstmfast::persistent_plan so that tests without a GPU cover the decision.
//
// Geometry. A cooperative grid of `blocks` blocks of kPersistentThreads threads; block k owns the
// hidden units [k*units, min((k+1)*units, H)) for the whole sequence. Each block keeps in shared memory
// one matrix M (rows x K) of the recurrent weight, in the input's dtype:
//   forward  M = the rows of W_hh of its units, all gates (gate-major: row g*units + u), K = H
//   backward M = the columns of W_hh of its units, transposed (row u, column g*H + j), K = G*H
// so a step's matrix-vector products and its pointwise cell work stay inside the block; blocks
// exchange h_t (forward) or dL/d(pre-activations) (backward) through global memory, one grid-wide
// synchronisation per step. Beside M: a staging buffer of the exchanged rows (float32, B x chunk,
// K read in chunks of `chunk` columns), the per-thread partial sums, the step's products, and float32
// running state (LSTM c_t, or dL/dc_t; GRU's dL/dh_t * z in backward; the forward's latest h_t).
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>

namespace lstmfast::kernels {

constexpr int kPersistentThreads = 256;

// LSTMFAST_CUDA_PERSISTENT: "0" never, "1" whenever the kernels fit, "auto" (the default) when they
// fit and measured faster than the per-step path. Verified on an H200 (benchmarks/results/
// persistent_h200_c2003e8: the CUDA tests on both paths, compute-sanitizer memcheck, racecheck and
// synccheck clean, the benchmark of both paths against cuDNN).
enum class PersistentMode { Off, On, Auto };

// nullptr or "" -> Auto; "0", "1", "auto"; anything else: ok = false.
inline PersistentMode parse_persistent_mode(const char* value, bool* ok) {
  *ok = true;
  if (value == nullptr) return PersistentMode::Auto;
  const std::string v(value);
  if (v.empty() || v == "auto") return PersistentMode::Auto;
  if (v == "0") return PersistentMode::Off;
  if (v == "1") return PersistentMode::On;
  *ok = false;
  return PersistentMode::Off;
}

// "auto" picks the persistent kernels while the rows every block stages from global memory each step
// (batch x depth: h_{t-1}, B x H, forward; dL/da_t, B x G*H, backward) stay within these counts, and
// the batch within the largest one measured. Measured on an H200 (T = 512, float32 and bfloat16,
// benchmarks/results/persistent_h200_c2003e8), each direction against the per-step path:
//   forward  B x H <= 8192 faster (LSTM B = 16, H = 512: 1.18x / 1.39x), 16384 not (B = 16, H = 1024:
//            0.95x / 0.64x; B = 64, H = 256: 0.70x);
//   backward B x G x H <= 32768 faster (RNN B = 64, H = 512: 1.24x; LSTM B = 16, H = 256: 1.8x / 2.2x),
//            65536 not (LSTM B = 16, H = 1024: 0.64x; RNN B = 64, H = 1024: 0.61x).
// The two directions choose separately (a persistent forward pairs with a per-step backward).
constexpr int64_t kPersistentAutoMaxStagedForward = 8192;
constexpr int64_t kPersistentAutoMaxStagedBackward = 32768;
constexpr int64_t kPersistentAutoMaxBatch = 64;

// The cell: its gate count is the number of H-wide blocks of W_hh's rows (4, 3, 1).
enum class PersistentCell { Lstm, Gru, Rnn };

inline int gates_of(PersistentCell cell) {
  return cell == PersistentCell::Lstm ? 4 : cell == PersistentCell::Gru ? 3 : 1;
}

struct PersistentRequest {
  PersistentCell cell;
  bool backward;
  int64_t hidden_size;  // H
  int64_t batch;        // B (batch_sizes[0])
  int64_t steps;        // T
  int element_size;     // bytes of the dtype: 2 (float16, bfloat16), 4 (float32), 8 (float64)
  bool projection;      // proj_size given (not done by these kernels)
  bool norms;           // per-step gradient norms asked (not done by these kernels)
  bool whole_gates;     // the forward's gate workspace has every row (always on CUDA)
};

struct DeviceLimits {
  int sm_count;
  int64_t smem_per_block;  // opt-in maximum of dynamic shared memory per block
  int64_t smem_per_sm;
  bool cooperative;        // cudaDevAttrCooperativeLaunch
};

struct PersistentPlan {
  bool use = false;
  std::string reason;      // why not, or a description of the geometry
  int units = 0;           // hidden units per block
  int blocks = 0;
  int rows = 0;            // rows of M (padded to a multiple of 4)
  int depth = 0;           // K: columns of M
  int ldm = 0;             // row stride of M in elements
  int batch_padded = 0;    // B rounded up to a multiple of 4
  int chunk = 0;           // columns of the exchanged rows staged at once
  int ld_stage = 0;        // row stride of the staging buffer (floats)
  int slices = 0;          // threads sharing one output tile (K split)
  int64_t smem_weights = 0, smem_floats = 0, smem = 0;  // bytes; floats: count after the weights
};

// Shared memory layout of one block, in this order (every part 16-byte aligned):
//   M (rows x ldm, dtype) | partial (slices x Bp x rows) | y (Bp x rows)
//   | state (Bp x units: LSTM, GRU backward) | final h (Bp x units, forward only) | stage (Bp x ld_stage)
inline int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

inline PersistentPlan persistent_geometry(const PersistentRequest& r, const DeviceLimits& d, int units) {
  PersistentPlan p;
  const int64_t G = gates_of(r.cell), H = r.hidden_size;
  p.units = units;
  p.blocks = static_cast<int>((H + units - 1) / units);
  const int64_t rows = r.backward ? units : G * units;
  p.rows = static_cast<int>((rows + 3) / 4 * 4);
  p.depth = static_cast<int>(r.backward ? G * H : H);
  p.batch_padded = static_cast<int>((r.batch + 3) / 4 * 4);
  const int64_t tiles = int64_t(p.rows / 4) * (p.batch_padded / 4);
  if (tiles > kPersistentThreads) {
    p.reason = "the block's output tiles (" + std::to_string(tiles) + ") exceed its threads";
    return p;
  }
  p.slices = static_cast<int>(std::min<int64_t>(kPersistentThreads / tiles, 32));
  // Row strides of an odd number of 4-byte words: rows of M and of the staging buffer then start in
  // different shared-memory banks, so threads reading one column of several rows do not conflict.
  if (r.element_size == 4) {
    p.ldm = p.depth % 2 == 0 ? p.depth + 1 : p.depth;
  } else {
    p.ldm = (p.depth + 1) / 2 * 2;
    if ((p.ldm / 2) % 2 == 0) p.ldm += 2;
  }
  p.smem_weights = align16(int64_t(p.rows) * p.ldm * r.element_size);
  const int64_t Bp = p.batch_padded;
  int64_t floats = align16(4 * int64_t(p.slices) * Bp * p.rows) / 4 + align16(4 * Bp * p.rows) / 4;
  // c_t forward and dL/dc_t backward (LSTM); dL/dh_t * z backward (GRU)
  const bool cell_state = r.cell == PersistentCell::Lstm || (r.cell == PersistentCell::Gru && r.backward);
  const bool final_hidden = !r.backward;     // h_n, written after the last step
  floats += (cell_state ? align16(4 * Bp * units) / 4 : 0) + (final_hidden ? align16(4 * Bp * units) / 4 : 0);
  const int64_t fixed = p.smem_weights + 4 * floats;
  const int64_t room = d.smem_per_block - fixed;
  const int64_t widest = room / (4 * Bp) - 1;  // staging row stride is chunk + 1 at most
  if (widest >= p.depth) {
    p.chunk = p.depth;
  } else {
    p.chunk = static_cast<int>(widest / 32 * 32);
  }
  if (p.chunk < std::min(64, p.depth)) {
    p.reason = "needs " + std::to_string(fixed + 4 * Bp * 65) + " bytes of shared memory per block, the "
               "device allows " + std::to_string(d.smem_per_block);
    p.chunk = 0;
    return p;
  }
  p.ld_stage = p.chunk % 2 == 0 ? p.chunk + 1 : p.chunk;
  p.smem_floats = floats;
  p.smem = fixed + align16(4 * Bp * p.ld_stage);
  p.use = true;
  return p;
}

// Whether the persistent kernels run this layer (plan.use) and how; plan.reason says why not.
// The CUDA backend also asks the occupancy calculator (registers count there) before launching.
inline PersistentPlan plan_persistent(const PersistentRequest& r, const DeviceLimits& d, PersistentMode mode) {
  PersistentPlan no;
  auto refuse = [&](std::string why) {
    no.reason = std::move(why);
    return no;
  };
  if (mode == PersistentMode::Off) return refuse("LSTMFAST_CUDA_PERSISTENT is 0");
  if (r.element_size != 2 && r.element_size != 4) return refuse("only float32, float16 and bfloat16");
  if (r.projection) return refuse("proj_size is not supported by the persistent kernels");
  if (r.norms) return refuse("per-step gradient norms are not supported by the persistent kernels");
  if (!r.whole_gates) return refuse("the gate workspace does not hold every row");
  if (r.steps < 1 || r.batch < 1 || r.hidden_size < 1) return refuse("an empty sequence");
  if (!d.cooperative) return refuse("the device has no cooperative launch");
  if (d.sm_count < 1) return refuse("no multiprocessors reported");
  if (mode == PersistentMode::Auto) {
    if (r.batch > kPersistentAutoMaxBatch)
      return refuse("batch " + std::to_string(r.batch) + " > " + std::to_string(kPersistentAutoMaxBatch) + " (auto)");
    if (r.cell == PersistentCell::Gru)
      return refuse("GRU has not been measured on a GPU yet (auto); LSTMFAST_CUDA_PERSISTENT=1 runs it");
    const int64_t staged = r.batch * r.hidden_size * (r.backward ? gates_of(r.cell) : 1);
    const int64_t most = r.backward ? kPersistentAutoMaxStagedBackward : kPersistentAutoMaxStagedForward;
    if (staged > most)
      return refuse("each step stages " + std::to_string(staged) + " values per block, more than " +
                    std::to_string(most) + " (auto: the per-step path is faster there)");
  }
  // One block per multiprocessor: the fewest units per block that spreads H over them.
  const int units = static_cast<int>((r.hidden_size + d.sm_count - 1) / d.sm_count);
  PersistentPlan p = persistent_geometry(r, d, units);
  if (!p.use) return p;
  const int64_t per_sm = std::min<int64_t>(d.smem_per_sm / (p.smem + 1024), 2048 / kPersistentThreads);
  if (per_sm < 1 || p.blocks > per_sm * d.sm_count)
    return refuse("the grid of " + std::to_string(p.blocks) + " blocks cannot be resident at once");
  p.reason = "persistent: " + std::to_string(p.blocks) + " blocks x " + std::to_string(p.units) +
             " units, " + std::to_string(p.smem) + " bytes of shared memory, chunk " +
             std::to_string(p.chunk) + " of " + std::to_string(p.depth);
  return p;
}

}  // namespace lstmfast::kernels

namespace lstmfast {

// Persistent kernel launches since the module loaded (defined in persistent_plan.cpp): how a
// benchmark or a test learns which path ran (lstmfast.cuda_persistent_launches()).
void count_persistent_launch();
int64_t persistent_launches();

}  // namespace lstmfast

// The persistent kernels' code (described in persistent.cu), written once for two runtimes: CUDA
// (persistent.cu wraps each *_body in a __global__ kernel launched cooperatively) and a host emulator
// (cpu/persistent_emulator.cpp runs every thread of the grid as a host thread, with barriers for
// __syncthreads and the grid sync) that lets the CPU tests run this very code without a GPU.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "../kernels/layer.h"
#include "../kernels/persistent_plan.h"

#if defined(__CUDACC__)
#include <cooperative_groups.h>
#define LSTMFAST_PD __device__ __forceinline__
#define LSTMFAST_UNROLL _Pragma("unroll")
#else
#include <barrier>
#define LSTMFAST_PD inline
#define LSTMFAST_UNROLL
#endif

namespace lstmfast::persistent {

using kernels::kPersistentThreads;
using kernels::PersistentPlan;

#if defined(__CUDACC__)
LSTMFAST_PD int thread_index() { return threadIdx.x; }
LSTMFAST_PD int block_index() { return blockIdx.x; }
LSTMFAST_PD void block_barrier() { __syncthreads(); }
LSTMFAST_PD void grid_barrier() { cooperative_groups::this_grid().sync(); }
LSTMFAST_PD float fma_(float a, float b, float c) { return fmaf(a, b, c); }
// Loads through L2 only (a row another block wrote during this kernel; L1 is not coherent).
LSTMFAST_PD float load_cg(const float* p) { return __ldcg(p); }
LSTMFAST_PD float load_cg(const c10::Half* p) {
  return float(c10::Half(__ldcg(reinterpret_cast<const unsigned short*>(p)), c10::Half::from_bits()));
}
LSTMFAST_PD float load_cg(const c10::BFloat16* p) {
  return float(c10::BFloat16(__ldcg(reinterpret_cast<const unsigned short*>(p)), c10::BFloat16::from_bits()));
}
#else
// The emulator's view of the calling host thread (set by cpu/persistent_emulator.cpp).
struct EmulatedThread {
  int thread, block;
  std::barrier<>* block_barrier;
  std::barrier<>* grid_barrier;
};
extern thread_local EmulatedThread emulated_thread;
inline int thread_index() { return emulated_thread.thread; }
inline int block_index() { return emulated_thread.block; }
inline void block_barrier() { emulated_thread.block_barrier->arrive_and_wait(); }
inline void grid_barrier() { emulated_thread.grid_barrier->arrive_and_wait(); }
inline float fma_(float a, float b, float c) { return std::fma(a, b, c); }
template <typename T>
inline float load_cg(const T* p) { return float(*p); }
#endif

// ---------------------------------------------------------------- device helpers

// The (N, *) row layout on the device: batch_sizes / offsets in device memory, or nullptr when every
// step has `batch` rows (step t then starts at row t * batch).
struct Steps {
  const int64_t* batch_sizes;  // (T) or nullptr
  const int64_t* offsets;      // (T) or nullptr
  int64_t steps, batch;
  bool reverse;

  LSTMFAST_PD int64_t rows(int64_t t) const { return batch_sizes != nullptr ? batch_sizes[t] : batch; }
  LSTMFAST_PD int64_t offset(int64_t t) const { return offsets != nullptr ? offsets[t] : t * batch; }
  LSTMFAST_PD int64_t forward_step(int64_t k) const { return reverse ? steps - 1 - k : k; }
  LSTMFAST_PD int64_t backward_step(int64_t k) const { return reverse ? k : steps - 1 - k; }
  LSTMFAST_PD int64_t prev_step(int64_t t) const { return reverse ? (t + 1 < steps ? t + 1 : -1) : t - 1; }
  // Rows of step t that continue from prev_step(t); rows from there to rows(t) start from the
  // initial state (kernels::Sequence::prev_rows).
  LSTMFAST_PD int64_t prev_rows(int64_t t) const {
    const int64_t p = prev_step(t);
    if (p < 0) return 0;
    const int64_t a = rows(p), b = rows(t);
    return a < b ? a : b;
  }
};

// The plan's numbers the kernels need (all ints: sizes are bounded by shared memory).
struct Geometry {
  int units, rows, depth, ldm, batch_padded, chunk, ld_stage, slices;
};

template <typename T>
struct Smem {
  T* m;            // (rows, ldm) the block's part of the recurrent weight
  float* partial;  // (slices, Bp, rows) per-thread partial sums
  float* y;        // (Bp, rows) the step's products
  float* state;    // (Bp, units) the LSTM's c_t (forward) or dL/dc_t (backward); the GRU backward's dL/dh_t z
  float* final_h;  // (Bp, units) h_t of each row's last step, forward only
  float* stage;    // (Bp, ld_stage) the exchanged rows, one chunk of columns
};

LSTMFAST_PD size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// The same layout, in the same order, as kernels::persistent_geometry counts it.
template <typename T>
LSTMFAST_PD Smem<T> carve(unsigned char* base, const Geometry& g, bool cell_state, bool final_hidden) {
  Smem<T> s;
  const size_t Bp = g.batch_padded;
  size_t at = 0;
  s.m = reinterpret_cast<T*>(base);
  at += align16(size_t(g.rows) * g.ldm * sizeof(T));
  s.partial = reinterpret_cast<float*>(base + at);
  at += align16(4 * size_t(g.slices) * Bp * g.rows);
  s.y = reinterpret_cast<float*>(base + at);
  at += align16(4 * Bp * g.rows);
  s.state = reinterpret_cast<float*>(base + at);
  at += cell_state ? align16(4 * Bp * g.units) : 0;
  s.final_h = reinterpret_cast<float*>(base + at);
  at += final_hidden ? align16(4 * Bp * g.units) : 0;
  s.stage = reinterpret_cast<float*>(base + at);
  return s;
}

// y[b, r] = sum_k M[r, k] * v(b, k) for rows b < limit of y (the others keep their values), with
// v(b, k) = load(b, k) staged into shared memory a chunk of columns at a time (load returns 0 for the
// padding rows). Each thread owns a 4 x 4 tile of (r, b) over one slice of k (k = slice, slice +
// slices, ...); the slices' sums are added in a fixed order (deterministic). Every thread of the block
// calls it; it starts and ends with a block barrier.
template <typename T, typename Load>
LSTMFAST_PD void block_matvec(const Geometry& g, const Smem<T>& s, int64_t limit, const Load& load) {
  const int Bp = g.batch_padded, R = g.rows;
  const int row_tiles = R / 4, tiles = row_tiles * (Bp / 4);
  const int tid = thread_index();
  const bool active = tid < tiles * g.slices;
  const int tile = tid % tiles, slice = tid / tiles;
  const int r0 = (tile % row_tiles) * 4, b0 = (tile / row_tiles) * 4;
  float acc[4][4];
LSTMFAST_UNROLL
  for (int i = 0; i < 4; ++i)
LSTMFAST_UNROLL
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (int k0 = 0; k0 < g.depth; k0 += g.chunk) {
    const int width = g.chunk < g.depth - k0 ? g.chunk : g.depth - k0;
    block_barrier();  // the staging buffer's previous readers (last chunk, last step) are done
    for (int i = tid; i < Bp * width; i += kPersistentThreads) {
      const int b = i / width, k = i - b * width;
      s.stage[b * g.ld_stage + k] = load(b, k0 + k);
    }
    block_barrier();
    if (active) {
      const T* m = s.m + r0 * g.ldm + k0;
      const float* x = s.stage + b0 * g.ld_stage;
      for (int k = slice; k < width; k += g.slices) {
        float w[4], v[4];
LSTMFAST_UNROLL
        for (int i = 0; i < 4; ++i) {
          w[i] = float(m[i * g.ldm + k]);
          v[i] = x[i * g.ld_stage + k];
        }
LSTMFAST_UNROLL
        for (int i = 0; i < 4; ++i)
LSTMFAST_UNROLL
          for (int j = 0; j < 4; ++j) acc[i][j] = fma_(w[i], v[j], acc[i][j]);
      }
    }
  }
  if (active) {
    float* part = s.partial + size_t(slice) * Bp * R;
LSTMFAST_UNROLL
    for (int i = 0; i < 4; ++i)
LSTMFAST_UNROLL
      for (int j = 0; j < 4; ++j) part[(b0 + j) * R + r0 + i] = acc[i][j];
  }
  block_barrier();
  for (int o = tid; o < Bp * R; o += kPersistentThreads) {
    if (o / R >= limit) continue;
    float sum = 0.f;
    for (int q = 0; q < g.slices; ++q) sum += s.partial[size_t(q) * Bp * R + o];
    s.y[o] = sum;
  }
  block_barrier();
}

// v(b, k) of a forward step: h_{t-1}, from the previous step's output rows (rows that continue) or
// h0 (rows that start here), zero for rows not alive.
template <typename T>
struct HiddenRows {
  const T* prev;     // (prev_rows, width) the previous step's output rows (not read when prev_rows is 0)
  const T* initial;  // (B, width) h0
  int64_t prev_rows, rows, width;
  LSTMFAST_PD float operator()(int b, int k) const {
    if (b < prev_rows) return load_cg(prev + b * width + k);
    if (b < rows) return float(initial[b * width + k]);
    return 0.f;
  }
};

// v(b, k) of a backward step: this step's dL/d(pre-activations), written by every block before the sync.
template <typename T>
struct StepRows {
  const T* rows_ptr;  // (rows, width)
  int64_t rows, width;
  LSTMFAST_PD float operator()(int b, int k) const {
    return b < rows ? load_cg(rows_ptr + b * width + k) : 0.f;
  }
};

// M for the forward: row gate*units + u = W_hh row gate*H + u0 + u (zero past this block's units,
// and for the padding rows). W_hh is (gates*H, H).
template <typename T>
LSTMFAST_PD void load_rows(const Geometry& g, T* m, const T* w_hh, int gates, int64_t H, int64_t u0, int here) {
  for (int64_t i = thread_index(); i < int64_t(g.rows) * g.depth; i += kPersistentThreads) {
    const int r = static_cast<int>(i / g.depth), k = static_cast<int>(i % g.depth);
    const int gate = r / g.units, u = r % g.units;
    m[r * g.ldm + k] = gate < gates && u < here ? w_hh[(gate * H + u0 + u) * H + k] : T(0.f);
  }
}

// M for the backward: row u, column c = W_hh[c, u0 + u] (c < gates*H): the columns of my units.
template <typename T>
LSTMFAST_PD void load_columns(const Geometry& g, T* m, const T* w_hh, int64_t H, int64_t u0, int here) {
  for (int64_t i = thread_index(); i < int64_t(g.rows) * g.depth; i += kPersistentThreads) {
    const int c = static_cast<int>(i / g.rows), u = static_cast<int>(i % g.rows);  // u fastest: coalesced
    m[u * g.ldm + c] = u < here ? w_hh[c * H + u0 + u] : T(0.f);
  }
}

// ---------------------------------------------------------------- the recurrences

// The hidden units this block owns: [u0, u0 + count).
struct Units {
  int64_t u0;
  int count;
};

LSTMFAST_PD Units my_units(const Geometry& g, int64_t H) {
  const int64_t u0 = int64_t(block_index()) * g.units;
  return {u0, static_cast<int>(H - u0 < g.units ? H - u0 : g.units)};
}

// f(b, u) for the elements (row b < rows, unit u < count) of this thread: element b * count + u belongs
// to thread (b * count + u) mod kPersistentThreads, the same thread at every step, so what a step keeps
// per element in shared memory (c_t, dL/dc_t, ...) is read back by the thread that wrote it.
template <typename F>
LSTMFAST_PD void for_my_elements(int64_t rows, int count, const F& f) {
  for (int i = thread_index(); i < rows * count; i += kPersistentThreads) {
    const int b = i / count;
    f(b, i - b * count);
  }
}

// A step's rows in the (N, *) layout: rows [r0, r0 + rows); its first prev_rows continue from the step
// before it (rows [prev_r0, prev_r0 + prev_rows) there), the others start from the initial state.
struct StepRowsAt {
  int64_t rows, r0, prev_rows, prev_r0;
};

LSTMFAST_PD StepRowsAt step_rows(const Steps& q, int64_t t) {
  const int64_t prev = q.prev_step(t);
  return {q.rows(t), q.offset(t), q.prev_rows(t), prev < 0 ? 0 : q.offset(prev)};
}

// h_{t-1} of element (b, j): the previous step's output, or h0 for a row that starts at this step.
template <typename T>
LSTMFAST_PD T previous_hidden(const T* output, const T* initial, const StepRowsAt& at, int b, int64_t j,
                              int64_t H) {
  return b < at.prev_rows ? output[(at.prev_r0 + b) * H + j] : initial[b * H + j];
}

// The forward recurrence of every cell: per step, y = h_{t-1} M^T (h_{t-1} staged from the previous
// step's rows of `output`, which other blocks wrote, or from h0 in `initial`), then point(at, b, u) for
// this thread's elements (which writes the step's output rows), then the grid-wide sync.
// (block_matvec starts with a barrier: M, loaded before, is complete before anyone multiplies.)
template <typename T, typename Point>
LSTMFAST_PD void forward_steps(const Geometry& g, const Steps& q, const Smem<T>& s, const T* output,
                               const T* initial, int64_t H, int count, const Point& point) {
  for (int64_t k = 0; k < q.steps; ++k) {
    const StepRowsAt at = step_rows(q, q.forward_step(k));
    // (Without a previous step prev_rows is 0: no row is read from output + prev_r0 * H.)
    block_matvec(g, s, at.rows, HiddenRows<T>{output + at.prev_r0 * H, initial, at.prev_rows, at.rows, H});
    for_my_elements(at.rows, count, [&](int b, int u) { point(at, b, u); });
    grid_barrier();
  }
}

// The backward recurrence of every cell: per step, point(at, b, u) for this thread's elements (which
// writes the step's rows of `staged`, width values each: the gradient of the recurrent product's
// result), the grid-wide sync, then y = those rows M (M: my units' columns of W_hh), dL/dh_{t-1} of my
// units (through the product) for the step's rows.
template <typename T, typename Point>
LSTMFAST_PD void backward_steps(const Geometry& g, const Steps& q, const Smem<T>& s, const T* staged, int64_t width,
                                int count, const Point& point) {
  for (int64_t k = 0; k < q.steps; ++k) {
    const StepRowsAt at = step_rows(q, q.backward_step(k));
    for_my_elements(at.rows, count, [&](int b, int u) { point(at, b, u); });
    grid_barrier();
    block_matvec(g, s, at.rows, StepRows<T>{staged + at.r0 * width, at.rows, width});
  }
}

// ---------------------------------------------------------------- kernels

template <typename T>
struct LstmForwardParams {
  Geometry g;
  Steps q;
  int64_t H;
  const T* w_hh;     // (4H, H)
  const T* bias;     // (4H) or nullptr
  T* gates;          // (N, 4H): x W_ih^T in; activated gates out when training
  T* cells;          // (N, H) c_t out, or nullptr
  T* output;         // (N, H) h_t out
  T* hidden_state;   // (B, H) h0 in, h_n out (after the last step)
  T* cell_state;     // (B, H) c0 in, c_n out
};

// s.state holds c_t of my units, s.final_h each row's latest h_t.
template <typename T>
LSTMFAST_PD void lstm_forward_body(const LstmForwardParams<T>& p, unsigned char* smem_raw) {
  const Geometry g = p.g;
  const Smem<T> s = carve<T>(smem_raw, g, true, true);
  const int64_t H = p.H, G = 4 * H;
  const int U = g.units;
  const Units mine = my_units(g, H);
  load_rows(g, s.m, p.w_hh, 4, H, mine.u0, mine.count);
  forward_steps(g, p.q, s, p.output, p.hidden_state, H, mine.count, [&](const StepRowsAt& at, int b, int u) {
    const int64_t j = mine.u0 + u;
    T* a = p.gates + (at.r0 + b) * G;
    const float* y = s.y + b * g.rows;
    float a_i = y[u] + float(a[j]), a_f = y[U + u] + float(a[H + j]);
    float a_g = y[2 * U + u] + float(a[2 * H + j]), a_o = y[3 * U + u] + float(a[3 * H + j]);
    if (p.bias != nullptr) {
      a_i += float(p.bias[j]);
      a_f += float(p.bias[H + j]);
      a_g += float(p.bias[2 * H + j]);
      a_o += float(p.bias[3 * H + j]);
    }
    const float cell_prev = b < at.prev_rows ? s.state[b * U + u] : float(p.cell_state[b * H + j]);
    const auto c = kernels::lstm_cell_forward<float>(a_i, a_f, a_g, a_o, cell_prev);
    if (p.cells != nullptr) {  // training: what the backward reads
      a[j] = T(c.i);
      a[H + j] = T(c.f);
      a[2 * H + j] = T(c.g);
      a[3 * H + j] = T(c.o);
      p.cells[(at.r0 + b) * H + j] = T(c.cell);
    }
    s.state[b * U + u] = c.cell;
    const T h = T(c.hidden);
    p.output[(at.r0 + b) * H + j] = h;
    s.final_h[b * U + u] = float(h);
  });
  // After the last sync nobody stages h0 any more: the final states may overwrite it.
  for_my_elements(p.q.batch, mine.count, [&](int b, int u) {
    p.hidden_state[b * H + mine.u0 + u] = T(s.final_h[b * U + u]);
    p.cell_state[b * H + mine.u0 + u] = T(s.state[b * U + u]);
  });
}

template <typename T>
struct LstmBackwardParams {
  Geometry g;
  Steps q;
  int64_t H;
  const T* w_hh;            // (4H, H)
  const T* output;          // (N, H) h_t
  const T* gates;           // (N, 4H) activated gates
  const T* cells;           // (N, H) c_t
  const T* hidden_initial;  // (B, H) h0
  const T* cell_initial;    // (B, H) c0
  const T* grad_output;     // (N, H)
  T* grad_hidden_state;     // (B, H) dL/dh_n in, dL/dh0 out
  T* grad_cell_state;       // (B, H) dL/dc_n in, dL/dc0 out
  T* grad_gates;            // (N, 4H) out
  T* hidden_prev;           // (N, H) h_{t-1} of every row out, or nullptr
  float grad_clip;          // <= 0: none
};

// s.y holds the running dL/dh (row b at b * g.rows), s.state the running dL/dc, of my units.
template <typename T>
LSTMFAST_PD void lstm_backward_body(const LstmBackwardParams<T>& p, unsigned char* smem_raw) {
  const Geometry g = p.g;
  const Smem<T> s = carve<T>(smem_raw, g, true, false);
  const int64_t H = p.H, G = 4 * H;
  const int U = g.units;
  const Units mine = my_units(g, H);
  load_columns(g, s.m, p.w_hh, H, mine.u0, mine.count);
  for_my_elements(p.q.batch, mine.count, [&](int b, int u) {
    s.y[b * g.rows + u] = float(p.grad_hidden_state[b * H + mine.u0 + u]);
    s.state[b * U + u] = float(p.grad_cell_state[b * H + mine.u0 + u]);
  });
  block_barrier();
  backward_steps(g, p.q, s, p.grad_gates, G, mine.count, [&](const StepRowsAt& at, int b, int u) {
    const int64_t j = mine.u0 + u, e = (at.r0 + b) * H + j;
    const T* a = p.gates + (at.r0 + b) * G;
    const float grad_hidden = s.y[b * g.rows + u] + float(p.grad_output[e]);
    const float cell_prev = b < at.prev_rows ? float(p.cells[(at.prev_r0 + b) * H + j])
                                             : float(p.cell_initial[b * H + j]);
    const auto r = kernels::lstm_cell_backward<float>(float(a[j]), float(a[H + j]), float(a[2 * H + j]),
                                                      float(a[3 * H + j]), float(p.cells[e]), cell_prev,
                                                      grad_hidden, s.state[b * U + u], p.grad_clip);
    T* d = p.grad_gates + (at.r0 + b) * G;
    d[j] = T(r.a_i);
    d[H + j] = T(r.a_f);
    d[2 * H + j] = T(r.a_g);
    d[3 * H + j] = T(r.a_o);
    s.state[b * U + u] = r.cell_prev;
    if (p.hidden_prev != nullptr) p.hidden_prev[e] = previous_hidden(p.output, p.hidden_initial, at, b, j, H);
  });
  for_my_elements(p.q.batch, mine.count, [&](int b, int u) {
    p.grad_hidden_state[b * H + mine.u0 + u] = T(s.y[b * g.rows + u]);
    p.grad_cell_state[b * H + mine.u0 + u] = T(s.state[b * U + u]);
  });
}

template <typename T>
struct RnnForwardParams {
  Geometry g;
  Steps q;
  int64_t H;
  const T* w_hh;     // (H, H)
  const T* bias;     // (H) or nullptr
  T* output;         // (N, H): x W_ih^T in, h_t out
  T* hidden_state;   // (B, H) h0 in, h_n out (after the last step)
  kernels::Nonlinearity nonlinearity;
};

template <typename T>
LSTMFAST_PD void rnn_forward_body(const RnnForwardParams<T>& p, unsigned char* smem_raw) {
  const Geometry g = p.g;
  const Smem<T> s = carve<T>(smem_raw, g, false, true);
  const int64_t H = p.H;
  const int U = g.units;
  const Units mine = my_units(g, H);
  load_rows(g, s.m, p.w_hh, 1, H, mine.u0, mine.count);
  forward_steps(g, p.q, s, p.output, p.hidden_state, H, mine.count, [&](const StepRowsAt& at, int b, int u) {
    const int64_t j = mine.u0 + u, e = (at.r0 + b) * H + j;
    // Only this thread reads or writes element e during this step (other blocks stage this step's
    // rows after the sync that follows).
    float a = s.y[b * g.rows + u] + float(p.output[e]);
    if (p.bias != nullptr) a += float(p.bias[j]);
    const T h = T(kernels::rnn_activation(a, p.nonlinearity));
    p.output[e] = h;
    s.final_h[b * U + u] = float(h);
  });
  for_my_elements(p.q.batch, mine.count, [&](int b, int u) {
    p.hidden_state[b * H + mine.u0 + u] = T(s.final_h[b * U + u]);
  });
}

template <typename T>
struct RnnBackwardParams {
  Geometry g;
  Steps q;
  int64_t H;
  const T* w_hh;            // (H, H)
  const T* output;          // (N, H) h_t
  const T* hidden_initial;  // (B, H) h0
  const T* grad_output;     // (N, H)
  T* grad_hidden_state;     // (B, H) dL/dh_n in, dL/dh0 out
  T* grad_pre;              // (N, H) out
  T* hidden_prev;           // (N, H) or nullptr
  kernels::Nonlinearity nonlinearity;
  float grad_clip;
};

template <typename T>
LSTMFAST_PD void rnn_backward_body(const RnnBackwardParams<T>& p, unsigned char* smem_raw) {
  const Geometry g = p.g;
  const Smem<T> s = carve<T>(smem_raw, g, false, false);
  const int64_t H = p.H;
  const Units mine = my_units(g, H);
  load_columns(g, s.m, p.w_hh, H, mine.u0, mine.count);
  for_my_elements(p.q.batch, mine.count, [&](int b, int u) {
    s.y[b * g.rows + u] = float(p.grad_hidden_state[b * H + mine.u0 + u]);
  });
  block_barrier();
  backward_steps(g, p.q, s, p.grad_pre, H, mine.count, [&](const StepRowsAt& at, int b, int u) {
    const int64_t j = mine.u0 + u, e = (at.r0 + b) * H + j;
    const float grad_hidden = s.y[b * g.rows + u] + float(p.grad_output[e]);
    const float d = kernels::rnn_pre_activation_grad(grad_hidden, float(p.output[e]), p.nonlinearity);
    p.grad_pre[e] = T(kernels::clip(d, p.grad_clip));
    if (p.hidden_prev != nullptr) p.hidden_prev[e] = previous_hidden(p.output, p.hidden_initial, at, b, j, H);
  });
  for_my_elements(p.q.batch, mine.count, [&](int b, int u) {
    p.grad_hidden_state[b * H + mine.u0 + u] = T(s.y[b * g.rows + u]);
  });
}

template <typename T>
struct GruForwardParams {
  Geometry g;
  Steps q;
  int64_t H;
  const T* w_hh;       // (3H, H)
  const T* b_ih;       // (3H) or nullptr
  const T* b_hh;       // (3H) or nullptr
  T* gates;            // (N, 4H): x W_ih^T in columns [0, 3H) in; r, z, n, W_hn h_{t-1} + b_hn out when training
  T* output;           // (N, H) h_t out
  T* hidden_state;     // (B, H) h0 in, h_n out (after the last step)
  bool training;
};

// As the LSTM forward, with three gates; a unit's h_{t-1} (for z * h_{t-1}) comes from s.final_h, each
// row's latest h_t of my units (rounded to the dtype, as the time loop's state is), or from h0.
template <typename T>
LSTMFAST_PD void gru_forward_body(const GruForwardParams<T>& p, unsigned char* smem_raw) {
  const Geometry g = p.g;
  const Smem<T> s = carve<T>(smem_raw, g, false, true);
  const int64_t H = p.H, G = 4 * H;
  const int U = g.units;
  const Units mine = my_units(g, H);
  load_rows(g, s.m, p.w_hh, 3, H, mine.u0, mine.count);
  forward_steps(g, p.q, s, p.output, p.hidden_state, H, mine.count, [&](const StepRowsAt& at, int b, int u) {
    const int64_t j = mine.u0 + u;
    T* a = p.gates + (at.r0 + b) * G;
    const float* y = s.y + b * g.rows;
    const float hidden_prev = b < at.prev_rows ? s.final_h[b * U + u] : float(p.hidden_state[b * H + j]);
    const auto o = kernels::gru_point_cell<float>(float(a[j]), float(a[H + j]), float(a[2 * H + j]), y[u],
                                                  y[U + u], y[2 * U + u], p.b_ih, p.b_hh, H, j, hidden_prev);
    if (p.training) kernels::store_gru_gates(a, H, j, o);  // what the backward reads
    const T h = T(o.hidden);
    p.output[(at.r0 + b) * H + j] = h;
    s.final_h[b * U + u] = float(h);
  });
  for_my_elements(p.q.batch, mine.count, [&](int b, int u) {
    p.hidden_state[b * H + mine.u0 + u] = T(s.final_h[b * U + u]);
  });
}

template <typename T>
struct GruBackwardParams {
  Geometry g;
  Steps q;
  int64_t H;
  const T* w_hh;            // (3H, H)
  const T* output;          // (N, H) h_t
  const T* gates;           // (N, 4H) r, z, n, W_hn h_{t-1} + b_hn
  const T* hidden_initial;  // (B, H) h0
  const T* grad_output;     // (N, H)
  T* grad_hidden_state;     // (B, H) dL/dh_n in, dL/dh0 out
  T* grad_input_gates;      // (N, 3H) da_x out
  T* grad_hidden_gates;     // (N, 3H) da_h out
  T* hidden_prev;           // (N, H) h_{t-1} of every row out, or nullptr
  float grad_clip;          // <= 0: none
};

// dL/dh_{t-1} = dL/dh_t * z + da_h W_hh: s.y holds the product's part of my units (row b at b * g.rows),
// s.state the other part (zero for rows no step has reached yet), their sum is the running dL/dh.
template <typename T>
LSTMFAST_PD void gru_backward_body(const GruBackwardParams<T>& p, unsigned char* smem_raw) {
  const Geometry g = p.g;
  const Smem<T> s = carve<T>(smem_raw, g, true, false);
  const int64_t H = p.H, G = 4 * H;
  const int U = g.units;
  const Units mine = my_units(g, H);
  load_columns(g, s.m, p.w_hh, H, mine.u0, mine.count);
  for_my_elements(p.q.batch, mine.count, [&](int b, int u) {
    s.y[b * g.rows + u] = float(p.grad_hidden_state[b * H + mine.u0 + u]);
    s.state[b * U + u] = 0.f;
  });
  block_barrier();
  backward_steps(g, p.q, s, p.grad_hidden_gates, 3 * H, mine.count, [&](const StepRowsAt& at, int b, int u) {
    const int64_t j = mine.u0 + u, e = (at.r0 + b) * H + j;
    const T* a = p.gates + (at.r0 + b) * G;
    const T hidden_prev = previous_hidden(p.output, p.hidden_initial, at, b, j, H);
    const float grad_hidden = s.y[b * g.rows + u] + s.state[b * U + u] + float(p.grad_output[e]);
    const auto r = kernels::gru_cell_backward<float>(float(a[j]), float(a[H + j]), float(a[2 * H + j]),
                                                     float(a[3 * H + j]), float(hidden_prev), grad_hidden,
                                                     p.grad_clip);
    kernels::store_gru_grads(p.grad_input_gates + (at.r0 + b) * 3 * H, p.grad_hidden_gates + (at.r0 + b) * 3 * H,
                             H, j, r);
    s.state[b * U + u] = r.hidden_prev;
    if (p.hidden_prev != nullptr) p.hidden_prev[e] = hidden_prev;
  });
  for_my_elements(p.q.batch, mine.count, [&](int b, int u) {
    p.grad_hidden_state[b * H + mine.u0 + u] = T(s.y[b * g.rows + u] + s.state[b * U + u]);
  });
}

inline Geometry geometry_of(const PersistentPlan& p) {
  return {p.units, p.rows, p.depth, p.ldm, p.batch_padded, p.chunk, p.ld_stage, p.slices};
}

// The kernels' parameters from the time loops' arguments (layer.h), the plan and the layout.
template <typename T>
LstmForwardParams<T> lstm_forward_params(const kernels::LstmForwardArgs<T>& a, const PersistentPlan& plan, Steps q) {
  return {geometry_of(plan), q, a.hidden_size, a.w_hh, a.bias, a.gates, a.training ? a.cells : nullptr, a.output,
          a.hidden_state, a.cell_state};
}

template <typename T>
LstmBackwardParams<T> lstm_backward_params(const kernels::LstmBackwardArgs<T, float>& a, const PersistentPlan& plan,
                                           Steps q) {
  return {geometry_of(plan), q,           a.hidden_size,       a.w_hh,          a.output,
          a.gates,           a.cells,     a.hidden_initial,    a.cell_initial,  a.grad_output,
          a.grad_hidden_state, a.grad_cell_state, a.grad_gates, a.hidden_prev, static_cast<float>(a.grad_clip)};
}

template <typename T>
RnnForwardParams<T> rnn_forward_params(const kernels::RnnForwardArgs<T>& a, const PersistentPlan& plan, Steps q) {
  return {geometry_of(plan), q, a.hidden_size, a.w_hh, a.bias, a.output, a.hidden_state, a.nonlinearity};
}

template <typename T>
RnnBackwardParams<T> rnn_backward_params(const kernels::RnnBackwardArgs<T, float>& a, const PersistentPlan& plan,
                                         Steps q) {
  return {geometry_of(plan), q, a.hidden_size, a.w_hh, a.output, a.hidden_initial, a.grad_output,
          a.grad_hidden_state, a.grad_pre, a.hidden_prev, a.nonlinearity, static_cast<float>(a.grad_clip)};
}

template <typename T>
GruForwardParams<T> gru_forward_params(const kernels::GruForwardArgs<T>& a, const PersistentPlan& plan, Steps q) {
  return {geometry_of(plan), q, a.hidden_size, a.w_hh, a.b_ih, a.b_hh, a.gates, a.output, a.hidden_state,
          a.training};
}

template <typename T>
GruBackwardParams<T> gru_backward_params(const kernels::GruBackwardArgs<T, float>& a, const PersistentPlan& plan,
                                         Steps q) {
  return {geometry_of(plan),     q,          a.hidden_size,      a.w_hh,
          a.output,              a.gates,    a.hidden_initial,   a.grad_output,
          a.grad_hidden_state,   a.grad_input_gates, a.grad_hidden_gates, a.hidden_prev,
          static_cast<float>(a.grad_clip)};
}

}  // namespace lstmfast::persistent

// Persistent LSTM / Elman-RNN kernels (declared and described in persistent.cuh; geometry and shared
// memory layout in kernels/persistent_plan.h).
//
// One step of a forward kernel, in every block:
//   1. stage h_{t-1} (B x H, from the previous step's output rows or h0) into shared memory, in chunks;
//      multiply by the block's rows of W_hh: y = h_{t-1} W_hh[rows of my units]^T  (float32 sums)
//   2. pointwise, for my units only (all four gates of a unit are in this block): add x W_ih^T and the
//      bias, the cell, write the step's output rows (and gates, cells when training)
//   3. grid-wide sync: every block's h_t is in global memory before anyone stages it
// A backward step: 1. pointwise for my units (dL/dh_t from shared memory, dL/dc_t kept in shared
// memory) writing dL/da_t; 2. grid-wide sync; 3. stage dL/da_t (B x G*H) and multiply by the block's
// columns of W_hh: dL/dh_{t-1} for my units, kept in shared memory for the next step.
//
// Every step writes only its own rows of the (N, *) buffers and reads the rows other blocks wrote
// before the last grid sync, so one sync per step orders all cross-block traffic. Rows other blocks
// wrote in this kernel are read with __ldcg (L2, not the multiprocessor's incoherent L1). The final
// states are written after the last step's sync: h0 lives in the h_n buffer and blocks stage it until then.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>

#include <cstdlib>
#include <vector>

#include "persistent.cuh"

namespace lstmfast::persistent {
namespace {

namespace cg = cooperative_groups;
using kernels::kPersistentThreads;
using kernels::PersistentPlan;

// ---------------------------------------------------------------- device helpers

// Loads through L2 only (a row another block wrote during this kernel).
__device__ __forceinline__ float load_cg(const float* p) { return __ldcg(p); }
__device__ __forceinline__ float load_cg(const c10::Half* p) {
  return float(c10::Half(__ldcg(reinterpret_cast<const unsigned short*>(p)), c10::Half::from_bits()));
}
__device__ __forceinline__ float load_cg(const c10::BFloat16* p) {
  return float(c10::BFloat16(__ldcg(reinterpret_cast<const unsigned short*>(p)), c10::BFloat16::from_bits()));
}

// The (N, *) row layout on the device: batch_sizes / offsets in device memory, or nullptr when every
// step has `batch` rows (step t then starts at row t * batch).
struct Steps {
  const int64_t* batch_sizes;  // (T) or nullptr
  const int64_t* offsets;      // (T) or nullptr
  int64_t steps, batch;
  bool reverse;

  __device__ int64_t rows(int64_t t) const { return batch_sizes != nullptr ? batch_sizes[t] : batch; }
  __device__ int64_t offset(int64_t t) const { return offsets != nullptr ? offsets[t] : t * batch; }
  __device__ int64_t forward_step(int64_t k) const { return reverse ? steps - 1 - k : k; }
  __device__ int64_t backward_step(int64_t k) const { return reverse ? k : steps - 1 - k; }
  __device__ int64_t prev_step(int64_t t) const { return reverse ? (t + 1 < steps ? t + 1 : -1) : t - 1; }
  // Rows of step t that continue from prev_step(t); rows from there to rows(t) start from the
  // initial state (kernels::Sequence::prev_rows).
  __device__ int64_t prev_rows(int64_t t) const {
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
  float* state;    // (Bp, units) c_t (forward) or dL/dc_t (backward), LSTM only
  float* final_h;  // (Bp, units) h_t of each row's last step, forward only
  float* stage;    // (Bp, ld_stage) the exchanged rows, one chunk of columns
};

__device__ __forceinline__ size_t align16(size_t bytes) { return (bytes + 15) / 16 * 16; }

// The same layout, in the same order, as kernels::persistent_geometry counts it.
template <typename T>
__device__ Smem<T> carve(unsigned char* base, const Geometry& g, bool cell_state, bool final_hidden) {
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
__device__ void block_matvec(const Geometry& g, const Smem<T>& s, int64_t limit, const Load& load) {
  const int Bp = g.batch_padded, R = g.rows;
  const int row_tiles = R / 4, tiles = row_tiles * (Bp / 4);
  const int tid = threadIdx.x;
  const bool active = tid < tiles * g.slices;
  const int tile = tid % tiles, slice = tid / tiles;
  const int r0 = (tile % row_tiles) * 4, b0 = (tile / row_tiles) * 4;
  float acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
  for (int k0 = 0; k0 < g.depth; k0 += g.chunk) {
    const int width = min(g.chunk, g.depth - k0);
    __syncthreads();  // the staging buffer's previous readers (last chunk, last step) are done
    for (int i = tid; i < Bp * width; i += kPersistentThreads) {
      const int b = i / width, k = i - b * width;
      s.stage[b * g.ld_stage + k] = load(b, k0 + k);
    }
    __syncthreads();
    if (active) {
      const T* m = s.m + r0 * g.ldm + k0;
      const float* x = s.stage + b0 * g.ld_stage;
      for (int k = slice; k < width; k += g.slices) {
        float w[4], v[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          w[i] = float(m[i * g.ldm + k]);
          v[i] = x[i * g.ld_stage + k];
        }
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(w[i], v[j], acc[i][j]);
      }
    }
  }
  if (active) {
    float* part = s.partial + size_t(slice) * Bp * R;
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j) part[(b0 + j) * R + r0 + i] = acc[i][j];
  }
  __syncthreads();
  for (int o = tid; o < Bp * R; o += kPersistentThreads) {
    if (o / R >= limit) continue;
    float sum = 0.f;
    for (int q = 0; q < g.slices; ++q) sum += s.partial[size_t(q) * Bp * R + o];
    s.y[o] = sum;
  }
  __syncthreads();
}

// v(b, k) of a forward step: h_{t-1}, from the previous step's output rows (rows that continue) or
// h0 (rows that start here), zero for rows not alive.
template <typename T>
struct HiddenRows {
  const T* prev;     // (prev_rows, width) the previous step's output rows, or nullptr
  const T* initial;  // (B, width) h0
  int64_t prev_rows, rows, width;
  __device__ float operator()(int b, int k) const {
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
  __device__ float operator()(int b, int k) const {
    return b < rows ? load_cg(rows_ptr + b * width + k) : 0.f;
  }
};

// M for the forward: row gate*units + u = W_hh row gate*H + u0 + u (zero past this block's units,
// and for the padding rows). W_hh is (gates*H, H).
template <typename T>
__device__ void load_rows(const Geometry& g, T* m, const T* w_hh, int gates, int64_t H, int64_t u0, int here) {
  for (int64_t i = threadIdx.x; i < int64_t(g.rows) * g.depth; i += kPersistentThreads) {
    const int r = static_cast<int>(i / g.depth), k = static_cast<int>(i % g.depth);
    const int gate = r / g.units, u = r % g.units;
    m[r * g.ldm + k] = gate < gates && u < here ? w_hh[(gate * H + u0 + u) * H + k] : T(0.f);
  }
}

// M for the backward: row u, column c = W_hh[c, u0 + u] (c < gates*H): the columns of my units.
template <typename T>
__device__ void load_columns(const Geometry& g, T* m, const T* w_hh, int64_t H, int64_t u0, int here) {
  for (int64_t i = threadIdx.x; i < int64_t(g.rows) * g.depth; i += kPersistentThreads) {
    const int c = static_cast<int>(i / g.rows), u = static_cast<int>(i % g.rows);  // u fastest: coalesced
    m[u * g.ldm + c] = u < here ? w_hh[c * H + u0 + u] : T(0.f);
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

template <typename T>
__global__ void __launch_bounds__(kPersistentThreads, 1) lstm_forward_kernel(LstmForwardParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Geometry g = p.g;
  const Steps q = p.q;
  const Smem<T> s = carve<T>(smem_raw, g, true, true);
  const int64_t H = p.H, G = 4 * H;
  const int U = g.units;
  const int64_t u0 = int64_t(blockIdx.x) * U;
  const int here = static_cast<int>(H - u0 < U ? H - u0 : U);
  load_rows(g, s.m, p.w_hh, 4, H, u0, here);
  // (block_matvec starts with a barrier: M is complete before anyone multiplies.)
  cg::grid_group grid = cg::this_grid();
  for (int64_t k = 0; k < q.steps; ++k) {
    const int64_t t = q.forward_step(k), rows = q.rows(t), r0 = q.offset(t);
    const int64_t prev = q.prev_step(t), prev_rows = q.prev_rows(t);
    block_matvec(g, s, rows,
                 HiddenRows<T>{prev < 0 ? nullptr : p.output + q.offset(prev) * H, p.hidden_state, prev_rows,
                               rows, H});
    for (int i = threadIdx.x; i < rows * here; i += kPersistentThreads) {
      const int b = i / here, u = i - b * here;
      const int64_t j = u0 + u;
      T* a = p.gates + (r0 + b) * G;
      const float* y = s.y + b * g.rows;
      float a_i = y[u] + float(a[j]), a_f = y[U + u] + float(a[H + j]);
      float a_g = y[2 * U + u] + float(a[2 * H + j]), a_o = y[3 * U + u] + float(a[3 * H + j]);
      if (p.bias != nullptr) {
        a_i += float(p.bias[j]);
        a_f += float(p.bias[H + j]);
        a_g += float(p.bias[2 * H + j]);
        a_o += float(p.bias[3 * H + j]);
      }
      const float cell_prev = b < prev_rows ? s.state[b * U + u] : float(p.cell_state[b * H + j]);
      const auto c = kernels::lstm_cell_forward<float>(a_i, a_f, a_g, a_o, cell_prev);
      if (p.cells != nullptr) {  // training: what the backward reads
        a[j] = T(c.i);
        a[H + j] = T(c.f);
        a[2 * H + j] = T(c.g);
        a[3 * H + j] = T(c.o);
        p.cells[(r0 + b) * H + j] = T(c.cell);
      }
      s.state[b * U + u] = c.cell;
      const T h = T(c.hidden);
      p.output[(r0 + b) * H + j] = h;
      s.final_h[b * U + u] = float(h);
    }
    grid.sync();
  }
  // After the last sync nobody stages h0 any more: the final states may overwrite it.
  for (int i = threadIdx.x; i < q.batch * here; i += kPersistentThreads) {
    const int b = i / here, u = i - b * here;
    const int64_t j = u0 + u;
    p.hidden_state[b * H + j] = T(s.final_h[b * U + u]);
    p.cell_state[b * H + j] = T(s.state[b * U + u]);
  }
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

template <typename T>
__global__ void __launch_bounds__(kPersistentThreads, 1) lstm_backward_kernel(LstmBackwardParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Geometry g = p.g;
  const Steps q = p.q;
  const Smem<T> s = carve<T>(smem_raw, g, true, false);
  const int64_t H = p.H, G = 4 * H;
  const int U = g.units;
  const int64_t u0 = int64_t(blockIdx.x) * U;
  const int here = static_cast<int>(H - u0 < U ? H - u0 : U);
  load_columns(g, s.m, p.w_hh, H, u0, here);
  // s.y holds the running dL/dh (row b at b * g.rows), s.state the running dL/dc, of my units.
  for (int i = threadIdx.x; i < q.batch * here; i += kPersistentThreads) {
    const int b = i / here, u = i - b * here;
    s.y[b * g.rows + u] = float(p.grad_hidden_state[b * H + u0 + u]);
    s.state[b * U + u] = float(p.grad_cell_state[b * H + u0 + u]);
  }
  __syncthreads();
  cg::grid_group grid = cg::this_grid();
  for (int64_t k = 0; k < q.steps; ++k) {
    const int64_t t = q.backward_step(k), rows = q.rows(t), r0 = q.offset(t);
    const int64_t prev = q.prev_step(t), prev_rows = q.prev_rows(t);
    const int64_t prev_r0 = prev < 0 ? 0 : q.offset(prev);
    for (int i = threadIdx.x; i < rows * here; i += kPersistentThreads) {
      const int b = i / here, u = i - b * here;
      const int64_t j = u0 + u, e = (r0 + b) * H + j;
      const T* a = p.gates + (r0 + b) * G;
      const float grad_hidden = s.y[b * g.rows + u] + float(p.grad_output[e]);
      const float cell_prev = b < prev_rows ? float(p.cells[(prev_r0 + b) * H + j])
                                            : float(p.cell_initial[b * H + j]);
      const auto r = kernels::lstm_cell_backward<float>(float(a[j]), float(a[H + j]), float(a[2 * H + j]),
                                                        float(a[3 * H + j]), float(p.cells[e]), cell_prev,
                                                        grad_hidden, s.state[b * U + u], p.grad_clip);
      T* d = p.grad_gates + (r0 + b) * G;
      d[j] = T(r.a_i);
      d[H + j] = T(r.a_f);
      d[2 * H + j] = T(r.a_g);
      d[3 * H + j] = T(r.a_o);
      s.state[b * U + u] = r.cell_prev;
      if (p.hidden_prev != nullptr) {
        p.hidden_prev[e] = b < prev_rows ? p.output[(prev_r0 + b) * H + j] : p.hidden_initial[b * H + j];
      }
    }
    grid.sync();
    // dL/dh_{t-1} = dL/da_t W_hh, my units' columns, for this step's rows.
    block_matvec(g, s, rows, StepRows<T>{p.grad_gates + r0 * G, rows, G});
  }
  for (int i = threadIdx.x; i < q.batch * here; i += kPersistentThreads) {
    const int b = i / here, u = i - b * here;
    p.grad_hidden_state[b * H + u0 + u] = T(s.y[b * g.rows + u]);
    p.grad_cell_state[b * H + u0 + u] = T(s.state[b * U + u]);
  }
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
__global__ void __launch_bounds__(kPersistentThreads, 1) rnn_forward_kernel(RnnForwardParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Geometry g = p.g;
  const Steps q = p.q;
  const Smem<T> s = carve<T>(smem_raw, g, false, true);
  const int64_t H = p.H;
  const int U = g.units;
  const int64_t u0 = int64_t(blockIdx.x) * U;
  const int here = static_cast<int>(H - u0 < U ? H - u0 : U);
  load_rows(g, s.m, p.w_hh, 1, H, u0, here);
  cg::grid_group grid = cg::this_grid();
  for (int64_t k = 0; k < q.steps; ++k) {
    const int64_t t = q.forward_step(k), rows = q.rows(t), r0 = q.offset(t);
    const int64_t prev = q.prev_step(t), prev_rows = q.prev_rows(t);
    block_matvec(g, s, rows,
                 HiddenRows<T>{prev < 0 ? nullptr : p.output + q.offset(prev) * H, p.hidden_state, prev_rows,
                               rows, H});
    for (int i = threadIdx.x; i < rows * here; i += kPersistentThreads) {
      const int b = i / here, u = i - b * here;
      const int64_t j = u0 + u, e = (r0 + b) * H + j;
      // Only this thread reads or writes element e during this step (other blocks stage this step's
      // rows after the sync below).
      float a = s.y[b * g.rows + u] + float(p.output[e]);
      if (p.bias != nullptr) a += float(p.bias[j]);
      const T h = T(kernels::rnn_activation(a, p.nonlinearity));
      p.output[e] = h;
      s.final_h[b * U + u] = float(h);
    }
    grid.sync();
  }
  for (int i = threadIdx.x; i < q.batch * here; i += kPersistentThreads) {
    const int b = i / here, u = i - b * here;
    p.hidden_state[b * H + u0 + u] = T(s.final_h[b * U + u]);
  }
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
__global__ void __launch_bounds__(kPersistentThreads, 1) rnn_backward_kernel(RnnBackwardParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const Geometry g = p.g;
  const Steps q = p.q;
  const Smem<T> s = carve<T>(smem_raw, g, false, false);
  const int64_t H = p.H;
  const int U = g.units;
  const int64_t u0 = int64_t(blockIdx.x) * U;
  const int here = static_cast<int>(H - u0 < U ? H - u0 : U);
  load_columns(g, s.m, p.w_hh, H, u0, here);
  for (int i = threadIdx.x; i < q.batch * here; i += kPersistentThreads) {
    const int b = i / here, u = i - b * here;
    s.y[b * g.rows + u] = float(p.grad_hidden_state[b * H + u0 + u]);
  }
  __syncthreads();
  cg::grid_group grid = cg::this_grid();
  for (int64_t k = 0; k < q.steps; ++k) {
    const int64_t t = q.backward_step(k), rows = q.rows(t), r0 = q.offset(t);
    const int64_t prev = q.prev_step(t), prev_rows = q.prev_rows(t);
    const int64_t prev_r0 = prev < 0 ? 0 : q.offset(prev);
    for (int i = threadIdx.x; i < rows * here; i += kPersistentThreads) {
      const int b = i / here, u = i - b * here;
      const int64_t j = u0 + u, e = (r0 + b) * H + j;
      const float grad_hidden = s.y[b * g.rows + u] + float(p.grad_output[e]);
      const float d = grad_hidden * kernels::rnn_activation_grad(float(p.output[e]), p.nonlinearity);
      p.grad_pre[e] = T(kernels::clip(d, p.grad_clip));
      if (p.hidden_prev != nullptr) {
        p.hidden_prev[e] = b < prev_rows ? p.output[(prev_r0 + b) * H + j] : p.hidden_initial[b * H + j];
      }
    }
    grid.sync();
    block_matvec(g, s, rows, StepRows<T>{p.grad_pre + r0 * H, rows, H});
  }
  for (int i = threadIdx.x; i < q.batch * here; i += kPersistentThreads) {
    const int b = i / here, u = i - b * here;
    p.grad_hidden_state[b * H + u0 + u] = T(s.y[b * g.rows + u]);
  }
}

// ---------------------------------------------------------------- host side

Geometry geometry_of(const PersistentPlan& p) {
  return {p.units, p.rows, p.depth, p.ldm, p.batch_padded, p.chunk, p.ld_stage, p.slices};
}

kernels::PersistentMode mode_from_environment() {
  const char* value = std::getenv("LSTMFAST_CUDA_PERSISTENT");
  bool ok = true;
  const auto mode = kernels::parse_persistent_mode(value, &ok);
  TORCH_CHECK(ok, "lstmfast: LSTMFAST_CUDA_PERSISTENT must be 0, 1 or auto, but got '", std::string(value), "'");
  return mode;
}

// The plan for this device, then the occupancy calculator's word for this kernel (registers count
// there): a cooperative launch fails unless every block of the grid is resident at once.
PersistentPlan plan_for(const kernels::PersistentRequest& r, const kernels::Sequence& q, const void* kernel) {
  const auto mode = mode_from_environment();
  if (mode == kernels::PersistentMode::Off) return PersistentPlan{};
  // Packed input copies batch_sizes to the device from a pinned buffer that is reused once the copy
  // is done: a CUDA graph would replay the copy from memory that no longer holds them.
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(at::cuda::getCurrentCUDAStream(), &capture));
  if (capture != cudaStreamCaptureStatusNone && q.steps > 0 && q.batch_sizes[0] != q.batch_sizes[q.steps - 1]) {
    PersistentPlan no;
    no.reason = "packed input under CUDA graph capture";
    return no;
  }
  const int device = c10::cuda::current_device();
  const cudaDeviceProp* prop = at::cuda::getDeviceProperties(device);
  const kernels::DeviceLimits limits{prop->multiProcessorCount, static_cast<int64_t>(prop->sharedMemPerBlockOptin),
                                     static_cast<int64_t>(prop->sharedMemPerMultiprocessor),
                                     prop->cooperativeLaunch != 0};
  PersistentPlan plan = kernels::plan_persistent(r, limits, mode);
  if (!plan.use) return plan;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(plan.smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kPersistentThreads,
                                                               static_cast<size_t>(plan.smem)));
  if (int64_t(per_sm) * prop->multiProcessorCount < plan.blocks) {
    plan.use = false;
    plan.reason = "occupancy: " + std::to_string(per_sm) + " block(s) per multiprocessor, the grid needs " +
                  std::to_string(plan.blocks);
  }
  return plan;
}

// batch_sizes and offsets on the device, or undefined (every step has the whole batch).
at::Tensor device_layout(const kernels::Sequence& q, c10::Device device) {
  if (q.steps == 0 || q.batch_sizes[0] == q.batch_sizes[q.steps - 1]) return at::Tensor();
  at::Tensor host = at::empty({2 * q.steps}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  for (int64_t t = 0; t < q.steps; ++t) {
    h[t] = q.batch_sizes[t];
    h[q.steps + t] = q.offsets[t];
  }
  return host.to(device, /*non_blocking=*/true);  // the pinned block stays reserved until the copy is done
}

Steps steps_of(const kernels::Sequence& q, const at::Tensor& layout) {
  if (!layout.defined()) return {nullptr, nullptr, q.steps, q.batch, q.reverse};
  const int64_t* d = layout.data_ptr<int64_t>();
  return {d, d + q.steps, q.steps, q.batch, q.reverse};
}

template <typename Params>
void launch(void (*kernel)(Params), Params params, const PersistentPlan& plan, cudaStream_t stream) {
  void* args[] = {&params};
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(plan.blocks),
                                             dim3(kPersistentThreads), args, static_cast<size_t>(plan.smem),
                                             stream));
  count_persistent_launch();
}

c10::Device current_cuda_device() { return c10::Device(c10::kCUDA, c10::cuda::current_device()); }

}  // namespace

template <typename T>
PersistentPlan plan_lstm_forward(const kernels::LstmForwardArgs<T>& a) {
  const kernels::PersistentRequest r{true, false, a.hidden_size, a.seq.batch, a.seq.steps, int(sizeof(T)),
                                     a.w_hr != nullptr, false, a.gate_rows == a.seq.rows};
  return plan_for(r, a.seq, reinterpret_cast<const void*>(&lstm_forward_kernel<T>));
}

template <typename T>
PersistentPlan plan_lstm_backward(const kernels::LstmBackwardArgs<T, float>& a) {
  const kernels::PersistentRequest r{true, true, a.hidden_size, a.seq.batch, a.seq.steps, int(sizeof(T)),
                                     a.w_hr != nullptr, a.grad_hidden_norm != nullptr || a.grad_cell_norm != nullptr,
                                     true};
  return plan_for(r, a.seq, reinterpret_cast<const void*>(&lstm_backward_kernel<T>));
}

template <typename T>
PersistentPlan plan_rnn_forward(const kernels::RnnForwardArgs<T>& a) {
  const kernels::PersistentRequest r{false, false, a.hidden_size, a.seq.batch, a.seq.steps, int(sizeof(T)),
                                     false, false, true};
  return plan_for(r, a.seq, reinterpret_cast<const void*>(&rnn_forward_kernel<T>));
}

template <typename T>
PersistentPlan plan_rnn_backward(const kernels::RnnBackwardArgs<T, float>& a) {
  const kernels::PersistentRequest r{false, true, a.hidden_size, a.seq.batch, a.seq.steps, int(sizeof(T)),
                                     false, a.grad_hidden_norm != nullptr, true};
  return plan_for(r, a.seq, reinterpret_cast<const void*>(&rnn_backward_kernel<T>));
}

template <typename T>
void launch_lstm_forward(const kernels::LstmForwardArgs<T>& a, const PersistentPlan& plan, cudaStream_t stream) {
  const at::Tensor layout = device_layout(a.seq, current_cuda_device());
  LstmForwardParams<T> p{geometry_of(plan), steps_of(a.seq, layout), a.hidden_size, a.w_hh, a.bias, a.gates,
                         a.training ? a.cells : nullptr, a.output, a.hidden_state, a.cell_state};
  launch(&lstm_forward_kernel<T>, p, plan, stream);
}

template <typename T>
void launch_lstm_backward(const kernels::LstmBackwardArgs<T, float>& a, const PersistentPlan& plan,
                          cudaStream_t stream) {
  const at::Tensor layout = device_layout(a.seq, current_cuda_device());
  LstmBackwardParams<T> p{geometry_of(plan),    steps_of(a.seq, layout), a.hidden_size,  a.w_hh,
                          a.output,             a.gates,                 a.cells,        a.hidden_initial,
                          a.cell_initial,       a.grad_output,           a.grad_hidden_state,
                          a.grad_cell_state,    a.grad_gates,            a.hidden_prev,
                          static_cast<float>(a.grad_clip)};
  launch(&lstm_backward_kernel<T>, p, plan, stream);
}

template <typename T>
void launch_rnn_forward(const kernels::RnnForwardArgs<T>& a, const PersistentPlan& plan, cudaStream_t stream) {
  const at::Tensor layout = device_layout(a.seq, current_cuda_device());
  RnnForwardParams<T> p{geometry_of(plan), steps_of(a.seq, layout), a.hidden_size, a.w_hh, a.bias, a.output,
                        a.hidden_state, a.nonlinearity};
  launch(&rnn_forward_kernel<T>, p, plan, stream);
}

template <typename T>
void launch_rnn_backward(const kernels::RnnBackwardArgs<T, float>& a, const PersistentPlan& plan,
                         cudaStream_t stream) {
  const at::Tensor layout = device_layout(a.seq, current_cuda_device());
  RnnBackwardParams<T> p{geometry_of(plan), steps_of(a.seq, layout), a.hidden_size, a.w_hh, a.output,
                         a.hidden_initial,  a.grad_output,           a.grad_hidden_state, a.grad_pre,
                         a.hidden_prev,     a.nonlinearity,          static_cast<float>(a.grad_clip)};
  launch(&rnn_backward_kernel<T>, p, plan, stream);
}

#define LSTMFAST_PERSISTENT_INSTANTIATE(T)                                                                \
  template PersistentPlan plan_lstm_forward<T>(const kernels::LstmForwardArgs<T>&);                       \
  template PersistentPlan plan_lstm_backward<T>(const kernels::LstmBackwardArgs<T, float>&);              \
  template PersistentPlan plan_rnn_forward<T>(const kernels::RnnForwardArgs<T>&);                         \
  template PersistentPlan plan_rnn_backward<T>(const kernels::RnnBackwardArgs<T, float>&);                \
  template void launch_lstm_forward<T>(const kernels::LstmForwardArgs<T>&, const PersistentPlan&, cudaStream_t); \
  template void launch_lstm_backward<T>(const kernels::LstmBackwardArgs<T, float>&, const PersistentPlan&,     \
                                        cudaStream_t);                                                    \
  template void launch_rnn_forward<T>(const kernels::RnnForwardArgs<T>&, const PersistentPlan&, cudaStream_t);  \
  template void launch_rnn_backward<T>(const kernels::RnnBackwardArgs<T, float>&, const PersistentPlan&,       \
                                       cudaStream_t);

LSTMFAST_PERSISTENT_INSTANTIATE(float)
LSTMFAST_PERSISTENT_INSTANTIATE(c10::Half)
LSTMFAST_PERSISTENT_INSTANTIATE(c10::BFloat16)

}  // namespace lstmfast::persistent

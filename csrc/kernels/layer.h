// The time loops of one LSTM / GRU / RNN layer in one direction, written once for every device.
//
// A Backend supplies the device's primitives; all pointers it receives are raw device pointers:
//   gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
//       row-major C(m, n) = alpha * op(A)(m, k) * op(B)(k, n) + beta * C
//   step_gemm(same arguments)             the same, for one time step's rows: row b of C depends only
//                                         on row b of A, and B is one of the layer's weights
//   copy_rows(dst, src, rows, width)      rows x width elements
//   lstm_forward(step, rows)              LstmForwardStep over rows x H
//   lstm_backward(step, rows, hidden_norm, cell_norm)   norms: (rows) or nullptr
//   rnn_forward(step, rows), rnn_backward(step, rows, hidden_norm), sum(step, rows, norm)
//   gru_forward(step, rows), gru_backward(step, rows, hidden_norm)
// The loops allocate nothing: every buffer is passed in. The ops call each loop through
//   run<scalar_t>(steps, batch, width, depth, f)  f() runs the loop of `steps` time steps, which
//                                        multiply up to `batch` rows by a (depth, width) weight; the
//                                        CPU backend may run it on every thread of a team, each
//                                        primitive then doing that thread's share
// so a loop must make the same calls in the same order whatever thread runs it, and every per-step
// primitive (step_gemm, copy_rows, the pointwise steps) must touch only the step's own rows: a team
// may give each thread a fixed part of the batch for the whole sequence.
// The backward ops also use the Backend's
//   mm(a, b)                              a (M, K) @ b (K, N) as a new tensor, for whole-sequence products
//   addmm_(c, a, b)                       c += a @ b
// (layer_ops.h).
#pragma once

#include <algorithm>
#include <cstdint>

#include "steps.h"

namespace lstmfast::kernels {

// A range [begin, end) of rows.
struct Rows {
  int64_t begin, end;
};

// Where each time step lives in the (N, *) row layout (design.md section 3).
struct Sequence {
  const int64_t* batch_sizes;  // (T) sequences alive at each step, non-increasing
  const int64_t* offsets;      // (T) first row of each step
  int64_t steps;               // T
  int64_t batch;               // B
  int64_t rows;                // N
  bool reverse;

  // The k-th step processed by the forward pass, and by the backward pass.
  int64_t forward_step(int64_t k) const { return reverse ? steps - 1 - k : k; }
  int64_t backward_step(int64_t k) const { return reverse ? k : steps - 1 - k; }
  // The step whose states feed step t (-1: none, the initial state does).
  int64_t prev_step(int64_t t) const {
    return reverse ? (t + 1 < steps ? t + 1 : -1) : t - 1;
  }
  // The rows of forward steps k, k+1, ... that fit in `capacity` rows (at least step k's).
  Rows forward_rows(int64_t k, int64_t capacity) const {
    const int64_t first = forward_step(k);
    Rows r{offsets[first], offsets[first] + batch_sizes[first]};
    for (int64_t next = k + 1; next < steps; ++next) {
      const int64_t t = forward_step(next);
      const Rows grown{std::min(r.begin, offsets[t]), std::max(r.end, offsets[t] + batch_sizes[t])};
      if (grown.end - grown.begin > capacity) break;
      r = grown;
    }
    return r;
  }
  // How many of step t's rows take their previous state from prev_step(t); rows from there up
  // to batch_sizes[t] start from the initial state (only in the reverse direction of packed input).
  int64_t prev_rows(int64_t t) const {
    const int64_t p = prev_step(t);
    return p < 0 ? 0 : std::min(batch_sizes[p], batch_sizes[t]);
  }
};

template <typename scalar_t>
struct LstmForwardArgs {
  Sequence seq;
  int64_t input_size, hidden_size, proj_size;  // I, H, P
  const scalar_t* input;   // (N, I)
  const scalar_t* w_ih;    // (4H, I)
  const scalar_t* w_hh;    // (4H, P)
  const scalar_t* w_hr;    // (P, H), or nullptr without projection
  const scalar_t* bias;    // (4H) b_ih + b_hh, or nullptr
  scalar_t* output;        // (N, P)
  scalar_t* hidden_state;  // (B, P): h0 in, h_n out
  scalar_t* cell_state;    // (B, H): c0 in, c_n out
  scalar_t* gates;         // (gate_rows, 4H) workspace; when training (gate_rows = N) activated gates out
  int64_t gate_rows;       // N, or fewer (>= B): the input projection is then made a few steps at a time
  scalar_t* cells;         // (N, H) c_t out when training, else nullptr
  scalar_t* hidden;        // (B, H) scratch for m_t with projection, else nullptr
  bool training;
};

template <typename scalar_t, typename Backend>
void lstm_forward(const LstmForwardArgs<scalar_t>& a, Backend& dev) {
  const Sequence& q = a.seq;
  const int64_t H = a.hidden_size, P = a.proj_size, G = 4 * H;
  int64_t projected_lo = 0, projected_hi = 0;  // the input rows whose projection the workspace holds
  for (int64_t k = 0; k < q.steps; ++k) {
    const int64_t t = q.forward_step(k), rows = q.batch_sizes[t], r0 = q.offsets[t];
    if (r0 < projected_lo || r0 + rows > projected_hi) {
      // x_t W_ih^T for as many of the next steps as the workspace holds (all of them when it has N rows).
      const Rows chunk = q.forward_rows(k, a.gate_rows);
      projected_lo = chunk.begin;
      projected_hi = chunk.end;
      dev.gemm(false, true, chunk.end - chunk.begin, G, a.input_size, 1.0, a.input + chunk.begin * a.input_size,
               a.input_size, a.w_ih, a.input_size, 0.0, a.gates, G);
    }
    scalar_t* gates = a.gates + (r0 - projected_lo) * G;
    dev.step_gemm(false, true, rows, G, P, 1.0, a.hidden_state, P, a.w_hh, P, 1.0, gates, G);
    const bool projected = a.w_hr != nullptr;
    LstmForwardStep<scalar_t> s{H,
                                gates,
                                a.bias,
                                a.cell_state,
                                a.cells != nullptr ? a.cells + r0 * H : nullptr,
                                projected ? a.hidden : a.output + r0 * H,
                                projected ? nullptr : a.hidden_state,
                                a.training};
    dev.lstm_forward(s, rows);
    if (projected) {
      scalar_t* out = a.output + r0 * P;
      dev.step_gemm(false, true, rows, P, H, 1.0, a.hidden, H, a.w_hr, H, 0.0, out, P);
      dev.copy_rows(a.hidden_state, out, rows, P);
    }
  }
}

template <typename scalar_t, typename norm_t>
struct LstmBackwardArgs {
  Sequence seq;
  int64_t hidden_size, proj_size;   // H, P
  const scalar_t* w_hh;             // (4H, P)
  const scalar_t* w_hr;             // (P, H), or nullptr
  const scalar_t* output;           // (N, P) h_t
  const scalar_t* gates;            // (N, 4H) activated gates
  const scalar_t* cells;            // (N, H) c_t
  const scalar_t* hidden_initial;   // (B, P) h0
  const scalar_t* cell_initial;     // (B, H) c0
  const scalar_t* grad_output;      // (N, P)
  scalar_t* grad_hidden_state;      // (B, P): dL/dh_n in, dL/dh0 out
  scalar_t* grad_cell_state;        // (B, H): dL/dc_n in, dL/dc0 out
  scalar_t* grad_gates;             // (N, 4H) out
  scalar_t* hidden_prev;            // (N, P) h_{t-1} of every row out (for dW_hh), or nullptr
  scalar_t* grad_hidden_total;      // (N, P) dL/dh_t out with projection (for dW_hr), else nullptr
  scalar_t* grad_hidden;            // (B, H) scratch for dL/dm_t with projection, else nullptr
  norm_t* grad_hidden_norm;         // (N) ||dL/dh_t|| per row out, or nullptr
  norm_t* grad_cell_norm;           // (N) ||dL/dc_t|| per row out, or nullptr
  double grad_clip;                 // <= 0: none
};

// Where step t's rows find h_{t-1}: the previous step's output rows, then h0 for the rest.
template <typename scalar_t>
PrevHidden<scalar_t> prev_hidden_of(const Sequence& q, int64_t t, int64_t width, const scalar_t* output,
                                    const scalar_t* hidden_initial, scalar_t* hidden_prev) {
  const int64_t p = q.prev_step(t);
  return {width, hidden_prev == nullptr ? nullptr : hidden_prev + q.offsets[t] * width,
          p < 0 ? nullptr : output + q.offsets[p] * width, hidden_initial, q.prev_rows(t)};
}

template <typename scalar_t, typename norm_t, typename Backend>
void lstm_backward(const LstmBackwardArgs<scalar_t, norm_t>& a, Backend& dev) {
  const Sequence& q = a.seq;
  const int64_t H = a.hidden_size, P = a.proj_size, G = 4 * H;
  for (int64_t k = 0; k < q.steps; ++k) {
    const int64_t t = q.backward_step(k), rows = q.batch_sizes[t], r0 = q.offsets[t];
    const int64_t p = q.prev_step(t);
    norm_t* hidden_norm = a.grad_hidden_norm != nullptr ? a.grad_hidden_norm + r0 : nullptr;
    LstmBackwardStep<scalar_t> s{H,
                                 a.gates + r0 * G,
                                 a.cells + r0 * H,
                                 p < 0 ? nullptr : a.cells + q.offsets[p] * H,
                                 a.cell_initial,
                                 q.prev_rows(t),
                                 a.grad_hidden_state,
                                 a.grad_output + r0 * P,
                                 a.grad_cell_state,
                                 a.grad_gates + r0 * G,
                                 a.grad_clip,
                                 prev_hidden_of(q, t, P, a.output, a.hidden_initial, a.hidden_prev)};
    if (a.w_hr != nullptr) {
      // dL/dh_t in full, then dL/dm_t = dL/dh_t * W_hr.
      scalar_t* total = a.grad_hidden_total + r0 * P;
      dev.sum(SumStep<scalar_t>{P, a.grad_hidden_state, a.grad_output + r0 * P, total}, rows,
              hidden_norm);
      dev.step_gemm(false, false, rows, H, P, 1.0, total, P, a.w_hr, H, 0.0, a.grad_hidden, H);
      s.grad_hidden = a.grad_hidden;
      s.grad_hidden_extra = nullptr;
      hidden_norm = nullptr;
    }
    dev.lstm_backward(s, rows, hidden_norm,
                      a.grad_cell_norm != nullptr ? a.grad_cell_norm + r0 : nullptr);
    dev.step_gemm(false, false, rows, P, G, 1.0, s.grad_gates, G, a.w_hh, P, 0.0, a.grad_hidden_state, P);
  }
}

template <typename scalar_t>
struct RnnForwardArgs {
  Sequence seq;
  int64_t input_size, hidden_size;  // I, H
  const scalar_t* input;            // (N, I)
  const scalar_t* w_ih;             // (H, I)
  const scalar_t* w_hh;             // (H, H)
  const scalar_t* bias;             // (H) b_ih + b_hh, or nullptr
  scalar_t* output;                 // (N, H): pre-activations, then h_t
  scalar_t* hidden_state;           // (B, H): h0 in, h_n out
  Nonlinearity nonlinearity;
};

template <typename scalar_t, typename Backend>
void rnn_forward(const RnnForwardArgs<scalar_t>& a, Backend& dev) {
  const Sequence& q = a.seq;
  const int64_t H = a.hidden_size;
  dev.gemm(false, true, q.rows, H, a.input_size, 1.0, a.input, a.input_size, a.w_ih, a.input_size,
           0.0, a.output, H);
  for (int64_t k = 0; k < q.steps; ++k) {
    const int64_t t = q.forward_step(k), rows = q.batch_sizes[t];
    scalar_t* out = a.output + q.offsets[t] * H;
    dev.step_gemm(false, true, rows, H, H, 1.0, a.hidden_state, H, a.w_hh, H, 1.0, out, H);
    dev.rnn_forward(RnnForwardStep<scalar_t>{H, out, a.bias, a.hidden_state, a.nonlinearity}, rows);
  }
}

template <typename scalar_t, typename norm_t>
struct RnnBackwardArgs {
  Sequence seq;
  int64_t hidden_size;              // H
  const scalar_t* w_hh;             // (H, H)
  const scalar_t* output;           // (N, H) h_t
  const scalar_t* hidden_initial;   // (B, H) h0
  const scalar_t* grad_output;      // (N, H)
  scalar_t* grad_hidden_state;      // (B, H): dL/dh_n in, dL/dh0 out
  scalar_t* grad_pre;               // (N, H) out
  scalar_t* hidden_prev;            // (N, H) h_{t-1} of every row out, or nullptr
  norm_t* grad_hidden_norm;         // (N) or nullptr
  Nonlinearity nonlinearity;
  double grad_clip;
};

template <typename scalar_t, typename norm_t, typename Backend>
void rnn_backward(const RnnBackwardArgs<scalar_t, norm_t>& a, Backend& dev) {
  const Sequence& q = a.seq;
  const int64_t H = a.hidden_size;
  for (int64_t k = 0; k < q.steps; ++k) {
    const int64_t t = q.backward_step(k), rows = q.batch_sizes[t], r0 = q.offsets[t];
    RnnBackwardStep<scalar_t> s{H,
                                a.output + r0 * H,
                                a.grad_hidden_state,
                                a.grad_output + r0 * H,
                                a.grad_pre + r0 * H,
                                a.nonlinearity,
                                a.grad_clip,
                                prev_hidden_of(q, t, H, a.output, a.hidden_initial, a.hidden_prev)};
    dev.rnn_backward(s, rows, a.grad_hidden_norm != nullptr ? a.grad_hidden_norm + r0 : nullptr);
    dev.step_gemm(false, false, rows, H, H, 1.0, s.grad_pre, H, a.w_hh, H, 0.0, a.grad_hidden_state, H);
  }
}

template <typename scalar_t>
struct GruForwardArgs {
  Sequence seq;
  int64_t input_size, hidden_size;  // I, H
  const scalar_t* input;            // (N, I)
  const scalar_t* w_ih;             // (3H, I)
  const scalar_t* w_hh;             // (3H, H)
  const scalar_t* b_ih;             // (3H), or nullptr
  const scalar_t* b_hh;             // (3H), or nullptr
  scalar_t* output;                 // (N, H)
  scalar_t* hidden_state;           // (B, H): h0 in, h_n out
  scalar_t* gates;                  // (gate_rows, 4H) workspace; when training (gate_rows = N) r, z, n, h_n out
  int64_t gate_rows;                // N, or fewer (>= B): the input projection is then made a few steps at a time
  scalar_t* hidden_gates;           // (B, 3H) scratch for h_{t-1} W_hh^T
  bool training;
};

// The recurrent product goes to its own scratch rather than being added to the input projection:
// the reset gate multiplies only its n-block (and backward needs that block apart).
template <typename scalar_t, typename Backend>
void gru_forward(const GruForwardArgs<scalar_t>& a, Backend& dev) {
  const Sequence& q = a.seq;
  const int64_t H = a.hidden_size, G = 4 * H;
  int64_t projected_lo = 0, projected_hi = 0;  // the input rows whose projection the workspace holds
  for (int64_t k = 0; k < q.steps; ++k) {
    const int64_t t = q.forward_step(k), rows = q.batch_sizes[t], r0 = q.offsets[t];
    if (r0 < projected_lo || r0 + rows > projected_hi) {
      // x_t W_ih^T into columns [0, 3H) for as many of the next steps as the workspace holds.
      const Rows chunk = q.forward_rows(k, a.gate_rows);
      projected_lo = chunk.begin;
      projected_hi = chunk.end;
      dev.gemm(false, true, chunk.end - chunk.begin, 3 * H, a.input_size, 1.0,
               a.input + chunk.begin * a.input_size, a.input_size, a.w_ih, a.input_size, 0.0, a.gates, G);
    }
    dev.step_gemm(false, true, rows, 3 * H, H, 1.0, a.hidden_state, H, a.w_hh, H, 0.0, a.hidden_gates,
                  3 * H);
    GruForwardStep<scalar_t> s{H,
                               a.gates + (r0 - projected_lo) * G,
                               a.hidden_gates,
                               a.b_ih,
                               a.b_hh,
                               a.hidden_state,
                               a.output + r0 * H,
                               a.training};
    dev.gru_forward(s, rows);
  }
}

template <typename scalar_t, typename norm_t>
struct GruBackwardArgs {
  Sequence seq;
  int64_t hidden_size;              // H
  const scalar_t* w_hh;             // (3H, H)
  const scalar_t* output;           // (N, H) h_t
  const scalar_t* gates;            // (N, 4H) r, z, n, h_n
  const scalar_t* hidden_initial;   // (B, H) h0
  const scalar_t* grad_output;      // (N, H)
  scalar_t* grad_hidden_state;      // (B, H): dL/dh_n in, dL/dh0 out
  scalar_t* grad_input_gates;       // (N, 3H) da_x out
  scalar_t* grad_hidden_gates;      // (N, 3H) da_h out
  scalar_t* hidden_prev;            // (N, H) h_{t-1} of every row out (for dW_hh), or nullptr
  norm_t* grad_hidden_norm;         // (N) ||dL/dh_t|| per row out, or nullptr
  double grad_clip;                 // <= 0: none
};

template <typename scalar_t, typename norm_t, typename Backend>
void gru_backward(const GruBackwardArgs<scalar_t, norm_t>& a, Backend& dev) {
  const Sequence& q = a.seq;
  const int64_t H = a.hidden_size;
  for (int64_t k = 0; k < q.steps; ++k) {
    const int64_t t = q.backward_step(k), rows = q.batch_sizes[t], r0 = q.offsets[t];
    GruBackwardStep<scalar_t> s{H,
                                a.gates + r0 * 4 * H,
                                a.grad_hidden_state,
                                a.grad_output + r0 * H,
                                a.grad_input_gates + r0 * 3 * H,
                                a.grad_hidden_gates + r0 * 3 * H,
                                a.grad_clip,
                                prev_hidden_of(q, t, H, a.output, a.hidden_initial, a.hidden_prev)};
    dev.gru_backward(s, rows, a.grad_hidden_norm != nullptr ? a.grad_hidden_norm + r0 : nullptr);
    // dL/dh_{t-1} = dh_t * z (written above) + da_h W_hh.
    dev.step_gemm(false, false, rows, H, 3 * H, 1.0, s.grad_hidden_gates, 3 * H, a.w_hh, H, 1.0,
                  a.grad_hidden_state, H);
  }
}

}  // namespace lstmfast::kernels

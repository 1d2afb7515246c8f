// One time step's pointwise work, as plain structs of pointers, and the per-element functions that do it.
// The CPU backend loops over (row b, column j); the CUDA backend runs one thread per (b, j).
//
// Shape legend used throughout lstmfast: T steps, B batch, I input size, H hidden size,
// P projection size (P == H without projection), N = total rows = sum(batch_sizes).
// "rows" below is the number of sequences alive at this step (batch_sizes[t]); a pointer marked
// "(rows, X)" points at row 0 of that step and has row stride X.
#pragma once

#include "cells.h"

namespace lstmfast::kernels {

template <typename scalar_t>
struct LstmForwardStep {
  int64_t hidden_size;      // H
  scalar_t* gates;          // (rows, 4H) pre-activations without bias in; activated gates out if save_gates
  const scalar_t* bias;     // (4H) b_ih + b_hh, or nullptr
  scalar_t* cell_state;     // (rows, H) running state: c_{t-1} in, c_t out
  scalar_t* cells;          // (rows, H) c_t saved for backward, or nullptr (inference)
  scalar_t* hidden;         // (rows, H) m_t: the output rows, or the projection's input
  scalar_t* hidden_state;   // (rows, H) running state h_t, or nullptr (projection writes it)
  bool save_gates;
};

template <typename scalar_t, typename acc_t>
LSTMFAST_HD void lstm_forward_point(const LstmForwardStep<scalar_t>& s, int64_t b, int64_t j) {
  const int64_t H = s.hidden_size;
  scalar_t* a = s.gates + b * 4 * H;
  acc_t a_i = a[j], a_f = a[H + j], a_g = a[2 * H + j], a_o = a[3 * H + j];
  if (s.bias != nullptr) {
    a_i += acc_t(s.bias[j]);
    a_f += acc_t(s.bias[H + j]);
    a_g += acc_t(s.bias[2 * H + j]);
    a_o += acc_t(s.bias[3 * H + j]);
  }
  const int64_t e = b * H + j;
  const auto r = lstm_cell_forward<acc_t>(a_i, a_f, a_g, a_o, acc_t(s.cell_state[e]));
  if (s.save_gates) {
    a[j] = r.i;
    a[H + j] = r.f;
    a[2 * H + j] = r.g;
    a[3 * H + j] = r.o;
  }
  s.cell_state[e] = r.cell;
  if (s.cells != nullptr) s.cells[e] = r.cell;
  s.hidden[e] = r.hidden;
  if (s.hidden_state != nullptr) s.hidden_state[e] = r.hidden;
}

// Collects h_{t-1} of a step's rows, for the whole-sequence GEMM dW_hh = sum_t da_t^T h_{t-1}.
template <typename scalar_t>
struct PrevHidden {
  int64_t width;               // P
  scalar_t* out;               // (rows, P) h_{t-1} of this step's rows, or nullptr (not needed)
  const scalar_t* from_prev;   // (split, P) the previous step's h rows
  const scalar_t* initial;     // (B, P) h0, for rows b >= split
  int64_t split;
};

template <typename scalar_t>
LSTMFAST_HD void prev_hidden_point(const PrevHidden<scalar_t>& s, int64_t b, int64_t j) {
  if (s.out == nullptr || j >= s.width) return;
  const int64_t e = b * s.width + j;
  s.out[e] = b < s.split ? s.from_prev[e] : s.initial[e];
}

template <typename scalar_t>
struct LstmBackwardStep {
  int64_t hidden_size;              // H
  const scalar_t* gates;            // (rows, 4H) activated gates of this step
  const scalar_t* cells;            // (rows, H) c_t
  const scalar_t* cell_prev;        // (split, H) c_{t-1} of rows b < split (the previous step's rows)
  const scalar_t* cell_initial;     // (B, H) c0: c_{t-1} of rows b >= split
  int64_t split;
  const scalar_t* grad_hidden;      // (rows, H) dL/dm_t (or its part from later steps)
  const scalar_t* grad_hidden_extra;// (rows, H) the part from this step's output, or nullptr
  scalar_t* grad_cell_state;        // (rows, H) running dL/dc: from later steps in, dL/dc_{t-1} out
  scalar_t* grad_gates;             // (rows, 4H) dL/d(pre-activations) out
  double grad_clip;                 // <= 0: no clipping
  PrevHidden<scalar_t> prev_hidden; // width P <= H
};

template <typename acc_t>
struct SquaredNorms {
  acc_t hidden, cell;
};

// Returns the squares of dL/dm_t and dL/dc_t at this element, for per-step gradient norms.
template <typename scalar_t, typename acc_t>
LSTMFAST_HD SquaredNorms<acc_t> lstm_backward_point(const LstmBackwardStep<scalar_t>& s, int64_t b,
                                                    int64_t j) {
  const int64_t H = s.hidden_size;
  const scalar_t* a = s.gates + b * 4 * H;
  const int64_t e = b * H + j;
  acc_t grad_hidden = s.grad_hidden[e];
  if (s.grad_hidden_extra != nullptr) grad_hidden += acc_t(s.grad_hidden_extra[e]);
  const acc_t cell_prev = b < s.split ? acc_t(s.cell_prev[e]) : acc_t(s.cell_initial[e]);
  const auto r = lstm_cell_backward<acc_t>(a[j], a[H + j], a[2 * H + j], a[3 * H + j], s.cells[e],
                                           cell_prev, grad_hidden, acc_t(s.grad_cell_state[e]),
                                           acc_t(s.grad_clip));
  scalar_t* d = s.grad_gates + b * 4 * H;
  d[j] = r.a_i;
  d[H + j] = r.a_f;
  d[2 * H + j] = r.a_g;
  d[3 * H + j] = r.a_o;
  s.grad_cell_state[e] = r.cell_prev;
  prev_hidden_point(s.prev_hidden, b, j);
  return {grad_hidden * grad_hidden, r.cell * r.cell};
}

template <typename scalar_t>
struct RnnForwardStep {
  int64_t hidden_size;     // H
  scalar_t* hidden;        // (rows, H) pre-activations without bias in, h_t out (the output rows)
  const scalar_t* bias;    // (H) b_ih + b_hh, or nullptr
  scalar_t* hidden_state;  // (rows, H) running state h_t
  Nonlinearity nonlinearity;
};

template <typename scalar_t, typename acc_t>
LSTMFAST_HD void rnn_forward_point(const RnnForwardStep<scalar_t>& s, int64_t b, int64_t j) {
  const int64_t e = b * s.hidden_size + j;
  acc_t a = s.hidden[e];
  if (s.bias != nullptr) a += acc_t(s.bias[j]);
  const scalar_t h = rnn_activation(a, s.nonlinearity);
  s.hidden[e] = h;
  s.hidden_state[e] = h;
}

template <typename scalar_t>
struct RnnBackwardStep {
  int64_t hidden_size;               // H
  const scalar_t* hidden;            // (rows, H) h_t (the output rows)
  const scalar_t* grad_hidden;       // (rows, H) dL/dh_t from later steps
  const scalar_t* grad_hidden_extra; // (rows, H) dL/dh_t from this step's output
  scalar_t* grad_pre;                // (rows, H) dL/d(pre-activation) out
  Nonlinearity nonlinearity;
  double grad_clip;                  // <= 0: no clipping
  PrevHidden<scalar_t> prev_hidden;  // width H
};

// Returns the square of dL/dh_t at this element.
template <typename scalar_t, typename acc_t>
LSTMFAST_HD acc_t rnn_backward_point(const RnnBackwardStep<scalar_t>& s, int64_t b, int64_t j) {
  const int64_t e = b * s.hidden_size + j;
  const acc_t grad_hidden = acc_t(s.grad_hidden[e]) + acc_t(s.grad_hidden_extra[e]);
  const acc_t d = rnn_pre_activation_grad(grad_hidden, acc_t(s.hidden[e]), s.nonlinearity);
  s.grad_pre[e] = clip(d, acc_t(s.grad_clip));
  prev_hidden_point(s.prev_hidden, b, j);
  return grad_hidden * grad_hidden;
}

template <typename scalar_t>
struct GruForwardStep {
  int64_t hidden_size;           // H
  scalar_t* gates;               // (rows, 4H) x_t W_ih^T in columns [0, 3H) (no bias); when save_gates
                                 // r, z, n, h_n out (h_n = W_hn h_{t-1} + b_hn)
  const scalar_t* hidden_gates;  // (rows, 3H) h_{t-1} W_hh^T (no bias)
  const scalar_t* bias_ih;       // (3H) b_ih, or nullptr
  const scalar_t* bias_hh;       // (3H) b_hh, or nullptr
  scalar_t* hidden_state;        // (rows, H) running state: h_{t-1} in, h_t out
  scalar_t* output;              // (rows, H) h_t: the output rows
  bool save_gates;
};

// GRU element j's cell from the products' parts x_* = (x_t W_i*^T)_j and h_* = (h_{t-1} W_h*^T)_j
// of the gates r, z, n, after adding b_i* and b_h* (each (3H), or nullptr): the time loop's step and
// the persistent kernels (cuda/persistent_body.h) both compute it here.
template <typename acc_t, typename bias_t>
LSTMFAST_HD GruCellOut<acc_t> gru_point_cell(acc_t x_r, acc_t x_z, acc_t x_n, acc_t h_r, acc_t h_z, acc_t h_n,
                                            const bias_t* bias_ih, const bias_t* bias_hh, int64_t H, int64_t j,
                                            acc_t hidden_prev) {
  if (bias_ih != nullptr) {
    x_r += acc_t(bias_ih[j]);
    x_z += acc_t(bias_ih[H + j]);
    x_n += acc_t(bias_ih[2 * H + j]);
  }
  if (bias_hh != nullptr) {
    h_r += acc_t(bias_hh[j]);
    h_z += acc_t(bias_hh[H + j]);
    h_n += acc_t(bias_hh[2 * H + j]);
  }
  return gru_cell_forward<acc_t>(x_r, x_z, x_n, h_r, h_z, h_n, hidden_prev);
}

// What the backward reads of GRU element j: r, z, n and h_n in the four H-wide blocks of its gates row.
template <typename scalar_t, typename acc_t>
LSTMFAST_HD void store_gru_gates(scalar_t* a, int64_t H, int64_t j, const GruCellOut<acc_t>& o) {
  a[j] = scalar_t(o.r);
  a[H + j] = scalar_t(o.z);
  a[2 * H + j] = scalar_t(o.n);
  a[3 * H + j] = scalar_t(o.hidden_n);
}

template <typename scalar_t, typename acc_t>
LSTMFAST_HD void gru_forward_point(const GruForwardStep<scalar_t>& s, int64_t b, int64_t j) {
  const int64_t H = s.hidden_size;
  scalar_t* a = s.gates + b * 4 * H;
  const scalar_t* h = s.hidden_gates + b * 3 * H;
  const int64_t e = b * H + j;
  const auto o = gru_point_cell<acc_t>(acc_t(a[j]), acc_t(a[H + j]), acc_t(a[2 * H + j]), acc_t(h[j]),
                                       acc_t(h[H + j]), acc_t(h[2 * H + j]), s.bias_ih, s.bias_hh, H, j,
                                       acc_t(s.hidden_state[e]));
  if (s.save_gates) store_gru_gates(a, H, j, o);
  s.output[e] = o.hidden;
  s.hidden_state[e] = o.hidden;
}

template <typename scalar_t>
struct GruBackwardStep {
  int64_t hidden_size;               // H
  const scalar_t* gates;             // (rows, 4H) r, z, n, h_n of this step
  scalar_t* grad_hidden;             // (rows, H) running dL/dh: from later steps in, dh_t * z out
                                     // (the step GEMM then adds da_h W_hh)
  const scalar_t* grad_hidden_extra; // (rows, H) dL/dh_t from this step's output
  scalar_t* grad_input_gates;        // (rows, 3H) da_x = dL/d(x W_ih^T + b_ih) out
  scalar_t* grad_hidden_gates;       // (rows, 3H) da_h = dL/d(h_{t-1} W_hh^T + b_hh) out
  double grad_clip;                  // <= 0: no clipping
  PrevHidden<scalar_t> prev_hidden;  // width H: where h_{t-1} is read (from_prev, initial, split),
                                     // and collected to when out is not nullptr
};

// GRU element j's gradients: da_x into dx and da_h into dh (rows of 3H, blocks r, z, n; da_h's n block
// is dL/dh_n = a_n * r). The time loop's step and the persistent kernels both write them here.
template <typename scalar_t, typename acc_t>
LSTMFAST_HD void store_gru_grads(scalar_t* dx, scalar_t* dh, int64_t H, int64_t j, const GruCellGrad<acc_t>& g) {
  dx[j] = scalar_t(g.a_r);
  dx[H + j] = scalar_t(g.a_z);
  dx[2 * H + j] = scalar_t(g.a_n);
  dh[j] = scalar_t(g.a_r);
  dh[H + j] = scalar_t(g.a_z);
  dh[2 * H + j] = scalar_t(g.hidden_n);
}

// Returns the square of dL/dh_t at this element.
template <typename scalar_t, typename acc_t>
LSTMFAST_HD acc_t gru_backward_point(const GruBackwardStep<scalar_t>& s, int64_t b, int64_t j) {
  const int64_t H = s.hidden_size;
  const scalar_t* a = s.gates + b * 4 * H;
  const int64_t e = b * H + j;
  const acc_t grad_hidden = acc_t(s.grad_hidden[e]) + acc_t(s.grad_hidden_extra[e]);
  const PrevHidden<scalar_t>& p = s.prev_hidden;
  const acc_t hidden_prev = b < p.split ? acc_t(p.from_prev[e]) : acc_t(p.initial[e]);
  const auto g = gru_cell_backward<acc_t>(a[j], a[H + j], a[2 * H + j], a[3 * H + j], hidden_prev,
                                          grad_hidden, acc_t(s.grad_clip));
  store_gru_grads(s.grad_input_gates + b * 3 * H, s.grad_hidden_gates + b * 3 * H, H, j, g);
  s.grad_hidden[e] = g.hidden_prev;
  prev_hidden_point(p, b, j);
  return grad_hidden * grad_hidden;
}

// out = x + y elementwise over (rows, width); used to total dL/dh_t before a projection's backward.
template <typename scalar_t>
struct SumStep {
  int64_t width;
  const scalar_t* x;  // (rows, width)
  const scalar_t* y;  // (rows, width)
  scalar_t* out;      // (rows, width)
};

template <typename scalar_t, typename acc_t>
LSTMFAST_HD acc_t sum_point(const SumStep<scalar_t>& s, int64_t b, int64_t j) {
  const int64_t e = b * s.width + j;
  const acc_t v = acc_t(s.x[e]) + acc_t(s.y[e]);
  s.out[e] = v;
  return v * v;
}

}  // namespace lstmfast::kernels

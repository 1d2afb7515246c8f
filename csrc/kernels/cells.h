// Pointwise math of one LSTM / GRU / Elman-RNN cell element, shared by the CPU and CUDA kernels.
//
// Gate order is PyTorch's: i, f, g, o. Every backward function works from saved activations
// (gates after sigma/tanh, cell states, outputs), never by recomputing pre-activations.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LSTMFAST_HD __host__ __device__ __forceinline__
#else
#define LSTMFAST_HD inline
#endif

namespace lstmfast::kernels {

LSTMFAST_HD float exp_(float x) { return ::expf(x); }
LSTMFAST_HD double exp_(double x) { return ::exp(x); }
LSTMFAST_HD float tanh_(float x) { return ::tanhf(x); }
LSTMFAST_HD double tanh_(double x) { return ::tanh(x); }

template <typename acc_t>
LSTMFAST_HD acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + exp_(-x));
}

// grad_clip <= 0 means "no clipping"; clipping bounds each gate-gradient element to [-c, c].
template <typename acc_t>
LSTMFAST_HD acc_t clip(acc_t x, acc_t c) {
  if (c <= acc_t(0)) return x;
  return x > c ? c : (x < -c ? -c : x);
}

template <typename acc_t>
struct LstmCellOut {
  acc_t i, f, g, o;  // activated gates
  acc_t cell;        // c_t
  acc_t hidden;      // m_t = o * tanh(c_t)
};

// One LSTM element from its four pre-activations (biases already added) and c_{t-1}.
template <typename acc_t>
LSTMFAST_HD LstmCellOut<acc_t> lstm_cell_forward(acc_t a_i, acc_t a_f, acc_t a_g, acc_t a_o,
                                                 acc_t cell_prev) {
  LstmCellOut<acc_t> r;
  r.i = sigmoid(a_i);
  r.f = sigmoid(a_f);
  r.g = tanh_(a_g);
  r.o = sigmoid(a_o);
  r.cell = r.f * cell_prev + r.i * r.g;
  r.hidden = r.o * tanh_(r.cell);
  return r;
}

template <typename acc_t>
struct LstmCellGrad {
  acc_t a_i, a_f, a_g, a_o;  // dL/d(pre-activations), clipped when asked
  acc_t cell;                // dL/dc_t, total (from the next step and from this step's output)
  acc_t cell_prev;           // dL/dc_{t-1} through this step
};

// Backward of one LSTM element. grad_hidden = dL/dm_t (total), grad_cell_next = dL/dc_t arriving from
// step t+1 (in processing order).
template <typename acc_t>
LSTMFAST_HD LstmCellGrad<acc_t> lstm_cell_backward(acc_t i, acc_t f, acc_t g, acc_t o, acc_t cell,
                                                   acc_t cell_prev, acc_t grad_hidden,
                                                   acc_t grad_cell_next, acc_t grad_clip) {
  const acc_t one(1);
  const acc_t tanh_cell = tanh_(cell);
  LstmCellGrad<acc_t> r;
  r.cell = grad_cell_next + grad_hidden * o * (one - tanh_cell * tanh_cell);
  r.a_i = clip(r.cell * g * i * (one - i), grad_clip);
  r.a_f = clip(r.cell * cell_prev * f * (one - f), grad_clip);
  r.a_g = clip(r.cell * i * (one - g * g), grad_clip);
  r.a_o = clip(grad_hidden * tanh_cell * o * (one - o), grad_clip);
  r.cell_prev = r.cell * f;
  return r;
}

template <typename acc_t>
struct GruCellOut {
  acc_t r, z, n;      // activated gates
  acc_t hidden_n;     // W_hn h_{t-1} + b_hn, the recurrent part of n's pre-activation (saved for backward)
  acc_t hidden;       // h_t
};

// One GRU element (gate order r, z, n) from the input part x_* = W_i* x_t + b_i* and the recurrent part
// h_* = W_h* h_{t-1} + b_h* of each pre-activation, and h_{t-1}. The reset gate scales only h_n.
template <typename acc_t>
LSTMFAST_HD GruCellOut<acc_t> gru_cell_forward(acc_t x_r, acc_t x_z, acc_t x_n, acc_t h_r, acc_t h_z,
                                               acc_t h_n, acc_t hidden_prev) {
  const acc_t one(1);
  GruCellOut<acc_t> o;
  o.r = sigmoid(x_r + h_r);
  o.z = sigmoid(x_z + h_z);
  o.n = tanh_(x_n + o.r * h_n);
  o.hidden_n = h_n;
  o.hidden = (one - o.z) * o.n + o.z * hidden_prev;
  return o;
}

template <typename acc_t>
struct GruCellGrad {
  acc_t a_r, a_z, a_n;  // dL/d(pre-activations of r, z and n = x_n + r * h_n), clipped when asked
  acc_t hidden_n;       // dL/dh_n = a_n * r: the n-block of the recurrent part's gradient
  acc_t hidden_prev;    // dL/dh_{t-1} through the z-gate path (dh * z); W_hh^T da_h is added apart
};

// Backward of one GRU element from its saved activations. grad_hidden = dL/dh_t (total). The clip
// applies to a_n before it reaches r, as autograd's hooks on the three pre-activations do. dL/dn is
// dh - dh z, as torch.nn's cell (h_t = n + z (h_{t-1} - n)) has it: an infinite dh gives NaN there, as
// under torch.nn, where dh (1 - z) would give an infinity.
template <typename acc_t>
LSTMFAST_HD GruCellGrad<acc_t> gru_cell_backward(acc_t r, acc_t z, acc_t n, acc_t hidden_n,
                                                 acc_t hidden_prev, acc_t grad_hidden, acc_t grad_clip) {
  const acc_t one(1);
  GruCellGrad<acc_t> g;
  g.a_n = clip((grad_hidden - grad_hidden * z) * (one - n * n), grad_clip);
  g.a_z = clip(grad_hidden * (hidden_prev - n) * z * (one - z), grad_clip);
  g.a_r = clip(g.a_n * hidden_n * r * (one - r), grad_clip);
  g.hidden_n = g.a_n * r;
  g.hidden_prev = grad_hidden * z;
  return g;
}

enum class Nonlinearity : int { Tanh = 0, Relu = 1 };

// relu is written so that NaN passes through (NaN < 0 is false), as torch.relu does.
template <typename acc_t>
LSTMFAST_HD acc_t rnn_activation(acc_t a, Nonlinearity nl) {
  if (nl == Nonlinearity::Tanh) return tanh_(a);
  return a < acc_t(0) ? acc_t(0) : a;
}

// dL/da from dL/dh, phi'(a) expressed through the saved output h = phi(a). For relu, as torch's
// threshold_backward selects rather than multiplies: zero where h <= 0 even for a NaN or infinite
// gradient, which passes unchanged elsewhere (a NaN output included).
template <typename acc_t>
LSTMFAST_HD acc_t rnn_pre_activation_grad(acc_t grad_hidden, acc_t h, Nonlinearity nl) {
  if (nl == Nonlinearity::Tanh) return grad_hidden * (acc_t(1) - h * h);
  return h <= acc_t(0) ? acc_t(0) : grad_hidden;
}

}  // namespace lstmfast::kernels

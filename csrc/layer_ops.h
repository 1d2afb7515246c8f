// The six lstmfast ops (LSTM / GRU / RNN, forward / backward) for any device: argument checks, output
// allocation, dtype dispatch, then the shared time loops of kernels/layer.h run on a Backend.
// cpu/ops_cpu.cpp and cuda/ops_cuda.cu instantiate these with their Backend and register them.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>

#include <array>
#include <cstdio>

#include <optional>
#include <string_view>
#include <tuple>
#include <vector>

#include "cpu/workspace_cache.h"
#include "kernels/layer.h"

namespace lstmfast {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---------------------------------------------------------------- checks

// Error messages format numbers, shapes, dtypes and devices into strings here instead of streaming
// them: a GPU machine's g++ instantiated libstdc++'s numeric stream insertion inside the extension,
// and that copy crashed the process on the first message with a number in it.
inline std::string str(int64_t v) { return std::to_string(v); }
inline std::string str(double v) {
  char buffer[32];
  std::snprintf(buffer, sizeof(buffer), "%g", v);
  return buffer;
}
inline std::string str(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}
inline std::string str(at::ScalarType t) { return c10::toString(t); }
inline std::string str(const c10::Device& d) { return d.str(); }

inline void check_like(const char* op, const Tensor& t, const char* name, const Tensor& input) {
  TORCH_CHECK(t.device() == input.device(), op, ": expected ", name, " on device ",
              str(input.device()), " (the device of input), but got ", str(t.device()));
  TORCH_CHECK(t.scalar_type() == input.scalar_type(), op, ": expected ", name, " to have dtype ",
              str(input.scalar_type()), " (the dtype of input), but got ", str(t.scalar_type()));
}

inline void check_shape(const char* op, const Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected, op, ": expected ", name, " of shape ", str(expected),
              ", but got ", str(t.sizes()));
}

// A backward op's (T, B, width) or (N, width) per-row tensor: like input, `rows` rows of `width`.
// Its whole shape is checked: a (B, T, width) tensor for a (T, B, ...) input has the same rows and
// width, and read as (T, B, width) it would give wrong gradients, not an error.
inline void check_rows(const char* op, const Tensor& t, const char* name, const Tensor& input, int64_t rows,
                       int64_t width) {
  check_like(op, t, name, input);
  if (input.dim() == 3) {
    check_shape(op, t, name, {input.size(0), input.size(1), width});
  } else {
    check_shape(op, t, name, {rows, width});
  }
}

inline void check_optional(const char* op, const OptTensor& t, const char* name, const Tensor& input,
                           at::IntArrayRef expected) {
  if (!t.has_value()) return;
  check_like(op, *t, name, input);
  check_shape(op, *t, name, expected);
}

template <typename Backend>
void check_dtype(const char* op, const Tensor& input) {
  const auto t = input.scalar_type();
  const bool ok = t == at::kFloat || t == at::kDouble ||
                  (Backend::kReducedPrecision && (t == at::kHalf || t == at::kBFloat16));
  TORCH_CHECK(ok, op, ": expected input of dtype ", Backend::kDtypes, " on ",
              c10::DeviceTypeName(input.device().type(), /*lower_case=*/true), ", but got ", str(t));
}

// The most rows one op takes: BLAS sizes and leading dimensions are 32-bit ints.
constexpr int64_t kMaxRows = 2147483647;

// The row layout of design.md section 3, owned on the host.
struct Layout {
  std::vector<int64_t> batch_sizes, offsets;
  int64_t batch = 0, rows = 0, input_size = 0;
  bool reverse = false;

  // Every step has the whole batch (padded input): step t's rows are then one block of B rows.
  bool uniform() const { return batch_sizes.empty() || batch_sizes.front() == batch_sizes.back(); }

  // A view for the kernels; valid while this Layout lives and is not modified.
  kernels::Sequence sequence() const {
    return {batch_sizes.data(), offsets.data(), static_cast<int64_t>(batch_sizes.size()), batch, rows,
            reverse};
  }
};

inline Layout make_layout(const char* op, const Tensor& input, const OptTensor& batch_sizes,
                          bool reverse) {
  Layout l;
  if (!batch_sizes.has_value()) {
    TORCH_CHECK(input.dim() == 3, op, ": expected input of shape (T, B, I) (3-D) when batch_sizes "
                "is not given, but got a ", str(input.dim()), "-D tensor of shape ", str(input.sizes()));
    const int64_t T = input.size(0), B = input.size(1);
    l.batch_sizes.assign(T, B);
    l.input_size = input.size(2);
  } else {
    const Tensor& bs = *batch_sizes;
    TORCH_CHECK(input.dim() == 2, op, ": expected input of shape (N, I) (2-D, packed rows) when "
                "batch_sizes is given, but got a ", str(input.dim()), "-D tensor of shape ",
                str(input.sizes()));
    TORCH_CHECK(bs.dim() == 1 && bs.scalar_type() == at::kLong && bs.device().is_cpu(), op,
                ": expected batch_sizes to be a 1-D int64 tensor on the CPU, but got a ",
                str(bs.dim()), "-D ", str(bs.scalar_type()), " tensor on ", str(bs.device()));
    const Tensor c = bs.contiguous();
    const int64_t* p = c.data_ptr<int64_t>();
    l.batch_sizes.assign(p, p + c.numel());
    for (int64_t t = 0; t < static_cast<int64_t>(l.batch_sizes.size()); ++t) {
      TORCH_CHECK(l.batch_sizes[t] >= 1, op, ": expected every batch_sizes entry to be positive, but "
                  "batch_sizes[", str(t), "] = ", str(l.batch_sizes[t]));
      TORCH_CHECK(t == 0 || l.batch_sizes[t] <= l.batch_sizes[t - 1], op, ": expected batch_sizes "
                  "to be non-increasing, but batch_sizes[", str(t), "] = ", str(l.batch_sizes[t]),
                  " > batch_sizes[", str(t - 1), "] = ", str(l.batch_sizes[t - 1]));
    }
    l.input_size = input.size(1);
  }
  l.offsets.resize(l.batch_sizes.size());
  int64_t rows = 0;
  for (size_t t = 0; t < l.batch_sizes.size(); ++t) {
    l.offsets[t] = rows;
    TORCH_CHECK(!__builtin_add_overflow(rows, l.batch_sizes[t], &rows), op,
                ": expected sum(batch_sizes) to fit in int64, but it overflows at batch_sizes[",
                str(static_cast<int64_t>(t)), "] = ", str(l.batch_sizes[t]));
  }
  if (batch_sizes.has_value()) {
    TORCH_CHECK(rows == input.size(0), op, ": expected input to have sum(batch_sizes) = ", str(rows),
                " rows, but got ", str(input.size(0)));
  }
  // The CPU BLAS (LP64) and cuBLAS take 32-bit sizes; offsets and element indices are 64-bit.
  TORCH_CHECK(rows <= kMaxRows, op, ": expected at most ", str(kMaxRows),
              " rows (sum(batch_sizes), or T*B), the largest size BLAS accepts, but got ", str(rows));
  l.batch = !l.batch_sizes.empty() ? l.batch_sizes[0] : (input.dim() == 3 ? input.size(1) : 0);
  l.rows = rows;
  l.reverse = reverse;
  return l;
}

// The shape of a forward output of `width` columns: (T, B, width) or (N, width), like input.
inline std::vector<int64_t> output_shape(const Tensor& input, int64_t rows, int64_t width) {
  if (input.dim() == 3) return {input.size(0), input.size(1), width};
  return {rows, width};
}

inline Tensor rows_of(const Tensor& t, int64_t width) {
  return t.contiguous().view({-1, width});
}

// b_ih + b_hh, whichever are given.
inline OptTensor combined_bias(const OptTensor& b_ih, const OptTensor& b_hh) {
  if (b_ih.has_value() && b_hh.has_value()) return *b_ih + *b_hh;
  if (b_ih.has_value()) return b_ih->contiguous();
  if (b_hh.has_value()) return b_hh->contiguous();
  return std::nullopt;
}

inline Tensor state_or_zeros(const OptTensor& t, int64_t batch, int64_t width, const Tensor& like) {
  if (t.has_value()) return t->contiguous().clone();
  return at::zeros({batch, width}, like.options());
}

template <typename T>
T* ptr_or_null(const OptTensor& t) {
  return t.has_value() ? t->data_ptr<T>() : nullptr;
}

inline kernels::Nonlinearity parse_nonlinearity(const char* op, std::string_view name) {
  if (name == "tanh") return kernels::Nonlinearity::Tanh;
  if (name == "relu") return kernels::Nonlinearity::Relu;
  TORCH_CHECK(false, op, ": expected nonlinearity 'tanh' or 'relu', but got '", std::string(name), "'");
}

template <typename Backend, typename F>
void dispatch_floating(const Tensor& input, F&& f) {
  if constexpr (Backend::kReducedPrecision) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "lstmfast",
                                    [&] { f(scalar_t{}); });
  } else {
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "lstmfast", [&] { f(scalar_t{}); });
  }
}

// Shapes of one layer's weights, read from w_hh (4H, P), (3H, H) or (H, H) and checked against the rest.
struct LayerShape {
  int64_t input_size, hidden_size, proj_size;
};

inline LayerShape check_weights(const char* op, int64_t gates, const Tensor& input, int64_t input_size,
                                const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih,
                                const OptTensor& b_hh, const OptTensor& w_hr) {
  check_like(op, w_ih, "w_ih", input);
  check_like(op, w_hh, "w_hh", input);
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) % gates == 0 && w_hh.size(0) > 0, op,
              ": expected w_hh of shape (", gates == 1 ? "" : (gates == 4 ? "4*" : "3*"), "hidden_size, ",
              gates == 4 ? "proj_size or hidden_size" : "hidden_size", "), but got ",
              str(w_hh.sizes()));
  const int64_t H = w_hh.size(0) / gates;
  int64_t P = H;
  if (w_hr.has_value()) {
    check_like(op, *w_hr, "w_hr", input);
    TORCH_CHECK(w_hr->dim() == 2 && w_hr->size(1) == H && w_hr->size(0) >= 1 && w_hr->size(0) < H,
                op, ": expected w_hr of shape (proj_size, hidden_size=", str(H),
                ") with 0 < proj_size < hidden_size, but got ", str(w_hr->sizes()));
    P = w_hr->size(0);
  }
  check_shape(op, w_hh, "w_hh", {gates * H, P});
  check_shape(op, w_ih, "w_ih", {gates * H, input_size});
  check_optional(op, b_ih, "b_ih", input, {gates * H});
  check_optional(op, b_hh, "b_hh", input, {gates * H});
  return {input_size, H, P};
}

inline at::ScalarType norm_dtype(const Tensor& input) {
  return at::toOpMathType(input.scalar_type());
}

// Buffers for one op call that the caller never sees: scratch space, and the activations saved for
// backward. On the CPU, large ones come from the workspace cache (cpu/workspace_cache.h); elsewhere
// at::empty (CUDA has torch's caching allocator).
inline Tensor workspace(at::IntArrayRef sizes, const at::TensorOptions& options) {
  const at::ScalarType dtype = c10::typeMetaToScalarType(options.dtype());
  const int64_t count = c10::multiply_integers(sizes);
  const int64_t bytes = count * static_cast<int64_t>(c10::elementSize(dtype));
  // (A small one directly: the views below cost more than its page faults.)
  if (!options.device().is_cpu() || !cpu::cached_size(bytes)) return at::empty(sizes, options);
  // (A reused block may be larger, by a size no multiple of this dtype's: its first `bytes` only.)
  return cpu::cached_block(bytes).narrow(0, 0, bytes).view(dtype).view(sizes);
}

// An op's output of the given shape: at::empty, or a workspace on a thread running a float16 / bfloat16
// CPU call (cpu::temporary_results), whose float32 results only live until they are rounded.
inline Tensor result(at::IntArrayRef sizes, const at::TensorOptions& options) {
  return cpu::temporary_results ? workspace(sizes, options) : at::empty(sizes, options);
}

// A bias gradient, G's column sums for the pre-activation gradients G (N, X): the backend's own
// column_sums where it has one (the CPU's, in a fixed order), else G.sum(0).
template <typename Backend>
Tensor column_sums(Backend& dev, const Tensor& grad) {
  if constexpr (requires { dev.column_sums(grad); }) return dev.column_sums(grad);
  else return grad.sum(0);
}

// Backends whose mm(a, b, row_sums) also adds a.sum(1) into *row_sums, in column_sums' order (the CPU's):
// a weight gradient's product G^T X then makes the bias gradient from its own pass over G, with the bits
// column_sums would give.
template <typename Backend>
constexpr bool kSumsRows = requires(Backend& d, const Tensor& t, Tensor* s) { d.mm(t, t, s); };

// The input weight's gradient G^T X and the bias gradient (G's column sums) from the pre-activation
// gradients G (N, X) and the input rows X, each an empty tensor unless asked for. When both are, a
// backend with kSumsRows makes the bias gradient inside the product's pass over G.
template <typename Backend>
std::pair<Tensor, Tensor> input_weight_and_bias_grads(Backend& dev, bool need_weights, bool need_bias,
                                                      const Tensor& grad, const Tensor& input,
                                                      int64_t input_size) {
  Tensor weight = at::empty({0}, input.options()), bias;
  if (need_weights) {
    const Tensor x = rows_of(input, input_size);
    if constexpr (kSumsRows<Backend>) {
      if (need_bias) bias = at::zeros({grad.size(1)}, grad.options());
      weight = dev.mm(grad.t(), x, bias.defined() ? &bias : nullptr);
    } else {
      weight = dev.mm(grad.t(), x);
    }
  }
  if (!need_bias) bias = at::empty({0}, grad.options());
  else if (!bias.defined()) bias = column_sums(dev, grad);
  return {weight, bias};
}

// dW_hh = sum_t G_t^T h_{t-1} from the gradients G (N, X) of the pre-activations. With packed input the
// backward loop collects the h_{t-1} rows (hidden_prev); with every step the same batch they are the
// previous step's output rows and h0, read in place: two products (the second accumulated into the
// first), and no (N, P) copy.
template <typename Backend>
Tensor grad_recurrent_weight(Backend& dev, const Layout& l, const Tensor& grad, const Tensor& out,
                             const Tensor& h_init, const Tensor& hidden_prev) {
  if (hidden_prev.defined()) return dev.mm(grad.t(), hidden_prev);
  const int64_t B = l.batch, N = l.rows;
  if (N == 0) return at::zeros({grad.size(1), out.size(1)}, grad.options());
  // The first step processed (the last one in reverse) starts from h0; every other step t from the
  // output of the step before it, B rows earlier (later in reverse).
  Tensor w = dev.mm(grad.narrow(0, l.reverse ? N - B : 0, B).t(), h_init);
  if (N > B) {
    dev.addmm_(w, grad.narrow(0, l.reverse ? 0 : B, N - B).t(), out.narrow(0, l.reverse ? B : 0, N - B));
  }
  return w;
}

// A backend may run a whole layer its own way: the CUDA backend's persistent kernels
// (cuda/persistent.cuh), when LSTMFAST_CUDA_PERSISTENT allows them and they fit, and, as a test hook,
// the CPU backend's emulation of them (cpu/persistent_emulator.h). False: it did not, and the shared
// time loop runs.
template <typename Backend, typename Args>
bool whole_layer(Backend& dev, const Args& a) {
  if constexpr (requires { dev.whole_layer(a); }) {
    return dev.whole_layer(a);
  } else {
    return false;
  }
}

// ---------------------------------------------------------------- LSTM

template <typename Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward(
    const Tensor& input, const OptTensor& batch_sizes, const OptTensor& h0, const OptTensor& c0,
    const Tensor& w_ih, const Tensor& w_hh, const OptTensor& b_ih, const OptTensor& b_hh,
    const OptTensor& w_hr, bool reverse, bool training) {
  const char* op = "lstmfast.lstm_forward";
  check_dtype<Backend>(op, input);
  Layout l = make_layout(op, input, batch_sizes, reverse);
  const auto s = check_weights(op, 4, input, l.input_size, w_ih, w_hh, b_ih, b_hh, w_hr);
  const int64_t B = l.batch, N = l.rows, H = s.hidden_size, P = s.proj_size;
  check_optional(op, h0, "h0", input, {B, P});
  check_optional(op, c0, "c0", input, {B, H});
  Backend dev(input);

  const Tensor x = rows_of(input, l.input_size);
  const Tensor wi = w_ih.contiguous(), wh = w_hh.contiguous();
  const OptTensor wr = w_hr.has_value() ? OptTensor(w_hr->contiguous()) : std::nullopt;
  const OptTensor bias = combined_bias(b_ih, b_hh);
  // Allocated in its final shape: the op's outputs are never views (autograd lets callers modify
  // them in place), and contiguous, as the fake implementations (lstmfast/_ops.py) say.
  Tensor output = result(output_shape(input, N, P), input.options());
  Tensor h_n = state_or_zeros(h0, B, P, input);
  Tensor c_n = state_or_zeros(c0, B, H, input);
  // Inference keeps no gates (a workspace): the backend may then project the input a few steps at a time.
  const int64_t gate_rows = training ? N : dev.inference_gate_rows(N, B, 4 * H);
  // gates and cells only reach the caller's autograd graph (saved for backward).
  Tensor gates = workspace({gate_rows, 4 * H}, input.options());
  Tensor cells = training ? workspace({N, H}, input.options()) : at::empty({0}, input.options());
  Tensor hidden = wr.has_value() ? at::empty({B, H}, input.options()) : Tensor();

  dispatch_floating<Backend>(input, [&](auto tag) {
    using scalar_t = decltype(tag);
    kernels::LstmForwardArgs<scalar_t> a{l.sequence(),
                                         l.input_size,
                                         H,
                                         P,
                                         x.data_ptr<scalar_t>(),
                                         wi.data_ptr<scalar_t>(),
                                         wh.data_ptr<scalar_t>(),
                                         ptr_or_null<scalar_t>(wr),
                                         ptr_or_null<scalar_t>(bias),
                                         output.data_ptr<scalar_t>(),
                                         h_n.data_ptr<scalar_t>(),
                                         c_n.data_ptr<scalar_t>(),
                                         gates.data_ptr<scalar_t>(),
                                         gate_rows,
                                         training ? cells.data_ptr<scalar_t>() : nullptr,
                                         wr.has_value() ? hidden.data_ptr<scalar_t>() : nullptr,
                                         training};
    if (!whole_layer(dev, a)) dev.template run<scalar_t>(a.seq.steps, B, 4 * H, P, [&] { kernels::lstm_forward(a, dev); });
  });
  if (!training) gates = at::empty({0}, input.options());
  return {output, h_n, c_n, gates, cells};
}

template <typename Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> lstm_backward(
    const Tensor& grad_output, const OptTensor& grad_h_n, const OptTensor& grad_c_n,
    const Tensor& input, const OptTensor& batch_sizes, const OptTensor& h0, const OptTensor& c0,
    const Tensor& w_ih, const Tensor& w_hh, const OptTensor& w_hr, const Tensor& output,
    const Tensor& gates, const Tensor& cells, bool reverse, std::array<bool, 4> output_mask,
    std::optional<double> grad_clip, bool return_norms) {
  const char* op = "lstmfast.lstm_backward";
  check_dtype<Backend>(op, input);
  Layout l = make_layout(op, input, batch_sizes, reverse);
  const auto s = check_weights(op, 4, input, l.input_size, w_ih, w_hh, std::nullopt, std::nullopt, w_hr);
  const int64_t B = l.batch, N = l.rows, H = s.hidden_size, P = s.proj_size;
  check_optional(op, h0, "h0", input, {B, P});
  check_optional(op, c0, "c0", input, {B, H});
  check_optional(op, grad_h_n, "grad_h_n", input, {B, P});
  check_optional(op, grad_c_n, "grad_c_n", input, {B, H});
  check_rows(op, output, "output", input, N, P);
  check_rows(op, grad_output, "grad_output", input, N, P);
  check_like(op, gates, "gates", input);
  check_shape(op, gates, "gates", {N, 4 * H});
  check_like(op, cells, "cells", input);
  check_shape(op, cells, "cells", {N, H});
  TORCH_CHECK(!grad_clip.has_value() || *grad_clip > 0, op, ": expected grad_clip > 0, but got ",
              str(*grad_clip));
  Backend dev(input);
  const auto [need_input, need_state, need_weights, need_bias] = output_mask;
  (void)need_state;  // the initial states' gradients fall out of the loop for free

  const Tensor out = rows_of(output, P), grad_out = rows_of(grad_output, P);
  const Tensor wh = w_hh.contiguous();
  const OptTensor wr = w_hr.has_value() ? OptTensor(w_hr->contiguous()) : std::nullopt;
  const Tensor gates_c = gates.contiguous(), cells_c = cells.contiguous();
  const Tensor h_init = state_or_zeros(h0, B, P, input), c_init = state_or_zeros(c0, B, H, input);
  Tensor grad_h0 = state_or_zeros(grad_h_n, B, P, input);
  Tensor grad_c0 = state_or_zeros(grad_c_n, B, H, input);
  Tensor grad_gates = workspace({N, 4 * H}, input.options());
  Tensor hidden_prev = need_weights && !l.uniform() ? workspace({N, P}, input.options()) : Tensor();
  Tensor grad_hidden_total = wr.has_value() ? workspace({N, P}, input.options()) : Tensor();
  Tensor grad_hidden = wr.has_value() ? at::empty({B, H}, input.options()) : Tensor();
  const auto norm_options = input.options().dtype(norm_dtype(input));
  Tensor grad_h_norm = at::empty({return_norms ? N : 0}, norm_options);
  Tensor grad_c_norm = at::empty({return_norms ? N : 0}, norm_options);

  dispatch_floating<Backend>(input, [&](auto tag) {
    using scalar_t = decltype(tag);
    using norm_t = at::opmath_type<scalar_t>;
    kernels::LstmBackwardArgs<scalar_t, norm_t> a{
        l.sequence(),
        H,
        P,
        wh.data_ptr<scalar_t>(),
        ptr_or_null<scalar_t>(wr),
        out.data_ptr<scalar_t>(),
        gates_c.data_ptr<scalar_t>(),
        cells_c.data_ptr<scalar_t>(),
        h_init.data_ptr<scalar_t>(),
        c_init.data_ptr<scalar_t>(),
        grad_out.data_ptr<scalar_t>(),
        grad_h0.data_ptr<scalar_t>(),
        grad_c0.data_ptr<scalar_t>(),
        grad_gates.data_ptr<scalar_t>(),
        hidden_prev.defined() ? hidden_prev.data_ptr<scalar_t>() : nullptr,
        wr.has_value() ? grad_hidden_total.data_ptr<scalar_t>() : nullptr,
        wr.has_value() ? grad_hidden.data_ptr<scalar_t>() : nullptr,
        return_norms ? grad_h_norm.data_ptr<norm_t>() : nullptr,
        return_norms ? grad_c_norm.data_ptr<norm_t>() : nullptr,
        grad_clip.value_or(0.0)};
    if (!whole_layer(dev, a)) dev.template run<scalar_t>(a.seq.steps, B, 4 * H, P, [&] { kernels::lstm_backward(a, dev); });
  });
  if (return_norms) {
    grad_h_norm.sqrt_();
    grad_c_norm.sqrt_();
  }
  // Gradients not asked for come back as distinct empty tensors (outputs must not alias).
  const auto empty = [&] { return at::empty({0}, input.options()); };
  Tensor grad_input = need_input ? dev.mm(grad_gates, w_ih).view(input.sizes()) : empty();
  auto [grad_w_ih, grad_bias] =
      input_weight_and_bias_grads(dev, need_weights, need_bias, grad_gates, input, l.input_size);
  Tensor grad_w_hh = empty(), grad_w_hr = empty();
  if (need_weights) {
    grad_w_hh = grad_recurrent_weight(dev, l, grad_gates, out, h_init, hidden_prev);
    if (wr.has_value()) {
      // m_t = o * tanh(c_t), from the saved activations.
      const Tensor hidden_all = gates_c.narrow(1, 3 * H, H) * cells_c.tanh();
      grad_w_hr = dev.mm(grad_hidden_total.t(), hidden_all);
    }
  }
  // Every gradient comes back contiguous, as the fake implementations say (no-ops where it already is).
  grad_w_ih = grad_w_ih.contiguous(), grad_w_hh = grad_w_hh.contiguous(), grad_w_hr = grad_w_hr.contiguous();
  return {grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr, grad_h_norm,
          grad_c_norm};
}

// ---------------------------------------------------------------- RNN

template <typename Backend>
std::tuple<Tensor, Tensor> rnn_forward(const Tensor& input, const OptTensor& batch_sizes,
                                       const OptTensor& h0, const Tensor& w_ih, const Tensor& w_hh,
                                       const OptTensor& b_ih, const OptTensor& b_hh,
                                       c10::string_view nonlinearity, bool reverse) {
  const char* op = "lstmfast.rnn_forward";
  check_dtype<Backend>(op, input);
  const auto nl = parse_nonlinearity(op, nonlinearity);
  Layout l = make_layout(op, input, batch_sizes, reverse);
  const auto s = check_weights(op, 1, input, l.input_size, w_ih, w_hh, b_ih, b_hh, std::nullopt);
  const int64_t B = l.batch, N = l.rows, H = s.hidden_size;
  check_optional(op, h0, "h0", input, {B, H});
  Backend dev(input);

  const Tensor x = rows_of(input, l.input_size);
  const Tensor wi = w_ih.contiguous(), wh = w_hh.contiguous();
  const OptTensor bias = combined_bias(b_ih, b_hh);
  Tensor output = result(output_shape(input, N, H), input.options());
  Tensor h_n = state_or_zeros(h0, B, H, input);
  dispatch_floating<Backend>(input, [&](auto tag) {
    using scalar_t = decltype(tag);
    kernels::RnnForwardArgs<scalar_t> a{l.sequence(),
                                        l.input_size,
                                        H,
                                        x.data_ptr<scalar_t>(),
                                        wi.data_ptr<scalar_t>(),
                                        wh.data_ptr<scalar_t>(),
                                        ptr_or_null<scalar_t>(bias),
                                        output.data_ptr<scalar_t>(),
                                        h_n.data_ptr<scalar_t>(),
                                        nl};
    if (!whole_layer(dev, a)) dev.template run<scalar_t>(a.seq.steps, B, H, H, [&] { kernels::rnn_forward(a, dev); });
  });
  return {output, h_n};
}

template <typename Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> rnn_backward(
    const Tensor& grad_output, const OptTensor& grad_h_n, const Tensor& input,
    const OptTensor& batch_sizes, const OptTensor& h0, const Tensor& w_ih, const Tensor& w_hh,
    const Tensor& output, c10::string_view nonlinearity, bool reverse,
    std::array<bool, 4> output_mask, std::optional<double> grad_clip, bool return_norms) {
  const char* op = "lstmfast.rnn_backward";
  check_dtype<Backend>(op, input);
  const auto nl = parse_nonlinearity(op, nonlinearity);
  Layout l = make_layout(op, input, batch_sizes, reverse);
  const auto s = check_weights(op, 1, input, l.input_size, w_ih, w_hh, std::nullopt, std::nullopt,
                               std::nullopt);
  const int64_t B = l.batch, N = l.rows, H = s.hidden_size;
  check_optional(op, h0, "h0", input, {B, H});
  check_optional(op, grad_h_n, "grad_h_n", input, {B, H});
  check_rows(op, output, "output", input, N, H);
  check_rows(op, grad_output, "grad_output", input, N, H);
  TORCH_CHECK(!grad_clip.has_value() || *grad_clip > 0, op, ": expected grad_clip > 0, but got ",
              str(*grad_clip));
  Backend dev(input);
  const auto [need_input, need_state, need_weights, need_bias] = output_mask;
  (void)need_state;

  const Tensor out = rows_of(output, H), grad_out = rows_of(grad_output, H);
  const Tensor wh = w_hh.contiguous();
  const Tensor h_init = state_or_zeros(h0, B, H, input);
  Tensor grad_h0 = state_or_zeros(grad_h_n, B, H, input);
  Tensor grad_pre = workspace({N, H}, input.options());
  Tensor hidden_prev = need_weights && !l.uniform() ? workspace({N, H}, input.options()) : Tensor();
  Tensor grad_h_norm = at::empty({return_norms ? N : 0}, input.options().dtype(norm_dtype(input)));
  dispatch_floating<Backend>(input, [&](auto tag) {
    using scalar_t = decltype(tag);
    using norm_t = at::opmath_type<scalar_t>;
    kernels::RnnBackwardArgs<scalar_t, norm_t> a{
        l.sequence(),
        H,
        wh.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(),
        h_init.data_ptr<scalar_t>(),
        grad_out.data_ptr<scalar_t>(),
        grad_h0.data_ptr<scalar_t>(),
        grad_pre.data_ptr<scalar_t>(),
        hidden_prev.defined() ? hidden_prev.data_ptr<scalar_t>() : nullptr,
        return_norms ? grad_h_norm.data_ptr<norm_t>() : nullptr,
        nl,
        grad_clip.value_or(0.0)};
    if (!whole_layer(dev, a)) dev.template run<scalar_t>(a.seq.steps, B, H, H, [&] { kernels::rnn_backward(a, dev); });
  });
  if (return_norms) grad_h_norm.sqrt_();
  const auto empty = [&] { return at::empty({0}, input.options()); };
  Tensor grad_input = need_input ? dev.mm(grad_pre, w_ih).view(input.sizes()) : empty();
  auto [grad_w_ih, grad_bias] =
      input_weight_and_bias_grads(dev, need_weights, need_bias, grad_pre, input, l.input_size);
  Tensor grad_w_hh = need_weights ? grad_recurrent_weight(dev, l, grad_pre, out, h_init, hidden_prev) : empty();
  grad_w_ih = grad_w_ih.contiguous(), grad_w_hh = grad_w_hh.contiguous();
  return {grad_input, grad_h0, grad_w_ih, grad_w_hh, grad_bias, grad_h_norm};
}

// ---------------------------------------------------------------- GRU

template <typename Backend>
std::tuple<Tensor, Tensor, Tensor> gru_forward(const Tensor& input, const OptTensor& batch_sizes,
                                               const OptTensor& h0, const Tensor& w_ih, const Tensor& w_hh,
                                               const OptTensor& b_ih, const OptTensor& b_hh, bool reverse,
                                               bool training) {
  const char* op = "lstmfast.gru_forward";
  check_dtype<Backend>(op, input);
  Layout l = make_layout(op, input, batch_sizes, reverse);
  const auto s = check_weights(op, 3, input, l.input_size, w_ih, w_hh, b_ih, b_hh, std::nullopt);
  const int64_t B = l.batch, N = l.rows, H = s.hidden_size;
  check_optional(op, h0, "h0", input, {B, H});
  Backend dev(input);

  const Tensor x = rows_of(input, l.input_size);
  const Tensor wi = w_ih.contiguous(), wh = w_hh.contiguous();
  const OptTensor bi = b_ih.has_value() ? OptTensor(b_ih->contiguous()) : std::nullopt;
  const OptTensor bh = b_hh.has_value() ? OptTensor(b_hh->contiguous()) : std::nullopt;
  Tensor output = result(output_shape(input, N, H), input.options());
  Tensor h_n = state_or_zeros(h0, B, H, input);
  // Columns [0, 3H) hold the input projection, then r, z, n; column block 3H the saved h_n.
  const int64_t gate_rows = training ? N : dev.inference_gate_rows(N, B, 4 * H);
  Tensor gates = workspace({gate_rows, 4 * H}, input.options());
  Tensor hidden_gates = at::empty({B, 3 * H}, input.options());

  dispatch_floating<Backend>(input, [&](auto tag) {
    using scalar_t = decltype(tag);
    kernels::GruForwardArgs<scalar_t> a{l.sequence(),
                                        l.input_size,
                                        H,
                                        x.data_ptr<scalar_t>(),
                                        wi.data_ptr<scalar_t>(),
                                        wh.data_ptr<scalar_t>(),
                                        ptr_or_null<scalar_t>(bi),
                                        ptr_or_null<scalar_t>(bh),
                                        output.data_ptr<scalar_t>(),
                                        h_n.data_ptr<scalar_t>(),
                                        gates.data_ptr<scalar_t>(),
                                        gate_rows,
                                        hidden_gates.data_ptr<scalar_t>(),
                                        training};
    if (!whole_layer(dev, a)) dev.template run<scalar_t>(a.seq.steps, B, 3 * H, H, [&] { kernels::gru_forward(a, dev); });
  });
  if (!training) gates = at::empty({0}, input.options());
  return {output, h_n, gates};
}

template <typename Backend>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> gru_backward(
    const Tensor& grad_output, const OptTensor& grad_h_n, const Tensor& input,
    const OptTensor& batch_sizes, const OptTensor& h0, const Tensor& w_ih, const Tensor& w_hh,
    const Tensor& output, const Tensor& gates, bool reverse, std::array<bool, 4> output_mask,
    std::optional<double> grad_clip, bool return_norms) {
  const char* op = "lstmfast.gru_backward";
  check_dtype<Backend>(op, input);
  Layout l = make_layout(op, input, batch_sizes, reverse);
  const auto s = check_weights(op, 3, input, l.input_size, w_ih, w_hh, std::nullopt, std::nullopt,
                               std::nullopt);
  const int64_t B = l.batch, N = l.rows, H = s.hidden_size;
  check_optional(op, h0, "h0", input, {B, H});
  check_optional(op, grad_h_n, "grad_h_n", input, {B, H});
  check_rows(op, output, "output", input, N, H);
  check_rows(op, grad_output, "grad_output", input, N, H);
  check_like(op, gates, "gates", input);
  check_shape(op, gates, "gates", {N, 4 * H});
  TORCH_CHECK(!grad_clip.has_value() || *grad_clip > 0, op, ": expected grad_clip > 0, but got ",
              str(*grad_clip));
  Backend dev(input);
  const auto [need_input, need_state, need_weights, need_bias] = output_mask;
  (void)need_state;

  const Tensor out = rows_of(output, H), grad_out = rows_of(grad_output, H);
  const Tensor wh = w_hh.contiguous();
  const Tensor gates_c = gates.contiguous();
  const Tensor h_init = state_or_zeros(h0, B, H, input);
  Tensor grad_h0 = state_or_zeros(grad_h_n, B, H, input);
  Tensor grad_input_gates = workspace({N, 3 * H}, input.options());
  Tensor grad_hidden_gates = workspace({N, 3 * H}, input.options());
  Tensor hidden_prev = need_weights && !l.uniform() ? workspace({N, H}, input.options()) : Tensor();
  Tensor grad_h_norm = at::empty({return_norms ? N : 0}, input.options().dtype(norm_dtype(input)));
  dispatch_floating<Backend>(input, [&](auto tag) {
    using scalar_t = decltype(tag);
    using norm_t = at::opmath_type<scalar_t>;
    kernels::GruBackwardArgs<scalar_t, norm_t> a{
        l.sequence(),
        H,
        wh.data_ptr<scalar_t>(),
        out.data_ptr<scalar_t>(),
        gates_c.data_ptr<scalar_t>(),
        h_init.data_ptr<scalar_t>(),
        grad_out.data_ptr<scalar_t>(),
        grad_h0.data_ptr<scalar_t>(),
        grad_input_gates.data_ptr<scalar_t>(),
        grad_hidden_gates.data_ptr<scalar_t>(),
        hidden_prev.defined() ? hidden_prev.data_ptr<scalar_t>() : nullptr,
        return_norms ? grad_h_norm.data_ptr<norm_t>() : nullptr,
        grad_clip.value_or(0.0)};
    if (!whole_layer(dev, a)) dev.template run<scalar_t>(a.seq.steps, B, 3 * H, H, [&] { kernels::gru_backward(a, dev); });
  });
  if (return_norms) grad_h_norm.sqrt_();
  const auto empty = [&] { return at::empty({0}, input.options()); };
  Tensor grad_input = need_input ? dev.mm(grad_input_gates, w_ih).view(input.sizes()) : empty();
  auto [grad_w_ih, grad_b_ih] =
      input_weight_and_bias_grads(dev, need_weights, need_bias, grad_input_gates, input, l.input_size);
  Tensor grad_w_hh =
      need_weights ? grad_recurrent_weight(dev, l, grad_hidden_gates, out, h_init, hidden_prev) : empty();
  // Unlike LSTM / RNN the two bias gradients differ, but only in b_hn's part, which sits inside the
  // reset gate's product: the r and z columns of the two gate-gradient buffers are the same numbers, so
  // b_hh's r and z parts are b_ih's (the same sums, in the same order), and one pass over G's n columns
  // makes the rest. (That pass is b_hn's own: dW_hh's products do not take G's rows in order.)
  Tensor grad_b_hh = at::empty({need_bias ? 3 * H : 0}, grad_hidden_gates.options());
  if (need_bias) {
    grad_b_hh.narrow(0, 0, 2 * H).copy_(grad_b_ih.narrow(0, 0, 2 * H));
    grad_b_hh.narrow(0, 2 * H, H).copy_(column_sums(dev, grad_hidden_gates.narrow(1, 2 * H, H)));
  }
  grad_w_ih = grad_w_ih.contiguous(), grad_w_hh = grad_w_hh.contiguous();
  return {grad_input, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_h_norm};
}

}  // namespace lstmfast

// The lstmfast op schemas, and the Python module whose import registers them.
//
// Each op runs one layer in one direction over a whole sequence (design.md sections 2 and 3):
//   input        (T, B, I) when batch_sizes is None, else (N, I) packed rows, time-major
//   batch_sizes  (T) int64 on the CPU: sequences alive at each step, non-increasing (PackedSequence)
//   h0 / c0      (B, P) / (B, H), zeros when None
//   w_ih (G*H, I), w_hh (G*H, P), b_ih / b_hh (G*H), w_hr (P, H)   with G = 4 (LSTM), 3 (GRU), 1 (RNN)
// Training forwards also return what backward needs, empty in inference: LSTM gates (N, 4H) after
// activation and cells (N, H); GRU gates (N, 4H): r, z, n after activation, then the recurrent part of
// n's pre-activation, W_hn h_{t-1} + b_hn (the reset gate multiplies it, so backward needs it apart). Backward's output_mask asks for the gradients of
// [input, initial states, weights, biases]; gradients not asked for come back empty.
#include <Python.h>
#include <torch/library.h>

// lstmfast._C is an otherwise empty module: importing it runs the registrations below.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(lstmfast, m) {
  m.def(
      "lstm_forward(Tensor input, Tensor? batch_sizes, Tensor? h0, Tensor? c0, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_ih, Tensor? b_hh, Tensor? w_hr, bool reverse, bool training) "
      "-> (Tensor output, Tensor h_n, Tensor c_n, Tensor gates, Tensor cells)");
  m.def(
      "lstm_backward(Tensor grad_output, Tensor? grad_h_n, Tensor? grad_c_n, Tensor input, "
      "Tensor? batch_sizes, Tensor? h0, Tensor? c0, Tensor w_ih, Tensor w_hh, Tensor? w_hr, "
      "Tensor output, Tensor gates, Tensor cells, bool reverse, bool[4] output_mask, "
      "float? grad_clip, bool return_norms) "
      "-> (Tensor grad_input, Tensor grad_h0, Tensor grad_c0, Tensor grad_w_ih, Tensor grad_w_hh, "
      "Tensor grad_bias, Tensor grad_w_hr, Tensor grad_h_norm, Tensor grad_c_norm)");
  m.def(
      "rnn_forward(Tensor input, Tensor? batch_sizes, Tensor? h0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, str nonlinearity, bool reverse) -> (Tensor output, Tensor h_n)");
  m.def(
      "rnn_backward(Tensor grad_output, Tensor? grad_h_n, Tensor input, Tensor? batch_sizes, "
      "Tensor? h0, Tensor w_ih, Tensor w_hh, Tensor output, str nonlinearity, bool reverse, "
      "bool[4] output_mask, float? grad_clip, bool return_norms) "
      "-> (Tensor grad_input, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_bias, "
      "Tensor grad_h_norm)");
  m.def(
      "gru_forward(Tensor input, Tensor? batch_sizes, Tensor? h0, Tensor w_ih, Tensor w_hh, "
      "Tensor? b_ih, Tensor? b_hh, bool reverse, bool training) -> (Tensor output, Tensor h_n, Tensor gates)");
  m.def(
      "gru_backward(Tensor grad_output, Tensor? grad_h_n, Tensor input, Tensor? batch_sizes, Tensor? h0, "
      "Tensor w_ih, Tensor w_hh, Tensor output, Tensor gates, bool reverse, bool[4] output_mask, "
      "float? grad_clip, bool return_norms) "
      "-> (Tensor grad_input, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh, Tensor grad_b_ih, "
      "Tensor grad_b_hh, Tensor grad_h_norm)");
  // Which build of the CPU pointwise passes runs here ("avx512", "avx2" or "baseline"); no tensors.
  m.def("cpu_isa() -> str");
  // Which GEMM runs the CPU products of an op called with this dtype (e.g. "avx512_bf16" for bfloat16).
  m.def("cpu_gemm_engine(ScalarType dtype) -> str");
  // The cache of large CPU buffers (cpu/workspace_cache.h): bytes all threads' caches hold, freeing
  // them all, and the bound on their total.
  m.def("cpu_cache_bytes() -> int");
  m.def("empty_cpu_cache() -> ()");
  m.def("cpu_cache_limit() -> int");
  m.def("set_cpu_cache_limit(int bytes) -> ()");
  // The persistent CUDA kernels (cuda/persistent.cu): the decision for a layer on a device with the
  // given limits (mode "" reads LSTMFAST_CUDA_PERSISTENT), and how many persistent launches ran.
  m.def("persistent_plan(str cell, bool backward, int hidden_size, int batch, int steps, int element_size, "
        "bool projection, bool norms, int sm_count, int smem_per_block, int smem_per_sm, str mode) -> str");
  m.def("persistent_launches() -> int");
}

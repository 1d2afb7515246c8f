// Persistent LSTM / GRU / Elman-RNN kernels (declared and described in persistent.cuh; geometry and
// shared memory layout in kernels/persistent_plan.h).
//
// One step of a forward kernel, in every block:
//   1. stage h_{t-1} (B x H, from the previous step's output rows or h0) into shared memory, in chunks;
//      multiply by the block's rows of W_hh: y = h_{t-1} W_hh[rows of my units]^T  (float32 sums)
//   2. pointwise, for my units only (all gates of a unit are in this block): add x W_ih^T and the
//      bias, the cell, write the step's output rows (and gates, cells when training)
//   3. grid-wide sync: every block's h_t is in global memory before anyone stages it
// A backward step: 1. pointwise for my units (dL/dh_t from shared memory, dL/dc_t or GRU's dL/dh_t * z
// kept in shared memory) writing dL/da_t; 2. grid-wide sync; 3. stage dL/da_t (B x G*H; GRU: its
// recurrent part da_h) and multiply by the block's columns of W_hh: dL/dh_{t-1} for my units (GRU: plus
// dL/dh_t * z), kept in shared memory for the next step.
//
// Every step writes only its own rows of the (N, *) buffers and reads the rows other blocks wrote
// before the last grid sync, so one sync per step orders all cross-block traffic. Rows other blocks
// wrote in this kernel are read with __ldcg (L2, not the multiprocessor's incoherent L1). The final
// states are written after the last step's sync: h0 lives in the h_n buffer and blocks stage it until then.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdlib>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "persistent.cuh"
#include "persistent_body.h"

namespace lstmfast::persistent {
namespace {

// ---------------------------------------------------------------- kernels (bodies: persistent_body.h)

template <typename T>
__global__ void __launch_bounds__(kPersistentThreads, 1) lstm_forward_kernel(LstmForwardParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  lstm_forward_body(p, smem_raw);
}

template <typename T>
__global__ void __launch_bounds__(kPersistentThreads, 1) lstm_backward_kernel(LstmBackwardParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  lstm_backward_body(p, smem_raw);
}

template <typename T>
__global__ void __launch_bounds__(kPersistentThreads, 1) rnn_forward_kernel(RnnForwardParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  rnn_forward_body(p, smem_raw);
}

template <typename T>
__global__ void __launch_bounds__(kPersistentThreads, 1) rnn_backward_kernel(RnnBackwardParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  rnn_backward_body(p, smem_raw);
}

template <typename T>
__global__ void __launch_bounds__(kPersistentThreads, 1) gru_forward_kernel(GruForwardParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  gru_forward_body(p, smem_raw);
}

template <typename T>
__global__ void __launch_bounds__(kPersistentThreads, 1) gru_backward_kernel(GruBackwardParams<T> p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  gru_backward_body(p, smem_raw);
}

// ---------------------------------------------------------------- host side

kernels::PersistentMode mode_from_environment() {
  const char* value = std::getenv("LSTMFAST_CUDA_PERSISTENT");
  bool ok = true;
  const auto mode = kernels::parse_persistent_mode(value, &ok);
  TORCH_CHECK(ok, "lstmfast: LSTMFAST_CUDA_PERSISTENT must be 0, 1 or auto, but got '", std::string(value), "'");
  return mode;
}

// Lets `kernel` launch on `device` with `bytes` of dynamic shared memory. The attribute is the
// process's, shared by every host thread, so it is only ever raised (under a lock): set to each call's
// own size, a thread's smaller size could land between another's setting and launch, which then
// failed. A larger allowance changes nothing else (occupancy follows the size a launch asks for).
void allow_shared_memory(const void* kernel, int device, int64_t bytes) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, int64_t> allowed;
  std::lock_guard<std::mutex> lock(mutex);
  int64_t& current = allowed[{kernel, device}];
  if (bytes <= current) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  current = bytes;
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
  allow_shared_memory(kernel, device, plan.smem);
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
bool launch(void (*kernel)(Params), Params params, const PersistentPlan& plan, cudaStream_t stream) {
  void* args[] = {&params};
  const cudaError_t error = cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(kernel), dim3(plan.blocks),
                                                        dim3(kPersistentThreads), args,
                                                        static_cast<size_t>(plan.smem), stream);
  if (error == cudaErrorCooperativeLaunchTooLarge) {
    (void)cudaGetLastError();  // clears it: the default path runs instead
    return false;
  }
  C10_CUDA_CHECK(error);
  count_persistent_launch();
  return true;
}

c10::Device current_cuda_device() { return c10::Device(c10::kCUDA, c10::cuda::current_device()); }

}  // namespace

using kernels::PersistentCell;

template <typename T>
PersistentPlan plan_lstm_forward(const kernels::LstmForwardArgs<T>& a) {
  const kernels::PersistentRequest r{PersistentCell::Lstm, false, a.hidden_size, a.seq.batch, a.seq.steps,
                                     int(sizeof(T)), a.w_hr != nullptr, false, a.gate_rows == a.seq.rows};
  return plan_for(r, a.seq, reinterpret_cast<const void*>(&lstm_forward_kernel<T>));
}

template <typename T>
PersistentPlan plan_lstm_backward(const kernels::LstmBackwardArgs<T, float>& a) {
  const kernels::PersistentRequest r{PersistentCell::Lstm, true, a.hidden_size, a.seq.batch, a.seq.steps,
                                     int(sizeof(T)), a.w_hr != nullptr,
                                     a.grad_hidden_norm != nullptr || a.grad_cell_norm != nullptr, true};
  return plan_for(r, a.seq, reinterpret_cast<const void*>(&lstm_backward_kernel<T>));
}

template <typename T>
PersistentPlan plan_rnn_forward(const kernels::RnnForwardArgs<T>& a) {
  const kernels::PersistentRequest r{PersistentCell::Rnn, false, a.hidden_size, a.seq.batch, a.seq.steps,
                                     int(sizeof(T)), false, false, true};
  return plan_for(r, a.seq, reinterpret_cast<const void*>(&rnn_forward_kernel<T>));
}

template <typename T>
PersistentPlan plan_rnn_backward(const kernels::RnnBackwardArgs<T, float>& a) {
  const kernels::PersistentRequest r{PersistentCell::Rnn, true, a.hidden_size, a.seq.batch, a.seq.steps,
                                     int(sizeof(T)), false, a.grad_hidden_norm != nullptr, true};
  return plan_for(r, a.seq, reinterpret_cast<const void*>(&rnn_backward_kernel<T>));
}

template <typename T>
PersistentPlan plan_gru_forward(const kernels::GruForwardArgs<T>& a) {
  const kernels::PersistentRequest r{PersistentCell::Gru, false, a.hidden_size, a.seq.batch, a.seq.steps,
                                     int(sizeof(T)), false, false, a.gate_rows == a.seq.rows};
  return plan_for(r, a.seq, reinterpret_cast<const void*>(&gru_forward_kernel<T>));
}

template <typename T>
PersistentPlan plan_gru_backward(const kernels::GruBackwardArgs<T, float>& a) {
  const kernels::PersistentRequest r{PersistentCell::Gru, true, a.hidden_size, a.seq.batch, a.seq.steps,
                                     int(sizeof(T)), false, a.grad_hidden_norm != nullptr, true};
  return plan_for(r, a.seq, reinterpret_cast<const void*>(&gru_backward_kernel<T>));
}

template <typename T>
bool launch_lstm_forward(const kernels::LstmForwardArgs<T>& a, const PersistentPlan& plan, cudaStream_t stream) {
  const at::Tensor layout = device_layout(a.seq, current_cuda_device());
  return launch(&lstm_forward_kernel<T>, lstm_forward_params(a, plan, steps_of(a.seq, layout)), plan, stream);
}

template <typename T>
bool launch_lstm_backward(const kernels::LstmBackwardArgs<T, float>& a, const PersistentPlan& plan,
                          cudaStream_t stream) {
  const at::Tensor layout = device_layout(a.seq, current_cuda_device());
  return launch(&lstm_backward_kernel<T>, lstm_backward_params(a, plan, steps_of(a.seq, layout)), plan, stream);
}

template <typename T>
bool launch_rnn_forward(const kernels::RnnForwardArgs<T>& a, const PersistentPlan& plan, cudaStream_t stream) {
  const at::Tensor layout = device_layout(a.seq, current_cuda_device());
  return launch(&rnn_forward_kernel<T>, rnn_forward_params(a, plan, steps_of(a.seq, layout)), plan, stream);
}

template <typename T>
bool launch_rnn_backward(const kernels::RnnBackwardArgs<T, float>& a, const PersistentPlan& plan,
                         cudaStream_t stream) {
  const at::Tensor layout = device_layout(a.seq, current_cuda_device());
  return launch(&rnn_backward_kernel<T>, rnn_backward_params(a, plan, steps_of(a.seq, layout)), plan, stream);
}

template <typename T>
bool launch_gru_forward(const kernels::GruForwardArgs<T>& a, const PersistentPlan& plan, cudaStream_t stream) {
  const at::Tensor layout = device_layout(a.seq, current_cuda_device());
  return launch(&gru_forward_kernel<T>, gru_forward_params(a, plan, steps_of(a.seq, layout)), plan, stream);
}

template <typename T>
bool launch_gru_backward(const kernels::GruBackwardArgs<T, float>& a, const PersistentPlan& plan,
                         cudaStream_t stream) {
  const at::Tensor layout = device_layout(a.seq, current_cuda_device());
  return launch(&gru_backward_kernel<T>, gru_backward_params(a, plan, steps_of(a.seq, layout)), plan, stream);
}

#define LSTMFAST_PERSISTENT_INSTANTIATE(T)                                                                \
  template PersistentPlan plan_lstm_forward<T>(const kernels::LstmForwardArgs<T>&);                       \
  template PersistentPlan plan_lstm_backward<T>(const kernels::LstmBackwardArgs<T, float>&);              \
  template PersistentPlan plan_rnn_forward<T>(const kernels::RnnForwardArgs<T>&);                         \
  template PersistentPlan plan_rnn_backward<T>(const kernels::RnnBackwardArgs<T, float>&);                \
  template bool launch_lstm_forward<T>(const kernels::LstmForwardArgs<T>&, const PersistentPlan&, cudaStream_t); \
  template bool launch_lstm_backward<T>(const kernels::LstmBackwardArgs<T, float>&, const PersistentPlan&,     \
                                        cudaStream_t);                                                    \
  template bool launch_rnn_forward<T>(const kernels::RnnForwardArgs<T>&, const PersistentPlan&, cudaStream_t);  \
  template bool launch_rnn_backward<T>(const kernels::RnnBackwardArgs<T, float>&, const PersistentPlan&,       \
                                       cudaStream_t);                                                    \
  template PersistentPlan plan_gru_forward<T>(const kernels::GruForwardArgs<T>&);                         \
  template PersistentPlan plan_gru_backward<T>(const kernels::GruBackwardArgs<T, float>&);                \
  template bool launch_gru_forward<T>(const kernels::GruForwardArgs<T>&, const PersistentPlan&, cudaStream_t); \
  template bool launch_gru_backward<T>(const kernels::GruBackwardArgs<T, float>&, const PersistentPlan&,       \
                                       cudaStream_t);

LSTMFAST_PERSISTENT_INSTANTIATE(float)
LSTMFAST_PERSISTENT_INSTANTIATE(c10::Half)
LSTMFAST_PERSISTENT_INSTANTIATE(c10::BFloat16)

}  // namespace lstmfast::persistent

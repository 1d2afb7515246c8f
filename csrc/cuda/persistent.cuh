// Persistent kernels: one cooperative launch runs a whole LSTM / GRU / Elman-RNN layer in one direction,
// forward or backward, with the recurrent weight resident in shared memory (geometry and the decision:
// kernels/persistent_plan.h). The CUDA backend (ops_cuda.cu) asks plan_*; when plan.use, it makes the
// forward's input projection (one GEMM over all rows, as the default path does) and calls launch_*.
// What they read and write is exactly what the default time loops (kernels/layer.h) read and write,
// so a persistent forward pairs with a default backward and the other way round.
//
// LSTMFAST_CUDA_PERSISTENT=auto (the default) takes the LSTM and RNN kernels where they measured faster
// on an H200; the GRU kernels have not run on a GPU yet and run only when forced ("1").
#pragma once

#include <cuda_runtime.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../kernels/layer.h"
#include "../kernels/persistent_plan.h"

namespace lstmfast::persistent {

// float32, float16, bfloat16 (float64 always takes the default path).
template <typename T>
constexpr bool kSupported = std::is_same_v<T, float> || std::is_same_v<T, c10::Half> ||
                            std::is_same_v<T, c10::BFloat16>;

// The plan on the current device, with the mode of LSTMFAST_CUDA_PERSISTENT.
template <typename T> kernels::PersistentPlan plan_lstm_forward(const kernels::LstmForwardArgs<T>& a);
template <typename T> kernels::PersistentPlan plan_lstm_backward(const kernels::LstmBackwardArgs<T, float>& a);
template <typename T> kernels::PersistentPlan plan_rnn_forward(const kernels::RnnForwardArgs<T>& a);
template <typename T> kernels::PersistentPlan plan_rnn_backward(const kernels::RnnBackwardArgs<T, float>& a);
template <typename T> kernels::PersistentPlan plan_gru_forward(const kernels::GruForwardArgs<T>& a);
template <typename T> kernels::PersistentPlan plan_gru_backward(const kernels::GruBackwardArgs<T, float>& a);

// The recurrence only. Forward: a.gates (LSTM; GRU in columns [0, 3H)) / a.output (RNN) must already
// hold x W_ih^T for every row (without bias). Backward: everything after the loop (dx, dW, db) stays with the caller.
// False: the driver refused the cooperative launch as too large (the grid cannot be resident now);
// nothing was written, and the caller runs the default time loop instead.
template <typename T>
bool launch_lstm_forward(const kernels::LstmForwardArgs<T>& a, const kernels::PersistentPlan& plan, cudaStream_t stream);
template <typename T>
bool launch_lstm_backward(const kernels::LstmBackwardArgs<T, float>& a, const kernels::PersistentPlan& plan,
                          cudaStream_t stream);
template <typename T>
bool launch_rnn_forward(const kernels::RnnForwardArgs<T>& a, const kernels::PersistentPlan& plan, cudaStream_t stream);
template <typename T>
bool launch_rnn_backward(const kernels::RnnBackwardArgs<T, float>& a, const kernels::PersistentPlan& plan,
                         cudaStream_t stream);
template <typename T>
bool launch_gru_forward(const kernels::GruForwardArgs<T>& a, const kernels::PersistentPlan& plan, cudaStream_t stream);
template <typename T>
bool launch_gru_backward(const kernels::GruBackwardArgs<T, float>& a, const kernels::PersistentPlan& plan,
                         cudaStream_t stream);

}  // namespace lstmfast::persistent

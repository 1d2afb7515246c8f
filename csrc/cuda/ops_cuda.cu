// CUDA backend of the shared time loops: cuBLAS GEMMs through ATen on the current stream and handle,
// one fused pointwise kernel per step, a device guard, no synchronization and no allocation in the
// loops. Registered for the CUDA dispatch key.
#include <ATen/cuda/CUDAContext.h>
#include <cublas_v2.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "../layer_ops.h"
#include "persistent.cuh"

namespace lstmfast {
namespace {

using namespace kernels;

constexpr int kThreads = 256;

// Sum of v over the block; deterministic (a fixed tree). All threads must call it.
template <typename acc_t>
__device__ acc_t block_sum(acc_t v, acc_t* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) shared[threadIdx.x] += shared[threadIdx.x + s];
    __syncthreads();
  }
  const acc_t r = shared[0];
  __syncthreads();
  return r;
}

// Grid: x = row (sequence) of this step, y = column blocks. With norms, y is 1 so a block owns a row.
#define LSTMFAST_COLUMNS(width)                                                              \
  for (int64_t j = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; j < (width);             \
       j += int64_t(gridDim.y) * blockDim.x)

template <typename T, typename acc_t>
__global__ void lstm_forward_kernel(LstmForwardStep<T> s) {
  LSTMFAST_COLUMNS(s.hidden_size) lstm_forward_point<T, acc_t>(s, blockIdx.x, j);
}

template <typename T, typename acc_t>
__global__ void lstm_backward_kernel(LstmBackwardStep<T> s, acc_t* hidden_norm, acc_t* cell_norm) {
  __shared__ acc_t shared[kThreads];
  acc_t hidden = 0, cell = 0;
  LSTMFAST_COLUMNS(s.hidden_size) {
    const auto sq = lstm_backward_point<T, acc_t>(s, blockIdx.x, j);
    hidden += sq.hidden;
    cell += sq.cell;
  }
  if (hidden_norm != nullptr) {
    hidden = block_sum(hidden, shared);
    if (threadIdx.x == 0) hidden_norm[blockIdx.x] = hidden;
  }
  if (cell_norm != nullptr) {
    cell = block_sum(cell, shared);
    if (threadIdx.x == 0) cell_norm[blockIdx.x] = cell;
  }
}

template <typename T, typename acc_t>
__global__ void rnn_forward_kernel(RnnForwardStep<T> s) {
  LSTMFAST_COLUMNS(s.hidden_size) rnn_forward_point<T, acc_t>(s, blockIdx.x, j);
}

template <typename T, typename acc_t>
__global__ void rnn_backward_kernel(RnnBackwardStep<T> s, acc_t* hidden_norm) {
  __shared__ acc_t shared[kThreads];
  acc_t hidden = 0;
  LSTMFAST_COLUMNS(s.hidden_size) hidden += rnn_backward_point<T, acc_t>(s, blockIdx.x, j);
  if (hidden_norm != nullptr) {
    hidden = block_sum(hidden, shared);
    if (threadIdx.x == 0) hidden_norm[blockIdx.x] = hidden;
  }
}

template <typename T, typename acc_t>
__global__ void gru_forward_kernel(GruForwardStep<T> s) {
  LSTMFAST_COLUMNS(s.hidden_size) gru_forward_point<T, acc_t>(s, blockIdx.x, j);
}

template <typename T, typename acc_t>
__global__ void gru_backward_kernel(GruBackwardStep<T> s, acc_t* hidden_norm) {
  __shared__ acc_t shared[kThreads];
  acc_t hidden = 0;
  LSTMFAST_COLUMNS(s.hidden_size) hidden += gru_backward_point<T, acc_t>(s, blockIdx.x, j);
  if (hidden_norm != nullptr) {
    hidden = block_sum(hidden, shared);
    if (threadIdx.x == 0) hidden_norm[blockIdx.x] = hidden;
  }
}

template <typename T, typename acc_t>
__global__ void sum_kernel(SumStep<T> s, acc_t* norm) {
  __shared__ acc_t shared[kThreads];
  acc_t total = 0;
  LSTMFAST_COLUMNS(s.width) total += sum_point<T, acc_t>(s, blockIdx.x, j);
  if (norm != nullptr) {
    total = block_sum(total, shared);
    if (threadIdx.x == 0) norm[blockIdx.x] = total;
  }
}

struct CudaBackend {
  static constexpr bool kReducedPrecision = true;
  static constexpr const char* kDtypes = "float32, float64, float16 or bfloat16";

  c10::cuda::CUDAGuard guard;
  cudaStream_t stream;

  explicit CudaBackend(const at::Tensor& input)
      : guard(input.device()), stream(at::cuda::getCurrentCUDAStream()) {}

  // Whole layers on the persistent kernels (persistent.cuh) when LSTMFAST_CUDA_PERSISTENT allows and
  // they fit; false: the shared time loop runs. The forwards first project every row's input at once.
  template <typename T>
  bool whole_layer(const LstmForwardArgs<T>& a) {
    if constexpr (!persistent::kSupported<T>) {
      return false;
    } else {
      const auto plan = persistent::plan_lstm_forward(a);
      if (!plan.use) return false;
      const int64_t G = 4 * a.hidden_size;
      gemm(false, true, a.seq.rows, G, a.input_size, 1.0, a.input, a.input_size, a.w_ih, a.input_size, 0.0,
           a.gates, G);
      return persistent::launch_lstm_forward(a, plan, stream);
    }
  }

  template <typename T, typename norm_t>
  bool whole_layer(const LstmBackwardArgs<T, norm_t>& a) {
    if constexpr (!persistent::kSupported<T> || !std::is_same_v<norm_t, float>) {
      return false;
    } else {
      const auto plan = persistent::plan_lstm_backward(a);
      if (!plan.use) return false;
      return persistent::launch_lstm_backward(a, plan, stream);
    }
  }

  template <typename T>
  bool whole_layer(const RnnForwardArgs<T>& a) {
    if constexpr (!persistent::kSupported<T>) {
      return false;
    } else {
      const auto plan = persistent::plan_rnn_forward(a);
      if (!plan.use) return false;
      const int64_t H = a.hidden_size;
      gemm(false, true, a.seq.rows, H, a.input_size, 1.0, a.input, a.input_size, a.w_ih, a.input_size, 0.0,
           a.output, H);
      return persistent::launch_rnn_forward(a, plan, stream);
    }
  }

  template <typename T, typename norm_t>
  bool whole_layer(const RnnBackwardArgs<T, norm_t>& a) {
    if constexpr (!persistent::kSupported<T> || !std::is_same_v<norm_t, float>) {
      return false;
    } else {
      const auto plan = persistent::plan_rnn_backward(a);
      if (!plan.use) return false;
      return persistent::launch_rnn_backward(a, plan, stream);
    }
  }

  template <typename T>
  bool whole_layer(const GruForwardArgs<T>& a) {
    if constexpr (!persistent::kSupported<T>) {
      return false;
    } else {
      const auto plan = persistent::plan_gru_forward(a);
      if (!plan.use) return false;
      const int64_t H = a.hidden_size;
      gemm(false, true, a.seq.rows, 3 * H, a.input_size, 1.0, a.input, a.input_size, a.w_ih, a.input_size, 0.0,
           a.gates, 4 * H);
      return persistent::launch_gru_forward(a, plan, stream);
    }
  }

  template <typename T, typename norm_t>
  bool whole_layer(const GruBackwardArgs<T, norm_t>& a) {
    if constexpr (!persistent::kSupported<T> || !std::is_same_v<norm_t, float>) {
      return false;
    } else {
      const auto plan = persistent::plan_gru_backward(a);
      if (!plan.use) return false;
      return persistent::launch_gru_backward(a, plan, stream);
    }
  }

  // Runs a time loop (the CPU backend may run it on a team of threads; here kernels queue on the stream).
  template <typename T, typename F>
  void run(int64_t, int64_t, int64_t, int64_t, const F& f) {
    f();
  }

  // Inference projects the whole input at once (one large GEMM).
  static int64_t inference_gate_rows(int64_t rows, int64_t, int64_t) { return rows; }

  // Whole-sequence products (input and weight gradients): torch's own matmul.
  static at::Tensor mm(const at::Tensor& a, const at::Tensor& b) { return at::mm(a, b); }
  static void addmm_(at::Tensor& c, const at::Tensor& a, const at::Tensor& b) { c.addmm_(a, b); }

  // cuBLAS on torch's handle for this device and stream. Reduced precision and float32 accumulate
  // in float32, float64 in float64. (The handle carries torch's math mode: float32 products use TF32
  // tensor cores only where torch.backends.cuda.matmul.allow_tf32 lets torch's own do so.)
  template <typename T>
  void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const T* a,
            int64_t lda, const T* b, int64_t ldb, double beta, T* c, int64_t ldc) {
    if (m == 0 || n == 0) return;
    using acc_t = at::opmath_type<T>;
    cudaDataType_t type = CUDA_R_32F;
    cublasComputeType_t compute = CUBLAS_COMPUTE_32F;
    if constexpr (std::is_same_v<T, double>) {
      type = CUDA_R_64F;
      compute = CUBLAS_COMPUTE_64F;
    } else if constexpr (std::is_same_v<T, at::Half>) {
      type = CUDA_R_16F;
    } else if constexpr (std::is_same_v<T, at::BFloat16>) {
      type = CUDA_R_16BF;
    }
    const acc_t alpha_acc = static_cast<acc_t>(alpha), beta_acc = static_cast<acc_t>(beta);
    TORCH_CHECK(std::max({m, n, k, lda, ldb, ldc}) <= INT32_MAX,
                "lstmfast: a GEMM dimension exceeds cuBLAS's 32-bit limit");
    // Row-major C = op(A) op(B) is column-major C^T = op(B)^T op(A)^T.
    const cublasStatus_t status = cublasGemmEx(
        at::cuda::getCurrentCUDABlasHandle(), trans_b ? CUBLAS_OP_T : CUBLAS_OP_N,
        trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, int(n), int(m), int(k), &alpha_acc, b, type, int(ldb), a,
        type, int(lda), &beta_acc, c, type, int(ldc), compute, CUBLAS_GEMM_DEFAULT);
    TORCH_CHECK(status == CUBLAS_STATUS_SUCCESS, "lstmfast: cublasGemmEx failed: ",
                cublasGetStatusString(status));
  }

  template <typename T>
  void copy_rows(T* dst, const T* src, int64_t rows, int64_t width) {
    if (rows * width == 0) return;
    C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, rows * width * sizeof(T), cudaMemcpyDeviceToDevice, stream));
  }

  // One time step's product: the same GEMM (the CPU backend may split it by rows).
  template <typename T>
  void step_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const T* a,
                 int64_t lda, const T* b, int64_t ldb, double beta, T* c, int64_t ldc) {
    gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }

  static dim3 grid(int64_t rows, int64_t width, bool whole_rows) {
    const int64_t blocks = whole_rows ? 1 : std::min<int64_t>((width + kThreads - 1) / kThreads, 65535);
    return dim3(static_cast<unsigned>(rows), static_cast<unsigned>(std::max<int64_t>(blocks, 1)));
  }

  template <typename T>
  void lstm_forward(const LstmForwardStep<T>& s, int64_t rows) {
    if (rows == 0) return;
    lstm_forward_kernel<T, at::opmath_type<T>>
        <<<grid(rows, s.hidden_size, false), kThreads, 0, stream>>>(s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T, typename acc_t>
  void lstm_backward(const LstmBackwardStep<T>& s, int64_t rows, acc_t* hidden_norm, acc_t* cell_norm) {
    if (rows == 0) return;
    const bool norms = hidden_norm != nullptr || cell_norm != nullptr;
    lstm_backward_kernel<T, acc_t>
        <<<grid(rows, s.hidden_size, norms), kThreads, 0, stream>>>(s, hidden_norm, cell_norm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T>
  void rnn_forward(const RnnForwardStep<T>& s, int64_t rows) {
    if (rows == 0) return;
    rnn_forward_kernel<T, at::opmath_type<T>>
        <<<grid(rows, s.hidden_size, false), kThreads, 0, stream>>>(s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T, typename acc_t>
  void rnn_backward(const RnnBackwardStep<T>& s, int64_t rows, acc_t* hidden_norm) {
    if (rows == 0) return;
    rnn_backward_kernel<T, acc_t>
        <<<grid(rows, s.hidden_size, hidden_norm != nullptr), kThreads, 0, stream>>>(s, hidden_norm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T>
  void gru_forward(const GruForwardStep<T>& s, int64_t rows) {
    if (rows == 0) return;
    gru_forward_kernel<T, at::opmath_type<T>>
        <<<grid(rows, s.hidden_size, false), kThreads, 0, stream>>>(s);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T, typename acc_t>
  void gru_backward(const GruBackwardStep<T>& s, int64_t rows, acc_t* hidden_norm) {
    if (rows == 0) return;
    gru_backward_kernel<T, acc_t>
        <<<grid(rows, s.hidden_size, hidden_norm != nullptr), kThreads, 0, stream>>>(s, hidden_norm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

  template <typename T, typename acc_t>
  void sum(const SumStep<T>& s, int64_t rows, acc_t* norm) {
    if (rows == 0) return;
    sum_kernel<T, acc_t><<<grid(rows, s.width, norm != nullptr), kThreads, 0, stream>>>(s, norm);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }

};

}  // namespace

TORCH_LIBRARY_IMPL(lstmfast, CUDA, m) {
  m.impl("lstm_forward", &lstm_forward<CudaBackend>);
  m.impl("lstm_backward", &lstm_backward<CudaBackend>);
  m.impl("rnn_forward", &rnn_forward<CudaBackend>);
  m.impl("rnn_backward", &rnn_backward<CudaBackend>);
  m.impl("gru_forward", &gru_forward<CudaBackend>);
  m.impl("gru_backward", &gru_backward<CudaBackend>);
}

}  // namespace lstmfast

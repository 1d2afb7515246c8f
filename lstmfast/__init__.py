"""lstmfast: fused LSTM, GRU and Elman RNN layers for PyTorch, drop-in for torch.nn.LSTM / torch.nn.GRU /
torch.nn.RNN."""

from . import diagnostics, functional, reference
from ._ops import build_summary, cpu_gemm_engines, cpu_isa, has_cuda_kernels, ops
from .cpu_cache import cpu_cache_bytes, cpu_cache_limit, empty_cpu_cache, set_cpu_cache_limit
from .functional import GRUFunction, LSTMFunction, RNNFunction
from .modules import GRU, LSTM, RNN, convert, unconvert
from . import onnx_export as _onnx_export
from .onnx_export import onnx_translations
from ._ops import cuda_persistent_launches, cuda_persistent_plan

_onnx_export.install()  # the TorchScript-based ONNX exporter's symbolics, once torch.onnx is imported

__version__ = "0.1.0"
__all__ = ["LSTM", "GRU", "RNN", "convert", "unconvert", "LSTMFunction", "GRUFunction", "RNNFunction",
           "functional", "reference", "diagnostics", "ops", "has_cuda_kernels", "cpu_isa", "cpu_gemm_engines",
           "empty_cpu_cache",
           "cpu_cache_bytes", "cpu_cache_limit", "set_cpu_cache_limit", "build_summary", "onnx_translations"]
__all__ += ["cuda_persistent_plan", "cuda_persistent_launches"]

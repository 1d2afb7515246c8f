"""lstmfast: fused LSTM and Elman RNN layers for PyTorch, drop-in for torch.nn.LSTM / torch.nn.RNN."""

from . import functional, reference
from ._ops import cpu_isa, has_cuda_kernels, ops
from .functional import LSTMFunction, RNNFunction
from .modules import LSTM, RNN

__version__ = "0.1.0"
__all__ = ["LSTM", "RNN", "LSTMFunction", "RNNFunction", "functional", "reference", "ops",
           "has_cuda_kernels", "cpu_isa"]

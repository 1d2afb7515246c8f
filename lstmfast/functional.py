"""One LSTM or Elman RNN layer, one direction, over a whole sequence, with fused forward and BPTT.

Sequence layout (design.md section 3): ``input`` is ``(T, B, I)``, or ``(N, I)`` packed rows with
``batch_sizes`` (a ``PackedSequence``'s, int64 on the CPU). ``reverse=True`` runs from the last step
to the first (the backward half of a bidirectional layer); each sequence then starts from ``h0`` at
its own last step.

``grad_clip=c`` clamps every element of dL/d(gate pre-activations) into ``[-c, c]`` inside the BPTT
loop, at each step; ``None`` leaves gradients exactly as torch.nn computes them.

``norm_sink``, when given, is called during backward with the per-step gradient norms measured inside
the BPTT kernels (see :mod:`lstmfast.diagnostics`).

On CUDA, float16 and bfloat16 run with float32 arithmetic inside the kernels; under
``torch.autocast("cuda")`` the layer runs in the autocast dtype, like torch.nn's cuDNN layers.
"""

import numbers
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._ops import ops


# Receives, during backward, the per-row norms ||dL/dh_t|| and ||dL/dc_t|| (None for an RNN), each of
# shape (N) in the op's row layout, computed inside the BPTT loop (lstmfast.diagnostics uses it).
NormSink = Callable[[Tensor, Optional[Tensor]], None]


def _needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _autocast(*tensors):
    """Under CUDA autocast, run in the autocast dtype, as torch.nn's cuDNN layers do."""
    if tensors[0].is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        return [t.to(dtype) if t is not None else None for t in tensors]
    return list(tensors)


def _check_grad_clip(grad_clip):
    if grad_clip is None:
        return
    if isinstance(grad_clip, bool) or not isinstance(grad_clip, numbers.Real) or not grad_clip > 0:
        raise ValueError(f"grad_clip must be None or a number > 0, got {grad_clip!r}")


class LSTMFunction(torch.autograd.Function):
    """Autograd for one LSTM layer: forward and backward are each one call of a fused op."""

    @staticmethod
    def forward(ctx, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, grad_clip,
                norm_sink):
        output, h_n, c_n, gates, cells = ops.lstm_forward(
            input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, True
        )
        ctx.save_for_backward(input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, output, gates, cells)
        ctx.reverse, ctx.grad_clip, ctx.norm_sink = reverse, grad_clip, norm_sink
        return output, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, grad_h_n, grad_c_n):
        input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, output, gates, cells = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[2] or need[3], need[4] or need[5] or need[8], need[6] or need[7]]
        (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr, h_norm, c_norm) = (
            ops.lstm_backward(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh,
                              w_hr, output, gates, cells, ctx.reverse, mask, ctx.grad_clip,
                              ctx.norm_sink is not None)
        )
        if ctx.norm_sink is not None:
            ctx.norm_sink(h_norm, c_norm)
        return (
            grad_input if need[0] else None,
            None,
            grad_h0 if need[2] else None,
            grad_c0 if need[3] else None,
            grad_w_ih if need[4] else None,
            grad_w_hh if need[5] else None,
            grad_bias if need[6] else None,
            grad_bias if need[7] else None,
            grad_w_hr if need[8] else None,
            None,
            None,
            None,
        )


class RNNFunction(torch.autograd.Function):
    """Autograd for one Elman RNN layer (tanh or relu)."""

    @staticmethod
    def forward(ctx, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse, grad_clip,
                norm_sink):
        output, h_n = ops.rnn_forward(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity,
                                      reverse)
        ctx.save_for_backward(input, batch_sizes, h0, w_ih, w_hh, output)
        ctx.nonlinearity, ctx.reverse, ctx.grad_clip = nonlinearity, reverse, grad_clip
        ctx.norm_sink = norm_sink
        return output, h_n

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output, grad_h_n):
        input, batch_sizes, h0, w_ih, w_hh, output = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[2], need[3] or need[4], need[5] or need[6]]
        grad_input, grad_h0, grad_w_ih, grad_w_hh, grad_bias, h_norm = ops.rnn_backward(
            grad_output, grad_h_n, input, batch_sizes, h0, w_ih, w_hh, output, ctx.nonlinearity,
            ctx.reverse, mask, ctx.grad_clip, ctx.norm_sink is not None
        )
        if ctx.norm_sink is not None:
            ctx.norm_sink(h_norm, None)
        return (
            grad_input if need[0] else None,
            None,
            grad_h0 if need[2] else None,
            grad_w_ih if need[3] else None,
            grad_w_hh if need[4] else None,
            grad_bias if need[5] else None,
            grad_bias if need[6] else None,
            None,
            None,
            None,
            None,
        )


def lstm(
    input: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    *,
    w_hr: Optional[Tensor] = None,
    h0: Optional[Tensor] = None,
    c0: Optional[Tensor] = None,
    batch_sizes: Optional[Tensor] = None,
    reverse: bool = False,
    grad_clip: Optional[float] = None,
    norm_sink: Optional[NormSink] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer. Returns ``(output, h_n, c_n)``.

    Shapes: input ``(T, B, I)`` or ``(N, I)`` with ``batch_sizes (T)``; ``w_ih (4H, I)``,
    ``w_hh (4H, P)``, ``b_ih, b_hh (4H)``, ``w_hr (P, H)`` (projection; P = H without it);
    ``h0 (B, P)``, ``c0 (B, H)``. Output ``(T, B, P)`` or ``(N, P)``; ``h_n (B, P)``, ``c_n (B, H)``.
    """
    _check_grad_clip(grad_clip)
    input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = _autocast(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    if _needs_grad(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        return LSTMFunction.apply(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                                  grad_clip, norm_sink)
    output, h_n, c_n, _, _ = ops.lstm_forward(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                                              reverse, False)
    return output, h_n, c_n


def rnn(
    input: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    *,
    nonlinearity: str = "tanh",
    h0: Optional[Tensor] = None,
    batch_sizes: Optional[Tensor] = None,
    reverse: bool = False,
    grad_clip: Optional[float] = None,
    norm_sink: Optional[NormSink] = None,
) -> Tuple[Tensor, Tensor]:
    """One Elman RNN layer, ``h_t = nonlinearity(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``.
    Returns ``(output, h_n)``. Shapes as :func:`lstm` with H in place of 4H and no projection."""
    _check_grad_clip(grad_clip)
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    input, h0, w_ih, w_hh, b_ih, b_hh = _autocast(input, h0, w_ih, w_hh, b_ih, b_hh)
    if _needs_grad(input, h0, w_ih, w_hh, b_ih, b_hh):
        return RNNFunction.apply(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse,
                                 grad_clip, norm_sink)
    return ops.rnn_forward(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse)

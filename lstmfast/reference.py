"""Plain-PyTorch LSTM, GRU and Elman RNN layers: a time loop of torch ops under autograd.

The same arguments as :mod:`lstmfast.functional`'s lstm / gru / rnn (``grad_clip`` through gradient
hooks on the pre-activations), except that ``norm_sink`` (the fused kernels' own) is not taken,
``on_step(t, states)`` may be given instead (called at each step, in processing order, with the new
states of the rows still running: the tests retain their gradients), and no argument is checked. It is the oracle of the tests and the baseline of the
benchmarks, so it favours obviousness over speed.
"""

from typing import Optional, Tuple

import torch
from torch import Tensor


def _steps(input, batch_sizes):
    """Rows, step slices and batch size of the sequence layout."""
    if batch_sizes is None:
        steps, batch = input.shape[0], input.shape[1]
        rows = input.reshape(steps * batch, input.shape[2])
        sizes = [batch] * steps
    else:
        rows, sizes = input, [int(s) for s in batch_sizes]
        batch = sizes[0] if sizes else 0
    offsets = [sum(sizes[:t]) for t in range(len(sizes))]
    return rows, list(zip(offsets, sizes)), batch


def _run(input, batch_sizes, states, reverse, cell, out_width, on_step=None):
    """Runs cell(x_t, states of the live rows) -> (h_t, new states) over the sequence (`input`: the
    layer's input product, see _input_product).
    on_step(t, new states) sees each step's states (tests retain their gradients).
    (The steps' inputs are split off in one op, and states are sliced only where the batch shrinks:
    slicing each step out of the whole sequence costs its backward a sequence-sized buffer per step.)"""
    rows, steps, _ = _steps(input, batch_sizes)
    step_inputs = rows.split([size for _, size in steps]) if steps else []
    outputs = [None] * len(steps)
    order = range(len(steps) - 1, -1, -1) if reverse else range(len(steps))
    for t in order:
        size = steps[t][1]
        full = all(s.shape[0] == size for s in states)
        h_t, new = cell(step_inputs[t], states if full else [s[:size] for s in states])
        if on_step is not None:
            on_step(t, new)
        states = list(new) if full else [torch.cat([n, s[size:]]) for n, s in zip(new, states)]
        outputs[t] = h_t
    output = torch.cat(outputs) if outputs else rows.new_zeros((0, out_width))
    if batch_sizes is None:
        output = output.reshape(input.shape[0], input.shape[1], out_width)
    return output, states


def _clip_hook(tensor, grad_clip):
    if grad_clip is not None and tensor.requires_grad:
        tensor.register_hook(lambda g: g.clamp(-grad_clip, grad_clip))
    return tensor


def _linear(x, w, b):
    return x @ w.t() + b if b is not None else x @ w.t()


def _input_product(input, w_ih, b_ih, b_hh):
    """W_ih x + b_ih (+ b_hh), for the whole sequence at once; each step then adds W_hh h_{t-1} with one
    torch.addmm (this is also lstmfast's second-order and forward-mode engine: few ops per step)."""
    product = _linear(input, w_ih, b_ih)
    return product + b_hh if b_hh is not None else product


def lstm(input: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
         b_hh: Optional[Tensor] = None, *, w_hr: Optional[Tensor] = None, h0: Optional[Tensor] = None,
         c0: Optional[Tensor] = None, batch_sizes: Optional[Tensor] = None, reverse: bool = False,
         grad_clip: Optional[float] = None, on_step=None) -> Tuple[Tensor, Tensor, Tensor]:
    hidden, proj = w_hh.shape[0] // 4, w_hh.shape[1]
    _, _, batch = _steps(input, batch_sizes)
    h = h0 if h0 is not None else input.new_zeros((batch, proj))
    c = c0 if c0 is not None else input.new_zeros((batch, hidden))

    w_hh_t = w_hh.t()

    def cell(x, state):  # x: the step's W_ih x_t + b_ih + b_hh
        h_prev, c_prev = state
        a = _clip_hook(torch.addmm(x, h_prev, w_hh_t), grad_clip)
        i, f, g, o = a.chunk(4, dim=1)
        c_t = torch.sigmoid(f) * c_prev + torch.sigmoid(i) * torch.tanh(g)
        # (.to: a float32 c_0 given to a lower-precision layer keeps c float32; h stays the layer's dtype.)
        h_t = (torch.sigmoid(o) * torch.tanh(c_t)).to(a.dtype)
        if w_hr is not None:
            h_t = h_t @ w_hr.t()
        return h_t, (h_t, c_t)

    output, (h_n, c_n) = _run(_input_product(input, w_ih, b_ih, b_hh), batch_sizes, [h, c], reverse, cell, proj,
                              on_step)
    return output, h_n, c_n


def rnn(input: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
        b_hh: Optional[Tensor] = None, *, nonlinearity: str = "tanh", h0: Optional[Tensor] = None,
        batch_sizes: Optional[Tensor] = None, reverse: bool = False,
        grad_clip: Optional[float] = None, on_step=None) -> Tuple[Tensor, Tensor]:
    hidden = w_hh.shape[0]
    _, _, batch = _steps(input, batch_sizes)
    h = h0 if h0 is not None else input.new_zeros((batch, hidden))
    activation = {"tanh": torch.tanh, "relu": torch.relu}[nonlinearity]

    w_hh_t = w_hh.t()

    def cell(x, state):  # x: the step's W_ih x_t + b_ih + b_hh
        a = _clip_hook(torch.addmm(x, state[0], w_hh_t), grad_clip)
        h_t = activation(a)
        return h_t, (h_t,)

    output, (h_n,) = _run(_input_product(input, w_ih, b_ih, b_hh), batch_sizes, [h], reverse, cell, hidden,
                          on_step)
    return output, h_n


def gru(input: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
        b_hh: Optional[Tensor] = None, *, h0: Optional[Tensor] = None,
        batch_sizes: Optional[Tensor] = None, reverse: bool = False,
        grad_clip: Optional[float] = None, on_step=None) -> Tuple[Tensor, Tensor]:
    """torch.nn.GRU's equations (gate order r, z, n; the reset gate multiplies W_hn h + b_hn only).
    grad_clip clips the gradients of the three pre-activations r, z and x_n + r * (W_hn h + b_hn)."""
    hidden = w_hh.shape[0] // 3
    _, _, batch = _steps(input, batch_sizes)
    h = h0 if h0 is not None else input.new_zeros((batch, hidden))

    w_hh_t = w_hh.t()

    def cell(x, state):  # x: the step's W_ih x_t + b_ih
        h_prev = state[0]
        x_r, x_z, x_n = x.chunk(3, dim=1)
        hidden_product = torch.addmm(b_hh, h_prev, w_hh_t) if b_hh is not None else h_prev @ w_hh_t
        h_r, h_z, h_n = hidden_product.chunk(3, dim=1)
        r = torch.sigmoid(_clip_hook(x_r + h_r, grad_clip))
        z = torch.sigmoid(_clip_hook(x_z + h_z, grad_clip))
        n = torch.tanh(_clip_hook(x_n + r * h_n, grad_clip))
        h_t = n + z * (h_prev - n)  # = (1 - z) * n + z * h_prev, in torch.nn's GRU cell's order
        return h_t, (h_t,)

    output, (h_n,) = _run(_linear(input, w_ih, b_ih), batch_sizes, [h], reverse, cell, hidden, on_step)
    return output, h_n

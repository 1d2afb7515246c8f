"""Shared sample generator and helpers: every test builds its inputs through `layer_sample`."""

import dataclasses
import types
from typing import List, Optional

import pytest
import torch

import lstmfast

CUDA = torch.cuda.is_available() and lstmfast.has_cuda_kernels()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU"))]

# Tolerances of the comparisons (design.md section 7).
TOLERANCES = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-5, atol=1e-5),
}


@dataclasses.dataclass
class LayerSample:
    """The arguments of one call of functional.lstm / functional.rnn / a gru (and of their references)."""

    cell: str  # "lstm", "gru" or "rnn"
    args: tuple  # input, w_ih, w_hh, b_ih, b_hh
    kwargs: dict

    @property
    def tensors(self) -> List[torch.Tensor]:
        """Every tensor argument that requires grad, in a fixed order."""
        candidates = list(self.args) + [self.kwargs.get(k) for k in ("w_hr", "h0", "c0")]
        return [t for t in candidates if t is not None and t.requires_grad]

    def run(self, module):
        return getattr(module, self.cell)(*self.args, **self.kwargs)


def layer_sample(cell="lstm", *, steps=5, batch=3, input_size=4, hidden=6, proj=0, bias=True,
                 state=True, lengths: Optional[List[int]] = None, reverse=False,
                 nonlinearity="tanh", dtype=torch.float64, device="cpu", requires_grad=True,
                 grad_clip=None, seed=0) -> LayerSample:
    """Random weights and inputs for one layer. `lengths` (non-increasing) gives packed input."""
    g = torch.Generator().manual_seed(seed)
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    out = proj or hidden

    def rand(*shape, scale=1.0):
        t = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1) * scale
        return t.to(dtype=dtype, device=device).requires_grad_(requires_grad)

    kwargs = dict(reverse=reverse, grad_clip=grad_clip)
    if lengths is None:
        x = rand(steps, batch, input_size)
    else:
        batch = len(lengths)
        kwargs["batch_sizes"] = torch.tensor(
            [sum(length > t for length in lengths) for t in range(max(lengths))], dtype=torch.int64)
        x = rand(sum(lengths), input_size)
    scale = 1.0 / max(hidden, 1) ** 0.5 * 1.5
    w_ih, w_hh = rand(gates * hidden, input_size, scale=scale), rand(gates * hidden, out, scale=scale)
    b_ih = rand(gates * hidden, scale=scale) if bias else None
    b_hh = rand(gates * hidden, scale=scale) if bias else None
    if proj:
        kwargs["w_hr"] = rand(proj, hidden, scale=scale)
    if state or lengths is not None:
        kwargs["h0"] = rand(batch, out)
        if cell == "lstm":
            kwargs["c0"] = rand(batch, hidden)
        if not state:  # packed input without a given state: zeros that need no gradient
            for k in ("h0", "c0"):
                if k in kwargs:
                    kwargs[k] = torch.zeros_like(kwargs[k]).requires_grad_(False)
    if cell == "rnn":
        kwargs["nonlinearity"] = nonlinearity
    return LayerSample(cell, (x, w_ih, w_hh, b_ih, b_hh), kwargs)


class _GruOps(torch.autograd.Function):
    """The raw gru_forward / gru_backward ops as one differentiable call, for op-level tests (the
    user-facing GRU lives in lstmfast.functional)."""

    @staticmethod
    def forward(ctx, input, w_ih, w_hh, b_ih, b_hh, h0, batch_sizes, reverse, grad_clip):
        output, h_n, gates = torch.ops.lstmfast.gru_forward(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh,
                                                            reverse, True)
        ctx.save_for_backward(input, w_ih, w_hh, h0, output, gates, batch_sizes)
        ctx.reverse, ctx.grad_clip = reverse, grad_clip
        return output, h_n

    @staticmethod
    def backward(ctx, grad_output, grad_h_n):
        input, w_ih, w_hh, h0, output, gates, batch_sizes = ctx.saved_tensors
        need = ctx.needs_input_grad
        mask = [need[0], need[5], need[1] or need[2], need[3] or need[4]]
        g_input, g_h0, g_w_ih, g_w_hh, g_b_ih, g_b_hh, _ = torch.ops.lstmfast.gru_backward(
            grad_output, grad_h_n, input, batch_sizes, h0, w_ih, w_hh, output, gates, ctx.reverse, mask,
            ctx.grad_clip, False)
        grads = [g_input, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_h0]
        return tuple(g if n else None for g, n in zip(grads, need)) + (None, None, None)


def _gru_ops(input, w_ih, w_hh, b_ih=None, b_hh=None, *, h0=None, batch_sizes=None, reverse=False,
             grad_clip=None):
    return _GruOps.apply(input, w_ih, w_hh, b_ih, b_hh, h0, batch_sizes, reverse, grad_clip)


# A stand-in for a module with a `gru` function (LayerSample.run), made of the raw ops.
raw_ops = types.SimpleNamespace(gru=_gru_ops)


def outputs_and_grads(sample: LayerSample, module, seed=1):
    """Runs the layer, back-propagates fixed random cotangents of every output, returns both."""
    outputs = sample.run(module)
    g = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outputs]
    grads = torch.autograd.grad(outputs, sample.tensors, cotangents, allow_unused=True)
    return [o.detach() for o in outputs], list(grads)


def module_outputs_and_grads(module, x, hx, leaves, cotangent_seed=3):
    """Runs a module (LSTM / RNN, ours or torch.nn's), back-propagates fixed random cotangents of the
    output and every final state, and returns them with the gradients of `leaves` and every parameter
    (zeros for a tensor the outputs do not depend on)."""
    output, state = module(x, hx)
    states = [state] if isinstance(state, torch.Tensor) else list(state)
    data = output.data if isinstance(output, torch.nn.utils.rnn.PackedSequence) else output
    outs = [data] + states
    g = torch.Generator().manual_seed(cotangent_seed)
    cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outs]
    grads = torch.autograd.grad(outs, list(leaves) + list(module.parameters()), cotangents,
                                allow_unused=True)
    return [o.detach() for o in outs], [torch.zeros(()) if g is None else g for g in grads]


def assert_same_bits_across_threads(run, thread_counts=(1, 2, 1)):
    """run() (a list of tensors) gives the same bits with each of the thread counts."""
    threads = torch.get_num_threads()
    results = []
    try:
        for n in thread_counts:
            torch.set_num_threads(n)
            results.append((n, run()))
    finally:
        torch.set_num_threads(threads)
    (first_n, first), rest = results[0], results[1:]
    for n, tensors in rest:
        assert len(tensors) == len(first)
        for i, (a, b) in enumerate(zip(first, tensors)):
            assert torch.equal(a, b), f"tensor {i} differs between {first_n} and {n} threads"


def module_run(module, x):
    """A run for assert_same_bits_across_threads: module_outputs_and_grads' tensors, x requiring grad."""
    def run():
        xi = x.clone().requires_grad_()
        return sum(module_outputs_and_grads(module, xi, None, [xi]), [])
    return run


def assert_all_close(actual, expected, **tolerance):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, **tolerance, msg=lambda m: f"tensor {i}: {m}")


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)

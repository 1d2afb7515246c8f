"""Shared sample generator and helpers: every test builds its inputs through `layer_sample`."""

import dataclasses
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
    """The arguments of one call of functional.lstm / gru / rnn (and of their references)."""

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


def assert_all_close(actual, expected, **tolerance):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, **tolerance, msg=lambda m: f"tensor {i}: {m}")


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)

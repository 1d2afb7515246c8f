"""torch.compile(fullgraph=True) over models with lstmfast layers: no graph breaks, same numbers."""

import pytest
import torch
from torch import nn

import lstmfast


class Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = lstmfast.LSTM(6, 8, num_layers=2, bidirectional=True, batch_first=True)
        self.gru = lstmfast.GRU(16, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.rnn = lstmfast.RNN(12, 5, nonlinearity="relu", batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        y, h_gru = self.gru(y)
        y, h2 = self.rnn(y)
        return self.head(y).square().mean() + h.sum() + c.mean() + h_gru.pow(2).mean() + h2.sum()


@pytest.mark.slow
def test_compile_fullgraph_inference_and_training():
    torch.manual_seed(0)
    model = Tagger().double()
    compiled = torch.compile(model, fullgraph=True)
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-10, atol=1e-10)
    loss = compiled(x)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    eager = torch.autograd.grad(model(x), list(model.parameters()))
    for g, e in zip(grads, eager):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_compiled_dropout_draws_eager_masks_with_inductor_s_fallback_random():
    """Compiled dropout draws Inductor's random numbers (as any compiled dropout does); with
    fallback_random it draws eager's, and a compiled lstmfast layer then equals torch.nn's eager one."""
    import torch._inductor.config
    torch.manual_seed(0)
    theirs = nn.GRU(3, 4, num_layers=2, dropout=0.5).double()
    ours = lstmfast.GRU.from_torch(theirs)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.manual_seed(7)
    expected = theirs(x)[0]
    with torch._inductor.config.patch(fallback_random=True):
        torch._dynamo.reset()
        torch.manual_seed(7)
        actual = torch.compile(ours, fullgraph=True)(x)[0]
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("transform", ["vjp", "grad", "vmap"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_torch_func_transforms_inside_torch_compile_equal_torch_nn(kind, transform):
    """torch.func transforms traced by torch.compile (the layer then runs lstmfast.reference's plain
    ops): torch.nn's results (torch.func.vjp's gradients came back zero)."""
    import copy
    torch.manual_seed(0)
    theirs = getattr(torch.nn, kind)(3, 4).double()
    ours = getattr(lstmfast, kind).from_torch(copy.deepcopy(theirs))
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    cotangent = torch.linspace(-1, 1, 32, dtype=torch.float64).view(4, 2, 4)

    def run(module):
        if transform == "vjp":
            _, pullback = torch.func.vjp(lambda v: module(v)[0], x)
            return pullback(cotangent)[0]
        if transform == "grad":
            return torch.func.grad(lambda v: (module(v)[0] * cotangent).sum())(x)
        return torch.func.vmap(lambda v: module(v)[0], in_dims=1, out_dims=1)(x)

    if transform == "vmap":  # (torch.nn has no batching rule: its layer one sample at a time)
        expected = torch.stack([theirs(x[:, i])[0] for i in range(x.shape[1])], dim=1)
    else:
        expected = run(theirs)
    found = torch.compile(lambda: run(ours), backend="aot_eager")()
    assert expected.abs().sum() > 0
    torch.testing.assert_close(found, expected, rtol=1e-10, atol=1e-10)

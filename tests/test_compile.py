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

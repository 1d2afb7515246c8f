"""Per-step gradient norms from inside BPTT, gradient clipping in BPTT, conversion helpers."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import lstmfast
from lstmfast import diagnostics, functional, reference

from conftest import TOLERANCES, assert_all_close, layer_sample, outputs_and_grads


def reference_flow(module, x, batch_sizes=None):
    """||dL/dh_t||, ||dL/dc_t|| per row by autograd on lstmfast.reference with retain_grad."""
    states = {}

    def on_step(t, new):
        for s in new:
            s.retain_grad()
        states[t] = new

    w = [getattr(module, f"{n}_l0") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
    if isinstance(module, lstmfast.LSTM):
        out, _, _ = reference.lstm(x, *w, batch_sizes=batch_sizes, on_step=on_step)
    elif isinstance(module, lstmfast.GRU):
        out, _ = reference.gru(x, *w, batch_sizes=batch_sizes, on_step=on_step)
    else:
        out, _ = reference.rnn(x, *w, nonlinearity=module.nonlinearity, batch_sizes=batch_sizes,
                               on_step=on_step)
    return out, states


@pytest.mark.parametrize("kind,options", [("LSTM", {}), ("GRU", {}), ("RNN", dict(nonlinearity="tanh")),
                                          ("RNN", dict(nonlinearity="relu"))])
def test_gradient_flow_matches_autograd(kind, options):
    module = getattr(lstmfast, kind)(3, 5, **options).double()
    x = torch.randn(7, 4, 3, dtype=torch.float64)
    flow = diagnostics.gradient_flow(module, x)
    out, states = reference_flow(module, x)
    out[-1].sum().backward()
    want_h = torch.stack([states[t][0].grad.norm(dim=-1) for t in range(7)])
    torch.testing.assert_close(flow.hidden[0], want_h, **TOLERANCES[torch.float64])
    if kind == "LSTM":
        want_c = torch.stack([states[t][1].grad.norm(dim=-1) for t in range(7)])
        torch.testing.assert_close(flow.cell[0], want_c, **TOLERANCES[torch.float64])
    else:
        assert flow.cell is None
    x_leaf = x.clone().requires_grad_()
    (grad_x,) = torch.autograd.grad(module(x_leaf)[0][-1].sum(), x_leaf)
    torch.testing.assert_close(flow.input, grad_x.norm(dim=-1), **TOLERANCES[torch.float64])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_gradient_flow_packed(kind):
    """With batch_sizes: norms per (step, sequence) in the caller's order, NaN after a sequence ends."""
    module = getattr(lstmfast, kind)(3, 5).double()
    lengths = [2, 5, 3]
    seqs = [torch.randn(n, 3, dtype=torch.float64) for n in lengths]
    packed = pack_sequence(seqs, enforce_sorted=False)
    flow = diagnostics.gradient_flow(module, packed, loss_fn=lambda out: out.data.square().sum())
    out, states = reference_flow(module, packed.data, packed.batch_sizes)
    out.square().sum().backward()
    for t in range(5):
        size = int(packed.batch_sizes[t])
        for sorted_b in range(size):
            b = int(packed.sorted_indices[sorted_b])
            want = states[t][0].grad[sorted_b].norm()
            torch.testing.assert_close(flow.hidden[0, t, b], want, **TOLERANCES[torch.float64])
            if kind == "LSTM":
                torch.testing.assert_close(flow.cell[0, t, b], states[t][1].grad[sorted_b].norm(),
                                           **TOLERANCES[torch.float64])
    for b, n in enumerate(lengths):
        assert torch.isnan(flow.hidden[0, n:, b]).all() and not torch.isnan(flow.hidden[0, :n, b]).any()


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_gradient_flow_every_layer_and_direction(kind):
    module = getattr(lstmfast, kind)(3, 4, num_layers=2, bidirectional=True, batch_first=True).double()
    flow = diagnostics.gradient_flow(module, torch.randn(2, 6, 3, dtype=torch.float64))
    assert flow.hidden.shape == (4, 6, 2) and flow.input.shape == (6, 2)
    assert flow.cell.shape == (4, 6, 2) if kind == "LSTM" else flow.cell is None
    assert torch.isfinite(flow.hidden).all() and (flow.hidden > 0).any()


def _flow_values(flow):
    return [t for t in (flow.hidden, flow.cell, flow.input) if t is not None] + [torch.tensor(flow.loss)]


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_gradient_flow_runs_with_gradients_on_whatever_the_grad_mode(mode):
    torch.manual_seed(0)
    module = lstmfast.LSTM(3, 4, num_layers=2).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    expected = diagnostics.gradient_flow(module, x)
    with torch.no_grad() if mode == "no_grad" else torch.inference_mode():
        found = diagnostics.gradient_flow(module, x.clone())
    assert_all_close(_flow_values(found), _flow_values(expected), rtol=0, atol=0)
    assert all(p.grad is None for p in module.parameters())


def test_gradient_flow_refuses_a_torch_nn_layer_naming_its_class():
    with pytest.raises(TypeError, match=r"expects an lstmfast.LSTM, lstmfast.GRU or lstmfast.RNN \(lstmfast.convert "
                                        r"makes one of a torch.nn layer\), got torch.nn.modules.rnn.GRU"):
        diagnostics.gradient_flow(torch.nn.GRU(3, 4), torch.randn(2, 6, 3))


def test_gradient_flow_in_threads_sharing_the_module():
    """Threads measuring gradient flow through one module, and another training it meanwhile: each
    measurement is that thread's own pass, as measured alone."""
    import threading

    torch.manual_seed(0)
    module = lstmfast.GRU(4, 5, num_layers=2).double()
    inputs = [torch.randn(7, 3, 4, dtype=torch.float64) for _ in range(3)]
    expected = [_flow_values(diagnostics.gradient_flow(module, x)) for x in inputs]
    found, errors, stop = {}, [], threading.Event()

    def measure(i):
        try:
            for repeat in range(15):
                found[(i, repeat)] = _flow_values(diagnostics.gradient_flow(module, inputs[i]))
        except Exception as error:  # reported below, in the main thread
            errors.append(error)

    def train():
        while not stop.is_set():
            module(torch.randn(7, 3, 4, dtype=torch.float64))[0].sum().backward()

    trainer = threading.Thread(target=train)
    threads = [threading.Thread(target=measure, args=(i,)) for i in range(3)]
    trainer.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    trainer.join(timeout=120)
    assert not errors, errors
    assert len(found) == 45 and module._gradient_recorder is None
    for (i, _), values in found.items():
        assert_all_close(values, expected[i], rtol=0, atol=0)


@pytest.mark.parametrize("variant", [dict(cell="lstm"), dict(cell="lstm", proj=3), dict(cell="gru"),
                                     dict(cell="rnn", nonlinearity="tanh"), dict(cell="rnn", nonlinearity="relu")])
@pytest.mark.parametrize("lengths", [None, [5, 4, 2]])
def test_grad_clip_matches_reference(variant, lengths):
    """grad_clip clamps dL/d(gate pre-activations) at every step, exactly as a clamping reference."""
    sample = layer_sample(**variant, lengths=lengths, grad_clip=0.05, hidden=8)
    out, grads = outputs_and_grads(sample, functional)
    ref_out, ref_grads = outputs_and_grads(sample, reference)
    assert_all_close(grads, ref_grads, **TOLERANCES[torch.float64])
    unclipped = layer_sample(**variant, lengths=lengths, hidden=8)
    _, free = outputs_and_grads(unclipped, functional)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(grads, free)), "clipping changed nothing"


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_grad_clip_none_is_exact_torch(kind):
    ours = getattr(lstmfast, kind)(3, 4, grad_clip=None).double()
    theirs = getattr(nn, kind)(3, 4).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    g1 = torch.autograd.grad(ours(x)[0].sum(), list(ours.parameters()))
    g2 = torch.autograd.grad(theirs(x)[0].sum(), list(theirs.parameters()))
    assert_all_close(g1, g2, **TOLERANCES[torch.float64])


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.LSTM(4, 8, num_layers=2, bidirectional=True, batch_first=True)
        self.blocks = nn.ModuleList([nn.RNN(16, 6, nonlinearity="relu"), nn.Sequential(nn.LSTM(6, 3, proj_size=2))])
        self.gru = nn.GRU(2, 2)
        self.custom_gru = Nested.MyGRU(2, 2)  # a user subclass: left alone

    class MyGRU(nn.GRU):
        pass

    def forward(self, x):
        y, _ = self.encoder(x)
        y, _ = self.blocks[0](y.transpose(0, 1))
        y, _ = self.blocks[1][0](y)
        return self.custom_gru(self.gru(y)[0])[0]


def test_convert_and_unconvert_nested_model():
    torch.manual_seed(0)
    model = Nested().double().eval()
    x = torch.randn(3, 5, 4, dtype=torch.float64)
    expected = model(x)
    params = list(model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"custom_gru \(Nested.MyGRU: a subclass of torch.nn.modules.rnn.GRU"):
        assert lstmfast.convert(model) is model
    assert isinstance(model.encoder, lstmfast.LSTM) and isinstance(model.blocks[0], lstmfast.RNN)
    assert isinstance(model.blocks[1][0], lstmfast.LSTM) and type(model.gru) is lstmfast.GRU
    assert type(model.custom_gru) is Nested.MyGRU
    assert model.blocks[0].nonlinearity == "relu" and model.blocks[1][0].proj_size == 2
    assert not model.encoder.training
    assert all(a is b for a, b in zip(model.parameters(), params)), "parameters must be shared"
    torch.testing.assert_close(model(x), expected, rtol=1e-10, atol=1e-10)
    model(x).sum().backward()
    optimizer.step()  # the optimizer still owns the live parameters
    after = model(x)
    lstmfast.unconvert(model)
    assert type(model.encoder) is nn.LSTM and type(model.blocks[1][0]) is nn.LSTM
    assert type(model.gru) is nn.GRU and type(model.custom_gru) is Nested.MyGRU
    torch.testing.assert_close(model(x), after, rtol=1e-10, atol=1e-10)


def test_from_torch_rejects_other_modules():
    with pytest.raises(TypeError, match="expects a torch.nn.LSTM, got GRU"):
        lstmfast.LSTM.from_torch(nn.GRU(2, 2))
    with pytest.raises(TypeError, match="expects a torch.nn.GRU, got LSTM"):
        lstmfast.GRU.from_torch(nn.LSTM(2, 2))
    converted = lstmfast.convert(nn.RNN(2, 3))
    assert isinstance(converted, lstmfast.RNN)
    assert type(lstmfast.convert(nn.GRU(2, 3))) is lstmfast.GRU


def test_gru_from_torch_and_to_torch_share_parameters():
    torch.manual_seed(0)
    theirs = nn.GRU(3, 4, num_layers=2, bias=False, batch_first=True, dropout=0.5, bidirectional=True).double()
    theirs.eval()
    ours = lstmfast.GRU.from_torch(theirs)
    assert type(ours) is lstmfast.GRU and not ours.training and repr(ours) == repr(theirs)
    assert all(a is b for a, b in zip(ours.parameters(), theirs.parameters()))
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    assert_all_close(list(ours(x)), list(theirs(x)), **TOLERANCES[torch.float64])
    back = ours.to_torch()
    assert type(back) is nn.GRU and repr(back) == repr(theirs) and not back.training
    assert all(a is b for a, b in zip(back.parameters(), theirs.parameters()))


@pytest.mark.parametrize("how", ["torch.compile", "compile in place fullgraph"])
def test_gradient_flow_of_a_compiled_layer(how):
    """A torch.compile'd layer (an OptimizedModule) or one compiled in place is measured as itself,
    eagerly: the same norms as the plain layer's."""
    torch.manual_seed(0)
    module = lstmfast.GRU(3, 4).double()
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    expected = _flow_values(diagnostics.gradient_flow(module, x))
    if how == "torch.compile":
        compiled = torch.compile(module, backend="eager")
    else:
        compiled = copy.deepcopy(module)
        compiled.compile(fullgraph=True, backend="eager")
    assert_all_close(_flow_values(diagnostics.gradient_flow(compiled, x)), expected, rtol=0, atol=0)

"""lstmfast.LSTM / GRU / RNN against torch.nn.LSTM / GRU / RNN loaded with the same weights."""

import itertools
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_sequence, pad_packed_sequence

import lstmfast

from conftest import DEVICES, TOLERANCES, assert_all_close, module_outputs_and_grads


def pair(kind, device="cpu", dtype=torch.float64, **options):
    """An lstmfast module and a torch.nn module with identical weights."""
    ours = getattr(lstmfast, kind)(**options).to(device=device, dtype=dtype)
    theirs = getattr(nn, kind)(**options).to(device=device, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def run(module, x, hx):
    """Outputs, final states and gradients of input, hx and every parameter."""
    leaf = x.data if isinstance(x, nn.utils.rnn.PackedSequence) else x
    inputs = [leaf] + ([hx] if isinstance(hx, torch.Tensor) else list(hx or []))
    return module_outputs_and_grads(module, x, hx, inputs)


def make_input(module, batch_first, seq=5, batch=3, unbatched=False, hx=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = next(module.parameters())
    rand = lambda *s: torch.randn(s, generator=g, dtype=torch.float64).to(p).requires_grad_()  # noqa: E731
    shape = (seq, module.input_size) if unbatched else (
        (batch, seq, module.input_size) if batch_first else (seq, batch, module.input_size))
    x = rand(*shape)
    if not hx:
        return x, None
    n = module.num_layers * (2 if module.bidirectional else 1)
    lead = (n,) if unbatched else (n, batch)
    out = module.proj_size or module.hidden_size
    if isinstance(module, (lstmfast.LSTM, nn.LSTM)):
        return x, (rand(*lead, out), rand(*lead, module.hidden_size))
    return x, rand(*lead, module.hidden_size)


GRID = list(itertools.product([1, 2, 3], [False, True], [False, True], [True, False]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("hx", [False, True], ids=["nohx", "hx"])
@pytest.mark.parametrize("proj", [0, 2], ids=["noproj", "proj"])
@pytest.mark.parametrize("layers,bidirectional,batch_first,bias", GRID)
def test_lstm_parity(layers, bidirectional, batch_first, bias, proj, hx, dtype):
    ours, theirs = pair("LSTM", dtype=dtype, input_size=4, hidden_size=5, num_layers=layers,
                        bidirectional=bidirectional, batch_first=batch_first, bias=bias, proj_size=proj)
    x, h = make_input(ours, batch_first, hx=hx)
    x, h = x.to(dtype), None if h is None else tuple(t.to(dtype).detach().requires_grad_() for t in h)
    x = x.detach().requires_grad_()
    got, want = run(ours, x, h), run(theirs, x, h)
    assert_all_close(got[0], want[0], **TOLERANCES[dtype])
    assert_all_close(got[1], want[1], **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("hx", [False, True], ids=["nohx", "hx"])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("layers,bidirectional,batch_first,bias", GRID)
def test_rnn_parity(layers, bidirectional, batch_first, bias, nonlinearity, hx, dtype):
    ours, theirs = pair("RNN", dtype=dtype, input_size=4, hidden_size=5, num_layers=layers,
                        bidirectional=bidirectional, batch_first=batch_first, bias=bias,
                        nonlinearity=nonlinearity)
    x, h = make_input(ours, batch_first, hx=hx)
    x = x.to(dtype).detach().requires_grad_()
    h = None if h is None else h.to(dtype).detach().requires_grad_()
    got, want = run(ours, x, h), run(theirs, x, h)
    assert_all_close(got[0], want[0], **TOLERANCES[dtype])
    assert_all_close(got[1], want[1], **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("hx", [False, True], ids=["nohx", "hx"])
@pytest.mark.parametrize("layers,bidirectional,batch_first,bias", GRID)
def test_gru_parity(layers, bidirectional, batch_first, bias, hx, dtype):
    ours, theirs = pair("GRU", dtype=dtype, input_size=4, hidden_size=5, num_layers=layers,
                        bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    x, h = make_input(ours, batch_first, hx=hx)
    x = x.to(dtype).detach().requires_grad_()
    h = None if h is None else h.to(dtype).detach().requires_grad_()
    got, want = run(ours, x, h), run(theirs, x, h)
    assert_all_close(got[0], want[0], **TOLERANCES[dtype])
    assert_all_close(got[1], want[1], **TOLERANCES[dtype])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("hx", [False, True])
def test_unbatched_input(kind, hx):
    ours, theirs = pair(kind, input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    x, h = make_input(ours, False, unbatched=True, hx=hx)
    got, want = run(ours, x, h), run(theirs, x, h)
    assert got[0][0].shape == want[0][0].shape == (5, 8)
    assert_all_close(got[0] + got[1], want[0] + want[1], **TOLERANCES[torch.float64])


@pytest.mark.parametrize("kind,proj", [("LSTM", 0), ("LSTM", 2), ("GRU", 0), ("RNN", 0)])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("hx", [False, True])
def test_packed_unsorted(kind, proj, bidirectional, hx):
    """PackedSequence with enforce_sorted=False: output, and final states in the caller's order."""
    options = dict(input_size=3, hidden_size=5, num_layers=2, bidirectional=bidirectional)
    if proj:
        options["proj_size"] = proj
    ours, theirs = pair(kind, **options)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (3, 6, 1, 6, 4)]
    packed = pack_sequence(seqs, enforce_sorted=False)
    packed.data.requires_grad_()
    _, h = make_input(ours, False, batch=5, hx=hx)
    got, want = run(ours, packed, h), run(theirs, packed, h)
    assert_all_close(got[0], want[0], **TOLERANCES[torch.float64])
    assert_all_close(got[1], want[1], **TOLERANCES[torch.float64])
    out, _ = ours(packed, h)
    assert isinstance(out, nn.utils.rnn.PackedSequence)
    torch.testing.assert_close(out.unsorted_indices, packed.unsorted_indices)
    padded, lengths = pad_packed_sequence(out)
    assert lengths.tolist() == [3, 6, 1, 6, 4]


def test_gradcheck_two_layer_bidirectional_projected():
    module = lstmfast.LSTM(3, 4, num_layers=2, bidirectional=True, proj_size=2).double()
    seqs = [torch.randn(n, 3, dtype=torch.float64) for n in (4, 2, 3)]
    packed = pack_sequence(seqs, enforce_sorted=False)
    data = packed.data.clone().requires_grad_()
    h0 = torch.randn(4, 3, 2, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(4, 3, 4, dtype=torch.float64, requires_grad=True)
    params = list(module.parameters())

    def f(data, h0, c0, *weights):
        for p, w in zip(params, weights):
            p.data = w.detach()
        names = module._flat_weights_names
        out, (h, c) = torch.func.functional_call(
            module, dict(zip(names, weights)),
            (nn.utils.rnn.PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                                         packed.unsorted_indices), (h0, c0)))
        return out.data, h, c

    weights = [p.detach().clone().requires_grad_() for p in params]
    assert torch.autograd.gradcheck(f, [data, h0, c0, *weights], eps=1e-6, atol=1e-7)


def test_gru_gradcheck_and_gradgradcheck_two_layer_bidirectional_packed():
    module = lstmfast.GRU(3, 4, num_layers=2, bidirectional=True).double()
    seqs = [torch.randn(n, 3, dtype=torch.float64) for n in (4, 2, 3)]
    packed = pack_sequence(seqs, enforce_sorted=False)
    data = packed.data.clone().requires_grad_()
    h0 = torch.randn(4, 3, 4, dtype=torch.float64, requires_grad=True)
    names = module._flat_weights_names

    def f(data, h0, *weights):
        out, h = torch.func.functional_call(
            module, dict(zip(names, weights)),
            (nn.utils.rnn.PackedSequence(data, packed.batch_sizes, packed.sorted_indices,
                                         packed.unsorted_indices), h0))
        return out.data, h

    weights = [p.detach().clone().requires_grad_() for p in module.parameters()]
    assert torch.autograd.gradcheck(f, [data, h0, *weights], eps=1e-6, atol=1e-7)
    assert torch.autograd.gradgradcheck(f, [data, h0, *weights], eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind,options", [
    ("LSTM", dict(num_layers=2, bidirectional=True, proj_size=3, bias=False)),
    ("GRU", dict(num_layers=2, bidirectional=True, bias=False, batch_first=True, dropout=0.25)),
    ("GRU", dict()),
    ("RNN", dict(num_layers=3, nonlinearity="relu", batch_first=True, dropout=0.5)),
])
def test_parameters_and_repr_match_torch(kind, options):
    ours, theirs = pair(kind, input_size=4, hidden_size=6, **options)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [p.shape for p in ours.parameters()] == [p.shape for p in theirs.parameters()]
    assert ours.extra_repr() == theirs.extra_repr()
    # state dicts move both ways
    theirs2 = getattr(nn, kind)(input_size=4, hidden_size=6, **options).double()
    theirs2.load_state_dict(ours.state_dict())
    ours2 = getattr(lstmfast, kind)(input_size=4, hidden_size=6, **options).double()
    ours2.load_state_dict(theirs2.state_dict())
    for a, b in zip(ours.parameters(), ours2.parameters()):
        assert torch.equal(a, b)
    ours.flatten_parameters()  # torch.nn's own: a no-op on the CPU


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_initialization_like_torch(kind):
    """Every parameter uniform in [-1/sqrt(H), 1/sqrt(H)], as torch.nn initializes."""
    module = getattr(lstmfast, kind)(8, 64, num_layers=2)
    bound = 64 ** -0.5
    for p in module.parameters():
        assert p.abs().max() <= bound
        assert p.abs().max() > 0.9 * bound
        assert abs(p.mean().item()) < 0.2 * bound


def test_forget_bias():
    module = lstmfast.LSTM(3, 16, num_layers=2, bidirectional=True, forget_bias=1.0)
    bound = 16 ** -0.5
    for name, p in module.named_parameters():
        if name.startswith("bias_ih"):
            assert (p[16:32] >= 1 - bound).all() and (p[16:32] <= 1 + bound).all()
            assert p[:16].abs().max() <= bound


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_dropout_between_layers(kind):
    """Dropout acts between layers in training only; p=1 zeroes the second layer's input as torch does."""
    ours, theirs = pair(kind, input_size=3, hidden_size=4, num_layers=2, dropout=1.0)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], rtol=1e-10, atol=1e-10)
    ours.eval(), theirs.eval()
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], rtol=1e-10, atol=1e-10)
    ours.train()
    with torch.no_grad():
        a, b = ours(x)[0], ours(x)[0]
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_dropout_draws_torch_nn_s_masks(kind):
    """The same seed gives the same dropout masks as torch.nn's layer (one F.dropout call per layer
    output, in torch.nn's order, bidirectional outputs concatenated first): outputs and gradients equal."""
    ours, theirs = pair(kind, input_size=3, hidden_size=4, num_layers=3, dropout=0.5, bidirectional=True)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    results = []
    for m in (theirs, ours):
        torch.manual_seed(7)
        y, _ = m(x)
        results.append([y] + list(torch.autograd.grad(y.square().sum(), list(m.parameters()))))
    torch.testing.assert_close(results[1], results[0], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_module_serialization(kind, tmp_path):
    module = getattr(lstmfast, kind)(3, 4, num_layers=2, bidirectional=True).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    expected = module(x)[0]
    for clone in (pickle.loads(pickle.dumps(module)), __import__("copy").deepcopy(module)):
        torch.testing.assert_close(clone(x)[0], expected, rtol=0, atol=0)
    torch.save(module, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    torch.testing.assert_close(loaded(x)[0], expected, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_module_device_and_dtype(kind, device):
    module = getattr(lstmfast, kind)(3, 4, device=device, dtype=torch.float64)
    assert all(p.device.type == device and p.dtype == torch.float64 for p in module.parameters())
    out, _ = module(torch.randn(2, 5, 3, device=device, dtype=torch.float64))
    assert out.device.type == device and out.shape == (2, 5, 4)


# Errors are torch.nn's (same exception type and message), except for a bare tensor as an LSTM's hx,
# which torch.nn answers with an IndexError (README, Guarantees).
@pytest.mark.parametrize("bad,error,match", [
    (lambda m: m(torch.randn(5, 2, 7, dtype=torch.float64)), RuntimeError,
     "input.size\\(-1\\) must be equal to input_size. Expected 3, got 7"),
    (lambda m: m(torch.randn(5, 2, 3, 1, dtype=torch.float64)), ValueError,
     "LSTM: Expected input to be 2D or 3D, got 4D instead"),
    (lambda m: m(torch.randn(5, 2, 3, dtype=torch.float32)), ValueError,
     "RNN input dtype \\(torch.float32\\) does not match weight dtype \\(torch.float64\\)"),
    (lambda m: m(torch.randn(5, 2, 3, dtype=torch.float64), (torch.zeros(1, 2, 4, dtype=torch.float64),) * 2),
     RuntimeError, "Expected hidden\\[0\\] size \\(2, 2, 4\\), got \\[1, 2, 4\\]"),
    (lambda m: m(torch.randn(5, 2, 3, dtype=torch.float64), torch.zeros(2, 2, 4, dtype=torch.float64)),
     ValueError, "expected hx to be a tuple"),
    (lambda m: m(torch.randn(5, 3, dtype=torch.float64), (torch.zeros(2, 1, 4, dtype=torch.float64),) * 2),
     RuntimeError, "For unbatched 2-D input, hx and cx should also be 2-D but got \\(3-D, 3-D\\) tensors"),
    (lambda m: m(torch.randn(0, 2, 3, dtype=torch.float64)), RuntimeError,
     "Expected sequence length to be larger than 0 in RNN"),
])
def test_module_bad_input(bad, error, match):
    module = lstmfast.LSTM(3, 4, num_layers=2).double()
    with pytest.raises(error, match=match):
        bad(module)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(proj_size=6), ValueError, "proj_size has to be smaller than hidden_size"),
    (dict(dropout=1.5), ValueError, "dropout should be a number in range \\[0, 1\\]"),
    (dict(num_layers=0), ValueError, "num_layers must be greater than zero"),
    (dict(hidden_size=0), ValueError, "hidden_size must be greater than zero"),
    (dict(input_size=0), ValueError, "input_size must be greater than zero"),
    (dict(bias="True"), TypeError, "bias should be of type bool, got: str"),
    (dict(grad_clip=0.0), ValueError, "grad_clip must be None or a number > 0"),
])
def test_constructor_bad_arguments(kwargs, error, match):
    options = dict(input_size=3, hidden_size=4) | kwargs
    with pytest.raises(error, match=match):
        lstmfast.LSTM(**options)


# Each of these is the exception (type and message) torch.nn.GRU raises; the test checks that it is.
GRU_BAD_INPUT = [
    lambda m: m(torch.randn(5, 2, 7, dtype=torch.float64)),
    lambda m: m(torch.randn(5, 2, 3, 1, dtype=torch.float64)),
    lambda m: m(torch.randn(5, 2, 3, dtype=torch.float32)),
    lambda m: m(torch.randn(5, 2, 3, dtype=torch.float64), torch.zeros(1, 2, 4, dtype=torch.float64)),
    lambda m: m(torch.randn(5, 3, dtype=torch.float64), torch.zeros(2, 1, 4, dtype=torch.float64)),
    lambda m: m(torch.randn(5, 2, 3, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.float64)),
    lambda m: m(torch.randn(0, 2, 3, dtype=torch.float64)),
]


@pytest.mark.parametrize("bad", GRU_BAD_INPUT, ids=["input_size", "4D", "dtype", "hx_size", "unbatched_hx_3D",
                                                     "batched_hx_2D", "T0"])
def test_gru_bad_input_errors_are_torch_nn_s(bad):
    ours, theirs = pair("GRU", input_size=3, hidden_size=4, num_layers=2)
    with pytest.raises(Exception) as expected:
        bad(theirs)
    with pytest.raises(type(expected.value)) as got:
        bad(ours)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("kwargs", [dict(proj_size=2), dict(dropout=1.5), dict(num_layers=0),
                                    dict(hidden_size=0), dict(input_size=0), dict(bias="True"),
                                    dict(hidden_size=4.0)],
                         ids=["proj_size", "dropout", "num_layers", "hidden_size", "input_size", "bias", "float"])
def test_gru_constructor_errors_are_torch_nn_s(kwargs):
    options = dict(input_size=3, hidden_size=4) | kwargs
    with pytest.raises(Exception) as expected:
        nn.GRU(**options)
    with pytest.raises(type(expected.value)) as got:
        lstmfast.GRU(**options)
    assert str(got.value) == str(expected.value)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("call", [lambda m, x: m(x, None, 5), lambda m, x: m(x, hy=None), lambda m, x: m()],
                         ids=["extra-positional", "unknown-keyword", "no-input"])
def test_wrong_forward_arguments_get_torch_nn_s_type_error(kind, call):
    """Python's own TypeError for a wrong call names the class's forward, as torch.nn's does."""
    theirs, ours = getattr(torch.nn, kind)(3, 4), getattr(lstmfast, kind)(3, 4)
    x = torch.randn(2, 1, 3)
    with pytest.raises(TypeError) as expected:
        call(theirs, x)
    with pytest.raises(TypeError) as got:
        call(ours, x)
    assert str(got.value) == str(expected.value)


def test_gru_bad_arguments_torch_nn_answers_unclearly():
    """Where torch.nn.GRU fails with an AttributeError or an error from deep inside (a tuple as hx, an
    hx of another dtype, a float num_layers, a list as input), lstmfast names the argument."""
    module = lstmfast.GRU(3, 4).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="GRU: expected hx to be a tensor, got tuple"):
        module(x, (torch.zeros(1, 2, 4, dtype=torch.float64),) * 2)
    with pytest.raises(RuntimeError, match="GRU: hx must be a torch.float64 tensor on cpu, got torch.float32"):
        module(x, torch.zeros(1, 2, 4))
    with pytest.raises(TypeError, match="GRU: expected input to be a Tensor or a PackedSequence, got list"):
        module([x])
    with pytest.raises(TypeError, match="num_layers should be of type int, got: float"):
        lstmfast.GRU(3, 4, 1.5)
    with pytest.raises(ValueError, match="grad_clip must be None or a number > 0"):
        lstmfast.GRU(3, 4, grad_clip=-1.0)


def test_rnn_bad_nonlinearity():
    with pytest.raises(ValueError, match="Unknown nonlinearity 'sigmoid'"):
        lstmfast.RNN(3, 4, nonlinearity="sigmoid")

"""lstmfast.functional against lstmfast.reference: outputs, final states and every gradient."""

import itertools

import pytest
import torch

from lstmfast import functional, reference
from lstmfast._ops import ops

from conftest import DEVICES, TOLERANCES, assert_all_close, layer_sample, outputs_and_grads

VARIANTS = {
    "lstm": dict(cell="lstm"),
    "lstm_proj": dict(cell="lstm", proj=3),
    "rnn_tanh": dict(cell="rnn", nonlinearity="tanh"),
    "rnn_relu": dict(cell="rnn", nonlinearity="relu"),
    "gru": dict(cell="gru"),
}
LAYOUTS = {"padded": None, "packed": [5, 4, 4, 2, 1]}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=list(LAYOUTS))
@pytest.mark.parametrize("bias,state", [(True, True), (False, False), (True, False), (False, True)],
                         ids=["bias-state", "nobias-nostate", "bias-nostate", "nobias-state"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_matches_reference(variant, bias, state, layout, reverse, dtype, device):
    sample = layer_sample(**VARIANTS[variant], bias=bias, state=state, lengths=LAYOUTS[layout],
                          reverse=reverse, dtype=dtype, device=device)
    out, grads = outputs_and_grads(sample, functional)
    ref_out, ref_grads = outputs_and_grads(sample, reference)
    assert_all_close(out, ref_out, **TOLERANCES[dtype])
    assert_all_close(grads, ref_grads, **TOLERANCES[dtype])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout,reverse,bias,state", [
    ("padded", False, True, True),
    ("padded", True, False, False),
    ("packed", False, True, True),
    ("packed", True, True, True),
    ("packed", True, False, False),
])
def test_gradcheck(variant, layout, reverse, bias, state, device):
    sample = layer_sample(**VARIANTS[variant], steps=4, batch=3, input_size=3, hidden=4, bias=bias,
                          state=state, reverse=reverse, lengths=[4, 3, 1] if layout == "packed" else None,
                          device=device)
    names = [k for k in ("w_hr", "h0", "c0") if sample.kwargs.get(k) is not None
             and sample.kwargs[k].requires_grad]
    fixed = {k: v for k, v in sample.kwargs.items() if k not in names}
    positional = [a for a in sample.args if a is not None]
    has_bias = sample.args[3] is not None
    fn = getattr(functional, sample.cell)

    def run(*tensors):
        args = list(tensors[:len(positional)])
        if not has_bias:
            args += [None, None]
        named = dict(zip(names, tensors[len(positional):]))
        return fn(*args, **fixed, **named)

    inputs = positional + [sample.kwargs[k] for k in names]
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("shape", [
    dict(steps=1), dict(batch=1), dict(hidden=1), dict(input_size=1), dict(steps=1, batch=1, hidden=1),
], ids=["T1", "B1", "H1", "I1", "T1B1H1"])
def test_edge_sizes(cell, shape, device):
    sample = layer_sample(cell, **shape, device=device)
    out, grads = outputs_and_grads(sample, functional)
    ref_out, ref_grads = outputs_and_grads(sample, reference)
    assert_all_close(out, ref_out, **TOLERANCES[torch.float64])
    assert_all_close(grads, ref_grads, **TOLERANCES[torch.float64])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_empty_batch(cell, device):
    """B = 0 works as in torch.nn: empty outputs and states, zero weight gradients."""
    sample = layer_sample(cell, batch=0, state=False, device=device)
    out, grads = outputs_and_grads(sample, functional)
    assert out[0].shape == (5, 0, 6)
    assert all(o.numel() == 0 for o in out)
    for g, t in zip(grads, sample.tensors):
        assert g.shape == t.shape
        assert not g.abs().sum()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_strided_inputs(cell, device):
    """Non-contiguous input and weights give the same results as contiguous copies."""
    sample = layer_sample(cell, device=device)
    x, w_ih, w_hh, b_ih, b_hh = [a.detach() for a in sample.args]
    batch_first = x.transpose(0, 1).contiguous().requires_grad_()
    wide = torch.zeros(x.shape[0] * 2, x.shape[1], x.shape[2] * 3, dtype=x.dtype, device=device)
    wide[::2, :, ::3] = x
    w_t = w_ih.t().contiguous().requires_grad_()
    for strided_x in (batch_first.transpose(0, 1), wide[::2, :, ::3].requires_grad_()):
        args = (strided_x, w_t.t(), w_hh, b_ih, b_hh)
        kwargs = {k: v for k, v in sample.kwargs.items() if k not in ("h0", "c0")}
        fn, ref = getattr(functional, cell), getattr(reference, cell)
        got = fn(*args, **kwargs)
        want = ref(x, w_ih, w_hh, b_ih, b_hh, **kwargs)
        assert_all_close([g.detach() for g in got], [w.detach() for w in want],
                         **TOLERANCES[torch.float64])


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_only_requested_gradients(cell):
    """Backward returns gradients only for tensors that require them, and skips the rest."""
    sample = layer_sample(cell, requires_grad=False)
    x = sample.args[0].clone().requires_grad_()
    outputs = getattr(functional, cell)(x, *sample.args[1:], **sample.kwargs)
    outputs[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(a.grad is None for a in sample.args[1:] if a is not None)


def test_output_mask_skips_work():
    """The backward op returns empty tensors for the gradients output_mask does not ask for."""
    s = layer_sample("lstm", requires_grad=False)
    x, w_ih, w_hh, b_ih, b_hh = s.args
    output, h_n, c_n, gates, cells = ops.lstm_forward(x, None, s.kwargs["h0"], s.kwargs["c0"], w_ih, w_hh,
                                                      b_ih, b_hh, None, False, True)
    for mask in itertools.product([False, True], repeat=4):
        grads = ops.lstm_backward(torch.ones_like(output), None, None, x, None, s.kwargs["h0"],
                                  s.kwargs["c0"], w_ih, w_hh, None, output, gates, cells, False,
                                  list(mask), None, False)
        assert (grads[0].numel() > 0) == mask[0]
        assert (grads[3].numel() > 0) == mask[2] and (grads[4].numel() > 0) == mask[2]
        assert (grads[5].numel() > 0) == mask[3]


def test_inference_keeps_nothing():
    """With no tensor needing a gradient the forward op returns no saved activations."""
    s = layer_sample("lstm", requires_grad=False)
    out = ops.lstm_forward(s.args[0], None, None, None, *s.args[1:], None, False, False)
    assert out[3].numel() == 0 and out[4].numel() == 0
    train = ops.lstm_forward(s.args[0], None, None, None, *s.args[1:], None, False, True)
    assert train[3].shape == (15, 24) and train[4].shape == (15, 6)
    torch.testing.assert_close(out[0], train[0], rtol=0, atol=0)


def test_gru_inference_keeps_nothing_and_training_saves_gates():
    """In inference the GRU forward op returns no gates; in training (N, 4H): r, z, n and the recurrent
    part of n's pre-activation, W_hn h + b_hn, as the contract in csrc/ops.cpp says."""
    s = layer_sample("gru", requires_grad=False)
    x, w_ih, w_hh, b_ih, b_hh = s.args
    h0 = s.kwargs["h0"]
    out = ops.gru_forward(x, None, h0, w_ih, w_hh, b_ih, b_hh, False, False)
    assert out[2].numel() == 0
    train = ops.gru_forward(x, None, h0, w_ih, w_hh, b_ih, b_hh, False, True)
    torch.testing.assert_close(out[0], train[0], rtol=0, atol=0)
    H = 6
    gates = train[2]
    assert gates.shape == (15, 4 * H)
    # the first step's gates, from h0
    a_x, a_h = x[0] @ w_ih.t() + b_ih, h0 @ w_hh.t() + b_hh
    r = torch.sigmoid(a_x[:, :H] + a_h[:, :H])
    z = torch.sigmoid(a_x[:, H:2 * H] + a_h[:, H:2 * H])
    n = torch.tanh(a_x[:, 2 * H:] + r * a_h[:, 2 * H:])
    torch.testing.assert_close(gates[:3], torch.cat([r, z, n, a_h[:, 2 * H:]], dim=1),
                               **TOLERANCES[torch.float64])

"""torch.nn's autograd contract, side by side with torch.nn on the same Parameters (issue 12): second
order, torch.compile of training steps, torch.func transforms, in-place use of outputs, CPU float16 /
bfloat16 and CPU autocast."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import lstmfast
from lstmfast import functional, reference

from conftest import DEVICES, assert_all_close, layer_sample

F64 = dict(rtol=1e-10, atol=1e-10)


KINDS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def _pair(cell, input_size=3, hidden=3, dtype=torch.float64, device="cpu", **options):
    """A torch.nn layer and the lstmfast one sharing its Parameters."""
    ours_cls = getattr(lstmfast, KINDS[cell])
    theirs = getattr(nn, KINDS[cell])(input_size, hidden, **options).to(device, dtype)
    return theirs, ours_cls.from_torch(theirs)


def _data(out):
    return out.data if isinstance(out, nn.utils.rnn.PackedSequence) else out


def _flat(result):
    out, state = result
    return [_data(out)] + ([state] if isinstance(state, torch.Tensor) else list(state))


# ------------------------------------------------------------------------------ second order

FUNCTIONAL_GRID = [
    ("lstm", dict()),
    ("lstm", dict(reverse=True)),
    ("lstm", dict(proj=2)),
    ("lstm", dict(state=False)),
    ("lstm", dict(lengths=[3, 2, 1])),
    ("lstm", dict(lengths=[3, 3, 1], reverse=True, proj=2)),
    ("lstm", dict(bias=False)),
    ("rnn", dict()),
    ("rnn", dict(nonlinearity="relu")),
    ("rnn", dict(reverse=True, nonlinearity="relu")),
    ("rnn", dict(lengths=[3, 2, 1], reverse=True)),
    ("rnn", dict(state=False, bias=False)),
    ("gru", dict()),
    ("gru", dict(reverse=True)),
    ("gru", dict(state=False, bias=False)),
    ("gru", dict(lengths=[3, 2, 1])),
    ("gru", dict(lengths=[3, 3, 1], reverse=True)),
]


@pytest.mark.parametrize("cell,options", FUNCTIONAL_GRID, ids=str)
def test_gradgradcheck_functional(cell, options):
    """Double backward of one layer, every option, against finite differences (float64)."""
    options = {"steps": 3, "batch": 2, "input_size": 2, "hidden": 3, **options}
    s = layer_sample(cell, **options)
    names = [k for k in ("w_hr", "h0", "c0") if s.kwargs.get(k) is not None and s.kwargs[k].requires_grad]
    args = [a for a in s.args if a is not None]

    def layer(*tensors):
        it = iter(tensors)
        call_args = [next(it) if a is not None else None for a in s.args]
        kwargs = dict(s.kwargs, **{k: next(it) for k in names})
        return getattr(functional, cell)(*call_args, **kwargs)

    inputs = tuple(args + [s.kwargs[k] for k in names])
    assert torch.autograd.gradcheck(layer, inputs)
    assert torch.autograd.gradgradcheck(layer, inputs)


MODULE_GRID = [
    ("lstm", dict(num_layers=2, bidirectional=True)),
    ("lstm", dict(proj_size=2, batch_first=True)),
    ("rnn", dict(num_layers=2, bidirectional=True, nonlinearity="relu")),
    ("rnn", dict(batch_first=True)),
    ("gru", dict(num_layers=2, bidirectional=True)),
    ("gru", dict(batch_first=True)),
]


@pytest.mark.parametrize("cell,options", MODULE_GRID, ids=str)
def test_gradgradcheck_module(cell, options):
    theirs, ours = _pair(cell, input_size=2, hidden=3, **options)
    names = [n for n, _ in ours.named_parameters()]
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)

    def run(x, *params):
        return tuple(_flat(torch.func.functional_call(ours, dict(zip(names, params)), (x,))))

    inputs = (x, *[p.detach().requires_grad_() for p in ours.parameters()])
    assert torch.autograd.gradgradcheck(run, inputs)


def _penalty_grads(module, x, hx=None):
    out, state = module(x, hx)
    data = _data(out)
    leaf = x.data if isinstance(x, nn.utils.rnn.PackedSequence) else x
    (g,) = torch.autograd.grad(data.sum() + sum(s.sum() for s in _flat((out, state))[1:]), leaf,
                               create_graph=True)
    loss = data.mean() + 10 * g.pow(2).sum()
    return [loss.detach()] + list(torch.autograd.grad(loss, [leaf] + list(module.parameters())))


PENALTY_GRID = [
    ("lstm", dict(num_layers=2, bidirectional=True)),
    ("lstm", dict(proj_size=2, batch_first=True)),
    ("rnn", dict(num_layers=2, nonlinearity="relu")),
    ("rnn", dict(bidirectional=True, batch_first=True)),
    ("gru", dict(num_layers=2, bidirectional=True)),
    ("gru", dict(batch_first=True)),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell,options", PENALTY_GRID, ids=str)
def test_gradient_penalty_equals_torch_nn(cell, options, device):
    """out.mean() + 10 * ||d(sum of outputs)/dx||^2: loss and every gradient are torch.nn's."""
    theirs, ours = _pair(cell, input_size=3, hidden=4, device=device, **options)
    x = torch.randn(4, 3, 3, dtype=torch.float64, device=device, requires_grad=True)
    expected = _penalty_grads(theirs, x)
    actual = _penalty_grads(ours, x)
    assert expected[2].abs().sum() > 0  # the penalty does reach the weights
    assert_all_close(actual, expected, **F64)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_gradient_penalty_packed_equals_torch_nn(cell):
    theirs, ours = _pair(cell, input_size=3, hidden=3, bidirectional=True)
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    lengths = [4, 2, 1]
    results = []
    for module in (theirs, ours):
        leaf = x.clone().requires_grad_()
        packed = pack_padded_sequence(leaf, lengths)
        out, state = module(packed)
        (g,) = torch.autograd.grad(out.data.sum(), leaf, create_graph=True)
        loss = out.data.mean() + 10 * g.pow(2).sum()
        results.append(list(torch.autograd.grad(loss, [leaf] + list(module.parameters()))))
    assert_all_close(results[1], results[0], **F64)


def _weight_penalty_grads(module, carried):
    """A two-call graph in which the second call's h0 (`carried`: the first call's final state, not
    detached) or its input (otherwise: scaled by the layer's own bias) depends on the layer's
    Parameters; the gradient of the second call's outputs with create_graph=True, then a penalty on
    it differentiated again."""
    torch.manual_seed(0)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    params = list(module.parameters())
    if carried:
        _, state = module(x)
        out, final = module(x, state)
    else:
        out, final = module(x * module.bias_hh_l0[:3])
    total = out.sum() + sum(s.sum() for s in _flat((out, final))[1:])
    plain = torch.autograd.grad(total, params, retain_graph=True)
    graphed = torch.autograd.grad(total, params, create_graph=True)
    penalty = sum(g.pow(2).sum() for g in graphed)
    return list(plain) + [g.detach() for g in graphed] + list(torch.autograd.grad(penalty, params))


@pytest.mark.parametrize("carried", [True, False], ids=["state-carried", "input-from-bias"])
@pytest.mark.parametrize("cell,options", [("lstm", dict()), ("lstm", dict(num_layers=2, proj_size=2)),
                                          ("gru", dict()), ("gru", dict(num_layers=2, bidirectional=True)),
                                          ("rnn", dict()), ("rnn", dict(num_layers=2))], ids=str)
def test_create_graph_gradients_when_inputs_depend_on_the_layers_own_weights(cell, options, carried):
    """When h0 or the input is computed from the layer's own Parameters, the gradients a backward with
    create_graph=True returns must be the same as without it, and as torch.nn's: the layer's local
    derivatives, with the path through h0 / the input left to the outer backward (computed with
    respect to h0 and the input themselves, that path would be counted twice). Then a penalty on those
    gradients is differentiated again, as torch.nn does."""
    theirs, ours = _pair(cell, input_size=3, hidden=4, **options)
    expected = _weight_penalty_grads(theirs, carried)
    actual = _weight_penalty_grads(ours, carried)
    n = len(list(ours.parameters()))
    assert_all_close(actual[n:2 * n], actual[:n], **F64)
    assert_all_close(actual, expected, **F64)


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("steps", [1, 2])
def test_a_projected_lstm_trained_only_through_w_hr(steps, packed):
    """An LSTM with projection whose only trained Parameter is weight_hr: after one step c_n does not
    depend on it (W_hr acts on h_t after c_t is made), so under torch.nn c_n does not require grad, and
    gradients of losses on the output and c_n, with create_graph=True, of a state carried into a
    second call, and of a penalty on them, are torch.nn's."""
    theirs, _ = _pair("lstm", input_size=2, hidden=3, proj_size=2)
    ours = lstmfast.LSTM.from_torch(copy.deepcopy(theirs))
    torch.manual_seed(0)
    x1, x2 = torch.randn(2, steps, 2, 2, dtype=torch.float64)
    results = []
    for module in (theirs, ours):
        for name, p in module.named_parameters():
            p.requires_grad_(name == "weight_hr_l0")
        w = module.weight_hr_l0
        wrap = (lambda x: pack_padded_sequence(x, [steps, 1])) if packed else (lambda x: x)
        out, (h, c) = module(wrap(x1))
        (g,) = torch.autograd.grad(_data(out).sum() + h.sum() + c.sum(), w, create_graph=True)
        _, state = module(wrap(x1))
        out2, _ = module(wrap(x2), state)
        (g2,) = torch.autograd.grad(_data(out2).sum(), w, create_graph=True)
        (penalty,) = torch.autograd.grad(g.pow(2).sum() + g2.pow(2).sum(), w)
        results.append(([c.requires_grad, state[1].requires_grad], [g.detach(), g2.detach(), penalty]))
    assert results[1][0] == results[0][0] == [steps > 1, steps > 1]
    assert_all_close(results[1][1], results[0][1], **F64)


# (what is modified in place after the forward, which Parameters are frozen, whether the input and h0
# require grad)
INPLACE_AFTER_FORWARD = {
    "bias_ih": ("bias_ih_l0", (), True, True),
    "bias_hh-layer-1": ("bias_hh_l1", (), True, False),
    "input-w_ih-frozen": ("input", ("weight_ih_l0",), True, False),
    "h0-w_hh-frozen": ("h0", ("weight_hh_l0",), False, True),
    "h0-every-w_hh-frozen": ("h0", ("weight_hh_l0", "weight_hh_l1"), False, True),
    "h0-no-grad-every-w_hh-frozen": ("h0", ("weight_hh_l0", "weight_hh_l1"), True, False),
    "w_ih-input-no-grad": ("weight_ih_l0", (), False, False),
    "w_hh": ("weight_hh_l0", (), True, True),
    "input-w_ih-trained": ("input", (), True, False),
}


def _modified_after_forward(module, cell, modified, frozen, input_grad, h0_grad):
    """A forward, an in-place change to one tensor it used, then a backward: (exception type, None), or
    (None, the gradients of everything that requires grad)."""
    torch.manual_seed(0)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=input_grad)
    h0 = torch.randn(2, 2, 4, dtype=torch.float64, requires_grad=h0_grad)
    hx = (h0, torch.randn(2, 2, 4, dtype=torch.float64)) if cell == "lstm" else h0
    for name, p in module.named_parameters():
        p.requires_grad_(name not in frozen)
    out, _ = module(x, hx)
    with torch.no_grad():
        {"input": x, "h0": h0}.get(modified, getattr(module, modified, None)).add_(0.5)
    leaves = [t for t in [x, h0] + list(module.parameters()) if t.requires_grad]
    try:
        return None, torch.autograd.grad(out.pow(2).sum(), leaves)
    except RuntimeError as error:
        return RuntimeError, str(error)


@pytest.mark.parametrize("case", INPLACE_AFTER_FORWARD, ids=str)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_tensors_the_backward_does_not_read_may_change_after_the_forward(cell, case):
    """torch.nn saves only what its first-order backward reads (no bias; the input only where W_ih takes
    a gradient, W_ih only where the input does, h0 where W_hh does; the GRU's cell keeps a copy of
    h_{t-1}): the caller may modify the others in place between forward and backward, and the gradients
    are those of the forward's values. lstmfast keeps those it does not read loose (functional._save),
    and the GRU a copy of h0; the same run succeeds or fails under both, with the same gradients."""
    theirs, _ = _pair(cell, input_size=3, hidden=4, num_layers=2)
    ours = getattr(lstmfast, KINDS[cell]).from_torch(copy.deepcopy(theirs))  # (each run modifies its own)
    expected = _modified_after_forward(theirs, cell, *INPLACE_AFTER_FORWARD[case])
    actual = _modified_after_forward(ours, cell, *INPLACE_AFTER_FORWARD[case])
    assert actual[0] is expected[0], (expected, actual)
    if expected[0] is None:
        assert_all_close(list(actual[1]), list(expected[1]), **F64)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("made", ["every parameter", "bias_ih_l0"])
def test_parameters_made_under_inference_mode_as_under_torch_nn(cell, made):
    """Parameters made under torch.inference_mode are inference tensors, which have no version counter:
    torch.nn's training forward refuses them where it saves one (autograd's error) and runs where it
    saves none (a bias); so does lstmfast, with the same error or gradients (it read their versions and
    failed with 'Inference tensors do not track version counter'). A graph-building backward, which
    recomputes from such a tensor without seeing its changes, raises a clear error instead."""
    theirs, ours = _pair(cell, input_size=3, hidden=4)
    with torch.inference_mode():
        for name, p in list(theirs.named_parameters()):
            if made == "every parameter" or name == made:
                setattr(theirs, name, nn.Parameter(p.detach().clone()))
    ours = getattr(lstmfast, KINDS[cell]).from_torch(theirs)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    leaves = [x] + [p for p in theirs.parameters() if not p.is_inference()]
    results = []
    for m in (theirs, ours):
        try:
            results.append(torch.autograd.grad(m(x)[0].pow(2).sum(), leaves))
        except RuntimeError as error:
            results.append(str(error))
    if made == "every parameter":
        assert isinstance(results[0], str) and results[1] == results[0]
        assert results[0].startswith("Inference tensors cannot be saved for backward")
        return
    assert_all_close(list(results[1]), list(results[0]), **F64)
    with pytest.raises(RuntimeError, match=r"\[torch.DoubleTensor \[\d+\]\], is an inference tensor"):
        torch.autograd.grad(ours(x)[0].pow(2).sum(), leaves, create_graph=True)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_a_graph_building_backward_refuses_a_loose_tensor_modified_after_the_forward(cell):
    """A backward with create_graph=True recomputes the layer from its inputs, biases included: with a
    bias modified in place since the forward it raises autograd's error instead of using the new
    values; a first-order backward of the same graph runs."""
    theirs, ours = _pair(cell, input_size=3, hidden=4)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    out, _ = ours(x)
    with torch.no_grad():
        ours.bias_ih_l0.add_(0.5)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(out.sum(), x, create_graph=True, retain_graph=True)
    torch.autograd.grad(out.sum(), x)


@pytest.mark.parametrize("cell,options", PENALTY_GRID[:1] + PENALTY_GRID[2:3] + PENALTY_GRID[4:5], ids=str)
def test_hvp_equals_torch_nn(cell, options):
    theirs, ours = _pair(cell, input_size=2, hidden=3, **options)
    x = torch.randn(3, 2, 2, dtype=torch.float64)
    names = [n for n, _ in theirs.named_parameters()]
    params = tuple(p.detach() for p in theirs.parameters())
    g = torch.Generator().manual_seed(5)
    v = tuple(torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params)

    def loss_of(module):
        def loss(*ps):
            out, _ = torch.func.functional_call(module, dict(zip(names, ps)), (x,))
            return out.pow(2).sum()
        return loss

    expected = torch.autograd.functional.hvp(loss_of(theirs), params, v)[1]
    actual = torch.autograd.functional.hvp(loss_of(ours), params, v)[1]
    assert sum(float(e.abs().sum()) for e in expected) > 0
    assert_all_close(list(actual), list(expected), **F64)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_second_order_with_grad_clip_is_refused(cell):
    """grad_clip has no committed second derivative: a backward that builds a graph raises, never a
    graph-less gradient; first order with grad_clip is unaffected."""
    s = layer_sample(cell, steps=4, batch=2, input_size=3, hidden=3, grad_clip=0.05)
    out = s.run(functional)
    with pytest.raises(RuntimeError, match="not defined with grad_clip=0.05"):
        torch.autograd.grad(out[0].pow(2).sum(), s.args[0], create_graph=True)
    out = s.run(functional)
    (g,) = torch.autograd.grad(out[0].pow(2).sum(), s.args[0])
    (e,) = torch.autograd.grad(s.run(reference)[0].pow(2).sum(), s.args[0])
    torch.testing.assert_close(g, e, **F64)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_norm_sink_under_create_graph(cell):
    """Diagnostics still get the fused kernel's norms on a backward that builds a graph."""
    s = layer_sample(cell, steps=4, batch=2, input_size=3, hidden=3)
    layer = getattr(functional, cell)
    seen = []
    out = layer(*s.args, **s.kwargs, norm_sink=lambda h, c: seen.append((h, c)))
    (g,) = torch.autograd.grad(out[0].sum(), s.args[0], create_graph=True)
    assert g.requires_grad and len(seen) == 1
    out = layer(*s.args, **s.kwargs, norm_sink=lambda h, c: seen.append((h, c)))
    torch.autograd.grad(out[0].sum(), s.args[0])
    assert (seen[0][1] is None) == (seen[1][1] is None) == (cell != "lstm")
    assert seen[0][0].shape == (4 * 2,) and seen[0][0].abs().sum() > 0
    assert_all_close([n for n in seen[0] if n is not None], [n for n in seen[1] if n is not None], **F64)


# ------------------------------------------------------------------------------ torch.compile

class _Tagger(nn.Module):
    """Embedding -> layer -> Linear. Packed input comes as the packed token ids and their batch sizes
    (pack_padded_sequence itself is outside what Dynamo traces); the logits are then per packed row."""

    def __init__(self, cell, **options):
        super().__init__()
        self.embedding = nn.Embedding(11, 5)
        self.rnn = getattr(lstmfast, KINDS[cell])(5, 4, **options)
        width = (options.get("proj_size") or 4) * (2 if options.get("bidirectional") else 1)
        self.head = nn.Linear(width, 3)

    def forward(self, tokens, batch_sizes=None):
        x = self.embedding(tokens)
        if batch_sizes is not None:
            x = nn.utils.rnn.PackedSequence(x, batch_sizes)
        out, state = self.rnn(x)
        h = state[0] if isinstance(state, tuple) else state
        return self.head(_data(out)), h


COMPILE_GRID = [
    ("lstm", dict(batch_first=True), False),
    ("lstm", dict(batch_first=True, bidirectional=True, num_layers=2), False),
    ("lstm", dict(batch_first=True, proj_size=2), False),
    ("lstm", dict(num_layers=2), False),
    ("lstm", dict(batch_first=True), True),
    ("rnn", dict(batch_first=True), False),
    ("rnn", dict(batch_first=True, bidirectional=True, nonlinearity="relu"), False),
    ("rnn", dict(num_layers=2), True),
    ("gru", dict(batch_first=True, bidirectional=True, num_layers=2), False),
    ("gru", dict(batch_first=True), True),
]


@pytest.mark.slow
@pytest.mark.parametrize("cell,options,packed", COMPILE_GRID, ids=str)
def test_compiled_training_step_equals_eager(cell, options, packed):
    """Embedding -> layer -> Linear, compiled with inductor's defaults: loss and every gradient equal
    eager's (inductor relies on the fakes' strides, batch_first's transposed views included)."""
    torch.manual_seed(0)
    model = _Tagger(cell, **options)
    tokens = torch.randint(0, 11, (3, 6) if options.get("batch_first") else (6, 3))
    target = torch.randint(0, 3, (3, 6) if options.get("batch_first") else (6, 3))
    batch_sizes = None
    if packed:
        lengths = torch.tensor([6, 4, 2])
        first = options.get("batch_first", False)
        packed_tokens = pack_padded_sequence(tokens, lengths, batch_first=first)
        tokens, batch_sizes = packed_tokens.data, packed_tokens.batch_sizes
        target = pack_padded_sequence(target, lengths, batch_first=first).data

    def step(forward):
        logits, h = forward(tokens, batch_sizes)
        loss = F.cross_entropy(logits.reshape(-1, 3), target.reshape(-1)) + h.square().mean()
        return [loss.detach()] + list(torch.autograd.grad(loss, list(model.parameters())))

    torch._dynamo.reset()
    # fullgraph: a graph break would leave the layer running eagerly, and the comparison meaningless
    compiled = step(torch.compile(model, fullgraph=True))
    eager = step(model)
    assert_all_close(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("layout", ["transposed", "expanded", "strided_weights"])
def test_opcheck_non_contiguous(cell, layout):
    """opcheck (fakes against the kernels, strides included) on transposed batch_first views,
    expanded inputs and non-contiguous weights, for every op."""
    s = layer_sample(cell, steps=3, batch=2, input_size=3, hidden=4, dtype=torch.float64)
    x, w_ih, w_hh, b_ih, b_hh = [a.detach() for a in s.args]
    if layout == "transposed":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    elif layout == "expanded":
        x = x[:, :1].expand(3, 2, 3)
    else:
        w_ih = w_ih.t().contiguous().t()
        w_hh = torch.cat([w_hh, w_hh], 1)[:, ::2]
    assert not (x.is_contiguous() and w_ih.is_contiguous())
    h0 = s.kwargs["h0"].detach()
    rng = torch.Generator().manual_seed(2)
    if cell == "lstm":
        c0 = s.kwargs["c0"].detach()
        args = (x, None, h0, c0, w_ih, w_hh, b_ih, b_hh, None, False, True)
        torch.library.opcheck(lstmfast.ops.lstm_forward, args)
        output, h_n, c_n, gates, cells = lstmfast.ops.lstm_forward(*args)
        grad = torch.randn(output.shape, generator=rng, dtype=torch.float64).transpose(0, 1)
        grad = grad.contiguous().transpose(0, 1)
        torch.library.opcheck(lstmfast.ops.lstm_backward, (
            grad, torch.ones_like(h_n), None, x, None, h0, c0, w_ih, w_hh, None, output, gates, cells,
            False, [True, True, True, True], None, False))
        result = lstmfast.ops.lstm_backward(grad, torch.ones_like(h_n), None, x, None, h0, c0, w_ih,
                                            w_hh, None, output, gates, cells, False, [True] * 4, None,
                                            False)
    elif cell == "gru":
        args = (x, None, h0, w_ih, w_hh, b_ih, b_hh, False, True)
        torch.library.opcheck(lstmfast.ops.gru_forward, args)
        output, h_n, gates = lstmfast.ops.gru_forward(*args)
        grad = torch.randn(output.shape, generator=rng, dtype=torch.float64).transpose(0, 1)
        grad = grad.contiguous().transpose(0, 1)
        torch.library.opcheck(lstmfast.ops.gru_backward, (
            grad, h_n, x, None, h0, w_ih, w_hh, output, gates, False, [True] * 4, None, False))
        result = lstmfast.ops.gru_backward(grad, h_n, x, None, h0, w_ih, w_hh, output, gates, False,
                                           [True] * 4, None, False)
    else:
        args = (x, None, h0, w_ih, w_hh, b_ih, b_hh, "tanh", False)
        torch.library.opcheck(lstmfast.ops.rnn_forward, args)
        output, h_n = lstmfast.ops.rnn_forward(*args)
        grad = torch.randn(output.shape, generator=rng, dtype=torch.float64)
        torch.library.opcheck(lstmfast.ops.rnn_backward, (
            grad, h_n, x, None, h0, w_ih, w_hh, output, "tanh", False, [True] * 4, None, False))
        result = lstmfast.ops.rnn_backward(grad, h_n, x, None, h0, w_ih, w_hh, output, "tanh", False,
                                           [True] * 4, None, False)
    assert output._base is None and output.is_contiguous()
    assert all(r.is_contiguous() for r in result)


# ------------------------------------------------------------------------------ torch.func

@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_func_grad_equals_torch_nn(cell):
    theirs, ours = _pair(cell, num_layers=2, bidirectional=True)
    x = torch.randn(4, 2, 3, dtype=torch.float64)

    def grads(module):
        def loss(params):
            out, _ = torch.func.functional_call(module, params, (x,))
            return out.pow(2).sum()
        return torch.func.grad(loss)({k: v.detach() for k, v in module.named_parameters()})

    expected, actual = grads(theirs), grads(ours)
    assert list(actual) == list(expected)
    assert_all_close(list(actual.values()), list(expected.values()), **F64)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_per_sample_grads_equal_torch_nn_one_sample_at_a_time(cell):
    """vmap(grad) over the samples of a batch gives each sample's own torch.nn gradient."""
    theirs, ours = _pair(cell, batch_first=True)
    x = torch.randn(3, 4, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in ours.named_parameters()}

    def loss(module, params, sample):
        out, _ = torch.func.functional_call(module, params, (sample.unsqueeze(0),))
        return out.pow(2).sum()

    per_sample = torch.func.vmap(torch.func.grad(lambda p, s: loss(ours, p, s)), in_dims=(None, 0))(
        params, x)
    for b in range(3):
        expected = torch.func.grad(lambda p: loss(theirs, p, x[b]))(params)
        assert_all_close([g[b] for g in per_sample.values()], list(expected.values()), **F64)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_jvp_equals_torch_nn_or_reference(cell):
    """Forward mode: torch.nn's RNN and GRU support it (compared with them); torch.nn's LSTM does not,
    so the LSTM's is compared with lstmfast.reference's."""
    theirs, ours = _pair(cell, num_layers=2, proj_size=2) if cell == "lstm" else _pair(cell, num_layers=2)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    g = torch.Generator().manual_seed(3)
    tangents = {k: torch.randn(v.shape, generator=g, dtype=torch.float64) for k, v in params.items()}
    x_tangent = torch.randn(x.shape, generator=g, dtype=torch.float64)

    def run(module):
        return lambda p, x: tuple(_flat(torch.func.functional_call(module, p, (x,))))

    actual = torch.func.jvp(run(ours), (params, x), (tangents, x_tangent))
    if cell != "lstm":
        expected = torch.func.jvp(run(theirs), (params, x), (tangents, x_tangent))
    else:
        def ref(p, x):
            finals = []
            for layer in range(2):
                w = [p[f"{name}_l{layer}"] for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
                x, *state = reference.lstm(x, *w, w_hr=p[f"weight_hr_l{layer}"])
                finals.append(state)
            return x, torch.stack([f[0] for f in finals]), torch.stack([f[1] for f in finals])
        expected = torch.func.jvp(ref, (params, x), (tangents, x_tangent))
    assert_all_close(list(actual[0]) + list(actual[1]), list(expected[0]) + list(expected[1]), **F64)
    assert expected[1][0].abs().sum() > 0


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_vmap_ensemble_gradients_reach_the_parameters(cell):
    """Model ensembling (stack_module_state + functional_call + vmap): outputs and the gradients of
    the stacked parameters are each model's own torch.nn ones (torch.nn itself has no batching rule)."""
    torch.manual_seed(0)
    pairs = [_pair(cell, bidirectional=True) for _ in range(3)]
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    params, buffers = torch.func.stack_module_state([ours for _, ours in pairs])
    base = pairs[0][1]
    out = torch.func.vmap(lambda p, b: torch.func.functional_call(base, (p, b), (x,))[0])(params, buffers)
    out.pow(2).sum().backward()
    for i, (theirs, _) in enumerate(pairs):
        expected_out, _ = theirs(x)
        torch.testing.assert_close(out[i], expected_out, **F64)
        grads = torch.autograd.grad(expected_out.pow(2).sum(), list(theirs.parameters()))
        for (name, _), g in zip(theirs.named_parameters(), grads):
            assert params[name].grad is not None, name
            torch.testing.assert_close(params[name].grad[i], g, **F64)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_first_run_under_no_grad_then_trained(cell):
    theirs, ours = _pair(cell, num_layers=2)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with torch.no_grad():
        ours(x)
    out, _ = ours(x)
    out.pow(2).sum().backward()
    expected = torch.autograd.grad(theirs(x)[0].pow(2).sum(), list(theirs.parameters()))
    actual = [p.grad for p in ours.parameters()]
    assert all(a is not None for a in actual)
    assert_all_close(actual, list(expected), **F64)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trained", "frozen"])
def test_func_vjp_jacrev_hessian_equal_torch_nn(cell, frozen):
    """The function torch.func.vjp returns runs its backward after the transform has exited (so do
    jacrev, which vmaps it, and hessian): lstmfast's saved tensors then arrive wrapped for a level
    that no longer exists. Every result equals torch.nn's, and vjp's gradient stays differentiable
    with respect to the module's Parameters, as torch.nn's is (it came back all zeros before)."""
    theirs, ours = _pair(cell)
    for p in theirs.parameters():
        p.requires_grad_(not frozen)
    x = torch.randn(3, 2, 3, dtype=torch.float64)

    def results(module):
        def layer(z):
            return module(z)[0]

        def energy(z):
            return module(z)[0].pow(2).sum()

        out, vjp = torch.func.vjp(layer, x)
        (grad_x,) = vjp(torch.ones_like(out))
        found = [grad_x.detach(), torch.func.jacrev(layer)(x), torch.func.hessian(energy)(x[:2]),
                 torch.func.jacrev(torch.func.jacrev(energy))(x[:2])]
        params = dict(module.named_parameters())
        found += list(torch.func.jacrev(lambda p: torch.func.functional_call(module, p, (x,))[0])(params).values())
        if not frozen:
            found += torch.autograd.grad(grad_x.pow(2).sum(), list(params.values()))
        return found

    expected, actual = results(theirs), results(ours)
    assert len(actual) == len(expected) and all(e.abs().sum() > 0 for e in expected)
    assert_all_close(actual, expected, **F64)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("grad_mode", [True, False], ids=["grad", "no_grad"])
def test_forward_ad_tangents_are_differentiable_like_torch_nn(cell, grad_mode):
    """torch.autograd.forward_ad: with grad mode on, an output's tangent depends differentiably on the
    Parameters (reverse over forward), as torch.nn's does; under no_grad it requires no grad."""
    import torch.autograd.forward_ad as fwAD

    theirs, ours = _pair(cell, hidden=4)
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    direction = torch.randn_like(x)

    def results(module):
        with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
            out, _ = module(fwAD.make_dual(x, direction))
            tangent = fwAD.unpack_dual(out).tangent
        found = [tangent.detach()]
        assert tangent.requires_grad == grad_mode
        if grad_mode:
            found += torch.autograd.grad(tangent.pow(2).sum(), list(module.parameters()))
        return found

    assert_all_close(results(ours), results(theirs), **F64)


FORWARD_MODE_CASES = ["jvp of jvp", "jacfwd of jacfwd", "hessian", "forward over reverse", "dual cotangent",
                      "state carried with dual weights", "frozen layer", "inference mode", "jvp under no_grad"]


@pytest.mark.parametrize("case", FORWARD_MODE_CASES)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_forward_mode_compositions_equal_torch_nn(cell, case):
    """Forward mode composed with itself, with reverse mode and with grad modes: torch.nn's tangents,
    gradients and requires_grad flags (the layer runs lstmfast.reference under forward mode)."""
    import torch.autograd.forward_ad as fwAD

    theirs, ours = _pair(cell, input_size=2, hidden=3, num_layers=2)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, 2, dtype=torch.float64, generator=g)
    v = torch.randn(x.shape, dtype=torch.float64, generator=g)

    def results(module):
        out = lambda z: module(z)[0]
        if case == "jvp of jvp":
            return [torch.func.jvp(lambda y: torch.func.jvp(out, (y,), (v,))[1], (x,), (v,))[1]]
        if case in ("jacfwd of jacfwd", "hessian"):
            loss = lambda z: out(z).pow(3).sum()
            twice = torch.func.hessian(loss) if case == "hessian" else torch.func.jacfwd(torch.func.jacfwd(loss))
            return [twice(x[:, :1])]
        if case == "forward over reverse":
            with fwAD.dual_level():
                leaf = fwAD.make_dual(x.clone().requires_grad_(), v)
                grads = torch.autograd.grad(out(leaf).pow(2).sum(), [leaf, *module.parameters()])
                return [fwAD.unpack_dual(gr).tangent for gr in grads]
        if case == "dual cotangent":
            leaf = x.clone().requires_grad_()
            y = out(leaf)
            with fwAD.dual_level():
                cotangent = fwAD.make_dual(torch.ones_like(y), torch.linspace(-1, 1, y.numel()).view_as(y))
                grads = torch.autograd.grad(y, [leaf, *module.parameters()], cotangent)
                return [fwAD.unpack_dual(gr).tangent for gr in grads]
        if case == "state carried with dual weights":
            with fwAD.dual_level():
                params = dict(module.named_parameters())
                params["weight_hh_l0"] = fwAD.make_dual(params["weight_hh_l0"], torch.ones_like(params["weight_hh_l0"]))
                _, state = torch.func.functional_call(module, params, (x[:2],))
                y, _ = torch.func.functional_call(module, params, (x[2:], state))
                return [fwAD.unpack_dual(y).tangent]
        if case == "frozen layer":
            module.requires_grad_(False)
            with fwAD.dual_level():
                tangent = fwAD.unpack_dual(out(fwAD.make_dual(x, v))).tangent
            assert not tangent.requires_grad and tangent.grad_fn is None
            return [tangent]
        if case == "inference mode":
            with torch.inference_mode(), fwAD.dual_level():
                return [out(x)]
        with torch.no_grad():
            primal, tangent = torch.func.jvp(out, (x,), (v,))
        assert not primal.requires_grad
        return [primal, tangent]

    expected, actual = results(theirs), results(ours)
    assert all(e is not None and e.abs().sum() > 0 for e in expected)
    assert all(a is not None for a in actual)
    assert_all_close(actual, expected, **F64)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_forward_mode_with_grad_clip_is_refused(cell):
    """Forward mode runs lstmfast.reference, which has no grad_clip: refused, not silently unclipped."""
    import torch.autograd.forward_ad as fwAD

    _, ours = _pair(cell)
    ours.grad_clip = 1.0
    x = torch.randn(3, 2, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="grad_clip and gradient-norm diagnostics are not defined for forward-mode AD"):
        torch.func.jvp(lambda z: ours(z)[0], (x,), (x,))
    with fwAD.dual_level(), pytest.raises(RuntimeError, match="not defined for forward-mode AD"):
        ours(fwAD.make_dual(x, x))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_autograd_functional_vectorized_equals_torch_nn(cell):
    """torch.autograd.functional.jacobian / hessian with vectorize=True (backward under autograd's own
    vmap, is_grads_batched) give torch.nn's numbers (they raised: detach has no batching rule)."""
    theirs, ours = _pair(cell)
    x = torch.randn(3, 2, 3, dtype=torch.float64)

    def results(module):
        jacobian = torch.autograd.functional.jacobian(lambda z: module(z)[0], x, vectorize=True)
        hessian = torch.autograd.functional.hessian(lambda z: module(z)[0].pow(2).sum(), x[:2],
                                                    vectorize=True)
        return [jacobian, hessian]

    assert_all_close(results(ours), results(theirs), **F64)


# ------------------------------------------------------------------------------ in-place outputs

INPLACE_GRID = [
    ("lstm", dict(), "3d"),
    ("lstm", dict(batch_first=True, bidirectional=True), "3d"),
    ("lstm", dict(num_layers=2, proj_size=2), "3d"),
    ("lstm", dict(), "unbatched"),
    ("lstm", dict(bidirectional=True), "packed"),
    ("rnn", dict(), "3d"),
    ("rnn", dict(batch_first=True, num_layers=2, nonlinearity="relu"), "3d"),
    ("rnn", dict(), "packed"),
    ("gru", dict(), "3d"),
    ("gru", dict(batch_first=True, bidirectional=True, num_layers=2), "3d"),
    ("gru", dict(), "unbatched"),
    ("gru", dict(bidirectional=True), "packed"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cell,options,kind", INPLACE_GRID, ids=str)
@pytest.mark.parametrize("operation", ["add", "relu_", "dropout"])
def test_inplace_on_output(cell, options, kind, operation, device):
    """out += x, torch.relu_(out), F.dropout(out, inplace=True): torch.nn's gradients."""
    theirs, ours = _pair(cell, input_size=3, hidden=3, device=device, **options)
    width = (options.get("proj_size") or 3) * (2 if options.get("bidirectional") else 1)
    x = torch.randn(4, 2, 3, dtype=torch.float64, device=device)
    results = []
    for module in (theirs, ours):
        leaf = x.clone().requires_grad_()
        if kind == "packed":
            out, state = module(pack_padded_sequence(leaf, [4, 2]))
            out = out.data
        else:
            out, state = module(leaf[:, 0] if kind == "unbatched" else leaf)
        bump = torch.ones(out.shape, dtype=out.dtype, device=device) * 0.1 * torch.arange(
            width, dtype=out.dtype, device=device)
        if operation == "add":
            out += bump
        elif operation == "relu_":
            torch.relu_(out)
        else:
            torch.manual_seed(7)
            F.dropout(out, 0.5, training=True, inplace=True)
        h = state[0] if isinstance(state, tuple) else state
        loss = (out * out.detach().sin()).sum() + h.sum()
        results.append([out.detach()] + list(torch.autograd.grad(loss, [leaf] + list(module.parameters()))))
    assert_all_close(results[1], results[0], **F64)


SAVINGS = {
    "save_on_cpu": torch.autograd.graph.save_on_cpu,
    "identity hooks": lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t),
    "copying hooks": lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t),
    "hooks copying when unpacking": lambda: torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t.clone()),
}


@pytest.mark.parametrize("saving", [*SAVINGS, "checkpoint"])
@pytest.mark.parametrize("operation", ["add", "relu_"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_inplace_on_output_under_saved_tensor_hooks(cell, operation, saving):
    """The output modified in place inside saved-tensor hooks (save_on_cpu, which on the CPU saves the
    output itself; hooks that copy; non-reentrant checkpoint, whose recomputation replays the in-place
    op, as in a checkpointed block ending in ReLU(inplace=True); hooks that keep what they are given and
    copy it when unpacking, after the change): torch.nn's gradients. Autograd checks no versions under
    hooks: lstmfast saves a copy of its own there."""
    theirs, ours = _pair(cell, input_size=3, hidden=4, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=torch.float64)

    def block(module, v):
        out = module(v)[0]
        return out.relu_() if operation == "relu_" else out.add_(torch.linspace(-1, 1, out.shape[-1]))

    results = []
    for module in (theirs, ours):
        leaf = x.clone().requires_grad_()
        if saving == "checkpoint":
            out = torch.utils.checkpoint.checkpoint(lambda v: block(module, v), leaf, use_reentrant=False)
        else:
            with SAVINGS[saving]():
                out = block(module, leaf)
        results.append(torch.autograd.grad(out.pow(2).sum(), [leaf] + list(module.parameters())))
    assert_all_close(results[1], results[0], **F64)


@pytest.mark.parametrize("saving", [None, *SAVINGS])
@pytest.mark.parametrize("layout", ["batch_first", "strided"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_input_view_modified_in_place_after_forward(cell, layout, saving):
    """A caller's input that is a view with other strides (batch_first, a step-sliced tensor), modified
    in place after the forward: torch.nn saves a copy of its own, so its gradients are those of the
    input as it was, with or without saved-tensor hooks (under which autograd checks no versions)."""
    options = dict(batch_first=True) if layout == "batch_first" else {}
    theirs, ours = _pair(cell, input_size=3, hidden=4, **options)
    results = []
    for module in (theirs, ours):
        base = torch.randn(2, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        x = base[..., ::2] if layout == "batch_first" else base.transpose(0, 1)[..., 1::2]
        with SAVINGS[saving]() if saving else contextlib.nullcontext():
            out = module(x)[0]
        base.mul_(2)
        results.append(torch.autograd.grad(out.pow(2).sum(), list(module.parameters())))
    assert_all_close(results[1], results[0], **F64)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("form", ["padded", "packed", "op"])
def test_an_unreached_projection_gets_no_gradient_as_under_torch_nn(form, steps):
    """A loss on c_n alone with sequences one step long never reaches the last layer's weight_hr (c_n
    then comes from h_0): torch.nn leaves its gradient None, which optimizers skip (weight decay,
    momentum), not zeros. Two steps long, it is reached. The op's own autograd (torch.export /
    torch.jit.trace graphs) does the same."""
    theirs, ours = _pair("lstm", input_size=2, hidden=3, proj_size=2, num_layers=2, bidirectional=True)
    x = torch.randn(steps, 3, 2, dtype=torch.float64)
    if form == "op":
        weights = [p.detach().clone().requires_grad_() for p in ours.parameters()][:5]  # layer 0, forward
        states = [torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)]
        c_n = torch.ops.lstmfast.lstm_forward(x, None, *states, *weights, False, True)[2]
        c_n.sum().backward()
        assert (weights[4].grad is None) == (steps == 1)
        return
    if form == "packed":
        x = pack_padded_sequence(x, [steps] * 3)
    for module in (theirs, ours):
        module(x)[1][1].pow(2).sum().backward()
    names = [name for name, _ in theirs.named_parameters()]
    found = {name: p.grad for name, p in zip(names, ours.parameters())}
    expected = {name: p.grad for name, p in theirs.named_parameters()}
    assert {n for n, g in found.items() if g is None} == {n for n, g in expected.items() if g is None}
    assert ({n for n, g in expected.items() if g is None} == {"weight_hr_l1", "weight_hr_l1_reverse"}) == (steps == 1)
    assert_all_close([g for g in found.values() if g is not None], [g for g in expected.values() if g is not None], **F64)


@pytest.mark.parametrize("cell", ["lstm", "rnn", "gru"])
def test_bias_gradients_are_tensors_of_their_own(cell):
    """b_ih's and b_hh's gradients are equal (the fused op computes them once) but, as torch.nn's, two
    tensors: a hook or a caller may modify one in place (clip_grad_norm_ over torch.func.grad's
    gradients scales each)."""
    theirs, ours = _pair(cell, input_size=3, hidden=4)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for module in (theirs, ours):
        g_ih, g_hh = torch.autograd.grad(module(x)[0].sum(), [module.bias_ih_l0, module.bias_hh_l0])
        assert g_ih.data_ptr() != g_hh.data_ptr()
        params = dict(module.named_parameters())
        grads = torch.func.grad(lambda p: torch.func.functional_call(module, p, (x,))[0].sum())(params)
        assert grads["bias_ih_l0"].data_ptr() != grads["bias_hh_l0"].data_ptr()
    results = []
    for module in (theirs, ours):
        handle = module.bias_ih_l0.register_hook(lambda g: g.mul_(2))
        module.zero_grad()
        module(x)[0].pow(2).sum().backward()
        handle.remove()
        results.append([p.grad for p in module.parameters()])
    assert_all_close(results[1], results[0], **F64)


# ------------------------------------------------------------------------------ float16 / bfloat16

REDUCED = {torch.bfloat16: 5e-2, torch.float16: 1e-2}


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_module_on_cpu(cell, dtype):
    """A float16/bfloat16 module: torch.nn's dtypes everywhere, values within the dtype's tolerance of
    the float32 computation (lstmfast computes in float32 and rounds the results once)."""
    options = dict(num_layers=2, bidirectional=True) if cell != "lstm" else dict(proj_size=2)
    theirs, ours = _pair(cell, input_size=3, hidden=4, dtype=torch.float32, **options)
    ours_reduced = getattr(lstmfast, KINDS[cell]).from_torch(getattr(nn, KINDS[cell])(3, 4, **options).to(dtype))
    ours_reduced.load_state_dict(theirs.state_dict())
    theirs_reduced = ours_reduced.to_torch()
    x = torch.randn(5, 2, 3)

    def run(module, x):
        leaf = x.clone().requires_grad_()
        outs = _flat(module(leaf))
        loss = sum(o.float().sum() for o in outs)
        return outs, torch.autograd.grad(loss, [leaf] + list(module.parameters()))

    outs, grads = run(ours_reduced, x.to(dtype))
    their_outs, their_grads = run(theirs_reduced, x.to(dtype))
    assert [o.dtype for o in outs] == [o.dtype for o in their_outs]
    assert [g.dtype for g in grads] == [g.dtype for g in their_grads] == [dtype] * len(grads)
    ref_outs, ref_grads = run(theirs, x.to(dtype).float())
    tol = REDUCED[dtype]
    for a, e in zip(list(outs) + list(grads), list(ref_outs) + list(ref_grads)):
        torch.testing.assert_close(a.float(), e, rtol=tol, atol=tol)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_autocast(cell, dtype):
    """Under torch.autocast("cpu"), an autocast Linear feeding the layer: the layer runs in the
    autocast dtype and returns torch.nn's dtypes (outputs and states in it, float32 parameter
    gradients), with values within tolerance of float32 on the same rounded operands."""
    options = dict(num_layers=2, bidirectional=True)
    theirs, ours = _pair(cell, input_size=3, hidden=4, dtype=torch.float32, **options)
    linear = nn.Linear(3, 3)
    x = torch.randn(5, 2, 3)

    def run(module):
        with torch.autocast("cpu", dtype=dtype):
            outs = _flat(module(linear(x)))
        loss = sum(o.float().sum() for o in outs)
        return outs, torch.autograd.grad(loss, list(module.parameters()) + list(linear.parameters()))

    outs, grads = run(ours)
    their_outs, their_grads = run(theirs)
    assert [o.dtype for o in outs] == [o.dtype for o in their_outs] == [dtype] * len(outs)
    assert [g.dtype for g in grads] == [g.dtype for g in their_grads] == [torch.float32] * len(grads)
    # float32 on the autocast-rounded operands
    rounded = getattr(lstmfast, KINDS[cell])(3, 4, **options)
    with torch.no_grad():
        for p, q in zip(rounded.parameters(), ours.parameters()):
            p.copy_(q.to(dtype).float())
    with torch.autocast("cpu", dtype=dtype):
        y = linear(x)
    ref_outs = _flat(rounded(y.float()))
    tol = REDUCED[dtype]
    for a, e in zip(outs, ref_outs):
        torch.testing.assert_close(a.float(), e.detach(), rtol=tol, atol=tol)
    for a, e in zip(grads, their_grads):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("packing", ["padded", "empty", "uniform", "ragged"])
def test_cpu_autocast_result_dtypes_are_torch_nn_s(cell, dtype, packing):
    """torch.nn's result dtypes under CPU autocast depend on which of its paths runs: oneDNN's fused
    LSTM (padded or equal-length packed input, no projection) returns the autocast dtype, the native
    path promotes its autocast-dtype products with the states' dtype (so a GRU on float32 input, a
    ragged packed LSTM and a projected LSTM's c_n come back float32). Over inputs and states of
    every floating dtype, projection and hx or not, lstmfast returns torch.nn's dtypes and values
    within the autocast dtype's tolerance; where torch.nn refuses the call (its oneDNN LSTM under
    float16 autocast), lstmfast runs in the autocast dtype. An empty batch takes torch.nn's native
    path (oneDNN's only runs non-empty input)."""
    lengths = {"padded": None, "empty": None, "uniform": [4, 4], "ragged": [4, 2]}[packing]
    batch = 0 if packing == "empty" else 2
    lstmfast.modules._AUTOCAST_DTYPES.clear()  # torch.nn is asked afresh: it must not touch the RNG
    checked = 0
    for proj in ([0, 2] if cell == "lstm" else [0]):
        options = dict(proj_size=proj) if proj else {}
        theirs, ours = _pair(cell, input_size=3, hidden=4, dtype=torch.float32, **options)
        for x_dtype in (torch.float32, torch.bfloat16, torch.float16):
            for with_hx in (False, True):
                x = torch.randn(4, batch, 3).to(x_dtype)
                data = x if lengths is None else pack_padded_sequence(x, torch.tensor(lengths))
                hx = None
                if with_hx:
                    states = [torch.randn(1, batch, proj or 4), torch.randn(1, batch, 4)][:2 if cell == "lstm" else 1]
                    hx = tuple(states) if cell == "lstm" else states[0]
                with torch.autocast("cpu", dtype=dtype):
                    rng = torch.get_rng_state()
                    actual = _flat(ours(data, hx))
                    assert torch.equal(torch.get_rng_state(), rng)
                    try:
                        expected = _flat(theirs(data, hx))
                    except RuntimeError:
                        expected = None
                if expected is None:
                    assert [a.dtype for a in actual] == [dtype] * len(actual)
                    continue
                assert [a.dtype for a in actual] == [e.dtype for e in expected], (proj, x_dtype, with_hx)
                for a, e in zip(actual, expected):
                    torch.testing.assert_close(a.float(), e.float(), rtol=REDUCED[dtype], atol=REDUCED[dtype])
                checked += 1
    assert checked >= 6


@pytest.mark.parametrize("cell,options", [("gru", {}), ("lstm", dict(proj_size=2))], ids=str)
def test_cpu_autocast_result_dtypes_when_compiled_first(cell, options):
    """A compiled forward asks torch.nn for its autocast dtypes while tracing (they are constants of
    the call), so the first call of a kind being a compiled one changes nothing."""
    lstmfast.modules._AUTOCAST_DTYPES.clear()
    torch._dynamo.reset()
    theirs, ours = _pair(cell, input_size=3, hidden=4, dtype=torch.float32, **options)
    x = torch.randn(5, 2, 3)

    def run(module, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _flat(module(x))

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")(ours, x)
    expected = run(theirs, x)
    assert [t.dtype for t in compiled] == [t.dtype for t in expected]
    assert torch.float32 in [t.dtype for t in expected]
    for a, e in zip(compiled, expected):
        torch.testing.assert_close(a.float(), e.float(), rtol=REDUCED[torch.bfloat16], atol=REDUCED[torch.bfloat16])


def test_cpu_autocast_float16_lstm_training():
    """fp16 autocast LSTM training on float32 input (torch.nn 2.13's oneDNN path refuses it): runs,
    and matches the float32 computation on float16-rounded operands."""
    theirs, ours = _pair("lstm", input_size=3, hidden=4, dtype=torch.float32)
    x = torch.randn(5, 2, 3)
    with torch.autocast("cpu", dtype=torch.float16):
        out, (h, c) = ours(x)
    assert out.dtype == h.dtype == c.dtype == torch.float16
    grads = torch.autograd.grad(out.float().sum(), list(ours.parameters()))
    rounded = lstmfast.LSTM(3, 4)
    with torch.no_grad():
        for p, q in zip(rounded.parameters(), ours.parameters()):
            p.copy_(q.half().float())
    ref_out, _ = rounded(x.half().float())
    ref_grads = torch.autograd.grad(ref_out.sum(), list(rounded.parameters()))
    torch.testing.assert_close(out.float(), ref_out.detach(), rtol=1e-2, atol=1e-2)
    for a, e in zip(grads, ref_grads):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, e, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_forward_ad_equals_reference(cell):
    """torch.autograd.forward_ad (dual tensors) through the functional layer: the reference's tangents."""
    import torch.autograd.forward_ad as fwAD
    s = layer_sample(cell, steps=3, batch=2, input_size=2, hidden=3, lengths=[3, 1], proj=0)
    g = torch.Generator().manual_seed(4)
    x, w_ih = s.args[0].detach(), s.args[1].detach()
    tangents = [torch.randn(t.shape, generator=g, dtype=torch.float64) for t in (x, w_ih)]
    results = []
    for module in (functional, reference):
        with fwAD.dual_level():
            args = [fwAD.make_dual(x, tangents[0]), fwAD.make_dual(w_ih, tangents[1])]
            args += [a.detach() if a is not None else None for a in s.args[2:]]
            kwargs = {k: (v.detach() if isinstance(v, torch.Tensor) and k != "batch_sizes" else v)
                      for k, v in s.kwargs.items()}
            outs = getattr(module, cell)(*args, **kwargs)
            results.append([fwAD.unpack_dual(o).tangent for o in outs])
    assert all(t is not None for t in results[0])
    assert_all_close(results[0], results[1], **F64)


# ------------------------------------------------------------------------------ review follow-ups

@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_func_grad_runs_the_fused_backward_with_grad_clip(cell, monkeypatch):
    """torch.func.grad differentiates with create_graph=True at every level; for a first-order
    gradient that must still be the fused kernels (the reference is never called) and grad_clip is
    honoured exactly as by loss.backward()."""
    _, ours = _pair(cell, input_size=3, hidden=4, num_layers=2)
    ours.grad_clip = 1e-3  # small enough that the clamp changes the gradients
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    calls = []
    for name in ("lstm", "gru", "rnn"):
        original = getattr(reference, name)
        monkeypatch.setattr(reference, name,
                            lambda *a, _o=original, **k: calls.append(1) or _o(*a, **k))

    def loss(params):
        out, _ = torch.func.functional_call(ours, params, (x,))
        return out.pow(2).sum()

    params = {k: v.detach() for k, v in ours.named_parameters()}
    actual = torch.func.grad(loss)(params)
    assert calls == []
    ours.zero_grad()
    ours(x)[0].pow(2).sum().backward()
    assert_all_close(list(actual.values()), [p.grad for p in ours.parameters()], **F64)
    ours.grad_clip = None
    ours.zero_grad()
    ours(x)[0].pow(2).sum().backward()
    unclipped = [p.grad for p in ours.parameters()]
    assert any(not torch.allclose(a, u) for a, u in zip(actual.values(), unclipped))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_cpu_autocast_leaves_float64_layers_in_float64(cell):
    """torch's autocast never casts float64: a float64 layer under CPU autocast computes in float64,
    as torch.nn's does, and gives torch.nn's numbers."""
    theirs, ours = _pair(cell, input_size=3, hidden=4)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = _flat(theirs(x)), _flat(ours(x))
    assert [a.dtype for a in actual] == [e.dtype for e in expected] == [torch.float64] * len(actual)
    assert_all_close(actual, expected, **F64)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_saved_tensor_hooks_own_what_is_saved(cell):
    """Under saved-tensor hooks (checkpointing, save_on_cpu) the graph keeps no reference of its own to
    the layer's output (the hooks decide what is kept), and checkpointed training gives torch.nn's
    gradients."""
    theirs, ours = _pair(cell, input_size=3, hidden=4, num_layers=2)
    x = torch.randn(5, 2, 3, dtype=torch.float64, requires_grad=True)
    s = layer_sample(cell)
    out = s.run(functional)[0]
    assert out.grad_fn.output_watch is not None  # without hooks: the in-place watch is on
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        out = s.run(functional)[0]
    assert not isinstance(out.grad_fn.output_watch, torch.Tensor)

    def grads(module):
        out = torch.utils.checkpoint.checkpoint(lambda v: module(v)[0], x, use_reentrant=False)
        return torch.autograd.grad(out.pow(2).sum(), [x] + list(module.parameters()))

    assert_all_close(grads(ours), grads(theirs), **F64)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_nested_func_grad_equals_torch_nn(cell):
    """grad of grad through torch.func (two differentiating transforms): the inner backward must be
    differentiable, as torch.nn's is."""
    theirs, ours = _pair(cell, input_size=3, hidden=3)
    x = torch.randn(4, 2, 3, dtype=torch.float64)

    def second(module):
        def loss(params):
            return torch.func.functional_call(module, params, (x,))[0].pow(2).sum()

        def inner(params):
            return torch.func.grad(loss)(params)["weight_hh_l0"].pow(2).sum()
        return torch.func.grad(inner)({k: v.detach() for k, v in module.named_parameters()})

    expected, actual = second(theirs), second(ours)
    assert any(e.abs().max() > 0 for e in expected.values())
    assert_all_close(list(actual.values()), list(expected.values()), **F64)

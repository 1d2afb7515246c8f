"""Property-based tests (hypothesis): random shapes and options against the oracles.

functional.lstm / gru / rnn against lstmfast.reference, and lstmfast.LSTM / GRU / RNN against torch.nn with
the same weights: outputs, final states and every gradient (input, initial states, weights, biases).
Shapes cover B = 0, T = 0, packed input of random lengths, and inputs given contiguous, strided (a slice
of a bigger tensor), transposed or expanded (stride 0, including expanded h0).
"""

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils.rnn import pack_sequence

import lstmfast
from lstmfast import functional, reference

from conftest import TOLERANCES, assert_all_close, layer_sample, module_outputs_and_grads


def outputs_and_grads(sample, module, seed=1):
    """conftest.outputs_and_grads, where gradients that do not reach a tensor (T = 0, B = 0, unused
    weights) count as zeros: the reference builds no graph at all for an empty sequence."""
    outputs = sample.run(module)
    g = torch.Generator().manual_seed(seed)
    cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outputs]
    live = [(o, c) for o, c in zip(outputs, cotangents) if o.requires_grad]
    grads = [None] * len(sample.tensors)
    if live:
        grads = torch.autograd.grad([o for o, _ in live], sample.tensors, [c for _, c in live],
                                    allow_unused=True)
    grads = [torch.zeros_like(t) if gr is None else gr for t, gr in zip(sample.tensors, grads)]
    return [o.detach() for o in outputs], grads

SETTINGS = dict(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
DTYPES = st.sampled_from([torch.float64, torch.float32])


def restride(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as t in another memory layout, still a leaf that requires grad when t did."""
    grad = t.requires_grad
    t = t.detach()
    if how == "strided" and t.dim() >= 1:  # every other element of a bigger buffer
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        t = big[..., ::2]
    elif how == "transposed" and t.dim() >= 2:  # column-major storage
        t = t.transpose(0, -1).contiguous().transpose(0, -1)
    return t.requires_grad_(grad)


def expanded(shape, dtype, seed):
    """A tensor of `shape` whose first dimension is a stride-0 broadcast of one random row."""
    g = torch.Generator().manual_seed(seed)
    row = torch.rand((1, *shape[1:]), generator=g, dtype=torch.float64).to(dtype) * 2 - 1
    return row.expand(shape).requires_grad_(False)


@st.composite
def layer_cases(draw):
    cell = draw(st.sampled_from(["lstm", "gru", "rnn"]))
    hidden = draw(st.integers(1, 7))
    proj = draw(st.integers(0, hidden - 1)) if cell == "lstm" and hidden > 1 else 0
    packed = draw(st.booleans())
    if packed:
        lengths = sorted(draw(st.lists(st.integers(1, 6), min_size=1, max_size=5)), reverse=True)
        steps, batch = max(lengths), len(lengths)
    else:
        lengths, steps, batch = None, draw(st.integers(0, 6)), draw(st.integers(0, 4))
    return dict(
        cell=cell, steps=steps, batch=batch, input_size=draw(st.integers(1, 6)), hidden=hidden,
        proj=proj, lengths=lengths, bias=draw(st.booleans()), state=draw(st.booleans()),
        reverse=draw(st.booleans()), nonlinearity=draw(st.sampled_from(["tanh", "relu"])),
        dtype=draw(DTYPES), seed=draw(st.integers(0, 2**16)),
        layout=draw(st.sampled_from(["contiguous", "strided", "transposed"])),
        grad_clip=draw(st.sampled_from([None, None, 0.05])),
    )


@settings(max_examples=300, **SETTINGS)
@given(case=layer_cases())
def test_functional_matches_reference(case):
    layout, dtype = case.pop("layout"), case["dtype"]
    sample = layer_sample(**case)
    sample.args = tuple(None if a is None else restride(a, layout) for a in sample.args)
    for k in ("w_hr", "h0", "c0"):
        if sample.kwargs.get(k) is not None:
            sample.kwargs[k] = restride(sample.kwargs[k], layout)
    out, grads = outputs_and_grads(sample, functional)
    ref_out, ref_grads = outputs_and_grads(sample, reference)
    assert_all_close(out, ref_out, **TOLERANCES[dtype])
    assert_all_close(grads, ref_grads, **TOLERANCES[dtype])


@settings(max_examples=40, **SETTINGS)
@given(cell=st.sampled_from(["lstm", "gru", "rnn"]), steps=st.integers(1, 5), batch=st.integers(1, 4),
       proj=st.booleans(), reverse=st.booleans(), dtype=DTYPES, seed=st.integers(0, 2**16))
def test_expanded_inputs_and_states(cell, steps, batch, proj, reverse, dtype, seed):
    """Stride-0 (expanded) input and initial states give the reference's outputs and gradients."""
    sample = layer_sample(cell, steps=steps, batch=batch, input_size=3, hidden=4,
                          proj=2 if proj and cell == "lstm" else 0, reverse=reverse, dtype=dtype,
                          seed=seed)
    x = expanded((steps, batch, 3), dtype, seed)
    sample.args = (x,) + sample.args[1:]
    for k in ("h0", "c0"):
        if k in sample.kwargs:
            shape = sample.kwargs[k].shape
            sample.kwargs[k] = torch.randn(1, shape[1], dtype=dtype).expand(shape)
    out, grads = outputs_and_grads(sample, functional)
    ref_out, ref_grads = outputs_and_grads(sample, reference)
    assert_all_close(out, ref_out, **TOLERANCES[dtype])
    assert_all_close(grads, ref_grads, **TOLERANCES[dtype])


@st.composite
def module_cases(draw):
    kind = draw(st.sampled_from(["LSTM", "GRU", "RNN"]))
    hidden = draw(st.integers(1, 6))
    options = dict(input_size=draw(st.integers(1, 5)), hidden_size=hidden,
                   num_layers=draw(st.integers(1, 3)), bias=draw(st.booleans()),
                   batch_first=draw(st.booleans()), bidirectional=draw(st.booleans()))
    if kind == "LSTM" and hidden > 1:
        options["proj_size"] = draw(st.integers(0, hidden - 1))
    if kind == "RNN":
        options["nonlinearity"] = draw(st.sampled_from(["tanh", "relu"]))
    form = draw(st.sampled_from(["padded", "packed", "unbatched"]))
    lengths = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    batch = 0 if form == "padded" and draw(st.integers(0, 5)) == 0 else len(lengths)
    return dict(kind=kind, options=options, form=form, lengths=lengths, batch=batch,
                hx=draw(st.booleans()), dtype=draw(DTYPES), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=150, **SETTINGS)
@given(case=module_cases())
def test_modules_match_torch_nn(case):
    kind, options, dtype = case["kind"], case["options"], case["dtype"]
    torch.manual_seed(case["seed"])
    ours = getattr(lstmfast, kind)(**options).to(dtype)
    theirs = getattr(nn, kind)(**options).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(case["seed"])
    rand = lambda *s: (torch.randn(s, generator=g, dtype=torch.float64)).to(dtype)  # noqa: E731
    I, lengths, batch_first = options["input_size"], case["lengths"], options["batch_first"]
    leaves = []
    if case["form"] == "packed":
        data = [rand(n, I) for n in lengths]
        x = pack_sequence(data, enforce_sorted=False)
        x.data.requires_grad_()
        leaves.append(x.data)
        batch = len(lengths)
    else:
        steps, batch = max(lengths), case["batch"]
        shape = (steps, I) if case["form"] == "unbatched" else (
            (batch, steps, I) if batch_first else (steps, batch, I))
        x = rand(*shape).requires_grad_()
        leaves.append(x)
    hx = None
    if case["hx"]:
        n = options["num_layers"] * (2 if options["bidirectional"] else 1)
        lead = (n,) if case["form"] == "unbatched" else (n, batch)
        out = options.get("proj_size") or options["hidden_size"]
        if kind == "LSTM":
            hx = (rand(*lead, out).requires_grad_(), rand(*lead, options["hidden_size"]).requires_grad_())
            leaves += list(hx)
        else:
            hx = rand(*lead, options["hidden_size"]).requires_grad_()
            leaves.append(hx)
    got, want = module_outputs_and_grads(ours, x, hx, leaves), module_outputs_and_grads(theirs, x, hx, leaves)
    assert_all_close(got[0], want[0], **TOLERANCES[dtype])
    assert_all_close(got[1], want[1], **TOLERANCES[dtype])


@st.composite
def autograd_cases(draw):
    """module_cases (float64, no empty batch), plus which Parameters are frozen, whether the input and
    hx require grad, and what is differentiated: a loss once, its gradients again (create_graph), or a
    second call fed the first one's final state (not detached)."""
    case = draw(module_cases())
    case.update(dtype=torch.float64, batch=len(case["lengths"]), hx_grad=draw(st.booleans()),
                input_grad=draw(st.booleans()), frozen=draw(st.integers(0, 2**12)),
                mode=draw(st.sampled_from(["first", "second", "carried", "carried-second"])))
    return case


def _autograd_run(module, case, frozen):
    """The case's run: the outputs' values and requires_grad flags, and the gradients of every leaf
    that requires grad (None where the loss does not reach it), then of a penalty on them."""
    kind, options = case["kind"], case["options"]
    for name, p in module.named_parameters():
        p.requires_grad_(name not in frozen)
    g = torch.Generator().manual_seed(case["seed"])
    rand = lambda *s: torch.randn(s, generator=g, dtype=torch.float64)  # noqa: E731
    I, lengths, batch = options["input_size"], case["lengths"], case["batch"]
    steps = max(lengths)

    def make_input():
        if case["form"] == "packed":
            data = [rand(n, I).requires_grad_(case["input_grad"]) for n in lengths]
            return pack_sequence(data, enforce_sorted=False), data
        shape = (steps, I) if case["form"] == "unbatched" else (
            (batch, steps, I) if options["batch_first"] else (steps, batch, I))
        x = rand(*shape).requires_grad_(case["input_grad"])
        return x, [x]

    x, leaves = make_input()
    hx = None
    if case["hx"]:
        n = options["num_layers"] * (2 if options["bidirectional"] else 1)
        lead = (n,) if case["form"] == "unbatched" else (n, batch)
        out = options.get("proj_size") or options["hidden_size"]
        states = [rand(*lead, out)] + ([rand(*lead, options["hidden_size"])] if kind == "LSTM" else [])
        states = [h.requires_grad_(case["hx_grad"]) for h in states]
        hx = tuple(states) if kind == "LSTM" else states[0]
        leaves += states
    output, state = module(x, hx)
    if case["mode"].startswith("carried"):
        x2, more = make_input()
        leaves += more
        output, state = module(x2, state)
    results = [output.data if case["form"] == "packed" else output]
    results += list(state) if isinstance(state, tuple) else [state]
    flags = [r.requires_grad for r in results]
    leaves = [t for t in leaves + list(module.parameters()) if t.requires_grad]
    live = [r for r in results if r.requires_grad]
    if not leaves or not live:
        return [r.detach() for r in results], flags, []
    loss = sum((r * rand(*r.shape)).sum() for r in live)
    second = case["mode"].endswith("second")
    grads = torch.autograd.grad(loss, leaves, create_graph=second, allow_unused=True)
    found = [None if gr is None else gr.detach() for gr in grads]
    if second and any(gr is not None and gr.requires_grad for gr in grads):
        penalty = sum(gr.pow(2).sum() for gr in grads if gr is not None and gr.requires_grad)
        found += list(torch.autograd.grad(penalty, leaves, allow_unused=True))
    return [r.detach() for r in results], flags, found


@settings(max_examples=120, **SETTINGS)
@given(case=autograd_cases())
def test_modules_match_torch_nn_under_any_requires_grad(case):
    """torch.nn and lstmfast on the same Parameters with any of them frozen, the input and hx requiring
    grad or not, first and second order, and a final state carried into a second call: the same
    outputs, the same requires_grad on them, and the same gradients (None for the same leaves)."""
    kind, options = case["kind"], case["options"]
    torch.manual_seed(case["seed"])
    theirs = getattr(nn, kind)(**options).double()
    ours = getattr(lstmfast, kind).from_torch(copy.deepcopy(theirs))
    names = [name for name, _ in theirs.named_parameters()]
    frozen = {name for i, name in enumerate(names) if case["frozen"] >> i & 1}
    want, got = _autograd_run(theirs, case, frozen), _autograd_run(ours, case, frozen)
    assert got[1] == want[1]
    assert_all_close(got[0], want[0], **TOLERANCES[torch.float64])
    assert [g is None for g in got[2]] == [g is None for g in want[2]]
    assert_all_close([g for g in got[2] if g is not None], [g for g in want[2] if g is not None],
                     **TOLERANCES[torch.float64])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_zero_batch_module(kind):
    """B = 0 (padded): empty outputs and states of the right shapes, gradients of the right shapes."""
    ours = getattr(lstmfast, kind)(3, 4, num_layers=2, bidirectional=True).double()
    theirs = getattr(nn, kind)(3, 4, num_layers=2, bidirectional=True).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(5, 0, 3, dtype=torch.float64, requires_grad=True)
    got, want = module_outputs_and_grads(ours, x, None, [x]), module_outputs_and_grads(theirs, x, None, [x])
    assert [t.shape for t in got[0]] == [t.shape for t in want[0]]
    assert_all_close(got[1], want[1], **TOLERANCES[torch.float64])

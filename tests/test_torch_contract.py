"""lstmfast's layers are torch.nn modules to the rest of the ecosystem: torch.nn's signatures, the
torch.nn classes (isinstance, all_weights, _flat_weights), and the utilities that rewrite a module's
weights (weight_norm, parametrizations, pruning, functional_call); convert() keeps everything."""

import contextlib
import copy
import pickle
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import lstmfast
from conftest import TOLERANCES

F64 = torch.float64


def pair(kind, *args, **kwargs):
    """A torch.nn layer and an lstmfast layer built from the same arguments, with the same weights."""
    torch.manual_seed(0)
    theirs = getattr(nn, kind)(*args, **kwargs)
    ours = getattr(lstmfast, kind)(*args, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def assert_same_run(theirs, ours, x, hx=None):
    """Same outputs, and the same gradients for every parameter (by name) and for the input."""
    xs = [x.detach().clone().requires_grad_() for _ in range(2)]
    results = [m(xi, hx) for m, xi in zip((theirs, ours), xs)]
    (y0, s0), (y1, s1) = results
    torch.testing.assert_close(y1, y0, **TOLERANCES[x.dtype])
    torch.testing.assert_close(s1, s0, **TOLERANCES[x.dtype])
    for m, (y, s), xi in zip((theirs, ours), results, xs):
        m.zero_grad()
        (y.square().sum() + sum(t.sum() for t in (s if isinstance(s, tuple) else (s,)))).backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, **TOLERANCES[x.dtype])
    their_params, our_params = dict(theirs.named_parameters()), dict(ours.named_parameters())
    assert their_params.keys() == our_params.keys()
    for name, p in their_params.items():
        torch.testing.assert_close(our_params[name].grad, p.grad, **TOLERANCES[x.dtype])


OPTIONS = ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
           "proj_size", "mode")


@pytest.mark.parametrize("kind,args", [
    ("LSTM", (4, 6, 2, False, True, 0.25, True, 3, "cpu", F64)),
    ("LSTM", (4, 6, 3, True, False)),
    ("RNN", (16, 32, 2, "relu")),
    ("RNN", (4, 6, 1, "tanh", True)),
    ("GRU", (4, 6, 2, False, True, 0.25, True)),
    ("GRU", (16, 32, 3)),
])
def test_positional_arguments_build_the_same_module(kind, args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, ours = getattr(nn, kind)(*args), getattr(lstmfast, kind)(*args)
    for name in OPTIONS + (("nonlinearity",) if kind == "RNN" else ()):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == \
        [(n, p.shape, p.dtype) for n, p in theirs.named_parameters()]
    assert repr(ours) == repr(theirs)


@pytest.mark.parametrize("kind,args", [
    ("RNN", (4, 6, 2, "relu", False, True, 0.25, True)),
    ("GRU", (4, 6, 2, False, True, 0.25, True)),
])
def test_positional_device_and_dtype(kind, args):
    """torch.nn.RNN's and torch.nn.GRU's documented signatures end in device, dtype; given positionally,
    torch.nn puts the device into proj_size and fails. lstmfast follows the signature (README,
    Guarantees)."""
    with pytest.raises(TypeError):
        getattr(nn, kind)(*args, "cpu", F64)
    ours = getattr(lstmfast, kind)(*args, "cpu", F64)
    theirs = getattr(nn, kind)(*args, device="cpu", dtype=F64)
    assert repr(ours) == repr(theirs) and ours.weight_ih_l0.dtype == F64
    assert getattr(lstmfast, kind)(*args, "cpu").weight_ih_l0.dtype == torch.float32
    with pytest.raises(TypeError, match="got multiple values for argument 'dtype'"):
        getattr(lstmfast, kind)(*args, "cpu", F64, dtype=F64)


def test_extras_are_keyword_only():
    with pytest.raises(TypeError):
        lstmfast.LSTM(4, 6, 1, True, False, 0.0, False, 0, None, None, 1.0)  # an 11th positional
    with pytest.raises(TypeError):
        lstmfast.RNN(4, 6, 1, "tanh", True, False, 0.0, False, None, None, 1.0)
    with pytest.raises(TypeError):
        lstmfast.GRU(4, 6, 1, True, False, 0.0, False, None, None, 1.0)
    assert repr(lstmfast.GRU(4, 6, grad_clip=0.5)) == "GRU(4, 6, grad_clip=0.5)"
    m = lstmfast.LSTM(4, 6, grad_clip=1.0, forget_bias=1.0)
    assert m.grad_clip == 1.0 and repr(m) == "LSTM(4, 6, forget_bias=1.0, grad_clip=1.0)"
    assert torch.all(m.bias_ih_l0[6:12] > 0)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_is_a_torch_nn_module_with_its_internals(kind):
    theirs, ours = pair(kind, 3, 5, num_layers=2, bidirectional=True)
    assert isinstance(ours, getattr(nn, kind)) and isinstance(ours, nn.RNNBase)
    assert ours._flat_weights_names == theirs._flat_weights_names
    assert all(w is p for w, p in zip(ours._flat_weights, ours.parameters()))
    assert [[w.shape for w in ws] for ws in ours.all_weights] == \
        [[w.shape for w in ws] for ws in theirs.all_weights]
    ours.flatten_parameters()
    clone = copy.deepcopy(ours)
    assert type(clone) is type(ours) and clone.grad_clip is None
    unpickled = pickle.loads(pickle.dumps(ours))
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(unpickled(x)[0], ours(x)[0], rtol=0, atol=0)
    ours.double()  # _apply re-reads the weights, as torch.nn's does
    assert all(w.dtype == F64 and w is p for w, p in zip(ours._flat_weights, ours.parameters()))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_old_style_weight_norm(kind):
    theirs, ours = pair(kind, 3, 5, num_layers=2)
    theirs, ours = theirs.double(), ours.double()
    for m in (theirs, ours):
        torch.nn.utils.weight_norm(m, "weight_hh_l1")
        with torch.no_grad():
            m.weight_hh_l1_g.mul_(1.5)  # the normalized weight now differs from the raw one
    assert_same_run(theirs, ours, torch.randn(6, 2, 3, dtype=F64))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_parametrizations(kind):
    theirs, ours = pair(kind, 3, 5)
    theirs, ours = theirs.double(), ours.double()

    class Masked(nn.Module):
        def forward(self, w):
            return w * torch.tril(torch.ones_like(w))

    for m in (theirs, ours):
        parametrizations.weight_norm(m, "weight_ih_l0")
        parametrize.register_parametrization(m, "weight_hh_l0", Masked())
    assert isinstance(ours, lstmfast.modules._RecurrentBase) and isinstance(ours, getattr(nn, kind))
    assert_same_run(theirs, ours, torch.randn(6, 2, 3, dtype=F64))
    # the weights that run are the parametrized ones
    plain = getattr(lstmfast, kind)(3, 5).double()
    with torch.no_grad():
        for name, p in plain.named_parameters():
            p.copy_(getattr(ours, name))
    x = torch.randn(6, 2, 3, dtype=F64)
    torch.testing.assert_close(plain(x)[0], ours(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_stateful_parametrization_advances_as_under_torch_nn(kind):
    """spectral_norm's power iteration advances each time the weight is read in training mode, and
    torch.nn's forward reads a parametrized weight more than once: lstmfast reads its weights through
    torch.nn's own path, so outputs, gradients and the power-iteration state stay torch.nn's step
    after step."""
    theirs, ours = pair(kind, 3, 5, num_layers=2, bidirectional=True)
    theirs, ours = theirs.double(), ours.double()
    for m in (theirs, ours):
        parametrizations.spectral_norm(m, "weight_hh_l0")
        parametrizations.spectral_norm(m, "weight_ih_l1_reverse")
    ours.load_state_dict(theirs.state_dict())  # the same random power-iteration start
    torch.manual_seed(1)
    for _ in range(3):
        assert_same_run(theirs, ours, torch.randn(6, 2, 3, dtype=F64))
        for name, buffer in theirs.named_buffers():
            torch.testing.assert_close(ours.get_buffer(name), buffer, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_forward_never_flattens_the_parameters(kind, monkeypatch):
    """When weights change (functional_call under vmap / grad, a parametrization), lstmfast re-reads
    them as torch.nn does but without flatten_parameters(): on CUDA that builds cuDNN's flat buffer,
    which lstmfast does not use, and asks every weight for a data pointer, which torch.func's wrapped
    tensors do not have."""
    _, ours = pair(kind, 3, 5, bidirectional=True)

    def refuse(self):
        raise AssertionError("flatten_parameters called from forward")

    monkeypatch.setattr(type(ours), "flatten_parameters", refuse)
    x = torch.randn(6, 2, 3)
    params = {k: v.detach() for k, v in ours.named_parameters()}
    stacked = {k: torch.stack([v, 2 * v]) for k, v in params.items()}
    out = torch.func.vmap(lambda p: torch.func.functional_call(ours, p, (x,))[0])(stacked)
    assert out.shape == (2, 6, 2, 10)
    torch.func.grad(lambda p: torch.func.functional_call(ours, p, (x,))[0].sum())(params)
    parametrizations.weight_norm(ours, "weight_hh_l0")
    ours(x)[0].sum().backward()


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("name", ["weight_ih_l0", "weight_hh_l0", "bias_hh_l1", "weight_ih_l1_reverse"])
def test_a_parametrization_runs_as_often_as_under_torch_nn(kind, name):
    class Counted(nn.Module):
        calls = 0

        def forward(self, w):
            self.calls += 1
            return w * 1.0

    counts = []
    for m in pair(kind, 3, 5, num_layers=2, bidirectional=True):
        counted = Counted()
        parametrize.register_parametrization(m, name, counted)
        runs = []
        for mode in ("train", "no_grad", "eval"):
            counted.calls = 0
            m.train(mode == "train")
            with torch.set_grad_enabled(mode == "train"):
                m(torch.randn(4, 2, 3))
            runs.append(counted.calls)
        counts.append(runs)
    assert counts[1] == counts[0] and min(counts[0]) >= 1


@pytest.mark.parametrize("dtype,c0_dtype", [(F64, torch.float32), (F64, torch.float16), (F64, torch.bfloat16),
                                             (F64, torch.int64), (torch.float32, torch.float16),
                                             (torch.float32, torch.bfloat16), (torch.float32, torch.int64)])
@pytest.mark.filterwarnings("ignore:TF32 acceleration")  # (torch's, on restoring the oneDNN flags)
def test_lstm_promotes_a_lower_precision_or_integer_c0_as_torch_nn_does(dtype, c0_dtype):
    """torch.nn's native LSTM path (always for float64; float32 with oneDNN off) promotes such a c_0."""
    theirs, ours = pair("LSTM", 3, 5, num_layers=2)
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    x = torch.randn(6, 2, 3, dtype=dtype)
    h0 = torch.randn(2, 2, 5, dtype=dtype)
    with torch.backends.mkldnn.flags(enabled=False):
        _check_c0_promotion(theirs, ours, x, h0, c0_dtype, dtype)


@pytest.mark.parametrize("c0_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_float64_lstm_under_cpu_autocast_promotes_c0_as_torch_nn_does(autocast_dtype, c0_dtype):
    """Autocast leaves a float64 layer in float64, and torch.nn promotes its c_0 as it is (not rounded
    to the autocast dtype first)."""
    theirs, ours = pair("LSTM", 3, 5, num_layers=2)
    theirs, ours = theirs.to(F64), ours.to(F64)
    x = torch.randn(6, 2, 3, dtype=F64)
    h0 = torch.randn(2, 2, 5, dtype=F64)
    _check_c0_promotion(theirs, ours, x, h0, c0_dtype, F64,
                        forward_context=lambda: torch.autocast("cpu", dtype=autocast_dtype))


def _check_c0_promotion(theirs, ours, x, h0, c0_dtype, dtype, forward_context=contextlib.nullcontext):
    integer = not c0_dtype.is_floating_point
    c0s = [(3 * torch.randn(2, 2, 5)).to(c0_dtype) for _ in range(2)]
    c0s[1].copy_(c0s[0])
    if not integer:
        c0s = [c0.requires_grad_() for c0 in c0s]
    with forward_context():
        results = [m(x, (h0, c0)) for m, c0 in zip((theirs, ours), c0s)]
    (y0, (h_0, c_0)), (y1, (h_1, c_1)) = results
    assert [t.dtype for t in (y1, h_1, c_1)] == [t.dtype for t in (y0, h_0, c_0)] == [dtype] * 3
    for a, e in ((y1, y0), (h_1, h_0), (c_1, c_0)):
        torch.testing.assert_close(a, e, **TOLERANCES[dtype])
    if not integer:
        for (y, (h, c)), c0 in zip(results, c0s):
            (y.sum() + c.sum()).backward()
        assert c0s[1].grad.dtype == c0s[0].grad.dtype == c0_dtype
        # (each side's float gradient rounded to c0's dtype: at most one unit in its last place apart)
        tol = TOLERANCES.get(c0_dtype, dict(rtol=2 ** -7, atol=2 ** -7))
        torch.testing.assert_close(c0s[1].grad.float(), c0s[0].grad.float(), **tol)
    with pytest.raises(RuntimeError), forward_context():  # a lower-precision h0 torch.nn refuses, as lstmfast
        theirs(x, (h0.to(c0_dtype), c0s[0]))
    with pytest.raises(RuntimeError), forward_context():
        ours(x, (h0.to(c0_dtype), c0s[1]))


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
def test_an_integer_c0_under_cpu_autocast_is_taken_as_torch_nn_takes_it(autocast_dtype, packed):
    """Autocast casts no integer tensor: torch.nn's LSTM widens such a c_0 there (on the paths that run;
    its oneDNN path refuses a padded one); lstmfast widens it too and runs in the autocast dtype."""
    theirs, ours = pair("LSTM", 3, 4)
    x = torch.randn(5, 2, 3)
    hx = (torch.randn(1, 2, 4), torch.randint(-2, 3, (1, 2, 4)))
    if packed:
        x = torch.nn.utils.rnn.pack_padded_sequence(x, [5, 3])
    with torch.autocast("cpu", dtype=autocast_dtype):
        expected, actual = _outcome(theirs, x, hx), _outcome(ours, x, hx)
    assert actual[0] is None
    out = actual[1][0].data if packed else actual[1][0]
    assert out.dtype == autocast_dtype
    if expected[0] is None:
        reference = expected[1][0].data if packed else expected[1][0]
        assert reference.dtype == out.dtype
        torch.testing.assert_close(out.float(), reference.float(), rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=autocast_dtype):  # the same c_0 as a float: the same results
        again = ours(x, (hx[0], hx[1].float()))[0]
    assert torch.equal(again.data if packed else again, out)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("case", ["float64 input", "wrong input size", "integer input"])
def test_hx_dimensions_are_checked_before_the_input_as_torch_nn_does(kind, case):
    """With both a 2-D hx for a batched input and a wrong input dtype or size, torch.nn reports hx's
    dimensions first (a RuntimeError, where the input's dtype alone is a ValueError)."""
    theirs, ours = pair(kind, 3, 4)
    x = {"float64 input": torch.randn(5, 2, 3, dtype=F64), "wrong input size": torch.randn(5, 2, 4),
         "integer input": torch.randint(0, 3, (5, 2, 3))}[case]
    hx = (torch.randn(1, 4), torch.randn(1, 4)) if kind == "LSTM" else torch.randn(1, 4)
    expected = _outcome(theirs, x, hx)[0]
    assert expected is RuntimeError
    with pytest.raises(expected, match="should also be 3-D"):
        ours(x, hx)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("sort", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("hx_shape,data_dtype", [((1, 4), torch.float32), ((4,), torch.float32),
                                                  ((1, 1, 2, 4), torch.float32), ((1, 4), F64),
                                                  ((1, 3, 4), torch.float32), ((2, 2, 4), torch.float32)],
                         ids=["2D", "1D", "4D", "2D-float64-data", "batch-3", "layers-2"])
def test_a_packed_batch_s_hx_is_checked_as_torch_nn_does(kind, sort, hx_shape, data_dtype):
    """With a PackedSequence, torch.nn's GRU and RNN check no hx dimensions up front: they permute hx's
    rows (index_select(1), for an unsorted batch), then check the input, then the permuted state's
    size. The same exception type and message, or the same results where torch.nn runs (an unsorted
    batch of 2 given a 3-row hx takes the rows its sorted_indices pick). torch.nn's LSTM checks no
    packed hx at all and fails inside its kernel (torch 2.13: an IndexError for a 2-D hx, a crash of
    the process for a 4-D one), so it is only run where the permuted states have the right size;
    elsewhere lstmfast's LSTM says which size it expected."""
    theirs, ours = pair(kind, 3, 4)
    seqs = [torch.randn(2, 3, dtype=data_dtype), torch.randn(3, 3, dtype=data_dtype)]
    if sort:
        seqs = seqs[::-1]
    packed = nn.utils.rnn.pack_sequence(seqs, enforce_sorted=sort)
    states = [torch.randn(hx_shape) for _ in range(2 if kind == "LSTM" else 1)]
    hx = tuple(states) if kind == "LSTM" else states[0]
    if kind == "LSTM":
        try:  # torch.nn's first step, which lstmfast takes too
            permuted = states[0] if sort else states[0].index_select(1, packed.sorted_indices)
        except (IndexError, RuntimeError) as error:
            with pytest.raises(type(error)) as got:
                ours(packed, hx)
            assert str(got.value) == str(error)
            return
        if data_dtype != torch.float32:
            with pytest.raises(RuntimeError, match="RNN input dtype"):
                ours(packed, hx)
            return
        if permuted.shape != (1, 2, 4):
            with pytest.raises(RuntimeError) as got:
                ours(packed, hx)
            assert str(got.value) == f"Expected hidden[0] size (1, 2, 4), got {list(permuted.shape)}"
            return
    outcomes = []
    for module in (theirs, ours):
        try:
            out, state = module(packed, hx)
            outcomes.append((None, [out.data] + list(state if isinstance(state, tuple) else (state,))))
        except Exception as error:  # noqa: BLE001 - type and message are what is compared
            outcomes.append((type(error), str(error)))
    (their_error, their_result), (our_error, our_result) = outcomes
    assert our_error is their_error, (their_result, our_result)
    if their_error is None:
        for a, b in zip(our_result, their_result):
            torch.testing.assert_close(a, b, **TOLERANCES[torch.float32])
    else:
        assert our_result == their_result


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_pruning(kind):
    theirs, ours = pair(kind, 3, 5, bidirectional=True)
    theirs, ours = theirs.double(), ours.double()
    for m in (theirs, ours):
        prune.l1_unstructured(m, "weight_ih_l0_reverse", amount=0.5)
        prune.random_unstructured(m, "weight_hh_l0", amount=0.3)
    assert torch.equal(ours.weight_ih_l0_reverse_mask, theirs.weight_ih_l0_reverse_mask)
    ours.weight_hh_l0_mask.copy_(theirs.weight_hh_l0_mask)  # random masks: take torch.nn's
    theirs(torch.zeros(1, 1, 3, dtype=F64)), ours(torch.zeros(1, 1, 3, dtype=F64))  # recompute weights
    assert_same_run(theirs, ours, torch.randn(6, 2, 3, dtype=F64))
    assert ours.weight_ih_l0_reverse_orig.grad[ours.weight_ih_l0_reverse_mask == 0].abs().sum() == 0


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_functional_call_uses_the_given_weights(kind):
    theirs, ours = pair(kind, 3, 5, num_layers=2)
    torch.manual_seed(1)
    swapped = {name: torch.randn_like(p) for name, p in theirs.named_parameters()}
    x = torch.randn(6, 2, 3)
    expected = torch.func.functional_call(theirs, swapped, (x,))
    got = torch.func.functional_call(ours, swapped, (x,))
    torch.testing.assert_close(got[0], expected[0], **TOLERANCES[torch.float32])
    torch.testing.assert_close(ours(x)[0], theirs(x)[0], **TOLERANCES[torch.float32])  # restored


# ---------------------------------------------------------------------- what users do to a layer


def _outcome(module, *args):
    """(exception type, None) if the call raises, else (None, the call's results)."""
    try:
        return None, module(*args)
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return type(error), None


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("name", ["weight_hh_l0", "bias_ih_l1", "weight_ih_l1_reverse"])
def test_a_weight_on_another_device_is_refused(kind, name):
    """A weight moved to another device (here meta) than the input: torch.nn refuses the call; so does
    lstmfast (the op's Meta kernel, which a meta tensor among CPU ones selects, returned uninitialized
    memory); and an hx on another device, in torch.nn's words."""
    for module in pair(kind, 3, 4, num_layers=2, bidirectional=True):
        setattr(module, name, nn.Parameter(torch.empty_like(getattr(module, name), device="meta")))
        with pytest.raises(RuntimeError, match=r"device"):
            module(torch.randn(5, 2, 3))
    theirs, ours = pair(kind, 3, 4)
    x = torch.randn(5, 2, 3)
    hx = torch.zeros(1, 2, 4, device="meta")
    hx = (torch.zeros(1, 2, 4), hx) if kind == "LSTM" else hx
    for module in (theirs, ours):
        with pytest.raises(RuntimeError, match=r"Input and hidden tensors are not at the same device, found "
                                               r"input tensor at cpu and hidden tensor at meta"):
            module(x, hx)
    with pytest.raises(RuntimeError, match=r"lstmfast.\w+_forward: expected w_hh on device cpu \(the device of "
                                           r"input\), but got meta"):
        getattr(lstmfast.functional, kind.lower())(x, ours.weight_ih_l0, ours.weight_hh_l0.to("meta"))


def test_rnn_runs_the_nonlinearity_its_mode_names():
    """torch.nn's RNN runs what `mode` says; setting `nonlinearity` after construction changes nothing
    there (nor in lstmfast), and an unknown mode is refused with torch.nn's AssertionError."""
    theirs, ours = pair("RNN", 3, 4, nonlinearity="tanh")
    for module in (theirs, ours):
        module.nonlinearity = "relu"
    assert_same_run(theirs.double(), ours.double(), torch.randn(5, 2, 3, dtype=F64))
    for module in (theirs, ours):
        module.mode = "RNN_RELU"
    assert_same_run(theirs, ours, torch.randn(5, 2, 3, dtype=F64))
    assert type(lstmfast.unconvert(copy.deepcopy(ours))).__name__ == "RNN"
    assert ours.to_torch().mode == "RNN_RELU"
    for module in (theirs, ours):
        module.mode = "RNN_SIGMOID"
        with pytest.raises(AssertionError, match="mode must be RNN_TANH or RNN_RELU, got RNN_SIGMOID"):
            module(torch.randn(5, 2, 3, dtype=F64))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_numpy_integer_sizes_as_torch_nn_takes_them(kind):
    """torch.nn takes num_layers (and an LSTM's proj_size) as any integer, a numpy one included (it only
    computes with them); input_size and hidden_size must be ints in both."""
    np = pytest.importorskip("numpy")
    options = dict(num_layers=np.int64(2), **({"proj_size": np.int32(2)} if kind == "LSTM" else {}))
    theirs, ours = pair(kind, 3, 4, **options)
    assert_same_run(theirs.double(), ours.double(), torch.randn(5, 2, 3, dtype=F64))
    for cls in (getattr(nn, kind), getattr(lstmfast, kind)):
        with pytest.raises(TypeError, match="hidden_size should be of type int, got: int64"):
            cls(3, np.int64(4))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("built,change,error", [
    ({}, ("bias_hh_l0", None), TypeError), ({}, ("weight_hh_l0", None), TypeError),
    ({}, ("weight_ih_l0", None), AttributeError), ({}, ("num_layers", 2), RuntimeError),
    ({}, ("bidirectional", True), RuntimeError), ({}, ("hidden_size", 5), RuntimeError),
    (dict(num_layers=2), ("num_layers", 1), RuntimeError),
    (dict(bidirectional=True), ("bidirectional", False), RuntimeError), ({}, ("bias", False), RuntimeError),
], ids=str)
def test_a_weight_set_to_none_or_options_changed_without_weights_are_refused(kind, built, change, error):
    """torch.nn's native path (float64 here) fails on these (a TypeError for a None weight, a
    RuntimeError from its kernels; its float32 oneDNN LSTM runs them, with the weights that are left
    or an output of the new hidden size read from weights of the old one); lstmfast says what is
    wrong, in every dtype. It ran them with a zero bias or the old options, or, with fewer layers or
    directions or no bias set afterwards, with the weights that were left."""
    theirs, ours = pair(kind, 3, 4, **built)
    for module in (theirs, ours):
        setattr(module, *change)
    assert _outcome(theirs.double(), torch.randn(5, 2, 3, dtype=F64))[0] is error
    assert _outcome(ours, torch.randn(5, 2, 3))[0] is error
    assert _outcome(ours.double(), torch.randn(5, 2, 3, dtype=F64))[0] is error


def test_fx_symbolic_trace_keeps_the_layers_as_leaves():
    """torch.fx keeps torch.nn's RNN layers as leaves (call_module nodes, their forward untraced): the
    same graph for a model holding lstmfast's layers, which run when the traced module is called."""

    class Head(nn.Module):
        def __init__(self, layer):
            super().__init__()
            self.rnn, self.fc = layer, nn.Linear(4, 2)

        def forward(self, x, hx):
            out, state = self.rnn(x, hx)
            return self.fc(out), state

    for kind in ("LSTM", "GRU", "RNN"):
        theirs, ours = (Head(m) for m in pair(kind, 3, 4, num_layers=2))
        ours.fc.load_state_dict(theirs.fc.state_dict())
        graphs = [torch.fx.symbolic_trace(m) for m in (theirs, ours)]
        assert [(n.op, n.target) for n in graphs[1].graph.nodes] == [(n.op, n.target) for n in graphs[0].graph.nodes]
        assert ("call_module", "rnn") in [(n.op, n.target) for n in graphs[1].graph.nodes]
        x = torch.randn(5, 2, 3)
        hx = torch.randn(2, 2, 4)
        hx = (hx, torch.randn(2, 2, 4)) if kind == "LSTM" else hx
        torch.testing.assert_close(graphs[1](x, hx), theirs(x, hx), **TOLERANCES[torch.float32])
    with pytest.raises(TypeError, match="cannot be the root of torch.fx.symbolic_trace"):
        torch.fx.symbolic_trace(lstmfast.LSTM(3, 4))


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_batch_first_output_under_no_grad_is_a_view_where_torch_nn_s_is(kind):
    """torch.nn's GRU and RNN return a batch_first output of their own under no_grad (its LSTM a view):
    an op that needs grad may then modify it in place (a no-grad view it may not). Same strides."""
    results = []
    for module in pair(kind, 3, 4, batch_first=True):
        with torch.no_grad():
            out = module(torch.randn(2, 5, 3))[0]
        results.append((out._is_view(), out.stride(), _outcome(out.mul_, torch.ones(4, requires_grad=True))[0]))
    assert results[1] == results[0]


@pytest.mark.parametrize("kind,options", [("LSTM", {}), ("LSTM", dict(proj_size=2, num_layers=2, bidirectional=True)),
                                          ("GRU", dict(bidirectional=True)), ("RNN", dict(num_layers=2))], ids=str)
def test_flop_counter_counts_the_layers_as_torch_nn_s(kind, options):
    """torch.utils.flop_counter.FlopCounterMode counts the products of torch.nn's native path one by
    one; lstmfast's ops have formulas for the same products: the forward's count equals torch.nn's, a
    training step's is within the few products torch.nn skips (dL/dh_0 without h_0)."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for module in pair(kind, 3, 4, **options):
        module.double()
        x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
        with FlopCounterMode(display=False) as forward:
            with torch.no_grad():
                module(x)
        with FlopCounterMode(display=False) as step:
            module(x)[0].sum().backward()
        counts.append((forward.get_total_flops(), step.get_total_flops()))
    (their_forward, their_step), (forward, step) = counts
    assert forward == their_forward > 0
    assert their_step <= step <= 1.1 * their_step
    if kind == "LSTM" and not options:  # 2 FLOPs per multiply-add, N = T * B rows, 4H gates
        n, gates, inputs, hidden = 10, 16, 3, 4
        assert forward == 2 * n * gates * (inputs + hidden)
        assert step == forward + 2 * n * gates * hidden + 2 * n * gates * inputs + 2 * n * gates * (inputs + hidden)


@pytest.mark.parametrize("kind,options", [("LSTM", dict(num_layers=2, bidirectional=True)), ("LSTM", dict(proj_size=2)),
                                          ("GRU", dict(num_layers=2, batch_first=True)),
                                          ("RNN", dict(bidirectional=True))], ids=str)
def test_complex_layers_run_as_torch_nn_s(kind, options):
    """torch.nn runs complex layers on its native path; lstmfast runs them through lstmfast.reference
    (the same equations in plain PyTorch ops): torch.nn's outputs and gradients, with or without hx
    and unbatched (a relu RNN fails in both: torch has no complex relu). grad_clip, lstmfast's own, is
    refused there."""
    torch.manual_seed(0)
    theirs = getattr(nn, kind)(3, 4, dtype=torch.complex128, **options)
    ours = getattr(lstmfast, kind)(3, 4, dtype=torch.complex128, **options)
    ours.load_state_dict(theirs.state_dict())
    layers = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    for batch in [(2,), ()]:
        x = torch.randn(*batch, 5, 3, dtype=torch.complex128)
        x = x if options.get("batch_first") or not batch else x.transpose(0, 1)
        h0 = torch.randn(layers, *batch, options.get("proj_size") or 4, dtype=torch.complex128)
        hx = (h0, torch.randn(layers, *batch, 4, dtype=torch.complex128)) if kind == "LSTM" else h0
        for state in (None, hx):
            results = []
            for module in (theirs, ours):
                leaf = x.clone().requires_grad_()
                out, final = module(leaf, state)
                finals = list(final) if isinstance(final, tuple) else [final]
                loss = sum((t.abs() ** 2).sum() for t in [out] + finals)
                results.append([out] + finals + list(torch.autograd.grad(loss, [leaf] + list(module.parameters()))))
            for a, e in zip(*reversed(results)):
                torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)
    if kind == "RNN":
        for cls in (nn.RNN, lstmfast.RNN):
            with pytest.raises(NotImplementedError):
                cls(3, 4, nonlinearity="relu", dtype=torch.complex128)(torch.randn(5, 2, 3, dtype=torch.complex128))
    clipped = getattr(lstmfast, kind)(3, 4, dtype=torch.complex128, grad_clip=1.0)
    with pytest.raises(RuntimeError, match="grad_clip and gradient-norm diagnostics are not defined for complex"):
        clipped(torch.randn(5, 2, 3, dtype=torch.complex128))


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("bad", ["h0 batch", "h0 broadcast", "w_hh columns", "bias broadcast", "batch_sizes float",
                                 "batch_sizes zero", "2-D input unpacked"])
def test_complex_functional_layers_check_their_arguments_as_the_ops_do(cell, bad):
    """The complex path runs lstmfast.reference, whose broadcasting would take some wrong shapes (an h0
    of one row for every sequence, a (1, G) bias) and return an answer: it is refused as the ops refuse
    real tensors, naming the argument."""
    from lstmfast import functional
    cd, gates = torch.complex128, {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    x, w_ih = torch.randn(4, 3, 2, dtype=cd), torch.randn(gates * 5, 2, dtype=cd)
    w_hh = torch.randn(gates * 5, 5, dtype=cd)
    kwargs, args = {}, [x, w_ih, w_hh]
    if bad == "h0 batch":
        kwargs["h0"], match = torch.randn(4, 5, dtype=cd), r"expected h0 of shape \[3, 5\], but got \[4, 5\]"
    elif bad == "h0 broadcast":
        kwargs["h0"], match = torch.randn(1, 5, dtype=cd), r"expected h0 of shape \[3, 5\], but got \[1, 5\]"
    elif bad == "w_hh columns":
        args[2] = torch.randn(gates * 5, 6, dtype=cd)
        match = rf"expected w_hh of shape \[{gates * 5}, 5\], but got \[{gates * 5}, 6\]"
    elif bad == "bias broadcast":
        args.append(torch.randn(1, gates * 5, dtype=cd))
        match = rf"expected b_ih of shape \[{gates * 5}\], but got \[1, {gates * 5}\]"
    elif bad.startswith("batch_sizes"):
        args[0] = x.reshape(12, 2)
        kwargs["batch_sizes"] = torch.tensor([4.0, 4, 4]) if bad == "batch_sizes float" else torch.tensor([12, 0])
        match = "expected batch_sizes to be a non-empty, non-increasing 1-D int64 tensor"
    else:
        args[0], match = x.reshape(12, 2), r"expected input of shape \(T, B, I\), or \(N, I\) with batch_sizes"
    with pytest.raises(RuntimeError, match=f"lstmfast.{cell}: {match}"):
        getattr(functional, cell)(*args, **kwargs)


# ---------------------------------------------------------------------- convert / unconvert


class Twice(nn.Module):
    """One LSTM used twice, an RNN, a user subclass of nn.LSTM, and a GRU (bidirectional)."""

    class MyLSTM(nn.LSTM):
        pass

    def __init__(self):
        super().__init__()
        self.encoder = nn.LSTM(4, 4, num_layers=2)
        self.decoder = self.encoder  # the same layer, referenced twice
        self.rnn = nn.RNN(4, 3, nonlinearity="relu")
        self.custom = Twice.MyLSTM(3, 3)
        self.gru = nn.GRU(3, 3, bidirectional=True)

    def forward(self, x):
        y, _ = self.decoder(self.encoder(x)[0])
        y, _ = self.rnn(y)
        y, _ = self.custom(y)
        return self.gru(y)[0]


def test_convert_keeps_hooks_attributes_sharing_and_parametrizations(capsys):
    torch.manual_seed(0)
    model = Twice().double()
    model.encoder.tag = "mine"
    parametrize.register_parametrization(model.rnn, "weight_hh_l0", nn.Tanh())
    prune.l1_unstructured(model.encoder, "weight_ih_l1", amount=0.5)
    model.rnn.eval()
    calls = []
    model.encoder.register_forward_pre_hook(lambda m, args: calls.append("pre"))
    model.encoder.register_forward_hook(lambda m, args, out: calls.append("forward"))
    model.rnn.register_full_backward_hook(lambda m, gin, gout: calls.append("backward"))
    model.gru.register_forward_hook(lambda m, args, out: calls.append("gru forward"))
    model.encoder._register_state_dict_hook(lambda m, sd, prefix, local: calls.append("state_dict"))
    x = torch.randn(5, 2, 4, dtype=F64)
    expected = model(x)
    expected.sum().backward()
    model.state_dict()
    torch_calls = list(calls)
    assert set(torch_calls) == {"pre", "forward", "backward", "state_dict", "gru forward"}
    expected_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    params = list(model.parameters())

    with pytest.warns(UserWarning, match=r"custom \(Twice.MyLSTM: a subclass of torch.nn.modules.rnn.LSTM"):
        assert lstmfast.convert(model, verbose=True) is model
    printed = capsys.readouterr().out
    assert "changed 3, left 1" in printed and "encoder (LSTM -> lstmfast.modules.LSTM)" in printed
    assert "gru (GRU -> lstmfast.modules.GRU)" in printed

    assert model.decoder is model.encoder and isinstance(model.encoder, lstmfast.LSTM)
    assert isinstance(model.encoder, nn.LSTM) and isinstance(model.rnn, lstmfast.RNN)
    assert type(model.custom) is Twice.MyLSTM and type(model.gru) is lstmfast.GRU
    assert isinstance(model.gru, nn.GRU) and model.gru.grad_clip is None
    assert model.encoder.tag == "mine" and not model.rnn.training and model.encoder.training
    assert parametrize.is_parametrized(model.rnn, "weight_hh_l0")
    assert hasattr(model.encoder, "weight_ih_l1_mask")
    assert all(a is b for a, b in zip(model.parameters(), params))

    calls.clear()
    model.zero_grad()
    got = model(x)
    got.sum().backward()
    model.state_dict()
    assert calls == torch_calls
    torch.testing.assert_close(got, expected, **TOLERANCES[F64])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[n], **TOLERANCES[F64])

    lstmfast.unconvert(model)
    assert type(model.encoder) is nn.LSTM and model.decoder is model.encoder
    assert type(model.rnn).__bases__ == (nn.RNN,) and parametrize.is_parametrized(model.rnn)
    assert not hasattr(model.encoder, "grad_clip")
    assert type(model.gru) is nn.GRU and not hasattr(model.gru, "grad_clip")
    torch.testing.assert_close(model(x), expected, **TOLERANCES[F64])
    parametrize.remove_parametrizations(model.rnn, "weight_hh_l0")
    assert type(model.rnn) is nn.RNN


def test_convert_a_layer_itself_and_a_parametrized_one():
    layer = nn.LSTM(3, 4)
    parametrizations.weight_norm(layer, "weight_hh_l0")
    assert lstmfast.convert(layer) is layer
    assert isinstance(layer, lstmfast.LSTM) and type(layer).__name__ == "ParametrizedLSTM"
    parametrize.remove_parametrizations(layer, "weight_hh_l0")
    assert type(layer) is lstmfast.LSTM


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_convert_old_style_weight_norm_and_pruned_layers(kind):
    torch.manual_seed(0)
    layer = getattr(nn, kind)(3, 4, num_layers=2).double()
    torch.nn.utils.weight_norm(layer, "weight_hh_l0")
    prune.l1_unstructured(layer, "weight_ih_l1", amount=0.5)
    x = torch.randn(5, 2, 3, dtype=F64)
    expected = layer(x)[0]
    assert lstmfast.convert(layer) is layer and isinstance(layer, getattr(lstmfast, kind))
    torch.testing.assert_close(layer(x)[0], expected, **TOLERANCES[F64])
    layer(x)[0].sum().backward()
    assert layer.weight_hh_l0_g.grad is not None and layer.weight_ih_l1_orig.grad is not None


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_from_torch_and_to_torch_refuse_hook_computed_weights(kind):
    """from_torch / to_torch share the Parameters; a weight that old-style weight_norm or pruning
    computes in a hook is none: a TypeError that names convert / unconvert, which keep them."""
    layer = getattr(nn, kind)(3, 4)
    torch.nn.utils.weight_norm(layer, "weight_hh_l0")
    with pytest.raises(TypeError, match=r"from_torch: the layer's weight_hh_l0 is not a Parameter.*lstmfast\.convert"):
        getattr(lstmfast, kind).from_torch(layer)
    ours = getattr(lstmfast, kind)(3, 4)
    prune.l1_unstructured(ours, "weight_ih_l0", amount=0.5)
    with pytest.raises(TypeError, match=r"to_torch: the layer's weight_ih_l0 is not a Parameter.*lstmfast\.unconvert"):
        ours.to_torch()


class _AsLstmfast(pickle.Unpickler):
    """Unpickles torch.nn's recurrent layers as lstmfast's (as a pickled model's classes are remapped)."""

    def find_class(self, module, name):
        if module == "torch.nn.modules.rnn" and name in ("LSTM", "GRU", "RNN"):
            return getattr(lstmfast, name)
        return super().find_class(module, name)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_a_torch_nn_pickle_unpickled_as_lstmfast_runs_like_torch_nn(kind):
    """A pickle of torch.nn's layer has none of lstmfast's extras: unpickled into lstmfast's class it
    gets their defaults (no grad_clip, forget_bias 0) and runs as the torch.nn layer does."""
    import io

    torch.manual_seed(0)
    theirs = getattr(nn, kind)(3, 4, num_layers=2).double()
    ours = _AsLstmfast(io.BytesIO(pickle.dumps(theirs))).load()
    assert type(ours) is getattr(lstmfast, kind) and ours.grad_clip is None
    assert repr(ours) == repr(theirs)
    x = torch.randn(5, 2, 3, dtype=F64, requires_grad=True)
    expected = torch.autograd.grad(theirs(x)[0].pow(2).sum(), [x, *theirs.parameters()])
    actual = torch.autograd.grad(ours(x)[0].pow(2).sum(), [x, *ours.parameters()])
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e, **TOLERANCES[F64])


def test_convert_leaves_torchscript_modules_with_a_warning():
    model = nn.Sequential(torch.jit.script(nn.LSTM(3, 4)), nn.Linear(4, 4))
    with pytest.warns(UserWarning, match=r"0 \(TorchScript module holding LSTM.*cannot be scripted: convert the "
                                         r"model unscripted and deploy it with torch.jit.trace"):
        lstmfast.convert(model)
    assert isinstance(model[0], torch.jit.ScriptModule)
    with pytest.raises(RuntimeError, match="cannot be compiled by torch.jit.script"):  # (why that advice)
        torch.jit.script(lstmfast.convert(nn.Sequential(nn.LSTM(3, 4))))
    scripted = nn.Sequential(torch.jit.script(nn.LSTM(3, 4)))
    with pytest.warns(UserWarning, match=r"unconvert the model before torch.jit.script"):
        lstmfast.unconvert(scripted)


def test_to_torch_warns_when_grad_clip_is_dropped():
    layer = lstmfast.GRU(3, 4, grad_clip=0.5)
    with pytest.warns(UserWarning, match=r"to_torch: grad_clip=0.5, which torch.nn.GRU does not have, is dropped"):
        assert type(layer.to_torch()) is nn.GRU
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lstmfast.GRU(3, 4).to_torch()


@pytest.mark.parametrize("value,bias,message", [
    (float("nan"), True, "forget_bias should be a finite number, got nan"),
    (float("inf"), True, "forget_bias should be a finite number, got inf"),
    (1.0, False, r"forget_bias=1.0 initializes bias_ih's forget-gate slice, but the layer has bias=False"),
])
def test_forget_bias_that_would_spoil_the_layer_is_refused(value, bias, message):
    with pytest.raises(ValueError, match=message):
        lstmfast.LSTM(2, 3, bias=bias, forget_bias=value)
    assert lstmfast.LSTM(2, 3, bias=False, forget_bias=0.0).forget_bias == 0.0


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_unconvert_warns_when_grad_clip_is_dropped(kind):
    layer = getattr(lstmfast, kind)(3, 4, grad_clip=1.0)
    with pytest.warns(UserWarning, match="had grad_clip=1.0"):
        lstmfast.unconvert(layer)
    assert type(layer) is getattr(nn, kind)


@pytest.mark.slow
def test_compile_leaves_torch_nn_layers_as_torch_has_them():
    """lstmfast's layers compile with fullgraph=True; torch.nn's own still get Dynamo's RNN graph break
    (lstmfast does not switch on torch._dynamo.config.allow_rnn for them)."""
    model = nn.Sequential()
    model.add_module("rnn", lstmfast.RNN(3, 4))
    x = torch.randn(5, 2, 3)
    compiled = torch.compile(lambda x: model(x)[0].sum(), fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x)[0].sum(), **TOLERANCES[torch.float32])
    from torch._dynamo import config
    assert config.allow_rnn is False
    theirs = nn.RNN(3, 4)
    with pytest.raises(Exception, match="RNN, GRU, or LSTM"):
        torch.compile(lambda x: theirs(x)[0].sum(), fullgraph=True)(x)


NESTED = {"regular": [(3, 4)] * 3, "regular unbatched": [(4,)] * 3, "ragged steps": [(3, 4), (2, 4)],
          "ragged features": [(3, 4), (3, 5)], "ragged unbatched": [(4,), (3,)], "wrong input size": [(3, 3)] * 2}


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("case", sorted(NESTED))
@pytest.mark.parametrize("wrong_hx", [False, True])
def test_a_nested_tensor_input_runs_or_fails_as_under_torch_nn(kind, batch_first, case, wrong_hx):
    """torch.nn's native path (oneDNN's LSTM takes no nested tensor) runs a regular nested tensor as the
    padded tensor its components stack to, the gradient reaching the components, and fails on any other
    in the first op it reaches, before or after checking hx; lstmfast does the same."""
    theirs, ours = (m.double() for m in pair(kind, 4, 5, 2, batch_first=batch_first))
    torch.manual_seed(1)
    components = [torch.randn(shape, dtype=F64) for shape in NESTED[case]]
    hx = torch.zeros(2, 7, 5, dtype=F64) if wrong_hx else None  # 3-D for unbatched input, else batch 7
    if hx is not None and kind == "LSTM":
        hx = (hx, hx)
    results = []
    for m in (theirs, ours):
        x = torch.nested.nested_tensor(components, requires_grad=True)
        try:
            with torch.backends.mkldnn.flags(enabled=False), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (nested tensors' prototype warning)
                y, state = m(x, hx)
        except (RuntimeError, ValueError) as e:
            results.append((type(e), str(e)))
            continue
        assert not y.is_nested
        (y.square().sum() + state[0].sum() if kind == "LSTM" else y.square().sum() + state.sum()).backward()
        results.append((y, list(x.grad.unbind()), [p.grad for p in m.parameters()]))
    runs = case.startswith("regular") and not batch_first and not wrong_hx
    assert isinstance(results[0][0], torch.Tensor) == runs
    if not runs:
        assert results[1] == results[0]
        return
    for theirs_, ours_ in zip(*(([y], grads, params) for y, grads, params in results)):
        torch.testing.assert_close(ours_, theirs_, **TOLERANCES[F64])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_a_jagged_nested_tensor_is_refused_clearly(kind):
    x = torch.nested.nested_tensor([torch.randn(3, 4), torch.randn(2, 4)], layout=torch.jagged)
    with pytest.raises(RuntimeError):
        getattr(nn, kind)(4, 5)(x)  # (torch.nn fails inside its kernels)
    with pytest.raises(RuntimeError, match=f"{kind}: a nested tensor of layout torch.jagged is not supported"):
        getattr(lstmfast, kind)(4, 5)(x)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("rows,batch_sizes", [(7, [3, 2]), (5, [3, 2, 0]), (5, [3, 2, 0, 0]), (6, [3, 2, 0]),
                                              (5, [5]), (4, [3, 2]), (5, [2, 3]), (5, [0, 3, 2])])
def test_a_hand_made_packed_sequence_is_read_as_torch_nn_reads_it(kind, rows, batch_sizes):
    """torch.nn skips a hand-made PackedSequence's trailing steps of no rows, and so does lstmfast; one with
    too few rows or increasing sizes fails under both (lstmfast's own words). One with more rows than
    sum(batch_sizes) runs under torch.nn, its reverse direction reading the last rows, its forward one
    the first: lstmfast refuses it."""
    theirs, ours = (m.double() for m in pair(kind, 4, 5, 2, bidirectional=True))
    torch.manual_seed(1)
    data = torch.randn(rows, 4, dtype=F64)
    results = []
    for m in (theirs, ours):
        x = data.clone().requires_grad_()
        packed = nn.utils.rnn.PackedSequence(x, torch.tensor(batch_sizes))
        try:
            y, state = m(packed)
        except RuntimeError:
            results.append(None)
            continue
        (y.data.square().sum() + (state[0] if kind == "LSTM" else state).sum()).backward()
        results.append((y.data, y.batch_sizes, x.grad, [p.grad for p in m.parameters()]))
    runs = sum(batch_sizes) <= rows and batch_sizes == sorted(batch_sizes, reverse=True) and batch_sizes[0] > 0
    assert (results[0] is not None) == runs
    runs = runs and sum(batch_sizes) == rows
    assert (results[1] is not None) == runs
    if runs:
        assert results[1][1].tolist() == batch_sizes
        torch.testing.assert_close(results[1], results[0], **TOLERANCES[F64])

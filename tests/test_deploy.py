"""Deployment routes: ONNX (both exporters, run by ONNX Runtime), TorchScript, torch.export + AOTInductor.

Every exported model is run at a sequence length and batch size other than those it was exported with,
and compared with eager lstmfast at the float32 tolerances of design.md section 7.
"""

import contextlib
import copy
import warnings

import pytest
import torch
from torch import nn

import lstmfast
from conftest import TOLERANCES

TOL = TOLERANCES[torch.float32]
INPUT, HIDDEN = 4, 5
EXPORT_SHAPE, RUN_SHAPE = (6, 3), (9, 2)  # (T, B)


class Wrapper(nn.Module):
    """One lstmfast layer, returning (output, *final states) as a flat tuple; h0 optional."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x, *states):
        hx = None if not states else (states if len(states) == 2 else states[0])
        output, finals = self.layer(x, hx)
        return (output, *finals) if isinstance(finals, tuple) else (output, finals)


def make(kind, num_layers=1, bidirectional=False, nonlinearity="tanh", **options):
    torch.manual_seed(0)
    if kind == "LSTM":
        layer = lstmfast.LSTM(INPUT, HIDDEN, num_layers, bidirectional=bidirectional, **options)
    elif kind == "GRU":
        layer = lstmfast.GRU(INPUT, HIDDEN, num_layers, bidirectional=bidirectional, **options)
    else:
        layer = lstmfast.RNN(INPUT, HIDDEN, num_layers, nonlinearity=nonlinearity,
                             bidirectional=bidirectional, **options)
    return Wrapper(layer).eval()


def inputs(model, shape, with_h0, seed):
    g = torch.Generator().manual_seed(seed)
    T, B = shape
    layer = model.layer
    x = torch.randn(T, B, INPUT, generator=g)
    if layer.batch_first:
        x = x.transpose(0, 1).contiguous()
    if not with_h0:
        return (x,)
    n = layer.num_layers * (2 if layer.bidirectional else 1)
    states = [torch.randn(n, B, HIDDEN, generator=g) for _ in range(2 if isinstance(layer, nn.LSTM) else 1)]
    return (x, *states)


def eager(model, args):
    with torch.no_grad():
        return [o.numpy() for o in model(*args)]


def assert_close_all(got, expected):
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(torch.as_tensor(g), torch.as_tensor(e), **TOL)


# (kind, nonlinearity, num_layers, bidirectional)
CONFIGS = [
    ("LSTM", "tanh", 1, False), ("LSTM", "tanh", 1, True), ("LSTM", "tanh", 2, True), ("LSTM", "tanh", 2, False),
    ("RNN", "tanh", 1, False), ("RNN", "tanh", 2, True), ("RNN", "relu", 1, True), ("RNN", "relu", 2, False),
    ("GRU", "tanh", 1, False), ("GRU", "tanh", 1, True), ("GRU", "tanh", 2, True),
]
CONFIG_IDS = [f"{k}-{n}-L{layers}-{'bi' if bi else 'uni'}" for k, n, layers, bi in CONFIGS]


# ---------------------------------------------------------------------- ONNX


def onnx_runtime():
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    return pytest.importorskip("onnxruntime")


def export_onnx(model, args, path, exporter):
    names = ["x", "h0", "c0"][:len(args)]
    outputs = ["output", "h_n", "c_n"][:3 if isinstance(model.layer, nn.LSTM) else 2]
    time_axis = 1 if model.layer.batch_first else 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' own deprecation and progress warnings
        if exporter == "dynamo":
            # (x, states): forward's *states take one entry, a tuple
            shapes = ({time_axis: "T", 1 - time_axis: "B"},)
            if len(args) > 1:
                shapes += (tuple({1: "B"} for _ in args[1:]),)
            torch.onnx.export(model, args, str(path), dynamo=True, input_names=names,
                              output_names=outputs, dynamic_shapes=shapes,
                              custom_translation_table=lstmfast.onnx_translations(), verbose=False)
        else:
            axes = {"x": {time_axis: "T", 1 - time_axis: "B"}, "h0": {1: "B"}, "c0": {1: "B"},
                    "output": {time_axis: "T", 1 - time_axis: "B"}, "h_n": {1: "B"}, "c_n": {1: "B"}}
            torch.onnx.export(model, args, str(path), dynamo=False, input_names=names,
                              output_names=outputs,
                              dynamic_axes={k: v for k, v in axes.items() if k in names + outputs})
    return names


def run_onnx(path, names, args):
    ort = onnx_runtime()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {n: a.numpy() for n, a in zip(names, args)})


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("with_h0", [False, True], ids=["no_h0", "h0"])
@pytest.mark.parametrize("kind,nonlinearity,num_layers,bidirectional", CONFIGS, ids=CONFIG_IDS)
def test_onnx_matches_eager(tmp_path, kind, nonlinearity, num_layers, bidirectional, with_h0, exporter):
    onnx_runtime()
    model = make(kind, num_layers, bidirectional, nonlinearity)
    path = tmp_path / "model.onnx"
    names = export_onnx(model, inputs(model, EXPORT_SHAPE, with_h0, seed=1), path, exporter)
    args = inputs(model, RUN_SHAPE, with_h0, seed=2)
    assert_close_all(run_onnx(path, names, args), eager(model, args))


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_onnx_without_bias_batch_first_and_under_no_grad(tmp_path, kind, exporter):
    """No biases (ONNX's B omitted), batch_first, and an export under torch.no_grad() (the raw op, not
    the autograd Function, reaches the exporter)."""
    onnx_runtime()
    model = make(kind, 2, True, "relu", bias=False, batch_first=True)
    path = tmp_path / "model.onnx"
    with torch.no_grad():
        names = export_onnx(model, inputs(model, EXPORT_SHAPE, True, seed=1), path, exporter)
    args = inputs(model, RUN_SHAPE, True, seed=2)
    assert_close_all(run_onnx(path, names, args), eager(model, args))


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_onnx_nodes_are_onnx_recurrent_operators(tmp_path, kind, exporter):
    """One ONNX LSTM / GRU / RNN node per layer and direction, with the direction attribute set (and a
    GRU's linear_before_reset=1: torch's reset gate multiplies W_hn h + b_hn)."""
    onnx_runtime()
    import onnx

    model = make(kind, 2, True)
    path = tmp_path / "model.onnx"
    export_onnx(model, inputs(model, EXPORT_SHAPE, False, seed=1), path, exporter)
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type in ("LSTM", "GRU", "RNN")]
    assert {n.op_type for n in nodes} == {kind}
    attributes = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in nodes]
    assert sorted(a["direction"].decode() for a in attributes) == ["forward", "forward", "reverse", "reverse"]
    if kind == "GRU":
        assert all(a["linear_before_reset"] == 1 for a in attributes)


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_onnx_projection_is_refused_clearly(tmp_path, exporter):
    onnx_runtime()
    torch.manual_seed(0)
    model = Wrapper(lstmfast.LSTM(INPUT, HIDDEN, proj_size=3)).eval()
    with pytest.raises(Exception) as info:
        export_onnx(model, inputs(model, EXPORT_SHAPE, False, seed=1), tmp_path / "m.onnx", exporter)
    chain, error = [], info.value
    while error is not None:  # the dynamo exporter wraps the translation's error
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("projection" in message and "proj_size" in message for message in chain)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_onnx_packed_input_is_refused_clearly_by_the_legacy_exporter(tmp_path, kind):
    onnx_runtime()
    from torch.nn.utils.rnn import pack_padded_sequence

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer = getattr(lstmfast, kind)(INPUT, HIDDEN)

        def forward(self, x, lengths):
            return self.layer(pack_padded_sequence(x, lengths))[1][0]

    with pytest.raises(RuntimeError, match="packed input"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Packed().eval(), (torch.randn(6, 3, INPUT), torch.tensor([6, 4, 2])),
                          str(tmp_path / "m.onnx"), dynamo=False)


def test_onnx_legacy_exporter_translates_the_autograd_function(tmp_path):
    """Code that calls lstmfast.LSTMFunction / GRUFunction / RNNFunction itself (outside torch.jit
    tracing the module path uses the bare ops) exports through the Functions' symbolic methods."""
    onnx_runtime()

    class Direct(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lstm, self.rnn = lstmfast.LSTM(INPUT, HIDDEN), lstmfast.RNN(HIDDEN, HIDDEN)
            self.gru = lstmfast.GRU(HIDDEN, HIDDEN)

        def forward(self, x):
            lstm, gru, rnn = self.lstm, self.gru, self.rnn
            y = lstmfast.LSTMFunction.apply(x, None, None, None, lstm.weight_ih_l0, lstm.weight_hh_l0,
                                            lstm.bias_ih_l0, lstm.bias_hh_l0, None, True, None, None)[0]
            y = lstmfast.GRUFunction.apply(y, None, None, gru.weight_ih_l0, gru.weight_hh_l0,
                                           gru.bias_ih_l0, gru.bias_hh_l0, True, None, None)[0]
            return lstmfast.RNNFunction.apply(y, None, None, rnn.weight_ih_l0, rnn.weight_hh_l0,
                                              rnn.bias_ih_l0, rnn.bias_hh_l0, "tanh", False, None, None)

    model = Direct().eval()
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(*EXPORT_SHAPE, INPUT),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "T", 1: "B"}})
    x = torch.randn(*RUN_SHAPE, INPUT)
    assert_close_all(run_onnx(path, ["x"], (x,)), eager(model, (x,)))


# ---------------------------------------------------------------------- TorchScript


class Stack(nn.Module):
    """LSTM (2 layers, bidirectional) feeding a GRU (bidirectional), then an RNN (relu), then a Linear."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lstm = lstmfast.LSTM(INPUT, HIDDEN, 2, bidirectional=True)
        self.gru = lstmfast.GRU(2 * HIDDEN, HIDDEN, bidirectional=True)
        self.rnn = lstmfast.RNN(2 * HIDDEN, HIDDEN, nonlinearity="relu")
        self.head = nn.Linear(HIDDEN, 2)

    def forward(self, x):
        y, (h, c) = self.lstm(x)
        y, h_gru = self.gru(y)
        z, h_rnn = self.rnn(y)
        return self.head(z), h, c, h_gru, h_rnn


def test_jit_trace_checks_saves_loads_and_matches_eager(tmp_path):
    model = Stack().eval()
    path = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lstmfast's forward gives the tracer nothing to warn about...
        warnings.filterwarnings("ignore", "`torch.jit")  # ...torch's own deprecation (any category)
        traced = torch.jit.trace(model, (torch.randn(*EXPORT_SHAPE, INPUT),))  # check_trace: re-runs it
        torch.jit.save(traced, str(path))
        loaded = torch.jit.load(str(path))
    assert_matches_stack(model, loaded)
    assert "lstmfast::lstm_forward" in str(loaded.inlined_graph)
    assert "lstmfast::gru_forward" in str(loaded.inlined_graph)


@pytest.mark.filterwarnings("ignore:`torch.jit")  # (torch's own deprecation)
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_jit_trace_of_batch_first_layers_checks_and_matches_eager(kind):
    """torch.jit.trace re-runs the trace without grad to check it: the recorded graph must not depend
    on grad mode (a batch_first GRU's or RNN's no-grad output is made a tensor of its own in eager)."""
    torch.manual_seed(0)
    layer = getattr(lstmfast, kind)(INPUT, HIDDEN, 2, batch_first=True, bidirectional=True).eval()
    traced = torch.jit.trace(layer, (torch.randn(2, 5, INPUT),))
    x = torch.randn(3, 7, INPUT)
    with torch.no_grad():
        for a, e in zip(traced(x), layer(x)):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


class _Head(nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.inp, self.rnn, self.out = nn.Linear(3, 4), layer, nn.Linear(10, 2)

    def forward(self, x):
        return self.out(self.rnn(self.inp(x))[0])


@pytest.mark.filterwarnings("ignore:`torch.jit", "ignore::torch.jit.TracerWarning",  # (torch.nn's, torch's)
                            "ignore:The tensor attributes self.rnn._flat_weights")
@pytest.mark.parametrize("route", ["torch.export", "torch.export strict", "torch.jit.trace"])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_training_through_an_exported_or_traced_graph_gives_torch_nn_s_gradients(kind, route):
    """A graph that records lstmfast's ops (program.module(), a traced module) trains: the ops have a
    first-order backward of their own (a traced graph records the inference form: its backward runs
    the forward again for the activations). Every parameter's gradient equals torch.nn's through the
    same route (strict export too, which runs custom autograd Functions with grad off: the op is
    recorded there, not the Function); second order through such a graph is refused."""
    torch.manual_seed(0)
    layer = getattr(nn, kind)(4, 5, batch_first=True, num_layers=2, bidirectional=True)
    theirs = _Head(layer).double()
    ours = _Head(getattr(lstmfast, kind).from_torch(copy.deepcopy(layer))).double()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    grads = []
    for model in (theirs, ours):
        graph = (torch.export.export(model, (x,), strict=route.endswith("strict")).module()
                 if route.startswith("torch.export") else torch.jit.trace(model, (x,)))
        params = dict(graph.named_parameters())
        grads.append(dict(zip(params, torch.autograd.grad(graph(x).square().sum(), list(params.values())))))
    assert grads[1].keys() == grads[0].keys() and len(grads[0]) == 2 * 2 + 2 * 2 * (4 if kind != "RNN" else 4)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-10, atol=1e-10)
    leaf = x.clone().requires_grad_()
    with pytest.raises(RuntimeError, match="second-order gradients through a graph that recorded lstmfast's op"):
        torch.autograd.grad(graph(leaf).square().sum(), leaf, create_graph=True)


@pytest.mark.filterwarnings("ignore:`torch.jit", "ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("route", ["torch.export", "torch.jit.trace"])
def test_grad_clip_not_recorded_by_export_or_trace_is_said(route):
    """The recorded op's own backward has no grad_clip: recording a layer that has one warns (strict
    export traces with Dynamo, which does not pass the warning on)."""
    model = _Head(lstmfast.GRU(4, 5, batch_first=True, bidirectional=True, grad_clip=0.5))
    x = torch.randn(2, 5, 3)
    with pytest.warns(UserWarning, match="grad_clip=0.5 is not recorded by torch.jit.trace or torch.export"):
        if route.startswith("torch.export"):
            torch.export.export(model, (x,), strict=route.endswith("strict"))
        else:
            torch.jit.trace(model, (x,))


def test_jit_script_names_the_supported_routes():
    """...and the advice it gives works: unconvert the model, then script it (torch.nn's layers in a
    model; torch cannot script a bare torch.nn recurrent layer's forward, which the message says)."""
    model = Stack()
    with pytest.raises(RuntimeError, match="torch.jit.script") as info:
        torch.jit.script(model)
    message = str(info.value)
    for route in ("torch.jit.trace", "torch.export", "torch.compile", "torch.onnx.export"):
        assert route in message
    assert "lstmfast.unconvert(model) first (a model holding the layer" in message
    x = torch.randn(6, 3, INPUT)
    with torch.no_grad():
        expected = model(x)
        scripted = torch.jit.script(lstmfast.unconvert(copy.deepcopy(model)))(x)
    for got, want in zip(scripted, expected):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_jit_script_of_each_layer_names_it(kind):
    with pytest.raises(RuntimeError, match=rf"lstmfast.{kind} cannot be compiled by torch.jit.script"):
        torch.jit.script(getattr(lstmfast, kind)(INPUT, HIDDEN))


# ---------------------------------------------------------------------- torch.export, AOTInductor


def export_stack(model):
    T, B = torch.export.Dim("T", min=2), torch.export.Dim("B", min=2)
    return torch.export.export(model, (torch.randn(*EXPORT_SHAPE, INPUT),), dynamic_shapes=({0: T, 1: B},))


def assert_matches_stack(model, run):
    x = torch.randn(*RUN_SHAPE, INPUT)
    with torch.no_grad():
        expected = model(x)
        got = run(x)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, **TOL)


@pytest.mark.parametrize("grad", [True, False], ids=["grad", "no_grad"])
def test_torch_export_dynamic_time_and_batch(grad):
    """The exported graph calls lstmfast's ops (no autograd Function left in it); under torch.no_grad()
    their inference form (training=False: no saved activations)."""
    model = Stack().eval()
    with torch.set_grad_enabled(grad):
        program = export_stack(model)
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    lstm_calls = [n for n in program.graph.nodes if n.target is torch.ops.lstmfast.lstm_forward.default]
    gru_calls = [n for n in program.graph.nodes if n.target is torch.ops.lstmfast.gru_forward.default]
    assert len(lstm_calls) == 4 and len(gru_calls) == 2 and torch.ops.lstmfast.rnn_forward.default in targets
    assert not any("autograd" in str(t).lower() for t in targets)
    if not grad:
        assert all(n.args[-1] is False for n in lstm_calls + gru_calls)
    assert_matches_stack(model, program.module())


class AutocastGRU(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = lstmfast.GRU(INPUT, HIDDEN)

    def forward(self, x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return self.gru(x)


@pytest.mark.parametrize("route", ["jit.trace", "export", "export-strict"])
def test_autocast_result_dtypes_survive_tracing_and_export(route):
    """Under CPU autocast a module asks torch.nn for its result dtypes (float32 for a GRU on float32
    input) with a one-unit torch.nn layer: traced or exported first, the question runs outside the
    trace (no torch.nn op, no fake tensor) and the graph returns what eager does."""
    lstmfast.modules._AUTOCAST_DTYPES.clear()
    torch.manual_seed(0)
    model = AutocastGRU().eval()
    x = torch.randn(*EXPORT_SHAPE, INPUT)
    if route == "jit.trace":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "`torch.jit")
            run = torch.jit.trace(model, (x,))
        ops = str(run.inlined_graph)
    else:
        program = torch.export.export(model, (x,), strict=route == "export-strict")
        run, ops = program.module(), program.graph_module.print_readable(print_output=False)
    assert "aten::gru" not in ops and "aten.gru" not in ops and "lstmfast" in ops
    with torch.no_grad():
        got, expected = run(x), model(x)
    assert [t.dtype for t in got] == [t.dtype for t in expected] == [torch.float32] * 2
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


@pytest.mark.slow
def test_aot_inductor_package_loads_and_matches_eager(tmp_path):
    model = Stack().eval()
    program = export_stack(model)
    with warnings.catch_warnings():
        # torch 2.13's own packaging code uses its deprecated pytree LeafSpec
        warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated")
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "model.pt2"))
    loaded = torch._inductor.aoti_load_package(path)
    assert_matches_stack(model, loaded)


def test_projection_through_torch_export_and_jit_trace():
    """The routes that keep lstmfast's ops keep projection (proj_size), which ONNX cannot express."""
    torch.manual_seed(0)
    model = Wrapper(lstmfast.LSTM(INPUT, HIDDEN, 2, proj_size=3, bidirectional=True)).eval()
    export_args = inputs(model, EXPORT_SHAPE, False, seed=1)
    T, B = torch.export.Dim("T", min=2), torch.export.Dim("B", min=2)
    program = torch.export.export(model, export_args, dynamic_shapes=({0: T, 1: B},))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`torch.jit")
        traced = torch.jit.trace(model, export_args)
    args = inputs(model, RUN_SHAPE, False, seed=2)
    expected = eager(model, args)
    with torch.no_grad():
        for run in (program.module(), traced):
            assert_close_all([o.numpy() for o in run(*args)], expected)


def test_jit_trace_of_packed_input_follows_other_lengths():
    from torch.nn.utils.rnn import pack_padded_sequence

    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.layer = lstmfast.LSTM(INPUT, HIDDEN, bidirectional=True)

        def forward(self, x, lengths):
            return self.layer(pack_padded_sequence(x, lengths))[1]

    model = Packed().eval()
    with warnings.catch_warnings(), pytest.warns(torch.jit.TracerWarning, match="Python integer"):
        warnings.filterwarnings("ignore", "`torch.jit")
        # the tracer says so: the batch size (read off batch_sizes) is fixed at trace time
        traced = torch.jit.trace(model, (torch.randn(6, 3, INPUT), torch.tensor([6, 4, 2])))
    x, lengths = torch.randn(8, 3, INPUT), torch.tensor([8, 3, 1])
    with torch.no_grad():
        for got, expected in zip(traced(x, lengths), model(x, lengths)):
            torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("order", ["lstmfast_first", "torch_onnx_first"])
def test_import_stays_cheap_and_registers_the_legacy_symbolics_either_way(order):
    """import lstmfast loads neither onnx nor onnxscript nor torch.onnx; the TorchScript-based exporter's
    symbolics are registered once torch.onnx is imported, whichever comes first."""
    import subprocess
    import sys

    imports = "import lstmfast; import torch.onnx" if order == "lstmfast_first" else \
        "import torch.onnx; import lstmfast"
    script = (
        "import sys, torch\n"
        "import lstmfast\n"
        "assert not {'onnx', 'onnxscript', 'torch.onnx'} & set(sys.modules), sorted(sys.modules)\n"
        if order == "lstmfast_first" else "import sys, torch\n"
    ) + imports + "\n" + (
        "from torch.onnx._internal.torchscript_exporter import registration\n"
        "for op in ('lstmfast::lstm_forward', 'lstmfast::gru_forward', 'lstmfast::rnn_forward'):\n"
        "    assert registration.registry.is_registered_op(op, 17), op\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

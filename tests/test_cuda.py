"""The CUDA path: against the CPU path, torch.nn (cuDNN), reduced precision, streams, CUDA graphs.

Skipped without a GPU. The shared grids of test_functional / test_ops / test_modules also run on CUDA
through their `device` parameter (gradcheck and opcheck included).
"""

import pytest
import torch
from torch import nn

import lstmfast
from lstmfast import functional, reference
from lstmfast._ops import ops

from conftest import CUDA, TOLERANCES, assert_all_close, layer_sample, outputs_and_grads, raw_ops

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]

VARIANTS = [dict(cell="lstm"), dict(cell="lstm", proj=3), dict(cell="rnn", nonlinearity="tanh"),
            dict(cell="rnn", nonlinearity="relu"), dict(cell="gru")]
VARIANT_IDS = ["lstm", "lstm_proj", "rnn_tanh", "rnn_relu", "gru"]


def _fused(cell):
    """What runs a cell with lstmfast's kernels: lstmfast.functional, or the raw GRU ops."""
    return raw_ops if cell == "gru" else functional


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("lengths", [None, [6, 5, 5, 2, 1]], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cuda_matches_cpu(variant, lengths, reverse, dtype):
    kw = dict(variant, lengths=lengths, reverse=reverse, dtype=dtype, hidden=33, input_size=7, steps=6)
    cpu_out, cpu_grads = outputs_and_grads(layer_sample(**kw), _fused(variant["cell"]))
    gpu_out, gpu_grads = outputs_and_grads(layer_sample(**kw, device="cuda"), _fused(variant["cell"]))
    assert_all_close([t.cpu() for t in gpu_out], cpu_out, **TOLERANCES[dtype])
    assert_all_close([t.cpu() for t in gpu_grads], cpu_grads, **TOLERANCES[dtype])


@pytest.mark.parametrize("kind,options", [
    ("LSTM", dict(num_layers=2, bidirectional=True)),
    ("LSTM", dict(num_layers=2, proj_size=16, batch_first=True)),
    ("LSTM", dict(num_layers=1, bias=False)),
    ("RNN", dict(num_layers=2, bidirectional=True, nonlinearity="tanh")),
    ("RNN", dict(num_layers=2, nonlinearity="relu", batch_first=True)),
    ("GRU", dict(num_layers=2, bidirectional=True)),
    ("GRU", dict(num_layers=1, bias=False, batch_first=True)),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cuda_matches_cudnn(kind, options, dtype):
    ours = getattr(lstmfast, kind)(24, 32, **options).to("cuda", dtype)
    theirs = getattr(nn, kind)(24, 32, **options).to("cuda", dtype)
    theirs.load_state_dict(ours.state_dict())
    shape = (4, 9, 24) if options.get("batch_first") else (9, 4, 24)
    x = torch.randn(shape, device="cuda", dtype=dtype)
    results = []
    for module in (ours, theirs):
        xi = x.clone().requires_grad_()
        out, state = module(xi)
        states = [state] if isinstance(state, torch.Tensor) else list(state)
        loss = out.square().sum() + sum(s.sum() for s in states)
        grads = torch.autograd.grad(loss, [xi] + list(module.parameters()))
        results.append([out.detach()] + [s.detach() for s in states] + list(grads))
    if dtype == torch.float64:
        assert_all_close(results[0], results[1], **TOLERANCES[dtype])
        return
    # float32: cuDNN sums in its own order, and through two bidirectional layers elementwise rtol
    # failed on elements near zero (seen on an H100); hold each tensor to 1e-5 norm-wise instead.
    for i, (got, want) in enumerate(zip(*results)):
        error = (got - want).norm() / want.norm().clamp_min(1e-6)
        assert error <= 1e-5, f"tensor {i}: relative error {error:.3g}"


# Reduced precision: inputs and weights are rounded to the dtype, and the result is compared with
# float32 computed from the same rounded values. Kernels keep float32 arithmetic; what differs is the
# rounding of stored activations and GEMM operands. Stated tolerances, on the norm-wise relative error
# ||got - want|| / ||want|| (a pure-torch float16 / bfloat16 reference measures about 1e-3 / 1e-2):
REDUCED = {torch.float16: 1e-2, torch.bfloat16: 4e-2}
# ReLU's derivative jumps at 0, so rounding flips units whose pre-activation is near 0 and moves the
# gradients by far more than rounding error (a pure-torch bfloat16 reference: 9% on this sample). For
# the relu RNN only outputs and final states are held to REDUCED; its gradients to RELU_GRAD.
RELU_GRAD = {torch.float16: 5e-2, torch.bfloat16: 2.5e-1}


@pytest.mark.parametrize("variant", VARIANTS, ids=VARIANT_IDS)
@pytest.mark.parametrize("dtype", list(REDUCED), ids=["f16", "bf16"])
def test_reduced_precision(variant, dtype):
    kw = dict(variant, steps=20, batch=8, input_size=32, hidden=64, lengths=None)
    low = layer_sample(**kw, dtype=dtype, device="cuda")
    high = layer_sample(**kw, dtype=dtype, device="cuda")
    high.args = tuple(None if a is None else a.detach().float().requires_grad_() for a in high.args)
    for k in ("w_hr", "h0", "c0"):
        if high.kwargs.get(k) is not None:
            high.kwargs[k] = high.kwargs[k].detach().float().requires_grad_()
    low_out, low_grads = outputs_and_grads(low, _fused(variant["cell"]))
    ref_out, ref_grads = outputs_and_grads(high, reference)
    relu = variant.get("nonlinearity") == "relu"
    for i, (got, want) in enumerate(zip(low_out + low_grads, ref_out + ref_grads)):
        assert got.dtype == dtype and torch.isfinite(got).all()
        error = (got.float() - want).norm() / want.norm().clamp_min(1e-3)
        bound = RELU_GRAD[dtype] if relu and i >= len(low_out) else REDUCED[dtype]
        assert error <= bound, f"tensor {i}: relative error {error:.3g} > {bound}"


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_autocast_runs_in_autocast_dtype(kind):
    module = getattr(lstmfast, kind)(16, 32, num_layers=2).cuda()
    x = torch.randn(10, 4, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, state = module(x)
    h = state[0] if isinstance(state, tuple) else state
    assert out.dtype == h.dtype == torch.bfloat16
    out.float().sum().backward()
    assert module.weight_ih_l0.grad.dtype == torch.float32
    expected, _ = module(x)
    assert (out.float() - expected).abs().max() < 5e-2


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_functional_call_under_vmap_and_grad(kind):
    """torch.func over a CUDA module's weights (ensembling, per-parameter grads): the forward reads
    torch.func's wrapped weights without torch.nn's flatten_parameters (cuDNN's flat buffer asks every
    weight for a data pointer, which wrapped tensors do not have)."""
    torch.manual_seed(0)
    module = getattr(lstmfast, kind)(3, 4, bidirectional=True).cuda().double()
    x = torch.randn(5, 2, 3, device="cuda", dtype=torch.float64)
    params = {k: v.detach() for k, v in module.named_parameters()}
    stacked = {k: torch.stack([v, 0.5 * v]) for k, v in params.items()}
    out = torch.func.vmap(lambda p: torch.func.functional_call(module, p, (x,))[0])(stacked)
    for i in range(2):
        expected = torch.func.functional_call(module, {k: v[i] for k, v in stacked.items()}, (x,))[0]
        torch.testing.assert_close(out[i], expected, **TOLERANCES[torch.float64])
    grads = torch.func.grad(lambda p: torch.func.functional_call(module, p, (x,))[0].pow(2).sum())(params)
    expected = torch.autograd.grad(module(x)[0].pow(2).sum(), list(module.parameters()))
    assert_all_close(list(grads.values()), list(expected), **TOLERANCES[torch.float64])


def test_non_default_stream():
    sample = layer_sample("lstm", hidden=64, steps=30, batch=16, device="cuda", dtype=torch.float32)
    expected_out, expected_grads = outputs_and_grads(sample, functional)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out, grads = outputs_and_grads(sample, functional)
    torch.cuda.current_stream().wait_stream(stream)
    assert_all_close(out, expected_out, rtol=0, atol=0)
    assert_all_close(grads, expected_grads, rtol=0, atol=0)


def test_compile_reduce_overhead():
    """CUDA graphs: the ops launch on the current stream with no synchronization, so they capture."""
    model = nn.Sequential()
    lstm = lstmfast.LSTM(16, 32, num_layers=2, bidirectional=True).cuda()
    head = nn.Linear(64, 1).cuda()

    def step(x):
        out, _ = lstm(x)
        return head(out).square().mean()

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    x = torch.randn(12, 4, 16, device="cuda")
    with torch.no_grad():
        expected = step(x)
        for _ in range(3):
            got = compiled(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    del model


def test_long_sequence_is_finite():
    module = lstmfast.LSTM(8, 64).cuda()
    x = torch.randn(4000, 4, 8, device="cuda", requires_grad=True)
    out, (h, c) = module(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


def test_mixed_devices_are_refused():
    s = layer_sample("lstm", requires_grad=False, device="cuda")
    x, w_ih, w_hh, b_ih, b_hh = s.args
    with pytest.raises(RuntimeError, match="expected w_hh on device cuda:0 \\(the device of input\\), but got cpu"):
        ops.lstm_forward(x, None, None, None, w_ih, w_hh.cpu(), b_ih, b_hh, None, False, False)
    g = layer_sample("gru", requires_grad=False, device="cuda")
    x, w_ih, w_hh, b_ih, b_hh = g.args
    with pytest.raises(RuntimeError, match="gru_forward: expected b_hh on device cuda:0 \\(the device of input\\), but got cpu"):
        ops.gru_forward(x, None, None, w_ih, w_hh, b_ih, b_hh.cpu(), False, False)
    with pytest.raises(RuntimeError, match="expected batch_sizes to be a 1-D int64 tensor on the CPU"):
        ops.lstm_forward(x.view(-1, x.shape[-1]), torch.full((5,), 3, device="cuda"), s.kwargs["h0"],
                         s.kwargs["c0"], w_ih, w_hh, b_ih, b_hh, None, False, False)


def test_gru_norms_match_cpu():
    """The GRU backward's per-row norms (float32 for bfloat16) on CUDA against the CPU's."""
    for dtype in (torch.float64, torch.bfloat16):
        norms = []
        for device in ("cpu", "cuda"):
            s = layer_sample("gru", lengths=[5, 4, 4, 1], reverse=True, hidden=300, requires_grad=False,
                             device=device, dtype=torch.float64)
            args = [None if a is None else a.to(dtype if device == "cuda" else torch.float64) for a in s.args]
            x, w_ih, w_hh, b_ih, b_hh = args
            h0, batch_sizes = s.kwargs["h0"].to(x.dtype), s.kwargs["batch_sizes"]
            output, h_n, gates = ops.gru_forward(x, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, True, True)
            grad = torch.ones_like(output)
            result = ops.gru_backward(grad, None, x, batch_sizes, h0, w_ih, w_hh, output, gates, True,
                                      [True] * 4, 0.5, True)
            norms.append(result[6])
        assert norms[1].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        tolerance = TOLERANCES[torch.float64] if dtype == torch.float64 else dict(rtol=3e-2, atol=1e-3)
        torch.testing.assert_close(norms[1].cpu().double(), norms[0], **tolerance)


def test_memcheck_subset():
    """A small forward + backward of every cell: the subset gpu_check.sh runs under compute-sanitizer."""
    for variant in VARIANTS:
        for lengths in (None, [4, 3, 1]):
            for dtype in (torch.float32, torch.bfloat16):
                sample = layer_sample(**variant, steps=4, hidden=40, lengths=lengths, reverse=True,
                                      dtype=dtype, device="cuda")
                out, grads = outputs_and_grads(sample, _fused(variant["cell"]))
                assert all(torch.isfinite(t).all() for t in out + grads)


# ---------------------------------------------------------------- persistent kernels (issue 17)
# csrc/cuda/persistent.cu: taken by default where "auto" expects them to win (LSTMFAST_CUDA_PERSISTENT
# unset), so the other tests here run them too for small layers. Each test below forces a path with the
# environment variable ("default": the per-step path, "0"; "persistent": "1"), which the ops read on
# every call, and checks through cuda_persistent_launches() that the path it asked for really ran.

PATHS = ["default", "persistent"]


def _use(monkeypatch, path):
    monkeypatch.setenv("LSTMFAST_CUDA_PERSISTENT", "1" if path == "persistent" else "0")


def _detached_copy(sample, dtype, device):
    """The same layer with every floating tensor converted exactly (a wider dtype keeps the values)."""
    def convert(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        return t.detach().to(device=device, dtype=dtype).requires_grad_(t.requires_grad)

    return type(sample)(sample.cell, tuple(convert(a) for a in sample.args),
                        {k: convert(v) for k, v in sample.kwargs.items()})


def _run_counted(sample, module=functional):
    before = lstmfast.cuda_persistent_launches()
    out, grads = outputs_and_grads(sample, module)
    return out, grads, lstmfast.cuda_persistent_launches() - before


def _assert_norm_close(got, want, bound, what=""):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None
            continue
        assert g.shape == w.shape and torch.isfinite(g).all(), f"{what} tensor {i}"
        error = (g.double().cpu() - w.double().cpu()).norm() / w.double().norm().clamp_min(1e-6)
        assert error <= bound, f"{what} tensor {i}: relative error {error:.3g} > {bound}"


PERSISTENT_CELLS = [dict(cell="lstm"), dict(cell="gru"), dict(cell="rnn", nonlinearity="tanh"),
                    dict(cell="rnn", nonlinearity="relu")]
CELL_IDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
LAYOUTS = [dict(lengths=None, batch=4), dict(lengths=None, batch=1), dict(lengths=[7, 6, 6, 3, 1]),
           dict(lengths=[5, 5, 5])]


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("variant", PERSISTENT_CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["B4", "B1", "packed", "packed_equal"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("options", [dict(state=True, bias=True), dict(state=False, bias=False),
                                     dict(state=True, bias=True, grad_clip=0.05)],
                         ids=["h0_bias", "no_h0_no_bias", "clip"])
@pytest.mark.parametrize("hidden", [33, 301])  # 301: several units per block and a short last block
def test_paths_match_float64_reference(monkeypatch, path, variant, layout, reverse, options, hidden):
    """float32 on the GPU, both paths, against lstmfast.reference in float64 on the same values."""
    _use(monkeypatch, path)
    sample = layer_sample(**variant, **layout, **options, reverse=reverse, hidden=hidden, input_size=5,
                          steps=7, dtype=torch.float32, device="cuda")
    out, grads, launches = _run_counted(sample)
    want_out, want_grads = outputs_and_grads(_detached_copy(sample, torch.float64, "cpu"), reference)
    assert launches == (2 if path == "persistent" else 0)
    _assert_norm_close(out, want_out, 1e-5, "output")
    _assert_norm_close(grads, want_grads, 1e-5, "gradient")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("variant", PERSISTENT_CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("lengths", [None, [20, 17, 9, 9, 2, 1]], ids=["padded", "packed"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", list(REDUCED), ids=["f16", "bf16"])
def test_paths_reduced_precision(monkeypatch, path, variant, lengths, reverse, dtype):
    """float16 / bfloat16 on both paths against float32 on the same rounded values, at the bounds of
    test_reduced_precision."""
    _use(monkeypatch, path)
    sample = layer_sample(**variant, lengths=lengths, reverse=reverse, steps=20, batch=8, input_size=32,
                          hidden=64, dtype=dtype, device="cuda")
    out, grads, launches = _run_counted(sample)
    want_out, want_grads = outputs_and_grads(_detached_copy(sample, torch.float32, "cuda"), reference)
    assert launches == (2 if path == "persistent" else 0)
    assert all(t.dtype == dtype for t in out + grads)
    relu = variant.get("nonlinearity") == "relu"
    _assert_norm_close(out, want_out, REDUCED[dtype], "output")
    _assert_norm_close(grads, want_grads, RELU_GRAD[dtype] if relu else REDUCED[dtype], "gradient")


@pytest.mark.parametrize("variant", PERSISTENT_CELLS[:3], ids=CELL_IDS[:3])
@pytest.mark.parametrize("shape", [dict(hidden=1024, batch=16), dict(hidden=1024, batch=64), dict(hidden=256, batch=2)],
                         ids=["H1024_B16", "H1024_B64", "H256_B2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_persistent_agrees_with_default(monkeypatch, variant, shape, dtype):
    """The two paths on the issue's sizes, where the persistent kernels stage the exchanged rows in
    several chunks (float32 H=1024). float32: the same arithmetic in another order. bfloat16: the
    persistent path keeps more in float32 (the cell state, the step's sum), so each is held to the
    float32 result instead."""
    kw = dict(variant, steps=24, input_size=64, dtype=dtype, device="cuda", **shape)
    results = {}
    for path in PATHS:
        _use(monkeypatch, path)
        results[path] = _run_counted(layer_sample(**kw))
    assert results["default"][2] == 0 and results["persistent"][2] == 2
    if dtype == torch.float32:
        _assert_norm_close(results["persistent"][0], results["default"][0], 1e-5, "output")
        _assert_norm_close(results["persistent"][1], results["default"][1], 1e-5, "gradient")
        return
    want_out, want_grads = outputs_and_grads(_detached_copy(layer_sample(**kw), torch.float32, "cuda"),
                                             reference)
    for path in PATHS:
        _assert_norm_close(results[path][0], want_out, REDUCED[dtype], f"{path} output")
        _assert_norm_close(results[path][1], want_grads, REDUCED[dtype], f"{path} gradient")


@pytest.mark.parametrize("forward_path,backward_path", [("persistent", "default"), ("default", "persistent")])
@pytest.mark.parametrize("variant", PERSISTENT_CELLS[:3], ids=CELL_IDS[:3])
@pytest.mark.parametrize("lengths", [None, [9, 8, 4, 1]], ids=["padded", "packed"])
def test_paths_pair_either_way(monkeypatch, forward_path, backward_path, variant, lengths):
    """Both forwards save the same activations in the same layout, so either backward can follow."""
    kw = dict(variant, lengths=lengths, reverse=True, steps=9, hidden=96, input_size=8, dtype=torch.float32,
              device="cuda")
    _use(monkeypatch, "default")
    want_out, want_grads = outputs_and_grads(layer_sample(**kw), functional)
    sample = layer_sample(**kw)
    before = lstmfast.cuda_persistent_launches()
    _use(monkeypatch, forward_path)
    outputs = sample.run(functional)
    _use(monkeypatch, backward_path)
    g = torch.Generator().manual_seed(1)  # the cotangents of outputs_and_grads
    cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outputs]
    grads = torch.autograd.grad(outputs, sample.tensors, cotangents, allow_unused=True)
    assert lstmfast.cuda_persistent_launches() - before == 1
    _assert_norm_close([o.detach() for o in outputs], want_out, 1e-5, "output")
    _assert_norm_close(list(grads), want_grads, 1e-5, "gradient")


@pytest.mark.parametrize("variant", PERSISTENT_CELLS[:3], ids=CELL_IDS[:3])
def test_persistent_kernels_launched_from_concurrent_host_threads(monkeypatch, variant):
    """Host threads launching one persistent kernel with different shared-memory sizes at once: the
    kernel's shared-memory allowance is the process's, which a smaller call once cut back between
    another thread's setting and launch. Each thread gets the sequential results, bit for bit."""
    from multiprocessing.pool import ThreadPool
    _use(monkeypatch, "persistent")
    samples = [layer_sample(**variant, hidden=hidden, input_size=5, steps=7, batch=4, dtype=torch.float32,
                            device="cuda") for hidden in (33, 301)]
    plans = [lstmfast.cuda_persistent_plan(variant["cell"], hidden, 4, 7, torch.float32) for hidden in (33, 301)]
    assert all(p.startswith("persistent") for p in plans), plans
    expected = [sum(outputs_and_grads(s, functional), []) for s in samples]
    before = lstmfast.cuda_persistent_launches()

    def work(i):
        return [sum(outputs_and_grads(samples[i % 2], functional), []) for _ in range(10)]

    with ThreadPool(4) as pool:
        runs = pool.map(work, range(4))
    torch.cuda.synchronize()
    assert lstmfast.cuda_persistent_launches() - before == 4 * 10 * 2
    for i, results in enumerate(runs):
        for tensors in results:
            assert all(a is b is None or torch.equal(a, b) for a, b in zip(tensors, expected[i % 2]))


@pytest.mark.parametrize("variant", PERSISTENT_CELLS[:3], ids=CELL_IDS[:3])
def test_persistent_long_sequence(monkeypatch, variant):
    """T = 10000 steps (10000 grid syncs each way) against the float64 reference."""
    _use(monkeypatch, "persistent")
    sample = layer_sample(**variant, steps=10000, batch=4, hidden=64, input_size=8, dtype=torch.float32,
                          device="cuda")
    out, grads, launches = _run_counted(sample)
    assert launches == 2
    want_out, want_grads = outputs_and_grads(_detached_copy(sample, torch.float64, "cpu"), reference)
    _assert_norm_close(out, want_out, 1e-4, "output")
    _assert_norm_close(grads, want_grads, 1e-4, "gradient")


@pytest.mark.parametrize("case", ["projection", "float64", "norms"])
def test_persistent_falls_back(monkeypatch, case):
    """What the persistent kernels do not do runs on the default path, even when forced on."""
    _use(monkeypatch, "persistent")
    kw = dict(steps=6, hidden=40, device="cuda", dtype=torch.float64 if case == "float64" else torch.float32)
    sample = layer_sample("lstm", proj=8 if case == "projection" else 0, **kw)
    before = lstmfast.cuda_persistent_launches()
    if case == "norms":
        out = ops.lstm_forward(*[a.detach() for a in sample.args[:1]], None, sample.kwargs["h0"].detach(),
                               sample.kwargs["c0"].detach(), *[a.detach() for a in sample.args[1:]], None,
                               False, True)
        assert lstmfast.cuda_persistent_launches() - before == 1  # the forward has no norms
        x, w_ih, w_hh = (a.detach() for a in sample.args[:3])
        result = ops.lstm_backward(torch.ones_like(out[0]), None, None, x, None, sample.kwargs["h0"].detach(),
                                   sample.kwargs["c0"].detach(), w_ih, w_hh, None, out[0], out[3], out[4],
                                   False, [True, True, True, True], None, True)
        assert lstmfast.cuda_persistent_launches() - before == 1 and result[7].numel() == 6 * 3
        return
    out, grads, launches = _run_counted(sample)
    assert launches == 0
    want_out, want_grads = outputs_and_grads(_detached_copy(sample, torch.float64, "cpu"), reference)
    bound = 1e-10 if case == "float64" else 1e-5
    _assert_norm_close(out, want_out, bound, "output")
    _assert_norm_close(grads, want_grads, bound, "gradient")


def test_persistent_plan_matches_launches(monkeypatch):
    """lstmfast.cuda_persistent_plan (what a benchmark reports) says persistent exactly when it ran."""
    _use(monkeypatch, "persistent")
    for hidden, batch in ((64, 4), (1024, 16)):
        text = lstmfast.cuda_persistent_plan("lstm", hidden, batch, 10, torch.float32)
        sample = layer_sample("lstm", steps=10, batch=batch, hidden=hidden, dtype=torch.float32, device="cuda")
        _, _, launches = _run_counted(sample)
        assert (launches == 2) == text.startswith("persistent: "), text
    _use(monkeypatch, "default")
    assert lstmfast.cuda_persistent_plan("lstm", 64, 4, 10, torch.float32).startswith("default: ")


@pytest.mark.parametrize("path", PATHS)
def test_paths_on_non_default_stream(monkeypatch, path):
    _use(monkeypatch, path)
    sample = layer_sample("lstm", lengths=[30, 29, 11, 2], hidden=64, device="cuda", dtype=torch.float32)
    expected_out, expected_grads = outputs_and_grads(sample, functional)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out, grads = outputs_and_grads(sample, functional)
    torch.cuda.current_stream().wait_stream(stream)
    assert_all_close(out, expected_out, rtol=0, atol=0)
    assert_all_close(grads, expected_grads, rtol=0, atol=0)


def test_persistent_is_deterministic(monkeypatch):
    _use(monkeypatch, "persistent")
    sample = layer_sample("lstm", steps=30, batch=8, hidden=300, device="cuda", dtype=torch.float32)
    first = outputs_and_grads(sample, functional)
    second = outputs_and_grads(sample, functional)
    assert_all_close(first[0] + first[1], second[0] + second[1], rtol=0, atol=0)


@pytest.mark.parametrize("path", PATHS)
def test_memcheck_subset_paths(monkeypatch, path):
    """Small forward + backward of every cell on one path: what gpu_check.sh runs under compute-sanitizer
    (memcheck, racecheck, synccheck) with the persistent path forced on."""
    _use(monkeypatch, path)
    before = lstmfast.cuda_persistent_launches()
    for variant in PERSISTENT_CELLS:
        for lengths in (None, [4, 3, 1]):
            for dtype in (torch.float32, torch.bfloat16):
                sample = layer_sample(**variant, steps=4, hidden=40, lengths=lengths, reverse=True,
                                      dtype=dtype, device="cuda")
                out, grads = outputs_and_grads(sample, functional)
                assert all(torch.isfinite(t).all() for t in out + grads)
    assert (lstmfast.cuda_persistent_launches() > before) == (path == "persistent")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("lengths", [None, [6, 4, 1]], ids=["padded", "packed"])
def test_paths_capture_in_cuda_graph(monkeypatch, path, lengths):
    """A cooperative launch inside CUDA graph capture (torch.compile's reduce-overhead mode captures).
    Packed input takes the default path under capture (its batch_sizes would be copied from a reused
    host buffer)."""
    _use(monkeypatch, path)
    s = layer_sample("lstm", steps=12, batch=4, hidden=64, lengths=lengths, dtype=torch.float32, device="cuda",
                     requires_grad=False)
    x, w_ih, w_hh, b_ih, b_hh = s.args

    def run():
        return ops.lstm_forward(x, s.kwargs.get("batch_sizes"), s.kwargs["h0"], s.kwargs["c0"], w_ih, w_hh, b_ih,
                                b_hh, None, False, False)

    expected = run()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up on a side stream, as torch.cuda.graph asks
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    before = lstmfast.cuda_persistent_launches()
    with torch.cuda.graph(graph):
        got = run()
    graph.replay()
    torch.cuda.synchronize()
    assert (lstmfast.cuda_persistent_launches() > before) == (path == "persistent" and lengths is None)
    assert_all_close(list(got[:3]), list(expected[:3]), rtol=0 if lengths is None or path == "default" else 1e-5,
                     atol=0 if lengths is None or path == "default" else 1e-6)

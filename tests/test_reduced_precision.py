"""CPU bfloat16 / float16 (issue 16): the ops take them directly, keep the state and arithmetic float32,
round a bfloat16 call's product operands to bfloat16 (every engine this CPU has), and return torch.nn's
dtypes.

Tolerances, from the math. A result is compared, normwise (||a - e|| / ||e||), with a float64 run on the
same operands (the inputs and weights already rounded to the dtype, so only the kernels' own rounding
counts). u is the dtype's unit roundoff: 2^-9 for bfloat16, 2^-11 for float16.
- Rounding each result once costs at most u per element, about u / sqrt(3) normwise for random data.
- bfloat16 also rounds the product operands that the kernels computed (the gate gradients in backward,
  the sequence products' operands; the forward's h_{t-1} keeps 16 bits as two bfloat16 terms): each
  product then carries about u of relative error, which the recurrence
  passes on but does not amplify for the contracting layers tested here (weights scaled 1/sqrt(H)). A
  few such roundings on the way to any result: 8u (1.6e-2) bounds them with room; a kernel that, say,
  rounded the cell state or a gate each step instead would stay within it only at few steps, which is
  why the long-memory test below compares against torch.nn's bfloat16 at T = 128.
- float16 multiplies float32 copies in float32: only the final rounding, so 4u (2e-3).
"""

import copy
import functools
import itertools
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import lstmfast
from lstmfast import functional, reference

from conftest import assert_same_bits_across_threads, module_run, raw_ops

U = {torch.bfloat16: 2.0**-9, torch.float16: 2.0**-11}
TOL = {torch.bfloat16: 8 * U[torch.bfloat16], torch.float16: 4 * U[torch.float16]}


def _rel(actual, expected):
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def _case(cell, T, B, I, H, proj, packed, seed=0):  # noqa: E741
    """Float64 operands (x, w_ih, w_hh, b_ih, b_hh, w_hr) and the op's batch_sizes (None when padded)."""
    g = torch.Generator().manual_seed(seed)
    G = {"lstm": 4, "gru": 3}.get(cell, 1)
    P = proj or H
    x = torch.randn(T, B, I, generator=g, dtype=torch.float64)
    w = [torch.randn(G * H, I, generator=g, dtype=torch.float64) / I**0.5,
         torch.randn(G * H, P, generator=g, dtype=torch.float64) / H**0.5,
         torch.randn(G * H, generator=g, dtype=torch.float64) * 0.1,
         torch.randn(G * H, generator=g, dtype=torch.float64) * 0.1]
    if proj:
        w.append(torch.randn(P, H, generator=g, dtype=torch.float64) / H**0.5)
    batch_sizes = None
    if packed:
        lengths = sorted(torch.randint(1, T + 1, (B,), generator=g).tolist(), reverse=True)
        lengths[0] = T
        sequence = nn.utils.rnn.pack_padded_sequence(x, lengths)
        x, batch_sizes = sequence.data, sequence.batch_sizes
    return [x] + w, batch_sizes


def _run(module, cell, tensors, batch_sizes, reverse, grad_clip=None, cotangent_seed=1):
    """Outputs and the gradients of every operand for fixed cotangents (rounded to the outputs' dtype)."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    if cell == "lstm":
        w_hr = leaves[5] if len(leaves) > 5 else None
        outs = module.lstm(*leaves[:5], w_hr=w_hr, batch_sizes=batch_sizes, reverse=reverse, grad_clip=grad_clip)
    else:
        outs = getattr(module, cell)(*leaves, batch_sizes=batch_sizes, reverse=reverse, grad_clip=grad_clip)
    g = torch.Generator().manual_seed(cotangent_seed)
    cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype) for o in outs]
    return list(outs), list(torch.autograd.grad(outs, leaves, cotangents))


CASES = {
    "padded": dict(T=12, B=5, I=7, H=24, proj=0, packed=False, reverse=False),
    "packed-reverse": dict(T=10, B=6, I=5, H=20, proj=0, packed=True, reverse=True),
    "proj": dict(T=9, B=4, I=6, H=32, proj=8, packed=False, reverse=False),
    # a step of 70 rows by a 512 x 128 weight: the threaded time loop and the tall products' row blocks
    "team": dict(T=6, B=70, I=130, H=128, proj=0, packed=False, reverse=True),
}


def _check_against_float64(dtype, cell, name):
    c = dict(CASES[name])
    reverse = c.pop("reverse")
    if cell == "rnn":
        if c["proj"]:
            return
        c["H"] *= 2
    tensors, batch_sizes = _case(cell, **c)
    tensors = [t.to(dtype) for t in tensors]
    outs, grads = _run(functional, cell, tensors, batch_sizes, reverse)
    ref_outs, ref_grads = _run(reference, cell, [t.double() for t in tensors], batch_sizes, reverse)
    assert [t.dtype for t in outs + grads] == [dtype] * (len(outs) + len(grads))
    for i, (a, e) in enumerate(zip(outs + grads, ref_outs + ref_grads)):
        assert _rel(a, e) <= TOL[dtype], (i, _rel(a, e))


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("cell", ["lstm", "rnn"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ops_against_float64(dtype, cell, name):
    _check_against_float64(dtype, cell, name)


def test_grad_clip_in_bfloat16():
    """grad_clip clamps the float32 gate gradients as the float64 reference's clamp does."""
    tensors, batch_sizes = _case("lstm", 8, 4, 5, 16, 0, False)
    tensors = [t.to(torch.bfloat16) for t in tensors]
    outs, grads = _run(functional, "lstm", tensors, batch_sizes, False, grad_clip=0.05)
    _, unclipped = _run(functional, "lstm", tensors, batch_sizes, False)
    ref_outs, ref_grads = _run(reference, "lstm", [t.double() for t in tensors], batch_sizes, False,
                               grad_clip=0.05)
    for a, e in zip(outs + grads, ref_outs + ref_grads):
        assert _rel(a, e) <= TOL[torch.bfloat16]
    assert _rel(grads[1], unclipped[1]) > 0.1  # the clamp is active


def _supported_engines():
    """The bfloat16 engines this CPU runs, fastest first (avx512_bf16 needs AVX512-BF16; amx needs AMX-BF16
    tiles too)."""
    flags = set(open("/proc/cpuinfo").read().split()) if os.path.exists("/proc/cpuinfo") else set()
    avx512_bf16 = {"avx512f", "avx512_bf16"} <= flags
    amx = avx512_bf16 and {"amx_tile", "amx_bf16"} <= flags
    return ["amx"] * amx + ["avx512_bf16"] * avx512_bf16 + ["float32"]


@functools.cache
def _torch_nn_has_onednn_bfloat16_lstm():
    """Whether torch.nn's bfloat16 LSTM runs oneDNN's fused kernel here: oneDNN makes no bfloat16 LSTM
    primitive on some CPUs (an AMD EPYC with AVX2 and no AVX-512 here), and torch.nn then refuses an
    LSTM under CPU bfloat16 autocast and a float32 c_0 with bfloat16 weights."""
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            nn.LSTM(1, 1)(torch.zeros(1, 1, 1))
    except RuntimeError:
        return False
    return True


def _in_process(env, code):
    code = f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); " + code
    return subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), capture_output=True,
                          text=True)


@pytest.mark.parametrize("isa", ["avx512", "avx2"])
@pytest.mark.parametrize("engine", ["amx", "avx512_bf16", "float32"])
def test_every_engine_against_float64(engine, isa):
    """Each bfloat16 engine (forced with LSTMFAST_CPU_BF16_ENGINE), under each float32 GEMM / pointwise
    instruction set (LSTMFAST_CPU_ISA), in a fresh process."""
    if engine not in _supported_engines():
        pytest.skip(f"this CPU has no {engine}")
    code = ("import torch, lstmfast, test_reduced_precision as t\n"
            "for cell in ('lstm', 'rnn'):\n"
            "    for name in sorted(t.CASES): t._check_against_float64(torch.bfloat16, cell, name)\n"
            "t.test_gru_ops_against_float64(torch.bfloat16, True)\n"
            "print(lstmfast.cpu_gemm_engines()['bfloat16'])")
    proc = _in_process({"LSTMFAST_CPU_BF16_ENGINE": engine, "LSTMFAST_CPU_ISA": isa}, code)
    if proc.returncode != 0 and "does not support it" in proc.stderr:
        pytest.skip(f"this CPU has no {isa}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1].startswith(engine)


def _check_nonfinite_like_torch_nn():
    """bfloat16 layers given +-inf in the input, h0 or W_hh: torch.nn's bfloat16 NaN and inf pattern in
    the outputs, the final state and every gradient."""
    for where, kind, sign in itertools.product(("input", "h0", "weight"), ("LSTM", "GRU", "RNN"), (1, -1)):
        torch.manual_seed(0)
        theirs = getattr(nn, kind)(4, 8, num_layers=2).bfloat16()
        x, h0 = torch.randn(5, 2, 4).bfloat16(), torch.randn(2, 2, 8).bfloat16()
        with torch.no_grad():
            {"input": x[1, 0], "h0": h0[0, 1], "weight": theirs.weight_hh_l0[0]}[where][2] = sign * float("inf")
        results = []
        for m in (theirs, getattr(lstmfast, kind).from_torch(copy.deepcopy(theirs))):
            xi, hi = x.clone().requires_grad_(), h0.clone().requires_grad_()
            out, state = m(xi, (hi, h0) if kind == "LSTM" else hi)
            final = state[0] if kind == "LSTM" else state
            (out.float().sum() + final.float().sum()).backward()
            results.append([out, final, xi.grad, hi.grad] + [p.grad for p in m.parameters()])
        for i, (a, b) in enumerate(zip(*results)):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf()), (where, kind, sign, i)


@pytest.mark.parametrize("engine", ["amx", "avx512_bf16", "float32"])
def test_nonfinite_like_torch_nn_on_every_engine(engine):
    """The two-term h_{t-1} gave NaN where torch.nn's one-term product gives an infinity: an infinite h
    was split into inf and inf - inf, and a finite h's low term times an infinite weight is NaN (a zero
    term) or the opposite infinity. The low term is now 0 where h is infinite, and a weight holding an
    infinity or NaN is multiplied by one term."""
    if engine not in _supported_engines():
        pytest.skip(f"this CPU has no {engine}")
    proc = _in_process({"LSTMFAST_CPU_BF16_ENGINE": engine},
                       "import test_reduced_precision as t; t._check_nonfinite_like_torch_nn()")
    assert proc.returncode == 0, proc.stderr[-3000:]


def _check_deterministic_across_threads():
    """bfloat16 modules: the same bits from 1 and 2 threads (outputs, final states, every gradient)."""
    for kind in ("LSTM", "GRU", "RNN"):
        torch.manual_seed(0)
        module = getattr(lstmfast, kind)(1, 63, num_layers=2, bidirectional=True).bfloat16()
        assert_same_bits_across_threads(module_run(module, torch.randn(31, 31, 1).bfloat16()))


@pytest.mark.parametrize("engine", ["amx", "avx512_bf16", "float32"])
def test_every_engine_is_deterministic_across_threads(engine):
    """(The engine float32 summed dW_hh's second product with torch's addmm_, whose bits depend on the
    thread count; it goes through lstmfast's own GEMM now, as its other products do.)"""
    if engine not in _supported_engines():
        pytest.skip(f"this CPU has no {engine}")
    proc = _in_process({"LSTMFAST_CPU_BF16_ENGINE": engine},
                       "import test_reduced_precision as t; t._check_deterministic_across_threads()")
    assert proc.returncode == 0, proc.stderr[-3000:]


def _outputs_and_input_grad(layer, batch, h0):
    """A reduced-precision module's output, final states and input gradient (all-ones output gradient), as
    bits."""
    batch = batch.clone().requires_grad_()
    output, state = layer(batch, h0 if h0 is None or not isinstance(layer, lstmfast.LSTM) else (h0, h0))
    output.backward(torch.ones_like(output))
    results = [output] + list(state if isinstance(state, tuple) else (state,)) + [batch.grad]
    return [r.detach().view(torch.int16) for r in results]


def _check_streamed_weights_give_the_packed_bits(dtype=torch.bfloat16):
    """A weight that a call multiplies at most twice, by at most 64 rows (a decoder's one-step calls), is packed
    a few panels at a time into a thread's scratch and used at once (streamed); more uses or rows pack it whole
    first. Both multiply the same packed panels, so a call's rows must equal the same sequences' rows in a call
    of 65 (all packed), bit for bit (outputs, final states, input gradient), and the same on one thread; T = 2,
    B = 33 streams the steps' products and packs the input projection's. I = 530 crosses an AMX chunk and a
    depth block, H = 70 leaves ragged panels. In bfloat16, an infinity in W_hh (row 40: a gate of hidden unit 40, in the
    product's third 16-column panel, units 32-47) makes the products take h_{t-1} as one term in that panel
    only: over two steps (h_1 is not a bfloat16 value, so its second term counts), every unit outside the panel
    gets the bits it gets without the infinity (W_hh's column 40 zero, so that unit 40's h_1 reaches no other
    unit)."""
    cases = [("LSTM", {}), ("LSTM", dict(proj_size=21)), ("GRU", {}), ("RNN", {})]
    for (kind, kwargs), (steps, rows) in itertools.product(cases, [(1, 1), (1, 64), (2, 4), (2, 33), (3, 1)]):
        torch.manual_seed(0)
        layer = getattr(lstmfast, kind)(530, 70, **kwargs).to(dtype)
        x = torch.randn(steps, 65, 530).to(dtype)
        few, many = (_outputs_and_input_grad(layer, batch, None) for batch in (x[:, :rows], x))
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            alone = _outputs_and_input_grad(layer, x[:, :rows], None)
        finally:
            torch.set_num_threads(threads)
        for a, b, c in zip(few, many, alone):
            assert torch.equal(a, b[:, :rows] if b.dim() == 3 else b[:rows]), (kind, kwargs, steps, rows)
            assert torch.equal(a, c), (kind, kwargs, steps, rows, "one thread")
    if dtype != torch.bfloat16:
        return
    for kind, rows in itertools.product(("LSTM", "GRU", "RNN"), (1, 65)):
        torch.manual_seed(0)
        layer = getattr(lstmfast, kind)(530, 70).bfloat16()
        x, h0 = torch.randn(2, rows, 530).bfloat16(), torch.randn(1, rows, 70).bfloat16()
        with torch.no_grad():
            layer.weight_hh_l0[:, 40] = 0
        finite = _outputs_and_input_grad(layer, x, h0)[0]
        with torch.no_grad():
            layer.weight_hh_l0[40, 3] = float("inf")
        output = _outputs_and_input_grad(layer, x, h0)[0]
        assert output.view(torch.bfloat16).isfinite().all()
        others = [u for u in range(70) if not 32 <= u < 48]
        assert torch.equal(output[..., others], finite[..., others]), (kind, rows)
        assert not torch.equal(output[..., 40], finite[..., 40])


def test_streamed_float16_weights_give_the_packed_bits():
    """float16 weights are packed from their own bits too (widened as they are packed), and streamed by the
    same rule: the float32 kernels' streamed and packed products must agree bit for bit."""
    _check_streamed_weights_give_the_packed_bits(torch.float16)


@pytest.mark.parametrize("engine", ["amx", "avx512_bf16"])
def test_streamed_weights_give_the_packed_bits_on_every_engine(engine):
    if engine not in _supported_engines():
        pytest.skip(f"this CPU has no {engine}")
    proc = _in_process({"LSTMFAST_CPU_BF16_ENGINE": engine},
                       "import test_reduced_precision as t; t._check_streamed_weights_give_the_packed_bits()")
    assert proc.returncode == 0, proc.stderr[-3000:]


# Shapes for the engines' edges: batches of 1 to 33 rows (AMX tiles hold 16), depths below, at and past
# a whole 32-deep AMX chunk (odd too), hidden sizes whose gate columns end in a part-filled 16-column panel,
# and more than four panels (an AMX pass covers four).
EDGE_SHAPES = [dict(T=3, B=1, I=1, H=8), dict(T=4, B=15, I=31, H=20), dict(T=3, B=17, I=33, H=40),
               dict(T=2, B=33, I=64, H=36), dict(T=5, B=16, I=95, H=72)]


def test_engines_agree(tmp_path):
    engines = _supported_engines()
    if len(engines) < 2:
        pytest.skip("one bfloat16 engine on this CPU")
    results = []
    for engine in engines:
        path = tmp_path / f"{engine}.pt"
        code = ("import torch, test_reduced_precision as t\n"
                "c = {k: v for k, v in t.CASES['team'].items() if k != 'reverse'}\n"
                "results = []\n"
                "for cell, shape in [('lstm', c)] + [(cell, dict(s, proj=0, packed=False))\n"
                "                                      for s in t.EDGE_SHAPES for cell in ('lstm', 'gru', 'rnn')]:\n"
                "    tensors, bs = t._case(cell, **shape)\n"
                "    outs, grads = t._run(t.functional, cell, [x.bfloat16() for x in tensors], bs, True)\n"
                "    results += [o.float() for o in outs + grads]\n"
                f"torch.save(results, {str(path)!r})")
        proc = _in_process({"LSTMFAST_CPU_BF16_ENGINE": engine}, code)
        assert proc.returncode == 0, proc.stderr[-3000:]
        results.append(torch.load(path))
    # The same rounded operands; only the float32 sums' order differs, which can move a result across
    # one bfloat16 rounding boundary: within 2u normwise.
    for other in results[1:]:
        assert len(other) == len(results[0])
        for a, e in zip(other, results[0]):
            assert _rel(a, e) <= 2 * U[torch.bfloat16]


def test_edge_shapes_against_float64():
    """The default engine on the edge shapes, every cell, against float64 on the same operands."""
    for shape in EDGE_SHAPES:
        for cell in ("lstm", "gru", "rnn"):
            tensors, batch_sizes = _case(cell, **shape, proj=0, packed=False)
            tensors = [t.bfloat16() for t in tensors]
            outs, grads = _run(functional, cell, tensors, batch_sizes, False)
            ref_outs, ref_grads = _run(reference, cell, [t.double() for t in tensors], batch_sizes, False)
            for i, (a, e) in enumerate(zip(outs + grads, ref_outs + ref_grads)):
                assert _rel(a, e) <= TOL[torch.bfloat16], (shape, cell, i, _rel(a, e))


def test_unknown_or_unsupported_engine_is_refused():
    layer = "import torch, lstmfast; lstmfast.LSTM(3, 4).bfloat16()(torch.ones(2, 1, 3).bfloat16())"
    proc = _in_process({"LSTMFAST_CPU_BF16_ENGINE": "tiles"}, layer)
    assert proc.returncode != 0
    assert "LSTMFAST_CPU_BF16_ENGINE must be amx, avx512_bf16 or float32, but got 'tiles'" in proc.stderr
    for engine, feature in [("amx", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")]:
        if engine not in _supported_engines():
            proc = _in_process({"LSTMFAST_CPU_BF16_ENGINE": engine}, layer)
            assert proc.returncode != 0
            assert f"does not support {feature}" in proc.stderr


def test_engine_report():
    engines = lstmfast.cpu_gemm_engines()
    assert set(engines) == {"float32", "float64", "bfloat16", "float16"}
    if "LSTMFAST_CPU_BF16_ENGINE" not in os.environ:
        assert engines["bfloat16"].startswith(_supported_engines()[0])
    assert "bfloat16" in lstmfast.build_summary(detail=True)


def test_interleaved_with_torch_nn_bf16():
    """lstmfast's bfloat16 kernels after torch.nn's (oneDNN's, which configure and release the CPU's AMX
    tiles where it has them) on the same threads, and the other way round: every lstmfast result is the
    same, bit for bit, and torch.nn's are too."""
    torch.manual_seed(0)
    ours, theirs = lstmfast.LSTM(48, 64).bfloat16(), nn.LSTM(48, 64).bfloat16()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(6, 40, 48).bfloat16()
    results = {"lstmfast": [], "torch.nn": []}
    for _ in range(3):
        for name, module in (("lstmfast", ours), ("torch.nn", theirs)):
            xx = x.clone().requires_grad_()
            out, _ = module(xx)
            out.float().square().sum().backward()
            results[name].append((out.detach(), xx.grad, module.weight_hh_l0.grad.clone()))
            module.zero_grad()
    for name, runs in results.items():
        for run in runs[1:]:
            for a, e in zip(run, runs[0]):
                assert torch.equal(a, e), name
    assert _rel(results["lstmfast"][0][0], results["torch.nn"][0][0]) <= TOL[torch.bfloat16]


# ------------------------------------------------------------------------------ modules, torch.nn

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_module_against_torch_nn_and_float64(kind, dtype):
    """A 2-layer bidirectional module (LSTM with projection) in the dtype, on a PackedSequence: torch.nn's
    dtypes for every output and gradient; within the tolerance of a float64 run of the same weights,
    and close to torch.nn's own run in the dtype (which rounds more: its bound is looser)."""
    torch.manual_seed(0)
    options = dict(num_layers=2, bidirectional=True, **({"proj_size": 6} if kind == "LSTM" else {}))
    ours = getattr(lstmfast, kind)(5, 12, **options).to(dtype)
    theirs = getattr(nn, kind)(5, 12, **options).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    exact = getattr(lstmfast, kind)(5, 12, **options).double()
    exact.load_state_dict(ours.state_dict())
    x = torch.randn(9, 4, 5).to(dtype)
    lengths = [9, 7, 7, 3]

    def run(module, x):
        leaf = x.clone().requires_grad_()
        packed = nn.utils.rnn.pack_padded_sequence(leaf, lengths)
        out, hx = module(packed)
        outs = [out.data] + (list(hx) if isinstance(hx, tuple) else [hx])
        loss = sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view(o.shape)).sum()
                   for o in outs)
        return outs, list(torch.autograd.grad(loss, [leaf] + list(module.parameters())))

    outs, grads = run(ours, x)
    their_outs, their_grads = run(theirs, x)
    exact_outs, exact_grads = run(exact, x.double())
    assert [t.dtype for t in outs + grads] == [t.dtype for t in their_outs + their_grads]
    for a, e in zip(outs + grads, exact_outs + exact_grads):
        assert _rel(a, e) <= TOL[dtype]
    for a, e in zip(outs + grads, their_outs + their_grads):
        assert _rel(a, e) <= 4 * TOL[dtype]


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_autocast_runs_the_bfloat16_kernels(kind):
    """Under torch.autocast("cpu", bfloat16), a float32 module runs the same op calls as a bfloat16
    module with the same (rounded) weights: identical outputs (in torch.nn's result dtype: a GRU on
    float32 input returns float32 there), and its float32 parameter gradients are the bfloat16
    module's exactly."""
    torch.manual_seed(0)
    fp32 = getattr(lstmfast, kind)(6, 16, num_layers=2)
    bf16 = getattr(lstmfast, kind)(6, 16, num_layers=2).bfloat16()
    bf16.load_state_dict(fp32.state_dict())
    x = torch.randn(7, 3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = fp32(x)
        if kind == "LSTM" and not _torch_nn_has_onednn_bfloat16_lstm():
            # Where torch.nn refuses, lstmfast returns the autocast dtype, as oneDNN's LSTM does elsewhere.
            with pytest.raises(RuntimeError):
                nn.LSTM(6, 16, num_layers=2)(x)
            their_dtype = torch.bfloat16
        else:
            their_dtype = getattr(nn, kind)(6, 16, num_layers=2)(x)[0].dtype
    expected, _ = bf16(x.bfloat16())
    assert out.dtype == their_dtype == (torch.float32 if kind == "GRU" else torch.bfloat16)
    assert torch.equal(out, expected.to(their_dtype))
    grads = torch.autograd.grad(out.float().sum(), list(fp32.parameters()))
    expected_grads = torch.autograd.grad(expected.float().sum(), list(bf16.parameters()))
    assert all(g.dtype == torch.float32 for g in grads)
    assert all(torch.equal(g, e.float()) for g, e in zip(grads, expected_grads))


@pytest.mark.parametrize("steps", [128, 1024])
def test_long_memory_keeps_the_cell_state_in_float32(steps):
    """Forget-gate bias 5: the cell state carries early inputs far. lstmfast bf16 keeps it float32 (and
    the forward's recurrent operand to 16 bits); torch.nn's bf16 LSTM rounds it each step. Issue 16's
    target: at most 1/4 of torch.nn's error against float64, on the output and on dW_hh."""
    torch.manual_seed(0)
    H = 32
    ours = lstmfast.LSTM(H, H).bfloat16()
    with torch.no_grad():
        ours.bias_hh_l0.zero_()
        ours.bias_ih_l0.zero_()
        ours.bias_ih_l0[H:2 * H] = 5.0
    theirs = nn.LSTM(H, H).bfloat16()
    theirs.load_state_dict(ours.state_dict())
    exact = lstmfast.LSTM(H, H).double()
    exact.load_state_dict(ours.state_dict())
    x = torch.randn(steps, 4, H).bfloat16()
    errors = []
    results = []
    for m in (ours, theirs, exact):
        out, _ = m(x.to(m.weight_hh_l0.dtype))
        (grad,) = torch.autograd.grad(out.double().sum(), [m.weight_hh_l0])
        results.append((out, grad))
    for out, grad in results[:2]:
        errors.append((_rel(out, results[2][0]), _rel(grad, results[2][1])))
    (ours_out, ours_dw), (their_out, their_dw) = errors
    assert ours_out <= their_out / 4 and ours_dw <= their_dw / 4, errors


@pytest.mark.parametrize("options,torch_nn_takes_it", [
    ({}, True), (dict(num_layers=2, bidirectional=True), True), (dict(bias=False, batch_first=True), True),
    ("unbatched", True), ("packed", False), (dict(proj_size=3), False), ("float16", False)])
def test_lstm_takes_a_float32_c0(options, torch_nn_takes_it):
    """A bfloat16 LSTM given a float32 c_0 (torch.nn's oneDNN path takes one and returns c_n float32):
    torch.nn's dtypes for every result and gradient, values within the dtype's tolerance of torch.nn's
    and of a float64 run; c_n comes back unrounded (lstmfast keeps the cell state float32 inside).
    Where torch.nn's native path refuses the mix (packed input, projection, a float16 layer, a CPU
    where oneDNN has no bfloat16 LSTM), lstmfast still takes it, with the same dtypes and accuracy."""
    dtype = torch.float16 if options == "float16" else torch.bfloat16
    unbatched, packed = options == "unbatched", options == "packed"
    options = options if isinstance(options, dict) else {}
    torch.manual_seed(0)
    ours = lstmfast.LSTM(5, 8, **options).to(dtype)
    exact = lstmfast.LSTM(5, 8, **options).double()
    exact.load_state_dict(ours.state_dict())
    layers = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
    batch = () if unbatched else (3,)
    x = torch.randn(20, *batch, 5).to(dtype)
    if options.get("batch_first"):
        x = x.transpose(0, 1).contiguous()
    h0 = torch.randn(layers, *batch, options.get("proj_size", 0) or 8).to(dtype)
    c0 = 2 * torch.randn(layers, *batch, 8)

    def run(module, dtype):
        leaves = [t.to(dtype if t is not c0 else torch.float64 if dtype == torch.float64 else torch.float32)
                  .requires_grad_() for t in (x, h0, c0)]
        inp = nn.utils.rnn.pack_padded_sequence(leaves[0], [20, 14, 9]) if packed else leaves[0]
        out, (h, c) = module(inp, tuple(leaves[1:]))
        outs = [out.data if packed else out, h, c]
        loss = sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64).view(o.shape)).sum()
                   for o in outs)
        return outs, list(torch.autograd.grad(loss, leaves + list(module.parameters())))

    outs, grads = run(ours, dtype)
    assert [t.dtype for t in outs] == [dtype, dtype, torch.float32]
    assert [t.dtype for t in grads] == [dtype, dtype, torch.float32] + [dtype] * (len(grads) - 3)
    assert not torch.equal(outs[2], outs[2].to(dtype).float())  # c_n not rounded to the dtype
    exact_outs, exact_grads = run(exact, torch.float64)
    for a, e in zip(outs + grads, exact_outs + exact_grads):
        assert _rel(a, e) <= TOL[dtype]
    assert _rel(outs[2], exact_outs[2]) <= U[dtype] / 4  # (the float32 state: no final rounding)
    theirs = nn.LSTM(5, 8, **options).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    if not torch_nn_takes_it or not _torch_nn_has_onednn_bfloat16_lstm():  # (its native path refuses)
        with pytest.raises(RuntimeError):
            run(theirs, dtype)
        return
    their_outs, their_grads = run(theirs, dtype)
    assert [t.dtype for t in outs + grads] == [t.dtype for t in their_outs + their_grads]
    for a, e in zip(outs + grads, their_outs + their_grads):
        assert _rel(a, e) <= 4 * TOL[dtype]


def test_lstm_refuses_other_c0_dtypes_in_reduced_precision():
    ours = lstmfast.LSTM(5, 8).bfloat16()
    x, h0 = torch.randn(4, 2, 5).bfloat16(), torch.zeros(1, 2, 8).bfloat16()
    with pytest.raises(RuntimeError, match=r"hx\[1\] must be a torch.bfloat16 \(or torch.float32\) tensor"):
        ours(x, (h0, torch.zeros(1, 2, 8, dtype=torch.float64)))
    with pytest.raises(RuntimeError, match=r"hx\[0\] must be a torch.bfloat16 tensor"):
        ours(x, (h0.float(), torch.zeros(1, 2, 8)))


# ------------------------------------------------------------------------------ op contract

def test_saved_activations_are_float32_and_mismatches_are_named():
    tensors, _ = _case("lstm", 4, 2, 3, 5, 0, False)
    x, w_ih, w_hh, b_ih, b_hh = [t.bfloat16() for t in tensors]
    out, h, c, gates, cells = lstmfast.ops.lstm_forward(x, None, None, None, w_ih, w_hh, b_ih, b_hh, None,
                                                        False, True)
    assert (out.dtype, h.dtype, c.dtype, gates.dtype, cells.dtype) == (torch.bfloat16,) * 3 + (torch.float32,) * 2
    with pytest.raises(RuntimeError, match=r"lstmfast.lstm_forward: expected w_hh to have dtype BFloat16 "
                                           r"\(the dtype of input\), but got Float"):
        lstmfast.ops.lstm_forward(x, None, None, None, w_ih, w_hh.float(), b_ih, b_hh, None, False, True)
    with pytest.raises(RuntimeError, match=r"expected gates to have dtype BFloat16 \(the dtype of input\) or "
                                           r"Float, but got Double"):
        lstmfast.ops.lstm_backward(out, None, None, x, None, None, None, w_ih, w_hh, None, out, gates.double(),
                                   cells, False, [True, True, True, True], None, False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_opcheck(dtype):
    """torch.library.opcheck on every op with reduced-precision inputs (schemas, fakes, autograd
    registration): the fakes say float32 for the saved activations on the CPU."""
    ops = lstmfast.ops
    tensors, batch_sizes = _case("lstm", 4, 3, 3, 5, 0, True)
    x, w_ih, w_hh, b_ih, b_hh = [t.to(dtype) for t in tensors]
    h0, c0 = torch.randn(3, 5).to(dtype), torch.randn(3, 5).to(dtype)
    out, _, _, gates, cells = ops.lstm_forward(x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, None, True, True)
    torch.library.opcheck(ops.lstm_forward, (x, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, None, True, True))
    torch.library.opcheck(ops.lstm_backward, (out, None, None, x, batch_sizes, h0, c0, w_ih, w_hh, None, out,
                                              gates, cells, True, [True, True, True, True], None, True))
    tensors, _ = _case("rnn", 4, 3, 3, 5, 0, False)
    x, w_ih, w_hh, b_ih, b_hh = [t.to(dtype) for t in tensors]
    out, _ = ops.rnn_forward(x, None, None, w_ih, w_hh, b_ih, b_hh, "tanh", False)
    torch.library.opcheck(ops.rnn_forward, (x, None, None, w_ih, w_hh, b_ih, b_hh, "tanh", False))
    torch.library.opcheck(ops.rnn_backward, (out, None, x, None, None, w_ih, w_hh, out, "tanh", False,
                                             [True, True, True, True], None, True))


# ------------------------------------------------------------------------------ GRU ops (modules above)

@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gru_ops_against_float64(dtype, packed):
    tensors, batch_sizes = _case("lstm", 10, 6, 5, 24, 0, packed)
    g = torch.Generator().manual_seed(2)
    x = tensors[0]
    H = 24
    tensors = [x, torch.randn(3 * H, 5, generator=g, dtype=torch.float64) / 5**0.5,
               torch.randn(3 * H, H, generator=g, dtype=torch.float64) / H**0.5,
               torch.randn(3 * H, generator=g, dtype=torch.float64) * 0.1,
               torch.randn(3 * H, generator=g, dtype=torch.float64) * 0.1]
    h0 = torch.randn(6, H, generator=g, dtype=torch.float64).to(dtype)
    tensors = [t.to(dtype) for t in tensors]
    exact = [t.double().requires_grad_() for t in tensors + [h0]]
    ref_outs = reference.gru(*exact[:5], h0=exact[5], batch_sizes=batch_sizes, reverse=packed)
    cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in ref_outs]
    ref_grads = list(torch.autograd.grad(ref_outs, exact, cotangents))
    leaves = [t.detach().requires_grad_() for t in tensors + [h0]]
    outs = list(raw_ops.gru(*leaves[:5], h0=leaves[5], batch_sizes=batch_sizes, reverse=packed))
    grads = list(torch.autograd.grad(outs, leaves, [c.to(o.dtype) for c, o in zip(cotangents, outs)]))
    assert [t.dtype for t in outs + grads] == [dtype] * 8
    for i, (a, e) in enumerate(zip(outs + grads, list(ref_outs) + ref_grads)):
        assert _rel(a, e) <= TOL[dtype], (i, _rel(a, e))


def test_gru_opcheck_in_bfloat16():
    tensors, _ = _case("lstm", 4, 3, 3, 5, 0, False)
    x = tensors[0].bfloat16()
    w_ih, w_hh = torch.randn(15, 3).bfloat16(), torch.randn(15, 5).bfloat16()
    b_ih, b_hh = torch.randn(15).bfloat16(), torch.randn(15).bfloat16()
    out, _, gates = lstmfast.ops.gru_forward(x, None, None, w_ih, w_hh, b_ih, b_hh, False, True)
    assert gates.dtype == torch.float32
    torch.library.opcheck(lstmfast.ops.gru_forward, (x, None, None, w_ih, w_hh, b_ih, b_hh, False, True))
    torch.library.opcheck(lstmfast.ops.gru_backward, (out, None, x, None, None, w_ih, w_hh, out, gates, False,
                                                      [True] * 4, None, True))

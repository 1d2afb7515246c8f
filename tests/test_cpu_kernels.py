"""The CPU kernels' own guarantees: every instruction-set build agrees with the reference, and results
are bitwise identical whatever the thread count."""

import os
import subprocess
import sys
import time

import pytest
import torch

import lstmfast
from lstmfast import functional, reference

from conftest import TOLERANCES, assert_all_close, layer_sample, outputs_and_grads, raw_ops

# H = 37 covers whole vectors and a partial last one at every width; large inputs saturate the gates.
SHAPES = dict(steps=6, batch=5, input_size=9, hidden=37)


def _needs_own_gemm(dtype):
    """Skips a bit-for-bit promise where it is not made: results are bitwise identical across thread
    counts, batch sizes and weight paths where lstmfast's own GEMMs run (CPUs with AVX-512 or AVX2, README:
    "Deterministic on the CPU"); elsewhere the products are torch's (oneDNN's brgemm, the BLAS torch
    links), whose bits may change with the thread count and the shape, as torch.nn's do."""
    engine = lstmfast.cpu_gemm_engines()[str(dtype).removeprefix("torch.")]
    if "brgemm/blas" in engine:
        pytest.skip(f"this CPU's {dtype} products are torch's ({engine}), not lstmfast's own GEMM")


def _fused(sample):
    """What runs a sample with lstmfast's kernels: lstmfast.functional, or the raw GRU ops."""
    return raw_ops if sample.cell == "gru" else functional


def _check_against_reference():
    for dtype in (torch.float64, torch.float32):
        for kw in (dict(cell="lstm"), dict(cell="lstm", proj=11, lengths=[6, 4, 4, 1], reverse=True),
                   dict(cell="rnn"), dict(cell="rnn", nonlinearity="relu", grad_clip=0.5),
                   dict(cell="gru"), dict(cell="gru", lengths=[6, 4, 4, 1], reverse=True, grad_clip=0.5)):
            sample = layer_sample(**SHAPES, **kw, dtype=dtype)
            with torch.no_grad():
                sample.args[0].mul_(6)
            out, grads = outputs_and_grads(sample, _fused(sample))
            ref_out, ref_grads = outputs_and_grads(sample, reference)
            assert_all_close(out, ref_out, **TOLERANCES[dtype])
            assert_all_close(grads, ref_grads, **TOLERANCES[dtype])


@pytest.mark.parametrize("isa", ["avx512", "avx2", "baseline"])
def test_instruction_set_matches_reference(isa):
    """Each build of the pointwise passes (forced with LSTMFAST_CPU_ISA) in a fresh process."""
    code = ("import sys; sys.path.insert(0, {tests!r}); import torch, lstmfast, test_cpu_kernels as t; "
            "t._check_against_reference(); print(lstmfast.cpu_isa())").format(tests=os.path.dirname(__file__))
    env = dict(os.environ, LSTMFAST_CPU_ISA=isa)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if proc.returncode != 0 and "does not support it" in proc.stderr:
        pytest.skip(f"this CPU has no {isa}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == isa


def test_default_instruction_set_matches_reference():
    _check_against_reference()


def _train(threads, dtype, module_kwargs, packed):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        m = lstmfast.LSTM(96, 160, **module_kwargs).to(dtype)
        x = torch.randn(40, 70, 96, dtype=dtype, requires_grad=True)
        inp = torch.nn.utils.rnn.pack_padded_sequence(x, [40 - i // 3 for i in range(70)]) if packed else x
        out = m(inp)[0]
        out = out.data if packed else out
        out.backward(torch.randn_like(out))
        return [out, x.grad] + [p.grad for p in m.parameters()]
    finally:
        torch.set_num_threads(previous)


def _train_gru_ops(threads, dtype, **kw):
    """A training step of the raw GRU ops (forward, backward of random cotangents) on `threads` threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        sample = layer_sample("gru", dtype=dtype, **kw)
        outputs, grads = outputs_and_grads(sample, raw_ops)
        return outputs + grads
    finally:
        torch.set_num_threads(previous)


# Large enough for a team of threads and for rows split between threads: batch 70 (the team splits the
# batch), and batch 7 (fewer than 4 rows per thread: it splits the weights' panels).
GRU_THREAD_CASES = {"batch": dict(steps=30, batch=70, input_size=40, hidden=61),
                    "panels-packed-reverse": dict(lengths=[20] * 3 + [13] * 2 + [4] * 2, input_size=40,
                                                  hidden=200, reverse=True, grad_clip=0.05)}


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 threads")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kw", GRU_THREAD_CASES.values(), ids=GRU_THREAD_CASES.keys())
def test_gru_bitwise_identical_across_thread_counts(dtype, kw):
    _needs_own_gemm(dtype)
    one, two = _train_gru_ops(1, dtype, **kw), _train_gru_ops(2, dtype, **kw)
    assert len(one) == 8  # output, h_n; input, both weights, both biases, h0
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs 2 threads")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["f32", "f64", "bf16"])
@pytest.mark.parametrize("module_kwargs,packed", [({}, False), (dict(proj_size=50, bidirectional=True), True)],
                         ids=["plain", "proj-bi-packed"])
def test_bitwise_identical_across_thread_counts(dtype, module_kwargs, packed):
    _needs_own_gemm(dtype)
    one, two = _train(1, dtype, module_kwargs, packed), _train(2, dtype, module_kwargs, packed)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


# Large enough per step (batch x gates x hidden x width >= 2^15 multiply-adds) for the CPU backend to run
# the time loop on a team of threads (with AVX-512); 37 and 21 leave partial panels. With batch 24 the
# team splits the batch when the weight fits in a core's L2 cache ("lstm-rows-large": 270 kB in float32,
# 540 kB in float64, over the old fixed 256 kB limit) and the panels otherwise; the "-panels" cases'
# batches (fewer than 4 rows per thread) make it split the weights' panels whatever their size.
TEAM_CASES = {"lstm": dict(cell="lstm"), "proj-reverse": dict(cell="lstm", proj=21, reverse=True),
              "packed-reverse": dict(cell="lstm", lengths=[7] * 9 + [5] * 8 + [2] * 7, reverse=True),
              "rnn": dict(cell="rnn"), "relu-clip": dict(cell="rnn", nonlinearity="relu", grad_clip=0.05),
              "lstm-panels": dict(cell="lstm", hidden=165, batch=6, lengths=[7] * 4 + [3] * 2),
              "lstm-rows-large": dict(cell="lstm", hidden=130, lengths=[7] * 20 + [4] * 4, reverse=True),
              "rnn-panels": dict(cell="rnn", hidden=330, batch=4, reverse=True),
              "gru": dict(cell="gru"), "gru-packed-reverse-clip": dict(cell="gru", lengths=[7] * 9 + [5] * 8 + [2] * 7,
                                                                    reverse=True, grad_clip=0.05),
              "gru-panels": dict(cell="gru", hidden=190, batch=6, lengths=[7] * 4 + [3] * 2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kw", TEAM_CASES.values(), ids=TEAM_CASES.keys())
def test_threaded_time_loop_matches_reference(kw, dtype):
    sample = layer_sample(**dict(dict(steps=7, batch=24, input_size=19, hidden=37), **kw), dtype=dtype)
    out, grads = outputs_and_grads(sample, _fused(sample))
    ref_out, ref_grads = outputs_and_grads(sample, reference)
    assert_all_close(out, ref_out, **TOLERANCES[dtype])
    assert_all_close(grads, ref_grads, **TOLERANCES[dtype])


def _busy_threads(seconds_of_work):
    """How many of this process's OS threads gained at least 0.1 s of CPU time while work() ran."""
    def cpu_times():
        times = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                times[tid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            except OSError:
                pass
        return times
    before = cpu_times()
    seconds_of_work()
    after = cpu_times()
    return sum(1 for tid, t in after.items() if t - before.get(tid, 0.0) >= 0.1)


@pytest.mark.skipif(torch.get_num_threads() < 2 or not os.path.isdir("/proc/self/task"),
                    reason="needs 2 threads and Linux /proc")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_work_is_spread_over_threads(dtype):
    """The CPU kernels really run on several threads (at::parallel_for is serial in an extension built
    without OpenMP, which went unnoticed until this test)."""
    torch.manual_seed(0)
    m = lstmfast.LSTM(256, 256).to(dtype)
    x = torch.randn(64, 64, 256, dtype=dtype)

    def work():
        with torch.no_grad():
            for _ in range(100):
                m(x)
                if time.perf_counter() - start > 1.5:
                    break
    start = time.perf_counter()
    assert _busy_threads(work) >= 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kw", [dict(), dict(lengths=[40] * 10 + [31] * 6 + [3] * 4, reverse=True)],
                         ids=["padded", "packed-reverse"])
def test_inference_projects_the_input_in_chunks(kw, dtype):
    """Without grad, the CPU backend projects the input about 2 MB of gates at a time (here ~25 of the
    40 steps per chunk): the result must not depend on where the chunks fall."""
    sample = layer_sample(**dict(dict(steps=40, batch=20, input_size=24, hidden=256), **kw), dtype=dtype,
                          requires_grad=False)
    out = functional.lstm(*sample.args, **sample.kwargs)
    ref = reference.lstm(*sample.args, **sample.kwargs)
    assert_all_close(out, ref, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kw", [dict(), dict(lengths=[40] * 10 + [31] * 6 + [3] * 4, reverse=True)],
                         ids=["padded", "packed-reverse"])
def test_gru_inference_projects_the_input_in_chunks(kw, dtype):
    """The same for the GRU forward op without training (its gates workspace holds ~340 rows here)."""
    sample = layer_sample("gru", **dict(dict(steps=40, batch=20, input_size=24, hidden=384), **kw), dtype=dtype,
                          requires_grad=False)
    x, w_ih, w_hh, b_ih, b_hh = sample.args
    k = sample.kwargs
    output, h_n, gates = torch.ops.lstmfast.gru_forward(x, k.get("batch_sizes"), k.get("h0"), w_ih, w_hh, b_ih,
                                                        b_hh, k["reverse"], False)
    assert gates.shape == (0,)
    ref = reference.gru(*sample.args, h0=k.get("h0"), batch_sizes=k.get("batch_sizes"), reverse=k["reverse"])
    assert_all_close([output, h_n], ref, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("kw", [dict(cell="lstm"), dict(cell="gru"), dict(cell="rnn"),
                                dict(cell="lstm", lengths=[40] * 10 + [31] * 6 + [3] * 4, reverse=True),
                                dict(cell="gru", lengths=[40] * 10 + [31] * 6 + [3] * 4, reverse=True)],
                         ids=["lstm", "gru", "rnn", "lstm-packed-reverse", "gru-packed-reverse"])
def test_input_projection_deeper_than_a_depth_block(kw, training, dtype):
    """The input projection x W_ih^T of a whole sequence (or, without grad, of ~25 steps at a time) reads
    W_ih packed once per call, one depth block (512 floats, 256 doubles) of its panels at a time: an input
    wider than a block must still give the reference's outputs and gradients. The reference runs in
    float64 on the same values; a float32 result may differ by its own rounding over sums of 600-800
    terms, so there each tensor is held to 1e-5 of its largest element (a misread block is off by O(1))."""
    shape = dict(dict(steps=40, batch=20, input_size=600, hidden=256), **kw)
    sample = layer_sample(**shape, dtype=dtype, requires_grad=training)
    exact = layer_sample(**shape, dtype=torch.float64, requires_grad=training)
    with torch.no_grad():
        for mine, wide in zip(sample.tensors, exact.tensors):
            wide.copy_(mine)
    if training:
        results, expected = (sum(outputs_and_grads(s, m), []) for s, m in ((sample, _fused(sample)),
                                                                            (exact, reference)))
    else:
        results, expected = sample.run(_fused(sample)), exact.run(reference)
    for result, want in zip(results, expected):
        scale = 1.0 if dtype == torch.float64 else max(1.0, want.abs().max().item())
        torch.testing.assert_close(result.double(), want, rtol=TOLERANCES[dtype]["rtol"],
                                   atol=TOLERANCES[dtype]["atol"] * scale)


def _outputs_and_input_grad(layer, batch, grad):
    """A module's output and final states for `batch`, and with `grad` the input's gradient for an
    all-ones output gradient."""
    batch = batch.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        output, state = layer(batch)
    results = [output] + list(state if isinstance(state, tuple) else (state,))
    if grad:
        output.backward(torch.ones_like(output))
        results.append(batch.grad)
    return [r.detach() for r in results]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("kind, kwargs", [("LSTM", {}), ("LSTM", dict(proj_size=11)), ("GRU", {}), ("RNN", {}),
                                          ("RNN", dict(nonlinearity="relu"))],
                         ids=["lstm", "lstm-proj", "gru", "rnn-tanh", "rnn-relu"])
def test_a_sequence_gets_the_same_bits_alone_or_in_a_batch(kind, kwargs, grad, dtype):
    """Each element of a product is one chain of multiply-adds over the depth, whatever tile or thread
    computes it and however many rows the product has, so a sequence's output, final states and input
    gradient must be bit-identical alone (B = 1) and as the first row of a batch of 6 (H = 37: partial
    panels and a partial last depth block). A kernel for few-row steps would have to keep that."""
    _needs_own_gemm(dtype)
    torch.manual_seed(0)
    layer = getattr(lstmfast, kind)(9, 37, **kwargs).to(dtype)
    x = torch.randn(7, 6, 9, dtype=dtype)

    alone, in_batch = (_outputs_and_input_grad(layer, batch, grad) for batch in (x[:, :1], x))
    for one, batched in zip(alone, in_batch):
        assert torch.equal(one, batched[:, :1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("kind, kwargs", [("LSTM", {}), ("LSTM", dict(proj_size=21)), ("GRU", {}), ("RNN", {})],
                         ids=["lstm", "lstm-proj", "gru", "rnn"])
@pytest.mark.parametrize("steps, rows", [(1, 1), (1, 3), (1, 8), (2, 4), (8, 1)])
def test_weights_read_in_place_give_the_packed_bits(steps, rows, kind, kwargs, grad, dtype):
    """A weight that multiplies at most 8 rows in a whole call (steps x rows <= 8: a decoder's one-step
    calls) is read in place, a transposed one (W_ih^T, W_hh^T, W_hr^T) transposed in registers, instead
    of packed first; more rows pack it. Both sum each element in the same order, so a call's rows must
    equal the same sequences' rows in a call of 9 (packed), bit for bit: outputs, final states and the
    input gradient. I = 530 crosses a depth block; H = 70 leaves ragged last panels and blocks."""
    _needs_own_gemm(dtype)
    torch.manual_seed(0)
    layer = getattr(lstmfast, kind)(530, 70, **kwargs).to(dtype)
    x = torch.randn(steps, 9, 530, dtype=dtype)

    in_place, packed = (_outputs_and_input_grad(layer, batch, grad) for batch in (x[:, :rows], x))
    for few, many in zip(in_place, packed):
        assert torch.equal(few, many[:, :rows])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("kind, hidden", [("LSTM", 37), ("GRU", 37), ("RNN", 37), ("RNN", 1)],
                         ids=["lstm", "gru", "rnn", "rnn-h1"])
def test_bias_gradients_have_the_same_bits_whether_or_not_the_weights_train(kind, hidden, packed, dtype):
    """A bias gradient is the column sums of the gate gradients G. Where the weights' gradients are
    asked for too, the CPU makes those sums while it gathers G for G^T x (the input weight's gradient);
    otherwise it sums G on its own. Both follow one fixed order, so freezing the weights must not change
    a bit of the bias gradients. 1440 rows of G: several depth blocks and runs of the sums; H = 1 gives
    RNN a G^T that the product reads as rows, and the sums then come from the separate pass."""
    torch.manual_seed(0)
    layer = getattr(lstmfast, kind)(20, hidden).to(dtype)
    x = torch.randn(60, 24, 20, dtype=dtype)
    lengths = [60 - 2 * i for i in range(24)]
    inp = torch.nn.utils.rnn.pack_padded_sequence(x, lengths) if packed else x
    cotangent = torch.randn((sum(lengths) if packed else 60 * 24), hidden, dtype=dtype)
    biases = []
    for weights_train in (True, False):
        for name, p in layer.named_parameters():
            p.grad = None
            p.requires_grad_(weights_train or name.startswith("bias"))
        out = layer(inp)[0]
        out = out.data if packed else out.reshape(-1, hidden)
        out.backward(cotangent)
        assert (layer.weight_ih_l0.grad is not None) == weights_train
        biases.append([layer.bias_ih_l0.grad, layer.bias_hh_l0.grad])
    for trained, frozen in zip(*biases):
        assert torch.equal(trained, frozen)


def test_reused_workspaces_leave_earlier_results_alone():
    """Scratch buffers are cached per thread and reused: results from earlier calls (held by the caller)
    must stay as they were, and a call must give the same bits after calls of other sizes."""
    def run(hidden, batch):
        sample = layer_sample(steps=30, batch=batch, input_size=16, hidden=hidden, proj=hidden // 2,
                              dtype=torch.float32)
        outputs, grads = outputs_and_grads(sample, functional)
        return outputs + grads

    first = run(64, 24)
    kept = [t.clone() for t in first]
    for hidden, batch in [(200, 40), (16, 3), (128, 64)]:
        run(hidden, batch)
    assert all(torch.equal(a, b) for a, b in zip(first, kept))
    assert all(torch.equal(a, b) for a, b in zip(run(64, 24), kept))


def test_buffer_cache_is_reported_and_emptied():
    """Large CPU buffers (here the saved gates and the gates gradients) are kept for reuse, counted by
    cpu_cache_bytes() and freed by empty_cpu_cache(); the result does not change with the cache."""
    lstmfast.empty_cpu_cache()
    assert lstmfast.cpu_cache_bytes() == 0
    sample = layer_sample(steps=64, batch=16, input_size=32, hidden=128, dtype=torch.float32)
    first = outputs_and_grads(sample, functional)
    held = lstmfast.cpu_cache_bytes()
    assert held >= 64 * 16 * 4 * 128 * 4  # at least the (T B, 4H) gates
    second = outputs_and_grads(sample, functional)
    assert lstmfast.cpu_cache_bytes() == held  # reused, not grown
    lstmfast.empty_cpu_cache()
    assert lstmfast.cpu_cache_bytes() == 0
    third = outputs_and_grads(sample, functional)
    for a, b, c in zip(first[0] + first[1], second[0] + second[1], third[0] + third[1]):
        assert torch.equal(a, b) and torch.equal(a, c)

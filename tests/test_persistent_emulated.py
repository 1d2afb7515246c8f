"""The CUDA persistent kernels' code (csrc/cuda/persistent_body.h) without a GPU: with
LSTMFAST_EMULATE_PERSISTENT="MULTIPROCESSORS,SHARED_MEMORY_PER_BLOCK" the CPU ops run float32 layers
through that very code, one host thread per GPU thread, barriers standing for __syncthreads and the
grid-wide sync (csrc/cpu/persistent_emulator.h). This checks the kernels' indexing, shared-memory
layout, chunking, step order and final states against the float64 reference; it cannot check the GPU's
memory model, occupancy or speed (test_cuda.py and benchmarks/gpu_check.sh do, on a GPU)."""

import pytest
import torch

import lstmfast
from lstmfast import functional, reference

from conftest import layer_sample, outputs_and_grads

# An emulated device: 4 multiprocessors with an H200's shared memory. H=33 then gives 4 blocks of 9
# units, the last with 6: several units per block and a short last block.
SMALL_GPU = "4,232448"
# 4 multiprocessors with 66000 bytes per block: an LSTM with H=100 stages its backward rows in chunks
# (96 of 400 columns); with 56000 bytes a GRU's (128 of 300).
TIGHT_GPU = {"lstm": "4,66000", "gru": "4,56000", "rnn": "4,66000"}
# 8 multiprocessors: H=8 gives one unit per block.
ONE_UNIT_GPU = "8,232448"

CELLS = [dict(cell="lstm"), dict(cell="gru"), dict(cell="rnn", nonlinearity="tanh"),
         dict(cell="rnn", nonlinearity="relu")]
CELL_IDS = ["lstm", "gru", "rnn_tanh", "rnn_relu"]
LAYOUTS = [dict(lengths=None, batch=4), dict(lengths=None, batch=1), dict(lengths=[7, 6, 6, 3, 1]),
           dict(lengths=[5, 5, 5])]


def _float64_copy(sample):
    def convert(t):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            return t
        return t.detach().double().requires_grad_(t.requires_grad)

    return type(sample)(sample.cell, tuple(convert(a) for a in sample.args),
                        {k: convert(v) for k, v in sample.kwargs.items()})


def _assert_norm_close(got, want, bound):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if w is None:
            assert g is None
            continue
        assert torch.isfinite(g).all(), f"tensor {i} is not finite"
        error = (g.double() - w).norm() / w.norm().clamp_min(1e-6)
        assert error <= bound, f"tensor {i}: relative error {error:.3g} > {bound}"


def _check(monkeypatch, device, sample, launches=2, bound=1e-5):
    monkeypatch.setenv("LSTMFAST_EMULATE_PERSISTENT", device)
    before = lstmfast.cuda_persistent_launches()
    out, grads = outputs_and_grads(sample, functional)
    assert lstmfast.cuda_persistent_launches() - before == launches
    want_out, want_grads = outputs_and_grads(_float64_copy(sample), reference)
    _assert_norm_close(out, want_out, bound)
    _assert_norm_close(grads, want_grads, bound)


@pytest.mark.parametrize("variant", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("layout", LAYOUTS, ids=["B4", "B1", "packed", "packed_equal"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_emulated_kernels_match_reference(monkeypatch, variant, layout, reverse):
    sample = layer_sample(**variant, **layout, reverse=reverse, hidden=33, input_size=5, steps=7,
                          dtype=torch.float32)
    _check(monkeypatch, SMALL_GPU, sample)


@pytest.mark.parametrize("variant", CELLS, ids=CELL_IDS)
@pytest.mark.parametrize("options", [dict(state=False, bias=False), dict(grad_clip=0.05)], ids=["bare", "clip"])
def test_emulated_kernels_options(monkeypatch, variant, options):
    sample = layer_sample(**variant, **options, lengths=[6, 5, 2], reverse=True, hidden=33, input_size=5,
                          dtype=torch.float32)
    _check(monkeypatch, SMALL_GPU, sample)


@pytest.mark.parametrize("variant", CELLS[:3], ids=CELL_IDS[:3])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_emulated_kernels_in_chunks(monkeypatch, variant, reverse):
    device = TIGHT_GPU[variant["cell"]]
    sms, smem = map(int, device.split(","))
    plan = lstmfast.ops.persistent_plan(variant["cell"], True, 100, 5, 7, 4, False, False, sms, smem, smem + 1024,
                                        "1")
    chunked = {"lstm": "chunk 96 of 400", "gru": "chunk 128 of 300"}
    if variant["cell"] in chunked:
        assert plan.endswith(chunked[variant["cell"]]), plan
    sample = layer_sample(**variant, lengths=[7, 6, 6, 3, 1], reverse=reverse, hidden=100, input_size=5,
                          dtype=torch.float32)
    _check(monkeypatch, device, sample)


# 4 multiprocessors with just enough shared memory per block for the forward of H=100 to stage h_{t-1}
# in chunks (64 of 100 columns).
TIGHT_FORWARD_GPU = {"lstm": "4,64000", "gru": "4,51000", "rnn": "4,32000"}


@pytest.mark.parametrize("variant", CELLS[:3], ids=CELL_IDS[:3])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_emulated_forward_in_chunks(monkeypatch, variant, reverse):
    """The forward's staging of h_{t-1} in chunks (the tests above chunk only the backward's); the
    backward runs persistent too where the same memory fits it."""
    device = TIGHT_FORWARD_GPU[variant["cell"]]
    sms, smem = map(int, device.split(","))
    plans = [lstmfast.ops.persistent_plan(variant["cell"], backward, 100, 5, 7, 4, False, False, sms, smem,
                                          smem + 1024, "1") for backward in (False, True)]
    assert plans[0].startswith("persistent") and plans[0].endswith("chunk 64 of 100"), plans[0]
    sample = layer_sample(**variant, lengths=[7, 6, 6, 3, 1], reverse=reverse, hidden=100, input_size=5,
                          dtype=torch.float32)
    _check(monkeypatch, device, sample, launches=1 + plans[1].startswith("persistent"))


@pytest.mark.parametrize("variant", CELLS[:3], ids=CELL_IDS[:3])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
def test_emulated_kernels_more_elements_than_threads(monkeypatch, variant, reverse):
    """40 sequences x 9 units per block = 360 elements for 256 threads: a thread's first element (whose
    loads are issued ahead of the step's product) and its later ones; the batch shrinks from 40 to 30
    rows on the way, so some threads' early element exists in one step and not in the next. The staged
    rows (40 x 132 in the LSTM's backward) take more than one round of in-flight loads."""
    sample = layer_sample(**variant, lengths=[5] * 30 + [3] * 10, reverse=reverse, hidden=33, input_size=5,
                          dtype=torch.float32)
    _check(monkeypatch, SMALL_GPU, sample)


@pytest.mark.parametrize("variant", CELLS[:3], ids=CELL_IDS[:3])
def test_emulated_kernels_one_unit_per_block(monkeypatch, variant):
    sample = layer_sample(**variant, lengths=[4, 4, 2], hidden=8, input_size=3, dtype=torch.float32)
    _check(monkeypatch, ONE_UNIT_GPU, sample)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("emulated", ["forward", "backward"])
def test_emulated_kernels_pair_with_time_loops(monkeypatch, emulated, cell):
    """The persistent kernels save what the time loops' backward reads, and read what their forward saves."""
    sample = layer_sample(cell, lengths=[6, 5, 2], reverse=True, hidden=33, input_size=5, dtype=torch.float32)
    want_out, want_grads = outputs_and_grads(_float64_copy(sample), reference)
    before = lstmfast.cuda_persistent_launches()
    if emulated == "forward":
        monkeypatch.setenv("LSTMFAST_EMULATE_PERSISTENT", SMALL_GPU)
    outputs = sample.run(functional)
    if emulated == "forward":
        monkeypatch.delenv("LSTMFAST_EMULATE_PERSISTENT")
    else:
        monkeypatch.setenv("LSTMFAST_EMULATE_PERSISTENT", SMALL_GPU)
    g = torch.Generator().manual_seed(1)  # the cotangents of outputs_and_grads
    cotangents = [torch.randn(o.shape, generator=g, dtype=torch.float64).to(o) for o in outputs]
    grads = torch.autograd.grad(outputs, sample.tensors, cotangents, allow_unused=True)
    assert lstmfast.cuda_persistent_launches() - before == 1
    _assert_norm_close([o.detach() for o in outputs], want_out, 1e-5)
    _assert_norm_close(list(grads), want_grads, 1e-5)


def test_emulation_falls_back_where_kernels_do_not_apply(monkeypatch):
    """float64 and projection take the time loops (no launch), and results stay right."""
    for kw, bound in ((dict(dtype=torch.float64), 1e-10), (dict(dtype=torch.float32, proj=4), 1e-5)):
        sample = layer_sample("lstm", hidden=12, **kw)
        _check(monkeypatch, SMALL_GPU, sample, launches=0, bound=bound)


def test_bad_emulation_setting_is_refused(monkeypatch):
    monkeypatch.setenv("LSTMFAST_EMULATE_PERSISTENT", "lots")
    sample = layer_sample("lstm", dtype=torch.float32)
    with pytest.raises(RuntimeError, match="LSTMFAST_EMULATE_PERSISTENT must be 'multiprocessors,"):
        sample.run(functional)

"""When the persistent CUDA kernels run a layer (csrc/kernels/persistent_plan.h), asked without a GPU
through the op lstmfast::persistent_plan with a device's limits. Whether the kernels compute the
right thing is test_cuda.py's job (on a GPU)."""

import re

import pytest
import torch

import lstmfast
from lstmfast import ops

# An H200 (and H100 SXM): 132 multiprocessors, 227 KiB of shared memory per block (opt-in), 228 KiB per SM.
H200 = dict(sm_count=132, smem_per_block=232448, smem_per_sm=233472)
# An A100: 108 multiprocessors, 163 KiB per block, 164 KiB per SM.
A100 = dict(sm_count=108, smem_per_block=166912, smem_per_sm=167936)


def plan(cell="lstm", backward=False, hidden=256, batch=8, steps=100, element_size=4, projection=False,
         norms=False, device=H200, mode="1"):
    return ops.persistent_plan(cell, backward, hidden, batch, steps, element_size, projection, norms,
                               device["sm_count"], device["smem_per_block"], device["smem_per_sm"], mode)


def geometry(text):
    m = re.fullmatch(r"persistent: (\d+) blocks x (\d+) units, (\d+) bytes of shared memory, chunk (\d+) of (\d+)",
                     text)
    assert m, text
    return dict(zip(("blocks", "units", "smem", "chunk", "depth"), map(int, m.groups())))


def test_auto_by_default(monkeypatch):
    """Unset (or empty) means auto: the persistent kernels where they measured faster; "0" never;
    "1" wherever they fit."""
    big = dict(hidden=1024, batch=16)  # fits, but auto leaves it to the default path
    for value in (None, "", "auto"):
        if value is None:
            monkeypatch.delenv("LSTMFAST_CUDA_PERSISTENT", raising=False)
        else:
            monkeypatch.setenv("LSTMFAST_CUDA_PERSISTENT", value)
        assert plan(mode="").startswith("persistent: ")
        assert plan(mode="", **big).startswith("default: each step stages 16384 values per block")
    monkeypatch.setenv("LSTMFAST_CUDA_PERSISTENT", "0")
    assert plan(mode="") == "default: LSTMFAST_CUDA_PERSISTENT is 0"
    monkeypatch.setenv("LSTMFAST_CUDA_PERSISTENT", "1")
    assert plan(mode="", **big).startswith("persistent: ")


def test_bad_mode_is_refused(monkeypatch):
    with pytest.raises(RuntimeError, match="LSTMFAST_CUDA_PERSISTENT must be 0, 1 or auto, but got 'yes'"):
        plan(mode="yes")
    monkeypatch.setenv("LSTMFAST_CUDA_PERSISTENT", "on")
    with pytest.raises(RuntimeError, match="but got 'on'"):
        plan(mode="")


@pytest.mark.parametrize("kw,why", [
    (dict(element_size=8), "only float32, float16 and bfloat16"),
    (dict(projection=True), "proj_size is not supported"),
    (dict(norms=True, backward=True), "per-step gradient norms are not supported"),
    (dict(steps=0), "an empty sequence"),
    (dict(hidden=4096), "bytes of shared memory per block"),
    (dict(hidden=2048, batch=16), "bytes of shared memory per block"),
    (dict(batch=65, hidden=8, mode="auto"), "batch 65 > 64 (auto)"),
    (dict(batch=64, hidden=256, mode="auto"), "each step stages 16384 values per block, more than 8192"),
    (dict(batch=16, hidden=1024, backward=True, mode="auto"), "stages 65536 values per block, more than 32768"),
    (dict(hidden=1024, batch=200), "output tiles"),
])
def test_refusals_say_why(kw, why):
    text = plan(**kw)
    assert text.startswith("default: ") and why in text, text


def test_bad_cell_is_refused():
    with pytest.raises(RuntimeError, match="expected cell 'lstm', 'gru' or 'rnn', but got 'lstm2'"):
        plan(cell="lstm2")


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
def test_gru_runs_only_when_forced(backward):
    """The GRU kernels have not run on a GPU: auto leaves GRU to the per-step path, "1" runs them."""
    assert plan("gru", backward, 256, 1, mode="auto") == (
        "default: GRU has not been measured on a GPU yet (auto); LSTMFAST_CUDA_PERSISTENT=1 runs it")
    g = geometry(plan("gru", backward, 256, 1, mode="1"))
    assert g["depth"] == (3 * 256 if backward else 256)


@pytest.mark.parametrize("device", [H200, A100], ids=["h200", "a100"])
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("element_size", [2, 4], ids=["16bit", "f32"])
@pytest.mark.parametrize("hidden", [1, 33, 256, 301, 512, 1024])
@pytest.mark.parametrize("batch", [1, 5, 16, 64])
def test_geometry_fits_the_device(device, cell, backward, element_size, hidden, batch):
    """Whatever it chooses covers every unit, fits the device's shared memory, and is resident at once
    with one block per multiprocessor."""
    text = plan(cell, backward, hidden, batch, 50, element_size, device=device)
    if text.startswith("default: "):
        assert "shared memory" in text, text  # the only refusal this grid can meet
        # Only the largest layers (the block's slice of W_hh and the staged rows do not fit the chip's
        # shared memory): float32 LSTMs at H = 1024 (any LSTM on an A100), float32 GRUs on an A100.
        assert hidden == 1024 and (element_size == 4 or device is A100), text
        assert cell == "lstm" or (cell == "gru" and device is A100 and element_size == 4), text
        return
    g = geometry(text)
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    assert g["blocks"] * g["units"] >= hidden > (g["blocks"] - 1) * g["units"]
    assert g["blocks"] <= device["sm_count"]
    assert g["smem"] <= device["smem_per_block"] and g["smem"] + 1024 <= device["smem_per_sm"]
    assert g["depth"] == (gates * hidden if backward else hidden)
    assert 1 <= g["chunk"] <= g["depth"] and (g["chunk"] == g["depth"] or g["chunk"] % 32 == 0)
    # The block's weights alone: rows x depth elements.
    rows = g["units"] if backward else gates * g["units"]
    assert g["smem"] >= rows * g["depth"] * element_size


def test_h200_targets_fit():
    """The issue's targets (float32 and bfloat16 LSTM, H up to 1024, B <= 16) all fit the persistent
    kernels on an H200, forward and backward."""
    for element_size in (2, 4):
        for hidden in (256, 512, 1024):
            for backward in (False, True):
                text = plan("lstm", backward, hidden, 16, 512, element_size, mode="1")
                assert text.startswith("persistent: "), (element_size, hidden, backward, text)


# Where auto took the persistent kernels in the H200 measurement (T = 512; benchmarks/results/
# persistent_h200_c2003e8): (cell, backward, batch, hidden) -> persistent or not.
AUTO_H200 = {
    ("lstm", False, 1, 1024): True, ("lstm", True, 1, 1024): True,
    ("lstm", False, 16, 512): True, ("lstm", True, 16, 512): True,
    ("lstm", False, 16, 1024): False, ("lstm", True, 16, 1024): False,
    ("lstm", False, 64, 256): False, ("lstm", True, 64, 256): False,
    ("rnn", False, 16, 512): True, ("rnn", True, 16, 1024): True,
    ("rnn", False, 16, 1024): False, ("rnn", True, 64, 512): True,
    ("rnn", False, 64, 256): False, ("rnn", True, 64, 1024): False,
}


@pytest.mark.parametrize("case", sorted(AUTO_H200), ids=lambda c: f"{c[0]}-{'bwd' if c[1] else 'fwd'}-B{c[2]}-H{c[3]}")
@pytest.mark.parametrize("element_size", [2, 4], ids=["16bit", "f32"])
def test_auto_follows_the_h200_measurement(case, element_size):
    cell, backward, batch, hidden = case
    text = plan(cell, backward, hidden, batch, 512, element_size, mode="auto")
    assert text.startswith("persistent: ") == AUTO_H200[case], text


def test_cpu_ops_never_launch_persistent_kernels(monkeypatch):
    monkeypatch.setenv("LSTMFAST_CUDA_PERSISTENT", "1")
    before = lstmfast.cuda_persistent_launches()
    m = lstmfast.LSTM(4, 8)
    out, _ = m(torch.randn(5, 2, 4))
    out.sum().backward()
    assert lstmfast.cuda_persistent_launches() == before

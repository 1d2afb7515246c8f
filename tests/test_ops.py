"""The raw ops: torch.library.opcheck (schema, fake, dispatch) and argument validation; the GRU ops
against lstmfast.reference.gru (the LSTM / RNN ops are compared through lstmfast.functional elsewhere)."""

import dataclasses

import pytest
import torch

from lstmfast._ops import ops

from conftest import DEVICES, TOLERANCES, assert_all_close, layer_sample, outputs_and_grads, raw_ops
from lstmfast import reference


def lstm_forward_args(sample, training):
    x, w_ih, w_hh, b_ih, b_hh = sample.args
    k = sample.kwargs
    return (x, k.get("batch_sizes"), k.get("h0"), k.get("c0"), w_ih, w_hh, b_ih, b_hh, k.get("w_hr"),
            k["reverse"], training)


def rnn_forward_args(sample):
    x, w_ih, w_hh, b_ih, b_hh = sample.args
    k = sample.kwargs
    return (x, k.get("batch_sizes"), k.get("h0"), w_ih, w_hh, b_ih, b_hh, k["nonlinearity"], k["reverse"])


def gru_forward_args(sample, training):
    x, w_ih, w_hh, b_ih, b_hh = sample.args
    k = sample.kwargs
    return (x, k.get("batch_sizes"), k.get("h0"), w_ih, w_hh, b_ih, b_hh, k["reverse"], training)


CASES = [
    dict(),
    dict(lengths=[4, 3, 1], reverse=True),
    dict(proj=3, state=False),
    dict(bias=False, reverse=True),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=["padded", "packed-rev", "proj-nostate", "nobias-rev"])
def test_opcheck_lstm(case, device):
    sample = layer_sample("lstm", requires_grad=False, device=device, **case)
    for training in (False, True):
        torch.library.opcheck(ops.lstm_forward, lstm_forward_args(sample, training))
    args = lstm_forward_args(sample, True)
    output, h_n, c_n, gates, cells = ops.lstm_forward(*args)
    x, batch_sizes, h0, c0, w_ih, w_hh, _, _, w_hr, reverse, _ = args
    for mask, norms, clip in (([True] * 4, False, None), ([True, False, True, False], True, 0.5)):
        torch.library.opcheck(ops.lstm_backward, (
            torch.randn_like(output), torch.randn_like(h_n), None, x, batch_sizes, h0, c0, w_ih, w_hh,
            w_hr, output, gates, cells, reverse, mask, clip, norms))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("case", CASES[:2] + CASES[3:], ids=["padded", "packed-rev", "nobias-rev"])
def test_opcheck_rnn(case, nonlinearity, device):
    sample = layer_sample("rnn", requires_grad=False, nonlinearity=nonlinearity, device=device, **case)
    args = rnn_forward_args(sample)
    torch.library.opcheck(ops.rnn_forward, args)
    output, h_n = ops.rnn_forward(*args)
    x, batch_sizes, h0, w_ih, w_hh, _, _, nl, reverse = args
    for mask, norms, clip in (([True] * 4, False, None), ([False, True, True, True], True, 0.25)):
        torch.library.opcheck(ops.rnn_backward, (
            torch.randn_like(output), None, x, batch_sizes, h0, w_ih, w_hh, output, nl, reverse, mask,
            clip, norms))


def _lstm_call(**changes):
    """Calls lstm_forward on a valid packed sample with some arguments replaced."""
    s = layer_sample("lstm", requires_grad=False, lengths=[3, 2, 2])
    x, w_ih, w_hh, b_ih, b_hh = s.args
    args = dict(input=x, batch_sizes=s.kwargs["batch_sizes"], h0=s.kwargs["h0"], c0=s.kwargs["c0"],
                w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, w_hr=None, reverse=False, training=True)
    args.update(changes)
    return ops.lstm_forward(*args.values())


BAD_LSTM = {
    "input-dims": (dict(input=torch.randn(7, 4, 1, dtype=torch.float64)),
                   "expected input of shape \\(N, I\\) \\(2-D, packed rows\\) when batch_sizes is given, but got a 3-D"),
    "padded-dims": (dict(input=torch.randn(7, 4, dtype=torch.float64), batch_sizes=None, h0=None, c0=None),
                    "expected input of shape \\(T, B, I\\) \\(3-D\\) when batch_sizes is not given"),
    "input-size": (dict(input=torch.randn(7, 5, dtype=torch.float64)),
                   "expected w_ih of shape \\[24, 5\\], but got \\[24, 4\\]"),
    "rows": (dict(input=torch.randn(8, 4, dtype=torch.float64)),
             "expected input to have sum\\(batch_sizes\\) = 7 rows, but got 8"),
    "int-dtype": (dict(input=torch.ones(7, 4, dtype=torch.int64)),
                  "expected input of dtype float32, float64, bfloat16 or float16 on cpu, but got Long"),
    "half-cpu-mixed": (dict(input=torch.ones(7, 4, dtype=torch.float16)),
                       "expected h0 to have dtype Half \\(the dtype of input\\), but got Double"),
    "mixed-dtype": (dict(w_hh=torch.randn(24, 6, dtype=torch.float32)),
                    "expected w_hh to have dtype Double \\(the dtype of input\\), but got Float"),
    "w_hh-shape": (dict(w_hh=torch.randn(23, 6, dtype=torch.float64)),
                   "expected w_hh of shape \\(4\\*hidden_size, proj_size or hidden_size\\)"),
    "bias-shape": (dict(b_ih=torch.randn(23, dtype=torch.float64)),
                   "expected b_ih of shape \\[24\\], but got \\[23\\]"),
    "h0-shape": (dict(h0=torch.randn(2, 6, dtype=torch.float64)),
                 "expected h0 of shape \\[3, 6\\], but got \\[2, 6\\]"),
    "c0-shape": (dict(c0=torch.randn(3, 5, dtype=torch.float64)),
                 "expected c0 of shape \\[3, 6\\], but got \\[3, 5\\]"),
    "w_hr-shape": (dict(w_hr=torch.randn(6, 6, dtype=torch.float64)),
                   "expected w_hr of shape \\(proj_size, hidden_size=6\\) with 0 < proj_size < hidden_size"),
    "batch_sizes-increasing": (dict(batch_sizes=torch.tensor([2, 3, 2])),
                               "expected batch_sizes to be non-increasing, but batch_sizes\\[1\\] = 3 > batch_sizes\\[0\\] = 2"),
    "batch_sizes-zero": (dict(batch_sizes=torch.tensor([3, 4, 0])),
                         "expected batch_sizes to be non-increasing|expected every batch_sizes entry to be positive"),
    "batch_sizes-nonpositive": (dict(batch_sizes=torch.tensor([7, 0])),
                                "expected every batch_sizes entry to be positive, but batch_sizes\\[1\\] = 0"),
    "batch_sizes-dtype": (dict(batch_sizes=torch.tensor([3.0, 2.0, 2.0])),
                          "expected batch_sizes to be a 1-D int64 tensor on the CPU, but got a 1-D Float"),
    "batch_sizes-dims": (dict(batch_sizes=torch.tensor([[3, 2, 2]])),
                         "expected batch_sizes to be a 1-D int64 tensor on the CPU, but got a 2-D"),
}


@pytest.mark.parametrize("case", BAD_LSTM)
def test_lstm_bad_input(case):
    changes, match = BAD_LSTM[case]
    with pytest.raises(RuntimeError, match=match):
        _lstm_call(**changes)


def test_rnn_bad_nonlinearity():
    s = layer_sample("rnn", requires_grad=False)
    args = list(rnn_forward_args(s))
    args[7] = "sigmoid"
    with pytest.raises(RuntimeError, match="expected nonlinearity 'tanh' or 'relu', but got 'sigmoid'"):
        ops.rnn_forward(*args)


def test_backward_bad_saved_tensors():
    s = layer_sample("lstm", requires_grad=False)
    x, w_ih, w_hh, b_ih, b_hh = s.args
    output, h_n, c_n, gates, cells = ops.lstm_forward(x, None, None, None, w_ih, w_hh, b_ih, b_hh, None,
                                                      False, True)
    with pytest.raises(RuntimeError, match="expected gates of shape \\[15, 24\\], but got \\[14, 24\\]"):
        ops.lstm_backward(output, None, None, x, None, None, None, w_ih, w_hh, None, output, gates[:14],
                          cells, False, [True] * 4, None, False)
    with pytest.raises(RuntimeError, match="expected grad_output of shape \\[5, 3, 6\\], but got \\[4, 3, 6\\]"):
        ops.lstm_backward(output[:4], None, None, x, None, None, None, w_ih, w_hh, None, output, gates,
                          cells, False, [True] * 4, None, False)
    # (B, T, H) for a (T, B, ...) input: as many rows of the same size, read as (T, B, H) they would
    # give wrong gradients
    with pytest.raises(RuntimeError, match="expected grad_output of shape \\[5, 3, 6\\], but got \\[3, 5, 6\\]"):
        ops.lstm_backward(output.transpose(0, 1).contiguous(), None, None, x, None, None, None, w_ih, w_hh, None,
                          output, gates, cells, False, [True] * 4, None, False)
    with pytest.raises(RuntimeError, match="expected output of shape \\[5, 3, 6\\], but got \\[15, 6\\]"):
        ops.lstm_backward(output, None, None, x, None, None, None, w_ih, w_hh, None, output.reshape(15, 6),
                          gates, cells, False, [True] * 4, None, False)
    with pytest.raises(RuntimeError, match="expected grad_clip > 0, but got -1"):
        ops.lstm_backward(output, None, None, x, None, None, None, w_ih, w_hh, None, output, gates,
                          cells, False, [True] * 4, -1.0, False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES[:2] + CASES[3:] + [dict(state=False)],
                         ids=["padded", "packed-rev", "nobias-rev", "nostate"])
def test_opcheck_gru(case, device):
    sample = layer_sample("gru", requires_grad=False, device=device, **case)
    for training in (False, True):
        torch.library.opcheck(ops.gru_forward, gru_forward_args(sample, training))
    args = gru_forward_args(sample, True)
    output, h_n, gates = ops.gru_forward(*args)
    x, batch_sizes, h0, w_ih, w_hh, _, _, reverse, _ = args
    for mask, norms, clip in (([True] * 4, False, None), ([True, False, True, False], True, 0.5),
                              ([False, True, False, True], False, None)):
        torch.library.opcheck(ops.gru_backward, (
            torch.randn_like(output), torch.randn_like(h_n), x, batch_sizes, h0, w_ih, w_hh, output, gates,
            reverse, mask, clip, norms))


# Every row layout and option of one layer; H = 37 leaves a partial last vector at every width.
GRU_CASES = {
    "padded": dict(),
    "packed": dict(lengths=[5, 4, 4, 2, 1]),
    "packed-reverse": dict(lengths=[5, 4, 4, 2, 1], reverse=True),
    "reverse-nostate": dict(reverse=True, state=False),
    "packed-nostate": dict(lengths=[3, 3, 1], state=False),
    "nobias": dict(bias=False),
    "batch1": dict(batch=1),
    "steps1": dict(steps=1, reverse=True),
    "clip": dict(grad_clip=0.05),
    "clip-packed-reverse": dict(grad_clip=0.02, lengths=[6, 5, 2], reverse=True),
    "wide": dict(hidden=37, input_size=9, batch=4),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", GRU_CASES.values(), ids=GRU_CASES.keys())
def test_gru_ops_match_reference(case, dtype):
    """Output, final state and every gradient (input, h0, both weights, both biases) of the raw ops
    against autograd through lstmfast.reference.gru, which equals torch.nn.GRU."""
    sample = layer_sample("gru", dtype=dtype, **case)
    with torch.no_grad():
        sample.args[0].mul_(3)  # large enough inputs to saturate some gates (and to clip)
    out, grads = outputs_and_grads(sample, raw_ops)
    ref_out, ref_grads = outputs_and_grads(sample, reference)
    assert all(g is not None for g in ref_grads)
    assert_all_close(out, ref_out, **TOLERANCES[dtype])
    assert_all_close(grads, ref_grads, **TOLERANCES[dtype])


def test_gru_grad_clip_changes_the_gradients():
    """The clip cases above test something: with them the gradients differ from unclipped ones."""
    clipped = layer_sample("gru", grad_clip=0.05)
    with torch.no_grad():
        clipped.args[0].mul_(3)
    plain = dataclasses.replace(clipped, kwargs=dict(clipped.kwargs, grad_clip=None))
    _, with_clip = outputs_and_grads(clipped, raw_ops)
    _, without = outputs_and_grads(plain, raw_ops)
    assert not any(torch.allclose(a, b) for a, b in zip(with_clip, without))


def test_gru_matches_torch_nn():
    """The first layer of torch.nn.GRU with the same weights (the reference's own claim, checked here
    once at the op level)."""
    torch.manual_seed(0)
    m = torch.nn.GRU(5, 7).double()
    x, h0 = torch.randn(6, 3, 5, dtype=torch.float64), torch.randn(1, 3, 7, dtype=torch.float64)
    expected, expected_h = m(x, h0)
    output, h_n, _ = ops.gru_forward(x, None, h0[0], m.weight_ih_l0, m.weight_hh_l0, m.bias_ih_l0,
                                     m.bias_hh_l0, False, False)
    assert_all_close([output, h_n], [expected.detach(), expected_h[0].detach()], **TOLERANCES[torch.float64])


def _gru_backward(sample, mask, return_norms=False, grad_clip=None, seed=1):
    args = gru_forward_args(sample, True)
    x, batch_sizes, h0, w_ih, w_hh, _, _, reverse, _ = args
    with torch.no_grad():
        output, h_n, gates = ops.gru_forward(*args)
    g = torch.Generator().manual_seed(seed)
    grad_output = torch.randn(output.shape, generator=g, dtype=output.dtype)
    grad_h_n = torch.randn(h_n.shape, generator=g, dtype=output.dtype)
    with torch.no_grad():
        return ops.gru_backward(grad_output, grad_h_n, x, batch_sizes, h0, w_ih, w_hh, output, gates,
                                reverse, mask, grad_clip, return_norms), (grad_output, grad_h_n)


@pytest.mark.parametrize("mask", [[True, False, False, False], [False, True, False, False],
                                  [False, False, True, False], [False, False, False, True],
                                  [True, False, True, False], [False, True, False, True]])
def test_gru_output_mask(mask):
    """Gradients asked for equal the full call's; the others come back as distinct empty tensors."""
    sample = layer_sample("gru", lengths=[4, 3, 3, 1], reverse=True, requires_grad=False)
    full, _ = _gru_backward(sample, [True] * 4)
    part, _ = _gru_backward(sample, mask)
    # grad_input, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh: which mask entry each belongs to.
    owners = [0, 1, 2, 2, 3, 3]
    empties = []
    for i, owner in enumerate(owners):
        if mask[owner] or owner == 1:  # the initial state's gradient comes out of the loop anyway
            torch.testing.assert_close(part[i], full[i], rtol=0, atol=0)
        else:
            assert part[i].shape == (0,)
            empties.append(part[i])
    assert len({id(t) for t in empties}) == len(empties)
    assert part[6].shape == (0,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", [dict(), dict(lengths=[5, 3, 3, 1], reverse=True),
                                  dict(lengths=[4, 4, 2], grad_clip=0.05)],
                         ids=["padded", "packed-reverse", "packed-clip"])
def test_gru_norms_match_reference(case, dtype):
    """grad_h_norm[row] = ||dL/dh_t|| of that row: the total gradient arriving at h_t (from the output
    and from step t+1), read from the reference's per-step states."""
    grad_clip = case.pop("grad_clip", None)
    sample = layer_sample("gru", dtype=dtype, **case)
    result, (grad_output, grad_h_n) = _gru_backward(sample, [True] * 4, True, grad_clip)
    norms = result[6]
    assert norms.dtype == dtype
    x, w_ih, w_hh, b_ih, b_hh = sample.args
    k = sample.kwargs
    states = {}

    def on_step(t, new):
        new[0].retain_grad()
        states[t] = new[0]
    output, h_n = reference.gru(x, w_ih, w_hh, b_ih, b_hh, h0=k.get("h0"), batch_sizes=k.get("batch_sizes"),
                                reverse=k["reverse"], grad_clip=grad_clip, on_step=on_step)
    torch.autograd.backward([output, h_n], [grad_output.view_as(output), grad_h_n])
    expected = torch.cat([states[t].grad.norm(dim=1) for t in sorted(states)])
    torch.testing.assert_close(norms, expected, **TOLERANCES[dtype])


def _gru_call(**changes):
    """Calls gru_forward on a valid packed sample with some arguments replaced."""
    s = layer_sample("gru", requires_grad=False, lengths=[3, 2, 2])
    x, w_ih, w_hh, b_ih, b_hh = s.args
    args = dict(input=x, batch_sizes=s.kwargs["batch_sizes"], h0=s.kwargs["h0"], w_ih=w_ih, w_hh=w_hh,
                b_ih=b_ih, b_hh=b_hh, reverse=False, training=True)
    args.update(changes)
    return ops.gru_forward(*args.values())


BAD_GRU = {
    "w_hh-rows": (dict(w_hh=torch.randn(17, 6, dtype=torch.float64)),
                  "gru_forward: expected w_hh of shape \\(3\\*hidden_size, hidden_size\\), but got \\[17, 6\\]"),
    "w_hh-cols": (dict(w_hh=torch.randn(18, 5, dtype=torch.float64)),
                  "expected w_hh of shape \\[18, 6\\], but got \\[18, 5\\]"),
    "w_hh-lstm": (dict(w_hh=torch.randn(24, 6, dtype=torch.float64)),
                  "expected w_hh of shape \\[24, 8\\], but got \\[24, 6\\]"),
    "w_ih-shape": (dict(w_ih=torch.randn(18, 5, dtype=torch.float64)),
                   "expected w_ih of shape \\[18, 4\\], but got \\[18, 5\\]"),
    "b_hh-shape": (dict(b_hh=torch.randn(6, dtype=torch.float64)),
                   "expected b_hh of shape \\[18\\], but got \\[6\\]"),
    "h0-shape": (dict(h0=torch.randn(3, 5, dtype=torch.float64)),
                 "expected h0 of shape \\[3, 6\\], but got \\[3, 5\\]"),
    "mixed-dtype": (dict(b_ih=torch.randn(18, dtype=torch.float32)),
                    "expected b_ih to have dtype Double \\(the dtype of input\\), but got Float"),
    "half-cpu-mixed": (dict(input=torch.ones(7, 4, dtype=torch.float16)),
                       "gru_forward: expected h0 to have dtype Half \\(the dtype of input\\), but got Double"),
    "int-dtype": (dict(input=torch.ones(7, 4, dtype=torch.int64)),
                  "gru_forward: expected input of dtype float32, float64, bfloat16 or float16 on cpu, but got Long"),
    "rows": (dict(input=torch.randn(8, 4, dtype=torch.float64)),
             "expected input to have sum\\(batch_sizes\\) = 7 rows, but got 8"),
}


@pytest.mark.parametrize("case", BAD_GRU)
def test_gru_bad_input(case):
    changes, match = BAD_GRU[case]
    with pytest.raises(RuntimeError, match=match):
        _gru_call(**changes)


def test_gru_backward_bad_saved_tensors():
    s = layer_sample("gru", requires_grad=False)
    x, w_ih, w_hh, b_ih, b_hh = s.args
    output, h_n, gates = ops.gru_forward(x, None, None, w_ih, w_hh, b_ih, b_hh, False, True)
    with pytest.raises(RuntimeError, match="gru_backward: expected gates of shape \\[15, 24\\], but got \\[15, 18\\]"):
        ops.gru_backward(output, None, x, None, None, w_ih, w_hh, output, gates[:, :18], False, [True] * 4,
                         None, False)
    with pytest.raises(RuntimeError, match="gru_backward: expected gates of shape \\[15, 24\\], but got \\[0\\]"):
        inference_gates = ops.gru_forward(x, None, None, w_ih, w_hh, b_ih, b_hh, False, False)[2]
        ops.gru_backward(output, None, x, None, None, w_ih, w_hh, output, inference_gates, False, [True] * 4,
                         None, False)
    with pytest.raises(RuntimeError, match="expected grad_output of shape \\[5, 3, 6\\], but got \\[4, 3, 6\\]"):
        ops.gru_backward(output[:4], None, x, None, None, w_ih, w_hh, output, gates, False, [True] * 4,
                         None, False)
    with pytest.raises(RuntimeError, match="expected grad_output of shape \\[5, 3, 6\\], but got \\[3, 5, 6\\]"):
        ops.gru_backward(output.transpose(0, 1).contiguous(), None, x, None, None, w_ih, w_hh, output, gates, False,
                         [True] * 4, None, False)
    with pytest.raises(RuntimeError, match="expected grad_h_n of shape \\[3, 6\\], but got \\[6\\]"):
        ops.gru_backward(output, h_n[0], x, None, None, w_ih, w_hh, output, gates, False, [True] * 4,
                         None, False)
    with pytest.raises(RuntimeError, match="expected grad_clip > 0, but got -1"):
        ops.gru_backward(output, None, x, None, None, w_ih, w_hh, output, gates, False, [True] * 4,
                         -1.0, False)


@pytest.mark.parametrize("bad,match", [
    (dict(grad_clip=0), "grad_clip must be None or a number > 0"),
    (dict(nonlinearity="gelu"), "nonlinearity must be 'tanh' or 'relu'"),
])
def test_functional_bad_arguments(bad, match):
    from lstmfast import functional
    s = layer_sample("rnn")
    kwargs = dict(s.kwargs) | bad
    with pytest.raises(ValueError, match=match):
        functional.rnn(*s.args, **kwargs)


@pytest.mark.parametrize("grad_clip", [0.0, -1.0, True, "1"])
def test_functions_applied_directly_check_grad_clip(grad_clip):
    """LSTMFunction / GRUFunction / RNNFunction.apply check grad_clip at the call, as lstm() does, not
    only when backward reaches the op (a bool would have been taken as 1)."""
    from lstmfast import functional
    x = torch.randn(3, 2, 2, requires_grad=True)
    w_ih, w_hh = torch.randn(12, 2), torch.randn(12, 3)
    with pytest.raises(ValueError, match="grad_clip must be None or a number > 0"):
        functional.LSTMFunction.apply(x, None, None, None, w_ih, w_hh, None, None, None, False, grad_clip, None)
    with pytest.raises(ValueError, match="grad_clip must be None or a number > 0"):
        functional.GRUFunction.apply(x, None, None, w_ih[:9], w_hh[:9], None, None, False, grad_clip, None)
    with pytest.raises(ValueError, match="grad_clip must be None or a number > 0"):
        functional.RNNFunction.apply(x, None, None, w_ih[:3], w_hh[:3], None, None, "tanh", False, grad_clip, None)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_a_meta_batch_sizes_among_cpu_tensors_is_refused(cell):
    """A meta tensor among a call's selects the Meta kernel (the fake implementation) for CPU tensors
    too: a meta batch_sizes must not make it return uninitialized memory as the result."""
    s = layer_sample(cell, lengths=[3, 2, 1], requires_grad=False)
    x, w_ih, w_hh, b_ih, b_hh = s.args
    h0 = torch.zeros(3, w_hh.shape[1], dtype=x.dtype)
    meta = s.kwargs["batch_sizes"].to("meta")
    with pytest.raises(RuntimeError, match=f"{cell}_forward: expected batch_sizes to be a 1-D int64 tensor on "
                                           f"the CPU, but got one on meta"):
        if cell == "lstm":
            ops.lstm_forward(x, meta, h0, torch.zeros(3, w_hh.shape[1], dtype=x.dtype), w_ih, w_hh, b_ih, b_hh,
                             None, False, True)
        elif cell == "gru":
            ops.gru_forward(x, meta, h0, w_ih, w_hh, b_ih, b_hh, False, True)
        else:
            ops.rnn_forward(x, meta, h0, w_ih, w_hh, b_ih, b_hh, "tanh", False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_opcheck_reduced_precision_inference(cell, dtype):
    """An inference call's empty activations have the dtype the CPU kernels give them (float32), in the
    fake implementation too."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2, 2, generator=g).to(dtype)
    gates = 4 if cell == "lstm" else 3
    w_ih, w_hh = torch.randn(gates * 3, 2, generator=g).to(dtype), torch.randn(gates * 3, 3, generator=g).to(dtype)
    if cell == "lstm":
        op, args = ops.lstm_forward, (x, None, None, None, w_ih, w_hh, None, None, None, False, False)
    else:
        op, args = ops.gru_forward, (x, None, None, w_ih, w_hh, None, None, False, False)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    assert all(t.dtype == torch.float32 for t in op(*args)[3 if cell == "lstm" else 2:])

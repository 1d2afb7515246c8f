"""The raw ops: torch.library.opcheck (schema, fake, dispatch) and argument validation."""

import pytest
import torch

from lstmfast._ops import ops

from conftest import DEVICES, layer_sample


def lstm_forward_args(sample, training):
    x, w_ih, w_hh, b_ih, b_hh = sample.args
    k = sample.kwargs
    return (x, k.get("batch_sizes"), k.get("h0"), k.get("c0"), w_ih, w_hh, b_ih, b_hh, k.get("w_hr"),
            k["reverse"], training)


def rnn_forward_args(sample):
    x, w_ih, w_hh, b_ih, b_hh = sample.args
    k = sample.kwargs
    return (x, k.get("batch_sizes"), k.get("h0"), w_ih, w_hh, b_ih, b_hh, k["nonlinearity"], k["reverse"])


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
    with pytest.raises(RuntimeError, match="expected grad_output with 15 rows of size 6"):
        ops.lstm_backward(output[:4], None, None, x, None, None, None, w_ih, w_hh, None, output, gates,
                          cells, False, [True] * 4, None, False)
    with pytest.raises(RuntimeError, match="expected grad_clip > 0, but got -1"):
        ops.lstm_backward(output, None, None, x, None, None, None, w_ih, w_hh, None, output, gates,
                          cells, False, [True] * 4, -1.0, False)


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

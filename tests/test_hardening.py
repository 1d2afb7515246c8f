"""Hardening: bad input everywhere, NaN/Inf, determinism, threads, long sequences and 64-bit sizes,
DistributedDataParallel and serialization.

(The hypothesis tests of random shapes and options are in test_properties.py.)
"""

import copy
import io
import os
import pickle
import socket
import threading
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_sequence

import lstmfast
from lstmfast import functional, reference
from lstmfast._ops import ops

from conftest import (DEVICES, TOLERANCES, assert_all_close, assert_same_bits_across_threads, layer_sample,
                      module_run, outputs_and_grads)

F64 = torch.float64


def _f64(*shape, device="cpu"):
    return torch.randn(*shape, dtype=F64, device=device)


# ------------------------------------------------------------------------------------------------
# Bad input: functional.lstm / functional.rnn (every error names the argument, expected and received)


def _lstm_kwargs(device="cpu", **changes):
    """A valid functional.lstm call (T=5, B=3, I=4, H=6) with some arguments replaced."""
    s = layer_sample("lstm", requires_grad=False, device=device)
    x, w_ih, w_hh, b_ih, b_hh = s.args
    kw = dict(input=x, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih, b_hh=b_hh, h0=s.kwargs["h0"], c0=s.kwargs["c0"])
    kw.update(changes)
    return kw


BAD_FUNCTIONAL_LSTM = {
    "input-2d": (dict(input=_f64(5, 4)),
                 r"expected input of shape \(T, B, I\) \(3-D\) when batch_sizes is not given, but got a 2-D tensor of shape \[5, 4\]"),
    "input-4d": (dict(input=_f64(5, 3, 4, 1)), r"\(3-D\) when batch_sizes is not given, but got a 4-D"),
    "input-size": (dict(input=_f64(5, 3, 7)), r"expected w_ih of shape \[24, 7\], but got \[24, 4\]"),
    "w_ih-1d": (dict(w_ih=_f64(24)), r"expected w_ih of shape \[24, 4\], but got \[24\]"),
    "w_ih-rows": (dict(w_ih=_f64(20, 4)), r"expected w_ih of shape \[24, 4\], but got \[20, 4\]"),
    "w_hh-1d": (dict(w_hh=_f64(24)), r"expected w_hh of shape \(4\*hidden_size, proj_size or hidden_size\), but got \[24\]"),
    "w_hh-cols": (dict(w_hh=_f64(24, 5), h0=_f64(3, 5)), r"expected w_hh of shape \[24, 6\], but got \[24, 5\]"),
    "b_hh-2d": (dict(b_hh=_f64(24, 1)), r"expected b_hh of shape \[24\], but got \[24, 1\]"),
    "h0-3d": (dict(h0=_f64(1, 3, 6)), r"expected h0 of shape \[3, 6\], but got \[1, 3, 6\]"),
    "c0-batch": (dict(c0=_f64(4, 6)), r"expected c0 of shape \[3, 6\], but got \[4, 6\]"),
    "h0-dtype": (dict(h0=torch.randn(3, 6)), r"expected h0 to have dtype Double \(the dtype of input\), but got Float"),
    "b_ih-dtype": (dict(b_ih=torch.randn(24)), r"expected b_ih to have dtype Double \(the dtype of input\), but got Float"),
    "input-int": (dict(input=torch.ones(5, 3, 4, dtype=torch.int32)), r"expected input of dtype float32, float64, bfloat16 or float16 on cpu, but got Int"),
    # (a complex layer runs lstmfast.reference, as torch.nn runs it on its native path)
    "input-complex": (dict(input=torch.ones(5, 3, 4, dtype=torch.complex128)), r"lstmfast.lstm: expected h0 to have dtype torch.complex128 \(the dtype of input\), but got torch.float64"),
    "input-bf16-cpu": (dict(input=torch.ones(5, 3, 4, dtype=torch.bfloat16)), r"expected h0 to have dtype BFloat16 \(the dtype of input\), but got Double"),
    "w_hr-too-wide": (dict(w_hr=_f64(6, 6)), r"expected w_hr of shape \(proj_size, hidden_size=6\) with 0 < proj_size < hidden_size, but got \[6, 6\]"),
    "w_hr-hidden": (dict(w_hr=_f64(2, 5)), r"expected w_hr of shape \(proj_size, hidden_size=6\) with 0 < proj_size < hidden_size, but got \[2, 5\]"),
    "w_hr-w_hh": (dict(w_hr=_f64(2, 6)), r"expected w_hh of shape \[24, 2\], but got \[24, 6\]"),
    # packed layout
    "packed-3d": (dict(input=_f64(7, 1, 4), batch_sizes=torch.tensor([3, 2, 2]), h0=None, c0=None),
                  r"expected input of shape \(N, I\) \(2-D, packed rows\) when batch_sizes is given, but got a 3-D"),
    "packed-rows": (dict(input=_f64(6, 4), batch_sizes=torch.tensor([3, 2, 2])),
                    r"expected input to have sum\(batch_sizes\) = 7 rows, but got 6"),
    "batch_sizes-int32": (dict(input=_f64(7, 4), batch_sizes=torch.tensor([3, 2, 2], dtype=torch.int32)),
                          r"expected batch_sizes to be a 1-D int64 tensor on the CPU, but got a 1-D Int tensor on cpu"),
    "batch_sizes-float": (dict(input=_f64(7, 4), batch_sizes=torch.tensor([3.0, 2.0, 2.0])),
                          r"expected batch_sizes to be a 1-D int64 tensor on the CPU, but got a 1-D Float"),
    "batch_sizes-0d": (dict(input=_f64(3, 4), batch_sizes=torch.tensor(3)),
                       r"expected batch_sizes to be a 1-D int64 tensor on the CPU, but got a 0-D Long"),
    "batch_sizes-increasing": (dict(input=_f64(7, 4), batch_sizes=torch.tensor([2, 3, 2])),
                               r"expected batch_sizes to be non-increasing, but batch_sizes\[1\] = 3 > batch_sizes\[0\] = 2"),
    "batch_sizes-negative": (dict(input=_f64(7, 4), batch_sizes=torch.tensor([3, -1])),
                             r"expected every batch_sizes entry to be positive, but batch_sizes\[1\] = -1"),
    "batch_sizes-above-B": (dict(input=_f64(8, 4), batch_sizes=torch.tensor([4, 2, 2])),
                            r"expected h0 of shape \[4, 6\], but got \[3, 6\]"),
}


@pytest.mark.parametrize("case", BAD_FUNCTIONAL_LSTM)
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_functional_lstm_bad_input(case, requires_grad):
    changes, match = BAD_FUNCTIONAL_LSTM[case]
    kw = _lstm_kwargs(**changes)
    if requires_grad and kw["w_ih"].is_floating_point():
        kw["w_ih"] = kw["w_ih"].clone().requires_grad_()
    with pytest.raises(RuntimeError, match=match):
        functional.lstm(kw.pop("input"), kw.pop("w_ih"), kw.pop("w_hh"), kw.pop("b_ih"), kw.pop("b_hh"),
                        **kw)


def _rnn_call(**changes):
    s = layer_sample("rnn", requires_grad=False)
    x, w_ih, w_hh, b_ih, b_hh = s.args
    kw = dict(b_ih=b_ih, b_hh=b_hh, h0=s.kwargs["h0"], nonlinearity="tanh") | changes
    return functional.rnn(kw.pop("input", x), kw.pop("w_ih", w_ih), kw.pop("w_hh", w_hh), **kw)


@pytest.mark.parametrize("changes,error,match", [
    (dict(w_hh=_f64(6, 5)), RuntimeError, r"rnn_forward: expected w_hh of shape \[6, 6\], but got \[6, 5\]"),
    (dict(w_hh=_f64(24, 6)), RuntimeError, r"rnn_forward: expected w_hh of shape \[24, 24\], but got \[24, 6\]"),
    (dict(w_ih=_f64(6, 3)), RuntimeError, r"expected w_ih of shape \[6, 4\], but got \[6, 3\]"),
    (dict(h0=_f64(3, 5)), RuntimeError, r"expected h0 of shape \[3, 6\], but got \[3, 5\]"),
    (dict(h0=torch.zeros(3, 6)), RuntimeError, r"expected h0 to have dtype Double \(the dtype of input\), but got Float"),
    (dict(input=_f64(15, 4)), RuntimeError, r"expected input of shape \(T, B, I\) \(3-D\)"),
    (dict(nonlinearity="Tanh"), ValueError, r"nonlinearity must be 'tanh' or 'relu', got 'Tanh'"),
    (dict(nonlinearity=None), ValueError, r"nonlinearity must be 'tanh' or 'relu', got None"),
    (dict(grad_clip=-0.5), ValueError, r"grad_clip must be None or a number > 0, got -0.5"),
    (dict(grad_clip="1"), ValueError, r"grad_clip must be None or a number > 0, got '1'"),
    (dict(grad_clip=True), ValueError, r"grad_clip must be None or a number > 0, got True"),
    (dict(grad_clip=float("nan")), ValueError, r"grad_clip must be None or a number > 0, got nan"),
])
def test_functional_rnn_bad_input(changes, error, match):
    with pytest.raises(error, match=match):
        _rnn_call(**changes)


def _gru_call(**changes):
    s = layer_sample("gru", requires_grad=False)
    x, w_ih, w_hh, b_ih, b_hh = s.args
    kw = dict(b_ih=b_ih, b_hh=b_hh, h0=s.kwargs["h0"]) | changes
    return functional.gru(kw.pop("input", x), kw.pop("w_ih", w_ih), kw.pop("w_hh", w_hh), **kw)


@pytest.mark.parametrize("changes,error,match", [
    (dict(w_hh=_f64(18, 5)), RuntimeError, r"gru_forward: expected w_hh of shape \[18, 6\], but got \[18, 5\]"),
    (dict(w_ih=_f64(18, 3)), RuntimeError, r"gru_forward: expected w_ih of shape \[18, 4\], but got \[18, 3\]"),
    (dict(b_ih=_f64(6)), RuntimeError, r"gru_forward: expected b_ih of shape \[18\], but got \[6\]"),
    (dict(h0=_f64(3, 5)), RuntimeError, r"expected h0 of shape \[3, 6\], but got \[3, 5\]"),
    (dict(h0=torch.zeros(3, 6)), RuntimeError, r"expected h0 to have dtype Double \(the dtype of input\), but got Float"),
    (dict(input=_f64(15, 4)), RuntimeError, r"expected input of shape \(T, B, I\) \(3-D\)"),
    (dict(nonlinearity="tanh"), TypeError, r"unexpected keyword argument 'nonlinearity'"),
    (dict(grad_clip=0), ValueError, r"grad_clip must be None or a number > 0, got 0"),
    (dict(grad_clip=True), ValueError, r"grad_clip must be None or a number > 0, got True"),
    (dict(grad_clip=float("nan")), ValueError, r"grad_clip must be None or a number > 0, got nan"),
])
def test_functional_gru_bad_input(changes, error, match):
    with pytest.raises(error, match=match):
        _gru_call(**changes)


def test_functional_lstm_bad_grad_clip():
    with pytest.raises(ValueError, match=r"grad_clip must be None or a number > 0, got 0"):
        functional.lstm(**_lstm_kwargs(), grad_clip=0)


# ------------------------------------------------------------------------------------------------
# Bad input: raw ops called with inconsistent tensors raise (never read out of bounds)


def _lstm_saved(proj=0, lengths=None):
    s = layer_sample("lstm", requires_grad=False, proj=proj, lengths=lengths)
    x, w_ih, w_hh, b_ih, b_hh = s.args
    k = s.kwargs
    args = dict(input=x, batch_sizes=k.get("batch_sizes"), h0=k["h0"], c0=k["c0"], w_ih=w_ih, w_hh=w_hh,
                w_hr=k.get("w_hr"))
    output, h_n, c_n, gates, cells = ops.lstm_forward(x, args["batch_sizes"], k["h0"], k["c0"], w_ih, w_hh,
                                                      b_ih, b_hh, args["w_hr"], False, True)
    return dict(grad_output=torch.randn_like(output), grad_h_n=torch.randn_like(h_n),
                grad_c_n=torch.randn_like(c_n), **args, output=output, gates=gates, cells=cells,
                reverse=False, output_mask=[True] * 4, grad_clip=None, return_norms=True)


def _lstm_backward(proj=0, lengths=None, **changes):
    args = _lstm_saved(proj, lengths)
    args.update(changes)
    return ops.lstm_backward(*args.values())


BAD_LSTM_BACKWARD = {  # valid sample: T=5, B=3, I=4, H=6, N=15
    "cells-inference": (dict(cells=torch.empty(0, dtype=F64)), r"expected cells of shape \[15, 6\], but got \[0\]"),
    "cells-rows": (dict(cells=_f64(14, 6)), r"expected cells of shape \[15, 6\], but got \[14, 6\]"),
    "gates-width": (dict(gates=_f64(15, 20)), r"expected gates of shape \[15, 24\], but got \[15, 20\]"),
    "gates-dtype": (dict(gates=torch.randn(15, 24)), r"expected gates to have dtype Double \(the dtype of input\), but got Float"),
    "output-rows": (dict(output=_f64(4, 3, 6)), r"expected output of shape \[5, 3, 6\], but got \[4, 3, 6\]"),
    "output-width": (dict(output=_f64(5, 3, 5)), r"expected output of shape \[5, 3, 6\], but got \[5, 3, 5\]"),
    "grad_output-big": (dict(grad_output=_f64(6, 3, 6)), r"expected grad_output of shape \[5, 3, 6\], but got \[6, 3, 6\]"),
    "grad_h_n-shape": (dict(grad_h_n=_f64(3, 5)), r"expected grad_h_n of shape \[3, 6\], but got \[3, 5\]"),
    "grad_c_n-shape": (dict(grad_c_n=_f64(2, 6)), r"expected grad_c_n of shape \[3, 6\], but got \[2, 6\]"),
    "grad_c_n-dtype": (dict(grad_c_n=torch.randn(3, 6)), r"expected grad_c_n to have dtype Double"),
    "h0-shape": (dict(h0=_f64(2, 6)), r"expected h0 of shape \[3, 6\], but got \[2, 6\]"),
    "input-rows": (dict(input=_f64(6, 3, 4)), r"expected output of shape \[6, 3, 6\], but got \[5, 3, 6\]"),
    "w_hh-hidden": (dict(w_hh=_f64(28, 7)), r"expected w_ih of shape \[28, 4\], but got \[24, 4\]"),
    "w_hr-extra": (dict(w_hr=_f64(2, 6)), r"expected w_hh of shape \[24, 2\], but got \[24, 6\]"),
    "batch_sizes-batch": (dict(input=_f64(15, 4), batch_sizes=torch.tensor([4, 4, 4, 3])),
                          r"expected h0 of shape \[4, 6\], but got \[3, 6\]"),
    "grad_clip-negative": (dict(grad_clip=-1.0), r"expected grad_clip > 0, but got -1"),
    "grad_clip-zero": (dict(grad_clip=0.0), r"expected grad_clip > 0, but got 0"),
}


@pytest.mark.parametrize("case", BAD_LSTM_BACKWARD)
def test_lstm_backward_inconsistent(case):
    changes, match = BAD_LSTM_BACKWARD[case]
    with pytest.raises(RuntimeError, match=match):
        _lstm_backward(**changes)


def test_lstm_backward_projection_inconsistent():
    # the forward had a projection (P = 3); backward without it sees h of the wrong width
    with pytest.raises(RuntimeError, match=r"expected w_hh of shape \[24, 6\], but got \[24, 3\]"):
        _lstm_backward(proj=3, w_hr=None)
    with pytest.raises(RuntimeError, match=r"expected w_hr of shape \(proj_size, hidden_size=6\)"):
        _lstm_backward(proj=3, w_hr=_f64(3, 5))


def test_lstm_backward_packed_inconsistent():
    with pytest.raises(RuntimeError, match=r"expected batch_sizes to be non-increasing"):
        _lstm_backward(lengths=[3, 2, 2], batch_sizes=torch.tensor([2, 3, 2]))
    with pytest.raises(RuntimeError, match=r"expected input to have sum\(batch_sizes\) = 8 rows, but got 7"):
        _lstm_backward(lengths=[3, 2, 2], batch_sizes=torch.tensor([3, 3, 2]))


def _rnn_saved(**changes):
    s = layer_sample("rnn", requires_grad=False)
    x, w_ih, w_hh, b_ih, b_hh = s.args
    h0 = s.kwargs["h0"]
    output, h_n = ops.rnn_forward(x, None, h0, w_ih, w_hh, b_ih, b_hh, "tanh", False)
    args = dict(grad_output=torch.randn_like(output), grad_h_n=torch.randn_like(h_n), input=x,
                batch_sizes=None, h0=h0, w_ih=w_ih, w_hh=w_hh, output=output, nonlinearity="tanh",
                reverse=False, output_mask=[True] * 4, grad_clip=None, return_norms=True)
    args.update(changes)
    return ops.rnn_backward(*args.values())


@pytest.mark.parametrize("changes,match", [
    (dict(output=_f64(5, 3, 5)), r"rnn_backward: expected output of shape \[5, 3, 6\], but got \[5, 3, 5\]"),
    (dict(output=_f64(14, 6)), r"expected output of shape \[5, 3, 6\], but got \[14, 6\]"),
    (dict(grad_output=_f64(5, 2, 6)), r"expected grad_output of shape \[5, 3, 6\], but got \[5, 2, 6\]"),
    (dict(grad_h_n=_f64(3, 7)), r"expected grad_h_n of shape \[3, 6\], but got \[3, 7\]"),
    (dict(h0=torch.zeros(3, 6)), r"expected h0 to have dtype Double"),
    (dict(nonlinearity="sigmoid"), r"rnn_backward: expected nonlinearity 'tanh' or 'relu', but got 'sigmoid'"),
    (dict(grad_clip=-2.0), r"expected grad_clip > 0, but got -2"),
    (dict(w_hh=_f64(24, 6)), r"expected w_hh of shape \[24, 24\], but got \[24, 6\]"),
])
def test_rnn_backward_inconsistent(changes, match):
    with pytest.raises(RuntimeError, match=match):
        _rnn_saved(**changes)


# ------------------------------------------------------------------------------------------------
# 64-bit sizes. Tensors past 2^31 elements cannot be allocated in a test, so these check the layout
# arithmetic with stride-0 (expanded) inputs, which hold one element whatever their shape: the ops
# compute and check the row layout before touching any data or allocating anything.


def test_layout_sums_past_2_pow_32_rows():
    big = 2**31 - 1
    x = torch.zeros(1, 4, dtype=F64).expand(2**32 + 1, 4)  # 2^32 + 1 rows, one stored element row
    s = layer_sample("lstm", requires_grad=False)
    _, w_ih, w_hh, _, _ = s.args
    # A 32-bit sum would wrap to 0 (or a negative number); the message shows the exact 64-bit sum.
    with pytest.raises(RuntimeError, match=r"expected input to have sum\(batch_sizes\) = 4294967296 rows, but got 4294967297"):
        ops.lstm_forward(x, torch.tensor([big, big, 2]), None, None, w_ih, w_hh, None, None, None, False, True)


def test_layout_rows_beyond_blas_limit_raise():
    """More rows than BLAS's 32-bit sizes take: a clear error, before any allocation."""
    s = layer_sample("lstm", requires_grad=False)
    _, w_ih, w_hh, _, _ = s.args
    x = torch.zeros(1, 1, 4, dtype=F64).expand(2**20, 2**11 + 1, 4)  # T*B = 2^31 + 2^20 rows
    with pytest.raises(RuntimeError, match=r"expected at most 2147483647 rows \(sum\(batch_sizes\), or T\*B\), the largest size BLAS accepts, but got 2148532224"):
        ops.lstm_forward(x, None, None, None, w_ih, w_hh, None, None, None, False, True)
    s = layer_sample("rnn", requires_grad=False)
    with pytest.raises(RuntimeError, match=r"rnn_forward: expected at most 2147483647 rows"):
        ops.rnn_forward(x, None, None, s.args[1], s.args[2], None, None, "tanh", False)


def test_layout_batch_sizes_int64_overflow():
    s = layer_sample("lstm", requires_grad=False)
    _, w_ih, w_hh, _, _ = s.args
    x = torch.zeros(1, 4, dtype=F64).expand(3, 4)
    with pytest.raises(RuntimeError, match=r"expected sum\(batch_sizes\) to fit in int64, but it overflows at batch_sizes\[1\] = 6917529027641081856"):
        ops.lstm_forward(x, torch.tensor([6 * 2**60] * 3), None, None, w_ih, w_hh, None, None, None, False, True)


def test_fake_shapes_past_2_pow_31_elements():
    """The fake (meta) implementations give exact shapes for tensors of more than 2^31 elements."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    T, B, I, H = 2**16, 2**10, 64, 512  # N = 2^26 rows; gates hold 2^37 elements
    with FakeTensorMode():
        x = torch.empty(T, B, I)
        w_ih, w_hh = torch.empty(4 * H, I), torch.empty(4 * H, H)
        output, h_n, c_n, gates, cells = ops.lstm_forward(x, None, None, None, w_ih, w_hh, None, None, None,
                                                          False, True)
        assert output.shape == (T, B, H) and gates.shape == (T * B, 4 * H) and cells.shape == (T * B, H)
        assert gates.numel() == 2**37
        grads = ops.lstm_backward(output, None, None, x, None, None, None, w_ih, w_hh, None, output, gates,
                                  cells, False, [True] * 4, None, True)
        assert grads[0].shape == x.shape and grads[7].shape == (T * B,)


# ------------------------------------------------------------------------------------------------
# Bad input: modules


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_module_packed_wrong_feature_size_and_dtype(kind):
    # torch.nn's exception types and messages (torch.nn's LSTM does not check packed input at all and
    # fails inside its kernel; lstmfast checks it as torch.nn's RNN does).
    module = getattr(lstmfast, kind)(3, 4, num_layers=2).double()
    with pytest.raises(RuntimeError, match=r"input.size\(-1\) must be equal to input_size. Expected 3, got 5"):
        module(pack_sequence([_f64(3, 5), _f64(2, 5)]))
    # (torch.nn's LSTM fails on packed input of another dtype inside its kernels: a RuntimeError)
    with pytest.raises(RuntimeError if kind == "LSTM" else ValueError,
                       match=r"RNN input dtype \(torch.float32\) does not match weight dtype \(torch.float64\)"):
        module(pack_sequence([torch.randn(3, 3)]))
    packed = pack_sequence([_f64(3, 3), _f64(2, 3)])
    bad = PackedSequence(packed.data.unsqueeze(1), packed.batch_sizes, None, None)
    with pytest.raises(RuntimeError, match=r"input must have 2 dimensions, got 3"):
        module(bad)


@pytest.mark.parametrize("bad,error,match", [
    (lambda m: m([1.0, 2.0]), TypeError, r"LSTM: expected input to be a Tensor or a PackedSequence, got list"),
    (lambda m: m(_f64(5, 2, 3), (torch.zeros(2, 2, 4), torch.zeros(2, 2, 4))), RuntimeError,
     r"hx\[0\] must be a torch.float64 tensor on cpu, got torch.float32 on cpu"),
    (lambda m: m(_f64(5, 2, 3), (torch.zeros(2, 2, 4, dtype=F64), torch.zeros(2, 2, 4, dtype=torch.complex64))),
     RuntimeError, r"hx\[1\] must be a torch.float64 tensor on cpu, got torch.complex64 on cpu"),
    (lambda m: m(_f64(5, 2, 3), (torch.zeros(2, 2, 4, dtype=F64),)), ValueError,
     r"expected hx to be a tuple \(h_0, c_0\), got tuple of \['Tensor'\]"),
    (lambda m: m(_f64(5, 2, 3), (torch.zeros(2, 2, 4, dtype=F64), [0.0])), ValueError,
     r"expected hx to be a tuple \(h_0, c_0\), got tuple of \['Tensor', 'list'\]"),
    (lambda m: m(_f64(5, 2, 3), (_f64(2, 3, 4), _f64(2, 3, 4))), RuntimeError,
     r"Expected hidden\[0\] size \(2, 2, 4\), got \[2, 3, 4\]"),
    (lambda m: m(_f64(5, 2, 3), (_f64(2, 2, 4), _f64(2, 2))), RuntimeError,
     r"For batched 3-D input, hx and cx should also be 3-D but got \(3-D, 2-D\) tensors"),
    (lambda m: m(pack_sequence([_f64(3, 3), _f64(2, 3)]), (_f64(2, 3, 4), _f64(2, 3, 4))), RuntimeError,
     r"Expected hidden\[0\] size \(2, 2, 4\), got \[2, 3, 4\]"),
    (lambda m: m(_f64(5, 2, 3), 1.5), ValueError, r"expected hx to be a tuple \(h_0, c_0\), got float"),
])
def test_lstm_module_bad_hx(bad, error, match):
    module = lstmfast.LSTM(3, 4, num_layers=2).double()
    with pytest.raises(error, match=match):
        bad(module)


@pytest.mark.parametrize("kind", ["GRU", "RNN"])
def test_rnn_and_gru_module_bad_hx(kind):
    module = getattr(lstmfast, kind)(3, 4).double()
    with pytest.raises(RuntimeError, match=rf"{kind}: hx must be a torch.float64 tensor on cpu, got torch.float32"):
        module(_f64(5, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match=rf"{kind}: expected hx to be a tensor, got tuple"):
        module(_f64(5, 2, 3), (_f64(1, 2, 4), _f64(1, 2, 4)))
    with pytest.raises(ValueError, match=rf"{kind}: expected hx to be a tensor, got float"):
        module(_f64(5, 2, 3), 1.5)
    with pytest.raises(RuntimeError, match=r"Expected hidden size \(1, 2, 4\), got \[1, 3, 4\]"):
        module(pack_sequence([_f64(3, 3), _f64(2, 3)]), _f64(1, 3, 4))


# torch.nn's exception types and messages; where torch.nn takes a bool as a size or fails on a float
# inside range() / torch.empty(), lstmfast raises a TypeError naming the argument (README, Guarantees).
@pytest.mark.parametrize("kwargs,error,match", [
    (dict(input_size=-1), ValueError, r"input_size must be greater than zero"),
    (dict(input_size=3.0), TypeError, r"input_size should be of type int, got: float"),
    (dict(hidden_size=True), TypeError, r"hidden_size should be of type int, got: bool"),
    (dict(num_layers=1.0), TypeError, r"num_layers should be of type int, got: float"),
    (dict(dropout=-0.1), ValueError, r"dropout should be a number in range \[0, 1\]"),
    (dict(dropout=float("nan")), ValueError, r"dropout should be a number in range \[0, 1\]"),
    (dict(dropout="0.5"), ValueError, r"dropout should be a number in range \[0, 1\]"),
    (dict(proj_size=-1), ValueError, r"proj_size should be a positive integer or zero to disable projections"),
    (dict(proj_size=2.0), TypeError, r"proj_size should be of type int, got: float"),
    (dict(proj_size=4), ValueError, r"proj_size has to be smaller than hidden_size"),
    (dict(batch_first="False"), TypeError, r"batch_first should be of type bool, got: str"),
    (dict(forget_bias="1"), TypeError, r"forget_bias should be a number, got: str"),
    (dict(grad_clip=-1), ValueError, r"grad_clip must be None or a number > 0, got -1"),
    (dict(grad_clip="a"), ValueError, r"grad_clip must be None or a number > 0, got 'a'"),
    (dict(grad_clip=float("nan")), ValueError, r"grad_clip must be None or a number > 0, got nan"),
])
def test_lstm_constructor_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        lstmfast.LSTM(**(dict(input_size=3, hidden_size=4) | kwargs))


@pytest.mark.parametrize("kwargs,match", [
    (dict(nonlinearity="Tanh"), r"Unknown nonlinearity 'Tanh'. Select from 'tanh' or 'relu'"),
    (dict(nonlinearity=None), r"Unknown nonlinearity 'None'"),
    (dict(proj_size=2), r"proj_size argument is only supported for LSTM, not RNN"),
    (dict(dropout=2), r"dropout should be a number in range \[0, 1\]"),
])
def test_rnn_constructor_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lstmfast.RNN(**(dict(input_size=3, hidden_size=4) | kwargs))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(nonlinearity="tanh"), TypeError, r"unexpected keyword argument 'nonlinearity'"),
    (dict(proj_size=2), ValueError, r"proj_size argument is only supported for LSTM, not RNN or GRU"),
    (dict(dropout=2), ValueError, r"dropout should be a number in range \[0, 1\]"),
    (dict(input_size=3.0), TypeError, r"input_size should be of type int, got: float"),
    (dict(hidden_size=True), TypeError, r"hidden_size should be of type int, got: bool"),
    (dict(num_layers=1.0), TypeError, r"num_layers should be of type int, got: float"),
    (dict(forget_bias=1.0), TypeError, r"unexpected keyword argument 'forget_bias'"),
    (dict(grad_clip="a"), ValueError, r"grad_clip must be None or a number > 0, got 'a'"),
])
def test_gru_constructor_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        lstmfast.GRU(**(dict(input_size=3, hidden_size=4) | kwargs))


# ------------------------------------------------------------------------------------------------
# NaN / Inf propagate exactly as in torch.nn (same NaN pattern in outputs and every gradient)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN-tanh", "RNN-relu"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["input", "h0", "weight", "grad", "grad element", "h_n grad element"])
def test_nonfinite_like_torch_nn(kind, value, where):
    """where="grad": a whole step of the output's gradient non-finite (a relu RNN's units clamped to 0
    there pass 0 on, as torch's threshold_backward selects rather than multiplies); "grad element" and
    "h_n grad element": one element of the output's or of h_n's gradient (the GRU's dL/dn is dh - dh z,
    NaN for an infinite dh, as in torch.nn's cell)."""
    torch.manual_seed(0)
    name, _, nl = kind.partition("-")
    options = dict(input_size=3, hidden_size=4, num_layers=2) | (dict(nonlinearity=nl) if nl else {})
    ours, theirs = getattr(lstmfast, name)(**options).double(), getattr(nn, name)(**options).double()
    if where == "weight":
        with torch.no_grad():
            ours.weight_hh_l0[1, 2] = value
    theirs.load_state_dict(ours.state_dict())
    x = _f64(6, 2, 3)
    h0 = _f64(2, 2, 4)
    if where == "input":
        x[2, 1, 0] = value
    if where == "h0":
        h0[0, 0, 1] = value
    results = []
    for module in (ours, theirs):
        xi, hi = x.clone().requires_grad_(), h0.clone().requires_grad_()
        hx = (hi, torch.zeros_like(hi)) if name == "LSTM" else hi
        out, state = module(xi, hx)
        final = state[0] if name == "LSTM" else state
        grad, final_grad = (torch.randn(t.shape, generator=torch.Generator().manual_seed(1), dtype=t.dtype)
                            for t in (out, final))
        if where == "grad":
            grad[3] = value
        if where == "grad element":
            grad[0, 1, 2] = value  # (step 0: a later step's reaches every gradient, all NaN then)
        if where == "h_n grad element":
            final_grad[0, 1, 0] = value
        torch.autograd.backward([out, final], [grad, final_grad])
        results.append([out.detach(), final.detach(), xi.grad, hi.grad] + [p.grad for p in module.parameters()])
        module.zero_grad()
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a.isnan(), b.isnan()), f"tensor {i}: NaN pattern differs"
        torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-10, atol=1e-10, msg=lambda m: f"tensor {i}: {m}")


def test_nonfinite_with_grad_clip_does_not_hang():
    sample = layer_sample("lstm", steps=4, grad_clip=0.5)
    with torch.no_grad():
        sample.args[0][1, 0, 0] = float("nan")
        sample.args[1][0, 0] = float("inf")
    out, grads = outputs_and_grads(sample, functional)
    ref_out, ref_grads = outputs_and_grads(sample, reference)
    for a, b in zip(out + grads, ref_out + ref_grads):
        torch.testing.assert_close(a, b, equal_nan=True, **TOLERANCES[F64])


# ------------------------------------------------------------------------------------------------
# Determinism (CPU): bitwise-identical results across repeated runs and thread counts


DETERMINISM_CASES = {
    "lstm-f32": dict(cell="lstm", steps=6, batch=96, input_size=64, hidden=128, dtype=torch.float32),
    "lstm-proj-packed-f64": dict(cell="lstm", proj=32, input_size=48, hidden=96, dtype=F64,
                                 lengths=[7] * 40 + [5] * 30 + [2] * 20),
    "rnn-relu-rev-f32": dict(cell="rnn", nonlinearity="relu", steps=6, batch=128, input_size=96, hidden=256,
                             reverse=True, dtype=torch.float32),
    # fewer than 4 rows per thread: a CPU thread team splits the weights' panels instead of the batch
    "lstm-panels-f32": dict(cell="lstm", steps=5, batch=7, input_size=40, hidden=200, dtype=torch.float32),
    "gru-f32": dict(cell="gru", steps=6, batch=96, input_size=64, hidden=128, dtype=torch.float32),
    "gru-packed-rev-f64": dict(cell="gru", input_size=48, hidden=96, dtype=F64, reverse=True,
                               lengths=[7] * 40 + [5] * 30 + [2] * 20),
    "gru-panels-f32": dict(cell="gru", steps=5, batch=7, input_size=40, hidden=200, dtype=torch.float32),
}


@pytest.mark.parametrize("case", DETERMINISM_CASES)
def test_bitwise_deterministic_across_runs_and_threads(case):
    def run():
        return sum(outputs_and_grads(layer_sample(**DETERMINISM_CASES[case], grad_clip=None), functional), [])
    assert_same_bits_across_threads(run, (1, 2, 4, 1, 2))


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_module_bitwise_deterministic_across_threads(kind):
    module = getattr(lstmfast, kind)(32, 64, num_layers=2, bidirectional=True)
    assert_same_bits_across_threads(module_run(module, torch.randn(8, 48, 32)))


# ------------------------------------------------------------------------------------------------
# Python threads: concurrent forward + backward give the sequential results


def test_concurrent_python_threads_match_sequential():
    samples = [dict(cell="lstm", proj=2, seed=1), dict(cell="rnn", nonlinearity="relu", seed=2),
               dict(cell="lstm", lengths=[6, 4, 4, 1], reverse=True, seed=3),
               dict(cell="rnn", steps=30, batch=16, hidden=64, input_size=32, seed=4),
               dict(cell="gru", lengths=[5, 5, 3, 2], reverse=True, seed=5),
               dict(cell="gru", steps=30, batch=16, hidden=64, input_size=32, seed=6)]
    expected = [outputs_and_grads(layer_sample(**s), functional) for s in samples]
    results, errors = {}, []
    barrier = threading.Barrier(len(samples))

    def work(i):
        try:
            barrier.wait()
            for repeat in range(5):
                results[(i, repeat)] = outputs_and_grads(layer_sample(**samples[i]), functional)
        except Exception as error:  # reported below, in the main thread
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(samples))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for (i, _), (out, grads) in results.items():
        assert all(torch.equal(a, b) for a, b in zip(out + grads, expected[i][0] + expected[i][1]))
    assert len(results) == 5 * len(samples)


def test_threads_leave_the_warnings_filters_as_they_were():
    """Layers converted (from_torch) and first called under CPU autocast (which asks torch.nn for its
    result dtypes once per kind of call) in several threads at once: the process's warnings filters
    stay as they were (interleaved warnings.catch_warnings blocks, not thread-safe before Python 3.14,
    left an "ignore everything" filter installed) and warnings still reach the user."""
    def work(k):
        for i in range(12):
            lstmfast.LSTM.from_torch(nn.LSTM(4, 6, num_layers=2))
            with torch.autocast("cpu", dtype=torch.bfloat16):
                lstmfast.GRU(4, 6, num_layers=1 + (i + k) % 6, bidirectional=bool(k % 2))(torch.randn(3, 2, 4))

    work(0)  # (imports that add filters of their own, once)
    before = list(warnings.filters)
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert warnings.filters == before
    with pytest.warns(UserWarning, match="still shown"):
        warnings.warn("still shown")


# ------------------------------------------------------------------------------------------------
# Long sequences: memory saved for backward is linear in T, with a stated number of bytes per step


def _saved_bytes(fn):
    """Total bytes of the distinct storages autograd saves for backward while running fn(). lstmfast's
    CPU buffer cache is emptied first: a larger free block from an earlier call could hold the gates."""
    lstmfast.empty_cpu_cache()
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(storages.values()), result


@pytest.mark.parametrize("cell,proj", [("lstm", 0), ("lstm", 8), ("gru", 0), ("rnn", 0)])
def test_saved_bytes_per_step(cell, proj):
    """LSTM saves input, output, gates, cells: (I + P + 5H) elements per sequence per step; GRU saves
    input, output and gates (r, z, n, W_hn h + b_hn): (I + 5H); RNN saves input and output: (I + H).
    Plus the weights and biases, independent of T (the biases for the reference recomputation of a
    backward that builds a graph)."""
    T, B, I, H = 50, 3, 5, 16
    sample = layer_sample(cell, steps=T, batch=B, input_size=I, hidden=H, proj=proj, state=False,
                          dtype=torch.float32)
    saved, _ = _saved_bytes(lambda: sample.run(functional))
    x, w_ih, w_hh, b_ih, b_hh = sample.args
    P = proj or H
    weights = w_ih.nbytes + w_hh.nbytes + b_ih.nbytes + b_hh.nbytes
    weights += sample.kwargs["w_hr"].nbytes if proj else 0
    per_step = B * {"lstm": I + P + 5 * H, "gru": I + 5 * H, "rnn": I + H}[cell] * 4
    assert saved == T * per_step + weights


@pytest.mark.slow
def test_long_sequence_lstm():
    """T = 100000, B = 1, H = 32: forward + backward complete with (I + 6H) * 4 bytes saved per step
    (float32), and the output equals two chained halves of the sequence."""
    T, I, H = 100_000, 8, 32
    torch.manual_seed(0)
    module = lstmfast.LSTM(I, H)
    x = torch.randn(T, 1, I, requires_grad=True)
    saved, (out, (h, c)) = _saved_bytes(lambda: module(x))
    weights = sum(p.nbytes for p in module.parameters())
    assert saved == T * (I + 6 * H) * 4 + weights
    (out.sum() + h.sum()).backward()
    assert all(torch.isfinite(t).all() for t in [out, x.grad] + [p.grad for p in module.parameters()])
    with torch.no_grad():
        first, state = module(x[: T // 2])
        second, (h2, c2) = module(x[T // 2:], state)
    torch.testing.assert_close(torch.cat([first, second]), out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(h2, h, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# DistributedDataParallel (gloo, 2 processes on the CPU) and serialization


class _DdpNet(nn.Module):
    """Two bidirectional projected lstmfast layers and a linear head; forward returns the mean loss."""

    def __init__(self):
        super().__init__()
        self.rnn = lstmfast.LSTM(3, 5, num_layers=2, bidirectional=True, proj_size=2)
        self.head = nn.Linear(4, 1)

    def forward(self, x):
        out, (h, _) = self.rnn(x)
        return (self.head(out).square().mean(dim=(0, 2)) + h.sum(dim=(0, 2))).mean()


def _ddp_model():
    torch.manual_seed(0)
    return _DdpNet().double()


def _ddp_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(6, 8, 3, generator=g, dtype=F64)  # (T, B, I): each rank takes half the batch


def _ddp_worker(rank, world, port, path):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = DistributedDataParallel(_ddp_model())
        model(_ddp_batch().chunk(world, dim=1)[rank]).backward()  # DDP averages the two halves' grads
        if rank == 0:
            torch.save({n: p.grad for n, p in model.module.named_parameters()}, path)
        dist.barrier()  # neither process tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_distributed_data_parallel_matches_single_process(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    path = str(tmp_path / "grads.pt")
    failures = []
    for _ in range(3):  # the free port can be taken by another program before the workers bind it
        try:
            mp.spawn(_ddp_worker, args=(2, _free_port(), path), nprocs=2, join=True)
            break
        except Exception as error:  # noqa: BLE001 - collected and re-raised below when every try fails
            failures.append(f"{type(error).__name__}: {error}")
    else:
        pytest.fail("DDP workers failed three times:\n" + "\n".join(failures))
    if failures:
        warnings.warn("DDP workers needed another try: " + " | ".join(failures))
    ddp_grads = torch.load(path)
    model = _ddp_model()
    model(_ddp_batch()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], p.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_state_dict_round_trips_with_weights_only_load(kind):
    options = dict(input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    if kind == "LSTM":
        options["proj_size"] = 2
    ours = getattr(lstmfast, kind)(**options, grad_clip=0.5).double()
    buffer = io.BytesIO()
    torch.save(ours.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    theirs = getattr(nn, kind)(**options).double()
    theirs.load_state_dict(state)
    back = getattr(lstmfast, kind)(**options).double()
    back.load_state_dict(theirs.state_dict())
    x = _f64(5, 2, 3)
    torch.testing.assert_close(back(x)[0], ours(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_copies_keep_options_and_train_identically(kind, tmp_path):
    """pickle, deepcopy and torch.save of a module that has been trained keep grad_clip, forget_bias and
    the weights: one more training step gives bitwise-identical gradients."""
    extra = {"LSTM": dict(forget_bias=1.0), "GRU": {}, "RNN": dict(nonlinearity="relu")}[kind]
    module = getattr(lstmfast, kind)(3, 4, num_layers=2, grad_clip=0.01, **extra).double()
    x = _f64(6, 2, 3)
    module(x)[0].square().sum().backward()
    torch.save(module, tmp_path / "m.pt")
    clones = [pickle.loads(pickle.dumps(module)), copy.deepcopy(module),
              torch.load(tmp_path / "m.pt", weights_only=False)]
    for m in [module] + clones:
        m.zero_grad()
        m(x)[0].square().sum().backward()
    for clone in clones:
        assert clone.grad_clip == 0.01 and clone.extra_repr() == module.extra_repr()
        for a, b in zip(clone.parameters(), module.parameters()):
            assert torch.equal(a.grad, b.grad)


# ------------------------------------------------------------------------------------------------
# The GPU path: the same checks with CUDA tensors (skipped without a GPU)

CUDA_ONLY = [d for d in DEVICES if not (isinstance(d, str) and d == "cpu")]


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("case,match", [
    ("w_ih-cpu", r"lstm_forward: expected w_ih on device cuda:0 \(the device of input\), but got cpu"),
    ("h0-cpu", r"lstm_forward: expected h0 on device cuda:0 \(the device of input\), but got cpu"),
    ("input-cpu", r"lstm_forward: expected w_ih on device cpu \(the device of input\), but got cuda:0"),
    ("batch_sizes-cuda", r"expected batch_sizes to be a 1-D int64 tensor on the CPU, but got a 1-D Long tensor on cuda:0"),
    ("input-int", r"expected input of dtype .* on cuda, but got Int"),
    ("w_hh-shape", r"expected w_hh of shape \[24, 6\], but got \[24, 5\]"),
])
def test_cuda_bad_input(device, case, match):
    kw = _lstm_kwargs(device=device)
    if case == "w_ih-cpu":
        kw["w_ih"] = kw["w_ih"].cpu()
    elif case == "h0-cpu":
        kw["h0"] = kw["h0"].cpu()
    elif case == "input-cpu":
        kw["input"] = kw["input"].cpu()
    elif case == "batch_sizes-cuda":
        kw["input"] = kw["input"].reshape(15, 4)
        kw["batch_sizes"] = torch.tensor([3] * 5, device=device)
    elif case == "input-int":
        kw["input"] = kw["input"].int()
    elif case == "w_hh-shape":
        kw["w_hh"] = _f64(24, 5, device=device)
    with pytest.raises(RuntimeError, match=match):
        functional.lstm(kw.pop("input"), kw.pop("w_ih"), kw.pop("w_hh"), kw.pop("b_ih"), kw.pop("b_hh"), **kw)


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_backward_inconsistent(device):
    args = {k: (v.to(device) if isinstance(v, torch.Tensor) and k != "batch_sizes" else v)
            for k, v in _lstm_saved().items()}
    with pytest.raises(RuntimeError, match=r"expected cells of shape \[15, 6\], but got \[14, 6\]"):
        ops.lstm_backward(*(args | dict(cells=args["cells"][:14])).values())
    with pytest.raises(RuntimeError, match=r"expected gates on device cuda:0 \(the device of input\), but got cpu"):
        ops.lstm_backward(*(args | dict(gates=args["gates"].cpu())).values())
    with pytest.raises(RuntimeError, match=r"expected output of shape \[5, 3, 6\], but got \[4, 3, 6\]"):
        ops.lstm_backward(*(args | dict(output=args["output"][:4])).values())


@pytest.mark.parametrize("device", CUDA_ONLY)
def test_cuda_module_bad_hx_and_input(device):
    module = lstmfast.LSTM(3, 4, device=device, dtype=F64)
    with pytest.raises(RuntimeError, match=r"Input and hidden tensors are not at the same device, found input tensor "
                                           r"at cuda:0 and hidden tensor at cpu"):
        module(_f64(5, 2, 3, device=device), (_f64(1, 2, 4), _f64(1, 2, 4)))
    with pytest.raises(RuntimeError, match=r"Input and parameter tensors are not at the same device, found input "
                                           r"tensor at cpu and parameter tensor at cuda:0"):
        module(_f64(5, 2, 3))


@pytest.mark.parametrize("device", CUDA_ONLY)
@pytest.mark.parametrize("kind", ["LSTM", "RNN-relu"])
def test_cuda_nonfinite_like_cpu(device, kind):
    name, _, nl = kind.partition("-")
    options = dict(input_size=3, hidden_size=4) | (dict(nonlinearity=nl) if nl else {})
    module = getattr(lstmfast, name)(**options).double()
    x = _f64(5, 2, 3)
    x[1, 0, 0], x[3, 1, 2] = float("nan"), float("inf")
    want = module(x)[0]
    got = module.to(device)(x.to(device))[0].cpu()
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got, want, equal_nan=True, **TOLERANCES[F64])

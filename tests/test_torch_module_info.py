"""torch's own test data for nn.LSTM, nn.GRU and nn.RNN, run through lstmfast's classes.

The ModuleInfo entries that PyTorch's module tests use (torch.testing._internal.common_modules, as
installed with torch) list, per module, sample constructor and forward inputs and the error cases torch
itself checks. Every sample builds a torch.nn module and an lstmfast module with the same weights; the
outputs, final states and every gradient must agree. Every error case must raise what torch.nn raises:
the same exception type and message, which also match the expectation the ModuleInfo states.
"""

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

import lstmfast
from conftest import TOLERANCES

common_modules = pytest.importorskip("torch.testing._internal.common_modules")

INFOS = {info.module_cls: info for info in common_modules.module_db
         if info.module_cls in (nn.LSTM, nn.GRU, nn.RNN)}
OURS = {nn.LSTM: lstmfast.LSTM, nn.GRU: lstmfast.GRU, nn.RNN: lstmfast.RNN}


def _samples(cls, kind, dtype):
    info = INFOS[cls]
    if kind == "error":
        return info.module_error_inputs_func(info, device="cpu", dtype=dtype, requires_grad=False,
                                             training=True)
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=True)


def _cases(kind, dtype):
    cases = []
    for cls in OURS:
        for i, sample in enumerate(_samples(cls, kind, dtype)):
            cases.append(pytest.param(cls, i, id=f"{cls.__name__}-{i}"))
    return cases


def test_module_info_is_there():
    """Guards the tests below against an empty parametrization: torch lists 32 samples and 14 error
    cases for each of nn.LSTM and nn.RNN, 16 samples and 14 error cases for nn.GRU."""
    assert set(INFOS) == set(OURS)
    for cls in OURS:
        assert len(_samples(cls, "sample", torch.float64)) >= 16
        assert len(_samples(cls, "error", torch.float32)) >= 14


def _clone(value):
    """The same inputs for the second module: new leaves with the same values."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, PackedSequence):
        return PackedSequence(_clone(value.data), value.batch_sizes, value.sorted_indices,
                              value.unsorted_indices)
    if isinstance(value, (tuple, list)):
        return type(value)(_clone(v) for v in value)
    return value


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, PackedSequence):
        return [value.data]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cls,index", _cases("sample", torch.float64))
def test_module_info_samples_match_torch(cls, index, dtype):
    sample = _samples(cls, "sample", dtype)[index]
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    torch.manual_seed(index)
    theirs = cls(*args, **kwargs).to(dtype)
    ours = OURS[cls](*args, **kwargs).to(dtype)
    assert isinstance(ours, cls)
    ours.load_state_dict(theirs.state_dict())

    their_inputs = _clone(sample.forward_input.args)
    our_inputs = _clone(sample.forward_input.args)
    expected = theirs(*their_inputs, **sample.forward_input.kwargs)
    got = ours(*our_inputs, **sample.forward_input.kwargs)
    assert type(got) is type(expected) and type(got[1]) is type(expected[1])
    tolerance = TOLERANCES[dtype]
    expected_out, got_out = _tensors(expected), _tensors(got)
    assert len(got_out) == len(expected_out)
    for g, e in zip(got_out, expected_out):
        assert g.shape == e.shape
        torch.testing.assert_close(g, e, **tolerance)

    # One loss over every output, weighted so that each element has its own gradient.
    torch.manual_seed(1000 + index)
    weights = [torch.randn_like(e) for e in expected_out]
    their_leaves = _tensors(their_inputs) + list(theirs.parameters())
    our_leaves = _tensors(our_inputs) + list(ours.parameters())
    expected_grads = torch.autograd.grad(sum((w * e).sum() for w, e in zip(weights, expected_out)),
                                         their_leaves)
    got_grads = torch.autograd.grad(sum((w * g).sum() for w, g in zip(weights, got_out)), our_leaves)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, **tolerance)


def _raised(fn):
    try:
        fn()
    except Exception as error:  # noqa: BLE001 - the point is to compare whatever each one raises
        return error
    return None


@pytest.mark.parametrize("cls,index", _cases("error", torch.float32))
def test_module_info_errors_match_torch(cls, index):
    case = _samples(cls, "error", torch.float32)[index]
    sample = case.module_error_input
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    construction = case.error_on == common_modules.ModuleErrorEnum.CONSTRUCTION_ERROR

    def run(module_cls):
        def call():
            module = module_cls(*args, **kwargs)
            if not construction:
                module(*sample.forward_input.args, **sample.forward_input.kwargs)
        return call

    theirs, ours = _raised(run(cls)), _raised(run(OURS[cls]))
    assert theirs is not None, "torch.nn itself raises for this case"
    assert type(ours) is type(theirs) is case.error_type
    assert str(ours) == str(theirs)
    with pytest.raises(case.error_type, match=case.error_regex):
        run(OURS[cls])()

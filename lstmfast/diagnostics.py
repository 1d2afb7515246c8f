"""Gradient flow through time, measured inside the BPTT kernels.

:func:`gradient_flow` runs one forward and backward pass of an lstmfast LSTM / GRU / RNN and returns, for
every layer, direction, time step and sequence, the norms of dL/dh_t (and dL/dc_t for an LSTM) that
the backward kernels computed in their reverse loop — where those gradients exist anyway, so no second
pass — plus the norms of dL/dx_t. It shows the vanishing (or exploding) gradient directly.
"""

import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn.utils.rnn import PackedSequence

from .modules import LSTM, _RecurrentBase


@dataclass
class GradientFlow:
    """Per-step gradient norms of one backward pass. NaN marks steps after a sequence has ended."""

    hidden: Tensor  # (layers * directions, T, B): ||dL/dh_t||
    cell: Optional[Tensor]  # (layers * directions, T, B): ||dL/dc_t|| (LSTM), else None (GRU, RNN)
    input: Tensor  # (T, B): ||dL/dx_t||
    loss: float


def last_step_loss(output, batch_first=False):
    """The default loss: the sum of the outputs at the last time step."""
    return (output[:, -1] if batch_first else output[-1]).sum()


def _to_steps(rows: Tensor, batch_sizes: Tensor, batch: int) -> Tensor:
    """(N) values in the packed row layout -> (T, B) with NaN where a sequence has ended."""
    out = rows.new_full((len(batch_sizes), batch), float("nan"))
    offset = 0
    for t, size in enumerate(batch_sizes.tolist()):
        out[t, :size] = rows[offset:offset + size]
        offset += size
    return out


def gradient_flow(module: _RecurrentBase, inputs, loss_fn: Optional[Callable] = None,
                  hx=None) -> GradientFlow:
    """Measures the per-step gradient norms of `loss_fn(output)` through an lstmfast LSTM / GRU / RNN.

    `inputs`: a tensor as the module takes it (batched), or a PackedSequence (then `loss_fn` is
    required). `loss_fn(output) -> scalar`; by default the sum of the outputs at the last step.

    Runs with gradients on (also when called under torch.no_grad or inference_mode) and eagerly (a
    torch.compile'd layer, or one compiled in place, is measured as itself). Other threads may
    use the module meanwhile, training it or measuring their own gradient flow: the norms recorded are
    those of this thread's pass only.
    """
    with torch.inference_mode(False), torch.enable_grad():
        return _gradient_flow(module, inputs, loss_fn, hx)


# Guards the setup and removal of modules' per-thread recorders.
_RECORDERS_LOCK = threading.Lock()


def _gradient_flow(module, inputs, loss_fn, hx):
    inner = getattr(module, "_orig_mod", None)  # (torch.compile(layer): measured on the layer itself)
    if not isinstance(module, _RecurrentBase) and isinstance(inner, _RecurrentBase):
        module = inner
    if not isinstance(module, _RecurrentBase):
        kind = type(module)
        raise TypeError(f"gradient_flow expects an lstmfast.LSTM, lstmfast.GRU or lstmfast.RNN (lstmfast.convert "
                        f"makes one of a torch.nn layer), got {kind.__module__}.{kind.__qualname__}")
    packed = isinstance(inputs, PackedSequence)
    if packed:
        if loss_fn is None:
            raise ValueError("gradient_flow: pass loss_fn for PackedSequence input")
        leaf = inputs.data.detach().clone().requires_grad_()  # (a copy: an inference tensor cannot require grad)
        x = PackedSequence(leaf, inputs.batch_sizes, inputs.sorted_indices, inputs.unsorted_indices)
        batch_sizes, batch = inputs.batch_sizes, int(inputs.batch_sizes[0])
    else:
        if inputs.dim() != 3:
            raise ValueError(f"gradient_flow expects batched 3-D input, got {inputs.dim()}-D")
        leaf = x = inputs.detach().clone().requires_grad_()
        steps, batch = (inputs.shape[1], inputs.shape[0]) if module.batch_first else inputs.shape[:2]
        batch_sizes = torch.full((steps,), batch, dtype=torch.int64)
    if loss_fn is None:
        loss_fn = lambda out: last_step_loss(out, module.batch_first)  # noqa: E731

    recorded = {}

    def record(layer, direction, hidden, cell):
        recorded[(layer, direction)] = (hidden.detach(), None if cell is None else cell.detach())

    # The module's forward hands this thread's recorder to the layers' backward (see _norm_sink).
    thread = threading.get_ident()
    with _RECORDERS_LOCK:
        module._gradient_recorder = {**(module._gradient_recorder or {}), thread: record}
    try:
        # Eagerly, also for a layer compiled in place (layer.compile() sets a compiled call, which
        # _call_impl, hooks and all, bypasses): the recorder reaches the kernels through the Python
        # forward. (torch.compiler.set_stance is process-wide: threads measuring at once restored
        # each other's stance and left "force_eager" set.)
        output, _ = module._call_impl(x, hx)
        loss = loss_fn(output)
        (grad_input,) = torch.autograd.grad(loss, leaf)
    finally:
        with _RECORDERS_LOCK:
            others = {t: r for t, r in module._gradient_recorder.items() if t != thread}
            module._gradient_recorder = others or None

    keys = [(layer, d) for layer in range(module.num_layers) for d in range(module._directions)]
    missing = [k for k in keys if k not in recorded]
    if missing:
        raise RuntimeError(f"gradient_flow: no gradient reached layers/directions {missing}")

    def steps_of(rows):
        if packed:
            table = _to_steps(rows, batch_sizes, batch)
            return table[:, inputs.unsorted_indices] if inputs.unsorted_indices is not None else table
        return rows.view(len(batch_sizes), batch)

    hidden = torch.stack([steps_of(recorded[k][0]) for k in keys])
    cell = torch.stack([steps_of(recorded[k][1]) for k in keys]) if isinstance(module, LSTM) else None
    if packed:
        input_norms = steps_of(grad_input.norm(dim=-1))
    else:
        input_norms = grad_input.norm(dim=-1)
        if module.batch_first:
            input_norms = input_norms.transpose(0, 1)
    return GradientFlow(hidden, cell, input_norms, float(loss.detach()))

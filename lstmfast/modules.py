"""lstmfast.LSTM and lstmfast.RNN: drop-in replacements for torch.nn.LSTM and torch.nn.RNN.

Same constructor, parameter names, shapes, initialization, forward signature and return values as
torch.nn, so state dicts move freely between the two. Each layer and direction is one call of the fused
op (lstmfast.functional); layers, directions, dropout, batch_first and PackedSequence are composed here.
"""

import functools
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import functional


class _RecurrentBase(nn.Module):
    _gates = 1

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
                 proj_size: int = 0, grad_clip: Optional[float] = None, device=None, dtype=None):
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size),
                            ("num_layers", num_layers)):
            least = 0 if name == "input_size" else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                kind = "non-negative" if least == 0 else "positive"
                raise ValueError(f"{name} must be a {kind} integer, got {value!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if not isinstance(proj_size, int) or proj_size < 0:
            raise ValueError(f"proj_size must be a non-negative integer, got {proj_size!r}")
        if proj_size >= hidden_size:
            raise ValueError(f"proj_size has to be smaller than hidden_size, got proj_size={proj_size} "
                             f"and hidden_size={hidden_size}")
        functional._check_grad_clip(grad_clip)
        # Set by lstmfast.diagnostics while it measures gradient flow: called as
        # recorder(layer, direction, hidden_norms, cell_norms) from inside backward.
        self._gradient_recorder = None
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size, self.grad_clip = bidirectional, proj_size, grad_clip
        factory = {"device": device, "dtype": dtype}
        directions = 2 if bidirectional else 1
        out_size = proj_size if proj_size > 0 else hidden_size
        gate_size = self._gates * hidden_size
        self._flat_weights_names = []
        for layer in range(num_layers):
            for direction in range(directions):
                layer_input = input_size if layer == 0 else out_size * directions
                suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
                shapes = [("weight_ih", (gate_size, layer_input)), ("weight_hh", (gate_size, out_size))]
                if bias:
                    shapes += [("bias_ih", (gate_size,)), ("bias_hh", (gate_size,))]
                if proj_size > 0:
                    shapes += [("weight_hr", (proj_size, hidden_size))]
                for name, shape in shapes:
                    self.register_parameter(name + suffix, nn.Parameter(torch.empty(shape, **factory)))
                    self._flat_weights_names.append(name + suffix)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch.nn's initialization: every parameter uniform in [-1/sqrt(H), 1/sqrt(H)]."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for weight in self.parameters():
            nn.init.uniform_(weight, -bound, bound)

    def flatten_parameters(self) -> None:
        """Accepted for compatibility with torch.nn; lstmfast needs no flat weight buffer."""

    @property
    def _directions(self):
        return 2 if self.bidirectional else 1

    @property
    def _out_size(self):
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def _layer_weights(self, layer, direction):
        suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
        get = lambda name: getattr(self, name + suffix, None)  # noqa: E731
        return get("weight_ih"), get("weight_hh"), get("bias_ih"), get("bias_hh"), get("weight_hr")

    def extra_repr(self) -> str:
        s = "{input_size}, {hidden_size}"
        if self.proj_size != 0:
            s += ", proj_size={proj_size}"
        if self.num_layers != 1:
            s += ", num_layers={num_layers}"
        if self.bias is not True:
            s += ", bias={bias}"
        if self.batch_first is not False:
            s += ", batch_first={batch_first}"
        if self.dropout != 0:
            s += ", dropout={dropout}"
        if self.bidirectional is not False:
            s += ", bidirectional={bidirectional}"
        if self.grad_clip is not None:
            s += ", grad_clip={grad_clip}"
        return s.format(**self.__dict__)

    # ------------------------------------------------------------------ forward

    def _check_input(self, input: Tensor, packed: bool):
        weight = self.weight_ih_l0
        if not isinstance(input, Tensor):
            raise TypeError(f"{type(self).__name__}: expected input to be a Tensor or a PackedSequence, "
                            f"got {type(input).__name__}")
        if packed and input.dim() != 2:
            raise ValueError(f"{type(self).__name__}: expected PackedSequence data of shape (N, "
                             f"input_size) (2-D), got {input.dim()}D tensor")
        if not packed and input.dim() not in (2, 3):
            raise ValueError(f"{type(self).__name__}: Expected input to be 2D or 3D, got {input.dim()}D "
                             f"tensor")
        # Under autocast the layer runs in the autocast dtype whatever the input's (as torch.nn's do).
        if input.dtype != weight.dtype and not torch.is_autocast_enabled(input.device.type):
            raise ValueError(f"{type(self).__name__}: input must have the type {weight.dtype} (the "
                             f"dtype of the parameters), got type {input.dtype}")
        if input.device != weight.device:
            raise ValueError(f"{type(self).__name__}: input is on {input.device} but the parameters "
                             f"are on {weight.device}")
        if input.shape[-1] != self.input_size:
            raise ValueError(f"{type(self).__name__}: input.size(-1) must be equal to input_size. "
                             f"Expected {self.input_size}, got {input.shape[-1]}")

    def _check_state(self, state: Tensor, name: str, expected):
        if tuple(state.shape) != tuple(expected):
            raise ValueError(f"{type(self).__name__}: Expected {name} size {tuple(expected)}, got "
                             f"{tuple(state.shape)}")
        dtype_ok = state.dtype == self.weight_ih_l0.dtype or torch.is_autocast_enabled(state.device.type)
        if not dtype_ok or state.device != self.weight_ih_l0.device:
            raise ValueError(f"{type(self).__name__}: {name} must be a {self.weight_ih_l0.dtype} tensor "
                             f"on {self.weight_ih_l0.device}, got {state.dtype} on {state.device}")

    def _run_layer(self, input, batch_sizes, states, layer, direction):
        raise NotImplementedError

    def _norm_sink(self, layer, direction):
        if self._gradient_recorder is None:
            return None
        return functools.partial(self._gradient_recorder, layer, direction)

    # ------------------------------------------------------------------ conversion

    _torch_class = None
    # Constructor options shared with torch.nn beyond (input_size, hidden_size), read off either kind.
    _options = ("num_layers", "bias", "batch_first", "dropout", "bidirectional")

    @classmethod
    def _options_of(cls, module):
        return {name: getattr(module, name) for name in cls._options}

    @classmethod
    def from_torch(cls, module: nn.Module) -> "_RecurrentBase":
        """An lstmfast layer equivalent to a torch.nn one. It shares the torch module's Parameter
        objects (so optimizers built on them keep working), device, dtype and training mode."""
        if type(module) is not cls._torch_class:
            raise TypeError(f"{cls.__name__}.from_torch expects a torch.nn.{cls._torch_class.__name__}, "
                            f"got {type(module).__name__}")
        new = cls(module.input_size, module.hidden_size, **cls._options_of(module), device="meta")
        for name in module._flat_weights_names:
            setattr(new, name, getattr(module, name))
        return new.train(module.training)

    def to_torch(self) -> nn.Module:
        """The equivalent torch.nn layer, sharing this module's Parameter objects."""
        module = self._torch_class(self.input_size, self.hidden_size, **self._options_of(self),
                                   device="meta")
        for name in self._flat_weights_names:
            setattr(module, name, getattr(self, name))
        if module.weight_ih_l0.device.type == "cuda":
            module.flatten_parameters()
        return module.train(self.training)

    def _state_sizes(self, batch):
        raise NotImplementedError

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            batch, unbatched = int(batch_sizes[0]), False
        else:
            data, batch_sizes, sorted_indices, unsorted_indices = input, None, None, None
            self._check_input(data, False)
            unbatched = data.dim() == 2
            if unbatched:
                data = data.unsqueeze(1)
            elif self.batch_first:
                data = data.transpose(0, 1)
            batch = data.shape[1]
        if packed:
            self._check_input(data, True)
        sizes = self._state_sizes(batch)
        if hx is None:
            # Packed input needs explicit zeros: the op reads the batch size off h0.
            states = [data.new_zeros(s) for s in sizes] if packed else [None] * len(sizes)
        else:
            states = list(hx) if isinstance(hx, (tuple, list)) else [hx]
            names = ["hx"] if len(sizes) == 1 else ["hx[0]", "hx[1]"]
            if len(states) != len(sizes) or not all(isinstance(s, Tensor) for s in states):
                raise ValueError(f"{type(self).__name__}: expected hx to be "
                                 f"{'a tensor' if len(sizes) == 1 else 'a tuple (h_0, c_0)'}, got "
                                 f"{type(hx).__name__} of {[type(s).__name__ for s in states]}")
            if unbatched:
                for s, name in zip(states, names):
                    if s.dim() != 2:
                        raise ValueError(f"{type(self).__name__}: For unbatched 2-D input, {name} "
                                         f"should also be 2-D but got {s.dim()}-D tensor")
                states = [s.unsqueeze(1) for s in states]
            elif any(s.dim() != 3 for s in states):
                raise ValueError(f"{type(self).__name__}: For batched 3-D input, hx should also be 3-D "
                                 f"but got {[s.dim() for s in states]}-D tensors")
            for s, name, size in zip(states, names, sizes):
                self._check_state(s, name, size)
            if sorted_indices is not None:
                states = [s.index_select(1, sorted_indices) for s in states]

        layer_input = data
        finals = [[] for _ in sizes]
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self._directions):
                index = layer * self._directions + direction
                layer_states = [None if s is None else s[index] for s in states]
                output, *final = self._run_layer(layer_input, batch_sizes, layer_states, layer, direction)
                outputs.append(output)
                for store, f in zip(finals, final):
                    store.append(f)
            layer_input = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        finals = [torch.stack(f) for f in finals]
        if unsorted_indices is not None:
            finals = [f.index_select(1, unsorted_indices) for f in finals]

        if packed:
            output = PackedSequence(layer_input, batch_sizes, sorted_indices, unsorted_indices)
        elif unbatched:
            output = layer_input.squeeze(1)
            finals = [f.squeeze(1) for f in finals]
        else:
            output = layer_input.transpose(0, 1) if self.batch_first else layer_input
        return output, (finals[0] if len(finals) == 1 else tuple(finals))


class LSTM(_RecurrentBase):
    r"""Drop-in for :class:`torch.nn.LSTM` (same arguments, parameters, inputs and outputs).

    Extra keyword arguments: ``grad_clip`` (clamp dL/d(gate pre-activations) into
    ``[-grad_clip, grad_clip]`` at every step of BPTT; default None = exact torch.nn gradients) and
    ``forget_bias`` (added to the forget-gate slice of every ``bias_ih`` at initialization; default 0
    = torch.nn's initialization).
    """

    _gates = 4
    _torch_class = nn.LSTM
    _options = _RecurrentBase._options + ("proj_size",)

    def __init__(self, *args, forget_bias: float = 0.0, **kwargs):
        self.forget_bias = float(forget_bias)
        super().__init__(*args, **kwargs)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.forget_bias and self.bias:
            H = self.hidden_size
            with torch.no_grad():
                for name, p in self.named_parameters():
                    if name.startswith("bias_ih"):
                        p[H:2 * H] += self.forget_bias

    def _state_sizes(self, batch):
        n = self.num_layers * self._directions
        return [(n, batch, self._out_size), (n, batch, self.hidden_size)]

    def _run_layer(self, input, batch_sizes, states, layer, direction):
        w_ih, w_hh, b_ih, b_hh, w_hr = self._layer_weights(layer, direction)
        return functional.lstm(input, w_ih, w_hh, b_ih, b_hh, w_hr=w_hr, h0=states[0], c0=states[1],
                               batch_sizes=batch_sizes, reverse=direction == 1,
                               grad_clip=self.grad_clip, norm_sink=self._norm_sink(layer, direction))


class RNN(_RecurrentBase):
    r"""Drop-in for :class:`torch.nn.RNN` (Elman RNN, ``nonlinearity`` 'tanh' or 'relu').

    Extra keyword argument: ``grad_clip``, as for :class:`LSTM`.
    """

    _gates = 1
    _torch_class = nn.RNN
    _options = _RecurrentBase._options + ("nonlinearity",)

    def __init__(self, *args, nonlinearity: str = "tanh", **kwargs):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"Unknown nonlinearity '{nonlinearity}'. Select from 'tanh' or 'relu'.")
        if kwargs.get("proj_size", 0):
            raise ValueError("proj_size argument is only supported for LSTM, not RNN")
        self.nonlinearity = nonlinearity
        super().__init__(*args, **kwargs)

    def _state_sizes(self, batch):
        return [(self.num_layers * self._directions, batch, self.hidden_size)]

    def _run_layer(self, input, batch_sizes, states, layer, direction):
        w_ih, w_hh, b_ih, b_hh, _ = self._layer_weights(layer, direction)
        return functional.rnn(input, w_ih, w_hh, b_ih, b_hh, nonlinearity=self.nonlinearity,
                              h0=states[0], batch_sizes=batch_sizes, reverse=direction == 1,
                              grad_clip=self.grad_clip, norm_sink=self._norm_sink(layer, direction))


def convert(model: nn.Module) -> nn.Module:
    """Replaces every torch.nn.LSTM / torch.nn.RNN inside `model` (or `model` itself) by the lstmfast
    equivalent, in place, keeping the very same Parameter objects, device, dtype and training mode.
    Returns the model (the new layer when `model` itself is an LSTM / RNN)."""
    return _swap(model, {nn.LSTM: LSTM.from_torch, nn.RNN: RNN.from_torch})


def unconvert(model: nn.Module) -> nn.Module:
    """The inverse of :func:`convert`: lstmfast layers back to torch.nn ones."""
    return _swap(model, {LSTM: LSTM.to_torch, RNN: RNN.to_torch})


def _swap(model, table):
    if type(model) in table:
        return table[type(model)](model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in table:
                setattr(parent, name, table[type(child)](child))
    return model

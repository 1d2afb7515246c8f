"""lstmfast.LSTM, lstmfast.GRU and lstmfast.RNN: torch.nn.LSTM, torch.nn.GRU and torch.nn.RNN with a
fused forward and BPTT.

They are subclasses of torch.nn.LSTM / torch.nn.GRU / torch.nn.RNN that replace only forward:
construction, argument checks, parameters, initialization, all_weights, _flat_weights,
flatten_parameters, pickling and every utility that reads RNN internals (weight_norm, pruning,
parametrizations) are torch.nn's own. Each layer and direction is one call of the fused op
(lstmfast.functional); layers, directions, dropout, batch_first and PackedSequence are composed here.
Weights are read at every call the way torch.nn's forward reads them (all re-read when one has
changed, then _flat_weights), so whatever replaced an attribute (a parametrization, weight_norm,
pruning, torch.func.functional_call) is what runs, evaluated as often as under torch.nn.

convert() / unconvert() turn torch.nn layers into lstmfast ones and back in place, by changing the
object's class: hooks, attributes, parametrizations, pruning and sharing all stay as they were.
"""

import contextlib
import functools
import math
import numbers
import operator
import sys
import threading
import warnings
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.rnn import PackedSequence

from . import _dynamo_compat, functional


# The dtypes torch.nn's layers return under CPU autocast, by kind of call (see _torch_nn_autocast_dtypes).
_AUTOCAST_DTYPES = {}


def _torch_nn_autocast_dtypes(kind, options, packed, input_dtype, state_dtypes, param_dtype, autocast_dtype,
                              grad_enabled, mkldnn_enabled):
    """The dtypes of (output, *final states) a torch.nn layer returns under CPU autocast for a kind of
    call, or None when torch.nn refuses it: a one-unit torch.nn layer of the same configuration
    (`options`, a tuple of items) runs once on a small input of the same dtypes, under that autocast
    dtype and grad mode, and the answer is kept. `packed`: None (padded), "empty" (padded, batch 0:
    torch.nn's LSTM then takes its native path, not oneDNN's), "uniform" (every sequence of the same
    length: torch.nn's LSTM then runs oneDNN as for padded input) or "ragged". The layer is
    built on the meta device and materialized as zeros, so that the global random state is not
    touched. Every argument is a constant and so is the answer: Dynamo is told so
    (_dynamo_compat.constant), so a compiled forward asks it while tracing, as an eager one does."""
    key = (kind, options, packed, input_dtype, state_dtypes, param_dtype, autocast_dtype, grad_enabled,
           mkldnn_enabled)
    if key not in _AUTOCAST_DTYPES:
        with _outside_tracing():
            _AUTOCAST_DTYPES[key] = _ask_torch_nn(kind, dict(options), packed, input_dtype, state_dtypes,
                                                  param_dtype, autocast_dtype, grad_enabled)
    return _AUTOCAST_DTYPES[key]


@contextlib.contextmanager
def _outside_tracing():
    """Runs its body as plain eager code even inside a trace: no TorchDispatch / TorchFunction mode
    (torch.export's fake tensors, FlopCounterMode) and no torch.jit.trace recording sees it."""
    from torch.utils._python_dispatch import _disable_current_modes

    tracing = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        with _disable_current_modes(), torch._C.DisableTorchFunction():
            yield
    finally:
        torch._C._set_tracing_state(tracing)


# Held around lstmfast's own warnings.catch_warnings() blocks: catch_warnings saves and restores the
# process's filters without a lock before Python 3.14, so two threads' blocks interleaving left an
# "ignore everything" filter installed for good.
_WARNINGS_LOCK = threading.Lock()


def _ask_torch_nn(kind, options, packed, input_dtype, state_dtypes, param_dtype, autocast_dtype, grad_enabled):
    if options.get("proj_size"):
        options["proj_size"] = 1
    options.pop("dropout", None)  # (no bearing on dtypes; without it, no dropout-with-one-layer warning)
    layer = getattr(nn, kind)(1, 2, **options, device="meta", dtype=param_dtype).to_empty(device="cpu")
    directions = 2 if options.get("bidirectional") else 1
    lengths = {"ragged": [2, 1], "empty": []}.get(packed, [2, 2])
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        for p in layer.parameters():
            p.zero_()
        x = torch.zeros(2, len(lengths), 1, dtype=input_dtype)
        if packed in ("uniform", "ragged"):
            x = torch.nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths))
        hx = None
        if state_dtypes is not None:
            widths = [options.get("proj_size") or 2, 2] if kind == "LSTM" else [2]
            states = [torch.zeros(options["num_layers"] * directions, len(lengths), w, dtype=d)
                      for w, d in zip(widths, state_dtypes)]
            hx = tuple(states) if kind == "LSTM" else states[0]
    found = None
    with torch.autocast("cpu", dtype=autocast_dtype), torch.set_grad_enabled(grad_enabled), _WARNINGS_LOCK, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch.nn's own notes, e.g. on projections and oneDNN)
        try:
            out, finals = layer.forward(x, hx)  # (forward itself: no global module hooks run)
            out = out.data if packed in ("uniform", "ragged") else out
            found = (out.dtype, *(f.dtype for f in (finals if isinstance(finals, tuple) else (finals,))))
        except Exception:  # (torch.nn refuses the call: its oneDNN LSTM under float16 autocast)
            pass
    return found


_dynamo_compat.constant(_torch_nn_autocast_dtypes)


def _check_size_type(name, value):
    # torch.nn accepts bools here (True is an int) and fails on floats with an unclear message from
    # range() or torch.empty(); lstmfast names the argument. Like torch.nn, num_layers and proj_size may
    # be any integer that is not a bool or an int (a numpy integer: torch.nn only uses them as numbers).
    if isinstance(value, bool):
        ok = False
    elif name in ("num_layers", "proj_size"):
        try:
            ok = operator.index(value) is not None
        except TypeError:
            ok = False
    else:
        ok = isinstance(value, int)
    if not ok:
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__}")


class _RecurrentBase:
    """What lstmfast.LSTM, lstmfast.GRU and lstmfast.RNN add to their torch.nn base class (a mixin
    placed first in the MRO): the fused forward, grad_clip, the gradient-flow hook, conversion."""

    _kind = None  # "LSTM", "GRU" or "RNN": the name used in messages, whatever the class is called
    _torch_class = None

    def _init_extras(self, grad_clip: Optional[float] = None) -> None:
        self.grad_clip = grad_clip
        # Set by lstmfast.diagnostics while it measures gradient flow, a recorder per measuring thread
        # ({thread ident: recorder}), called as recorder(layer, direction, hidden_norms, cell_norms)
        # from inside backward.
        self._gradient_recorder = None

    def __setstate__(self, state):
        # A pickle of torch.nn's layer unpickled as lstmfast's (or of an lstmfast layer from before an
        # extra existed) has none of the extras: their defaults, as torch.nn's own __setstate__ fills in
        # what older pickles of its layers lack.
        super().__setstate__(state)
        self.__dict__.setdefault("grad_clip", None)
        self.__dict__.setdefault("_gradient_recorder", None)
        if self._kind == "LSTM":
            self.__dict__.setdefault("forget_bias", 0.0)

    @staticmethod
    def _check_constructor_args(args, kwargs, positions):
        for name, position in positions:
            if len(args) > position:
                value = args[position]
            elif name in kwargs:
                value = kwargs[name]
            else:
                continue
            _check_size_type(name, value)

    @staticmethod
    def _device_and_dtype_positional(kind, args, kwargs, device_position):
        """torch.nn.RNN's and torch.nn.GRU's signatures end in (..., bidirectional, device, dtype), but
        torch.nn passes a positional device on into its base class's proj_size slot; lstmfast follows
        the signature. Returns the positional arguments left for torch.nn (device and dtype, found at
        `device_position` and after, moved into kwargs)."""
        if len(args) > device_position:
            if len(args) > device_position + 2:
                raise TypeError(f"{kind} takes at most {device_position + 2} positional arguments, but "
                                f"{len(args)} were given")
            for name, value in zip(("device", "dtype"), args[device_position:]):
                if name in kwargs:
                    raise TypeError(f"{kind} got multiple values for argument '{name}'")
                kwargs[name] = value
            args = args[:device_position]
        return args

    def _single_state_args(self, args, kwargs, grad_clip):
        """RNN's and GRU's constructor checks (LSTM has its own: proj_size, forget_bias); returns the
        positional arguments for torch.nn's constructor."""
        args = self._device_and_dtype_positional(self._kind, args, kwargs, self._device_position)
        self._check_constructor_args(args, kwargs, (("input_size", 0), ("hidden_size", 1), ("num_layers", 2)))
        functional._check_grad_clip(grad_clip)
        return args

    @property
    def _directions(self):
        return 2 if self.bidirectional else 1

    @property
    def _out_size(self):
        return self.proj_size if self.proj_size > 0 else self.hidden_size

    def _current_weights(self):
        """The weights this call runs with, by name, read the way torch.nn's forward reads them: when
        torch.nn's _weights_have_changed() finds a weight that is not the tensor read last time (a
        parametrization, weight_norm, pruning, torch.func.functional_call), every weight is read
        again, as its _init_flat_weights() does, into _flat_weights. A parametrization is therefore
        evaluated as many times per call as under torch.nn (four, for the first parametrized one),
        which matters for stateful ones (spectral_norm's power iteration advances at each evaluation
        in training mode). Unlike torch.nn's re-read, this one does not call flatten_parameters():
        lstmfast never uses cuDNN's flat weight buffer, and on CUDA that call fails on torch.func's
        wrapped weights (functional_call under vmap or grad)."""
        names = self._flat_weights_names
        if functional._exporting():
            # torch.export swaps in its own tensors for the parameters, so a re-read would store
            # them into _flat_weights and export would warn about a tensor attribute assigned
            # during export; read each weight once instead.
            return {name: getattr(self, name, None) for name in names}
        if self._weights_changed():
            self._flat_weights = [getattr(self, name) if hasattr(self, name) else None for name in names]
            self._flat_weight_refs = [None if w is None else weakref.ref(w) for w in self._flat_weights]
        return dict(zip(names, self._flat_weights))

    def _weights_changed(self):
        """torch.nn's _weights_have_changed(), reading a registered Parameter straight from
        _parameters (what getattr returns for it, without Module.__getattr__'s detour: a 4-layer
        bidirectional call spent about 20 us here) and any other weight as torch.nn does, with hasattr
        and getattr, so that a parametrization runs exactly as often."""
        parameters = self._parameters
        for ref, name in zip(self._flat_weight_refs, self._flat_weights_names):
            weight = parameters.get(name)
            if weight is None and name not in parameters:
                weight = getattr(self, name) if hasattr(self, name) else None
            if weight is not None and ref is not None and ref() is not weight:
                return True
        return False

    def _layer_weights(self, weights, layer, direction):
        """(w_ih, w_hh, b_ih, b_hh, w_hr) of one layer and direction from _current_weights(); None
        where the layer has no such weight."""
        proj = self.proj_size > 0
        key = (layer, direction, bool(self.bias), bool(proj))
        compiling = torch.compiler.is_compiling()  # (Dynamo reads the cache's keys: numpy-integer options)
        names = None if compiling else _LAYER_WEIGHT_NAMES.get(key)
        if names is None:
            suffix = f"_l{layer}" + ("_reverse" if direction == 1 else "")
            names = (
                "weight_ih" + suffix, "weight_hh" + suffix, "bias_ih" + suffix if self.bias else None,
                "bias_hh" + suffix if self.bias else None, "weight_hr" + suffix if proj else None)
            if not compiling:
                _LAYER_WEIGHT_NAMES[key] = names
        get = weights.get
        w_ih, w_hh = get(names[0]), get(names[1])
        b_ih, b_hh = (get(names[2]), get(names[3])) if self.bias else (None, None)
        w_hr = get(names[4]) if proj else None
        if w_ih is None or w_hh is None or (self.bias and (b_ih is None or b_hh is None)) \
                or (proj and w_hr is None) or (
                    layer == 0 and direction == 0  # (hidden_size or proj_size changed after construction)
                    and torch._C._get_tracing_state() is None  # (under torch.jit.trace, sizes are traced)
                    and w_hh.shape != (self._gates * self.hidden_size, self._out_size)):
            self._refuse_layer_weights(names, (w_ih, w_hh, b_ih, b_hh, w_hr))
        return w_ih, w_hh, b_ih, b_hh, w_hr

    def _refuse_layer_weights(self, names, found):
        """A weight is None or missing, or the options changed after construction: torch.nn fails then
        (a TypeError for a None weight, a RuntimeError from its kernels otherwise); lstmfast says why."""
        for name, weight in zip(names, found):
            if name is not None and weight is None:
                if name not in self._flat_weights_names:
                    raise RuntimeError(f"{self._kind}: no {name} for num_layers={self.num_layers}, "
                                       f"bidirectional={self.bidirectional} (the layer was built with "
                                       f"other options)")
                raise TypeError(f"{self._kind}: {name} is None, expected a Tensor")
        raise RuntimeError(f"{self._kind}: {names[1]} has shape {tuple(found[1].shape)}, but "
                           f"hidden_size={self.hidden_size}" + (f" and proj_size={self.proj_size}" if self._gates == 4
                                                                else "") +
                           f" (as set now) need {(self._gates * self.hidden_size, self._out_size)}")

    def extra_repr(self) -> str:
        s = super().extra_repr()
        if getattr(self, "forget_bias", 0.0):
            s += f", forget_bias={self.forget_bias}"
        if self.grad_clip is not None:
            s += f", grad_clip={self.grad_clip}"
        return s

    def __prepare_scriptable__(self):
        # torch.jit.script calls this on every module it is about to compile: fail here, with the
        # routes that work, rather than deep inside the compiler on the first Python construct.
        raise RuntimeError(
            f"lstmfast.{type(self).__name__} cannot be compiled by torch.jit.script: its forward is "
            f"Python over lstmfast's registered ops. Supported routes: torch.jit.trace (inference), "
            f"torch.export (and AOTInductor), torch.compile, and torch.onnx.export (inference). To "
            f"script the model with torch.nn's own layers instead, call lstmfast.unconvert(model) first "
            f"(a model holding the layer: torch cannot script a bare torch.nn recurrent layer's forward).")

    def _cpu_autocast_dtypes(self, data, packed, batch_sizes, hx, weight):
        """The dtypes of (output, *final states) torch.nn's layer returns for this call under CPU
        autocast; None outside it, for a float64 layer (autocast leaves it alone) and where torch.nn
        refuses the call (lstmfast then returns the autocast dtype). lstmfast computes in the autocast
        dtype (bfloat16 / float16 products, float32 state); torch.nn's result dtypes depend on which of
        its paths runs (oneDNN's fused LSTM returns the autocast dtype, the native path promotes its
        autocast-dtype products with the states' dtype) and so vary with the layer, the input's and
        states' dtypes, packing and projection: they are asked of torch.nn itself, once per kind of
        call, compiled, traced or exported alike."""
        if data.device.type != "cpu" or not torch.is_autocast_enabled("cpu") or weight.dtype == torch.float64:
            return None
        states = None if hx is None else [s.dtype for s in (hx if isinstance(hx, (tuple, list)) else (hx,))]
        options = _constructor_options(self, ("num_layers", "bias", "bidirectional"))
        empty = not packed and torch._C._get_tracing_state() is None and data.shape[1] == 0  # (traced sizes)
        packing = "empty" if empty else None
        if packed:
            packing = "uniform" if int(batch_sizes[0]) == int(batch_sizes[-1]) else "ragged"
        args = (self._kind, tuple(options.items()), packing, data.dtype,
                None if states is None else tuple(states), weight.dtype, torch.get_autocast_dtype("cpu"),
                torch.is_grad_enabled(), torch.backends.mkldnn.enabled)
        return _torch_nn_autocast_dtypes(*args)

    def _norm_sink(self, layer, direction):
        """lstmfast.diagnostics' recorder for this layer and direction, when the calling thread is
        measuring gradient flow through this module (_gradient_recorder: thread ident -> recorder)."""
        if self._gradient_recorder is None:
            return None
        recorder = self._gradient_recorder.get(threading.get_ident())
        return None if recorder is None else functools.partial(recorder, layer, direction)

    # ------------------------------------------------------------------ forward

    def _check_input_dim(self, input: Tensor, packed: bool):
        kind = self._kind
        if not packed and input.dim() not in (2, 3):
            if kind != "RNN":  # torch.nn.LSTM's and torch.nn.GRU's wording
                raise ValueError(f"{kind}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            raise ValueError(f"RNN: Expected input to be 2D or 3D, got {input.dim()}D tensor instead")

    def _check_input(self, input: Tensor, packed: bool, weight: Tensor):
        """After _check_input_dim and hx's dimensions (_hx_states), as torch.nn checks them."""
        kind = self._kind
        if input.dtype != weight.dtype and not torch.is_autocast_enabled(input.device.type):
            # (torch.nn's GRU and RNN check it so; its LSTM checks padded input so, and packed input
            # fails inside its kernels with a RuntimeError)
            error = RuntimeError if packed and kind == "LSTM" else ValueError
            raise error(f"RNN input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). "
                        f"Convert input: input.to({weight.dtype}), or convert model: model.to({input.dtype})")
        if packed and input.dim() != 2:
            raise RuntimeError(f"input must have 2 dimensions, got {input.dim()}")
        # (Under torch.jit.trace, sizes are traced tensors: these checks would only warn that the trace
        # records them as constants; the op itself checks the sizes it gets.)
        tracing = torch._C._get_tracing_state() is not None
        if not tracing and input.shape[-1] != self.input_size:
            raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {self.input_size}, "
                               f"got {input.shape[-1]}")
        if input.device != weight.device:  # (torch.nn's words)
            raise RuntimeError(f"Input and parameter tensors are not at the same device, found input tensor at "
                               f"{input.device} and parameter tensor at {weight.device}")

    def _check_state(self, state: Tensor, index: int, expected, weight: Tensor):
        if tuple(state.shape) != tuple(expected):
            name = "hidden size" if self._kind != "LSTM" else f"hidden[{index}] size"
            raise RuntimeError(f"Expected {name} {tuple(expected)}, got {list(state.shape)}")
        if state.device != weight.device:  # (torch.nn's words; the input is on the weights' device)
            raise RuntimeError(f"Input and hidden tensors are not at the same device, found input tensor at "
                               f"{weight.device} and hidden tensor at {state.device}")
        name = "hx" if self._kind != "LSTM" else f"hx[{index}]"
        wrong_dtype = state.dtype != weight.dtype and not torch.is_autocast_enabled(state.device.type) \
            and not (index == 1 and _float_cell_state(state.dtype, weight))
        if wrong_dtype:
            dtype = f"{weight.dtype} (or torch.float32)" if index == 1 and _float_cell_state(
                torch.float32, weight) else weight.dtype
            raise RuntimeError(f"{self._kind}: {name} must be a {dtype} tensor on {weight.device}, "
                               f"got {state.dtype} on {state.device}")

    def _run_layer(self, input, batch_sizes, states, weights, layer, direction):
        raise NotImplementedError

    def _state_sizes(self, batch):
        """Shapes of the initial states (RNN and GRU: h0 only; LSTM overrides)."""
        return [(self.num_layers * self._directions, batch, self.hidden_size)]

    def forward(self, input, hx=None):
        kind = self._kind
        weights = self._current_weights()
        needed = self.num_layers * self._directions * ((4 if self.bias else 2) + (self.proj_size > 0))
        if len(weights) != needed:
            # (torch.nn: "Expected more weights in stacked_rnn", also for fewer layers or directions)
            raise RuntimeError(
                f"{kind}: the layer holds {len(weights)} weights, but num_layers={self.num_layers}, "
                f"bidirectional={self.bidirectional}, bias={self.bias}, proj_size={self.proj_size} (as set now) "
                f"need {needed}: an option was changed after construction")
        weight = weights["weight_ih_l0"]
        if weight is None:  # (torch.nn fails reading its dtype: an AttributeError)
            raise AttributeError(f"{kind}: weight_ih_l0 is None, expected a Tensor")
        packed = isinstance(input, PackedSequence)
        if packed:
            data, batch_sizes, sorted_indices, unsorted_indices = input
            batch, unbatched = int(batch_sizes[0]), False
        elif isinstance(input, Tensor):
            data, batch_sizes, sorted_indices, unsorted_indices = input, None, None, None
            unbatched = data.dim() == 2
        else:
            leaf = _fx_leaf_call(self, input, hx)
            if leaf is not None:
                return leaf
            raise TypeError(f"{kind}: expected input to be a Tensor or a PackedSequence, got "
                            f"{type(input).__name__}")
        self._check_input_dim(data, packed)
        nested = not packed and data.is_nested
        if nested:
            _check_nested(kind, data, unbatched, self.batch_first)
        given = None if hx is None else self._hx_states(hx, unbatched, packed)
        if nested:
            data = _nested_as_padded(data, self.batch_first)
        if given is not None and sorted_indices is not None:
            # torch.nn permutes a packed batch's hx first (its rows as index_select(1) picks them),
            # then checks the input and the permuted states' sizes.
            given = [s.index_select(1, sorted_indices) for s in given]
        self._check_input(data, packed, weight)
        run_sizes = batch_sizes
        if packed and torch._C._get_tracing_state() is None and not torch.compiler.is_compiling():
            run_sizes = _packed_steps_read(batch_sizes)
        if not packed:
            if unbatched:
                data = data.unsqueeze(1)
            elif self.batch_first:
                data = data.transpose(0, 1)
            batch = data.shape[1]
        sizes = self._state_sizes(batch)
        if hx is None:
            # Packed input needs explicit zeros: the op reads the batch size off h0.
            states = [data.new_zeros(s) for s in sizes] if packed else [None] * len(sizes)
        else:
            states = self._states_of(given, sizes, weight)
        if nested and self.batch_first and not unbatched:
            input.transpose(0, 1)  # torch.nn's op fails here, once its checks pass: nested tensors refuse it
        if not packed and torch._C._get_tracing_state() is None and data.shape[0] == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        dtypes = self._cpu_autocast_dtypes(data, packed, batch_sizes, hx, weight)

        layer_input = data
        finals = [[] for _ in sizes]
        for layer in range(self.num_layers):
            outputs = []
            for direction in range(self._directions):
                index = layer * self._directions + direction
                layer_states = [None if s is None else s[index] for s in states]
                output, *final = self._run_layer(layer_input, run_sizes, layer_states, weights, layer,
                                                  direction)
                outputs.append(output)
                for store, f in zip(finals, final):
                    store.append(f)
            layer_input = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
        finals = [torch.stack(f) for f in finals]
        if dtypes is not None:
            layer_input = layer_input.to(dtypes[0])
            finals = [f.to(d) for f, d in zip(finals, dtypes[1:])]
        if unsorted_indices is not None:
            finals = [f.index_select(1, unsorted_indices) for f in finals]

        if packed:
            output = PackedSequence(layer_input, batch_sizes, sorted_indices, unsorted_indices)
        elif unbatched:
            output = layer_input.squeeze(1)
            finals = [f.squeeze(1) for f in finals]
        elif self.batch_first:
            output = layer_input.transpose(0, 1)
            if kind != "LSTM" and not torch.is_grad_enabled() and not _forward_ad_or_functorch() \
                    and torch._C._get_tracing_state() is None:
                # torch.nn's GRU and RNN return a tensor of their own, not a view (a no-grad view
                # cannot later be modified in place by an op that needs grad); the same strides.
                # (Not while torch.jit.trace records: its check reruns the trace without grad.)
                output = output.detach()
        else:
            output = layer_input
        return output, (finals[0] if len(finals) == 1 else tuple(finals))

    def _hx_states(self, hx, unbatched, packed=False):
        """The initial states given as hx, as a list, their number, types and dimensions checked (in
        torch.nn's order, before the input's dtype and size, with its exception types and messages)
        and made 3-D; _states_of checks the rest once the batch is known. With packed input torch.nn
        checks no dimensions here (their sizes are checked after the input), and neither does this."""
        kind = self._kind
        lstm = kind == "LSTM"
        states = list(hx) if lstm and isinstance(hx, (tuple, list)) else [hx]
        if len(states) != (2 if lstm else 1) or not all(isinstance(s, Tensor) for s in states):
            # torch.nn fails here with an IndexError or an error from deep inside; lstmfast says what
            # it expected.
            got = type(hx).__name__
            if isinstance(hx, (tuple, list)):
                got += f" of {[type(s).__name__ for s in hx]}"
            raise ValueError(f"{kind}: expected hx to be {'a tuple (h_0, c_0)' if lstm else 'a tensor'}, "
                             f"got {got}")
        dims = [s.dim() for s in states]
        want = 2 if unbatched else 3
        if not packed and any(d != want for d in dims):
            what = "unbatched 2-D" if unbatched else "batched 3-D"
            if lstm:
                raise RuntimeError(f"For {what} input, hx and cx should also be {want}-D but got "
                                   f"({dims[0]}-D, {dims[1]}-D) tensors")
            raise RuntimeError(f"For {what} input, hx should also be {want}-D but got {dims[0]}-D tensor")
        return [s.unsqueeze(1) for s in states] if unbatched else states

    def _states_of(self, states, sizes, weight):
        """The initial states from _hx_states, an LSTM's c_0 promoted as torch.nn does, their shapes
        and devices checked."""
        states = list(states)
        c0 = states[1] if len(states) == 2 else None
        device = weight.device.type
        if c0 is not None and c0.dtype != weight.dtype and not c0.is_complex() and c0.device == weight.device \
                and torch.promote_types(c0.dtype, weight.dtype) == weight.dtype \
                and (weight.dtype == torch.float64 or not torch.is_autocast_enabled(device)
                     or not c0.is_floating_point()):
            # torch.nn's LSTM promotes a c_0 of a lower-precision or integer dtype where its native path
            # runs (always for float64; for float32 with oneDNN off: its first use, f * c_0, promotes);
            # widening it first is exact and gives the same numbers. Such an h_0 it refuses, as
            # lstmfast does. Under autocast, a float64 layer is left alone and so is its c_0: torch.nn
            # promotes it as it is (not rounded to the autocast dtype first); an integer c_0 (which
            # autocast does not cast) is widened under autocast too, as torch.nn's LSTM takes it there.
            states[1] = c0.to(weight.dtype)
        for index, (s, size) in enumerate(zip(states, sizes)):
            self._check_state(s, index, size, weight)
        return states

    # ------------------------------------------------------------------ conversion

    @classmethod
    def from_torch(cls, module: nn.Module) -> "_RecurrentBase":
        """A new lstmfast layer equivalent to a torch.nn one, sharing the torch module's Parameter
        objects (so optimizers built on them keep working), device, dtype and training mode. To
        convert a layer in place, keeping its hooks and attributes, use :func:`convert`."""
        if type(module) is not cls._torch_class:
            raise TypeError(f"{cls.__name__}.from_torch expects a torch.nn.{cls._torch_class.__name__}, "
                            f"got {type(module).__name__}")
        return _copy_layer(module, cls)

    def to_torch(self) -> nn.Module:
        """A new torch.nn layer equivalent to this one, sharing its Parameter objects. grad_clip, which
        torch.nn's layers do not have, is dropped (with a warning when set), as by unconvert."""
        if self.grad_clip is not None:
            warnings.warn(f"lstmfast.{self._kind}.to_torch: grad_clip={self.grad_clip}, which torch.nn."
                          f"{self._torch_class.__name__} does not have, is dropped", stacklevel=2)
        return _copy_layer(self, self._torch_class)


def _forward_ad_or_functorch():
    return torch.autograd.forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active()


def _packed_steps_read(batch_sizes):
    """A PackedSequence's batch sizes up to its last step with rows: torch.nn runs a hand-made one whose
    last steps have none as if they were not there, and so do the ops given these. Any other
    malformation is left to the ops' checks, among them data with more rows than sum(batch_sizes),
    which torch.nn's layers read inconsistently (its reverse direction from the last rows)."""
    if batch_sizes.dim() != 1 or len(batch_sizes) < 2 or int(batch_sizes[-1]) != 0:
        return batch_sizes
    sizes = batch_sizes.tolist()
    steps = len(sizes)
    while steps > 1 and sizes[steps - 1] == 0:
        steps -= 1
    return batch_sizes[:steps]


def _check_nested(kind, input, unbatched, batch_first):
    """A nested tensor as input. torch.nn's GRU and RNN (and its LSTM off oneDNN) run a regular one
    (strided layout, components of one shape, not batch_first) as the padded tensor its components
    stack to, the gradient reaching the components; any other fails in the first op of theirs it
    reaches. The same calls in the same order give the same errors here: this one (unbatched input's
    unsqueeze) before hx is checked, _nested_as_padded's after, and batch_first's transpose in forward,
    after the states' sizes."""
    if input.layout != torch.strided:
        raise RuntimeError(f"{kind}: a nested tensor of layout {input.layout} is not supported as input "
                           f"(nor by torch.nn's {kind}); pass a padded tensor or a PackedSequence")
    if unbatched:
        input.unsqueeze(0 if batch_first else 1)  # (nested tensors refuse dimension 0)


def _nested_as_padded(input, batch_first):
    """The padded tensor a nested input stands for (_check_nested), whose sizes torch.nn's checks read."""
    if input.dim() == 3 and not batch_first:
        input.size(1)  # the batch size: an irregular nested tensor has none
    input.size(-1)  # the input size (likewise)
    return input.to_padded_tensor(0.0)


def _fx_leaf_call(module, input, hx):
    """Under torch.fx.symbolic_trace, a call_module node for the layer (None for any other input):
    torch.fx keeps torch.nn's own layers as leaves (their forward is not traced), and a traced model
    holding lstmfast's layers gets the same graph. The layer cannot be the traced root itself."""
    fx = sys.modules.get("torch.fx")
    if fx is None or not isinstance(input, fx.Proxy):
        return None
    tracer = input.tracer
    path = tracer.path_of_module(module)
    if not path:
        raise TypeError(f"lstmfast.{module._kind} cannot be the root of torch.fx.symbolic_trace (its forward "
                        f"is not traceable); trace a module that holds it, where it stays a leaf as torch.nn's "
                        f"layers do")
    return tracer.create_proxy("call_module", path, (input,) if hx is None else (input, hx), {})


def _float_cell_state(c0_dtype, weight):
    """Whether an LSTM takes a c_0 of this dtype as it is: float32 for a bfloat16 or float16 layer on the
    CPU (torch.nn's oneDNN path takes it for bfloat16 and returns c_n float32; lstmfast's CPU kernels
    keep the cell state float32 inside and return it unrounded, for float16 too)."""
    return c0_dtype == torch.float32 and weight.dtype in (torch.bfloat16, torch.float16) \
        and weight.device.type == "cpu"


_RNN_MODES = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}
# (layer, direction, bias, projection) -> the names of (w_ih, w_hh, b_ih, b_hh, w_hr), None where absent
_LAYER_WEIGHT_NAMES = {}
_OPTIONS = ("num_layers", "bias", "batch_first", "dropout", "bidirectional")


def _constructor_options(module, names=_OPTIONS):
    """A torch.nn.LSTM / GRU / RNN's constructor options among `names`, with its kind's own
    (proj_size for an LSTM, nonlinearity for an RNN)."""
    options = {name: getattr(module, name) for name in names}
    if isinstance(module, nn.LSTM):
        options["proj_size"] = module.proj_size
    elif isinstance(module, nn.RNN):
        options["nonlinearity"] = _RNN_MODES.get(module.mode, module.nonlinearity)
    return options


def _copy_layer(module, cls):
    for name in module._flat_weights_names:
        if not isinstance(module._parameters.get(name), nn.Parameter):
            # (old-style weight_norm / spectral_norm and pruning compute the weight in a hook)
            ours = isinstance(module, _RecurrentBase)
            call, fix = (f"lstmfast.{module._kind}.to_torch", "unconvert") if ours else \
                (f"lstmfast.{cls.__name__}.from_torch", "convert")
            raise TypeError(f"{call}: the layer's {name} is not a Parameter of its own (weight_norm, "
                            f"spectral_norm or pruning computes it), so it cannot be shared; "
                            f"lstmfast.{fix}(layer) changes the layer's class in place and keeps them")
    options = _constructor_options(module)
    # Built without dropout, which is set afterwards: torch.nn's dropout-with-one-layer warning, given
    # when the layer was built, is not given again (and no warnings filter is touched: catch_warnings
    # is not thread-safe before Python 3.14).
    new = cls(module.input_size, module.hidden_size, **{**options, "dropout": 0.0}, device="meta")
    new.dropout = options["dropout"]
    for name in module._flat_weights_names:
        setattr(new, name, getattr(module, name))
    new._init_flat_weights()
    return new.train(module.training)


class LSTM(_RecurrentBase, nn.LSTM):
    r"""torch.nn.LSTM with a fused forward and BPTT: same arguments (in the same order), parameters,
    inputs, outputs and errors; ``isinstance(layer, torch.nn.LSTM)`` holds.

    Extra keyword-only arguments: ``grad_clip`` (clamp dL/d(gate pre-activations) into
    ``[-grad_clip, grad_clip]`` at every step of BPTT; default None = exact torch.nn gradients) and
    ``forget_bias`` (added to the forget-gate slice of every ``bias_ih`` at initialization; default 0
    = torch.nn's initialization).
    """

    def forward(self, input, hx=None):
        # (the class's own, so that Python's errors for wrong arguments name LSTM.forward, as torch.nn's do)
        return super().forward(input, hx)

    _kind = "LSTM"
    _torch_class = nn.LSTM
    _gates = 4

    def __init__(self, *args, grad_clip: Optional[float] = None, forget_bias: float = 0.0, **kwargs):
        self._check_constructor_args(args, kwargs, (("input_size", 0), ("hidden_size", 1),
                                                    ("num_layers", 2), ("proj_size", 7)))
        if isinstance(forget_bias, bool) or not isinstance(forget_bias, numbers.Real):
            raise TypeError(f"forget_bias should be a number, got: {type(forget_bias).__name__}")
        functional._check_grad_clip(grad_clip)
        if not math.isfinite(forget_bias):
            raise ValueError(f"forget_bias should be a finite number, got {forget_bias}")
        self.forget_bias = float(forget_bias)  # read by reset_parameters, which torch.nn's init calls
        super().__init__(*args, **kwargs)
        if self.forget_bias and not self.bias:
            raise ValueError(f"forget_bias={self.forget_bias} initializes bias_ih's forget-gate slice, but the "
                             f"layer has bias=False")
        self._init_extras(grad_clip)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        forget_bias = getattr(self, "forget_bias", 0.0)
        if forget_bias and self.bias:
            H = self.hidden_size
            with torch.no_grad():
                for name, p in self.named_parameters():
                    if name.startswith("bias_ih"):
                        p[H:2 * H] += forget_bias

    def _state_sizes(self, batch):
        n = self.num_layers * self._directions
        return [(n, batch, self._out_size), (n, batch, self.hidden_size)]

    def _run_layer(self, input, batch_sizes, states, weights, layer, direction):
        w_ih, w_hh, b_ih, b_hh, w_hr = self._layer_weights(weights, layer, direction)
        return functional.lstm(input, w_ih, w_hh, b_ih, b_hh, w_hr=w_hr, h0=states[0], c0=states[1],
                               batch_sizes=batch_sizes, reverse=direction == 1,
                               grad_clip=self.grad_clip, norm_sink=self._norm_sink(layer, direction))


class RNN(_RecurrentBase, nn.RNN):
    r"""torch.nn.RNN (Elman RNN, ``nonlinearity`` 'tanh' or 'relu') with a fused forward and BPTT:
    same arguments (in the same order), parameters, inputs, outputs and errors;
    ``isinstance(layer, torch.nn.RNN)`` holds.

    Extra keyword-only argument: ``grad_clip``, as for :class:`LSTM`.
    """

    def forward(self, input, hx=None):
        # (the class's own, so that Python's errors for wrong arguments name RNN.forward, as torch.nn's do)
        return super().forward(input, hx)

    _kind = "RNN"
    _torch_class = nn.RNN
    _gates = 1
    _device_position = 8  # of `device` in nn.RNN's documented signature

    def __init__(self, *args, grad_clip: Optional[float] = None, **kwargs):
        args = self._single_state_args(args, kwargs, grad_clip)
        super().__init__(*args, **kwargs)
        self._init_extras(grad_clip)

    def _nonlinearity(self):
        """The nonlinearity torch.nn's forward runs: the one its `mode` names (changing `nonlinearity`
        after construction changes nothing there)."""
        if self.mode not in _RNN_MODES:
            raise AssertionError(f"mode must be RNN_TANH or RNN_RELU, got {self.mode}")
        return _RNN_MODES[self.mode]

    def _run_layer(self, input, batch_sizes, states, weights, layer, direction):
        w_ih, w_hh, b_ih, b_hh, _ = self._layer_weights(weights, layer, direction)
        return functional.rnn(input, w_ih, w_hh, b_ih, b_hh, nonlinearity=self._nonlinearity(),
                              h0=states[0], batch_sizes=batch_sizes, reverse=direction == 1,
                              grad_clip=self.grad_clip, norm_sink=self._norm_sink(layer, direction))


class GRU(_RecurrentBase, nn.GRU):
    r"""torch.nn.GRU with a fused forward and BPTT: same arguments (in the same order), parameters,
    inputs, outputs and errors; ``isinstance(layer, torch.nn.GRU)`` holds.

    Extra keyword-only argument: ``grad_clip``, as for :class:`LSTM` (here the gradients of the
    pre-activations of r, z and n, ``W_in x + b_in + r * (W_hn h + b_hn)``, are clamped).
    """

    def forward(self, input, hx=None):
        # (the class's own, so that Python's errors for wrong arguments name GRU.forward, as torch.nn's do)
        return super().forward(input, hx)

    _kind = "GRU"
    _torch_class = nn.GRU
    _gates = 3
    _device_position = 7  # of `device` in nn.GRU's documented signature

    def __init__(self, *args, grad_clip: Optional[float] = None, **kwargs):
        args = self._single_state_args(args, kwargs, grad_clip)
        super().__init__(*args, **kwargs)
        self._init_extras(grad_clip)

    def _run_layer(self, input, batch_sizes, states, weights, layer, direction):
        w_ih, w_hh, b_ih, b_hh, _ = self._layer_weights(weights, layer, direction)
        return functional.gru(input, w_ih, w_hh, b_ih, b_hh, h0=states[0], batch_sizes=batch_sizes,
                              reverse=direction == 1, grad_clip=self.grad_clip,
                              norm_sink=self._norm_sink(layer, direction))


_dynamo_compat.install(_RecurrentBase)


# ---------------------------------------------------------------------- convert / unconvert

_EXTRAS = ("grad_clip", "forget_bias", "_gradient_recorder")


def convert(model: nn.Module, *, verbose: bool = False) -> nn.Module:
    """Turns every torch.nn.LSTM / torch.nn.GRU / torch.nn.RNN inside `model` (or `model` itself) into
    the lstmfast layer, in place: the very same objects change class, so parameters, buffers, hooks
    (forward, pre-forward, backward, state-dict), attributes, training mode, parametrizations,
    weight_norm, pruning and shared references all stay as they were. Returns `model`.

    Left as they are, with a warning naming them: subclasses of torch.nn.LSTM / GRU / RNN (their own
    code may rely on torch.nn's forward) and TorchScript modules (lstmfast's layers cannot be scripted:
    deploy a converted model with torch.jit.trace, torch.export or torch.compile).
    `verbose=True` prints what was converted and what was left.
    """
    return _change_classes(model, {nn.LSTM: LSTM, nn.GRU: GRU, nn.RNN: RNN}, "convert", verbose)


def unconvert(model: nn.Module, *, verbose: bool = False) -> nn.Module:
    """The inverse of :func:`convert`: lstmfast layers back to torch.nn ones, in place. Returns
    `model`. A layer's grad_clip and forget_bias, which torch.nn does not have, are dropped (with a
    warning when grad_clip was set)."""
    return _change_classes(model, {LSTM: nn.LSTM, GRU: nn.GRU, RNN: nn.RNN}, "unconvert", verbose)


def _walk(module, path, seen):
    """Every module under `module` once (a module referenced twice is visited at its first path),
    not descending into TorchScript modules."""
    if id(module) in seen:
        return
    seen.add(id(module))
    yield path, module
    if isinstance(module, torch.jit.ScriptModule):
        return
    for name, child in module._modules.items():
        if child is not None:
            yield from _walk(child, f"{path}.{name}" if path else name, seen)


def _plain_class(module):
    """The class a module was built as: under a parametrization, torch substitutes a generated
    subclass (Parametrized<Name>) whose single base is the original class."""
    cls = type(module)
    if parametrize.is_parametrized(module) and cls.__name__.startswith("Parametrized"):
        return cls.__bases__[0]
    return cls


def _retarget(module, target):
    """The class `module` gets: `target`, or a parametrized subclass of it carrying the same
    parametrization properties as the module's current parametrized class."""
    cls = type(module)
    if cls is _plain_class(module):
        return target
    namespace = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    return type(f"Parametrized{target.__name__}", (target,), namespace)


def _change_classes(model, table, verb, verbose):
    changed, left = [], []
    for path, module in _walk(model, "", set()):
        shown = path or "<model>"
        if isinstance(module, torch.jit.ScriptModule):
            names = {getattr(m, "original_name", "") for m in module.modules()}
            found = sorted(names & {cls.__name__ for cls in table})
            if found:
                advice = ("unconvert the model before torch.jit.script" if verb == "unconvert" else
                          "lstmfast's layers cannot be scripted: convert the model unscripted and deploy it "
                          "with torch.jit.trace, torch.export or torch.compile")
                left.append(f"{shown} (TorchScript module holding {', '.join(found)}: scripted modules "
                            f"cannot be changed; {advice})")
            continue
        plain = _plain_class(module)
        if plain in table:
            target = table[plain]
            if verb == "unconvert" and module.grad_clip is not None:
                warnings.warn(f"lstmfast.unconvert: {shown} had grad_clip={module.grad_clip}, which "
                              f"torch.nn.{target.__name__} does not have; it is dropped", stacklevel=3)
            module.__class__ = _retarget(module, target)
            if verb == "convert":
                if target is LSTM:
                    module.forget_bias = 0.0
                _RecurrentBase._init_extras(module)
            else:
                for name in _EXTRAS:
                    module.__dict__.pop(name, None)
            changed.append(f"{shown} ({plain.__name__} -> {target.__module__}.{target.__name__})")
        elif isinstance(module, tuple(table)) and not (verb == "convert" and isinstance(module, _RecurrentBase)):
            left.append(f"{shown} ({type(module).__qualname__}: a subclass of "
                        f"{next(c.__module__ + '.' + c.__name__ for c in table if isinstance(module, c))}; "
                        f"only that class itself is changed, as a subclass may rely on its forward)")
    if left:
        warnings.warn(f"lstmfast.{verb} left as they are: " + "; ".join(left), stacklevel=3)
    if verbose:
        print(f"lstmfast.{verb}: changed {len(changed)}, left {len(left)}")
        for line in changed:
            print(f"  changed {line}")
        for line in left:
            print(f"  left    {line}")
    return model

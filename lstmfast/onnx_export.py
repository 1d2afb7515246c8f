"""ONNX export of lstmfast layers: each lstmfast op call becomes one ONNX LSTM, GRU or RNN node.

Two exporters, one mapping (inference only; the ONNX graph has no backward):

- ``torch.onnx.export(..., dynamo=True, custom_translation_table=lstmfast.onnx_translations())``:
  :func:`onnx_translations` maps ``torch.ops.lstmfast.lstm_forward.default``,
  ``torch.ops.lstmfast.gru_forward.default`` and ``torch.ops.lstmfast.rnn_forward.default`` to onnxscript
  functions (onnxscript is imported only
  when it is called).
- ``torch.onnx.export(..., dynamo=False)``: the TorchScript-based exporter meets either the raw ops
  (under ``torch.no_grad()``) or the autograd Functions (``LSTMFunction`` / ``GRUFunction`` /
  ``RNNFunction``);
  ``import lstmfast`` registers a symbolic for the ops, and the Functions carry a ``symbolic``
  staticmethod, both emitting the nodes built here.

The mapping, per op call (one layer, one direction):
  torch's gate order i, f, g, o  ->  ONNX's i, o, f, c: the rows of W, R and both biases are permuted;
  ONNX's B is [b_ih, b_hh] concatenated; reverse=True -> direction="reverse";
  h0 / c0 (B, H) -> initial_h / initial_c (1, B, H); Y (T, 1, B, H) -> output (T, B, H).
  GRU: torch's gate order r, z, n -> ONNX's z, r, h, with linear_before_reset=1 (ONNX's name for
  torch's n = tanh(W_in x + b_in + r * (W_hn h + b_hn))).
Not expressible with one ONNX LSTM node, and refused at export with a clear error: projection
(proj_size > 0, ONNX's LSTM has no W_hr) and packed input (PackedSequence).
The saved activations a training-mode op also returns (gates, cells; a GRU's gates) are only read by
backward; they are exported as empty tensors.
"""


import torch

from ._import_hooks import after_import

_REFUSE_PROJECTION = (
    "lstmfast ONNX export: an LSTM with projection (proj_size > 0) cannot be expressed with ONNX's LSTM "
    "operator, which has no projection weight. Export it with torch.export / AOTInductor instead, or "
    "use proj_size=0.")
_REFUSE_PACKED = (
    "lstmfast ONNX export: packed input (PackedSequence) is not supported; export the model on a padded "
    "(T, B, I) tensor.")


def _gate_order(hidden_size):
    """Row indices taking torch's LSTM gate blocks (i, f, g, o) to ONNX's (i, o, f, c)."""
    rows = lambda k: list(range(k * hidden_size, (k + 1) * hidden_size))  # noqa: E731
    return rows(0) + rows(3) + rows(1) + rows(2)


def _gru_gate_order(hidden_size):
    """Row indices taking torch's GRU gate blocks (r, z, n) to ONNX's (z, r, h)."""
    rows = lambda k: list(range(k * hidden_size, (k + 1) * hidden_size))  # noqa: E731
    return rows(1) + rows(0) + rows(2)


# ---------------------------------------------------------------------- dynamo exporter (onnxscript)

def onnx_translations():
    """The translations to pass to ``torch.onnx.export(model, args, f, dynamo=True,
    custom_translation_table=lstmfast.onnx_translations())``: a dict mapping lstmfast's forward ops
    (``torch.ops.lstmfast.lstm_forward.default``, ``gru_forward.default``, ``rnn_forward.default``) to
    onnxscript functions that emit ONNX LSTM / GRU / RNN nodes. Needs ``onnxscript`` (imported here, not at
    ``import lstmfast``). Inference only; LSTM projection and packed input are refused with an error."""
    from onnxscript import opset18 as op  # noqa: F401  (the translations below close over it)
    from onnxscript import ir

    def is_given(value):
        return value is not None

    def hidden_of(w_hh, rows_per_gate):
        size = w_hh.shape[0] if w_hh.shape is not None else None
        if not isinstance(size, int):
            raise RuntimeError("lstmfast ONNX export: the recurrent weight's shape must be static")
        return size // rows_per_gate

    def reordered(tensor, order):
        return op.Gather(tensor, op.Constant(value=ir.tensor(order, dtype=ir.DataType.INT64)), axis=0)

    def directional(tensor):
        return op.Unsqueeze(tensor, op.Constant(value_ints=[0]))

    def empty_like(input):
        return op.Slice(op.Reshape(input, op.Constant(value_ints=[-1])), op.Constant(value_ints=[0]),
                        op.Constant(value_ints=[0]))

    def bias_of(b_ih, b_hh, order, rows):
        if not is_given(b_ih) and not is_given(b_hh):
            return None
        parts = []
        for b in (b_ih, b_hh):
            if is_given(b):
                parts.append(reordered(b, order) if order is not None else b)
            else:
                parts.append(op.CastLike(op.ConstantOfShape(op.Constant(value_ints=[rows])), b_ih if is_given(b_ih) else b_hh))
        return directional(op.Concat(*parts, axis=0))

    def lstm_forward(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
                     reverse: bool, training: bool):
        if is_given(w_hr):
            raise RuntimeError(_REFUSE_PROJECTION)
        if is_given(batch_sizes):
            raise RuntimeError(_REFUSE_PACKED)
        hidden = hidden_of(w_hh, 4)
        order = _gate_order(hidden)
        bias = bias_of(b_ih, b_hh, order, 4 * hidden)
        y, y_h, y_c = op.LSTM(
            input, directional(reordered(w_ih, order)), directional(reordered(w_hh, order)), bias,
            None, directional(h0) if is_given(h0) else None, directional(c0) if is_given(c0) else None,
            direction="reverse" if reverse else "forward", hidden_size=hidden)
        squeeze = op.Constant(value_ints=[0])
        empty = empty_like(input)
        return (op.Squeeze(y, op.Constant(value_ints=[1])), op.Squeeze(y_h, squeeze),
                op.Squeeze(y_c, squeeze), empty, op.Identity(empty))

    def rnn_forward(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity: str, reverse: bool):
        if is_given(batch_sizes):
            raise RuntimeError(_REFUSE_PACKED)
        hidden = hidden_of(w_hh, 1)
        bias = bias_of(b_ih, b_hh, None, hidden)
        y, y_h = op.RNN(
            input, directional(w_ih), directional(w_hh), bias, None,
            directional(h0) if is_given(h0) else None,
            activations=["Tanh" if nonlinearity == "tanh" else "Relu"],
            direction="reverse" if reverse else "forward", hidden_size=hidden)
        return op.Squeeze(y, op.Constant(value_ints=[1])), op.Squeeze(y_h, op.Constant(value_ints=[0]))

    def gru_forward(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse: bool, training: bool):
        if is_given(batch_sizes):
            raise RuntimeError(_REFUSE_PACKED)
        hidden = hidden_of(w_hh, 3)
        order = _gru_gate_order(hidden)
        bias = bias_of(b_ih, b_hh, order, 3 * hidden)
        y, y_h = op.GRU(
            input, directional(reordered(w_ih, order)), directional(reordered(w_hh, order)), bias, None,
            directional(h0) if is_given(h0) else None, linear_before_reset=1,
            direction="reverse" if reverse else "forward", hidden_size=hidden)
        return (op.Squeeze(y, op.Constant(value_ints=[1])), op.Squeeze(y_h, op.Constant(value_ints=[0])),
                empty_like(input))

    return {
        torch.ops.lstmfast.lstm_forward.default: lstm_forward,
        torch.ops.lstmfast.gru_forward.default: gru_forward,
        torch.ops.lstmfast.rnn_forward.default: rnn_forward,
    }


# ---------------------------------------------------------------------- TorchScript-based exporter

def _missing(value):
    return value is None or (isinstance(value, torch._C.Value) and value.node().mustBeNone())


def _static_rows(g_value):
    sizes = g_value.type().sizes() if isinstance(g_value.type(), torch._C.TensorType) else None
    if not sizes or sizes[0] is None:
        raise RuntimeError("lstmfast ONNX export: the recurrent weight's shape must be static")
    return sizes[0]


def _absent(g):
    """An omitted optional input of an ONNX node."""
    node = g.op("prim::Constant")
    node.setType(torch._C.OptionalType.ofTensor())
    return node


def _legacy_parts(g, w_ih, w_hh, b_ih, b_hh, order, rows):
    """(W, R, B) with a leading direction axis, rows permuted by `order` (None: as they are)."""
    def arrange(tensor):
        if order is not None:
            tensor = g.op("Gather", tensor, g.op("Constant", value_t=torch.tensor(order)), axis_i=0)
        return g.op("Unsqueeze", tensor, g.op("Constant", value_t=torch.tensor([0])))

    if _missing(b_ih) and _missing(b_hh):
        bias = _absent(g)
    else:
        like = b_hh if _missing(b_ih) else b_ih
        zeros = lambda: g.op("Mul", like, g.op("Constant", value_t=torch.tensor(0.0)))  # noqa: E731
        parts = [b if not _missing(b) else zeros() for b in (b_ih, b_hh)]
        if order is not None:
            parts = [g.op("Gather", p, g.op("Constant", value_t=torch.tensor(order)), axis_i=0)
                     for p in parts]
        bias = g.op("Unsqueeze", g.op("Concat", *parts, axis_i=0),
                    g.op("Constant", value_t=torch.tensor([0])))
    return arrange(w_ih), arrange(w_hh), bias


def _legacy_state(g, state):
    if _missing(state):
        return _absent(g)
    return g.op("Unsqueeze", state, g.op("Constant", value_t=torch.tensor([0])))


def _legacy_outputs(g, y, *finals):
    y = g.op("Squeeze", y, g.op("Constant", value_t=torch.tensor([1])))
    return (y, *(g.op("Squeeze", f, g.op("Constant", value_t=torch.tensor([0]))) for f in finals))


def legacy_lstm(g, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse):
    """The ONNX nodes of one lstm_forward call (TorchScript-based exporter): (output, h_n, c_n, gates,
    cells), the last two empty."""
    if not _missing(w_hr):
        raise RuntimeError(_REFUSE_PROJECTION)
    if not _missing(batch_sizes):
        raise RuntimeError(_REFUSE_PACKED)
    hidden = _static_rows(w_hh) // 4
    order = _gate_order(hidden)
    w, r, b = _legacy_parts(g, w_ih, w_hh, b_ih, b_hh, order, 4 * hidden)
    y, y_h, y_c = g.op("LSTM", input, w, r, b, _absent(g), _legacy_state(g, h0), _legacy_state(g, c0),
                       direction_s="reverse" if reverse else "forward", hidden_size_i=hidden, outputs=3)
    empty = g.op("Slice", g.op("Reshape", input, g.op("Constant", value_t=torch.tensor([-1]))),
                 g.op("Constant", value_t=torch.tensor([0])), g.op("Constant", value_t=torch.tensor([0])))
    return (*_legacy_outputs(g, y, y_h, y_c), empty, g.op("Identity", empty))


def legacy_rnn(g, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse):
    """The ONNX nodes of one rnn_forward call (TorchScript-based exporter): (output, h_n)."""
    if not _missing(batch_sizes):
        raise RuntimeError(_REFUSE_PACKED)
    hidden = _static_rows(w_hh)
    w, r, b = _legacy_parts(g, w_ih, w_hh, b_ih, b_hh, None, hidden)
    y, y_h = g.op("RNN", input, w, r, b, _absent(g), _legacy_state(g, h0),
                  activations_s=["Tanh" if nonlinearity == "tanh" else "Relu"],
                  direction_s="reverse" if reverse else "forward", hidden_size_i=hidden, outputs=2)
    return _legacy_outputs(g, y, y_h)


def legacy_gru(g, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse):
    """The ONNX nodes of one gru_forward call (TorchScript-based exporter): (output, h_n, gates), the
    last empty."""
    if not _missing(batch_sizes):
        raise RuntimeError(_REFUSE_PACKED)
    hidden = _static_rows(w_hh) // 3
    w, r, b = _legacy_parts(g, w_ih, w_hh, b_ih, b_hh, _gru_gate_order(hidden), 3 * hidden)
    y, y_h = g.op("GRU", input, w, r, b, _absent(g), _legacy_state(g, h0), linear_before_reset_i=1,
                  direction_s="reverse" if reverse else "forward", hidden_size_i=hidden, outputs=2)
    empty = g.op("Slice", g.op("Reshape", input, g.op("Constant", value_t=torch.tensor([-1]))),
                 g.op("Constant", value_t=torch.tensor([0])), g.op("Constant", value_t=torch.tensor([0])))
    return (*_legacy_outputs(g, y, y_h), empty)


_LEGACY_OPSET = 14  # ONNX LSTM/GRU/RNN as of opset 14; Unsqueeze/Squeeze take axes as inputs (13+)


def register_legacy_symbolics():
    """Registers the raw ops' symbolics with the TorchScript-based exporter (torch.onnx.export with
    dynamo=False, under torch.no_grad()), through :func:`install`."""
    from torch.onnx import register_custom_op_symbolic, symbolic_helper

    @symbolic_helper.parse_args("v", "v", "v", "v", "v", "v", "v", "v", "v", "b", "b")
    def lstm_forward(g, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, training):
        return legacy_lstm(g, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)

    @symbolic_helper.parse_args("v", "v", "v", "v", "v", "v", "v", "b", "b")
    def gru_forward(g, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse, training):
        return legacy_gru(g, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse)

    @symbolic_helper.parse_args("v", "v", "v", "v", "v", "v", "v", "s", "b")
    def rnn_forward(g, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse):
        return legacy_rnn(g, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse)

    register_custom_op_symbolic("lstmfast::lstm_forward", lstm_forward, _LEGACY_OPSET)
    register_custom_op_symbolic("lstmfast::gru_forward", gru_forward, _LEGACY_OPSET)
    register_custom_op_symbolic("lstmfast::rnn_forward", rnn_forward, _LEGACY_OPSET)


def install():
    """Registers the TorchScript-based exporter's symbolics now if torch.onnx is loaded, else when it
    is (called by ``import lstmfast``; importing torch.onnx costs about 25 ms, which users who never
    export do not pay)."""
    after_import("torch.onnx", lambda _: register_legacy_symbolics())

"""Loads the compiled ops (torch.ops.lstmfast.*) and gives each a fake implementation.

The fakes describe output shapes from input shapes only (never from values), so the ops
work under torch.compile, FakeTensorMode and torch.library.opcheck. Every output is contiguous, whatever
the strides of the inputs (transposed batch_first views, expanded inputs or weights): the kernels
allocate their outputs so (csrc/layer_ops.h), and inductor relies on the fakes' strides.
"""

import functools
import inspect
import os

import torch

from ._import_hooks import after_import

try:
    from . import _C  # noqa: F401  (importing it registers torch.ops.lstmfast.*)
except ImportError as error:  # pragma: no cover - exercised only by a broken install
    raise ImportError(
        f"lstmfast: the compiled extension lstmfast._C failed to load ({error}). It must be built "
        f"against the torch that runs it (torch {torch.__version__} here): reinstall with "
        "`pip install --no-build-isolation .` from the lstmfast source tree."
    ) from error

ops = torch.ops.lstmfast


def _layout(input, batch_sizes, h0):
    """(rows N, batch B, leading shape of per-row outputs) of the op's sequence layout."""
    if batch_sizes is None:
        steps, batch = input.shape[0], input.shape[1]
        return steps * batch, batch, (steps, batch)
    rows = input.shape[0]
    # Packed input: the batch is batch_sizes[0], a value, so take it from h0 when given.
    batch = h0.shape[0] if h0 is not None else torch.library.get_ctx().new_dynamic_size()
    return rows, batch, (rows,)


def _empty(like):
    return like.new_empty((0,))


def _fake(name):
    """Registers the decorated function as lstmfast::`name`'s fake implementation. That also runs for
    real tensors when one of a call's tensors is on the meta device (the dispatcher then picks the Meta
    kernel, whatever the others' devices): like the real kernels, it refuses a tensor on another
    device than input's (batch_sizes, on the CPU, excepted; a meta batch_sizes only goes with a meta
    input) instead of returning uninitialized memory."""

    def register(fn):
        names = list(inspect.signature(fn).parameters)
        input_index = names.index("input")

        @functools.wraps(fn)
        def fake(*args):
            device = args[input_index].device
            for arg_name, arg in zip(names, args):
                if not isinstance(arg, torch.Tensor):
                    continue
                if arg_name == "batch_sizes":  # (on the CPU whatever input's device; meta only with input)
                    if arg.device.type == "meta" and device.type != "meta":
                        raise RuntimeError(f"lstmfast.{name}: expected batch_sizes to be a 1-D int64 tensor on "
                                           f"the CPU, but got one on {arg.device}")
                elif arg.device != device:
                    raise RuntimeError(f"lstmfast.{name}: expected {arg_name} on device {device} (the device "
                                       f"of input), but got {arg.device}")
            return fn(*args)

        torch.library.register_fake(f"lstmfast::{name}")(fake)
        return fn

    return register


def _saved_dtype(input):
    """The dtype of the activations a training forward saves for backward: float32 for a float16 or
    bfloat16 call on the CPU (its kernels keep them float32, csrc/cpu/ops_cpu.cpp), else input's."""
    return torch.float32 if input.device.type == "cpu" and input.dtype in _REDUCED else input.dtype


def _cell_dtype(input, c0):
    """The dtype of c_n and grad_c0: input's, or float32 where a float16 / bfloat16 call on the CPU was
    given a float32 c0 (its kernels keep the cell state float32 and then return it unrounded)."""
    return c0.dtype if c0 is not None and c0.dtype == _saved_dtype(input) else input.dtype


@_fake("lstm_forward")
def _lstm_forward_fake(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, training):
    hidden, proj = w_hh.shape[0] // 4, w_hh.shape[1]
    rows, batch, lead = _layout(input, batch_sizes, h0)
    output = input.new_empty((*lead, proj))
    gates = input.new_empty((rows, 4 * hidden) if training else (0,), dtype=_saved_dtype(input))
    cells = input.new_empty((rows, hidden) if training else (0,), dtype=_saved_dtype(input))
    return (output, input.new_empty((batch, proj)), input.new_empty((batch, hidden), dtype=_cell_dtype(input, c0)),
            gates, cells)


@_fake("lstm_backward")
def _lstm_backward_fake(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr,
                        output, gates, cells, reverse, output_mask, grad_clip, return_norms):
    hidden, proj = w_hh.shape[0] // 4, w_hh.shape[1]
    rows, batch, _ = _layout(input, batch_sizes, h0)
    need_input, _, need_weights, need_bias = output_mask
    norm = input.new_empty((rows if return_norms else 0,), dtype=_norm_dtype(input.dtype))
    return (
        input.new_empty(input.shape) if need_input else _empty(input),
        input.new_empty((batch, proj)),
        input.new_empty((batch, hidden), dtype=_cell_dtype(input, c0)),
        input.new_empty(w_ih.shape) if need_weights else _empty(input),
        input.new_empty(w_hh.shape) if need_weights else _empty(input),
        input.new_empty((4 * hidden,)) if need_bias else _empty(input),
        input.new_empty(w_hr.shape) if need_weights and w_hr is not None else _empty(input),
        norm,
        norm.clone(),
    )


@_fake("rnn_forward")
def _rnn_forward_fake(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse):
    hidden = w_hh.shape[0]
    _, batch, lead = _layout(input, batch_sizes, h0)
    return input.new_empty((*lead, hidden)), input.new_empty((batch, hidden))


@_fake("rnn_backward")
def _rnn_backward_fake(grad_output, grad_h_n, input, batch_sizes, h0, w_ih, w_hh, output, nonlinearity,
                       reverse, output_mask, grad_clip, return_norms):
    hidden = w_hh.shape[0]
    rows, batch, _ = _layout(input, batch_sizes, h0)
    need_input, _, need_weights, need_bias = output_mask
    return (
        input.new_empty(input.shape) if need_input else _empty(input),
        input.new_empty((batch, hidden)),
        input.new_empty(w_ih.shape) if need_weights else _empty(input),
        input.new_empty(w_hh.shape) if need_weights else _empty(input),
        input.new_empty((hidden,)) if need_bias else _empty(input),
        input.new_empty((rows if return_norms else 0,), dtype=_norm_dtype(input.dtype)),
    )


@_fake("gru_forward")
def _gru_forward_fake(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse, training):
    hidden = w_hh.shape[0] // 3
    rows, batch, lead = _layout(input, batch_sizes, h0)
    gates = input.new_empty((rows, 4 * hidden) if training else (0,), dtype=_saved_dtype(input))
    return input.new_empty((*lead, hidden)), input.new_empty((batch, hidden)), gates


@_fake("gru_backward")
def _gru_backward_fake(grad_output, grad_h_n, input, batch_sizes, h0, w_ih, w_hh, output, gates, reverse,
                       output_mask, grad_clip, return_norms):
    hidden = w_hh.shape[0] // 3
    rows, batch, _ = _layout(input, batch_sizes, h0)
    need_input, _, need_weights, need_bias = output_mask
    return (
        input.new_empty(input.shape) if need_input else _empty(input),
        input.new_empty((batch, hidden)),
        input.new_empty(w_ih.shape) if need_weights else _empty(input),
        input.new_empty(w_hh.shape) if need_weights else _empty(input),
        input.new_empty((3 * hidden,)) if need_bias else _empty(input),
        input.new_empty((3 * hidden,)) if need_bias else _empty(input),
        input.new_empty((rows if return_norms else 0,), dtype=_norm_dtype(input.dtype)),
    )


_REDUCED = (torch.float16, torch.bfloat16)


def _norm_dtype(dtype):
    return torch.float32 if dtype in _REDUCED else dtype


# ---------------------------------------------------------------- the forward ops' own autograd

# lstmfast's autograd.Functions (lstmfast.functional) call the ops below autograd; a graph that records
# the forward ops themselves (torch.export, torch.jit.trace) gets their first-order backward from here,
# so that training through program.module() or a traced module gives every gradient, as torch.nn's
# graphs do. Second order through such a graph is refused (use the eager or compiled module).


def below_autograd(op, *args):
    """op(*args) without the autograd registered below: what lstmfast's own autograd.Functions and
    no-grad paths call (that registration is a Python kernel, about 7 us a call). Under torch.compile
    Dynamo traces the call as it is."""
    if torch.compiler.is_compiling():
        return op(*args)
    with torch._C._AutoDispatchBelowAutograd():
        return op(*args)


def _refuse_second_order(name, ctx, grads):
    """A backward asked to build a graph (create_graph=True) over anything that requires grad: this
    backward's gradients are not differentiable, so it refuses rather than return them as if they were."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*grads, *ctx.saved_tensors)):
        raise RuntimeError(
            f"lstmfast.{name}: second-order gradients through a graph that recorded lstmfast's op "
            "(torch.export, torch.jit.trace) are not supported; the eager or torch.compile'd module has them")


def backward_mask(needs, input_index, state_indices, weight_indices, bias_indices):
    """A backward op's output_mask [input, states, weights, biases] from autograd's needs_input_grad and
    the indices of those inputs among the forward's (lstmfast.functional's Functions take the same)."""
    return [needs[input_index], any(needs[i] for i in state_indices), any(needs[i] for i in weight_indices),
            any(needs[i] for i in bias_indices)]


def second_bias_grad(grad_bias, first_returned):
    """b_hh's gradient, which equals b_ih's (the op computes it once): a copy of its own where b_ih's is
    returned too, as torch.nn's are two tensors (a gradient hook, torch.autograd.grad or torch.func.grad
    may modify one in place, and clip_grad_norm_ scales each)."""
    return grad_bias.clone() if first_returned else grad_bias


def lstm_need(need, grad_output, grad_h_n, input, batch_sizes):
    """An LSTM Function's needs_input_grad (input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr,
    ...), less w_hr's where nothing the loss uses depends on it: only c_n is used and every sequence is
    one step long, so c_n comes from h_0, never from a projected h. torch.nn's autograd finds no path
    to w_hr there and leaves its gradient None (optimizers then skip it: weight decay, momentum), not
    zeros."""
    steps = input.shape[0] if batch_sizes is None else batch_sizes.shape[0]
    if need[8] and grad_output is None and grad_h_n is None and steps == 1:
        return (*need[:8], False, *need[9:])
    return need


def _asked(need, grads):
    """The gradients autograd asks for (None for the others, and for absent inputs)."""
    return tuple(g if asked else None for g, asked in zip(grads, need))


def _lstm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:9], output[0], output[3], output[4])
    ctx.mark_non_differentiable(output[3], output[4])
    ctx.set_materialize_grads(False)  # (an unused output's gradient stays None: see lstm_need)
    ctx.reverse, ctx.training = inputs[9], inputs[10]


def _lstm_backward(ctx, grad_output, grad_h_n, grad_c_n, _gates, _cells):
    _refuse_second_order("lstm_forward", ctx, (grad_output, grad_h_n, grad_c_n))
    input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, output, gates, cells = ctx.saved_tensors
    if not ctx.training:  # (recorded in its inference form: the activations are computed again)
        output, _, _, gates, cells = below_autograd(ops.lstm_forward, input, batch_sizes, h0, c0, w_ih, w_hh,
                                                    b_ih, b_hh, w_hr, ctx.reverse, True)
    need = lstm_need(ctx.needs_input_grad, grad_output, grad_h_n, input, batch_sizes)
    grad_output = torch.zeros_like(output) if grad_output is None else grad_output
    grads = ops.lstm_backward(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr,
                              output, gates, cells, ctx.reverse,
                              backward_mask(need, 0, (2, 3), (4, 5, 8), (6, 7)), None, False)
    g_input, g_h0, g_c0, g_w_ih, g_w_hh, g_bias, g_w_hr = grads[:7]
    return _asked(need, (g_input, None, g_h0, g_c0, g_w_ih, g_w_hh, g_bias, second_bias_grad(g_bias, need[6]),
                         g_w_hr, None, None))


def _rnn_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7], output[0])
    ctx.nonlinearity, ctx.reverse = inputs[7], inputs[8]


def _rnn_backward(ctx, grad_output, grad_h_n):
    _refuse_second_order("rnn_forward", ctx, (grad_output, grad_h_n))
    input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, output = ctx.saved_tensors
    need = ctx.needs_input_grad
    grads = ops.rnn_backward(grad_output, grad_h_n, input, batch_sizes, h0, w_ih, w_hh, output, ctx.nonlinearity,
                             ctx.reverse, backward_mask(need, 0, (2,), (3, 4), (5, 6)), None, False)
    g_input, g_h0, g_w_ih, g_w_hh, g_bias = grads[:5]
    return _asked(need, (g_input, None, g_h0, g_w_ih, g_w_hh, g_bias, second_bias_grad(g_bias, need[5]), None,
                         None))


def _gru_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:7], output[0], output[2])
    ctx.mark_non_differentiable(output[2])
    ctx.reverse, ctx.training = inputs[7], inputs[8]


def _gru_backward(ctx, grad_output, grad_h_n, _gates):
    _refuse_second_order("gru_forward", ctx, (grad_output, grad_h_n))
    input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, output, gates = ctx.saved_tensors
    if not ctx.training:
        output, _, gates = below_autograd(ops.gru_forward, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh,
                                          ctx.reverse, True)
    need = ctx.needs_input_grad
    grads = ops.gru_backward(grad_output, grad_h_n, input, batch_sizes, h0, w_ih, w_hh, output, gates,
                             ctx.reverse, backward_mask(need, 0, (2,), (3, 4), (5, 6)), None, False)
    return _asked(need, (grads[0], None, *grads[1:6], None, None))


for _name, _backward, _setup in (("lstm_forward", _lstm_backward, _lstm_setup),
                                 ("rnn_forward", _rnn_backward, _rnn_setup),
                                 ("gru_forward", _gru_backward, _gru_setup)):
    torch.library.register_autograd(f"lstmfast::{_name}", _backward, setup_context=_setup)


def has_cuda_kernels():
    """True when this build of lstmfast includes the CUDA kernels."""
    return torch._C._dispatch_has_kernel_for_dispatch_key("lstmfast::lstm_forward", "CUDA")


def cpu_isa():
    """The instruction set of the CPU kernels' pointwise passes: "avx512", "avx2" or "baseline" (the
    widest this CPU supports, or the one named by the environment variable LSTMFAST_CPU_ISA)."""
    return ops.cpu_isa()


def cpu_gemm_engines():
    """The GEMM that runs the CPU products of each dtype: {"float32": "avx512", "bfloat16": "amx", ...}.
    bfloat16 products take bfloat16 operands and sum in float32: "amx" (lstmfast's AMX tile kernels), else
    "avx512_bf16" (its AVX512-BF16 kernels), else "float32 (...)" (the operands rounded to bfloat16 values,
    multiplied by the float32 GEMM); LSTMFAST_CPU_BF16_ENGINE=amx|avx512_bf16|float32 forces one this CPU
    has. float16 runs on float32 copies."""
    return {str(d).removeprefix("torch."): ops.cpu_gemm_engine(d)
            for d in (torch.float32, torch.float64, torch.bfloat16, torch.float16)}


def _loop_over_batch(op):
    """A vmap rule for `op` (torch.func.vmap, and so the vmapped autograd.Functions of
    lstmfast.functional): runs the op once per batch entry and stacks the results along dim 0."""

    def rule(info, in_dims, *args):
        if info.batch_size == 0:
            raise ValueError(f"{op}: vmap over a batch of size 0 is not supported")
        results = [op(*[a.select(d, i) if isinstance(a, torch.Tensor) and d is not None else a
                         for a, d in zip(args, in_dims)])
                   for i in range(info.batch_size)]
        outputs = tuple(torch.stack(list(r)) for r in zip(*results))
        return outputs, (0,) * len(outputs)

    return rule


for _name in ("lstm_forward", "lstm_backward", "gru_forward", "gru_backward", "rnn_forward", "rnn_backward"):
    torch.library.register_vmap(f"lstmfast::{_name}", _loop_over_batch(getattr(ops, _name).default))


def _register_flop_formulas(flop_counter):
    """torch.utils.flop_counter.FlopCounterMode counts lstmfast's ops as it counts torch.nn's layers
    (whose matrix products it sees one by one): 2 FLOPs per multiply-add of the layer's products over
    its N rows (T * B, or a PackedSequence's rows). Forward: the input and recurrent products (and the
    projection); backward: dL/dh through W_hh (and W_hr) at every step, and dL/dx and the weight
    gradients where output_mask asks for them. (A bfloat16 CPU call's second h_{t-1} term is not
    counted: these are the layer's FLOPs, not the kernels'.)"""

    def rows(input, batch_sizes):
        return input[0] * input[1] if batch_sizes is None else input[0]

    def forward(input, batch_sizes, w_ih, w_hh, w_hr):
        flops = 2 * rows(input, batch_sizes) * w_ih[0] * (w_ih[1] + w_hh[1])
        return flops + (2 * rows(input, batch_sizes) * w_hr[0] * w_hr[1] if w_hr is not None else 0)

    def backward(input, batch_sizes, w_ih, w_hh, w_hr, output_mask):
        n, (gates, width), recurrent = rows(input, batch_sizes), w_ih, w_hh[1]
        projection = 2 * n * w_hr[0] * w_hr[1] if w_hr is not None else 0
        flops = 2 * n * gates * recurrent + projection
        if output_mask[0]:
            flops += 2 * n * gates * width
        if output_mask[2]:
            flops += 2 * n * gates * (width + recurrent) + projection
        return flops

    register = flop_counter.register_flop_formula

    @register(ops.lstm_forward)
    def _(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, *args, **kwargs):
        return forward(input, batch_sizes, w_ih, w_hh, w_hr)

    @register([ops.rnn_forward, ops.gru_forward])
    def _(input, batch_sizes, h0, w_ih, w_hh, *args, **kwargs):
        return forward(input, batch_sizes, w_ih, w_hh, None)

    @register(ops.lstm_backward)
    def _(grad_output, grad_h_n, grad_c_n, input, batch_sizes, h0, c0, w_ih, w_hh, w_hr, output, gates,
          cells, reverse, output_mask, *args, **kwargs):
        return backward(input, batch_sizes, w_ih, w_hh, w_hr, output_mask)

    @register(ops.rnn_backward)
    def _(grad_output, grad_h_n, input, batch_sizes, h0, w_ih, w_hh, output, nonlinearity, reverse,
          output_mask, *args, **kwargs):
        return backward(input, batch_sizes, w_ih, w_hh, None, output_mask)

    @register(ops.gru_backward)
    def _(grad_output, grad_h_n, input, batch_sizes, h0, w_ih, w_hh, output, gates, reverse, output_mask,
          *args, **kwargs):
        return backward(input, batch_sizes, w_ih, w_hh, None, output_mask)


after_import("torch.utils.flop_counter", _register_flop_formulas)


def build_summary(detail=False):
    """What this copy of lstmfast._C was built with, and why: one line (or several with detail=True).
    Read from lstmfast/_build_info.py, which setup.py writes at build time."""
    import lstmfast

    try:
        from ._build_info import BUILD
    except ImportError:  # built by other means than setup.py
        BUILD = {}
    cuda = has_cuda_kernels()
    kind = (f"CUDA kernels for {BUILD.get('archs', 'unknown architectures')}" if cuda else
            f"CPU only ({BUILD['reason']})" if BUILD else "CPU only")
    line = (f"lstmfast {lstmfast.__version__} on torch {torch.__version__}: {kind}; CPU kernels "
            f"{cpu_isa()}; CUDA device available: {torch.cuda.is_available()}")
    if not detail:
        return line
    lines = [line, "  CPU GEMM engines: " + ", ".join(f"{d} {e}" for d, e in cpu_gemm_engines().items())]
    if cuda:
        mode = os.environ.get("LSTMFAST_CUDA_PERSISTENT") or "auto"
        lines.append(f"  CUDA persistent kernels: LSTMFAST_CUDA_PERSISTENT={mode} ("
                     + {"0": "never", "1": "wherever they fit",
                        "auto": "LSTM and RNN where they measured faster; GRU only with 1"}.get(mode, "not valid")
                     + "; lstmfast.cuda_persistent_plan tells a layer's path)")
    if BUILD:
        lines.append(f"  built against torch {BUILD['torch']}"
                     + (f" (CUDA {BUILD['torch_cuda']})" if BUILD["torch_cuda"] else "") + f": {BUILD['reason']}")
        if BUILD.get("archs"):
            lines.append(f"  CUDA architectures: {BUILD['archs']} ({BUILD['archs_reason']})")
        if BUILD.get("remedy"):
            lines.append(f"  {BUILD['remedy']}")
    else:
        lines.append("  no build record (lstmfast/_build_info.py is written by setup.py)")
    return "\n".join(lines)


def cuda_persistent_plan(cell, hidden_size, batch, steps, dtype, *, backward=False, projection=False,
                         norms=False, device=None, mode=None):
    """How the CUDA ops would run one layer: "persistent: <geometry>" (the persistent kernels of
    csrc/cuda/persistent.cu) or "default: <why not>" (the per-step cuBLAS loop).

    The decision is the C++ one (csrc/kernels/persistent_plan.h), asked with the limits of `device`
    (a CUDA device; default the current one). `mode` is "0", "1" or "auto"; None reads the environment
    variable LSTMFAST_CUDA_PERSISTENT, as the ops do (unset: "auto", the persistent kernels where they
    measured faster than the per-step path on an H200). The ops also ask the occupancy calculator,
    which this cannot; cuda_persistent_launches() counts what really ran."""
    if not torch.cuda.is_available():
        raise RuntimeError("lstmfast.cuda_persistent_plan needs a CUDA device (it asks for the device's limits); "
                           "none is available to this torch")
    element_size = torch.empty((), dtype=dtype).element_size()
    props = torch.cuda.get_device_properties(device if device is not None else torch.cuda.current_device())
    per_block = getattr(props, "shared_memory_per_block_optin", None) or props.shared_memory_per_block
    per_sm = getattr(props, "shared_memory_per_multiprocessor", None) or per_block
    return ops.persistent_plan(cell, backward, hidden_size, batch, steps, element_size, projection, norms,
                               props.multi_processor_count, per_block, per_sm, mode or "")


def cuda_persistent_launches():
    """How many persistent-kernel launches (one per layer, direction and pass) this process has made."""
    return ops.persistent_launches()

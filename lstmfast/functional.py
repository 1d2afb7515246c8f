"""One LSTM, GRU or Elman RNN layer, one direction, over a whole sequence, with fused forward and BPTT.

Sequence layout (design.md section 3): ``input`` is ``(T, B, I)``, or ``(N, I)`` packed rows with
``batch_sizes`` (a ``PackedSequence``'s, int64 on the CPU). ``reverse=True`` runs from the last step
to the first (the backward half of a bidirectional layer); each sequence then starts from ``h0`` at
its own last step.

``grad_clip=c`` clamps every element of dL/d(gate pre-activations) into ``[-c, c]`` inside the BPTT
loop, at each step; ``None`` leaves gradients exactly as torch.nn computes them.

``norm_sink``, when given, is called during backward with the per-step gradient norms measured inside
the BPTT kernels (see :mod:`lstmfast.diagnostics`).

Second order: a backward that builds a graph (``create_graph=True``, ``torch.autograd.functional.hvp``
/ ``hessian``, ``gradgradcheck``) recomputes the layer with :mod:`lstmfast.reference` under autograd
and returns its differentiable gradients (torch.nn's numbers); the fused first-order path is
unchanged when no graph is asked for. ``norm_sink`` then still receives the fused kernel's norms (one
extra fused backward). With ``grad_clip`` set, second order is refused with a RuntimeError (the clamp
has no derivative we commit to). Under forward mode (``torch.func.jvp``, ``jacfwd``, ``hessian``,
``torch.autograd.forward_ad`` with a tangent on the layer's inputs) the layer runs the reference's
plain PyTorch ops, as torch.nn's native path does, so that every derivative of it is torch's own;
grad_clip and ``norm_sink`` are refused there. ``torch.func.grad``, ``vjp``, ``jacrev`` and ``vmap``
use the fused kernels (vmap loops over the batch); traced by torch.compile, they run the reference too.

The output may be modified in place (``out += x``, ``relu_``, in-place dropout) as torch.nn's: the
backward then recomputes the forward output it needs.

On the CPU, float16 and bfloat16 keep the cell state, gate pre-activations and arithmetic in float32;
bfloat16 products take bfloat16 operands with float32 sums (``lstmfast.cpu_gemm_engines()``). Results
are rounded once, gradients in the parameters' dtype; under ``torch.autocast("cpu")`` the layer runs in
the autocast dtype (the modules return torch.nn's result dtypes, which under CPU autocast depend on
torch.nn's path; see ``lstmfast.LSTM``'s forward).

On CUDA, float16 and bfloat16 run with float32 arithmetic inside the kernels; under
``torch.autocast("cuda")`` the layer runs in the autocast dtype, like torch.nn's cuDNN layers.
"""

import numbers
import warnings
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from . import reference
from ._ops import backward_mask, below_autograd, lstm_need, ops, second_bias_grad


# Receives, during backward, the per-row norms ||dL/dh_t|| and ||dL/dc_t|| (None for a GRU or an RNN),
# each of shape (N) in the op's row layout, computed inside the BPTT loop (lstmfast.diagnostics uses it).
NormSink = Callable[[Tensor, Optional[Tensor]], None]


def _exporting():
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # (torch >= 2.5)
    return is_exporting is not None and is_exporting()


def _recording(grad_clip):
    """Whether torch.jit.trace (and the TorchScript-based ONNX exporter, which traces) or torch.export
    records this call: the bare op is recorded then, not the Function (a traced graph can then be
    saved and checked, and a strictly exported one keeps its gradients: torch.export runs custom
    Functions with grad off). Such graphs still train: the op has a first-order autograd of its own
    (lstmfast._ops), without grad_clip, which a warning says."""
    if torch._C._get_tracing_state() is None and not _exporting():
        return False
    if grad_clip is not None:
        warnings.warn(f"lstmfast: grad_clip={grad_clip} is not recorded by torch.jit.trace or torch.export: "
                      f"a backward through the recorded graph runs without it", stacklevel=3)
    return True


def _needs_grad(*tensors):
    """Whether the call must go through the autograd.Function: gradients may be asked for, by
    autograd (an input requires grad) or a torch.func transform (whose wrapped tensors need not report
    requires_grad; calling the bare op there would leave gradients None). Forward mode, which runs the
    reference, and recording (_recording) are decided before."""
    if torch._C._are_functorch_transforms_active():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _forward_mode(*tensors):
    """Whether forward-mode AD reaches this call: a torch.func transform that pushes tangents forward
    (jvp, jacfwd, hessian, linearize) is active, or torch.autograd.forward_ad has a level open and one
    of the tensors carries a tangent at it. The layer then runs lstmfast.reference's plain PyTorch ops,
    as torch.nn's native path does, whose derivatives of every order, forward over forward and forward
    over reverse included, are torch's own."""
    if torch._C._are_functorch_transforms_active():
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        jvp = torch._C._functorch.TransformType.Jvp
        if any(i.key() == jvp for i in retrieve_all_functorch_interpreters()):
            return True
    if torch.autograd.forward_ad._current_level >= 0:
        return any(t is not None and torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in tensors)
    return False


def _transformed_under_compile():
    """Whether torch.compile is tracing the layer inside a torch.func transform (vjp, grad, vmap, ...):
    the layer then runs lstmfast.reference's plain ops, which Dynamo traces through the transforms as
    torch's own (the Function's backward, traced apart from the transform, lost its wrapped saved
    tensors: torch.func.vjp's gradients came back zero)."""
    return torch.compiler.is_compiling() and torch._C._are_functorch_transforms_active()


def _reference_checks(grad_clip, norm_sink, why):
    """grad_clip and the gradient-norm diagnostics are lstmfast's fused backward's own: a layer that
    runs lstmfast.reference (`why`) has neither."""
    if grad_clip is not None or norm_sink is not None:
        raise RuntimeError(f"lstmfast: grad_clip and gradient-norm diagnostics are not defined for {why} "
                           "(the layer runs lstmfast.reference's plain PyTorch ops there, as torch.nn's native "
                           "path does); use grad_clip=None outside lstmfast.diagnostics")


def _autocast(*tensors):
    """Under autocast (CUDA or CPU), run in the autocast dtype, as torch.nn's layers do. Like torch's
    autocast, only floating-point tensors other than float64 are cast: a float64 layer stays float64."""
    device = tensors[0].device.type
    if device in ("cuda", "cpu") and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return [t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64
                else t for t in tensors]
    return list(tensors)


def _apply(function, core, *args):
    """function.apply(*args). Under torch.compile, `core`: the plain Function (the public classes add
    the legacy ONNX exporter's `symbolic`). Outside torch.compile and torch.func transforms, straight to
    autograd's C++ apply: Function.apply binds default arguments with inspect.signature on every call
    of a setup_context-style Function (about 0.3 ms), and every argument is given here."""
    if torch.compiler.is_compiling():
        return core.apply(*args)
    if torch._C._are_functorch_transforms_active():
        return function.apply(*args)
    return super(torch.autograd.Function, function).apply(*args)


def _complex_checks(cell, grad_clip, norm_sink, input, batch_sizes, **tensors):
    """A complex layer (torch.nn runs one on its native path) runs lstmfast.reference, the same
    equations as plain PyTorch ops (no fused kernels: correct, not fast), its tensors all of input's
    dtype and of the shapes the ops check (the reference's broadcasting would take some wrong ones);
    grad_clip and the gradient-norm diagnostics, lstmfast's own, are not defined there."""
    def refuse(what):
        raise RuntimeError(f"lstmfast.{cell}: {what}")

    for name, t in tensors.items():
        if t is not None and t.dtype != input.dtype:
            refuse(f"expected {name} to have dtype {input.dtype} (the dtype of input), but got {t.dtype}")
    _reference_checks(grad_clip, norm_sink, "complex layers")
    if input.dim() != (3 if batch_sizes is None else 2):
        refuse(f"expected input of shape (T, B, I), or (N, I) with batch_sizes, but got {list(input.shape)}")
    if batch_sizes is None:
        batch = input.shape[1]
    else:
        sizes = batch_sizes.tolist() if batch_sizes.dim() == 1 and batch_sizes.dtype == torch.int64 \
            and batch_sizes.device.type == "cpu" else None
        if sizes is None or not sizes or min(sizes) < 1 or sizes != sorted(sizes, reverse=True) \
                or sum(sizes) != input.shape[0]:
            refuse(f"expected batch_sizes to be a non-empty, non-increasing 1-D int64 tensor on the CPU of "
                   f"positive sizes summing to input's {input.shape[0]} rows, but got {batch_sizes}")
        batch = sizes[0]
    gates = {"lstm": 4, "gru": 3, "rnn": 1}[cell]
    w_hh, w_hr = tensors["w_hh"], tensors.get("w_hr")
    hidden = w_hh.shape[0] // gates if w_hh.dim() == 2 else -1
    out = w_hr.shape[0] if w_hr is not None and w_hr.dim() == 2 else hidden
    expected = dict(w_ih=(gates * hidden, input.shape[-1]), w_hh=(gates * hidden, out), b_ih=(gates * hidden,),
                    b_hh=(gates * hidden,), w_hr=(out, hidden), h0=(batch, out), c0=(batch, hidden))
    for name, t in tensors.items():
        if t is not None and (hidden < 1 or tuple(t.shape) != expected[name]):
            refuse(f"expected {name} of shape {list(expected[name])}, but got {list(t.shape)}")


def _input_to_save(input):
    """The layer's input as the Function saves it: a view with other strides (batch_first input,
    transposed or sliced) becomes a contiguous copy of its own, which the op makes anyway, as torch.nn
    saves one: the caller may then modify their tensor in place after the forward, and under
    saved-tensor hooks (which check no versions) such a change cannot reach the gradients."""
    return input.contiguous()


def _check_grad_clip(grad_clip):
    if grad_clip is None:
        return
    if isinstance(grad_clip, bool) or not isinstance(grad_clip, numbers.Real) or not grad_clip > 0:
        raise ValueError(f"grad_clip must be None or a number > 0, got {grad_clip!r}")


def _save(ctx, tensors, loose=()):
    """Saves the given tensors (None entries too) for backward: only the tensors themselves (torch.func's
    generated vmap rules need no None among them), their places in ctx.saved_layout.

    `loose` are the indices of tensors the fused first-order backward does not read (the biases; the
    input when W_ih takes no gradient; ...). torch.nn saves nothing of those then, so a caller may
    modify them in place between forward and backward (an optimizer step on some Parameters, an input
    buffer reused): they are kept by reference with their versions instead of saved, and a backward
    that does read them (a graph-building one, or one recomputing an output modified in place) checks
    the versions first (_check_loose). Under saved-tensor hooks, torch.compile and torch.func
    transforms they are saved as usual."""
    ctx.loose = {} if _saves_plainly() else {i: (tensors[i], _version(tensors[i])) for i in loose
                                              if tensors[i] is not None}
    ctx.saved_layout = [t is not None and i not in ctx.loose for i, t in enumerate(tensors)]
    ctx.save_for_backward(*[t for t, here in zip(tensors, ctx.saved_layout) if here])


def _saves_plainly():
    """Whether _save saves every tensor as usual (see there)."""
    return torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() \
        or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _saved(ctx, layout):
    saved = iter(ctx.saved_tensors)
    return [ctx.loose[i][0] if i in ctx.loose else next(saved) if here else None for i, here in enumerate(layout)]


def _loose(need, bias, input_weight, first_input, hidden_weight=None, h0=None):
    """The indices _save may keep loose, from ctx.needs_input_grad (`need`) and the tensors' indices:
    the biases always; the input unless W_ih takes a gradient (it is read for dW_ih only), W_ih unless
    the input does (dX); and, where given (LSTM and RNN: the GRU's update gate reads h0), h0 unless
    W_hh does (dW_hh)."""
    loose = set(bias)
    if not need[input_weight]:
        loose.add(first_input)
    if not need[first_input]:
        loose.add(input_weight)
    if h0 is not None and not need[hidden_weight]:
        loose.add(h0)
    return loose


def _version(t):
    """t's version counter, or None for an inference tensor (made under torch.inference_mode), which has
    none."""
    return None if t.is_inference() else t._version


def _check_loose(ctx):
    """Before a backward reads the tensors _save kept loose: autograd's error where one was modified in
    place since the forward, and an error for an inference tensor, whose changes cannot be seen."""
    for t, version in ctx.loose.values():
        if version is None:
            raise RuntimeError(
                f"lstmfast: this backward recomputes the layer from its inputs as they were in the forward "
                f"(create_graph=True, or an output modified in place), but one of them, [{t.type()} "
                f"{list(t.shape)}], is an inference tensor (made under torch.inference_mode), whose in-place "
                f"changes cannot be seen. Make it outside inference mode, or pass a clone of it.")
        if t._version != version:
            raise RuntimeError(
                f"one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: [{t.type()} {list(t.shape)}] is at version {t._version}; expected version "
                f"{version} instead. (lstmfast reads it here, though its first-order backward does not: a "
                f"backward with create_graph=True, or one after the output was modified in place, "
                f"recomputes the layer from its inputs as they were in the forward.)")


def _save_output(ctx, output):
    """Saves the forward output for backward so that callers may still modify it in place (as torch.nn
    allows): autograd checks saved tensors' versions, so the output is saved through an alias of its
    memory with a version counter of its own, and the output's own counter is watched instead; a
    backward that finds the output modified recomputes it (see _saved_output). Under torch.compile
    (functionalized: no in-place modification reaches a saved tensor) and torch.func transforms
    (wrapped tensors), the output is saved as it is.

    Under saved-tensor hooks (torch.utils.checkpoint, save_on_cpu), which must own the only reference
    to what is saved (to move it off the GPU, or drop it), autograd checks no versions and a hook may
    hand back anything (the output itself, a copy made when packing, a copy made when unpacking, or a
    recomputation): a private copy of the output is saved there instead, which no in-place change by
    the caller can reach, as torch.nn saves nothing the caller holds."""
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active() \
            or torch._C._functorch.is_functorch_wrapped_tensor(output):
        ctx.output_watch = None
        return output
    if torch._C._autograd._top_saved_tensors_default_hooks(False) is not None:
        ctx.output_watch = None
        return output.clone()
    alias = output.new_empty((0,)).set_(output)  # same memory, shape and strides; a new counter
    ctx.output_watch, ctx.output_version = output.detach(), output._version
    return alias


def _saved_output(ctx, output, recompute):
    """The forward output as it was computed: `output` (as unpacked from the saved tensors) unless the
    caller modified it in place since, in which case `recompute()` runs the forward again."""
    watch = ctx.output_watch
    if watch is not None and watch._version != ctx.output_version:
        _check_loose(ctx)
        return recompute()
    return output


def _detached(grad, like=None):
    """A gradient for the fused backward op: detached; None (no gradient) stays None, or becomes zeros
    shaped like `like` where the op needs a tensor."""
    if grad is None:
        return torch.zeros_like(like) if like is not None else None
    # (Only when needed: detach is a view, which torch.autograd.grad(is_grads_batched=True)'s vmap
    # cannot batch; torch.autograd.functional.jacobian(vectorize=True) goes through it.)
    return grad.detach() if grad.requires_grad else grad


def _builds_graph(*tensors, exited):
    """Whether a backward must return differentiable gradients: grad mode is on inside it
    (create_graph=True) and something they depend on requires grad. torch.func.grad and vjp run every
    backward with create_graph=True, their tensors all requiring grad at their own level: there a graph
    is needed only when another differentiating transform (grad, jvp) is active too, or when plain
    autograd outside them tracks the underlying tensors; else the fused first-order kernels serve.
    When the backward's own transform has `exited` (see _backward_inputs), every differentiating
    transform still active is an enclosing one (hessian's jvp around jacrev's vjp). Under forward-mode
    AD with a tangent on what the backward receives (forward over reverse), always: the gradients'
    tangents come from differentiating them, as torch.nn's do."""
    if torch.autograd.forward_ad._current_level >= 0 and _forward_mode(*tensors):
        return True
    if not torch.is_grad_enabled():
        return False
    if torch._C._are_functorch_transforms_active():
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        kinds = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp)
        if sum(i.key() in kinds for i in retrieve_all_functorch_interpreters()) > (0 if exited else 1):
            return True
        tensors = [_unwrapped(t) for t in tensors]
    return any(t is not None and t.requires_grad for t in tensors)


_DEAD_LEVEL = -2  # torch._C._functorch.maybe_get_level of a wrapper whose transform has exited


def _unwrapped(tensor, dead_only=False):
    """The plain tensor under torch.func's wrappers (None stays None); with dead_only, only the
    wrappers of transforms that have exited are removed."""
    while tensor is not None and torch._C._functorch.is_functorch_wrapped_tensor(tensor) and (
            not dead_only or torch._C._functorch.maybe_get_level(tensor) == _DEAD_LEVEL):
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return tensor


def _refuse_clipped_second_order(grad_clip):
    if grad_clip is not None:
        raise RuntimeError(
            "lstmfast: second-order gradients (a backward with create_graph=True, hvp, hessian, "
            f"gradgradcheck) are not defined with grad_clip={grad_clip!r}: the clamp of dL/d(gate "
            "pre-activations) has no derivative lstmfast commits to. Use grad_clip=None for higher-order "
            "gradients (and clip the first-order gradient yourself).")


def _lstm_reference(batch_sizes, reverse):
    """The LSTM layer as lstmfast.reference computes it under autograd, a function of its
    differentiable inputs: what second order and forward mode differentiate."""
    def layer(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        return reference.lstm(input, w_ih, w_hh, b_ih, b_hh, w_hr=w_hr, h0=h0, c0=c0,
                              batch_sizes=batch_sizes, reverse=reverse)
    return layer


def _rnn_reference(batch_sizes, nonlinearity, reverse):
    """As :func:`_lstm_reference`, for the Elman RNN."""
    def layer(input, h0, w_ih, w_hh, b_ih, b_hh):
        return reference.rnn(input, w_ih, w_hh, b_ih, b_hh, nonlinearity=nonlinearity, h0=h0,
                             batch_sizes=batch_sizes, reverse=reverse)
    return layer


def _gru_reference(batch_sizes, reverse):
    """As :func:`_lstm_reference`, for the GRU."""
    def layer(input, h0, w_ih, w_hh, b_ih, b_hh):
        return reference.gru(input, w_ih, w_hh, b_ih, b_hh, h0=h0, batch_sizes=batch_sizes,
                             reverse=reverse)
    return layer


def _differentiable_grads(reference_fn, tensors, grads, needed):
    """The gradients of a layer as a differentiable function of its inputs and of `grads` (the
    backward of a backward that builds a graph): the layer is recomputed with lstmfast.reference and
    differentiated by torch.func.vjp, whose results are differentiable with respect to whatever
    requires grad outside it (a module's Parameters, the cotangents, an input under gradgradcheck), as
    torch.nn's are. `tensors` are the Function's inputs (None where absent) and `needed` says which of
    them autograd asks a gradient for (torch.func.vjp's primal, seen after its transform has exited,
    no longer requires grad itself, but its gradient is still what is asked for); returns one gradient
    (or None) per tensor."""
    result = [None] * len(tensors)
    wanted = [i for i, (t, need) in enumerate(zip(tensors, needed)) if t is not None and need]
    if not wanted:
        return result

    if not torch._C._are_functorch_transforms_active() and all(tensors[i].requires_grad for i in wanted):
        # Plain autograd where everything asked for is tracked by it: no transform's wrappers around
        # every op of the Python time loop. Each input enters as a view of itself, and the gradients
        # are taken with respect to those views: the layer's partial derivatives, as if each input
        # were its own variable. (With respect to the inputs themselves autograd would also follow
        # their own history: an h0 or input computed from this layer's weights, e.g. the state of
        # an earlier call carried over, would add that path to the weights' gradients, which the
        # outer backward then counts again.) The views keep the results differentiable with
        # respect to everything the inputs depend on.
        with torch.enable_grad():
            inputs = [t.view_as(t) if t is not None and t.requires_grad else t for t in tensors]
            # (an output that depends on nothing requiring grad contributes nothing)
            pairs = [(o, g) for o, g in zip(reference_fn(*inputs), grads) if g is not None and o.requires_grad]
            if not pairs:
                return result
            found = torch.autograd.grad([o for o, _ in pairs], [inputs[i] for i in wanted],
                                        [g for _, g in pairs], create_graph=True, allow_unused=True)
        for i, g in zip(wanted, found):
            result[i] = g
        return result

    def layer(*moving):
        args = list(tensors)
        for i, a in zip(wanted, moving):
            args[i] = a
        return tuple(reference_fn(*args))

    with torch.enable_grad():
        outputs, vjp = torch.func.vjp(layer, *[tensors[i] for i in wanted])
        found = vjp(tuple(g if g is not None else torch.zeros_like(o) for o, g in zip(outputs, grads)),
                    create_graph=True)
    for i, g in zip(wanted, found):
        result[i] = g
    return result


def _backward_inputs(ctx, grads):
    """A backward's saved tensors and incoming gradients with torch.func's dead wrappers removed, and
    whether there were any. A backward that runs after its transform has exited (the function
    torch.func.vjp returns, and so jacrev and hessian) receives its saved tensors wrapped for a level
    that no longer exists. torch's own derivative formulas compute on what is under such a wrapper
    (functorch unwraps dead wrappers in every op); so does lstmfast, and whether the gradients must be
    differentiable is then decided on what is still live (see _builds_graph)."""
    saved = _saved(ctx, ctx.saved_layout)
    if torch.compiler.is_compiling():  # (no torch.func transform reaches a compiled backward)
        return saved, list(grads), False
    alive_saved = [_unwrapped(t, dead_only=True) for t in saved]
    alive_grads = [_unwrapped(g, dead_only=True) for g in grads]
    exited = any(a is not t for a, t in zip(alive_saved + alive_grads, saved + list(grads)))
    return alive_saved, alive_grads, exited


class _LSTMCore(torch.autograd.Function):
    """Autograd for one LSTM layer: forward and backward are each one call of a fused op.

    A backward asked to build a graph (create_graph=True, torch.autograd.functional.hvp/hessian,
    gradgradcheck) recomputes the layer with lstmfast.reference under autograd instead, so that its
    gradients are differentiable. Forward-mode AD never reaches it through :func:`lstm` (the layer
    runs lstmfast.reference then, see _forward_mode); called directly (``LSTMFunction.apply(input,
    batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, grad_clip, norm_sink)``, the order of
    :meth:`forward`), it has no jvp and forward mode raises torch's error saying so. Forward also returns the saved activations (gates, cells), non-differentiable, which
    :func:`lstm` drops."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, grad_clip, norm_sink):
        _check_grad_clip(grad_clip)  # (lstm() checked it; a caller of apply may not have)
        return below_autograd(ops.lstm_forward, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                              True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, grad_clip, norm_sink = inputs
        out, _, c_n, gates, cells = output
        ctx.mark_non_differentiable(gates, cells)
        steps = batch_sizes.numel() if batch_sizes is not None else input.shape[0]
        if steps == 1 and not any(t is not None and t.requires_grad
                                  for t in (input, h0, c0, w_ih, w_hh, b_ih, b_hh)):
            # One step: c_n depends on the input, the states, W_ih, W_hh and the biases only (W_hr
            # acts on h_t after it), so with W_hr alone requiring grad it does not (as under torch.nn).
            ctx.mark_non_differentiable(c_n)
        # Unused outputs' gradients stay None (the op takes grad_h_n / grad_c_n as optional): no zero
        # tensors, for the saved gates and cells least of all, are made for them.
        ctx.set_materialize_grads(False)
        _save(ctx, [input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, _save_output(ctx, out),
                    gates, cells], _loose(ctx.needs_input_grad, (6, 7), 4, 0, hidden_weight=5, h0=2))
        ctx.reverse, ctx.grad_clip, ctx.norm_sink = reverse, grad_clip, norm_sink

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, grad_c_n, _grad_gates, _grad_cells):
        saved, grads, exited = _backward_inputs(ctx, (grad_output, grad_h_n, grad_c_n))
        input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, output, gates, cells = saved
        grad_output, grad_h_n, grad_c_n = grads
        need = lstm_need(ctx.needs_input_grad, grad_output, grad_h_n, input, batch_sizes)
        grad_graph = _builds_graph(grad_output, grad_h_n, grad_c_n, input, h0, c0, w_ih, w_hh, b_ih, b_hh,
                                   w_hr, exited=exited)
        if grad_graph:
            _refuse_clipped_second_order(ctx.grad_clip)
        if ctx.norm_sink is not None or not grad_graph:
            output = _saved_output(ctx, output, lambda: below_autograd(ops.lstm_forward,
                input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, ctx.reverse, False)[0])
            mask = backward_mask(need, 0, (2, 3), (4, 5, 8), (6, 7))
            if grad_graph:  # only the norms are wanted from the fused op
                mask = [False] * 4
            (grad_input, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_bias, grad_w_hr, h_norm, c_norm) = (
                ops.lstm_backward(_detached(grad_output, output), _detached(grad_h_n),
                                  _detached(grad_c_n), input, batch_sizes, h0, c0, w_ih, w_hh, w_hr,
                                  output, gates, cells, ctx.reverse, mask, ctx.grad_clip,
                                  ctx.norm_sink is not None)
            )
            if ctx.norm_sink is not None:
                ctx.norm_sink(h_norm, c_norm)
        if grad_graph:
            _check_loose(ctx)
            layer = _lstm_reference(batch_sizes, ctx.reverse)
            g_input, g_h0, g_c0, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_hr = _differentiable_grads(
                layer, [input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr], [grad_output, grad_h_n, grad_c_n],
                [need[i] for i in (0, 2, 3, 4, 5, 6, 7, 8)])
            return (g_input, None, g_h0, g_c0, g_w_ih, g_w_hh, g_b_ih, g_b_hh, g_w_hr, None, None, None)
        return (
            grad_input if need[0] else None,
            None,
            grad_h0 if need[2] else None,
            grad_c0 if need[3] else None,
            grad_w_ih if need[4] else None,
            grad_w_hh if need[5] else None,
            grad_bias if need[6] else None,
            second_bias_grad(grad_bias, need[6]) if need[7] else None,
            grad_w_hr if need[8] else None,
            None,
            None,
            None,
        )


class LSTMFunction(_LSTMCore):
    __doc__ = _LSTMCore.__doc__

    @staticmethod
    def symbolic(g, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse, grad_clip, norm_sink):
        """torch.onnx.export(dynamo=False): one ONNX LSTM node (inference; see lstmfast.onnx_export)."""
        from .onnx_export import legacy_lstm
        return legacy_lstm(g, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse)


class _RNNCore(torch.autograd.Function):
    """Autograd for one Elman RNN layer (tanh or relu); second order as :class:`LSTMFunction`."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse, grad_clip,
                norm_sink):
        _check_grad_clip(grad_clip)
        return below_autograd(ops.rnn_forward, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity,
                              reverse)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse, grad_clip, norm_sink = inputs
        _save(ctx, [input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, _save_output(ctx, output[0])],
              _loose(ctx.needs_input_grad, (5, 6), 3, 0, hidden_weight=4, h0=2))
        ctx.nonlinearity, ctx.reverse, ctx.grad_clip = nonlinearity, reverse, grad_clip
        ctx.norm_sink = norm_sink
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx, grad_output, grad_h_n):
        saved, (grad_output, grad_h_n), exited = _backward_inputs(ctx, (grad_output, grad_h_n))
        input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, output = saved
        need = ctx.needs_input_grad
        grad_graph = _builds_graph(grad_output, grad_h_n, input, h0, w_ih, w_hh, b_ih, b_hh, exited=exited)
        if grad_graph:
            _refuse_clipped_second_order(ctx.grad_clip)
        if ctx.norm_sink is not None or not grad_graph:
            output = _saved_output(ctx, output, lambda: below_autograd(ops.rnn_forward,
                input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, ctx.nonlinearity, ctx.reverse)[0])
            mask = backward_mask(need, 0, (2,), (3, 4), (5, 6))
            if grad_graph:
                mask = [False] * 4
            grad_input, grad_h0, grad_w_ih, grad_w_hh, grad_bias, h_norm = ops.rnn_backward(
                _detached(grad_output, output), _detached(grad_h_n), input, batch_sizes, h0, w_ih,
                w_hh, output, ctx.nonlinearity, ctx.reverse, mask, ctx.grad_clip, ctx.norm_sink is not None
            )
            if ctx.norm_sink is not None:
                ctx.norm_sink(h_norm, None)
        if grad_graph:
            _check_loose(ctx)
            layer = _rnn_reference(batch_sizes, ctx.nonlinearity, ctx.reverse)
            g_input, g_h0, g_w_ih, g_w_hh, g_b_ih, g_b_hh = _differentiable_grads(
                layer, [input, h0, w_ih, w_hh, b_ih, b_hh], [grad_output, grad_h_n],
                [need[i] for i in (0, 2, 3, 4, 5, 6)])
            return (g_input, None, g_h0, g_w_ih, g_w_hh, g_b_ih, g_b_hh, None, None, None, None)
        return (
            grad_input if need[0] else None,
            None,
            grad_h0 if need[2] else None,
            grad_w_ih if need[3] else None,
            grad_w_hh if need[4] else None,
            grad_bias if need[5] else None,
            second_bias_grad(grad_bias, need[5]) if need[6] else None,
            None,
            None,
            None,
            None,
        )


class RNNFunction(_RNNCore):
    __doc__ = _RNNCore.__doc__

    @staticmethod
    def symbolic(g, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse, grad_clip,
                 norm_sink):
        """torch.onnx.export(dynamo=False): one ONNX RNN node (inference; see lstmfast.onnx_export)."""
        from .onnx_export import legacy_rnn
        return legacy_rnn(g, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity, reverse)


class _GRUCore(torch.autograd.Function):
    """Autograd for one GRU layer; second order as :class:`LSTMFunction`. Forward also returns
    the saved activations (gates: r, z, n and W_hn h + b_hn), non-differentiable, which :func:`gru`
    drops. Unlike the LSTM's and RNN's, the two bias gradients differ (the reset gate multiplies the
    recurrent part of n only), so the backward op returns both."""

    generate_vmap_rule = True

    @staticmethod
    def forward(input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse, grad_clip, norm_sink):
        _check_grad_clip(grad_clip)
        return below_autograd(ops.gru_forward, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse, True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse, grad_clip, norm_sink = inputs
        out, _, gates = output
        ctx.mark_non_differentiable(gates)
        ctx.set_materialize_grads(False)
        # The fused backward reads h0 (the first step's update gate), but torch.nn's GRU cell keeps a
        # copy of h_{t-1} for it and reads h0 itself only for dW_hh: where W_hh takes no gradient, h0
        # may change in place after the forward. So here: h0 kept loose, a copy of it saved.
        loose = _loose(ctx.needs_input_grad, (5, 6), 3, 0, hidden_weight=4, h0=2)
        h0_copy = h0.detach().clone() if h0 is not None and 2 in loose and not _saves_plainly() else None
        _save(ctx, [input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, _save_output(ctx, out), gates, h0_copy], loose)
        ctx.reverse, ctx.grad_clip, ctx.norm_sink = reverse, grad_clip, norm_sink

    @staticmethod
    def backward(ctx, grad_output, grad_h_n, _grad_gates):
        saved, (grad_output, grad_h_n), exited = _backward_inputs(ctx, (grad_output, grad_h_n))
        input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, output, gates, h0_copy = saved
        need = ctx.needs_input_grad
        grad_graph = _builds_graph(grad_output, grad_h_n, input, h0, w_ih, w_hh, b_ih, b_hh, exited=exited)
        if grad_graph:
            _refuse_clipped_second_order(ctx.grad_clip)
        if ctx.norm_sink is not None or not grad_graph:
            output = _saved_output(ctx, output, lambda: below_autograd(ops.gru_forward,
                input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, ctx.reverse, False)[0])
            mask = backward_mask(need, 0, (2,), (3, 4), (5, 6))
            if grad_graph:  # only the norms are wanted from the fused op
                mask = [False] * 4
            grad_input, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, h_norm = ops.gru_backward(
                _detached(grad_output, output), _detached(grad_h_n), input, batch_sizes,
                h0 if h0_copy is None else h0_copy, w_ih, w_hh, output, gates, ctx.reverse, mask, ctx.grad_clip,
                ctx.norm_sink is not None)
            if ctx.norm_sink is not None:
                ctx.norm_sink(h_norm, None)
        if grad_graph:
            _check_loose(ctx)
            layer = _gru_reference(batch_sizes, ctx.reverse)
            g_input, g_h0, g_w_ih, g_w_hh, g_b_ih, g_b_hh = _differentiable_grads(
                layer, [input, h0, w_ih, w_hh, b_ih, b_hh], [grad_output, grad_h_n],
                [need[i] for i in (0, 2, 3, 4, 5, 6)])
            return (g_input, None, g_h0, g_w_ih, g_w_hh, g_b_ih, g_b_hh, None, None, None)
        return (
            grad_input if need[0] else None,
            None,
            grad_h0 if need[2] else None,
            grad_w_ih if need[3] else None,
            grad_w_hh if need[4] else None,
            grad_b_ih if need[5] else None,
            grad_b_hh if need[6] else None,
            None,
            None,
            None,
        )


class GRUFunction(_GRUCore):
    __doc__ = _GRUCore.__doc__

    @staticmethod
    def symbolic(g, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse, grad_clip, norm_sink):
        """torch.onnx.export(dynamo=False): one ONNX GRU node (inference; see lstmfast.onnx_export)."""
        from .onnx_export import legacy_gru
        return legacy_gru(g, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse)


def lstm(
    input: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    *,
    w_hr: Optional[Tensor] = None,
    h0: Optional[Tensor] = None,
    c0: Optional[Tensor] = None,
    batch_sizes: Optional[Tensor] = None,
    reverse: bool = False,
    grad_clip: Optional[float] = None,
    norm_sink: Optional[NormSink] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """One LSTM layer. Returns ``(output, h_n, c_n)``.

    Shapes: input ``(T, B, I)`` or ``(N, I)`` with ``batch_sizes (T)``; ``w_ih (4H, I)``,
    ``w_hh (4H, P)``, ``b_ih, b_hh (4H)``, ``w_hr (P, H)`` (projection; P = H without it);
    ``h0 (B, P)``, ``c0 (B, H)``. Output ``(T, B, P)`` or ``(N, P)``; ``h_n (B, P)``, ``c_n (B, H)``.
    """
    _check_grad_clip(grad_clip)
    if input.is_complex():
        _complex_checks("lstm", grad_clip, norm_sink, input, batch_sizes, h0=h0, c0=c0, w_ih=w_ih, w_hh=w_hh,
                        b_ih=b_ih, b_hh=b_hh, w_hr=w_hr)
        return reference.lstm(input, w_ih, w_hh, b_ih, b_hh, w_hr=w_hr, h0=h0, c0=c0, batch_sizes=batch_sizes,
                              reverse=reverse)
    input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr = _autocast(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr)
    if _transformed_under_compile() or _forward_mode(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        _reference_checks(grad_clip, norm_sink, "forward-mode AD or torch.func transforms under torch.compile")
        return reference.lstm(input, w_ih, w_hh, b_ih, b_hh, w_hr=w_hr, h0=h0, c0=c0, batch_sizes=batch_sizes,
                              reverse=reverse)
    if not _recording(grad_clip) and _needs_grad(input, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr):
        input = _input_to_save(input)
        outputs = _apply(LSTMFunction, _LSTMCore, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh,
                         w_hr, reverse, grad_clip, norm_sink)[:3]
    else:
        outputs = below_autograd(ops.lstm_forward, input, batch_sizes, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, reverse,
                                 False)[:3]
    return tuple(outputs)


def rnn(
    input: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    *,
    nonlinearity: str = "tanh",
    h0: Optional[Tensor] = None,
    batch_sizes: Optional[Tensor] = None,
    reverse: bool = False,
    grad_clip: Optional[float] = None,
    norm_sink: Optional[NormSink] = None,
) -> Tuple[Tensor, Tensor]:
    """One Elman RNN layer, ``h_t = nonlinearity(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``.
    Returns ``(output, h_n)``. Shapes as :func:`lstm` with H in place of 4H and no projection."""
    _check_grad_clip(grad_clip)
    if nonlinearity not in ("tanh", "relu"):
        raise ValueError(f"nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
    if input.is_complex():
        _complex_checks("rnn", grad_clip, norm_sink, input, batch_sizes, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih,
                        b_hh=b_hh)
        return reference.rnn(input, w_ih, w_hh, b_ih, b_hh, nonlinearity=nonlinearity, h0=h0,
                             batch_sizes=batch_sizes, reverse=reverse)
    input, h0, w_ih, w_hh, b_ih, b_hh = _autocast(input, h0, w_ih, w_hh, b_ih, b_hh)
    if _transformed_under_compile() or _forward_mode(input, h0, w_ih, w_hh, b_ih, b_hh):
        _reference_checks(grad_clip, norm_sink, "forward-mode AD or torch.func transforms under torch.compile")
        return reference.rnn(input, w_ih, w_hh, b_ih, b_hh, nonlinearity=nonlinearity, h0=h0,
                             batch_sizes=batch_sizes, reverse=reverse)
    if not _recording(grad_clip) and _needs_grad(input, h0, w_ih, w_hh, b_ih, b_hh):
        input = _input_to_save(input)
        outputs = _apply(RNNFunction, _RNNCore, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh,
                         nonlinearity, reverse, grad_clip, norm_sink)
    else:
        outputs = below_autograd(ops.rnn_forward, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, nonlinearity,
                                 reverse)
    return tuple(outputs)



def gru(
    input: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Optional[Tensor] = None,
    b_hh: Optional[Tensor] = None,
    *,
    h0: Optional[Tensor] = None,
    batch_sizes: Optional[Tensor] = None,
    reverse: bool = False,
    grad_clip: Optional[float] = None,
    norm_sink: Optional[NormSink] = None,
) -> Tuple[Tensor, Tensor]:
    """One GRU layer, torch.nn.GRU's equations (gate order r, z, n)::

        r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
        n = tanh(W_in x + b_in + r * (W_hn h + b_hn))  h' = (1 - z) * n + z * h

    Returns ``(output, h_n)``. Shapes as :func:`rnn` with 3H in place of H for the weights and biases.
    ``grad_clip`` clamps the gradients of the pre-activations of r, z and n."""
    _check_grad_clip(grad_clip)
    if input.is_complex():
        _complex_checks("gru", grad_clip, norm_sink, input, batch_sizes, h0=h0, w_ih=w_ih, w_hh=w_hh, b_ih=b_ih,
                        b_hh=b_hh)
        return reference.gru(input, w_ih, w_hh, b_ih, b_hh, h0=h0, batch_sizes=batch_sizes, reverse=reverse)
    input, h0, w_ih, w_hh, b_ih, b_hh = _autocast(input, h0, w_ih, w_hh, b_ih, b_hh)
    if _transformed_under_compile() or _forward_mode(input, h0, w_ih, w_hh, b_ih, b_hh):
        _reference_checks(grad_clip, norm_sink, "forward-mode AD or torch.func transforms under torch.compile")
        return reference.gru(input, w_ih, w_hh, b_ih, b_hh, h0=h0, batch_sizes=batch_sizes, reverse=reverse)
    if not _recording(grad_clip) and _needs_grad(input, h0, w_ih, w_hh, b_ih, b_hh):
        input = _input_to_save(input)
        outputs = _apply(GRUFunction, _GRUCore, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse,
                         grad_clip, norm_sink)[:2]
    else:
        outputs = below_autograd(ops.gru_forward, input, batch_sizes, h0, w_ih, w_hh, b_ih, b_hh, reverse,
                                 False)[:2]
    return tuple(outputs)

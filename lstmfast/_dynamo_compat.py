"""Lets torch.compile trace lstmfast's layers, which are torch.nn.LSTM / GRU / RNN subclasses.

Dynamo refuses to wrap any instance of torch.nn.RNN, GRU or LSTM (a graph break, an error under
fullgraph=True) unless torch._dynamo.config.allow_rnn is set, because it cannot trace their cuDNN
path. lstmfast's forward is plain, traceable Python over registered ops, so for lstmfast layers only
(torch.nn's own keep torch's behaviour) the module wrapper runs with allow_rnn set.

Importing torch._dynamo takes seconds, so nothing is imported here: the wrapper is installed when
Dynamo's module builder is imported (at the first torch.compile), or at once if it already is.
"""

import functools

from ._import_hooks import after_import

_BUILDER = "torch._dynamo.variables.builder"


def _patch(builder, fast_class):
    variable_builder = getattr(builder, "VariableBuilder", None)
    original = getattr(variable_builder, "wrap_module", None)
    if original is None or getattr(original, "_lstmfast", False):
        return
    from torch._dynamo import config

    @functools.wraps(original)
    def wrap_module(self, value):
        if isinstance(value, fast_class) and not config.allow_rnn:
            with config.patch(allow_rnn=True):
                return original(self, value)
        return original(self, value)

    wrap_module._lstmfast = True
    variable_builder.wrap_module = wrap_module


def install(fast_class):
    """Makes Dynamo wrap instances of `fast_class` with allow_rnn set."""
    after_import(_BUILDER, lambda builder: _patch(builder, fast_class))


def constant(fn):
    """Tells Dynamo (once it is imported) that fn's result is a constant of its arguments: a compiled
    caller gets it by calling fn while tracing, instead of tracing into it."""
    after_import("torch._dynamo", lambda dynamo: dynamo.assume_constant_result(fn))

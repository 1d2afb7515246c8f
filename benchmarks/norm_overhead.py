"""Cost of measuring per-step gradient norms inside BPTT: the backward op with and without
return_norms, timed in the same run (torch.utils.benchmark). Prints the overhead per shape.

    python benchmarks/norm_overhead.py
"""

import torch
from torch.utils import benchmark as tb

import lstmfast  # noqa: F401  (registers the ops)
from lstmfast._ops import ops


def overhead(kind, T, B, H, dtype, min_run_time=0.5):
    g = torch.Generator().manual_seed(0)
    gates = 4 if kind == "LSTM" else 1
    x = torch.randn(T, B, H, dtype=dtype, generator=g)
    w_ih = torch.randn(gates * H, H, dtype=dtype, generator=g) / H ** 0.5
    w_hh = torch.randn(gates * H, H, dtype=dtype, generator=g) / H ** 0.5
    if kind == "LSTM":
        output, h_n, c_n, saved_gates, cells = ops.lstm_forward(x, None, None, None, w_ih, w_hh, None, None,
                                                                None, False, True)

        def backward(norms):
            ops.lstm_backward(torch.ones_like(output), None, None, x, None, None, None, w_ih, w_hh, None,
                              output, saved_gates, cells, False, [True] * 4, None, norms)
    else:
        output, h_n = ops.rnn_forward(x, None, None, w_ih, w_hh, None, None, "tanh", False)

        def backward(norms):
            ops.rnn_backward(torch.ones_like(output), None, x, None, None, w_ih, w_hh, output, "tanh", False,
                             [True] * 4, None, norms)

    times = {}
    for norms in (False, True, False, True):  # interleaved, to share the machine's noise
        t = tb.Timer("backward(norms)", globals=dict(backward=backward, norms=norms))
        times.setdefault(norms, []).append(t.blocked_autorange(min_run_time=min_run_time).median)
    plain, measured = min(times[False]), min(times[True])
    return plain * 1e3, measured * 1e3, measured / plain - 1


if __name__ == "__main__":
    print(f"{'case':38} {'plain ms':>9} {'norms ms':>9} {'overhead':>9}")
    for kind, T, B, H, dtype in [("LSTM", 200, 16, 64, torch.float64), ("RNN", 200, 16, 64, torch.float64),
                                 ("LSTM", 128, 64, 256, torch.float32), ("RNN", 128, 64, 256, torch.float32)]:
        plain, measured, extra = overhead(kind, T, B, H, dtype)
        print(f"{kind} T={T} B={B} H={H} {str(dtype).replace('torch.', ''):10} {plain:9.2f} {measured:9.2f} "
              f"{100 * extra:8.1f}%")

"""Second order: a gradient-penalty training step (the gradient of the output with respect to the input,
create_graph=True, then backward through it), lstmfast against torch.nn on the same weights, timed in
the same run and interleaved (torch.utils.benchmark). lstmfast's differentiable backward recomputes the
layer with lstmfast.reference under autograd; torch.nn differentiates its own native path.

    python benchmarks/second_order.py
"""

import torch
from torch.utils import benchmark as tb

import lstmfast
from lstmfast.bench import cpu_description

SHAPES = [(50, 16, 64), (200, 4, 32), (20, 32, 256)]  # (T, B, H), I = H


def penalty_step(module, x):
    leaf = x.clone().requires_grad_()
    out = module(leaf)[0]
    (grad,) = torch.autograd.grad(out.square().sum(), leaf, create_graph=True)
    grad.square().sum().backward()


def compare(kind, T, B, H, min_run_time=0.5):
    torch.manual_seed(0)
    theirs = getattr(torch.nn, kind)(H, H)
    ours = getattr(lstmfast, kind).from_torch(theirs)
    x = torch.randn(T, B, H)
    times = {}
    for name, module in [("torch.nn", theirs), ("lstmfast", ours)] * 2:  # interleaved: shared noise
        timer = tb.Timer("step(module, x)", globals=dict(step=penalty_step, module=module, x=x))
        times.setdefault(name, []).append(timer.blocked_autorange(min_run_time=min_run_time).median)
    return min(times["torch.nn"]) * 1e3, min(times["lstmfast"]) * 1e3


def main():
    print(cpu_description(), f"threads={torch.get_num_threads()}, float32")
    print(f"{'layer':6} {'T':>4} {'B':>3} {'H':>4}  {'torch.nn ms':>11}  {'lstmfast ms':>11}  torch.nn / lstmfast")
    for kind in ("LSTM", "GRU", "RNN"):
        for T, B, H in SHAPES:
            theirs, ours = compare(kind, T, B, H)
            print(f"{kind:6} {T:>4} {B:>3} {H:>4}  {theirs:>11.2f}  {ours:>11.2f}  {theirs / ours:.2f}x")


if __name__ == "__main__":
    main()

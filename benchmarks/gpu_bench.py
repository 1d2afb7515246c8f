"""GPU benchmark: lstmfast against torch.nn (cuDNN), inference forward and training step.

Each row times both contenders in the same run with CUDA events after warm-up, on identical weights
and inputs, and reports the ratio cuDNN time / lstmfast time (> 1: lstmfast is faster).

    python benchmarks/gpu_bench.py [--json PATH] [--quick]
"""

import argparse
import itertools
import json
import math
import platform
import sys
import time

import torch
from torch import nn

import lstmfast


def cuda_time(fn, min_seconds=0.1, warmup=3):
    """Median milliseconds per call, timed with CUDA events over enough calls to fill min_seconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    reps = max(3, min(200, int(min_seconds * 1e3 / once)))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def measure(kind, T, B, H, dtype):
    torch.manual_seed(0)
    ours = getattr(lstmfast, kind)(H, H).to("cuda", dtype)
    theirs = getattr(nn, kind)(H, H).to("cuda", dtype)
    theirs.load_state_dict(ours.state_dict())
    theirs.flatten_parameters()  # cuDNN's fast path wants its weights in one flat buffer
    x = torch.randn(T, B, H, device="cuda", dtype=dtype)
    x_grad = x.clone().requires_grad_()
    row = dict(kind=kind, T=T, B=B, H=H, dtype=str(dtype).replace("torch.", ""))
    for name, module in (("lstmfast", ours), ("cudnn", theirs)):
        def forward():
            with torch.no_grad():
                module(x)

        def train():
            out, _ = module(x_grad)
            out.backward(torch.ones_like(out))

        row[f"{name}_fwd_ms"] = cuda_time(forward)
        row[f"{name}_train_ms"] = cuda_time(train)
    row["fwd_speedup"] = row["cudnn_fwd_ms"] / row["lstmfast_fwd_ms"]
    row["train_speedup"] = row["cudnn_train_ms"] / row["lstmfast_train_ms"]
    return row


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write all rows and the summary to this file")
    parser.add_argument("--quick", action="store_true", help="a small grid")
    parser.add_argument("--kinds", default="LSTM,RNN")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available() or not lstmfast.has_cuda_kernels():
        sys.exit("gpu_bench: needs a CUDA GPU and lstmfast built with CUDA")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    grid = dict(T=[64, 512], B=[1, 16, 128], H=[256, 1024], dtype=[torch.float32, torch.bfloat16])
    if args.quick:
        grid = dict(T=[64], B=[16], H=[256], dtype=[torch.float32])
    rows = []
    started = time.time()
    configs = list(itertools.product(args.kinds.split(","), *grid.values()))
    header = f"{'kind':5} {'T':>4} {'B':>4} {'H':>5} {'dtype':9} {'fwd ms':>16} {'x':>6} {'train ms':>17} {'x':>6}"
    print(header)
    for i, (kind, T, B, H, dtype) in enumerate(configs):
        r = measure(kind, T, B, H, dtype)
        rows.append(r)
        print(f"{kind:5} {T:4} {B:4} {H:5} {r['dtype']:9} "
              f"{r['lstmfast_fwd_ms']:7.3f}/{r['cudnn_fwd_ms']:7.3f} {r['fwd_speedup']:6.2f} "
              f"{r['lstmfast_train_ms']:8.3f}/{r['cudnn_train_ms']:8.3f} {r['train_speedup']:6.2f}"
              f"   [{i + 1}/{len(configs)}, {time.time() - started:.0f}s]", flush=True)
    summary = {}
    for kind in args.kinds.split(","):
        sel = [r for r in rows if r["kind"] == kind]
        summary[kind] = dict(fwd_geomean=geomean(r["fwd_speedup"] for r in sel),
                             train_geomean=geomean(r["train_speedup"] for r in sel),
                             train_min=min(r["train_speedup"] for r in sel))
        print(f"{kind}: geometric-mean speedup over cuDNN: forward {summary[kind]['fwd_geomean']:.2f}x, "
              f"training step {summary[kind]['train_geomean']:.2f}x (min {summary[kind]['train_min']:.2f}x)")
    if args.json:
        meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
                    python=platform.python_version(), date=time.strftime("%Y-%m-%d"),
                    note="ratios are cuDNN time / lstmfast time measured in the same run")
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, summary=summary, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()

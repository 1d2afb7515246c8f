"""Re-time a few benchmark rows with lstmfast and torch.nn interleaved: one short block of each in turn,
several rounds in one process, the median of each side's rounds. On a shared machine whose speed moves
by tens of percent within minutes, this puts both sides in the same moments, which single back-to-back
measurements (`python -m lstmfast bench`) do not. Rows are KIND:T:B:H (one layer, I = H, float32), built
and stepped exactly as the benchmark's:

    python benchmarks/interleaved.py GRU:16:64:1024 GRU:128:64:256 --mode train --rounds 7
"""

import argparse
import statistics
import time

import torch

from lstmfast import bench


def per_call_ms(step, calls):
    start = time.perf_counter()
    for _ in range(calls):
        step()
    return (time.perf_counter() - start) / calls * 1e3


def time_row(kind, T, B, H, mode, rounds, seconds):
    """Median ms per call of lstmfast and torch.nn on the benchmark's row (bench.build: the same weights;
    bench._statements: the same input and steps), interleaved."""
    case = bench.Case(kind, T, B, H, H)
    runners, params = bench.build(case, ("lstmfast", "torch.nn"))
    steps = {name: bench._statements(fn, case, params)[mode] for name, fn in runners.items()}
    for step in steps.values():  # first calls pack weights, create oneDNN primitives, start threads
        step(), step()
    calls = max(1, int(seconds / (per_call_ms(steps["torch.nn"], 1) * 1e-3)))
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(per_call_ms(step, calls))
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="+", metavar="KIND:T:B:H")
    parser.add_argument("--mode", choices=("train", "fwd"), default="train",
                        help="train: forward + backward; fwd: forward without grad")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--seconds", type=float, default=0.15, help="per block of calls")
    args = parser.parse_args(argv)
    print(f"{bench.cpu_description()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{args.mode}, {args.rounds} interleaved rounds")
    results = []
    for row in args.rows:
        kind, *dims = row.split(":")
        T, B, H = map(int, dims)
        ms = time_row(kind, T, B, H, args.mode, args.rounds, args.seconds)
        ratio = ms["torch.nn"] / ms["lstmfast"]
        print(f"{kind} T={T} B={B} H={H}: lstmfast {ms['lstmfast']:.2f} ms, torch.nn {ms['torch.nn']:.2f} ms, "
              f"{ratio:.2f}x")
        results.append(dict(kind=kind, T=T, B=B, H=H, mode=args.mode, speedup=ratio, **ms))
    return results


if __name__ == "__main__":
    main()

"""Speed benchmark: lstmfast against torch.nn and lstmfast.reference on the CPU (or a GPU).

Every row builds the contenders with identical weights and inputs and times them in the same run with
torch.utils.benchmark, so the reported ratios (competitor time / lstmfast time; > 1 means lstmfast is
faster) are robust on shared, noisy machines.
"""

import argparse
import itertools
import json
import math
import platform
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch
from torch import nn
from torch.utils import benchmark as tb

from . import functional, reference
from .modules import LSTM, RNN


@dataclass
class Case:
    kind: str  # "LSTM" or "RNN"
    T: int
    B: int
    H: int
    I: int  # noqa: E741
    dtype: str = "float32"

    @property
    def label(self):
        return f"{self.kind} T={self.T} B={self.B} H={self.H} {self.dtype}"


def _reference_module(module):
    """A callable running lstmfast.reference with the module's (single-layer) weights."""
    def run(x):
        w = [module.weight_ih_l0, module.weight_hh_l0, module.bias_ih_l0, module.bias_hh_l0]
        if isinstance(module, LSTM):
            return reference.lstm(x, *w)
        return reference.rnn(x, *w, nonlinearity=module.nonlinearity)
    return run


def contenders(case: Case, with_reference: bool):
    """name -> callable(x) for every contender of this case, all with the same weights."""
    dtype = getattr(torch, case.dtype)
    torch.manual_seed(0)
    ours = (LSTM if case.kind == "LSTM" else RNN)(case.I, case.H).to(dtype)
    theirs = getattr(nn, case.kind)(case.I, case.H).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    result = {"lstmfast": ours, "torch.nn": theirs}
    if with_reference:
        result["reference"] = _reference_module(ours)
    return result, list(ours.parameters()) + list(theirs.parameters())


def time_case(case: Case, with_reference=True, min_run_time=0.3) -> dict:
    dtype = getattr(torch, case.dtype)
    runners, params = contenders(case, with_reference)
    x = torch.randn(case.T, case.B, case.I, dtype=dtype)
    x_grad = x.clone().requires_grad_()
    row = asdict(case)
    for name, fn in runners.items():
        def forward(fn=fn):
            with torch.no_grad():
                fn(x)

        def train(fn=fn):
            out = fn(x_grad)[0]
            out.backward(torch.ones_like(out))
            for p in params:
                p.grad = None
            x_grad.grad = None

        for mode, stmt in (("fwd", forward), ("train", train)):
            t = tb.Timer(stmt="stmt()", globals={"stmt": stmt}, label=case.label, sub_label=mode,
                         description=name, num_threads=torch.get_num_threads())
            row[f"{name}_{mode}_ms"] = t.blocked_autorange(min_run_time=min_run_time).median * 1e3
    for name in runners:
        if name == "lstmfast":
            continue
        for mode in ("fwd", "train"):
            row[f"speedup_{mode}_vs_{name}"] = row[f"{name}_{mode}_ms"] / row[f"lstmfast_{mode}_ms"]
    return row


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def default_cases(quick: bool) -> List[Case]:
    if quick:
        return [Case("LSTM", 16, 8, 64, 64), Case("RNN", 16, 8, 64, 64)]
    grid = itertools.product(["LSTM", "RNN"], [(128, 8, 256), (128, 64, 256), (64, 32, 1024), (512, 1, 64)])
    return [Case(kind, T, B, H, H) for kind, (T, B, H) in grid]


def run(cases: List[Case], with_reference=True, progress=True, min_run_time=0.3) -> dict:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    iterator = tqdm(cases, desc="benchmark", unit="case") if progress and tqdm else cases
    rows = []
    for case in iterator:
        if hasattr(iterator, "set_postfix_str"):
            iterator.set_postfix_str(case.label)
        rows.append(time_case(case, with_reference, min_run_time))
    summary = {}
    for key in sorted({k for r in rows for k in r if k.startswith("speedup_")}):
        for kind in ("LSTM", "RNN"):
            values = [r[key] for r in rows if r["kind"] == kind and key in r]
            if values:
                summary[f"{kind} {key}"] = dict(geomean=geomean(values), min=min(values))
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                processor=platform.processor() or platform.machine(), date=time.strftime("%Y-%m-%d"),
                note="speedup = competitor time / lstmfast time, measured in the same run")
    return dict(meta=meta, rows=rows, summary=summary)


def format_table(result: dict) -> str:
    rows = result["rows"]
    names = [n for n in ("lstmfast", "torch.nn", "reference") if f"{n}_fwd_ms" in rows[0]]
    head = f"{'case':34}" + "".join(f"{n + ' fwd/train ms':>28}" for n in names)
    head += "".join(f"{'x vs ' + n + ' fwd/train':>26}" for n in names[1:])
    lines = [head, "-" * len(head)]
    for r in rows:
        line = f"{Case(**{k: r[k] for k in ('kind', 'T', 'B', 'H', 'I', 'dtype')}).label:34}"
        line += "".join(f"{r[n + '_fwd_ms']:13.3f}/{r[n + '_train_ms']:<14.3f}" for n in names)
        line += "".join(f"{r[f'speedup_fwd_vs_{n}']:12.2f}/{r[f'speedup_train_vs_{n}']:<13.2f}"
                        for n in names[1:])
        lines.append(line)
    lines.append("")
    for key, s in result["summary"].items():
        lines.append(f"{key}: geometric mean {s['geomean']:.2f}x, min {s['min']:.2f}x")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="lstmfast bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small grid (seconds)")
    parser.add_argument("--json", metavar="PATH", help="write rows and summary as JSON")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow plain-PyTorch contender")
    parser.add_argument("--min-run-time", type=float, default=0.3, help="seconds per measurement")
    args = parser.parse_args(argv)
    result = run(default_cases(args.quick), not args.no_reference,
                 min_run_time=0.05 if args.quick else args.min_run_time)
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result

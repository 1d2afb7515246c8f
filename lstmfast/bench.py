"""Speed benchmark: lstmfast against torch.nn (oneDNN and native paths) and lstmfast.reference.

Every row builds the contenders with identical weights and inputs and times them in the same run,
interleaved (rounds of one short block of calls each, the median of each contender's blocks), so the
reported ratios (competitor time / lstmfast time; > 1 means lstmfast is faster) hold on shared, noisy
machines. Per row: inference forward (no grad) and training step (forward + backward) times, speedups,
the peak memory a training step allocates (torch's CPU allocator, through the profiler) and efficiency:
the layer's useful GEMM FLOPs per second as a fraction of a large GEMM's FLOPs per second measured in
the same run, for lstmfast and for torch.nn (a row where both are near 1 is bound by the machine's GEMM
rate).
"""

import argparse
import contextlib
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

from . import _cli, reference
from .cpu_cache import empty_cpu_cache
from ._ops import cpu_gemm_engines
from .modules import GRU, LSTM, RNN


def cpu_description() -> str:
    """The CPU's model, generation (family / model numbers: a virtual machine may name only "AMD EPYC"),
    L2 cache per core and the features that decide lstmfast's and oneDNN's kernels, e.g.
    "AMD EPYC, family 25 model 17, L2 1024K (avx2, avx512f, avx512_bf16)": every benchmark says what it
    ran on."""
    model, flags, ids = platform.processor() or platform.machine(), set(), {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name":
                    model = value.strip()
                elif key in ("cpu family", "model"):
                    ids[key] = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    if "cpu family" in ids and "model" in ids:
        model += f", family {ids['cpu family']} model {ids['model']}"
    try:
        with open("/sys/devices/system/cpu/cpu0/cache/index2/size") as f:
            model += f", L2 {f.read().strip()}"
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")
    return f"{model} ({', '.join(f for f in wanted if f in flags) or 'no AVX2'})"

CONTENDERS = ("lstmfast", "torch.nn", "torch.nn-native", "reference")
# With --dtype bfloat16: torch.nn in bfloat16 (oneDNN's bf16 RNN kernels where the CPU has them), a
# float32 torch.nn under torch.autocast("cpu", bfloat16), and lstmfast in float32 on the same input.
BF16_CONTENDERS = ("lstmfast", "torch.nn", "torch.nn-autocast", "lstmfast-float32")
ALL_CONTENDERS = tuple(dict.fromkeys(CONTENDERS + BF16_CONTENDERS))
# The contenders of each --dtype other than float32: float16 as bfloat16 but autocast, which torch.nn's
# LSTM refuses on the CPU (oneDNN makes no float16 LSTM primitive there).
REDUCED_CONTENDERS = {"bfloat16": BF16_CONTENDERS,
                      "float16": ("lstmfast", "torch.nn", "lstmfast-float32")}
MODES = ("fwd", "train")
ROUNDS = 7  # interleaved rounds per row and mode (measure_interleaved)
KINDS = ("LSTM", "GRU", "RNN")  # the grid's layers (RNN: tanh)


@dataclass
class Case:
    kind: str  # "LSTM", "GRU" or "RNN" (tanh)
    T: int
    B: int
    H: int
    I: int  # noqa: E741
    dtype: str = "float32"
    layers: int = 1
    bidirectional: bool = False
    proj: int = 0
    packed: bool = False  # PackedSequence with mixed lengths (longest T)
    group: str = "grid"  # "grid", or the extra row's name

    @property
    def label(self):
        s = f"{self.kind} T={self.T} B={self.B} H={self.H}"
        if self.layers > 1:
            s += f" L={self.layers}"
        if self.bidirectional:
            s += " bi"
        if self.proj:
            s += f" P={self.proj}"
        if self.packed:
            s += " packed"
        if self.dtype != "float32":
            s += f" {self.dtype}"
        return s


def lengths_of(case: Case) -> List[int]:
    """Mixed sequence lengths for packed rows: from T down to about T/4, in shuffled order."""
    lengths = [max(1, case.T - (case.T * 3 * b) // (4 * max(1, case.B - 1))) for b in range(case.B)]
    return [lengths[(7 * b) % case.B] for b in range(case.B)] if case.B % 7 else lengths


def gemm_flops(case: Case, tokens: int) -> float:
    """Useful multiply-add FLOPs of one forward pass: the layer's matrix products over all tokens."""
    gates = {"LSTM": 4, "GRU": 3, "RNN": 1}[case.kind]
    out = case.proj or case.H
    dirs = 2 if case.bidirectional else 1
    flops = 0.0
    for layer in range(case.layers):
        inp = case.I if layer == 0 else out * dirs
        per_token = 2 * gates * case.H * (inp + out) + (2 * case.H * case.proj if case.proj else 0)
        flops += dirs * tokens * per_token
    return flops


class _Reference(nn.Module):
    """lstmfast's module composition (layers, directions, packing) over lstmfast.reference's cells."""

    def __init__(self, ours):
        super().__init__()
        self.ours = ours

    def forward(self, x):
        ours = self.ours
        original = type(ours)._run_layer

        def run_layer(input, batch_sizes, states, weights, layer, direction):
            w_ih, w_hh, b_ih, b_hh, w_hr = ours._layer_weights(weights, layer, direction)
            if isinstance(ours, LSTM):
                return reference.lstm(input, w_ih, w_hh, b_ih, b_hh, w_hr=w_hr, h0=states[0], c0=states[1],
                                      batch_sizes=batch_sizes, reverse=direction == 1)
            if isinstance(ours, GRU):
                return reference.gru(input, w_ih, w_hh, b_ih, b_hh, h0=states[0], batch_sizes=batch_sizes,
                                     reverse=direction == 1)
            return reference.rnn(input, w_ih, w_hh, b_ih, b_hh, nonlinearity=ours.nonlinearity,
                                 h0=states[0], batch_sizes=batch_sizes, reverse=direction == 1)

        ours._run_layer = run_layer
        try:
            return ours(x)
        finally:
            del ours._run_layer
            assert type(ours)._run_layer is original


def _native(module):
    """torch.nn with oneDNN (mkldnn) disabled: ATen's native RNN path."""
    def run(x):
        with warnings.catch_warnings():
            # Restoring the flags on leaving re-sets oneDNN's TF32 switch, and torch warns that TF32
            # is for Intel GPUs: nothing to act on for a CPU benchmark.
            warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
            with torch.backends.mkldnn.flags(enabled=False):
                return module(x)
    return run


def build(case: Case, contenders) -> Dict[str, Callable]:
    dtype = getattr(torch, case.dtype)
    torch.manual_seed(0)
    kwargs = dict(num_layers=case.layers, bidirectional=case.bidirectional)
    if case.kind == "LSTM":
        kwargs["proj_size"] = case.proj
    layer = {"LSTM": LSTM, "GRU": GRU, "RNN": RNN}[case.kind]
    ours = layer(case.I, case.H, **kwargs).to(dtype)
    theirs = getattr(nn, case.kind)(case.I, case.H, **kwargs).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    runners = {"lstmfast": ours, "torch.nn": theirs, "torch.nn-native": _native(theirs),
               "reference": _Reference(ours)}
    if "torch.nn-autocast" in contenders or "lstmfast-float32" in contenders:
        # float32 copies of the same (bf16-valued) weights.
        ours32 = layer(case.I, case.H, **kwargs)
        theirs32 = getattr(nn, case.kind)(case.I, case.H, **kwargs)
        ours32.load_state_dict(ours.state_dict())
        theirs32.load_state_dict(ours.state_dict())

        def autocast(x):
            with torch.autocast("cpu", dtype=dtype):
                return theirs32(_as_float(x))

        runners.update({"torch.nn-autocast": autocast,
                        "lstmfast-float32": lambda x: ours32(_as_float(x))})
        params = [p for m in (ours, theirs, ours32, theirs32) for p in m.parameters()]
        return {name: runners[name] for name in contenders}, params
    return {name: runners[name] for name in contenders}, list(ours.parameters()) + list(theirs.parameters())


def _as_float(x):
    """x (a tensor or PackedSequence) in float32, differentiably."""
    if isinstance(x, PackedSequence):
        return PackedSequence(x.data.float(), x.batch_sizes, x.sorted_indices, x.unsorted_indices)
    return x.float()


def make_input(case: Case, requires_grad: bool):
    dtype = getattr(torch, case.dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(case.T, case.B, case.I, generator=g, dtype=dtype)
    if case.packed:
        x = pack_padded_sequence(x, torch.tensor(lengths_of(case)), enforce_sorted=False)
        data = x.data.clone().requires_grad_(requires_grad)
        return PackedSequence(data, x.batch_sizes, x.sorted_indices, x.unsorted_indices), data
    x = x.requires_grad_(requires_grad)
    return x, x


def tokens_of(case: Case) -> int:
    return sum(lengths_of(case)) if case.packed else case.T * case.B


def _statements(fn, case: Case, params):
    x, _ = make_input(case, False)
    x_grad, leaf = make_input(case, True)

    def forward():
        with torch.no_grad():
            fn(x)

    def train():
        out = fn(x_grad)[0]
        out = out.data if isinstance(out, PackedSequence) else out
        out.backward(torch.ones_like(out))
        for p in params:
            p.grad = None
        leaf.grad = None

    return {"fwd": forward, "train": train}


@contextlib.contextmanager
def _native_stderr_silenced():
    """File descriptor 2 pointed at /dev/null for the block: the profiler's native side prints two
    "USDT: ... profiler_start/stop" lines per use (torch 2.13), which no setting turns off. Python
    exceptions still propagate and print after the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory_mb(stmt) -> float:
    """Peak bytes a call allocates through torch's CPU allocator (net of what it started with). lstmfast's
    cache of reusable CPU buffers is emptied first, so the buffers a call uses count as allocated."""
    empty_cpu_cache()
    with _native_stderr_silenced(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                           profile_memory=True) as prof:
        stmt()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak / 2**20


def _clock() -> float:
    """time.perf_counter() after the GPU's queued work, when CUDA is in use (the demo times on CUDA)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def measure_interleaved(stmts: Dict[str, Callable], min_run_time: float, rounds: int = ROUNDS,
                        refused: Optional[Dict[str, Optional[str]]] = None) -> Dict[str, float]:
    """Median ms per call of each statement, timed interleaved: `rounds` rounds, in each of which every
    statement runs one block of calls (about min_run_time / rounds seconds, at least one call), the order
    rotated from round to round. On a shared machine whose speed drifts by tens of percent within
    minutes, this puts all contenders of a row in the same moments, so their ratio holds where
    back-to-back timings of each do not. `refused`: the statements that may refuse (torch.nn on a row
    some CPUs lack a kernel for), each mapped to None; one whose first calls raise RuntimeError is left
    out, the first line of its message in its place."""
    per_call = {}
    for name, stmt in stmts.items():
        try:
            for _ in range(2):  # first calls compile kernels, create oneDNN primitives, start threads
                stmt()
        except RuntimeError as e:
            if refused is None or name not in refused:
                raise
            refused[name] = str(e).splitlines()[0] if str(e) else type(e).__name__
            continue
        start = _clock()
        stmt()
        per_call[name] = _clock() - start
    calls = {name: max(1, round(min_run_time / rounds / max(t, 1e-7))) for name, t in per_call.items()}
    # A statement whose one call outlasts the whole budget (the plain-PyTorch reference on large rows)
    # sits out after three rounds rather than stretching the run.
    slow = {name for name, t in per_call.items() if t > min_run_time}
    names = list(per_call)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if name in slow and r >= 3:
                continue
            stmt, n = stmts[name], calls[name]
            start = _clock()
            for _ in range(n):
                stmt()
            times[name].append((_clock() - start) / n * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def time_case(case: Case, contenders=CONTENDERS, min_run_time=0.3, memory=True) -> dict:
    """One row: every contender's forward (no grad) and training step, each mode timed with the
    contenders interleaved (measure_interleaved), and the peak memory of a training step."""
    runners, params = build(case, contenders)
    row = asdict(case)
    row["label"] = case.label
    stmts = {name: _statements(fn, case, params) for name, fn in runners.items()}
    # torch.nn refuses some rows on some CPUs (its oneDNN bfloat16 LSTM under autocast on a CPU without
    # AVX512-BF16): the row says so and goes on with the others.
    refused = {name: None for name in stmts if name.startswith("torch.nn")}
    for mode in MODES:
        ms = measure_interleaved({name: s[mode] for name, s in stmts.items()}, min_run_time, refused=refused)
        for name, reason in refused.items():
            if reason is not None and name in stmts:
                row[f"{name}_unavailable"] = reason
                row.pop(f"{name}_fwd_ms", None)  # (refused in training only: no half a row)
                del stmts[name]
        for name in stmts:
            row[f"{name}_{mode}_ms"] = ms[name]
    if memory:
        for name in ("lstmfast", "torch.nn"):
            if name in stmts:
                stmts[name]["train"]()  # warm caches so that only the step's own allocations count
                row[f"{name}_train_peak_mb"] = peak_memory_mb(stmts[name]["train"])
    for name in stmts:
        if name == "lstmfast":
            continue
        for mode in MODES:
            row[f"speedup_{mode}_vs_{name}"] = row[f"{name}_{mode}_ms"] / row[f"lstmfast_{mode}_ms"]
    return row


def add_efficiency(row: dict, case: Case, gemm_gflops: dict) -> None:
    """Efficiency columns: the row's useful GEMM FLOPs per second over a large GEMM's (gemm_gflops), for
    lstmfast and torch.nn: where both are near 1, a row is bound by the machine's GEMM rate and no kernel
    can be much faster than the other."""
    peak = gemm_gflops[case.dtype]
    flops = gemm_flops(case, tokens_of(case))
    for name, suffix in (("lstmfast", ""), ("torch.nn", "_torch.nn")):
        if f"{name}_fwd_ms" in row:
            row[f"efficiency_fwd{suffix}"] = flops / (row[f"{name}_fwd_ms"] * 1e-3) / (peak * 1e9)
            row[f"efficiency_train{suffix}"] = 3 * flops / (row[f"{name}_train_ms"] * 1e-3) / (peak * 1e9)


def large_gemm_gflops(dtype: str, n: int, min_run_time: float) -> float:
    a = torch.randn(n, n, dtype=getattr(torch, dtype))
    b = torch.randn(n, n, dtype=getattr(torch, dtype))
    ms = measure_interleaved({"torch.mm": lambda: torch.mm(a, b)}, min_run_time)["torch.mm"]
    return 2 * n**3 / (ms * 1e-3) / 1e9


def geomean(values):
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def default_cases(quick: bool, dtype: str = "float32") -> List[Case]:
    if dtype in REDUCED_CONTENDERS:
        # The grid with T up to 128 and H up to 512 (bf16's matrix-engine shapes; a shorter run on the
        # three contenders), and the options as extra rows.
        shapes = ([(16, 8, 64)] if quick else
                  list(itertools.product((16, 128), (1, 8, 32), (256, 512))))
        grid = [Case(kind, T, B, H, H, dtype=dtype) for kind in KINDS for T, B, H in shapes]
        n = 32 if quick else 256
        extras = [
            Case("LSTM", 16, 4, n, n, dtype=dtype, layers=2, bidirectional=True, group="bidirectional 2-layer"),
            Case("LSTM", 16 if quick else 128, 16, n, n, dtype=dtype, packed=True, group="packed"),
            Case("LSTM", 16 if quick else 128, 16, 2 * n, n, dtype=dtype, proj=n // 2, group="proj_size"),
        ]
        return grid + extras
    if quick:
        grid = [Case(kind, 16, 8, 64, 64) for kind in KINDS]
        extras = [
            Case("LSTM", 16, 4, 32, 32, layers=2, bidirectional=True, group="bidirectional 2-layer"),
            Case("LSTM", 16, 6, 32, 32, packed=True, group="packed"),
            Case("LSTM", 16, 4, 32, 32, dtype="float64", group="float64"),
            Case("LSTM", 16, 4, 32, 32, proj=16, group="proj_size"),
        ]
        return grid + extras
    grid = [Case(kind, T, B, H, H)
            for kind, T, B, H in itertools.product(KINDS, (16, 128, 512), (1, 8, 64), (64, 256, 1024))]
    extras = [
        Case("LSTM", 128, 16, 256, 256, layers=2, bidirectional=True, group="bidirectional 2-layer"),
        Case("LSTM", 128, 16, 256, 256, packed=True, group="packed"),
        Case("LSTM", 128, 16, 256, 256, dtype="float64", group="float64"),
        Case("LSTM", 128, 16, 512, 256, proj=128, group="proj_size"),
    ]
    return grid + extras


def cost_ratios(quick: bool, min_run_time: float) -> dict:
    """lstmfast's LSTM only (whatever --kinds): PackedSequence vs padded input of the same total
    tokens, and bidirectional vs unidirectional (training step times; 1.0 = free, 2.0 = bidirectional
    costs two directions)."""
    T, B, H = (16, 6, 32) if quick else (128, 16, 256)
    packed = Case("LSTM", T, B, H, H, packed=True)
    tokens = tokens_of(packed)
    padded = Case("LSTM", max(1, round(tokens / B)), B, H, H)
    uni, bi = Case("LSTM", T, B, H, H), Case("LSTM", T, B, H, H, bidirectional=True)
    times = {}
    for pair in ((("packed", packed), ("padded", padded)), (("unidirectional", uni), ("bidirectional", bi))):
        steps = {}
        for name, case in pair:  # the two sides of a ratio timed interleaved
            runners, params = build(case, ("lstmfast",))
            steps[name] = _statements(runners["lstmfast"], case, params)["train"]
        times.update(measure_interleaved(steps, min_run_time))
    return {
        "packed_vs_padded": dict(ratio=times["packed"] / times["padded"] * tokens_of(padded) / tokens,
                                 packed_ms=times["packed"], padded_ms=times["padded"], tokens=tokens,
                                 note="LSTM, time per token, packed / padded (training step)"),
        "bidirectional_vs_unidirectional": dict(ratio=times["bidirectional"] / times["unidirectional"],
                                                bidirectional_ms=times["bidirectional"],
                                                unidirectional_ms=times["unidirectional"],
                                                note="LSTM, training step time, bidirectional / unidirectional"),
    }


def summarize(rows: List[dict]) -> dict:
    summary = {}
    keys = sorted({k for r in rows for k in r if k.startswith("speedup_")})
    groups = [(kind, lambda r, kind=kind: r["kind"] == kind and r["group"] == "grid") for kind in KINDS]
    if any(r["dtype"] in REDUCED_CONTENDERS for r in rows):  # (issue 16's targets are over B >= 8)
        groups += [(f"{kind} B>=8", lambda r, kind=kind: r["kind"] == kind and r["group"] == "grid" and r["B"] >= 8)
                   for kind in KINDS]
    groups += [(g, lambda r, g=g: r["group"] == g) for g in dict.fromkeys(r["group"] for r in rows) if g != "grid"]
    for name, member in groups:
        for key in keys:
            values = [r[key] for r in rows if member(r) and key in r]
            if values:
                summary[f"{name} {key}"] = dict(geomean=geomean(values), min=min(values), rows=len(values))
    memory = [r["lstmfast_train_peak_mb"] / r["torch.nn_train_peak_mb"] for r in rows
              if r.get("torch.nn_train_peak_mb")]
    if memory:
        summary["peak memory lstmfast / torch.nn (training step)"] = dict(geomean=geomean(memory),
                                                                          max=max(memory), rows=len(memory))
    return summary


def run(cases: List[Case], contenders=CONTENDERS, progress=True, min_run_time=0.3, quick=False,
        ratios=True) -> dict:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    gemm_n = 512 if quick else 2048
    dtypes = sorted({c.dtype for c in cases})
    gemm = {dtype: large_gemm_gflops(dtype, gemm_n, min_run_time) for dtype in dtypes}
    iterator = tqdm(cases, desc="benchmark", unit="case") if progress and tqdm else cases
    rows = []
    for case in iterator:
        if hasattr(iterator, "set_postfix_str"):
            iterator.set_postfix_str(case.label)
        rows.append(time_case(case, contenders, min_run_time))
    # The large GEMM again after the rows, and the faster of the two runs as the machine's rate: on a
    # shared machine one measurement can land in a slow moment (one run here measured 101 GFLOP/s where
    # the same machine gives 175).
    gemm = {dtype: max(gemm[dtype], large_gemm_gflops(dtype, gemm_n, min_run_time)) for dtype in dtypes}
    for case, row in zip(cases, rows):
        add_efficiency(row, case, gemm)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                processor=cpu_description(), date=time.strftime("%Y-%m-%d %H:%M"),
                large_gemm_gflops=gemm, large_gemm_n=gemm_n,
                note="speedup = competitor time / lstmfast time, measured in the same run")
    return dict(meta=meta, rows=rows, summary=summarize(rows),
                cost_ratios=cost_ratios(quick, min_run_time) if ratios else {})


def _competitors(rows: List[dict]) -> List[str]:
    """The contenders other than lstmfast that ran (or were refused by torch.nn) in any of the rows."""
    return [n for n in ALL_CONTENDERS[1:] if any(f"{n}_fwd_ms" in r or f"{n}_unavailable" in r for r in rows)]


def format_table(result: dict) -> str:
    rows = result["rows"]
    others = _competitors(rows)
    head = f"{'case':36}{'lstmfast ms fwd/train':>24}" + "".join(f"{'x vs ' + n:>24}" for n in others)
    head += f"{'peak MB ours/nn':>18}{'eff fwd/train':>16}{'nn eff fwd/train':>18}"
    engines = result["meta"].get("cpu_gemm_engines", {})
    lines = [f"{result['meta']['processor']}; lstmfast CPU GEMMs: "
             + ", ".join(f"{k} {v}" for k, v in engines.items() if k in result["meta"]["large_gemm_gflops"]),
             f"threads={result['meta']['threads']}  large GEMM GFLOP/s: "
             + ", ".join(f"{k} {v:.0f}" for k, v in result["meta"]["large_gemm_gflops"].items()),
             "speedup columns: competitor time / lstmfast time, forward (no grad) / training step", "",
             head, "-" * len(head)]
    for r in rows:
        line = f"{r['label']:36}{r['lstmfast_fwd_ms']:11.3f}/{r['lstmfast_train_ms']:<12.3f}"
        line += "".join(f"{r[f'speedup_fwd_vs_{n}']:13.2f}/{r[f'speedup_train_vs_{n}']:<10.2f}"
                        if f"speedup_fwd_vs_{n}" in r else f"{'refused':>13} {'':10}" for n in others)
        mem = (f"{r['lstmfast_train_peak_mb']:8.1f}/{r['torch.nn_train_peak_mb']:<9.1f}"
               if "torch.nn_train_peak_mb" in r else " " * 18)
        eff = f"{r['efficiency_fwd']:7.2f}/{r['efficiency_train']:<8.2f}" if "efficiency_fwd" in r else ""
        if "efficiency_fwd_torch.nn" in r:
            eff += f"{r['efficiency_fwd_torch.nn']:9.2f}/{r['efficiency_train_torch.nn']:<8.2f}"
        lines.append(line + mem + eff)
    lines.append("")
    refusals = {(n, r[f"{n}_unavailable"]): None for r in rows for n in others if f"{n}_unavailable" in r}
    for n, reason in refusals:
        count = sum(r.get(f"{n}_unavailable") == reason for r in rows)
        lines.append(f"{n} refused {count} row(s) on this machine: {reason}")
    for key, s in result["summary"].items():
        if "geomean" in s and "min" in s:
            lines.append(f"{key}: geometric mean {s['geomean']:.2f}x, min {s['min']:.2f}x ({s['rows']} rows)")
        else:
            lines.append(f"{key}: geometric mean {s['geomean']:.2f}, max {s['max']:.2f} ({s['rows']} rows)")
    for key, s in result["cost_ratios"].items():
        lines.append(f"{key}: {s['ratio']:.2f} ({s['note']})")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    others = _competitors(rows)
    fig, axes = plt.subplots(1, 2, figsize=(14, max(4, 0.22 * len(rows) + 1.5)), sharey=True)
    y = list(range(len(rows)))
    for ax, mode in zip(axes, MODES):
        width = 0.8 / max(1, len(others))
        for i, name in enumerate(others):
            ax.barh([v + i * width for v in y], [r.get(f"speedup_{mode}_vs_{name}", math.nan) for r in rows],
                    height=width,
                    label=f"vs {name}")
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_title(f"lstmfast speedup, {'inference forward' if mode == 'fwd' else 'training step'}")
        ax.set_xlabel("competitor time / lstmfast time")
    axes[0].set_yticks([v + 0.4 - 0.4 / max(1, len(others)) for v in y])
    axes[0].set_yticklabels([r["label"] for r in rows], fontsize=7)
    axes[0].invert_yaxis()
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"lstmfast {result['meta']['date']}, torch {result['meta']['torch']}, "
                 f"{result['meta']['threads']} threads")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_row(text: str, dtype: str, parser: argparse.ArgumentParser) -> Case:
    """KIND:T:B:H as a one-layer Case with I = H."""
    kind, *dims = text.split(":")
    if kind not in KINDS or len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims):
        parser.error(f"--rows takes KIND:T:B:H with KIND one of {','.join(KINDS)} and positive sizes, got {text!r}")
    T, B, H = map(int, dims)
    return Case(kind, T, B, H, H, dtype=dtype)


def main(argv: Optional[List[str]] = None) -> dict:
    parser = argparse.ArgumentParser(prog="lstmfast bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a small grid (well under a minute)")
    parser.add_argument("--json", metavar="PATH", type=_cli.output_path,
                        help="write rows, summary and cost ratios as JSON")
    parser.add_argument("--plot", metavar="PATH", type=_cli.output_path, help="write a PNG of the speedups")
    parser.add_argument("--no-reference", action="store_true", help="skip the slow plain-PyTorch contender")
    parser.add_argument("--min-run-time", type=_cli.positive_seconds, default=None,
                        help="seconds per contender and mode of a row, over its interleaved rounds "
                             "(default 0.3, 0.05 with --quick)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dtype", choices=("float32", *REDUCED_CONTENDERS), default="float32",
                        help="bfloat16: lstmfast bf16 against torch.nn bf16, torch.nn float32 under CPU bf16 "
                             "autocast and lstmfast float32, on a reduced-precision grid; float16: the same "
                             "without autocast (torch.nn's LSTM refuses it)")
    parser.add_argument("--kinds", default=",".join(KINDS),
                        help=f"comma-separated layers to time (default {','.join(KINDS)}; the extra rows and the "
                             "packed / bidirectional cost ratios are LSTMs)")
    parser.add_argument("--rows", nargs="+", metavar="KIND:T:B:H",
                        help="time only these rows (one layer, I = H), e.g. GRU:16:64:1024 LSTM:128:32:512, "
                             "instead of the grid and the packed / bidirectional cost ratios")
    args = parser.parse_args(argv)
    kinds = args.kinds.split(",")
    if not kinds or any(k not in KINDS for k in kinds):
        parser.error(f"--kinds takes a comma-separated subset of {','.join(KINDS)}, got {args.kinds!r}")
    if args.rows and args.kinds != ",".join(KINDS):
        parser.error("--kinds and --rows do not go together: each row names its kind")
    rows = [parse_row(r, args.dtype, parser) for r in args.rows or ()]
    if args.dtype in REDUCED_CONTENDERS:
        contenders = REDUCED_CONTENDERS[args.dtype]
    else:
        contenders = tuple(c for c in CONTENDERS if not (args.no_reference and c == "reference"))
    min_run_time = args.min_run_time if args.min_run_time is not None else (0.05 if args.quick else 0.3)
    cases = rows or [c for c in default_cases(args.quick, args.dtype) if c.kind in kinds]
    result = run(cases, contenders, progress=not args.no_progress,
                 min_run_time=min_run_time, quick=args.quick,
                 ratios=args.dtype == "float32" and not rows)  # (--rows: only the rows asked for)
    result["meta"]["cpu_gemm_engines"] = cpu_gemm_engines()
    print(format_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.plot:
        plot(result, args.plot)
    return result

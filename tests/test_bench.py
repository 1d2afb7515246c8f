"""Smoke test of the benchmark (`python -m lstmfast bench --quick`): it runs and its JSON is complete.
It makes no speed claim: speed is measured by running the benchmark, never by tests."""

import json
import math
import time

import pytest

from lstmfast import bench


def test_quick_benchmark_json(tmp_path):
    path = tmp_path / "bench.json"
    result = bench.main(["--quick", "--min-run-time", "0.001", "--no-progress", "--json", str(path)])
    loaded = json.loads(path.read_text())
    assert loaded == json.loads(json.dumps(result))
    assert loaded["meta"]["threads"] >= 1
    assert all(v > 0 and math.isfinite(v) for v in loaded["meta"]["large_gemm_gflops"].values())
    rows = loaded["rows"]
    groups = {r["group"] for r in rows}
    assert {"grid", "bidirectional 2-layer", "packed", "float64", "proj_size"} <= groups
    assert {r["kind"] for r in rows if r["group"] == "grid"} == {"LSTM", "GRU", "RNN"}
    for r in rows:
        for name in bench.CONTENDERS:
            for mode in bench.MODES:
                assert r[f"{name}_{mode}_ms"] > 0
        ratios = [v for k, v in r.items() if k.startswith(("speedup_", "efficiency_"))]
        assert len(ratios) == 2 * (len(bench.CONTENDERS) - 1) + 4  # speedups, lstmfast's and torch.nn's efficiency
        assert all(v > 0 and math.isfinite(v) for v in ratios), r
        assert r["lstmfast_train_peak_mb"] > 0 and r["torch.nn_train_peak_mb"] > 0
    for s in loaded["summary"].values():
        assert s["geomean"] > 0 and math.isfinite(s["geomean"])
    for key in ("packed_vs_padded", "bidirectional_vs_unidirectional"):
        ratio = loaded["cost_ratios"][key]["ratio"]
        assert ratio > 0 and math.isfinite(ratio)


def test_plot(tmp_path):
    result = bench.main(["--quick", "--min-run-time", "0.001", "--no-progress", "--no-reference"])
    path = tmp_path / "speedups.png"
    bench.plot(result, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_benchmark(tmp_path, dtype):
    """--dtype bfloat16 / float16: every row times lstmfast in the dtype against torch.nn in it, lstmfast
    float32 and (bfloat16) torch.nn float32 under CPU bf16 autocast, with efficiency against a torch.mm in
    the dtype, and says which GEMM engine ran."""
    path = tmp_path / "bench.json"
    bench.main(["--quick", "--dtype", dtype, "--min-run-time", "0.001", "--no-progress", "--json", str(path)])
    loaded = json.loads(path.read_text())
    assert set(loaded["meta"]["large_gemm_gflops"]) == {dtype}
    assert loaded["meta"]["cpu_gemm_engines"][dtype]
    rows = loaded["rows"]
    assert {r["dtype"] for r in rows} == {dtype}
    assert {"grid", "bidirectional 2-layer", "packed", "proj_size"} <= {r["group"] for r in rows}
    for r in rows:
        for name in bench.REDUCED_CONTENDERS[dtype][1:]:
            if f"{name}_unavailable" in r:
                # torch.nn's oneDNN makes no bfloat16 LSTM primitive on a CPU without AVX512-BF16, and
                # only there may a torch.nn contender sit a row out.
                assert name.startswith("torch.nn") and r["kind"] == "LSTM"
                assert "avx512_bf16" not in bench.cpu_description()
                continue
            for mode in bench.MODES:
                assert r[f"{name}_{mode}_ms"] > 0 and math.isfinite(r[f"speedup_{mode}_vs_{name}"])
        assert r["efficiency_fwd"] > 0 and r["efficiency_train"] > 0
        assert r["efficiency_fwd_torch.nn"] > 0 and r["efficiency_train_torch.nn"] > 0
    assert "LSTM B>=8 speedup_train_vs_torch.nn" in loaded["summary"]


def test_a_contender_torch_refuses_sits_the_row_out(monkeypatch, tmp_path):
    """Where torch.nn raises for a row on this machine (its oneDNN bfloat16 LSTM on a CPU without
    AVX512-BF16), the row records the refusal and times the others; the table and plot say so."""
    build = bench.build

    def refusing(case, contenders):
        runners, params = build(case, contenders)

        def refuse(x):
            raise RuntimeError("could not create a primitive descriptor\nsecond line")
        return {**runners, "torch.nn": refuse}, params

    monkeypatch.setattr(bench, "build", refusing)
    case = bench.Case("GRU", 3, 2, 8, 8)
    row = bench.time_case(case, ("lstmfast", "torch.nn", "torch.nn-native"), min_run_time=0.001)
    assert row["torch.nn_unavailable"] == "could not create a primitive descriptor"
    assert not any(k.startswith("torch.nn_") and k != "torch.nn_unavailable" for k in row)
    assert "speedup_train_vs_torch.nn" not in row and row["speedup_train_vs_torch.nn-native"] > 0
    assert row["lstmfast_train_ms"] > 0
    result = dict(meta=dict(processor="cpu", threads=1, date="d", torch="t", large_gemm_gflops={"float32": 1.0}),
                  rows=[row], summary=bench.summarize([row]), cost_ratios={})
    table = bench.format_table(result)
    assert "refused" in table
    assert "torch.nn refused 1 row(s) on this machine: could not create a primitive descriptor" in table
    bench.plot(result, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").stat().st_size > 0


def test_kinds_option_selects_the_layers():
    result = bench.main(["--quick", "--min-run-time", "0.001", "--no-progress", "--no-reference", "--kinds", "GRU"])
    assert {r["kind"] for r in result["rows"]} == {"GRU"}
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--kinds", "GRU,LSTMX"])
    with pytest.raises(SystemExit):  # (each row names its kind: --kinds would be ignored)
        bench.main(["--kinds", "GRU", "--rows", "GRU:3:2:5"])


def test_rows_option_times_the_named_rows(capfd):
    """--rows times exactly the named one-layer rows (the way to re-time a few grid rows), all
    contenders of a row interleaved; bad rows are refused. The profiler behind the peak-memory column
    prints nothing of its own."""
    result = bench.main(["--rows", "GRU:3:2:5", "RNN:4:1:3", "--min-run-time", "0.001", "--no-progress",
                         "--no-reference"])
    out, err = capfd.readouterr()
    assert "GRU T=3 B=2 H=5" in out and "profiler_start" not in out + err
    assert [(r["kind"], r["T"], r["B"], r["H"], r["I"], r["layers"]) for r in result["rows"]] == [
        ("GRU", 3, 2, 5, 5, 1), ("RNN", 4, 1, 3, 3, 1)]
    assert result["cost_ratios"] == {}  # (only the rows asked for)
    for r in result["rows"]:
        for mode in bench.MODES:
            assert r[f"lstmfast_{mode}_ms"] > 0 and math.isfinite(r[f"speedup_{mode}_vs_torch.nn"])
    for bad in ("GRUX:3:2:5", "GRU:3:2", "GRU:3:0:5", "GRU:3:b:5"):
        with pytest.raises(SystemExit):
            bench.main(["--rows", bad, "--no-progress"])


def test_interleaved_timing_rotates_and_takes_medians():
    """measure_interleaved runs every statement in every round, in a rotated order, and reports the
    median of its per-call block times."""
    order = []
    stmts = {name: (lambda name=name: order.append(name)) for name in ("a", "b", "c")}
    ms = bench.measure_interleaved(stmts, min_run_time=0.0, rounds=3)
    assert set(ms) == {"a", "b", "c"} and all(v >= 0 for v in ms.values())
    timed = order[9:]  # after 2 warm-up calls and one calibration call each
    assert timed == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    # One whose single call outlasts min_run_time sits out after three rounds.
    order.clear()
    stmts["slow"] = lambda: (order.append("slow"), time.sleep(0.02))
    ms = bench.measure_interleaved(stmts, min_run_time=0.01, rounds=5)
    assert order.count("slow") == 3 + 3 and order.count("a") >= 3 + 5
    assert set(ms) == {"a", "b", "c", "slow"} and ms["slow"] >= 20

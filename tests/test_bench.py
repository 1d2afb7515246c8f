"""Smoke test of the benchmark (`python -m lstmfast bench --quick`): it runs and its JSON is complete.
It makes no speed claim: speed is measured by running the benchmark, never by tests."""

import json
import math

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


def test_bfloat16_benchmark(tmp_path):
    """--dtype bfloat16: every row times lstmfast bf16 against torch.nn bf16, torch.nn float32 under CPU
    bf16 autocast and lstmfast float32, with efficiency against a bf16 torch.mm, and says which GEMM
    engine ran."""
    path = tmp_path / "bench.json"
    bench.main(["--quick", "--dtype", "bfloat16", "--min-run-time", "0.001", "--no-progress", "--json", str(path)])
    loaded = json.loads(path.read_text())
    assert set(loaded["meta"]["large_gemm_gflops"]) == {"bfloat16"}
    assert loaded["meta"]["cpu_gemm_engines"]["bfloat16"]
    rows = loaded["rows"]
    assert {r["dtype"] for r in rows} == {"bfloat16"}
    assert {"grid", "bidirectional 2-layer", "packed", "proj_size"} <= {r["group"] for r in rows}
    for r in rows:
        for name in bench.BF16_CONTENDERS[1:]:
            for mode in bench.MODES:
                assert r[f"{name}_{mode}_ms"] > 0 and math.isfinite(r[f"speedup_{mode}_vs_{name}"])
        assert r["efficiency_fwd"] > 0 and r["efficiency_train"] > 0
        assert r["efficiency_fwd_torch.nn"] > 0 and r["efficiency_train_torch.nn"] > 0
    assert "LSTM B>=8 speedup_train_vs_torch.nn" in loaded["summary"]


def test_kinds_option_selects_the_layers():
    result = bench.main(["--quick", "--min-run-time", "0.001", "--no-progress", "--no-reference", "--kinds", "GRU"])
    assert {r["kind"] for r in result["rows"]} == {"GRU"}
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--kinds", "GRU,LSTMX"])


def test_interleaved_retiming_script():
    """benchmarks/interleaved.py (re-times rows with both sides interleaved) runs and reports a ratio."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "interleaved.py"
    if not path.exists():
        pytest.skip("benchmarks/ is not part of this checkout (an installed sdist's tests)")
    spec = importlib.util.spec_from_file_location("interleaved", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for mode in ("train", "fwd"):
        (row,) = module.main(["GRU:3:2:5", "--mode", mode, "--rounds", "2", "--seconds", "0.001"])
        assert row["lstmfast"] > 0 and row["torch.nn"] > 0 and math.isfinite(row["speedup"])

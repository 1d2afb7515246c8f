"""`python -m lstmfast demo --quick` and `bench`: they run, write their outputs, and the demo's own
measurements support the claims its report makes."""

import json
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = subprocess.run([sys.executable, "-m", "lstmfast", "demo", "--quick", "--out", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_demo_writes_everything(demo_run):
    out, stdout = demo_run
    for name in ("results.json", "gradient_flow.png", "adding_problem.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    assert "Gradient flow at distance 50" in stdout
    report = (out / "report.md").read_text()
    assert "# The vanishing gradient, measured" in report and "adding problem" in report


def test_demo_claims_hold_in_its_own_numbers(demo_run):
    out, _ = demo_run
    results = json.loads((out / "results.json").read_text())
    flows = {(e["label"], e["scale"]): e for e in results["gradient_flow"]}

    def at_50(label):
        return flows[(label, 1.0)]["relative_hidden"][50]

    assert at_50("LSTM") >= 1000 * at_50("RNN (tanh)")
    assert at_50("GRU") >= 1000 * at_50("RNN (tanh)")  # the update gate's path (about 1e6x at default init)
    assert at_50("LSTM, forget bias 1") >= 1000 * at_50("LSTM")
    assert flows[("RNN (tanh)", 4.0)]["exploding"]
    assert not flows[("RNN (tanh)", 1.0)]["exploding"]
    assert flows[("RNN (tanh)", 1.0)]["vanish_distance"] is not None
    assert results["claims"]["rnn_tanh_exploding_scales"] == [4.0]
    for length, runs in results["adding"].items():
        for kind in ("RNN", "GRU", "LSTM"):
            assert 0 < runs[kind]["final_mse"] < 1.0
    for kind in ("LSTM", "GRU", "RNN"):
        assert results["speed"][kind]["speedup"] > 0


def test_demo_is_reproducible_for_a_seed(tmp_path):
    from lstmfast import demo
    a = demo.run_gradient_flow(60, 8, 4, [1.0], 7, "cpu", lambda it, desc: it)
    b = demo.run_gradient_flow(60, 8, 4, [1.0], 7, "cpu", lambda it, desc: it)
    assert a == b


def test_cli_lists_subcommands():
    result = subprocess.run([sys.executable, "-m", "lstmfast", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for command in ("demo", "bench", "info"):
        assert command in result.stdout


@pytest.mark.parametrize("args,message", [
    (["demo", "--hidden-size", "0"], "argument --hidden-size: expected a positive integer, got '0'"),
    (["demo", "--lengths", "abc"], "argument --lengths: expected comma-separated integers of at least 2"),
    (["demo", "--lengths", "1"], "argument --lengths: expected comma-separated integers of at least 2"),
    (["demo", "--steps", "-5"], "argument --steps: expected comma-separated integers of at least 1"),
    (["demo", "--flow-steps", "0"], "argument --flow-steps: expected a positive integer"),
    (["demo", "--device", "foo"], "--device takes cpu or cuda, got 'foo'"),
    (["bench", "--min-run-time", "nan"], "argument --min-run-time: expected a positive number of seconds"),
    (["bench", "--min-run-time", "-1"], "argument --min-run-time: expected a positive number of seconds"),
    (["bench", "--json", "/nonexistent-folder/x.json"], "argument --json: folder '/nonexistent-folder' does not exist"),
    (["info", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_cli_refuses_bad_arguments_before_running(args, message):
    """A bad value is argparse's usage error (exit status 2, naming the option) before any work, not a
    traceback from inside a run (or, for --json, after a whole benchmark)."""
    result = subprocess.run([sys.executable, "-m", "lstmfast", *args], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_cli_version():
    import torch

    import lstmfast
    result = subprocess.run([sys.executable, "-m", "lstmfast", "--version"], capture_output=True, text=True)
    assert result.returncode == 0
    assert result.stdout.strip() == f"lstmfast {lstmfast.__version__} (torch {torch.__version__})"

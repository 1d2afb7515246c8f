"""Accuracy of bfloat16 LSTMs on the CPU: lstmfast bf16 and torch.nn bf16 against a float64 run of the
same (bf16-valued) weights and input, for the output and dW_hh (normwise relative error).

lstmfast keeps the cell state and all pointwise math in float32 and rounds only the GEMM operands;
torch.nn's bf16 LSTM behaves as if the cell state were rounded to bf16 every step, which loses long
memories (the forget-gate-bias-5 cases). Runs in about a minute on two cores:

    python benchmarks/bf16_accuracy.py [--json PATH]
"""

import argparse
import json
import platform

import torch
from torch import nn

import lstmfast

# name, T, B, H, forget-gate bias (b_ih's forget slice; 0 leaves torch.nn's random init)
CASES = [
    ("random init", 128, 8, 128, None),
    ("random init, 2 layers", 128, 8, 128, None),
    ("forget-gate bias 5", 128, 8, 128, 5.0),
    ("forget-gate bias 5", 1024, 8, 128, 5.0),
]


def relative(actual, expected):
    return ((actual.double() - expected).norm() / expected.norm()).item()


def run_case(name, T, B, H, forget_bias, seed=0):
    torch.manual_seed(seed)
    layers = 2 if "2 layers" in name else 1
    ours = lstmfast.LSTM(H, H, num_layers=layers).bfloat16()
    if forget_bias is not None:
        with torch.no_grad():
            for layer in range(layers):
                getattr(ours, f"bias_ih_l{layer}")[H:2 * H] = forget_bias
                getattr(ours, f"bias_hh_l{layer}")[H:2 * H] = 0.0
    theirs = nn.LSTM(H, H, num_layers=layers).bfloat16()
    theirs.load_state_dict(ours.state_dict())
    exact = lstmfast.LSTM(H, H, num_layers=layers).double()
    exact.load_state_dict(ours.state_dict())
    x = torch.randn(T, B, H).bfloat16()
    cotangent = torch.randn(T, B, H, dtype=torch.float64)
    results = {}
    for label, module in (("lstmfast", ours), ("torch.nn", theirs), ("float64", exact)):
        out, _ = module(x.to(module.weight_hh_l0.dtype))
        (grad,) = torch.autograd.grad((out.double() * cotangent).sum(), [module.weight_hh_l0])
        results[label] = (out.detach(), grad)
    row = dict(case=name, T=T, B=B, H=H, layers=layers)
    for label in ("lstmfast", "torch.nn"):
        row[f"{label}_output"] = relative(results[label][0], results["float64"][0])
        row[f"{label}_dW_hh"] = relative(results[label][1], results["float64"][1])
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    rows = [run_case(*case) for case in CASES]
    print(f"torch {torch.__version__}, {platform.machine()}, lstmfast bf16 engine "
          f"{lstmfast.cpu_gemm_engines()['bfloat16']}")
    print("| case | T | lstmfast bf16 output / dW_hh | torch.nn bf16 output / dW_hh | ratio (torch.nn / lstmfast) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['T']} | {r['lstmfast_output']:.1e} / {r['lstmfast_dW_hh']:.1e} | "
              f"{r['torch.nn_output']:.1e} / {r['torch.nn_dW_hh']:.1e} | "
              f"{r['torch.nn_output'] / r['lstmfast_output']:.1f} / {r['torch.nn_dW_hh'] / r['lstmfast_dW_hh']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

"""The lstmfast command line: `python -m lstmfast SUBCOMMAND` (or the `lstmfast` script)."""

import argparse
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(
        prog="lstmfast", description="Fused LSTM / GRU / RNN layers for PyTorch: benchmarks and demos.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("demo", help="the vanishing-gradient lab: gradient flow, adding problem, speed",
                   add_help=False)
    sub.add_parser("bench", help="speed of lstmfast vs torch.nn and the plain-PyTorch reference",
                   add_help=False)
    sub.add_parser("info", help="version, build (CPU/CUDA) and torch it runs on")
    parser.add_argument("--version", action="store_true", help="print lstmfast's and torch's versions")
    args, rest = parser.parse_known_args(argv)
    if args.command not in ("demo", "bench") and rest:  # (demo and bench parse their own options)
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.version:
        import torch

        from . import __version__
        print(f"lstmfast {__version__} (torch {torch.__version__})")
        return 0
    if args.command == "demo":
        from . import demo
        demo.main(rest)
    elif args.command == "bench":
        from . import bench
        bench.main(rest)
    elif args.command == "info":
        from . import build_summary
        print(build_summary(detail=True))
    else:
        parser.print_help()
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Argument types shared by the command line's subcommands (demo, bench): a bad value ends in
argparse's usage error (exit status 2) naming the option, not in a traceback from deep inside a run."""

import argparse
import math
import os


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def int_list(minimum):
    """A comma-separated list of integers, each at least `minimum`."""
    def parse(text):
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            values = []
        if not values or min(values) < minimum:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated integers of at least {minimum} (e.g. 50,100), got {text!r}")
        return values
    return parse


def positive_seconds(text):
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def output_path(text):
    """A file to write at the end of a run: its folder must exist now, not only after the run."""
    folder = os.path.dirname(text) or "."
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder!r} does not exist")
    return text

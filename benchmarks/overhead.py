"""Overhead benchmark: host milliseconds per training step at a tiny batch.

At batch 8 the arithmetic of a step is small, so the time per step is what
the framework costs around it: Python in Keras's layers and ``fit`` loop,
dispatch, copies and synchronisations. For each model this trains, taking
turns epoch by epoch in one process (round 1 is warm-up), stock Keras, the
project's fast path (what ``train`` runs) and the plain-PyTorch twin
(``twins.py``; the default CNN with its flips and shifts), and prints
milliseconds per step (median epoch time / steps) and the fast/torch ratio.

Each model trains on a stratified subset so an epoch stays short: 4000
images for ``mlp`` and ``baseline-cnn``, 2000 for ``cnn`` (90% of it trains,
the rest is the validation split, unused here).

Usage:
    python benchmarks/overhead.py                      # baseline-cnn, mlp, cnn at batch 8
    python benchmarks/bench.py --overhead --rounds 4   # the same, through bench.py
    python benchmarks/overhead.py --models cnn --subset 1000 --json overhead.json
"""

from __future__ import annotations

import early_signals  # first: a Ctrl-C while the imports below load is one line
import argparse
import os
import platform
import sys

import outputs  # benchmarks/ is on sys.path when a script there runs
from fmnist_keras.backend import default_backend
from fmnist_keras.cli import add_data_arguments, in_range
from fmnist_keras.config import RANGES

os.environ["KERAS_BACKEND"] = default_backend()  # torch unless $KERAS_BACKEND names one

# Images per model: ~450 (mlp, baseline-cnn) and ~225 (cnn) steps of 8 per epoch, a few seconds each.
SUBSETS = {"mlp": 4000, "baseline-cnn": 4000, "cnn": 2000}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["baseline-cnn", "mlp", "cnn"], choices=sorted(SUBSETS),
                        help="models to time (default: baseline-cnn mlp cnn)")
    parser.add_argument("--batch-size", type=in_range(*RANGES["batch_size"]), metavar="N", default=8,
                        help="batch size (default: 8)")
    parser.add_argument("--rounds", type=in_range(*RANGES["epochs"]), metavar="N", default=3,
                        help="epochs per path, the first one is warm-up (default: 3)")
    parser.add_argument("--subset", type=in_range(*RANGES["subset"]), metavar="N",
                        help="images per model (default: 4000 for mlp and baseline-cnn, 2000 for cnn)")
    parser.add_argument("--threads", type=in_range(int, 1, 1024), metavar="N",
                        help="torch CPU threads (default: torch's, one per core; use 1 on a shared machine)")
    parser.add_argument("--no-stock", action="store_true", help="skip stock Keras")
    parser.add_argument("--json", type=outputs.json_path, metavar="PATH",
                        help="also write the results as JSON (a new file, or an earlier result, which is replaced)")
    add_data_arguments(parser)  # --data-dir and --no-verify
    return parser.parse_args(argv)


def time_model(name, splits, args):
    """One row: ms/step of each path, and their ratios to the twin."""
    from runner import keras_runner
    from twins import twin_runner

    paths = []
    if not args.no_stock:
        paths.append(keras_runner(name, splits, args.rounds, args.batch_size, fast=False)[0])
    fast, _, weights = keras_runner(name, splits, args.rounds, args.batch_size, fast=True)
    paths += [fast, twin_runner(name, weights, splits, args.batch_size)]
    steps = -(-len(splits.x_train) // args.batch_size)
    for round_ in range(args.rounds):
        for path in paths:
            path.epoch()
        print(f"{name}: round {round_ + 1}/{args.rounds}: "
              + ", ".join(f"{p.label} {1000 * p.times[-1] / steps:.2f} ms/step" for p in paths), flush=True)
    row = {"model": name, "images": len(splits.x_train), "steps": steps}
    for path in paths:
        key = path.label.split()[-1]  # stock, fast, torch
        row[f"{key}_ms"] = 1000 * path.s_per_epoch / steps
        row[f"{key}_ms_rounds"] = [1000 * t / steps for t in path.times]
        row[f"{key}_peak_mb"] = path.peak_mb or None
    row["fast_over_torch"] = row["fast_ms"] / row["torch_ms"]
    if "stock_ms" in row:
        row["stock_over_torch"] = row["stock_ms"] / row["torch_ms"]
    return row


def main(argv=None) -> int:
    args = parse_args(argv)
    outputs.select_torch("overhead.py")
    import keras

    from fmnist_keras import data as fdata
    from fmnist_keras.backend import describe_device, select_backend
    from fmnist_keras.config import TrainConfig
    from fmnist_keras.engine.splits import make_splits
    from runner import peak_rss_mb, set_threads

    select_backend("torch")
    threads = set_threads(args.threads)
    raw = fdata.load_data(args.data_dir, verify=args.verify)
    rows = []
    for name in args.models:
        subset = args.subset or SUBSETS[name]
        rows.append(time_model(name, make_splits(raw, TrainConfig(subset=subset)), args))
    device = describe_device()
    print(f"\nbatch {args.batch_size}, {args.rounds} rounds ({outputs.rounds_note(args.rounds)}), device {device}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs ({threads} threads), keras {keras.__version__}")
    header = (f"{'model':<14}{'images':>7}{'stock ms/step':>15}{'fast ms/step':>14}{'torch ms/step':>15}"
              f"{'fast/torch':>12}{'stock/torch':>13}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        stock = f"{r['stock_ms']:.2f}" if "stock_ms" in r else "-"
        stock_ratio = f"{r['stock_over_torch']:.2f}x" if "stock_ms" in r else "-"
        print(f"{r['model']:<14}{r['images']:>7}{stock:>15}{r['fast_ms']:>14.2f}{r['torch_ms']:>15.2f}"
              f"{r['fast_over_torch']:>11.2f}x{stock_ratio:>13}")
    if args.json:
        outputs.write_json(args.json, {"device": device, "keras": keras.__version__, "versions": outputs.versions(), "batch_size": args.batch_size,
                                       "rounds": args.rounds, "cpus": os.cpu_count(), "threads": threads,
                                       "peak_rss_mb": peak_rss_mb(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(outputs.run_benchmark(main, "overhead.py"))

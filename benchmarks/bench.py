"""Speed benchmark: the project's Keras training path against stock Keras and a plain-PyTorch twin.

For each model it trains, side by side in one process, on the current backend
(``KERAS_BACKEND``, default torch):

* ``keras stock``: ``model.fit`` on Keras as shipped, NHWC numpy arrays (the
  style of the Keras docs);
* ``keras fast``: the project's ``train`` path, the same ``model.fit`` with
  the torch fast path (:mod:`fmnist_keras.engine.fastpath`); on tensorflow on
  a CPU, ``fit`` on ``train``'s ``tf.data`` pipeline without autotuning
  (:mod:`fmnist_keras.engine.host_batches`); on jax the two are the same and
  one row is printed;
* ``plain torch`` (torch only): the same network in plain PyTorch
  (``twins.py``; ``cnn`` with its flips and shifts), starting from the *same
  initial weights* copied from the Keras model, with the same batch size and
  optimiser (AdamW), the whole data set held as one tensor in
  ``channels_last`` memory format.

The paths take turns epoch by epoch (round 1 is warm-up), so a machine that
speeds up or slows down during the run affects them alike. For each path it
reports seconds per epoch (median of the timed rounds), training images/s,
inference images/s, peak memory (GPU: the path's own peak; CPU: the process's
peak resident size, printed once) and test accuracy after the last round, and
the ratio of each Keras path to plain PyTorch.

Usage:
    KERAS_BACKEND=torch python benchmarks/bench.py --models baseline-cnn mlp --epochs 4
    python benchmarks/bench.py --subset 10000 --epochs 2 --json bench.json   # quicker
    python benchmarks/bench.py --models cnn --mixed-precision   # bfloat16 on a CPU, as train runs the CNN there
    python benchmarks/bench.py --overhead     # host ms/step at batch 8 instead (overhead.py)

Prints a table and writes it as JSON (``--json``). Numbers depend on the
machine: docs/speed.md says which one produced each table.
"""

from __future__ import annotations

import early_signals  # first: a Ctrl-C while the imports below load is one line
import argparse
import os
import platform
import sys

import outputs  # benchmarks/ is on sys.path when a script there runs
from fmnist_keras.backend import default_backend

os.environ["KERAS_BACKEND"] = default_backend()  # torch unless $KERAS_BACKEND names one
if os.environ["KERAS_BACKEND"] == "tensorflow":
    import torch  # noqa: F401  (torch before tensorflow in one process)


def parse_args(argv=None):
    from fmnist_keras.cli import add_data_arguments, in_range
    from fmnist_keras.config import DATA_FORMATS, RANGES  # no Keras import: --help stays fast

    # No abbreviations: main hands exactly --overhead to overhead.py, and must not take --overh for another flag.
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--models", nargs="+", default=["baseline-cnn", "mlp"],
                        choices=["baseline-cnn", "mlp", "cnn"], help="models to time (default: baseline-cnn mlp)")
    parser.add_argument("--epochs", type=in_range(*RANGES["epochs"]), default=4,
                        help="rounds: epochs per path, the first one is warm-up (default: 4)")
    parser.add_argument("--batch-size", type=in_range(*RANGES["batch_size"]), metavar="N", default=128,
                        help="batch size (default: 128)")
    parser.add_argument("--subset", type=in_range(*RANGES["subset"]), metavar="N",
                        help="train on N images instead of the 54k training split")
    parser.add_argument("--data-format", choices=DATA_FORMATS, default="auto",
                        help="layout of the Keras paths ('auto': what train uses, channels_last)")
    parser.add_argument("--threads", type=in_range(int, 1, 1024), metavar="N",
                        help="torch CPU threads (default: torch's, one per core; use 1 on a shared machine)")
    parser.add_argument("--no-twin", action="store_true", help="skip the plain-PyTorch twin")
    parser.add_argument("--mixed-precision", action="store_true",
                        help="every path in bfloat16 (CPU) or float16 (GPU): the Keras paths under train's mixed "
                             "policy, the twin under torch.autocast (default: float32)")
    parser.add_argument("--json", type=outputs.json_path, metavar="PATH",
                        help="also write the results as JSON (a new file, or an earlier result, which is replaced)")
    parser.add_argument("--overhead", action="store_true",
                        help="time host ms/step at a tiny batch instead (benchmarks/overhead.py; "
                             "takes that script's flags)")
    add_data_arguments(parser)  # --data-dir and --no-verify
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--overhead" in argv:
        import overhead

        return overhead.main([a for a in argv if a != "--overhead"])
    args = parse_args(argv)
    from fmnist_keras.backend import describe_device, select_backend

    select_backend()  # $KERAS_BACKEND, else torch; an unknown one is one line
    import keras

    from runner import keras_runner, peak_rss_mb, set_threads

    from fmnist_keras import data as fdata
    from fmnist_keras.config import TrainConfig
    from fmnist_keras.engine.splits import make_splits

    threads = set_threads(args.threads)
    torch_backend = keras.backend.backend() == "torch"
    stock_differs = keras.backend.backend() in ("torch", "tensorflow")
    raw = fdata.load_data(args.data_dir, verify=args.verify)
    splits = make_splits(raw, TrainConfig(subset=args.subset, data_format=args.data_format))
    device = describe_device()
    rows = []
    for name in args.models:
        paths = []
        if stock_differs:
            stock, _, _ = keras_runner(name, splits, args.epochs, args.batch_size, fast=False,
                                       mixed_precision=args.mixed_precision)
            paths.append(stock)
        fast, _, weights = keras_runner(name, splits, args.epochs, args.batch_size, fast=True,
                                        mixed_precision=args.mixed_precision)
        paths.append(fast)
        twin = None
        if torch_backend and not args.no_twin:
            from twins import twin_runner

            twin = twin_runner(name, weights, splits, args.batch_size, args.mixed_precision)
        if twin:
            paths.append(twin)
        for round_ in range(args.epochs):  # the paths take turns, epoch by epoch
            for path in paths:
                path.epoch()
            print(f"{name}: round {round_ + 1}/{args.epochs}: "
                  + ", ".join(f"{p.label} {p.times[-1]:.1f} s" for p in paths), flush=True)
        results = [p.result(len(splits.x_train), splits.x_test, splits.y_test) for p in paths]
        if twin:
            for r in results[:-1]:
                r["keras_over_torch"] = r["s_per_epoch"] / results[-1]["s_per_epoch"]
        rows += results
    precision = "mixed precision" if args.mixed_precision else "float32"
    versions = outputs.versions()
    print(f"\n{len(splits.x_train)} training images ({splits.data_format}, {precision}), batch {args.batch_size}, {args.epochs} rounds "
          f"({outputs.rounds_note(args.epochs)}), device {device}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs ({threads} threads), keras {keras.__version__}, torch {versions['torch']}, "
          f"peak resident memory {peak_rss_mb():.0f} MB")
    header = f"{'model':<14}{'path':<14}{'s/epoch':>9}{'train img/s':>13}{'infer img/s':>13}{'peak MB':>9}{'test acc':>10}{'keras/torch':>13}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        ratio = f"{r['keras_over_torch']:.2f}x" if "keras_over_torch" in r else ""
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] else "-"
        print(f"{r['model']:<14}{r['path']:<14}{r['s_per_epoch']:>9.2f}{r['train_img_s']:>13.0f}"
              f"{r['infer_img_s']:>13.0f}{peak:>9}{r['test_acc']:>10.4f}{ratio:>13}")
    if args.json:
        outputs.write_json(args.json, {
            "device": device, "backend": keras.backend.backend(), "num_train": len(splits.x_train),
            "data_format": splits.data_format, "mixed_precision": args.mixed_precision, "batch_size": args.batch_size,
            "rounds": args.epochs, "cpus": os.cpu_count(), "threads": threads, "keras": keras.__version__,
            "versions": versions, "peak_rss_mb": peak_rss_mb(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(outputs.run_benchmark(main, "bench.py"))

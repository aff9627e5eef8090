"""Synchronisations per training step on a CUDA GPU: stock Keras against the fast path.

With ``torch.cuda.set_sync_debug_mode("warn")`` torch warns at every
operation that makes the host wait for the GPU: a read of a device value
(``int(t)``, ``.item()``, ``if t:``), a copy from host memory (a tensor made
from a Python number or a numpy array), a copy back. This trains each model
one epoch per path (stock Keras on numpy arrays, as in Keras's docs; the fast
path as ``train`` runs it on a GPU, the training split on the device) and
counts the warnings of steps 3 to 6, per step, by the line of Python that
made them.

Usage (on a machine with a CUDA GPU):
    python benchmarks/syncs.py                     # the default CNN, batch 128
    python benchmarks/syncs.py --models cnn mlp --json syncs.json

Without a CUDA device there is nothing to count; it says so, writes that
reason as ``--json``'s ``not_counted``, and exits 0 (``tests/test_fastpath.py``
counts the same reads and copies on any device).
"""

from __future__ import annotations

import early_signals  # first: a Ctrl-C while the imports below load is one line
import argparse
import collections
import os
import sys
import warnings

import outputs  # benchmarks/ is on sys.path when a script there runs
from fmnist_keras.cli import add_data_arguments, in_range
from fmnist_keras.config import RANGES

FIRST, LAST = 2, 6  # the batches counted: 2, 3, 4, 5 (after the first steps' one-off work)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["cnn"], choices=["baseline-cnn", "cnn", "mlp"],
                        help="models to count (default: cnn)")
    parser.add_argument("--batch-size", type=in_range(*RANGES["batch_size"]), metavar="N", default=128,
                        help="batch size (default: 128)")
    parser.add_argument("--json", type=outputs.json_path, metavar="PATH",
                        help="also write the counts as JSON (a new file, or an earlier result, which is replaced)")
    add_data_arguments(parser)  # --data-dir and --no-verify
    return parser.parse_args(argv)


def count(runner) -> dict[str, float]:
    """Synchronisations per step of one epoch of ``runner``, by file:line of the Python that made them."""
    import keras
    import torch

    counts, counted = collections.Counter(), []

    class Window(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            inside = FIRST <= batch < LAST
            if inside:
                counted.append(batch)
            torch.cuda.set_sync_debug_mode("warn" if inside else "default")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            runner.fit([Window()])
        finally:
            torch.cuda.set_sync_debug_mode("default")
    if not counted:  # an epoch of fewer batches would count nothing, and read as none per step
        raise SystemExit(f"error: an epoch has fewer than {FIRST + 1} batches, and steps {FIRST + 1}-{LAST} are the "
                         f"ones counted; pass a smaller --batch-size")
    for warning in caught:
        if "synchroniz" in str(warning.message):
            counts[f"{_short(warning.filename)}:{warning.lineno}"] += 1
    return {where: n / len(counted) for where, n in counts.most_common()}


def _short(filename: str) -> str:
    """``keras/src/...`` for Keras's files, the path from here for the project's, else as given."""
    if "/keras/src/" in filename:
        return "keras/src/" + filename.split("/keras/src/", 1)[1]
    here = os.getcwd() + os.sep
    return filename[len(here):] if filename.startswith(here) else filename


def main(argv=None) -> int:
    args = parse_args(argv)
    outputs.select_torch("syncs.py", "counts torch's synchronisations with a CUDA GPU")  # before Keras loads
    import keras
    import torch

    from fmnist_keras import data as fdata
    from fmnist_keras.backend import select_backend
    from fmnist_keras.config import TrainConfig
    from fmnist_keras.engine.splits import make_splits
    from runner import keras_runner

    if not torch.cuda.is_available():
        reason = "no CUDA device here, so no synchronisation to count"
        print(f"syncs: {reason}")
        if args.json:
            outputs.write_json(args.json, {"device": None, "keras": keras.__version__, "versions": outputs.versions(),
                                           "rows": [], "not_counted": reason})
        return 0
    select_backend("torch", "gpu")
    splits = make_splits(fdata.load_data(args.data_dir, verify=args.verify), TrainConfig(subset=20 * args.batch_size))
    rows = []
    for name in args.models:
        for fast in (False, True):
            runner = keras_runner(name, splits, 1, args.batch_size, fast=fast)[0]
            runner.fit([])  # warm-up: the first epoch's one-off work
            per_step = count(runner)
            rows.append({"model": name, "path": runner.label, "per_step": sum(per_step.values()), "where": per_step})
            print(f"\n{name}, {runner.label}: {sum(per_step.values()):g} synchronisations per step")
            for where, n in per_step.items():
                print(f"  {n:5g}  {where}")
    print(f"\nbatch {args.batch_size}, steps {FIRST + 1}-{LAST} of an epoch, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}, keras {keras.__version__}")
    if args.json:
        outputs.write_json(args.json, {"device": torch.cuda.get_device_name(), "keras": keras.__version__,
                                          "versions": outputs.versions(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(outputs.run_benchmark(main, "syncs.py"))

"""Inference speed of a saved model as train's evaluation runs it: stock Keras against the torch fast
path, with glibc's own allocator settings and with the commands' (``fmnist_keras.allocator``).

Each combination runs in a process of its own, since the allocator settings
last for the process. It loads the model from a ``.keras`` file, as
evaluation does, and predicts the views of ``--images`` random images (10
views: the image, its shifts by one pixel and the mirror images of all five)
with ``predict_probabilities``, one warm-up round and then ``--rounds``
timed rounds. It prints images/s (predictions per second, median round) and
the minor page faults of a round, and checks that the four give the same
probabilities.

Usage:
    python benchmarks/inference.py        # the default CNN, untrained, in its default precision here
    python benchmarks/inference.py --model runs/cnn-seed42/cnn/model.keras --batch-sizes 128 256 512
"""

from __future__ import annotations

import early_signals  # first: a Ctrl-C while the imports below load is one line
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import outputs

from fmnist_keras.cli import in_range

ALLOCATORS = ("glibc's own", "kept (the commands')")
PATHS = ("stock Keras", "fast path")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", metavar="FILE", help="a saved .keras model (default: the untrained default CNN)")
    parser.add_argument("--images", type=in_range(int, 1, 100_000), default=4000, metavar="N",
                        help="images per round (default: 4000)")
    parser.add_argument("--batch-sizes", type=in_range(int, 1, 4096), nargs="+", default=[256], metavar="B",
                        help="predict batch sizes (default: 256, evaluation's)")
    parser.add_argument("--rounds", type=in_range(int, 1, 100), default=3, metavar="R",
                        help="timed rounds (default: 3)")
    parser.add_argument("--json", type=outputs.json_path, metavar="PATH",
                        help="also write the table as JSON")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "ALLOCATOR", "PATH"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(args) -> int:
    """One process: one allocator setting, one path, every batch size; prints JSON."""
    model_file, allocator, path = args.worker
    from fmnist_keras.allocator import keep_freed_memory

    kept = keep_freed_memory() if allocator == ALLOCATORS[1] else False
    from fmnist_keras.backend import select_backend

    select_backend("torch")
    import numpy as np

    from fmnist_keras.cli import one_line
    from fmnist_keras.engine.evaluation import predict_probabilities
    from fmnist_keras.loading import ModelLoadError, input_data_format, load_model
    from fmnist_keras.tta import TTA

    try:
        model = load_model(model_file)
    except ModelLoadError as error:
        print(one_line(error), file=sys.stderr)
        return 1
    shape = (args.images, 28, 28, 1) if input_data_format(model) == "channels_last" else (args.images, 1, 28, 28)
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    tta = TTA(flip=True, shift=True)
    rows = []
    for batch_size in args.batch_sizes:
        times, faults = [], []
        for _ in range(args.rounds + 1):
            before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
            probabilities = predict_probabilities(model, x, tta, batch_size, fast_path=path == PATHS[1])
            times.append(time.perf_counter() - start)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        rows.append({"allocator": allocator, "path": path, "batch_size": batch_size, "settings_set": kept,
                     "images_per_s": round(10 * args.images / statistics.median(times[1:])),
                     "page_faults_per_round": int(statistics.median(faults[1:])),
                     "digest": float(np.sum(probabilities * np.arange(1, 11)))})
    print(json.dumps(rows))
    return 0


def default_model(directory: str) -> str:
    """The untrained default CNN, in the precision train gives it here, saved as train saves it."""
    from fmnist_keras.backend import default_mixed_precision, select_backend

    select_backend("torch")
    from fmnist_keras.engine.recipe import dtype_policy
    from fmnist_keras.models import build_model

    with dtype_policy(default_mixed_precision("torch", "cnn")):
        model = build_model("cnn", data_format="channels_last", seed=0)
    path = os.path.join(directory, "cnn.keras")
    model.save(path)
    return path


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.model is not None:  # a .keras file, or the run directory holding one; a bad one is one line
        from fmnist_keras.loading import resolve_model_path

        args.model = str(resolve_model_path(args.model))
    with tempfile.TemporaryDirectory() as directory:
        model_file = os.path.abspath(args.model) if args.model else default_model(directory)
        rows = []
        for allocator in ALLOCATORS:
            for path in PATHS:
                command = [sys.executable, __file__, "--worker", model_file, allocator, path,
                           "--images", str(args.images), "--rounds", str(args.rounds),
                           "--batch-sizes", *map(str, args.batch_sizes)]
                done = subprocess.run(command, capture_output=True, text=True)
                if done.returncode:
                    last = (done.stderr.strip().splitlines() or ["no message"])[-1]
                    sys.exit(f"error: the {allocator} / {path} process failed: {last}")  # its own line says why
                rows += json.loads(done.stdout.strip().splitlines()[-1])
    digests = {row["batch_size"]: set() for row in rows}
    for row in rows:
        digests[row["batch_size"]].add(row["digest"])
    print(f"{args.images} images x 10 views, {args.rounds} timed rounds, model: {args.model or 'untrained CNN'}")
    print("| allocator | path | batch | images/s | page faults per round |")
    print("| --- | --- | ---: | ---: | ---: |")
    for row in rows:
        allocator = row["allocator"] if row["settings_set"] or row["allocator"] == ALLOCATORS[0] else \
            f"{row['allocator']}, not set here"
        print(f"| {allocator} | {row['path']} | {row['batch_size']} | {row['images_per_s']:,} "
              f"| {row['page_faults_per_round']:,} |")
    same = all(len(found) == 1 for found in digests.values())
    print("same probabilities on every row of a batch size:", "yes" if same else "NO")
    if not same:
        print("error: the paths or allocator settings gave different probabilities at one batch size; the fast "
              "path no longer computes what Keras computes: run tests/test_fastpath.py.", file=sys.stderr)
    if args.json:
        outputs.write_json(args.json, {"rows": rows})
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(outputs.run_benchmark(main, "inference.py"))

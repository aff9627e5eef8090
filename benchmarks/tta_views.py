"""Test-time augmentation with more views: flips and 1-pixel shifts, on saved CNN runs.

For each run directory (one per seed, as ``benchmarks/ablation.py`` or
``train`` writes them) the saved ``cnn/model.keras`` is evaluated on its
run's validation split and on the test set with the probabilities averaged
over several views of each image: the image alone, with its mirror image
(flip TTA), and with copies shifted by one pixel (zero fill, as the training
shifts fill; "flip + shifts x and y" is the CNN's default, ``train``'s).
Choose on the validation column.

Usage:
    python benchmarks/tta_views.py runs/ablation-default/cnn-seed42 runs/ablation-default/cnn-seed1 ...
"""

from __future__ import annotations

import early_signals  # first: a Ctrl-C while the imports below load is one line
import argparse
import json
import os
import sys
from pathlib import Path

import outputs  # benchmarks/ is on sys.path when a script there runs
from fmnist_keras.backend import default_backend
from fmnist_keras.cli import add_data_arguments, non_empty_path

os.environ["KERAS_BACKEND"] = default_backend()  # torch unless $KERAS_BACKEND names one

SHIFTS = {"none": [(0, 0)], "x": [(0, 0), (0, 1), (0, -1)], "x and y": [(0, 0), (0, 1), (0, -1), (1, 0), (-1, 0)],
          "3x3": [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]}
VIEWS = {"image": [(0, 0, False)], "flip": [(0, 0, False), (0, 0, True)]}
VIEWS.update({f"flip + shifts {name}": [(dy, dx, f) for dy, dx in SHIFTS[name] for f in (False, True)]
              for name in ("x", "x and y", "3x3")})


def shifted(x, dy: int, dx: int, flip: bool):
    """NHWC images moved by (dy, dx) pixels with zero fill, then mirrored left to right if ``flip``."""
    from fmnist_keras.tta import mirror_images, shift_images

    moved = shift_images(x, dy, dx)
    return mirror_images(moved) if flip else moved


def evaluate_run(run: Path, raw) -> dict:
    import numpy as np

    from fmnist_keras.config import load_config
    from fmnist_keras.engine.splits import make_splits
    from fmnist_keras.loading import load_model

    config = load_config(run / "cnn" / "config.json").resolved()
    splits = make_splits(raw, config).in_format("channels_last")
    model = load_model(run / "cnn" / "model.keras")
    row = {"run": str(run), "seed": config.seed}
    for split, x, y in (("validation", splits.x_val, splits.y_val), ("test", splits.x_test, splits.y_test)):
        cache = {}
        for name, views in VIEWS.items():
            for view in views:
                if view not in cache:
                    cache[view] = model.predict(shifted(x, *view), batch_size=1000, verbose=0)
            probabilities = np.mean([cache[view] for view in views], axis=0)
            row[f"{name}/{split}"] = float((probabilities.argmax(-1) == y).mean())
    print(json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=non_empty_path, help="run directories holding cnn/model.keras")
    add_data_arguments(parser)
    args = parser.parse_args(argv)
    args.runs = [Path(run) for run in args.runs]  # none empty: Path("") would be ".", the current directory
    missing = [str(run) for run in args.runs if not (run / "cnn" / "model.keras").is_file()]
    if missing:
        parser.error(f"no cnn/model.keras in {', '.join(map(repr, missing))}; give run directories of the cnn")
    models = [(run / "cnn" / "model.keras").resolve() for run in args.runs]
    if len(set(models)) < len(models):  # one run counted twice would look like two that agree
        parser.error("two of the runs given are one run (the same cnn/model.keras); give each run once")
    from ablation import mean_and_spread
    from fmnist_keras.backend import select_backend

    select_backend("torch", "auto")
    from fmnist_keras import data as fdata

    raw = fdata.load_data(args.data_dir, verify=args.verify)
    rows = [evaluate_run(run, raw) for run in args.runs]
    print("| views | validation accuracy | test accuracy | test per run |\n| --- | ---: | ---: | --- |")
    for name in VIEWS:
        cells = [mean_and_spread([row[f"{name}/{split}"] for row in rows]) for split in ("validation", "test")]
        per_run = ", ".join(f"{100 * row[f'{name}/test']:.2f}" for row in rows)
        print(f"| {name} ({len(VIEWS[name])}) | {cells[0]} | {cells[1]} | {per_run} |")
    return 0


if __name__ == "__main__":
    sys.exit(outputs.run_benchmark(main, "tta_views.py"))

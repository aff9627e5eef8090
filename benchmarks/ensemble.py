"""Ensembles of saved models: each model alone, then the mean of their class probabilities.

Each argument is a model directory that ``train`` or ``benchmarks/ablation.py``
wrote (``RUN/cnn-large``, holding ``model.keras`` and ``config.json``), or its
``model.keras``. Every model must come from a run with the same split (split
seed, validation fraction, subset), so that its validation images are held
out from every model of the ensemble; models of different splits are
refused. Runs of different ``--seed`` share a split when they are given the
same ``--split-seed``.
Each model is evaluated with its own test-time augmentation (``--tta run``)
or the one given, and the ensemble averages those probabilities. The table
gives each model alone, the mean of the first k in the order given, and the
ensemble chosen on validation alone by greedy forward selection (Caruana et
al., 2004): the model best alone, then, one at a time, the model that raises
the mean's validation accuracy most, until none raises it. Its test accuracy
is read after the choice and does not inform it.

Usage:
    python benchmarks/ensemble.py runs/a/cnn-large runs/b/cnn-large runs/c/cnn-large
"""

from __future__ import annotations

import early_signals  # first: a Ctrl-C while the imports below load is one line
import argparse
import os
import sys
from pathlib import Path

from fmnist_keras import interrupts
from fmnist_keras.backend import default_backend

os.environ["KERAS_BACKEND"] = default_backend()  # torch unless $KERAS_BACKEND names one

from outputs import json_path, run_benchmark, versions, write_json  # noqa: E402

from fmnist_keras.cli import one_line, print_error  # noqa: E402


class EnsembleError(ValueError):
    """The models cannot be compared on one validation split."""


def split_of(config) -> tuple:
    """What decides a run's validation images: its split seed, validation fraction and subset."""
    return config.splitting_seed, config.val_split, config.subset


def read_models(paths: list[str]) -> list[tuple[Path, object]]:
    """Each model's ``model.keras`` path and its run's config, all of one split.

    Raises:
        EnsembleError: a model is not a run's model.keras, is given twice, has no config.json beside it,
            or the splits differ.
        ModelLoadError, RunDirError: a model or its config.json is missing or damaged.
    """
    from fmnist_keras.config import load_config
    from fmnist_keras.loading import check_archive, resolve_model_path
    from fmnist_keras.rundir import CONFIG_FILE, MODEL_FILE

    models = []
    for given in paths:
        model_path = resolve_model_path(given)
        if model_path.name != MODEL_FILE:  # a copy elsewhere: the config.json beside it may be another run's
            raise EnsembleError(f"{model_path} is not a run's {MODEL_FILE}, so no {CONFIG_FILE} is known to be its "
                                f"own; pass the model directory that train or ablation.py wrote (RUN/cnn-large)")
        check_archive(model_path)
        if any(model_path.resolve() == earlier.resolve() for earlier, _ in models):
            raise EnsembleError(f"{model_path} is given twice; pass each model once")
        config_path = model_path.parent / CONFIG_FILE
        if not config_path.is_file():
            raise EnsembleError(f"{model_path} has no {CONFIG_FILE} beside it, which rebuilds its validation split; "
                                f"pass model directories that train or ablation.py wrote")
        models.append((model_path, load_config(config_path)))
    splits = {split_of(config) for _, config in models}
    if len(splits) > 1:
        named = "; ".join(f"{path}: split seed {config.splitting_seed}, validation {config.val_split}, subset "
                          f"{config.subset}" for path, config in models)
        raise EnsembleError(f"the models were trained on different splits ({named}), so no validation image is held "
                            f"out from all of them; pass models of one split (train them with one --split-seed)")
    return models


def tta_for(config, choice: str):
    """The test-time augmentation that ``--tta CHOICE`` gives a model of the run ``config``: its own for "run"."""
    from fmnist_keras.tta import CHOICES, TTA

    return TTA.of(config) if choice == "run" else CHOICES[choice]


def finite_probabilities(model, model_path, x, tta, fast_path: bool = True):
    """The class probabilities of ``model`` (loaded from ``model_path``) on ``x``, with ``tta``.

    Raises:
        EnsembleError: some are NaN or infinite.
    """
    import numpy as np

    from fmnist_keras.engine.evaluation import predict_probabilities

    probabilities = predict_probabilities(model, x, tta, fast_path=fast_path)
    if not np.isfinite(probabilities).all():
        raise EnsembleError(f"{model_path} gives NaN or infinite outputs, so its weights are damaged; retrain it or "
                            f"leave it out")
    return probabilities


def accuracy(probabilities, labels) -> float:
    return float((probabilities.argmax(-1) == labels).mean())


def choose_on_validation(validation: list, labels) -> list[int]:
    """Greedy forward selection without replacement: the indices of the models whose mean probabilities are
    chosen, in the order chosen. The first is the model best alone; each next one raises the validation accuracy
    of the mean the most, and the choice stops when none raises it. Ties go to the model given first.
    """
    chosen, total, best = [], 0, -1.0
    while True:  # the argmax of the sum is that of the mean
        scores = {k: accuracy(total + p, labels) for k, p in enumerate(validation) if k not in chosen}
        k = max(scores, key=scores.get, default=None)  # max keeps the first of equals: the model given first
        if k is None or scores[k] <= best:
            return chosen
        chosen.append(k)
        total, best = total + validation[k], scores[k]


def evaluate(models, raw, tta_choice: str, fast_path: bool = True) -> tuple[list[dict], dict]:
    """A row per model: its validation and test accuracy alone, and (``mean_so_far``) those of the mean of its
    probabilities and those of the models before it; and the ensemble chosen on validation
    (:func:`choose_on_validation`): its models and their numbers (from 1, in the order given), in the order
    chosen, and its validation and test accuracy.

    Raises:
        EnsembleError: the runs' split does not fit this data, or a model gives NaN or infinite probabilities.
    """
    from fmnist_keras.engine.splits import make_splits
    from fmnist_keras.loading import input_data_format, load_model
    from fmnist_keras.rundir import CONFIG_FILE
    from fmnist_keras.tta import CHOICES

    rows, sums, probabilities_of, labels_of = [], {}, {"validation": [], "test": []}, {}
    for k, (model_path, config) in enumerate(models, start=1):
        interrupts.raise_if_lost()  # a signal kept while the data or the last model loaded
        model = load_model(model_path)
        try:
            splits = make_splits(raw, config.resolved(), input_data_format(model))
        except ValueError as error:
            raise EnsembleError(f"{model_path.parent / CONFIG_FILE} does not rebuild a split of this data ({error}); "
                                f"pass the data the runs were trained on (--data-dir)") from None
        tta = tta_for(config, tta_choice)
        row = {"model": str(model_path), "tta": next(key for key, value in CHOICES.items() if value == tta)}
        for split, x, y in (("validation", splits.x_val, splits.y_val), ("test", splits.x_test, splits.y_test)):
            probabilities = finite_probabilities(model, model_path, x, tta, fast_path)
            probabilities_of[split].append(probabilities)
            labels_of[split] = y
            sums[split] = probabilities + sums.get(split, 0)
            row[split] = accuracy(probabilities, y)
            row.setdefault("mean_so_far", {})[split] = accuracy(sums[split] / k, y)
        print(f"{one_line(model_path)}: validation {100 * row['validation']:.2f}%, test {100 * row['test']:.2f}%",
              flush=True)
        rows.append(row)
        del model
    picks = choose_on_validation(probabilities_of["validation"], labels_of["validation"])
    chosen = {"models": [rows[k]["model"] for k in picks], "numbers": [k + 1 for k in picks]}
    for split, probabilities in probabilities_of.items():
        chosen[split] = accuracy(sum(probabilities[k] for k in picks) / len(picks), labels_of[split])
    return rows, chosen


def format_table(rows: list[dict], chosen: dict) -> str:
    lines = ["| models | validation accuracy | test accuracy |", "| --- | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {one_line(row['model'])} (--tta {row['tta']}) | {100 * row['validation']:.2f}% | "
                     f"{100 * row['test']:.2f}% |")
    for k, row in enumerate(rows, start=1):
        if k > 1:
            mean = row["mean_so_far"]
            lines.append(f"| mean of the first {k} | {100 * mean['validation']:.2f}% | {100 * mean['test']:.2f}% |")
    numbers = chosen["numbers"]
    which = f"the mean of models {', '.join(map(str, numbers))}" if len(numbers) > 1 else f"model {numbers[0]} alone"
    lines.append(f"| chosen on validation: {which} | {100 * chosen['validation']:.2f}% | {100 * chosen['test']:.2f}% |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from fmnist_keras.cli import add_data_arguments, non_empty_path
    from fmnist_keras.tta import CHOICES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=non_empty_path, metavar="MODEL",
                        help="model directories (RUN/cnn-large) or their model.keras files, all of one split")
    parser.add_argument("--tta", choices=["run", *CHOICES], default="run",
                        help="test-time augmentation of every model (default: run, each model's own)")
    add_data_arguments(parser)
    parser.add_argument("--json", type=json_path, metavar="PATH",
                        help="also write the rows and the ensemble chosen on validation as JSON (a new file, or "
                             "an earlier result, which is replaced)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if len(args.models) < 2:
        parser.error("an ensemble needs two models or more")

    from fmnist_keras.backend import select_backend_or_exit

    select_backend_or_exit(parser, None, "auto")
    from fmnist_keras.data import DataError, load_data
    from fmnist_keras.loading import ModelLoadError, exit_code
    from fmnist_keras.rundir import RunDirError

    try:
        models = read_models(args.models)  # every model and config is checked before the data is read
        rows, chosen = evaluate(models, load_data(args.data_dir, verify=args.verify), args.tta)
    except ModelLoadError as error:
        print_error(error)
        return exit_code(error)
    except (EnsembleError, RunDirError, DataError) as error:
        print_error(error)
        return 1
    print(format_table(rows, chosen))
    if args.json:
        write_json(args.json, {"versions": versions(), "rows": rows, "chosen_on_validation": chosen})
        print(f"Wrote {one_line(args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_benchmark(main, "ensemble.py"))

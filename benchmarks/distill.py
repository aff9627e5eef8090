"""Distillation: train one model on its labels mixed with an ensemble's class probabilities.

The teachers are saved models of one validation split, as ``ensemble.py``
takes them (``RUN/cnn-large``). The student is trained on that split exactly
as ``python -m fmnist_keras.train --model MODEL --seed SEED --split-seed S``
trains it (``fit_model`` with its callbacks, a run directory with
``model.keras``, ``config.json``, ``history.csv`` and ``metrics.json``),
except for the training targets: each training image's target is

    (1 - W) * its one-hot label + W * the mean of the teachers' probabilities,

the teachers' probabilities computed once, before training, on the images
without augmentation (the student sees them augmented). Label smoothing
still applies on top, as in train. Validation, EarlyStopping, the checkpoint
and every metric use the labels alone, and the test set is read once, when
the saved student is evaluated at the end, as train does.

Usage:
    python benchmarks/distill.py RUN42/cnn-large RUN1/cnn-large RUN2/cnn-large CNN1/cnn --model cnn-large \\
        --seed 42 --out-dir runs/distill
    python benchmarks/distill.py A/cnn B/cnn --model cnn --epochs 2   # quick, with teachers of train --subset 3000
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")

from outputs import json_path, versions, write_json  # noqa: E402

from fmnist_keras.cli import in_range, one_line, print_error  # noqa: E402
from fmnist_keras.config import RANGES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from fmnist_keras.cli import add_data_arguments, non_empty_path
    from fmnist_keras.tta import CHOICES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teachers", nargs="+", type=non_empty_path, metavar="TEACHER",
                        help="model directories (RUN/cnn-large) of one split, whose mean probabilities teach")
    parser.add_argument("--model", default="cnn-large", choices=["cnn", "cnn-large"],
                        help="the student (default: cnn-large)")
    parser.add_argument("--seed", type=in_range(*RANGES["seed"]), default=42,
                        help="the student's seed; its split is the teachers' (default: 42)")
    parser.add_argument("--teacher-weight", type=in_range(float, 0.0, 1.0), default=0.5, metavar="W",
                        help="weight of the teachers' probabilities in each target, the label's is 1 - W; 0 trains "
                        "as train does (default: 0.5)")
    parser.add_argument("--teacher-tta", choices=["run", *CHOICES], default="flip",
                        help="test-time augmentation of the teachers on the training images; 'run' is each "
                        "teacher's own (flip and shifts for the CNNs: 5 times the passes of flip) (default: flip)")
    parser.add_argument("--epochs", type=in_range(*RANGES["epochs"]), help="epochs (default: the model's)")
    add_data_arguments(parser)
    parser.add_argument("--out-dir", default="runs/distill", metavar="DIR",
                        help="where the student's run directory goes (default: runs/distill)")
    parser.add_argument("--run-name", metavar="NAME",
                        help="the run directory's name (default: MODEL-seedSEED-wW, e.g. cnn-large-seed42-w0.5)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a run directory of the same name (default: refuse)")
    parser.add_argument("--json", type=json_path, metavar="PATH",
                        help="also write the student's metrics and the teachers as JSON (a new file, or an earlier "
                        "result, which is replaced)")
    return parser


def student_config(args, teacher_config):
    """What ``train --model MODEL --seed SEED`` would use, on the teachers' split."""
    from fmnist_keras.config import TrainConfig

    given = {"epochs": args.epochs}
    return TrainConfig(model=args.model, seed=args.seed, split_seed=teacher_config.splitting_seed,
                       val_split=teacher_config.val_split, subset=teacher_config.subset,
                       **{k: v for k, v in given.items() if v is not None}).check()


def teacher_probabilities(teachers, raw, student_splits, tta_choice: str):
    """The mean of the teachers' class probabilities on the student's training images.

    Raises:
        ensemble.EnsembleError: a teacher's split is not the student's, or it gives NaN or infinite outputs.
    """
    import numpy as np

    from ensemble import EnsembleError
    from fmnist_keras.engine.evaluation import predict_probabilities
    from fmnist_keras.engine.splits import make_splits
    from fmnist_keras.loading import input_data_format, load_model
    from fmnist_keras.tta import CHOICES, TTA

    total = 0
    for model_path, config in teachers:
        start = time.perf_counter()
        model = load_model(model_path)
        splits = make_splits(raw, config.resolved(), input_data_format(model))
        if not np.array_equal(splits.y_train, student_splits.y_train):
            raise EnsembleError(f"{model_path} was trained on other images than the student's split; pass teachers "
                                f"of one split")
        tta = TTA.of(config) if tta_choice == "run" else CHOICES[tta_choice]
        probabilities = predict_probabilities(model, splits.x_train, tta)
        if not np.isfinite(probabilities).all():
            raise EnsembleError(f"{model_path} gives NaN or infinite outputs, so its weights are damaged; retrain it "
                                f"or leave it out")
        agreement = float((probabilities.argmax(-1) == splits.y_train).mean())
        print(f"{one_line(model_path)}: {100 * agreement:.2f}% of the training images right (TTA: {tta.name}),"
              f" {time.perf_counter() - start:.0f} s", flush=True)
        total = total + probabilities
        del model
    return total / len(teachers)


def distillation_targets(labels, teacher, weight: float):
    """(1 - weight) * one-hot labels + weight * the teachers' probabilities, as float32."""
    import numpy as np

    one_hot = np.eye(teacher.shape[1], dtype=np.float32)[labels]
    return ((1.0 - weight) * one_hot + weight * teacher).astype(np.float32)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from fmnist_keras.backend import select_backend_or_exit

    select_backend_or_exit(parser, None, "auto")
    from ensemble import EnsembleError, read_models
    from fmnist_keras.data import DataError, load_data
    from fmnist_keras.engine import evaluation, fit
    from fmnist_keras.engine.splits import make_splits
    from fmnist_keras.loading import ModelLoadError, exit_code
    from fmnist_keras.rundir import RunDir, RunDirError, write_json as write_run_json

    run_name = args.run_name if args.run_name is not None else f"{args.model}-seed{args.seed}-w{args.teacher_weight:g}"
    try:  # everything is checked, and the teachers have taught, before the run directory is made
        teachers = read_models(args.teachers)
        config = student_config(args, teachers[0][1])
        RunDir.check_new(args.out_dir, run_name, args.overwrite)
        raw = load_data(args.data_dir, verify=args.verify)
        splits = make_splits(raw, config)
        teacher = teacher_probabilities(teachers, raw, splits, args.teacher_tta)
    except ModelLoadError as error:
        print_error(error)
        return exit_code(error)
    except (EnsembleError, RunDirError, DataError, ValueError) as error:
        print_error(error)
        return 1
    try:
        run = RunDir.create(args.out_dir, run_name, [config.model], args.overwrite)
        start = time.perf_counter()
        targets = distillation_targets(splits.y_train, teacher, args.teacher_weight)
        result = fit.fit_model(config, splits, run, verbose=2, train_targets=targets)
        _, metrics, _ = evaluation.final_metrics(run, config, splits, result.facts)
    except ModelLoadError as error:
        print_error(error)
        return exit_code(error)
    except (RunDirError, evaluation.TrainingInterrupted, evaluation.NonFiniteOutputs) as error:
        print_error(error)
        return 1
    metrics["distillation"] = {
        "teachers": [str(path) for path, _ in teachers], "teacher_weight": args.teacher_weight,
        "teacher_tta": args.teacher_tta,
        "teachers_right_on_training_images": float((teacher.argmax(-1) == splits.y_train).mean()),
    }
    write_run_json(run.metrics_file(config.model), metrics)
    print(f"{one_line(run.model_dir(config.model))}: validation {100 * metrics['validation']['accuracy']:.2f}%, "
          f"test {100 * metrics['test']['accuracy']:.2f}% ({metrics['test_time_augmentation']}), "
          f"{time.perf_counter() - start:.0f} s of training and evaluation", flush=True)
    if args.json:
        write_json(args.json, {"versions": versions(), "metrics": metrics})
        print(f"Wrote {one_line(args.json)}")
    return 0


if __name__ == "__main__":
    from fmnist_keras.interrupts import run_command

    sys.exit(run_command(main, "distill.py"))

"""Distillation: train a model on its labels mixed with an ensemble's class probabilities.

The teachers are saved models of one validation split, as ``ensemble.py``
takes them (``RUN/cnn-large``). Each student (one per seed) is trained on that
split exactly as ``python -m fmnist_keras.train --model MODEL --seed SEED
--split-seed S`` trains it (``fit_model`` with its callbacks, a run directory
with ``model.keras``, ``config.json``, ``history.csv`` and ``metrics.json``),
except for the training targets: each training image's target is

    (1 - W) * its one-hot label + W * the mean of the teachers' probabilities,

the teachers' probabilities computed once, before training, on the images
without the training augmentation (with flip test-time augmentation by
default: the mean over each image and its mirror image); the student sees them
augmented. Label smoothing still applies on top, as in train. The training
loss and accuracy are against the targets; validation, EarlyStopping, the
checkpoint and the evaluation use the labels alone, and the test set is read
once, when the saved student is evaluated at the end, as train does.

Usage:
    python benchmarks/distill.py RUN42/cnn-large RUN1/cnn-large RUN2/cnn-large CNN1/cnn --model cnn-large \\
        --seeds 42 --out-dir runs/distill
    python benchmarks/distill.py RUN42/cnn-large RUN1/cnn-large RUN2/cnn-large CNN1/cnn --model cnn --seeds 42 1 2
    python benchmarks/distill.py A/cnn B/cnn --model cnn --epochs 2   # quick, with teachers of train --subset 3000
"""

from __future__ import annotations

import early_signals  # first: a Ctrl-C while the imports below load is one line
import argparse
import os
import sys
import time
from pathlib import Path

from fmnist_keras import interrupts
from fmnist_keras.backend import default_backend

os.environ["KERAS_BACKEND"] = default_backend()  # torch unless $KERAS_BACKEND names one

from outputs import json_path, repeated_seeds_line, run_benchmark, versions, write_json  # noqa: E402

from fmnist_keras.cli import in_range, one_line, print_error  # noqa: E402
from fmnist_keras.config import RANGES  # noqa: E402

MADE_BY = "benchmarks/distill.py"  # in each student's run.json, so that train --resume refuses to go on with it
ELSEWHERE = "another --out-dir"  # what to choose where a student's run directory is in the way


def build_parser() -> argparse.ArgumentParser:
    from fmnist_keras.cli import add_data_arguments, non_empty_path
    from fmnist_keras.tta import CHOICES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teachers", nargs="+", type=non_empty_path, metavar="TEACHER",
                        help="model directories (RUN/cnn-large) of one split, whose mean probabilities teach")
    parser.add_argument("--model", default="cnn-large", choices=["cnn", "cnn-large"],
                        help="the student (default: cnn-large)")
    parser.add_argument("--seeds", type=in_range(*RANGES["seed"]), nargs="+", default=[42], metavar="SEED",
                        help="train one student per seed, one after another, from one computation of the teachers' "
                        "probabilities; every student's split is the teachers' (default: 42)")
    parser.add_argument("--teacher-weight", type=in_range(float, 0.0, 1.0), default=0.5, metavar="W",
                        help="weight of the teachers' probabilities in each target, the label's is 1 - W; 0 trains "
                        "as train does; up to 0.5 the label stays each target's most probable class, which the "
                        "training accuracy counts (default: 0.5)")
    parser.add_argument("--teacher-tta", choices=["run", *CHOICES], default="flip",
                        help="test-time augmentation of the teachers on the training images; 'run' is each "
                        "teacher's own (flip and shifts for the CNNs: 5 times the passes of flip) (default: flip)")
    parser.add_argument("--epochs", type=in_range(*RANGES["epochs"]), help="epochs (default: the model's)")
    add_data_arguments(parser)
    parser.add_argument("--out-dir", default="runs/distill", metavar="DIR",
                        help="where the students' run directories go, one per seed, named MODEL-seedSEED-wW "
                        "(default: runs/distill)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the students' run directories (OUT_DIR/MODEL-seedSEED-wW) from an earlier "
                        "distill.py (default: refuse)")
    parser.add_argument("--json", type=json_path, metavar="PATH",
                        help="also write each student's metrics, with the teachers, as JSON (a new file, or an earlier "
                        "result, which is replaced)")
    return parser


def student_config(args, seed: int, teacher_config):
    """What ``train --model MODEL --seed SEED`` would use, on the teachers' split."""
    from fmnist_keras.config import TrainConfig, saved_data_dir

    given = {"epochs": args.epochs}
    data_dir = saved_data_dir(args.data_dir)
    return TrainConfig(model=args.model, seed=seed, split_seed=teacher_config.splitting_seed,
                       val_split=teacher_config.val_split, subset=teacher_config.subset, data_dir=data_dir,
                       verify=args.verify, **{k: v for k, v in given.items() if v is not None}).check()


def teacher_probabilities(teachers, student_splits, tta_choice: str):
    """The mean of the teachers' class probabilities on the student's training images (the teachers' own, as
    their split is the student's), and each teacher's test-time augmentation.

    Raises:
        ensemble.EnsembleError: a teacher gives NaN or infinite outputs, or outputs that are not probabilities.
    """
    import numpy as np

    from ensemble import EnsembleError, finite_probabilities, tta_for
    from fmnist_keras.loading import input_data_format, load_model

    total, ttas = 0, []
    for model_path, config in teachers:
        start = time.perf_counter()
        model = load_model(model_path)
        x = student_splits.in_format(input_data_format(model)).x_train
        tta = tta_for(config, tta_choice)
        probabilities = finite_probabilities(model, model_path, x, tta)
        if (probabilities < 0).any() or not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3):
            raise EnsembleError(f"{model_path} does not output class probabilities (rows that sum to 1), so it "
                                f"cannot teach; pass models that train wrote")
        agreement = float((probabilities.argmax(-1) == student_splits.y_train).mean())
        print(f"{one_line(model_path)}: {100 * agreement:.2f}% of the training images right (TTA: {tta.name}),"
              f" {time.perf_counter() - start:.0f} s", flush=True)
        total = total + probabilities
        ttas.append(tta.name)
        del model
    return total / len(teachers), ttas


def distillation_targets(labels, teacher, weight: float):
    """(1 - weight) * one-hot labels + weight * the teachers' probabilities, as float32."""
    import numpy as np

    one_hot = np.eye(teacher.shape[1], dtype=np.float32)[labels]
    return ((1.0 - weight) * one_hot + weight * teacher).astype(np.float32)


def json_left(path: Path | None, finished: int) -> str:
    """What a stopped run left at ``--json PATH``, as the end of its line: the students finished before the stop,
    or, when none had, that an earlier run's file there was left as it was."""
    if path is None:
        return ""
    if finished:
        return f"; {path} holds the {finished} student{'s' if finished > 1 else ''} finished before the stop"
    earlier = " (the file there is an earlier run's)" if os.path.lexists(path) else ""
    return f"; no student finished, so {path} was not written{earlier}"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    from fmnist_keras.backend import select_backend_or_exit

    select_backend_or_exit(parser, None, "auto")
    from ablation import mean_and_spread
    from ensemble import EnsembleError, read_models
    from fmnist_keras.data import DataError, load_data
    from fmnist_keras.engine import evaluation, fit
    from fmnist_keras.engine.splits import make_splits
    from fmnist_keras.interrupts import Interrupted
    from fmnist_keras.loading import ModelLoadError, exit_code
    from fmnist_keras.rundir import RunDir, RunDirError, write_json as write_run_json

    try:  # everything is checked, and the teachers have taught, before a run directory is made
        teachers = read_models(args.teachers)
        configs = [student_config(args, seed, teachers[0][1]) for seed in args.seeds]
        names = [f"{config.model}-seed{config.seed}-w{args.teacher_weight:g}" for config in configs]
        repeated = repeated_seeds_line(args.seeds)  # the seeds name the students' runs
        if repeated:
            raise ValueError(repeated)
        for name in names:
            RunDir.check_new(args.out_dir, name, args.overwrite, elsewhere=ELSEWHERE)
        raw = load_data(args.data_dir, verify=args.verify)
        try:
            splits = make_splits(raw, configs[0])  # one split: every student's is the teachers'
        except ValueError as error:
            raise EnsembleError(f"the teachers' split does not fit this data ({error}); pass the data they were "
                                f"trained on (--data-dir)") from None
        teacher, teacher_ttas = teacher_probabilities(teachers, splits, args.teacher_tta)
    except ModelLoadError as error:
        print_error(error)
        return exit_code(error)
    except (EnsembleError, RunDirError, DataError, ValueError) as error:
        print_error(error)
        return 1
    targets = distillation_targets(splits.y_train, teacher, args.teacher_weight)
    distillation = {
        "teachers": [str(path) for path, _ in teachers], "teacher_weight": args.teacher_weight,
        "teacher_tta": teacher_ttas,
        "teachers_right_on_training_images": float((teacher.argmax(-1) == splits.y_train).mean()),
    }
    students = []
    for config, name in zip(configs, names):
        run = None
        try:
            interrupts.raise_if_lost()  # a signal kept while the teachers predicted, or the last student was evaluated
            run = RunDir.create(args.out_dir, name, [config.model], args.overwrite, made_by=MADE_BY,
                                elsewhere=ELSEWHERE)
            start = time.perf_counter()
            result = fit.fit_model(config, splits, run, verbose=2, train_targets=targets)
            _, metrics, _ = evaluation.final_metrics(run, config, splits, result.facts)
        except KeyboardInterrupt as error:
            stop = Interrupted.of(error)
            target = Path(args.out_dir) / name  # made, or half made (a stop inside RunDir.create), or not yet
            left = (f"{target} holds a partial student, which train --resume refuses (it would go on without the "
                    f"teachers); run distill.py again with --overwrite" if run is not None or os.path.lexists(target)
                    else f"before {target} was started; run distill.py again{' with --overwrite' if students else ''}")
            print(f"distill.py: interrupted ({stop}); {left}{json_left(args.json, len(students))}.", file=sys.stderr)
            return stop.exit_code
        except ModelLoadError as error:
            print_error(error)
            return exit_code(error)
        except (RunDirError, evaluation.TrainingInterrupted, evaluation.NonFiniteOutputs) as error:
            print_error(error)
            return 1
        metrics["distillation"] = distillation
        write_run_json(run.metrics_file(config.model), metrics)
        print(f"{one_line(run.model_dir(config.model))}: validation {100 * metrics['validation']['accuracy']:.2f}%, "
              f"test {100 * metrics['test']['accuracy']:.2f}% ({metrics['test_time_augmentation']}), "
              f"{time.perf_counter() - start:.0f} s of training and evaluation", flush=True)
        students.append(metrics)
        if args.json:  # after every student, so that an interrupted run keeps the students before it
            write_json(args.json, {"versions": versions(), "students": students})
    if len(students) > 1:
        for split in ("validation", "test"):
            print(f"{split}: {mean_and_spread([m[split]['accuracy'] for m in students])} over seeds "
                  f"{' '.join(map(str, args.seeds))}")
    if args.json:
        print(f"Wrote {one_line(args.json)}")
    return 0


if __name__ == "__main__":
    sys.exit(run_benchmark(main, "distill.py"))

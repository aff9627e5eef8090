"""Evaluate a saved model on the official test set and regenerate its report.

Usage:
    python -m fmnist_keras.evaluate RUN_DIR_OR_MODEL.keras [--validation] [--image-index N] ...

Writes ``evaluation.json`` (the same metrics ``train`` writes to
``metrics.json``: loss, accuracy, macro-F1, per-class precision, recall and
accuracy, confusion matrix) and ``report.md`` with its figures, by default
into the run's model directory, or ``NAME-evaluation/`` beside a model file
``NAME.keras`` outside a run (:func:`check_outputs` says where else). A
``.keras`` file saved under any backend loads under any other. Keras is
imported only after the arguments are parsed and the backend is chosen, so
``--help`` is instant.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fmnist_keras.allocator import keep_freed_memory
from fmnist_keras.backend import add_backend_arguments
from fmnist_keras.cli import (MODEL_HELP, add_data_arguments, add_fast_path_argument, add_tta_argument,
                              escape_unencodable_output, in_range, non_empty_path, one_line, print_error, run_tta)
from fmnist_keras.rundir import (CONFIG_FILE, EPOCH_OR_NONE, EVALUATION_FILE, FIGURES_DIR, METRICS_FILE, MODEL_FILE,
                                 OUTPUT_MARKER, REPORT_FILE, TEXT, RunDirError, check_fields, exists_or_link,
                                 first_entry_not_among, is_finite_number, is_marker, is_model_dir,
                                 not_a_directory_line, output_in_the_way, read_json_object, temporaries_of, write_json)

# Run files are a few kB; anything much larger is not one, and is not read.
class RunFileError(ValueError):
    """A path given to evaluate cannot be used (an --out-dir blocked by a file)."""


def read_run_config(path: Path):
    """The run's :class:`~fmnist_keras.config.TrainConfig`, checked (:func:`fmnist_keras.config.load_config`)."""
    from fmnist_keras.config import load_config

    return load_config(path)


def read_run_metrics(path: Path) -> dict:
    """The facts ``train`` wrote to ``metrics.json`` that the report shows, types checked."""
    fix = "rewrite it with train, or delete it (it is only read for the report's title and facts)"
    data = read_json_object(path, "the run's metrics", fix)
    check_fields(path, data, {"model": TEXT, "best_epoch": EPOCH_OR_NONE,
                              "validation": (_split_metrics, "the metrics of a split")}, fix, required=False)
    return data


def _split_metrics(value) -> bool:
    """Whether ``value`` has the numbers of one split that the report's table shows."""
    return (isinstance(value, dict) and isinstance(value.get("num_examples"), int)
            and is_finite_number(value.get("accuracy")) and is_finite_number(value.get("macro_f1"))
            and (value.get("loss") is None or is_finite_number(value.get("loss"))))


def check_out_dir(out_dir: Path) -> None:
    """Refuse an --out-dir that is a file or lies below one, before anything is computed.

    Raises:
        RunFileError: naming the file in the way.
    """
    problem = not_a_directory_line("--out-dir", out_dir, "choose another --out-dir")
    if problem is not None:
        raise RunFileError(problem)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fmnist_keras.evaluate",
        description="Evaluate a trained model on the official Fashion-MNIST test set and write its report.",
        epilog=(
            "Examples:\n"
            "  python -m fmnist_keras.evaluate runs/20261129-143000/cnn\n"
            "  python -m fmnist_keras.evaluate model.keras --validation --image-index 7 --out-dir eval/\n"
            "  python -m fmnist_keras.evaluate runs/latest/cnn --layers block1_conv1 block2_relu2 --backend jax"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="RUN_DIR_OR_MODEL", help=MODEL_HELP)
    add_data_arguments(parser)
    parser.add_argument("--validation", action="store_true",
                        help="also evaluate on the run's validation split, rebuilt from its config.json (default: off)")
    parser.add_argument("--image-index", type=in_range(int, 0, 10**9), metavar="N",
                        help="test image whose feature maps the report shows (default: a fixed, seeded one)")
    parser.add_argument("--layers", nargs="+", metavar="LAYER",
                        help="layers whose feature maps to draw (default: each convolution's activated output)")
    parser.add_argument("--out-dir", metavar="DIR", type=non_empty_path,
                        help="where evaluation.json, report.md and figures/ go: a new or empty directory, or one "
                             "evaluate wrote (default: the run's model directory; for a model file outside a run, "
                             "NAME-evaluation/ beside NAME.keras)")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="only compute and write the metrics, draw no figures (default: write the report)")
    parser.add_argument("--seed", type=in_range(int, 0, 2**32 - 1, "numpy seeds"), default=0,
                        help="seed for the images the report samples and explains (default: 0)")
    add_tta_argument(parser)
    add_fast_path_argument(parser)
    add_backend_arguments(parser)
    return parser


def default_out_dir(model_path: Path) -> Path:
    """Where evaluate writes when no --out-dir is given: the run's model directory for the ``model.keras`` a run
    holds, else a directory of its own beside the model file (``fashion.keras`` -> ``fashion-evaluation/``)."""
    if _is_runs_own(model_path.parent, model_path):
        return model_path.parent
    return model_path.with_name(f"{model_path.stem}-evaluation")


def _is_runs_own(out_dir: Path, model_path: Path) -> bool:
    """Whether ``out_dir`` is a run's model directory and ``model_path`` its ``model.keras`` (links followed)."""
    return is_model_dir(out_dir) and Path(model_path).resolve() == out_dir.resolve() / MODEL_FILE


def check_outputs(out_dir: Path, model_path: Path) -> bool:
    """Refuse to write where evaluate would replace or follow what is not its own.

    Called before anything is computed, and again just before evaluate writes. ``out_dir`` must be one of:

    - the run's model directory whose ``model.keras`` is evaluated: train created it, and its report is that
      model's;
    - a directory that does not exist yet, or an empty one: evaluate marks it as its own (:data:`OUTPUT_MARKER`);
    - a directory evaluate marked that holds nothing but evaluate's outputs (``evaluation.json``, ``report.md``,
      ``figures/`` of regular files, and the temporary files a killed evaluate left): evaluate replaces them.

    So a user's directory that holds anything else, or a run's model directory for another model, is refused,
    and no file of a user's is ever replaced. ``evaluation.json``, ``report.md``, ``figures/`` and the entries of
    ``figures/`` must not be links.

    Returns:
        Whether ``out_dir`` is the run's model directory (which needs no :data:`OUTPUT_MARKER`).

    Raises:
        RunFileError: naming the path and how to fix it.
    """
    fix = "choose another --out-dir (a new or empty directory)"
    in_run = _is_runs_own(out_dir, model_path)
    if not in_run and is_model_dir(out_dir):
        raise RunFileError(f"{out_dir} is a run's model directory, whose report is that of its own {MODEL_FILE}, "
                           f"not of {model_path}; {fix}.")
    problem = output_in_the_way(out_dir, (EVALUATION_FILE, REPORT_FILE), "evaluate", fix)
    if problem is not None:
        raise RunFileError(problem)
    if in_run or not out_dir.is_dir():
        return in_run
    entries = sorted(out_dir.iterdir())
    if entries and not is_marker(out_dir.resolve() / OUTPUT_MARKER):
        raise RunFileError(f"{out_dir} holds files evaluate did not write ({entries[0].name} first), and is not a "
                           f"run's model directory; evaluate writes only into a directory of its own; {fix}.")
    outputs = (OUTPUT_MARKER, EVALUATION_FILE, REPORT_FILE)
    left_behind = [temporaries_of(name) for name in outputs]  # what a killed evaluate left
    foreign = first_entry_not_among(out_dir, outputs, (FIGURES_DIR,), left_behind)
    if foreign is not None:
        raise RunFileError(f"{foreign} is not an output of evaluate, in {out_dir}, a directory evaluate marked "
                           f"as its own; move it out of there, or {fix}.")
    return in_run


def _fail(message: str) -> int:
    print_error(message)
    return 1


def format_metrics(name: str, metrics: dict) -> str:
    """Overall numbers, then one line per class."""
    lines = [
        f"{name}: {metrics['num_examples']} images, loss {metrics['loss']:.4f}, "
        f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f}",
        f"  {'class':<13}{'precision':>10}{'recall':>8}{'F1':>8}",
    ]
    for cls, row in metrics["per_class"].items():
        lines.append(f"  {cls:<13}{row['precision']:>10.4f}{row['recall']:>8.4f}{row['f1']:>8.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    escape_unencodable_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()

    from fmnist_keras.backend import describe_device, select_backend_or_exit

    backend = select_backend_or_exit(parser, args.backend, args.device)

    if args.out_dir:
        try:
            check_out_dir(Path(args.out_dir))
        except RunFileError as error:
            parser.error(one_line(error))

    from fmnist_keras import data as fdata
    from fmnist_keras.loading import (ModelLoadError, exit_code, input_data_format, load_model, model_home,
                                      resolve_model_path)

    try:
        model_path = resolve_model_path(args.model, lambda note: print(note, file=sys.stderr))
        model = load_model(model_path)
    except ModelLoadError as error:
        print_error(error)
        return exit_code(error)
    run_dir = model_home(model_path)  # where its config.json and metrics.json are, a link followed
    out_dir = Path(args.out_dir) if args.out_dir else default_out_dir(model_path)
    config_path, metrics_path = run_dir / CONFIG_FILE, run_dir / METRICS_FILE
    try:
        check_out_dir(out_dir)  # the default too: NAME-evaluation may be a file
        out_dir_in_run = check_outputs(out_dir, model_path)
    except RunFileError as error:
        return _fail(str(error))
    try:  # damaged run files are reported before the data is read
        config = read_run_config(config_path) if args.validation and config_path.is_file() else None
        trained = read_run_metrics(metrics_path) if args.report and metrics_path.is_file() else {}
        tta = run_tta(args.tta, run_dir)
    except RunDirError as error:
        return _fail(str(error))

    from fmnist_keras.inspection import internals

    other_model = False  # the run files beside the model are another model's
    if trained:
        from fmnist_keras.inspection.report import other_params

        recorded = other_params(model, trained)
        if recorded is not None:
            print(one_line(f"note: {metrics_path} describes a model of {recorded:,} parameters, not {model_path} "
                           f"({model.count_params():,}); the report leaves out its facts and training curves "
                           f"(--tta run and --validation still read {config_path.name} there)."),
                  file=sys.stderr)
            trained, other_model = {}, True
    try:
        if args.layers and args.report:
            internals.check_feature_layers(model, args.layers)
        raw, source = fdata.load_data(args.data_dir, verify=args.verify, return_source=True)
        if args.image_index is not None:
            internals.check_image_index(args.image_index, len(raw[1][0]))
    except ValueError as error:  # DataError is a ValueError
        return _fail(str(error))

    from fmnist_keras.engine import evaluation, splits as engine_splits

    data_format = input_data_format(model)
    (x_train_raw, y_train_raw), (x_test_raw, y_test_raw) = raw
    x_test, y_test = fdata.to_model_input(x_test_raw, data_format), y_test_raw.astype("int64")
    try:
        test_probabilities = evaluation.predict_probabilities(model, x_test, tta, fast_path=args.fast_path)
        test = evaluation.score(test_probabilities, y_test, model.name)
    except evaluation.NonFiniteOutputs:
        return _fail(f"{model_path} gives NaN or infinite outputs on the test set; the model is damaged "
                     f"(NaN weights?); retrain it or use another model.")
    result = {"model_path": str(model_path), "backend": backend, "device": describe_device(),
              "data_source": str(source), "test_time_augmentation": tta.name, "test": test}
    x_train, y_train = fdata.to_model_input(x_train_raw, data_format), y_train_raw
    if args.validation:
        if config is None:
            return _fail(f"--validation needs {config_path}, which rebuilds the run's split (split seed, "
                         f"val_split, subset); pass a run directory written by train, or drop --validation.")
        try:
            splits = engine_splits.make_splits(raw, config, data_format)
        except ValueError as error:
            return _fail(f"{config_path} does not rebuild a split of this data ({error}); rewrite it with train, "
                         f"or drop --validation.")
        result["validation"] = evaluation.evaluate(model, splits.x_val, splits.y_val, tta, fast_path=args.fast_path)
        x_train, y_train = splits.x_train, splits.y_train

    try:
        if not exists_or_link(out_dir):
            out_dir.parent.mkdir(parents=True, exist_ok=True)
            out_dir.mkdir()  # not exist_ok: a directory that appeared meanwhile is not evaluate's
        check_outputs(out_dir, model_path)  # again: what appeared while the model was evaluated
        if not out_dir_in_run:
            write_json(out_dir / OUTPUT_MARKER, {"written_by": "fmnist_keras.evaluate"})
        write_json(out_dir / EVALUATION_FILE, result)
    except FileExistsError:
        return _fail(f"{out_dir} appeared while the model was evaluated; it is left alone; choose another --out-dir.")
    except RunFileError as error:
        return _fail(f"while the model was evaluated, {error}")
    except OSError as error:
        return _fail(f"cannot write {out_dir / EVALUATION_FILE} ({error.strerror}); choose another --out-dir.")
    except ValueError as error:  # allow_nan=False: a NaN metric is no result to save
        return _fail(f"the metrics of {model_path} are not finite ({error}); the model is damaged; retrain it.")
    print(f"Model: {model_path} (backend {backend} on {result['device']})")
    print(f"Data: {source}{'' if args.verify else ', digests NOT checked (--no-verify)'}")
    print(f"Test-time augmentation: {result['test_time_augmentation']}")
    print(format_metrics("test", result["test"]))
    if "validation" in result:
        print(format_metrics("validation", result["validation"]))
    print(one_line(f"Wrote {out_dir / EVALUATION_FILE}"))

    if args.report:
        from fmnist_keras.inspection.report import write_report

        # The run's facts (training backend, best epoch, ...) with the metrics just computed.
        computed = ("test", "validation", "test_time_augmentation")
        metrics = {**result, **trained, **{k: result[k] for k in computed if k in result}}
        try:
            check_outputs(out_dir, model_path)  # again, as the report and its figures are about to be written
        except RunFileError as error:
            return _fail(f"while the model was evaluated, {error}")
        report = write_report(run_dir, x_test, y_test, model=model, metrics=metrics, x_train=x_train,
                              y_train=y_train, out_dir=out_dir, image_index=args.image_index, layers=args.layers,
                              seed=args.seed, test_probabilities=test_probabilities, curves=not other_model)
        print(one_line(f"Wrote {report} and its figures in {report.parent / 'figures'}"))
    return 0


if __name__ == "__main__":
    from fmnist_keras.interrupts import run_command

    sys.exit(run_command(main, "evaluate"))

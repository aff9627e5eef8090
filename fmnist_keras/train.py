"""Train the MLP and/or the CNN on Fashion-MNIST and save evaluated models.

Usage:
    KERAS_BACKEND=torch python -m fmnist_keras.train [--model {mlp,cnn,baseline-cnn,all}] ...

Each invocation writes one run directory, ``OUT_DIR/RUN_NAME/``, with one
sub-directory per model holding ``model.keras``, ``history.csv``,
``config.json`` and ``metrics.json``. Keras is imported only after the
arguments are parsed and the backend is chosen, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from fmnist_keras.backend import add_backend_arguments
from fmnist_keras.cli import (
    add_data_arguments,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from fmnist_keras.config import DATA_FORMATS, MODEL_DEFAULTS, MODEL_NAMES, TrainConfig

DEFAULTS = TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    per_model = ", ".join(f"{m}: {d['epochs']}" for m, d in MODEL_DEFAULTS.items())
    per_model_lr = ", ".join(f"{m}: {d['learning_rate']:g}" for m, d in MODEL_DEFAULTS.items())
    parser = argparse.ArgumentParser(
        prog="python -m fmnist_keras.train",
        description="Train Keras models on Fashion-MNIST and save them, evaluated on the official test set.",
        epilog=(
            "Examples:\n"
            "  KERAS_BACKEND=torch python -m fmnist_keras.train\n"
            "  python -m fmnist_keras.train --model cnn --epochs 3 --subset 6000\n"
            "  python -m fmnist_keras.train --backend jax --model mlp\n"
            "  torchrun --nproc_per_node 2 -m fmnist_keras.train --model cnn   (data-parallel, torch)\n"
            "Data is looked for in --data-dir or $FMNIST_DATA_DIR, then the Keras cache\n"
            "(~/.keras/datasets/fashion-mnist), then /usr/share/datasets/fashion-mnist\n"
            "(apt-get install dataset-fashion-mnist), then downloaded from the Keras mirror."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", choices=(*MODEL_NAMES, "all"), default="all",
        help="which model to train; 'all' trains the MLP and the CNN so you can compare them "
        "(the MLP adds a few minutes) (default: all)",
    )
    parser.add_argument("--epochs", type=positive_int, metavar="N",
                        help=f"maximum epochs; EarlyStopping may stop sooner (default per model: {per_model})")
    parser.add_argument("--batch-size", type=positive_int, default=DEFAULTS.batch_size, metavar="N",
                        help=f"training batch size (default: {DEFAULTS.batch_size})")
    parser.add_argument("--learning-rate", type=positive_float, metavar="LR",
                        help=f"peak AdamW learning rate of the warm-up + cosine schedule (default per model: {per_model_lr})")
    parser.add_argument("--weight-decay", type=non_negative_float, default=DEFAULTS.weight_decay, metavar="WD",
                        help=f"AdamW weight decay (default: {DEFAULTS.weight_decay:g})")
    parser.add_argument("--label-smoothing", type=non_negative_float, default=DEFAULTS.label_smoothing, metavar="E",
                        help=f"label smoothing of the cross-entropy loss (default: {DEFAULTS.label_smoothing:g})")
    parser.add_argument("--patience", type=non_negative_int, default=DEFAULTS.patience, metavar="N",
                        help=f"EarlyStopping patience in epochs, on validation loss (default: {DEFAULTS.patience})")
    parser.add_argument("--val-split", type=fraction, default=DEFAULTS.val_split, metavar="F",
                        help=f"stratified fraction of the training set used for validation (default: {DEFAULTS.val_split:g})")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed,
                        help=f"seed for the split, weights, shuffling and augmentation (default: {DEFAULTS.seed})")
    parser.add_argument("--subset", type=positive_int, metavar="N",
                        help="train on a stratified subset of N training images, for quick runs (default: all 60000)")
    add_data_arguments(parser)
    parser.add_argument("--out-dir", default="runs", metavar="DIR", help="where run directories go (default: runs)")
    parser.add_argument("--run-name", metavar="NAME",
                        help="name of this run's directory under --out-dir (default: date and time, e.g. 20261129-143000)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing run directory of the same name (default: refuse)")
    add_backend_arguments(parser)
    parser.add_argument("--mixed-precision", action="store_true",
                        help="compute in bfloat16 (CPU) or float16 (GPU), keep float32 weights and outputs "
                        "(default: off)")
    parser.add_argument("--data-format", choices=DATA_FORMATS, default=DEFAULTS.data_format,
                        help="image layout while training; 'auto' is channels_last (channels_first on torch with "
                        "--no-fast-path); the saved model is channels_last either way (default: auto)")
    parser.add_argument("--no-fast-path", dest="fast_path", action="store_false",
                        help="torch: train with stock Keras instead of the fast path (zero-copy layouts, batched "
                        "augmentation, fused BatchNorm and AdamW; same results, see README 'Speed'); for "
                        "comparisons and debugging (default: fast path on)")
    parser.add_argument("--distribute", action="store_true",
                        help="jax: data-parallel over all local devices (keras.distribution.DataParallel); on torch "
                        "launch with torchrun --nproc_per_node N instead (default: off)")
    parser.add_argument("--dist-timeout", type=positive_float, default=300, metavar="S",
                        help="distributed runs: seconds a process waits for the others (rendezvous and every "
                        "collective) before failing instead of hanging (default: 300)")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="skip report.md and its figures in each model's run directory (default: write them)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue an interrupted run from its last completed epoch, with its saved "
                        "configuration (other training flags are not allowed with it)")
    return parser


def configs_from_args(args: argparse.Namespace, backend: str) -> list[TrainConfig]:
    """One TrainConfig per model to train; CLI flags map one to one onto fields."""
    models = ("mlp", "cnn") if args.model == "all" else (args.model,)
    shared = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    shared.update(backend=backend)
    return [TrainConfig(**{**shared, "model": name}) for name in models]


def prepare_run_dir(out_dir: str, run_name: str | None, overwrite: bool) -> Path:
    """Create ``out_dir/run_name``; refuse to reuse an existing one unless asked."""
    run_dir = Path(out_dir) / (run_name or time.strftime("%Y%m%d-%H%M%S"))
    if run_dir.exists():
        if not overwrite:
            raise FileExistsError(
                f"run directory {run_dir} already exists; choose another --run-name or pass --overwrite."
            )
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True)
    except OSError as error:
        raise OSError(f"cannot create run directory {run_dir}: {error.strerror}; choose another --out-dir.") from None
    return run_dir


RUN_FILE = "run.json"
# Flags that describe a run; --resume takes them from the run directory instead.
_RUN_FLAGS = ("model", "epochs", "batch_size", "learning_rate", "weight_decay", "label_smoothing", "patience",
              "val_split", "seed", "subset", "data_dir", "verify", "out_dir", "run_name", "overwrite",
              "mixed_precision", "data_format", "fast_path")


def resume_configs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> tuple[Path, list[TrainConfig]]:
    """The run directory and saved per-model configurations of ``--resume RUN_DIR``."""
    option = {action.dest: action.option_strings[-1] for action in parser._actions if action.option_strings}
    given = [option[name] for name in _RUN_FLAGS if getattr(args, name) != parser.get_default(name)]
    if given:
        parser.error(f"--resume continues a run with its saved configuration; drop {', '.join(given)}.")
    run_dir = Path(args.resume)
    run_file = run_dir / RUN_FILE
    if not run_file.is_file():
        hint = f" (did you mean {run_dir.parent}?)" if (run_dir.parent / RUN_FILE).is_file() else ""
        parser.error(f"--resume {run_dir}: no {RUN_FILE} there, so it is not a run directory of this tool{hint}.")
    models = json.loads(run_file.read_text())["models"]
    configs = []
    for model in models:
        config_file = run_dir / model / "config.json"
        configs.append(TrainConfig.from_json(config_file.read_text()) if config_file.exists() else None)
    first = next(c for c in configs if c is not None)
    return run_dir, [c or dataclasses.replace(first, model=m) for c, m in zip(configs, models)]


def point_latest_at(run_dir: Path) -> None:
    """Make ``OUT_DIR/latest`` a symlink to the newest run (a real directory of that name is left alone)."""
    latest = run_dir.parent / "latest"
    if latest.exists() and not latest.is_symlink():
        return
    temporary = run_dir.parent / ".latest.tmp"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(run_dir.name)
    temporary.replace(latest)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        run_dir, configs = resume_configs(parser, args)
        requested_backend = args.backend or configs[0].backend
    else:
        run_dir, configs, requested_backend = None, None, args.backend

    from fmnist_keras.backend import BackendError, select_backend

    try:
        backend = select_backend(requested_backend, args.device)
    except BackendError as error:
        parser.error(str(error))
    if configs is None:
        configs = configs_from_args(args, backend)

    from fmnist_keras import distributed

    try:
        if args.resume and (args.distribute or distributed.launched_by_torchrun()):
            raise distributed.DistributedError("--resume of a distributed run is not supported; resume it in one process.")
        replicas = distributed.setup(backend, args.distribute, configs[0].batch_size, args.dist_timeout)
    except distributed.DistributedError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        return _train_all(parser, args, configs, run_dir, backend, replicas)
    finally:
        distributed.shutdown(replicas)


def _train_all(parser, args, configs, run_dir, backend, replicas) -> int:
    """Load the data, split it, train each model; rank 0 alone prints and writes."""
    from fmnist_keras import data as fdata
    from fmnist_keras.backend import describe_device, is_out_of_memory

    say = print if replicas.is_chief else (lambda *_, **__: None)

    try:
        raw, source = fdata.load_data(configs[0].data_dir, verify=configs[0].verify, return_source=True)
    except fdata.DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    from fmnist_keras import training

    # Every model of a run shares the split (same seed, --val-split and --subset).
    try:
        data_format = training.data_format_of(configs[0])
    except ValueError as error:
        parser.error(str(error))
    try:
        splits = training.make_splits(raw, configs[0], data_format)
    except ValueError as error:
        parser.error(f"--subset {configs[0].subset} / --val-split {configs[0].val_split}: {error}")
    if run_dir is None and replicas.is_chief:
        try:
            run_dir = prepare_run_dir(args.out_dir, args.run_name, args.overwrite)
        except (FileExistsError, OSError) as error:
            parser.error(str(error))
        (run_dir / RUN_FILE).write_text(json.dumps({"models": [c.model for c in configs]}) + "\n")
        point_latest_at(run_dir)

    import keras

    from fmnist_keras.metrics import format_summary

    device = describe_device()
    say(f"Backend: {backend} (keras {keras.__version__}), device: {device}")
    if replicas.mode != "single":
        say(
            f"Data parallel ({replicas.mode}): {replicas.world_size} replicas {', '.join(replicas.devices)}; "
            f"global batch {configs[0].batch_size}, {configs[0].batch_size // replicas.world_size} per replica"
        )
    say(f"Data: {source}{'' if configs[0].verify else ', digests NOT checked (--no-verify)'}")
    say(f"Run directory: {run_dir}{' (resuming)' if args.resume else ''}")
    summaries = []
    for config in configs:
        model_dir = run_dir / config.model if replicas.is_chief else None
        if args.resume and (model_dir / training.METRICS_FILE).exists():
            print(f"\n== {config.model}: already finished, kept as it is")
            summaries.append(json.loads((model_dir / training.METRICS_FILE).read_text()))
            continue
        resolved = config.resolved()
        say(
            f"\n== {config.model}: {len(splits.x_train)} train / {len(splits.x_val)} validation / "
            f"{len(splits.x_test)} test images, up to {resolved.epochs} epochs, batch {resolved.batch_size}, "
            f"peak learning rate {resolved.learning_rate:g}"
        )
        start = time.perf_counter()
        try:
            metrics = training.train(config, splits, model_dir, resume=bool(args.resume), replicas=replicas)
        except KeyboardInterrupt:
            print(
                f"\nInterrupted. {run_dir} keeps every completed epoch; continue with:\n"
                f"  python -m fmnist_keras.train --resume {run_dir}",
                file=sys.stderr,
            )
            return 130
        except training.TrainingInterrupted as error:
            print(f"error: {config.model}: {error}", file=sys.stderr)
            return 1
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            print(
                f"error: {config.model}: out of memory on {device} with --batch-size {config.batch_size}; "
                f"try --batch-size {max(1, config.batch_size // 2)}.",
                file=sys.stderr,
            )
            return 1
        if not replicas.is_chief:
            continue
        metrics.update(
            backend=backend, device=device, data_source=str(source), wall_time_s=round(time.perf_counter() - start, 2)
        )
        training.write_metrics(model_dir, metrics)
        summaries.append(metrics)
        if args.report:
            from fmnist_keras.report import write_report

            portable = splits.in_format("channels_last")  # the layout of the saved model
            report = write_report(model_dir, portable.x_test, portable.y_test, metrics=metrics,
                                  x_train=portable.x_train, y_train=portable.y_train)
            print(f"Report: {report}")
        print(f"Saved {model_dir / training.MODEL_FILE}; test accuracy {metrics['test']['accuracy']:.4f}")
    say(f"\nTest-set results ({backend} on {device}); run directory {run_dir}")
    say(format_summary(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())

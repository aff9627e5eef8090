"""Train the MLP and/or the CNN on Fashion-MNIST and save evaluated models.

Usage:
    KERAS_BACKEND=torch python -m fmnist_keras.train [--model {mlp,cnn,cnn-large,baseline-cnn,all}] ...

Each invocation writes one run directory, ``OUT_DIR/RUN_NAME/``, with one
sub-directory per model holding ``model.keras``, ``history.csv``,
``config.json`` and ``metrics.json``. Keras is imported only after the
arguments are parsed and the backend is chosen, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import os
import shlex
import signal
import sys
import threading
import time
import traceback
from typing import NoReturn

from fmnist_keras.allocator import keep_freed_memory
from fmnist_keras.backend import add_backend_arguments, launched_by_torchrun
from fmnist_keras.cli import (add_data_arguments, escape_unencodable_output, in_range, one_line, os_error_line,
                              print_error)
from fmnist_keras.config import (
    BFLOAT16_BY_DEFAULT, DATA_FORMATS, MODEL_DEFAULTS, MODEL_NAMES, PER_MODEL, RANGES, TrainConfig, load_config,
    saved_data_dir,
)
from fmnist_keras import interrupts
from fmnist_keras.interrupts import Interrupted
from fmnist_keras.rundir import OTHER_MAKERS, REPORT_FILE, RunDir, RunDirError, write_json

DEFAULTS = TrainConfig()


def _checked(field: str):
    """The argparse type of ``field``'s flag: its type and range from config.RANGES."""
    return in_range(*RANGES[field])


def _per_model(field: str) -> str:
    """Each model's default of ``field``, for --help: "mlp: 20, cnn: 24, ..."."""
    return ", ".join(f"{model}: {defaults[field]:g}" for model, defaults in MODEL_DEFAULTS.items())


def _bfloat16_defaults() -> str:
    """``cnn and cnn-large with torch, and cnn with tensorflow``: where ``--mixed-precision`` is on by default."""
    return ", and ".join(f"{' and '.join(models)} with {backend}" for backend, models in BFLOAT16_BY_DEFAULT.items())


def build_parser() -> argparse.ArgumentParser:
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
    parser.add_argument("--epochs", type=_checked("epochs"), metavar="N",
                        help="maximum epochs; EarlyStopping may stop sooner (default per model: "
                        f"{_per_model('epochs')})")
    parser.add_argument("--batch-size", type=_checked("batch_size"), default=DEFAULTS.batch_size, metavar="N",
                        help=f"training batch size (default: {DEFAULTS.batch_size})")
    parser.add_argument("--learning-rate", type=_checked("learning_rate"), metavar="LR",
                        help="peak AdamW learning rate of the warm-up + cosine schedule (default per model: "
                        f"{_per_model('learning_rate')})")
    parser.add_argument("--weight-decay", type=_checked("weight_decay"), metavar="WD",
                        help=f"AdamW decoupled weight decay (default per model: {_per_model('weight_decay')})")
    parser.add_argument("--label-smoothing", type=_checked("label_smoothing"), default=DEFAULTS.label_smoothing, metavar="E",
                        help=f"label smoothing of the cross-entropy loss (default: {DEFAULTS.label_smoothing:g})")
    emas = {d["ema"] for d in MODEL_DEFAULTS.values()}
    per_model_ema = f"{emas.pop():g}" if len(emas) == 1 else "per model: " + _per_model("ema")
    flipped = ", ".join(m for m, d in MODEL_DEFAULTS.items() if d["flip_tta"])
    shifted = ", ".join(m for m, d in MODEL_DEFAULTS.items() if d["shift_tta"])
    parser.add_argument("--ema", type=_checked("ema"), metavar="M",
                        help="keep a moving average of the weights with momentum M (capped so that it spans at "
                        "most a tenth of the run) and validate, checkpoint and save the average, e.g. 0.999; 0 "
                        f"turns it off (default: {per_model_ema})")
    parser.add_argument("--cutmix", type=_checked("cutmix"), default=DEFAULTS.cutmix, metavar="P",
                        help="mix a fraction P of the training batches with CutMix: a random box of each image is "
                        "pasted from another image of the batch and the labels are mixed by the box's area, e.g. "
                        "0.5 (default: 0, off)")
    parser.add_argument("--flip-tta", action=argparse.BooleanOptionalAction,
                        help="evaluate with the mean of the probabilities of each image and its mirror image "
                        f"(test-time augmentation; default: on for {flipped}, trained with flips; off for the others)")
    parser.add_argument("--shift-tta", action=argparse.BooleanOptionalAction,
                        help="evaluate with the mean over each image's copies shifted by one pixel up, down, left "
                        "and right too: 5 views, 10 with --flip-tta (test-time augmentation; evaluation makes 5 "
                        f"times the passes; default: on for {shifted}; off for the others)")
    parser.add_argument("--patience", type=_checked("patience"), metavar="N",
                        help=f"EarlyStopping patience in epochs, on validation loss (default per model: "
                        f"{_per_model('patience')})")
    parser.add_argument("--val-split", type=_checked("val_split"), default=DEFAULTS.val_split, metavar="F",
                        help=f"stratified fraction of the training set used for validation (default: {DEFAULTS.val_split:g})")
    parser.add_argument("--seed", type=_checked("seed"), default=DEFAULTS.seed,
                        help="seed for the weights, shuffling and augmentation, and for the validation split and "
                        f"--subset unless --split-seed is given (default: {DEFAULTS.seed})")
    parser.add_argument("--split-seed", type=_checked("split_seed"), metavar="SEED",
                        help="seed for the validation split and --subset alone, so that runs of different --seed "
                        "validate on the same images and their models can be compared or averaged on them "
                        "(default: --seed)")
    parser.add_argument("--subset", type=_checked("subset"), metavar="N",
                        help="use a stratified subset of N of the 60000 training images, split into training and "
                        "validation by --val-split, for quick runs (default: all 60000)")
    add_data_arguments(parser)
    parser.add_argument("--out-dir", default="runs", metavar="DIR", help="where run directories go (default: runs)")
    parser.add_argument("--run-name", metavar="NAME",
                        help="name of this run's directory under --out-dir (default: date and time, e.g. 20261129-143000)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing run directory of the same name (default: refuse)")
    add_backend_arguments(parser, resumable=True)
    parser.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction,
                        help="compute in bfloat16 (CPU) or float16 (GPU), keep float32 weights and outputs "
                        f"(default: on a CPU with AMX or AVX512-BF16, on for {_bfloat16_defaults()}, which train "
                        "1.3-2.2x faster there (the CNN at the same accuracy); "
                        "off elsewhere; the decision is saved in config.json)")
    parser.add_argument("--data-format", choices=DATA_FORMATS, default=DEFAULTS.data_format,
                        help="image layout while training; 'auto' is channels_last (channels_first on torch with "
                        "--no-fast-path); the saved model is channels_last either way (default: auto)")
    parser.add_argument("--no-fast-path", dest="fast_path", action="store_false",
                        help="torch: train and evaluate with stock Keras instead of the fast path (zero-copy "
                        "layouts, batched augmentation, fused BatchNorm and AdamW; same results, see docs/speed.md); "
                        "for comparisons and debugging (default: fast path on)")
    parser.add_argument("--distribute", action="store_true",
                        help="jax: data-parallel over all local devices (keras.distribution.DataParallel); on torch "
                        "launch with torchrun --nproc_per_node N instead (default: off)")
    parser.add_argument("--dist-timeout", type=in_range(float, 1.0, 86400.0), default=300, metavar="S",
                        help="distributed runs: seconds a process waits for the others (rendezvous and every "
                        "collective) before failing instead of hanging (default: 300)")
    parser.add_argument("--tensorboard", action="store_true",
                        help="also log every epoch for TensorBoard, through Keras's TensorBoard callback, to "
                        "RUN_DIR/MODEL/tensorboard/ (needs the tensorboard and tensorflow packages: "
                        "pip install 'fmnist_keras[tensorboard]'); view with: tensorboard --logdir RUN_DIR "
                        "(default: off)")
    parser.add_argument("--no-report", dest="report", action="store_false",
                        help="skip report.md and its figures in each model's run directory (default: write them)")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help=f"continue an interrupted run of train (not one that {' or '.join(OTHER_MAKERS)} "
                        "made) from its last completed epoch, with its saved "
                        "configuration: the flags that describe a run (model, epochs, rates, split, data, output, "
                        "precision, ...) are refused with it; --backend, --device, --no-report, --tensorboard and "
                        "--dist-timeout may be given")
    return parser


def configs_from_args(args: argparse.Namespace, backend: str) -> list[TrainConfig]:
    """One TrainConfig per model to train; CLI flags map one to one onto fields."""
    models = ("mlp", "cnn") if args.model == "all" else (args.model,)
    shared = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    shared["data_dir"] = saved_data_dir(shared.get("data_dir"))
    shared.update(backend=backend)
    return [TrainConfig(**{**shared, "model": name}) for name in models]


# Flags that describe a run; --resume takes them from the run directory instead.
_RUN_FLAGS = ("model", "epochs", "batch_size", "learning_rate", "weight_decay", "label_smoothing", "patience",
              "val_split", "seed", "split_seed", "subset", "data_dir", "verify", "out_dir", "run_name", "overwrite",
              "mixed_precision", "data_format", "fast_path", "distribute", "ema", "cutmix", "flip_tta", "shift_tta")


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """The destinations of the flags written on the command line (not those left at their default)."""
    saved = {action.dest: action.default for action in parser._actions}
    try:
        for action in parser._actions:
            action.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for action in parser._actions:
            action.default = saved[action.dest]
    return set(vars(given))


def resume_configs(parser, args, argv) -> tuple[RunDir, list[TrainConfig]]:
    """The run directory and saved per-model configurations of ``--resume RUN_DIR``."""
    written = {arg.partition("=")[0] for arg in argv or sys.argv[1:]}
    option = {  # each flag as written (--flip-tta or --no-flip-tta), else its last spelling
        action.dest: next((o for o in action.option_strings if o in written), action.option_strings[-1])
        for action in parser._actions if action.option_strings
    }
    given = [option[name] for name in _RUN_FLAGS if name in given_flags(parser, argv)]
    if given:
        parser.error(
            f"--resume continues a run with its saved configuration (its config.json); drop {', '.join(given)}, "
            f"or start a new run to change them."
        )
    run = RunDir.open(args.resume)
    models = run.models()
    configs = {model: load_config(run.config_file(model)) for model in models if run.config_file(model).exists()}
    for model, config in configs.items():
        if config.model != model:
            raise RunDirError(f"{run.config_file(model)} is damaged: it configures {config.model!r}, but it lies in "
                              f"the directory of {model!r}; restore it from a copy, or start a new run.")
    if not configs:
        raise RunDirError(f"{run} has no config.json for any of its models ({', '.join(models)}), so there is "
                          f"nothing to resume; start a new run.")
    first = next(iter(configs.values()))
    # A model without a config.json takes the run's settings, but its own TTA, average and precision defaults,
    # and its own epochs, learning rate and weight decay where the saved model has its model's defaults.
    saved_defaults = MODEL_DEFAULTS[first.model]
    own = {name: None for name in PER_MODEL
           if name in ("flip_tta", "shift_tta", "ema") or getattr(first, name) == saved_defaults[name]}
    own["mixed_precision"] = None
    return run, [configs.get(model) or dataclasses.replace(first, model=model, **own) for model in models]


def main(argv: list[str] | None = None) -> int:
    """Train as the flags say; one line and a non-zero exit code for anything that goes wrong.

    Under torchrun, a rank that stopped out of step with the others returns with its process group still open
    (closing it could abort the process): a script that calls ``main`` there should end through
    :func:`end_process`, as ``python -m fmnist_keras.train`` does, and start no other collective.
    """
    previous = _stop_on_sigterm()
    previous_sigint = signal.getsignal(signal.SIGINT)  # a rank that lost its peers ignores Ctrl-C from then on
    try:
        with interrupts.lost_signals_kept() as lost:  # one lost in jax's garbage-collection callback
            code = _main(argv)
        return interrupts.exit_code_with_lost_signal(code, lost, "train")
    except KeyboardInterrupt as error:
        # Before a run directory exists (see _train_all for the message during training).
        stop = Interrupted.of(error)
        print(f"Interrupted ({stop}) before training started; nothing was written.", file=sys.stderr)
        return stop.exit_code
    except OSError as error:  # what no narrower check caught: a name too long, a denied directory, a full disk
        print_error(os_error_line("train", error))
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous_sigint)


def _stop_on_sigterm():
    """SIGTERM (what batch schedulers send) raises like Ctrl-C; the previous handler, or None."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handle(signum, frame):
        raise Interrupted(signum)

    return signal.signal(signal.SIGTERM, handle)


def _main(argv: list[str] | None) -> int:
    escape_unencodable_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()
    with contextlib.ExitStack() as held:
        run, configs = None, None
        if args.resume is not None and launched_by_torchrun():  # on every rank, before any takes the run's lock
            return _fail(f"--resume continues a run in one process, not under torchrun; run "
                         f"{_resume_command(args.resume)} without torchrun.", 2)
        if args.resume is not None:  # "--resume ''" is a mistake to report, not "no resume"
            try:
                run, configs = resume_configs(parser, args, argv)
                held.enter_context(run.lock())  # from now on no other process changes it
            except (RunDirError, ValueError) as error:
                return _fail(error)
        # Under torchrun rank 0 alone checks, later, and every rank learns its answer (_train_all).
        if args.resume is None and not launched_by_torchrun():
            try:  # at once, not after minutes of loading and checking the data
                if args.run_name is not None:
                    RunDir.check_new(args.out_dir, args.run_name, args.overwrite)
                else:
                    RunDir.check_out_dir(args.out_dir)
            except RunDirError as error:
                return _fail(error, 2)
        given = given_flags(parser, argv)
        backend = args.backend if "backend" in given or configs is None else configs[0].backend
        device = args.device if "device" in given or configs is None else configs[0].device

        if args.tensorboard:
            missing = [name for name in ("tensorboard", "tensorflow") if importlib.util.find_spec(name) is None]
            if missing:
                parser.error(f"--tensorboard logs through Keras's TensorBoard callback, which needs "
                             f"{' and '.join(missing)}; run: pip install 'fmnist_keras[tensorboard]', or drop "
                             f"--tensorboard.")

        from fmnist_keras.backend import select_backend_or_exit

        backend = select_backend_or_exit(parser, backend, device)
        configs = configs or configs_from_args(args, backend)

        from fmnist_keras.engine import distributed

        try:
            replicas = distributed.setup(backend, args.distribute, configs[0].batch_size, args.dist_timeout)
        except distributed.DistributedError as error:
            print_error(error)
            return 2
        code = 1
        try:
            code = _train_all(parser, args, configs, run, backend, replicas, held)
            return code
        finally:
            distributed.shutdown(replicas, in_step=code == 0)


def _progress_display() -> int | str:
    """Keras's ``verbose``: a live progress bar on a terminal or in a notebook (headless notebook runs
    too), one line per epoch in a log file or a pipe (Keras draws its bar on every POSIX system, which
    writes each step's update into the file), nothing without a stdout."""
    stream = sys.stdout
    if not hasattr(stream, "write"):  # None under pythonw or after `>&-`: Keras would fail to print its lines
        return 0
    if any(kind.__module__.startswith("ipykernel") for kind in type(stream).__mro__):  # a Jupyter kernel
        return "auto"
    try:
        return "auto" if stream.isatty() else 2
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return 2


def _fail(error: BaseException, code: int = 1) -> int:
    print_error(error)
    return code


def _train_all(parser, args, configs, run, backend, replicas, held: contextlib.ExitStack) -> int:
    """Load the data, split it, open the run directory, train each model; rank 0 alone prints and writes."""
    from fmnist_keras import data as fdata
    from fmnist_keras.engine import distributed, fit

    try:
        raw, source = fdata.load_data(configs[0].data_dir, verify=configs[0].verify, return_source=True)
    except fdata.DataError as error:
        return _fail(error)
    interrupts.raise_if_lost()  # a signal lost while the data loaded: nothing is written yet

    from fmnist_keras.engine import splits as engine_splits

    # Every model of a run shares the split: one split seed (--split-seed, else --seed), --val-split and --subset.
    try:
        data_format = engine_splits.data_format_of(configs[0])
    except ValueError as error:
        parser.error(one_line(error))
    try:
        splits = engine_splits.make_splits(raw, configs[0], data_format)
    except ValueError as error:
        config = configs[0]
        subset = [("subset", config.subset)] if config.subset is not None else []
        settings = [*subset, ("val_split", config.val_split)]
        if args.resume:  # the settings come from the run, not from flags
            return _fail(f"{run.config_file(config.model)} ({', '.join(f'{k} {v}' for k, v in settings)}) does not "
                         f"split this data: {error}")
        parser.error(" / ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings) + f": {error}")
    interrupts.raise_if_lost()
    problem = None
    if replicas.is_chief:
        try:
            # A signal in here takes effect once the run directory is whole, so --resume can continue it.
            with interrupts.deferred():
                if run is None:  # every check has passed: only now is anything created or removed
                    run = RunDir.create(args.out_dir, args.run_name, [c.model for c in configs], args.overwrite)
                    held.enter_context(run.lock())
                    run.point_latest_here()
                for config in configs:  # written at once, so --resume works from the first moment
                    run.check_model_dir(config.model)
                    if not run.config_file(config.model).exists():
                        fit.run_config(config, splits).save(run.config_file(config.model))
        except RunDirError as error:
            problem = error
        except OSError as error:  # a full disk while config.json is written, say: every rank stops, below
            if run is not None and args.resume is None:  # the directory is made: say how to use its name again
                problem = os_error_line("train", error, in_place=True, then=f"run it again with --run-name "
                                        f"{run.path.name} --overwrite, which reuses {run} (it holds no epoch yet).")
            else:
                problem = os_error_line("train", error)
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM as Interrupted
            return _interrupted(stop, run)
    # Under torchrun every rank learns whether rank 0 could open the run directory, and all stop together.
    problem = distributed.same_on_every_rank(replicas, None if problem is None else str(problem))
    if problem is not None:
        return _fail(problem, 2 if args.resume is None else 1) if replicas.is_chief else 1
    try:
        return _train_models(args, configs, splits, run, backend, replicas, source, len(raw[0][1]))
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM as Interrupted
        return _interrupted(stop, run)
    except RunDirError as error:
        return _fail(error)
    except OSError as error:  # a full disk while a checkpoint or a report is written, say
        if run is None:  # a rank of torchrun other than rank 0
            return _fail(os_error_line("train", error))
        return _fail(os_error_line("train", error, in_place=True,
                                   then=f"continue the run from its last completed epoch with: {_resume_command(run)}"))


def _subset_note(subset: int | None, available: int, used: int) -> str:
    """What ``--subset`` drew, where that is not the number asked for ("" where it is)."""
    if subset is None or used == subset:
        return ""
    if subset >= available:
        return f"; --subset {subset:,} is more than its {available:,} training images: all are used"
    return f"; --subset {subset:,} draws {used:,} images (each class's share, rounded)"


def _train_models(args, configs, splits, run, backend, replicas, source, available: int) -> int:
    """Fit every model (all ranks), then evaluate and report each (rank 0), after the process group is closed."""
    import keras

    from fmnist_keras.engine import distributed, fit
    from fmnist_keras.backend import describe_device, is_out_of_memory
    from fmnist_keras.engine.recipe import dtype_policy_name
    from fmnist_keras.loading import ModelLoadError
    from fmnist_keras.metrics import format_summary

    say = print if replicas.is_chief else (lambda *_, **__: None)
    device = describe_device()
    say(f"Backend: {backend} (keras {keras.__version__}), device: {device}")
    if replicas.mode != "single":
        say(
            f"Data parallel ({replicas.mode}): {replicas.world_size} replicas {', '.join(replicas.devices)}; "
            f"global batch {configs[0].batch_size}, {configs[0].batch_size // replicas.world_size} per replica"
        )
    say(f"Data: {source}{'' if configs[0].verify else ', digests NOT checked (--no-verify)'}"
        f"{_subset_note(configs[0].subset, available, len(splits.y_train) + len(splits.y_val))}")
    say(f"Run directory: {run}{' (resuming)' if args.resume else ''}")
    facts = {}  # model -> what its fit recorded, for the final evaluation
    summaries = {}
    for config in configs:
        interrupts.raise_if_lost()  # one lost since: stop before the next model, as Ctrl-C there would
        name = config.model
        try:
            finished = run.read_metrics(name) if args.resume else None
            fitted = run.read_fit(name) if args.resume else None
        except RunDirError as error:
            return _fail(error)
        if finished is not None:
            say(f"\n== {name}: already finished, kept as it is")
            if not (run.model_dir(name) / REPORT_FILE).is_file():
                say(f"   it has no {REPORT_FILE} (--no-report, or stopped while writing it); write one with: "
                    f"python -m fmnist_keras.evaluate {shlex.quote(str(run.model_dir(name)))}")
            summaries[name] = finished
            continue
        if fitted is not None:
            say(f"\n== {name}: all its epochs are done; evaluating it")
            facts[name] = fitted
            continue
        resolved = fit.run_config(config, splits)  # what config.json will record, precision included
        from fmnist_keras.tta import TTA

        tta = TTA.of(resolved)
        say(
            f"\n== {name}: {len(splits.x_train)} train / {len(splits.x_val)} validation / "
            f"{len(splits.x_test)} test images, up to {resolved.epochs} epoch{'s' * (resolved.epochs != 1)}, "
            f"batch {resolved.batch_size}, "
            f"peak learning rate {resolved.learning_rate:g}, {dtype_policy_name(resolved.mixed_precision)}"
            + (f", moving average of the weights (momentum up to {resolved.ema:g})" if resolved.ema else "")
            + (f", CutMix on {100 * resolved.cutmix:g}% of the batches" if resolved.cutmix else "")
            + (f", evaluated with the {tta.name} (test-time augmentation)" if tta != TTA() else "")
        )
        start = time.perf_counter()
        try:
            result = fit.fit_model(config, splits, run, resume=bool(args.resume), replicas=replicas,
                                        tensorboard=args.tensorboard, verbose=_progress_display())
        except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM as Interrupted
            return _interrupted(stop, run)
        except (RunDirError, ModelLoadError) as error:
            return _fail(error)
        except Exception as error:
            if is_out_of_memory(error):
                return _fail(f"{name}: out of memory on {device} with --batch-size {config.batch_size}; "
                             f"try --batch-size {max(1, config.batch_size // 2)}.")
            if distributed.lost_a_replica(replicas, error):
                return _replica_stopped(error, replicas, run)
            raise
        facts[name] = {**result.facts, "wall_time_s": round(time.perf_counter() - start, 2)}
        if replicas.distributed:
            try:
                digests = distributed.replica_digests(result.model, replicas)  # a collective: every rank
            except RuntimeError as error:
                if not distributed.lost_a_replica(replicas, error):
                    raise
                return _replica_stopped(error, replicas, run)
            facts[name]["distributed"] = {**replicas.describe(config.batch_size), "replica_weight_digests": digests,
                                          "replicas_identical": len(set(digests)) == 1}
        else:  # evaluate at once; under torchrun only once the process group is closed
            code = _finish(args, config, splits, run, facts.pop(name), backend, device, source, summaries)
            if code:
                return code
    try:
        distributed.shutdown(replicas)  # from here on no rank can enter a collective
    except RuntimeError as error:  # a rank that left before the final barrier
        if not distributed.lost_a_replica(replicas, error):
            raise
        return _replica_stopped(error, replicas, run)
    if not replicas.is_chief:
        return 0
    for config in configs:
        if config.model in facts:
            code = _finish(args, config, splits, run, facts[config.model], backend, device, source, summaries)
            if code:
                return code
    say(f"\nTest-set results ({backend} on {device}); run directory {run}")
    say(format_summary([summaries[c.model] for c in configs if c.model in summaries]))
    return 0


def _finish(args, config, splits, run, facts, backend, device, source, summaries) -> int:
    """Evaluate the saved model once, write metrics.json once, hand the model in memory to the report."""
    from fmnist_keras.engine import evaluation
    from fmnist_keras.loading import ModelLoadError

    name = config.model
    start = time.perf_counter()
    try:
        model, metrics, test_probabilities = evaluation.final_metrics(run, config, splits, facts)
        interrupts.raise_if_lost()  # one lost while it evaluated: metrics.json is not written, --resume evaluates
    except KeyboardInterrupt as stop:  # Ctrl-C, or SIGTERM as Interrupted
        return _interrupted(stop, run)
    except evaluation.TrainingInterrupted as error:
        return _fail(f"{name}: {error}")
    except evaluation.NonFiniteOutputs as error:
        return _fail(f"{name}: {error}; it is not kept as a result. Try a lower --learning-rate.")
    except ModelLoadError as error:
        return _fail(f"{name}: {error}")
    # Fit (in this process, or train_time_s when an earlier one fitted) plus evaluation.
    metrics["wall_time_s"] = round(facts.get("wall_time_s", facts["train_time_s"]) + time.perf_counter() - start, 2)
    metrics.update(backend=backend, device=device, data_source=str(source))
    write_json(run.metrics_file(name), metrics)
    summaries[name] = metrics
    if args.report:
        from fmnist_keras.inspection.report import write_report

        portable = splits.in_format("channels_last")  # the layout of the saved model
        report = write_report(run.model_dir(name), portable.x_test, portable.y_test, model=model, metrics=metrics,
                              x_train=portable.x_train, y_train=portable.y_train,
                              test_probabilities=test_probabilities)
        print(f"Report: {report}")
    print(f"Saved {run.model_file(name)}; test accuracy {metrics['test']['accuracy']:.4f}")
    if metrics.get("terminated_on_nan"):
        return _fail(
            f"{name}: the loss became NaN or infinite in epoch {metrics.get('nan_epoch')}; training stopped and the "
            f"last good checkpoint {run.model_file(name)} (epoch {metrics['best_epoch']}) is kept and evaluated. "
            f"Try a lower --learning-rate (was {config.resolved().learning_rate:g})."
        )
    return 0


def _interrupted(error: KeyboardInterrupt, run: RunDir | None) -> int:
    """One line: what stopped, that completed epochs are kept, and the command that continues."""
    stop = Interrupted.of(error)
    if run is None:
        print(f"Interrupted ({stop}).", file=sys.stderr)
    else:
        print(one_line(f"Interrupted ({stop}); {run} keeps every completed epoch. Continue with: "
                       f"{_resume_command(run)}"), file=sys.stderr)
    return stop.exit_code


def _replica_stopped(error: RuntimeError, replicas, run: RunDir | None) -> int:
    """One line for a torchrun rank whose collective failed (:func:`~fmnist_keras.engine.distributed.lost_a_replica`).

    A rank killed outright (the kernel's out-of-memory killer, SIGKILL, a lost node) says nothing: each
    other rank's next collective fails. From here on this rank ignores Ctrl-C and SIGTERM (torchrun sends
    SIGTERM to the ranks left once one has died), so that they cannot replace the line, or add a second one,
    before the rank ends (:func:`end_process`); torchrun still ends a rank that does not exit within its grace
    period.
    """
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_IGN)
    reason = (str(error).strip().splitlines() or [""])[0]
    line = (f"rank {replicas.rank} of {replicas.world_size} stopped training ({type(error).__name__}: {reason}). "
            f"Under torchrun that is most often another rank that failed or was killed first; torchrun's report "
            f"lists each rank's exit, a killed one with its signal")
    if run is None:  # a rank other than rank 0, which alone writes the run
        return _fail(line + ".")
    return _fail(f"{line}. {run} keeps every completed epoch; once the cause is fixed, continue with: "
                 f"{_resume_command(run)}")


def _resume_command(run: RunDir | str) -> str:
    """The shell command that continues ``run`` (a run directory or its path) from its last completed epoch."""
    path = str(run)
    if path.startswith("-"):  # `--out-dir . --run-name=-x`: argparse would take the path for a flag
        path = os.path.join(".", path)
    return f"python -m fmnist_keras.train --resume {shlex.quote(path)}"


def end_process(entry) -> NoReturn:
    """Run ``entry`` (:func:`main`) as the whole process and end the process with its exit code.

    A torchrun rank whose process group is still open (it stopped out of step with the others:
    ``distributed.shutdown``) ends with ``os._exit`` once stdout and stderr are flushed, its traceback or
    ``SystemExit`` message printed first, and Ctrl-C and SIGTERM ignored from then on: closing a group whose
    peer is gone, or Python's own exit with the group open, can abort the process in gloo's C++ code
    (``terminate called without an active exception``, signal 6 in place of the rank's exit code). Every other
    process ends as ``sys.exit`` ends it.
    """
    try:
        code = entry()
    except BaseException as error:
        if not _process_group_open():
            raise
        code = _print_as_python_would(error)
    if not _process_group_open():
        sys.exit(code)
    if threading.current_thread() is threading.main_thread():
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, signal.SIG_IGN)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # None (`>&-`), a full disk, a closed pipe
            pass
    os._exit(code)


def _process_group_open() -> bool:
    # Never an import here: a Ctrl-C that stopped torch's own import leaves it half made in sys.modules, and
    # importing it again raises from inside torch. A run that never imported torch.distributed, or stopped
    # during its import, opened no group.
    dist = sys.modules.get("torch.distributed")
    try:
        return bool(dist is not None and dist.is_available() and dist.is_initialized())
    except Exception:  # noqa: BLE001 (half imported: whatever torch raises, no group was opened)
        return False


def _print_as_python_would(error: BaseException) -> int:
    """What Python prints for ``error`` escaping to the top level, and the exit code it gives."""
    if isinstance(error, SystemExit):
        if error.code is None or isinstance(error.code, int):
            return error.code or 0
        print(error.code, file=sys.stderr)
        return 1
    traceback.print_exception(error)
    return 1


if __name__ == "__main__":
    end_process(main)

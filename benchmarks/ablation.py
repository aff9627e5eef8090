"""Ablation over seeds: what the weights' moving average and flip test-time augmentation add.

For each seed the script trains a model exactly as ``python -m
fmnist_keras.train --model MODEL --seed S`` does (the same configuration,
``fit_model`` with its callbacks, a run directory under ``--out-dir``, the
saved model loaded back), and also keeps the trained weights of the last
epoch. It then evaluates four variants on the validation and the test
split:

* ``average + flip``: the saved model (the moving average of the weights,
  best epoch, BatchNorm statistics re-estimated) with flip TTA;
* ``average``: the same model, no TTA;
* ``trained + flip`` and ``trained``: the trained weights of the last epoch,
  their BatchNorm statistics re-estimated the same way (``trained + flip``
  is what the default CNN, without the average, keeps when its last epoch
  is its best, evaluated with flip TTA alone; each run's ``metrics.json``
  has the model's own test-time augmentation, flips and shifts for the CNN,
  so for the CNN the "seconds" of fit and evaluation include a 10-view
  evaluation of the saved model).

The moving average only watches the trained weights, so the ``trained``
rows are what ``--ema 0`` trains, except that such a run keeps its best
epoch by validation loss rather than its last. Choose on the validation
columns; the test columns are read once per run, after training.

Prints one row per variant: mean ± sample standard deviation over the seeds,
and per seed; writes everything as JSON with ``--json``. Each seed's run
directory holds its ``metrics.json`` as ``train`` writes it.

Usage:
    python benchmarks/ablation.py --seeds 42 1 2 --no-mixed-precision --out-dir runs/ablation --json ablation.json
    python benchmarks/ablation.py --seeds 42 1 2 --label-smoothing 0 --out-dir runs/ablation-ls0
    python benchmarks/ablation.py --seeds 42 1 2 --ema 0 --erase 0.25 --out-dir runs/ablation-erase
    python benchmarks/ablation.py --seeds 42 --ema 0 --shift 0.12 --out-dir runs/ablation-shift
    python benchmarks/ablation.py --seeds 42 --ema 0 --filters 48 96 --out-dir runs/ablation-wide
    python benchmarks/ablation.py --seeds 42 --ema 0 --filters 32 64 128 --convs 1 2 2 --out-dir runs/ablation-deep
    python benchmarks/ablation.py --seeds 42 1 2 --ema 0 --dropout 0.3 --out-dir runs/ablation-dropout
    python benchmarks/ablation.py --model cnn-large --seeds 42 --ema 0 --mixed-precision --dropout 0.2
    python benchmarks/ablation.py --seeds 42 --ema 0 --optimizer sgd --learning-rate 0.1 --weight-decay 0.005
    python benchmarks/ablation.py --seeds 42 --ema 0 --schedule linear
    python benchmarks/ablation.py --model cnn-large --seeds 42 --ema 0 --cutmix 0.5
    python benchmarks/ablation.py --model cnn-large --seeds 42 --ema 0 --global-pool
    python benchmarks/ablation.py --model cnn-large --seeds 42 --ema 0 --residual
    python benchmarks/ablation.py --seeds 0 --subset 3000 --epochs 2     # a quick check of the script
"""

from __future__ import annotations

import early_signals  # first: a Ctrl-C while the imports below load is one line
import argparse
import json
import os
import statistics
import sys
import time

from fmnist_keras import interrupts
from fmnist_keras.backend import default_backend
from fmnist_keras.cli import add_data_arguments, in_range, print_error
import outputs  # benchmarks/ is on sys.path when a script there runs
from fmnist_keras.config import RANGES, TrainConfig, saved_data_dir

os.environ["KERAS_BACKEND"] = default_backend()  # torch unless $KERAS_BACKEND names one

MADE_BY = "benchmarks/ablation.py"  # in run.json: the runs it may replace
VARIANTS = ("average + flip", "average", "trained + flip", "trained")
# Bounds of the architecture flags: far above any model screened. They catch typos; a model inside them may
# still not fit in memory.
ARCHITECTURE = {"filters": (1, 2048), "convs": (1, 16), "dense_units": (1, 16384)}
MAX_BLOCKS = 4  # each block halves the maps: 28 -> 14 -> 7 -> 3 -> 1


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="cnn", choices=["cnn", "cnn-large"], help="model (default: cnn)")
    parser.add_argument("--seeds", type=in_range(*RANGES["seed"]), nargs="+", default=[42, 1, 2],
                        help="seeds (default: 42 1 2)")
    parser.add_argument("--split-seed", type=in_range(*RANGES["split_seed"]), metavar="SEED",
                        help="draw every seed's validation split from SEED, as train --split-seed does, so that the "
                        "seeds' models share one split (default: each seed its own)")
    parser.add_argument("--epochs", type=in_range(*RANGES["epochs"]), help="epochs (default: the model's)")
    parser.add_argument("--subset", type=in_range(*RANGES["subset"]), help="train on N images (default: all)")
    parser.add_argument("--ema", type=in_range(*RANGES["ema"]), default=0.999,
                        help="momentum of the average that is compared (default: 0.999)")
    parser.add_argument("--label-smoothing", type=in_range(*RANGES["label_smoothing"]),
                        help="label smoothing (default: train's)")
    parser.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction,
                        help="bfloat16 (CPU) or float16 (GPU) compute (default: train's, which is bfloat16 for "
                        "cnn and cnn-large on a CPU with AMX or AVX512-BF16)")
    parser.add_argument("--shift", type=float, metavar="F",
                        help="largest training shift as a fraction of the image size, 0 for none "
                        "(default: the model's, 0.08, about 2 pixels)")
    parser.add_argument("--erase", type=float, metavar="F",
                        help="erase a random patch of up to this fraction of each training image, 0 for none "
                        "(random erasing; default: the model's, none for cnn, 0.25 for cnn-large)")
    parser.add_argument("--filters", type=in_range(int, *ARCHITECTURE["filters"]), nargs="+", metavar="N",
                        help="filters of each block's convolutions, one to four blocks (default: the model's, "
                        "cnn 32 64, cnn-large 64 128 256)")
    parser.add_argument("--convs", type=in_range(int, *ARCHITECTURE["convs"]), nargs="+", metavar="N",
                        help="convolutions per block, one number or one per block (default: the model's, 2)")
    parser.add_argument("--dense-units", type=in_range(int, *ARCHITECTURE["dense_units"]), metavar="N",
                        help="width of the Dense embedding (default: the model's, cnn 256, cnn-large 512)")
    parser.add_argument("--dropout", type=float, metavar="F",
                        help="dropout rate after the embedding (default: the model's, cnn 0.1, cnn-large 0.4)")
    parser.add_argument("--residual", action="store_true",
                        help="add a ResNet shortcut (1x1 convolution, BatchNorm) around each block's convolutions "
                        "(default: none)")
    parser.add_argument("--global-pool", action="store_true",
                        help="average the last block's feature maps over space instead of flattening them "
                        "(default: flatten)")
    parser.add_argument("--learning-rate", type=in_range(*RANGES["learning_rate"]),
                        help="peak learning rate (default: the model's)")
    parser.add_argument("--weight-decay", type=in_range(*RANGES["weight_decay"]), metavar="WD",
                        help="AdamW decoupled weight decay (default: the model's)")
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                        help="adamw: train's; sgd: SGD with Nesterov momentum 0.9 on train's schedule, with "
                        "Keras's decoupled weight decay (give --learning-rate and --weight-decay for it) "
                        "(default: adamw)")
    parser.add_argument("--schedule", choices=["cosine", "linear"], default="cosine",
                        help="cosine: train's warm-up then cosine decay; linear: the same warm-up, then a linear "
                        "decay to the same end (1%% of the peak) (default: cosine)")
    parser.add_argument("--cutmix", type=in_range(*RANGES["cutmix"]), metavar="P",
                        help="CutMix (Yun et al. 2019) on this fraction of the training batches: a random box of "
                        "each image is pasted from another image of the batch, and the labels are mixed by the "
                        "box's area; 0 for none (default: train's, 0)")
    parser.add_argument("--out-dir", default="runs/ablation", help="where the runs go (default: runs/ablation)")
    parser.add_argument("--json", type=outputs.json_path, metavar="PATH",
                        help="also write the results as JSON (a new file, or an earlier result, which is replaced)")
    add_data_arguments(parser)  # --data-dir and --no-verify
    args = parser.parse_args(argv)
    if args.shift is not None and not 0.0 <= args.shift < 1.0:
        parser.error(f"--shift takes a fraction from 0 up to 1; got {args.shift}")
    if args.erase is not None and not 0.0 <= args.erase < 1.0:
        parser.error(f"--erase takes a fraction from 0 up to 1; got {args.erase}")
    if args.filters is not None and len(args.filters) > MAX_BLOCKS:
        parser.error(f"--filters takes at most {MAX_BLOCKS} blocks (each halves the image, and 28 pixels halve "
                     f"four times); got {len(args.filters)}")
    blocks = len(args.filters) if args.filters else 3 if args.model == "cnn-large" else 2
    if args.convs is not None and len(args.convs) not in (1, blocks):
        parser.error(f"--convs takes one number or one per block ({blocks}); got {args.convs}")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        parser.error(f"--dropout takes a rate from 0 up to 1; got {args.dropout}")
    repeated = outputs.repeated_seeds_line(args.seeds)  # each seed's run is OUT_DIR/MODEL-seedS
    if repeated:
        parser.error(repeated)
    try:  # every seed's TrainConfig, before any run directory of an earlier ablation is replaced
        for seed in args.seeds:
            train_config(args, seed).check()
    except ValueError as error:
        parser.error(str(error))
    return args


def train_config(args, seed: int):
    """The TrainConfig ``train --model MODEL --seed SEED`` would use, with the flags given here."""
    given = {"epochs": args.epochs, "subset": args.subset, "ema": args.ema, "label_smoothing": args.label_smoothing,
             "mixed_precision": args.mixed_precision, "learning_rate": args.learning_rate,
             "weight_decay": args.weight_decay, "cutmix": args.cutmix, "split_seed": args.split_seed,
             "verify": args.verify,  # and the data directory as train saves it, so the run records its data
             "data_dir": saved_data_dir(args.data_dir)}
    return TrainConfig(model=args.model, seed=seed, **{k: v for k, v in given.items() if v is not None})


def check_replaceable(args, seed: int) -> None:
    """Refuse, as :class:`~fmnist_keras.rundir.RunDirError`, to replace ``OUT_DIR/MODEL-seedS`` unless it is new or
    a run this script made: ``seeds.py`` and ``train`` name their runs alike."""
    from fmnist_keras.rundir import RUN_FILE, RunDir, RunDirError, read_json_object

    target = RunDir.check_new(args.out_dir, f"{args.model}-seed{seed}", overwrite=True, elsewhere="another --out-dir")
    if target.exists() and read_json_object(target / RUN_FILE, "the run's list of models",
                                            "choose another --out-dir").get("made_by") != MADE_BY:
        raise RunDirError(f"{target} is a run that {MADE_BY} did not make (train's, or another script's), so it is "
                          f"left alone; choose another --out-dir.")


def run_seed(args, seed: int, raw) -> dict:
    import keras

    from fmnist_keras.engine import evaluation, fit
    from fmnist_keras.engine.callbacks import recalibrate_batch_norm
    from fmnist_keras.engine.splits import make_splits
    from fmnist_keras.rundir import RunDir, write_json
    from fmnist_keras.tta import TTA

    class LastTrainedWeights(keras.callbacks.Callback):
        """The trained weights at the end of the last epoch (fit_model's callbacks see those, not the average)."""

        weights = None

        def on_epoch_end(self, epoch, logs=None):
            self.weights = self.model.get_weights()

    config = train_config(args, seed)
    splits = make_splits(raw, config)
    if splits.data_format != "channels_last":
        raise SystemExit("this script evaluates channels_last models only; run it with the torch fast path")
    check_replaceable(args, seed)
    # made_by: train --resume would go on with train's recipe, not this one's changes
    run = RunDir.create(args.out_dir, f"{args.model}-seed{seed}", [args.model], overwrite=True,
                        made_by=MADE_BY, elsewhere="another --out-dir")
    last = LastTrainedWeights()
    start = time.perf_counter()
    result = fit.fit_model(config, splits, run, verbose=2, callbacks=[last])
    average, metrics, _ = evaluation.final_metrics(run, config, splits, result.facts)
    seconds = time.perf_counter() - start
    write_json(run.metrics_file(args.model), metrics)

    trained = result.model
    trained.set_weights(last.weights)
    recalibrate_batch_norm(trained, splits.x_train, config.batch_size, seed=config.seed)
    portable = splits.in_format("channels_last")
    models = {"average": average, "trained": trained}
    row = {"seed": seed, "seconds": round(seconds, 1), "best_epoch": metrics["best_epoch"],
           "epochs_run": metrics["epochs_run"], "momentum": metrics["weights_average_momentum"]}
    for variant in VARIANTS:
        weights, _, tta = variant.partition(" + ")
        model = models[weights]
        for split, x, y in (("validation", portable.x_val, portable.y_val), ("test", portable.x_test, portable.y_test)):
            row[f"{variant}/{split}"] = evaluation.evaluate(model, x, y, TTA(flip=bool(tta)))["accuracy"]
    print(json.dumps(row), flush=True)
    return row


def mean_and_spread(fractions: list[float]) -> str:
    """Accuracies as a table cell: the mean in percent, ± the sample standard deviation when there are several."""
    values = [100 * fraction for fraction in fractions]
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}%{spread}"


def summary(rows: list[dict]) -> str:
    lines = ["| variant | validation accuracy | test accuracy | test per seed |", "| --- | ---: | ---: | --- |"]
    for variant in VARIANTS:
        cells = [mean_and_spread([row[f"{variant}/{split}"] for row in rows]) for split in ("validation", "test")]
        per_seed = ", ".join(f"{100 * row[f'{variant}/test']:.2f}" for row in rows)
        lines.append(f"| {variant} | {cells[0]} | {cells[1]} | {per_seed} |")
    seconds = ", ".join(f"{row['seconds']:.0f}" for row in rows)
    lines.append(f"\nseeds {', '.join(str(row['seed']) for row in rows)}; fit + evaluation seconds: {seconds}; "
                 f"best epochs: {', '.join(str(row['best_epoch']) for row in rows)}; "
                 f"momentum {rows[0]['momentum']}")
    return "\n".join(lines)


def use_sgd(momentum: float = 0.9) -> None:
    """Make ``train``'s recipe use Keras's SGD (Nesterov) in place of AdamW, everything else as ``train``."""
    import keras

    from fmnist_keras.engine import recipe

    def sgd(config, steps_per_epoch):  # with the same moving average of the weights as AdamW's
        config = config.resolved()
        average = recipe.averaging_momentum(config.ema, max(1, config.epochs * steps_per_epoch))
        return keras.optimizers.SGD(learning_rate=recipe.learning_rate_schedule(config, steps_per_epoch),
                                    momentum=momentum, nesterov=True, weight_decay=config.weight_decay,
                                    use_ema=config.ema > 0, ema_momentum=average if config.ema > 0 else 0.99)

    recipe.make_optimizer = sgd


def use_linear_decay() -> None:
    """Make ``train``'s recipe decay the learning rate linearly after its warm-up, instead of along a cosine.

    Keras has no built-in schedule of that shape, so this is one of the script's own (registered, so
    that the run's checkpoints load back here; outside this script they load with ``compile=False``).
    """
    import keras
    from keras import ops

    from fmnist_keras.engine import recipe

    @keras.saving.register_keras_serializable(package="fmnist_keras_ablation")
    class WarmupLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
        def __init__(self, peak, warmup_steps, decay_steps, start=0.05, end=0.01):
            self.peak, self.warmup_steps, self.decay_steps = peak, warmup_steps, decay_steps
            self.start, self.end = start, end

        def __call__(self, step):
            step = ops.cast(step, "float32")
            warm = self.peak * (self.start + (1 - self.start) * step / max(1, self.warmup_steps))
            done = ops.minimum((step - self.warmup_steps) / self.decay_steps, 1.0)
            return ops.where(step < self.warmup_steps, warm, self.peak * (1 - (1 - self.end) * done))

        def get_config(self):
            return {"peak": self.peak, "warmup_steps": self.warmup_steps, "decay_steps": self.decay_steps,
                    "start": self.start, "end": self.end}

    cosine = recipe.learning_rate_schedule

    def linear(config, steps_per_epoch):
        schedule = cosine(config, steps_per_epoch)  # the same warm-up, peak and length
        return WarmupLinearDecay(schedule.warmup_target or schedule.initial_learning_rate, schedule.warmup_steps,
                                 schedule.decay_steps)

    recipe.learning_rate_schedule = linear


def main(argv=None) -> int:
    args = parse_args(argv)
    from fmnist_keras.allocator import keep_freed_memory
    from fmnist_keras.backend import select_backend

    from fmnist_keras.rundir import RunDir, RunDirError

    try:  # each seed's run is replaced if it is one of this script's: know that before any data is read
        for seed in args.seeds:
            check_replaceable(args, seed)
    except RunDirError as error:
        print_error(error)
        return 1
    keep_freed_memory()  # as train does
    select_backend("torch", "auto")
    from fmnist_keras import data as fdata

    raw = fdata.load_data(args.data_dir, verify=args.verify)
    changed = {"shift": args.shift, "erase": args.erase,
               "filters": None if args.filters is None else tuple(args.filters),
               "convs_per_block": None if args.convs is None else tuple(args.convs) if len(args.convs) > 1
               else args.convs[0], "dense_units": args.dense_units, "dropout": args.dropout,
               "residual": args.residual or None, "global_pool": args.global_pool or None}
    changed = {name: value for name, value in changed.items() if value is not None}
    if args.optimizer == "sgd":
        use_sgd()
    if args.schedule == "linear":
        use_linear_decay()
    if changed:
        import functools

        from fmnist_keras import models

        models.BUILDERS[args.model] = functools.partial(models.BUILDERS[args.model], **changed)
    from fmnist_keras.rundir import RunDirError

    try:
        rows = []
        for seed in args.seeds:
            interrupts.raise_if_lost()  # a signal kept while the data loaded, or during the last seed's evaluation
            rows.append(run_seed(args, seed, raw))
    except RunDirError as error:
        print_error(error)
        return 1
    print(summary(rows))
    if args.json:
        outputs.write_json(args.json, {
            "model": args.model, "shift": args.shift, "erase": args.erase, "filters": args.filters,
            "convs": args.convs, "dense_units": args.dense_units, "dropout": args.dropout, "residual": args.residual,
            "global_pool": args.global_pool, "ema": args.ema,
            "learning_rate": args.learning_rate, "weight_decay": args.weight_decay, "optimizer": args.optimizer,
            "schedule": args.schedule, "cutmix": args.cutmix, "mixed_precision": args.mixed_precision, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(outputs.run_benchmark(main, "ablation.py"))

"""Fit one model with Keras's built-in callbacks, and evaluate a model.

:func:`fit_model` builds, compiles and fits a model and returns it with its
history; with a :class:`~fmnist_keras.rundir.RunDir` it also checkpoints the
best model, logs the history, backs up every epoch and records the end of
``fit``. The caller evaluates (:func:`evaluate`, :func:`final_metrics`) and
writes the metrics once.

Imports Keras at module level: import this only after
:func:`fmnist_keras.backend.select_backend`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import keras
import numpy as np

from fmnist_keras import data as fdata
from fmnist_keras import distributed, fastpath
from fmnist_keras.backend import training_data_format
from fmnist_keras.callbacks import (
    AtomicModelCheckpoint,
    NaNGuard,
    RecalibrateBatchNorm,
    RecordFitEnd,
    ResumableEarlyStopping,
    StopOnSignal,
    backed_up_epochs,
    read_history,
    resume_state,
)
from fmnist_keras.config import TrainConfig
from fmnist_keras.interrupts import Interrupted
from fmnist_keras.loading import load_model
from fmnist_keras.metrics import classification_metrics
from fmnist_keras.models import build_model
from fmnist_keras.rundir import RunDir


@dataclasses.dataclass
class Splits:
    """Model-ready arrays: float32 images with a channel axis, int labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    data_format: str  # the layout of the images: channels_last (N, 28, 28, 1) or channels_first (N, 1, 28, 28)

    def in_format(self, data_format: str) -> "Splits":
        """The same images in ``data_format`` (views, no copy)."""
        if data_format == self.data_format:
            return self
        source, target = (1, -1) if self.data_format == "channels_first" else (-1, 1)
        moved = {name: np.moveaxis(getattr(self, name), source, target) for name in ("x_train", "x_val", "x_test")}
        return dataclasses.replace(self, data_format=data_format, **moved)


def data_format_of(config: TrainConfig) -> str:
    """The layout ``config`` trains in (its ``data_format``, resolved for the running backend)."""
    return training_data_format(keras.backend.backend(), config.data_format, config.fast_path)


def make_splits(raw, config: TrainConfig, data_format: str | None = None) -> Splits:
    """Stratified, seeded train/validation split of the training set; the test set untouched.

    Images come in ``data_format``, by default the layout ``config`` trains
    in (:func:`data_format_of`).
    """
    data_format = data_format or data_format_of(config)
    (x_train, y_train), (x_test, y_test) = raw
    if config.subset is not None:
        keep = fdata.stratified_subset(y_train, config.subset, config.seed)
        x_train, y_train = x_train[keep], y_train[keep]
    train_idx, val_idx = fdata.stratified_split(y_train, config.val_split, config.seed)
    if len(y_test) == 0:
        raise ValueError("the test set is empty; the data directory needs test images and labels (t10k-*)")
    return Splits(
        x_train=fdata.to_model_input(x_train[train_idx], data_format),
        y_train=y_train[train_idx].astype(np.int64),
        x_val=fdata.to_model_input(x_train[val_idx], data_format),
        y_val=y_train[val_idx].astype(np.int64),
        x_test=fdata.to_model_input(x_test, data_format),
        y_test=y_test.astype(np.int64),
        data_format=data_format,
    )


def compile_model(model: keras.Model, config: TrainConfig, steps_per_epoch: int) -> keras.Model:
    """AdamW with linear warm-up then cosine decay, label-smoothed cross-entropy."""
    total_steps = max(1, config.epochs * steps_per_epoch)
    # Short runs (quick tests, --epochs 2) keep most of their steps for the decay.
    warmup_steps = int(round(min(config.warmup_epochs * steps_per_epoch, 0.2 * total_steps)))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.learning_rate * 0.05,
        decay_steps=max(1, total_steps - warmup_steps),
        warmup_target=config.learning_rate if warmup_steps > 0 else None,
        warmup_steps=warmup_steps,
        alpha=0.01,
    )
    optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=config.weight_decay)
    # Decay only the weight matrices, not biases or normalisation parameters.
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
    )
    return model


def predict_probabilities(model: keras.Model, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    return np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64)


class NonFiniteOutputs(ValueError):
    """The model's outputs are NaN or infinite: its weights are broken."""


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray) -> dict:
    """Metrics of ``model`` on (x, y); the loss is plain (unsmoothed) cross-entropy.

    Raises:
        NonFiniteOutputs: the model gives NaN or infinite probabilities.
    """
    probabilities = predict_probabilities(model, x)
    if not np.isfinite(probabilities).all():
        raise NonFiniteOutputs(f"model {model.name} gives NaN or infinite outputs, so its weights are not finite")
    loss = float(-np.mean(np.log(np.clip(probabilities[np.arange(len(y)), y], 1e-12, 1.0))))
    return classification_metrics(y, probabilities, fdata.CLASS_NAMES, loss=loss)


def portable_copy(config: TrainConfig):
    """A function that returns the trained model's weights in a ``channels_last`` model.

    Saved models are ``channels_last`` so that every backend runs them
    (TensorFlow's CPU convolutions refuse ``channels_first``). Layer weights
    do not depend on the layout, so the copy is the same network: the
    registry builds it again and the weights are copied over. The copy is
    built once and shares the optimizer, so saving it keeps the training state.
    """
    copy = None

    def convert(trained: keras.Model) -> keras.Model:
        nonlocal copy
        if copy is None:
            with dtype_policy(config.mixed_precision):
                copy = build_model(config.model, data_format="channels_last", seed=config.seed)
            copy.compile(optimizer=trained.optimizer, loss=trained.loss, metrics=["accuracy"])
        copy.set_weights(trained.get_weights())
        return copy

    return convert



class TrainingInterrupted(RuntimeError):
    """Training stopped before its end (NaN loss); the best checkpoint so far is kept."""


@dataclasses.dataclass
class FitResult:
    """What :func:`fit_model` returns: the trained model, its history and the facts of the fit."""

    model: keras.Model  # with the best epoch's weights (EarlyStopping restores them)
    history: list[dict]  # one row per epoch, as history.csv holds it
    facts: dict  # what fit.json records: epochs run, best epoch, train time, fast path, ...


def fit_model(
    config: TrainConfig,
    splits: Splits,
    run: RunDir | None = None,
    resume: bool = False,
    verbose="auto",
    replicas: distributed.Replicas = distributed.SINGLE,
    tensorboard: bool = False,
) -> FitResult:
    """Build, compile and fit ``config.model`` with Keras's built-in callbacks.

    Callbacks: EarlyStopping (val_loss, best weights restored), TerminateOnNaN
    (which also keeps non-finite weights out of the checkpoint), and, with a
    ``run`` directory, an atomic ModelCheckpoint (best model as
    ``model.keras``, always ``channels_last``, see :func:`portable_copy`),
    CSVLogger, BackupAndRestore (state after every epoch, so an interrupted
    run resumes where it stopped) and ``fit.json`` when ``fit`` ends.

    Args:
        config: the run configuration.
        splits: model-ready arrays from :func:`make_splits`; the model trains in their layout.
        run: the run directory to write; None writes nothing (notebooks, and
            every torchrun rank but 0).
        resume: continue from the backup in ``run`` (optimizer state, epoch
            counter, EarlyStopping state and history carry over).
        verbose: Keras's progress-bar setting.
        replicas: the data-parallel replicas (:func:`fmnist_keras.distributed.setup`).
        tensorboard: also log every epoch with Keras's ``TensorBoard`` callback
            to ``run/<model>/tensorboard`` (needs a ``run``).

    Raises:
        callbacks.Interrupted: Ctrl-C or SIGTERM; every completed epoch is kept.
    """
    if config.data_format not in ("auto", splits.data_format):
        raise ValueError(
            f"the configuration asks to train in {config.data_format} but the splits are {splits.data_format}; "
            f"make them with make_splits(raw, config)."
        )
    config = dataclasses.replace(config.resolved(), data_format=splits.data_format)
    name = config.model
    if run is not None:
        run.model_dir(name).mkdir(exist_ok=True)
        config.save(run.config_file(name))
    # torchrun replicas draw their own dropout masks and augmentations (rank 0's
    # initial weights are broadcast to all); everything else uses config.seed.
    seed = config.seed + replicas.rank
    keras.utils.set_random_seed(seed)
    with dtype_policy(config.mixed_precision):
        model = build_model(name, data_format=config.data_format, seed=seed)
    compile_model(model, config, steps_per_epoch=math.ceil(len(splits.x_train) / config.batch_size))

    state = resume_state(run.backup_dir(name), run.model_file(name), run.history_file(name)) if resume else None
    epochs_before = backed_up_epochs(run.backup_dir(name)) if resume else 0
    early_stopping = ResumableEarlyStopping(
        monitor="val_loss", patience=config.patience, restore_best_weights=True, verbose=int(run is not None),
        initial_state=state,
    )
    nan_guard, stop_on_signal, history_log = NaNGuard(), StopOnSignal(), keras.callbacks.History()
    replica_callbacks = distributed.callbacks(replicas)
    timing = {}

    def facts() -> dict:
        """The facts of the fit so far; RecordFitEnd writes them as fit ends."""
        history = read_history(run.history_file(name)) if run is not None else _rows(history_log)
        seconds = time.perf_counter() - timing["start"]
        facts = {
            "epochs_run": len(history) if run is not None else epochs_before + len(history),
            "best_epoch": _best_epoch(history),
            "stopped_early": early_stopping.stopped_epoch > 0,
            "terminated_on_nan": nan_guard.stopped,
            "nan_epoch": nan_guard.epoch + 1 if nan_guard.stopped and nan_guard.epoch is not None else None,
            "resumed": state is not None,
            "train_time_s": round(seconds, 2),
            "seconds_per_epoch": round(seconds / max(1, len(history_log.epoch)), 2),
            "training_data_format": config.data_format,
            "mixed_precision": dtype_policy_name(config.mixed_precision),
            "fast_path": timing["fast_path"],
            "batch_norm_recalibrated_batches": recalibrate.batches,
            "keras_version": keras.__version__,
        }
        averaging = {c.gradient_averaging for c in replica_callbacks if hasattr(c, "gradient_averaging")}
        if averaging:
            facts["gradient_averaging"] = averaging.pop()
        return facts

    callbacks = [history_log, *replica_callbacks, stop_on_signal, nan_guard]
    if run is not None:
        callbacks += [
            AtomicModelCheckpoint(
                run.model_file(name), monitor="val_loss", save_best_only=True,
                initial_value_threshold=state.best if state else None,
                save_as=portable_copy(config) if config.data_format != "channels_last" else None,
            ),
            keras.callbacks.CSVLogger(str(run.history_file(name)), append=resume),
        ]
        if tensorboard:
            callbacks.append(keras.callbacks.TensorBoard(str(run.tensorboard_dir(name))))
    callbacks.append(early_stopping)
    # After EarlyStopping restores the best weights: statistics that match them.
    sync = next((c for c in replica_callbacks if hasattr(c, "average_statistics")), None)
    recalibrate = RecalibrateBatchNorm(
        splits.x_train, config.batch_size, checkpoint=next((c for c in callbacks if isinstance(c, AtomicModelCheckpoint)), None),
        seed=config.seed, average=sync.average_statistics if sync is not None else None,
    )
    callbacks.append(recalibrate)
    if run is not None:
        # fit.json before the backup, which Keras deletes when fit ends; the
        # backup comes last, so it marks an epoch whose checkpoint and CSV row are written.
        callbacks.append(RecordFitEnd(run.fit_file(name), facts))
        callbacks.append(keras.callbacks.BackupAndRestore(str(run.backup_dir(name)), double_checkpoint=True))
    y_train = keras.utils.to_categorical(splits.y_train, fdata.NUM_CLASSES)
    y_val = keras.utils.to_categorical(splits.y_val, fdata.NUM_CLASSES)
    if replicas.mode == "torchrun":
        loader, set_epoch = distributed.shard(splits.x_train, y_train, replicas, config.batch_size, config.seed)
        training_data = {"x": loader, "shuffle": False}  # the sampler shuffles
        callbacks.insert(0, set_epoch)
    else:
        training_data = {"x": splits.x_train, "y": y_train, "batch_size": config.batch_size}
    with fastpath.training(model, model.optimizer, enabled=config.fast_path) as fast_path:
        timing.update(start=time.perf_counter(), fast_path=fast_path)
        try:
            model.fit(
                **training_data,
                validation_data=(splits.x_val, y_val),
                validation_batch_size=config.batch_size,
                epochs=config.epochs,
                callbacks=callbacks,
                verbose=verbose if replicas.is_chief else 0,
            )
        finally:
            stop_on_signal.restore()
    if stop_on_signal.requested is not None:  # a signal after the last batch
        raise Interrupted(stop_on_signal.requested)
    return FitResult(model, read_history(run.history_file(name)) if run is not None else _rows(history_log), facts())


def _rows(history: keras.callbacks.History) -> list[dict]:
    return [{"epoch": epoch, **{k: float(v[i]) for k, v in history.history.items()}} for i, epoch in enumerate(history.epoch)]


def _best_epoch(history: list[dict]) -> int | None:
    """The 1-based epoch of the lowest finite val_loss (the one EarlyStopping restores), or None."""
    finite = [row for row in history if math.isfinite(row.get("val_loss", math.nan))]
    return min(finite, key=lambda row: row["val_loss"])["epoch"] + 1 if finite else None


def final_metrics(run: RunDir, config: TrainConfig, splits: Splits, facts: dict) -> tuple[keras.Model, dict]:
    """The saved best model of ``config.model``, loaded from ``run``, and its metrics.

    The metrics describe exactly the file a user gets: ``model.keras`` is
    loaded back and evaluated on the validation and test splits (in the
    ``channels_last`` layout it is saved in).

    Raises:
        TrainingInterrupted: no model was saved (the loss was NaN from the start).
        NonFiniteOutputs: the saved model gives NaN or infinite outputs.
        loading.ModelLoadError: ``model.keras`` is damaged.
    """
    config = config.resolved()
    model_file = run.model_file(config.model)
    if not model_file.exists():
        raise TrainingInterrupted(
            f"the loss became NaN or infinite in epoch {facts.get('nan_epoch') or 1} before any model was "
            f"saved; try a lower --learning-rate (was {config.learning_rate:g})."
        )
    best = load_model(model_file)
    portable = splits.in_format("channels_last")
    metrics = {
        "model": config.model,
        "test": evaluate(best, portable.x_test, portable.y_test),
        "validation": evaluate(best, portable.x_val, portable.y_val),
        **facts,
        "num_params": int(best.count_params()),
        "num_train": int(len(splits.x_train)),
        "num_val": int(len(splits.x_val)),
        "num_test": int(len(splits.x_test)),
    }
    return best, metrics


def dtype_policy_name(mixed_precision: bool) -> str:
    """``mixed_float16`` on a GPU, ``mixed_bfloat16`` on CPU, else ``float32``."""
    if not mixed_precision:
        return "float32"
    from fmnist_keras.backend import has_gpu

    return "mixed_float16" if has_gpu() else "mixed_bfloat16"


@contextlib.contextmanager
def dtype_policy(mixed_precision: bool):
    """Build layers under a mixed-precision policy, then restore the global one."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype_policy_name(mixed_precision))
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)



"""Train one model on prepared data and write its run directory.

Imports Keras at module level: import this only after
:func:`fmnist_keras.backend.select_backend`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from pathlib import Path

import keras
import numpy as np

from fmnist_keras import data as fdata
from fmnist_keras import distributed, fastpath
from fmnist_keras.backend import training_data_format
from fmnist_keras.callbacks import (
    BACKUP_DIR,
    AtomicModelCheckpoint,
    CtrlC,
    NaNGuard,
    backed_up_epochs,
    ResumableEarlyStopping,
    read_history,
    resume_state,
)
from fmnist_keras.config import TrainConfig
from fmnist_keras.loading import load_model
from fmnist_keras.metrics import classification_metrics
from fmnist_keras.models import build_model

MODEL_FILE = "model.keras"
HISTORY_FILE = "history.csv"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.json"


@dataclasses.dataclass
class Splits:
    """Model-ready arrays: float32 images with a channel axis, int labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray

    @property
    def data_format(self) -> str:
        """``channels_first`` for (N, 1, 28, 28) images, else ``channels_last``."""
        return "channels_first" if self.x_train.shape[1] == 1 else "channels_last"

    def in_format(self, data_format: str) -> "Splits":
        """The same images in ``data_format`` (views, no copy)."""
        if data_format == self.data_format:
            return self
        source, target = (1, -1) if self.data_format == "channels_first" else (-1, 1)
        return dataclasses.replace(
            self, **{name: np.moveaxis(getattr(self, name), source, target) for name in ("x_train", "x_val", "x_test")}
        )


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
    return Splits(
        x_train=fdata.to_model_input(x_train[train_idx], data_format),
        y_train=y_train[train_idx].astype(np.int64),
        x_val=fdata.to_model_input(x_train[val_idx], data_format),
        y_val=y_train[val_idx].astype(np.int64),
        x_test=fdata.to_model_input(x_test, data_format),
        y_test=y_test.astype(np.int64),
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


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray) -> dict:
    """Metrics of ``model`` on (x, y); the loss is plain (unsmoothed) cross-entropy."""
    probabilities = predict_probabilities(model, x)
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


def train(
    config: TrainConfig,
    splits: Splits,
    run_dir: Path,
    resume: bool = False,
    verbose="auto",
    replicas: distributed.Replicas = distributed.SINGLE,
) -> dict:
    """Fit ``config.model`` with Keras's callbacks and write the run directory.

    Callbacks: EarlyStopping (val_loss, best weights restored), an atomic
    ModelCheckpoint (best model as ``model.keras``), CSVLogger,
    TerminateOnNaN and BackupAndRestore (state after every epoch, so an
    interrupted run resumes where it stopped). The best model is then loaded
    back from disk and evaluated, so ``metrics.json`` describes exactly the
    file a user gets.

    The model trains in the layout of ``splits`` (by default the backend's
    fast one, see :func:`fmnist_keras.backend.training_data_format`) and is
    saved ``channels_last``, which every backend loads (:func:`portable_copy`).

    Args:
        config: the run configuration.
        splits: model-ready arrays from :func:`make_splits`.
        run_dir: this model's run directory.
        resume: continue from the backup in ``run_dir`` (optimizer state,
            epoch counter, EarlyStopping state and history carry over).
        verbose: Keras's progress-bar setting.
        replicas: the data-parallel replicas (:func:`fmnist_keras.distributed.setup`);
            under torchrun every rank calls this, rank 0 alone writes files.

    Returns:
        The metrics (also written to ``metrics.json``); an empty dict on the
        ranks other than 0.

    Raises:
        TrainingInterrupted: the loss became NaN or infinite; ``metrics.json``
            is still written for the last good checkpoint.
    """
    if config.data_format not in ("auto", splits.data_format):
        raise ValueError(
            f"the configuration asks to train in {config.data_format} but the splits are {splits.data_format}; "
            f"make them with make_splits(raw, config)."
        )
    # Train in the splits' layout; config.json records it for --resume.
    config = dataclasses.replace(config.resolved(), data_format=splits.data_format)
    chief = replicas.is_chief
    if resume and replicas.distributed:
        raise ValueError("--resume of a distributed run is not supported; resume it in one process.")
    run_dir = Path(run_dir) if chief else None  # the other ranks write nothing
    if chief:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / CONFIG_FILE)
    model_file, history_file = (run_dir / MODEL_FILE, run_dir / HISTORY_FILE) if chief else (None, None)
    # torchrun replicas draw their own dropout masks and augmentations (rank 0's
    # initial weights are broadcast to all); everything else uses config.seed.
    seed = config.seed + replicas.rank
    keras.utils.set_random_seed(seed)
    with dtype_policy(config.mixed_precision):
        model = build_model(config.model, data_format=config.data_format, seed=seed)
    steps_per_epoch = math.ceil(len(splits.x_train) / config.batch_size)
    compile_model(model, config, steps_per_epoch)

    state = resume_state(run_dir, model_file, history_file) if resume else None
    epochs_before = backed_up_epochs(run_dir) if resume else 0
    early_stopping = ResumableEarlyStopping(
        monitor="val_loss", patience=config.patience, restore_best_weights=True, verbose=int(chief),
        initial_state=state,
    )
    nan_guard = NaNGuard()
    ctrl_c = CtrlC()
    callbacks = [*distributed.callbacks(replicas), ctrl_c, nan_guard]
    if chief:
        callbacks += [
            AtomicModelCheckpoint(
                model_file, monitor="val_loss", save_best_only=True,
                initial_value_threshold=state.best if state else None,
                save_as=portable_copy(config) if config.data_format != "channels_last" else None,
            ),
            keras.callbacks.CSVLogger(str(history_file), append=resume),
        ]
    callbacks.append(early_stopping)
    if chief:
        # Last, so a backup marks an epoch whose checkpoint and CSV row are written.
        callbacks.append(keras.callbacks.BackupAndRestore(str(run_dir / BACKUP_DIR), double_checkpoint=True))
    y_train = keras.utils.to_categorical(splits.y_train, fdata.NUM_CLASSES)
    y_val = keras.utils.to_categorical(splits.y_val, fdata.NUM_CLASSES)
    if replicas.mode == "torchrun":
        loader, set_epoch = distributed.shard(splits.x_train, y_train, replicas, config.batch_size, config.seed)
        training_data = {"x": loader, "shuffle": False}  # the sampler shuffles
        callbacks.insert(0, set_epoch)
    else:
        training_data = {"x": splits.x_train, "y": y_train, "batch_size": config.batch_size}
    with fastpath.training(model, model.optimizer, enabled=config.fast_path) as fast_path:
        start = time.perf_counter()
        try:
            model.fit(
                **training_data,
                validation_data=(splits.x_val, y_val),
                validation_batch_size=config.batch_size,
                epochs=config.epochs,
                callbacks=callbacks,
                verbose=verbose if chief else 0,
            )
        finally:
            ctrl_c.restore()
        train_time = time.perf_counter() - start
    if ctrl_c.requested:  # Ctrl-C after the last batch
        raise KeyboardInterrupt
    digests = distributed.replica_digests(model, replicas) if replicas.mode != "single" else None  # every rank
    if not chief:
        return {}
    history = read_history(history_file)
    if not model_file.exists():
        raise TrainingInterrupted(
            f"the loss became NaN or infinite in epoch {(nan_guard.epoch or 0) + 1} before any model was "
            f"saved; try a lower --learning-rate (was {config.learning_rate:g})."
        )
    best = load_model(model_file)
    portable = splits.in_format("channels_last")  # the layout of the saved model
    finite = [row for row in history if math.isfinite(row["val_loss"])]
    metrics = {
        "model": config.model,
        "test": evaluate(best, portable.x_test, portable.y_test),
        "validation": evaluate(best, portable.x_val, portable.y_val),
        "epochs_run": len(history),
        "best_epoch": min(finite, key=lambda row: row["val_loss"])["epoch"] + 1 if finite else None,
        "stopped_early": early_stopping.stopped_epoch > 0,
        "terminated_on_nan": nan_guard.stopped,
        "resumed": state is not None,
        "train_time_s": round(train_time, 2),
        "seconds_per_epoch": round(train_time / max(1, len(history) - epochs_before), 2),
        "num_params": int(model.count_params()),
        "num_train": int(len(splits.x_train)),
        "num_val": int(len(splits.x_val)),
        "num_test": int(len(splits.x_test)),
        "mixed_precision": dtype_policy_name(config.mixed_precision),
        "training_data_format": config.data_format,
        "fast_path": fast_path,
        "keras_version": keras.__version__,
    }
    if digests is not None:
        metrics["distributed"] = {
            **replicas.describe(config.batch_size),
            "replica_weight_digests": digests,
            "replicas_identical": len(set(digests)) == 1,
        }
    write_metrics(run_dir, metrics)
    if nan_guard.stopped:
        raise TrainingInterrupted(
            f"the loss became NaN or infinite in epoch {nan_guard.epoch + 1}; training stopped and the last "
            f"good checkpoint {model_file} (epoch {metrics['best_epoch']}) is kept and evaluated. "
            f"Try a lower --learning-rate (was {config.learning_rate:g})."
        )
    return metrics


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


def write_metrics(run_dir: Path, metrics: dict) -> None:
    (Path(run_dir) / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")

"""Train one model on prepared data and write its run directory.

Imports Keras at module level: import this only after
:func:`fmnist_keras.backend.select_backend`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import keras
import numpy as np

from fmnist_keras import data as fdata
from fmnist_keras.config import TrainConfig
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


def make_splits(raw, config: TrainConfig, data_format: str | None = None) -> Splits:
    """Stratified, seeded train/validation split of the training set; the test set untouched."""
    data_format = data_format or keras.config.image_data_format()
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


def train(config: TrainConfig, splits: Splits, run_dir: Path, verbose="auto") -> dict:
    """Fit ``config.model`` with EarlyStopping, ModelCheckpoint and CSVLogger; write the run directory.

    The best model (lowest validation loss) is saved as ``model.keras``;
    it is then loaded back from disk and evaluated, so ``metrics.json``
    describes exactly the file a user gets.

    Returns:
        The metrics written to ``metrics.json``.
    """
    config = config.resolved()
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config.save(run_dir / CONFIG_FILE)
    keras.utils.set_random_seed(config.seed)
    model = build_model(config.model, seed=config.seed)
    steps_per_epoch = math.ceil(len(splits.x_train) / config.batch_size)
    compile_model(model, config, steps_per_epoch)
    early_stopping = keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=config.patience, restore_best_weights=True, verbose=1
    )
    callbacks = [
        early_stopping,
        keras.callbacks.ModelCheckpoint(run_dir / MODEL_FILE, monitor="val_loss", save_best_only=True),
        keras.callbacks.CSVLogger(str(run_dir / HISTORY_FILE)),
    ]
    y_train = keras.utils.to_categorical(splits.y_train, fdata.NUM_CLASSES)
    y_val = keras.utils.to_categorical(splits.y_val, fdata.NUM_CLASSES)
    start = time.perf_counter()
    history = model.fit(
        splits.x_train,
        y_train,
        validation_data=(splits.x_val, y_val),
        epochs=config.epochs,
        batch_size=config.batch_size,
        callbacks=callbacks,
        verbose=verbose,
    )
    train_time = time.perf_counter() - start
    best = keras.saving.load_model(run_dir / MODEL_FILE)
    metrics = {
        "model": config.model,
        "test": evaluate(best, splits.x_test, splits.y_test),
        "validation": evaluate(best, splits.x_val, splits.y_val),
        "epochs_run": len(history.history["loss"]),
        "best_epoch": int(early_stopping.best_epoch) + 1,
        "train_time_s": round(train_time, 2),
        "seconds_per_epoch": round(train_time / max(1, len(history.history["loss"])), 2),
        "num_params": int(model.count_params()),
        "num_train": int(len(splits.x_train)),
        "num_val": int(len(splits.x_val)),
        "num_test": int(len(splits.x_test)),
        "keras_version": keras.__version__,
    }
    return metrics


def write_metrics(run_dir: Path, metrics: dict) -> None:
    (Path(run_dir) / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")

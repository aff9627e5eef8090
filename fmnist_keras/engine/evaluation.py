"""Evaluate a model on labelled images, and the final metrics of a saved best model.

Imports Keras: import this only after :func:`fmnist_keras.backend.select_backend`.
"""

from __future__ import annotations

import keras
import numpy as np

from fmnist_keras import data as fdata
from fmnist_keras.config import TrainConfig
from fmnist_keras.engine.splits import Splits
from fmnist_keras.loading import input_data_format, load_model
from fmnist_keras.metrics import TTA_NAMES, classification_metrics
from fmnist_keras.rundir import RunDir


class TrainingInterrupted(RuntimeError):
    """Training stopped before any model was saved (NaN loss from the start)."""


def predict_probabilities(model: keras.Model, x: np.ndarray, flip_tta: bool = False,
                          batch_size: int = 512) -> np.ndarray:
    """The model's class probabilities for the images ``x`` (in the model's layout), as float64.

    With ``flip_tta``, the mean of the probabilities of each image and of its
    mirror image (flipped left to right): test-time augmentation for models
    trained with horizontal flips. The images are flipped in numpy
    (:func:`fmnist_keras.data.mirror_images`), the same on every backend.
    """
    probabilities = np.asarray(model.predict(x, batch_size=batch_size, verbose=0), dtype=np.float64)
    if flip_tta:
        mirrored = fdata.mirror_images(x, input_data_format(model))
        probabilities = (probabilities + np.asarray(model.predict(mirrored, batch_size=batch_size, verbose=0),
                                                    dtype=np.float64)) / 2
    return probabilities


class NonFiniteOutputs(ValueError):
    """The model's outputs are NaN or infinite: its weights are broken."""


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, flip_tta: bool = False) -> dict:
    """Metrics of ``model`` on (x, y); the loss is plain (unsmoothed) cross-entropy.

    ``flip_tta``: of the probabilities averaged with the mirror images'
    (:func:`predict_probabilities`).

    Raises:
        NonFiniteOutputs: the model gives NaN or infinite probabilities.
    """
    probabilities = predict_probabilities(model, x, flip_tta)
    if not np.isfinite(probabilities).all():
        raise NonFiniteOutputs(f"model {model.name} gives NaN or infinite outputs, so its weights are not finite")
    loss = float(-np.mean(np.log(np.clip(probabilities[np.arange(len(y)), y], 1e-12, 1.0))))
    return classification_metrics(y, probabilities, fdata.CLASS_NAMES, loss=loss)


def final_metrics(run: RunDir, config: TrainConfig, splits: Splits, facts: dict) -> tuple[keras.Model, dict]:
    """The saved best model of ``config.model``, loaded from ``run``, and its metrics.

    The metrics describe exactly the file a user gets: ``model.keras`` is
    loaded back and evaluated on the validation and test splits (in the
    ``channels_last`` layout it is saved in), with the run's test-time
    augmentation (``config.flip_tta``).

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
        **facts,  # what fit recorded; what is computed here comes after it and wins
        "model": config.model,
        "test": evaluate(best, portable.x_test, portable.y_test, config.flip_tta),
        "validation": evaluate(best, portable.x_val, portable.y_val, config.flip_tta),
        "test_time_augmentation": TTA_NAMES[config.flip_tta],
        "num_params": int(best.count_params()),
        "num_train": int(len(splits.x_train)),
        "num_val": int(len(splits.x_val)),
        "num_test": int(len(splits.x_test)),
    }
    return best, metrics

"""Evaluate a model on labelled images, and the final metrics of a saved best model.

Imports Keras: import this only after :func:`fmnist_keras.backend.select_backend`.
"""

from __future__ import annotations

from typing import NamedTuple

import keras
import numpy as np

from fmnist_keras import data as fdata
from fmnist_keras.config import TrainConfig
from fmnist_keras.engine import fastpath
from fmnist_keras.engine.splits import Splits
from fmnist_keras.loading import input_data_format, load_model
from fmnist_keras.metrics import classification_metrics
from fmnist_keras.rundir import RunDir
from fmnist_keras.tta import TTA


class TrainingInterrupted(RuntimeError):
    """Training stopped before any model was saved (NaN loss from the start)."""


# Images per predict call: 128-256 predict the CNN at about the same speed, and 512 more slowly (docs/speed.md,
# "Inference"); 256 gives the probabilities that the documented accuracies were measured with.
PREDICT_BATCH = 256


def predict_probabilities(model: keras.Model, x: np.ndarray, tta: TTA = TTA(),
                          batch_size: int = PREDICT_BATCH, fast_path: bool = True) -> np.ndarray:
    """The model's class probabilities for the images ``x`` (in the model's layout), as float64.

    With test-time augmentation ``tta``, the mean of the probabilities of the
    views of each image (its mirror image for models trained with horizontal
    flips, its copies shifted by a pixel for models trained with shifts),
    made in numpy (:mod:`fmnist_keras.tta`), the same on every backend.

    ``fast_path``: on torch, predict with :func:`fmnist_keras.engine.fastpath.active`
    (the same probabilities as stock Keras, 1.2-2 times as fast on a CPU); the model
    keeps its direct layer calls, and Keras gets its own functions back.
    """
    with fastpath.active(model, enabled=fast_path):
        return tta.mean(lambda view: model.predict(view, batch_size=batch_size, verbose=0), x,
                        input_data_format(model))


class NonFiniteOutputs(ValueError):
    """The model's outputs are NaN or infinite: its weights are broken."""


def score(probabilities: np.ndarray, y: np.ndarray, name: str) -> dict:
    """Metrics of the class ``probabilities`` of model ``name`` against the
    labels ``y``; the loss is plain (unsmoothed) cross-entropy.

    Raises:
        NonFiniteOutputs: some probabilities are NaN or infinite.
    """
    if not np.isfinite(probabilities).all():
        raise NonFiniteOutputs(f"model {name} gives NaN or infinite outputs, so its weights are not finite")
    loss = float(-np.mean(np.log(np.clip(probabilities[np.arange(len(y)), y], 1e-12, 1.0))))
    return classification_metrics(y, probabilities, fdata.CLASS_NAMES, loss=loss)


def evaluate(model: keras.Model, x: np.ndarray, y: np.ndarray, tta: TTA = TTA(), fast_path: bool = True) -> dict:
    """Metrics of ``model`` on (x, y) (:func:`score`).

    ``tta`` and ``fast_path``: as :func:`predict_probabilities` takes them.

    Raises:
        NonFiniteOutputs: the model gives NaN or infinite probabilities.
    """
    return score(predict_probabilities(model, x, tta, fast_path=fast_path), y, model.name)


class FinalResult(NamedTuple):
    """The saved best model, its metrics, and its test-set probabilities (with the run's TTA)."""

    model: keras.Model
    metrics: dict
    test_probabilities: np.ndarray


def final_metrics(run: RunDir, config: TrainConfig, splits: Splits, facts: dict) -> FinalResult:
    """The saved best model of ``config.model``, loaded from ``run``, its
    metrics, and its test-set probabilities (for the report, which then does
    not predict the views again).

    The metrics describe exactly the file a user gets: ``model.keras`` is
    loaded back and evaluated on the validation and test splits (in the
    ``channels_last`` layout it is saved in), with the run's test-time
    augmentation (``config.flip_tta`` and ``config.shift_tta``).

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
    tta = TTA.of(config)
    test_probabilities = predict_probabilities(best, portable.x_test, tta, fast_path=config.fast_path)
    metrics = {
        **facts,  # what fit recorded; what is computed here comes after it and wins
        "model": config.model,
        "test": score(test_probabilities, portable.y_test, best.name),
        "validation": evaluate(best, portable.x_val, portable.y_val, tta, fast_path=config.fast_path),
        "test_time_augmentation": tta.name,
        "num_params": int(best.count_params()),
        "num_train": int(len(splits.x_train)),
        "num_val": int(len(splits.x_val)),
        "num_test": int(len(splits.x_test)),
    }
    return FinalResult(best, metrics, test_probabilities)

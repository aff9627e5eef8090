"""The train/validation/test arrays a model is trained on, in the layout it trains in.

Imports Keras: import this only after :func:`fmnist_keras.backend.select_backend`.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from fmnist_keras import data as fdata
from fmnist_keras.backend import training_data_format
from fmnist_keras.config import TrainConfig


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
    """Stratified train/validation split of the training set; the test set untouched.

    ``config.splitting_seed`` draws the split (and ``config.subset``). Images
    come in ``data_format``, by default the layout ``config`` trains in
    (:func:`data_format_of`).
    """
    data_format = data_format or data_format_of(config)
    (x_train, y_train), (x_test, y_test) = raw
    if config.subset is not None:
        keep = fdata.stratified_subset(y_train, config.subset, config.splitting_seed)
        x_train, y_train = x_train[keep], y_train[keep]
    train_idx, val_idx = fdata.stratified_split(y_train, config.val_split, config.splitting_seed)
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

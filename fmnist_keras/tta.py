"""Test-time augmentation: the views of each image whose predicted probabilities are averaged.

The views are made in numpy, the same on every backend, so a saved model
stays the plain network. numpy only: no Keras import here.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

# (rows, columns) each view moves the image by: the image itself, then one pixel up, down, left and right.
SHIFTS = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))


@dataclasses.dataclass(frozen=True)
class TTA:
    """Which views of an image a prediction averages over."""

    flip: bool = False  # each view and its mirror image (flipped left to right)
    shift: bool = False  # the image and its copies moved by one pixel up, down, left and right (zero fill)

    @property
    def name(self) -> str:
        """What ``metrics.json``, ``evaluation.json`` and ``predict --json`` call it."""
        return NAMES[self]

    @classmethod
    def of(cls, config) -> TTA:
        """The TTA a :class:`fmnist_keras.config.TrainConfig` asks for (its ``flip_tta`` and ``shift_tta``,
        the model's defaults where unset)."""
        config = config.resolved()
        return cls(flip=config.flip_tta, shift=config.shift_tta)

    @classmethod
    def named(cls, name) -> TTA | None:
        """The TTA of a :attr:`name`; None for a name no TTA has."""
        return next((tta for tta, its_name in NAMES.items() if its_name == name), None)

    def views(self, x: np.ndarray, data_format: str = "channels_last") -> Iterator[np.ndarray]:
        """The views of the model-ready images ``x``, the images themselves first."""
        for rows, columns in SHIFTS if self.shift else SHIFTS[:1]:
            moved = shift_images(x, rows, columns, data_format) if (rows, columns) != (0, 0) else x
            yield moved
            if self.flip:
                yield mirror_images(moved, data_format)

    def mean(self, predict: Callable[[np.ndarray], np.ndarray], x: np.ndarray, data_format: str = "channels_last",
             own: np.ndarray | None = None) -> np.ndarray:
        """The mean of ``predict(view)`` over the views of ``x``, as float64.

        ``own``: ``predict(x)`` where it is already computed, so the images themselves are not predicted twice.
        """
        total, count = None, 0
        for view in self.views(x, data_format):
            probabilities = own if count == 0 and own is not None else predict(view)
            probabilities = np.asarray(probabilities, dtype=np.float64)
            total = probabilities if total is None else total + probabilities
            count += 1
        return total / count


NAMES = {
    TTA(): "none",
    TTA(flip=True): "mean over the image and its mirror image",
    TTA(shift=True): "mean over the image and its copies shifted by one pixel up, down, left and right",
    TTA(flip=True, shift=True): "mean over the image, its copies shifted by one pixel up, down, left and right, "
                                "and the mirror images of all five",
}
# What --tta of evaluate and predict takes (besides "run": the model's run's own).
CHOICES = {"none": TTA(), "flip": TTA(flip=True), "shifts": TTA(shift=True), "flip-shifts": TTA(flip=True, shift=True)}


def mirror_images(x: np.ndarray, data_format: str = "channels_last") -> np.ndarray:
    """Model-ready images flipped left to right, as a contiguous copy."""
    width = -2 if data_format == "channels_last" else -1
    return np.ascontiguousarray(np.flip(x, axis=width))


def shift_images(x: np.ndarray, rows: int, columns: int, data_format: str = "channels_last") -> np.ndarray:
    """Model-ready images moved down by ``rows`` and right by ``columns`` pixels (negative: up, left).

    The uncovered edge is 0, the background, as the training shifts fill it.
    """
    height = 1 if data_format == "channels_last" else 2
    source, target = [slice(None)] * x.ndim, [slice(None)] * x.ndim
    for axis, step in ((height, rows), (height + 1, columns)):
        size = x.shape[axis]
        target[axis] = slice(max(step, 0), size + min(step, 0))
        source[axis] = slice(max(-step, 0), size - max(step, 0))
    moved = np.zeros_like(x)
    moved[tuple(target)] = x[tuple(source)]
    return moved

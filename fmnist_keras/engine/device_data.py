"""The training split kept on the compute device, sliced there batch by batch.

``fit`` on numpy arrays copies every batch from host memory to the device.
:class:`DeviceBatches` copies the images and labels to the device once; each
batch is then a ``take`` along a shuffled index that also lives on the device,
and the augmentation runs there too (it is Keras layers). One small copy per
epoch remains: the new order, drawn from a seeded host generator.

Pass ``fit`` its :meth:`DeviceBatches.fit_inputs`: the batches with
``shuffle=False``, as they shuffle themselves (Keras would otherwise shuffle the
order of its batches as well), and on TensorFlow in a ``tf.data`` pipeline
without autotuning (see :mod:`fmnist_keras.engine.host_batches`). ``tf.data``
runs on the host, so there each batch goes through host memory on its way to
the model, as it does in Keras's own pipeline for a ``PyDataset``.

With ``cutmix`` > 0 that fraction of the batches is mixed with CutMix (Yun et
al. 2019): one box per batch, pasted in each image from another image of the
batch, the one-hot labels mixed by the box's area. The mixing needs soft
labels, so it happens here, where the batch and its labels meet, not in the
model (the model's augmentation layers see images only).

Imports Keras: import this only after :func:`fmnist_keras.backend.select_backend`.
"""

from __future__ import annotations

import keras
import numpy as np

from fmnist_keras.engine.host_batches import without_autotuning


class DeviceBatches(keras.utils.PyDataset):
    """Batches of ``(x, y)`` sliced on the device, in a new seeded order every epoch.

    Args:
        x, y: the whole training split (numpy), copied to the device once; ``y`` one-hot, or
            class probabilities (distillation targets).
        batch_size: images per batch; the last batch of an epoch may be smaller.
        shuffle: draw a new order every epoch (else the arrays' order).
        seed: seeds the orders and the mixing.
        cutmix: the fraction of batches mixed with CutMix (:func:`cutmix`); 0: none.
        data_format: the layout of ``x``; None: ``keras.config.image_data_format()``.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool = True, seed: int = 0,
                 cutmix: float = 0.0, data_format: str | None = None):
        super().__init__(workers=1, use_multiprocessing=False)
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"x and y need the same, non-zero number of rows, got {len(x)} and {len(y)}")
        self.x, self.y = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
        self.size, self.batch_size, self.shuffle, self.cutmix = len(x), batch_size, shuffle, checked_cutmix(cutmix)
        self.channels_last = (data_format or keras.config.image_data_format()) == "channels_last"
        self._rng = np.random.default_rng(seed)
        self._mix_rng = np.random.default_rng([seed, 1])  # the orders stay those of cutmix=0
        self._order = None
        self.on_epoch_end()

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)

    def __getitem__(self, index: int):
        rows = self._order[index * self.batch_size: (index + 1) * self.batch_size]
        x, y = keras.ops.take(self.x, rows, axis=0), keras.ops.take(self.y, rows, axis=0)
        if self.cutmix and self._mix_rng.random() < self.cutmix:
            x, y = cutmix(x, y, self._mix_rng, self.channels_last)
        return x, y

    def on_epoch_end(self) -> None:
        order = self._rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        self._order = keras.ops.convert_to_tensor(order.astype("int32"))

    def fit_inputs(self) -> dict:
        """``model.fit``'s training-data arguments for these batches, with ``shuffle=False``: on
        TensorFlow a ``tf.data.Dataset`` of them without autotuning, elsewhere the batches themselves.

        Keras's own TensorFlow pipeline for a ``PyDataset`` autotunes its prefetching, and then an
        epoch can start seconds late, waiting for the autotuner (``host_batches``). Each pass over
        the dataset draws a new order when it starts, not after its last batch: Keras reads one
        epoch's batches from a pass and drops it, so code after the last batch would run only if the
        prefetching happened to read past the end before that.
        """
        if keras.backend.backend() != "tensorflow":
            return {"x": self, "shuffle": False}
        import tensorflow as tf  # the TensorFlow backend has imported it already

        def one_pass():
            self.on_epoch_end()
            for index in range(len(self)):
                yield self[index]

        signature = tuple(tf.TensorSpec((None, *tensor.shape[1:]), tensor.dtype) for tensor in (self.x, self.y))
        batches = tf.data.Dataset.from_generator(one_pass, output_signature=signature)
        batches = batches.apply(tf.data.experimental.assert_cardinality(len(self))).prefetch(2)
        return {"x": without_autotuning(batches), "shuffle": False}


def checked_cutmix(fraction: float) -> float:
    """``fraction`` if it is a fraction of batches (0 to 1), else ValueError (nan too)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"cutmix is the fraction of batches to mix, from 0 to 1; got {fraction}")
    return fraction


def cutmix(x, y, rng: np.random.Generator, channels_last: bool = True):
    """One batch mixed with CutMix: one box (:func:`cutmix_box`) pasted in each image from the image at
    the same row of a shuffled copy of the batch, the one-hot labels mixed by the area the box covers.

    ``x`` and ``y`` are numpy arrays or tensors of any backend; the result is the backend's tensors.
    """
    height, width = x.shape[1:3] if channels_last else x.shape[2:4]
    box = cutmix_box(rng, height, width)
    box = box[None, :, :, None] if channels_last else box[None, None]
    kept = 1.0 - float(box.sum()) / box.size
    partner = keras.ops.convert_to_tensor(rng.permutation(len(y)).astype("int32"))
    x, y = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
    box = keras.ops.convert_to_tensor(box, dtype=x.dtype)
    x = x * (1.0 - box) + keras.ops.take(x, partner, axis=0) * box
    y = y * kept + keras.ops.take(y, partner, axis=0) * (1.0 - kept)
    return x, y


def cutmix_box(rng: np.random.Generator, height: int, width: int, alpha: float = 1.0) -> np.ndarray:
    """A (height, width) float32 mask, 1 inside one CutMix box and 0 elsewhere.

    As in Yun et al. (2019): the box's sides are ``sqrt(1 - lam)`` of the image's, with ``lam`` drawn
    from Beta(``alpha``, ``alpha``), its centre uniform over the image, clipped at the edges (so a box
    at an edge covers less, and the labels are mixed by what it covers).
    """
    side = np.sqrt(1.0 - rng.beta(alpha, alpha))
    h, w = int(height * side), int(width * side)
    cy, cx = rng.integers(height), rng.integers(width)
    top, bottom = np.clip([cy - h // 2, cy + h // 2], 0, height)
    left, right = np.clip([cx - w // 2, cx + w // 2], 0, width)
    box = np.zeros((height, width), "float32")
    box[top:bottom, left:right] = 1.0
    return box

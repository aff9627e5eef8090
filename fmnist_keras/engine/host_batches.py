"""The training split in host memory, as ``model.fit`` takes it on each backend.

On torch and JAX, ``fit`` gets the numpy arrays and Keras batches them. On
TensorFlow, Keras would build a ``tf.data`` pipeline whose autotuning runs a
background thread, and ending each epoch's iterator waits for that thread's
current sleep, which grows with the run: on a 2-core CPU some of the default
CNN's epochs started up to 30 s late (docs/backends.md, "TensorFlow's input
pipeline"). :func:`tensorflow_batches` is the same vectorised gather (batches
taken from the whole split along a seeded order drawn anew each epoch) with the
autotuning off, so no training epoch waits for it. Validation keeps Keras's
pipeline: its wait is bounded by its own pass, a second or two. Keras's pipeline
for a ``PyDataset`` autotunes too, so ``DeviceBatches.fit_inputs``
(:mod:`fmnist_keras.engine.device_data`) turns it off with
:func:`without_autotuning` as well.

Imports Keras: import this only after :func:`fmnist_keras.backend.select_backend`.
"""

from __future__ import annotations

import keras
import numpy as np


def fit_inputs(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> dict:
    """``model.fit``'s training-data arguments for ``x`` and ``y``, shuffled anew every epoch: on TensorFlow
    :func:`tensorflow_batches` (which shuffles itself, seeded by ``seed``), elsewhere the arrays for
    Keras to batch and shuffle (``seed`` unused: Keras's global seed decides)."""
    if keras.backend.backend() == "tensorflow":
        return {"x": tensorflow_batches(x, y, batch_size, seed=seed), "shuffle": False}
    return {"x": x, "y": y, "batch_size": batch_size}


def tensorflow_batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0, shuffle: bool = True):
    """A ``tf.data.Dataset`` of ``(x, y)`` batches without tf.data's autotuning.

    Args:
        x, y: the whole split, one row per image; ``y`` one-hot labels or class probabilities.
        batch_size: rows per batch; the last batch of an epoch may be smaller.
        seed: seeds the orders, one per epoch (each pass over the dataset), with TensorFlow's
            global seed (``keras.utils.set_random_seed``).
        shuffle: draw a new order every epoch (else the arrays' order).
    """
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"x and y need the same, non-zero number of rows, got {len(x)} and {len(y)}")
    import tensorflow as tf  # the TensorFlow backend has imported it already

    x, y = (_floatx(a) for a in (x, y))
    rows = tf.data.Dataset.range(len(x))
    if shuffle:
        rows = rows.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    # The arrays become tensors once; each batch gathers its rows from them.
    whole = tf.data.Dataset.from_tensors((x, y)).repeat()
    batches = tf.data.Dataset.zip((rows.batch(batch_size), whole)).map(
        lambda index, arrays: (tf.gather(arrays[0], index), tf.gather(arrays[1], index)), num_parallel_calls=2
    ).prefetch(2)
    return without_autotuning(batches)


def without_autotuning(dataset):
    """``dataset`` (a ``tf.data.Dataset``) with tf.data's autotuning off, and none of its graph rewrites
    (as Keras's own pipeline from arrays)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.apply_default_optimizations = False
    return dataset.with_options(options)


def _floatx(array: np.ndarray) -> np.ndarray:
    """Floating-point ``array`` in Keras's float type, as Keras's own pipeline casts it (one-hot labels
    from ``keras.utils.to_categorical`` are float64); any other dtype as it is."""
    array = np.asarray(array)
    return array.astype(keras.config.floatx(), copy=False) if np.issubdtype(array.dtype, np.floating) else array

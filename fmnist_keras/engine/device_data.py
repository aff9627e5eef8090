"""The training split kept on the compute device, sliced there batch by batch.

``fit`` on numpy arrays copies every batch from host memory to the device.
:class:`DeviceBatches` copies the images and labels to the device once; each
batch is then a ``take`` along a shuffled index that also lives on the device,
and the augmentation runs there too (it is Keras layers). One small copy per
epoch remains: the new order, drawn from a seeded host generator.

Pass it to ``fit`` with ``shuffle=False``: it shuffles itself (Keras would
otherwise shuffle the order of its batches as well).

Imports Keras: import this only after :func:`fmnist_keras.backend.select_backend`.
"""

from __future__ import annotations

import keras
import numpy as np


class DeviceBatches(keras.utils.PyDataset):
    """Batches of ``(x, y)`` sliced on the device, in a new seeded order every epoch.

    Args:
        x, y: the whole training split (numpy), copied to the device once.
        batch_size: images per batch; the last batch of an epoch may be smaller.
        shuffle: draw a new order every epoch (else the arrays' order).
        seed: seeds the orders.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool = True, seed: int = 0):
        super().__init__(workers=1, use_multiprocessing=False)
        if len(x) != len(y) or len(x) == 0:
            raise ValueError(f"x and y need the same, non-zero number of rows, got {len(x)} and {len(y)}")
        self.x, self.y = keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)
        self.size, self.batch_size, self.shuffle = len(x), batch_size, shuffle
        self._rng = np.random.default_rng(seed)
        self._order = None
        self.on_epoch_end()

    def __len__(self) -> int:
        return -(-self.size // self.batch_size)

    def __getitem__(self, index: int):
        rows = self._order[index * self.batch_size: (index + 1) * self.batch_size]
        return keras.ops.take(self.x, rows, axis=0), keras.ops.take(self.y, rows, axis=0)

    def on_epoch_end(self) -> None:
        order = self._rng.permutation(self.size) if self.shuffle else np.arange(self.size)
        self._order = keras.ops.convert_to_tensor(order.astype("int32"))

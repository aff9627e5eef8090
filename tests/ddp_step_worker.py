"""One data-parallel training step, run by ``tests/test_distributed.py``.

Under torchrun (2 processes) each rank takes 16 of the same 32 images per
step through :func:`fmnist_keras.engine.distributed.shard`; alone, one process takes
all 32 in one batch. The weights after the step must be the same. Writes rank
0's (or the lone process's) weights after one step of each optimizer to
``OUT/<optimizer>.npz``.

Usage: python tests/ddp_step_worker.py OUT_DIR   (or under torchrun)
"""

import sys
from pathlib import Path

import numpy as np

from fmnist_keras.backend import select_backend

select_backend("torch", "cpu")

import keras  # noqa: E402

from fmnist_keras.engine import distributed, fastpath  # noqa: E402
from fmnist_keras.config import TrainConfig  # noqa: E402
from fmnist_keras.engine.recipe import compile_model  # noqa: E402

GLOBAL_BATCH = 32


def model_and_data():
    """No dropout, BatchNorm or augmentation: nothing that differs per rank but the data."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((28, 28, 1)),
        keras.layers.Flatten(),
        keras.layers.Dense(32, activation="relu", name="hidden"),
        keras.layers.Dense(10, activation="softmax", name="logits"),
    ])
    rng = np.random.default_rng(0)
    x = rng.random((GLOBAL_BATCH, 28, 28, 1), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, GLOBAL_BATCH), 10)
    return model, x, y


def one_step(optimizer: str, replicas) -> list[np.ndarray]:
    model, x, y = model_and_data()
    if optimizer == "sgd":
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5), loss="categorical_crossentropy")
    else:  # the project's recipe: fused AdamW with decoupled weight decay, label smoothing
        compile_model(model, TrainConfig(model="mlp", epochs=1, learning_rate=1e-2).resolved(), steps_per_epoch=1)
    with fastpath.active(model, model.optimizer):
        if replicas.distributed:
            loader, set_epoch = distributed.shard(x, y, replicas, GLOBAL_BATCH, seed=0)
            model.fit(loader, epochs=1, shuffle=False, verbose=0,
                      callbacks=[set_epoch, *distributed.callbacks(replicas)])
        else:
            model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 1
    return model.get_weights()


def main(out_dir: str) -> int:
    replicas = distributed.setup("torch", False, GLOBAL_BATCH)
    try:
        for optimizer in ("sgd", "recipe"):
            weights = one_step(optimizer, replicas)
            if replicas.is_chief:
                np.savez(Path(out_dir) / f"{optimizer}.npz", *weights)
    finally:
        distributed.shutdown(replicas)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

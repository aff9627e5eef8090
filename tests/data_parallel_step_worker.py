"""One data-parallel training step, run by ``tests/test_distributed.py``.

* torch: under torchrun (2 processes) each rank takes 16 of the same 32 images
  per step through :func:`fmnist_keras.engine.distributed.shard`; alone, one
  process takes all 32 in one batch.
* jax: with ``--distribute`` Keras's ``DataParallel`` splits each batch of 32
  over the host devices (XLA_FLAGS decides how many); without it, one device
  takes the whole batch.

The weights after the step must be the same. Writes rank 0's (or the lone
process's) weights after one step of each optimizer to ``OUT/<optimizer>.npz``,
and to ``OUT/replicas.txt`` how many replicas held them (torchrun: the world
size; jax: the devices the first weight lives on).

Usage: python tests/data_parallel_step_worker.py OUT_DIR [torch | jax [--distribute]]
       (torch also under torchrun)
"""

import sys
from pathlib import Path

import numpy as np

from fmnist_keras.backend import select_backend

BACKEND = sys.argv[2] if len(sys.argv) > 2 else "torch"
select_backend(BACKEND, "cpu")

import keras  # noqa: E402

from fmnist_keras.engine import distributed, fastpath  # noqa: E402
from fmnist_keras.config import TrainConfig  # noqa: E402
from fmnist_keras.engine.recipe import compile_model  # noqa: E402

GLOBAL_BATCH = 32


def model_and_data():
    """No dropout, BatchNorm or augmentation: nothing that differs per replica but the data."""
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


def replica_count(model, replicas) -> int:
    if BACKEND == "jax":
        return len(model.weights[0].value.sharding.device_set)
    return replicas.world_size


def one_step(optimizer: str, replicas) -> tuple[list[np.ndarray], int]:
    model, x, y = model_and_data()
    if optimizer == "sgd":
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.5), loss="categorical_crossentropy")
    else:  # the project's recipe: fused AdamW with decoupled weight decay, label smoothing
        compile_model(model, TrainConfig(model="mlp", epochs=1, learning_rate=1e-2).resolved(), steps_per_epoch=1)
    with fastpath.active(model, model.optimizer):
        if replicas.mode == "torchrun":
            loader, set_epoch = distributed.shard(x, y, replicas, GLOBAL_BATCH, seed=0)
            model.fit(loader, epochs=1, shuffle=False, verbose=0,
                      callbacks=[set_epoch, *distributed.callbacks(replicas)])
        else:  # one process; on jax --distribute, Keras splits the batch over the devices
            model.fit(x, y, batch_size=GLOBAL_BATCH, epochs=1, shuffle=False, verbose=0)
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == 1
    return model.get_weights(), replica_count(model, replicas)


def main(out_dir: str) -> int:
    replicas = distributed.setup(BACKEND, "--distribute" in sys.argv, GLOBAL_BATCH)
    try:
        for optimizer in ("sgd", "recipe"):
            weights, count = one_step(optimizer, replicas)
            if replicas.is_chief:
                np.savez(Path(out_dir) / f"{optimizer}.npz", *weights)
                (Path(out_dir) / "replicas.txt").write_text(f"{count}\n")
    finally:
        distributed.shutdown(replicas)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

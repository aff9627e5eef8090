"""What the benchmarks time: a :class:`Runner` per way of training, and the Keras ones.

Shared by ``bench.py`` (seconds per epoch) and ``overhead.py`` (host ms per
step at a tiny batch). Importing this does not import Keras.
"""

from __future__ import annotations

import contextlib
import os
import resource
import statistics
import time


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def set_threads(threads: int | None) -> int:
    """Use ``threads`` CPU threads for torch's kernels (None: torch's default); returns the number in use.

    One thread per process keeps timings stable on a machine whose cores other
    processes share: several processes that each spin up one OpenMP thread per
    core slow tiny kernels by orders of magnitude.
    """
    import keras

    if keras.backend.backend() != "torch":
        return os.cpu_count() or 1
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def cuda():
    """torch.cuda when Keras computes on a CUDA GPU, else None."""
    import keras

    if keras.backend.backend() != "torch":
        return None
    import torch

    return torch.cuda if torch.cuda.is_available() else None


class Runner:
    """One way of training a model: ``epoch()`` runs one timed epoch, ``result()`` measures the rest."""

    def __init__(self, model, label, epoch, infer):
        self.model, self.label, self._epoch, self._infer = model, label, epoch, infer
        self.times, self.peak_mb = [], 0.0

    def epoch(self):
        gpu = cuda()
        if gpu:
            gpu.reset_peak_memory_stats()
        start = time.perf_counter()
        self._epoch()
        self.times.append(time.perf_counter() - start)
        if gpu:
            self.peak_mb = max(self.peak_mb, gpu.max_memory_allocated() / 2**20)

    @property
    def s_per_epoch(self) -> float:
        """Median of the timed epochs (the first is warm-up when there are more)."""
        return statistics.median(self.times[1:] or self.times)

    def result(self, num_train, x_test, y_test):
        import numpy as np

        start = time.perf_counter()
        predicted = self._infer(x_test)
        infer = time.perf_counter() - start
        epoch = self.s_per_epoch
        return {
            "model": self.model, "path": self.label, "s_per_epoch": epoch, "epoch_times": self.times,
            "train_img_s": num_train / epoch, "infer_img_s": len(x_test) / infer,
            "peak_mb": self.peak_mb or None, "test_acc": float((np.asarray(predicted) == y_test).mean()),
        }


def keras_runner(name, splits, epochs: int, batch_size: int, fast: bool, mixed_precision: bool = False):
    """A Keras model trained with ``model.fit``; ``fast`` as ``train`` does it, else stock Keras.

    ``fast`` also feeds the data as ``train`` does: on a GPU from the training
    split kept on the device (``DeviceBatches``), on a CPU from ``host_batches``,
    and on TensorFlow either way through ``tf.data`` without autotuning; stock
    Keras fits from numpy arrays.
    ``mixed_precision`` builds it under ``train``'s mixed policy (bfloat16 on a
    CPU, float16 on a GPU) instead of float32.

    Returns the :class:`Runner`, the model and its initial weights (for a twin).
    The runner's ``fit(callbacks)`` is one untimed epoch with more callbacks.
    """
    import keras
    import numpy as np

    from fmnist_keras.backend import has_gpu
    from fmnist_keras.engine import fastpath
    from fmnist_keras.config import TrainConfig
    from fmnist_keras.models import build_model
    from fmnist_keras.engine.recipe import compile_model, dtype_policy

    # No moving average of the weights: the twins keep none, and each fit(epochs=1) would end on it.
    config = TrainConfig(model=name, epochs=epochs, batch_size=batch_size, fast_path=fast, ema=0.0,
                         mixed_precision=mixed_precision).resolved()
    keras.utils.set_random_seed(0)
    with dtype_policy(mixed_precision):
        model = build_model(name, data_format=splits.data_format, seed=0)
    initial_weights = [np.array(w) for w in model.get_weights()]
    compile_model(model, config, -(-len(splits.x_train) // batch_size))
    if fast:
        fastpath.enable(model, model.optimizer)
    y = keras.utils.to_categorical(splits.y_train, 10)
    if fast and has_gpu():
        from fmnist_keras.engine.device_data import DeviceBatches

        data = DeviceBatches(splits.x_train, y, batch_size).fit_inputs()
    elif fast:
        from fmnist_keras.engine.host_batches import fit_inputs

        data = fit_inputs(splits.x_train, y, batch_size, seed=0)
    else:
        data = {"x": splits.x_train, "y": y, "batch_size": batch_size}

    def scope():
        return contextlib.nullcontext() if fast else fastpath.stock_keras()

    def epoch(callbacks=()):
        with scope():
            model.fit(**data, epochs=1, verbose=0, callbacks=list(callbacks))

    def infer(x):
        with scope():
            return np.argmax(model.predict(x, batch_size=512, verbose=0), 1)

    backend = keras.backend.backend()
    label = f"keras {'fast' if fast else 'stock'}" if backend in ("torch", "tensorflow") else f"keras/{backend}"
    runner = Runner(name, label, epoch, infer)
    runner.fit = epoch
    return runner, model, initial_weights


if __name__ == "__main__":
    import outputs  # benchmarks/ is on sys.path when a script there runs

    raise SystemExit(outputs.not_a_script("runner.py"))

"""Shared fixtures: tiny IDX files written by the tests themselves.

The backend comes from KERAS_BACKEND (default torch) and is fixed before
any test imports keras.
"""

import gc
import gzip
import os
import shutil
import signal
import sys
from pathlib import Path

import numpy as np
import pytest

from fmnist_keras.backend import default_backend  # imports no keras

# Keras ignores an empty KERAS_BACKEND (it falls back to keras.json), so an empty one counts as unset.
os.environ["KERAS_BACKEND"] = default_backend()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


# setup.cfg runs the tests in several processes (pytest-xdist). Each gets its share of the cores
# for torch's threads, set before torch loads and passed on to the processes the tests start, so the
# test processes do not fight over the cores; an OMP_NUM_THREADS of your own wins.
TEST_PROCESSES = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS_PER_PROCESS = max(1, _cores() // TEST_PROCESSES)
if TEST_PROCESSES > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS_PER_PROCESS))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if os.environ["KERAS_BACKEND"] == "tensorflow":
    import torch  # noqa: F401  (torch must load before tensorflow in one process)

from fmnist_keras import data as fdata  # noqa: E402

REAL_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")

def only_on(backend: str, reason: str) -> pytest.MarkDecorator:
    """Skip unless the tests run on `backend`.

    Keras takes its backend from KERAS_BACKEND, set above, so this needs no import of keras.
    """
    return pytest.mark.skipif(os.environ["KERAS_BACKEND"] != backend, reason=reason)


on_tensorflow = only_on("tensorflow", "fit gets a tf.data pipeline on the TensorFlow backend only")


def lose_a_signal_in_a_gc_callback(signum, went_on: list):
    """As in jax's callback, which Keras imports: the handler's exception cannot leave the callback, and
    Python only reports it as "Exception ignored in: <function callback ...>"; ``went_on`` records whether
    the code after the collection ran."""
    fired = []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(phase)
            os.kill(os.getpid(), signum)
            for _ in range(1000):  # the handler runs here, inside the callback
                pass

    gc.callbacks.append(callback)
    try:
        gc.collect()
        went_on.append("after the collection")
    finally:
        if callback in gc.callbacks:
            gc.callbacks.remove(callback)
    assert fired, "the callback did not run"


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX: magic, big-endian sizes, then the data."""
    header = bytes((0, 0, 0x08, array.ndim)) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def synthetic_images(labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Learnable images: each class lights a different 7x7 patch, plus noise."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 4)
        images[i, row * 7 + 2: row * 7 + 9, col * 7: col * 7 + 7] = 230
    return images


def random_images_and_one_hot_labels(n: int = 100):
    """n seeded random 28x28x1 float32 images and one-hot labels of random classes."""
    import keras

    rng = np.random.default_rng(0)
    return rng.random((n, 28, 28, 1), dtype=np.float32), keras.utils.to_categorical(rng.integers(0, 10, n), 10)


def small_seeded_classifier():
    """A Flatten-Dense-Dense classifier with seeded weights under plain SGD: two fits of it on the
    same batches in the same order end with the same weights."""
    import keras

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    return model


def linear_classifier(optimizer, seed: int = 0):
    """A seeded Flatten-Dense softmax classifier of 28x28x1 images (a Fashion-MNIST-shaped model, so the
    project's loading checks accept its checkpoints), compiled with ``optimizer`` and cross-entropy."""
    import keras

    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    return model


def assert_trains_exactly_like_the_arrays(batches_in_order):
    """Fit a small seeded classifier for two epochs on ``batches_in_order(x, y, 16)``, 100 images in
    batches of 16 in the arrays' order, and another on the arrays themselves (``shuffle=False``): both
    take 14 steps (7 batches, the last of 4) and end with the same weights, to 1e-6."""
    import keras

    x, y = random_images_and_one_hot_labels()
    reference = small_seeded_classifier()
    reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    batched = small_seeded_classifier()
    batched.fit(batches_in_order(x, y, 16), epochs=2, shuffle=False, verbose=0)
    assert int(keras.ops.convert_to_numpy(batched.optimizer.iterations)) == 14
    for a, b in zip(reference.get_weights(), batched.get_weights()):
        np.testing.assert_allclose(b, a, atol=1e-6)


def images_numbered_by_row(n: int = 50):
    """n random images whose first pixel is the image's row number, and targets of ten copies of that
    number: the rows of each batch, and whether each image kept its own target, can be read back."""
    x, _ = random_images_and_one_hot_labels(n)
    x[:, 0, 0, 0] = np.arange(n)
    return x, np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 10), np.float32)


def _rows_of_an_epoch(batches) -> list[int]:
    """The row numbers of one epoch's images (:func:`images_numbered_by_row`, batches of 8, the last
    of 2), in order, read the way Keras reads ``batches``: a ``PyDataset`` by index, then
    ``on_epoch_end``; a ``tf.data.Dataset`` by taking one epoch's batches from a new iterator."""
    import keras

    if isinstance(batches, keras.utils.PyDataset):
        pairs = [batches[i] for i in range(len(batches))]
        batches.on_epoch_end()
    else:
        iterator = iter(batches)
        pairs = [next(iterator) for _ in range(int(batches.cardinality()))]
    pairs = [tuple(keras.ops.convert_to_numpy(t) for t in pair) for pair in pairs]
    assert [len(x) for x, _ in pairs] == [8] * 6 + [2]
    assert all((x[:, 0, 0, 0] == y[:, 0]).all() for x, y in pairs)  # each image keeps its own target
    return [int(row) for x, _ in pairs for row in x[:, 0, 0, 0]]


def assert_each_epoch_is_a_new_seeded_permutation(seeded_batches):
    """Read epochs of ``seeded_batches(x, y, 8, seed)`` over 50 numbered images: each epoch is a
    permutation of all rows with their own targets, two epochs differ and neither is the arrays'
    order, seed 3 gives the same first epoch again and seed 4 another."""
    x, y = images_numbered_by_row(50)
    batches = seeded_batches(x, y, 8, 3)
    first, second = _rows_of_an_epoch(batches), _rows_of_an_epoch(batches)
    assert sorted(first) == list(range(50)) and sorted(second) == list(range(50))
    assert first != second and first != list(range(50))
    assert _rows_of_an_epoch(seeded_batches(x, y, 8, 3)) == first  # seeded
    assert _rows_of_an_epoch(seeded_batches(x, y, 8, 4)) != first


def write_idx_dir(directory: Path, n_train: int = 400, n_test: int = 100, compress: bool = True, seed: int = 0):
    """Write the four Fashion-MNIST files of a tiny synthetic data set; return the arrays."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y_train = np.tile(np.arange(10, dtype=np.uint8), n_train // 10)
    rng.shuffle(y_train)
    y_test = np.tile(np.arange(10, dtype=np.uint8), n_test // 10)
    x_train, x_test = synthetic_images(y_train, seed), synthetic_images(y_test, seed + 1)
    arrays = {
        "train-images-idx3-ubyte": x_train,
        "train-labels-idx1-ubyte": y_train,
        "t10k-images-idx3-ubyte": x_test,
        "t10k-labels-idx1-ubyte": y_test,
    }
    for name, array in arrays.items():
        payload = idx_bytes(array)
        if compress:
            (directory / f"{name}.gz").write_bytes(gzip.compress(payload))
        else:
            (directory / name).write_bytes(payload)
    return (x_train, y_train), (x_test, y_test)


@pytest.fixture(autouse=True)
def cpu_without_bfloat16(monkeypatch):
    """Runs that leave the precision open compute in float32, as on a CPU without bfloat16 instructions, so a
    test's numbers do not depend on the machine that runs it; the tests of the bfloat16 default set it."""
    from fmnist_keras import backend

    monkeypatch.setattr(backend, "CPUINFO", os.devnull)


@pytest.fixture
def tiny_data_dir(tmp_path):
    directory = tmp_path / "idx"
    write_idx_dir(directory)
    return directory


@pytest.fixture(scope="session")
def finished_run_template(tmp_path_factory):
    """A finished two-epoch MLP run without a report (float32 on every CPU), trained once per test process:
    ``runs/run/mlp/...``. Tests take a copy of it from ``finished_run``."""
    from fmnist_keras import train

    template = tmp_path_factory.mktemp("finished")
    write_idx_dir(template / "idx")
    argv = ["--data-dir", str(template / "idx"), "--no-verify", "--out-dir", str(template / "runs"),
            "--run-name", "run", "--model", "mlp", "--epochs", "2", "--batch-size", "32", "--no-report"]
    assert train.main(argv) == 0
    return template / "runs"


@pytest.fixture
def finished_run(tmp_path, finished_run_template):
    """A copy of the finished run for one test to change: tmp_path/runs/run/mlp/...

    Its config.json names the template's data directory, which no test changes.
    """
    shutil.copytree(finished_run_template, tmp_path / "runs", symlinks=True)
    return tmp_path / "runs" / "run"


@pytest.fixture
def isolated_env(tmp_path, monkeypatch):
    """No FMNIST_DATA_DIR and an empty Keras cache, so lookups are predictable."""
    monkeypatch.delenv(fdata.ENV_VAR, raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    return tmp_path


@pytest.fixture
def fast_path_requests(monkeypatch):
    """What each ``fastpath.active`` block is asked for (its ``enabled``), in order; the blocks run as asked."""
    from fmnist_keras.engine import fastpath

    asked, active = [], fastpath.active

    def recorded(model, optimizer=None, enabled=True):
        asked.append(enabled)
        return active(model, optimizer, enabled)

    monkeypatch.setattr(fastpath, "active", recorded)
    return asked


def real_data_available() -> bool:
    return all(
        (REAL_DATA_DIR / f"{name}.gz").is_file() or (REAL_DATA_DIR / name).is_file() for name in fdata.FILES
    )


requires_real_data = pytest.mark.skipif(
    not real_data_available(),
    reason=f"real Fashion-MNIST not in {REAL_DATA_DIR}; apt-get install dataset-fashion-mnist",
)


def without_tensorflow_logs(stderr: str) -> str:
    """``stderr`` without the lines TensorFlow's C++ logging writes as it starts (docs/backends.md: they cannot
    be turned off), so that a command's own one line can be checked on every backend."""
    import re

    chatter = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)"
                         r"|[IWEF]\d{4} [\d:. ]+\d+ \S+:\d+\])")  # I0000 00:00:17… 31942 cuda_platform.cc:52]
    return "".join(line for line in stderr.splitlines(keepends=True) if not chatter.match(line))

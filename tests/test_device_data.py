"""The training split on the device: the same training as from numpy arrays, new seeded orders every epoch."""

import keras
import numpy as np

from fmnist_keras import data as fdata
from fmnist_keras.config import TrainConfig
from fmnist_keras.engine import fit
from fmnist_keras.engine.device_data import DeviceBatches
from fmnist_keras.engine.splits import make_splits


def _model():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10, activation="softmax")])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="categorical_crossentropy")
    return model


def _data(n=100):
    rng = np.random.default_rng(0)
    return rng.random((n, 28, 28, 1), dtype=np.float32), keras.utils.to_categorical(rng.integers(0, 10, n), 10)


def test_device_batches_train_exactly_like_numpy_arrays_in_the_same_order():
    x, y = _data()
    reference = _model()
    reference.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)  # 7 batches, the last of 4
    on_device = _model()
    on_device.fit(DeviceBatches(x, y, 16, shuffle=False), epochs=2, shuffle=False, verbose=0)
    assert int(keras.ops.convert_to_numpy(on_device.optimizer.iterations)) == 14
    for a, b in zip(reference.get_weights(), on_device.get_weights()):
        np.testing.assert_allclose(b, a, atol=1e-6)


def test_every_epoch_is_a_new_seeded_permutation_of_all_rows():
    x, y = _data(50)
    x[:, 0, 0, 0] = np.arange(50)  # each image carries its row number

    def epoch_rows(batches):
        rows = [keras.ops.convert_to_numpy(batches[i][0])[:, 0, 0, 0] for i in range(len(batches))]
        batches.on_epoch_end()
        return np.concatenate(rows).astype(int)

    batches = DeviceBatches(x, y, 8, seed=3)
    first, second = epoch_rows(batches), epoch_rows(batches)
    assert sorted(first) == list(range(50)) and sorted(second) == list(range(50))
    assert list(first) != list(second) and list(first) != list(range(50))
    again = DeviceBatches(x, y, 8, seed=3)
    assert list(epoch_rows(again)) == list(first)  # seeded


def test_fit_model_trains_from_the_device_and_says_so(tiny_data_dir):
    raw = fdata.load_data(str(tiny_data_dir), verify=False)
    config = TrainConfig(model="mlp", epochs=3, batch_size=32, data_dir=str(tiny_data_dir), verify=False)
    splits = make_splits(raw, config)
    result = fit.fit_model(config, splits, verbose=0, data_on_device=True)
    assert result.facts["training_data_on_device"] is True and len(result.history) == 3
    probabilities = keras.ops.convert_to_numpy(result.model.predict(splits.x_val, verbose=0))
    assert (probabilities.argmax(axis=1) == splits.y_val).mean() >= 0.5  # it learned (chance: 0.1)

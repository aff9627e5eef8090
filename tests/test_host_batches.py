"""The training split from host memory: on TensorFlow a tf.data pipeline without autotuning that trains
exactly like Keras's own from the arrays, with a new seeded order every epoch; elsewhere the arrays."""

import keras
import numpy as np
import pytest

from conftest import (assert_each_epoch_is_a_new_seeded_permutation, assert_trains_exactly_like_the_arrays,
                      on_tensorflow, random_images_and_one_hot_labels)
from fmnist_keras import data as fdata
from fmnist_keras.config import TrainConfig
from fmnist_keras.engine import fit, host_batches
from fmnist_keras.engine.host_batches import fit_inputs, tensorflow_batches
from fmnist_keras.engine.splits import make_splits


def test_fit_gets_the_arrays_except_on_tensorflow():
    x, y = random_images_and_one_hot_labels(20)
    inputs = fit_inputs(x, y, 8, seed=0)
    if keras.backend.backend() == "tensorflow":
        assert set(inputs) == {"x", "shuffle"} and inputs["shuffle"] is False  # it shuffles itself
        assert inputs["x"].options().autotune.enabled is False  # unset, it is None
    else:
        assert inputs == {"x": x, "y": y, "batch_size": 8}


@pytest.mark.parametrize("rows", [(10, 9), (0, 0)])
def test_rows_that_do_not_pair_up_are_refused(rows):
    with pytest.raises(ValueError, match="same, non-zero number of rows"):
        tensorflow_batches(np.zeros((rows[0], 28, 28, 1)), np.zeros((rows[1], 10)), 4)


@on_tensorflow
def test_tensorflow_batches_train_exactly_like_numpy_arrays_in_the_same_order():
    assert_trains_exactly_like_the_arrays(lambda x, y, batch_size: tensorflow_batches(x, y, batch_size, shuffle=False))


@on_tensorflow
def test_every_epoch_is_a_new_seeded_permutation_of_all_rows_with_their_labels():
    assert_each_epoch_is_a_new_seeded_permutation(lambda x, y, size, seed: tensorflow_batches(x, y, size, seed=seed))


@on_tensorflow
def test_an_order_mixes_the_whole_split_and_labels_come_in_kerass_float_type():
    n = 2000
    x = np.arange(n, dtype=np.float32).reshape(n, 1)
    y = keras.utils.to_categorical(np.arange(n) % 10, 10)  # float64, as fit_model passes them
    batches = list(tensorflow_batches(x, y, 8, seed=0))
    assert {yb.dtype.name for _, yb in batches} == {keras.config.floatx()}  # Keras's own pipeline casts them too
    order = np.concatenate([xb.numpy().ravel() for xb, _ in batches])
    # A full shuffle puts about 125 of the last quarter's rows in the first quarter of the order; a
    # shuffle buffer of a few batches, or of 1,024 rows, puts few or none there.
    assert (order[: n // 4] >= 3 * n // 4).sum() > 60


@on_tensorflow
def test_fit_model_trains_from_the_pipeline_on_tensorflow(tiny_data_dir, monkeypatch):
    raw = fdata.load_data(str(tiny_data_dir), verify=False)
    config = TrainConfig(model="mlp", epochs=3, batch_size=32, data_dir=str(tiny_data_dir), verify=False, seed=7)
    splits = make_splits(raw, config)
    calls, original = [], host_batches.tensorflow_batches

    def spy(x, y, batch_size, seed=0, shuffle=True):
        calls.append((len(x), batch_size, seed, shuffle))
        return original(x, y, batch_size, seed=seed, shuffle=shuffle)

    monkeypatch.setattr(host_batches, "tensorflow_batches", spy)
    result = fit.fit_model(config, splits, verbose=0)
    assert calls == [(len(splits.x_train), 32, 7, True)] and len(result.history) == 3
    assert result.facts["training_data_on_device"] is False
    probabilities = keras.ops.convert_to_numpy(result.model.predict(splits.x_val, verbose=0))
    assert (probabilities.argmax(axis=1) == splits.y_val).mean() >= 0.5  # it learned (chance: 0.1)

"""The training split on the device: the same training as from numpy arrays, new seeded orders every epoch."""

import keras
import numpy as np
import pytest

from conftest import (assert_each_epoch_is_a_new_seeded_permutation, assert_trains_exactly_like_the_arrays,
                      images_numbered_by_row, on_tensorflow, random_images_and_one_hot_labels,
                      small_seeded_classifier)
from fmnist_keras import data as fdata
from fmnist_keras.config import TrainConfig
from fmnist_keras.engine import fit
from fmnist_keras.engine.device_data import DeviceBatches, cutmix
from fmnist_keras.engine.splits import make_splits


@pytest.mark.parametrize("through_fit_inputs", [False, pytest.param(True, marks=on_tensorflow)])
def test_device_batches_train_exactly_like_numpy_arrays_in_the_same_order(through_fit_inputs):
    def batches_in_order(x, y, batch_size):
        batches = DeviceBatches(x, y, batch_size, shuffle=False)
        return batches.fit_inputs()["x"] if through_fit_inputs else batches

    assert_trains_exactly_like_the_arrays(batches_in_order)


def test_fit_gets_the_batches_themselves_except_on_tensorflow():
    batches = DeviceBatches(*random_images_and_one_hot_labels(20), 8)
    inputs = batches.fit_inputs()
    assert set(inputs) == {"x", "shuffle"} and inputs["shuffle"] is False  # they shuffle themselves
    if keras.backend.backend() == "tensorflow":
        options = inputs["x"].options()
        assert options.autotune.enabled is False  # unset, it is None
        assert options.experimental_optimization.apply_default_optimizations is False
        assert int(inputs["x"].cardinality()) == 3  # Keras knows the steps of the first epoch too
        images, labels = inputs["x"].element_spec
        assert images.shape.as_list() == [None, 28, 28, 1] and labels.shape.as_list() == [None, 10]
        first_images, first_labels = batches[0]
        assert (images.dtype, labels.dtype) == (first_images.dtype, first_labels.dtype)  # as the batches come
    else:
        assert inputs["x"] is batches


@pytest.mark.parametrize("through_fit_inputs", [False, pytest.param(True, marks=on_tensorflow)])
def test_every_epoch_is_a_new_seeded_permutation_of_all_rows(through_fit_inputs):
    def seeded_batches(x, y, batch_size, seed):
        batches = DeviceBatches(x, y, batch_size, seed=seed)
        return batches.fit_inputs()["x"] if through_fit_inputs else batches

    assert_each_epoch_is_a_new_seeded_permutation(seeded_batches)


@on_tensorflow
def test_each_epoch_of_a_fit_on_tensorflow_reads_one_new_permutation_once(monkeypatch):
    x, _ = images_numbered_by_row(50)
    y = keras.utils.to_categorical(np.arange(50) % 10, 10)  # one-hot, for the classifier to fit
    read, original = [], DeviceBatches.__getitem__

    def spy(self, index):
        batch = original(self, index)
        read.append(keras.ops.convert_to_numpy(batch[0])[:, 0, 0, 0].astype(int))
        return batch

    monkeypatch.setattr(DeviceBatches, "__getitem__", spy)
    batches = DeviceBatches(x, y, 8, seed=3)
    small_seeded_classifier().fit(**batches.fit_inputs(), epochs=3, verbose=0)
    assert len(read) == 3 * 7  # each epoch's batches once, none of a pass that Keras starts and drops
    epochs = [[int(row) for rows in read[k * 7: k * 7 + 7] for row in rows] for k in range(3)]
    assert all(sorted(rows) == list(range(50)) for rows in epochs)
    assert len({tuple(rows) for rows in epochs}) == 3  # a new order every epoch


def test_fit_model_trains_from_the_device_and_says_so(tiny_data_dir):
    raw = fdata.load_data(str(tiny_data_dir), verify=False)
    config = TrainConfig(model="mlp", epochs=3, batch_size=32, data_dir=str(tiny_data_dir), verify=False)
    splits = make_splits(raw, config)
    result = fit.fit_model(config, splits, verbose=0, data_on_device=True)
    assert result.facts["training_data_on_device"] is True and len(result.history) == 3
    probabilities = keras.ops.convert_to_numpy(result.model.predict(splits.x_val, verbose=0))
    assert (probabilities.argmax(axis=1) == splits.y_val).mean() >= 0.5  # it learned (chance: 0.1)


def _numbered(n=16, channels_last=True):
    """Images whose every pixel is the image's row number, and one-hot labels of distinct classes per row."""
    x = np.repeat(np.arange(n, dtype=np.float32), 28 * 28).reshape(n, 28, 28, 1)
    return (x if channels_last else x.transpose(0, 3, 1, 2)), np.eye(n, dtype=np.float32)


@pytest.mark.parametrize("channels_last", [True, False])
def test_cutmix_pastes_one_box_from_another_image_and_mixes_the_labels_by_its_area(channels_last):
    x, y = _numbered(channels_last=channels_last)
    for draw in range(5):
        mixed = cutmix(x, y, np.random.default_rng(draw), channels_last)
        mixed_x, mixed_y = (keras.ops.convert_to_numpy(t) for t in mixed)
        mixed_x = mixed_x if channels_last else mixed_x.transpose(0, 2, 3, 1)
        np.testing.assert_allclose(mixed_y.sum(axis=1), 1.0, rtol=1e-6)
        for row in range(len(x)):
            values, counts = np.unique(mixed_x[row], return_counts=True)
            assert set(values) <= {row, *np.flatnonzero(mixed_y[row])}  # its own pixels and its partner's
            partner_area = counts[values != row].sum() / (28 * 28)
            np.testing.assert_allclose(1.0 - mixed_y[row, row], partner_area, atol=1e-6)  # 0 when paired with itself
        pasted = mixed_x != (x if channels_last else x.transpose(0, 2, 3, 1))
        box = pasted.any(axis=(0, 3))  # the same box in every image (a row paired with itself keeps its pixels)
        rows, cols = np.flatnonzero(box.any(axis=1)), np.flatnonzero(box.any(axis=0))
        assert box.any() and not box.all()  # these draws paste a box, never the whole image
        assert box[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].all()  # one rectangle


def test_cutmix_batches_keep_the_order_and_mix_the_given_fraction():
    x, y = _numbered(64)
    plain, mixed = DeviceBatches(x, y, 8, seed=5), DeviceBatches(x, y, 8, seed=5, cutmix=0.5)
    changed = 0
    for i in range(len(plain)):
        (x0, y0), (x1, y1) = plain[i], mixed[i]
        y0, y1 = keras.ops.convert_to_numpy(y0), keras.ops.convert_to_numpy(y1)
        assert (y1[y0 == 1] > 0).all()  # the same rows in the same order: each keeps part of its own label
        changed += not np.allclose(y0, y1)
    assert 0 < changed < len(plain)  # some batches mixed, some not (8 batches at 0.5)
    with pytest.raises(ValueError, match="cutmix is the fraction of batches"):
        DeviceBatches(x, y, 8, cutmix=1.5)


def test_fit_model_mixes_the_batches_of_a_cutmix_configuration(tiny_data_dir, monkeypatch):
    raw = fdata.load_data(str(tiny_data_dir), verify=False)
    config = TrainConfig(model="mlp", epochs=2, batch_size=32, data_dir=str(tiny_data_dir), verify=False, cutmix=1.0)
    splits = make_splits(raw, config)
    seen, original, handed_over = [], DeviceBatches.__getitem__, []

    def spy(self, index):
        x, y = original(self, index)
        seen.append(keras.ops.convert_to_numpy(y))
        return x, y

    monkeypatch.setattr(DeviceBatches, "__getitem__", spy)
    fit_inputs = DeviceBatches.fit_inputs
    monkeypatch.setattr(DeviceBatches, "fit_inputs", lambda self: handed_over.append(self) or fit_inputs(self))
    result = fit.fit_model(config, splits, verbose=0)  # on a CPU: CutMix alone puts the batches on the device
    assert result.facts["training_data_on_device"] is True and len(result.history) == 2
    assert len(handed_over) == 1  # fit got them as each backend takes them
    assert seen and all(np.allclose(y.sum(axis=1), 1.0) for y in seen)
    assert any(((y > 0) & (y < 1)).any() for y in seen)  # soft labels: the batches were mixed


def test_torchrun_batches_are_mixed_on_each_rank_as_well():
    from fmnist_keras.engine.distributed import _Batches

    x, y = _numbered(8)
    first = [keras.ops.convert_to_numpy(t) for t in _Batches(x, y, cutmix=1.0, seed=3)[np.arange(8)]]
    again = [keras.ops.convert_to_numpy(t) for t in _Batches(x, y, cutmix=1.0, seed=3)[np.arange(8)]]
    np.testing.assert_array_equal(first[1], again[1])  # seeded
    assert ((first[1] > 0) & (first[1] < 1)).any() and np.allclose(first[1].sum(axis=1), 1.0)
    other_rank = [keras.ops.convert_to_numpy(t) for t in _Batches(x, y, cutmix=1.0, seed=3, rank=1)[np.arange(8)]]
    assert not np.array_equal(other_rank[1], first[1])  # each rank draws its own boxes
    plain = _Batches(x, y)[np.arange(8)]
    np.testing.assert_array_equal(plain[1], y)
    with pytest.raises(ValueError, match="cutmix is the fraction of batches"):
        _Batches(x, y, cutmix=float("nan"))

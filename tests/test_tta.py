"""Test-time augmentation's views: made in numpy, the same for every backend and layout."""

import numpy as np
import pytest

from fmnist_keras.tta import CHOICES, NAMES, SHIFTS, TTA, mirror_images, shift_images


def _moved_by_padding(x, rows, columns):
    """NHWC images moved by (rows, columns): pad a pixel of zeros all round, then crop (a second way)."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return padded[:, 1 - rows:1 - rows + x.shape[1], 1 - columns:1 - columns + x.shape[2]]


def _images(shape=(3, 6, 5, 2)):
    return np.random.default_rng(0).random(shape).astype(np.float32) + 1  # no zeros of their own


@pytest.mark.parametrize("rows, columns", [*SHIFTS, (1, 1), (-1, -1)])
def test_a_shift_moves_every_pixel_and_fills_the_edge_with_zeros(rows, columns):
    x = _images()
    moved = shift_images(x, rows, columns)
    np.testing.assert_array_equal(moved, _moved_by_padding(x, rows, columns))
    assert moved.dtype == x.dtype and (moved == 0).sum() == x.shape[0] * x.shape[3] * (
        abs(rows) * x.shape[2] + abs(columns) * x.shape[1] - abs(rows * columns))
    first = np.moveaxis(x, -1, 1)  # channels_first: the same images, the same move
    np.testing.assert_array_equal(np.moveaxis(shift_images(first, rows, columns, "channels_first"), 1, -1), moved)
    assert shift_images(x, 0, 0) is not x and np.array_equal(shift_images(x, 0, 0), x)  # a copy


def test_the_views_are_the_image_first_then_its_shifts_each_with_its_mirror_image():
    x = _images()
    expected = []
    for rows, columns in SHIFTS:
        moved = _moved_by_padding(x, rows, columns)
        expected += [moved, moved[:, :, ::-1]]
    views = list(TTA(flip=True, shift=True).views(x))
    assert len(views) == 10 and views[0] is x
    for view, reference in zip(views, expected):
        np.testing.assert_array_equal(view, reference)
    assert [len(list(tta.views(x))) for tta in (TTA(), TTA(flip=True), TTA(shift=True))] == [1, 2, 5]
    first = np.moveaxis(x, -1, 1)
    for view, reference in zip(TTA(flip=True, shift=True).views(first, "channels_first"), expected):
        np.testing.assert_array_equal(np.moveaxis(view, 1, -1), reference)
    np.testing.assert_array_equal(mirror_images(first, "channels_first"), first[..., ::-1])


def test_the_mean_is_over_the_views_and_reuses_the_images_own_prediction():
    x = _images((4, 6, 5, 1))
    weights = np.random.default_rng(1).random((30, 3))

    def predict(images):
        return images.reshape(len(images), -1) @ weights

    tta = TTA(flip=True, shift=True)
    expected = np.mean([predict(view) for view in tta.views(x)], axis=0)
    np.testing.assert_allclose(tta.mean(predict, x), expected, rtol=1e-12)
    calls = []
    own = predict(x)
    reused = tta.mean(lambda images: calls.append(images) or predict(images), x, own=own)
    assert len(calls) == 9  # the images' own prediction is not made again
    np.testing.assert_allclose(reused, expected, rtol=1e-12)
    np.testing.assert_allclose(tta.mean(predict, x, own=own + 1.0), expected + 1.0 / 10, rtol=1e-12)
    assert tta.mean(predict, x).dtype == np.float64
    np.testing.assert_array_equal(TTA().mean(predict, x), predict(x))


def test_every_tta_has_one_name_and_one_choice():
    assert len(set(NAMES.values())) == len(NAMES) == 4
    assert set(CHOICES.values()) == set(NAMES)
    for tta in NAMES:
        assert TTA.named(tta.name) == tta
    assert TTA.named("mean over whatever") is None and TTA.named(None) is None


def test_a_runs_configuration_names_its_tta():
    from fmnist_keras.config import TrainConfig

    assert TTA.of(TrainConfig(model="cnn").resolved()) == TTA(flip=True, shift=True)
    assert TTA.of(TrainConfig(model="cnn-large", shift_tta=False).resolved()) == TTA(flip=True)
    assert TTA.of(TrainConfig(model="mlp").resolved()) == TTA()
    assert TTA.of(TrainConfig(model="mlp", shift_tta=True).resolved()) == TTA(shift=True)
    assert TTA.of(TrainConfig(model="cnn", flip_tta=False)) == TTA(shift=True)  # the model's default where unset

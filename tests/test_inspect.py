"""Feature maps, filters, embeddings, saliency and Grad-CAM on tiny models, on the suite's backend."""

import re

import keras
import numpy as np
import pytest

from fmnist_keras.inspection import internals
from fmnist_keras.models import build_baseline_cnn, build_cnn, build_mlp


def tiny_cnn(seed=0, **kwargs):
    keras.utils.set_random_seed(seed)
    return build_cnn(filters=(4, 8), dense_units=16, seed=seed, **kwargs)


def images(n=3, seed=0, channels_first=False):
    x = np.random.default_rng(seed).random((n, 28, 28, 1), dtype=np.float32)
    return np.moveaxis(x, -1, 1) if channels_first else x


def layer_by_layer(model, x, name):
    """Reference: call the model's layers one at a time, in order, up to ``name``."""
    out = keras.ops.convert_to_tensor(x)
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        out = layer(out, training=False)
        if layer.name == name:
            return keras.ops.convert_to_numpy(out)
    raise AssertionError(f"{name} not reached")


def test_feature_maps_of_a_residual_cnn_are_its_relus_once_each():
    model = tiny_cnn(augment=False, residual=True)
    assert internals.default_feature_layers(model) == ["block1_relu1", "block1_relu2", "block2_relu1", "block2_relu2"]
    x = images(1)
    expected = keras.Model(model.input, model.get_layer("block2_relu2").output)(x, training=False)
    np.testing.assert_allclose(internals.feature_maps(model, x)["block2_relu2"], keras.ops.convert_to_numpy(expected),
                               atol=1e-5)


@pytest.mark.parametrize("builder", ["cnn", "baseline-cnn"])
def test_feature_maps_equal_running_the_layers_one_by_one(builder, tmp_path):
    model = tiny_cnn() if builder == "cnn" else build_baseline_cnn()
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)  # a model from disk, as evaluate uses it
    x = images()
    maps = internals.feature_maps(loaded, x)
    expected_names = (
        ["block1_relu1", "block1_relu2", "block2_relu1", "block2_relu2"]
        if builder == "cnn"
        else ["block1_conv1", "block2_conv1"]
    )
    assert list(maps) == expected_names
    for name in [*expected_names, "block1_pool"] if builder == "cnn" else expected_names:
        got = maps[name] if name in maps else internals.feature_maps(loaded, x, [name])[name]
        np.testing.assert_allclose(got, layer_by_layer(loaded, x, name), atol=1e-5)
    assert maps[expected_names[0]].shape[:3] == (3, 28, 28) or maps[expected_names[0]].shape[:3] == (3, 26, 26)


# TensorFlow runs NCHW convolutions only on a GPU.
channels_first_backend = pytest.mark.skipif(
    keras.backend.backend() == "tensorflow", reason="TensorFlow's CPU Conv2D supports channels_last only"
)


@channels_first_backend
def test_feature_maps_channels_first():
    model = tiny_cnn(augment=False, data_format="channels_first")
    x = images(channels_first=True)
    maps = internals.feature_maps(model, x)
    assert maps["block1_relu1"].shape == (3, 4, 28, 28)
    np.testing.assert_allclose(maps["block2_relu1"], layer_by_layer(model, x, "block2_relu1"), atol=1e-5)


def test_bad_requests_give_one_line_errors():
    model = tiny_cnn()
    with pytest.raises(ValueError, match=r"no layer named 'nope'; valid layer names: .*block1_conv1") as error:
        internals.feature_maps(model, images(1), ["nope"])
    assert "\n" not in str(error.value)
    mlp = build_mlp(units=(8,))
    with pytest.raises(ValueError, match="needs a convolutional layer.*has none") as error:
        internals.feature_maps(mlp, images(1))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="needs a convolutional layer"):
        internals.grad_cam(mlp, images(1))
    with pytest.raises(ValueError, match=r"image index 10 is out of range for 10 test images; choose 0 to 9"):
        internals.check_image_index(10, 10)
    assert internals.check_image_index(-1, 10) == 9


def test_first_layer_filters_are_the_kernel():
    model = tiny_cnn()
    kernel = internals.first_layer_filters(model)
    assert kernel.shape == (3, 3, 1, 4)
    np.testing.assert_array_equal(kernel, keras.ops.convert_to_numpy(model.get_layer("block1_conv1").kernel))


def test_embeddings_probabilities_and_pca():
    model = tiny_cnn()
    x = images(5)
    features, probabilities = internals.embeddings_and_probabilities(model, x, batch_size=2)
    assert features.shape == (5, 16) and probabilities.shape == (5, 10)
    np.testing.assert_allclose(probabilities, keras.ops.convert_to_numpy(model(x, training=False)), atol=1e-5)
    assert internals.embedding_layer_name(build_mlp(units=(8, 6))) == "dense2_relu"
    # PCA: a cloud stretched along one known direction comes back along the first axis.
    rng = np.random.default_rng(0)
    direction = rng.normal(size=6)
    direction /= np.linalg.norm(direction)
    cloud = np.outer(rng.normal(size=200) * 10, direction) + rng.normal(size=(200, 6)) * 0.1
    points, explained = internals.pca_2d(cloud)
    assert points.shape == (200, 2) and explained[0] > 0.99 and explained[0] >= explained[1]
    np.testing.assert_allclose(np.abs(points[:, 0]), np.abs((cloud - cloud.mean(0)) @ direction), rtol=1e-2, atol=0.05)


def test_misclassified_are_wrong_and_sorted_by_confidence():
    y = np.array([0, 1, 2, 3])
    probabilities = np.array([[0.9, 0.1, 0, 0], [0.7, 0.3, 0, 0], [0, 0.4, 0.6, 0], [0, 0.95, 0, 0.05]])
    assert internals.misclassified(y, probabilities).tolist() == [3, 1]
    assert internals.misclassified(y, probabilities, limit=1).tolist() == [3]


def numeric_gradient(fn, x, index, eps=1e-2):
    up, down = x.copy(), x.copy()
    up.flat[index] += eps
    down.flat[index] -= eps
    return (fn(up) - fn(down)) / (2 * eps)


def test_saliency_matches_finite_differences():
    keras.utils.set_random_seed(1)
    model = build_mlp(units=(16,), batch_norm=False, dropout=0.0)
    x = images(2)
    logits = keras.Model(model.inputs, model.get_layer("logits").output)
    target = np.array([3, 7])
    from fmnist_keras.inspection.gradients import input_gradient

    def score(t):
        return keras.ops.take_along_axis(logits([t], training=False), keras.ops.convert_to_tensor(target)[:, None], 1)[:, 0]

    scores, grads = input_gradient(score, x)
    assert scores.shape == (2,) and grads.shape == x.shape
    for index in (100, 400, 784 + 300):
        numeric = numeric_gradient(lambda v: keras.ops.convert_to_numpy(score(keras.ops.convert_to_tensor(v))).sum(), x, index)
        np.testing.assert_allclose(grads.flat[index], numeric, rtol=2e-2, atol=1e-3)
    maps = internals.saliency(model, x, class_indices=target)
    assert maps.shape == (2, 28, 28) and maps.min() >= 0.0 and np.isclose(maps.max(), 1.0)
    np.testing.assert_allclose(maps[0], np.abs(grads[0, ..., 0]) / np.abs(grads[0]).max(), atol=1e-6)


def grad_cam_reference(model, x):
    """Grad-CAM from finite differences: each channel's mean gradient is the score's slope when the
    whole channel moves by the same amount, measured through the model above the layer."""
    layer = internals.default_feature_layers(model)[-1]
    activations = internals.feature_maps(model, x, [layer])[layer].astype(np.float64)
    head = internals.head_model(model, layer)
    targets = keras.ops.convert_to_numpy(model(x, training=False)).argmax(1)

    def score(a):
        logits = keras.ops.convert_to_numpy(head([a.astype(np.float32)], training=False))
        return logits.astype(np.float64)[np.arange(len(a)), targets]

    channel_axis = 1 if x.shape[1] == 1 else -1  # (N, 1, 28, 28) or (N, 28, 28, 1)
    maps = np.moveaxis(activations, channel_axis, -1)
    height, width, channels = maps.shape[1:]
    weights = np.zeros((len(x), channels))
    eps = 1e-3
    for c in range(channels):
        step = np.zeros_like(maps)
        step[..., c] = eps
        step = np.moveaxis(step, -1, channel_axis)
        weights[:, c] = (score(activations + step) - score(activations - step)) / (2 * eps) / (height * width)
    cam = np.maximum((maps * weights[:, None, None, :]).sum(-1), 0.0)
    resized = keras.ops.convert_to_numpy(keras.ops.image.resize(cam[..., None].astype(np.float32), (28, 28),
                                                                 interpolation="bilinear", data_format="channels_last"))
    resized = resized[..., 0].astype(np.float64)
    return resized / resized.max(axis=(1, 2), keepdims=True)


def test_grad_cam_highlights_the_pixels_that_drive_the_score():
    model = tiny_cnn(augment=False)
    x = images(2)
    heat = internals.grad_cam(model, x)
    assert heat.shape == (2, 28, 28) and np.isfinite(heat).all()
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    reference = grad_cam_reference(model, x)
    assert np.ptp(reference, axis=(1, 2)).min() > 0.5  # a map with something to show
    np.testing.assert_allclose(heat, reference, atol=1e-2)
    # Same result with the class given explicitly as the predicted one.
    predicted = keras.ops.convert_to_numpy(model(x, training=False)).argmax(1)
    np.testing.assert_allclose(internals.grad_cam(model, x, class_indices=predicted), heat, atol=1e-6)
    # The split model (layer output -> logits) reproduces the full model's logits.
    head = internals.head_model(model, "block2_relu1")
    activations = internals.feature_maps(model, x, ["block2_relu1"])["block2_relu1"]
    logits = keras.Model(model.inputs, model.get_layer("logits").output)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(head([activations], training=False)),
        keras.ops.convert_to_numpy(logits([x], training=False)),
        atol=1e-5,
    )


@channels_first_backend
def test_saliency_and_grad_cam_on_channels_first():
    model = tiny_cnn(augment=False, data_format="channels_first")
    x = images(2, channels_first=True)
    assert internals.saliency(model, x).shape == (2, 28, 28)
    heat = internals.grad_cam(model, x)
    assert heat.shape == (2, 28, 28)
    np.testing.assert_allclose(heat, grad_cam_reference(model, x), atol=1e-2)


@pytest.mark.parametrize("given, said", [
    (lambda x: x[:, ..., 0], "images of shape (2, 28, 28): "),  # saliency would max over a spatial axis of these
    (lambda x: x[0], "images of shape (28, 28, 1): "),
    (lambda x: x[:0], "images of shape (0, 28, 28, 1): "),
    (lambda x: np.moveaxis(x, -1, 1), "images of shape (2, 1, 28, 28): "),
    (lambda x: (x * 255).astype(np.uint8), "images of dtype uint8 (pixels 0-255)"),
])
@pytest.mark.parametrize("explain", ["feature_maps", "saliency", "grad_cam"])
def test_images_the_model_does_not_take_are_refused_with_the_shape_it_takes(given, said, explain):
    model = tiny_cnn()
    with pytest.raises(ValueError) as refused:
        getattr(internals, explain)(model, given(images(2)))
    assert said in str(refused.value)
    assert "(N, 28, 28, 1)" in str(refused.value) or "to_model_input" in str(refused.value)


@pytest.mark.parametrize("classes, said", [
    ([10, 0], "the class 10 in class_indices is not one of the classes 0 to 9"),  # not class 0, as a wrap would read it
    ([-1, 0], "the class -1 in class_indices is not one of the classes 0 to 9"),  # not class 9
    ([1.7, 2.2], "1.7 in class_indices is not a whole-number class index"),  # not class 1
    ([1, 2, 3], "class_indices of shape (3,): expected one label per image, shape (2,)"),
])
@pytest.mark.parametrize("explain", ["saliency", "grad_cam"])
def test_a_class_to_explain_outside_the_models_classes_is_refused(classes, said, explain):
    model = tiny_cnn()
    with pytest.raises(ValueError, match=re.escape(said)):
        getattr(internals, explain)(model, images(2), class_indices=classes)
    assert getattr(internals, explain)(model, images(2), class_indices=np.array([9, 0])).shape == (2, 28, 28)


def test_feature_layers_must_be_a_non_empty_list_of_names():
    model = tiny_cnn()
    first = internals.default_feature_layers(model)[0]
    with pytest.raises(TypeError, match=f"pass a list of layer names, such as \\['{first}'\\]"):
        internals.feature_maps(model, images(1), first)  # iterated, one layer per character
    with pytest.raises(ValueError, match="no layer named: pass at least one"):
        internals.feature_maps(model, images(1), [])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
@pytest.mark.parametrize("explain", ["feature_maps", "saliency", "grad_cam"])
def test_images_with_pixels_that_are_not_numbers_are_refused(bad, explain):
    x = images(3)
    x[1, 5, 5, 0] = bad  # a NaN map, or one of another image's scale, if it went through
    with pytest.raises(ValueError, match=re.escape("images: 1 of 3 images hold NaN or infinite pixels (the first is "
                                                   "image 1)")):
        getattr(internals, explain)(tiny_cnn(), x)
    with pytest.raises(ValueError, match=re.escape("images of dtype <U1: the model takes model-ready floats")):
        getattr(internals, explain)(tiny_cnn(), np.full((1, 28, 28, 1), "a"))


def test_feature_maps_of_a_bfloat16_model_are_float32_arrays():
    # A bfloat16 model's outputs are ml_dtypes.bfloat16 arrays, which much of numpy and matplotlib reject.
    keras.utils.set_random_seed(0)
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")  # as train sets it for --mixed-precision
    try:
        model = build_cnn(filters=(4, 8), dense_units=16, seed=0, augment=False)
    finally:
        keras.config.set_dtype_policy(policy)
    maps = internals.feature_maps(model, images(1))
    assert {array.dtype for array in maps.values()} == {np.dtype("float32")}
    first = internals.default_feature_layers(model)[0]
    reference = keras.Model(model.input, model.get_layer(first).output)(images(1), training=False)
    np.testing.assert_array_equal(maps[first], keras.ops.convert_to_numpy(keras.ops.cast(reference, "float32")))


@pytest.mark.parametrize("index", [1.0, np.array([1]), True, "1"])
def test_an_image_index_that_is_not_one_whole_number_is_refused(index):
    with pytest.raises(ValueError, match=re.escape(f"image index {index!r}: expected one whole number, from 0 to 9")):
        internals.check_image_index(index, 10)
    assert internals.check_image_index(np.int64(3), 10) == 3
    assert internals.check_image_index(np.asarray(4), 10) == 4  # a 0-d array, as a tensor's item may come


def test_pca_of_one_row_or_one_feature_is_two_columns_and_odd_features_are_refused():
    points, explained = internals.pca_2d(np.ones((1, 5)))  # a report of one test image
    assert points.shape == (1, 2) and explained.tolist() == [0.0, 0.0]
    line = np.arange(6.0)[:, None]
    points, explained = internals.pca_2d(line)
    np.testing.assert_allclose(np.abs(points[:, 0]), np.abs(line[:, 0] - 2.5))
    assert points[:, 1].tolist() == [0.0] * 6 and explained.tolist() == [1.0, 0.0]
    for features, said in [(np.ones(5), "features of shape (5,) and dtype float64: expected a 2-D array of numbers, "
                                        "one row per image"),
                           (np.ones((0, 4)), "features of shape (0, 4): expected at least one row and one column"),
                           (np.full((3, 2), np.nan), "there are NaN or infinite values in features")]:
        with pytest.raises(ValueError, match=re.escape(said)):
            internals.pca_2d(features)


def test_misclassified_refuses_labels_and_probabilities_that_do_not_match():
    probabilities = np.eye(4)[[0, 1, 1]]
    with pytest.raises(ValueError, match=re.escape("y_true of shape (2,): expected one label per image, shape (3,)")):
        internals.misclassified(np.array([0, 1]), probabilities)
    with pytest.raises(ValueError, match=re.escape("the class 4 in y_true is not one of the classes 0 to 3")):
        internals.misclassified(np.array([0, 1, 4]), probabilities)
    with pytest.raises(ValueError, match=re.escape("probabilities of shape (3,) and dtype float64: expected a 2-D "
                                                   "array")):
        internals.misclassified(np.array([0, 1, 2]), np.array([0.1, 0.2, 0.3]))
    assert internals.misclassified(np.array([0, 1, 2]), probabilities).tolist() == [2]


def test_images_as_a_list_or_bfloat16_are_taken_and_a_ragged_list_is_refused():
    model, x = tiny_cnn(), images(2)
    np.testing.assert_allclose(internals.grad_cam(model, list(x)), internals.grad_cam(model, x))
    import ml_dtypes

    assert internals.feature_maps(model, x.astype(ml_dtypes.bfloat16))  # a float, as the model computes in
    with pytest.raises(ValueError, match=re.escape("images is ragged (its items differ in shape)")):
        internals.saliency(model, [x[0], x[0, :14]])
    with pytest.raises(ValueError, match=re.escape("limit 2.0: expected a whole number from 0.")):
        internals.misclassified(np.array([0, 1]), np.eye(2), 2.0)

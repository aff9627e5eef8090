"""Model builders: shapes, layer names, purity, and that they learn."""

import keras
import numpy as np
import pytest

from fmnist_keras.models import BUILDERS, build_baseline_cnn, build_cnn, build_cnn_large, build_mlp, build_model
from fmnist_keras.config import MODEL_NAMES


def test_registry_matches_the_cli_choices():
    assert tuple(BUILDERS) == MODEL_NAMES


def test_mlp_is_sequential_with_named_layers():
    model = build_mlp(units=(64, 32))
    assert isinstance(model, keras.Sequential)
    names = [layer.name for layer in model.layers]
    assert names[0] == "flatten" and names[-2:] == ["logits", "predictions"]
    assert {"dense1", "dense2", "dense1_bn"} <= set(names)
    assert model.outputs[0].shape == (None, 10)
    assert not model.compiled  # builders return uncompiled models


def test_cnn_is_functional_with_named_blocks():
    model = build_cnn(filters=(8, 16), convs_per_block=(1, 2), augment=False, data_format="channels_last")
    assert not isinstance(model, keras.Sequential)
    assert model.get_layer("block1_conv1").output.shape == (None, 28, 28, 8)
    assert model.get_layer("block2_conv2").output.shape == (None, 14, 14, 16)
    assert model.get_layer("block2_pool").output.shape == (None, 7, 7, 16)
    assert model.get_layer("embedding").output.shape == (None, 256)
    assert model.outputs[0].shape == (None, 10)


def test_cnn_channels_first_has_the_same_weights_shapes():
    last = build_cnn(augment=False, data_format="channels_last")
    first = build_cnn(augment=False, data_format="channels_first")
    assert first.get_layer("block1_conv1").output.shape == (None, 32, 28, 28)
    assert [w.shape for w in last.weights] == [w.shape for w in first.weights]


def test_cnn_large_is_the_cnn_builder_with_its_own_arguments_and_takes_changes():
    large = build_cnn_large(data_format="channels_last")
    assert large.get_layer("block3_conv2").output.shape == (None, 7, 7, 256)
    assert large.get_layer("embedding").output.shape == (None, 512)
    assert large.get_layer("dropout").rate == 0.4
    assert "augment_erase" in [layer.name for layer in large.layers]
    changed = build_cnn_large(data_format="channels_last", dropout=0.2, erase=0.0)
    assert changed.get_layer("dropout").rate == 0.2
    assert "augment_erase" not in [layer.name for layer in changed.layers]
    assert [w.shape for w in changed.weights] == [w.shape for w in large.weights]
    with pytest.raises(TypeError):
        build_cnn_large(widths=(8,))


def test_cnn_residual_adds_a_projected_shortcut_to_each_block_before_its_last_relu(tmp_path):
    model = build_cnn(filters=(8, 16), convs_per_block=(1, 2), augment=False, residual=True,
                      data_format="channels_last")
    for block, last in ((1, 1), (2, 2)):
        add = model.get_layer(f"block{block}_add")
        assert [tensor.name for tensor in add.input] == [
            model.get_layer(f"block{block}_bn{last}").output.name,
            model.get_layer(f"block{block}_shortcut_bn").output.name]
        assert model.get_layer(f"block{block}_relu{last}").input.name == add.output.name
    assert model.get_layer("block2_shortcut").kernel.shape == (1, 1, 8, 16)
    # With the main path's last convolution zeroed, a block's output is the ReLU of its shortcut alone.
    x = np.random.default_rng(0).random((2, 28, 28, 1), dtype=np.float32)
    model.get_layer("block1_conv1").kernel.assign(np.zeros((3, 3, 1, 8), np.float32))
    block1 = keras.Model(model.input, [model.get_layer("block1_relu1").output,
                                        model.get_layer("block1_shortcut_bn").output])
    out, shortcut = (keras.ops.convert_to_numpy(t) for t in block1(x, training=False))
    bn_of_zero = keras.ops.convert_to_numpy(model.get_layer("block1_bn1")(np.zeros((1, 28, 28, 8), np.float32)))
    np.testing.assert_allclose(out, np.maximum(shortcut + bn_of_zero, 0), rtol=1e-5, atol=1e-6)
    path = tmp_path / "residual.keras"
    model.save(path)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.saving.load_model(path)(x)),
                               keras.ops.convert_to_numpy(model(x)), rtol=1e-5, atol=1e-6)


def test_cnn_global_pool_averages_the_last_maps_instead_of_flattening_them():
    flat = build_cnn(filters=(8, 16), augment=False, data_format="channels_last")
    pooled = build_cnn(filters=(8, 16), augment=False, global_pool=True, data_format="channels_last")
    names = [layer.name for layer in pooled.layers]
    assert "global_pool" in names and "flatten" not in names
    assert pooled.get_layer("global_pool").output.shape == (None, 16)
    assert pooled.get_layer("dense").kernel.shape == (16, 256)
    assert flat.get_layer("dense").kernel.shape == (7 * 7 * 16, 256)
    x = np.random.default_rng(0).random((2, 28, 28, 1), dtype=np.float32)
    maps = keras.Model(pooled.input, [pooled.get_layer("block2_pool").output, pooled.get_layer("global_pool").output])
    block, averaged = (keras.ops.convert_to_numpy(t) for t in maps(x))
    np.testing.assert_allclose(averaged, block.mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


def test_cnn_shift_sets_the_translation_range_and_zero_removes_it():
    default = build_cnn(data_format="channels_last")
    assert default.get_layer("augment_shift").get_config()["height_factor"] == 0.08
    wider = build_cnn(data_format="channels_last", shift=0.12)
    assert wider.get_layer("augment_shift").get_config()["width_factor"] == 0.12
    names = [layer.name for layer in build_cnn(data_format="channels_last", shift=0.0).layers]
    assert "augment_shift" not in names and "augment_flip" in names


def test_baseline_cnn_is_the_fixed_textbook_network():
    model = build_baseline_cnn(data_format="channels_last")
    assert model.get_layer("block1_conv1").output.shape == (None, 26, 26, 32)
    assert model.get_layer("block2_conv1").output.shape == (None, 11, 11, 64)
    assert model.get_layer("embedding").output.shape == (None, 128)
    assert model.count_params() == (9 + 1) * 32 + (9 * 32 + 1) * 64 + (1600 + 1) * 128 + (128 + 1) * 10


def test_outputs_are_float32_probabilities():
    x = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    for model in (build_mlp(), build_cnn(data_format="channels_last")):
        probs = keras.ops.convert_to_numpy(model(x, training=False))
        assert probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_augmentation_changes_images_in_training_and_is_inactive_at_inference():
    model = build_cnn(data_format="channels_last", seed=0)
    x = np.random.default_rng(1).random((8, 28, 28, 1), dtype=np.float32)
    a = keras.ops.convert_to_numpy(model(x, training=False))
    b = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_array_equal(a, b)
    augmented = keras.Model(model.inputs, model.get_layer("augment_shift").output)  # the last augmentation step
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(augmented([x], training=False)), x)
    trained = keras.ops.convert_to_numpy(augmented([x], training=True))
    changed = [not np.array_equal(image, original) for image, original in zip(trained, x)]
    assert sum(changed) >= len(x) // 2  # flips of half the images, shifts of up to 2 pixels of most


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(units=()), r"units must name at least one hidden layer width"),
     (dict(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0")],
)
def test_mlp_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_mlp(**kwargs)


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of mlp, cnn, cnn-large, baseline-cnn"):
        build_model("resnet")

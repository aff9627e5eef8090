"""BatchNorm statistics re-estimated with the weights frozen: the plain average over batches, and a short run that infers as it trains."""

import keras
import numpy as np

from fmnist_keras.engine.callbacks import recalibrate_batch_norm


def test_moving_statistics_become_the_average_of_the_batch_statistics():
    rng = np.random.default_rng(0)
    x = (rng.normal(3.0, 2.0, size=(96, 5))).astype("float32")
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.BatchNormalization(momentum=0.99, name="bn")(inputs))
    bn = model.get_layer("bn")
    used = recalibrate_batch_norm(model, x, batch_size=32, max_batches=3, seed=1)
    assert used == 3 and bn.momentum == 0.99  # the layer's own momentum is back
    order = np.random.default_rng(1).permutation(len(x))
    batches = [x[np.sort(order[k * 32:(k + 1) * 32])] for k in range(3)]
    expected_mean = np.mean([b.mean(axis=0) for b in batches], axis=0)
    expected_variance = np.mean([b.var(axis=0) for b in batches], axis=0)  # biased, as Keras's layer keeps it
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), expected_mean, rtol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_variance), expected_variance, rtol=1e-4)


def test_a_model_without_batch_norm_is_left_alone():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    before = [w.copy() for w in model.get_weights()]
    assert recalibrate_batch_norm(model, np.ones((8, 3), "float32"), batch_size=4) == 0
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_after_recalibration_inference_matches_training_mode_on_the_same_batch():
    # Statistics far from the initial (0, 1) that a few momentum steps would not reach.
    rng = np.random.default_rng(0)
    x = rng.normal(50.0, 10.0, size=(64, 4)).astype("float32")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.BatchNormalization(momentum=0.9)(inputs))
    assert np.abs(keras.ops.convert_to_numpy(model(x, training=False))).mean() > 10  # lagging: far off
    recalibrate_batch_norm(model, x, batch_size=64)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x, training=False)),
                               keras.ops.convert_to_numpy(model(x, training=True)), atol=1e-3)

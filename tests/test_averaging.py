"""The moving average of the weights and flip test-time augmentation, against references.

The average: the model that is validated, checkpointed and restored is the
exponential moving average of the trained weights, computed here in numpy
from the weights after every step; a fit interrupted and resumed ends where
an uninterrupted one ends. Flip TTA: the mean of the model's outputs on the
images and on their mirror images, in both layouts, on every backend.
"""

import json
import re

import keras
import numpy as np
import pytest

from conftest import linear_classifier, random_images_and_one_hot_labels
from fmnist_keras.config import TrainConfig, load_config
from fmnist_keras.engine.callbacks import (
    AtomicModelCheckpoint,
    ResumableEarlyStopping,
    averaged_weights,
    read_history,
    resume_state,
)
from fmnist_keras.engine.evaluation import predict_probabilities
from fmnist_keras.engine.recipe import averaging_momentum
from fmnist_keras.interrupts import Interrupted
from fmnist_keras.tta import TTA
from test_callbacks import StopAfter

MOMENTUM = 0.8


def tiny_model(seed=0):
    return linear_classifier(keras.optimizers.AdamW(1e-2, use_ema=True, ema_momentum=MOMENTUM), seed)


def fit(model, callbacks, epochs):
    x, y = random_images_and_one_hot_labels(48)
    model.fit(x, y, validation_data=(x, y), epochs=epochs, batch_size=16, shuffle=False, verbose=0,
              callbacks=callbacks)


class StepWeights(keras.callbacks.Callback):
    """The trained weights after every step, and the epoch-end weights the callbacks after it see."""

    def __init__(self):
        super().__init__()
        self.steps, self.epoch_ends = [], []

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append(self.model.get_weights())

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_ends.append(self.model.get_weights())


def moving_average(steps):
    """Keras's EMA: the first step's weights, then momentum * average + (1 - momentum) * weights."""
    average = [w.copy() for w in steps[0]]
    for weights in steps[1:]:
        average = [MOMENTUM * a + (1 - MOMENTUM) * w for a, w in zip(average, weights)]
    return average


def run_callbacks(tmp_path, state=None):
    tmp_path.mkdir(exist_ok=True)
    swap_in, swap_back = averaged_weights()
    early_stopping = ResumableEarlyStopping(monitor="val_loss", patience=10, restore_best_weights=True,
                                            initial_state=state)
    checkpoint = AtomicModelCheckpoint(tmp_path / "model.keras", monitor="val_loss", save_best_only=True,
                                       initial_value_threshold=state.best if state else None)
    seen, after = StepWeights(), StepWeights()
    callbacks = [swap_in, seen, checkpoint, keras.callbacks.CSVLogger(str(tmp_path / "history.csv"),
                                                                        append=state is not None),
                 early_stopping, swap_back, keras.callbacks.BackupAndRestore(str(tmp_path / "backup")), after]
    return callbacks, (seen, after)


def test_the_average_is_what_is_checkpointed_and_kept(tmp_path):
    model = tiny_model()
    callbacks, (seen, after) = run_callbacks(tmp_path)
    trained = StepWeights()
    fit(model, [trained, *callbacks], epochs=3)
    # After the swap back, at every epoch's end, the last epoch's included: the trained weights
    # (to float rounding: on TensorFlow Keras swaps them by adding and subtracting).
    for epoch, weights in enumerate(after.epoch_ends):
        for a, b in zip(weights, trained.steps[3 * (epoch + 1) - 1]):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)

    assert len(trained.steps) == 9
    for epoch, weights in enumerate(seen.epoch_ends):  # what the checkpoint and EarlyStopping see
        for a, b in zip(weights, moving_average(trained.steps[: 3 * (epoch + 1)])):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    # The average differs from the trained weights, so the check above can tell them apart.
    assert np.abs(seen.epoch_ends[-1][0] - trained.steps[-1][0]).max() > 1e-4
    saved = keras.saving.load_model(tmp_path / "model.keras", compile=False).get_weights()
    history = read_history(tmp_path / "history.csv")
    best = min(range(3), key=lambda epoch: history[epoch]["val_loss"])
    for a, b in zip(saved, seen.epoch_ends[best]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(model.get_weights(), seen.epoch_ends[best]):  # the restored best average
        np.testing.assert_array_equal(a, b)


def test_the_trained_weights_go_on_training_after_each_epoch(tmp_path):
    # The average watches: the trained weights' path is the one a fit without it takes.
    model = tiny_model()
    callbacks, _ = run_callbacks(tmp_path)
    with_average = StepWeights()
    fit(model, [with_average, *callbacks], epochs=2)
    plain = tiny_model()
    plain.compile(optimizer=keras.optimizers.AdamW(1e-2), loss="categorical_crossentropy")
    without = StepWeights()
    fit(plain, [without], epochs=2)
    for a, b in zip(with_average.steps[-1], without.steps[-1]):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_a_resumed_fit_ends_where_an_uninterrupted_one_ends(tmp_path):
    reference = tiny_model()
    callbacks, _ = run_callbacks(tmp_path / "reference")
    reference_steps = StepWeights()
    fit(reference, [reference_steps, *callbacks], epochs=4)

    run = tmp_path / "run"
    callbacks, _ = run_callbacks(run)
    with pytest.raises(Interrupted):
        fit(tiny_model(), [*callbacks, StopAfter(2)], epochs=4)
    state = resume_state(run / "backup", run / "model.keras", run / "history.csv")
    resumed = tiny_model(seed=1)  # BackupAndRestore brings back the weights, the average and the step
    callbacks, _ = run_callbacks(run, state)
    resumed_steps = StepWeights()
    fit(resumed, [resumed_steps, *callbacks], epochs=4)

    assert len(resumed_steps.steps) == 6
    for a, b in zip(resumed_steps.steps[-1], reference_steps.steps[-1]):  # the trained weights
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    for a, b in zip(resumed.get_weights(), reference.get_weights()):  # the kept average
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_the_momentum_shrinks_so_the_average_spans_at_most_a_tenth_of_the_run():
    assert averaging_momentum(0.999, 20_000) == 0.999
    assert averaging_momentum(0.999, 8440) == pytest.approx(1 - 10 / 8440)  # 20 epochs of 422 steps
    assert averaging_momentum(0.999, 44) == pytest.approx(1 - 10 / 44)
    assert averaging_momentum(0.999, 5) == 0.0  # the weights themselves
    assert averaging_momentum(0.0, 10_000) == 0.0


def test_model_defaults_and_a_config_without_the_keys(tmp_path):
    cnn, mlp = TrainConfig(model="cnn").resolved(), TrainConfig(model="mlp").resolved()
    assert (cnn.ema, cnn.flip_tta, cnn.shift_tta) == (0.0, True, True)
    assert (mlp.ema, mlp.flip_tta, mlp.shift_tta) == (0.0, False, False)
    assert TrainConfig(model="cnn", ema=0.0, flip_tta=False).resolved().ema == 0.0
    # A saved configuration without the keys describes a run that used none of them.
    data = json.loads(TrainConfig(model="cnn").to_json())
    del data["ema"], data["flip_tta"], data["shift_tta"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    loaded = load_config(tmp_path / "config.json").resolved()
    assert (loaded.ema, loaded.flip_tta, loaded.shift_tta) == (0.0, False, False)
    for bad, message in [({"ema": 1.0}, "ema is 1.0; expected a number from"), ({"ema": -0.1}, "ema is -0.1;"),
                         ({"ema": "0.9"}, "ema is '0.9';"), ({"flip_tta": "yes"}, "flip_tta is 'yes'; expected true or false"),
                         ({"shift_tta": 1}, "shift_tta is 1; expected true or false")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            TrainConfig.from_dict({**data, **bad})


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_flip_tta_is_the_mean_over_the_images_and_their_mirror_images(data_format):
    keras.utils.set_random_seed(0)
    shape = (28, 28, 1) if data_format == "channels_last" else (1, 28, 28)
    model = keras.Sequential([keras.Input(shape), keras.layers.Flatten(),
                              keras.layers.Dense(10, activation="softmax")])
    rng = np.random.default_rng(0)
    x = rng.random((5, *shape), dtype=np.float32)
    width = 2 if data_format == "channels_last" else 3
    mirrored = x[:, :, :, ::-1] if data_format == "channels_first" else x[:, :, ::-1, :]
    assert np.array_equal(mirrored, np.flip(x, axis=width))
    plain = np.asarray(model.predict(x, verbose=0), dtype=np.float64)
    flipped = np.asarray(model.predict(np.ascontiguousarray(mirrored), verbose=0), dtype=np.float64)
    assert np.abs(plain - flipped).max() > 1e-3  # a model that tells an image from its mirror image
    np.testing.assert_allclose(predict_probabilities(model, x, TTA(flip=True)), (plain + flipped) / 2, atol=1e-6)
    np.testing.assert_allclose(predict_probabilities(model, x), plain, atol=1e-7)
    # An image that is its own mirror image gets the plain prediction.
    symmetric = (x + np.flip(x, axis=width)) / 2
    np.testing.assert_allclose(predict_probabilities(model, symmetric, TTA(flip=True)),
                               predict_probabilities(model, symmetric), atol=1e-6)

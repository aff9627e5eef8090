"""The torch fast path computes what stock Keras computes, and leaves saved models plain Keras."""

import keras
import numpy as np
import pytest

from conftest import only_on
from fmnist_keras.engine import fastpath
from fmnist_keras.models import build_cnn, build_mlp

TORCH = keras.backend.backend() == "torch"
torch_only = only_on("torch", "the fast path changes the torch backend only")


@pytest.fixture
def installed():
    fastpath.install()
    yield
    fastpath.uninstall()


def _rng(seed=0):
    return np.random.default_rng(seed)


def _stock_then_fast(run):
    """``run()`` on stock Keras, then with the fast path installed: (stock result, fast result)."""
    stock = run()
    fastpath.install()
    try:
        return stock, run()
    finally:
        fastpath.uninstall()


@torch_only
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("interpolation", ["nearest", "bilinear"])
@pytest.mark.parametrize("fill_mode", ["constant", "reflect", "wrap", "nearest"])
def test_batched_affine_transform_equals_keras(data_format, interpolation, fill_mode):
    rng = _rng()
    images = rng.random((6, 9, 7, 2), dtype=np.float32)
    if data_format == "channels_first":
        images = np.moveaxis(images, -1, 1)
    transform = np.zeros((6, 8), np.float32)
    transform[:, 0] = transform[:, 4] = 1.0
    transform[:, 1] = rng.normal(0, 0.2, 6)  # shear, so rows and columns both move
    transform[:, 2], transform[:, 5] = rng.normal(0, 3, 6), rng.normal(0, 3, 6)  # sub-pixel shifts

    def run():
        given = keras.ops.convert_to_tensor(transform.copy())
        out = keras.ops.image.affine_transform(
            images, given, interpolation=interpolation, fill_mode=fill_mode, data_format=data_format
        )
        return keras.ops.convert_to_numpy(out), keras.ops.convert_to_numpy(given)

    (expected, _), (got, given_after) = _stock_then_fast(run)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(given_after, transform)  # the caller's transform is not modified
    assert np.abs(expected - images).max() > 0.1  # the images did move


_SHIFT = np.array([1, 0, -1, 0, 1, 0, 0, 0], np.float32)


@torch_only
def test_single_images_keep_keras_behaviour():
    image = _rng().random((5, 5, 1), dtype=np.float32)

    def shifted():
        return keras.ops.convert_to_numpy(keras.ops.image.affine_transform(image, _SHIFT, interpolation="nearest"))

    expected, got = _stock_then_fast(shifted)
    np.testing.assert_array_equal(got, expected)


@torch_only
def test_bad_arguments_keep_kerass_errors(installed):
    images = _rng().random((1, 5, 5, 1), dtype=np.float32)
    with pytest.raises(ValueError, match="Invalid value for argument `interpolation`"):
        keras.ops.image.affine_transform(images, _SHIFT[None], interpolation="cubic")


@torch_only
@pytest.mark.parametrize("layer", ["conv_same", "conv_valid", "max_pool", "average_pool_same"])
def test_channels_last_views_give_keras_results_without_layout_copies(layer):
    import torch

    make = {
        "conv_same": lambda: keras.layers.Conv2D(4, 3, padding="same"),
        "conv_valid": lambda: keras.layers.Conv2D(4, 3, strides=2),
        "max_pool": lambda: keras.layers.MaxPooling2D(2),
        "average_pool_same": lambda: keras.layers.AveragePooling2D(3, strides=2, padding="same"),
    }[layer]
    keras.utils.set_random_seed(0)
    op = make()
    x = _rng().random((3, 10, 10, 2), dtype=np.float32)
    op.build(x.shape)

    def forward_backward():
        inputs = torch.tensor(x, requires_grad=True)
        out = op(inputs)
        (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
        return out, inputs.grad

    (expected, expected_grad), (got, got_grad) = _stock_then_fast(forward_backward)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-5)
    assert got.is_contiguous()  # NHWC in, NHWC out, no NCHW copy in between


def _bn_model(data_format="channels_last"):
    keras.utils.set_random_seed(0)
    return build_cnn(
        filters=(4,), convs_per_block=1, dense_units=8, dropout=0.0, augment=False, data_format=data_format
    )


@torch_only
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_fused_batch_norm_trains_like_keras(data_format):
    import torch

    stock, fused = _bn_model(data_format), _bn_model(data_format)
    assert fastpath.fuse_batch_norm(fused) == 2  # the conv block's and the dense one's
    shape = (16, 28, 28, 1) if data_format == "channels_last" else (16, 1, 28, 28)
    x = torch.tensor(_rng().random(shape, dtype=np.float32) * 3 + 1)
    results = []
    for model in (stock, fused):
        out = model(x, training=True)
        loss = (out * torch.arange(10.0)).sum()
        grads = torch.autograd.grad(loss, [w.value for w in model.trainable_weights])
        stats = [w.numpy() for w in model.non_trainable_weights]
        results.append((out.detach().numpy(), [g.numpy() for g in grads], stats))
    (out_a, grads_a, stats_a), (out_b, grads_b, stats_b) = results
    np.testing.assert_allclose(out_b, out_a, atol=1e-5)
    for a, b in zip(grads_a, grads_b):
        np.testing.assert_allclose(b, a, atol=1e-4 * max(1.0, np.abs(a).max()))
    for a, b in zip(stats_a, stats_b):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    assert np.abs(stats_a[0]).max() > 0.01  # the moving mean did move (inputs have mean ~2.5)
    # Inference uses the moving statistics, through Keras's own code.
    np.testing.assert_allclose(
        fused(x, training=False).detach().numpy(), stock(x, training=False).detach().numpy(), atol=1e-5
    )


@torch_only
def test_fused_batch_norm_takes_bfloat16_inputs_as_keras_does_in_float32():
    # Keras casts bfloat16 inputs to float32 for BatchNorm; the fused kernel reads
    # them as they are and accumulates in float32: the same numbers, to bfloat16 rounding.
    import torch

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        stock, fused = _bn_model(), _bn_model()
    finally:
        keras.config.set_dtype_policy("float32")
    fastpath.fuse_batch_norm(fused)
    x = torch.tensor(_rng().random((16, 28, 28, 1), dtype=np.float32) * 3 + 1)
    outs = [model(x, training=True).detach().float().numpy() for model in (stock, fused)]
    np.testing.assert_allclose(outs[1], outs[0], atol=2e-2)
    for a, b in zip(stock.non_trainable_weights, fused.non_trainable_weights):
        assert b.numpy().dtype == np.float32
        np.testing.assert_allclose(b.numpy(), a.numpy(), rtol=1e-2, atol=1e-3)
    assert np.abs(stock.non_trainable_weights[0].numpy()).max() > 0.01


@torch_only
def test_fused_batch_norm_under_mixed_precision_returns_the_compute_dtype():
    import torch

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_mlp(units=(8,), dropout=0.0)
    finally:
        keras.config.set_dtype_policy("float32")
    fastpath.fuse_batch_norm(model)
    out = model.get_layer("dense1_bn")(torch.ones(4, 8, dtype=torch.bfloat16), training=True)
    assert out.dtype == torch.bfloat16
    assert float(out.detach().float().abs().max()) < 1e-2  # constant features normalise to zero
    assert model.get_layer("dense1_bn").moving_mean.numpy().dtype == np.float32


def _small_mlp():
    keras.utils.set_random_seed(0)
    return build_mlp(units=(32,), dropout=0.0)


def _train_steps(fuse: bool, schedule=None, use_ema=False):
    model = _small_mlp()
    # Strong decay, so a decay applied wrongly (or to the excluded weights) shows.
    optimizer = keras.optimizers.AdamW(learning_rate=schedule or 1e-2, weight_decay=0.5, use_ema=use_ema,
                                       ema_momentum=0.5)
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    if fuse:
        fastpath.fuse_adam(optimizer)
    model.compile(optimizer=optimizer, loss="categorical_crossentropy")
    rng = _rng()
    x = rng.random((64, 28, 28, 1), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, 64), 10)
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)  # 4 steps
    model.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)  # and a 5th
    return model


def _initial_weights():
    return _small_mlp().get_weights()


@torch_only
def test_fused_adam_gives_the_weights_of_keras_adamw():
    plain, fused = _train_steps(fuse=False), _train_steps(fuse=True)
    assert int(fused.optimizer.iterations.numpy()) == 5
    moved = max(float(np.abs(a - b).max()) for a, b in zip(plain.get_weights(), _initial_weights()))
    assert moved > 1e-3  # the check below compares weights that did change
    for weight, a, b in zip(plain.weights, plain.get_weights(), fused.get_weights()):
        np.testing.assert_allclose(b, a, atol=2e-5, err_msg=weight.path)


@torch_only
def test_fused_adam_keeps_the_moving_average_keras_keeps():
    plain, fused = _train_steps(fuse=False, use_ema=True), _train_steps(fuse=True, use_ema=True)
    assert "_parallel_update_step" in vars(fused.optimizer)
    # fit ends with the average in the model; it differs from the last weights of a fit without one.
    last = _train_steps(fuse=False)
    assert max(float(np.abs(a - b).max()) for a, b in zip(plain.get_weights(), last.get_weights())) > 1e-3
    for weight, a, b in zip(plain.weights, plain.get_weights(), fused.get_weights()):
        np.testing.assert_allclose(b, a, atol=2e-5, err_msg=weight.path)


@torch_only
def test_fused_adam_evaluates_the_learning_rate_schedule_once_per_step():
    class CountingSchedule(keras.optimizers.schedules.LearningRateSchedule):
        calls = 0

        def __call__(self, step):
            CountingSchedule.calls += 1
            return 1e-2 * keras.ops.ones(())

    _train_steps(fuse=False, schedule=CountingSchedule())
    stock_calls, CountingSchedule.calls = CountingSchedule.calls, 0
    _train_steps(fuse=True, schedule=CountingSchedule())
    assert stock_calls >= 10  # Keras: the update and the weight decay each evaluate it
    assert CountingSchedule.calls <= stock_calls // 2 + 1


def test_fuse_adam_leaves_other_backends_and_optimizers_alone():
    sgd = keras.optimizers.SGD()
    assert fastpath.fuse_adam(sgd) is sgd and "_parallel_update_step" not in vars(sgd)
    amsgrad = keras.optimizers.Adam(amsgrad=True)
    fastpath.fuse_adam(amsgrad)
    assert "_parallel_update_step" not in vars(amsgrad)
    accumulating = fastpath.fuse_adam(keras.optimizers.Adam(gradient_accumulation_steps=2))
    assert "_parallel_update_step" not in vars(accumulating)
    adam = fastpath.fuse_adam(keras.optimizers.Adam())
    assert ("_parallel_update_step" in vars(adam)) == TORCH


def test_enable_names_what_it_switched_on_and_nothing_off_torch():
    model = _bn_model()
    model.compile(optimizer=keras.optimizers.AdamW(), loss="categorical_crossentropy")
    try:
        enabled = fastpath.enable(model, model.optimizer)
    finally:
        fastpath.uninstall()
    if not TORCH:
        assert enabled == {}
        return
    assert set(enabled) == set(fastpath.PIECES)
    for piece in ("batched_affine_transform", "fused_batch_norm", "fused_adam", "direct_layer_calls"):
        assert enabled[piece] == "on"  # on every Keras version this project supports
    # Keras 3.15 copies around convolutions (the piece runs); 3.14 and 3.16 do not (it is not needed).
    assert enabled["channels_last_views"] == str(fastpath.verdict("channels_last_views"))
    assert enabled["channels_last_views"] == "on" or enabled["channels_last_views"].startswith("not needed: ")


@torch_only
def test_stock_keras_restores_kerass_functions_for_its_block(installed):
    image = fastpath._torch_backend_module("image")
    assert image.affine_transform is fastpath._affine_transform
    with fastpath.stock_keras():
        assert image.affine_transform is not fastpath._affine_transform
    assert image.affine_transform is fastpath._affine_transform


def test_a_model_trained_on_the_fast_path_saves_as_plain_keras(tmp_path):
    model = _bn_model()
    model.compile(optimizer=keras.optimizers.AdamW(), loss="categorical_crossentropy")
    try:
        fastpath.enable(model, model.optimizer)
        x = _rng().random((8, 28, 28, 1), dtype=np.float32)
        model.fit(x, keras.utils.to_categorical(np.arange(8) % 10, 10), epochs=1, verbose=0)
        model.save(tmp_path / "m.keras")
    finally:
        fastpath.uninstall()
    loaded = keras.saving.load_model(tmp_path / "m.keras")
    bn = loaded.get_layer("block1_bn1")
    assert type(bn) is keras.layers.BatchNormalization and "call" not in vars(bn)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)


@torch_only
def test_training_block_undoes_the_process_wide_changes_it_made():
    image = fastpath._torch_backend_module("image")
    stock = image.affine_transform
    model = _bn_model()
    with fastpath.active(model) as enabled:
        assert enabled["batched_affine_transform"] == "on" and image.affine_transform is not stock
    assert image.affine_transform is stock
    with fastpath.active(_bn_model(), enabled=False) as enabled:
        assert enabled == {} and image.affine_transform is stock


# --- direct layer calls ---------------------------------------------------------------------


def _twin_models(name, mixed=False):
    """Two copies of a registered model with equal variables (weights and seed states), compiled with
    fused BatchNorm and AdamW; the second also calls its layers directly."""
    from fmnist_keras.config import TrainConfig
    from fmnist_keras.engine.recipe import compile_model, dtype_policy
    from fmnist_keras.models import build_model

    models = []
    for _ in range(2):
        keras.utils.set_random_seed(0)
        with dtype_policy(mixed):
            model = build_model(name, data_format="channels_last", seed=0)
        compile_model(model, TrainConfig(model=name, ema=0.0, mixed_precision=mixed), steps_per_epoch=4)
        fastpath.fuse_batch_norm(model)
        fastpath.fuse_adam(model.optimizer)
        models.append(model)
    for a, b in zip(models[0].variables, models[1].variables):
        b.assign(a)
    assert fastpath.call_layers_directly(models[1]) is None and "call" in vars(models[1])
    return models


@torch_only
@pytest.mark.parametrize("name, mixed", [("cnn", False), ("mlp", False), ("baseline-cnn", False), ("cnn", True)],
                         ids=["cnn", "mlp", "baseline-cnn", "cnn-mixed-precision"])
def test_direct_layer_calls_train_and_predict_exactly_as_kerass_layer_calls(name, mixed):
    import torch

    rng = _rng()
    x = rng.random((24, 28, 28, 1), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, 24), 10)
    keras_calls, direct = _twin_models(name, mixed)
    if mixed:  # the layers compute in bfloat16 (float16 on a GPU), the softmax in float32
        assert direct.get_layer("block1_conv1").compute_dtype != "float32"
    for step in range(3):  # flips, shifts, dropout and BatchNorm statistics included
        losses = []
        for model in (keras_calls, direct):
            torch.manual_seed(step)  # dropout without a seed draws from torch's global generator
            losses.append(model.train_on_batch(x[8 * step: 8 * step + 8], y[8 * step: 8 * step + 8]))
        assert losses[0] == losses[1]
    for a, b in zip(keras_calls.variables, direct.variables):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    np.testing.assert_array_equal(keras_calls.predict(x, verbose=0), direct.predict(x, verbose=0))


@torch_only
def test_calls_direct_layer_calls_cannot_take_go_through_keras():
    keras_calls, direct = _twin_models("cnn")
    x = _rng().random((4, 28, 28, 1), dtype=np.float32)
    for given in (x[..., 0], x.astype(np.float64)):  # another rank (Keras adds the channel), another dtype
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(direct(given, training=False)),
                                      keras.ops.convert_to_numpy(keras_calls(given, training=False)))
    features = keras.Model(direct.inputs, direct.get_layer("block1_conv1").output)  # symbolic: Keras's graph
    assert features(x).shape == (4, 28, 28, 32)


def _shared_layer_model():
    inputs = keras.Input((8,))
    shared = keras.layers.Dense(8)
    return keras.Model(inputs, shared(shared(inputs)))


def _two_output_model():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3)(inputs)
    return keras.Model(inputs, [keras.layers.Dense(2)(hidden), keras.layers.Dense(1)(hidden)])


class _MyDense(keras.layers.Dense):
    pass


@torch_only
@pytest.mark.parametrize(
    "build, why",
    [
        (_shared_layer_model, "the model is not a chain of layers"),
        (lambda: keras.Sequential([keras.Input((4,)), _MyDense(2)]), "is a _MyDense layer, not one of"),
        (lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, dtype="int8_from_float32")]),
         "has the dtype policy int8_from_float32, not a float one"),
        (lambda: keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activity_regularizer="l2")]),
         "has an activity regulariser"),
        (_two_output_model, "more than one input or output"),
    ],
    ids=["shared-layer", "unknown-layer", "quantized", "activity-regulariser", "two-outputs"],
)
def test_models_direct_calls_would_change_keep_kerass_call(build, why):
    model = build()
    assert why in fastpath.call_layers_directly(model)
    assert "call" not in vars(model)


class _Doubling(keras.Model):
    def call(self, inputs, training=None, mask=None):
        return super().call(inputs * 2, training=training, mask=mask)


@torch_only
def test_a_model_class_with_its_own_call_keeps_it():
    inputs = keras.Input((2,))
    model = _Doubling(inputs, keras.layers.Dense(2, kernel_initializer="ones")(inputs))
    assert fastpath.call_layers_directly(model) == "_Doubling has its own call"
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(np.ones((1, 2), "float32"), training=False)),
                                  [[4.0, 4.0]])


@torch_only
def test_inputs_on_another_device_than_kerass_go_through_keras_which_moves_them(monkeypatch):
    import torch

    model = _bn_model()
    x = torch.rand(4, 28, 28, 1)
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    # Install the direct calls as if Keras computed on another device than the inputs'.
    with monkeypatch.context() as patch:
        patch.setattr(keras.ops, "zeros", lambda *args, **kwargs: torch.zeros((), device="meta"))
        assert fastpath.call_layers_directly(model) is None
    layer_calls = []
    keras_layer_call = keras.layers.Layer.__call__

    def counted(self, *args, **kwargs):
        layer_calls.append(self.name)
        return keras_layer_call(self, *args, **kwargs)

    monkeypatch.setattr(keras.layers.Layer, "__call__", counted)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x, training=False)), expected)
    assert "block1_conv1" in layer_calls  # the layers went through Layer.__call__: Keras's path


@torch_only
def test_direct_layer_calls_are_installed_once_and_leave_a_models_own_call_alone():
    model = _bn_model()
    assert fastpath.call_layers_directly(model) is None
    installed = vars(model)["call"]
    assert fastpath.call_layers_directly(model) is None and vars(model)["call"] is installed
    other = _bn_model()
    own = other.call
    other.call = lambda *args, **kwargs: own(*args, **kwargs)
    assert fastpath.call_layers_directly(other) == "the model has its own call"


@torch_only
def test_a_changed_layer_call_turns_direct_layer_calls_off(fresh_verdicts, monkeypatch, capsys):
    monkeypatch.setitem(fastpath._KNOWN["direct_layer_calls"], "Layer.__call__", {})
    model = _bn_model()
    assert fastpath.call_layers_directly(model) == "off" and "call" not in vars(model)
    assert capsys.readouterr().err.startswith("warning: fast path: direct_layer_calls is off")


# --- the fence: a changed or missing private target turns its piece off -----------------------


@pytest.fixture
def fresh_verdicts():
    """Verdicts and warnings computed anew for the test, and again after it."""
    fastpath.verdict.cache_clear()
    fastpath._WARNED.clear()
    yield
    fastpath.uninstall()
    fastpath.verdict.cache_clear()
    fastpath._WARNED.clear()


@torch_only
def test_every_piece_is_on_or_not_needed_on_the_keras_versions_checked(fresh_verdicts):
    assert keras.__version__ in fastpath.KERAS_CHECKED
    for piece in fastpath.PIECES:
        assert fastpath.verdict(piece).state in ("on", "not needed"), fastpath.verdict(piece)


@torch_only
def test_a_missing_target_turns_its_piece_off_with_one_warning_line(fresh_verdicts, monkeypatch, capsys):
    real = fastpath._torch_backend_module
    monkeypatch.setattr(fastpath, "_torch_backend_module", lambda name: None if name == "image" else real(name))
    stock = real("image").affine_transform
    model = _bn_model()
    model.compile(optimizer=keras.optimizers.AdamW(), loss="categorical_crossentropy")
    with fastpath.active(model, model.optimizer) as states:
        assert real("image").affine_transform is stock  # Keras's own loop runs
    assert states["batched_affine_transform"].startswith("off: keras ") and "image.affine_transform" in states[
        "batched_affine_transform"]
    assert states["fused_adam"] == "on"  # the other pieces are unaffected
    fastpath.enable(_bn_model())  # asking again warns no more
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: fast path: batched_affine_transform is off")


@torch_only
def test_a_changed_optimizer_turns_fused_adam_off_whole_and_decay_is_applied_once(fresh_verdicts, monkeypatch, capsys):
    # Simulate a Keras whose weight-decay pass is not the code the fused step was written against.
    monkeypatch.setitem(fastpath._KNOWN["fused_adam"], "TorchOptimizer._apply_weight_decay", {})
    plain = _train_steps(fuse=False)
    fenced = _train_steps(fuse=True)  # asks for the fused step; the fence refuses it
    assert "_parallel_update_step" not in vars(fenced.optimizer)
    assert "_apply_weight_decay" not in vars(fenced.optimizer)  # neither half installed
    for a, b in zip(plain.get_weights(), fenced.get_weights()):
        np.testing.assert_array_equal(a, b)  # stock Keras exactly: decay neither lost nor doubled
    assert "fused_adam is off" in capsys.readouterr().err
    assert fastpath.verdicts()["fused_adam"].startswith("off: TorchOptimizer._apply_weight_decay of keras ")


@torch_only
def test_fused_adam_with_decay_matches_stock_keras_and_differs_without_decay():
    # The decay is in the fused step exactly once: with it the weights match stock
    # AdamW; a fused step that lost it would match AdamW(weight_decay=0) instead.
    fused = _train_steps(fuse=True)
    plain = _train_steps(fuse=False)
    for a, b in zip(plain.get_weights(), fused.get_weights()):
        np.testing.assert_allclose(b, a, atol=2e-5)
    kernel = plain.get_weights()[0]
    undecayed = _small_mlp()
    optimizer = keras.optimizers.AdamW(learning_rate=1e-2, weight_decay=0.0)
    undecayed.compile(optimizer=optimizer, loss="categorical_crossentropy")
    rng = _rng()
    x = rng.random((64, 28, 28, 1), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, 64), 10)
    undecayed.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    undecayed.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
    assert np.abs(undecayed.get_weights()[0] - kernel).max() > 1e-3  # the decay does show in the weights


def test_no_module_of_the_project_but_the_fast_path_reaches_into_keras_src():
    from pathlib import Path

    import fmnist_keras

    package = Path(fmnist_keras.__file__).parent
    reaching = sorted(
        str(path.relative_to(package)) for path in package.rglob("*.py")
        if "keras.src" in path.read_text() and path.name != "fastpath.py"
    )
    assert reaching == []


# --- the schedule: no host read per step ------------------------------------------------------

def _warmup_cosine():
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=1e-4, decay_steps=7, warmup_target=2e-3, warmup_steps=3, alpha=0.01
    )


@torch_only
def test_the_sync_free_schedule_gives_kerass_learning_rate_at_every_step():
    schedule = _warmup_cosine()
    optimizer = keras.optimizers.AdamW(learning_rate=schedule)
    assert fastpath.schedule_without_sync(optimizer) is optimizer
    assert "_get_current_learning_rate" in vars(optimizer)
    rates = []
    for step in range(14):  # warm-up, decay, and past the end (held at the last value)
        optimizer.iterations.assign(step)
        rate = optimizer.learning_rate
        assert keras.ops.shape(rate) == () and rate.dtype == keras.ops.convert_to_tensor(1.0).dtype
        expected = schedule(optimizer.iterations)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(rate), keras.ops.convert_to_numpy(expected))
        rates.append(float(rate))
    assert rates[0] == pytest.approx(1e-4) and rates[3] == pytest.approx(2e-3) and rates[-1] == pytest.approx(2e-5)
    assert rates.index(max(rates)) == 3  # the schedule does rise, then fall
    # A schedule set afterwards is the one that counts.
    for later in (keras.optimizers.schedules.CosineDecay(1e-3, 10, warmup_target=3e-3, warmup_steps=2),
                  keras.optimizers.schedules.ExponentialDecay(1e-3, 10, 0.5)):
        optimizer.learning_rate = later
        optimizer.iterations.assign(5)
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(optimizer.learning_rate),
                                      keras.ops.convert_to_numpy(later(optimizer.iterations)))


def test_the_sync_free_schedule_leaves_other_schedules_and_backends_alone():
    for rate in (1e-3, keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=10),  # no warm-up: no cond
                 keras.optimizers.schedules.ExponentialDecay(1e-3, 10, 0.9)):
        optimizer = keras.optimizers.AdamW(learning_rate=rate)
        fastpath.schedule_without_sync(optimizer)
        assert "_get_current_learning_rate" not in vars(optimizer)
    optimizer = fastpath.schedule_without_sync(keras.optimizers.AdamW(learning_rate=_warmup_cosine()))
    assert ("_get_current_learning_rate" in vars(optimizer)) == TORCH
    # Gradient accumulation: Keras evaluates the schedule at the raw step count, not `iterations`.
    accumulating = keras.optimizers.AdamW(learning_rate=_warmup_cosine(), gradient_accumulation_steps=4)
    assert "_get_current_learning_rate" not in vars(fastpath.schedule_without_sync(accumulating))


@torch_only
def test_the_sync_free_schedule_serves_the_optimizer_a_loss_scale_optimizer_wraps_once():
    schedule = _warmup_cosine()
    wrapped = keras.optimizers.LossScaleOptimizer(keras.optimizers.AdamW(learning_rate=schedule))
    assert fastpath.schedule_without_sync(wrapped) is wrapped
    inner = wrapped.inner_optimizer
    method = vars(inner)["_get_current_learning_rate"]
    fastpath.schedule_without_sync(wrapped)
    assert vars(inner)["_get_current_learning_rate"] is method  # not wrapped twice
    inner.iterations.assign(5)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(wrapped.learning_rate),
                                  keras.ops.convert_to_numpy(schedule(inner.iterations)))


class _HostReads:
    """Python-level reads of a tensor's value on the main thread (``if t:``, ``int(t)``, ``np.array(t)``...).

    Keyed by the read and the innermost Keras function outside the backend
    and ``keras.ops`` that made it. On a GPU each is a synchronisation: the host waits for the
    work queued before it. Reads on Keras's callback worker thread (the
    step's logs, when every batch-end hook is ``async_safe``) do not hold up
    the main thread and are not counted. ``window`` is a callback that counts
    from the third batch's beginning to the seventh's: four whole steps.

    ``copies`` counts, by the type of the data and the same Keras function
    (or ``fmnist_keras.<function>`` for the project's own code),
    the tensors made from host data (``torch.as_tensor(0.5, device=...)``
    and the like): on a GPU each is a copy to the device, and torch waits
    for it (a synchronisation too).
    """

    NAMES = {"item", "__bool__", "__int__", "__float__", "__index__", "tolist", "numpy", "__array__", "cpu"}
    MAKERS = {"as_tensor", "tensor", "asarray", "from_numpy"}

    def __init__(self):
        import collections

        import torch
        from torch.overrides import TorchFunctionMode

        self.reads, self.copies = collections.Counter(), collections.Counter()
        reads, copies, names, makers = self.reads, self.copies, self.NAMES, self.MAKERS

        class Mode(TorchFunctionMode):
            counting = False

            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if self.counting and (name in names or name in makers):
                    import traceback

                    stack = traceback.extract_stack()
                    # torch's DataLoader draws a seed from a new host tensor once per iterator, not per step.
                    frames = [f for f in stack if "/fmnist_keras/" in f.filename or "/keras/src/" in f.filename
                              and "/backend/" not in f.filename and "/keras/src/ops/" not in f.filename]
                    where = "?" if not frames else (
                        f"fmnist_keras.{frames[-1].name}" if "/fmnist_keras/" in frames[-1].filename
                        else frames[-1].name)
                    if any("/torch/utils/data/" in frame.filename for frame in stack):
                        pass
                    elif name in makers:
                        if args and not isinstance(args[0], torch.Tensor):
                            copies[f"{type(args[0]).__name__} in {where}"] += 1
                    else:
                        reads[f"{func.__name__} in {where}"] += 1
                return func(*args, **(kwargs or {}))

        self.mode = Mode()
        mode = self.mode

        class Window(keras.callbacks.Callback):
            def on_train_batch_begin(self, batch, logs=None):
                mode.counting = 2 <= batch < 6

        self.window = Window()

    def per_step(self) -> dict:
        return {where: count / 4 for where, count in self.reads.items()}

    def copies_per_step(self) -> dict:
        return {kind: count / 4 for kind, count in self.copies.items()}


def _host_reads_per_step(fast: bool, augment: bool = False, callbacks=(), copies=False) -> dict:
    """The main thread's host reads per step of ``fit`` with the recipe's optimizer and schedule (:class:`_HostReads`),
    or with ``copies`` the tensors it makes from host data, by type and Keras function."""
    from fmnist_keras.config import TrainConfig
    from fmnist_keras.engine import recipe

    keras.utils.set_random_seed(0)
    model = build_cnn(filters=(8,), dense_units=16, augment=augment)
    recipe.compile_model(model, TrainConfig(model="cnn", epochs=2, warmup_epochs=1), steps_per_epoch=7)
    rng = _rng()
    x = rng.random((112, 28, 28, 1), dtype=np.float32)
    y = keras.utils.to_categorical(rng.integers(0, 10, 112), 10)
    counter = _HostReads()
    with fastpath.active(model, model.optimizer, enabled=fast) as states, counter.mode:
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[*callbacks, counter.window])
    assert not fast or states["sync_free_schedule"] == "on"
    return counter.copies_per_step() if copies else counter.per_step()


class _BatchEndHook(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        pass


@torch_only
def test_the_fast_path_step_reads_nothing_back_to_the_host():
    stock = _host_reads_per_step(fast=False)
    # Keras's ops.cond in the warm-up schedule (`if pred:`) reads the step: the counter sees it.
    assert sum(count for where, count in stock.items() if where.startswith("__bool__ in ")) >= 1, stock
    assert _host_reads_per_step(fast=True) == {}
    # Keras's torch random ops read their seed (`int(seed)`): one per random op of the flips and shifts.
    stock = _host_reads_per_step(fast=False, augment=True)
    assert stock.get("__int__ in get_random_transformation") == 3.0, stock
    assert _host_reads_per_step(fast=True, augment=True) == {}
    # A batch-end hook that is not async_safe makes Keras convert the logs (loss, accuracy) on the main thread.
    assert _host_reads_per_step(fast=True, callbacks=[_BatchEndHook()]) == {"__array__ in pythonify_logs": 2.0}


@torch_only
def test_the_fast_path_step_copies_nothing_to_the_device_where_keras_copies_numbers_and_seeds():
    stock = _host_reads_per_step(fast=False, augment=True, copies=True)
    fast = _host_reads_per_step(fast=True, augment=True, copies=True)
    # Keras's SeedGenerator.next advances the state by np.array([0, 1]): one per random op.
    assert stock.get("ndarray in next") == 3.0, stock
    assert not any(where.endswith(" in next") for where in fast), fast
    assert sum(fast.values()) < sum(stock.values()), (fast, stock)
    # The project's own code (the sync-free schedule, for one) makes its numbers into tensors once, not per step.
    assert not any(" in fmnist_keras." in where for where in fast), fast
    # Keras's own Python numbers (the flip's 0.5, the loss's batch size, the step's + 1, ...) are made
    # into tensors once (scalar_constants), so a step of the fast path copies nothing to the device.
    assert sum(count for where, count in stock.items() if where.split(" in ")[0] in ("float", "int", "tuple")) >= 8
    assert fast == {}, fast


@torch_only
def test_trains_callbacks_leave_the_steps_logs_on_the_device(tiny_data_dir, tmp_path):
    from fmnist_keras import data as fdata
    from fmnist_keras.config import TrainConfig
    from fmnist_keras.engine import fit
    from fmnist_keras.engine.splits import make_splits
    from fmnist_keras.rundir import RunDir

    config = TrainConfig(model="mlp", epochs=1, batch_size=32, data_dir=str(tiny_data_dir), verify=False)
    splits = make_splits(fdata.load_data(str(tiny_data_dir), verify=False), config)
    run = RunDir.create(str(tmp_path), "run", ["mlp"])
    counter = _HostReads()
    with counter.mode:  # the checkpoint, the CSV log, the backup, NaNGuard and StopOnSignal, as train has them
        result = fit.fit_model(config, splits, run, verbose=2, callbacks=[counter.window])
    assert result.facts["fast_path"]["sync_free_schedule"] == "on" and len(result.history) == 1
    assert counter.per_step() == {}


@torch_only
def test_a_changed_cosine_decay_turns_the_sync_free_schedule_off(fresh_verdicts, monkeypatch, capsys):
    monkeypatch.setitem(fastpath._KNOWN["sync_free_schedule"], "CosineDecay._decay_function", {})
    optimizer = fastpath.schedule_without_sync(keras.optimizers.AdamW(learning_rate=_warmup_cosine()))
    assert "_get_current_learning_rate" not in vars(optimizer)  # Keras's own schedule runs
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: fast path: sync_free_schedule is off")
    assert fastpath.verdicts()["sync_free_schedule"].startswith("off: CosineDecay._decay_function of keras ")


# --- the augmentation's seeds: drawn on the host ----------------------------------------------

def _draws(state_changes=()):
    """Five calls of seeded flips, shifts and dropout (outputs), then the three generators' states.

    ``state_changes``: (call, layer index, state) pairs, assigned after that call.
    """
    keras.utils.set_random_seed(3)
    layers = [keras.layers.RandomFlip("horizontal", seed=5), keras.layers.RandomTranslation(0.1, 0.1, seed=6),
              keras.layers.Dropout(0.5, seed=7)]
    generators = [layers[0].generator, layers[1].generator, layers[2].seed_generator]
    x = _rng().random((4, 8, 8, 1), dtype=np.float32)
    outputs = []
    for call in range(5):
        y = x
        for layer in layers:
            y = layer(y, training=True)
        outputs.append(keras.ops.convert_to_numpy(y))
        for when, index, state in state_changes:
            if when == call:
                generators[index].state.assign(state)
    return outputs, [keras.ops.convert_to_numpy(g.state).tolist() for g in generators]


@torch_only
@pytest.mark.parametrize("state_changes", [(), ((2, 1, [11, 4]), (2, 2, [2**31 - 1, 2**31 - 2]))],
                         ids=["kerass-states", "states-set-between-calls"])
def test_host_seeds_draw_kerass_random_numbers_and_advance_kerass_state(state_changes):
    (stock, stock_states), (fast, fast_states) = _stock_then_fast(lambda: _draws(state_changes))
    assert len(set(a.tobytes() for a in stock)) == 5  # each call draws anew
    for a, b in zip(stock, fast):
        np.testing.assert_array_equal(a, b)
    assert fast_states == stock_states
    if state_changes:  # an assigned state is followed (two draws per shift, one per dropout)
        assert fast_states[1] == [11, 8] and fast_states[2] == [2**31 - 1, -(2**31)]


@torch_only
def test_host_seeds_follow_a_stateless_scope_and_leave_the_variable_alone():
    def draws():
        keras.utils.set_random_seed(3)
        layer = keras.layers.RandomFlip("horizontal", seed=5)
        x = _rng().random((6, 4, 4, 1), dtype=np.float32)
        before = keras.ops.convert_to_numpy(layer(x, training=True))  # the variable's state, then advanced
        state = layer.generator.state
        mapping = [(state, keras.ops.convert_to_tensor([5, 0], dtype="int32"))]
        with keras.StatelessScope(state_mapping=mapping) as scope:
            inside = [keras.ops.convert_to_numpy(layer(x, training=True)) for _ in range(2)]
            scoped = keras.ops.convert_to_numpy(scope.get_current_value(state)).tolist()
        after = keras.ops.convert_to_numpy(layer(x, training=True))
        return before, inside, scoped, after, keras.ops.convert_to_numpy(state).tolist()

    stock, fast = _stock_then_fast(draws)
    np.testing.assert_array_equal(stock[0], fast[0])
    np.testing.assert_array_equal(stock[1][0], fast[1][0])
    np.testing.assert_array_equal(fast[1][0], fast[0])  # the scope starts from the seed's first state again
    np.testing.assert_array_equal(stock[1][1], fast[1][1])
    np.testing.assert_array_equal(stock[3], fast[3])
    assert fast[2] == stock[2] == [5, 2] and fast[4] == stock[4] == [5, 2]


@torch_only
def test_a_changed_seed_generator_turns_host_seeds_off(fresh_verdicts, monkeypatch, capsys):
    monkeypatch.setitem(fastpath._KNOWN["host_seeds"], "SeedGenerator.next", {})
    random = fastpath._torch_backend_module("random")
    stock = random.torch_seed_generator
    assert "host_seeds" not in fastpath.install() and random.torch_seed_generator is stock
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: fast path: host_seeds is off")
    assert fastpath.verdicts()["host_seeds"].startswith("off: SeedGenerator.next of keras ")


@torch_only
def test_host_seeds_follow_draws_keras_makes_itself_and_a_reinstall():
    def draws(between):
        keras.utils.set_random_seed(3)
        generator = keras.random.SeedGenerator(9)
        values = [keras.random.uniform((3,), seed=generator)]
        between(generator, values)
        values.append(keras.random.uniform((3,), seed=generator))
        return [keras.ops.convert_to_numpy(v) for v in values] + [keras.ops.convert_to_numpy(generator.state)]

    def keras_draws(generator, values):  # gamma calls draw_seed, so SeedGenerator.next, itself
        values.append(keras.random.gamma((3,), alpha=2.0, seed=generator))
        generator.next()

    def reinstalled(generator, values):
        with fastpath.stock_keras():
            values.append(keras.random.normal((3,), seed=generator))
        values.append(keras.random.normal((3,), seed=generator))

    for between in (keras_draws, reinstalled):
        stock, fast = _stock_then_fast(lambda: draws(between))
        for a, b in zip(stock, fast):
            np.testing.assert_array_equal(a, b)
    # Integer and absent seeds stay Keras's: the same numbers for the same integer.
    integer, same = _stock_then_fast(lambda: keras.ops.convert_to_numpy(keras.random.uniform((3,), seed=7)))
    np.testing.assert_array_equal(integer, same)
    fastpath.install()
    try:
        assert keras.ops.shape(keras.random.uniform((3,), seed=None)) == (3,)
    finally:
        fastpath.uninstall()


@torch_only
def test_host_seeds_read_the_state_again_after_a_write_between_their_read_and_their_own(installed, monkeypatch):
    random = fastpath._torch_backend_module("random")
    generator = keras.random.SeedGenerator(5)
    random.torch_seed_generator(generator)  # the host copy exists from here

    class Interrupted(dict):
        def __getitem__(self, key):  # as another thread's draw would, between this draw's read and its write
            monkeypatch.setattr(fastpath, "_INCREMENTS", dict(self))
            generator.next()
            return dict.__getitem__(self, key)

    monkeypatch.setattr(fastpath, "_INCREMENTS", Interrupted(fastpath._INCREMENTS))
    random.torch_seed_generator(generator)
    first, second = keras.ops.convert_to_numpy(generator.state).tolist()
    assert second == 3  # three draws (two here, one by Keras), each advanced it once
    assert random.torch_seed_generator(generator).initial_seed() == (first + second) & 0xFFFFFFFF
    assert keras.ops.convert_to_numpy(generator.state).tolist() == [first, second + 1]


@torch_only
def test_host_seeds_leave_a_generator_with_its_own_next_to_keras(installed):
    class Counting(keras.random.SeedGenerator):
        calls = 0

        def next(self, ordered=True):
            Counting.calls += 1
            return super().next(ordered)

    generator = Counting(1)
    keras.random.uniform((2,), seed=generator)
    keras.random.uniform((2,), seed=generator)
    assert Counting.calls == 2


# --- Python numbers as tensors, made once -----------------------------------------------------

NUMBERS = [True, False, 0, 1, -3, 2**31, -(2**31) - 1, 0.5, 0.0, -0.0, float("inf"), -1e-30, (16,), (2, 3), ()]


def _same_tensor(a, b):
    import torch

    assert (a.dtype, a.device, a.shape) == (b.dtype, b.device, b.shape)
    assert torch.equal(a, b)
    if a.is_floating_point():  # -0.0 too
        assert torch.equal(torch.signbit(a), torch.signbit(b))


@torch_only
@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16", "int32", "int64"])
def test_scalar_constants_give_kerass_tensor_and_a_new_one_at_every_call(installed, dtype):
    core = fastpath._torch_backend_module("core")
    kerass = fastpath._ORIGINALS[(core, "convert_to_tensor")]
    assert core.convert_to_tensor is not kerass
    for number in NUMBERS:
        try:
            expected = kerass(number, dtype)
        except Exception as error:  # Keras's error, unchanged
            with pytest.raises(type(error)):
                core.convert_to_tensor(number, dtype)
            continue
        first, second = core.convert_to_tensor(number, dtype), core.convert_to_tensor(number, dtype)
        _same_tensor(first, expected)
        _same_tensor(second, expected)
        if first.numel():
            assert first.data_ptr() != second.data_ptr()
            first.fill_(7)  # a write into one (a Variable made from it, say) leaves the next alone
            _same_tensor(core.convert_to_tensor(number, dtype), expected)


@torch_only
def test_scalar_constants_follow_floatx_and_leave_everything_else_to_keras(installed):
    import torch

    core = fastpath._torch_backend_module("core")
    kerass = fastpath._ORIGINALS[(core, "convert_to_tensor")]
    assert core.convert_to_tensor(0.5).dtype == torch.float32
    keras.config.set_floatx("float64")
    try:
        _same_tensor(core.convert_to_tensor(0.5), kerass(0.5))
        assert core.convert_to_tensor(0.5).dtype == torch.float64
    finally:
        keras.config.set_floatx("float32")
    assert core.convert_to_tensor(0.5).dtype == torch.float32
    assert torch.isnan(core.convert_to_tensor(float("nan")))
    array = _rng().random((2, 3), dtype=np.float32)
    for value in (array, [1, 2], (1.5, 2), torch.ones(2), np.float32(0.5), 1 + 2j, (1,) * 9):
        _same_tensor(core.convert_to_tensor(value), kerass(value))
    with pytest.raises(ValueError, match="sparse"):
        core.convert_to_tensor(1.0, sparse=True)
    variable = keras.Variable(0.0)  # made from a number: its own storage
    variable.assign_add(1.0)
    assert float(core.convert_to_tensor(0.0)) == 0.0 and float(keras.ops.convert_to_numpy(variable)) == 1.0


@torch_only
def test_scalar_constants_make_each_number_once_and_keep_at_most_the_limit(monkeypatch):
    core = fastpath._torch_backend_module("core")
    made = []

    def kerass(x, dtype=None, sparse=None, ragged=None):
        made.append(x)
        return core.convert_to_tensor(x, dtype, sparse, ragged)

    convert = fastpath._constant_converter(kerass, core.get_device)
    for _ in range(3):
        convert(0.5), convert(0.5, "float16"), convert(2), convert(True), convert((4, 5))
    assert made == [0.5, 0.5, 2, True, (4, 5)]  # once per number and dtype
    convert(-0.0), convert(0.0), convert(-0.0)
    assert [repr(x) for x in made[5:]] == ["-0.0", "0.0"] and str(convert(-0.0)) == "tensor(-0.)"
    monkeypatch.setattr(fastpath, "CONSTANTS_LIMIT", 8)
    made.clear()
    for _ in range(2):
        assert [float(convert(x)) for x in (1.5, 2.5)] == [1.5, 2.5]
    assert made == [1.5, 2.5, 2.5]  # 1.5 is the 8th kept; 2.5 is past the limit and made at every call


@torch_only
def test_scalar_constants_under_a_fake_tensor_mode_give_its_tensors_and_keep_none(installed):
    import torch

    fake_tensor = pytest.importorskip("torch._subclasses.fake_tensor")  # what memory and FLOP estimators trace with
    core = fastpath._torch_backend_module("core")
    core.convert_to_tensor(0.375)  # kept, a real tensor
    with fake_tensor.FakeTensorMode():
        kept, new = core.convert_to_tensor(0.375), core.convert_to_tensor(0.125)
        assert isinstance(kept, fake_tensor.FakeTensor) and isinstance(new, fake_tensor.FakeTensor)
        assert keras.ops.add(kept, new).shape == ()
    after = core.convert_to_tensor(0.125)  # the fake one was not kept
    assert type(after) is torch.Tensor and float(after) == 0.125
    assert type(core.convert_to_tensor(0.375)) is torch.Tensor


@torch_only
def test_scalar_constants_replace_every_binding_and_the_block_puts_kerass_back():
    core = fastpath._torch_backend_module("core")
    numpy = fastpath._torch_backend_module("numpy")
    kerass = core.convert_to_tensor
    with fastpath.active(_bn_model()) as enabled:
        assert enabled["scalar_constants"] == "on"
        assert core.convert_to_tensor is not kerass and numpy.convert_to_tensor is core.convert_to_tensor
        assert keras.ops.convert_to_tensor(3).dtype == kerass(3).dtype
    assert core.convert_to_tensor is kerass and numpy.convert_to_tensor is kerass


@torch_only
def test_a_changed_convert_to_tensor_turns_scalar_constants_off(fresh_verdicts, monkeypatch, capsys):
    monkeypatch.setitem(fastpath._KNOWN["scalar_constants"], "core.convert_to_tensor", {})
    core = fastpath._torch_backend_module("core")
    kerass = core.convert_to_tensor
    try:
        assert "scalar_constants" not in fastpath.install() and core.convert_to_tensor is kerass
    finally:
        fastpath.uninstall()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: fast path: scalar_constants is off")
    assert fastpath.verdicts()["scalar_constants"].startswith("off: core.convert_to_tensor of keras ")


# --- inference ------------------------------------------------------------------------------


@torch_only
@pytest.mark.parametrize("mixed", [False, True], ids=["float32", "mixed-precision"])
def test_evaluation_predicts_on_the_fast_path_exactly_what_stock_keras_predicts(tmp_path, mixed):
    from fmnist_keras.engine.evaluation import predict_probabilities
    from fmnist_keras.engine.recipe import dtype_policy
    from fmnist_keras.loading import load_model
    from fmnist_keras.models import build_model
    from fmnist_keras.tta import TTA

    keras.utils.set_random_seed(0)
    with dtype_policy(mixed):
        build_model("cnn", data_format="channels_last", seed=0).save(tmp_path / "model.keras")
    stock, fast = load_model(tmp_path / "model.keras"), load_model(tmp_path / "model.keras")
    x = _rng().random((40, 28, 28, 1), dtype=np.float32)
    tta = TTA(flip=True, shift=True)
    expected = predict_probabilities(stock, x, tta, fast_path=False)
    np.testing.assert_array_equal(predict_probabilities(fast, x, tta), expected)
    assert "call" in vars(fast) and "call" not in vars(stock)  # the fast model called its layers directly
    assert fastpath._ORIGINALS == {}  # and Keras has its own functions back


@torch_only
def test_a_prediction_inside_a_stock_keras_block_runs_stock_keras(tmp_path):
    from fmnist_keras.engine.evaluation import predict_probabilities

    model = build_cnn()
    x = _rng().random((4, 28, 28, 1), dtype=np.float32)
    with fastpath.stock_keras():
        predict_probabilities(model, x)
        assert fastpath._ORIGINALS == {}
    assert "call" not in vars(model)  # no direct layer calls either
    predict_probabilities(model, x)
    assert "call" in vars(model)

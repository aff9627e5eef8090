"""The training recipe: optimizer, schedule and loss, the dtype policy, and the portable copy that is saved.

Imports Keras: import this only after :func:`fmnist_keras.backend.select_backend`.
"""

from __future__ import annotations

import contextlib

import keras

from fmnist_keras.backend import compile_steps_on_jax
from fmnist_keras.config import TrainConfig
from fmnist_keras.models import build_model


def compile_model(model: keras.Model, config: TrainConfig, steps_per_epoch: int) -> keras.Model:
    """AdamW with linear warm-up then cosine decay, label-smoothed cross-entropy.

    With ``config.ema`` > 0 the optimizer also keeps an exponential moving
    average of the weights (Keras's ``use_ema``); :func:`fit_model` validates,
    checkpoints and keeps that average.
    """
    config = config.resolved()
    optimizer = make_optimizer(config, steps_per_epoch)
    # Decay only the weight matrices, not biases or normalisation parameters.
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    compile_steps_on_jax(model)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
    )
    return model


def make_optimizer(config: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """AdamW on :func:`learning_rate_schedule`, with ``config.ema``'s moving average of the weights when > 0."""
    config = config.resolved()
    momentum = averaging_momentum(config.ema, max(1, config.epochs * steps_per_epoch))
    return keras.optimizers.AdamW(
        learning_rate=learning_rate_schedule(config, steps_per_epoch), weight_decay=config.weight_decay,
        use_ema=config.ema > 0, ema_momentum=momentum if config.ema > 0 else 0.99,
    )


def learning_rate_schedule(config: TrainConfig, steps_per_epoch: int):
    """Linear warm-up from 5% of ``config.learning_rate`` to it, then cosine decay to 1% of it."""
    config = config.resolved()
    total_steps = max(1, config.epochs * steps_per_epoch)
    # Short runs (quick tests, --epochs 2) keep most of their steps for the decay.
    warmup_steps = int(round(min(config.warmup_epochs * steps_per_epoch, 0.2 * total_steps)))
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=config.learning_rate * 0.05,
        decay_steps=max(1, total_steps - warmup_steps),
        warmup_target=config.learning_rate if warmup_steps > 0 else None,
        warmup_steps=warmup_steps,
        alpha=0.01,
    )


def averaging_momentum(momentum: float, total_steps: int) -> float:
    """The moving average's momentum for a run of ``total_steps``: ``momentum``, or less in short runs.

    An average with momentum m spans about 1 / (1 - m) steps, and Keras's
    starts at the initial weights; in a run of a few hundred steps an
    average over 1,000 would still be mostly the initial weights. So the
    average spans at most a tenth of the run: m <= 1 - 10 / total_steps.
    """
    return max(0.0, min(momentum, 1.0 - 10.0 / max(1, total_steps)))


def portable_copy(config: TrainConfig):
    """A function that returns the trained model's weights in a ``channels_last`` model.

    Saved models are ``channels_last`` so that every backend runs them
    (TensorFlow's CPU convolutions refuse ``channels_first``). Layer weights
    do not depend on the layout, so the copy is the same network: the
    registry builds it again and the weights are copied over. The copy is
    built once and shares the optimizer, so saving it keeps the training state.
    """
    copy = None

    def convert(trained: keras.Model) -> keras.Model:
        nonlocal copy
        if copy is None:
            with dtype_policy(config.mixed_precision):
                copy = build_model(config.model, data_format="channels_last", seed=config.seed)
            copy.compile(optimizer=trained.optimizer, loss=trained.loss, metrics=["accuracy"])
        copy.set_weights(trained.get_weights())
        return copy

    return convert



def dtype_policy_name(mixed_precision: bool) -> str:
    """``mixed_float16`` on a GPU, ``mixed_bfloat16`` on CPU, else ``float32``."""
    if not mixed_precision:
        return "float32"
    from fmnist_keras.backend import has_gpu

    return "mixed_float16" if has_gpu() else "mixed_bfloat16"


@contextlib.contextmanager
def dtype_policy(mixed_precision: bool):
    """Build layers under a mixed-precision policy, then restore the global one."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype_policy_name(mixed_precision))
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)

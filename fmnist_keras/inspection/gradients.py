"""Gradients of a model output with respect to its input: the one backend-specific function.

Keras 3 has no backend-neutral ``gradient`` op, so saliency and Grad-CAM
(``fmnist_keras.inspection.internals``) ask this module, which uses each backend's own
autodiff: ``torch.autograd``, ``tf.GradientTape`` or ``jax.grad``. Gradients
with respect to an intermediate tensor are taken by splitting the model at
that tensor (``internals.head_model``) and differentiating the head with
respect to its input, so one function serves both cases.
"""

from __future__ import annotations

from typing import Callable

import keras
import numpy as np


def input_gradient(fn: Callable, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Value and gradient of ``fn`` at ``x``, one scalar per example.

    Args:
        fn: maps a backend tensor of shape ``x.shape`` to a tensor of shape
            ``(N,)``, one score per example, each depending only on its own
            example (a model in inference mode, indexed by class).
        x: float32 inputs, shape ``(N, ...)``.

    Returns:
        ``(scores, gradients)`` as numpy arrays of shapes ``(N,)`` and
        ``x.shape``: ``gradients[i] = d scores[i] / d x[i]``. Summing the
        scores before differentiating gives these per-example gradients
        because the examples do not interact.
    """
    x = np.asarray(x, dtype=np.float32)
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        tensor = keras.ops.convert_to_tensor(x).detach().requires_grad_(True)
        scores = fn(tensor)
        (grad,) = torch.autograd.grad(scores.sum(), tensor)
    elif backend == "tensorflow":
        import tensorflow as tf

        tensor = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(tensor)
            scores = fn(tensor)
        grad = tape.gradient(scores, tensor)  # the gradient of a vector is that of its sum
    elif backend == "jax":
        import jax

        def total(tensor):
            values = fn(tensor)
            return values.sum(), values

        (_, scores), grad = jax.value_and_grad(total, has_aux=True)(keras.ops.convert_to_tensor(x))
    else:
        raise ValueError(f"gradients are not implemented for the {backend!r} backend; use torch, tensorflow or jax.")
    return keras.ops.convert_to_numpy(scores), keras.ops.convert_to_numpy(grad)

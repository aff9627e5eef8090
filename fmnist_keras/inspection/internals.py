"""Look inside a trained model: feature maps, filters, embeddings, saliency and Grad-CAM.

Everything here is backend-agnostic (``keras.ops``, numpy); the one
backend-specific step, a gradient, lives in :mod:`fmnist_keras.inspection.gradients`.
Functions take model-ready images (float32 with a channel axis, as made by
``fmnist_keras.data.to_model_input``) in the model's input layout, which
they read from the model (``loading.input_data_format``), never from the
images' shape; they return numpy arrays; drawing is
:mod:`fmnist_keras.inspection.plots`' job. Tensors are turned into numpy with
``keras.ops.convert_to_numpy``, which also works for tensors on a GPU.

Example:
    >>> maps = feature_maps(model, x_test[:1])          # {"block1_relu1": (1, 28, 28, 32), ...}
    >>> heat = grad_cam(model, x_test[:4])              # (4, 28, 28), values in [0, 1]
"""

from __future__ import annotations

import keras
import numpy as np

from fmnist_keras.inspection.arrays import (as_array, check_count, check_index, check_labels, check_shape, is_numbers,
                                            is_pixels)
from fmnist_keras.inspection.gradients import input_gradient
from fmnist_keras.loading import input_data_format

_CONV_TYPES = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
# Layers that only reshape, regularise or pool: not where a block's activations are read.
_PASS_THROUGH = (keras.layers.Dropout, keras.layers.Flatten, keras.layers.MaxPooling2D, keras.layers.AveragePooling2D)


def _is_linear(layer) -> bool:
    activation = getattr(layer, "activation", None)
    return activation is None or getattr(activation, "__name__", "") == "linear"


def _layers(model) -> list:
    """The model's layers in call order, without the InputLayer."""
    return [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]


def layer_names(model) -> list[str]:
    return [layer.name for layer in _layers(model)]


def get_layer(model, name: str):
    """``model.get_layer(name)`` with a one-line error that lists the valid names."""
    names = layer_names(model)
    if name not in names:
        raise ValueError(f"model {model.name!r} has no layer named {name!r}; valid layer names: {', '.join(names)}.")
    return model.get_layer(name)


def conv_layers(model) -> list:
    return [layer for layer in _layers(model) if isinstance(layer, _CONV_TYPES)]


def _require_conv(model, what: str) -> list:
    convs = conv_layers(model)
    if not convs:
        raise ValueError(
            f"{what} needs a convolutional layer, but model {model.name!r} has none "
            f"(layers: {', '.join(layer_names(model))}); pass a CNN (one trained with --model cnn)."
        )
    return convs


def _inputs_of(layer) -> list:
    """The symbolic tensors ``layer`` was called on (none for a layer called more than once)."""
    try:
        inputs = layer.input
    except (AttributeError, ValueError):
        return []
    return list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]


def _output_of(layer):
    try:
        return layer.output
    except (AttributeError, ValueError):
        return None


def default_feature_layers(model) -> list[str]:
    """One layer per convolution: its activated output, each layer once.

    That is the convolution itself when it has a built-in activation
    (``baseline-cnn``), else the first Activation/ReLU downstream of it
    (``block{b}_relu{i}`` in ``cnn``), through BatchNormalization and
    additions: a residual block's shortcut and last convolution share the
    ReLU after their sum.
    """
    layers = _layers(model)
    names = []
    for layer in _require_conv(model, "feature maps"):
        chosen = layer
        if _is_linear(layer):
            current = _output_of(layer)
            for follower in layers[layers.index(layer) + 1:]:
                if current is None or not any(tensor is current for tensor in _inputs_of(follower)):
                    continue  # another branch of the graph
                if isinstance(follower, _CONV_TYPES + _PASS_THROUGH + (keras.layers.Dense,)):
                    break
                if isinstance(follower, (keras.layers.Activation, keras.layers.ReLU)):
                    chosen = follower
                    break
                current = _output_of(follower)
        if chosen.name not in names:
            names.append(chosen.name)
    return names


def check_feature_layers(model, names: list[str]) -> list[str]:
    """Check that ``model`` has a convolution and every named layer, each with maps for output (a 4-D output:
    images, height, width, channels in either order); return the names."""
    _require_conv(model, "feature maps")
    if isinstance(names, str):  # iterated, it would name one layer per character
        raise TypeError(f"layer names {names!r}: pass a list of layer names, such as [{names!r}].")
    if not names:
        raise ValueError(f"no layer named: pass at least one, such as {default_feature_layers(model)[:1]!r}.")
    for name in names:
        output = _output_of(get_layer(model, name))
        if output is not None and not _is_maps(output):
            shape = tuple(output.shape) if hasattr(output, "shape") else f"{len(output)} outputs"
            maps = [layer.name for layer in _layers(model) if _is_maps(_output_of(layer))]
            raise ValueError(f"layer {name!r} of model {model.name!r} outputs {shape}, not feature maps "
                             f"(images, height, width, channels); name a layer with maps: {', '.join(maps)}.")
    return list(names)


def _is_maps(output) -> bool:
    """Whether a layer's symbolic ``output`` is one batch of maps (4-D); a layer of several outputs is not."""
    return hasattr(output, "shape") and len(output.shape) == 4


def intermediate_model(model, names: list[str]) -> keras.Model:
    """One model whose outputs are the named layers' outputs, in order."""
    outputs = [get_layer(model, name).output for name in names]
    return keras.Model(inputs=model.inputs, outputs=outputs, name=f"{model.name}_intermediate")


def check_images(model, images, what: str = "images", fed: bool = True) -> np.ndarray:
    """``images`` as a numpy array, once it is a non-empty batch of ``model``'s input shape; else ValueError
    naming them ``what``. Images ``fed`` to the model must also be model-ready: not raw 0-255 pixels (integers),
    which would reach it unscaled, and numbers, all finite; images only drawn may be integer pixels."""
    array = as_array(images, what)
    expected = tuple(model.inputs[0].shape[1:])
    if array.ndim != len(expected) + 1 or array.shape[1:] != expected or len(array) == 0:
        raise ValueError(
            f"{what} of shape {array.shape}: {model.name} takes a non-empty batch of shape (N, "
            f"{', '.join(map(str, expected))}); add a batch axis with images[None], a channel axis with "
            f"images[..., None], or move a channels_first batch's channel axis with np.moveaxis(images, 1, -1)."
        )
    if not is_numbers(array.dtype) or fed and is_pixels(array.dtype):
        raw = " (pixels 0-255)" if is_pixels(array.dtype) else ""
        raise ValueError(f"{what} of dtype {array.dtype}{raw}: the model takes model-ready floats in [0, 1]; "
                         f"prepare them with fmnist_keras.data.to_model_input(images, data_format).")
    if fed:
        bad = np.flatnonzero(~np.isfinite(array).reshape(len(array), -1).all(axis=1))
        if bad.size:
            raise ValueError(f"{what}: {bad.size} of {len(array)} images hold NaN or infinite pixels (the first is "
                             f"image {bad[0]}); no figure of them would mean anything: drop them or fix their pixels.")
    return array


def _run(model, x: np.ndarray) -> list[np.ndarray]:
    """Run a probe model (built on a list of inputs) in inference mode; numpy outputs, always a list."""
    outputs = model([keras.ops.convert_to_tensor(np.asarray(x, dtype=np.float32))], training=False)
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    # float32 whatever the model computes in: a bfloat16 model's outputs would come back as ml_dtypes arrays,
    # which much of numpy and matplotlib do not take.
    return [keras.ops.convert_to_numpy(keras.ops.cast(out, "float32")) for out in outputs]


def feature_maps(model, images: np.ndarray, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Activations of the named layers (default: each convolution's activated output).

    Args:
        model: a Keras model with at least one convolutional layer.
        images: model-ready batch in the model's layout, (N, 28, 28, 1) or (N, 1, 28, 28).
        names: layer names; any layer whose output is maps may be named (pooling, normalization and
            activations too), not only convolutions.

    Returns:
        ``{name: array}`` in the model's own data format, e.g. (N, H, W, C).
    """
    names = default_feature_layers(model) if names is None else check_feature_layers(model, names)
    images = check_images(model, images)
    outputs = _run(intermediate_model(model, list(names)), images)
    return dict(zip(names, outputs))


def check_image_index(index: int, count: int) -> int:
    """``index`` as a position in ``count`` images (a negative one counts from the end); ValueError when it is
    not a whole number in range."""
    return check_index(index, count, of="test images")


def first_layer_filters(model) -> np.ndarray:
    """The first convolution's kernel, shape (kernel_h, kernel_w, in_channels, filters)."""
    kernel = _require_conv(model, "filters")[0].kernel
    return keras.ops.convert_to_numpy(kernel)


def embedding_layer_name(model) -> str:
    """The penultimate layer: ``embedding`` if present, else the last
    non-dropout layer before ``logits`` (or before the output layer)."""
    names = layer_names(model)
    if "embedding" in names:
        return "embedding"
    layers = _layers(model)
    end = names.index("logits") if "logits" in names else len(layers) - 1
    for layer in reversed(layers[:end]):
        if not isinstance(layer, keras.layers.Dropout):
            return layer.name
    raise ValueError(f"model {model.name!r} has no layer before its output to take an embedding from.")


def embeddings_and_probabilities(model, images: np.ndarray, batch_size: int = 512, name: str | None = None):
    """Penultimate-layer features and predicted probabilities in one pass.

    Returns:
        ``(features, probabilities)``: shapes (N, D) and (N, num_classes).
    """
    name = name or embedding_layer_name(model)
    probe = keras.Model(inputs=model.inputs, outputs=[get_layer(model, name).output, model.outputs[0]])
    features, probabilities = [], []
    for start in range(0, len(images), batch_size):
        feat, prob = _run(probe, images[start: start + batch_size])
        features.append(feat.reshape(len(feat), -1))
        probabilities.append(prob)
    return np.concatenate(features), np.concatenate(probabilities).astype(np.float64)


def pca_2d(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project rows onto their first two principal components (numpy SVD).

    Returns:
        ``(points, explained)``: (N, 2) coordinates and the fraction of the
        variance each of the two components explains; a component the rows do
        not have (one row, or one feature) is 0.

    Raises:
        ValueError: ``features`` is not a non-empty (N, D) array of finite numbers.
    """
    centred = check_shape(features, "features", (None, None), "one row per image")
    if centred.size == 0:
        raise ValueError(f"features of shape {centred.shape}: expected at least one row and one column.")
    centred = centred - centred.mean(axis=0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    points = np.zeros((len(centred), 2))
    points[:, :min(2, len(components))] = centred @ components[:2].T
    variance = np.zeros(2)
    variance[:min(2, len(singular))] = singular[:2] ** 2
    total = (singular**2).sum()
    explained = variance / total if total > 0 else np.zeros(2)
    return points, explained


def misclassified(y_true: np.ndarray, probabilities: np.ndarray, limit: int | None = None) -> np.ndarray:
    """Indices of wrong predictions, most confident mistakes first.

    Raises:
        ValueError: ``probabilities`` is not one row per label, or the labels are not class indices.
    """
    probabilities = check_shape(probabilities, "probabilities", (None, None),
                                "one row of class probabilities per image")
    y_true = check_labels(y_true, len(probabilities), "y_true", probabilities.shape[1])
    limit = None if limit is None else check_count(limit, "limit")
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != y_true)
    order = np.argsort(-probabilities[wrong, predicted[wrong]], kind="stable")
    return wrong[order][:limit]


def _score_model(model) -> keras.Model:
    """The model up to its logits when it has a ``logits`` layer: Grad-CAM and
    saliency use the pre-softmax score, whose gradient does not vanish when
    the softmax saturates."""
    output = model.get_layer("logits").output if "logits" in layer_names(model) else model.outputs[0]
    return keras.Model(inputs=model.inputs, outputs=output)


def _class_score(model, class_indices):
    def score(x):
        out = model([x], training=False)
        return keras.ops.take_along_axis(out, class_indices[:, None], axis=1)[:, 0]

    return score


def _targets(model, images, class_indices) -> np.ndarray:
    """The class to explain for each image: ``class_indices`` when given (one whole number in the model's
    range per image), else the predicted one."""
    if class_indices is None:
        return _run(model, images)[0].argmax(axis=1).astype(np.int32)
    return check_labels(class_indices, len(images), "class_indices", model.outputs[0].shape[-1]).astype(np.int32)


def saliency(model, images: np.ndarray, class_indices=None) -> np.ndarray:
    """Vanilla gradient saliency: |d score / d pixel|, max over channels.

    Args:
        model: any Keras classifier (MLP or CNN).
        images: model-ready batch.
        class_indices: the class to explain for each image; default the predicted one.

    Returns:
        (N, H, W) maps scaled to [0, 1] per image.
    """
    images = check_images(model, images)
    scorer = _score_model(model)
    targets = keras.ops.convert_to_tensor(_targets(scorer, images, class_indices))
    _, grads = input_gradient(_class_score(scorer, targets), images)
    maps = np.abs(grads).max(axis=_channel_axis(model))
    return _normalise(maps)


def head_model(model, layer_name: str) -> keras.Model:
    """The part of ``model`` from ``layer_name``'s output to its score (logits)."""
    scorer = _score_model(model)
    return keras.Model(inputs=[get_layer(model, layer_name).output], outputs=scorer.outputs[0])


def grad_cam(model, images: np.ndarray, layer_name: str | None = None, class_indices=None) -> np.ndarray:
    """Grad-CAM (Selvaraju et al., 2017) on every backend.

    The channels of a convolutional layer's activations are weighted by the
    spatially averaged gradient of the class score, summed, passed through
    ReLU and resized to the image.

    Args:
        model: a Keras model with a convolutional layer.
        images: model-ready batch.
        layer_name: the layer to explain; default the last convolution's
            activated output.
        class_indices: the class to explain for each image; default the predicted one.

    Returns:
        (N, H, W) heat maps in [0, 1], H and W those of the input images.
    """
    layer_name = layer_name or default_feature_layers(model)[-1]
    images = check_images(model, images)
    targets = keras.ops.convert_to_tensor(_targets(_score_model(model), images, class_indices))
    activations = feature_maps(model, images, [layer_name])[layer_name]
    _, grads = input_gradient(_class_score(head_model(model, layer_name), targets), activations)
    # Every layer keeps the input's layout; the default layer, an Activation, has no data_format.
    channels_first = _channel_axis(model) == 1
    if channels_first:
        activations, grads = np.moveaxis(activations, 1, -1), np.moveaxis(grads, 1, -1)
    weights = grads.mean(axis=(1, 2), keepdims=True)
    cam = np.maximum((weights * activations).sum(axis=-1), 0.0)
    size = images.shape[2:4] if channels_first else images.shape[1:3]
    resized = keras.ops.image.resize(cam[..., None].astype(np.float32), size, interpolation="bilinear",
                                     data_format="channels_last")
    return _normalise(keras.ops.convert_to_numpy(resized)[..., 0])


def _channel_axis(model) -> int:
    """The channel axis of the model's input images: 1 (channels_first) or -1, read from the model."""
    return 1 if input_data_format(model) == "channels_first" else -1


def _normalise(maps: np.ndarray) -> np.ndarray:
    """Divide each non-negative map by its maximum; an all-zero map stays zero."""
    maps = np.asarray(maps, dtype=np.float64)
    peak = maps.reshape(len(maps), -1).max(axis=1).reshape(-1, *([1] * (maps.ndim - 1)))
    return maps / np.where(peak > 0, peak, 1.0)

"""The torch fast path: Keras's own layers and optimizer, run by PyTorch's fast kernels.

Keras 3.15's torch backend is correct but loses time in four places that a
profile of ``model.fit`` shows (README, "Speed"; numbers are per training step
on the 2-core CPU):

1. **Layout copies.** A ``channels_last`` convolution or pooling permutes
   its input to NCHW and forces a contiguous copy, and the convolution then
   copies it once more into PyTorch's ``channels_last`` memory format.
   Max-pooling runs in plain NCHW, whose CPU kernel is slow (2.8 ms against
   0.4 ms per call on baseline-cnn). :func:`install` makes the permute a view:
   an NHWC tensor seen as NCHW *is* PyTorch's channels_last memory format,
   so convolutions, pooling and their gradients run there with no copy.
2. **Augmentation.** ``affine_transform`` (behind ``RandomTranslation``)
   loops over the images of a batch in Python: 10-12 ms per batch of 128.
   :func:`install` replaces the loop with one batched ``map_coordinates``
   call, Keras's own, with the image index as one more coordinate.
3. **BatchNorm.** Keras's layer is a chain of elementwise ops (mean of
   squares, subtract, rsqrt, multiply, add) whose backward is longer still.
   :func:`fuse_batch_norm` trains it with ``torch.native_batch_norm``
   (one fused kernel each way) and updates Keras's moving statistics itself.
4. **Adam.** Keras's update is a chain of ``torch._foreach_*`` calls:
   :func:`fuse_adam` runs it in ``torch.optim.adamw(fused=True)``.

Each replacement computes what Keras computes: the tests compare outputs,
gradients, moving statistics and optimizer updates with stock Keras. Models
keep their classes and configs, so saved files are plain Keras and load on
every backend. On tensorflow and jax nothing here does anything: their
compilers already fuse these ops.

``training.train`` runs ``model.fit`` inside :func:`training`; ``train
--no-fast-path`` runs stock Keras instead, and ``benchmarks/bench.py`` times both.
"""

from __future__ import annotations

import contextlib
import types

# What install() replaced: (module, name) -> Keras's original function.
_ORIGINALS: dict = {}


def is_torch() -> bool:
    import keras

    return keras.backend.backend() == "torch"


def enable(model, optimizer=None) -> list[str]:
    """Switch on every part of the fast path that applies to ``model``.

    Installs the process-wide backend fixes (:func:`install`), fuses the
    model's BatchNormalization layers and, when ``optimizer`` is an Adam or
    AdamW, its update step. Returns the names of what was switched on
    (empty on tensorflow and jax), for the run's metrics.
    """
    if not is_torch():
        return []
    enabled = install()
    if fuse_batch_norm(model):
        enabled.append("fused_batch_norm")
    if optimizer is not None and _is_fused(fuse_adam(optimizer)):
        enabled.append("fused_adam")
    return enabled


@contextlib.contextmanager
def training(model, optimizer=None, enabled: bool = True):
    """The fast path for the enclosed training, Keras's own functions after it.

    Yields the names of what was switched on (:func:`enable`); with
    ``enabled=False`` runs the block on stock Keras and yields ``[]``. The
    process-wide replacements are undone on exit unless they were installed
    before, so code after training (export, other models) sees Keras as shipped.
    """
    if not enabled:
        with stock_keras():
            yield []
        return
    installed_before = bool(_ORIGINALS)
    try:
        yield enable(model, optimizer)
    finally:
        if not installed_before:
            uninstall()


def install() -> list[str]:
    """Replace two functions of Keras's torch backend, once per process.

    ``keras.src.backend.torch.nn._transpose_spatial_inputs`` (a view instead
    of a copy) and ``keras.src.backend.torch.image.affine_transform``
    (batched). Both return the same values as Keras's; :func:`uninstall`
    puts Keras's back. A no-op on the other backends.
    """
    if not is_torch():
        return []
    from keras.src.backend.torch import image, nn

    # A Keras release that renames these private functions keeps its own code.
    replaced = []
    if _replace(nn, "_transpose_spatial_inputs", _transpose_spatial_inputs):
        replaced.append("channels_last_views")
    if _replace(image, "affine_transform", _affine_transform):
        replaced.append("batched_affine_transform")
    return replaced


def uninstall() -> None:
    """Restore Keras's own functions (for comparisons and tests)."""
    for (module, name), original in list(_ORIGINALS.items()):
        setattr(module, name, original)
        del _ORIGINALS[(module, name)]


@contextlib.contextmanager
def stock_keras():
    """Run the enclosed code with Keras's own backend functions."""
    installed = bool(_ORIGINALS)
    uninstall()
    try:
        yield
    finally:
        if installed:
            install()


def _replace(module, name: str, function) -> bool:
    """Put ``function`` in place of ``module.name``; False if Keras has no such function."""
    if (module, name) not in _ORIGINALS:
        if not callable(getattr(module, name, None)):
            return False
        _ORIGINALS[(module, name)] = getattr(module, name)
        setattr(module, name, function)
    return True


# --- 1. layouts ---------------------------------------------------------------------------


def _transpose_spatial_inputs(inputs):
    """channels_last -> channels_first as a view (Keras copies it contiguous).

    The view of an NHWC tensor is an NCHW tensor in PyTorch's channels_last
    memory format, which ``conv2d``, ``max_pool2d`` and their gradients use
    natively; the outputs come back NHWC-contiguous when permuted back.
    """
    permutations = {3: (0, 2, 1), 4: (0, 3, 1, 2), 5: (0, 4, 1, 2, 3)}
    if inputs.ndim not in permutations:
        return _original("nn", "_transpose_spatial_inputs")(inputs)  # Keras's error message
    return inputs.permute(permutations[inputs.ndim])


def _original(module_name: str, name: str):
    """Keras's own function that :func:`install` replaced."""
    from keras.src.backend.torch import image, nn

    return _ORIGINALS[({"nn": nn, "image": image}[module_name], name)]


# --- 2. augmentation ----------------------------------------------------------------------


def _affine_transform(
    images, transform, interpolation="bilinear", fill_mode="constant", fill_value=0, data_format=None
):
    """Keras's torch ``affine_transform``, its per-image loop made one batched call.

    The coordinates are computed exactly as Keras computes them; the batch
    index is added as the first coordinate (integer-valued, so nearest and
    bilinear sampling pick that image alone) and Keras's ``map_coordinates``
    samples the whole batch at once.
    """
    import torch
    from keras.src import backend
    from keras.src.backend.torch import image as timage
    from keras.src.backend.torch.core import convert_to_tensor

    original = _original("image", "affine_transform")
    images = convert_to_tensor(images)
    transform = convert_to_tensor(transform)
    if (
        images.ndim != 4
        or transform.ndim != 2
        or interpolation not in timage.AFFINE_TRANSFORM_INTERPOLATIONS
        or fill_mode not in timage.AFFINE_TRANSFORM_FILL_MODES
    ):
        # Single images and bad arguments: Keras's path and Keras's errors.
        return original(images, transform, interpolation, fill_mode, fill_value, data_format)
    data_format = backend.standardize_data_format(data_format)
    if data_format == "channels_first":
        images = images.permute((0, 2, 3, 1))
    batch_size = images.shape[0]

    # From here to `coordinates` this is Keras's code (keras/src/backend/torch/image.py).
    meshgrid = torch.meshgrid(
        *[torch.arange(size, dtype=transform.dtype, device=transform.device) for size in images.shape[1:]],
        indexing="ij",
    )
    indices = torch.concatenate([torch.unsqueeze(x, dim=-1) for x in meshgrid], dim=-1)
    indices = torch.tile(indices, (batch_size, 1, 1, 1, 1))
    transform = transform.clone()  # Keras swaps entries in place, in the caller's tensor
    a0, a2, b1, b2 = (transform[:, i].clone() for i in (0, 2, 4, 5))
    transform[:, 0], transform[:, 2], transform[:, 4], transform[:, 5] = b1, b2, a0, a2
    transform = torch.nn.functional.pad(transform, pad=[0, 1, 0, 0], mode="constant", value=1)
    transform = torch.reshape(transform, (batch_size, 3, 3))
    offset = transform[:, 0:2, 2].clone()
    offset = torch.nn.functional.pad(offset, pad=[0, 1, 0, 0])
    transform[:, 0:2, 2] = 0
    coordinates = torch.einsum("Bhwij, Bjk -> Bhwik", indices, transform)
    coordinates = torch.moveaxis(coordinates, source=-1, destination=1)
    coordinates += torch.reshape(offset, shape=(*offset.shape, 1, 1, 1))

    # (B, 3, H, W, C) per-image coordinates -> (4, B, H, W, C) batch coordinates.
    batch_index = torch.arange(batch_size, dtype=coordinates.dtype, device=coordinates.device)
    batch_index = batch_index.reshape(1, batch_size, 1, 1, 1).expand(1, *images.shape)
    coordinates = torch.cat([batch_index, coordinates.moveaxis(1, 0)], dim=0)
    affined = timage.map_coordinates(
        images,
        coordinates,
        order=timage.AFFINE_TRANSFORM_INTERPOLATIONS[interpolation],
        fill_mode=fill_mode,
        fill_value=fill_value,
    )
    if data_format == "channels_first":
        affined = affined.permute((0, 3, 1, 2))
    return affined


# --- 3. BatchNorm -------------------------------------------------------------------------


def fuse_batch_norm(model) -> int:
    """Train ``model``'s BatchNormalization layers with PyTorch's fused kernel.

    In training mode (and with no mask, no renorm) the layer's output comes
    from ``torch.native_batch_norm``, which also returns the batch mean and
    inverse standard deviation; from those the layer's moving statistics are
    updated with Keras's formula (biased variance, ``momentum``). Inference,
    masks and renorm keep Keras's own code. Returns how many layers are fused
    (fusing twice changes nothing).
    """
    import keras

    if not is_torch():
        return 0
    fused = 0
    for layer in _all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and not layer.renorm:
            if "call" not in vars(layer):  # not fused yet
                layer.call = types.MethodType(_fused_batch_norm_call, layer)
            fused += 1
    return fused


def _all_layers(model):
    for layer in getattr(model, "layers", ()):
        yield layer
        yield from _all_layers(layer)


def _fused_batch_norm_call(layer, inputs, training=None, mask=None):
    import keras
    import torch

    if mask is not None or not (training and layer.trainable):
        return type(layer).call(layer, inputs, training=training, mask=mask)
    # Keras computes in at least float32 (float16 statistics overflow).
    x = inputs if inputs.dtype == torch.float64 else inputs.to(torch.float32)
    axis = layer.axis % x.ndim
    x_nc = x.movedim(axis, 1) if axis != 1 else x  # a view: NHWC becomes channels_last NCHW
    gamma = layer.gamma.value.to(x.dtype) if layer.scale else None
    beta = layer.beta.value.to(x.dtype) if layer.center else None
    outputs, mean, inverse_std = torch.native_batch_norm(x_nc, gamma, beta, None, None, True, 0.0, layer.epsilon)
    with torch.no_grad():
        variance = (inverse_std.pow(-2) - layer.epsilon).clamp_min(0.0)  # the biased batch variance
        momentum = layer.momentum
        for moving, batch in ((layer.moving_mean, mean), (layer.moving_variance, variance)):
            current = moving.value.to(x.dtype)
            moving.assign(current * momentum + batch * (1.0 - momentum))
    if axis != 1:
        outputs = outputs.movedim(1, axis)
    return keras.ops.cast(outputs, layer.compute_dtype)


# --- 4. Adam ------------------------------------------------------------------------------


def _is_fused(optimizer) -> bool:
    """Whether :func:`fuse_adam` gave ``optimizer`` its own update step."""
    return "_parallel_update_step" in vars(optimizer)


def fuse_adam(optimizer):
    """On torch, run a Keras ``Adam``/``AdamW`` step in PyTorch's fused kernel.

    Keras's torch Adam is a chain of ``torch._foreach_*`` calls that allocate
    temporaries (18 ms per step for the MLP's 1.3 M weights on the 2-core
    CPU, against 1.2 ms fused), and its decoupled weight decay is one more
    pass that evaluates the learning-rate schedule a second time. This swaps
    the instance's update step for ``torch.optim.adamw(fused=True)``, called
    once for the weights that decay and once for those excluded by
    ``exclude_from_weight_decay``; Keras's own decay pass is skipped (the
    kernel multiplies by ``1 - lr * weight_decay`` before the Adam step, as
    Keras does). Epsilon is rescaled each step because Keras adds it before
    the bias correction and PyTorch after. The update is Keras's (tested to
    2e-5). The optimizer keeps its class, variables and config, so saved
    models are unchanged. Other backends, AMSGrad, EMA and gradient
    accumulation: unchanged.
    """
    import keras

    if (
        not is_torch()
        or not isinstance(optimizer, keras.optimizers.Adam)
        or optimizer.amsgrad
        or optimizer.use_ema
        or optimizer.gradient_accumulation_steps
    ):
        return optimizer
    import torch
    from torch.optim.adamw import adamw

    def fused_update_step(grads, variables, learning_rate):
        index = optimizer._get_variable_index
        step = int(optimizer.iterations.value)  # one scalar read per step
        bias_correction2 = 1.0 - float(optimizer.beta_2) ** (step + 1)
        decay = float(optimizer.weight_decay or 0.0)
        groups = {}  # weight decay -> (params, grads, first moments, second moments)
        for grad, variable in zip(grads, variables):
            rate = decay if decay and optimizer._use_weight_decay(variable) else 0.0
            group = groups.setdefault(rate, ([], [], [], []))
            group[0].append(variable.value)
            group[1].append(grad.contiguous())
            group[2].append(optimizer._momentums[index(variable)].value)
            group[3].append(optimizer._velocities[index(variable)].value)
        device = variables[0].value.device
        lr = learning_rate.to(device=device, dtype=torch.float32) if torch.is_tensor(learning_rate) else learning_rate
        for rate, (params, grads_, exp_avgs, exp_avg_sqs) in groups.items():
            adamw(
                params,
                grads_,
                exp_avgs,
                exp_avg_sqs,
                [],
                [torch.tensor(float(step), device=device) for _ in params],  # the kernel adds 1
                fused=True,
                amsgrad=False,
                beta1=float(optimizer.beta_1),
                beta2=float(optimizer.beta_2),
                lr=lr,
                weight_decay=rate,
                eps=float(optimizer.epsilon) / bias_correction2**0.5,
                maximize=False,
            )

    optimizer._parallel_update_step = fused_update_step
    optimizer._apply_weight_decay = _decay_in_the_fused_step
    return optimizer


def _decay_in_the_fused_step(variables):
    """Keras's weight-decay pass, replaced: the fused step applies the decay."""

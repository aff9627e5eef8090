"""The torch fast path, and the one module that reaches past Keras's public API.

Keras's torch backend is correct but loses time in five places that a
profile of ``model.fit`` shows (``docs/speed.md``), and makes the host wait
for the device in three more (reads back to the host, copies from it):

1. **Layout copies** (``channels_last_views``). Keras 3.15 permutes a
   ``channels_last`` convolution or pooling input to NCHW and forces a
   contiguous copy; NCHW max-pooling is slow on CPU. The replacement makes the
   permute a view: an NHWC tensor seen as NCHW *is* PyTorch's channels_last
   memory format, so convolutions and pooling run there with no copy.
2. **Augmentation** (``batched_affine_transform``). ``affine_transform``
   (behind ``RandomTranslation``) loops over the images of a batch in Python;
   the replacement makes one batched call of Keras's own ``map_coordinates``.
3. **BatchNorm** (``fused_batch_norm``). Keras's layer is a chain of
   elementwise ops; the replacement trains it with ``torch.native_batch_norm``
   and updates Keras's moving statistics with Keras's formula.
4. **AdamW** (``fused_adam``). Keras's update is a chain of
   ``torch._foreach_*`` calls plus a separate weight-decay pass; the
   replacement runs ``torch.optim.adamw(fused=True)`` with the decay inside.
5. **Layer calls** (``direct_layer_calls``). ``Layer.__call__`` costs more
   than most of these layers' ``call()`` (input conversion, argument binding,
   masks, scopes) and the functional graph walk adds more. For a model that
   is a plain chain of known layers, the model's ``call`` runs each layer's
   ``call()`` in order instead, with the casts and autocast scopes of
   mixed precision that ``Layer.__call__`` would add.
6. **Learning-rate schedule** (``sync_free_schedule``). ``CosineDecay`` with
   a warm-up picks its branch with ``ops.cond``, which on torch is a Python
   ``if`` on a device tensor: one host read per step, a synchronisation on a
   GPU. The replacement computes both branches with the same ops and keeps
   one with ``ops.where``.
7. **Augmentation seeds** (``host_seeds``). Keras's torch random ops read the
   seed of a ``SeedGenerator`` with ``int()`` at every call (three per step of
   the CNN's flips and shifts), and advance its state with an increment made
   from a numpy array (a copy to the device). The replacement keeps a host
   copy of each generator's state, draws the same seeds from it, and advances
   the state on the device with an increment made there once.
8. **Numbers as tensors** (``scalar_constants``). Keras's layers, losses,
   metrics and optimizer turn Python numbers into tensors at every step (the
   flip's ``0.5``, the shift's image size, the class count of label
   smoothing, the batch size in the loss and the metrics, the step
   counter's ``+ 1``): eight per step of the CNN. On a GPU each is a copy
   from host memory that torch waits for, so the host stops until the work
   queued before it is done. The replacement makes each number (and each
   short tuple of integers) into a tensor once per device and dtype, and
   hands out a copy made on the device (``clone``), which nothing waits for;
   the values, dtypes and devices are Keras's.

Each replacement computes what Keras computes (the tests compare outputs,
gradients, moving statistics and updates with stock Keras). Models keep their
classes and configs, so saved files are plain Keras. On tensorflow and jax
nothing here does anything.

The fence
---------
Every reach into ``keras.src`` in this project is in this module. Before a
piece replaces anything it finds each of its targets and compares a
fingerprint of the target's source (:func:`fingerprint`) with the versions the
piece was written against (``_KNOWN``). A missing target or an unknown
fingerprint turns the piece off, one warning line says why, and
``metrics.json`` (``fast_path``) records it; Keras's own code then runs. A
piece is installed whole or not at all. Where Keras already does what a
piece works around, the piece is "not needed" and stays off silently.

=========================  ===============================================  ============================
piece                      private targets                                  checked against Keras
=========================  ===============================================  ============================
channels_last_views        torch backend ``nn._transpose_spatial_inputs``   3.15.1: on; 3.14.0 and
                                                                            3.16.0.dev2026102704: not
                                                                            needed
batched_affine_transform   torch backend ``image.affine_transform``,        3.14.0, 3.15.1,
                           ``map_coordinates``, ``AFFINE_TRANSFORM_*``      3.16.0.dev2026102704
fused_batch_norm           ``BatchNormalization.call`` (its formula)        all three
fused_adam                 torch ``Adam._parallel_update_step``,            all three
                           ``TorchOptimizer._apply_weight_decay``,
                           ``BaseOptimizer._backend_apply_gradients``,
                           ``TorchParallelOptimizer._backend_update_step``,
                           ``_get_variable_index``, ``_use_weight_decay``,
                           ``_momentums``, ``_velocities``
direct_layer_calls         ``Layer.__call__``, ``Operation.__call__``,        all three
                           ``Functional.call``, ``Sequential.call``,
                           ``AutocastScope``, ``get_autocast_scope``,
                           ``DTypePolicy.convert_input``
sync_free_schedule         ``CosineDecay.__call__``, ``_warmup_function``,  all three
                           ``_decay_function`` (their formula),
                           ``BaseOptimizer._get_current_learning_rate``,
                           ``_learning_rate``
tensorflow_unloaded        ``utils.module_utils.tensorflow._available``     all three
host_seeds                 torch backend ``random.torch_seed_generator``,   all three
                           ``random.get_device``, ``Variable._direct_assign``;
                           ``SeedGenerator.next``, ``draw_seed``
scalar_constants           torch backend ``core.convert_to_tensor`` (and     all three
                           every ``keras.src`` module that imported it),
                           ``core.get_device``
keras_ddp                  torch ``Trainer._initialize_ddp``, ``ddp_model``  3.16.0.dev2026102704 (Keras
                                                                            wraps DDP); 3.14.0, 3.15.1
                                                                            (it does not)
=========================  ===============================================  ============================

Since Keras 3.16 the torch backend's modules live in
``keras.src.backend.torch.ops``; :func:`_torch_backend_module` looks there
first, then in ``keras.src.backend.torch``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import inspect
import math
import sys
import types
import weakref

# The Keras releases the fingerprints below were taken from.
KERAS_CHECKED = ("3.14.0", "3.15.1", "3.16.0.dev2026102704")

# piece -> target -> {fingerprint of the target's source: "on" or "not needed: why"}.
# Targets named only in _targets() (constants, attributes) are checked for presence.
_KNOWN = {
    "channels_last_views": {
        "nn._transpose_spatial_inputs": {
            "ef6498d8ab66": "on",  # 3.15.1: permute, then a contiguous copy
            "7c5000dffb3b": "not needed: Keras's own permute is already a view",  # 3.14.0
            "74973895b03b": "not needed: Keras asks for the channels_last memory format itself",  # 3.16.0.dev
        },
    },
    "batched_affine_transform": {
        "image.affine_transform": {
            "d32b6ec1bd9c": "on",  # 3.14.0, 3.15.1
            "888442a67d08": "on",  # 3.16.0.dev: the same loop, and a check of the transform's shape
        },
    },
    "fused_batch_norm": {
        "BatchNormalization.call": {"31502bd832c5": "on"},  # 3.14.0, 3.15.1, 3.16.0.dev
    },
    "fused_adam": {
        "Adam._parallel_update_step": {"8034ae3d81d0": "on"},
        "TorchOptimizer._apply_weight_decay": {"53875ea55286": "on"},
        "BaseOptimizer._backend_apply_gradients": {
            "48d6e24d5803": "on",  # 3.14.0, 3.15.1
            "4de6fa4f3a26": "on",  # 3.16.0.dev: EMA overwrite moved into a method; decay as before
        },
        "TorchParallelOptimizer._backend_update_step": {"039e46a21176": "on"},
    },
    "sync_free_schedule": {
        # The same formula in the three; 3.16.0.dev calls backend.ops instead of keras.ops.
        "CosineDecay.__call__": {"1f20975963bf": "on", "f7909309c708": "on"},  # 3.14.0 and 3.15.1; 3.16.0.dev
        "CosineDecay._warmup_function": {"7ca0939311e6": "on", "10e77cca5d10": "on"},
        "CosineDecay._decay_function": {"d9be2e4bbc6a": "on", "318642ce44e4": "on"},
        "BaseOptimizer._get_current_learning_rate": {"fa62361e2086": "on"},
    },
    "host_seeds": {
        "random.torch_seed_generator": {"55531ead76bc": "on"},  # the same in the three
        # 3.16.0.dev reaches the backend's ops as backend.ops; the same update.
        "SeedGenerator.next": {"d2174a08ab35": "on", "dde0d5bf4584": "on"},  # 3.14.0 and 3.15.1; 3.16.0.dev
        "draw_seed": {"fa9c160c92e8": "on", "b714a392df87": "on"},  # a SeedGenerator's seed is its next()
        # An in-place copy_, which torch's version counter sees (the host copy relies on it).
        "Variable._direct_assign": {"312ccee23201": "on", "e59b35c2e79e": "on"},
    },
    "scalar_constants": {
        # What a number becomes depends on the number, the dtype asked for,
        # floatx and the device alone in the three (3.14.0 converts a number
        # with a dtype through numpy; 3.16.0.dev moves tensors on one more line).
        "core.convert_to_tensor": {
            "6fceba387fb6": "on",  # 3.14.0
            "3d6b9ba9a06f": "on",  # 3.15.1
            "0f7830910e66": "on",  # 3.16.0.dev
        },
    },
    "direct_layer_calls": {
        # What these do for a tensor without a mask, remat or quantization is
        # the same in the three: cast a float input to the layer's input
        # dtype, enter the autocast scope, resolve `training`, call `call()`.
        "Layer.__call__": {"4fb7e42e4ffd": "on", "fa98a1c02050": "on"},  # 3.14.0 and 3.15.1; 3.16.0.dev
        "Operation.__call__": {
            "ee119129373f": "on",  # 3.14.0
            "54fc9fcb8839": "on",  # 3.15.1
            "7d0ccf920271": "on",  # 3.16.0.dev: remat and quantization moved into _dispatch_call
        },
        "Functional.call": {"efd7243f579a": "on", "0cb7a551d785": "on"},  # 3.14.0 and 3.15.1; 3.16.0.dev
        "Sequential.call": {"8c623d4db11a": "on", "4f633be04f45": "on"},  # 3.14.0 and 3.15.1; 3.16.0.dev
        "AutocastScope": {"41c96933fcde": "on", "93ff582ba7d3": "on"},  # 3.14.0 and 3.15.1; 3.16.0.dev
        "get_autocast_scope": {"73d3f94846bb": "on"},
        "DTypePolicy.convert_input": {"b80cd0725391": "on", "0546800f3da9": "on"},  # 3.14.0 and 3.15.1; 3.16.0.dev
    },
}
PIECES = (
    "channels_last_views", "batched_affine_transform", "fused_batch_norm", "fused_adam", "direct_layer_calls",
    "sync_free_schedule", "host_seeds", "scalar_constants",
)

# What install() replaced: (module, name) -> Keras's original function.
_ORIGINALS: dict = {}
_WARNED: set = set()
# How many stock_keras() blocks are open: active() inside one runs stock Keras.
_STOCK_BLOCKS = 0


@dataclasses.dataclass(frozen=True)
class Verdict:
    """Whether a piece runs: ``on``, ``not needed`` (Keras does it) or ``off`` (a target changed)."""

    state: str
    why: str = ""

    @property
    def on(self) -> bool:
        return self.state == "on"

    def __str__(self) -> str:
        return f"{self.state}: {self.why}" if self.why else self.state


def fingerprint(obj) -> str:
    """The first 12 hex digits of the SHA-256 of ``obj``'s source code."""
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:12]


def is_torch() -> bool:
    import keras

    return keras.backend.backend() == "torch"


def _torch_backend_module(name: str):
    """Keras's torch backend module ``name`` (``nn``, ``image``, ``core``), or None."""
    for path in (f"keras.src.backend.torch.ops.{name}", f"keras.src.backend.torch.{name}"):
        try:
            return importlib.import_module(path)
        except ImportError:
            continue
    return None


def _attribute(owner, name: str):
    return getattr(owner, name, None) if owner is not None else None


def _targets(piece: str) -> dict:
    """The private objects ``piece`` replaces or relies on (None where Keras has none)."""
    if piece == "channels_last_views":
        return {"nn._transpose_spatial_inputs": _attribute(_torch_backend_module("nn"), "_transpose_spatial_inputs")}
    if piece == "batched_affine_transform":
        image = _torch_backend_module("image")
        return {
            "image.affine_transform": _attribute(image, "affine_transform"),
            "image.map_coordinates": _attribute(image, "map_coordinates"),
            "image.AFFINE_TRANSFORM_INTERPOLATIONS": _attribute(image, "AFFINE_TRANSFORM_INTERPOLATIONS"),
            "image.AFFINE_TRANSFORM_FILL_MODES": _attribute(image, "AFFINE_TRANSFORM_FILL_MODES"),
        }
    if piece == "fused_batch_norm":
        import keras

        return {"BatchNormalization.call": keras.layers.BatchNormalization.call}
    if piece == "fused_adam":
        optimizers = {}
        for path, name in (
            ("keras.src.backend.torch.optimizers.torch_adam", "Adam"),
            ("keras.src.backend.torch.optimizers.torch_optimizer", "TorchOptimizer"),
            ("keras.src.backend.torch.optimizers.torch_parallel_optimizer", "TorchParallelOptimizer"),
            ("keras.src.optimizers.base_optimizer", "BaseOptimizer"),
        ):
            try:
                optimizers[name] = getattr(importlib.import_module(path), name, None)
            except ImportError:
                optimizers[name] = None
        return {
            "Adam._parallel_update_step": _attribute(optimizers["Adam"], "_parallel_update_step"),
            "TorchOptimizer._apply_weight_decay": _attribute(optimizers["TorchOptimizer"], "_apply_weight_decay"),
            "BaseOptimizer._backend_apply_gradients": _attribute(
                optimizers["BaseOptimizer"], "_backend_apply_gradients"
            ),
            "TorchParallelOptimizer._backend_update_step": _attribute(
                optimizers["TorchParallelOptimizer"], "_backend_update_step"
            ),
            "BaseOptimizer._get_variable_index": _attribute(optimizers["BaseOptimizer"], "_get_variable_index"),
            "BaseOptimizer._use_weight_decay": _attribute(optimizers["BaseOptimizer"], "_use_weight_decay"),
        }
    if piece == "sync_free_schedule":
        import keras

        try:
            from keras.src.optimizers.base_optimizer import BaseOptimizer
        except ImportError:
            BaseOptimizer = None
        cosine = keras.optimizers.schedules.CosineDecay
        return {
            "CosineDecay.__call__": cosine.__call__,
            "CosineDecay._warmup_function": _attribute(cosine, "_warmup_function"),
            "CosineDecay._decay_function": _attribute(cosine, "_decay_function"),
            "BaseOptimizer._get_current_learning_rate": _attribute(BaseOptimizer, "_get_current_learning_rate"),
        }
    if piece == "direct_layer_calls":
        import keras

        try:
            from keras.src.backend.common import variables
            from keras.src.models.functional import Functional
            from keras.src.ops.operation import Operation
        except ImportError:
            Functional = Operation = variables = None
        return {
            "Layer.__call__": keras.layers.Layer.__call__,
            "Operation.__call__": _attribute(Operation, "__call__"),
            "Functional.call": _attribute(Functional, "call"),
            "Sequential.call": keras.Sequential.call,
            "AutocastScope": _attribute(variables, "AutocastScope"),
            "get_autocast_scope": _attribute(variables, "get_autocast_scope"),
            "DTypePolicy.convert_input": keras.dtype_policies.DTypePolicy.convert_input,
        }
    if piece == "host_seeds":
        try:
            from keras.src.random import seed_generator
        except ImportError:
            seed_generator = None
        random = _torch_backend_module("random")
        return {
            "random.torch_seed_generator": _attribute(random, "torch_seed_generator"),
            "random.get_device": _attribute(random, "get_device"),
            "SeedGenerator.next": _attribute(_attribute(seed_generator, "SeedGenerator"), "next"),
            "draw_seed": _attribute(seed_generator, "draw_seed"),
            "Variable._direct_assign": _attribute(_attribute(_torch_backend_module("core"), "Variable"),
                                                  "_direct_assign"),
        }
    if piece == "scalar_constants":
        core = _torch_backend_module("core")
        return {"core.convert_to_tensor": _attribute(core, "convert_to_tensor"),
                "core.get_device": _attribute(core, "get_device")}
    raise ValueError(f"unknown fast-path piece {piece!r}; expected one of {', '.join(PIECES)}.")


@functools.lru_cache(maxsize=None)
def verdict(piece: str) -> Verdict:
    """Whether ``piece`` may run with the Keras installed here (checked once per process)."""
    if not is_torch():
        return Verdict("not needed", "not the torch backend")
    import keras

    targets = _targets(piece)
    for label, target in targets.items():
        if target is None:
            return Verdict("off", f"keras {keras.__version__} has no {label}")
    states = []
    for label, known in _KNOWN.get(piece, {}).items():
        found = fingerprint(targets[label])
        if found not in known:
            return Verdict(
                "off",
                f"{label} of keras {keras.__version__} is not the code this piece was written against "
                f"(fingerprint {found}; checked on keras {', '.join(KERAS_CHECKED)})",
            )
        states.append(known[found])
    reasons = [state.split(": ", 1)[1] for state in states if state != "on"]
    return Verdict("not needed", reasons[0]) if reasons else Verdict("on")


def _usable(piece: str) -> bool:
    """``verdict(piece).on``, with one warning line the first time a piece is off."""
    result = verdict(piece)
    if result.state == "off" and piece not in _WARNED:
        _WARNED.add(piece)
        print(f"warning: fast path: {piece} is off, Keras's own code runs instead: {result.why}", file=sys.stderr)
    return result.on


def verdicts() -> dict[str, str]:
    """Every piece and whether it runs, as ``metrics.json`` records it ({} off torch)."""
    return {piece: str(verdict(piece)) for piece in PIECES} if is_torch() else {}


def enable(model, optimizer=None) -> dict[str, str]:
    """Switch on every piece that applies to ``model`` and is usable here.

    Installs the process-wide pieces (:func:`install`), fuses the model's
    BatchNormalization layers and, when ``optimizer`` is an Adam or AdamW,
    its update step. Returns :func:`verdicts` (``{}`` on tensorflow and jax),
    with ``on`` for the pieces that now run; a piece that applies to nothing
    here (no BatchNorm layer, another optimizer) says so.
    """
    if not is_torch():
        return {}
    install()
    states = verdicts()
    if states["fused_batch_norm"] == "on" and not fuse_batch_norm(model):
        states["fused_batch_norm"] = "not needed: the model has no BatchNormalization layer"
    if states["fused_adam"] == "on" and (optimizer is None or not _is_fused(fuse_adam(optimizer))):
        states["fused_adam"] = "not needed: the optimizer is not a plain Adam or AdamW"
    if states["sync_free_schedule"] == "on" and (optimizer is None or not _schedule_is_sync_free(
            schedule_without_sync(optimizer))):
        states["sync_free_schedule"] = "not needed: the learning rate is not a CosineDecay with a warm-up"
    if states["direct_layer_calls"] == "on":
        why = call_layers_directly(model)
        if why:
            states["direct_layer_calls"] = f"not needed: {why}"
    return states


@contextlib.contextmanager
def active(model, optimizer=None, enabled: bool = True):
    """The fast path for the enclosed training or prediction, Keras's own functions after it.

    Yields what :func:`enable` returns; with ``enabled=False``, or inside a
    :func:`stock_keras` block, runs the block on stock Keras and yields ``{}``
    (and leaves the model as it is). The process-wide replacements are undone
    on exit unless they were installed before, so code after training (export,
    other models) sees Keras as shipped. The model itself keeps its fused
    BatchNorm layers and direct layer calls, which compute what Keras's do.
    """
    if not enabled or _STOCK_BLOCKS:
        with stock_keras():
            yield {}
        return
    installed_before = bool(_ORIGINALS)
    try:
        yield enable(model, optimizer)
    finally:
        if not installed_before:
            uninstall()


def install() -> list[str]:
    """Put the process-wide pieces in place, those whose targets check out.

    ``channels_last_views`` (a view instead of a copy),
    ``batched_affine_transform``, ``host_seeds`` and ``scalar_constants``. Each returns the same
    values as Keras's; :func:`uninstall` puts Keras's back. Returns the names
    installed.
    """
    if not is_torch():
        return []
    installed = []
    if _usable("channels_last_views"):
        _replace(_torch_backend_module("nn"), "_transpose_spatial_inputs", _transpose_spatial_inputs)
        installed.append("channels_last_views")
    if _usable("batched_affine_transform"):
        _replace(_torch_backend_module("image"), "affine_transform", _affine_transform)
        installed.append("batched_affine_transform")
    if _usable("host_seeds"):
        random = _torch_backend_module("random")
        if (random, "torch_seed_generator") not in _ORIGINALS:
            _replace(random, "torch_seed_generator", _host_seed_generator(random))
        installed.append("host_seeds")
    if _usable("scalar_constants"):
        core = _torch_backend_module("core")
        original = _ORIGINALS.get((core, "convert_to_tensor"), core.convert_to_tensor)
        converter = _constant_converter(original, core.get_device)
        for module in list(sys.modules.values()):  # every name bound to Keras's function, `from ... import` too
            if getattr(module, "__name__", "").startswith("keras.src.") and vars(module).get(
                    "convert_to_tensor") is original:
                _replace(module, "convert_to_tensor", converter)
        installed.append("scalar_constants")
    return installed


def uninstall() -> None:
    """Restore Keras's own functions (for comparisons and tests)."""
    for (module, name), original in list(_ORIGINALS.items()):
        setattr(module, name, original)
        del _ORIGINALS[(module, name)]


@contextlib.contextmanager
def stock_keras():
    """Run the enclosed code with Keras's own backend functions (an :func:`active` block in it too)."""
    global _STOCK_BLOCKS
    installed = bool(_ORIGINALS)
    uninstall()
    _STOCK_BLOCKS += 1
    try:
        yield
    finally:
        _STOCK_BLOCKS -= 1
        if installed:
            install()


def _replace(module, name: str, function) -> None:
    if (module, name) not in _ORIGINALS:
        _ORIGINALS[(module, name)] = getattr(module, name)
        setattr(module, name, function)


def _original(module_name: str, name: str):
    """Keras's own function that :func:`install` replaced."""
    return _ORIGINALS[(_torch_backend_module(module_name), name)]


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
    import keras
    import torch

    timage = _torch_backend_module("image")
    original = _original("image", "affine_transform")
    images = keras.ops.convert_to_tensor(images)
    transform = keras.ops.convert_to_tensor(transform)
    data_format = data_format or keras.config.image_data_format()
    if (
        images.ndim != 4
        or transform.ndim != 2
        or transform.shape[-1] != 8
        or interpolation not in timage.AFFINE_TRANSFORM_INTERPOLATIONS
        or fill_mode not in timage.AFFINE_TRANSFORM_FILL_MODES
        or data_format not in ("channels_last", "channels_first")
    ):
        # Single images and bad arguments: Keras's path and Keras's errors.
        return original(images, transform, interpolation, fill_mode, fill_value, data_format)
    if data_format == "channels_first":
        images = images.permute((0, 2, 3, 1))
    batch_size = images.shape[0]

    # From here to `coordinates` this is Keras's code (the torch backend's image.py).
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
    (fusing twice changes nothing); 0 where the piece is off.
    """
    import keras

    from fmnist_keras.models import all_layers

    if not is_torch() or not _usable("fused_batch_norm"):
        return 0
    fused = 0
    for layer in all_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and not layer.renorm:
            if "call" not in vars(layer):  # not fused yet
                layer.call = types.MethodType(_fused_batch_norm_call, layer)
            fused += 1
    return fused


def _fused_batch_norm_call(layer, inputs, training=None, mask=None):
    import keras
    import torch

    if mask is not None or not (training and layer.trainable):
        return type(layer).call(layer, inputs, training=training, mask=mask)
    # Keras computes in at least float32 (float16 statistics overflow);
    # PyTorch's kernel takes bfloat16 inputs with float32 parameters and
    # accumulates in float32 (its statistics come back in bfloat16 when there
    # are no parameters, hence the cast of the statistics below).
    x = inputs if inputs.dtype in (torch.float64, torch.bfloat16) else inputs.to(torch.float32)
    axis = layer.axis % x.ndim
    x_nc = x.movedim(axis, 1) if axis != 1 else x  # a view: NHWC becomes channels_last NCHW
    params = torch.float64 if x.dtype == torch.float64 else torch.float32
    gamma = layer.gamma.value.to(params) if layer.scale else None
    beta = layer.beta.value.to(params) if layer.center else None
    outputs, mean, inverse_std = torch.native_batch_norm(x_nc, gamma, beta, None, None, True, 0.0, layer.epsilon)
    with torch.no_grad():
        variance = (inverse_std.pow(-2) - layer.epsilon).clamp_min(0.0)  # the biased batch variance
        momentum = layer.momentum
        for moving, batch in ((layer.moving_mean, mean), (layer.moving_variance, variance)):
            current = moving.value.to(params)
            moving.assign(current * momentum + batch.to(params) * (1.0 - momentum))
    if axis != 1:
        outputs = outputs.movedim(1, axis)
    return keras.ops.cast(outputs, layer.compute_dtype)



# --- 4. AdamW -----------------------------------------------------------------------------


def _is_fused(optimizer) -> bool:
    """Whether :func:`fuse_adam` gave ``optimizer`` its own update step."""
    return "_parallel_update_step" in vars(optimizer)


def fuse_adam(optimizer):
    """On torch, run a Keras ``Adam``/``AdamW`` step in PyTorch's fused kernel.

    Keras's torch Adam is a chain of ``torch._foreach_*`` calls that allocate
    temporaries, and its decoupled weight decay is one more pass that
    evaluates the learning-rate schedule a second time. This swaps the
    instance's update step for ``torch.optim.adamw(fused=True)``, called once
    for the weights that decay and once for those excluded by
    ``exclude_from_weight_decay``, and skips Keras's own decay pass (the
    kernel multiplies by ``1 - lr * weight_decay`` before the Adam step, as
    Keras does). Both methods are replaced together, or neither: the decay
    is applied exactly once. Epsilon is rescaled because Keras adds it before
    the bias correction and PyTorch after.

    No value is read back to the host per step: the step counter is read
    from ``optimizer.iterations`` at the first step (after
    ``BackupAndRestore`` has restored it) and counted on the host from there;
    the kernel's step tensors and the learning rate stay on the device.

    The optimizer keeps its class, variables and config, so saved models are
    unchanged. With ``use_ema``, Keras's ``apply`` updates the moving average
    after this step, as it does after its own. Other backends and
    optimizers, AMSGrad and gradient accumulation: returned unchanged, as
    when the piece is off.
    """
    import keras

    if (
        not is_torch()
        or not isinstance(optimizer, keras.optimizers.Adam)
        or optimizer.amsgrad
        or optimizer.gradient_accumulation_steps
        or not _usable("fused_adam")
    ):
        return optimizer
    import torch
    from torch.optim.adamw import adamw

    host_step = []  # the step count, read from the device once

    def fused_update_step(grads, variables, learning_rate):
        index = optimizer._get_variable_index
        if not host_step:
            host_step.append(int(optimizer.iterations.value))
        step = host_step[0]
        host_step[0] += 1
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
        step_on_device = optimizer.iterations.value.to(device=device, dtype=torch.float32)
        for rate, (params, grads_, exp_avgs, exp_avg_sqs) in groups.items():
            adamw(
                params,
                grads_,
                exp_avgs,
                exp_avg_sqs,
                [],
                list(step_on_device.repeat(len(params)).unbind()),  # the kernel adds 1
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


def _schedule_is_sync_free(optimizer) -> bool:
    """Whether :func:`schedule_without_sync` gave ``optimizer`` (or the one it wraps) its own learning rate."""
    return "_get_current_learning_rate" in vars(getattr(optimizer, "inner_optimizer", optimizer))


def schedule_without_sync(optimizer):
    """On torch, evaluate a Keras ``CosineDecay`` with a warm-up without reading the step back to the host.

    Keras's ``CosineDecay.__call__`` chooses between the warm-up and the
    decay with ``ops.cond``; on torch that is ``if pred:``, a read of a
    device tensor at every step, which on a GPU waits for all the work queued
    before it (the whole backward pass, as the optimizer runs last). This
    gives the optimizer instance its own ``_get_current_learning_rate``: the
    same ops on the same float32 values for both branches, one kept with
    ``ops.where`` (equal to Keras's value at every step, tested); a schedule
    set on the optimizer later is followed, and one of another kind goes to
    Keras's method. The schedule and the optimizer keep their classes and
    configs, so saved files are unchanged. A ``LossScaleOptimizer`` (float16
    mixed precision) gets it for the optimizer it wraps (its own loss-scale
    update still reads the device). Another schedule, a constant rate, no
    warm-up (no ``cond`` then), gradient accumulation (Keras evaluates the
    schedule at the raw step count then) or another backend: returned
    unchanged.
    """
    # Under float16 mixed precision the schedule is the wrapped optimizer's.
    inner = getattr(optimizer, "inner_optimizer", optimizer)
    if (
        not is_torch()
        or _schedule_is_sync_free(inner)  # already
        or not _has_warmup_cosine(inner)
        or not _usable("sync_free_schedule")
    ):
        return optimizer
    keras_learning_rate = inner._get_current_learning_rate
    constants = {}  # the schedule's numbers as tensors, made once: on a GPU each made per step is a copy torch waits for

    def current_learning_rate():
        if _has_warmup_cosine(inner):  # a schedule set later may be another
            return _cosine_decay_with_where(inner._learning_rate, inner.iterations, constants)
        return keras_learning_rate()

    inner._get_current_learning_rate = current_learning_rate
    return optimizer


def _has_warmup_cosine(optimizer) -> bool:
    """A ``CosineDecay`` with a warm-up, evaluated at ``iterations`` (not so with gradient accumulation)."""
    import keras

    schedule = getattr(optimizer, "_learning_rate", None)
    return (
        type(schedule) is keras.optimizers.schedules.CosineDecay
        and schedule.warmup_target is not None
        and not getattr(optimizer, "gradient_accumulation_steps", None)
    )


def _cosine_decay_with_where(schedule, iterations, constants: dict):
    """``schedule(iterations)`` for a ``CosineDecay`` with a warm-up, both branches computed.

    ``constants`` keeps the schedule's numbers as tensors between calls; they
    are made again when the numbers or the step's device change.
    """
    from keras import ops

    iterations = ops.convert_to_tensor(iterations)
    numbers = (schedule.initial_learning_rate, schedule.decay_steps, schedule.warmup_target, schedule.warmup_steps,
               iterations.device)
    if constants.get("numbers") != numbers:
        initial = ops.convert_to_tensor(schedule.initial_learning_rate)
        dtype = initial.dtype
        constants["numbers"] = numbers
        constants["tensors"] = (initial, *(ops.cast(number, dtype) for number in numbers[1:4]),
                                ops.array(math.pi, dtype=dtype))
    initial, decay_steps, warmup_target, warmup_steps, pi = constants["tensors"]
    step = ops.minimum(ops.cast(iterations, initial.dtype), decay_steps + warmup_steps)
    warm = (warmup_target - initial) * (step / warmup_steps) + initial
    fraction = ops.divide(step - warmup_steps, decay_steps)
    cosine = 0.5 * (1.0 + ops.cos(ops.multiply(pi, fraction)))
    decayed = ops.multiply(warmup_target, (1 - schedule.alpha) * cosine + schedule.alpha)
    return ops.where(step < warmup_steps, warm, decayed)


# --- 5. layer calls ------------------------------------------------------------------------

# Layers whose __call__, for a tensor without a mask, only converts the input's
# float dtype, enters an autocast scope and calls call().
_DIRECT_LAYERS = (
    "Activation", "BatchNormalization", "Conv2D", "Dense", "Dropout", "Flatten", "MaxPooling2D",
    "RandomErasing", "RandomFlip", "RandomTranslation",
)


def call_layers_directly(model) -> str | None:
    """Make ``model``'s ``call`` run its layers' ``call()`` one after the other.

    Applies to a model that is a chain (each layer's input is the previous
    layer's output, one input, one output) of the layer types in
    ``_DIRECT_LAYERS`` with float dtype policies (float32 or mixed), without
    activity regularisers, rematerialisation or quantization. For such
    layers ``Layer.__call__`` does three things before ``call()``: it casts
    a float input to the layer's input dtype (under mixed precision),
    enters the autocast scope that casts the layer's float32 weights to its
    compute dtype, and resolves ``training``. The direct call does the same
    three, with Keras's own ``convert_input`` and ``AutocastScope``. The
    model keeps Keras's ``call`` for anything else: symbolic tensors, masks,
    ``training=None``, inputs of another dtype, rank or device (Keras moves
    them), models whose class has a ``call`` of its own. Returns None when
    the model now calls its layers directly (again: the call is idempotent),
    else why not.
    """
    import keras
    import torch

    if not is_torch() or not _usable("direct_layer_calls"):
        return "off"
    if "call" in vars(model):
        return None if getattr(vars(model)["call"], "calls_layers_directly", False) else "the model has its own call"
    targets = _targets("direct_layer_calls")
    if type(model).call not in (targets["Functional.call"], targets["Sequential.call"]):
        return f"{type(model).__name__} has its own call"
    try:
        inputs, outputs = model.inputs, model.outputs
    except (AttributeError, ValueError):
        return "the model has no inputs yet (build it from keras.Input)"
    if len(inputs) != 1 or len(outputs) != 1:
        return "the model has more than one input or output"
    float_policies = (keras.dtype_policies.DTypePolicy, keras.dtype_policies.FloatDTypePolicy)
    chain, previous = [], inputs[0]
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        kind = type(layer).__name__
        if type(layer) is not getattr(keras.layers, kind, None) or kind not in _DIRECT_LAYERS:
            return f"{layer.name} is a {kind} layer, not one of {', '.join(_DIRECT_LAYERS)}"
        if type(layer.dtype_policy) not in float_policies or not hasattr(layer, "_convert_input_args"):
            return f"{layer.name} has the dtype policy {layer.dtype_policy.name}, not a float one"
        if (getattr(layer, "activity_regularizer", None) is not None or getattr(layer, "_remat_mode", None)
                or getattr(layer, "quantization_mode", None) is not None):
            return f"{layer.name} has an activity regulariser, rematerialisation or quantization"
        try:
            chained = layer.input is previous
            previous = layer.output
        except (AttributeError, ValueError):  # a layer called more than once
            chained = False
        if not chained:
            return f"the model is not a chain of layers (at {layer.name})"
        chain.append(_DirectCall(layer))
    if previous is not outputs[0]:
        return "the model is not a chain of layers (its output)"
    keras_call = model.call
    rank = len(inputs[0].shape)
    input_dtype = getattr(torch, keras.backend.standardize_dtype(inputs[0].dtype))
    device = keras.ops.zeros(()).device  # where Keras puts tensors, and moves inputs to
    scopes = {}  # the autocast scope around the model -> the scope each layer enters

    def call(inputs, training=None, mask=None, **kwargs):
        if (training is None or mask is not None or kwargs or not isinstance(inputs, torch.Tensor)
                or inputs.dtype != input_dtype or inputs.ndim != rank or inputs.device != device):
            return keras_call(inputs, training=training, mask=mask, **kwargs)
        around = _autocast_scope()
        key = "no scope" if around is None else around.dtype
        if key not in scopes:
            scopes[key] = [step.scope(around) for step in chain]
        x = inputs
        for step, scope in zip(chain, scopes[key]):
            x = step(x, training, scope)
        return x

    call.calls_layers_directly = True
    model.call = call
    return None


class _DirectCall:
    """One layer of a chain, called as ``Layer.__call__`` calls it (see :func:`call_layers_directly`)."""

    def __init__(self, layer):
        import keras
        import torch

        self.layer = layer
        self.takes_training = "training" in inspect.signature(layer.call).parameters
        self.converts = bool(layer._convert_input_args)
        self.input_dtype = getattr(torch, keras.backend.standardize_dtype(layer.input_dtype))

    def scope(self, around):
        """The dtype of the autocast scope ``Layer.__call__`` enters under ``around``; False: none."""
        import keras

        layer = self.layer
        if around is not None:
            if not layer.autocast or not keras.backend.is_float_dtype(layer.compute_dtype):
                return None
            return layer.compute_dtype if around.dtype != layer.compute_dtype else False
        return layer.compute_dtype if layer.compute_dtype != layer.variable_dtype else False

    def __call__(self, x, training, scope):
        layer = self.layer
        if self.converts and x.dtype != self.input_dtype:
            x = layer.dtype_policy.convert_input(x, layer.autocast, layer.input_dtype)
        if scope is False:
            return layer.call(x, training=training) if self.takes_training else layer.call(x)
        with _autocast(scope):
            return layer.call(x, training=training) if self.takes_training else layer.call(x)


def _autocast_scope():
    from keras.src.backend.common.variables import get_autocast_scope

    return get_autocast_scope()


def _autocast(dtype):
    from keras.src.backend.common.variables import AutocastScope

    return AutocastScope(dtype)


# --- 7. augmentation seeds ----------------------------------------------------------------

# SeedGenerator -> (the device tensor of its state, its storage address, its version counter,
# (first, second) on the host) after the last seed drawn here.
_HOST_STATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# (device, dtype) -> the tensor [0, 1] that advances a state, made once.
_INCREMENTS: dict = {}


def _host_seed_generator(random):
    """Keras's ``random.torch_seed_generator``, drawing a ``SeedGenerator``'s seed from a host copy of its state.

    Keras seeds a ``torch.Generator`` with ``int(first + second) & 0xFFFFFFFF``
    of the state ``SeedGenerator.next()`` returns, and ``next()`` adds ``[0,
    1]`` to the state. The function returned takes the same integers from
    :func:`_next_seed`, so the generator and the state after it are Keras's,
    without a read of the device. Other seeds (an integer, None, a subclass
    with its own ``next``, a state that is not a torch tensor) go to Keras's
    function. Like Keras's, torch.compile does not trace it.
    """
    import torch
    from keras.src.random.seed_generator import SeedGenerator

    keras_function, get_device = random.torch_seed_generator, random.get_device

    @torch.compiler.disable
    def torch_seed_generator(seed):
        device = get_device()
        if (device == "meta" or not isinstance(seed, SeedGenerator) or type(seed).next is not SeedGenerator.next
                or not isinstance(seed.state.value, torch.Tensor)):
            return keras_function(seed)
        first, second = _next_seed(seed)
        generator = torch.Generator(device=device)
        generator.manual_seed((first + second) & 0xFFFFFFFF)
        return generator

    return torch_seed_generator


def _next_seed(generator) -> tuple[int, int]:
    """What ``generator.next()`` returns, as two Python integers, and its state advanced as ``next()`` does.

    The host copy is trusted while the state is the same tensor with the same
    storage, unchanged since this function last advanced it (torch counts
    in-place writes in ``_version``; Keras's ``assign`` is an in-place
    ``copy_``). A state set elsewhere (an ``assign``, a stateless scope) is
    read once, then followed on the host again. A write that torch does not
    count (through ``.data``, or a collective) would go unseen: nothing in
    this project writes a seed state that way.
    """
    import torch

    state = generator.state
    value = state.value
    version = value._version
    known = _HOST_STATES.get(generator)
    if known is not None and known[0] is value and known[1] == value.data_ptr() and known[2] == version:
        first, second = known[3]
    else:
        first, second = (int(v) for v in value.tolist())
    key = (value.device, value.dtype)
    if key not in _INCREMENTS:
        _INCREMENTS[key] = torch.tensor([0, 1], dtype=value.dtype, device=value.device)
    state.assign(value + _INCREMENTS[key])
    after = state.value
    if after is not value or after._version == version + 1:
        # The counter wraps as the device's integers do.
        _HOST_STATES[generator] = (after, after.data_ptr(), after._version,
                                   (first, _wrap(second + 1, torch.iinfo(value.dtype).bits)))
    else:  # another thread advanced the state between the read and the write: read it again next time
        _HOST_STATES.pop(generator, None)
    return first, second


def _wrap(number: int, bits: int) -> int:
    """``number`` as a signed integer of ``bits`` bits holds it (two's complement)."""
    half = 1 << (bits - 1)
    return (number + half) % (1 << bits) - half


# --- 8. numbers as tensors -----------------------------------------------------------------

# How many numbers one converter keeps as tensors; past it, numbers go to Keras's function.
CONSTANTS_LIMIT = 1024


def _constant_converter(keras_function, get_device):
    """Keras's torch ``convert_to_tensor``, making each Python number into a tensor once.

    A ``bool``, ``int`` or ``float`` (not NaN), or a tuple of up to eight
    ``int`` (a shape), becomes Keras's tensor the first time it is seen with
    a dtype, ``floatx`` and device; later it is a ``clone`` of that tensor,
    made on the device. The caller gets a tensor of its own, so a write into
    it (a ``Variable`` made from it, say) changes nothing else. Everything
    else, ``sparse``/``ragged``, what torch.compile traces, and numbers
    under a mode that makes fake tensors (``FakeTensorMode``, ``make_fx``)
    go to Keras's function; only plain tensors are kept. Keras's ``"cuda"``
    device is keyed by the current GPU. The first :data:`CONSTANTS_LIMIT`
    numbers are kept, none after them.
    """
    import keras
    import torch

    kept = {}
    floatx = keras.config.floatx

    def convert_to_tensor(x, dtype=None, sparse=None, ragged=None):
        kind = type(x)
        if sparse or ragged or torch.compiler.is_compiling() or not (kind is float or kind is int or kind is bool or (
                kind is tuple and len(x) <= 8 and all(type(v) is int for v in x))):
            return keras_function(x, dtype, sparse, ragged)
        if kind is float and x != x:  # NaN: no key finds it again
            return keras_function(x, dtype, sparse, ragged)
        device = str(get_device())
        if device == "cuda":  # Keras's default: the current GPU, which may change
            device = f"cuda:{torch.cuda.current_device()}"
        sign = math.copysign(1.0, x) if kind is float else None  # 0.0 and -0.0 apart
        key = (kind, x, sign, dtype, floatx(), device)
        try:
            tensor = kept.get(key)
        except TypeError:  # a dtype that cannot be a key
            return keras_function(x, dtype, sparse, ragged)
        if tensor is None:
            tensor = keras_function(x, dtype, sparse, ragged)
            if type(tensor) is not torch.Tensor or len(kept) >= CONSTANTS_LIMIT:  # a fake or traced tensor, or full
                return tensor
            kept[key] = tensor
            return tensor.clone()
        try:
            copy = tensor.clone()
        except Exception:  # a mode that traces with fake tensors refuses a real one: Keras's tensor of the mode
            return keras_function(x, dtype, sparse, ragged)
        return copy if type(copy) is torch.Tensor else keras_function(x, dtype, sparse, ragged)

    return convert_to_tensor


# --- other private reaches ------------------------------------------------------------------


def keep_tensorflow_unloaded() -> bool:
    """Stop Keras importing TensorFlow into a torch or jax process.

    Keras asks ``tf.available`` while seeding (``set_random_seed``) and while
    saving a model, and that imports all of TensorFlow when it is installed:
    about 10 s and 1 GB per process that never uses it. Nothing here uses
    ``tf.data``, so Keras's lazy module is told TensorFlow is absent.
    Returns whether it could (Keras's ``module_utils.tensorflow`` is the lazy
    module with an ``_available`` flag); otherwise TensorFlow may load, which
    costs time only, so no warning.
    """
    try:
        from keras.src.utils import module_utils
    except ImportError:
        return False
    lazy = getattr(module_utils, "tensorflow", None)
    if type(lazy).__name__ != "LazyModule" or not hasattr(lazy, "_available"):
        return False
    lazy._available = False
    return True


def keras_wraps_ddp(model) -> bool:
    """Whether Keras itself wrapped ``model`` in ``DistributedDataParallel`` for ``fit``.

    Keras 3.16's torch trainer does that when ``torch.distributed`` is
    initialised (``Trainer._initialize_ddp``, storing the wrapper as
    ``ddp_model``); then its reducer averages the gradients. Call it once
    ``fit`` has begun (from a callback's ``on_train_begin``).
    """
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(getattr(model, "ddp_model", None), DistributedDataParallel)

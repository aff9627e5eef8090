"""Choose the Keras backend and describe the device: the only backend-specific code.

Keras reads ``KERAS_BACKEND`` once, at its first import, so
:func:`select_backend` must run before anything imports ``keras``.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from fmnist_keras.config import BACKENDS

# The pip extra that brings each backend's package.
_PACKAGES = {"torch": "torch", "tensorflow": "tensorflow", "jax": "jax"}


class BackendError(RuntimeError):
    """The requested backend or device cannot be used here."""


def select_backend(backend: str | None = None, device: str = "auto") -> str:
    """Set ``KERAS_BACKEND`` (and hide GPUs for ``device="cpu"``) before Keras loads.

    Args:
        backend: ``torch``, ``tensorflow`` or ``jax``; None keeps
            ``$KERAS_BACKEND`` or falls back to ``torch``.
        device: ``auto`` (a GPU when one is present) or ``cpu``.

    Returns:
        The backend name in force.
    """
    backend = backend or os.environ.get("KERAS_BACKEND") or "torch"
    if backend not in BACKENDS:
        raise BackendError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}.")
    if device not in ("auto", "cpu"):
        raise BackendError(f"unknown device {device!r}; choose 'auto' or 'cpu'.")
    if importlib.util.find_spec(_PACKAGES[backend]) is None:
        raise BackendError(
            f"backend {backend!r} needs the {_PACKAGES[backend]} package, which is not installed; "
            f"run: pip install 'fmnist_keras[{backend}]'"
        )
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() != backend:
            raise BackendError(
                f"Keras is already imported with backend {keras.backend.backend()!r}, cannot switch to "
                f"{backend!r}; set KERAS_BACKEND={backend} before starting Python."
            )
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TensorFlow's start-up chatter
    if device == "cpu":
        # Hiding the GPUs works the same for torch, tensorflow and jax.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["JAX_PLATFORMS"] = "cpu"
    if backend == "tensorflow" and "torch" not in sys.modules and importlib.util.find_spec("torch"):
        # torch and tensorflow in one process crash unless torch loads first.
        import torch  # noqa: F401
    if backend != "tensorflow" and "tensorflow" not in sys.modules:
        _keep_tensorflow_unloaded()
    return backend


def _keep_tensorflow_unloaded() -> None:
    """Stop Keras importing TensorFlow into a torch or jax process.

    Keras asks ``tf.available`` while seeding (``set_random_seed``) and while
    saving a model, and that imports all of TensorFlow when it is installed:
    about 10 s and 1 GB per process that never uses it (measured with an
    import hook on keras 3.15). Nothing here uses ``tf.data``, so Keras is
    told TensorFlow is absent; ``tf.*`` attribute access still imports it.
    """
    from keras.src.utils import module_utils

    module_utils.tensorflow._available = False


def has_gpu() -> bool:
    """Whether Keras's backend computes on a GPU (CUDA or Apple MPS)."""
    return describe_device() != "cpu"


def describe_device() -> str:
    """The device Keras computes on, e.g. ``cuda:0 (NVIDIA H200)`` or ``cpu``."""
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        from keras.src.backend.torch.core import get_device

        device = str(get_device())
        if device.startswith("cuda"):
            return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
        return device
    if backend == "jax":
        import jax

        first = jax.devices()[0]
        return f"{first.platform}:{first.id} ({first.device_kind})" if first.platform != "cpu" else "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        return f"{gpus[0].name}" if gpus else "cpu"
    return "unknown"

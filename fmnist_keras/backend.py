"""Choose the Keras backend and describe the device: the only backend-specific code.

Keras reads ``KERAS_BACKEND`` once, at its first import, so
:func:`select_backend` must run before anything imports ``keras``.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from fmnist_keras.config import BACKENDS, BFLOAT16_BY_DEFAULT, DATA_FORMATS

# The pip extra that brings each backend's package.
_PACKAGES = {"torch": "torch", "tensorflow": "tensorflow", "jax": "jax"}


def launched_by_torchrun() -> bool:
    """Whether torchrun (or another torch.distributed launcher) started this process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def add_backend_arguments(parser, resumable: bool = False) -> None:
    """The ``--backend`` and ``--device`` flags every command shares.

    ``resumable``: the command has ``--resume``, which takes both from the run when they are not given.
    """
    resumed = "; with --resume, the run's" if resumable else ""
    parser.add_argument("--backend", choices=BACKENDS,
                        help=f"Keras backend (default: $KERAS_BACKEND, else torch{resumed})")
    parser.add_argument(
        "--device", choices=DEVICES, default="auto",
        help="'auto' uses a GPU when present, 'cpu' forces the CPU, 'gpu' fails unless the backend sees a GPU "
        f"(default: auto{resumed})",
    )


class BackendError(RuntimeError):
    """The requested backend or device cannot be used here."""


DEVICES = ("auto", "cpu", "gpu")

# How to get a GPU build of each backend (Linux, CUDA 12): what the error for
# `--device gpu` without a usable GPU tells the user.
_GPU_INSTALL = {
    "torch": "pip install --force-reinstall torch (PyPI's Linux wheel includes CUDA)",
    "tensorflow": "pip install 'tensorflow[and-cuda]'",
    "jax": "pip install 'jax[cuda12]'",
}


def named_backend() -> str | None:
    """The backend ``$KERAS_BACKEND`` names, or None: an empty value counts as unset, as Keras counts it."""
    return os.environ.get("KERAS_BACKEND") or None


def default_backend() -> str:
    """The backend when none is passed (``train``, the tests, the benchmarks): ``$KERAS_BACKEND``, else torch."""
    return named_backend() or "torch"


def select_backend(backend: str | None = None, device: str = "auto") -> str:
    """Set ``KERAS_BACKEND`` (and hide or require GPUs) before Keras loads.

    Args:
        backend: ``torch``, ``tensorflow`` or ``jax``; None keeps
            ``$KERAS_BACKEND`` or falls back to ``torch``.
        device: ``auto`` (a GPU when one is present, else the CPU), ``cpu``
            (hide every GPU) or ``gpu`` (fail unless the backend sees one).

    Returns:
        The backend name in force.

    Raises:
        BackendError: unknown backend or device, the backend's package is not
            installed, Keras already runs another backend, or ``device="gpu"``
            and the backend sees no GPU. The message says how to fix it.
    """
    given = backend
    backend = backend or default_backend()
    if backend not in BACKENDS:
        where = " (from $KERAS_BACKEND)" if given is None else ""
        raise BackendError(f"unknown backend {backend!r}{where}; choose one of {', '.join(BACKENDS)}.")
    if device not in DEVICES:
        raise BackendError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}.")
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
        # Hiding the GPUs works the same for torch, tensorflow and jax; Apple's
        # MPS is not a CUDA device, so Keras's torch backend is told directly.
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["KERAS_TORCH_DEVICE"] = "cpu"
    if backend == "tensorflow" and "torch" not in sys.modules and importlib.util.find_spec("torch"):
        # torch and tensorflow in one process crash unless torch loads first.
        import torch  # noqa: F401
    if device == "gpu":
        missing = _missing_gpu(backend)
        if missing:
            raise BackendError(
                f"--device gpu: the {backend} backend sees no GPU ({missing}); install its GPU build: "
                f"{_GPU_INSTALL[backend]}, or use --device auto to fall back to the CPU."
            )
    if backend != "tensorflow" and "tensorflow" not in sys.modules:
        # Keras would import all of TensorFlow (10 s, 1 GB) to ask whether tf.data is there.
        from fmnist_keras.engine.fastpath import keep_tensorflow_unloaded

        keep_tensorflow_unloaded()
    return backend


def select_backend_or_exit(parser, backend: str | None, device: str) -> str:
    """:func:`select_backend`, a :class:`BackendError` being ``parser``'s usage error (one line, exit code 2)."""
    from fmnist_keras.cli import one_line

    try:
        return select_backend(backend, device)
    except BackendError as error:
        parser.error(one_line(error))


def training_data_format(backend: str, requested: str = "auto", fast_path: bool = True) -> str:
    """The image layout to train in: ``requested``, or for ``auto`` the
    backend's fast one.

    That is ``channels_last`` everywhere, except on torch without the fast
    path. Stock Keras runs a torch ``channels_last`` convolution or pooling
    by copying every activation to NCHW and back, so there ``channels_first``
    is faster (1.4-1.6x per CNN step on CPU); the fast path
    (:mod:`fmnist_keras.engine.fastpath`) turns those copies into views and makes
    ``channels_last`` the fastest layout on torch too (docs/speed.md).
    Saved models are always ``channels_last`` whatever the training layout
    (the weights do not depend on it), so every backend loads them.
    """
    if requested not in DATA_FORMATS:
        raise ValueError(f"unknown data format {requested!r}; choose one of {', '.join(DATA_FORMATS)}.")
    if requested == "channels_first" and backend == "tensorflow" and not has_gpu():
        raise ValueError(
            "--data-format channels_first: TensorFlow's CPU convolutions run channels_last only; "
            "use --data-format auto or channels_last."
        )
    if requested != "auto":
        return requested
    return "channels_first" if backend == "torch" and not fast_path else "channels_last"


# Where Linux lists the CPU's features.
CPUINFO = "/proc/cpuinfo"


# The ``/proc/cpuinfo`` flags of the instructions that compute bfloat16 natively: Intel AMX tiles
# (Xeon 4th generation and later) and AVX512-BF16 dot products (also Intel Cooper Lake and AMD Zen 4
# and later). A CPU without either emulates bfloat16 in float32 and runs it slower.
BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_has_bfloat16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bfloat16 natively: one of :data:`BFLOAT16_CPU_FLAGS` in the flags line of
    ``cpuinfo`` (default :data:`CPUINFO`).

    False where the file cannot be read (macOS, Windows, containers that hide it).
    """
    try:
        with open(cpuinfo or CPUINFO, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.startswith("flags"):
                    return not set(BFLOAT16_CPU_FLAGS).isdisjoint(line.partition(":")[2].split())
    except OSError:
        pass
    return False


def default_mixed_precision(backend: str, model: str) -> bool:
    """Whether a run of ``model`` that does not choose (``mixed_precision`` None) computes in bfloat16 here.

    Only where it was measured to pay (``config.BFLOAT16_BY_DEFAULT``;
    docs/backends.md, "Mixed precision"): on the torch backend, a CPU with AMX
    trains the default CNN 2.2x as fast in bfloat16 and one with AVX512-BF16
    alone 1.7x as fast, both at the same test accuracy, and ``cnn-large`` 1.7x
    as fast with AMX and 1.7-1.8x with AVX512-BF16 alone, its accuracy measured
    with AMX; on TensorFlow, a CPU with AVX512-BF16 alone trains the default
    CNN about 1.3x as fast, at the same test accuracy (three seeds each).
    Elsewhere float32: a CPU without either emulates bfloat16 and trained the
    CNN 2.2x slower in it, the MLP gained nothing even with AMX, JAX trained
    the CNN 1.07x as fast (within the noise); GPUs, and ``cnn-large`` on
    TensorFlow, until measured.
    """
    return model in BFLOAT16_BY_DEFAULT.get(backend, ()) and not has_gpu() and cpu_has_bfloat16()


# Keras layers that say XLA cannot compile them (``supports_jit = False``, for TensorFlow's image
# transform op) but whose JAX implementation compiles: the same output under ``jax.jit`` as eagerly
# (tests/test_backend.py).
_JIT_ON_JAX = ("RandomTranslation",)


def compile_steps_on_jax(model) -> None:
    """On JAX, let Keras compile ``model``'s train, test and predict steps with XLA.

    Keras runs a model eagerly, op by op, when one of its layers has
    ``supports_jit = False``; ``RandomTranslation`` says so for every backend,
    and on JAX an eager CNN step is tens of times slower than a compiled one.
    Call it before the first ``fit``, ``evaluate`` or ``predict``. It changes
    nothing on the other backends, in a saved file, or for a layer that lacks
    the attribute.
    """
    import keras

    from fmnist_keras.models import all_layers

    if keras.backend.backend() != "jax":
        return
    compilable = tuple(getattr(keras.layers, name) for name in _JIT_ON_JAX)
    allowed = False
    for layer in all_layers(model):
        if type(layer) in compilable and getattr(layer, "supports_jit", True) is False:
            layer.supports_jit = allowed = True
    if allowed:
        model.jit_compile = True  # Keras may have settled on eager already; "auto" would now choose XLA


def has_gpu() -> bool:
    """Whether Keras's backend computes on a GPU (CUDA or Apple MPS)."""
    return describe_device() != "cpu"


def _missing_gpu(backend: str) -> str | None:
    """Why ``backend`` cannot compute on a GPU here, or None when it can."""
    if backend == "torch":
        import torch

        if torch.cuda.is_available() or torch.backends.mps.is_available():
            return None
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build"
        return f"torch {torch.__version__} finds no CUDA device or driver; check nvidia-smi"
    if backend == "tensorflow":
        import tensorflow as tf

        if tf.config.list_physical_devices("GPU"):
            return None
        built = "a build without CUDA" if not tf.test.is_built_with_cuda() else "no CUDA device or driver found"
        return f"tensorflow {tf.__version__}: {built}"
    import jax

    try:
        jax.devices("gpu")
        return None
    except RuntimeError:
        return f"jax {jax.__version__} has no GPU plugin or finds no GPU"


def describe_device() -> str:
    """The device Keras computes on, e.g. ``cuda:0 (NVIDIA H200)``, ``mps (Apple GPU)`` or ``cpu``."""
    import keras

    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        device = str(keras.ops.zeros(()).device)  # where Keras puts new tensors
        if device.startswith("cuda"):
            return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
        if device.startswith("mps"):
            return "mps (Apple GPU)"
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


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is a backend's out-of-memory error (CUDA, MPS, XLA or TensorFlow)."""
    name = type(error).__name__
    text = str(error)
    return (
        name in ("OutOfMemoryError", "ResourceExhaustedError")  # torch / tensorflow
        or "RESOURCE_EXHAUSTED" in text  # jax / XLA
        or "out of memory" in text.lower()  # torch CUDA and MPS messages
    )


"""Load a model file safely: the one door every command uses to open a model.

Model files come from anywhere, and Keras model loading has had a run of
code-execution holes (see ``docs/security.md``). :func:`load_model` therefore
checks the file itself before Keras sees it:

1. the path is a ``.keras`` file or a run directory holding ``model.keras``;
   legacy ``.h5``/``.hdf5`` files are refused: they go through Keras's legacy
   loader, which ignored ``safe_mode`` until keras 3.11.3 (CVE-2025-9905);
2. the file is a sound zip archive (CRCs checked) with ``config.json``,
   ``metadata.json`` and ``model.weights.h5`` (or ``.npz``), and no member
   name that is absolute or climbs out with ``..``;
3. ``config.json`` names only classes from Keras itself and none of the layers
   that run stored code (``Lambda``, ``TorchModuleWrapper``, ...);
4. Keras loads it with ``safe_mode=True``;
5. the model takes one 28x28 grayscale image and gives 10 class scores.

Any failure is a :class:`ModelLoadError` with one line that says what was
given, what was expected and how to fix it. This module imports Keras only
inside :func:`load_model`, so importing it does not fix the backend.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path

from fmnist_keras.backend import compile_steps_on_jax
from fmnist_keras.cli import one_line
from fmnist_keras.data import NUM_CLASSES
from fmnist_keras.rundir import MODEL_FILE, exists_or_link, is_dangling_link, not_a_regular_file

IMAGE_SHAPES = {(28, 28, 1): "channels_last", (1, 28, 28): "channels_first"}

_REQUIRED_MEMBERS = ("config.json", "metadata.json")
_WEIGHT_MEMBERS = ("model.weights.h5", "model.weights.npz")
# Generous for a Fashion-MNIST model (ours are < 20 MB) yet small enough that a
# decompression bomb is refused before anything is read.
_MAX_TOTAL_BYTES = 2 * 1024**3
_MAX_CONFIG_BYTES = 16 * 1024**2
# Layers and objects whose config carries code, a path to load, or a pickle.
_FORBIDDEN_CLASSES = {
    "Lambda": "runs Python code stored in the file",
    "__lambda__": "runs Python code stored in the file",
    "function": "calls a function named in the file",
    "TorchModuleWrapper": "unpickles a torch module stored in the file",
    "TFSMLayer": "loads a TensorFlow SavedModel from a path named in the file",
    "JaxLayer": "calls a function named in the file",
    "FlaxLayer": "calls a module named in the file",
}
# Our models' configs nest 8-11 levels deep; far deeper is no Keras model,
# and Keras's recursive deserialisation would overflow the stack on it.
_MAX_CONFIG_DEPTH = 64
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_FIX = "pass a model.keras written by `python -m fmnist_keras.train`, or the run directory holding it"


class ModelLoadError(ValueError):
    """The model file is missing, unsafe, damaged or not a Fashion-MNIST model."""


class AmbiguousModelError(ModelLoadError):
    """A run directory holds several models and the user must pick one (a usage error: exit code 2)."""


def exit_code(error: ModelLoadError) -> int:
    """The exit code a command gives for ``error``: 2 for a choice the user must make, else 1."""
    return 2 if isinstance(error, AmbiguousModelError) else 1


def models_in_run(directory: Path) -> list[Path]:
    """The ``model.keras`` files one level below ``directory`` (a run with one sub-directory per model)."""
    try:
        children = sorted(directory.iterdir())
    except OSError:
        return []
    return [child / MODEL_FILE for child in children if child.is_dir() and (child / MODEL_FILE).is_file()]


def model_home(model_path: Path) -> Path:
    """The directory ``model_path`` really lies in, a link to it followed: where train wrote its run files
    (``config.json``, ``metrics.json``)."""
    return Path(model_path).resolve().parent


def resolve_model_path(path: str | os.PathLike, announce=None) -> Path:
    """Return the ``.keras`` file meant by ``path``.

    ``path`` is a ``.keras`` file, a model directory holding ``model.keras``,
    or the run directory ``train`` prints (``runs/<run-name>/`` or
    ``runs/latest``), whose sub-directories hold one model each: a run with
    one model means that model.

    Args:
        path: the file or directory the user gave.
        announce: called with a one-line note when a run directory's only
            model is chosen (e.g. ``print`` to stderr); None: silent.

    Raises:
        AmbiguousModelError: a run directory with several models; the
            message lists them.
        ModelLoadError: the path is empty or does not exist, is a directory without a
            model, or is not a ``.keras`` file.
    """
    if str(path) == "":  # Path("") is ".", the current directory
        raise ModelLoadError(f"the model path is empty (an unset variable?); {_FIX}.")
    given = Path(os.path.expanduser(path))  # "~nobody" stays as it is (Path.expanduser raises)
    if given.is_dir():
        candidate = given / MODEL_FILE
        if exists_or_link(candidate) and not candidate.is_file():
            raise ModelLoadError(f"{candidate} {not_a_regular_file(candidate)}; expected a .keras file; {_FIX}.")
        if not candidate.is_file():
            found = models_in_run(given)
            if len(found) > 1:
                names = ", ".join(f.parent.name for f in found)
                choices = ", ".join(str(f.parent) for f in found)
                raise AmbiguousModelError(f"{given} holds several models ({names}); pass one of {choices}.")
            if not found:
                raise ModelLoadError(
                    f"{given} is a directory without {MODEL_FILE}, and none of its sub-directories holds one; "
                    f"expected a run directory (runs/<run-name>/ or runs/<run-name>/<model>/) or a .keras "
                    f"file; {_FIX}."
                )
            candidate = found[0]
            if announce is not None:
                announce(one_line(f"Using {candidate}"))
        given = candidate
    elif is_dangling_link(given):
        raise ModelLoadError(f"model file {given} {not_a_regular_file(given)}; fix the link ({_FIX}).")
    elif not given.exists():
        raise ModelLoadError(f"model file {given} does not exist; check the path ({_FIX}).")
    elif not given.is_file():
        raise ModelLoadError(f"{given} {not_a_regular_file(given)}; expected a .keras file; {_FIX}.")
    suffix = given.suffix.lower()
    if suffix in (".h5", ".hdf5"):
        raise ModelLoadError(
            f"{given} is a legacy HDF5 model ({suffix}); it is refused: HDF5 models go through Keras's "
            f"legacy loader, which ignored safe_mode until keras 3.11.3 (CVE-2025-9905), and only .keras "
            f"archives are checked here. Use a .keras file; if you trust its author, convert it once "
            f"in a separate process with model.save('model.keras')."
        )
    if suffix != ".keras":
        raise ModelLoadError(f"{given} has suffix {suffix or '(none)'!r}; expected a .keras file; {_FIX}.")
    if given.suffix != ".keras":  # Keras reads a .keras archive by that name alone
        raise ModelLoadError(f"{given} ends in {given.suffix!r}; Keras reads a model file only by the suffix .keras, "
                             f"in lower case; rename it to {given.stem}.keras.")
    return given


def _check_member_names(path: Path, names: list[str]) -> None:
    for name in names:
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":"):
            raise ModelLoadError(
                f"{path} holds an archive member named {name!r} that points outside the archive; "
                f"the file is malformed or hostile, do not use it ({_FIX})."
            )


def _walk_config(node, path: Path) -> None:
    """Refuse classes that run code, classes from outside Keras, and absurd nesting."""
    stack = [(node, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > _MAX_CONFIG_DEPTH:
            raise _too_deep(path)
        if isinstance(item, list):
            stack.extend((child, depth + 1) for child in item)
        elif isinstance(item, dict):
            class_name = item.get("class_name")
            if isinstance(class_name, str) and class_name in _FORBIDDEN_CLASSES:
                raise ModelLoadError(
                    f"{path} contains a {class_name!r} object, which {_FORBIDDEN_CLASSES[class_name]}; "
                    f"this app only loads models built from plain Keras layers ({_FIX})."
                )
            module = item.get("module")
            if isinstance(module, str) and module != "keras" and not module.startswith("keras."):
                raise ModelLoadError(
                    f"{path} refers to {class_name!r} from module {module!r}; expected only Keras's own "
                    f"classes (module 'keras...'), so a custom or foreign object is refused ({_FIX})."
                )
            stack.extend((child, depth + 1) for child in item.values())


def _too_deep(path: Path) -> ModelLoadError:
    return ModelLoadError(
        f"{path}: config.json nests lists or objects more than {_MAX_CONFIG_DEPTH} levels deep; no Keras model "
        f"does that, so the file is damaged or hostile; {_FIX}."
    )


def check_archive(path: Path) -> None:
    """Check ``path`` is a sound ``.keras`` zip archive with a plain-Keras config.

    Reads the archive with :mod:`zipfile` only; nothing in it is executed,
    unpickled or extracted.

    Raises:
        ModelLoadError: with the reason, for any problem.
    """
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"{path} is empty (0 bytes); expected a .keras zip archive; {_FIX}.")
    with open(path, "rb") as handle:
        head = handle.read(8)
    if head == _HDF5_SIGNATURE:
        raise ModelLoadError(
            f"{path} is an HDF5 file renamed to .keras; legacy HDF5 models are refused (their loader "
            f"ignored safe_mode until keras 3.11.3) ({_FIX})."
        )
    if not zipfile.is_zipfile(path):
        raise ModelLoadError(
            f"{path} is not a zip archive ({size} bytes, starts with {head[:4]!r}); a .keras file is a zip "
            f"holding config.json and model.weights.h5. It may be truncated or another format; {_FIX}."
        )
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            names = [info.filename for info in infos]
            _check_member_names(path, names)
            missing = [n for n in _REQUIRED_MEMBERS if n not in names]
            if not any(n in names for n in _WEIGHT_MEMBERS):
                missing.append(" or ".join(_WEIGHT_MEMBERS))
            if missing:
                raise ModelLoadError(
                    f"{path} is a zip archive but lacks {', '.join(missing)}, so it is not a Keras "
                    f"model file; {_FIX}."
                )
            total = sum(info.file_size for info in infos)
            config_size = archive.getinfo("config.json").file_size
            if total > _MAX_TOTAL_BYTES or config_size > _MAX_CONFIG_BYTES:
                raise ModelLoadError(
                    f"{path} would unpack to {total} bytes (config.json: {config_size}); that is far "
                    f"beyond any Fashion-MNIST model and is refused as a possible zip bomb."
                )
            bad = archive.testzip()
            if bad is not None:
                raise ModelLoadError(f"{path}: archive member {bad!r} is corrupt (CRC mismatch); {_FIX}.")
            config_text = archive.read("config.json")
    except ModelLoadError:
        raise
    # RuntimeError: an encrypted member; NotImplementedError: a compression method zipfile lacks.
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, RuntimeError,
            NotImplementedError) as error:
        raise ModelLoadError(f"{path} is a damaged zip archive ({error}); {_FIX}.") from None
    try:
        config = json.loads(config_text)
    except ValueError as error:  # not UTF-8, not JSON, or an integer of more digits than Python converts
        raise ModelLoadError(f"{path}: config.json is not valid JSON ({error}); {_FIX}.") from None
    except RecursionError:
        raise _too_deep(path) from None
    if not isinstance(config, dict) or "class_name" not in config:
        raise ModelLoadError(f"{path}: config.json does not describe a Keras model; {_FIX}.")
    _walk_config(config, path)


def input_data_format(model) -> str:
    """``channels_last`` or ``channels_first``: how ``model`` wants its (28, 28) images."""
    shape = tuple(model.inputs[0].shape[1:])
    return IMAGE_SHAPES[shape]


def check_model_shapes(model, path: Path) -> None:
    """Refuse a model that does not map one 28x28 grayscale image to 10 classes."""
    inputs = getattr(model, "inputs", None) or []
    outputs = getattr(model, "outputs", None) or []
    input_shapes = [tuple(t.shape[1:]) for t in inputs]
    output_shapes = [tuple(t.shape[1:]) for t in outputs]
    if len(input_shapes) != 1 or input_shapes[0] not in IMAGE_SHAPES:
        raise ModelLoadError(
            f"{path} is a model with input shape {input_shapes or 'unknown'}; expected one 28x28 grayscale "
            f"image, (28, 28, 1) or (1, 28, 28). It is a model of another task; {_FIX}."
        )
    if len(output_shapes) != 1 or output_shapes[0] != (NUM_CLASSES,):
        raise ModelLoadError(
            f"{path} is a model with output shape {output_shapes or 'unknown'}; expected "
            f"({NUM_CLASSES},) class probabilities. It is a model of another task; {_FIX}."
        )


def load_model(path: str | os.PathLike, compile: bool = False, announce=None):
    """Load a Fashion-MNIST model from a ``.keras`` file or a run directory, safely.

    Args:
        path: a ``.keras`` file, or a run directory holding ``model.keras``.
        compile: also restore the optimizer, loss and metrics. Prediction and
            :func:`fmnist_keras.engine.evaluation.evaluate` do not need them.
        announce: as in :func:`resolve_model_path`.

    Returns:
        The ``keras.Model``.

    Raises:
        ModelLoadError: the file is missing, unsafe, damaged or not a model
            of 28x28 grayscale images into 10 classes.

    Example:
        >>> model = load_model("runs/2025-01-01/cnn")
    """
    model_path = resolve_model_path(path, announce)
    check_archive(model_path)
    import keras  # deferred: importing keras fixes the backend

    try:
        with warnings.catch_warnings():
            # Compiling a CNN on JAX, Keras refuses XLA for RandomTranslation; compile_steps_on_jax, below, allows it.
            warnings.filterwarnings("ignore", message="Model doesn't support `jit_compile=True`")
            # safe_mode=True is the default; spelt out because it is the point.
            model = keras.saving.load_model(model_path, compile=compile, safe_mode=True)
    except Exception as error:  # Keras raises many types; the user needs one line
        detail = " ".join(str(error).split())
        if len(detail) > 300:
            detail = detail[:300] + "..."
        raise ModelLoadError(
            f"Keras could not load {model_path} ({type(error).__name__}: {detail}); the file is damaged, "
            f"hostile, or from an incompatible Keras version; {_FIX}."
        ) from None
    if not isinstance(model, keras.Model):
        raise ModelLoadError(f"{model_path} holds a {type(model).__name__}, not a model; {_FIX}.")
    check_model_shapes(model, model_path)
    compile_steps_on_jax(model)
    return model

"""Export a trained model for serving without Keras: ONNX or TensorFlow SavedModel.

Usage:
    python -m fmnist_keras.export MODEL.keras --format onnx --output model.onnx
    python -m fmnist_keras.export runs/NAME/cnn --format tf_saved_model --output saved_model/

The model is loaded with :func:`fmnist_keras.loading.load_model` (a
``.keras`` file or a run directory) and written by Keras's own
``model.export``. A ``.keras`` file loads on any backend, so the export runs
on the backend that supports the format with the packages installed here
(``--backend`` or ``$KERAS_BACKEND`` to choose). The exported graph is the
inference pass: the training-only augmentation and dropout layers are
identity there. It takes float32 images scaled to [0, 1], shaped like the
model's input (``(N, 28, 28, 1)`` for channels_last), any batch size, and
returns the 10 softmax probabilities.
"""

from __future__ import annotations

import argparse
import errno
import importlib.util
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from fmnist_keras import interrupts
from fmnist_keras.backend import named_backend
from fmnist_keras.cli import MODEL_HELP, escape_unencodable_output, one_line, os_error_line, print_error
from fmnist_keras.rundir import (
    DANGLING_LINK, exists_or_link, first_entry_not_among, first_link_or_special_below, in_the_way_of_a_directory,
    is_marker, make_ordinary, replacing,
)

FORMATS = ("onnx", "tf_saved_model")
# What Keras needs, beyond the backend's own package, to export each format
# on each backend (keras/src/export/*.py), in order of preference: on the
# first backend listed the export needs the fewest extras.
EXPORT_NEEDS = {
    "onnx": {"torch": ("onnx", "onnxscript"), "tensorflow": ("tf2onnx",), "jax": ("jax2onnx",)},
    "tf_saved_model": {"tensorflow": (), "jax": ("tensorflow",), "torch": ("tensorflow", "torch_xla")},
}


# Written into every SavedModel directory export creates: --overwrite removes
# a directory only when it carries this file, so it never deletes one that
# export did not write.
EXPORT_MARKER = ".fmnist_keras-export"
ASSET_DIRS = ("assets", "assets.extra")  # a SavedModel's directories of extra files (TF Serving's warm-up requests)
# The metadata entry every ONNX file export writes carries; --overwrite replaces no other ONNX file.
ONNX_STAMP = ("written_by", "fmnist_keras.export")
# Protocol Buffers serialise at most 2 GiB, so a single-file ONNX model is no
# larger; a larger file is never read to find out whether it is one.
MAX_ONNX_BYTES = 2**31 - 1


class ExportError(ValueError):
    """The export cannot be done as asked here; the message says how to fix it."""


def check_output(text: str, format: str, overwrite: bool) -> Path:
    """The ``--output`` path, once it is known that writing it puts nothing else at risk.

    Refused: an empty path, ``.``/``..``, the current directory, one of its
    ancestors, the home directory or ``/``; a symlink; a path below a regular
    file; for ONNX an existing directory, or a file that is not an ONNX model
    export wrote (:data:`ONNX_STAMP`) of at most :data:`MAX_ONNX_BYTES`; for
    a SavedModel an existing directory that export did not write (no
    :data:`EXPORT_MARKER`) or a file. An existing output that export may
    replace needs ``overwrite``. Nothing is touched here.

    Raises:
        ExportError: with what is wrong and how to fix it.
    """
    if not text.strip():
        raise ExportError("--output is empty; pass the file (onnx) or directory (tf_saved_model) to write.")
    output = Path(os.path.expanduser(text))  # "~nobody" stays as it is (Path.expanduser raises)
    what = "a new file such as model.onnx" if format == "onnx" else "a new directory such as saved_model/"
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    try:
        os.stat(output)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise ExportError(f"--output {text!r} goes through a loop of symbolic links; fix the links or pass "
                              f"{what}.") from None
    try:
        resolved = output.resolve()
    except (RuntimeError, OSError) as error:  # Python 3.11 and 3.12 raise RuntimeError on a loop
        raise ExportError(f"--output {text!r} cannot be resolved ({error}); fix the links on the way or pass "
                          f"{what}.") from None
    for candidate in {Path(os.path.abspath(output)), resolved}:
        if candidate == home or cwd.is_relative_to(candidate) or home.is_relative_to(candidate):
            raise ExportError(
                f"--output {text!r} is {candidate}, the current directory, the home directory or one of their "
                f"ancestors; export never replaces those; pass {what}."
            )
    last = os.path.basename(text.rstrip().rstrip("/" + os.sep))  # Path("x/.") is "x"
    if output.name in ("", ".", "..") or last in (".", ".."):
        raise ExportError(f"--output {text!r} names a directory by '.' or '..'; pass {what}.")
    if format == "onnx" and text.rstrip().endswith(("/", os.sep)):  # Path() drops the slash that says "a directory"
        raise ExportError(f"--output {text!r} ends with a slash, which names a directory, but an ONNX export is one "
                          f"file; pass {what}.")
    if output.is_symlink():
        raise ExportError(f"--output {output} is a symlink; export writes only real paths; remove the link or "
                          f"pass {what}.")
    in_the_way = in_the_way_of_a_directory(output.parent)
    if in_the_way is not None:
        parent, kind = in_the_way
        link = "fix the link or " if kind == DANGLING_LINK else ""
        raise ExportError(f"--output {output} lies below {parent}, which is {kind}, not a directory; {link}pass "
                          f"{what}.")
    if not output.exists():
        return output
    if format == "onnx":
        if output.is_dir():
            raise ExportError(f"--output {output} is a directory; an ONNX export is one file; pass {what}.")
        if not output.is_file():
            raise ExportError(f"--output {output} exists and is not a regular file; pass {what}.")
        if overwrite and output.stat().st_size > MAX_ONNX_BYTES:
            raise ExportError(f"--output {output} is larger than {MAX_ONNX_BYTES} bytes, more than one ONNX file "
                              f"holds, so it is not an export and is never replaced, even with --overwrite; "
                              f"pass {what}.")
        if overwrite and not _is_own_onnx_export(output):
            raise ExportError(f"--output {output} is not an ONNX model that export wrote (no {ONNX_STAMP[0]} "
                              f"{ONNX_STAMP[1]} in its metadata), so it is never replaced, even with --overwrite; "
                              f"pass {what}.")
    else:
        if not output.is_dir():
            raise ExportError(f"--output {output} exists and is not a directory; a SavedModel is a directory, "
                              f"and export replaces only SavedModel directories it wrote; pass {what}.")
        not_own = _not_own_saved_model(output)
        if not_own is not None:
            raise ExportError(
                f"--output {output} is a directory that export did not write ({not_own}), so it is never "
                f"replaced, even with --overwrite; pass {what}."
            )
    if not overwrite:
        raise ExportError(f"{output} already exists; choose another --output or pass --overwrite.")
    return output


def check_not_the_model(output: Path, model: Path) -> None:
    """Refuse an ``--output`` that is the ``.keras`` file being exported.

    Raises:
        ExportError: ``output`` exists and is ``model`` (by any path).
    """
    if output.exists() and output.resolve() == Path(model).resolve():
        raise ExportError(f"--output {output} is the model being exported; pass a new path for the export.")


def _is_own_onnx_export(path: Path) -> bool:
    """Whether ``path`` holds an ONNX model with a graph that export wrote (its :data:`ONNX_STAMP`).

    Read without onnx's extras (external data). A file over
    :data:`MAX_ONNX_BYTES` is not read: a single-file ONNX model cannot be that large.
    """
    try:
        if path.stat().st_size > MAX_ONNX_BYTES:
            return False
        import onnx

        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # not protobuf, not ONNX, or onnx missing: not provably an export
        return False
    stamped = any((entry.key, entry.value) == ONNX_STAMP for entry in model.metadata_props)
    return model.ir_version > 0 and len(model.graph.node) > 0 and stamped


def _stamp_onnx(path: Path) -> None:
    """Add :data:`ONNX_STAMP` to the metadata of the ONNX file at ``path``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    entry = model.metadata_props.add()
    entry.key, entry.value = ONNX_STAMP
    onnx.save(model, str(path))


def missing_packages(format: str, backend: str) -> list[str]:
    """The packages that exporting ``format`` on ``backend`` needs and this Python lacks."""
    needed = (backend, *EXPORT_NEEDS[format][backend])
    return [name for name in needed if importlib.util.find_spec(name) is None]


def choose_backend(format: str, requested: str | None = None) -> str:
    """The backend to export ``format`` on: ``requested``, else $KERAS_BACKEND, else the first that works.

    Raises:
        ExportError: the chosen backend lacks a package the export needs.
    """
    if format not in EXPORT_NEEDS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")
    backend = requested or named_backend()
    candidates = [b for b in EXPORT_NEEDS[format] if not missing_packages(format, b)]
    if backend is None:
        if candidates:
            return candidates[0]
        backend = next(iter(EXPORT_NEEDS[format]))
    if backend not in EXPORT_NEEDS[format]:
        where = " (from $KERAS_BACKEND)" if requested is None else ""
        raise ExportError(f"unknown backend {backend!r}{where}; choose one of {', '.join(EXPORT_NEEDS[format])}.")
    missing = missing_packages(format, backend)
    if missing:
        pips = " ".join(missing)  # each import name is also its pip name
        other = f", or pass --backend {candidates[0]}" if candidates else ""
        raise ExportError(
            f"exporting to {format} on the {backend} backend needs {', '.join(missing)}, which "
            f"{'is' if len(missing) == 1 else 'are'} not installed here; run: pip install {pips}{other}."
        )
    return backend


def export_model(model, output: Path, format: str) -> Path:
    """Write ``model``'s inference pass to ``output`` (a file for ONNX, a directory for SavedModel)."""
    import keras

    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")
    policies = {layer.dtype_policy.name for layer in model.layers} - {"float32"}
    if policies:
        # Keras exports float32 graphs only; the weights of a mixed-precision
        # model are float32 already, so rebuild it in float32 and copy them.
        model = _as_float32(model)
    model = inference_model(model)
    # A fixed opset, not whatever the installed exporter defaults to, keeps the
    # file readable by the same runtimes (opset 18: onnxruntime >= 1.14).
    kwargs = {"opset_version": 18} if format == "onnx" else {}
    spec = keras.InputSpec(shape=(None, *model.inputs[0].shape[1:]), dtype="float32", name="image")
    with warnings.catch_warnings():
        # torch's tracer warns about every shape check in Keras's ops; the
        # exported graph is checked against Keras's outputs in the tests.
        warnings.filterwarnings("ignore", message=".*might cause the trace to be incorrect")
        model.export(str(output), format=format, verbose=False, input_signature=[spec], **kwargs)
    return output


def _not_own_saved_model(output: Path) -> str | None:
    """Why the directory ``output`` is not a SavedModel that export wrote, to be replaced whole; None if it is.

    It holds export's marker and TensorFlow's SavedModel files alone, and no link.
    """
    if not is_marker(output / EXPORT_MARKER):
        return f"no {EXPORT_MARKER} in it"
    found = (first_entry_not_among(output, (EXPORT_MARKER, "saved_model.pb", "fingerprint.pb"),
                                   ("variables", *ASSET_DIRS))
             or first_entry_not_among(output / "variables", ("variables.index",), (), ("variables.data-*",)))
    for assets in ASSET_DIRS:
        found = found or first_link_or_special_below(output / assets)
    if found is None:  # TF Serving's users add files to assets.extra/ by hand: only those export listed are its
        listed = set((output / EXPORT_MARKER).read_text(errors="replace").splitlines()[1:])
        found = next((output / name for name in _asset_files(output) if name not in listed), None)
    return None if found is None else f"it holds {found}, which export did not write"


def _asset_files(saved_model: Path) -> list[str]:
    """The files below a SavedModel's ``assets/`` and ``assets.extra/``, as paths relative to it, links not followed."""
    found = []
    for assets in ASSET_DIRS:
        for directory, _, files in os.walk(saved_model / assets):
            found += [(Path(directory) / name).relative_to(saved_model).as_posix() for name in files]
    return sorted(found)


def _appeared(output: Path) -> str:
    return (f"{output} appeared during the export; it is left alone; choose another --output, or run it again with "
            f"--overwrite if it is an earlier export.")


def write_export(model, output: Path, format: str, overwrite: bool = False) -> Path:
    """Export into a temporary sibling of ``output``, then swap it into place.

    A failed export leaves ``output`` as it was. An existing ``output`` is
    replaced only after the new export is complete, and only with
    ``overwrite``; it must be what :func:`check_output` lets export replace,
    checked again just before (an ONNX file) or during (a SavedModel
    directory) the swap. Without ``overwrite``, a file that appeared at
    ``output`` during the export is left alone.
    """
    parent = output.parent
    if format == "onnx":
        try:
            with replacing(output, prefix=f".{output.name}.", suffix=".partial.onnx", new_only=not overwrite) as (
                    handle, temporary):
                os.close(handle)  # the exporter writes the file by name
                export_model(model, temporary, format)
                _stamp_onnx(temporary)
                try:
                    check_output(str(output), format, overwrite)
                except ExportError as error:
                    raise ExportError(f"{output} changed during the export ({error}); it is left alone.") from None
        except FileExistsError:
            raise ExportError(_appeared(output)) from None
        return output
    temporary = Path(tempfile.mkdtemp(dir=parent, prefix=f".{output.name}.", suffix=".partial"))
    try:
        handle = os.open(temporary, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:
            make_ordinary(handle, directory=True)
        finally:
            os.close(handle)
        export_model(model, temporary, format)
        # The marker lists the asset files export wrote, so a file added there later is never replaced.
        (temporary / EXPORT_MARKER).write_text("\n".join(["written by python -m fmnist_keras.export",
                                                          *_asset_files(temporary)]) + "\n")
        old = None
        if exists_or_link(output):
            if not overwrite:
                raise ExportError(_appeared(output))
            if output.is_symlink() or _not_own_saved_model(output) is not None:
                raise ExportError(f"{output} changed during the export and is no longer a directory export wrote; "
                                  f"left alone.")
            old = Path(tempfile.mkdtemp(dir=parent, prefix=f".{output.name}.", suffix=".old"))
        with interrupts.deferred():  # a signal between the two renames would leave no export at --output
            if old is not None:
                try:
                    os.replace(output, old)  # renaming onto an empty directory is atomic
                except OSError:
                    old.rmdir()
                    raise
            try:
                os.replace(temporary, output)
            except OSError:
                if old is not None:
                    os.replace(old, output)
                raise
        if old is not None:
            shutil.rmtree(old)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary)
    return output


def inference_model(model):
    """``model`` wrapped so that every layer runs in inference mode, whoever calls it.

    Keras records ``training=True`` (the default of the ``Random*``
    augmentation layers) in the functional graph, and a call without
    ``training`` then runs them, and every layer after them (BatchNorm!), in
    training mode. Exporters call the model that way, so the wrapper fixes
    ``training=False``. The weights are shared with ``model``.
    """
    import keras

    inputs = keras.Input(shape=model.inputs[0].shape[1:], dtype="float32", name="image")
    return keras.Model(inputs, model(inputs, training=False), name=model.name)


def _as_float32(model):
    def float32(node):
        if isinstance(node, dict):
            if node.get("class_name") == "DTypePolicy":
                return {**node, "config": {**node["config"], "name": "float32"}}
            return {key: float32(value) for key, value in node.items()}
        if isinstance(node, list):
            return [float32(item) for item in node]
        return node

    clone = model.__class__.from_config(float32(model.get_config()))
    clone.set_weights(model.get_weights())
    return clone


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fmnist_keras.export",
        description="Export a trained model (.keras or run directory) to ONNX or a TensorFlow SavedModel.",
        epilog=(
            "Examples:\n"
            "  python -m fmnist_keras.export runs/NAME/cnn/model.keras --format onnx --output cnn.onnx\n"
            "  python -m fmnist_keras.export runs/NAME/cnn --format tf_saved_model --output cnn_saved_model\n"
            "Backends that can export each format (and the extra packages they need):\n"
            + "\n".join(
                f"  {fmt}: " + "; ".join(f"{b} ({', '.join(n) or 'nothing more'})" for b, n in needs.items())
                for fmt, needs in EXPORT_NEEDS.items()
            )
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--format", required=True, choices=FORMATS, help="export format")
    parser.add_argument("--output", required=True, metavar="PATH",
                        help="the .onnx file, or the SavedModel directory, to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing PATH (default: refuse)")
    parser.add_argument("--backend", choices=tuple(EXPORT_NEEDS["onnx"]),
                        help="Keras backend to export on (default: $KERAS_BACKEND, else the first backend, in "
                        "the order listed below, whose packages are installed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    escape_unencodable_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        output = check_output(args.output, args.format, args.overwrite)
    except ExportError as error:
        parser.error(one_line(error))

    from fmnist_keras.loading import ModelLoadError, check_archive, exit_code, load_model, resolve_model_path

    try:
        model_path = resolve_model_path(args.model, lambda note: print(note, file=sys.stderr))
        check_archive(model_path)  # a bad file is reported before the slow backend import
    except ModelLoadError as error:
        print_error(error)
        return exit_code(error)
    try:
        check_not_the_model(output, model_path)
    except ExportError as error:
        parser.error(one_line(error))

    from fmnist_keras.backend import BackendError, select_backend

    try:
        backend = select_backend(choose_backend(args.format, args.backend), "cpu")
    except (ExportError, BackendError) as error:
        parser.error(one_line(error))
    try:
        model = load_model(model_path)
    except ModelLoadError as error:
        print_error(error)
        return 1
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        print_error(f"cannot create {output.parent} ({error.strerror}); choose another --output.")
        return 1
    try:
        write_export(model, output, args.format, args.overwrite)
    except ExportError as error:
        print_error(error)
        return 1
    except OSError as error:  # the file system's: a full disk, a place that takes no new file (/proc)
        kept = f"; {output} is unchanged" if output.exists() else ""
        print_error(os_error_line("export", error, then=f"run it again{kept}."))
        return 1
    except Exception as error:  # exporters raise many types; the user needs one line
        detail = " ".join(str(error).split())[:300]
        others = [b for b in EXPORT_NEEDS[args.format] if b != backend and not missing_packages(args.format, b)]
        hint = f"; try --backend {others[0]}" if others else ""
        kept = f"; {output} is unchanged" if output.exists() else ""
        print_error(f"exporting {args.model} to {args.format} on {backend} failed ({type(error).__name__}: "
                    f"{detail}){kept}{hint}.")
        return 1
    print(one_line(f"Exported {args.model} ({model.name}) to {args.format} on the {backend} backend: {output}"))
    return 0


if __name__ == "__main__":
    from fmnist_keras.interrupts import run_command

    sys.exit(run_command(main, "export"))

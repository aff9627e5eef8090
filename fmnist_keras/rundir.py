"""The run directory: its layout, its atomic writes, its lock and its marker.

One module knows every file name in a run directory::

    OUT_DIR/RUN_NAME/
      .fmnist_keras-run       marker: fmnist_keras created this directory
      .lock                   held while a process trains here; names the holder
      run.json                the models this run trains; made_by: a command other than train that trains here
      MODEL/                  one per model (mlp, cnn, ...)
        config.json           the TrainConfig that rebuilds and reproduces it
        model.keras           the best model (lowest validation loss)
        history.csv           one row per epoch (CSVLogger)
        backup/               BackupAndRestore's state while fit runs
        fit.json              written when fit has ended: what evaluation needs
        metrics.json          test and validation metrics, written once
        tensorboard/          with --tensorboard: Keras's TensorBoard logs
        report.md, figures/   the report
        evaluation.json       what python -m fmnist_keras.evaluate measured
    OUT_DIR/latest            symlink to the newest run

Rules it keeps: a run name is one safe path component; ``--overwrite``
removes only a directory that carries the marker (a file, not a link) and holds
nothing but what the project writes there (never a symlink, never the working
directory or one above it), after every check has passed; every JSON
file is written to a temporary sibling and renamed, so a kill leaves the old
file or the new one; a second process is refused the lock in one line naming
the holder. No Keras import here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import errno
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
import time
from fnmatch import fnmatch
from pathlib import Path

from fmnist_keras import interrupts
from fmnist_keras.cli import one_line
from fmnist_keras.config import MODEL_NAMES, RANGES

MARKER = ".fmnist_keras-run"
LOCK = ".lock"
RUN_FILE = "run.json"
MODEL_FILE = "model.keras"
HISTORY_FILE = "history.csv"
CONFIG_FILE = "config.json"
BACKUP_DIR = "backup"
FIT_FILE = "fit.json"
METRICS_FILE = "metrics.json"
EVALUATION_FILE = "evaluation.json"
REPORT_FILE = "report.md"
FIGURES_DIR = "figures"
# Written into a directory outside a run where evaluate or write_report puts its outputs (a run's model
# directory has the run's marker one level up instead): existing outputs are replaced only in a directory that
# carries one of the two.
OUTPUT_MARKER = ".fmnist_keras-evaluation"
TENSORBOARD_DIR = "tensorboard"
LATEST = "latest"
# What Keras writes below a model's directory: BackupAndRestore's files (with double_checkpoint, a copy of
# the previous pair as *.bkp) and TensorBoard's logs, one directory per split.
BACKUP_WEIGHTS = "latest.weights.h5"
BACKUP_METADATA = "training_metadata.json"
TENSORBOARD_SPLITS = ("train", "validation")

# Letters, digits and . _ - + = @; not starting with a dot (hidden, ".", "..").
_SAFE_NAME = re.compile(r"[A-Za-z0-9_+=@-][A-Za-z0-9._+=@-]{0,99}")
# The commands other than train that make run directories and train in them their own way (run.json's
# made_by), each with what to do where train --resume cannot go on with one of their runs.
OTHER_MAKERS = {
    "benchmarks/distill.py": "run benchmarks/distill.py again with --overwrite",
    "benchmarks/ablation.py": "run benchmarks/ablation.py again, which replaces its runs",
}
# The largest run file read back (run.json, config.json, fit.json, metrics.json, history.csv).
MAX_RUN_FILE_BYTES = 16 * 1024**2


class RunDirError(ValueError):
    """A run directory cannot be created, opened, locked or read as asked; one line says how to fix it."""


def check_run_name(name: str) -> str:
    """``name`` if it is one safe path component, else :class:`RunDirError`."""
    if not _SAFE_NAME.fullmatch(name or "") or name == LATEST:
        raise RunDirError(
            f"--run-name {name!r} is not a plain directory name; use 1-100 letters, digits and . _ - + = @, "
            f"not starting with a dot, and not {LATEST!r} (e.g. --run-name cnn-try1)."
        )
    return name


def write_json(path: Path, data) -> None:
    """Write ``data`` as strict JSON (no NaN) to ``path`` atomically."""
    write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def write_text(path: Path, text: str, new_only: bool = False) -> None:
    """Write ``text`` to a temporary sibling of ``path``, flush it to disk, then rename it over ``path``; with
    ``new_only``, take the name only if it is still free (see :func:`replacing`)."""
    _write_atomically(path, "w", text, new_only)


def write_bytes(path: Path, data: bytes) -> None:
    """:func:`write_text` for bytes."""
    _write_atomically(path, "wb", data)


# The process's umask, read once at import (reading it sets it, which threads must not race).
_UMASK = os.umask(0)
os.umask(_UMASK)


def make_ordinary(fd: int, directory: bool = False) -> None:
    """Give the file or directory open as ``fd``, which ``mkstemp``/``mkdtemp`` made private, the umask's permissions.

    By descriptor, not by name, so a link put in its place meanwhile is never followed.
    """
    os.fchmod(fd, (0o777 if directory else 0o666) & ~_UMASK)


# The start of the names of replacing()'s temporary files (and ModelCheckpoint's): a kill can leave one behind.
TEMPORARY_PREFIX = ".partial-"


def temporary_prefix(name: str) -> str:
    """The start of the name of each temporary file :func:`replacing` makes for a file named ``name``."""
    return f"{TEMPORARY_PREFIX}{name}."


def temporaries_of(name: str) -> str:
    """The pattern of the names of the temporary files :func:`replacing` makes for a file named ``name``."""
    return f"{temporary_prefix(name)}*"


@contextlib.contextmanager
def replacing(path: Path, prefix: str | None = None, suffix: str = "", new_only: bool = False):
    """A new file beside ``path``, renamed over ``path`` when the block ends, removed when it fails.

    The file has a name no one else has (``mkstemp``: ``O_EXCL``, so never a
    link planted under a name it might take) and the umask's permissions.
    Yields its open descriptor, the block's to close, and its path (default
    name ``.partial-NAME.XXXXXXXX`` + ``suffix``). With ``new_only``, ``path``
    must not exist when the block ends: a file that appeared there meanwhile
    is left as it is, and :class:`FileExistsError` raised.
    """
    path = Path(path)
    try:
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=prefix or temporary_prefix(path.name),
                                        suffix=suffix)
    except OSError as error:
        _name_after(error, path)
        raise
    temporary = Path(name)
    try:
        make_ordinary(handle)
        yield handle, temporary
        if new_only:
            _rename_unless_taken(temporary, path)
        else:
            os.replace(temporary, path)
    except OSError as error:
        if error.filename in (None, name):  # the system's error about the temporary, or a full disk's about none
            _name_after(error, path)
        raise
    finally:
        temporary.unlink(missing_ok=True)


def _name_after(error: OSError, path: Path) -> None:
    """Name the system's ``error`` (one with an ``errno``) after ``path``, the file asked for, not its temporary;
    an error of a caller's own (no ``errno``) keeps its words."""
    if error.errno is not None:
        error.filename, error.filename2 = str(path), None


def _rename_unless_taken(source: Path, target: Path) -> None:
    """Give ``source`` the name ``target``, which must be free: a hard link fails, atomically, if it is not."""
    try:
        os.link(source, target, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links: the check and the rename are two steps
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target)) from None
        os.replace(source, target)


def _write_atomically(path: Path, mode: str, content, new_only: bool = False) -> None:
    with replacing(path, new_only=new_only) as (handle, _), os.fdopen(handle, mode) as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def read_run_text(path: Path, what: str, fix: str, newline: str | None = None) -> str:
    """The text of the run file ``path``, ``what`` it should be; a FIFO, a device or a file over
    :data:`MAX_RUN_FILE_BYTES` is one :class:`RunDirError` line, never read (a FIFO would block the read,
    ``/dev/zero`` would never end). ``FileNotFoundError``, other ``OSError`` and ``UnicodeDecodeError`` are
    the caller's to word."""
    path = Path(path)
    # O_NONBLOCK: opening a FIFO does not wait for a writer; the checks are of the file opened, not of its name.
    with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), newline=newline) as file:
        status = os.fstat(file.fileno())
        if not stat.S_ISREG(status.st_mode):
            raise RunDirError(f"{path} is not a regular file, so not {what}; {fix}.")
        if status.st_size > MAX_RUN_FILE_BYTES:
            raise RunDirError(f"{path} is larger than {MAX_RUN_FILE_BYTES // 1024**2} MiB, too large for {what}; "
                              f"{fix}.")
        return file.read(MAX_RUN_FILE_BYTES + 1)  # a file that grew since the check is cut, and fails to parse


def read_json(path: Path, what: str, fix: str):
    """The JSON in ``path``; a missing, huge or garbled file is one :class:`RunDirError` line."""
    path = Path(path)
    try:
        return json.loads(read_run_text(path, what, fix), parse_constant=refuse_json_constant)
    except FileNotFoundError:
        raise RunDirError(f"{path} is missing ({what}); {fix}.") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as error:
        if isinstance(error, RunDirError):
            raise
        detail = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise RunDirError(f"{path} is damaged: not valid JSON for {what} ({detail}); {fix}.") from None
    except OSError as error:
        raise RunDirError(f"cannot read {path} ({error.strerror}); {fix}.") from None


def read_json_object(path: Path, what: str, fix: str) -> dict:
    """:func:`read_json` for a file that holds one JSON object; anything else is one RunDirError line."""
    data = read_json(path, what, fix)
    if not isinstance(data, dict):
        raise RunDirError(f"{path} is damaged: a JSON {type(data).__name__}, not an object; {fix}.")
    return data


def refuse_json_constant(name: str):
    """``json.loads``'s ``parse_constant`` for files the project writes: NaN and Infinity are no JSON numbers."""
    raise ValueError(f"{name} is not a JSON number")


def is_finite_number(value) -> bool:
    """Whether a JSON value is a number a float holds (JSON integers may be any size)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond a float's range
        return False


def output_in_the_way(out_dir: Path, files: tuple[str, ...], writer: str, fix: str) -> str | None:
    """The line for the first of ``files`` in ``out_dir``, of ``figures/`` or of its entries that ``writer``
    must not write to: a symbolic link, or something other than a regular file (a directory, for ``figures/``);
    None when none is in the way."""
    figures = out_dir / FIGURES_DIR
    drawn = sorted(figures.iterdir()) if figures.is_dir() and not figures.is_symlink() else []
    for path in (*(out_dir / name for name in files), figures, *drawn):
        if path.is_symlink():
            return (f"{path} is a symbolic link; {writer} writes only real files and never follows a link; move "
                    f"it away or {fix}.")
        if path.exists() and not (path.is_dir() if path == figures else path.is_file()):
            return (f"{path} is not a {'directory' if path == figures else 'regular file'}, in the way of the "
                    f"report; move it away or {fix}.")
    return None


def is_marker(path: Path) -> bool:
    """Whether ``path`` is a marker the project wrote: a regular file, never a link (one planted in a user's
    directory would make it look like the project's to replace)."""
    return not path.is_symlink() and path.is_file()


def _is_marker_in(directory: int) -> bool:
    """:func:`is_marker` for the run's marker in the directory open as ``directory`` (a descriptor)."""
    try:
        return stat.S_ISREG(os.stat(MARKER, dir_fd=directory, follow_symlinks=False).st_mode)
    except FileNotFoundError:
        return False


def is_model_dir(path: Path) -> bool:
    """Whether ``path`` (links resolved) is a model directory of a run train created.

    Its parent holds the run's marker and lists its name in ``run.json``.
    """
    real = Path(path).resolve()
    if not real.is_dir() or not is_marker(real.parent / MARKER):
        return False
    try:
        return real.name in RunDir(real.parent).models()
    except RunDirError:
        return False


@dataclasses.dataclass(frozen=True)
class RunDir:
    """A run directory and the paths in it."""

    path: Path

    # --- paths -------------------------------------------------------------------------------
    def model_dir(self, model: str) -> Path:
        return self.path / model

    def model_file(self, model: str) -> Path:
        return self.path / model / MODEL_FILE

    def history_file(self, model: str) -> Path:
        return self.path / model / HISTORY_FILE

    def config_file(self, model: str) -> Path:
        return self.path / model / CONFIG_FILE

    def backup_dir(self, model: str) -> Path:
        return self.path / model / BACKUP_DIR

    def tensorboard_dir(self, model: str) -> Path:
        return self.path / model / TENSORBOARD_DIR

    def fit_file(self, model: str) -> Path:
        return self.path / model / FIT_FILE

    def metrics_file(self, model: str) -> Path:
        return self.path / model / METRICS_FILE

    def __str__(self) -> str:
        return str(self.path)

    def check_model_dir(self, model: str) -> Path:
        """``model``'s directory, made if missing; a link, or a file where a directory or run file belongs, is refused.

        Everything train writes or deletes there (Keras deletes ``backup/``
        when fit ends) must be the project's own, never a link to a user's
        file: that holds for everything inside ``backup/``, ``tensorboard/``
        and ``figures/`` too, which Keras and the report write into.
        """
        directory = self.model_dir(model)
        fix = "move it away; a run directory holds only what train wrote (or start a new run)"
        if directory.is_symlink() or (directory.exists() and not directory.is_dir()):
            raise RunDirError(f"{directory} is {'a symbolic link' if directory.is_symlink() else 'not a directory'}; {fix}.")
        directory.mkdir(exist_ok=True)
        for name in (MODEL_FILE, HISTORY_FILE, CONFIG_FILE, FIT_FILE, METRICS_FILE, REPORT_FILE):
            path = directory / name
            if path.is_symlink() or (path.exists() and not path.is_file()):
                raise RunDirError(f"{path} is {'a symbolic link' if path.is_symlink() else 'not a regular file'}; {fix}.")
        for name in (BACKUP_DIR, TENSORBOARD_DIR, FIGURES_DIR):
            path = directory / name
            if path.is_symlink() or (path.exists() and not path.is_dir()):
                raise RunDirError(f"{path} is {'a symbolic link' if path.is_symlink() else 'not a directory'}; {fix}.")
            inside = first_link_or_special_below(path)
            if inside is not None:
                what = "a symbolic link" if inside.is_symlink() else "neither a file nor a directory"
                raise RunDirError(f"{inside} is {what}; {fix}.")
        return directory

    # --- creating and opening ----------------------------------------------------------------
    @classmethod
    def create(cls, out_dir: str, name: str | None, models: list[str], overwrite: bool = False,
               made_by: str | None = None, elsewhere: str = "another --run-name") -> "RunDir":
        """Make ``out_dir/name`` (or a fresh, unique date-time name), with its marker and ``run.json``.

        With ``overwrite``, an existing run directory of that name is removed
        first, only if fmnist_keras created it (its marker) and no process
        trains in it; anything else is refused before anything is removed.
        What a killed removal left in ``out_dir`` is removed first.
        ``made_by`` names a command other than train that trains in the run
        (one of :data:`OTHER_MAKERS`), which ``train --resume`` then refuses to
        go on with; ``elsewhere`` is what its refusals tell the user to choose
        instead of the name (see :meth:`check_new`).
        """
        if made_by is not None and made_by not in OTHER_MAKERS:
            raise ValueError(f"made_by={made_by!r} is not one of {', '.join(OTHER_MAKERS)}")
        out = _check_out_dir(out_dir)
        _finish_removals(out)
        if name is None:
            return cls._create_unique(out, models, made_by)
        target = _check_target(out / check_run_name(name), overwrite, elsewhere)
        if target.exists():
            cls._remove_own(target, elsewhere)
        try:
            return cls._make(target, models, made_by)
        except FileExistsError:  # another process made it between the check and now
            raise RunDirError(f"run directory {target} already exists; choose {elsewhere}.") from None

    @staticmethod
    def check_new(out_dir, name: str, overwrite: bool, elsewhere: str = "another --run-name") -> Path:
        """``out_dir/name``, if :meth:`create` may make it as far as the name tells; nothing is touched.

        Train checks this before it loads the data, so an ``out_dir`` that
        cannot hold runs, a name that is not one plain component, a link, a
        run that exists (without ``overwrite``) or one that ``overwrite`` may
        not remove is one line at once. ``elsewhere`` is what the lines tell
        the user to choose instead of the name: train's ``--run-name``, or
        ``--out-dir`` for a command that names its runs itself.

        Raises:
            RunDirError: what is wrong and how to fix it.
        """
        return _check_target(_check_out_dir(out_dir, create=False) / check_run_name(name), overwrite, elsewhere)

    @staticmethod
    def check_out_dir(out_dir) -> Path:
        """``out_dir``, if :meth:`create` may make runs in it (it is, or can become, a directory); nothing is touched.

        Raises:
            RunDirError: what is wrong and how to fix it.
        """
        return _check_out_dir(out_dir, create=False)

    @classmethod
    def _create_unique(cls, out: Path, models: list[str], made_by: str | None) -> "RunDir":
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for attempt in range(1, 1000):
            target = out / (stamp if attempt == 1 else f"{stamp}-{attempt}")
            try:
                return cls._make(target, models, made_by)
            except FileExistsError:
                continue
        raise RunDirError(f"could not find a free run name for {stamp} in {out}; pass --run-name.")

    @classmethod
    def _make(cls, target: Path, models: list[str], made_by: str | None) -> "RunDir":
        try:
            target.mkdir()  # atomic: two processes never get the same directory
        except FileExistsError:
            raise
        except OSError as error:
            raise RunDirError(f"cannot create run directory {target} ({error.strerror}); choose another --out-dir.") from None
        try:
            write_json(target / MARKER, {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(),
                                         "host": socket.gethostname()})
            write_json(target / RUN_FILE, {"models": list(models), **({"made_by": made_by} if made_by else {})})
        except OSError as error:  # a full disk, say: take back what this call made, so no half-made run is left
            with contextlib.suppress(OSError):
                for name in (RUN_FILE, MARKER):
                    (target / name).unlink(missing_ok=True)
                target.rmdir()
            raise RunDirError(f"cannot write the run directory {target} ({error.strerror or error}); free some space or "
                              f"choose another --out-dir.") from None
        return cls(target)

    @staticmethod
    def _remove_own(target: Path, elsewhere: str) -> None:
        """Remove ``target``, which :func:`_check_target` has just let ``--overwrite`` replace, if nobody trains
        in it and it still holds only a run of train's; else refuse."""
        resolved, cwd = target.resolve(), Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents:
            raise RunDirError(f"{target} holds the working directory; --overwrite will not remove it. cd elsewhere first.")
        # Ctrl-C or SIGTERM wait until the old run is gone: never half a run under a hidden name.
        # The lock is held until the removal ends, so no other process removes it at the same time.
        with interrupts.deferred(), _locked(target / LOCK, what=target, marked=True):
            if target.is_symlink():  # swapped for a link once the lock was taken in the real directory
                raise RunDirError(f"{target} became a symbolic link; --overwrite leaves it alone. Choose {elsewhere}.")
            _check_own(target, elsewhere)  # and nothing was added since
            doomed = target.with_name(f"{_REMOVING}{target.name}-{os.getpid()}")
            os.replace(target, doomed)
            if doomed.is_symlink():  # swapped between the check and the rename: put it back, untouched
                os.replace(doomed, target)
                raise RunDirError(f"{target} became a symbolic link; --overwrite leaves it alone. Choose {elsewhere}.")
            try:
                _remove_marked(doomed)
            except OSError as error:
                raise RunDirError(f"could not remove all of the old run, now {doomed} ({error.strerror}: "
                                  f"{error.filename}); remove it yourself, then run again.") from None

    @classmethod
    def open(cls, path: str) -> "RunDir":
        """An existing run directory (for ``--resume``): a real directory holding ``run.json``."""
        given = Path(path)
        if not str(path).strip():
            raise RunDirError("--resume needs a run directory, got an empty path; e.g. --resume runs/latest.")
        if not given.is_dir():
            what = "does not exist" if not given.exists() else "is not a directory"
            raise RunDirError(f"--resume {given}: {what}; pass the run directory that train printed "
                              f"(e.g. runs/latest).")
        run = cls(given)
        if not (given / RUN_FILE).is_file():
            hint = f" (did you mean {given.parent}?)" if (given.parent / RUN_FILE).is_file() else ""
            raise RunDirError(f"--resume {given}: no {RUN_FILE} there, so it is not a run directory of this tool{hint}.")
        if not is_marker(given / MARKER):
            raise RunDirError(f"--resume {given}: it has no {MARKER} marker, so train did not create it and will not "
                              f"write into it; start a new run (train without --resume).")
        made_by = run.made_by()
        if made_by is not None:
            raise RunDirError(f"--resume {given}: {made_by} made this run and trains in it its own way, which train "
                              f"cannot go on with; {OTHER_MAKERS[made_by]}.")
        return run

    def _run_file(self) -> tuple[dict, str]:
        """``run.json``, read, and the fix its damage calls for."""
        fix = f"it should be {{\"models\": [\"mlp\", \"cnn\"]}}; start a new run instead of --resume {self.path}"
        data = read_json(self.path / RUN_FILE, "the run's list of models", fix)
        return (data if isinstance(data, dict) else {}), fix

    def made_by(self) -> str | None:
        """The command other than train that made this run and trains in it (``run.json``'s ``made_by``, one of
        :data:`OTHER_MAKERS`), or None."""
        data, fix = self._run_file()
        made_by = data.get("made_by")
        if made_by is not None and (not isinstance(made_by, str) or made_by not in OTHER_MAKERS):
            raise RunDirError(f"{self.path / RUN_FILE} is damaged: made_by is {one_line(repr(made_by)[:60])}, not one "
                              f"of {', '.join(OTHER_MAKERS)}; {fix}.")
        return made_by

    def models(self) -> list[str]:
        """The models ``run.json`` lists, checked."""
        data, fix = self._run_file()
        models = data.get("models")
        if not (isinstance(models, list) and models and all(isinstance(m, str) for m in models)):
            raise RunDirError(f"{self.path / RUN_FILE} is damaged: no list of model names; {fix}.")
        for model in models:
            if model not in MODEL_NAMES:
                raise RunDirError(f"{self.path / RUN_FILE} is damaged: {model[:100]!r} is not one of "
                                  f"{', '.join(MODEL_NAMES)}; {fix}.")
        if len(set(models)) != len(models):
            raise RunDirError(f"{self.path / RUN_FILE} is damaged: a model is listed twice; {fix}.")
        return models

    # --- the lock ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self):
        """Hold this run directory's lock while the block runs (one process trains here at a time)."""
        with _locked(self.path / LOCK, what=self.path):
            yield self

    # --- run files ---------------------------------------------------------------------------
    def point_latest_here(self) -> None:
        """Make ``OUT_DIR/latest`` a symlink to this run.

        Only a link that train made (one to a sibling run directory, a name
        without ``/``, or to a sibling that no longer exists) is replaced: a
        real file or directory of that name, or a link of the user's own, is
        left alone. The link is a convenience: where it cannot be made (a
        file system without symlinks), a warning says so and the run goes on.
        """
        try:
            self._point_latest_here()
        except OSError as error:
            print(one_line(f"warning: could not point {self.path.parent / LATEST} at this run ({error.strerror or error}); "
                           f"use {self.path} itself."), file=sys.stderr)

    def _point_latest_here(self) -> None:
        latest = self.path.parent / LATEST
        if latest.is_symlink():
            target = os.readlink(latest)
            if "/" in target or (latest.exists() and not is_marker(latest / MARKER)):
                return
        elif latest.exists():
            return
        temporary = self.path.parent / f".latest-{os.getpid()}.tmp"
        temporary.unlink(missing_ok=True)
        try:
            temporary.symlink_to(self.path.name)
            temporary.replace(latest)
        finally:  # gone once it replaced latest; left only where the replace failed
            with contextlib.suppress(OSError):
                temporary.unlink(missing_ok=True)

    def read_fit(self, model: str) -> dict | None:
        """What ``fit.json`` recorded when ``model``'s fit ended, or None if it has not ended."""
        path = self.fit_file(model)
        if not path.exists():
            return None
        fix = f"delete {path} to train {model} again with --resume"
        data = read_json_object(path, "the record of a finished fit", fix)
        check_fields(path, data, _FIT_FIELDS, fix)
        check_fields(path, data, {"wall_time_s": _SECONDS}, fix, required=False)
        return data

    def read_metrics(self, model: str) -> dict | None:
        """``model``'s metrics, or None if it has none yet (then --resume evaluates it)."""
        path = self.metrics_file(model)
        if not path.exists():
            return None
        fix = f"delete {path} and run --resume {self.path} again to evaluate {model} anew"
        data = read_json(path, "the model's test metrics", fix)
        test = data.get("test") if isinstance(data, dict) else None
        if not isinstance(test, dict) or not is_finite_number(test.get("accuracy")):
            raise RunDirError(f"{path} is damaged: no test accuracy; {fix}.")
        check_fields(path, data, {**_FIT_FIELDS, "model": TEXT, "wall_time_s": _SECONDS}, fix)
        check_fields(path, test, {"macro_f1": _NUMBER, "loss": _NUMBER}, fix, prefix="test.")
        return data


def entries_below(directory: Path) -> list[Path]:
    """Everything below ``directory``, not following links; [] when it is not a directory."""
    if directory.is_symlink() or not directory.is_dir():
        return []
    found = []
    for root, dirs, files in os.walk(directory):  # os.walk lists a link to a directory but does not enter it
        found += [Path(root) / name for name in dirs + files]
    return found


def first_link_or_special_below(directory: Path) -> Path | None:
    """The first entry below ``directory`` that is a link, or neither a file nor a directory (a FIFO, a
    socket, a device), links not followed; None when there is none, or ``directory`` is not a directory.
    An entry gone since the listing is skipped."""
    return next((path for path in entries_below(directory) if entry_kind(path) in ("link", "other")), None)


def is_epoch_count(value) -> bool:
    """An epoch number or count: a whole number from 0 to the largest ``--epochs``."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= RANGES["epochs"][2]


def is_epoch_or_none(value) -> bool:
    """An epoch number, or None where there is none (``best_epoch``, ``nan_epoch``)."""
    return value is None or is_epoch_count(value)


# A run file's field, for check_fields: its check, and what the check expects.
TEXT = (lambda value: isinstance(value, str), "a string")
EPOCH_OR_NONE = (is_epoch_or_none, "an epoch number or null")
_NUMBER = (is_finite_number, "a number")
_SECONDS = (is_finite_number, "a number of seconds")

# What train reads back from fit.json (and metrics.json) on --resume.
_FIT_FIELDS = {
    "epochs_run": (is_epoch_count, "an epoch count"),
    "best_epoch": EPOCH_OR_NONE,
    "terminated_on_nan": (lambda value: isinstance(value, bool), "true or false"),
    "nan_epoch": EPOCH_OR_NONE,
    "train_time_s": _SECONDS,
}


def check_fields(path: Path, data: dict, fields: dict, fix: str, *, prefix: str = "", required: bool = True) -> None:
    """Refuse ``data`` unless each of ``fields`` passes its check.

    Args:
        fields: name -> (check, what it expects), e.g. ``(is_epoch_count, "an epoch count")``.
        fix: how to repair the file, the end of the error.
        prefix: put before each name in the error (``"test."`` for a nested object).
        required: whether a missing field is damage; if not, only present fields are checked.

    Raises:
        RunDirError: ``PATH is damaged: NAME is VALUE; expected WHAT; FIX.``
    """
    for key, (valid, expected) in fields.items():
        if key not in data:
            if required:
                raise RunDirError(f"{path} is damaged: {prefix}{key} is missing; expected {expected}; {fix}.")
        elif not valid(data[key]):
            raise RunDirError(f"{path} is damaged: {prefix}{key} is {repr(data[key])[:60]}; expected {expected}; {fix}.")


# The hidden name a run directory takes while --overwrite removes it: .removing-NAME-PID.
_REMOVING = ".removing-"


def _remove_marked(directory: Path) -> None:
    """Remove a run directory whose lock the caller holds, its marker and lock last.

    A kill halfway leaves a directory still marked as the project's. What
    is already gone is skipped.
    """
    def skip_gone(function, path, error):
        if not isinstance(error[1], FileNotFoundError):
            raise error[1]

    for entry in directory.iterdir():
        if entry.name in (MARKER, LOCK):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, onerror=skip_gone)
        else:
            entry.unlink(missing_ok=True)
    for name in (MARKER, LOCK):
        (directory / name).unlink(missing_ok=True)
    directory.rmdir()


def _finish_removals(out: Path) -> None:
    """Remove what a killed ``--overwrite`` left in ``out``: a hidden ``.removing-NAME-PID`` run directory.

    Only a real directory that still holds the marker (a file, not a link),
    whose process is gone and whose lock no one holds, is removed; anything
    else of that name, or a leftover that cannot be removed here, is left alone.
    """
    for leftover in sorted(out.glob(f"{_REMOVING}*")):
        pid, marker = leftover.name.rpartition("-")[2], leftover / MARKER
        if not (pid.isascii() and pid.isdigit() and len(pid) <= 10) or _alive(int(pid)):
            continue
        if leftover.is_symlink() or not leftover.is_dir() or not is_marker(marker):
            continue
        try:
            with interrupts.deferred(), _locked(leftover / LOCK, what=leftover, marked=True):
                _remove_marked(leftover)
        except (RunDirError, OSError):  # another process removes it now, or it is not ours to remove
            continue


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (another user's counts)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def _check_target(target: Path, overwrite: bool, elsewhere: str) -> Path:
    """``target`` if a run may be made there (see :meth:`RunDir.check_new`); nothing is touched.

    Whatever is in the way and is not a run directory fmnist_keras made is
    named as such, with or without ``overwrite``, since --overwrite would not
    remove it either.
    """
    if target.is_symlink():
        raise RunDirError(
            f"{target} is a symbolic link; a run directory must be a real directory. Remove the link or "
            f"choose {elsewhere}."
        )
    if target.exists():
        _check_own(target, elsewhere, contents=overwrite)  # a run in training is listed only when asked to go
        if not overwrite:
            raise RunDirError(f"run directory {target} already exists; choose {elsewhere} or pass --overwrite.")
    return target


def _check_own(target: Path, elsewhere: str, contents: bool = True) -> None:
    """Refuse to replace ``target`` unless it is a directory that fmnist_keras made (its marker) and, with
    ``contents``, that holds nothing but what train writes in a run."""
    if not target.is_dir():
        raise RunDirError(f"{target} exists and is not a directory; --overwrite replaces run directories only. "
                          f"Move it away or choose {elsewhere}.")
    if not is_marker(target / MARKER):
        raise RunDirError(
            f"{target} was not created by fmnist_keras (it has no {MARKER} marker), so --overwrite leaves it "
            f"alone; remove it yourself or choose {elsewhere}."
        )
    foreign = _first_foreign_entry(target) if contents else None
    if foreign is not None:
        raise RunDirError(
            f"{target} holds {foreign}, which is not what train writes in a run (a file of yours, a link, another "
            f"command's output), so --overwrite leaves the run alone; move it out of the run, or choose {elsewhere}."
        )


# What train writes in a run directory, in each model's directory, and below those; a kill can leave
# write_json's temporaries at each level. None of it is ever a link.
_RUN_FILES = (MARKER, LOCK, RUN_FILE)
_MODEL_FILES = (MODEL_FILE, HISTORY_FILE, CONFIG_FILE, FIT_FILE, METRICS_FILE, EVALUATION_FILE, REPORT_FILE)
_MODEL_DIRS = (BACKUP_DIR, TENSORBOARD_DIR, FIGURES_DIR)
_PARTIAL = f"{TEMPORARY_PREFIX}*"
_BELOW_MODEL = {  # directory: (its files, its directories, patterns of its files' names)
    FIGURES_DIR: ((), (), ("*.png",)),  # the report's figures
    BACKUP_DIR: ((BACKUP_WEIGHTS, BACKUP_METADATA, f"{BACKUP_WEIGHTS}.bkp", f"{BACKUP_METADATA}.bkp"), (), ()),
    TENSORBOARD_DIR: ((), TENSORBOARD_SPLITS, ()),
}


def entry_kind(path: Path) -> str | None:
    """``link``, ``file``, ``dir`` or ``other`` for ``path`` itself, links not followed; None once it is gone."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return "link"
    return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "other"


def first_entry_not_among(directory: Path, files=(), directories=(), patterns=()) -> Path | None:
    """The first entry of ``directory`` (by name) that is not one of ``files`` (or a name matching one of
    ``patterns``) as a regular file, nor one of ``directories`` as a directory; a link always is such an entry.

    An entry gone between the listing and its check is skipped (a run still in training renames and removes
    its own files), and so is a ``directory`` that is gone or missing.
    """
    try:
        entries = sorted(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return None
    for entry in entries:
        kind = entry_kind(entry)
        if kind is None:
            continue
        if entry.name in files or any(fnmatch(entry.name, pattern) for pattern in patterns):
            if kind != "file":
                return entry
        elif entry.name not in directories or kind != "dir":
            return entry
    return None


def _first_foreign_entry(run: Path) -> Path | None:
    """The first entry of ``run`` that train does not write there (a link always), or None."""
    found = first_entry_not_among(run, _RUN_FILES, MODEL_NAMES, (_PARTIAL,))
    for model_dir in (run / name for name in MODEL_NAMES):  # each a real directory, or missing, by now
        found = found or first_entry_not_among(model_dir, _MODEL_FILES, _MODEL_DIRS, (_PARTIAL,))
        for name, (files, directories, patterns) in _BELOW_MODEL.items():
            found = found or first_entry_not_among(model_dir / name, files, directories, (*patterns, _PARTIAL))
        for split in TENSORBOARD_SPLITS:  # TensorBoard's logs: its own names, never a link
            found = found or first_link_or_special_below(model_dir / TENSORBOARD_DIR / split)
    return found


#: What a path is that :func:`is_dangling_link` finds, as the rest of a sentence: ``X is DANGLING_LINK``.
DANGLING_LINK = "a symbolic link to nothing (or a loop of links)"


def exists_or_link(path: Path) -> bool:
    """Whether there is anything at ``path``: a link to nothing counts. Unlike ``os.path.lexists``, which
    answers False for any OSError, an overlong name or a parent that may not be searched raises, as
    ``Path.exists()`` does, so that it reaches the commands' one-line file-system error."""
    return path.is_symlink() or path.exists()


def is_dangling_link(path: Path) -> bool:
    """Whether ``path`` is a symbolic link that leads to nothing: a missing target, or a loop of links."""
    return path.is_symlink() and not path.exists()


def not_a_regular_file(path: Path) -> str:
    """What ``path``, which exists (as a link at least) and is no regular file, is, as the rest of a sentence that
    starts with its name."""
    if is_dangling_link(path):
        return f"is {DANGLING_LINK}"
    if path.is_dir():
        return "is a directory"
    return "is not a regular file (a FIFO or a device)"


def in_the_way_of_a_directory(path: Path) -> tuple[Path, str] | None:
    """What keeps ``path`` from being or becoming a directory: the first of it and its parents that exists (or is
    a link) and is no directory, and what that is, ``"a file"`` or :data:`DANGLING_LINK`; None when nothing
    does."""
    blocker = path
    while not exists_or_link(blocker) and blocker != blocker.parent:
        blocker = blocker.parent
    if blocker.is_dir():
        return None
    if is_dangling_link(blocker):
        return blocker, DANGLING_LINK
    return blocker, "a file"


def not_a_directory_line(flag: str, path: Path, fix: str) -> str | None:
    """``FLAG PATH is a file, not a directory; FIX.``, or ``… lies below B, which is …``, for what
    :func:`in_the_way_of_a_directory` finds (a link to nothing asks to fix the link first); None when nothing is
    in the way."""
    found = in_the_way_of_a_directory(path)
    if found is None:
        return None
    blocker, what = found
    where = "is" if blocker == path else f"lies below {blocker}, which is"
    link = "fix the link or " if what == DANGLING_LINK else ""
    return f"{flag} {path} {where} {what}, not a directory; {link}{fix}."


def _check_out_dir(out_dir: str, create: bool = True) -> Path:
    """``out_dir`` as a Path, made (with ``create``) if missing, when it is a directory or can become one."""
    if not str(out_dir).strip():
        raise RunDirError("--out-dir is empty; pass a directory for the runs, e.g. --out-dir runs.")
    out = Path(out_dir)
    problem = not_a_directory_line("--out-dir", out, "choose another --out-dir")
    if problem is not None:
        raise RunDirError(problem)
    if not create:
        return out
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RunDirError(f"cannot create --out-dir {out} ({error.strerror}); choose another --out-dir.") from None
    return out


@contextlib.contextmanager
def _locked(lock_file: Path, what, marked: bool = False):
    """An exclusive, non-blocking ``flock`` on ``lock_file``; the kernel frees it when the holder dies.

    The lock file is opened without following a symbolic link and must be a
    regular file, so a planted link can never make the lock write elsewhere.
    With ``marked`` (a run about to be removed, which may have been swapped
    for a link or a user's directory since it was checked), its directory is
    opened without following a link, and must still hold the run's marker (a
    regular file), checked through that open directory before the lock file is
    made there. ``runs/latest``, a link to a run, is the path that ``--resume``
    locks through.
    """
    lock_file = Path(lock_file)
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        if not marked:
            fd = os.open(lock_file, flags, 0o644)
        else:
            directory = os.open(lock_file.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                if not _is_marker_in(directory):
                    raise RunDirError(f"{lock_file.parent} no longer holds its {MARKER} marker, so it is left alone; "
                                      f"check what replaced it, or choose another name.")
                fd = os.open(lock_file.name, flags, 0o644, dir_fd=directory)
            finally:
                os.close(directory)
    except OSError as error:
        if marked and lock_file.parent.is_symlink():
            raise RunDirError(f"{lock_file.parent} became a symbolic link, so it is left alone; remove the link or "
                              f"choose another name.") from None
        why = "it is a symbolic link" if lock_file.is_symlink() else error.strerror
        raise RunDirError(f"cannot open the lock {lock_file} ({why}); remove it if nothing trains in {what}.") from None
    with os.fdopen(fd, "r+") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise RunDirError(f"the lock {lock_file} is not a regular file; remove it if nothing trains in {what}.")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = " ".join(handle.read(200).split()) or "another process"
            raise RunDirError(
                f"{what} is in use by {holder}; wait for it to finish or stop it, then try again."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)

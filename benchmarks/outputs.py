"""Where the benchmarks write: ``--json`` files and logs, checked before any work and never through a link.

``--json PATH`` is checked when the arguments are parsed, so a bad path is
one argparse line before minutes of benchmarking, not a traceback after
them. It may name a new file, or an earlier result of a benchmark (a JSON
object stamped ``"written_by": "fmnist_keras benchmarks"``, which is
replaced); a link, a directory, any other file, JSON included, or a path
below a file is refused. Results are written to a
temporary sibling and renamed over ``PATH``. Importing this does not import
Keras.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shlex
import tempfile
from pathlib import Path

import early_signals  # benchmarks/ is on sys.path when a script there runs
from fmnist_keras.cli import one_line
from fmnist_keras.rundir import replacing, temporary_prefix, write_text

# An earlier result is small; a larger file is not read to find out whether it is one.
MAX_RESULT_BYTES = 64 * 1024**2
# What every result says of itself, so that --json replaces only what a benchmark wrote.
STAMP = {"written_by": "fmnist_keras benchmarks"}


def versions() -> dict[str, str | None]:
    """The installed keras, torch and jax, as their packages name them (None where absent): the JSON records them."""
    found = {}
    for name in ("keras", "keras-nightly", "torch", "jax"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def json_path(text: str) -> Path:
    """An argparse type for ``--json PATH``: a path the benchmark may write its results to."""
    try:
        return _checked_json_path(text)
    except argparse.ArgumentTypeError as error:
        raise argparse.ArgumentTypeError(one_line(error)) from None


def _checked_json_path(text: str) -> Path:
    path = Path(text)
    if not text.strip() or path.name in ("", ".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file name; pass a file such as results.json")
    if path.is_symlink():
        raise argparse.ArgumentTypeError(f"{path} is a symbolic link; results are never written through one; "
                                         f"pass another file")
    if path.exists():
        if not path.is_file():
            raise argparse.ArgumentTypeError(f"{path} exists and is not a regular file; pass another file")
        if not _is_earlier_result(path):
            raise argparse.ArgumentTypeError(f"{path} exists and is not a benchmark's earlier result (no "
                                             f"{json.dumps(STAMP)}), so it is left alone; pass another file")
    elif not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{path.parent} is not a directory; pass a file in an existing directory")
    try:  # the result is renamed into place at the end: a directory that takes no new file (or no name as long
        # as the temporary one write_json makes) fails now, not then
        handle, probe = tempfile.mkstemp(dir=path.parent, prefix=temporary_prefix(path.name))
        os.close(handle)
        os.unlink(probe)  # the file just made, under a name no one else had
    except OSError as error:
        raise argparse.ArgumentTypeError(f"{path.parent} takes no new file named like {path.name} "
                                         f"({error.strerror or error}); pass a shorter name, or a file in a "
                                         f"directory you may write") from None
    return path


def _is_earlier_result(path: Path) -> bool:
    try:
        if path.stat().st_size > MAX_RESULT_BYTES:
            return False
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return False
    return isinstance(data, dict) and all(data.get(key) == value for key, value in STAMP.items())


class ResultTaken(Exception):
    """The path for the results holds, by the time they are written, a file that no benchmark wrote."""


def write_json(path: Path, data: dict) -> None:
    """Write the object ``data``, stamped, as JSON to a new temporary sibling of ``path``, then rename it over ``path``.

    Only an earlier result is replaced (:func:`json_path` checked ``path`` when the arguments were parsed): a file
    that appeared there since, during the run, is left alone, and :class:`ResultTaken` names it.
    """
    path = Path(path)
    text = json.dumps({**data, **STAMP}, indent=2) + "\n"
    taken = ResultTaken(f"{path} appeared while the benchmark ran and is not a benchmark's earlier result, so it is "
                        f"left alone and the results are not written there; the table above has them. Move it away "
                        f"and run the benchmark again, or pass another --json")
    earlier = os.path.lexists(path)
    if earlier and (path.is_symlink() or not path.is_file() or not _is_earlier_result(path)):
        raise taken
    try:
        write_text(path, text, new_only=not earlier)  # the project's atomic writer (rundir)
    except FileExistsError:  # a new path that was taken between the check and the rename
        raise taken from None


# A log's first line: --out-dir's logs are replaced only when they carry it.
LOG_STAMP = "# fmnist_keras benchmarks log"


def check_log(path: Path) -> None:
    """Whether :func:`open_log` may write ``path``: a new file, or a log a benchmark wrote (its first line is
    :data:`LOG_STAMP`).

    Raises:
        OSError: ``path`` is a link, not a regular file, or a file a benchmark did not write.
    """
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise OSError(f"{path} is a symbolic link or not a regular file; a log is written only to a file of its own; "
                      f"move it away")
    if path.exists():
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as handle:
                first = handle.read(len(LOG_STAMP))
        except OSError as error:
            why = error.strerror or error
            raise OSError(f"{path} exists and cannot be read ({why}), so it is not known to be a log a benchmark "
                          f"wrote and is left alone; move it away or choose another --out-dir") from None
        if first != LOG_STAMP.encode():
            raise OSError(f"{path} exists and is not a log a benchmark wrote (its first line is not "
                          f"{LOG_STAMP!r}), so it is left alone; move it away or choose another --out-dir")


def open_log(path: Path, command: list[str]):
    """A new log for ``command`` at ``path``, opened for writing: a stamped first line naming the command, in a
    temporary sibling renamed over ``path`` (which :func:`check_log` must allow), so no file is emptied or written
    through a link.

    Raises:
        OSError: as :func:`check_log`, or the file cannot be made.
    """
    path = Path(path)
    check_log(path)
    log = None
    try:
        with replacing(path) as (handle, _):
            log = os.fdopen(handle, "w")
            log.write(f"{LOG_STAMP}: {shlex.join(command)}\n")
            log.flush()
    except BaseException:
        if log is not None:
            log.close()
        raise
    return log  # still open, for the command's output, under the log's own name


def rounds_note(rounds: int) -> str:
    """How the timed rounds become the number shown: the median of those after the warm-up, or, for one round,
    that round (``runner``'s ``times[1:] or times``)."""
    return "median after 1 warm-up" if rounds > 1 else "the warm-up round itself, start-up costs included"


def repeated_seeds_line(seeds: list[int]) -> str | None:
    """The line refusing ``--seeds`` that names a seed more than once (its one run would count as two seeds that
    agree); None when each seed is given once."""
    if len(set(seeds)) == len(seeds):
        return None
    return f"--seeds {' '.join(map(str, seeds))} names a seed twice; give each once"


def not_a_script(module: str) -> str:
    """The line a module of the benchmarks gives when it is run as a script: what to run instead."""
    return (f"error: benchmarks/{module} is a module the benchmarks import, not a script; run bench.py or overhead.py "
            f"(their --help says how)")


def select_torch(script: str, does: str = "compares Keras with a PyTorch twin") -> None:
    """Select the torch backend before Keras is imported, for a benchmark that works on torch alone (``does``
    says what it does there: by default, compare Keras with a PyTorch twin).

    Raises:
        BackendError: ``$KERAS_BACKEND`` names another backend (one line).
    """
    from fmnist_keras.backend import BackendError, select_backend

    chosen = os.environ.get("KERAS_BACKEND", "").strip()
    if chosen and chosen != "torch":
        raise BackendError(f"{script} {does} on the torch backend, but $KERAS_BACKEND is {chosen[:40]!r}; unset it "
                           f"or set KERAS_BACKEND=torch.")
    select_backend("torch")


def run_benchmark(main, name: str) -> int:
    """Run a benchmark's ``main`` as the project's commands run: through
    :func:`fmnist_keras.interrupts.run_command` (Ctrl-C and SIGTERM, a file-system error: one line), and with
    bad data, a damaged run directory or model file given as their one line, exit code 1."""
    from fmnist_keras.interrupts import run_command

    early_signals.hand_over()

    def reported():  # the imports within, where run_command's handlers turn a Ctrl-C into one line
        from fmnist_keras.backend import BackendError
        from fmnist_keras.cli import print_error
        from fmnist_keras.data import DataError, SplitError
        from fmnist_keras.loading import ModelLoadError
        from fmnist_keras.rundir import RunDirError

        try:
            return main()
        except (DataError, SplitError, RunDirError, ModelLoadError, BackendError, ResultTaken) as error:
            print_error(error)
            return 1

    return run_command(reported, name)

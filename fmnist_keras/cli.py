"""What the commands share: arguments, number types checked at parse time, one-line messages.

Each type raises ``argparse.ArgumentTypeError``, so a bad value is an
argparse error (one line, exit code 2) naming what was given and what was
expected. File names reach messages as the user gave them; :func:`one_line`
escapes what a terminal would not print as itself, so a message stays one
line and prints under any encoding.
"""

from __future__ import annotations

import argparse
import math
import sys


def one_line(text) -> str:
    """``str(text)`` with every character that does not print as itself written as its escape code.

    Line breaks, tabs and other control characters become ``\\n``, ``\\t``,
    ``\\x1b``; bytes of a file name that are not UTF-8 (which Python holds
    as surrogates) become ``\\udcff``. Printable text, accented letters
    included, is kept as it is.
    """
    text = str(text)
    if text.isprintable():
        return text
    return "".join(char if char.isprintable() else ascii(char)[1:-1] for char in text)


def print_error(message) -> None:
    """``error: message`` on stderr, as one line."""
    print(f"error: {one_line(message)}", file=sys.stderr)


def os_error_line(command: str, error: OSError, then: str = "run it again.", in_place: bool = False) -> str:
    """The line for an operating-system error that no narrower check caught: what, the system's reason, a fix.

    ``then`` is what to do once the cause is fixed: a sentence's end, or a command (no full stop after it).
    ``in_place``: the files must stay where they are (a run to resume), so no fix says to choose another place.
    """
    import errno

    reason = error.strerror or str(error) or type(error).__name__
    space = "free some space" if in_place else "free some space or choose another place"
    if error.filename is None and error.errno in (errno.ENOSPC, errno.EDQUOT):  # a full stdout names no file
        space += " (its standard output too, when that goes to a file)"
    denied = "fix its permissions" if in_place else "choose a place you may read and write, or fix its permissions"
    fix = {
        errno.ENAMETOOLONG: "use a shorter name",
        errno.ENOSPC: space,
        errno.EDQUOT: space,
        errno.EACCES: denied,
        errno.EPERM: denied,
        errno.EROFS: "make its file system writable" if in_place else "choose a place on a writable file system",
    }.get(error.errno, "check the path and the files it names")
    what = f"cannot use {error.filename}" if error.filename is not None else "failed"
    return f"{command} {what}: {reason}; {fix}, then {then}"


def escape_unencodable_output() -> None:
    """Make stdout and stderr write what their encoding lacks as escape codes instead of failing.

    A file name with bytes that are not UTF-8 then prints (escaped) rather
    than ending a command that has done its work with a UnicodeEncodeError.
    Streams that cannot be reconfigured (a notebook's) are left as they are.
    """
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="backslashreplace")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` and ``--no-verify``, shared by the commands that read the data set."""
    parser.add_argument("--data-dir", metavar="DIR", type=non_empty_path,
                        help="directory with the four IDX files, .gz or not (default: $FMNIST_DATA_DIR, "
                        "the Keras cache, /usr/share/datasets/fashion-mnist, or a download)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the SHA-256 check of the data files (only for your own IDX data)")


def non_empty_path(text: str) -> str:
    """A path argument that is not empty or blank (an unset shell variable, say)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string (an unset variable?)")
    return text


def _number(text: str, cast, kind: str):
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def in_range(kind: type, low, high, why: str = ""):
    """An argument type for ``kind`` (int or float) values from ``low`` to ``high``, both included.

    ``why`` is said after the range in the error, e.g. ``"there are 10 classes"``.
    """

    def parse(text: str):
        value = _number(text, kind, "a whole number" if kind is int else "a number")
        if not low <= value <= high:
            reason = f" ({why})" if why else ""
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}{reason}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


# What the commands that run a saved model take (fmnist_keras.loading.resolve_model_path).
MODEL_HELP = "a .keras file, a model's run directory (runs/NAME/cnn), or a run directory with one model (runs/latest)"

def add_tta_argument(parser: argparse.ArgumentParser) -> None:
    """``--tta``, shared by the commands that run a saved model."""
    from fmnist_keras.tta import CHOICES

    parser.add_argument("--tta", choices=("run", *CHOICES), default="run",
                        help="test-time augmentation: 'flip' averages each image's probabilities with its mirror "
                        "image's, 'shifts' with its copies shifted by one pixel up, down, left and right, "
                        "'flip-shifts' over all ten, 'none' does not average, 'run' does what the model's run did "
                        "(flip_tta and shift_tta in the config.json next to it; none for a model without one) "
                        "(default: run)")


def add_fast_path_argument(parser: argparse.ArgumentParser) -> None:
    """``--no-fast-path`` of the commands that run a saved model (train has its own, for training too)."""
    parser.add_argument("--no-fast-path", dest="fast_path", action="store_false",
                        help="torch: predict with stock Keras instead of the fast path (the same probabilities, "
                        "more slowly; see docs/speed.md); for comparisons and debugging (default: fast path on)")


def run_tta(choice: str, model_dir):
    """The :class:`fmnist_keras.tta.TTA` that ``--tta choice`` means for the model in ``model_dir``.

    Raises:
        rundir.RunDirError: ``choice`` is ``run`` and the run's config.json is damaged.
    """
    from pathlib import Path

    from fmnist_keras.config import load_config
    from fmnist_keras.rundir import CONFIG_FILE, RunDirError, exists_or_link
    from fmnist_keras.tta import CHOICES, TTA

    if choice != "run":
        return CHOICES[choice]
    path = Path(model_dir) / CONFIG_FILE
    if not exists_or_link(path):  # a FIFO or a dangling link is named by load_config
        return TTA()
    try:
        config = load_config(path)
    except RunDirError as error:
        raise RunDirError(f"{error} (--tta run reads it for the run's test-time augmentation; "
                          f"--tta {', '.join(list(CHOICES)[:-1])} or {list(CHOICES)[-1]} does without it)") from None
    return TTA.of(config)

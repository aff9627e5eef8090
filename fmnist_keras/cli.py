"""Arguments shared by the commands, and number types checked at parse time.

Each raises ``argparse.ArgumentTypeError``, so a bad value is an argparse
error (one line, exit code 2) naming what was given and what was expected.
"""

from __future__ import annotations

import argparse
import math


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--data-dir`` and ``--no-verify``, shared by the commands that read the data set."""
    parser.add_argument("--data-dir", metavar="DIR",
                        help="directory with the four IDX files, .gz or not (default: $FMNIST_DATA_DIR, "
                        "the Keras cache, /usr/share/datasets/fashion-mnist, or a download)")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="skip the SHA-256 check of the data files (only for your own IDX data)")


def _number(text: str, cast, kind: str):
    try:
        value = cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int, "a whole number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int, "a whole number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, "a number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float, "a number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 and finite, got {text}")
    return value


def fraction(text: str) -> float:
    value = _number(text, float, "a number")
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be strictly between 0 and 1, got {text}")
    return value


def int_between(low: int, high: int, why: str = ""):
    """An argument type for whole numbers in ``[low, high]``."""

    def parse(text: str) -> int:
        value = _number(text, int, "a whole number")
        if not low <= value <= high:
            reason = f" ({why})" if why else ""
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}{reason}, got {value}")
        return value

    return parse


def in_range(kind: type, low, high):
    """An argument type for ``kind`` (int or float) values from ``low`` to ``high``, both included."""

    def parse(text: str):
        value = _number(text, kind, "a whole number" if kind is int else "a number")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse

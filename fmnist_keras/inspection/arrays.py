"""Checks of the numpy arrays that the inspection functions and figures take: one line (what, why, how to fix)
as a ValueError, before anything is computed or drawn. numpy only: :mod:`fmnist_keras.inspection.plots` uses
these without Keras."""

from __future__ import annotations

import numpy as np

from fmnist_keras.data import CLASS_NAMES


def check_labels(labels, count: int, what: str = "labels", classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """Refuse anything but one whole-number class from 0 to ``classes`` - 1 per image (``count`` of them);
    return them as an int64 array."""
    given = np.asarray(labels)
    if given.ndim == 2 and given.shape == (count, classes):
        raise ValueError(f"{what} of shape {given.shape} looks one-hot; pass one class index per image: "
                         f"{what}.argmax(axis=1).")
    if given.shape != (count,):
        raise ValueError(f"{what} of shape {given.shape}: expected one label per image, shape ({count},).")
    if not (np.issubdtype(given.dtype, np.integer) or given.dtype == bool):
        raise ValueError(f"{what} of dtype {given.dtype}: expected whole-number class indices from 0 to "
                         f"{classes - 1}; convert whole-valued labels with {what}.astype(int).")
    if count and (given.min() < 0 or given.max() >= classes):
        wrong = int(given.min() if given.min() < 0 else given.max())
        raise ValueError(f"{what} holds the class {wrong}; the classes are 0 to {classes - 1}.")
    return given.astype(np.int64)


def check_shape(array, what: str, expected: tuple, meaning: str, finite: bool = True) -> np.ndarray:
    """``array`` as a float64 array of shape ``expected`` (None: any length along that axis), all finite unless
    ``finite`` is False, else ValueError saying what it should be (``meaning``)."""
    given = np.asarray(array)
    fits = given.ndim == len(expected) and all(want is None or want == have
                                               for want, have in zip(expected, given.shape))
    if not fits or given.dtype.kind in "USOcMmV" and given.dtype.name != "bfloat16":
        if all(want is None for want in expected):
            wanted = f"a {len(expected)}-D array of numbers"
        else:
            axes = [("N" if want is None else str(want)) for want in expected]
            wanted = f"numbers of shape ({', '.join(axes)}{',' if len(axes) == 1 else ''})"
        raise ValueError(f"{what} of shape {given.shape} and dtype {given.dtype}: expected {wanted}, {meaning}.")
    given = given.astype(np.float64)
    if finite and not np.isfinite(given).all():
        raise ValueError(f"{what} hold NaN or infinite values; expected {meaning}, all finite.")
    return given


def check_indices(indices, count: int, what: str = "indices") -> np.ndarray:
    """Whole-number positions in ``count`` items, as an int64 array, else ValueError."""
    given = np.asarray(indices)
    if given.ndim != 1 or not (np.issubdtype(given.dtype, np.integer) or given.size == 0):
        raise ValueError(f"{what} {given.tolist()!r}: expected a list of whole-number positions from 0 to "
                         f"{count - 1}.")
    if given.size and (given.min() < -count or given.max() >= count):
        wrong = int(given.min() if given.min() < -count else given.max())
        raise ValueError(f"{what} hold {wrong}, out of range for {count} images; choose 0 to {count - 1}.")
    return given.astype(np.int64) % max(count, 1)

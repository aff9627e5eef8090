"""Checks of the numpy arrays that the inspection functions and figures take: one line (what, why, how to fix)
as a ValueError, before anything is computed or drawn. numpy only: :mod:`fmnist_keras.inspection.plots` uses
these without Keras."""

from __future__ import annotations

import operator

import numpy as np

from fmnist_keras.data import CLASS_NAMES

# dtype kinds that are no numbers: strings, bytes, objects, complex, dates, durations, raw bytes (ml_dtypes'
# bfloat16 is of kind "V" too, and is let through by name).
_NOT_NUMBERS = "USOcMmV"


def as_array(value, what: str) -> np.ndarray:
    """``value`` as a numpy array, else ValueError: a tensor that needs detaching, or a ragged list."""
    try:
        return np.asarray(value)
    except (RuntimeError, TypeError) as error:  # torch: "Can't call numpy() on Tensor that requires grad", a GPU's
        raise ValueError(f"{what} cannot be read as a numpy array ({str(error).splitlines()[0][:120]}); pass a numpy "
                         f"array (from a tensor: tensor.detach().cpu().numpy()).") from None
    except ValueError:  # numpy: "setting an array element with a sequence ... inhomogeneous shape"
        raise ValueError(f"{what} is ragged (its items differ in shape); pass one array with one item per "
                         f"image.") from None


def is_numbers(dtype: np.dtype) -> bool:
    """Whether arrays of ``dtype`` hold numbers (bool and bfloat16 included)."""
    return dtype.kind not in _NOT_NUMBERS or dtype.name == "bfloat16"


def check_labels(labels, count: int, what: str = "labels", classes: int = len(CLASS_NAMES)) -> np.ndarray:
    """Refuse anything but one whole-number class from 0 to ``classes`` - 1 per image (``count`` of them; whole
    floats such as 3.0 count); return them as an int64 array."""
    given = as_array(labels, what)
    if given.ndim == 2 and given.shape == (count, classes):
        raise ValueError(f"{what} of shape {given.shape} looks one-hot; pass one class index per image: "
                         f"{what}.argmax(axis=1).")
    if given.shape != (count,):
        raise ValueError(f"{what} of shape {given.shape}: expected one label per image, shape ({count},); pass one "
                         f"class index per image, in the images' order.")
    if not is_numbers(given.dtype):
        raise ValueError(f"{what} of dtype {given.dtype}: expected class indices from 0 to {classes - 1}; map class "
                         f"names to indices with fmnist_keras.data.CLASS_NAMES.index(name).")
    if count and not np.issubdtype(given.dtype, np.integer) and given.dtype != bool:
        values = given.astype(np.float64)
        odd = values[~np.isfinite(values) | (values != np.round(values))]
        if odd.size:
            raise ValueError(f"{float(odd[0])!r} in {what} is not a whole-number class index; pass class indices "
                             f"from 0 to {classes - 1}.")
    if count and (given.min() < 0 or given.max() >= classes):
        wrong = given.min() if given.min() < 0 else given.max()
        raise ValueError(f"the class {int(wrong)} in {what} is not one of the classes 0 to {classes - 1}; pass class "
                         f"indices in that range.")
    return given.astype(np.int64)


def check_shape(array, what: str, expected: tuple, meaning: str, finite: bool = True) -> np.ndarray:
    """``array`` as a float64 array of shape ``expected`` (None: any length along that axis), all finite unless
    ``finite`` is False, else ValueError saying what it should be (``meaning``)."""
    given = as_array(array, what)
    fits = given.ndim == len(expected) and all(want is None or want == have
                                               for want, have in zip(expected, given.shape))
    if not fits or not is_numbers(given.dtype):
        if all(want is None for want in expected):
            wanted = f"a {len(expected)}-D array of numbers"
        else:
            axes = [("N" if want is None else str(want)) for want in expected]
            wanted = f"numbers of shape ({', '.join(axes)}{',' if len(axes) == 1 else ''})"
        raise ValueError(f"{what} of shape {given.shape} and dtype {given.dtype}: expected {wanted}, {meaning}.")
    given = given.astype(np.float64)
    if finite and not np.isfinite(given).all():
        raise ValueError(f"there are NaN or infinite values in {what}; expected {meaning}, all finite.")
    return given


def check_indices(indices, count: int, what: str = "indices") -> np.ndarray:
    """Whole-number positions in ``count`` items (negative ones count from the end), as an int64 array, else
    ValueError."""
    given = as_array(indices, what)
    if given.dtype == bool:
        raise ValueError(f"{what} of dtype bool (a mask, shape {given.shape}): pass the positions it marks, "
                         f"np.flatnonzero(mask).")
    if given.ndim != 1 or not (np.issubdtype(given.dtype, np.integer) or given.size == 0):
        raise ValueError(f"{what} of shape {given.shape} and dtype {given.dtype}: expected a list of whole-number "
                         f"positions from 0 to {count - 1}.")
    if given.size and (given.min() < -count or given.max() >= count):
        wrong = int(given.min() if given.min() < -count else given.max())
        raise ValueError(f"{wrong} in {what} is out of range for {count} images; choose 0 to {count - 1}.")
    return given.astype(np.int64) % max(count, 1)


def check_index(index, count: int, what: str = "image index", of: str = "images") -> int:
    """One whole-number position in ``count`` items (``of``; a negative one counts from the end), else
    ValueError."""
    try:
        if isinstance(index, (bool, np.bool_)):
            raise TypeError
        position = operator.index(index)  # ints, numpy integers, 0-d integer arrays and tensors
    except TypeError:
        raise ValueError(f"{what} {index!r}: expected one whole number, from 0 to {count - 1}.") from None
    if not -count <= position < count:
        raise ValueError(f"{what} {position} is out of range for {count} {of}; choose 0 to {count - 1}.")
    return position % count


def check_count(value, what: str, least: int = 0) -> int:
    """A whole number from ``least`` (a seed, a limit), else ValueError."""
    try:
        if isinstance(value, (bool, np.bool_)):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or number < least:
        raise ValueError(f"{what} {value!r}: expected a whole number from {least}.")
    return number


def is_pixels(dtype: np.dtype) -> bool:
    """Whether images of ``dtype`` are 0-255 pixels to be scaled (integers) rather than floats in [0, 1]."""
    return dtype.kind in "iu"

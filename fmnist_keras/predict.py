"""Classify your own images (PNG, JPEG, ...) or .npy arrays with a trained model.

Usage:
    python -m fmnist_keras.predict RUN_DIR_OR_MODEL IMAGE [IMAGE ...] [--json] [--top-k 3]

Pictures are turned into 28x28 grayscale the way Fashion-MNIST was made
(Xiao et al., 2017): trim the background, resize the longest edge to 28,
centre on a square, and make the object light on a dark background. Photos
of a dark object on a light background (most product photos) are inverted;
``--invert auto`` decides from the border. ``.npy`` files hold arrays of
shape (28, 28), (N, 28, 28) or (N, 28, 28, 1), uint8 0-255 or float 0-1,
read with ``allow_pickle=False`` after their header is checked against the
file size. Pictures of more than 8 bits (16-bit PNG, 32-bit or float TIFF)
are scaled by their real depth; float pictures are taken as 0-1 when their
largest value is at most 1, else as 0-255.

A bad file gets one line on stderr naming it and the problem; the others are
still classified, and the exit code is 1 if anything failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import stat
import sys
import warnings
from pathlib import Path

import numpy as np

from fmnist_keras.allocator import keep_freed_memory
from fmnist_keras.backend import add_backend_arguments
from fmnist_keras.cli import (MODEL_HELP, add_fast_path_argument, add_tta_argument, escape_unencodable_output,
                              in_range, one_line, print_error, run_tta)
from fmnist_keras.rundir import DANGLING_LINK, is_dangling_link

SIZE = 28
INVERT_CHOICES = ("auto", "yes", "no")
# Border brighter than this (0-255) means a light background: invert.
LIGHT_BACKGROUND = 128
# Pixels closer than this to the background level count as background when trimming.
TRIM_TOLERANCE = 24
# A .npy larger than this is refused before it is read: 1 GiB holds 1.3
# million uint8 images, far more than one call should classify.
MAX_NPY_BYTES = 1024**3
# The longest edge a picture is read at. The model sees 28 pixels; the full-size arrays of a 90-megapixel
# picture would take gigabytes, so a larger picture is first reduced by a whole factor (box filter).
MAX_EDGE = 2048
# The picture formats Pillow may open, chosen by content whatever the file's name. Not EPS or PDF, which
# Pillow hands to Ghostscript, an interpreter of its own; nor the rarer formats, fewer decoders to trust.
PICTURE_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
_ZIP_MAGIC = b"PK\x03\x04"


class InputError(ValueError):
    """An input file cannot be read as an image or an array of images."""


# ---- pure image preparation -------------------------------------------------


def border_level(gray: np.ndarray) -> float:
    """Median brightness of the outermost ring of pixels: the background level."""
    ring = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    return float(np.median(ring))


def needs_inversion(gray: np.ndarray, invert: str = "auto") -> bool:
    """Whether ``gray`` (uint8, HxW) must be negated to show a light object on dark."""
    if invert not in INVERT_CHOICES:
        raise ValueError(f"invert must be one of {INVERT_CHOICES}, got {invert!r}.")
    if invert != "auto":
        return invert == "yes"
    return border_level(gray) >= LIGHT_BACKGROUND


def _flatten_alpha(image):
    """Put transparent pixels on white, the background product photos have."""
    from PIL import Image

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image


def _reduced(image):
    """``image`` with its longest edge at most :data:`MAX_EDGE`, reduced by a whole factor (box filter).

    Pillow reduces neither palette nor 1-bit nor 16-bit pictures: they become RGB(A), 8-bit and 32-bit
    integer pictures first, which read the same (:func:`gray_pixels` scales 32-bit by 65535 up to 65535).
    """
    factor = math.ceil(max(image.size) / MAX_EDGE)
    if factor <= 1:
        return image
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA" if image.mode == "PA" or "transparency" in image.info else "RGB")
    elif image.mode == "1":
        image = image.convert("L")
    elif image.mode.startswith("I;16"):
        image = image.convert("I")
    return image.reduce(factor)


def gray_pixels(image, name: str = "image") -> np.ndarray:
    """A Pillow image as uint8 (H, W) grayscale, scaled by its real bit depth.

    Pillow's ``convert("L")`` clips 16- and 32-bit pixels at 255 and floats
    at 1 instead of scaling them, so those modes are scaled here: ``I;16*``
    by 65535, ``I`` by 65535 (or 2**31 - 1 when a value exceeds 65535), and
    ``F`` as 0-1 when its largest value is at most 1, else as 0-255.

    Raises:
        InputError: a float picture with NaN, infinite, negative or > 255 values,
            or a negative integer picture.
    """
    mode = image.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return np.asarray(_flatten_alpha(image).convert("L"), dtype=np.uint8)
    values = np.asarray(image).astype(np.float32)  # 8 bits are kept: float32 holds 24
    if values.size == 0:
        raise InputError(f"{name}: the picture has no pixels.")
    if not np.all(np.isfinite(values)):
        raise InputError(f"{name}: a float picture holding NaN or infinite pixels; expected finite values.")
    low, high = float(values.min()), float(values.max())
    if low < 0:
        raise InputError(f"{name}: a mode {mode} picture with negative pixels (down to {low:g}); expected 0 or more.")
    if mode == "F":
        if high > 255:
            raise InputError(f"{name}: a float picture with pixels up to {high:g}; expected 0-1 or 0-255.")
        scale = 255.0 if high <= 1.0 else 1.0
    elif mode == "I" and high > 65535:
        scale = 255.0 / (2**31 - 1)
    else:
        scale = 255.0 / 65535
    values *= scale  # in place: one picture-sized float array in all
    return np.clip(np.rint(values, out=values), 0, 255, out=values).astype(np.uint8)


def fit_to_square(gray: np.ndarray) -> np.ndarray:
    """Trim the dark background, resize the longest edge to 28 and centre: uint8 (28, 28).

    ``gray`` must already be light-on-dark. The background level (from the
    border) is mapped to 0, as in Fashion-MNIST.
    """
    from PIL import Image

    background = border_level(gray)
    level = gray.astype(np.float32) - background
    rows = np.flatnonzero((level > TRIM_TOLERANCE).any(axis=1))
    cols = np.flatnonzero((level > TRIM_TOLERANCE).any(axis=0))
    if rows.size and cols.size:  # a blank image is kept whole
        level = level[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    scaled = np.clip(level * (255.0 / max(1.0, 255.0 - background)), 0, 255).astype(np.uint8)
    height, width = scaled.shape
    scale = SIZE / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = np.asarray(Image.fromarray(scaled).resize(new_size, Image.Resampling.LANCZOS))
    canvas = np.zeros((SIZE, SIZE), dtype=np.uint8)
    top, left = (SIZE - new_size[1]) // 2, (SIZE - new_size[0]) // 2
    canvas[top: top + new_size[1], left: left + new_size[0]] = resized
    return canvas


def prepare_image(image, invert: str = "auto", name: str = "image") -> tuple[np.ndarray, bool]:
    """Turn a Pillow image of any size and mode into a Fashion-MNIST-style image.

    Args:
        image: a ``PIL.Image.Image`` (any mode; EXIF rotation is applied).
        invert: ``auto`` (invert when the border is light), ``yes`` or ``no``.
        name: the file name, for error messages.

    Returns:
        ``(array, inverted)``: a uint8 (28, 28) array, light object on dark,
        and whether it was inverted. An image that is already 28x28 is only
        inverted if needed, not trimmed or resized: it is taken to be in the
        data set's format.
    """
    from PIL import ImageOps

    image = _reduced(ImageOps.exif_transpose(image))
    gray = gray_pixels(image, name)
    inverted = needs_inversion(gray, invert)
    if inverted:
        gray = 255 - gray
    if gray.shape == (SIZE, SIZE):
        return gray.copy(), inverted
    return fit_to_square(gray), inverted


def array_to_images(array: np.ndarray, name: str = "array") -> np.ndarray:
    """Check a loaded array and return uint8 images of shape (N, 28, 28).

    Accepts shapes (28, 28), (N, 28, 28) and (N, 28, 28, 1); dtype uint8
    (0-255) or float (0-1, scaled and rounded).
    """
    if array.ndim == 2:
        array = array[None]
    elif array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3 or array.shape[1:] != (SIZE, SIZE) or array.shape[0] == 0:
        raise InputError(
            f"{name}: array of shape {array.shape}; expected (28, 28), (N, 28, 28) or (N, 28, 28, 1) with N >= 1."
        )
    if array.dtype == np.uint8:
        return array.copy()
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.isfinite(array)):
            raise InputError(f"{name}: array holds NaN or infinite values; expected floats in [0, 1].")
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise InputError(
                f"{name}: float array with values in [{low:g}, {high:g}]; expected [0, 1] "
                f"(or save it as uint8 0-255: array.astype(np.uint8))."
            )
        return np.rint(array * 255.0).astype(np.uint8)
    raise InputError(f"{name}: array of dtype {array.dtype}; expected uint8 (0-255) or float (0-1).")


def read_npy(path: Path, size: int) -> np.ndarray:
    """Load one plain .npy array, its header checked against ``size`` (bytes) before anything is allocated.

    Raises:
        InputError: pickled or structured data, a header that claims more
            than the file holds or more than :data:`MAX_NPY_BYTES`, a .npz.
    """
    fmt = np.lib.format
    try:
        with open(path, "rb") as handle:
            if handle.read(4) == _ZIP_MAGIC:
                raise InputError(f"{path}: holds several arrays (.npz); expected one array in a .npy file.")
            handle.seek(0)
            version = fmt.read_magic(handle)
            if version == (1, 0):
                shape, fortran_order, dtype = fmt.read_array_header_1_0(handle)
            elif version == (2, 0):
                shape, fortran_order, dtype = fmt.read_array_header_2_0(handle)
            else:
                raise ValueError(f"format version {version[0]}.{version[1]}; expected 1.0 or 2.0")
            offset = handle.tell()
    except InputError:
        raise
    except ValueError as error:  # bad magic or header
        raise InputError(f"{path}: not a plain .npy array ({' '.join(str(error).split())}).") from None
    except OSError as error:
        raise InputError(f"{path}: cannot read it as .npy ({error}).") from None
    if dtype.hasobject:
        raise InputError(f"{path}: not a plain .npy array (Object arrays cannot be loaded when allow_pickle=False).")
    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if claimed > MAX_NPY_BYTES:
        raise InputError(
            f"{path}: its header claims an array of shape {shape} ({claimed} bytes), over the {MAX_NPY_BYTES} "
            f"bytes this command reads; split it into smaller files."
        )
    if claimed > size - offset:
        raise InputError(
            f"{path}: its header claims an array of shape {shape} ({claimed} bytes), but the file holds "
            f"{size - offset} bytes of data; it is truncated or damaged."
        )
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as error:
        raise InputError(f"{path}: not a plain .npy array ({' '.join(str(error).split())}).") from None
    except (OSError, EOFError) as error:
        raise InputError(f"{path}: cannot read it as .npy ({error}).") from None


def check_probabilities(probabilities: np.ndarray, model: str, names: list[str]) -> None:
    """Refuse model outputs that are not finite: they are no probabilities.

    Raises:
        InputError: naming the model and the first affected inputs.
    """
    bad = np.flatnonzero(~np.isfinite(probabilities).all(axis=1))
    if bad.size:
        shown = ", ".join(names[i] for i in bad[:3]) + (", ..." if bad.size > 3 else "")
        raise InputError(
            f"{model} gave NaN or infinite outputs for {bad.size} of {len(names)} images ({shown}); the model is "
            f"damaged (NaN weights?); retrain it or use another model."
        )


def top_k(probabilities: np.ndarray, k: int, class_names) -> list[dict]:
    """The ``k`` most likely classes of one probability vector, most likely first."""
    order = np.argsort(-probabilities, kind="stable")[:k]
    return [{"class": class_names[i], "index": int(i), "probability": float(probabilities[i])} for i in order]


# ---- I/O --------------------------------------------------------------------


@dataclasses.dataclass
class Item:
    """One image to classify: where it came from and the prepared pixels."""

    file: str
    index: int | None  # position inside a .npy file, None for a picture
    pixels: np.ndarray  # uint8 (28, 28)
    inverted: bool = False


def read_input(path: str | Path, invert: str = "auto") -> list[Item]:
    """Read one picture or .npy file into prepared items.

    Raises:
        InputError: with a one-line reason naming the file.
    """
    if str(path) == "":  # Path("") is ".", the current directory
        raise InputError(f"{str(path)!r}: an empty file name (an unset variable?); expected an image file (PNG, "
                         f"JPEG, ...) or a .npy file.")
    path = Path(path)
    if is_dangling_link(path):
        raise InputError(f"{path}: {DANGLING_LINK}; fix the link.")
    if not path.exists():
        raise InputError(f"{path}: no such file.")
    if path.is_dir():
        raise InputError(f"{path}: is a directory; expected an image file (PNG, JPEG, ...) or a .npy file.")
    try:
        status = path.stat()
    except OSError as error:
        raise InputError(f"{path}: cannot read it ({error.strerror}).") from None
    if not stat.S_ISREG(status.st_mode):  # a FIFO would block the read, /dev/zero never end
        raise InputError(f"{path}: not a regular file (a FIFO or a device); expected an image file (PNG, JPEG, "
                         f"...) or a .npy file.")
    size = status.st_size
    if size == 0:
        if _reads_anything(path):  # /proc and /sys report 0 bytes for files they make up as they are read
            raise InputError(f"{path}: a file whose size the system does not report (as under /proc or /sys); "
                             f"copy it to a regular file first.")
        raise InputError(f"{path}: is empty (0 bytes).")
    if path.suffix.lower() == ".npy":
        array = read_npy(path, size)
        images = array_to_images(array, str(path))
        return [Item(str(path), i, image) for i, image in enumerate(images)]
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings(), _pillow_logs_off():
            warnings.simplefilter("ignore")  # a damaged tag's warning: the picture fails or is read, in one line
            # Pillow only warns between 89 and 179 Mpixels; no garment photo needs that many.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=PICTURE_FORMATS) as image:
                image.load()  # decode now: truncated files fail here, not later
                try:
                    pixels, inverted = prepare_image(image, invert, str(path))
                except InputError:
                    raise
                except (OSError, ValueError) as error:
                    raise InputError(f"{path}: a picture in colour mode {image.mode}, which cannot be turned into "
                                     f"grayscale here ({' '.join(str(error).split())}); save it as RGB or "
                                     f"grayscale.") from None
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{path}: not an image predict reads (PNG, JPEG, GIF, BMP, TIFF, WebP, PPM/PGM, or a .npy "
                         f"array); convert it to PNG.") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputError(f"{path}: refused, {error}") from None
    except MemoryError:
        raise
    except Exception as error:  # truncated or damaged data; a decoder's own error type (RuntimeError, ...)
        raise InputError(f"{path}: damaged or truncated image ({' '.join(str(error).split())}).") from None
    return [Item(str(path), None, pixels, inverted)]


def _reads_anything(path: Path) -> bool:
    """Whether ``path``, a regular file that reports 0 bytes, gives a byte when read."""
    try:
        with open(path, "rb") as file:
            return file.read(1) != b""
    except OSError:
        return False


@contextlib.contextmanager
def _pillow_logs_off():
    """Pillow's own log lines (``More samples per pixel than can be decoded``) off: a picture that fails is
    one line of predict's."""
    logger = logging.getLogger("PIL")  # its plugins' loggers (PIL.TiffImagePlugin) inherit its level
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fmnist_keras.predict",
        description="Classify pictures (PNG, JPEG, ...) or .npy arrays of 28x28 images with a trained model.",
        epilog="example:\n  python -m fmnist_keras.predict runs/latest/cnn shoe.jpg shirt.png batch.npy --top-k 3",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", metavar="RUN_DIR_OR_MODEL", help=MODEL_HELP)
    parser.add_argument("images", metavar="IMAGE", nargs="+", help="picture files or .npy arrays to classify")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text (default: text)")
    parser.add_argument("--invert", choices=INVERT_CHOICES, default="auto",
                        help="make dark-on-light pictures light-on-dark: auto decides from the border (default: auto)")
    parser.add_argument("--top-k", type=in_range(int, 1, 10, "there are 10 classes"), default=3, metavar="K",
                        help="how many classes to show per image (default: 3)")
    add_tta_argument(parser)
    add_fast_path_argument(parser)
    add_backend_arguments(parser)
    return parser


def _item_name(item: Item) -> str:
    return item.file if item.index is None else f"{item.file}[{item.index}]"


def main(argv: list[str] | None = None) -> int:
    escape_unencodable_output()
    parser = build_parser()
    args = parser.parse_args(argv)
    keep_freed_memory()

    from fmnist_keras.backend import select_backend_or_exit

    select_backend_or_exit(parser, args.backend, args.device)

    from fmnist_keras.data import CLASS_NAMES, to_model_input
    from fmnist_keras.engine.evaluation import predict_probabilities
    from fmnist_keras.loading import (ModelLoadError, exit_code, input_data_format, load_model, model_home,
                                      resolve_model_path)
    from fmnist_keras.rundir import RunDirError

    errors, items = [], []
    for path in args.images:
        try:
            items.extend(read_input(path, args.invert))
        except InputError as error:
            errors.append({"file": path, "error": str(error)})
            print_error(error)
    try:
        model_path = resolve_model_path(args.model, announce=lambda note: print(note, file=sys.stderr))
        tta = run_tta(args.tta, model_home(model_path))
        model = load_model(model_path)
    except ModelLoadError as error:
        print_error(error)
        return exit_code(error)
    except RunDirError as error:
        print_error(error)
        return 1

    results = []
    if items:
        x = to_model_input(np.stack([item.pixels for item in items]), input_data_format(model))
        probabilities = predict_probabilities(model, x, tta, fast_path=args.fast_path)
        try:
            check_probabilities(probabilities, args.model, [_item_name(item) for item in items])
        except InputError as error:
            print_error(error)
            return 1
        for item, row in zip(items, probabilities):
            results.append({"file": item.file, "index": item.index, "inverted": item.inverted,
                            "top": top_k(row, args.top_k, CLASS_NAMES)})
    if args.json:
        # allow_nan=False: the output is strict JSON that every parser reads.
        print(json.dumps({"model": str(args.model), "test_time_augmentation": tta.name,
                          "predictions": results, "errors": errors}, indent=2, allow_nan=False))
    else:
        for item, result in zip(items, results):
            ranked = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in result["top"])
            print(f"{one_line(_item_name(item))}: {ranked}{'  (inverted)' if item.inverted else ''}")
    return 1 if errors else 0


if __name__ == "__main__":
    from fmnist_keras.interrupts import run_command

    sys.exit(run_command(main, "predict"))

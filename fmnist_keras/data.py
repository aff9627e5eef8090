"""Find, verify and parse the Fashion-MNIST IDX files; split and scale them.

This is the only module that reads data from disk or the network. It needs
numpy and the standard library only, so it can be imported before a Keras
backend is chosen. Downloads come over HTTPS from the official mirror only,
are checked against the digests before they are saved, and a cached file
that fails its check is deleted. Files are decompressed as a stream that
stops at the size the IDX header declares; that size may be at most the
real file's when the digest is checked, and :data:`MAX_IDX_DATA_BYTES`
(1 GiB) for your own data (``verify=False``). Empty sets are refused.

Example:
    >>> (x_train, y_train), (x_test, y_test) = load_data()
    >>> x_train.shape, x_train.dtype
    ((60000, 28, 28), dtype('uint8'))
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import urllib.parse
import urllib.request
import zlib
from pathlib import Path

import numpy as np

from fmnist_keras.rundir import exists_or_link, replacing

CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
IMAGE_SIZE = 28

# SHA-256 of the *decompressed* IDX bytes. Debian recompresses the .gz files,
# so digests of the .gz files differ between sources while the data does not.
SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
FILES = tuple(SHA256)
# Same mirror keras.datasets.fashion_mnist downloads from.
MIRROR = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/"
# The largest file (train images) is 26 MB compressed; anything much bigger is not it.
MAX_DOWNLOAD_BYTES = 64 * 1024**2
# Decompressed size of each real file: 16- or 8-byte header, then one byte per pixel or label.
FILE_BYTES = {
    "train-images-idx3-ubyte": 16 + 60000 * 28 * 28,
    "train-labels-idx1-ubyte": 8 + 60000,
    "t10k-images-idx3-ubyte": 16 + 10000 * 28 * 28,
    "t10k-labels-idx1-ubyte": 8 + 10000,
}
# Your own data (--no-verify) may be larger than Fashion-MNIST, up to this
# many bytes of pixels or labels per file (1.4 million images): the header's
# declared size is checked against it before anything is decompressed, so a
# small .gz that inflates to gigabytes is refused without being unpacked.
MAX_IDX_DATA_BYTES = 1024**3
DOWNLOAD_TIMEOUT_S = 60
SYSTEM_DIRS = ("/usr/share/datasets/fashion-mnist",)
ENV_VAR = "FMNIST_DATA_DIR"
INSTALL_HINT = (
    "install Debian's data package (apt-get install dataset-fashion-mnist), "
    f"set {ENV_VAR} or pass --data-dir to a directory holding the four IDX files"
)

# IDX magic: two zero bytes, a type code (0x08 = unsigned byte) and the
# number of dimensions.
_UBYTE = 0x08
_EXPECTED_NDIM = {"images": 3, "labels": 1}


class DataError(ValueError):
    """A data file is missing, damaged or not the file it claims to be."""


class SplitError(ValueError):
    """The data cannot be split as asked: a class would get no example, or all of them, on one side."""


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the data was found: a kind (``data-dir``, ``keras-cache``,
    ``system``, ``download``) and the directory."""

    kind: str
    directory: Path

    def __str__(self) -> str:
        return f"{self.kind} ({self.directory})"


def keras_cache_dir() -> Path:
    """The directory ``keras.datasets.fashion_mnist`` downloads into."""
    keras_home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(keras_home) / "datasets" / "fashion-mnist"


def _names_in(directory: Path, name: str) -> tuple[Path, Path]:
    """Where a data file ``name`` may lie in ``directory``, in the order it is looked for: gzipped, then not."""
    return directory / f"{name}.gz", directory / name


def _file_in(directory: Path, name: str) -> Path | None:
    for candidate in _names_in(directory, name):
        if candidate.is_file():
            return candidate
    return None


NOT_A_FILE = "is not a regular file (a FIFO, a device, a directory or a symbolic link to nothing)"


def _not_a_file_in(directory: Path, name: str) -> Path | None:
    """The entry named ``name`` (.gz or not) in ``directory`` that is there but is not a file to read."""
    return next((c for c in _names_in(directory, name) if exists_or_link(c) and not c.is_file()), None)


def _has_all_files(directory: Path) -> bool:
    return all(_file_in(directory, name) is not None for name in FILES)


def find_source(data_dir: str | os.PathLike | None = None) -> Source | None:
    """Return the first place that holds all four files, or None.

    Order: ``data_dir`` (or ``$FMNIST_DATA_DIR``), the Keras cache, then the
    system data directories. A ``data_dir`` given explicitly must hold the
    files: a typo there is an error, not a reason to look elsewhere.
    """
    explicit = data_dir if data_dir is not None else os.environ.get(ENV_VAR) or None
    if explicit is not None:
        directory = Path(os.path.expanduser(explicit))  # "~nobody" stays as it is (Path.expanduser raises)
        origin = "--data-dir" if data_dir is not None else f"${ENV_VAR}"
        if not directory.is_dir():
            raise DataError(
                f"{origin} points to {directory}, which is not a directory; "
                f"expected a directory holding {', '.join(FILES)} (.gz or not)."
            )
        missing = [n for n in FILES if _file_in(directory, n) is None]
        odd = next(filter(None, (_not_a_file_in(directory, n) for n in missing)), None)
        if odd is not None:
            raise DataError(f"{origin} {directory}: {odd.name} {NOT_A_FILE}; put the real file there or unset it "
                            f"to use the default locations.")
        if missing:
            raise DataError(
                f"{origin} {directory} lacks {', '.join(missing)} (.gz or not); "
                f"copy them there or unset it to use the default locations."
            )
        return Source("data-dir", directory)
    if _has_all_files(keras_cache_dir()):
        return Source("keras-cache", keras_cache_dir())
    for system_dir in SYSTEM_DIRS:
        if _has_all_files(Path(system_dir)):
            return Source("system", Path(system_dir))
    return None


def _open(path: Path):
    """``path`` opened for reading, through gzip if its content is gzip (not its name)."""
    try:
        handle = open(path, "rb")
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror}; check it exists and is readable.") from None
    if handle.read(2) == b"\x1f\x8b":
        handle.seek(0)
        return gzip.GzipFile(fileobj=handle, mode="rb"), handle
    handle.seek(0)
    return handle, handle


def _read_stream(path: Path, read) -> bytes:
    stream, handle = _open(path)
    try:
        with handle:
            return read(stream)
    except (EOFError, OSError, zlib.error) as error:
        raise DataError(
            f"{path} is a damaged gzip file ({error}); delete it and "
            f"re-download or reinstall it ({INSTALL_HINT})."
        ) from None


def read_bytes(path: Path, max_bytes: int | None = None) -> bytes:
    """Read a file, decompressing it if it is gzip (by content, not name), streaming.

    Raises:
        DataError: unreadable, damaged gzip, or more than ``max_bytes`` once
            decompressed (reading stops there).
    """
    data = _read_stream(path, lambda stream: stream.read(-1 if max_bytes is None else max_bytes + 1))
    if max_bytes is not None and len(data) > max_bytes:
        raise DataError(f"{path} decompresses to more than {max_bytes} bytes, more than this file can be; refused.")
    return data


def idx_shape(header: bytes, kind: str, name: str = "<bytes>") -> tuple[int, ...]:
    """Check an IDX header (magic, number and size of the dimensions) and return the shape it declares."""
    if kind not in _EXPECTED_NDIM:
        raise ValueError(f"kind must be 'images' or 'labels', got {kind!r}.")
    ndim = _EXPECTED_NDIM[kind]
    size = 4 + 4 * ndim
    if len(header) < size:
        raise DataError(f"{name}: file is {len(header)} bytes, too short for an IDX header ({size} bytes).")
    expected_magic = bytes((0, 0, _UBYTE, ndim))
    if header[:4] != expected_magic:
        raise DataError(
            f"{name}: wrong IDX magic number 0x{header[:4].hex()}, expected 0x{expected_magic.hex()} "
            f"(unsigned bytes, {ndim} dimension{'s' if ndim > 1 else ''}); is this an {kind} file?"
        )
    shape = tuple(int.from_bytes(header[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    if kind == "images" and shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(f"{name}: images are {shape[1]}x{shape[2]}, expected {IMAGE_SIZE}x{IMAGE_SIZE}.")
    return shape


def read_idx(path: Path, kind: str, max_bytes: int = MAX_IDX_DATA_BYTES) -> bytes:
    """The IDX bytes of ``path`` (gzip or not), read no further than its header declares.

    The header is read first; a file that declares more than ``max_bytes``
    of data is refused before its body is decompressed, and reading stops one
    byte past the declared size, so neither a huge header nor a gzip bomb
    costs memory. :func:`parse_idx` then checks the length exactly.
    """
    header_size = 4 + 4 * _EXPECTED_NDIM[kind]

    def read(stream):
        header = stream.read(header_size)
        shape = idx_shape(header, kind, str(path))
        declared = int(np.prod(shape, dtype=object))
        if declared > max_bytes:
            raise DataError(
                f"{path}: header declares {shape} = {declared} bytes of data, more than the {max_bytes} "
                f"bytes allowed for this file; it is damaged, a decompression bomb, or too large a data set."
            )
        body = stream.read(declared + 1)
        if len(body) > declared:
            raise DataError(
                f"{path}: holds more data than its header declares ({shape} = {declared} bytes); the file is "
                f"damaged, padded or a decompression bomb."
            )
        return header + body

    return _read_stream(path, read)


def parse_idx(data: bytes, kind: str, name: str = "<bytes>") -> np.ndarray:
    """Parse IDX bytes of unsigned bytes into a numpy array.

    Args:
        data: the decompressed file contents.
        kind: ``"images"`` (3 dims, 28x28) or ``"labels"`` (1 dim, values 0-9).
        name: the file name, used in error messages.

    Returns:
        A read-only-safe copy as a ``uint8`` array.
    """
    shape = idx_shape(data, kind, name)
    header = 4 + 4 * len(shape)
    size = int(np.prod(shape))
    if len(data) - header != size:
        raise DataError(
            f"{name}: header says {shape} = {size} bytes of data, file holds {len(data) - header}; "
            f"the file is truncated or damaged."
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()
    if kind == "labels" and array.size and array.max() >= NUM_CLASSES:
        raise DataError(f"{name}: label {array.max()} found, expected labels 0-{NUM_CLASSES - 1}.")
    return array


def _load_file(directory: Path, name: str, verify: bool, purge: bool = False) -> np.ndarray:
    path = _file_in(directory, name)
    if path is None:
        odd = _not_a_file_in(directory, name)
        if odd is not None:
            raise DataError(f"{odd} {NOT_A_FILE}; put the real file there.")
        raise DataError(f"{directory} lacks {name} (.gz or not); {INSTALL_HINT}.")
    kind = "images" if "images" in name else "labels"
    # The real file's size when it must be the real file; a cap for your own data.
    max_bytes = FILE_BYTES[name] - (4 + 4 * _EXPECTED_NDIM[kind]) if verify else MAX_IDX_DATA_BYTES
    try:
        data = read_idx(path, kind, max_bytes)
        if verify:
            digest = hashlib.sha256(data).hexdigest()
            if digest != SHA256[name]:
                raise DataError(
                    f"{path}: SHA-256 of the decompressed data is {digest}, expected {SHA256[name]}; "
                    f"the file is damaged or not Fashion-MNIST."
                    + ("" if purge else " Delete it to re-download, or pass verify=False (--no-verify) "
                       "if it is your own IDX data.")
                )
    except DataError as error:
        if not purge:
            raise
        path.unlink(missing_ok=True)  # never leave a bad download in the cache
        raise DataError(f"{error} It was deleted from the cache; run again to download it afresh.") from None
    return parse_idx(data, kind, str(path))


def load_from_dir(directory: str | os.PathLike, verify: bool = True, purge: bool = False):
    """Load and check all four files from one directory.

    Args:
        directory: holds the four IDX files, ``.gz`` or not.
        verify: check each file's SHA-256 digest.
        purge: delete every file that fails its check (for the download
            cache, so the next run downloads it again).

    Returns:
        ``((x_train, y_train), (x_test, y_test))`` as uint8 arrays. Nothing is
        returned unless all four files parse and agree.
    """
    directory = Path(directory)
    arrays, problems = {}, []
    for name in FILES:
        try:
            arrays[name] = _load_file(directory, name, verify, purge)
        except DataError as error:
            if not purge:
                raise
            problems.append(str(error))  # check (and purge) every file, not just the first bad one
    if problems:
        raise DataError(" | ".join(problems))
    for split in ("train", "t10k"):
        images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
        if len(images) != len(labels):
            raise DataError(
                f"{directory}: {split} has {len(images)} images but {len(labels)} labels; "
                f"the files do not belong together."
            )
        if len(images) == 0:
            which = "training" if split == "train" else "test"
            raise DataError(
                f"{directory}: {split}-images-idx3-ubyte holds 0 images; a {which} "
                f"set needs at least one image of each class; write the files with your images in them."
            )
    return (
        (arrays["train-images-idx3-ubyte"], arrays["train-labels-idx1-ubyte"]),
        (arrays["t10k-images-idx3-ubyte"], arrays["t10k-labels-idx1-ubyte"]),
    )


def check_url(url: str) -> str:
    """Return ``url`` if it is an HTTPS URL on the official mirror; raise DataError otherwise."""
    parts, mirror = urllib.parse.urlsplit(url), urllib.parse.urlsplit(MIRROR)
    if parts.scheme != "https" or parts.netloc != mirror.netloc or not parts.path.startswith(mirror.path):
        raise DataError(f"refusing to download {url}: only HTTPS from the official mirror {MIRROR} is allowed.")
    return url


class _MirrorOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only if it stays HTTPS on the mirror (no downgrade to HTTP)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        check_url(urllib.parse.urljoin(req.full_url, newurl))
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def https_get(url: str, max_bytes: int = MAX_DOWNLOAD_BYTES) -> bytes:
    """GET ``url`` from the mirror over HTTPS (certificates verified), at most ``max_bytes``."""
    opener = urllib.request.build_opener(_MirrorOnlyRedirects)
    with opener.open(check_url(url), timeout=DOWNLOAD_TIMEOUT_S) as response:
        data = response.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise DataError(f"{url} is larger than {max_bytes} bytes, far more than Fashion-MNIST; refused.")
    return data


def download(directory: Path | None = None, fetch=https_get) -> Path:
    """Download the missing .gz files from the official mirror over HTTPS.

    Each file is checked against its digest *before* it is saved: it is
    written under a temporary name and renamed into the cache only if the
    check passes, so the cache never holds an unverified download.

    Args:
        directory: where the files go; defaults to the Keras cache.
        fetch: ``fetch(url) -> bytes``; :func:`https_get` by default (tests
            pass a local source instead of the network).

    Returns:
        The directory.
    """
    directory = directory or keras_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        if _file_in(directory, name) is not None:
            continue
        url = check_url(MIRROR + f"{name}.gz")
        payload = fetch(url)
        # A new file of a name no one else has (no link followed), renamed into place once checked.
        try:
            with replacing(directory / f"{name}.gz", prefix=f".{name}.gz.", suffix=".part") as (handle, partial):
                with os.fdopen(handle, "wb") as out:
                    out.write(payload)
                digest = hashlib.sha256(read_bytes(partial, FILE_BYTES[name])).hexdigest()
                if digest != SHA256[name]:
                    raise DataError(
                        f"{url}: SHA-256 of the downloaded data is {digest}, expected {SHA256[name]}."
                    )
        except DataError as error:
            raise DataError(f"{error} The download was deleted, nothing was cached; try again later.") from None
    return directory


def load_data(data_dir=None, verify: bool = True, allow_download: bool = True, return_source: bool = False):
    """Return Fashion-MNIST as ``keras.datasets.fashion_mnist.load_data()`` does.

    Args:
        data_dir: a directory holding the four IDX files (``.gz`` or not).
            Defaults to ``$FMNIST_DATA_DIR``, then the Keras cache, then
            ``/usr/share/datasets/fashion-mnist``, then a download.
        verify: check the SHA-256 digest of each decompressed file. Pass
            False only for your own IDX data. Downloads and the Keras cache
            are always checked, and a cached file that fails is deleted.
        allow_download: download into the Keras cache when no local copy exists.
        return_source: also return the :class:`Source` the data came from.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``: uint8 arrays of shapes
        (60000, 28, 28), (60000,), (10000, 28, 28), (10000,); with
        ``return_source`` a tuple ``(data, source)``.
    """
    source = find_source(data_dir)
    if source is None:
        if not allow_download:
            raise DataError(f"Fashion-MNIST not found in {keras_cache_dir()} or {', '.join(SYSTEM_DIRS)}; {INSTALL_HINT}.")
        try:
            source = Source("download", download())
        except Exception as error:  # network errors come in many types
            raise DataError(
                f"Fashion-MNIST not found locally and the download from {MIRROR} failed ({error}); "
                f"{INSTALL_HINT}."
            ) from None
    downloaded = source.kind in ("download", "keras-cache")
    data = load_from_dir(source.directory, verify=verify or downloaded, purge=downloaded)
    return (data, source) if return_source else data


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int):
    """Split indices into train and validation, each class in equal proportion.

    Returns:
        ``(train_idx, val_idx)``: sorted index arrays that partition ``range(len(labels))``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}; try 0.1.")
    val_idx = _draw_per_class(labels, val_fraction, seed, whole_class=False)
    train_mask = np.ones(len(labels), dtype=bool)
    train_mask[val_idx] = False
    return np.flatnonzero(train_mask), val_idx


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of a seeded, class-balanced subset of ``size`` examples (for quick runs).

    The same draw as :func:`stratified_split`'s validation side with ``size / len(labels)`` for its
    fraction, except that a class may be kept whole (a subset of nearly every image).
    """
    if size >= len(labels):
        return np.arange(len(labels))
    try:
        return _draw_per_class(labels, size / len(labels), seed, whole_class=True)
    except SplitError:
        raise SplitError(
            f"a subset of {size} images cannot hold every class; use at least {20 * len(np.unique(labels))}."
        ) from None


def _draw_per_class(labels: np.ndarray, fraction: float, seed: int, whole_class: bool) -> np.ndarray:
    """Sorted indices of ``round(fraction * n)`` seeded picks from each class of ``n`` examples.

    Raises:
        SplitError: a class would get no pick, or (unless ``whole_class``) every one of its examples.
    """
    rng = np.random.default_rng(seed)
    parts = []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        n = int(round(len(members) * fraction))
        if n == 0 or (n == len(members) and not whole_class):
            raise SplitError(
                f"class {cls} has {len(members)} examples: a {fraction} split leaves none on one side; "
                f"use more data or another --val-split."
            )
        parts.append(rng.choice(members, size=n, replace=False))
    return np.sort(np.concatenate(parts))


def to_model_input(images: np.ndarray, data_format: str = "channels_last") -> np.ndarray:
    """Scale uint8 images to float32 in [0, 1] and add the channel axis.

    The one place where the model's input format is made. ``data_format``
    follows Keras: ``channels_last`` gives (N, 28, 28, 1), ``channels_first``
    gives (N, 1, 28, 28).
    """
    if images.ndim != 3:
        raise ValueError(f"expected images of shape (N, 28, 28), got {images.shape}.")
    axis = -1 if data_format == "channels_last" else 1
    return np.expand_dims(images.astype(np.float32) / 255.0, axis)

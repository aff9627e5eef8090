"""The data module: IDX parsing, verification, source lookup, split and scaling."""

import errno
import gzip
import hashlib
import os
import re
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import idx_bytes, write_idx_dir

from fmnist_keras import data as fdata


def test_parse_idx_round_trips_images_and_labels():
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    labels = np.array([3, 9], dtype=np.uint8)
    np.testing.assert_array_equal(fdata.parse_idx(idx_bytes(images), "images"), images)
    np.testing.assert_array_equal(fdata.parse_idx(idx_bytes(labels), "labels"), labels)


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b"\x00\x00\x09\x03" + b[4:], "wrong IDX magic"),
        (lambda b: b[:-5], "truncated or damaged"),
        (lambda b: b + b"\x00", "truncated or damaged"),
        (lambda b: b[:6], "too short"),
    ],
)
def test_parse_idx_rejects_damaged_images(mutate, message):
    data = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))
    with pytest.raises(fdata.DataError, match=message):
        fdata.parse_idx(mutate(data), "images", "x.idx")


def test_parse_idx_rejects_wrong_image_size_and_bad_labels():
    with pytest.raises(fdata.DataError, match="expected 28x28"):
        fdata.parse_idx(idx_bytes(np.zeros((2, 32, 32), dtype=np.uint8)), "images")
    with pytest.raises(fdata.DataError, match="label 12"):
        fdata.parse_idx(idx_bytes(np.array([1, 12], dtype=np.uint8)), "labels")
    # An images file where labels are expected: the dimension count in the magic differs.
    with pytest.raises(fdata.DataError, match="labels file"):
        fdata.parse_idx(idx_bytes(np.zeros((2, 28, 28), dtype=np.uint8)), "labels")


@pytest.mark.parametrize("compress", [True, False])
def test_load_from_dir_reads_gz_and_plain_files(tmp_path, compress):
    (x_train, y_train), (x_test, y_test) = write_idx_dir(tmp_path, compress=compress)
    (a, b), (c, d) = fdata.load_from_dir(tmp_path, verify=False)
    for got, want in ((a, x_train), (b, y_train), (c, x_test), (d, y_test)):
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)


def test_digest_is_checked_unless_skipped_explicitly(tiny_data_dir):
    with pytest.raises(fdata.DataError, match="SHA-256 of the decompressed data") as info:
        fdata.load_from_dir(tiny_data_dir)
    assert "--no-verify" in str(info.value)
    fdata.load_from_dir(tiny_data_dir, verify=False)


def test_digest_is_of_decompressed_bytes(tmp_path, monkeypatch):
    write_idx_dir(tmp_path, compress=True)
    digests = {
        name: hashlib.sha256(gzip.decompress((tmp_path / f"{name}.gz").read_bytes())).hexdigest()
        for name in fdata.FILES
    }
    monkeypatch.setattr(fdata, "SHA256", digests)
    fdata.load_from_dir(tmp_path)  # passes with the digests of the decompressed data
    # Recompressing at another level changes the .gz bytes but not the data.
    name = "t10k-labels-idx1-ubyte"
    payload = gzip.decompress((tmp_path / f"{name}.gz").read_bytes())
    (tmp_path / f"{name}.gz").write_bytes(gzip.compress(payload, compresslevel=1))
    fdata.load_from_dir(tmp_path)


def test_truncated_gzip_names_the_file(tiny_data_dir):
    path = tiny_data_dir / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(fdata.DataError, match="damaged gzip") as info:
        fdata.load_from_dir(tiny_data_dir, verify=False)
    assert str(path) in str(info.value)


def test_count_mismatch_loads_nothing(tmp_path):
    write_idx_dir(tmp_path)
    labels = np.zeros(7, dtype=np.uint8)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(fdata.DataError, match="100 images but 7 labels"):
        fdata.load_from_dir(tmp_path, verify=False)


def test_missing_file_says_how_to_fix(tiny_data_dir, isolated_env):
    (tiny_data_dir / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(fdata.DataError, match="lacks t10k-images-idx3-ubyte") as info:
        fdata.load_data(tiny_data_dir, verify=False)
    assert "unset it" in str(info.value)


def test_unreadable_file_is_a_clear_error(tiny_data_dir, monkeypatch):
    path = tiny_data_dir / "train-labels-idx1-ubyte.gz"
    if os.geteuid() == 0:
        # root reads a file with mode 0, so the kernel's refusal is made by hand
        real_open = open

        def refusing_open(file, *args, **kwargs):
            if Path(file) == path:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(fdata, "open", refusing_open, raising=False)
    else:
        path.chmod(0)
    with pytest.raises(fdata.DataError, match=f"cannot read {re.escape(str(path))}: Permission denied; check it"):
        fdata.load_from_dir(tiny_data_dir, verify=False)


def test_a_directory_where_a_data_file_belongs_is_named_as_no_file(tiny_data_dir):
    target = tiny_data_dir / "train-labels-idx1-ubyte.gz"
    target.unlink()
    target.mkdir()
    (tiny_data_dir / "train-labels-idx1-ubyte").mkdir()
    with pytest.raises(fdata.DataError, match=f"^{re.escape(str(target))} is not a regular file .*; put the real "
                                              f"file there.$"):
        fdata.load_from_dir(tiny_data_dir, verify=False)


@pytest.mark.parametrize("kind", ["fifo", "dangling link"])
def test_a_data_dir_with_no_file_where_one_belongs_names_it(tiny_data_dir, kind):
    target = tiny_data_dir / "t10k-labels-idx1-ubyte.gz"
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)  # reading it would block
    else:
        target.symlink_to(tiny_data_dir / "gone")
    with pytest.raises(fdata.DataError, match=f"^--data-dir {re.escape(str(tiny_data_dir))}: t10k-labels-idx1-ubyte.gz "
                                              f"is not a regular file \\(a FIFO, a device, a directory or a symbolic "
                                              f"link to nothing\\); put the real file there"):
        fdata.find_source(str(tiny_data_dir))


def test_source_order_explicit_then_env_then_cache(tmp_path, isolated_env, monkeypatch):
    cache = fdata.keras_cache_dir()
    write_idx_dir(cache)
    assert fdata.find_source().kind == "keras-cache"
    env_dir = tmp_path / "env"
    write_idx_dir(env_dir)
    monkeypatch.setenv(fdata.ENV_VAR, str(env_dir))
    assert fdata.find_source() == fdata.Source("data-dir", env_dir)
    given = tmp_path / "given"
    write_idx_dir(given)
    assert fdata.find_source(given).directory == given


def test_system_dir_is_used_when_nothing_else(tmp_path, isolated_env, monkeypatch):
    system = tmp_path / "system"
    write_idx_dir(system)
    monkeypatch.setattr(fdata, "SYSTEM_DIRS", (str(tmp_path / "absent"), str(system)))
    assert fdata.find_source() == fdata.Source("system", system)
    data, source = fdata.load_data(verify=False, return_source=True)
    assert source.kind == "system" and data[0][0].shape == (400, 28, 28)


def test_no_data_anywhere_without_download_is_a_clear_error(isolated_env, monkeypatch):
    monkeypatch.setattr(fdata, "SYSTEM_DIRS", ())
    with pytest.raises(fdata.DataError, match="apt-get install dataset-fashion-mnist"):
        fdata.load_data(allow_download=False)


def test_bad_explicit_dir_is_an_error_not_a_fallback(tmp_path, isolated_env):
    with pytest.raises(fdata.DataError, match="not a directory"):
        fdata.find_source(tmp_path / "nope")


def test_stratified_split_keeps_class_proportions_and_is_seeded():
    labels = np.repeat(np.arange(10), [100, 200, 300, 100, 100, 100, 100, 100, 100, 100])
    train_idx, val_idx = fdata.stratified_split(labels, 0.1, seed=1)
    assert len(np.intersect1d(train_idx, val_idx)) == 0
    assert len(train_idx) + len(val_idx) == len(labels)
    np.testing.assert_array_equal(np.bincount(labels[val_idx]), np.bincount(labels) // 10)
    again, _ = fdata.stratified_split(labels, 0.1, seed=1)
    other, _ = fdata.stratified_split(labels, 0.1, seed=2)
    np.testing.assert_array_equal(train_idx, again)
    assert not np.array_equal(train_idx, other)


def test_a_subset_is_the_validation_side_of_the_same_split_and_may_hold_nearly_every_image():
    labels = np.repeat(np.arange(10), 600)
    # The draw that every run's config.json (subset, split seed) rebuilds: it must not change.
    np.testing.assert_array_equal(fdata.stratified_subset(labels, 300, 5), fdata.stratified_split(labels, 0.05, 5)[1])
    nearly_all = fdata.stratified_subset(labels, 5995, 5)  # 599.5 of each class, rounded: every image
    np.testing.assert_array_equal(nearly_all, np.arange(6000))
    assert len(fdata.stratified_subset(labels, 5900, 5)) == 5900
    with pytest.raises(ValueError, match="a subset of 5 images cannot hold every class; use at least 200"):
        fdata.stratified_subset(labels, 5, 5)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_stratified_split_rejects_bad_fraction(fraction):
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        fdata.stratified_split(np.arange(10), fraction, 0)


def test_to_model_input_scales_and_adds_channel_axis():
    images = np.array([[[0, 255] * 14] * 28], dtype=np.uint8)
    last = fdata.to_model_input(images, "channels_last")
    first = fdata.to_model_input(images, "channels_first")
    assert last.shape == (1, 28, 28, 1) and first.shape == (1, 1, 28, 28)
    assert last.dtype == np.float32 and last.min() == 0.0 and last.max() == 1.0


# ---- bombs and empty sets -------------------------------------------------------------


def _gzip_stream(path, header, body_bytes, chunk=16 * 1024**2):
    """Write header + ``body_bytes`` zeros as gzip without holding the body in memory."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: gzip container
    with open(path, "wb") as handle:
        handle.write(compressor.compress(header))
        for start in range(0, body_bytes, chunk):
            handle.write(compressor.compress(bytes(min(chunk, body_bytes - start))))
        handle.write(compressor.flush())
    return path


def _peak_bytes(function):
    tracemalloc.start()
    try:
        function()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def _idx_header(count):
    return bytes((0, 0, 8, 3)) + b"".join(n.to_bytes(4, "big") for n in (count, 28, 28))


def test_header_declaring_more_than_the_cap_is_refused_before_decompressing(tiny_data_dir):
    name = tiny_data_dir / "train-images-idx3-ubyte.gz"
    _gzip_stream(name, _idx_header(2_000_000), 1024**2)  # declares 1.57 GB; the body is not read
    with pytest.raises(fdata.DataError) as error:
        fdata.load_from_dir(tiny_data_dir, verify=False)
    assert f"more than the {fdata.MAX_IDX_DATA_BYTES} bytes allowed for this file" in str(error.value)
    assert str(name) in str(error.value) and "\n" not in str(error.value)


def test_gzip_inflating_past_its_declared_size_stops_there(tiny_data_dir):
    name = tiny_data_dir / "t10k-images-idx3-ubyte.gz"
    _gzip_stream(name, _idx_header(100), 300 * 1024**2)  # declares 78 kB, inflates to 300 MB

    def load():
        with pytest.raises(fdata.DataError, match="holds more data than its header declares"):
            fdata.load_from_dir(tiny_data_dir, verify=False)

    assert _peak_bytes(load) < 20 * 1024**2


def test_verified_file_may_not_declare_more_than_the_real_file(tiny_data_dir):
    _gzip_stream(tiny_data_dir / "t10k-labels-idx1-ubyte.gz", bytes((0, 0, 8, 1)) + (10**6).to_bytes(4, "big"), 0)
    with pytest.raises(fdata.DataError, match=r"header declares \(1000000,\) = 1000000 bytes of data, more than "
                                              r"the 10000 bytes allowed"):
        fdata._load_file(tiny_data_dir, "t10k-labels-idx1-ubyte", verify=True)


@pytest.mark.slow
def test_small_gzip_inflating_to_1_5_gib_costs_no_memory(tiny_data_dir):
    name = tiny_data_dir / "train-images-idx3-ubyte.gz"
    _gzip_stream(name, _idx_header(400), 3 * 512 * 1024**2)
    assert name.stat().st_size < 2 * 1024**2

    def load():
        with pytest.raises(fdata.DataError, match="holds more data than its header declares"):
            fdata.load_from_dir(tiny_data_dir, verify=False)

    assert _peak_bytes(load) < 20 * 1024**2


@pytest.mark.parametrize("split", ["t10k", "train"])
def test_empty_set_is_refused(tmp_path, split):
    write_idx_dir(tmp_path, compress=False)
    (tmp_path / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((0, 28, 28), np.uint8)))
    (tmp_path / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros((0,), np.uint8)))
    with pytest.raises(fdata.DataError, match=f"{split}-images-idx3-ubyte holds 0 images"):
        fdata.load_from_dir(tmp_path, verify=False)

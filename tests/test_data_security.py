"""Supply-chain checks: downloads are HTTPS-only and verified, bad cached files are deleted,
and nothing in the package unpickles user data. No network: downloads come from a local source."""

import gzip
import os
import re
import shutil
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from conftest import REAL_DATA_DIR, requires_real_data, write_idx_dir
from fmnist_keras import data as fdata

PACKAGE = Path(fdata.__file__).parent


def _copy_real_data(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in fdata.FILES:
        shutil.copy(fdata._file_in(REAL_DATA_DIR, name), directory / f"{name}.gz")


# ---- the Keras cache -----------------------------------------------------------


def test_bad_cached_files_are_deleted_and_the_error_says_so(isolated_env):
    cache = fdata.keras_cache_dir()
    write_idx_dir(cache)  # well-formed IDX files, but not Fashion-MNIST: every digest fails
    with pytest.raises(fdata.DataError) as info:
        fdata.load_data(allow_download=False)
    message = str(info.value)
    assert "\n" not in message
    for name in fdata.FILES:
        assert f"{name}.gz: SHA-256" in message
        assert not (cache / f"{name}.gz").exists()
    assert message.count("It was deleted from the cache") == 4


def test_cache_is_checked_even_with_verify_false(isolated_env):
    cache = fdata.keras_cache_dir()
    write_idx_dir(cache)
    with pytest.raises(fdata.DataError, match="deleted from the cache"):
        fdata.load_data(verify=False, allow_download=False)
    assert not any(cache.iterdir())


@requires_real_data
def test_only_the_bad_cached_file_is_deleted(isolated_env):
    cache = fdata.keras_cache_dir()
    _copy_real_data(cache)
    damaged = cache / "t10k-labels-idx1-ubyte.gz"
    damaged.write_bytes(damaged.read_bytes()[:-20])  # a truncated download
    with pytest.raises(fdata.DataError, match=r"t10k-labels-idx1-ubyte.gz is a damaged gzip.*deleted from the cache"):
        fdata.load_data(allow_download=False)
    assert not damaged.exists()
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        f"{n}.gz" for n in fdata.FILES if n != "t10k-labels-idx1-ubyte"
    )


def test_explicit_data_dir_is_never_deleted(tiny_data_dir):
    """Only the download cache is purged: the user's own directory is left alone."""
    before = sorted(p.name for p in tiny_data_dir.iterdir())
    with pytest.raises(fdata.DataError, match="Delete it to re-download"):
        fdata.load_data(tiny_data_dir)
    assert sorted(p.name for p in tiny_data_dir.iterdir()) == before


# ---- downloads -------------------------------------------------------------------


def test_download_checks_digests_before_saving(tmp_path):
    fetched = []

    def fetch(url):
        fetched.append(url)
        return gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x00")  # a valid but wrong file

    with pytest.raises(fdata.DataError, match="SHA-256 of the downloaded data.*download was deleted"):
        fdata.download(tmp_path / "cache", fetch=fetch)
    assert fetched == [fdata.MIRROR + "train-images-idx3-ubyte.gz"]
    assert list((tmp_path / "cache").iterdir()) == []  # no .gz, no .part left behind


def test_damaged_download_is_deleted(tmp_path):
    with pytest.raises(fdata.DataError, match="damaged gzip.*download was deleted"):
        fdata.download(tmp_path / "cache", fetch=lambda url: b"\x1f\x8bnot really gzip")
    assert list((tmp_path / "cache").iterdir()) == []


@requires_real_data
def test_good_download_lands_in_the_cache_and_loads(isolated_env):
    urls = []

    def fetch(url):  # the real files, served locally instead of by the mirror
        urls.append(url)
        return fdata._file_in(REAL_DATA_DIR, url.rsplit("/", 1)[1][:-3]).read_bytes()

    cache = fdata.download(fetch=fetch)
    assert cache == fdata.keras_cache_dir()
    assert all(u.startswith("https://storage.googleapis.com/tensorflow/tf-keras-datasets/") for u in urls)
    assert len(urls) == 4
    (x_train, _), _ = fdata.load_data(allow_download=False)
    assert x_train.shape == (60000, 28, 28)
    fdata.download(fetch=lambda url: pytest.fail("cached files must not be fetched again"))


@requires_real_data
def test_a_download_never_writes_through_a_link_in_the_cache(tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    name = "t10k-labels-idx1-ubyte"
    for planted in (f"{name}.gz.part", f".{name}.gz.part"):  # names a download's temporary file might take
        (cache / planted).symlink_to(victim)
    fdata.download(cache, fetch=lambda url: fdata._file_in(REAL_DATA_DIR, url.rsplit("/", 1)[1][:-3]).read_bytes())
    assert victim.read_text() == "mine"
    umask = os.umask(0)
    os.umask(umask)
    for file in fdata.FILES:
        path = cache / f"{file}.gz"
        assert path.is_file() and not path.is_symlink() and path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert sorted(p.name for p in cache.iterdir() if p.is_symlink()) == [f".{name}.gz.part", f"{name}.gz.part"]


@pytest.mark.parametrize(
    "url",
    [
        "http://storage.googleapis.com/tensorflow/tf-keras-datasets/train-images-idx3-ubyte.gz",
        "https://evil.example.com/tensorflow/tf-keras-datasets/train-images-idx3-ubyte.gz",
        "https://storage.googleapis.com/someone-else/train-images-idx3-ubyte.gz",
        "ftp://storage.googleapis.com/tensorflow/tf-keras-datasets/x.gz",
        "file:///etc/passwd",
    ],
)
def test_only_https_from_the_mirror_is_allowed(url):
    with pytest.raises(fdata.DataError, match="only HTTPS from the official mirror"):
        fdata.check_url(url)
    with pytest.raises(fdata.DataError, match="only HTTPS"):
        fdata.https_get(url)  # refused before any connection is made


def test_redirect_off_the_mirror_is_refused():
    handler = fdata._MirrorOnlyRedirects()
    request = urllib.request.Request(fdata.MIRROR + "train-images-idx3-ubyte.gz")
    with pytest.raises(fdata.DataError, match="refusing to download http://"):
        handler.redirect_request(request, None, 302, "Found", {}, "http://storage.googleapis.com/x.gz")
    followed = handler.redirect_request(request, None, 302, "Found", {}, fdata.MIRROR + "v2/x.gz")
    assert followed.full_url == fdata.MIRROR + "v2/x.gz"


def test_the_official_urls_pass_the_check():  # the control for the refusals above
    assert urllib.parse.urlsplit(fdata.MIRROR)[:2] == ("https", "storage.googleapis.com")
    for name in fdata.FILES:
        url = fdata.MIRROR + f"{name}.gz"
        assert fdata.check_url(url) == url


# ---- no unpickling anywhere in the package ---------------------------------------------

# Modules that load a model file with Keras directly instead of through
# fmnist_keras.loading.load_model. They reload checkpoints the run itself
# wrote; the goal is an empty set (see docs/security.md).
_DIRECT_LOADS_PENDING: set[str] = set()


def _package_sources():
    """Every module of the package, sub-packages included, by its path inside the package."""
    sources = {str(path.relative_to(PACKAGE)): path.read_text() for path in sorted(PACKAGE.rglob("*.py"))}
    assert "engine/callbacks.py" in sources and "inspection/report.py" in sources
    return sources


# Each guard: the pattern, why it is banned, and an offending line it must catch.
_GUARDS = [
    (r"allow_pickle\s*=\s*True", "np.load must not unpickle", "x = np.load(path, allow_pickle=True)"),
    (r"^\s*(import pickle|from pickle|import cloudpickle|import dill|import marshal)", "no pickle/marshal",
     "    import pickle"),
    (r"safe_mode\s*=\s*False", "Keras safe mode stays on", "keras.saving.load_model(path, safe_mode=False)"),
    (r"enable_unsafe_deserialization", "Keras safe mode stays on",
     "keras.config.enable_unsafe_deserialization()"),
    (r"load_model_from_hdf5|legacy_h5_format", "HDF5 models bypass safe mode",
     "legacy_h5_format.load_model_from_hdf5(f)"),
    (r"(?<![.\w])(eval|exec)\(", "no code from data", "value = eval(text)"),
    (r"torch\.load\((?![^)]*weights_only=True)", "torch.load unpickles unless weights_only=True",
     "state = torch.load(path, map_location='cpu')"),
]


@pytest.mark.parametrize("pattern, why, offence", _GUARDS, ids=[why for _, why, _ in _GUARDS])
def test_package_never_unpickles_or_disables_safe_mode(pattern, why, offence):
    assert re.search(pattern, offence, re.MULTILINE), "the guard must catch its own example"
    offenders = [name for name, text in _package_sources().items() if re.search(pattern, text, re.MULTILINE)]
    assert offenders == [], f"{why}: {offenders}"


@pytest.mark.parametrize("allowed", ["torch.load(path, weights_only=True)", "model.evaluate(x)", "np.load(path)"])
def test_guards_let_safe_calls_through(allowed):
    assert not [why for pattern, why, _ in _GUARDS if re.search(pattern, allowed, re.MULTILINE)]


def test_models_are_loaded_through_the_safe_loader():
    direct = {
        name for name, text in _package_sources().items()
        if name != "loading.py" and re.search(r"(saving|models)\.load_model\(", text)
    }
    assert direct <= _DIRECT_LOADS_PENDING, f"load models with fmnist_keras.loading.load_model: {direct}"

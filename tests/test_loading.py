"""fmnist_keras.loading: hostile and broken model files are refused, good ones load.

Every hostile file here is real: the Lambda one is written by Keras itself and
its payload writes a marker file, and one test shows that Keras *does* run it
when safe mode is switched off, so "the marker was not written" means something.
"""

import json
import os
import re
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

from fmnist_keras.loading import (
    AmbiguousModelError,
    ModelLoadError,
    check_archive,
    exit_code,
    input_data_format,
    load_model,
    resolve_model_path,
)


def _tiny_model(input_shape=(28, 28, 1), classes=10):
    inputs = keras.Input(shape=input_shape, name="image")
    x = keras.layers.Flatten(name="flatten")(inputs)
    x = keras.layers.Dense(classes, name="logits")(x)
    outputs = keras.layers.Activation("softmax", name="predictions")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture(scope="module")
def good_model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "model.keras"
    _tiny_model().save(path)
    return path


def _rewrite_archive(source, target, config=None, extra=None, drop=()):
    """Copy a .keras archive, optionally replacing config.json, adding or dropping members."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            if info.filename in drop:
                continue
            data = src.read(info.filename)
            if info.filename == "config.json" and config is not None:
                data = json.dumps(config).encode()
            dst.writestr(info.filename, data)
        for name, data in (extra or {}).items():
            dst.writestr(name, data)
    return target


def test_valid_model_file_and_run_dir_load(good_model_file):
    model = load_model(good_model_file)
    assert isinstance(model, keras.Model)
    assert input_data_format(model) == "channels_last"
    probs = model.predict(np.zeros((2, 28, 28, 1), np.float32), verbose=0)
    assert probs.shape == (2, 10)
    # A run directory means its model.keras.
    assert load_model(good_model_file.parent).count_params() == model.count_params()


def test_channels_first_model_loads(tmp_path):
    path = tmp_path / "cf.keras"
    _tiny_model(input_shape=(1, 28, 28)).save(path)
    assert input_data_format(load_model(path)) == "channels_first"


def _lambda_model_file(tmp_path, marker, monkeypatch):
    # Keras itself serialises this lambda (marshalled bytecode, base64) into
    # config.json. The payload finds its target in the environment, so it
    # needs no defaults or closure (which Keras fails to restore).
    monkeypatch.setenv("FMNIST_TEST_PWNED", str(marker))
    payload = lambda t: (open(__import__("os").environ["FMNIST_TEST_PWNED"], "w").write("pwned"), t)[1]  # noqa: E731
    inputs = keras.Input(shape=(28, 28, 1))
    x = keras.layers.Lambda(payload)(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    marker.unlink()  # building the model ran the lambda once; start clean
    path = tmp_path / "hostile_lambda.keras"
    model.save(path)
    assert not marker.exists()
    return path


def test_lambda_payload_is_real_when_safe_mode_is_off(tmp_path, monkeypatch):
    """The control: without safe mode, loading the file runs its code."""
    marker = tmp_path / "pwned.txt"
    path = _lambda_model_file(tmp_path, marker, monkeypatch)
    keras.saving.load_model(path, safe_mode=False)  # the unsafe call this package never makes
    assert marker.read_text() == "pwned"


def test_lambda_layer_is_refused_without_running_it(tmp_path, monkeypatch):
    marker = tmp_path / "pwned.txt"
    path = _lambda_model_file(tmp_path, marker, monkeypatch)
    with pytest.raises(ModelLoadError, match="'Lambda' object, which runs Python code"):
        load_model(path)
    assert not marker.exists()


def test_lambda_layer_is_refused_by_keras_safe_mode_too(tmp_path, monkeypatch):
    """Second line of defence: Keras's own safe mode refuses it even if our check missed it."""
    marker = tmp_path / "pwned.txt"
    path = _lambda_model_file(tmp_path, marker, monkeypatch)
    with pytest.raises(ValueError, match="safe_mode"):
        keras.saving.load_model(path)
    assert not marker.exists()


def test_function_from_foreign_module_is_refused(tmp_path, good_model_file):
    config = json.loads(zipfile.ZipFile(good_model_file).read("config.json"))
    # An activation that names os.system: the CVE-2025-1550 pattern.
    layer = next(l for l in config["config"]["layers"] if l["config"]["name"] == "predictions")
    layer["config"]["activation"] = {"module": "os", "class_name": "function", "config": "system",
                                     "registered_name": "function"}
    path = _rewrite_archive(good_model_file, tmp_path / "foreign.keras", config=config)
    with pytest.raises(ModelLoadError, match="'function' object"):
        load_model(path)
    layer["config"]["activation"] = {"module": "subprocess", "class_name": "Popen", "config": {}}
    path = _rewrite_archive(good_model_file, tmp_path / "foreign2.keras", config=config)
    with pytest.raises(ModelLoadError, match="from module 'subprocess'"):
        load_model(path)


def _pickled_payload(marker) -> str:
    """What Keras's ``TorchModuleWrapper`` config holds (a base64 ``torch.save``), here a pickle that writes ``marker``."""
    import base64
    import io

    torch = pytest.importorskip("torch")

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('pwned')",)

    buffer = io.BytesIO()
    torch.save(Payload(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def test_torch_module_wrapper_is_refused_without_unpickling_it(tmp_path, good_model_file):
    import base64
    import io

    import torch

    marker = tmp_path / "pwned.txt"
    payload = _pickled_payload(marker)
    torch.load(io.BytesIO(base64.b64decode(payload)), weights_only=False)  # the control: the payload is real
    assert marker.read_text() == "pwned"
    marker.unlink()
    config = json.loads(zipfile.ZipFile(good_model_file).read("config.json"))
    config["config"]["layers"].append(
        {"module": "keras.layers", "class_name": "TorchModuleWrapper", "config": {"module": payload}}
    )
    path = _rewrite_archive(good_model_file, tmp_path / "torchwrap.keras", config=config)
    with pytest.raises(ModelLoadError, match="unpickles a torch module"):
        load_model(path)
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".h5", ".hdf5", ".H5"])
def test_hdf5_file_is_refused(tmp_path, suffix):
    path = tmp_path / f"legacy{suffix}"
    _tiny_model().save(tmp_path / "legacy.h5")  # a real legacy HDF5 model
    (tmp_path / "legacy.h5").rename(path)
    with pytest.raises(ModelLoadError, match=r"legacy HDF5 model.*ignored safe_mode until keras 3.11.3"):
        load_model(path)


def test_hdf5_renamed_to_keras_is_refused(tmp_path):
    _tiny_model().save(tmp_path / "legacy.h5")
    path = (tmp_path / "legacy.h5").rename(tmp_path / "disguised.keras")
    with pytest.raises(ModelLoadError, match="HDF5 file renamed to .keras"):
        load_model(path)


@pytest.mark.parametrize("member", ["../escaped.txt", "assets/../../escaped.txt", "/tmp/escaped_abs.txt"])
def test_member_name_escaping_the_archive_is_refused(tmp_path, good_model_file, member):
    inner = tmp_path / "deep" / "er"
    inner.mkdir(parents=True)
    path = _rewrite_archive(good_model_file, inner / "traversal.keras", extra={member: b"escaped"})
    before = {p for p in tmp_path.rglob("*")}
    with pytest.raises(ModelLoadError, match="points outside the archive"):
        load_model(path)
    assert {p for p in tmp_path.rglob("*")} == before
    assert not (tmp_path / "deep" / "escaped.txt").exists()
    assert not (tmp_path / "escaped.txt").exists()


def test_non_zip_file_named_keras_is_refused(tmp_path):
    path = tmp_path / "model.keras"
    path.write_text("this is not a model\n")
    with pytest.raises(ModelLoadError, match="is not a zip archive"):
        load_model(path)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"is empty \(0 bytes\)"):
        load_model(path)


def test_truncated_archive_is_refused(tmp_path, good_model_file):
    data = good_model_file.read_bytes()
    path = tmp_path / "truncated.keras"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="not a zip archive.*truncated"):
        load_model(path)


def test_corrupt_member_is_refused(tmp_path, good_model_file):
    data = bytearray(good_model_file.read_bytes())
    with zipfile.ZipFile(good_model_file) as archive:
        info = archive.getinfo("model.weights.h5")
    # Flip a byte inside the stored weights: the CRC check must catch it.
    offset = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.compress_size // 2
    data[offset] ^= 0xFF
    path = tmp_path / "corrupt.keras"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="corrupt|damaged"):
        load_model(path)


def test_zip_without_keras_members_is_refused(tmp_path, good_model_file):
    path = _rewrite_archive(good_model_file, tmp_path / "noconfig.keras", drop=("config.json",))
    with pytest.raises(ModelLoadError, match="lacks config.json"):
        load_model(path)
    path = _rewrite_archive(good_model_file, tmp_path / "noweights.keras", drop=("model.weights.h5",))
    with pytest.raises(ModelLoadError, match="lacks model.weights.h5"):
        load_model(path)


def test_invalid_config_json_is_refused(tmp_path, good_model_file):
    path = tmp_path / "badjson.keras"
    with zipfile.ZipFile(good_model_file) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, b"{not json" if info.filename == "config.json" else src.read(info))
    with pytest.raises(ModelLoadError, match="config.json is not valid JSON"):
        load_model(path)


def _set_central_directory_field(path, member, offset, value: bytes):
    """Overwrite bytes of ``member``'s central-directory entry, the record zipfile trusts when it opens a member."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo(member)
    start = data.rfind(b"PK\x01\x02", 0, data.rfind(b"PK\x05\x06"))
    while not data[start + 46:].startswith(member.encode()):
        start = data.rfind(b"PK\x01\x02", 0, start)
    assert int.from_bytes(data[start + 42:start + 46], "little") == info.header_offset
    data[start + offset:start + offset + len(value)] = value
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, says", [
    ("encrypted", "encrypted"),  # zipfile: RuntimeError, a password is required
    ("compression method 99", "compression method"),  # zipfile: NotImplementedError
])
def test_a_member_zipfile_cannot_read_is_one_line(tmp_path, good_model_file, damage, says):
    path = _rewrite_archive(good_model_file, tmp_path / "odd.keras")
    if damage == "encrypted":
        _set_central_directory_field(path, "config.json", 8, (1).to_bytes(2, "little"))  # flag bit 0
    else:
        _set_central_directory_field(path, "config.json", 10, (99).to_bytes(2, "little"))
    with pytest.raises(ModelLoadError, match=f"damaged zip archive.*{says}") as refused:
        load_model(path)
    assert "\n" not in str(refused.value)


def test_a_config_json_with_a_number_too_long_to_convert_is_one_line(tmp_path, good_model_file):
    import sys

    if not hasattr(sys, "set_int_max_str_digits"):
        pytest.skip("this Python converts numbers of any length")
    limit = sys.get_int_max_str_digits()
    sys.set_int_max_str_digits(4300)  # Python's default, which PYTHONINTMAXSTRDIGITS may have changed
    path = tmp_path / "long-number.keras"
    with zipfile.ZipFile(good_model_file) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            config = b'{"class_name": "Sequential", "n": 1' + b"0" * 5000 + b"}"
            dst.writestr(info.filename, config if info.filename == "config.json" else src.read(info))
    try:
        with pytest.raises(ModelLoadError, match="config.json is not valid JSON.*4300 digits"):
            load_model(path)
    finally:
        sys.set_int_max_str_digits(limit)


def test_directory_without_model_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="directory without model.keras"):
        load_model(tmp_path)


def test_a_model_path_that_is_no_file_says_what_it_is(tmp_path):
    (tmp_path / "dangling.keras").symlink_to(tmp_path / "gone.keras")
    with pytest.raises(ModelLoadError, match="dangling.keras is a symbolic link to nothing \\(or a loop of links\\); "
                                             "fix the link"):
        load_model(tmp_path / "dangling.keras")
    made = {"fifo": os.mkfifo, "directory": Path.mkdir,
            "dangling link": lambda path: path.symlink_to(tmp_path / "gone.keras")}
    says = {"fifo": "is not a regular file \\(a FIFO or a device\\)", "directory": "is a directory",
            "dangling link": "is a symbolic link to nothing"}
    for kind, make in made.items():  # as a run's model.keras: named, not taken for a missing one
        run = tmp_path / kind
        run.mkdir()
        make(run / "model.keras")
        with pytest.raises(ModelLoadError, match=f"{re.escape(str(run / 'model.keras'))} {says[kind]}"):
            load_model(run)


def test_missing_path_and_wrong_suffix_are_refused(tmp_path, good_model_file):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nope.keras")
    other = tmp_path / "model.zip"
    other.write_bytes(good_model_file.read_bytes())
    with pytest.raises(ModelLoadError, match="expected a .keras file"):
        load_model(other)


@pytest.mark.parametrize(
    "input_shape, classes, message",
    [((32, 32, 3), 10, r"input shape \[\(32, 32, 3\)\]"), ((28, 28, 1), 5, r"output shape \[\(5,\)\]")],
)
def test_model_of_another_task_is_refused(tmp_path, input_shape, classes, message):
    path = tmp_path / "other.keras"
    _tiny_model(input_shape=input_shape, classes=classes).save(path)
    check_archive(path)  # a perfectly sound archive ...
    with pytest.raises(ModelLoadError, match=message + ".*another task"):
        load_model(path)  # ... of the wrong model


def test_error_is_one_line(tmp_path):
    path = tmp_path / "model.keras"
    path.write_text("garbage")
    with pytest.raises(ModelLoadError) as info:
        load_model(path)
    assert "\n" not in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("depth", [100, 100_000])
def test_deeply_nested_config_is_refused_in_one_line(tmp_path, good_model_file, depth):
    path = tmp_path / "deep.keras"
    with zipfile.ZipFile(good_model_file) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename == "config.json":
                config = json.loads(data)
                data = json.dumps(config)[:-1].encode() + b', "extra": ' + b"[" * depth + b"]" * depth + b"}"
            dst.writestr(info.filename, data)
    with pytest.raises(ModelLoadError, match="nests lists or objects more than 64 levels deep") as error:
        check_archive(path)
    assert "\n" not in str(error.value)


def _run_dir(root, *models, source):
    run = root / "runs" / "20261201-101500"
    for name in models:
        (run / name).mkdir(parents=True)
        (run / name / "model.keras").write_bytes(source.read_bytes())
    (run / "run.json").write_text(json.dumps({"models": list(models)}))
    (root / "runs" / "latest").symlink_to(run.name)
    return run


def test_run_directory_with_one_model_means_that_model(tmp_path, good_model_file):
    run = _run_dir(tmp_path, "cnn", source=good_model_file)
    notes = []
    assert resolve_model_path(run, notes.append) == run / "cnn" / "model.keras"
    assert notes == [f"Using {run / 'cnn' / 'model.keras'}"]
    latest = tmp_path / "runs" / "latest"
    assert resolve_model_path(latest) == latest / "cnn" / "model.keras"
    assert isinstance(load_model(latest), keras.Model)


def test_run_directory_with_several_models_lists_them(tmp_path, good_model_file):
    run = _run_dir(tmp_path, "mlp", "cnn", source=good_model_file)
    for given in (run, tmp_path / "runs" / "latest"):
        with pytest.raises(AmbiguousModelError) as error:
            resolve_model_path(given)
        choices = f"{given / 'cnn'}, {given / 'mlp'}"
        assert str(error.value) == f"{given} holds several models (cnn, mlp); pass one of {choices}."
        assert exit_code(error.value) == 2
    assert exit_code(ModelLoadError("x")) == 1


def test_a_tilde_of_an_unknown_user_is_a_path_that_does_not_exist_not_a_traceback(tmp_path, monkeypatch):
    from fmnist_keras import export
    from fmnist_keras.data import DataError, find_source
    from fmnist_keras.loading import ModelLoadError, resolve_model_path

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="~nobody-fmnist/x.keras does not exist"):
        resolve_model_path("~nobody-fmnist/x.keras")
    with pytest.raises(DataError, match="~nobody-fmnist/idx, which is not a directory"):
        find_source("~nobody-fmnist/idx")
    assert export.check_output("~nobody-fmnist/o.onnx", "onnx", overwrite=False) == Path("~nobody-fmnist/o.onnx")


def test_a_model_file_in_upper_case_is_told_to_be_renamed(tmp_path, good_model_file):
    from fmnist_keras.loading import ModelLoadError, resolve_model_path

    upper = tmp_path / "MODEL.KERAS"
    upper.write_bytes(Path(good_model_file).read_bytes())
    with pytest.raises(ModelLoadError, match=r"ends in '.KERAS'; Keras reads a model file only by the suffix .keras, "
                                             r"in lower case; rename it to MODEL.keras"):
        resolve_model_path(upper)


def test_exists_or_link_counts_a_dangling_link_and_raises_on_an_overlong_name(tmp_path):
    # os.path.lexists would answer False for the overlong name, and the commands' one-line file-system error
    # ("… File name too long; use a shorter name") would never come.
    import errno
    import os

    from fmnist_keras.rundir import exists_or_link

    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert exists_or_link(tmp_path / "dangling") and not exists_or_link(tmp_path / "missing")
    with pytest.raises(OSError) as raised:
        exists_or_link(tmp_path / ("a" * (os.pathconf(tmp_path, "PC_NAME_MAX") + 1)))
    assert raised.value.errno == errno.ENAMETOOLONG

"""The export command: an independent runtime loads the file and predicts like Keras.

ONNX export needs extras on the tensorflow (tf2onnx) and jax (jax2onnx)
backends, and a TensorFlow SavedModel needs torch_xla on the torch backend;
a test that cannot run on this pass's backend says so in its skip reason.
"""

import importlib.util
import os
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import synthetic_images
from fmnist_keras import export
from fmnist_keras.models import build_cnn, build_mlp

BACKEND = keras.backend.backend()
TOLERANCE = 1e-4


def _needs(format, *packages):
    missing = export.missing_packages(format, BACKEND) + [p for p in packages if importlib.util.find_spec(p) is None]
    return pytest.mark.skipif(
        bool(missing), reason=f"{format} export on the {BACKEND} backend needs {', '.join(missing)}, not installed"
    )


@pytest.fixture
def images():
    """Seven model-ready images: a batch size the export never saw."""
    return (synthetic_images(np.arange(7) % 10, seed=5)[..., None] / 255.0).astype(np.float32)


@pytest.fixture(params=["cnn", "mlp"])
def saved_model(request, tmp_path):
    """A tiny trained model (with augmentation and BatchNorm layers) saved as .keras."""
    keras.utils.set_random_seed(0)
    if request.param == "cnn":
        model = build_cnn(filters=(4, 8), dense_units=16, seed=0)
    else:
        model = build_mlp(units=(16,), augment=True, seed=0)
    rng = np.random.default_rng(0)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(rng.random((32, 28, 28, 1), dtype=np.float32), rng.integers(0, 10, 32), batch_size=8, verbose=0)
    path = tmp_path / f"{request.param}.keras"
    model.save(path)
    return path, model


@_needs("onnx", "onnxruntime")
def test_onnx_export_predicts_like_keras_in_onnxruntime(saved_model, images, tmp_path, capsys):
    import onnxruntime

    path, model = saved_model
    output = tmp_path / "model.onnx"
    assert export.main([str(path), "--format", "onnx", "--output", str(output)]) == 0
    assert f"to onnx on the {BACKEND} backend" in capsys.readouterr().out
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map == dict([export.ONNX_STAMP])  # what --overwrite looks for
    (onnx_input,) = session.get_inputs()
    assert onnx_input.shape[1:] == [28, 28, 1]
    (probabilities,) = session.run(None, {onnx_input.name: images})
    expected = keras.ops.convert_to_numpy(model.predict(images, verbose=0))
    assert probabilities.shape == (7, 10)
    assert np.max(np.abs(probabilities - expected)) <= TOLERANCE
    # Not a trivial agreement: the trained model gives different outputs to different images.
    assert np.ptp(expected, axis=0).max() > 1e-3


@_needs("tf_saved_model", "tensorflow")
def test_tf_saved_model_export_predicts_like_keras_in_tensorflow(saved_model, images, tmp_path):
    import tensorflow as tf

    path, model = saved_model
    output = tmp_path / "saved_model"
    assert export.main([str(path), "--format", "tf_saved_model", "--output", str(output)]) == 0
    artifact = tf.saved_model.load(str(output))
    probabilities = artifact.serve(tf.constant(images)).numpy()
    expected = keras.ops.convert_to_numpy(model.predict(images, verbose=0))
    assert np.max(np.abs(probabilities - expected)) <= TOLERANCE


def test_inference_model_runs_augmentation_and_batchnorm_in_inference_mode(images):
    # A plain call of a model with augmentation layers runs them, and the
    # BatchNorm after them, in training mode; the export wrapper must not.
    model = build_cnn(filters=(4, 8), dense_units=16, seed=0)
    expected = keras.ops.convert_to_numpy(model.predict(images, verbose=0))
    wrapped = export.inference_model(model)
    assert np.max(np.abs(keras.ops.convert_to_numpy(wrapped(images)) - expected)) <= 1e-6


@_needs("onnx", "onnxruntime")
def test_mixed_precision_model_exports_a_float32_graph(tmp_path, images):
    import onnxruntime

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = build_cnn(filters=(4, 8), dense_units=16, seed=0)
    finally:
        keras.config.set_dtype_policy("float32")
    model.save(tmp_path / "mixed.keras")
    assert export.main([str(tmp_path / "mixed.keras"), "--format", "onnx", "--output", str(tmp_path / "m.onnx")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (probabilities,) = session.run(None, {session.get_inputs()[0].name: images})
    assert probabilities.dtype == np.float32
    # The graph is the float32 twin of the model: the same weights, computed in float32.
    twin = build_cnn(filters=(4, 8), dense_units=16, seed=1)
    twin.set_weights(model.get_weights())
    expected = keras.ops.convert_to_numpy(twin.predict(images, verbose=0))
    assert np.ptp(expected, axis=0).max() > 1e-3  # the images get different outputs
    assert np.max(np.abs(probabilities - expected)) <= TOLERANCE
    # bfloat16 keeps ~3 significant digits: the mixed-precision model agrees to that.
    assert np.max(np.abs(probabilities - keras.ops.convert_to_numpy(model.predict(images, verbose=0)))) < 2e-2


# ---- bad input --------------------------------------------------------------


def test_unknown_format_is_refused_with_the_choices(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tmp_path / "m.keras"), "--format", "tflite", "--output", str(tmp_path / "x")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'tflite'" in err and "onnx" in err and "tf_saved_model" in err
    with pytest.raises(export.ExportError, match="unknown export format 'tflite'; choose one of onnx, tf_saved_model"):
        export.choose_backend("tflite")


def test_not_a_keras_file_gives_one_line_error(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    fake = tmp_path / "fake.keras"
    fake.write_text("not a zip")
    for path, expected in ((text, "expected a .keras file"), (fake, "is not a zip archive")):
        assert export.main([str(path), "--format", "onnx", "--output", str(tmp_path / "x.onnx")]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and expected in err and "\n" not in err
    assert not (tmp_path / "x.onnx").exists()


def test_existing_output_is_not_overwritten_silently(tmp_path, capsys):
    (tmp_path / "model.onnx").write_text("keep me")
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(tmp_path / "m.keras"), "--format", "onnx", "--output", str(tmp_path / "model.onnx")])
    assert exit_info.value.code == 2
    assert "already exists; choose another --output or pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "model.onnx").read_text() == "keep me"


def test_missing_package_names_it_and_the_pip_install(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name in ("tensorflow", "jax2onnx") else real_find_spec(name, *a)
    )
    with pytest.raises(export.ExportError) as error:
        export.choose_backend("tf_saved_model", "tensorflow")
    assert "needs tensorflow, which is not installed here; run: pip install tensorflow" in str(error.value)
    with pytest.raises(export.ExportError, match="needs jax2onnx.*pip install jax2onnx, or pass --backend torch"):
        export.choose_backend("onnx", "jax")
    # With no backend named anywhere, the first backend that can export is taken; an empty name is none.
    monkeypatch.delenv("KERAS_BACKEND")
    assert export.choose_backend("onnx") == "torch"
    monkeypatch.setenv("KERAS_BACKEND", "")
    assert export.choose_backend("onnx") == "torch"
    build_mlp(units=(4,)).save(tmp_path / "m.keras")
    with pytest.raises(SystemExit):
        export.main([str(tmp_path / "m.keras"), "--format", "tf_saved_model", "--output", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("python -m fmnist_keras.export: error: exporting to tf_saved_model")
    assert "pip install tensorflow" in err


def test_help_lists_what_each_backend_needs_and_imports_no_keras():
    import subprocess
    import sys

    code = "import sys; from fmnist_keras import export; print(export.build_parser().format_help()); print('keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().endswith("False")
    assert "onnx: torch (onnx, onnxscript)" in out and "tf_saved_model: tensorflow (nothing more)" in out


# ---- output paths: nothing export did not write is ever replaced ----------------


@pytest.fixture
def tiny_model_file(tmp_path):
    path = tmp_path / "models" / "m.keras"
    path.parent.mkdir()
    build_mlp(units=(4,)).save(path)
    return path


def _refused(argv, capsys, *expected):
    with pytest.raises(SystemExit) as exit_info:
        export.main([str(a) for a in argv])
    assert exit_info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "error: " in last and all(text in last for text in expected), last
    return last


@pytest.mark.parametrize("output", ["", ".", "..", "./", "sub/..", "CWD"])
def test_output_naming_the_working_directory_is_refused_and_nothing_is_deleted(
        output, tiny_model_file, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work" / "here"
    (work / "sub").mkdir(parents=True)
    (work / "keep.txt").write_text("keep me")
    monkeypatch.chdir(work)
    output = str(work) if output == "CWD" else output
    _refused([tiny_model_file, "--format", "onnx", "--output", output, "--overwrite"], capsys, "--output")
    assert (work / "keep.txt").read_text() == "keep me" and (work / "sub").is_dir()


@pytest.mark.parametrize("output", ["/", "~", "HOME_PARENT"])
def test_output_naming_root_or_home_is_refused(output, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home" / "me"))
    (tmp_path / "home" / "me").mkdir(parents=True)
    output = str(tmp_path / "home") if output == "HOME_PARENT" else output
    for format in export.FORMATS:
        with pytest.raises(export.ExportError, match="the current directory, the home directory or one of their"):
            export.check_output(output, format, overwrite=True)


@pytest.mark.parametrize("below", ["", "/x.onnx"])
def test_output_through_a_loop_of_symlinks_is_one_line(tmp_path, monkeypatch, below):
    monkeypatch.chdir(tmp_path)
    Path("l1").symlink_to("l2")
    Path("l2").symlink_to("l1")
    for format in export.FORMATS:
        with pytest.raises(export.ExportError, match="goes through a loop of symbolic links") as refused:
            export.check_output(f"l1{below}", format, overwrite=True)
        assert "\n" not in str(refused.value)
    assert Path("l1").is_symlink() and Path("l2").is_symlink()


def test_onnx_output_that_is_a_directory_symlink_or_below_a_file_is_refused(tiny_model_file, tmp_path, capsys):
    directory = tmp_path / "out"
    (directory / "inner").mkdir(parents=True)
    (tmp_path / "target.onnx").write_text("keep me")
    (tmp_path / "link.onnx").symlink_to(tmp_path / "target.onnx")
    (tmp_path / "afile").write_text("keep me")
    args = [tiny_model_file, "--format", "onnx", "--overwrite", "--output"]
    _refused([*args, directory], capsys, "is a directory; an ONNX export is one file")
    _refused([*args, tmp_path / "link.onnx"], capsys, "is a symlink")
    _refused([*args, tmp_path / "afile" / "x.onnx"], capsys, "which is a file, not a directory")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    _refused([*args, tmp_path / "dangling" / "sub" / "x.onnx"], capsys, f"lies below {tmp_path / 'dangling'}, which "
             f"is a symbolic link to nothing (or a loop of links), not a directory; fix the link or pass")
    _refused([*args, tiny_model_file], capsys, "is not an ONNX model")
    _refused([*args, f"{tmp_path / 'new.onnx'}/"], capsys, "ends with a slash, which names a directory, but an ONNX "
                                                           "export is one file")
    assert not (tmp_path / "new.onnx").exists()
    assert (directory / "inner").is_dir() and (tmp_path / "target.onnx").read_text() == "keep me"
    assert (tmp_path / "link.onnx").is_symlink() and (tmp_path / "afile").read_text() == "keep me"
    assert tiny_model_file.stat().st_size > 100


@_needs("onnx", "onnxruntime")
def test_overwrite_replaces_an_onnx_file_only_after_a_good_export(tiny_model_file, tmp_path, monkeypatch, capsys):
    output = tmp_path / "model.onnx"
    assert export.main([str(tiny_model_file), "--format", "onnx", "--output", str(output)]) == 0
    old_export = output.read_bytes()

    def broken(*args, **kwargs):
        raise RuntimeError("exporter crashed")

    with monkeypatch.context() as patch:
        patch.setattr(export, "export_model", broken)
        assert export.main([str(tiny_model_file), "--format", "onnx", "--output", str(output), "--overwrite"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "is unchanged" in err
    assert output.read_bytes() == old_export
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "models"]  # no temporary left
    before = output.stat().st_ino
    assert export.main([str(tiny_model_file), "--format", "onnx", "--output", str(output), "--overwrite"]) == 0
    assert output.stat().st_ino != before and output.stat().st_mode & 0o044  # replaced, an ordinary readable file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "models"]


@pytest.mark.parametrize("content", [b"my notes", b'{"epochs": 3}', b"", bytes(range(256))])
def test_overwrite_never_replaces_a_file_that_is_not_an_onnx_model(content, tiny_model_file, tmp_path, capsys):
    notes = tmp_path / "notes.onnx"
    notes.write_bytes(content)
    _refused([tiny_model_file, "--format", "onnx", "--output", notes, "--overwrite"], capsys, "is not an ONNX model")
    assert notes.read_bytes() == content


@_needs("onnx")  # the export itself is stubbed, but this backend must be one that can export ONNX
def test_only_an_onnx_file_export_wrote_is_replaced_read_once_and_never_when_too_large(
        tiny_model_file, tmp_path, monkeypatch, capsys):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    value = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in ("x", "y")]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "earlier_export", value[:1], value[1:])
    earlier = tmp_path / "earlier.onnx"
    stamped = helper.make_model(graph)
    helper.set_model_props(stamped, dict([export.ONNX_STAMP]))
    onnx.save(stamped, earlier)
    vendor = tmp_path / "vendor.onnx"
    onnx.save(helper.make_model(graph, producer_name="someone-else"), vendor)  # an ONNX model export did not write
    _refused([tiny_model_file, "--format", "onnx", "--output", vendor, "--overwrite"], capsys,
             "is not an ONNX model that export wrote")
    assert onnx.load(str(vendor)).producer_name == "someone-else"
    reads, real_load = [], onnx.load
    monkeypatch.setattr(onnx, "load", lambda path, **kwargs: reads.append(path) or real_load(path, **kwargs))

    def broken(*args):
        raise RuntimeError("stopped before writing")

    monkeypatch.setattr(export, "write_export", broken)
    assert export.main([str(tiny_model_file), "--format", "onnx", "--output", str(earlier), "--overwrite"]) == 1
    assert reads == [str(earlier)] and "stopped before writing" in capsys.readouterr().err
    huge = tmp_path / "huge.onnx"
    with open(huge, "wb") as sparse:
        sparse.truncate(export.MAX_ONNX_BYTES + 1)  # takes no disk space
    _refused([tiny_model_file, "--format", "onnx", "--output", huge, "--overwrite"], capsys, "more than one ONNX file holds")
    assert reads == [str(earlier)] and huge.stat().st_size == export.MAX_ONNX_BYTES + 1


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_file_that_appears_at_the_output_during_an_onnx_export_is_left_alone(tmp_path, monkeypatch, overwrite):
    output = tmp_path / "race.onnx"

    def export_while_the_user_writes(model, path, format):
        Path(path).write_bytes(b"the export")
        output.write_text("user data")  # written at --output while the export runs

    monkeypatch.setattr(export, "export_model", export_while_the_user_writes)
    monkeypatch.setattr(export, "_stamp_onnx", lambda path: None)
    checked = export.check_output(str(output), "onnx", overwrite)  # nothing there yet
    with pytest.raises(export.ExportError, match="appeared during the export|changed during the export") as error:
        export.write_export("model", checked, "onnx", overwrite)
    assert "left alone" in str(error.value)
    assert output.read_text() == "user data" and sorted(p.name for p in tmp_path.iterdir()) == ["race.onnx"]


def test_the_model_being_exported_is_never_its_output(tiny_model_file, tmp_path):
    (tmp_path / "alias").symlink_to(tiny_model_file.parent, target_is_directory=True)
    with pytest.raises(export.ExportError, match="is the model being exported"):
        export.check_not_the_model(tmp_path / "alias" / tiny_model_file.name, tiny_model_file)
    export.check_not_the_model(tmp_path / "model.onnx", tiny_model_file)  # a new file is fine


def _fake_saved_model(model, output, format):
    (Path(output) / "saved_model.pb").write_text(f"export of {model}")
    return output


def test_saved_model_directory_export_did_not_write_is_never_replaced(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(export.ExportError, match=f"did not write \\(no {export.EXPORT_MARKER} in it\\)"):
        export.check_output(str(mine), "tf_saved_model", overwrite=True)
    (tmp_path / "file").write_text("keep me")
    with pytest.raises(export.ExportError, match="is not a directory"):
        export.check_output(str(tmp_path / "file"), "tf_saved_model", overwrite=True)
    (tmp_path / "link").symlink_to(mine)
    with pytest.raises(export.ExportError, match="is a symlink"):
        export.check_output(str(tmp_path / "link"), "tf_saved_model", overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me" and (tmp_path / "file").read_text() == "keep me"


@pytest.mark.parametrize("theirs", ["notes.txt", "variables/notes.txt", "assets/link", "marker-link",
                                    "assets/vocab.txt", "assets.extra/tf_serving_warmup_requests"])
def test_saved_model_directory_with_what_export_did_not_write_is_never_replaced(tmp_path, monkeypatch, theirs):
    # A file of the user's inside an export, or a marker that is a link planted in the user's directory.
    monkeypatch.setattr(export, "export_model", _fake_saved_model)
    output = tmp_path / "saved"
    export.write_export("first", export.check_output(str(output), "tf_saved_model", overwrite=False), "tf_saved_model")
    for directory in ("variables", "assets", "assets.extra"):
        (output / directory).mkdir()
    (tmp_path / "precious.txt").write_text("keep me")
    if theirs == "marker-link":
        (output / export.EXPORT_MARKER).unlink()
        (output / export.EXPORT_MARKER).symlink_to(tmp_path / "precious.txt")
        named = f"no {export.EXPORT_MARKER} in it"
    else:
        if theirs.endswith("link"):
            (output / theirs).symlink_to(tmp_path / "precious.txt")
        else:
            (output / theirs).write_text("keep me")
        named = f"it holds {output / theirs}, which export did not write"
    before = sorted(p.name for p in output.rglob("*"))
    with pytest.raises(export.ExportError, match=f"export did not write \\({named}\\), so it is never replaced"):
        export.check_output(str(output), "tf_saved_model", overwrite=True)
    assert sorted(p.name for p in output.rglob("*")) == before and (tmp_path / "precious.txt").read_text() == "keep me"


def test_the_asset_files_an_export_wrote_are_its_own_to_replace(tmp_path, monkeypatch):
    def with_assets(model, output, format):
        _fake_saved_model(model, output, format)
        (Path(output) / "assets" / "table").mkdir(parents=True)
        (Path(output) / "assets" / "table" / "vocab.txt").write_text(f"vocabulary of {model}")
        return output

    monkeypatch.setattr(export, "export_model", with_assets)
    output = tmp_path / "saved"
    export.write_export("first", export.check_output(str(output), "tf_saved_model", overwrite=False), "tf_saved_model")
    assert (output / export.EXPORT_MARKER).read_text().splitlines()[1:] == ["assets/table/vocab.txt"]
    export.write_export("second", export.check_output(str(output), "tf_saved_model", overwrite=True), "tf_saved_model",
                        overwrite=True)
    assert (output / "assets" / "table" / "vocab.txt").read_text() == "vocabulary of second"


def test_saved_model_overwrite_swaps_in_only_a_finished_export(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "export_model", _fake_saved_model)
    output = tmp_path / "saved"
    export.write_export("first", export.check_output(str(output), "tf_saved_model", overwrite=False), "tf_saved_model")
    assert (output / export.EXPORT_MARKER).is_file() and (output / "saved_model.pb").read_text() == "export of first"
    with pytest.raises(export.ExportError, match="already exists; choose another --output or pass --overwrite"):
        export.check_output(str(output), "tf_saved_model", overwrite=False)

    def broken(*args):
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(export, "export_model", broken)
    with pytest.raises(RuntimeError):
        export.write_export("second", export.check_output(str(output), "tf_saved_model", overwrite=True),
                            "tf_saved_model", overwrite=True)
    assert (output / "saved_model.pb").read_text() == "export of first"
    monkeypatch.setattr(export, "export_model", _fake_saved_model)
    export.write_export("third", export.check_output(str(output), "tf_saved_model", overwrite=True), "tf_saved_model",
                        overwrite=True)
    assert (output / "saved_model.pb").read_text() == "export of third"
    assert [p.name for p in tmp_path.iterdir()] == ["saved"]  # no temporary or old copy left


@_needs("onnx")
@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs /proc, which takes no new file")
def test_a_place_that_takes_no_new_file_is_one_line_naming_the_output(tiny_model_file, capsys):
    assert export.main([str(tiny_model_file), "--format", "onnx", "--output", "/proc/x.onnx"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: export cannot use /proc/x.onnx: ") and err.count("\n") == 1, err
    assert ".partial" not in err and "--backend" not in err


def test_an_output_whose_last_part_is_a_dot_is_refused_not_written_as_its_parent(tmp_path):
    for text in (f"{tmp_path}/newname/.", f"{tmp_path}/newname/./", f"{tmp_path}/newname/.//", f"{tmp_path}/a/.."):
        for format in ("onnx", "tf_saved_model"):
            with pytest.raises(export.ExportError, match="names a directory"):
                export.check_output(text, format, overwrite=False)
    assert list(tmp_path.iterdir()) == []


def test_an_unknown_backend_from_the_environment_is_named_as_such(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "numpy")
    with pytest.raises(export.ExportError, match=r"unknown backend 'numpy' \(from \$KERAS_BACKEND\)"):
        export.choose_backend("onnx")

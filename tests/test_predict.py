"""fmnist_keras.predict: pictures and arrays in, top-k classes out, one clear line per bad file."""

import json
import os
import re

import keras
import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import REAL_DATA_DIR, real_data_available, synthetic_images, without_tensorflow_logs
from fmnist_keras import data as fdata
from fmnist_keras import predict

# ---- a tiny trained model ----------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small MLP fitted for a few seconds on a real subset (synthetic data without it).

    Returns ``(model_path, x_test, y_test)`` with uint8 test images.
    """
    if real_data_available():
        (x_train, y_train), (x_test, y_test) = fdata.load_data(REAL_DATA_DIR)
        keep = fdata.stratified_subset(y_train, 2000, seed=0)
        x_train, y_train, x_test, y_test = x_train[keep], y_train[keep], x_test[:40], y_test[:40]
    else:
        y_train = np.tile(np.arange(10, dtype=np.uint8), 100)
        y_test = np.arange(10, dtype=np.uint8)
        x_train, x_test = synthetic_images(y_train, 0), synthetic_images(y_test, 1)
    keras.utils.set_random_seed(0)
    inputs = keras.Input(shape=(28, 28, 1))
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(64, activation="relu")(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.Adam(3e-3), "sparse_categorical_crossentropy")
    model.fit(fdata.to_model_input(x_train), y_train, epochs=2, batch_size=128, verbose=0)
    path = tmp_path_factory.mktemp("model") / "model.keras"
    model.save(path)
    return path, x_test, y_test


# ---- pure image preparation ----------------------------------------------------


def _shape_picture(size, background, foreground, mode="L"):
    image = Image.new(mode, size, background)
    width, height = size
    ImageDraw.Draw(image).rectangle(
        [width // 3, height // 5, 2 * width // 3, 4 * height // 5], fill=foreground
    )
    return image


def test_light_shape_on_dark_is_kept_and_fills_the_square():
    pixels, inverted = predict.prepare_image(_shape_picture((120, 90), 10, 220))
    assert not inverted
    assert pixels.shape == (28, 28) and pixels.dtype == np.uint8
    assert pixels[14, 14] > 200  # object light
    assert pixels[0, 0] == 0  # background mapped to 0, as in Fashion-MNIST
    rows = np.flatnonzero(pixels.max(axis=1) > 100)
    assert rows[0] <= 1 and rows[-1] >= 26  # trimmed, longest edge resized to 28


def test_dark_shape_on_light_rgb_photo_is_inverted():
    picture = _shape_picture((300, 200), (250, 250, 245), (30, 20, 60), mode="RGB")
    pixels, inverted = predict.prepare_image(picture)
    assert inverted
    assert pixels.shape == (28, 28)
    assert pixels[14, 14] > 180 and pixels[0, 0] < 20


def test_invert_flag_overrides_the_border_rule():
    picture = _shape_picture((60, 60), 10, 220)
    yes, inverted_yes = predict.prepare_image(picture, invert="yes")
    no, inverted_no = predict.prepare_image(picture, invert="no")
    assert inverted_yes and not inverted_no
    assert no[14, 14] > 200 and yes[14, 14] < 60


def test_transparent_background_counts_as_light():
    picture = Image.new("RGBA", (80, 80), (0, 0, 0, 0))  # transparent *black*
    ImageDraw.Draw(picture).ellipse([20, 10, 60, 70], fill=(40, 40, 40, 255))
    pixels, inverted = predict.prepare_image(picture)
    assert inverted and pixels[14, 14] > 150 and pixels[0, 0] < 20


def test_28x28_image_is_taken_as_is():
    original = synthetic_images(np.array([3]), 0)[0]
    pixels, inverted = predict.prepare_image(Image.fromarray(original))
    assert not inverted
    np.testing.assert_array_equal(pixels, original)


def test_upscaled_inverted_photo_of_a_dataset_image_comes_back_close():
    """A data set image, blown up 10x and printed dark-on-light, maps back near the original."""
    if real_data_available():
        original = fdata.load_data(REAL_DATA_DIR)[1][0][0]
    else:
        original = synthetic_images(np.array([7]), 0)[0]
    photo = Image.fromarray(255 - original).resize((280, 280), Image.Resampling.BICUBIC).convert("RGB")
    pixels, inverted = predict.prepare_image(photo)
    assert inverted
    assert np.abs(pixels.astype(int) - original.astype(int)).mean() < 25


def test_array_to_images_shapes_and_dtypes():
    assert predict.array_to_images(np.zeros((28, 28), np.uint8)).shape == (1, 28, 28)
    assert predict.array_to_images(np.zeros((4, 28, 28, 1), np.uint8)).shape == (4, 28, 28)
    floats = predict.array_to_images(np.full((2, 28, 28), 0.5, np.float32))
    assert floats.dtype == np.uint8 and floats[0, 0, 0] == 128


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((3, 32, 32), np.uint8), r"shape \(3, 32, 32\); expected \(28, 28\)"),
        (np.zeros((2, 28, 28, 3), np.uint8), "shape"),
        (np.zeros((0, 28, 28), np.uint8), "N >= 1"),
        (np.zeros((28, 28), np.int64), "dtype int64; expected uint8"),
        (np.full((28, 28), 255.0), r"values in \[255, 255\]; expected \[0, 1\]"),
        (np.full((28, 28), np.nan), "NaN"),
    ],
)
def test_array_to_images_refuses_bad_arrays(array, message):
    with pytest.raises(predict.InputError, match=message):
        predict.array_to_images(array, "x.npy")


def test_top_k_is_sorted():
    probs = np.array([0.05, 0.5, 0.05, 0.3, 0.1, 0, 0, 0, 0, 0])
    ranked = predict.top_k(probs, 3, fdata.CLASS_NAMES)
    assert [r["class"] for r in ranked] == ["Trouser", "Dress", "Coat"]
    assert ranked[0]["probability"] == pytest.approx(0.5)


# ---- bad files -----------------------------------------------------------------


def _bad_files(directory):
    """Every kind of bad input, each with the phrase its error must contain."""
    directory.mkdir(exist_ok=True)
    good_png = directory / "good.png"
    _shape_picture((50, 50), 0, 200).save(good_png)
    jpeg = directory / "photo.jpg"
    _shape_picture((200, 150), (255, 255, 255), (0, 0, 0), mode="RGB").save(jpeg)
    files = {}
    (directory / "text.png").write_text("not a picture\n")
    files["text.png"] = "not an image predict reads"
    (directory / "empty.jpg").write_bytes(b"")
    files["empty.jpg"] = r"is empty \(0 bytes\)"
    png = good_png.read_bytes()
    (directory / "truncated.png").write_bytes(png[: len(png) // 2])
    files["truncated.png"] = "damaged or truncated image"
    jpg = jpeg.read_bytes()
    (directory / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    files["truncated.jpg"] = "damaged or truncated image"
    np.save(directory / "shape.npy", np.zeros((2, 32, 32), np.uint8))
    files["shape.npy"] = r"array of shape \(2, 32, 32\)"
    np.save(directory / "dtype.npy", np.zeros((28, 28), np.int32))
    files["dtype.npy"] = "dtype int32"
    np.save(directory / "pickled.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    files["pickled.npy"] = "Object arrays cannot be loaded when allow_pickle=False"
    np.savez(directory / "several.npz", a=np.zeros((28, 28), np.uint8))
    (directory / "several.npz").rename(directory / "several.npy")
    files["several.npy"] = r"several.npy: holds several arrays \(.npz\); expected one array in a .npy file.$"
    (directory / "garbage.npy").write_bytes(b"\x93NUMPY garbage")
    files["garbage.npy"] = "not a plain .npy array|cannot read it as .npy"
    (directory / "a_directory").mkdir(exist_ok=True)
    files["a_directory"] = "is a directory"
    files["missing.png"] = "no such file"
    os.mkfifo(directory / "fifo.png")  # reading it would block until someone writes
    files["fifo.png"] = r"not a regular file \(a FIFO or a device\)"
    (directory / "zero.npy").symlink_to("/dev/zero")  # reading it would never end
    files["zero.npy"] = r"not a regular file \(a FIFO or a device\)"
    (directory / "dangling.png").symlink_to(directory / "gone.png")
    files["dangling.png"] = "a symbolic link to nothing"
    if os.path.isfile("/proc/self/status"):  # Linux: 0 bytes by stat, a page of text when read
        (directory / "proc.png").symlink_to("/proc/self/status")
        files["proc.png"] = r"a file whose size the system does not report \(as under /proc or /sys\); copy it"
    return files


def test_every_bad_file_gets_its_own_error(tmp_path):
    for name, message in _bad_files(tmp_path / "in").items():
        with pytest.raises(predict.InputError, match=message) as info:
            predict.read_input(tmp_path / "in" / name)
        assert name in str(info.value) and "\n" not in str(info.value)


def test_a_postscript_picture_is_never_handed_to_ghostscript(tmp_path, monkeypatch):
    # Pillow opens EPS by its content whatever the name, and runs Ghostscript (gs) to draw it.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "gs").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'gs-ran'}\nexit 1\n")
    (fake_bin / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    shirt = tmp_path / "shirt.png"
    shirt.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(predict.InputError, match="shirt.png: not an image predict reads"):
        predict.read_input(shirt)
    assert not (tmp_path / "gs-ran").exists()


def test_a_decoders_own_error_and_pillows_warnings_and_logs_give_one_line(tmp_path, monkeypatch, capsys):
    import logging
    import warnings

    from PIL import ImageFile

    path = tmp_path / "odd.png"
    _shape_picture((50, 50), 0, 200).save(path)

    def failing_load(self):
        warnings.warn("Tag data larger than file", UserWarning)
        logging.getLogger("PIL.TiffImagePlugin").error("More samples per pixel than can be decoded")
        raise RuntimeError("Failed to decode frame 0")

    monkeypatch.setattr(ImageFile.ImageFile, "load", failing_load)
    monkeypatch.setattr(logging.root, "handlers", [])  # as outside pytest: Python's last-resort handler prints
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning that escaped would fail here
        with pytest.raises(predict.InputError, match=r"odd.png: damaged or truncated image \(Failed to decode"):
            predict.read_input(path)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("side", [10000, 13500])  # over Pillow's warning and error limits
def test_decompression_bomb_is_refused(tmp_path, side):
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path)  # a few kB on disk, 100+ Mpixels decoded
    with pytest.raises(predict.InputError, match="bomb.png: refused, Image size"):
        predict.read_input(path)


def test_pickled_npy_is_not_unpickled(tmp_path, monkeypatch):
    """A .npy whose pickle would write a file is refused without running it."""
    marker = tmp_path / "pwned.txt"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    np.save(tmp_path / "evil.npy", np.array([Payload()], dtype=object), allow_pickle=True)
    assert not marker.exists()
    with pytest.raises(predict.InputError, match="allow_pickle=False"):
        predict.read_input(tmp_path / "evil.npy")
    assert not marker.exists()


# ---- the command ---------------------------------------------------------------


def test_cli_classifies_good_files_and_reports_bad_ones(trained, tmp_path, capsys):
    model_path, _, _ = trained
    bad = _bad_files(tmp_path / "in")
    good = [tmp_path / "in" / "good.png", tmp_path / "in" / "photo.jpg"]
    np.save(tmp_path / "in" / "batch.npy", np.zeros((3, 28, 28, 1), np.float32))
    good.append(tmp_path / "in" / "batch.npy")
    argv = [str(model_path), *map(str, good), *(str(tmp_path / "in" / n) for n in bad)]
    assert predict.main(argv) == 1
    out, err = capsys.readouterr()
    err_lines = err.strip().splitlines()
    assert len(err_lines) == len(bad)
    for (name, message), line in zip(bad.items(), err_lines):
        assert line.startswith("error: ") and name in line and re.search(message, line), line
    out_lines = out.strip().splitlines()
    assert len(out_lines) == 5  # good.png, photo.jpg and three array images
    assert out_lines[1].startswith(str(good[1])) and out_lines[1].endswith("(inverted)")
    assert out_lines[4].startswith(f"{good[2]}[2]: ")
    assert out_lines[0].count(",") == 2  # top-3 by default


def test_cli_json_output(trained, tmp_path, capsys):
    model_path, _, _ = trained
    picture = tmp_path / "shoe.png"
    _shape_picture((64, 40), 0, 255).save(picture)
    assert predict.main([str(model_path.parent), str(picture), str(tmp_path / "nope.png"), "--json", "--top-k", "5"]) == 1
    report = json.loads(capsys.readouterr().out)
    (prediction,) = report["predictions"]
    assert prediction["file"] == str(picture) and prediction["index"] is None
    assert len(prediction["top"]) == 5
    probabilities = [t["probability"] for t in prediction["top"]]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
    assert {t["class"] for t in prediction["top"]} <= set(fdata.CLASS_NAMES)
    assert report["errors"] == [{"file": str(tmp_path / "nope.png"), "error": f"{tmp_path / 'nope.png'}: no such file."}]


def test_cli_png_predictions_match_the_arrays(trained, tmp_path, capsys):
    """Test images saved as PNG are classified exactly as the arrays they came from."""
    model_path, x_test, y_test = trained
    paths = []
    for i, image in enumerate(x_test):
        paths.append(tmp_path / f"test_{i}.png")
        Image.fromarray(image).save(paths[-1])
    assert predict.main([str(model_path), *map(str, paths), "--json", "--top-k", "1"]) == 0
    from_png = [p["top"][0]["index"] for p in json.loads(capsys.readouterr().out)["predictions"]]
    model = keras.saving.load_model(model_path)
    from_array = model.predict(fdata.to_model_input(x_test), verbose=0).argmax(axis=1)
    assert from_png == from_array.tolist()
    assert np.mean(from_array == y_test) > 0.6  # the model did learn something


def test_cli_bad_model_is_one_line_exit_1(tmp_path, capsys):
    picture = tmp_path / "a.png"
    _shape_picture((30, 30), 0, 255).save(picture)
    (tmp_path / "model.h5").write_bytes(b"\x89HDF\r\n\x1a\n")
    assert predict.main([str(tmp_path / "model.h5"), str(picture)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "legacy HDF5" in err


def test_cli_odd_file_names_give_one_line_each_and_print_under_strict_utf8(trained, tmp_path, monkeypatch):
    """A newline or bytes that are not UTF-8 in a name are escaped; an empty name is not the current directory."""
    import io
    import os

    model_path, _, _ = trained
    good = [tmp_path / "two\nlines.png", tmp_path / os.fsdecode(b"caf\xe9.png")]  # Latin-1, not UTF-8
    for path in good:
        _shape_picture((30, 30), 0, 255).save(path)
    (tmp_path / "bad\nname.png").write_bytes(b"not an image")
    monkeypatch.chdir(tmp_path)
    out = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")  # a terminal without UTF-8 mode
    err = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", errors="strict")
    monkeypatch.setattr("sys.stdout", out)
    monkeypatch.setattr("sys.stderr", err)
    assert predict.main([str(model_path), *map(str, good), str(tmp_path / "bad\nname.png"), ""]) == 1
    out.flush(), err.flush()
    out_lines, err_lines = (stream.buffer.getvalue().decode("ascii").splitlines() for stream in (out, err))
    assert [line.split(": ")[0] for line in out_lines] == [str(tmp_path / "two\\nlines.png"),
                                                             str(tmp_path / "caf\\udce9.png")]
    assert len(err_lines) == 2
    assert err_lines[0].startswith(f"error: {tmp_path}/bad\\nname.png: not an image")
    assert err_lines[1] == ("error: '': an empty file name (an unset variable?); expected an image file (PNG, JPEG, "
                            "...) or a .npy file.")


def test_a_picture_in_a_colour_mode_without_grayscale_is_not_called_damaged(tmp_path):
    path = tmp_path / "lab.tif"
    Image.new("LAB", (30, 30), (50, 0, 0)).save(path)
    with pytest.raises(predict.InputError, match="a picture in colour mode LAB, which cannot be turned into grayscale"):
        predict.read_input(path)


def test_cli_an_empty_model_path_is_refused_not_read_as_the_current_directory(trained, tmp_path, monkeypatch, capsys):
    model_path, _, _ = trained
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(model_path.read_bytes())  # what "." would find
    _shape_picture((30, 30), 0, 255).save(run / "a.png")
    monkeypatch.chdir(run)
    assert predict.main(["", "a.png"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "error: the model path is empty (an unset variable?)" in err


@pytest.mark.parametrize(
    "argv",
    [["m.keras"], ["m.keras", "a.png", "--top-k", "0"], ["m.keras", "a.png", "--top-k", "11"],
     ["m.keras", "a.png", "--invert", "maybe"], ["m.keras", "a.png", "--backend", "numpy"]],
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        predict.main(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_importing_predict_and_loading_does_not_import_keras():
    import subprocess
    import sys

    code = "import sys, fmnist_keras.predict, fmnist_keras.loading; sys.exit('keras' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device that is always full")
def test_cli_a_full_standard_output_is_one_line_exit_1(trained, tmp_path):
    import subprocess
    import sys

    model_path, x_test, _ = trained
    Image.fromarray(x_test[0]).save(tmp_path / "a.png")
    with open("/dev/full", "w") as full:
        done = subprocess.run([sys.executable, "-m", "fmnist_keras.predict", str(model_path), str(tmp_path / "a.png")],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=300)
    err = without_tensorflow_logs(done.stderr)
    assert done.returncode == 1 and err.count("\n") == 1, done.stderr
    assert err.startswith("error: predict failed: No space left on device; free some space or choose "
                          "another place (its standard output too, when that goes to a file), "), done.stderr


# ---- bit depths, non-finite outputs, strict JSON, header bombs ------------------


def _depth_variants(directory, image):
    """The same uint8 picture saved as 8-bit PNG, 16-bit PNG, 32-bit and float TIFFs."""
    directory.mkdir(exist_ok=True)
    variants = {
        "8bit.png": Image.fromarray(image),
        "16bit.png": Image.fromarray(image.astype(np.uint16) * 257),
        "int32.tiff": Image.fromarray(image.astype(np.int32) * 257),
        "float01.tiff": Image.fromarray(image.astype(np.float32) / 255),
        "float255.tiff": Image.fromarray(image.astype(np.float32)),
    }
    paths = {}
    for name, picture in variants.items():
        paths[name] = directory / name
        picture.save(paths[name])
    return paths


@pytest.mark.parametrize("scale", [1, 3])  # 28x28 as is, and 84x84 trimmed and resized
def test_every_bit_depth_gives_the_same_model_input(tmp_path, scale):
    image = np.kron(synthetic_images(np.array([9]), 3)[0], np.ones((scale, scale), np.uint8))
    paths = _depth_variants(tmp_path / f"x{scale}", image)
    with Image.open(paths["16bit.png"]) as opened:
        assert opened.mode.startswith("I")  # Pillow keeps the 16 bits: the scaling is ours to do
    reference = predict.read_input(paths["8bit.png"])[0].pixels
    assert reference.max() > 200
    for name, path in paths.items():
        pixels = predict.read_input(path)[0].pixels
        assert np.abs(pixels.astype(int) - reference.astype(int)).max() <= 1, name


@pytest.mark.parametrize("mode", ["8bit.png", "16bit.png", "int32.tiff", "float01.tiff", "palette.png",
                                  "palette-alpha.png", "1bit.png", "rgba.png"])
def test_a_picture_larger_than_max_edge_is_reduced_first_and_reads_like_the_full_size_one(tmp_path, monkeypatch,
                                                                                           mode):
    # A garment on dark, 10 pixels of picture per pixel of the data set's; read at full size, then reduced 5 times.
    image = np.kron(synthetic_images(np.array([3]), 5)[0], np.ones((10, 10), np.uint8))
    paths = _depth_variants(tmp_path, image)
    for name, picture, options in [("palette.png", Image.fromarray(image).convert("P"), {}),
                                   ("palette-alpha.png", Image.fromarray(image).convert("P"), {"transparency": 255}),
                                   ("1bit.png", Image.fromarray(image).convert("1"), {}),
                                   ("rgba.png", Image.fromarray(image).convert("RGBA"), {})]:
        paths[name] = tmp_path / name
        picture.save(paths[name], **options)
    full = predict.read_input(paths[mode])[0].pixels
    monkeypatch.setattr(predict, "MAX_EDGE", 60)
    reduced = predict.read_input(paths[mode])[0].pixels
    # Of 0-255; a 1-bit picture is dithered, and each reading averages its dots over other windows.
    assert np.abs(reduced.astype(int) - full.astype(int)).mean() < (25 if mode == "1bit.png" else 6), mode


def test_a_large_16bit_picture_is_read_without_full_size_arrays(tmp_path):
    # 4,096 x 4,096 16-bit pixels: read at full size, numpy's arrays peak at about 200 MiB; reduced twice
    # (2,048 x 2,048), at about 50 MiB.
    import tracemalloc

    picture = tmp_path / "large.png"
    Image.fromarray(np.kron(synthetic_images(np.array([3]), 5)[0].astype(np.uint16) * 257,
                            np.ones((4096 // 28 + 1, 4096 // 28 + 1), np.uint16))[:4096, :4096]).save(picture)
    tracemalloc.start()
    try:
        predict.read_input(picture)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * 1024**2, peak  # what tracemalloc counts: numpy's arrays and Python's bytes


@pytest.mark.parametrize("value, message", [(np.nan, "NaN or infinite"), (np.inf, "NaN or infinite"),
                                            (-2.0, "negative pixels"), (1000.0, "pixels up to 1000")])
def test_float_picture_with_impossible_values_is_refused(tmp_path, value, message):
    values = np.full((28, 28), 0.5, np.float32)
    values[3, 4] = value
    Image.fromarray(values).save(tmp_path / "f.tiff")
    with pytest.raises(predict.InputError, match=message) as error:
        predict.read_input(tmp_path / "f.tiff")
    assert str(error.value).startswith(str(tmp_path / "f.tiff")) and "\n" not in str(error.value)


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    return json.loads(text, parse_constant=refuse)


def test_cli_16bit_png_is_classified_like_its_8bit_png_in_strict_json(trained, tmp_path, capsys):
    model_path, x_test, _ = trained
    paths = _depth_variants(tmp_path, x_test[0])
    assert predict.main([str(model_path), *map(str, paths.values()), "--json", "--top-k", "10"]) == 0
    predictions = _strict_json(capsys.readouterr().out)["predictions"]
    rows = [{t["class"]: t["probability"] for t in p["top"]} for p in predictions]
    for row in rows[1:]:
        assert max(abs(row[c] - rows[0][c]) for c in row) < 0.02


def test_cli_non_finite_model_output_is_an_error_not_probabilities(tmp_path, capsys):
    inputs = keras.Input(shape=(28, 28, 1))
    dense = keras.layers.Dense(10, activation="softmax")
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.kernel.assign(np.full((784, 10), np.nan, np.float32))
    model.save(tmp_path / "nan.keras")
    np.save(tmp_path / "batch.npy", np.zeros((2, 28, 28), np.uint8))
    for extra in ([], ["--json"]):
        assert predict.main([str(tmp_path / "nan.keras"), str(tmp_path / "batch.npy"), *extra]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1
        assert err.startswith(f"error: {tmp_path / 'nan.keras'} gave NaN or infinite outputs for 2 of 2 images")


def _npy_header_only(path, shape, data=b""):
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_1_0(handle, {"descr": "|u1", "fortran_order": False, "shape": shape})
        handle.write(data)
    return path


def test_npy_whose_header_claims_too_much_is_refused_before_reading(tmp_path):
    bomb = _npy_header_only(tmp_path / "bomb.npy", (40_000_000, 28, 28), bytes(784))
    assert bomb.stat().st_size < 1000
    with pytest.raises(predict.InputError, match=r"header claims an array of shape \(40000000, 28, 28\)") as error:
        predict.read_input(bomb)
    assert "split it into smaller files" in str(error.value) and "\n" not in str(error.value)
    short = _npy_header_only(tmp_path / "short.npy", (10, 28, 28), bytes(2 * 784))
    with pytest.raises(predict.InputError, match="holds 1568 bytes of data; it is truncated or damaged"):
        predict.read_input(short)


def test_cli_accepts_the_run_directory_train_prints(trained, tmp_path, capsys):
    model_path, x_test, _ = trained
    run = tmp_path / "runs" / "20261201-101500"
    (run / "cnn").mkdir(parents=True)
    (run / "cnn" / "model.keras").write_bytes(model_path.read_bytes())
    (run / "run.json").write_text('{"models": ["cnn"]}\n')
    (tmp_path / "runs" / "latest").symlink_to(run.name)
    Image.fromarray(x_test[0]).save(tmp_path / "a.png")
    for given in (run, tmp_path / "runs" / "latest"):
        assert predict.main([str(given), str(tmp_path / "a.png"), "--json"]) == 0
        out, err = capsys.readouterr()
        assert err.strip() == f"Using {given / 'cnn' / 'model.keras'}"
        assert len(_strict_json(out)["predictions"]) == 1
    (run / "mlp").mkdir()
    (run / "mlp" / "model.keras").write_bytes(model_path.read_bytes())
    assert predict.main([str(run), str(tmp_path / "a.png")]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"error: {run} holds several models (cnn, mlp); pass one of {run / 'cnn'}, {run / 'mlp'}.\n"


def test_cli_tta_averages_the_mirror_image_as_the_run_says(trained, tmp_path, capsys):
    from fmnist_keras.config import TrainConfig

    model_path, x_test, _ = trained
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(model_path.read_bytes())
    images = tmp_path / "images.npy"
    np.save(images, x_test[:4])
    model = keras.saving.load_model(model_path)
    x = fdata.to_model_input(x_test[:4])
    plain, mirrored = model.predict(x, verbose=0), model.predict(x[:, :, ::-1], verbose=0)

    def top(*flags):
        assert predict.main([str(run), str(images), "--json", "--top-k", "1", *flags]) == 0
        report = json.loads(capsys.readouterr().out)
        return report["test_time_augmentation"], [p["top"][0]["probability"] for p in report["predictions"]]

    assert top() == ("none", pytest.approx(plain.max(1).tolist(), abs=1e-6))  # no config.json: none
    TrainConfig(model="cnn", shift_tta=False).save(run / "config.json")  # a CNN's run with flip TTA alone
    flipped = top()
    assert flipped[0] == "mean over the image and its mirror image"
    expected = (plain + mirrored) / 2
    assert flipped[1] == pytest.approx(expected.max(1).tolist(), abs=1e-6)
    assert top("--tta", "none")[1] == pytest.approx(plain.max(1).tolist(), abs=1e-6)
    (run / "config.json").write_text("[]")
    assert predict.main([str(run), str(images)]) == 1
    assert "config.json" in capsys.readouterr().err


@pytest.mark.parametrize("flags, fast", [([], True), (["--no-fast-path"], False)], ids=["default", "no-fast-path"])
def test_cli_predicts_on_the_fast_path_unless_told_not_to_and_keeps_freed_memory(
        trained, tmp_path, monkeypatch, capsys, flags, fast, fast_path_requests):
    kept = []
    monkeypatch.setattr(predict, "keep_freed_memory", lambda: kept.append(True))
    model_path, x_test, _ = trained
    np.save(tmp_path / "images.npy", x_test[:3])
    assert predict.main([str(model_path), str(tmp_path / "images.npy"), *flags]) == 0
    assert fast_path_requests == [fast] and kept == [True]
    assert capsys.readouterr().out.count("images.npy") == 3

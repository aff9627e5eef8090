"""The report: its table against metrics computed by hand, its figures, and a damaged history."""

import json
import re

import keras
import numpy as np
import pytest

from conftest import synthetic_images
from fmnist_keras.inspection import report
from fmnist_keras.engine.callbacks import read_history
from fmnist_keras.data import CLASS_NAMES
from fmnist_keras.models import build_cnn, build_mlp
from fmnist_keras.tta import TTA

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
HISTORY = "epoch,accuracy,loss,val_accuracy,val_loss\n0,0.5,1.2,0.55,1.1\n1,0.7,0.8,0.68,0.9\n2,0.8,0.6,0.7,0.95\n"
CNN_FIGURES = {"curves", "confusion_matrix", "misclassified", "samples", "embedding", "filters", "feature_maps",
               "saliency"}


def make_images(count=30, data_format="channels_last"):
    labels = np.tile(np.arange(10), count // 10)
    x = synthetic_images(labels, seed=3)[..., None].astype(np.float32) / 255.0
    return (np.moveaxis(x, -1, 1) if data_format == "channels_first" else x), labels


def tiny_cnn(data_format="channels_last"):
    keras.utils.set_random_seed(0)
    return build_cnn(filters=(4, 8), convs_per_block=1, dense_units=16, augment=False, data_format=data_format)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """A tiny CNN's report, with a history and without test metrics, so the report computes them."""
    run_dir = tmp_path_factory.mktemp("run")
    (run_dir / "history.csv").write_text(HISTORY)
    model = tiny_cnn()
    x, y = make_images()
    path = report.write_report(run_dir, x, y, model=model, metrics={"model": "tiny", "backend": "torch"})
    return path, model, x, y


def table_rows(markdown: str, header: str) -> list[list[str]]:
    """The cells of the markdown table whose header line starts with ``header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def reference_metrics(y_true, y_pred, num_classes=10):
    """Precision, recall, F1 and support per class, counted with plain loops."""
    counts = [[0] * num_classes for _ in range(num_classes)]
    for true, pred in zip(y_true, y_pred):
        counts[true][pred] += 1
    rows = []
    for c in range(num_classes):
        hits = counts[c][c]
        support = sum(counts[c])
        predicted = sum(counts[r][c] for r in range(num_classes))
        precision = hits / predicted if predicted else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append((precision, recall, f1, support))
    return rows


def test_metrics_table_matches_a_confusion_matrix_counted_by_hand(written):
    path, model, x, y = written
    markdown = path.read_text()
    y_pred = keras.ops.convert_to_numpy(model(x, training=False)).argmax(axis=1)
    expected = reference_metrics(y.tolist(), y_pred.tolist())
    per_class = table_rows(markdown, "| class |")
    assert [row[0] for row in per_class] == list(CLASS_NAMES)
    for row, reference in zip(per_class, expected):
        np.testing.assert_allclose([float(v) for v in row[1:4]], reference[:3], atol=5e-5)
        assert int(row[4]) == reference[3]
    (overall,) = table_rows(markdown, "| split |")
    assert overall[:3] == ["test", str(len(y)), "n/a"]
    accuracy = sum(int(t == p) for t, p in zip(y, y_pred)) / len(y)
    macro_f1 = sum(r[2] for r in expected) / len(expected)
    np.testing.assert_allclose([float(overall[3]), float(overall[4])], [accuracy, macro_f1], atol=5e-5)


def test_every_figure_is_written_and_referenced(written):
    path, *_ = written
    linked = re.findall(r"!\[[^\]]*\]\(figures/([^)]+)\.png\)", path.read_text())
    assert sorted(linked) == sorted(CNN_FIGURES)
    on_disk = {p.stem for p in (path.parent / report.FIGURES_DIR).iterdir()}
    assert on_disk == CNN_FIGURES
    for name in CNN_FIGURES:
        assert (path.parent / report.FIGURES_DIR / f"{name}.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "backend: torch" in path.read_text()


def test_damaged_history_leaves_the_curves_out_with_a_note(tmp_path):
    (tmp_path / "history.csv").write_text("epoch,loss,val_loss\n0,0.5,oops\n")
    keras.utils.set_random_seed(0)
    model = build_mlp(units=(8,))
    x, y = make_images(10)
    markdown = report.write_report(tmp_path, x, y, model=model, metrics={}).read_text()
    section = markdown.split("## Training curves", 1)[1].split("##", 1)[0]
    assert "Left out:" in section and "history.csv is damaged" in section
    assert "curves.png" not in markdown and not (tmp_path / "figures" / "curves.png").exists()
    assert "figures/confusion_matrix.png" in markdown  # the rest of the report is there


def test_history_columns_match_numpy_reading_the_csv(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text(HISTORY)
    columns = report.plots.history_columns(read_history(path))
    reference = np.genfromtxt(path, delimiter=",", names=True)
    assert list(columns) == list(reference.dtype.names)
    for name in reference.dtype.names:
        np.testing.assert_allclose(columns[name], reference[name], rtol=1e-12)
    assert columns["epoch"].dtype.kind == "i"
    assert report.plots.history_columns([]) == {}


def test_best_epoch_is_the_lowest_val_loss_unless_the_run_says(tmp_path):
    (tmp_path / "history.csv").write_text(HISTORY)
    columns = report.plots.history_columns(read_history(tmp_path / "history.csv"))
    assert report.best_epoch({}, columns) == 2  # 1-based epoch of val_loss 0.9
    assert report.best_epoch({"best_epoch": 3}, columns) == 3


@pytest.mark.skipif(keras.backend.backend() == "tensorflow", reason="TensorFlow's CPU Conv2D is channels_last only")
def test_channels_first_model_gets_its_layout_from_the_model(tmp_path):
    x, y = make_images(10, "channels_first")
    np.testing.assert_array_equal(report.gray_images(x, "channels_first"),
                                  report.gray_images(np.moveaxis(x, 1, -1), "channels_last"))
    markdown = report.write_report(tmp_path, x, y, model=tiny_cnn("channels_first"), metrics={}).read_text()
    assert "figures/feature_maps.png" in markdown and "figures/saliency.png" in markdown


def test_a_run_with_tta_gets_figures_of_the_averaged_predictions(tmp_path):
    model = tiny_cnn()
    x, y = make_images()
    plain = keras.ops.convert_to_numpy(model(x, training=False))
    mirrored = keras.ops.convert_to_numpy(model(x[:, :, ::-1], training=False))
    assert (plain.argmax(1) != (plain + mirrored).argmax(1)).any()  # the two tell the predictions apart
    views = [keras.ops.convert_to_numpy(model(view, training=False))
             for view in TTA(flip=True, shift=True).views(np.asarray(x))]
    np.testing.assert_allclose(views[1], mirrored, atol=1e-6)
    cases = (("none", plain), ("mean over the image and its mirror image", (plain + mirrored) / 2),
             (TTA(flip=True, shift=True).name, np.mean(views, axis=0)))
    for number, (tta, expected) in enumerate(cases):
        predictions = report.predict(model, x, y, TTA.named(tta))
        np.testing.assert_allclose(predictions.probabilities, expected, atol=1e-6)
        (tmp_path / str(number)).mkdir()
        path = report.write_report(tmp_path / str(number), x, y, model=model,
                                   metrics={"model": "tiny", "test_time_augmentation": tta})
        rows = table_rows(path.read_text(), "| class |")
        reference = reference_metrics(y.tolist(), expected.argmax(1).tolist())
        np.testing.assert_allclose([float(row[3]) for row in rows], [r[2] for r in reference], atol=5e-5)
        assert f"test_time_augmentation: {tta}" in path.read_text()


def test_the_runs_own_test_probabilities_are_used_without_predicting_the_views_again(tmp_path, monkeypatch):
    model = tiny_cnn()
    x, y = make_images()
    tta = TTA(flip=True, shift=True)
    metrics = {"model": "tiny", "test_time_augmentation": tta.name}
    for name in ("predicted", "given", "one-hot"):
        (tmp_path / name).mkdir()
    predicted = report.write_report(tmp_path / "predicted", x, y, model=model, metrics=metrics).read_text()
    probabilities = report.predict(model, x, y, tta).probabilities

    def no_views(*_args, **_kwargs):
        raise AssertionError("the views were predicted again")

    monkeypatch.setattr(report, "predict_probabilities", no_views)
    given = report.write_report(tmp_path / "given", x, y, model=model, metrics=metrics,
                                test_probabilities=probabilities).read_text()
    assert given == predicted
    # The figures and the table follow the probabilities given: here every image right.
    one_hot = np.eye(10)[y]
    markdown = report.write_report(tmp_path / "one-hot", x, y, model=model, metrics=metrics,
                                   test_probabilities=one_hot).read_text()
    assert [row[1:4] for row in table_rows(markdown, "| class |")] == [["1.0000"] * 3] * 10
    assert [row[1:4] for row in table_rows(given, "| class |")] != [["1.0000"] * 3] * 10
    with pytest.raises(ValueError, match=re.escape("test_probabilities of shape (29, 10) and dtype float64: expected "
                                                   "numbers of shape (30, 10)")):
        report.write_report(tmp_path / "one-hot", x, y, model=model, metrics=metrics, test_probabilities=one_hot[1:])


def test_figures_replace_a_link_planted_among_them_and_never_write_through_it(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    figures = tmp_path / "figures"
    figures.mkdir()
    (figures / "curves.png").symlink_to(victim)  # planted while the run trained
    figure = plt.figure()
    report.save_figures([report.Section("Curves", "curves.png", figure)], figures)
    plt.close(figure)
    assert victim.read_text() == "mine"
    assert not (figures / "curves.png").is_symlink() and (figures / "curves.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "linked").symlink_to(figures, target_is_directory=True)
    with pytest.raises(report.RunDirError, match="is a symbolic link"):
        report.save_figures([], tmp_path / "linked")


def test_the_report_never_replaces_or_follows_what_fmnist_keras_did_not_write(tmp_path):
    model, (x, y) = tiny_cnn(), make_images()
    users = tmp_path / "users"
    (users / "figures").mkdir(parents=True)
    (users / "report.md").write_text("my notes")
    (users / "figures" / "curves.png").write_bytes(b"mine")
    (tmp_path / "link").symlink_to(users, target_is_directory=True)
    (tmp_path / "planted").mkdir()
    (tmp_path / "planted" / "report.md").symlink_to(users / "report.md")
    for out_dir, said in ((users, "is there already, and"), (tmp_path / "link", "is a symbolic link"),
                          (tmp_path / "planted", "report.md is a symbolic link")):
        with pytest.raises(report.RunDirError, match=said):
            report.write_report(tmp_path, x, y, model=model, metrics={}, out_dir=out_dir)
    assert (users / "report.md").read_text() == "my notes"
    assert (users / "figures" / "curves.png").read_bytes() == b"mine"
    assert sorted(p.name for p in users.iterdir()) == ["figures", "report.md"]
    # A new directory is written and marked, so a later report there replaces the earlier one.
    fresh = tmp_path / "fresh"
    for _ in range(2):
        assert report.write_report(tmp_path, x, y, model=model, metrics={}, out_dir=fresh) == fresh / "report.md"
    assert (fresh / report.OUTPUT_MARKER).is_file() and (fresh / "figures" / "confusion_matrix.png").is_file()


@pytest.mark.parametrize("metrics, said", [
    ({"test": {"accuracy": 0.5}}, "lacks 'num_examples' in its test or validation metrics"),
    ({"test": "x"}, "holds a value of another form"),
    ({"test": {"num_examples": 3, "loss": "x", "accuracy": 0.5, "macro_f1": 0.5, "per_class": {}}},
     "holds a value of another form"),
    ([1], "is a list, not the dict of metrics train writes"),
])
def test_metrics_the_report_cannot_show_are_refused_before_anything_is_drawn(tmp_path, metrics, said):
    model, (x, y) = tiny_cnn(), make_images()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(metrics))
    in_file = "is damaged: a JSON list, not an object" if isinstance(metrics, list) else said  # read_json_object's
    with pytest.raises(report.RunDirError, match=re.escape(f"{tmp_path / 'run' / 'metrics.json'} {in_file}")):
        report.write_report(tmp_path / "run", x, y, model=model)
    with pytest.raises(ValueError, match=re.escape(f"the metrics passed in {said}")):
        report.write_report(tmp_path / "run", x, y, model=model, metrics=metrics)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.json"]  # no figures/ left behind


def test_the_report_is_drawn_without_latex_whatever_a_notebook_set(tmp_path):
    # text.usetex would send every label, tick labels too (made as savefig draws), to a LaTeX that may not be
    # installed; layer names such as block1_relu1 are no TeX either.
    import matplotlib

    model, (x, y) = tiny_cnn(), make_images()
    with matplotlib.rc_context({"text.usetex": True}):
        path = report.write_report(tmp_path, x, y, model=model, metrics={})
        assert matplotlib.rcParams["text.usetex"]  # the notebook's setting is left as it was
    assert "figures/feature_maps.png" in path.read_text() and (tmp_path / "figures" / "feature_maps.png").is_file()


X, Y = make_images()
BAD_INPUTS = [
    ({"image_index": 1.5}, ValueError, "image index 1.5: expected one whole number, from 0 to 29"),
    ({"image_index": np.array([1, 2])}, ValueError, "image index array([1, 2]): expected one whole number"),
    ({"image_index": True}, ValueError, "image index True: expected one whole number"),
    ({"seed": -1}, ValueError, "seed -1: expected a whole number from 0"),
    ({"seed": 1.5}, ValueError, "seed 1.5: expected a whole number from 0"),
    ({"y_test": Y + 0.5}, ValueError, "0.5 in y_test is not a whole-number class index; pass class indices"),
    ({"y_test": np.eye(10)[Y]}, ValueError, "y_test of shape (30, 10) looks one-hot; pass one class index per image: "
                                            "y_test.argmax(axis=1)"),
    ({"y_test": np.where(Y == 9, 10, Y)}, ValueError, "the class 10 in y_test is not one of the classes 0 to 9"),
    ({"y_test": Y[:5]}, ValueError, "y_test of shape (5,): expected one label per image, shape (30,)"),
    ({"x_test": np.where(np.arange(30)[:, None, None, None] == 7, np.nan, X)}, ValueError,
     "x_test: 1 of 30 images hold NaN or infinite pixels (the first is image 7)"),
    ({"x_test": X[..., 0]}, ValueError, "x_test of shape (30, 28, 28): cnn takes a non-empty batch of shape (N, 28, "
                                        "28, 1)"),
    ({"x_test": (X * 255).astype(np.uint8)}, ValueError, "x_test of dtype uint8 (pixels 0-255)"),
    ({"model": "run/model.keras"}, TypeError, "model 'run/model.keras' is a path: pass the loaded model"),
    ({"x_train": X}, ValueError, "pass x_train and y_train together, or neither"),
    ({"x_train": X, "y_train": Y[:3]}, ValueError, "y_train of shape (3,): expected one label per image"),
    ({"x_train": X[..., 0], "y_train": Y}, ValueError, "x_train of shape (30, 28, 28)"),
    ({"test_probabilities": np.full((30, 10), np.nan)}, ValueError,
     "there are NaN or infinite values in test_probabilities"),
    ({"history_csv": ""}, TypeError, "history_csv '': pass the path of a run's history.csv"),
    ({"history_csv": {"loss": [1.0]}}, TypeError, "history_csv {'loss': [1.0]}: pass the path of a run's history.csv"),
    ({"history_csv": "missing.csv"}, report.RunDirError, "history_csv missing.csv is missing; pass the run's "
                                                         "history.csv, or leave history_csv out"),
    ({"metrics": {"num_params": 5}}, ValueError, "num_params in the metrics passed in is 5, but the model passed in "
                                                 "has"),
]


@pytest.mark.parametrize("given, error, said", BAD_INPUTS, ids=[f"{sorted(g)[0]}-{i}" for i, (g, _, _) in
                                                                 enumerate(BAD_INPUTS)])
def test_inputs_the_report_cannot_draw_are_refused_in_one_line_before_anything_is_written(tmp_path, monkeypatch,
                                                                                          given, error, said):
    monkeypatch.chdir(tmp_path)
    arguments = {"x_test": X, "y_test": Y, "model": tiny_cnn(), "metrics": {}, **given}
    with pytest.raises(error, match=re.escape(said)) as raised:
        report.write_report(tmp_path / "run", arguments.pop("x_test"), arguments.pop("y_test"), **arguments)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "run").exists()


def test_a_runs_metrics_of_another_model_are_refused_not_mixed_with_its_figures(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"model": "cnn", "num_params": 123}))
    model = tiny_cnn()
    with pytest.raises(ValueError, match=re.escape(f"num_params in {tmp_path / 'metrics.json'} is 123, but the model "
                                                   f"passed in has {model.count_params():,} parameters")):
        report.write_report(tmp_path, X, Y, model=model)
    (tmp_path / "metrics.json").write_text(json.dumps({"model": "cnn", "num_params": model.count_params()}))
    assert report.write_report(tmp_path, X, Y, model=model).is_file()


def test_a_history_that_is_a_dangling_link_is_left_out_with_a_note(tmp_path):
    (tmp_path / "history.csv").symlink_to(tmp_path / "gone.csv")
    markdown = report.write_report(tmp_path, X, Y, model=tiny_cnn(), metrics={}).read_text()
    assert f"Left out: {tmp_path / 'history.csv'} is a symbolic link to nothing" in markdown
    assert "curves.png" not in markdown


@pytest.mark.parametrize("count", [1, 2])
def test_a_report_of_one_or_two_test_images_is_drawn(tmp_path, count):
    markdown = report.write_report(tmp_path, X[:count], Y[:count], model=tiny_cnn(), metrics={}).read_text()
    assert f"| test | {count} |" in markdown and "figures/embedding.png" in markdown
    assert (tmp_path / "figures" / "embedding.png").read_bytes()[:8] == PNG_SIGNATURE


def test_whole_float_labels_and_raw_training_pixels_are_drawn(tmp_path, monkeypatch):
    # x_train is only drawn, so uint8 pixels will do, scaled to [0, 1] as the test images are; 3.0 is the class 3.
    drawn = []
    sample_grid = report.plots.sample_grid
    monkeypatch.setattr(report.plots, "sample_grid", lambda images, labels, **kw: drawn.append((images, labels))
                        or sample_grid(images, labels, **kw))
    markdown = report.write_report(tmp_path, X, Y.astype(np.float32), model=tiny_cnn(), metrics={},
                                   x_train=(X * 255).astype(np.uint8), y_train=Y.astype(float)).read_text()
    assert "| test | 30 |" in markdown and (tmp_path / "figures" / "samples.png").is_file()
    fig = sample_grid(*drawn[0])
    pixels = np.concatenate([image.get_array().ravel() for ax in fig.axes for image in ax.images])
    assert 0.5 < pixels.max() <= 1.0

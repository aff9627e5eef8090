"""Figure functions: each returns a Figure that saves as a valid PNG and plots the right data."""

import numpy as np
import pytest
from matplotlib.figure import Figure

from fmnist_keras.inspection import plots
from fmnist_keras.data import CLASS_NAMES
from fmnist_keras.metrics import confusion_matrix

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def save_png(fig, tmp_path, name="figure.png"):
    assert isinstance(fig, Figure)
    path = tmp_path / name
    fig.savefig(path, dpi=60)
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    from PIL import Image

    with Image.open(path) as image:
        image.verify()
    return path


def all_text(fig):
    texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
    return "\n".join(texts)


def predictions(n=60, seed=0):
    rng = np.random.default_rng(seed)
    y = np.tile(np.arange(10), n // 10)
    logits = rng.normal(size=(n, 10))
    logits[np.arange(n), y] += 1.5  # mostly right, some wrong
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    return images, y, probabilities


def test_training_curves_plot_history_and_mark_best_epoch(tmp_path):
    history = {
        "epoch": [0, 1, 2, 3],
        "loss": [1.0, 0.6, 0.5, 0.45],
        "accuracy": [0.6, 0.8, 0.85, 0.86],
        "val_loss": [0.8, 0.55, 0.5, 0.52],
        "val_accuracy": [0.7, 0.82, 0.84, 0.83],
    }
    fig = plots.training_curves(history, best_epoch=3)
    loss_ax, acc_ax = fig.axes
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert list(lines["train"].get_xdata()) == [1, 2, 3, 4]  # 1-based epochs, as best_epoch is
    assert list(lines["validation"].get_ydata()) == history["val_loss"]
    assert list(lines["best epoch (3)"].get_xdata()) == [3, 3]
    assert list({l.get_label(): l for l in acc_ax.get_lines()}["validation"].get_ydata()) == history["val_accuracy"]
    save_png(fig, tmp_path)


def test_confusion_matrix_counts_sum_to_test_images_and_rows_normalise(tmp_path):
    _, y, probabilities = predictions()
    matrix = confusion_matrix(y, probabilities.argmax(1), 10)
    fig = plots.confusion_matrix(matrix)
    counts = np.asarray(fig.axes[0].images[0].get_array())
    normalised = np.asarray(fig.axes[1].images[0].get_array())
    assert counts.sum() == len(y) == 60
    np.testing.assert_allclose(normalised.sum(axis=1), 1.0)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == list(CLASS_NAMES)
    assert [t.get_text() for t in fig.axes[1].get_yticklabels()] == list(CLASS_NAMES)
    assert "60 test images" in all_text(fig)
    save_png(fig, tmp_path)


def test_misclassified_shows_only_wrong_predictions(tmp_path):
    from fmnist_keras.inspection.internals import misclassified

    images, y, probabilities = predictions()
    indices = misclassified(y, probabilities, limit=12)
    assert len(indices) > 0
    fig = plots.misclassified(images, y, probabilities, indices)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == len(indices)
    confidences = []
    for index, title in zip(indices, titles):
        true_line, pred_line = title.split("\n")
        true_name = true_line.removeprefix("true: ")
        pred_name, confidence = pred_line.removeprefix("pred: ").rsplit(" (", 1)
        assert true_name == CLASS_NAMES[y[index]] and true_name != pred_name
        assert pred_name == CLASS_NAMES[probabilities[index].argmax()]
        confidences.append(float(confidence.rstrip(")")))
    assert confidences == sorted(confidences, reverse=True)
    shown = np.asarray(fig.axes[0].images[0].get_array())
    np.testing.assert_allclose(shown, images[indices[0]] / 255.0)
    save_png(fig, tmp_path)
    assert "No misclassified" in all_text(plots.misclassified(images, y, probabilities, []))


def test_sample_grid_rows_hold_their_class(tmp_path):
    images, y, _ = predictions()
    fig = plots.sample_grid(images, y, per_class=3, seed=1)
    axes = np.asarray(fig.axes).reshape(10, 3)
    for row in range(10):
        assert axes[row, 0].get_ylabel() == CLASS_NAMES[row]
        for ax in axes[row]:
            shown = np.asarray(ax.images[0].get_array())
            matches = [i for i in np.flatnonzero(y == row) if np.allclose(images[i] / 255.0, shown)]
            assert matches, f"row {CLASS_NAMES[row]} shows an image of another class"
    save_png(fig, tmp_path)


def test_filters_show_each_kernel_slice(tmp_path):
    kernel = np.random.default_rng(0).normal(size=(3, 3, 1, 10))
    fig = plots.filters(kernel, columns=4)
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 10
    np.testing.assert_allclose(np.asarray(panels[7].images[0].get_array()), kernel[:, :, 0, 7])
    save_png(fig, tmp_path)


def test_feature_maps_rows_per_layer(tmp_path):
    rng = np.random.default_rng(0)
    maps = {"block1_relu1": rng.random((1, 28, 28, 4)), "block2_relu1": rng.random((1, 14, 14, 12))}
    fig = plots.feature_maps(maps, image=rng.random((28, 28, 1)), channels=6)
    text = all_text(fig)
    assert "block1_relu1\n28x28x4" in text and "block2_relu1\n14x14x12" in text
    shown = [np.asarray(ax.images[0].get_array()) for ax in fig.axes if ax.images]
    assert len(shown) == 1 + 4 + 6  # input, 4 channels of block1, the first 6 of block2
    np.testing.assert_allclose(shown[-1], maps["block2_relu1"][0, ..., 5])
    save_png(fig, tmp_path)
    chw = rng.random((3, 5, 5))
    first = plots.feature_maps({"c": chw}, channels=3, channels_first=True)
    np.testing.assert_allclose(np.asarray(first.axes[2].images[0].get_array()), chw[2])


def test_saliency_overlays_each_map(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.random((2, 28, 28, 1))
    heat = {"saliency": rng.random((2, 28, 28)), "Grad-CAM": rng.random((2, 28, 28))}
    fig = plots.saliency(images, heat, y_true=[0, 5], predicted=[0, 7])
    assert fig.axes[0].get_title() == "true: T-shirt/top\npred: T-shirt/top"
    assert fig.axes[3].get_title() == "true: Sandal\npred: Sneaker"
    np.testing.assert_allclose(np.asarray(fig.axes[5].images[1].get_array()), heat["Grad-CAM"][1])
    save_png(fig, tmp_path)


def test_embedding_colours_points_by_class(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 5)
    points = rng.normal(size=(50, 2))
    fig = plots.embedding(points, labels, explained=np.array([0.4, 0.2]))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == list(CLASS_NAMES)
    sandal = ax.collections[5].get_offsets()
    np.testing.assert_allclose(sandal, points[labels == 5])
    assert "40.0%" in ax.get_xlabel()
    save_png(fig, tmp_path)


@pytest.mark.parametrize("layout", [(28, 28), (28, 28, 1)])
def test_images_without_a_channel_or_channels_last(layout):
    images = np.random.default_rng(0).random((2, *layout))
    np.testing.assert_array_equal(plots._gray(images), images.reshape(2, 28, 28))


def test_channels_first_images_are_refused_not_guessed():
    with pytest.raises(ValueError, match=r"shape \(2, 1, 28, 28\) cannot be drawn.*np.moveaxis\(images, 1, -1\)"):
        plots._gray(np.zeros((2, 1, 28, 28)))


def test_a_dollar_sign_in_a_name_is_drawn_as_it_is_not_read_as_tex(tmp_path):
    # A model named in an edited metrics.json, a layer or a class name: mathtext would fail on "$\frac{$".
    import matplotlib

    name = r"cnn $\frac{$"
    history = {"epoch": [0, 1], "loss": [1.0, 0.5], "val_loss": [0.9, 0.6], "accuracy": [0.5, 0.7],
               "val_accuracy": [0.6, 0.7]}
    figures = [plots.training_curves(history, title=name), plots.filters(np.zeros((3, 3, 1, 4)), title=name),
               plots.confusion_matrix(np.eye(10, dtype=int), title=name),
               plots.sample_grid(np.zeros((20, 28, 28)), np.repeat(np.arange(10), 2), class_names=[name] * 10)]
    for index, fig in enumerate(figures):
        save_png(fig, tmp_path, f"{index}.png")  # drawn: Matplotlib would raise on the TeX
        assert name in all_text(fig)
    assert matplotlib.rcParams["text.parse_math"]  # the user's setting is left as it was


def _odd_inputs():
    """(figure, its arguments, the start of the one line it gives); unchecked, each would be a raw IndexError,
    KeyError or TypeError from numpy or matplotlib, or a figure of the wrong data."""
    images, y, probabilities = predictions(20)
    maps = {"block1_relu1": np.ones((28, 28, 4))}
    heat = {"saliency": np.zeros((20, 28, 28))}
    return [
        (plots.training_curves, ({"lr": [1.0, 0.5]},), "history without loss or accuracy columns (it has: lr)"),
        (plots.training_curves, ("history.csv",), "history of type str: pass model.fit's History"),
        (plots.training_curves, ({"epoch": [0, 1], "loss": [1.0]},), "history['loss'] of shape (1,)"),
        (plots.confusion_matrix, (np.ones((3, 3)),), "matrix of shape (3, 3) and dtype float64: expected numbers of "
                                                     "shape (10, 10)"),
        (plots.confusion_matrix, (np.full((10, 10), 0.5),), "there are negative or fractional values in matrix"),
        (plots.misclassified, (images, y, probabilities, [25]), "25 in indices is out of range for 20 images"),
        (plots.misclassified, (images, y, probabilities, [1.5]), "indices of shape (1,) and dtype float64: expected a "
                                                                  "list of whole-number positions from 0 to 19"),
        (plots.misclassified, (images, y, probabilities, probabilities.argmax(1) != y),
         "indices of dtype bool (a mask, shape (20,)): pass the positions it marks, np.flatnonzero(mask)"),
        (plots.sample_grid, (images, np.array(CLASS_NAMES * 2)), "labels of dtype <U11: expected class indices from 0 "
                                                               "to 9; map class names to indices"),
        (plots.misclassified, (images, y[:5], probabilities, [1]), "y_true of shape (5,): expected one label per"),
        (plots.misclassified, (images, y, probabilities[:, :4], [1]), "probabilities of shape (20, 4)"),
        (plots.sample_grid, (images, y + 1), "the class 10 in labels is not one of the classes 0 to 9"),
        (plots.filters, (np.ones((3, 3, 4)),), "kernel of shape (3, 3, 4) and dtype float64: expected a 4-D array of "
                                               "numbers, (kernel_h, kernel_w, in_channels, filters)"),
        (plots.filters, (np.ones((3, 3, 1, 0)),), "kernel of shape (3, 3, 1, 0) holds no weights"),
        (plots.feature_maps, ({},), "no feature maps to draw"),
        (plots.feature_maps, (np.ones((28, 28, 4)),), "maps of type ndarray: pass {layer name: array}"),
        (plots.feature_maps, ({"block1_relu1": np.ones((2, 28, 28, 4))},), "maps['block1_relu1'] of shape (2, 28, "
                                                                           "28, 4)"),
        (plots.saliency, (images, {"saliency": np.zeros((20, 14, 14))}, y, y), "heatmaps['saliency'] of shape (20, "
                                                                               "14, 14)"),
        (plots.saliency, (images, heat, y, y[:3]), "predicted of shape (3,)"),
        (plots.saliency, (images, heat["saliency"], y, y), "heatmaps of type ndarray: pass {method name: (N, H, W) "
                                                          "maps}"),
        (plots.embedding, (np.ones((20, 3)), y), "points of shape (20, 3) and dtype float64: expected numbers of "
                                                 "shape (N, 2)"),
        (plots.embedding, (np.ones((20, 2)), np.eye(10)[y]), "labels of shape (20, 10) looks one-hot"),
        (plots.embedding, (np.full((20, 2), np.nan), y), "there are NaN or infinite values in points"),
        (plots.feature_maps, (maps,), None),  # drawn
    ]


@pytest.mark.parametrize("draw, arguments, said", _odd_inputs(),
                         ids=[f"{draw.__name__}-{i}" for i, (draw, _, _) in enumerate(_odd_inputs())])
def test_odd_arrays_get_one_line_saying_what_the_figure_takes(draw, arguments, said):
    if said is None:
        assert isinstance(draw(*arguments), Figure)
        return
    with pytest.raises(ValueError) as refused:
        draw(*arguments)
    assert str(refused.value).startswith(said) and "\n" not in str(refused.value)


def test_a_diverged_runs_nan_loss_is_drawn_as_a_gap(tmp_path):
    fig = plots.training_curves({"epoch": [0, 1, 2], "loss": [1.0, 0.5, np.nan], "accuracy": [0.5, 0.7, 0.1]})
    loss = fig.axes[0].lines[0].get_ydata()
    assert list(loss[:2]) == [1.0, 0.5] and np.isnan(loss[2])
    save_png(fig, tmp_path)


def test_integer_pixels_are_drawn_scaled_to_0_1_as_uint8_ones_are():
    images, y, _ = predictions(20)
    for pixels in (images, images.astype(np.int64)):
        fig = plots.sample_grid(pixels, y)
        drawn = np.concatenate([image.get_array().ravel() for ax in fig.axes for image in ax.images])
        assert 0.9 < drawn.max() <= 1.0 and drawn.min() >= 0.0


def test_a_history_as_fit_returns_it_or_as_rows_is_drawn_as_its_columns(tmp_path):
    import types

    columns = {"epoch": [0, 1, 2], "loss": [1.0, 0.5, 0.4], "val_loss": [1.1, 0.6, 0.7]}
    rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
    fit_history = types.SimpleNamespace(history={"loss": [1.0, 0.5, 0.4], "val_loss": [1.1, 0.6, 0.7]})  # no epoch
    class Table:  # named columns, as a pandas DataFrame of pandas.read_csv("history.csv")
        def keys(self):
            return list(columns)

        def __getitem__(self, key):
            return np.asarray(columns[key])

    for given in (columns, rows, fit_history, fit_history.history, Table()):
        fig = plots.training_curves(given, best_epoch=2)
        line = fig.axes[0].lines[0]
        assert list(line.get_xdata()) == [1, 2, 3] and list(line.get_ydata()) == [1.0, 0.5, 0.4]
    save_png(fig, tmp_path)

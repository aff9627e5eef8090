"""Figures of training runs and model internals: each function returns a matplotlib Figure.

The caller saves the figure (``fig.savefig(path)``); nothing here writes
files or shows windows. Figures are made with ``matplotlib.figure.Figure``,
not ``pyplot``, so they render with Agg on machines without a display, hold
no global state (nothing to close, no leaks in long loops), and leave the
user's pyplot backend alone (a notebook's inline display still works). Inputs are numpy
arrays: images as (N, 28, 28) or channels_last (N, 28, 28, 1), in [0, 1] or
uint8; the layout is never guessed from the shape, so a channels_first batch
is refused (the caller knows its layout and moves the channel axis). Every
text is taken literally: a `$` in a model's, layer's or class's name is not
read as TeX.
"""

from __future__ import annotations

import functools

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from fmnist_keras.data import CLASS_NAMES
from fmnist_keras.inspection.arrays import as_array, check_indices, check_labels, check_shape, is_numbers, is_pixels

_CMAP_IMAGE = "gray_r"  # dark garments on white read best at thumbnail size
_CMAP_DIVERGING = "RdBu_r"


def literal_text():
    """Every text made or drawn inside taken literally: no mathtext (a Text reads ``text.parse_math`` when it
    is made) and no LaTeX (a notebook's ``text.usetex``, read when a text is drawn, as tick labels are by
    ``savefig``: layer names such as ``block1_relu1`` are no TeX, and LaTeX may not be installed); the user's own
    settings untouched outside it."""
    return matplotlib.rc_context({"text.parse_math": False, "text.usetex": False})


def _literal_text(draw):
    """``draw`` inside :func:`literal_text`."""

    @functools.wraps(draw)
    def drawn(*args, **kwargs):
        with literal_text():
            return draw(*args, **kwargs)

    return drawn


def _gray(images: np.ndarray) -> np.ndarray:
    """(N, H, W) float images from (N, H, W) or channels_last (N, H, W, 1) ones."""
    images = as_array(images, "images")
    if not is_numbers(images.dtype):
        raise ValueError(f"images of dtype {images.dtype}: expected pixels, floats in [0, 1] or integers 0-255; pass "
                         f"the images as numbers.")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim != 3:
        raise ValueError(
            f"images of shape {images.shape} cannot be drawn; expected (N, H, W) or channels_last (N, H, W, 1); "
            f"move a channels_first batch's channel axis last with np.moveaxis(images, 1, -1)."
        )
    return images.astype(np.float64) / (255.0 if is_pixels(images.dtype) else 1.0)


def _hide_ticks(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _grid(count: int, columns: int, cell: float = 1.6, extra_height: float = 0.6):
    columns = max(1, min(columns, count))
    rows = max(1, int(np.ceil(count / columns)))
    fig = Figure(figsize=(cell * columns, cell * rows + extra_height), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, columns, squeeze=False).ravel())
    for ax in axes[count:]:
        ax.set_axis_off()
    return fig, axes


def history_columns(history) -> dict:
    """The columns of a training history given as ``model.fit``'s History, its ``.history`` dict, the columns of
    a history.csv (a dict, or a table with named columns), or its rows (``read_history``'s list of dicts; a
    value a row lacks is NaN)."""
    history = getattr(history, "history", history)  # keras.callbacks.History
    if isinstance(history, (list, tuple)) and all(isinstance(row, dict) for row in history):
        return {key: np.array([row.get(key, np.nan) for row in history]) for key in (history[:1] or [{}])[0]}
    if not hasattr(history, "keys"):  # a dict, or anything of named columns (a pandas DataFrame)
        raise ValueError(f"history of type {type(history).__name__}: pass model.fit's History, its .history dict, or "
                         f"the columns of a history.csv.")
    return {key: history[key] for key in history.keys()}


@_literal_text
def training_curves(history: dict, best_epoch: int | None = None, title: str | None = None) -> Figure:
    """Loss and accuracy per epoch, train and validation, best epoch marked.

    Args:
        history: ``model.fit``'s History (or its ``.history``), or the columns
            or rows of ``history.csv``: ``epoch`` (0-based, as CSVLogger writes
            it; default 0, 1, ...), ``loss``, ``accuracy``, ``val_loss``, ``val_accuracy``.
        best_epoch: the 1-based epoch EarlyStopping restored (``metrics.json``).
        title: the figure title.
    """
    history = history_columns(history)
    drawn = [key for key in ("loss", "accuracy", "val_loss", "val_accuracy") if key in history]
    if not drawn:
        raise ValueError(f"history without loss or accuracy columns (it has: {', '.join(map(str, history)) or 'none'}"
                         f"); pass model.fit's History, or the columns of a history.csv.")
    if "epoch" in history:
        epochs = check_shape(history["epoch"], "history['epoch']", (None,), "0-based epoch numbers").astype(int) + 1
    else:
        epochs = np.arange(len(as_array(history[drawn[0]], f"history[{drawn[0]!r}]"))) + 1
    count = len(epochs)
    for key in drawn:  # a diverged run's last loss may be NaN: drawn as a gap
        check_shape(history[key], f"history[{key!r}]", (count,), "one value per epoch", finite=False)
    fig = Figure(figsize=(10, 4), layout="constrained")
    axes = fig.subplots(1, 2)
    for ax, metric, label in ((axes[0], "loss", "Loss"), (axes[1], "accuracy", "Accuracy")):
        for key, name, style in ((metric, "train", "-o"), (f"val_{metric}", "validation", "-s")):
            if key in history:
                ax.plot(epochs, history[key], style, markersize=3, label=name)
        if best_epoch is not None:
            ax.axvline(best_epoch, color="tab:red", linestyle="--", linewidth=1, label=f"best epoch ({best_epoch})")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label.lower())
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title or "Training curves")
    return fig


@_literal_text
def confusion_matrix(matrix, class_names=CLASS_NAMES, title: str | None = None) -> Figure:
    """Counts and row-normalised confusion matrix side by side (rows: true class)."""
    classes = len(class_names)
    matrix = check_shape(matrix, "matrix", (classes, classes),
                         f"counts of true (rows) by predicted (columns) class, one of each for the {classes} classes")
    if (matrix < 0).any() or (matrix != np.round(matrix)).any():
        raise ValueError("there are negative or fractional values in matrix; pass the counts (whole numbers from 0), "
                         "as fmnist_keras.metrics.classification_metrics gives under 'confusion_matrix'.")
    matrix = matrix.astype(np.int64)
    support = matrix.sum(axis=1, keepdims=True)
    normalised = matrix / np.where(support > 0, support, 1)
    fig = Figure(figsize=(15, 6.8), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = ((axes[0], matrix, "Counts", "d", "Blues"), (axes[1], normalised, "Row-normalised (recall)", ".2f", "Greens"))
    for ax, values, label, fmt, cmap in panels:
        image = ax.imshow(values, cmap=cmap, vmin=0)
        ticks = np.arange(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=45, ha="right")
        ax.set_yticks(ticks, class_names)
        ax.set_xlabel("predicted class")
        ax.set_ylabel("true class")
        ax.set_title(label)
        peak = values.max() if values.size else 0
        for (i, j), value in np.ndenumerate(values):
            ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=7,
                    color="white" if value > 0.6 * peak else "black")
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle(title or f"Confusion matrix ({int(matrix.sum())} test images)")
    return fig


@_literal_text
def misclassified(images, y_true, probabilities, indices, class_names=CLASS_NAMES, columns: int = 6) -> Figure:
    """A grid of mistakes, each titled true class / predicted class (probability).

    Args:
        images: the test images.
        y_true: their labels.
        probabilities: predicted probabilities, (N, num_classes).
        indices: which images to show, in order (``internals.misclassified``
            gives the most confident mistakes first).
    """
    images = _gray(images)
    probabilities = check_shape(probabilities, "probabilities", (len(images), len(class_names)),
                                "one row of class probabilities per image")
    y_true = check_labels(y_true, len(images), "y_true", len(class_names))
    indices = check_indices(indices, len(images))
    if len(indices) == 0:
        fig = Figure(figsize=(4, 1.5))
        fig.text(0.5, 0.5, "No misclassified images.", ha="center", va="center")
        return fig
    fig, axes = _grid(len(indices), columns, cell=1.9, extra_height=0.5)
    for ax, index in zip(axes, indices):
        predicted = int(np.argmax(probabilities[index]))
        ax.imshow(images[index], cmap=_CMAP_IMAGE, vmin=0, vmax=1)
        ax.set_title(
            f"true: {class_names[int(y_true[index])]}\npred: {class_names[predicted]} "
            f"({probabilities[index, predicted]:.2f})",
            fontsize=8,
        )
        _hide_ticks(ax)
    fig.suptitle("Misclassified test images, most confident first")
    return fig


@_literal_text
def sample_grid(images, labels, class_names=CLASS_NAMES, per_class: int = 6, seed: int = 0) -> Figure:
    """A few randomly chosen (seeded) images of each class, one row per class."""
    images = _gray(images)
    labels = check_labels(labels, len(images), "labels", len(class_names))
    rng = np.random.default_rng(seed)
    fig = Figure(figsize=(1.1 * per_class + 1.6, 1.1 * len(class_names) + 0.4), layout="constrained")
    axes = fig.subplots(len(class_names), per_class, squeeze=False)
    for row, name in enumerate(class_names):
        members = np.flatnonzero(labels == row)
        chosen = rng.choice(members, size=min(per_class, len(members)), replace=False) if len(members) else []
        for column in range(per_class):
            ax = axes[row, column]
            _hide_ticks(ax)
            for spine in ax.spines.values():
                spine.set_visible(False)
            if column < len(chosen):
                ax.imshow(images[chosen[column]], cmap=_CMAP_IMAGE, vmin=0, vmax=1)
        axes[row, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    fig.suptitle("Fashion-MNIST: samples of each class")
    return fig


@_literal_text
def filters(kernel, columns: int = 8, title: str | None = None) -> Figure:
    """First-layer convolution filters, one panel each (first input channel).

    Args:
        kernel: (kernel_h, kernel_w, in_channels, filters), as ``internals.first_layer_filters`` gives.
    """
    kernel = check_shape(kernel, "kernel", (None, None, None, None),
                         "(kernel_h, kernel_w, in_channels, filters), as internals.first_layer_filters gives")
    count = kernel.shape[-1]
    if kernel.size == 0:
        raise ValueError(f"kernel of shape {kernel.shape} holds no weights; pass a trained convolution's kernel.")
    limit = np.abs(kernel).max() or 1.0
    fig, axes = _grid(count, columns, cell=1.0, extra_height=0.8)
    image = None
    for index, ax in enumerate(axes[:count]):
        image = ax.imshow(kernel[:, :, 0, index], cmap=_CMAP_DIVERGING, vmin=-limit, vmax=limit)
        ax.set_title(str(index), fontsize=7)
        _hide_ticks(ax)
    fig.colorbar(image, ax=list(axes), shrink=0.6, label="weight")
    fig.suptitle(title or f"First-layer filters ({kernel.shape[0]}x{kernel.shape[1]}, {count} filters)")
    return fig


@_literal_text
def feature_maps(maps: dict, image=None, channels: int = 8, channels_first: bool = False,
                 title: str | None = None) -> Figure:
    """Activations of one image: one row per layer, the first ``channels`` channels.

    Args:
        maps: ``{layer name: array}`` for one image, each (H, W, C) (or
            (C, H, W) with ``channels_first``), or with a leading batch axis of 1.
        image: the input image, drawn in the first column.
    """
    if not isinstance(maps, dict):
        raise ValueError(f"maps of type {type(maps).__name__}: pass {{layer name: array}}, as internals.feature_maps "
                         f"gives.")
    names = list(maps)
    if not names:
        raise ValueError("no feature maps to draw: pass {layer name: array}, as internals.feature_maps gives.")
    offset = 1 if image is not None else 0
    fig = Figure(figsize=(1.3 * (channels + offset) + 0.8, 1.45 * len(names) + 0.5), layout="constrained")
    axes = fig.subplots(len(names), channels + offset, squeeze=False)
    for row, name in enumerate(names):
        values = as_array(maps[name], f"maps[{name!r}]")
        values = values[0] if values.ndim == 4 and len(values) == 1 else values
        values = check_shape(values, f"maps[{name!r}]", (None, None, None),
                             "the maps of one image, (H, W, C) or (C, H, W), with or without a batch axis of 1")
        values = np.moveaxis(values, 0, -1) if channels_first else values
        for ax in axes[row]:
            _hide_ticks(ax)
        if image is not None:
            if row == 0:
                axes[row, 0].imshow(_gray(np.asarray(image)[None])[0], cmap=_CMAP_IMAGE, vmin=0, vmax=1)
                axes[row, 0].set_title("input", fontsize=8)
            else:
                axes[row, 0].set_axis_off()
        for column in range(channels):
            ax = axes[row, column + offset]
            if column < values.shape[-1]:
                ax.imshow(values[..., column], cmap="viridis")
                ax.set_title(f"ch {column}", fontsize=7)
            else:
                ax.set_axis_off()
        axes[row, offset].set_ylabel(f"{name}\n{values.shape[0]}x{values.shape[1]}x{values.shape[2]}", fontsize=8)
    fig.suptitle(title or "Feature maps")
    return fig


@_literal_text
def saliency(images, heatmaps: dict, y_true, predicted, class_names=CLASS_NAMES, title: str | None = None) -> Figure:
    """Each image next to its heat maps (saliency, Grad-CAM, ...) overlaid on it.

    Args:
        images: the explained images.
        heatmaps: ``{method name: (N, H, W) array in [0, 1]}``.
        y_true: true labels.
        predicted: predicted labels (the class each map explains).
    """
    images = _gray(images)
    y_true = check_labels(y_true, len(images), "y_true", len(class_names))
    predicted = check_labels(predicted, len(images), "predicted", len(class_names))
    if not isinstance(heatmaps, dict):
        raise ValueError(f"heatmaps of type {type(heatmaps).__name__}: pass {{method name: (N, H, W) maps}}, such as "
                         f"{{'saliency': internals.saliency(model, images)}}.")
    methods = list(heatmaps)
    for method in methods:
        check_shape(heatmaps[method], f"heatmaps[{method!r}]", images.shape, "one map per image, of the image's size")
    fig = Figure(figsize=(2.0 * (1 + len(methods)), 2.0 * len(images) + 0.5), layout="constrained")
    axes = fig.subplots(len(images), 1 + len(methods), squeeze=False)
    for row, image in enumerate(images):
        axes[row, 0].imshow(image, cmap=_CMAP_IMAGE, vmin=0, vmax=1)
        axes[row, 0].set_title(
            f"true: {class_names[int(y_true[row])]}\npred: {class_names[int(predicted[row])]}", fontsize=8
        )
        for column, method in enumerate(methods, start=1):
            axes[row, column].imshow(image, cmap="gray", vmin=0, vmax=1)
            axes[row, column].imshow(heatmaps[method][row], cmap="jet", alpha=0.5, vmin=0, vmax=1)
            if row == 0:
                axes[row, column].set_title(method, fontsize=9)
        for ax in axes[row]:
            _hide_ticks(ax)
    fig.suptitle(title or "What the model looks at")
    return fig


@_literal_text
def embedding(points, labels, class_names=CLASS_NAMES, explained=None, title: str | None = None) -> Figure:
    """2-D projection of penultimate-layer features, one colour per class."""
    points = check_shape(points, "points", (None, 2), "two coordinates per image, as internals.pca_2d gives")
    labels = check_labels(labels, len(points), "labels", len(class_names))
    fig = Figure(figsize=(8.5, 6.5), layout="constrained")
    ax = fig.subplots()
    colours = matplotlib.colormaps["tab10"]
    for index, name in enumerate(class_names):
        members = labels == index
        ax.scatter(points[members, 0], points[members, 1], s=4, alpha=0.5, color=colours(index % 10), label=name)
    if explained is not None:
        ax.set_xlabel(f"PC 1 ({100 * explained[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC 2 ({100 * explained[1]:.1f}% of variance)")
    ax.legend(markerscale=4, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    fig.suptitle(title or f"Penultimate-layer embedding, PCA to 2-D ({len(points)} images)")
    return fig

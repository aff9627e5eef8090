"""Write a run's report: the figures as PNG files and ``report.md`` that embeds them.

``train`` calls :func:`write_report` at the end of each run and ``evaluate``
calls it again for an existing run. Each figure is one small function that
returns a :class:`Section`; :func:`render_markdown` turns the sections into
the page. The image layout comes from the model's input, never from the
shape of an array. Imports Keras (through :mod:`fmnist_keras.inspection.internals`):
import this only after the backend is chosen.

Example:
    >>> write_report(run_dir, splits.x_test, splits.y_test, metrics=metrics,
    ...              x_train=splits.x_train, y_train=splits.y_train)
    PosixPath('runs/20261129-143000/cnn/report.md')
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from fmnist_keras.inspection import internals
from fmnist_keras.inspection.arrays import check_count, check_labels, check_shape
from fmnist_keras.inspection import plots
from fmnist_keras.engine.callbacks import read_history
from fmnist_keras.engine.evaluation import predict_probabilities
from fmnist_keras.data import CLASS_NAMES
from fmnist_keras.loading import input_data_format
from fmnist_keras.metrics import classification_metrics
from fmnist_keras.rundir import (DANGLING_LINK, FIGURES_DIR, HISTORY_FILE, METRICS_FILE, OUTPUT_MARKER, REPORT_FILE,
                                 RunDirError, exists_or_link, is_dangling_link, is_marker, is_model_dir,
                                 not_a_directory_line, not_a_regular_file, output_in_the_way, read_json_object,
                                 write_bytes, write_json, write_text)
from fmnist_keras.tta import TTA
# How many test images the saliency figure explains and the mistakes grid
# shows: enough to see a pattern, few enough to read at a glance.
NUM_EXPLAINED = 4
NUM_MISTAKES = 24
# The facts of metrics.json shown under the title, in this order.
FACT_KEYS = ("backend", "device", "epochs_run", "best_epoch", "train_time_s", "num_params", "weights_average_momentum",
             "test_time_augmentation")


@dataclasses.dataclass
class Section:
    """One figure of the report; ``figure`` None leaves it out and ``caption`` says why."""

    heading: str
    file: str  # the PNG's name in FIGURES_DIR
    figure: object | None  # a matplotlib Figure
    caption: str = ""


@dataclasses.dataclass
class Predictions:
    """Model-ready images, their labels, and what the model makes of them."""

    x: np.ndarray
    y: np.ndarray
    data_format: str  # the layout of ``x``: the model's input layout
    probabilities: np.ndarray
    features: np.ndarray  # penultimate-layer features, (N, D)

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    def gray(self, indices=slice(None)) -> np.ndarray:
        """The images as (N, H, W), for drawing."""
        return gray_images(self.x[indices], self.data_format)


def gray_images(images: np.ndarray, data_format: str) -> np.ndarray:
    """(N, H, W) from model-ready (N, H, W, 1) or (N, 1, H, W) images in the given layout."""
    images = np.asarray(images)
    return images[:, 0] if data_format == "channels_first" else images[..., 0]


def default_image_index(count: int, seed: int = 0) -> int:
    """The fixed, seeded test image whose feature maps the report shows."""
    return int(np.random.default_rng(seed).integers(count))


def explained_indices(count: int, seed: int = 0) -> np.ndarray:
    """The seeded test images the saliency figure explains."""
    return np.random.default_rng(seed).choice(count, size=min(NUM_EXPLAINED, count), replace=False)


def check_out_dir(out_dir: Path) -> bool:
    """Refuse, as :class:`RunDirError`, to write ``report.md`` and ``figures/`` where they would follow a link or
    replace what fmnist_keras did not write.

    Earlier outputs are replaced only in a directory of the project's: a run's model directory, or one holding
    :data:`OUTPUT_MARKER` (evaluate's, or an earlier report's outside a run). Anywhere else the report writes new
    files only, and marks the directory.

    Returns:
        Whether ``out_dir`` is the project's already.
    """
    fix = "pass another out_dir (a new or empty directory)"
    if out_dir.is_symlink():
        raise RunDirError(f"out_dir {out_dir} is a symbolic link; the report writes only into a real directory; "
                          f"pass the directory itself.")
    problem = (not_a_directory_line("out_dir", out_dir, fix)
               or output_in_the_way(out_dir, (REPORT_FILE,), "the report", fix))
    if problem is not None:
        raise RunDirError(problem)
    report, figures = out_dir / REPORT_FILE, out_dir / FIGURES_DIR
    ours = out_dir.is_dir() and (is_model_dir(out_dir) or is_marker(out_dir / OUTPUT_MARKER))
    earlier = [report] if report.exists() else []
    earlier += sorted(figures.iterdir()) if figures.is_dir() else []  # not a link: output_in_the_way
    if earlier and not ours:
        raise RunDirError(f"{earlier[0]} is there already, and {out_dir} is neither a run's model directory nor one "
                          f"fmnist_keras marked as its own ({OUTPUT_MARKER}), so the report does not replace it; "
                          f"move it away or {fix}.")
    return ours


def check_metrics(metrics, source: str, error_type: type[ValueError] = ValueError) -> None:
    """Refuse, as ``error_type``, before anything is drawn, metrics the report cannot show: anything but the dict
    ``metrics.json`` holds, or one whose splits lack what train writes (``source`` names where they came from)."""
    if not isinstance(metrics, dict):
        raise error_type(f"{source} is a {type(metrics).__name__}, not the dict of metrics train writes; rewrite it "
                         f"with train, or pass the metrics in.")
    splits = {split: metrics[split] for split in ("test", "validation") if metrics.get(split)}
    try:
        if splits:  # without any, the report computes the test metrics itself
            metrics_table(splits)
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        what = f"lacks {error}" if isinstance(error, KeyError) else f"holds a value of another form ({error})"
        raise error_type(f"{source} {what} in its test or validation metrics; rewrite it with train, or pass "
                         f"the metrics in.") from None


def check_history_path(history_csv: str | Path | None) -> Path | None:
    """A history named explicitly must be there: a file asked for is not left out in silence."""
    if history_csv is None:
        return None
    if not isinstance(history_csv, (str, os.PathLike)) or not str(history_csv).strip():
        raise TypeError(f"history_csv {history_csv!r:.80}: pass the path of a run's history.csv (a str or Path), or "
                        f"leave it out to use run_dir's.")
    path = Path(history_csv)
    if not path.is_file():
        state = not_a_regular_file(path) if exists_or_link(path) else "is missing"
        raise RunDirError(f"history_csv {path} {state}; pass the run's history.csv, or leave history_csv out "
                          f"to use run_dir's.")
    return path


def other_params(model, metrics: dict) -> int | None:
    """The parameter count ``metrics`` records (train writes ``num_params``) when it is not ``model``'s: the
    metrics are another model's. None when they match or record none."""
    recorded = metrics.get("num_params")
    if isinstance(recorded, int) and not isinstance(recorded, bool) and recorded != model.count_params():
        return recorded
    return None


def check_same_model(model, metrics: dict, source: str) -> None:
    """Refuse, as ValueError, metrics of another model than ``model``: the report would put one model's numbers
    beside another's figures. Told apart by the parameter count."""
    recorded = other_params(model, metrics)
    if recorded is not None:
        raise ValueError(f"num_params in {source} is {recorded:,}, but the model passed in has "
                         f"{model.count_params():,} parameters; pass the run's own model, or this model's metrics.")


def read_metrics(run_dir: Path) -> dict:
    """The run's ``metrics.json``, or {} when there is none."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return {}
    return read_json_object(path, "the run's metrics", "rewrite it with train, or pass the metrics in")


def predict(model, x: np.ndarray, y: np.ndarray, tta: TTA = TTA(),
            probabilities: np.ndarray | None = None) -> Predictions:
    """One pass of the model over the images: features and probabilities.

    With test-time augmentation ``tta`` the probabilities are averaged over the
    views of each image (a pass per view), as the run's metrics were; the
    features are the images' own. ``probabilities`` already averaged that way
    (the run's own, from its evaluation) are used as they are, without the
    passes over the views.

    Raises:
        ValueError: ``probabilities`` is not one row of finite class probabilities per image.
    """
    data_format = input_data_format(model)
    if probabilities is not None:
        probabilities = check_shape(probabilities, "test_probabilities", (len(x), len(CLASS_NAMES)),
                                    "one row of class probabilities per test image")
    features, own = internals.embeddings_and_probabilities(model, x)
    if probabilities is None:
        probabilities = tta.mean(lambda view: predict_probabilities(model, view), x, data_format, own=own)
    return Predictions(x, np.asarray(y), data_format, np.asarray(probabilities, dtype=np.float64), features)


def best_epoch(metrics: dict, columns: dict) -> int | None:
    """The 1-based epoch whose weights were kept: ``metrics.json``'s, else the
    lowest ``val_loss`` (what EarlyStopping restores)."""
    if metrics.get("best_epoch") is not None:
        return metrics["best_epoch"]
    if "val_loss" not in columns:
        return None
    return int(columns["epoch"][np.argmin(columns["val_loss"])]) + 1


def metrics_sections(metrics: dict, computed: dict) -> dict:
    """The table's splits: the run's test metrics (else those computed here), then validation if any."""
    sections = {"test": metrics.get("test") or computed}
    if metrics.get("validation"):
        sections["validation"] = metrics["validation"]
    return sections


def metrics_table(sections: dict) -> list[str]:
    """Markdown: overall metrics per split, then per-class precision/recall/F1 of the first split."""
    lines = ["| split | images | loss | accuracy | macro-F1 |", "|---|---:|---:|---:|---:|"]
    for split, values in sections.items():
        loss = "n/a" if values.get("loss") is None else f"{values['loss']:.4f}"
        lines.append(
            f"| {split} | {values['num_examples']} | {loss} | {values['accuracy']:.4f} | {values['macro_f1']:.4f} |"
        )
    split, values = next(iter(sections.items()))
    lines += ["", f"Per class ({split}):", "", "| class | precision | recall (accuracy) | F1 | images |",
              "|---|---:|---:|---:|---:|"]
    for name, row in values["per_class"].items():
        lines.append(f"| {name} | {row['precision']:.4f} | {row['recall']:.4f} | {row['f1']:.4f} | {row['support']} |")
    return lines


def curves_section(history_csv: Path, metrics: dict, title: str) -> Section | None:
    """Loss and accuracy per epoch; None without a history, a note when it is damaged."""
    heading = "Training curves"
    if is_dangling_link(history_csv):
        return Section(heading, "curves.png", None, f"Left out: {history_csv} is {DANGLING_LINK}.")
    try:
        rows = read_history(history_csv)
    except RunDirError as error:
        return Section(heading, "curves.png", None, f"Left out: {error}")
    if not rows:
        return None
    columns = plots.history_columns(rows)
    fig = plots.training_curves(columns, best_epoch(metrics, columns), title=f"{title}: training curves")
    return Section(heading, "curves.png", fig, "Dashed line: the epoch whose weights EarlyStopping restored.")


def confusion_section(matrix) -> Section:
    return Section("Confusion matrix", "confusion_matrix.png", plots.confusion_matrix(np.asarray(matrix)),
                   "Rows: true class; columns: predicted class.")


def mistakes_section(test: Predictions) -> Section:
    wrong = internals.misclassified(test.y, test.probabilities, NUM_MISTAKES)
    fig = plots.misclassified(test.gray(), test.y, test.probabilities, wrong)
    caption = (f"{int((test.predicted != test.y).sum())} of {len(test.y)} test images are wrong; "
               f"the {len(wrong)} most confident mistakes are shown.")
    return Section("Misclassified test images", "misclassified.png", fig, caption)


def samples_section(images: np.ndarray, labels: np.ndarray, seed: int) -> Section:
    """A grid of (N, H, W) images per class."""
    return Section("Sample images", "samples.png", plots.sample_grid(images, labels, seed=seed))


def embedding_section(model, test: Predictions) -> Section:
    points, explained = internals.pca_2d(test.features)
    caption = (f"Layer `{internals.embedding_layer_name(model)}` projected on its two principal components; "
               "overlapping colours are classes the model confuses.")
    return Section("Embedding", "embedding.png", plots.embedding(points, test.y, explained=explained), caption)


def filters_section(model) -> Section:
    return Section("First-layer filters", "filters.png", plots.filters(internals.first_layer_filters(model)))


def feature_maps_section(model, test: Predictions, image_index: int, layers: list[str] | None) -> Section:
    maps = internals.feature_maps(model, test.x[image_index: image_index + 1], layers)
    fig = plots.feature_maps(maps, image=test.gray([image_index])[0],
                             channels_first=test.data_format == "channels_first",
                             title=f"Feature maps of test image {image_index} ({CLASS_NAMES[test.y[image_index]]})")
    return Section("Feature maps", "feature_maps.png", fig,
                   f"Test image {image_index}; layers {', '.join(maps)}; first 8 channels each.")


def saliency_section(model, test: Predictions, indices: np.ndarray) -> Section:
    """Saliency for every model, and Grad-CAM for one with a convolution."""
    predicted = test.predicted[indices]
    heatmaps = {"saliency": internals.saliency(model, test.x[indices], predicted)}
    has_conv = bool(internals.conv_layers(model))
    if has_conv:
        heatmaps["Grad-CAM"] = internals.grad_cam(model, test.x[indices], class_indices=predicted)
    fig = plots.saliency(test.gray(indices), heatmaps, test.y[indices], predicted)
    caption = ("Where the score of the predicted class is most sensitive (saliency) "
               + ("and which regions of the last convolution drive it (Grad-CAM)." if has_conv else "."))
    return Section("Saliency", "saliency.png", fig, caption)


def section_lines(section: Section) -> list[str]:
    """Markdown of one section: heading, the figure if drawn, the caption."""
    lines = [f"## {section.heading}", ""]
    if section.figure is not None:
        lines += [f"![{section.heading}]({FIGURES_DIR}/{section.file})", ""]
    if section.caption:
        lines += [section.caption, ""]
    return lines


def render_markdown(title: str, metrics: dict, table: dict, sections: list[Section]) -> str:
    """The whole of ``report.md``: title, the run's facts, the metrics table, then each section."""
    lines = [f"# Report: {title}", ""]
    facts = [f"{key}: {metrics[key]}" for key in FACT_KEYS if key in metrics]
    if facts:
        lines += ["; ".join(facts), ""]
    lines += ["## Metrics", "", *metrics_table(table), ""]
    for section in sections:
        lines += section_lines(section)
    return "\n".join(lines)


def save_figures(sections: list[Section], figures_dir: Path) -> None:
    """Each figure as a PNG in ``figures_dir``, written to a new file and renamed into place (never through a link)."""
    import io

    if figures_dir.is_symlink():
        raise RunDirError(f"{figures_dir} is a symbolic link; the report writes only into a directory of its own; "
                          f"move it away.")
    figures_dir.mkdir(parents=True, exist_ok=True)
    for section in sections:
        if section.figure is not None:
            png = io.BytesIO()
            with plots.literal_text():  # tick labels are made as the figure is drawn
                section.figure.savefig(png, format="png", dpi=110)
            write_bytes(figures_dir / section.file, png.getvalue())


def write_report(
    run_dir: str | Path,
    x_test: np.ndarray,
    y_test: np.ndarray,
    *,
    model=None,
    metrics: dict | None = None,
    history_csv: str | Path | None = None,
    x_train: np.ndarray | None = None,
    y_train: np.ndarray | None = None,
    out_dir: str | Path | None = None,
    image_index: int | None = None,
    layers: list[str] | None = None,
    seed: int = 0,
    test_probabilities: np.ndarray | None = None,
    curves: bool = True,
) -> Path:
    """Draw every figure for one trained model and write ``report.md`` embedding them.

    Args:
        run_dir: the model's run directory (``model.keras``, ``history.csv``,
            ``metrics.json``); missing files just leave their part out, and a
            damaged ``history.csv`` leaves the curves out with a note.
        x_test: model-ready test images in the model's input layout
            (``to_model_input(images, input_data_format(model))``).
        y_test: integer test labels.
        model: the trained model; default ``run_dir/model.keras``, loaded safely.
        metrics: the run's metrics (``metrics.json`` content); default read
            from ``run_dir``. Its ``test`` (and ``validation``) entries fill
            the table; without them the test metrics are computed here.
        history_csv: training history; default ``run_dir/history.csv``.
        x_train, y_train: images for the sample grid, in the same layout as
            ``x_test``; default the test set.
        out_dir: where ``report.md`` and ``figures/`` go; default ``run_dir``.
        image_index: the test image whose feature maps are drawn; default a
            seeded one (:func:`default_image_index`).
        layers: layers for the feature maps; default each convolution's output.
        seed: seeds the choice of sample and explained images.
        test_probabilities: the model's class probabilities for ``x_test``,
            with the test-time augmentation named in ``metrics`` (what
            :func:`fmnist_keras.engine.evaluation.final_metrics` returns);
            default predicted here.
        curves: draw the training curves from the history; False leaves
            them out (a history of another model).

    Returns:
        The path of ``report.md``.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    ours = check_out_dir(out_dir)  # before the slow part, as every check here
    seed = check_count(seed, "seed")
    history_csv = check_history_path(history_csv)
    if isinstance(model, (str, Path)):
        raise TypeError(f"model {str(model)!r} is a path: pass the loaded model "
                        f"(fmnist_keras.loading.load_model(path)), or leave model out to load run_dir's.")
    if model is None:
        from fmnist_keras.loading import load_model

        model = load_model(run_dir)
    if metrics is None:
        metrics = read_metrics(run_dir)
        check_metrics(metrics, str(run_dir / METRICS_FILE), RunDirError)
        check_same_model(model, metrics, str(run_dir / METRICS_FILE))
    else:
        check_metrics(metrics, "the metrics passed in")
        check_same_model(model, metrics, "the metrics passed in")
    x_test = internals.check_images(model, x_test, "x_test")
    y_test = check_labels(y_test, len(x_test), "y_test")
    if (x_train is None) != (y_train is None):
        raise ValueError("pass x_train and y_train together, or neither (the sample grid then shows test images).")
    if x_train is not None:  # only drawn: raw uint8 pixels will do
        x_train = internals.check_images(model, x_train, "x_train", fed=False)
        y_train = check_labels(y_train, len(x_train), "y_train")
    has_conv = bool(internals.conv_layers(model))
    image_index = internals.check_image_index(
        default_image_index(len(x_test), seed) if image_index is None else image_index, len(x_test))
    if layers is not None:
        internals.check_feature_layers(model, layers)  # fail on a bad request before the slow part

    test = predict(model, x_test, y_test, TTA.named(metrics.get("test_time_augmentation")) or TTA(),
                   test_probabilities)
    computed = classification_metrics(test.y, test.probabilities, CLASS_NAMES)
    title = metrics.get("model") or model.name
    samples = (x_train, y_train) if x_train is not None else (x_test, test.y)
    sections = [
        curves_section(history_csv or run_dir / HISTORY_FILE, metrics, title) if curves else None,
        confusion_section(computed["confusion_matrix"]),
        mistakes_section(test),
        samples_section(gray_images(samples[0], test.data_format), np.asarray(samples[1]), seed),
        embedding_section(model, test),
        filters_section(model) if has_conv else None,
        feature_maps_section(model, test, image_index, layers) if has_conv else None,
        saliency_section(model, test, explained_indices(len(x_test), seed)),
    ]
    sections = [section for section in sections if section is not None]
    markdown = render_markdown(title, metrics, metrics_sections(metrics, computed), sections)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not ours:
        write_json(out_dir / OUTPUT_MARKER, {"written_by": "fmnist_keras.inspection.report"})
    save_figures(sections, out_dir / FIGURES_DIR)
    report = out_dir / REPORT_FILE
    write_text(report, markdown)
    return report

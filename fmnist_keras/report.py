"""Write a run's report: the figures as PNG files and ``report.md`` that embeds them.

``train`` calls :func:`write_report` at the end of each run and ``evaluate``
calls it again for an existing run. Imports Keras (through
:mod:`fmnist_keras.inspect`): import this only after the backend is chosen.

Example:
    >>> write_report(run_dir, splits.x_test, splits.y_test, metrics=metrics,
    ...              x_train=splits.x_train, y_train=splits.y_train)
    PosixPath('runs/20261129-143000/cnn/report.md')
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fmnist_keras import inspect as finspect
from fmnist_keras import plots
from fmnist_keras.callbacks import read_history as history_rows
from fmnist_keras.data import CLASS_NAMES
from fmnist_keras.metrics import classification_metrics

REPORT_FILE = "report.md"
FIGURES_DIR = "figures"
# How many test images the saliency figure explains and the mistakes grid
# shows: enough to see a pattern, few enough to read at a glance.
NUM_EXPLAINED = 4
NUM_MISTAKES = 24


def read_history(path: str | Path) -> dict[str, np.ndarray]:
    """The columns of a CSVLogger ``history.csv`` as float arrays (``epoch`` as int)."""
    path = Path(path)
    try:
        if not path.exists():
            raise FileNotFoundError(2, "No such file or directory")
        rows = history_rows(path)
    except OSError as error:
        raise ValueError(f"cannot read training history {path}: {error.strerror}.") from None
    if not rows or "epoch" not in rows[0]:
        raise ValueError(f"{path} is not a CSVLogger history (expected a header with 'epoch' and at least one row).")
    return {key: np.array([row[key] for row in rows]) for key in rows[0]}


def default_image_index(count: int, seed: int = 0) -> int:
    """The fixed, seeded test image whose feature maps the report shows."""
    return int(np.random.default_rng(seed).integers(count))


def _save(fig, directory: Path, name: str) -> str:
    fig.savefig(directory / name, dpi=110)
    return f"{FIGURES_DIR}/{name}"


def _metrics_table(sections: dict) -> list[str]:
    """Markdown: overall metrics per split, then per-class precision/recall/F1."""
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


def write_report(
    run_dir: str | Path,
    x_test: np.ndarray,
    y_test: np.ndarray,
    model=None,
    metrics: dict | None = None,
    history_csv: str | Path | None = None,
    x_train: np.ndarray | None = None,
    y_train: np.ndarray | None = None,
    out_dir: str | Path | None = None,
    image_index: int | None = None,
    layers: list[str] | None = None,
    seed: int = 0,
) -> Path:
    """Draw every figure for one trained model and write ``report.md`` embedding them.

    Args:
        run_dir: the model's run directory (``model.keras``, ``history.csv``,
            ``metrics.json``); missing files just leave their part out.
        x_test: model-ready test images (``to_model_input``), in the model's data format.
        y_test: integer test labels.
        model: the trained model; default ``run_dir/model.keras``, loaded safely.
        metrics: the run's metrics (``metrics.json`` content); default read
            from ``run_dir``. Its ``test`` (and ``validation``) entries fill
            the table; without them the test metrics are computed here.
        history_csv: training history; default ``run_dir/history.csv``.
        x_train, y_train: images for the sample grid; default the test set.
        out_dir: where ``report.md`` and ``figures/`` go; default ``run_dir``.
        image_index: the test image whose feature maps are drawn; default a
            seeded one (:func:`default_image_index`).
        layers: layers for the feature maps; default each convolution's output.
        seed: seeds the choice of sample and explained images.

    Returns:
        The path of ``report.md``.
    """
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else run_dir
    figures_dir = out_dir / FIGURES_DIR
    figures_dir.mkdir(parents=True, exist_ok=True)
    if model is None:
        from fmnist_keras.loading import load_model

        model = load_model(run_dir)
    if metrics is None and (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics = metrics or {}
    history_csv = Path(history_csv) if history_csv is not None else run_dir / "history.csv"
    y_test = np.asarray(y_test)
    has_conv = bool(finspect.conv_layers(model))
    if image_index is None:
        image_index = default_image_index(len(x_test), seed)
    image_index = finspect.check_image_index(image_index, len(x_test))
    if layers is not None:
        finspect.check_feature_layers(model, layers)  # fail on a bad request before the slow part

    features, probabilities = finspect.embeddings_and_probabilities(model, x_test)
    predicted = probabilities.argmax(axis=1)
    computed = classification_metrics(y_test, probabilities, CLASS_NAMES)
    sections = {"test": metrics.get("test") or computed}
    if metrics.get("validation"):
        sections["validation"] = metrics["validation"]

    title = metrics.get("model") or model.name
    lines = [f"# Report: {title}", ""]
    facts = [f"{key}: {metrics[key]}" for key in ("backend", "device", "epochs_run", "best_epoch", "train_time_s",
                                                   "num_params") if key in metrics]
    if facts:
        lines += ["; ".join(facts), ""]
    lines += ["## Metrics", "", *_metrics_table(sections), ""]

    figures = []
    if history_csv.is_file():
        history = read_history(history_csv)
        best_epoch = metrics.get("best_epoch")
        if best_epoch is None and "val_loss" in history:  # EarlyStopping restores the lowest val_loss
            best_epoch = int(history["epoch"][np.argmin(history["val_loss"])]) + 1
        fig = plots.training_curves(history, best_epoch, title=f"{title}: training curves")
        figures.append(("Training curves", _save(fig, figures_dir, "curves.png"),
                        "Dashed line: the epoch whose weights EarlyStopping restored."))
    matrix = np.asarray(computed["confusion_matrix"])
    figures.append(("Confusion matrix", _save(plots.confusion_matrix(matrix), figures_dir, "confusion_matrix.png"),
                    "Rows: true class; columns: predicted class."))
    wrong = finspect.misclassified(y_test, probabilities, NUM_MISTAKES)
    figures.append(("Misclassified test images",
                    _save(plots.misclassified(x_test, y_test, probabilities, wrong), figures_dir, "misclassified.png"),
                    f"{int((predicted != y_test).sum())} of {len(y_test)} test images are wrong; "
                    f"the {len(wrong)} most confident mistakes are shown."))
    samples_x, samples_y = (x_train, y_train) if x_train is not None else (x_test, y_test)
    figures.append(("Sample images", _save(plots.sample_grid(samples_x, samples_y, seed=seed), figures_dir,
                                           "samples.png"), ""))
    points, explained = finspect.pca_2d(features)
    figures.append(("Embedding", _save(plots.embedding(points, y_test, explained=explained), figures_dir,
                                       "embedding.png"),
                    f"Layer `{finspect.embedding_layer_name(model)}` projected on its two principal components; "
                    "overlapping colours are classes the model confuses."))

    explained_idx = np.random.default_rng(seed).choice(len(x_test), size=min(NUM_EXPLAINED, len(x_test)), replace=False)
    heatmaps = {"saliency": finspect.saliency(model, x_test[explained_idx], predicted[explained_idx])}
    if has_conv:
        heatmaps["Grad-CAM"] = finspect.grad_cam(model, x_test[explained_idx], class_indices=predicted[explained_idx])
        kernel = finspect.first_layer_filters(model)
        figures.append(("First-layer filters", _save(plots.filters(kernel), figures_dir, "filters.png"), ""))
        maps = finspect.feature_maps(model, x_test[image_index: image_index + 1], layers)
        channels_first = x_test.shape[1] == 1 and x_test.shape[-1] != 1
        fig = plots.feature_maps(maps, image=x_test[image_index], channels_first=channels_first,
                                 title=f"Feature maps of test image {image_index} ({CLASS_NAMES[y_test[image_index]]})")
        figures.append(("Feature maps", _save(fig, figures_dir, "feature_maps.png"),
                        f"Test image {image_index}; layers {', '.join(maps)}; first 8 channels each."))
    fig = plots.saliency(x_test[explained_idx], heatmaps, y_test[explained_idx], predicted[explained_idx])
    figures.append(("Saliency", _save(fig, figures_dir, "saliency.png"),
                    "Where the score of the predicted class is most sensitive (saliency) "
                    + ("and which regions of the last convolution drive it (Grad-CAM)." if has_conv else ".")))

    for heading, path, caption in figures:
        lines += [f"## {heading}", "", f"![{heading}]({path})", ""]
        if caption:
            lines += [caption, ""]
    report = out_dir / REPORT_FILE
    report.write_text("\n".join(lines))
    return report

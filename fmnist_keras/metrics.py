"""Classification metrics from labels and predicted probabilities (numpy only)."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return matrix


def classification_metrics(y_true, probabilities, class_names, loss: float | None = None) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/accuracy and the confusion matrix.

    Args:
        y_true: integer labels, shape (N,).
        probabilities: predicted class probabilities, shape (N, num_classes).
        class_names: one name per class.
        loss: the model's loss on the same data, recorded as given.

    Returns:
        A JSON-serialisable dict. Per-class accuracy is the recall of that
        class (the fraction of its images classified correctly).
    """
    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities)
    num_classes = len(class_names)
    if probabilities.shape != (len(y_true), num_classes):
        raise ValueError(
            f"probabilities must have shape ({len(y_true)}, {num_classes}), got {probabilities.shape}."
        )
    y_pred = probabilities.argmax(axis=1)
    matrix = confusion_matrix(y_true, y_pred, num_classes)
    true_positives = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, true_positives / predicted, 0.0)
        recall = np.where(support > 0, true_positives / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "accuracy": float(recall[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    return {
        "loss": None if loss is None else float(loss),
        "accuracy": float(true_positives.sum() / max(len(y_true), 1)),
        "macro_f1": float(f1.mean()),
        "num_examples": int(len(y_true)),
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
    }


def format_summary(rows: list[dict]) -> str:
    """A small fixed-width table: one row per trained model; ``-`` where a run has no value (no best epoch)."""
    header = f"{'model':<14}{'test acc':>9}{'macro-F1':>10}{'test loss':>11}{'epochs':>8}{'best':>6}{'time':>9}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['model']:<14}{r['test']['accuracy']:>9.4f}{r['test']['macro_f1']:>10.4f}"
            f"{_or_dash(r['test']['loss'], '.4f'):>11}{r['epochs_run']:>8}{_or_dash(r['best_epoch'], 'd'):>6}"
            f"{r['wall_time_s']:>8.0f}s"
        )
    return "\n".join(lines)


def _or_dash(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)

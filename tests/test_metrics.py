import numpy as np
import pytest

from fmnist_keras.metrics import classification_metrics, confusion_matrix, format_summary


def test_metrics_match_hand_computed_values():
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 1, 1, 1, 2, 0])
    probs = np.eye(3)[y_pred]
    m = classification_metrics(y_true, probs, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)
    np.testing.assert_array_equal(m["confusion_matrix"], [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    # precision a=1/2, b=2/3, c=1; recall a=1/2, b=1, c=1/2
    f1 = [0.5, 0.8, 2 / 3]
    assert m["macro_f1"] == pytest.approx(np.mean(f1))
    assert m["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert m["per_class"]["c"]["accuracy"] == pytest.approx(0.5)


def test_confusion_matrix_sums_to_examples():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 10, 500), rng.integers(0, 10, 500)
    assert confusion_matrix(y, p, 10).sum() == 500


def test_wrong_probability_shape_is_rejected():
    with pytest.raises(ValueError, match="must have shape"):
        classification_metrics([0, 1], np.zeros((2, 3)), ["a", "b"])


def reference_metrics(y_true, y_pred, num_classes):
    """Accuracy, macro-F1 and per-class precision/recall/F1/support, one example at a time."""
    counts = [[0] * num_classes for _ in range(num_classes)]
    for true, pred in zip(y_true, y_pred):
        counts[true][pred] += 1
    per_class = []
    for c in range(num_classes):
        support = sum(counts[c])
        predicted = sum(row[c] for row in counts)
        precision = counts[c][c] / predicted if predicted else 0.0
        recall = counts[c][c] / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append({"precision": precision, "recall": recall, "f1": f1, "support": support})
    accuracy = sum(counts[c][c] for c in range(num_classes)) / len(y_true)
    return counts, accuracy, sum(row["f1"] for row in per_class) / num_classes, per_class


@pytest.mark.parametrize("seed, n, num_classes", [(0, 200, 10), (1, 37, 4), (2, 5, 6)])  # (2, ...): empty classes
def test_metrics_match_a_loop_reference_on_random_labels(seed, n, num_classes):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, num_classes, n)
    probabilities = rng.dirichlet(np.ones(num_classes), n)
    names = [f"class{c}" for c in range(num_classes)]
    m = classification_metrics(y_true, probabilities, names, loss=0.25)
    counts, accuracy, macro_f1, per_class = reference_metrics(y_true.tolist(), probabilities.argmax(1).tolist(),
                                                              num_classes)
    assert m["confusion_matrix"] == counts
    assert m["accuracy"] == pytest.approx(accuracy, abs=1e-12)
    assert m["macro_f1"] == pytest.approx(macro_f1, abs=1e-12)
    assert (m["num_examples"], m["loss"]) == (n, 0.25)
    for name, expected in zip(names, per_class):
        got = m["per_class"][name]
        for key in ("precision", "recall", "f1"):
            assert got[key] == pytest.approx(expected[key], abs=1e-12)
        assert got["accuracy"] == pytest.approx(expected["recall"], abs=1e-12)
        assert got["support"] == expected["support"]


def test_the_summary_prints_a_dash_for_a_run_without_a_best_epoch_or_a_loss():
    # metrics.json allows best_epoch null (no epoch finished with a finite loss) and a null loss.
    row = {"model": "cnn", "test": {"accuracy": 0.95, "macro_f1": 0.949, "loss": 0.21}, "epochs_run": 24,
           "best_epoch": 22, "wall_time_s": 612.4}
    table = format_summary([row, {**row, "model": "mlp", "best_epoch": None, "test": {**row["test"], "loss": None}}])
    header, rule, cnn, mlp = table.splitlines()
    assert cnn.split() == ["cnn", "0.9500", "0.9490", "0.2100", "24", "22", "612s"]
    assert mlp.split() == ["mlp", "0.9500", "0.9490", "-", "24", "-", "612s"]
    assert len(cnn) == len(mlp) == len(header)

import numpy as np
import pytest

from fmnist_keras.metrics import classification_metrics, confusion_matrix


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

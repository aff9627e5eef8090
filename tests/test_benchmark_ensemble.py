"""benchmarks/ensemble.py: each model's accuracy as evaluate gives it, their mean, and refusals of models it cannot compare."""

import json
import shutil
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ensemble  # noqa: E402  (benchmarks/ensemble.py)
from test_evaluate import make_run_dir, run_cli  # noqa: E402

from fmnist_keras.config import TrainConfig  # noqa: E402
from fmnist_keras.data import load_data  # noqa: E402
from fmnist_keras.engine import evaluation, splits  # noqa: E402
from fmnist_keras.loading import input_data_format  # noqa: E402
from fmnist_keras.models import build_cnn  # noqa: E402
from fmnist_keras.tta import CHOICES  # noqa: E402


@pytest.fixture
def runs(tmp_path):
    """Two tiny untrained CNNs of one split (seed 0), in run directories as train writes them."""
    made = []
    for name, seed in (("a", 0), ("b", 1)):
        keras.utils.set_random_seed(seed)
        made.append(make_run_dir(tmp_path / name / "cnn", build_cnn(filters=(4, 8), dense_units=16, seed=seed)))
    return made


def _ensemble(data_dir, *args):
    return ensemble.main([*map(str, args), "--data-dir", str(data_dir), "--no-verify"])


def test_each_model_scores_as_evaluate_scores_it_and_the_ensemble_averages_them(runs, tiny_data_dir, tmp_path):
    out = tmp_path / "ensemble.json"
    assert _ensemble(tiny_data_dir, *runs, "--json", out) == 0
    rows = json.loads(out.read_text())["rows"]
    for row, run in zip(rows, runs):
        assert run_cli(tiny_data_dir, run, "--validation", "--no-report") == 0
        evaluated = json.loads((run / "evaluation.json").read_text())
        assert row["tta"] == "flip-shifts" and evaluated["test_time_augmentation"] == CHOICES["flip-shifts"].name
        assert row["test"] == evaluated["test"]["accuracy"]
        assert row["validation"] == evaluated["validation"]["accuracy"]

    models = [keras.saving.load_model(run / "model.keras") for run in runs]
    config = TrainConfig(model="cnn", epochs=3, seed=0, val_split=0.1).resolved()
    split = splits.make_splits(load_data(tiny_data_dir, verify=False), config, input_data_format(models[0]))
    for name, x, y in (("validation", split.x_val, split.y_val), ("test", split.x_test, split.y_test)):
        mean = np.mean([evaluation.predict_probabilities(model, x, CHOICES["flip-shifts"]) for model in models], axis=0)
        assert rows[1]["mean_so_far"][name] == float((mean.argmax(1) == y).mean())
        assert rows[0]["mean_so_far"][name] == rows[0][name]


def test_a_model_and_its_copy_ensemble_to_the_model_itself(runs, tiny_data_dir, tmp_path, capsys):
    copy = tmp_path / "copy" / "cnn"
    shutil.copytree(runs[0].parent, copy.parent)
    assert _ensemble(tiny_data_dir, runs[0], copy, "--tta", "flip") == 0
    table = capsys.readouterr().out.splitlines()
    (alone,) = [line for line in table if line.startswith(f"| {runs[0] / 'model.keras'} (--tta flip) |")]
    (mean,) = [line for line in table if line.startswith("| mean of the first 2 |")]
    assert alone.split("|")[2:] == mean.split("|")[2:]


@pytest.mark.parametrize("damage, says", [
    ("another seed", "were trained on different splits"),
    ("the same model twice", "is given twice"),
    ("no config.json", "has no config.json beside it"),
    ("a damaged config.json", "config.json"),
    ("no model", "does not exist"),
])
def test_models_it_cannot_compare_are_one_line_before_the_data_is_read(runs, tmp_path, capsys, damage, says):
    second = runs[1]
    if damage == "another seed":
        TrainConfig(model="cnn", epochs=3, seed=1, val_split=0.1).save(second / "config.json")
    elif damage == "the same model twice":
        second = runs[0] / "model.keras"
    elif damage == "no config.json":
        (second / "config.json").unlink()
    elif damage == "a damaged config.json":
        (second / "config.json").write_text('{"model": "cnn", "epochs": "many"}')
    else:
        second = tmp_path / "nowhere"
    assert _ensemble(tmp_path / "no-data-here", runs[0], second) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: ") and says in err, err


def test_one_model_is_no_ensemble(runs, capsys):
    with pytest.raises(SystemExit) as stop:
        ensemble.main([str(runs[0])])
    assert stop.value.code == 2 and "two models or more" in capsys.readouterr().err


def test_a_model_with_damaged_weights_is_one_line_not_a_wrong_accuracy(runs, tiny_data_dir, capsys):
    model = keras.saving.load_model(runs[1] / "model.keras")
    model.set_weights([np.full_like(weights, np.nan) for weights in model.get_weights()])
    model.save(runs[1] / "model.keras")
    assert _ensemble(tiny_data_dir, *runs) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "model.keras gives NaN or infinite outputs" in err and err.count("\n") == 1, err

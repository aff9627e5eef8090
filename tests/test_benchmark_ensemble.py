"""benchmarks/ensemble.py: each model's accuracy as evaluate gives it, their mean, the ensemble chosen on validation,
and refusals of models it cannot compare."""

import json
import shutil
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import ensemble  # noqa: E402  (benchmarks/ensemble.py)
from test_evaluate import make_cnn_runs, run_cli  # noqa: E402

from fmnist_keras.config import TrainConfig  # noqa: E402
from fmnist_keras.data import load_data  # noqa: E402
from fmnist_keras.engine import evaluation, splits  # noqa: E402
from fmnist_keras.loading import input_data_format  # noqa: E402
from fmnist_keras.tta import CHOICES  # noqa: E402


@pytest.fixture
def runs(tmp_path):
    """Two tiny untrained CNNs of one split (seed 0), in run directories as train writes them."""
    return make_cnn_runs(tmp_path)


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
    chosen = json.loads(out.read_text())["chosen_on_validation"]
    assert chosen["models"] == [rows[number - 1]["model"] for number in chosen["numbers"]]
    for name, x, y in (("validation", split.x_val, split.y_val), ("test", split.x_test, split.y_test)):
        each = [evaluation.predict_probabilities(model, x, CHOICES["flip-shifts"]) for model in models]
        assert rows[1]["mean_so_far"][name] == float((np.mean(each, axis=0).argmax(1) == y).mean())
        assert rows[0]["mean_so_far"][name] == rows[0][name]
        picked = np.mean([each[number - 1] for number in chosen["numbers"]], axis=0)
        assert chosen[name] == float((picked.argmax(1) == y).mean())


def test_the_mean_is_of_every_model_not_of_one(runs, tiny_data_dir, monkeypatch):
    """Stub probabilities: each model puts 0.6 on a wrong class and 0.4 on the right one, a different wrong class
    per model, so each model alone scores 0 and only the mean of both scores 1."""
    config = TrainConfig(model="cnn", epochs=3, seed=0, val_split=0.1).resolved()
    split = splits.make_splits(load_data(tiny_data_dir, verify=False), config)
    labels = {len(split.y_val): split.y_val, len(split.y_test): split.y_test}
    calls = []

    def stub(model, x, tta, fast_path=True):
        y, wrong = labels[len(x)], len(calls) // 2 + 1  # model 1 (calls 0, 1) errs by one class, model 2 by two
        calls.append(len(x))
        probabilities = np.zeros((len(x), 10))
        probabilities[np.arange(len(x)), y] = 0.4
        probabilities[np.arange(len(x)), (y + wrong) % 10] = 0.6
        return probabilities

    monkeypatch.setattr(evaluation, "predict_probabilities", stub)
    rows, chosen = ensemble.evaluate(ensemble.read_models([str(run) for run in runs]),
                                     load_data(tiny_data_dir, verify=False), "run")
    assert calls == [len(split.y_val), len(split.y_test)] * 2
    for name in ("validation", "test"):
        assert [rows[0][name], rows[1][name], rows[0]["mean_so_far"][name], rows[1]["mean_so_far"][name]] == [0, 0, 0, 1]
    assert chosen == {"models": [row["model"] for row in rows], "numbers": [1, 2], "validation": 1, "test": 1}


def test_the_choice_reads_validation_not_test(runs, tiny_data_dir, monkeypatch, capsys):
    """Stub probabilities: model 1 is right on every validation image and wrong on every test image, model 2 the
    reverse. Chosen on validation, the ensemble is model 1 alone, at 0% test accuracy."""
    config = TrainConfig(model="cnn", epochs=3, seed=0, val_split=0.1).resolved()
    split = splits.make_splits(load_data(tiny_data_dir, verify=False), config)
    calls = []

    def stub(model, x, tta, fast_path=True):
        y, is_validation = (split.y_val, True) if len(x) == len(split.y_val) else (split.y_test, False)
        right = is_validation == (len(calls) < 2)  # calls 0 and 1 are model 1's
        calls.append(len(x))
        return np.eye(10)[y if right else (y + 1) % 10]

    monkeypatch.setattr(evaluation, "predict_probabilities", stub)
    assert _ensemble(tiny_data_dir, *runs) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "| chosen on validation: model 1 alone | 100.00% | 0.00% |"


# Ten images of class 0. a is right on images 0-7 (0.6 on class 0, 0.4 on class 1) and wrong on 8 and 9 (0.9 on
# class 1): 80% alone. c is right on 8 and 9 only (0.95 on class 0) and puts 0.3 on class 0 and 0.7 on class 2
# elsewhere: 20% alone, but the mean of a and c is right on all ten; a copy of a added to them makes 8 and 9 wrong.
A, C = np.zeros((10, 10)), np.zeros((10, 10))
A[:8, 0], A[:8, 1], A[8:, 0], A[8:, 1] = 0.6, 0.4, 0.1, 0.9
C[:8, 0], C[:8, 2], C[8:, 0], C[8:, 1] = 0.3, 0.7, 0.95, 0.05


@pytest.mark.parametrize("given, chosen", [
    ((A, A, C), [0, 2]),  # the copy adds nothing, so it stays out, and the choice stops at the 100% pair
    ((C, A, A), [1, 0]),  # the best alone comes first; of the two equal copies, the one given first
    ((A, A), [0]),  # nothing raises the accuracy of the model best alone: the ensemble is that model
    ((A, C, C), [0, 1]),  # equal after the first choice too: the one given first
    ((C, C), [0]),
])
def test_the_ensemble_is_chosen_on_validation_greedily(given, chosen):
    assert ensemble.choose_on_validation(list(given), np.zeros(10, dtype=int)) == chosen


@pytest.mark.parametrize("damage, says", [
    ("another seed", "were trained on different splits"),
    ("the same model twice", "is given twice"),
    ("no config.json", "has no config.json beside it"),
    ("a damaged config.json", "config.json is damaged"),
    ("a copy of a model", "is not a run's model.keras"),
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
    elif damage == "a copy of a model":
        second = tmp_path / "b" / "cnn" / "copy.keras"
        shutil.copy(runs[1] / "model.keras", second)
    elif damage == "a damaged config.json":
        (second / "config.json").write_text('{"model": "cnn", "epochs": "many"}')
    else:
        second = tmp_path / "nowhere"
    assert _ensemble(tmp_path / "no-data-here", runs[0], second) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: ") and says in err, err


@pytest.mark.parametrize("seeds, split_seeds, one_split", [
    ((0, 1), (None, 0), True),  # the fixture's seed-0 run and a seed-1 run told to split by seed 0
    ((0, 1), (5, 5), True),
    ((0, 0), (None, 1), False),
    ((1, 0), (None, None), False),
])
def test_models_of_different_seeds_are_one_split_when_their_split_seeds_agree(runs, seeds, split_seeds, one_split):
    for run, seed, split_seed in zip(runs, seeds, split_seeds):
        TrainConfig(model="cnn", epochs=3, seed=seed, split_seed=split_seed, val_split=0.1).save(run / "config.json")
    if one_split:
        models = ensemble.read_models([str(run) for run in runs])
        assert [config.seed for _, config in models] == list(seeds)
    else:
        with pytest.raises(ensemble.EnsembleError, match="trained on different splits .* split seed"):
            ensemble.read_models([str(run) for run in runs])


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


def test_runs_whose_split_does_not_fit_the_data_are_one_line(runs, tiny_data_dir, capsys):
    for run in runs:  # a subset of 5 images cannot hold each of the 10 classes
        TrainConfig(model="cnn", epochs=3, seed=0, val_split=0.1, subset=5).save(run / "config.json")
    assert _ensemble(tiny_data_dir, *runs) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and "does not rebuild a split of this data" in err and err.count("\n") == 1, err

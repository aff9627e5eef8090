"""benchmarks/distill.py and fit_model's training targets: the targets reach the loss, they mix the labels with the
teachers' mean probabilities on the student's training images, and teachers the student cannot share a split with
are refused before anything is written."""

import json
import re
import signal
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import distill  # noqa: E402  (benchmarks/distill.py)
from test_evaluate import make_cnn_runs, make_run_dir  # noqa: E402

from fmnist_keras import data as fdata  # noqa: E402
from fmnist_keras import train  # noqa: E402
from fmnist_keras.config import TrainConfig  # noqa: E402
from fmnist_keras.engine import evaluation, fit  # noqa: E402
from fmnist_keras.engine.splits import make_splits  # noqa: E402
from fmnist_keras.interrupts import Interrupted  # noqa: E402
from fmnist_keras.rundir import MARKER  # noqa: E402
from fmnist_keras.tta import CHOICES  # noqa: E402


@pytest.fixture
def teachers(tmp_path):
    """Two tiny untrained CNNs of one split (seed 0), in run directories as train writes them."""
    return make_cnn_runs(tmp_path)


@pytest.fixture
def predictions(monkeypatch):
    """The number of images of each prediction that evaluation.predict_probabilities makes."""
    made, real_predict = [], evaluation.predict_probabilities

    def counting_predict(model, x, *args, **kwargs):
        made.append(len(x))
        return real_predict(model, x, *args, **kwargs)

    monkeypatch.setattr(evaluation, "predict_probabilities", counting_predict)
    return made


def _distill(data_dir, *args):
    return distill.main([*map(str, args), "--data-dir", str(data_dir), "--no-verify"])


def test_the_targets_mix_the_one_hot_labels_and_the_teachers_by_the_weight():
    labels = np.array([0, 3, 9])
    teacher = np.random.default_rng(0).dirichlet(np.ones(10), size=3)
    one_hot = np.eye(10)[labels]
    assert np.array_equal(distill.distillation_targets(labels, teacher, 0.0), one_hot.astype(np.float32))
    np.testing.assert_allclose(distill.distillation_targets(labels, teacher, 1.0), teacher, rtol=1e-6)
    mixed = distill.distillation_targets(labels, teacher, 0.25)
    np.testing.assert_allclose(mixed, 0.75 * one_hot + 0.25 * teacher, rtol=1e-6)
    assert mixed.dtype == np.float32 and np.allclose(mixed.sum(axis=1), 1.0)


def _fit(tiny_data_dir, on_device, targets_of=None):
    raw = fdata.load_data(str(tiny_data_dir), verify=False)
    config = TrainConfig(model="mlp", epochs=2, batch_size=32, seed=0, verify=False)
    splits = make_splits(raw, config)
    targets = None if targets_of is None else targets_of(splits.y_train)
    result = fit.fit_model(config, splits, verbose=0, data_on_device=on_device, train_targets=targets)
    return result.model.get_weights()


@pytest.mark.parametrize("on_device", [False, True])
def test_one_hot_targets_train_as_the_labels_do_and_other_targets_train_otherwise(tiny_data_dir, on_device):
    labels = _fit(tiny_data_dir, on_device)
    one_hot = _fit(tiny_data_dir, on_device, lambda y: np.eye(10, dtype=np.float32)[y])
    rolled = _fit(tiny_data_dir, on_device, lambda y: np.eye(10, dtype=np.float32)[(y + 1) % 10])
    assert all(np.array_equal(a, b) for a, b in zip(labels, one_hot))
    assert not all(np.array_equal(a, b) for a, b in zip(labels, rolled))


@pytest.mark.parametrize("targets, message", [
    (np.full((5, 10), 0.1), "shape (5, 10), not (8, 10)"),
    (np.full((8, 9), 1 / 9), "shape (8, 9), not (8, 10)"),
    (np.random.default_rng(0).normal(size=(8, 10)), "not class probabilities"),
    (np.full((8, 10), 0.2), "not class probabilities"),
    (np.full((8, 10), np.nan), "not class probabilities"),
])
def test_targets_that_are_not_one_distribution_per_training_image_are_refused(targets, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fit.checked_targets(targets, 8)


def test_the_student_fits_the_mix_of_its_labels_and_the_teachers_mean_on_its_own_training_images(
        teachers, tiny_data_dir, tmp_path, monkeypatch):
    seen, real_fit = {}, fit.fit_model

    def recording_fit(config, splits, run=None, **kwargs):
        seen.update(config=config, splits=splits, targets=kwargs["train_targets"])
        return real_fit(config, splits, run, **kwargs)

    monkeypatch.setattr(fit, "fit_model", recording_fit)
    for teacher in teachers:  # a split of their own, which the student must share
        _set_config(teacher, split_seed=7, val_split=0.2, subset=300)
    out = tmp_path / "distill.json"
    assert _distill(tiny_data_dir, *teachers, "--model", "cnn", "--seeds", "3", "--epochs", "1",
                    "--teacher-weight", "0.3", "--out-dir", tmp_path / "runs", "--json", out) == 0

    config, splits = seen["config"], seen["splits"]
    assert (config.model, config.seed, config.epochs) == ("cnn", 3, 1)
    assert (config.splitting_seed, config.val_split, config.subset) == (7, 0.2, 300)  # the teachers' split
    assert len(splits.x_train) == 240
    models = [keras.saving.load_model(teacher / "model.keras") for teacher in teachers]
    mean = np.mean([evaluation.predict_probabilities(m, splits.x_train, CHOICES["flip"]) for m in models], axis=0)
    np.testing.assert_allclose(seen["targets"], 0.7 * np.eye(10)[splits.y_train] + 0.3 * mean, atol=1e-6)

    metrics = json.loads((tmp_path / "runs" / "cnn-seed3-w0.3" / "cnn" / "metrics.json").read_text())
    assert metrics["distillation"]["teachers"] == [str(teacher / "model.keras") for teacher in teachers]
    assert metrics["distillation"]["teacher_weight"] == 0.3
    assert metrics["epochs_run"] == 1 and metrics["num_train"] == len(splits.x_train)
    assert json.loads(out.read_text())["students"] == [metrics]


def test_several_seeds_share_one_computation_of_the_teachers(teachers, tiny_data_dir, tmp_path, predictions):
    out = tmp_path / "distill.json"
    assert _distill(tiny_data_dir, *teachers, "--model", "cnn", "--seeds", "5", "6", "--epochs", "1",
                    "--out-dir", tmp_path / "runs", "--json", out) == 0
    students = json.loads(out.read_text())["students"]
    assert [s["num_train"] for s in students] == [360, 360] and predictions.count(360) == len(teachers)
    for seed, student in zip((5, 6), students):
        config = json.loads((tmp_path / "runs" / f"cnn-seed{seed}-w0.5" / "cnn" / "config.json").read_text())
        assert (config["seed"], config["split_seed"]) == (seed, 0)
        assert json.loads((tmp_path / "runs" / f"cnn-seed{seed}-w0.5" / "cnn" / "metrics.json").read_text()) == student


def _set_config(teacher, **fields):
    config = TrainConfig.from_json((teacher / "config.json").read_text())
    TrainConfig(**{**config.__dict__, **fields}).save(teacher / "config.json")


@pytest.mark.parametrize("change, message", [
    ({"split_seed": 5}, "different splits"),
    ({"val_split": 0.2}, "different splits"),
    ({"subset": 300}, "different splits"),
])
def test_teachers_of_another_split_are_refused_before_anything_is_written(
        teachers, tiny_data_dir, tmp_path, capsys, change, message):
    _set_config(teachers[1], **change)
    assert _distill(tiny_data_dir, *teachers, "--model", "cnn", "--epochs", "1", "--out-dir", tmp_path / "runs") == 1
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("out_dir", ["", "a-file"])
def test_an_out_dir_that_is_empty_or_a_file_is_refused_before_anything_is_written(
        teachers, tiny_data_dir, tmp_path, capsys, monkeypatch, predictions, out_dir):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert _distill(tiny_data_dir, *teachers, "--model", "cnn", "--out-dir", out_dir) == 1
    assert len(capsys.readouterr().err.strip().splitlines()) == 1 and predictions == []
    assert sorted(p.name for p in tmp_path.iterdir()) == before and (tmp_path / "a-file").read_text() == "mine"


def test_a_seed_given_twice_is_refused(teachers, tiny_data_dir, tmp_path, capsys):
    assert _distill(tiny_data_dir, *teachers, "--model", "cnn", "--seeds", "1", "1", "--out-dir", tmp_path) == 1
    assert "names a seed twice" in capsys.readouterr().err


@pytest.mark.parametrize("ours, overwrite, message", [
    (True, (), "already exists; choose another --out-dir or pass --overwrite"),
    (True, ("--overwrite",), "notes.txt, which is not what train writes in a run"),
    (False, (), "not created by"),
    (False, ("--overwrite",), "not created by"),
])
def test_a_directory_that_is_not_a_new_or_own_run_is_kept_and_the_teachers_are_not_run(
        teachers, tiny_data_dir, tmp_path, capsys, predictions, ours, overwrite, message):
    kept = tmp_path / "runs" / "cnn-seed42-w0.5"
    kept.mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    if ours:
        (kept / MARKER).write_text("{}")
    before = sorted(p.name for p in kept.iterdir())
    assert _distill(tiny_data_dir, *teachers, "--model", "cnn", "--out-dir", tmp_path / "runs", *overwrite) == 1
    error = capsys.readouterr().err
    assert message in error and "another --out-dir" in error and "--run-name" not in error and predictions == []
    assert (kept / "notes.txt").read_text() == "mine" and sorted(p.name for p in kept.iterdir()) == before


def test_a_teacher_without_probabilities_is_refused_before_anything_is_written(
        teachers, tiny_data_dir, tmp_path, capsys):
    logits = keras.Sequential([keras.Input((28, 28, 1)), keras.layers.Flatten(), keras.layers.Dense(10)])
    teacher = make_run_dir(tmp_path / "logits" / "cnn", logits)
    assert _distill(tiny_data_dir, teachers[0], teacher, "--model", "cnn", "--out-dir", tmp_path / "runs") == 1
    error = capsys.readouterr().err
    assert "does not output class probabilities" in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_a_student_trains_says_what_is_left_and_how_to_start_again(
        teachers, tiny_data_dir, tmp_path, capsys, monkeypatch, signum):
    def stopped(config, splits, run=None, **kwargs):
        raise Interrupted(signum)

    monkeypatch.setattr(fit, "fit_model", stopped)
    assert _distill(tiny_data_dir, *teachers, "--model", "cnn", "--out-dir", tmp_path / "runs") == 128 + signum
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "holds a partial student" in error and "--overwrite" in error
    student = tmp_path / "runs" / "cnn-seed42-w0.5"
    before = sorted(str(p.relative_to(student)) for p in student.rglob("*"))

    assert train.main(["--resume", str(student)]) == 1  # it would go on without the teachers
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "benchmarks/distill.py made this run" in error
    assert "run benchmarks/distill.py again with --overwrite" in error
    assert sorted(str(p.relative_to(student)) for p in student.rglob("*")) == before


@pytest.mark.parametrize("finished", [0, 1])
def test_a_stop_says_what_the_json_holds_and_keeps_an_earlier_runs_file_when_no_student_finished(
        teachers, tiny_data_dir, tmp_path, capsys, monkeypatch, finished):
    out = tmp_path / "distill.json"
    earlier = json.dumps({"students": ["earlier"], "written_by": "fmnist_keras benchmarks"})
    out.write_text(earlier)
    real_fit, calls = fit.fit_model, []

    def stopped_after(config, splits, run=None, **kwargs):
        calls.append(config.seed)
        if len(calls) > finished:
            raise Interrupted(signal.SIGINT)
        return real_fit(config, splits, run, **kwargs)

    monkeypatch.setattr(fit, "fit_model", stopped_after)
    assert _distill(tiny_data_dir, *teachers, "--model", "cnn", "--seeds", "5", "6", "--epochs", "1",
                    "--out-dir", tmp_path / "runs", "--json", out) == 130
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "holds a partial student" in error
    if finished:
        assert f"; {out} holds the 1 student finished before the stop." in error
        student = json.loads((tmp_path / "runs" / "cnn-seed5-w0.5" / "cnn" / "metrics.json").read_text())
        assert json.loads(out.read_text())["students"] == [student]
    else:
        assert f"; no student finished, so {out} was not written (the file there is an earlier run's)." in error
        assert out.read_text() == earlier


def test_a_signal_kept_until_the_first_student_starts_says_that_none_was_started(
        teachers, tiny_data_dir, tmp_path, capsys, monkeypatch):
    def kept():
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(distill.interrupts, "raise_if_lost", kept)
    assert _distill(tiny_data_dir, *teachers, "--model", "cnn", "--out-dir", tmp_path / "runs") == 143
    error = capsys.readouterr().err.strip()
    assert error == (f"distill.py: interrupted (SIGTERM); before {tmp_path / 'runs' / 'cnn-seed42-w0.5'} was started; "
                     f"run distill.py again.")
    assert not (tmp_path / "runs" / "cnn-seed42-w0.5").exists()

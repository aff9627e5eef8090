"""benchmarks/distill.py and fit_model's training targets: the targets reach the loss, they mix the labels with the
teachers' mean probabilities on the student's training images, and teachers the student cannot share a split with
are refused before anything is written."""

import json
import re
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import distill  # noqa: E402  (benchmarks/distill.py)
from test_evaluate import make_run_dir  # noqa: E402

from fmnist_keras import data as fdata  # noqa: E402
from fmnist_keras.config import TrainConfig  # noqa: E402
from fmnist_keras.engine import evaluation, fit  # noqa: E402
from fmnist_keras.engine.splits import make_splits  # noqa: E402
from fmnist_keras.models import build_cnn  # noqa: E402
from fmnist_keras.tta import CHOICES  # noqa: E402


@pytest.fixture
def teachers(tmp_path):
    """Two tiny untrained CNNs of one split (seed 0), in run directories as train writes them."""
    made = []
    for name, seed in (("a", 0), ("b", 1)):
        keras.utils.set_random_seed(seed)
        made.append(make_run_dir(tmp_path / name / "cnn", build_cnn(filters=(4, 8), dense_units=16, seed=seed)))
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


def _fit(tiny_data_dir, targets_of=None):
    raw = fdata.load_data(str(tiny_data_dir), verify=False)
    config = TrainConfig(model="mlp", epochs=2, batch_size=32, seed=0, verify=False)
    splits = make_splits(raw, config)
    targets = None if targets_of is None else targets_of(splits.y_train)
    return fit.fit_model(config, splits, verbose=0, train_targets=targets).model.get_weights()


def test_one_hot_targets_train_as_the_labels_do_and_other_targets_train_otherwise(tiny_data_dir):
    labels = _fit(tiny_data_dir)
    one_hot = _fit(tiny_data_dir, lambda y: np.eye(10, dtype=np.float32)[y])
    rolled = _fit(tiny_data_dir, lambda y: np.eye(10, dtype=np.float32)[(y + 1) % 10])
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
    out = tmp_path / "distill.json"
    assert _distill(tiny_data_dir, *teachers, "--model", "cnn", "--seed", "3", "--epochs", "1",
                    "--teacher-weight", "0.3", "--out-dir", tmp_path / "runs", "--json", out) == 0

    config, splits = seen["config"], seen["splits"]
    assert (config.model, config.seed, config.splitting_seed, config.epochs) == ("cnn", 3, 0, 1)  # the teachers' split
    models = [keras.saving.load_model(teacher / "model.keras") for teacher in teachers]
    mean = np.mean([evaluation.predict_probabilities(m, splits.x_train, CHOICES["flip"]) for m in models], axis=0)
    np.testing.assert_allclose(seen["targets"], 0.7 * np.eye(10)[splits.y_train] + 0.3 * mean, atol=1e-6)

    metrics = json.loads((tmp_path / "runs" / "cnn-seed3-w0.3" / "cnn" / "metrics.json").read_text())
    assert metrics["distillation"]["teachers"] == [str(teacher / "model.keras") for teacher in teachers]
    assert metrics["distillation"]["teacher_weight"] == 0.3
    assert metrics["epochs_run"] == 1 and metrics["num_train"] == len(splits.x_train)
    assert json.loads(out.read_text())["metrics"]["test"] == metrics["test"]


def _other_split(teacher, **fields):
    config = TrainConfig.from_json((teacher / "config.json").read_text())
    TrainConfig(**{**config.__dict__, **fields}).save(teacher / "config.json")


@pytest.mark.parametrize("change, message", [
    ({"split_seed": 5}, "different splits"),
    ({"val_split": 0.2}, "different splits"),
    ({"subset": 300}, "different splits"),
])
def test_teachers_of_another_split_are_refused_before_anything_is_written(
        teachers, tiny_data_dir, tmp_path, capsys, change, message):
    _other_split(teachers[1], **change)
    assert _distill(tiny_data_dir, *teachers, "--model", "cnn", "--epochs", "1", "--out-dir", tmp_path / "runs") == 1
    error = capsys.readouterr().err
    assert message in error and len(error.strip().splitlines()) == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["", ".", ".."])
def test_odd_run_names_are_refused_before_anything_is_written(teachers, tiny_data_dir, tmp_path, capsys, name):
    assert _distill(tiny_data_dir, *teachers, "--model", "cnn", "--out-dir", tmp_path / "runs", "--run-name",
                    name) == 1
    assert "not a plain directory name" in capsys.readouterr().err and not (tmp_path / "runs").exists()


def test_an_existing_run_directory_is_kept_without_overwrite(teachers, tiny_data_dir, tmp_path, capsys):
    kept = tmp_path / "runs" / "mine"
    kept.mkdir(parents=True)
    (kept / "notes.txt").write_text("mine")
    assert _distill(tiny_data_dir, *teachers, "--model", "cnn", "--epochs", "1", "--out-dir", tmp_path / "runs",
                    "--run-name", "mine") == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (kept / "notes.txt").read_text() == "mine" and sorted(p.name for p in kept.iterdir()) == ["notes.txt"]

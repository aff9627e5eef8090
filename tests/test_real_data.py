"""A few checks on the real Fashion-MNIST (CI installs Debian's dataset-fashion-mnist)."""

import json

import numpy as np
import pytest
from conftest import REAL_DATA_DIR, requires_real_data

from fmnist_keras import data as fdata

pytestmark = [requires_real_data, pytest.mark.real_data]


@pytest.fixture(scope="module")
def real():
    return fdata.load_data(REAL_DATA_DIR, return_source=True)


def test_real_data_matches_keras_load_data_layout(real):
    ((x_train, y_train), (x_test, y_test)), source = real
    assert source.directory == REAL_DATA_DIR
    assert x_train.shape == (60000, 28, 28) and y_train.shape == (60000,)
    assert x_test.shape == (10000, 28, 28) and y_test.shape == (10000,)
    assert x_train.dtype == y_train.dtype == np.uint8
    # Fashion-MNIST is balanced: 6000 and 1000 images per class.
    assert np.all(np.bincount(y_train) == 6000) and np.all(np.bincount(y_test) == 1000)


def test_default_lookup_finds_the_system_package(isolated_env):
    assert fdata.find_source().kind == "system"


def test_stratified_split_of_the_real_training_set(real):
    ((_, y_train), _), _ = real
    train_idx, val_idx = fdata.stratified_split(y_train, 0.1, seed=42)
    assert len(val_idx) == 6000
    assert np.all(np.bincount(y_train[val_idx]) == 600)


def test_short_run_on_real_data(tmp_path, capsys):
    from fmnist_keras import train

    argv = ["--model", "mlp", "--epochs", "3", "--subset", "3000", "--data-dir", str(REAL_DATA_DIR),
            "--out-dir", str(tmp_path), "--run-name", "real"]
    assert train.main(argv) == 0
    assert "Data: data-dir (/usr/share/datasets/fashion-mnist)" in capsys.readouterr().out
    metrics = json.loads((tmp_path / "real" / "mlp" / "metrics.json").read_text())
    assert metrics["num_test"] == 10000
    assert metrics["test"]["accuracy"] > 0.7  # 3 epochs on 2700 images; chance is 0.1

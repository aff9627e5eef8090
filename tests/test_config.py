"""TrainConfig: every range in config.RANGES held at both ends, types and keys checked, JSON round trips."""

import dataclasses
import json
import math
import re

import pytest

from fmnist_keras.config import (CHOICES, FLAGS, MODEL_DEFAULTS, MODEL_NAMES, PER_MODEL, RANGES, TrainConfig,
                                 load_config)
from fmnist_keras.rundir import RunDirError

# None means the model's default, all the data, or the seed's split
OPTIONAL = ("epochs", "learning_rate", "weight_decay", "subset", "ema", "patience", "split_seed")


def outside(kind, low, high):
    """The nearest values just below ``low`` and just above ``high``."""
    if kind is int:
        return low - 1, high + 1
    return math.nextafter(low, -math.inf), math.nextafter(high, math.inf)


@pytest.mark.parametrize("name", RANGES)
def test_both_ends_of_every_range_are_accepted(name):
    kind, low, high = RANGES[name]
    for value in (low, high):
        assert getattr(TrainConfig.from_dict({name: kind(value)}), name) == value


@pytest.mark.parametrize("name", RANGES)
def test_just_outside_every_range_is_refused(name):
    kind, low, high = RANGES[name]
    bounds = re.escape(f"from {low} to {high}")
    for value in outside(kind, low, high):
        with pytest.raises(ValueError, match=f"^{name} is {re.escape(repr(value))}; expected .* {bounds}$"):
            TrainConfig.from_dict({name: value})


@pytest.mark.parametrize("name", RANGES)
def test_wrong_types_are_refused(name):
    kind, low, high = RANGES[name]
    wrong = ["3", True, [low]] + ([float(low)] if kind is int else [])
    if name not in OPTIONAL:
        wrong.append(None)
    for value in wrong:
        with pytest.raises(ValueError, match=rf"^{name} is .*; expected"):
            TrainConfig.from_dict({name: value})


def test_optional_numbers_may_be_null():
    config = TrainConfig.from_dict({name: None for name in (*OPTIONAL, "flip_tta", "shift_tta")})
    assert (config.epochs, config.learning_rate, config.weight_decay, config.subset, config.ema, config.patience,
            config.split_seed, config.flip_tta, config.shift_tta) == (None,) * 9


@pytest.mark.parametrize("name", CHOICES)
def test_every_choice_is_accepted_and_others_refused(name):
    for choice in CHOICES[name]:
        assert getattr(TrainConfig.from_dict({name: choice}), name) == choice
    with pytest.raises(ValueError, match=rf"^{name} is 'nope'; expected one of {', '.join(CHOICES[name])}$"):
        TrainConfig.from_dict({name: "nope"})


@pytest.mark.parametrize("name", FLAGS)
def test_flags_must_be_booleans(name):
    for value in (True, False):
        assert getattr(TrainConfig.from_dict({name: value}), name) is value
    # None: the model's default (flip_tta, shift_tta) or the machine's (mixed_precision, fmnist_keras.backend).
    for value in (1, "true") if name in ("flip_tta", "shift_tta", "mixed_precision") else (1, "true", None):
        with pytest.raises(ValueError, match=rf"^{name} is .*; expected true or false$"):
            TrainConfig.from_dict({name: value})


def test_data_dir_is_a_path_or_null():
    assert TrainConfig.from_dict({"data_dir": "/data"}).data_dir == "/data"
    with pytest.raises(ValueError, match=r"^data_dir is 3; expected a path or null$"):
        TrainConfig.from_dict({"data_dir": 3})


def test_unknown_keys_and_non_objects_are_refused():
    with pytest.raises(ValueError, match=r"unknown configuration keys \['lr'\]; expected some of \[.*'learning_rate'"):
        TrainConfig.from_dict({"lr": 0.1})
    with pytest.raises(ValueError, match="expected a JSON object of settings, got list"):
        TrainConfig.from_dict([("epochs", 1)])


def test_every_field_is_checked():
    checked = set(RANGES) | set(CHOICES) | set(FLAGS) | {"data_dir"}
    assert checked == {field.name for field in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize(
    "config",
    [TrainConfig(), TrainConfig(model="mlp", epochs=3, learning_rate=0.5, subset=100, data_dir="/d", verify=False,
                                warmup_epochs=0.25, backend="jax", data_format="channels_first", fast_path=False,
                                split_seed=0)],
)
def test_json_round_trip_is_the_identity(config):
    assert TrainConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize("model", MODEL_NAMES)
def test_resolved_fills_the_model_defaults_only_where_unset(model):
    resolved = TrainConfig(model=model).resolved()
    defaults = MODEL_DEFAULTS[model]
    assert {name: getattr(resolved, name) for name in PER_MODEL} == {name: defaults[name] for name in PER_MODEL}
    explicit = TrainConfig(model=model, epochs=2, learning_rate=0.01, weight_decay=0.0,
                           flip_tta=not defaults["flip_tta"], shift_tta=not defaults["shift_tta"], ema=0.5, patience=3)
    assert explicit.resolved() == explicit
    assert dataclasses.replace(resolved, **{name: None for name in PER_MODEL}) == TrainConfig(model=model)


def test_load_config_reads_what_save_wrote(tmp_path):
    config = TrainConfig(model="mlp", seed=7)
    config.save(tmp_path / "config.json")
    assert load_config(tmp_path / "config.json") == config


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"epochs": 0}', r"is damaged: epochs is 0; expected a whole number from 1 to 10000; restore it"),
        ('{"epoch": 3}', r"is damaged: unknown configuration keys \['epoch'\]"),
        ('[1, 2]', r"is damaged: expected a JSON object of settings, got list"),
        ('{"epochs": ', r"is damaged: not valid JSON for the run's configuration"),
        ('{"learning_rate": NaN}', r"is damaged: not valid JSON"),
    ],
)
def test_a_damaged_config_file_is_one_run_dir_error(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(RunDirError, match=message):
        load_config(path)


def test_a_saved_configuration_without_cutmix_loads_as_a_run_without_it(tmp_path):
    data = json.loads(TrainConfig(model="cnn-large").to_json())
    del data["cutmix"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert load_config(tmp_path / "config.json").cutmix == 0.0
    (tmp_path / "config.json").write_text(json.dumps({**data, "cutmix": 2}))
    with pytest.raises(RunDirError, match="cutmix is 2; expected a number from 0.0 to 1.0"):
        load_config(tmp_path / "config.json")


@pytest.mark.parametrize("seed, split_seed, splitting", [(3, None, 3), (3, 0, 0), (0, 5, 5)])
def test_the_split_seed_draws_the_split_in_place_of_the_seed(seed, split_seed, splitting):
    config = TrainConfig(seed=seed, split_seed=split_seed)
    assert config.splitting_seed == splitting and config.seed == seed


def test_a_saved_configuration_without_a_split_seed_splits_by_its_seed(tmp_path):
    data = json.loads(TrainConfig(model="cnn", seed=9).to_json())
    del data["split_seed"]
    (tmp_path / "config.json").write_text(json.dumps(data))
    loaded = load_config(tmp_path / "config.json")
    assert (loaded.split_seed, loaded.splitting_seed) == (None, 9)

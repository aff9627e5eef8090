"""The Keras range in setup.cfg is the range CI tests, with an upper bound."""

import configparser
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _keras_requirement() -> str:
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in setup["options"]["install_requires"].splitlines()]
    (requirement,) = [line for line in lines if re.match(r"keras\b", line)]
    return requirement


def _ci_versions() -> dict[str, str]:
    lines = (ROOT / ".ci" / "keras-versions").read_text().splitlines()
    pins = [line.split("==") for line in lines if line.strip() and not line.startswith("#")]
    return {name: version for name, version in pins}


def test_setup_cfg_allows_exactly_from_the_oldest_keras_ci_tests_to_the_newest_release():
    requirement = _keras_requirement()
    bounds = dict(re.findall(r"(>=|<=|<|==)\s*([0-9][0-9a-z.]*)", requirement))
    assert bounds.get(">=") == _ci_versions()["keras"]  # the oldest allowed is tested
    assert "<=" in bounds or "<" in bounds  # an upper bound: no untested release arrives by itself


def test_keras_nightly_is_pinned_to_one_dev_version():
    assert re.fullmatch(r"\d+\.\d+\.\d+\.dev\d+", _ci_versions()["keras-nightly"])

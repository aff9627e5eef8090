"""The Keras range in setup.cfg is the range CI tests, with an upper bound; the test processes
share the cores."""

import configparser
import os
import re
from pathlib import Path

import pytest

from conftest import TEST_PROCESSES, THREADS_PER_PROCESS

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


def test_each_test_process_gives_torch_its_share_of_the_cores():
    """Two test processes with two torch threads each ran half as fast on two cores as with one."""
    if TEST_PROCESSES == 1:
        pytest.skip("one test process (-n 0): torch keeps every core")
    if os.environ["OMP_NUM_THREADS"] != str(THREADS_PER_PROCESS):
        pytest.skip(f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} was set by the caller")
    import torch

    assert torch.get_num_threads() == THREADS_PER_PROCESS

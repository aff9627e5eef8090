"""The commands' allocator settings keep freed memory for reuse on glibc, and change nothing elsewhere."""

import os
import platform
import subprocess
import sys

import pytest

from fmnist_keras import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
# Thresholds set in the environment replace glibc's moving ones, which the comparison needs; the opt-out
# leaves none to compare.
TUNED = any(name.startswith("MALLOC_") or name == "GLIBC_TUNABLES" for name in os.environ) or os.environ.get(
    allocator.OPT_OUT) == "0"

# Four 24 MiB blocks allocated and freed 20 times, as a batch's activations are: the minor page faults
# of the last round.
_ROUNDS = """
import resource, sys
import numpy as np
from fmnist_keras.allocator import keep_freed_memory
if sys.argv[1] == "kept" and not keep_freed_memory():
    sys.exit("not set")
for _ in range(2):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(20):
        blocks = [np.ones(3 << 20) for _ in range(4)]
        del blocks
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _page_faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(not GLIBC or TUNED, reason="glibc's own thresholds, not set in the environment")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    faults = {mode: _page_faults(mode) for mode in ("default", "kept")}
    # glibc's own thresholds give blocks back and fault their pages (6,144 per block) in again (about 50,000
    # faults in 20 rounds here); the kept ones fault none in after the first round.
    assert faults["default"] > 10_000, faults
    assert faults["kept"] < 1000, faults


@pytest.mark.parametrize("libc, environment", [(("", ""), {}), (("glibc", "2.36"), {allocator.OPT_OUT: "0"})],
                         ids=["not-glibc", "opted-out"])
def test_other_c_libraries_and_an_opt_out_are_left_alone(monkeypatch, libc, environment):
    import ctypes

    monkeypatch.setattr(platform, "system", lambda: "Linux")
    monkeypatch.setattr(platform, "libc_ver", lambda *args, **kwargs: libc)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(ctypes, "CDLL", lambda *args, **kwargs: pytest.fail("the C library was loaded"))
    assert allocator.keep_freed_memory() is False


@pytest.mark.skipif(not GLIBC, reason="the settings are glibc's")
def test_a_refused_value_reports_not_set(monkeypatch):
    import ctypes

    class Refusing:
        def mallopt(self, parameter, value):
            return 0

    monkeypatch.setattr(ctypes, "CDLL", lambda *args, **kwargs: Refusing())
    assert allocator.keep_freed_memory() is False

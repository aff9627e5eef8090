"""A model saved under each backend loads under the other two with the same outputs.

Keras fixes its backend per process, so every save and load runs in a fresh
subprocess (``python -m fmnist_keras._portability``): three processes save
the tiny models (one per backend), three more load all the others' files.
The test launches every backend itself, so it runs once, in the torch pass
of the suite, not once per KERAS_BACKEND.
"""

import importlib.util
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import only_on, synthetic_images
from fmnist_keras.config import BACKENDS

TOLERANCE = 1e-4  # max absolute difference of softmax outputs
# A mixed-precision model computes in bfloat16 (8 bits of mantissa), and each
# backend rounds and accumulates in its own order.
MIXED_TOLERANCE = 5e-3
MODELS = ("cnn", "mlp", "cnn-mixed")

pytestmark = [
    pytest.mark.slow,
    only_on("torch", "launches a subprocess per backend itself; runs once, in the KERAS_BACKEND=torch pass"),
    pytest.mark.skipif(
        any(importlib.util.find_spec(b) is None for b in BACKENDS),
        reason=f"needs all of {', '.join(BACKENDS)} installed: pip install 'fmnist_keras[all]'",
    ),
]


def _run_all(commands):
    """Run the worker commands concurrently; fail with a worker's stderr if one fails."""
    # XLA's optimisation passes (jax, and tensorflow's jit_compile) cost more CPU
    # than the few steps run here; they change no saved value.
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "XLA_FLAGS": "--xla_backend_optimization_level=0"}
    env.pop("KERAS_BACKEND", None)  # the worker's --backend decides
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "fmnist_keras._portability", *cmd],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )
        for cmd in commands
    ]
    for cmd, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"worker {' '.join(cmd)} failed:\n{err[-3000:]}"


def test_models_saved_under_each_backend_load_under_the_others_with_same_outputs(tmp_path):
    inputs = tmp_path / "inputs.npy"
    labels = np.arange(32) % 10
    np.save(inputs, (synthetic_images(labels, seed=3)[..., None] / 255.0).astype(np.float32))

    _run_all([["save", "--backend", b, "--inputs", str(inputs), "--out-dir", str(tmp_path / b)] for b in BACKENDS])
    pairs = {b: [(a, m) for a in BACKENDS if a != b for m in MODELS] for b in BACKENDS}
    _run_all(
        [
            ["predict", "--backend", b, "--inputs", str(inputs), "--output", str(tmp_path / f"on_{b}.npz"),
             *(str(tmp_path / a / f"{m}.keras") for a, m in pairs[b])]
            for b in BACKENDS
        ]
    )

    diffs = {}
    for b in BACKENDS:
        loaded = np.load(tmp_path / f"on_{b}.npz")
        for i, (a, m) in enumerate(pairs[b]):
            reference = np.load(tmp_path / a / "reference.npz")[m]
            assert reference.shape == (32, 10) and np.allclose(reference.sum(1), 1, atol=1e-5)
            assert reference.std() > 1e-3  # trained, not a constant output
            diffs[(m, a, b)] = float(np.max(np.abs(loaded[str(i)] - reference)))

    print("\nmax |softmax difference| of a model saved under one backend and loaded under another:")
    for (m, a, b), diff in sorted(diffs.items()):
        print(f"  {m}: {a:>10} -> {b:<10} {diff:.2e}")
    assert len(diffs) == len(MODELS) * len(list(itertools.permutations(BACKENDS, 2))) == 18
    for key, diff in diffs.items():
        tolerance = MIXED_TOLERANCE if key[0] == "cnn-mixed" else TOLERANCE
        assert diff <= tolerance, f"{key}: {diff:.2e} > {tolerance}"

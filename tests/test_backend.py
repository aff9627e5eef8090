"""Choosing the backend and the device: bad choices fail with one line that says how to fix them."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

from fmnist_keras import backend as fbackend

BACKEND = keras.backend.backend()
REPO = Path(__file__).resolve().parents[1]


def test_unknown_backend_and_device_name_the_choices(monkeypatch):
    with pytest.raises(fbackend.BackendError, match="unknown backend 'theano'; choose one of torch, tensorflow, jax"):
        fbackend.select_backend("theano")
    monkeypatch.setenv("KERAS_BACKEND", "numpy")  # Keras has a numpy backend; the project trains on none of it
    with pytest.raises(fbackend.BackendError, match=r"unknown backend 'numpy' \(from \$KERAS_BACKEND\); choose one"):
        fbackend.select_backend()
    with pytest.raises(fbackend.BackendError, match="unknown device 'tpu'; choose one of auto, cpu, gpu"):
        fbackend.select_backend(BACKEND, "tpu")


def test_an_empty_keras_backend_counts_as_unset(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "")
    assert fbackend.named_backend() is None and fbackend.default_backend() == "torch"
    monkeypatch.delenv("KERAS_BACKEND")
    assert fbackend.named_backend() is None and fbackend.default_backend() == "torch"
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert fbackend.named_backend() == fbackend.default_backend() == "jax"


def test_benchmarks_take_torch_when_keras_backend_is_empty(tmp_path):
    # Keras itself would take keras.json's backend (jax here) for an empty KERAS_BACKEND. (syncs.py selects torch
    # in its main, before it imports Keras: tests/test_benchmark_outputs.py.)
    (tmp_path / "keras.json").write_text('{"backend": "jax"}')
    scripts = ("ablation", "bench", "distill", "ensemble", "overhead", "profile_overhead", "tta_views")
    code = (f"import importlib, os, sys; sys.path.insert(0, 'benchmarks')\n"
            f"for name in {scripts!r}:\n"
            f"    os.environ['KERAS_BACKEND'] = ''\n"
            f"    importlib.import_module(name)\n"
            f"    print(name, os.environ['KERAS_BACKEND'])\n"
            f"import keras; print('keras', keras.backend.backend())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "KERAS_HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == [f"{name} torch" for name in (*scripts, "keras")]


def test_switching_backend_after_keras_is_imported_is_refused():
    other = next(b for b in ("torch", "tensorflow", "jax") if b != BACKEND)
    with pytest.raises(fbackend.BackendError, match=f"already imported with backend '{BACKEND}'.*KERAS_BACKEND={other}"):
        fbackend.select_backend(other)


@pytest.mark.parametrize("missing", ["tensorflow", "jax"])
def test_backend_package_not_installed_gives_the_pip_install(missing):
    # `python -S` leaves site-packages off sys.path: the backend packages are
    # then truly not installed for that process (fmnist_keras comes from the cwd).
    out = subprocess.run(
        [sys.executable, "-S", "-m", "fmnist_keras.train", "--backend", missing],
        capture_output=True, text=True, cwd=REPO, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last == (
        f"python -m fmnist_keras.train: error: backend '{missing}' needs the {missing} package, which is not "
        f"installed; run: pip install 'fmnist_keras[{missing}]'"
    )


def _sees_gpu() -> bool:
    return fbackend._missing_gpu(BACKEND) is None


def test_gpu_requested_without_a_gpu_names_what_is_missing_and_the_pip_install():
    if _sees_gpu():
        pytest.skip(f"the {BACKEND} backend sees a GPU here")
    with pytest.raises(fbackend.BackendError) as error:
        fbackend.select_backend(BACKEND, "gpu")
    message = str(error.value)
    assert message.startswith(f"--device gpu: the {BACKEND} backend sees no GPU (")
    assert fbackend._GPU_INSTALL[BACKEND] in message and "--device auto" in message and "\n" not in message


@pytest.mark.parametrize("command", ["train", "evaluate", "predict"])
def test_a_command_given_a_device_it_lacks_stops_with_a_usage_line(command, tmp_path, capsys, monkeypatch):
    import importlib

    if _sees_gpu():
        pytest.skip(f"the {BACKEND} backend sees a GPU here")
    monkeypatch.chdir(tmp_path)
    main = importlib.import_module(f"fmnist_keras.{command}").main
    model = [] if command == "train" else ["missing.keras"] + (["image.png"] if command == "predict" else [])
    with pytest.raises(SystemExit) as stop:
        main([*model, "--backend", BACKEND, "--device", "gpu"])
    assert stop.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
    assert f"--device gpu: the {BACKEND} backend sees no GPU (" in line and "--device auto" in line, line
    assert list(tmp_path.iterdir()) == []  # stopped before anything was read or written


def test_device_cpu_hides_gpus_on_every_backend(monkeypatch):
    for name in ("CUDA_VISIBLE_DEVICES", "JAX_PLATFORMS", "KERAS_TORCH_DEVICE"):
        monkeypatch.delenv(name, raising=False)
    assert fbackend.select_backend(BACKEND, "cpu") == BACKEND
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert os.environ["JAX_PLATFORMS"] == "cpu"
    assert os.environ["KERAS_TORCH_DEVICE"] == "cpu"  # Apple's MPS is not hidden by CUDA_VISIBLE_DEVICES


def test_describe_device_names_the_device_keras_uses():
    device = fbackend.describe_device()
    if _sees_gpu():
        assert device != "cpu"
    else:
        assert device == "cpu"


def test_out_of_memory_errors_are_recognised_on_every_backend():
    from fmnist_keras.backend import is_out_of_memory

    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate"))
    assert not is_out_of_memory(ValueError("Input 0 of layer is incompatible"))
    torch = pytest.importorskip("torch")
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA error"))


def test_torch_commands_do_not_import_tensorflow(tmp_path):
    """Keras would import all of TensorFlow to seed it and to save a model; the torch path must not."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from fmnist_keras.backend import select_backend\n"
        "select_backend('torch')\n"
        "import keras\n"
        "keras.utils.set_random_seed(1)\n"
        "model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])\n"
        f"model.save({str(tmp_path / 'm.keras')!r})\n"
        "print('tensorflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_training_layout_is_channels_last_unless_stock_keras_on_torch_and_explicit_choices_hold():
    assert fbackend.training_data_format("torch") == "channels_last"
    assert fbackend.training_data_format("torch", fast_path=False) == "channels_first"
    assert fbackend.training_data_format("jax", fast_path=False) == "channels_last"
    assert fbackend.training_data_format("torch", "channels_last") == "channels_last"
    with pytest.raises(ValueError, match="choose one of auto, channels_last, channels_first"):
        fbackend.training_data_format("torch", "nhwc")


@pytest.mark.parametrize(
    "text, expected",
    [
        ("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n", True),  # Intel Xeon 4th gen.
        ("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n", True),  # AMD EPYC Zen 4
        ("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni avx512_bitalg\n", False),  # Ice Lake: emulates
        ("processor\t: 0\nflags\t\t: fpu avx2 fma\n", False),
        ("flags\t\t: amx_bf16_not_a_flag avx512_bf16x\nbugs\t\t: amx_bf16\n", False),  # whole words of flags only
        ("", False),
        (b"flags\t: \xff\xfe amx_bf16\n", True),  # stray bytes
        (b"flags\t: \xff\xfe avx512_bf16\n", True),
    ],
)
def test_cpu_has_bfloat16_reads_the_flags_line(tmp_path, text, expected):
    from fmnist_keras.backend import cpu_has_bfloat16

    path = tmp_path / "cpuinfo"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    assert cpu_has_bfloat16(str(path)) is expected


def test_cpu_has_bfloat16_is_false_where_cpuinfo_cannot_be_read(tmp_path):
    from fmnist_keras.backend import cpu_has_bfloat16

    assert cpu_has_bfloat16(str(tmp_path / "missing")) is False
    assert cpu_has_bfloat16(str(tmp_path)) is False  # a directory


@pytest.mark.parametrize("flags", ["", " avx512_bf16", " amx_bf16 amx_tile"],
                         ids=["emulated", "avx512-bf16", "amx"])
@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_only_the_measured_models_and_backends_default_to_bfloat16_and_only_on_a_cpu_with_bfloat16(
        tmp_path, monkeypatch, flags, gpu):
    from fmnist_keras.config import MODEL_NAMES

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: fpu avx512f" + flags + "\n")
    monkeypatch.setattr(fbackend, "CPUINFO", str(cpuinfo))
    monkeypatch.setattr(fbackend, "has_gpu", lambda: gpu)
    # Measured to pay there: on torch the CNN 1.7-2.2x and cnn-large 1.7-1.8x faster, on TensorFlow the CNN 1.3x;
    # the MLP no faster, nor the CNN on JAX.
    measured = {"torch": {"cnn", "cnn-large"}, "tensorflow": {"cnn"}, "jax": set()}
    for name in ("torch", "tensorflow", "jax"):
        chosen = {model for model in MODEL_NAMES if fbackend.default_mixed_precision(name, model)}
        assert chosen == (measured[name] if flags and not gpu else set()), name


@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")  # saved before its first step
def test_the_cnn_compiles_with_xla_on_jax_and_its_saved_file_is_unchanged(tmp_path):
    from fmnist_keras.config import TrainConfig
    from fmnist_keras.engine.recipe import compile_model
    from fmnist_keras.loading import load_model
    from fmnist_keras.models import all_layers, build_cnn

    model = compile_model(build_cnn(seed=0), TrainConfig(model="cnn"), steps_per_epoch=10)
    # Keras's own choice for the other backends: eager torch, TensorFlow graphs without XLA.
    assert model.jit_compile is (BACKEND == "jax")
    model.save(tmp_path / "cnn.keras")
    assert load_model(tmp_path / "cnn.keras").jit_compile is (BACKEND == "jax")
    assert load_model(tmp_path / "cnn.keras", compile=True).jit_compile is (BACKEND == "jax")
    # The file still holds stock Keras layers, which say what Keras says.
    fresh = keras.saving.load_model(tmp_path / "cnn.keras", compile=False)
    shifts = [layer for layer in all_layers(fresh) if isinstance(layer, keras.layers.RandomTranslation)]
    assert shifts and all(layer.supports_jit is False for layer in shifts)


@pytest.mark.skipif(BACKEND != "jax", reason="XLA is allowed for RandomTranslation on jax only")
def test_random_translation_under_jax_jit_draws_and_shifts_as_it_does_eagerly():
    # What compile_steps_on_jax rests on: the layer compiles and gives the eager output for the same seed.
    import jax
    import numpy as np

    images = np.random.default_rng(0).random((4, 28, 28, 1), dtype=np.float32)
    eager_layer, jit_layer = (keras.layers.RandomTranslation(0.1, 0.1, seed=3) for _ in range(2))
    eager = np.asarray(eager_layer(images, training=True))
    jit_layer.build(images.shape)
    state = [variable.value for variable in jit_layer.non_trainable_variables]
    compiled, _ = jax.jit(lambda state, x: jit_layer.stateless_call([], state, x, training=True))(state, images)
    assert np.abs(eager - images).max() > 0.1  # it did shift
    np.testing.assert_array_equal(np.asarray(compiled), eager)

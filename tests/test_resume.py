"""Interrupted runs: SIGKILL mid-epoch then --resume, Ctrl-C, NaN loss, atomic checkpoints."""

import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from fmnist_keras import config, train
from fmnist_keras.engine.callbacks import AtomicModelCheckpoint, read_history
from fmnist_keras.rundir import RunDirError

EPOCHS = 8


def _argv(tmp_path, data_dir, *extra):
    return ["--data-dir", str(data_dir), "--no-verify", "--out-dir", str(tmp_path), "--run-name", "run",
            "--model", "mlp", "--batch-size", "8", "--patience", "50", "--no-report", *extra]


def _wait_for(predicate, timeout, process):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def _epochs_logged(history_file):
    """Rows in history.csv so far, or 0 when the training process is halfway through writing one."""
    try:
        return len(read_history(history_file))
    except RunDirError:  # a row half written at the moment it is read
        return 0


def test_sigkill_mid_epoch_then_resume_gives_a_complete_history(tmp_path, tiny_data_dir):
    cmd = [sys.executable, "-m", "fmnist_keras.train", *_argv(tmp_path, tiny_data_dir, "--epochs", str(EPOCHS))]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    history_file = tmp_path / "run" / "mlp" / "history.csv"
    try:
        reached = _wait_for(lambda: _epochs_logged(history_file) >= 2, 600, process)
        assert reached, process.stderr.read().decode()[-2000:] if process.poll() is not None else "too slow"
        time.sleep(0.3)  # into the next epoch (45 batches of 8 take about a second)
        process.send_signal(signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
    done_before = len(read_history(history_file))
    assert 2 <= done_before < EPOCHS
    assert not (tmp_path / "run" / "mlp" / "metrics.json").exists()

    assert train.main(["--resume", str(tmp_path / "run"), "--no-report"]) == 0
    history = read_history(history_file)
    assert [row["epoch"] for row in history] == list(range(EPOCHS))  # every epoch once, in order
    metrics = json.loads((tmp_path / "run" / "mlp" / "metrics.json").read_text())
    assert metrics["resumed"] and metrics["epochs_run"] == EPOCHS
    best = min(history, key=lambda row: row["val_loss"])
    assert metrics["best_epoch"] == best["epoch"] + 1
    assert not (tmp_path / "run" / "mlp" / "backup").exists()  # BackupAndRestore cleans up at the end
    # The optimizer state carried over: the best checkpoint's step counter counts every
    # epoch up to the best one (45 steps each), not only those since the resume.
    model = keras.saving.load_model(tmp_path / "run" / "mlp" / "model.keras", compile=True)
    steps_per_epoch = 45  # 360 training images, batch 8
    assert int(keras.ops.convert_to_numpy(model.optimizer.iterations)) == metrics["best_epoch"] * steps_per_epoch


def test_ctrl_c_says_how_to_resume(tmp_path, tiny_data_dir):
    cmd = [sys.executable, "-m", "fmnist_keras.train", *_argv(tmp_path, tiny_data_dir, "--epochs", "50")]
    # A shell that starts a job in the background makes it ignore SIGINT, and the child
    # would inherit that; restore the default so Python turns SIGINT into KeyboardInterrupt.
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    history_file = tmp_path / "run" / "mlp" / "history.csv"
    try:
        assert _wait_for(lambda: _epochs_logged(history_file) >= 1, 600, process)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, err[-3000:]
    assert f"--resume {tmp_path / 'run'}" in err and "Traceback" not in err
    assert (tmp_path / "run" / "mlp" / "model.keras").exists()


def test_nan_loss_stops_with_a_clear_message_and_keeps_no_broken_model(tmp_path, tiny_data_dir, capsys, monkeypatch):
    # A learning rate this large (beyond the flag's range, so the range is widened
    # here) drives the weights to inf within a few steps.
    monkeypatch.setitem(config.RANGES, "learning_rate", (float, 1e-7, 1e38))
    code = train.main(_argv(tmp_path, tiny_data_dir, "--epochs", "3", "--learning-rate", "1e38", "--batch-size", "32"))
    err = capsys.readouterr().err
    assert code == 1
    assert "NaN or infinite" in err and "--learning-rate" in err and err.count("\n") == 1
    model_file = tmp_path / "run" / "mlp" / "model.keras"
    if model_file.exists():  # a checkpoint from before the loss broke: finite weights only
        weights = keras.saving.load_model(model_file).get_weights()
        assert all(np.isfinite(w).all() for w in weights)
        metrics = json.loads((tmp_path / "run" / "mlp" / "metrics.json").read_text(), parse_constant=_reject)
        assert metrics["best_epoch"] is not None


def _reject(name):
    raise ValueError(f"{name} in JSON")


def test_atomic_checkpoint_leaves_previous_model_when_a_write_fails(tmp_path):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    target = tmp_path / "model.keras"
    checkpoint = AtomicModelCheckpoint(target, monitor="loss", save_best_only=True)
    checkpoint.set_model(model)
    checkpoint.on_train_begin()
    checkpoint.on_epoch_end(0, {"loss": 1.0})
    good = target.read_bytes()
    first_weights = [w.copy() for w in model.get_weights()]

    def exploding_save(*args, **kwargs):
        with open(args[0], "wb") as f:
            f.write(b"half a zip")
        raise OSError("disk full")

    model.set_weights([w + 1 for w in first_weights])
    model.save = exploding_save
    with pytest.raises(OSError, match="disk full"):
        checkpoint.on_epoch_end(1, {"loss": 0.5})
    assert target.read_bytes() == good
    reloaded = keras.saving.load_model(target)
    np.testing.assert_allclose(reloaded.get_weights()[0], first_weights[0])


def test_resume_rejects_other_flags_and_non_run_dirs(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--resume", str(tmp_path), "--epochs", "3"])
    assert info.value.code == 2 and "drop --epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        train.main(["--resume", str(tmp_path), "--no-fast-path", "--data-format", "channels_first"])
    assert info.value.code == 2 and "drop --data-format, --no-fast-path" in capsys.readouterr().err
    # A flag given with its default value is still a flag given: refused, not silently ignored.
    with pytest.raises(SystemExit) as info:
        train.main(["--resume", str(tmp_path), "--patience", "5"])
    assert info.value.code == 2 and "drop --patience" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        train.main(["--resume", str(tmp_path), "--no-flip-tta", "--ema", "0"])
    assert info.value.code == 2 and "drop --ema, --no-flip-tta" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        train.main(["--resume", str(tmp_path), "--split-seed", "3"])
    assert info.value.code == 2 and "drop --split-seed, or" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        train.main(["--resume", str(tmp_path), "--mixed-precision"])
    assert info.value.code == 2 and "drop --mixed-precision, or" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # a run resumes in one process, not over JAX's devices either
        train.main(["--resume", str(tmp_path), "--distribute"])
    assert info.value.code == 2 and "drop --distribute, or" in capsys.readouterr().err
    assert train.main(["--resume", str(tmp_path)]) == 1
    assert "not a run directory" in capsys.readouterr().err


def test_ctrl_c_during_fit_stops_before_the_next_step_and_restores_the_handler():
    from fmnist_keras.engine.callbacks import StopOnSignal

    before = signal.getsignal(signal.SIGINT)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    x, y = np.zeros((64, 4), "float32"), np.zeros((64, 2), "float32")
    ended = []

    class SendCtrlC(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:
                os.kill(os.getpid(), signal.SIGINT)

        def on_train_batch_end(self, batch, logs=None):
            ended.append(batch)

    ctrl_c = StopOnSignal()
    with pytest.raises(KeyboardInterrupt):
        try:
            model.fit(x, y, batch_size=8, epochs=3, verbose=0, callbacks=[SendCtrlC(), ctrl_c])
        finally:
            ctrl_c.restore()
    assert ended == [0, 1]  # the signal came as batch 2 began: its step did not run
    assert signal.getsignal(signal.SIGINT) is before
    # A fit that ends normally leaves the handler as it was, too.
    model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=[StopOnSignal()])
    assert signal.getsignal(signal.SIGINT) is before


def test_a_model_without_config_json_resumes_with_the_runs_settings_and_its_own_tta(tmp_path):
    from fmnist_keras.config import TrainConfig
    from fmnist_keras.rundir import RunDir

    run = RunDir.create(str(tmp_path), "run", ["mlp", "cnn"])
    run.model_dir("mlp").mkdir()
    TrainConfig(model="mlp", epochs=3, seed=7, split_seed=5, mixed_precision=False).resolved().save(
        run.config_file("mlp"))
    assert not run.config_file("cnn").exists()
    parser = train.build_parser()
    argv = ["--resume", str(run.path)]
    _, configs = train.resume_configs(parser, parser.parse_args(argv), argv)
    mlp, cnn = sorted(configs, key=lambda config: config.model != "mlp")
    assert (cnn.model, cnn.epochs, cnn.seed, cnn.split_seed) == ("cnn", 3, 7, 5)  # the run's settings, its split too
    assert (mlp.resolved().flip_tta, cnn.resolved().flip_tta) == (False, True)  # each model's own TTA
    assert (mlp.resolved().shift_tta, cnn.resolved().shift_tta) == (False, True)
    assert (mlp.mixed_precision, cnn.mixed_precision) == (False, None)  # the CNN's precision decided anew


def test_a_model_without_config_json_takes_its_own_defaults_where_the_saved_model_has_its_own(tmp_path):
    from fmnist_keras.config import MODEL_DEFAULTS, TrainConfig
    from fmnist_keras.rundir import RunDir

    run = RunDir.create(str(tmp_path), "run", ["mlp", "cnn"])
    run.model_dir("mlp").mkdir()
    TrainConfig(model="mlp", learning_rate=0.01).resolved().save(run.config_file("mlp"))
    parser = train.build_parser()
    argv = ["--resume", str(run.path)]
    _, configs = train.resume_configs(parser, parser.parse_args(argv), argv)
    cnn = next(config for config in configs if config.model == "cnn").resolved()
    assert MODEL_DEFAULTS["cnn"]["epochs"] != MODEL_DEFAULTS["mlp"]["epochs"]  # else this test shows nothing
    assert (cnn.epochs, cnn.weight_decay) == (MODEL_DEFAULTS["cnn"]["epochs"], MODEL_DEFAULTS["cnn"]["weight_decay"])
    assert cnn.learning_rate == 0.01  # set for the run, not a default

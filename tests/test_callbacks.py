"""The resumable callbacks against Keras's own: same saves, same stops, same weights, on a tiny real fit."""

import json
import math
import os
import signal

import keras
import numpy as np
import pytest

from conftest import linear_classifier, only_on, random_images_and_one_hot_labels
from fmnist_keras.engine import distributed
from fmnist_keras.engine.callbacks import (
    AtomicModelCheckpoint,
    NaNGuard,
    ResumableEarlyStopping,
    StopOnSignal,
    backed_up_epochs,
    read_history,
    resume_state,
    truncate_history,
)
from fmnist_keras.interrupts import Interrupted
from fmnist_keras.rundir import RunDirError

NAN = float("nan")


def tiny_model(seed=0):
    return linear_classifier(keras.optimizers.SGD(0.1), seed)


def fit(model, callbacks, epochs, x=None):
    data_x, y = random_images_and_one_hot_labels(32)
    x = data_x if x is None else x
    return model.fit(x, y, validation_data=(data_x, y), epochs=epochs, batch_size=16, shuffle=False, verbose=0,
                     callbacks=callbacks)


class ScriptedValLoss(keras.callbacks.Callback):
    """Replace the measured val_loss by a fixed sequence, so which epochs improve is known."""

    def __init__(self, values):
        super().__init__()
        self.values = values

    def on_epoch_end(self, epoch, logs=None):
        logs["val_loss"] = self.values[epoch]


class RecordSaves(keras.callbacks.Callback):
    """After each epoch: which checkpoint files hold this epoch's weights, and no partial file lying around."""

    def __init__(self, paths):
        super().__init__()
        self.paths = paths
        self.saved = {path: [] for path in paths}
        self.weights = {}

    def on_epoch_end(self, epoch, logs=None):
        current = self.model.get_weights()
        self.weights[epoch] = current
        for path in self.paths:
            assert not any(p.name.startswith(".partial-") for p in path.parent.iterdir())
            if path.exists() and all(np.array_equal(a, b) for a, b in zip(load_weights(path), current)):
                self.saved[path].append(epoch)


def load_weights(path):
    return keras.saving.load_model(path, compile=False).get_weights()


def test_atomic_checkpoint_saves_the_epochs_and_weights_modelcheckpoint_saves(tmp_path):
    stock, atomic = tmp_path / "stock.keras", tmp_path / "atomic.keras"
    record = RecordSaves([stock, atomic])
    callbacks = [
        ScriptedValLoss([1.0, 0.8, 0.9, 0.5, 0.7, 0.4]),
        keras.callbacks.ModelCheckpoint(str(stock), monitor="val_loss", save_best_only=True),
        AtomicModelCheckpoint(atomic, monitor="val_loss", save_best_only=True),
        record,
    ]
    fit(tiny_model(), callbacks, epochs=6)
    assert record.saved[atomic] == record.saved[stock] == [0, 1, 3, 5]
    for a, b in zip(load_weights(atomic), load_weights(stock)):
        np.testing.assert_array_equal(a, b)


def test_atomic_checkpoint_never_saves_an_epoch_whose_monitored_value_is_nan(tmp_path):
    path = tmp_path / "model.keras"
    record = RecordSaves([path])
    callbacks = [ScriptedValLoss([NAN, 1.0, NAN, 0.8]),
                 AtomicModelCheckpoint(path, monitor="val_loss", save_best_only=True), record]
    fit(tiny_model(), callbacks, epochs=4)
    assert record.saved[path] == [1, 3]  # stock ModelCheckpoint would save epoch 0, then nothing better than NaN


class FailSavingFrom(keras.callbacks.Callback):
    """From ``epoch`` on, model.save writes half a file and fails, like a process killed mid-write."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            def save(filepath, *args, **kwargs):
                with open(filepath, "wb") as f:
                    f.write(b"PK\x03\x04 half a zip")
                raise OSError("No space left on device")

            self.model.save = save


def test_a_failed_write_leaves_the_previous_best_model_loadable(tmp_path):
    path = tmp_path / "model.keras"
    record = RecordSaves([path])
    callbacks = [FailSavingFrom(1), ScriptedValLoss([1.0, 0.5]), record,
                 AtomicModelCheckpoint(path, monitor="val_loss", save_best_only=True)]
    with pytest.raises(OSError, match="No space left"):
        fit(tiny_model(), callbacks, epochs=2)
    for a, b in zip(load_weights(path), record.weights[0]):
        np.testing.assert_array_equal(a, b)


class StopAfter(keras.callbacks.Callback):
    """Kill the fit at the end of epoch ``epochs - 1``, after every other callback has run."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            raise Interrupted(signal.SIGTERM)


VAL_LOSSES = [1.0, 0.6, 0.7, 0.5, 0.55, 0.65, 0.8, 0.9, 1.0, 1.1]  # best epoch 3; patience 2 stops at epoch 5


def run_callbacks(tmp_path, early_stopping, state=None):
    return [
        ScriptedValLoss(VAL_LOSSES),
        AtomicModelCheckpoint(tmp_path / "model.keras", monitor="val_loss", save_best_only=True,
                              initial_value_threshold=state.best if state else None),
        keras.callbacks.CSVLogger(str(tmp_path / "history.csv"), append=state is not None),
        early_stopping,
        keras.callbacks.BackupAndRestore(str(tmp_path / "backup")),
    ]


@pytest.mark.parametrize("interrupted_after", [2, 4])  # before and after the best epoch
def test_resumed_early_stopping_stops_and_restores_like_an_uninterrupted_one(tmp_path, interrupted_after):
    reference = tiny_model()
    stock = keras.callbacks.EarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    fit(reference, [ScriptedValLoss(VAL_LOSSES), stock], epochs=len(VAL_LOSSES))

    first = ResumableEarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True)
    with pytest.raises(Interrupted):
        fit(tiny_model(), [*run_callbacks(tmp_path, first), StopAfter(interrupted_after)], epochs=len(VAL_LOSSES))
    state = resume_state(tmp_path / "backup", tmp_path / "model.keras", tmp_path / "history.csv")
    resumed = ResumableEarlyStopping(monitor="val_loss", patience=2, restore_best_weights=True, initial_state=state)
    model = tiny_model(seed=1)  # BackupAndRestore brings back the interrupted run's weights and optimizer
    fit(model, run_callbacks(tmp_path, resumed, state), epochs=len(VAL_LOSSES))

    assert stock.stopped_epoch == 5
    assert (resumed.stopped_epoch, resumed.best_epoch) == (stock.stopped_epoch, stock.best_epoch)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
    assert [row["val_loss"] for row in read_history(tmp_path / "history.csv")] == VAL_LOSSES[:6]


class PoisonWeight(keras.callbacks.Callback):
    """Make one kernel non-finite at the end of ``epoch``, as a diverging update would."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            kernel = self.model.layers[-1].kernel
            kernel.assign(np.full(kernel.shape, np.nan, dtype="float32"))


def test_nan_guard_stops_and_keeps_non_finite_weights_out_of_the_checkpoint(tmp_path):
    path = tmp_path / "model.keras"
    guard, record = NaNGuard(), RecordSaves([path])
    model = tiny_model()
    history = fit(model, [PoisonWeight(1), guard, AtomicModelCheckpoint(path, save_best_only=True), record], epochs=4)
    assert guard.stopped and guard.epoch == 1 and len(history.epoch) == 2
    assert math.isfinite(history.history["val_loss"][0]) and math.isnan(history.history["val_loss"][1])
    assert record.saved[path] == [0]
    assert all(np.isfinite(w).all() for w in load_weights(path))


def test_nan_guard_stops_on_a_nan_loss_like_terminate_on_nan():
    x, _ = random_images_and_one_hot_labels(32)
    x[20] = np.nan  # the second batch
    guard, stock = NaNGuard(), keras.callbacks.TerminateOnNaN()
    history = fit(tiny_model(), [guard], epochs=3, x=x)
    reference = fit(tiny_model(), [stock], epochs=3, x=x)
    assert guard.stopped and guard.epoch == 0
    assert len(history.epoch) == len(reference.epoch) == 1
    assert math.isnan(history.history["val_loss"][0])


def test_read_history_gives_back_what_csvlogger_wrote(tmp_path):
    path = tmp_path / "history.csv"
    history = fit(tiny_model(), [keras.callbacks.CSVLogger(str(path))], epochs=3)
    rows = read_history(path)
    assert [row["epoch"] for row in rows] == history.epoch == [0, 1, 2]
    for key, values in history.history.items():
        np.testing.assert_allclose([row[key] for row in rows], values, rtol=1e-6)
    assert read_history(tmp_path / "missing.csv") == []


@pytest.mark.parametrize(
    "content",
    [
        b"epoch,loss,val_loss\n0,0.5,oops\n",  # not a number
        b"epoch,loss\n0,0.5\n",  # no val_loss
        b"epoch,loss,val_loss\n0,0.5\n",  # a short row
        b"epoch,loss,val_loss\n1,0.5,0.4\n",  # epochs not from 0
        b"epoch,loss,val_loss\n0,0.5,0.4\n0,0.4,0.3\n",  # an epoch twice
        b"\xff\xfe\x00\x81garbage",  # not text
    ],
)
def test_a_damaged_history_is_a_run_dir_error(tmp_path, content):
    path = tmp_path / "history.csv"
    path.write_bytes(content)
    with pytest.raises(RunDirError, match=r"history.csv is damaged: .*; move .* away"):
        read_history(path)
    with pytest.raises(RunDirError, match="is damaged"):
        truncate_history(path, 0)


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "huge"])
def test_a_history_that_is_no_regular_file_or_too_large_is_refused_unread(tmp_path, kind, monkeypatch):
    # A FIFO would block the read forever; /dev/zero would fill the memory.
    from fmnist_keras import rundir

    path = tmp_path / "history.csv"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "/dev/zero":
        path.symlink_to("/dev/zero")
    else:
        monkeypatch.setattr(rundir, "MAX_RUN_FILE_BYTES", 64)
        path.write_text("epoch,loss,val_loss\n" + "".join(f"{i},0.5,0.4\n" for i in range(10)))
    expected = "is not a regular file, so not a CSVLogger history" if kind != "huge" else "is larger than"
    with pytest.raises(RunDirError, match=f"history.csv {expected}.*; move .* away"):
        read_history(path)


def test_truncate_history_keeps_the_first_epochs(tmp_path):
    path = tmp_path / "history.csv"
    path.write_text("epoch,loss,val_loss\n0,0.9,0.8\n1,0.7,0.6\n2,0.5,0.65\n")
    rows = read_history(path)
    assert truncate_history(path, 5) == rows  # fewer epochs than asked: unchanged
    assert truncate_history(path, 1) == rows[:1]
    assert read_history(path) == rows[:1] and path.read_text() == "epoch,loss,val_loss\n0,0.9,0.8\n"


@pytest.mark.parametrize("line_end", ["\n", "\r\n"])  # CSVLogger writes "\r\n"
def test_truncate_history_drops_a_row_cut_short_by_a_kill(tmp_path, line_end):
    path = tmp_path / "history.csv"
    whole = line_end.join(["epoch,loss,val_loss", "0,0.9,0.8", "1,0.7,0.6", ""])
    path.write_bytes((whole + "2,0.5").encode())
    with pytest.raises(RunDirError, match="is damaged"):  # reading alone does not guess
        read_history(path)
    assert [row["epoch"] for row in truncate_history(path, 2)] == [0, 1]
    assert path.read_bytes() == whole.encode()


def test_truncate_history_keeps_a_lone_line_for_the_damage_check(tmp_path):
    path = tmp_path / "history.csv"
    path.write_bytes(b"\x00\x01\x02")  # no header before it: nothing says it is a cut row
    truncate_history(path, 0)
    assert path.read_bytes() == b"\x00\x01\x02"


def _weights(path, epoch: int) -> None:
    """A small HDF5 file, as Keras's weights files are, that says which epoch it holds."""
    import h5py

    with h5py.File(path, "w") as f:
        f["epoch"] = epoch


def _weights_epoch(path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return int(f["epoch"][()])


def _backup(tmp_path, metadata: str, previous: str | None):
    backup = tmp_path / "backup"
    backup.mkdir()
    _weights(backup / "latest.weights.h5", 3)
    (backup / "training_metadata.json").write_text(metadata)
    if previous is not None:
        _weights(backup / "latest.weights.h5.bkp", 2)
        (backup / "training_metadata.json.bkp").write_text(previous)
    return backup


@pytest.mark.parametrize("metadata", ["", '{"epoch": 3, "ba'])  # a kill while Keras wrote it
def test_backup_metadata_cut_short_by_a_kill_falls_back_to_the_previous_backup(tmp_path, metadata):
    backup = _backup(tmp_path, metadata, '{"epoch": 2, "batch": 0}')
    assert backed_up_epochs(backup) == 2
    assert _weights_epoch(backup / "latest.weights.h5") == 2
    assert json.loads((backup / "training_metadata.json").read_text()) == {"epoch": 2, "batch": 0}
    assert backed_up_epochs(backup) == 2  # and stays consistent


@pytest.mark.parametrize("weights", [b"", b"\x89HDF\r\n\x1a\n cut short", None])  # a kill, a full disk, gone
def test_backup_weights_cut_short_fall_back_to_the_previous_backup_with_its_metadata(tmp_path, weights):
    # Keras itself would load the previous weights; the metadata must then say their epoch, not the later one.
    backup = _backup(tmp_path, '{"epoch": 3, "batch": 0}', '{"epoch": 2, "batch": 0}')
    if weights is None:
        (backup / "latest.weights.h5").unlink()
    else:
        (backup / "latest.weights.h5").write_bytes(weights)
    assert backed_up_epochs(backup) == 2
    assert _weights_epoch(backup / "latest.weights.h5") == 2
    assert json.loads((backup / "training_metadata.json").read_text()) == {"epoch": 2, "batch": 0}


def test_backup_weights_and_their_previous_copy_both_damaged_is_a_run_dir_error_naming_the_fix(tmp_path):
    backup = _backup(tmp_path, '{"epoch": 3, "batch": 0}', '{"epoch": 2, "batch": 0}')
    for name in ("latest.weights.h5", "latest.weights.h5.bkp"):
        (backup / name).write_bytes(b"cut")
    with pytest.raises(RunDirError, match=f"latest.weights.h5.bkp is damaged: not an HDF5 file of weights .*; "
                                          f"delete {backup} to train that model again from its first epoch"):
        backed_up_epochs(backup)
    assert json.loads((backup / "training_metadata.json").read_text()) == {"epoch": 3, "batch": 0}  # untouched


@pytest.mark.parametrize("previous", [None, "", '{"epoch": -1}'])
def test_damaged_backup_metadata_without_a_whole_previous_backup_is_a_run_dir_error(tmp_path, previous):
    backup = _backup(tmp_path, "", previous)
    with pytest.raises(RunDirError, match=r"is damaged: .*; delete .*backup"):
        backed_up_epochs(backup)
    assert _weights_epoch(backup / "latest.weights.h5") == 3  # nothing changed


def test_a_symlinked_previous_backup_is_not_followed(tmp_path):
    outside = tmp_path / "outside.h5"
    outside.write_bytes(b"not ours")
    backup = _backup(tmp_path, "", '{"epoch": 2, "batch": 0}')
    (backup / "latest.weights.h5.bkp").unlink()
    (backup / "latest.weights.h5.bkp").symlink_to(outside)
    with pytest.raises(RunDirError, match="is damaged"):
        backed_up_epochs(backup)
    assert _weights_epoch(backup / "latest.weights.h5") == 3 and outside.read_bytes() == b"not ours"


class CountBatches(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.batches = 0

    def on_train_batch_end(self, batch, logs=None):
        self.batches += 1


class SendSignal(CountBatches):
    """Send ``signum`` to this process ``times`` times at the end of the first batch."""

    def __init__(self, signum, times=1):
        super().__init__()
        self.signum, self.times = signum, times

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self.batches == 1:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


class AgreeAfter(CountBatches):
    """What ReplicaSync does once the replicas' all-reduce shows a signal: ``stop.agree`` after batch ``batches``."""

    def __init__(self, stop, batches, signum):
        super().__init__()
        self.stop, self.at, self.signum = stop, batches, signum

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if self.batches == self.at:
            self.stop.agree(self.signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stop_on_signal_raises_before_the_next_batch_and_restores_the_handler(signum):
    before = signal.getsignal(signum)
    sender, after = SendSignal(signum), CountBatches()
    with pytest.raises(Interrupted) as stopped:
        fit(tiny_model(), [sender, StopOnSignal(), after], epochs=2)
    assert stopped.value.signum == signum and stopped.value.exit_code == 128 + signum
    assert (sender.batches, after.batches) == (1, 1)  # the first batch ended everywhere; no second one ran
    assert signal.getsignal(signum) is before


def test_replicas_stop_only_on_the_agreed_signal_even_when_it_comes_twice():
    # A scheduler such as Slurm signals every process of a job, and torchrun passes the signal on too: a rank may
    # get it twice, and still stops only where the replicas agree.
    before = signal.getsignal(signal.SIGTERM)
    stop = StopOnSignal(agreed_only=True)
    sender, after = SendSignal(signal.SIGTERM, times=2), CountBatches()
    with pytest.raises(Interrupted) as stopped:
        fit(tiny_model(), [sender, AgreeAfter(stop, 3, signal.SIGINT), stop, after], epochs=3)  # 2 batches an epoch
    assert stopped.value.signum == signal.SIGTERM  # this replica's own signal, not the one it was told of
    assert (sender.batches, after.batches) == (3, 3)  # through batch 3, where the replicas agreed; not batch 4
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_replica_without_a_signal_stops_on_the_one_its_peers_agreed():
    before = signal.getsignal(signal.SIGINT)
    stop, after = StopOnSignal(agreed_only=True), CountBatches()
    with pytest.raises(Interrupted) as stopped:
        fit(tiny_model(), [AgreeAfter(stop, 2, signal.SIGINT), stop, after], epochs=3)
    assert stopped.value.signum == signal.SIGINT and stopped.value.exit_code == 130
    assert after.batches == 2 and stop.requested is None
    assert signal.getsignal(signal.SIGINT) is before


@pytest.fixture
def one_rank_group():
    """A torch.distributed process group of one rank (gloo), as under ``torchrun --nproc_per_node 1``."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield distributed.Replicas("torchrun", 0, 1, ("rank0:cpu",), "gloo")
    finally:
        dist.destroy_process_group()


class SignalInValidation(keras.callbacks.Callback):
    def __init__(self, signum):
        super().__init__()
        self.signum, self.sent = signum, False

    def on_test_batch_end(self, batch, logs=None):
        if not self.sent:
            self.sent = True
            os.kill(os.getpid(), self.signum)


on_torch = only_on("torch", "torchrun replicas are torch only")


@on_torch
def test_replicas_agree_on_a_signal_during_validation_at_the_end_of_the_epoch(one_rank_group):
    stop, after = StopOnSignal(agreed_only=True), CountBatches()
    callbacks = [*distributed.callbacks(one_rank_group, stop), stop, SignalInValidation(signal.SIGTERM), after]
    with pytest.raises(Interrupted) as stopped:
        fit(tiny_model(), callbacks, epochs=3)
    assert stopped.value.signum == signal.SIGTERM
    assert after.batches == 2  # the first epoch's two batches; its end's vote stops the second epoch's first


@on_torch
def test_replicas_vote_once_more_on_a_signal_after_the_last_epoch(one_rank_group):
    stop = StopOnSignal(agreed_only=True)
    (sync,) = distributed.callbacks(one_rank_group, stop)

    before = signal.getsignal(signal.SIGINT)

    class SignalAtTrainEnd(keras.callbacks.Callback):
        def on_train_end(self, logs=None):  # after StopOnSignal's, as BatchNorm recalibration's comes in train
            os.kill(os.getpid(), signal.SIGINT)

    try:
        fit(tiny_model(), [sync, stop, SignalAtTrainEnd()], epochs=1)
        assert (stop.requested, stop.agreed) == (signal.SIGINT, None)  # no vote since the epoch's end
        sync.vote_on_stop()
        assert stop.agreed == signal.SIGINT
    finally:
        stop.restore()  # what fit_model does after its vote
    assert signal.getsignal(signal.SIGINT) is before

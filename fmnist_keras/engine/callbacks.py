"""Keras's built-in callbacks, made safe to interrupt and resume.

- :class:`AtomicModelCheckpoint`: ``ModelCheckpoint`` that writes the best
  model to a temporary file in the same directory, then renames it, so a
  kill during a write leaves the previous best model loadable.
- :class:`NaNGuard`: ``TerminateOnNaN`` that also refuses to let a model
  with non-finite weights be checkpointed.
- :class:`ResumableEarlyStopping`: ``EarlyStopping`` whose state (best value,
  best epoch, epochs waited, best weights) can be carried over from the run
  being resumed, instead of starting from scratch.
- :func:`resume_state`: that state, read from the run directory's history
  CSV and best checkpoint, consistent with ``BackupAndRestore``'s last backup.
- :class:`StopOnSignal`: Ctrl-C (SIGINT) or a scheduler's SIGTERM during
  ``fit`` stops at the end of the current batch, where Keras cannot swallow
  it; under torchrun every rank at the same batch.
- :class:`SameHistoryColumns`: on resume, refuses an epoch whose logs would
  go into ``history.csv`` under other columns (one added or removed by hand),
  before ``CSVLogger`` appends it.
- :class:`RecordFitEnd`: writes ``fit.json`` when ``fit`` ends, before
  ``BackupAndRestore`` deletes its backup, so ``--resume`` of a run whose
  epochs are all done goes straight to the final evaluation.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import signal
import threading
from pathlib import Path

import keras
import numpy as np

from fmnist_keras import rundir
from fmnist_keras.interrupts import Interrupted
from fmnist_keras.loading import load_model


def logs_off_the_main_thread() -> bool:
    """Whether ``train``'s callbacks let Keras convert each step's logs on its callback thread (``async_safe``).

    On torch only: there the main thread's read of the logs is a
    synchronisation on a GPU. On JAX, Keras's worker thread reading the logs
    races with the next step under the distribution API (the buffers are
    donated: a crash), and TensorFlow never dispatches callbacks that way.
    """
    return keras.backend.backend() == "torch"


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """``ModelCheckpoint`` that never leaves a half-written model file.

    Keras writes the best model to a temporary sibling of ``filepath``; at the
    end of the epoch this callback renames it over ``filepath`` (same
    directory, so the rename is atomic). Only public hooks are used.

    Args:
        filepath: the model file to keep up to date.
        save_as: optional function from the model being trained to the model
            to write in its place, e.g. the same weights in the portable
            ``channels_last`` layout (:func:`fmnist_keras.engine.recipe.portable_copy`);
            it is called before every epoch end's check.
        **kwargs: as for ``keras.callbacks.ModelCheckpoint``.
    """

    @property
    def async_safe(self) -> bool:
        """Keras may run the batch-end hook on a worker thread (on torch): saving once per epoch, it does nothing."""
        return self.save_freq == "epoch" and logs_off_the_main_thread()

    def __init__(self, filepath, save_as=None, **kwargs):
        self.final = Path(filepath)
        self.temporary = self.final.with_name(f".partial-{self.final.name}")
        super().__init__(str(self.temporary), **kwargs)
        self.save_as = save_as
        self._trained = None

    def set_model(self, model):
        self._trained = model
        super().set_model(self.save_as(model) if self.save_as is not None else model)

    def replace_statistics(self, model) -> None:
        """Give the saved model ``model``'s BatchNorm moving statistics, keeping everything else (atomically)."""
        from fmnist_keras.models import all_layers

        saved = load_model(self.final, compile=True)  # weights and optimizer state of the best epoch
        for layer in all_layers(model):
            if isinstance(layer, keras.layers.BatchNormalization):
                target = saved.get_layer(layer.name)
                target.moving_mean.assign(layer.moving_mean.value)
                target.moving_variance.assign(layer.moving_variance.value)
        self.temporary.unlink(missing_ok=True)
        saved.save(str(self.temporary))
        os.replace(self.temporary, self.final)

    def on_epoch_end(self, epoch, logs=None):
        value = (logs or {}).get(self.monitor)
        if value is not None and not math.isfinite(float(value)):
            return  # never a model whose monitored value is NaN (Keras saves the first epoch whatever it is)
        self.temporary.unlink(missing_ok=True)
        if self.save_as is not None:
            self.save_as(self._trained)  # the copy gets this epoch's weights
        super().on_epoch_end(epoch, logs)
        if self.temporary.exists():
            os.replace(self.temporary, self.final)


class StopOnSignal(keras.callbacks.Callback):
    """Turn Ctrl-C (SIGINT) or SIGTERM during ``fit`` into :class:`Interrupted` before the next batch.

    Keras's per-step code has bare ``except:`` clauses (matching the loss to
    the targets, for one) that swallow a ``KeyboardInterrupt`` raised inside
    them, and training carries on. While ``fit`` runs, the signal only sets a
    flag; :class:`Interrupted` is raised from the next ``on_train_batch_begin``
    (or validation batch begin), outside Keras's code; a signal after the last
    batch is raised by the caller when ``fit`` returns (see ``agreed`` and
    ``requested``). A second signal raises at once, except with
    ``agreed_only`` (below). Call :meth:`restore` when ``fit`` ends,
    however it ends (with ``agreed_only``, after the last vote:
    ``on_train_end`` then keeps the handlers). Does nothing outside the main
    thread.

    The check is at a batch's beginning, not its end: Keras reads a step's
    logs back to the host on the main thread when any callback has a
    batch-end hook that is not ``async_safe``, and on a GPU that read waits
    for the step.

    Replicas that must leave ``fit`` at the same step (torchrun's ranks,
    which meet in a collective every step) pass ``agreed_only``: a signal
    then only counts once :meth:`agree` says every replica stops (see
    ``ReplicaSync``), so no rank stops alone while the others wait for it.
    A second signal waits for that too: a scheduler such as Slurm signals
    every process of a job and torchrun passes the signal it received on to
    its workers, so a rank may receive the same signal twice.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, agreed_only: bool = False):
        super().__init__()
        self._previous = {}
        self.requested = None  # the signal number this process received, if any
        self.agreed = None  # the signal number every replica stops on, once agreed
        self.agreed_only = agreed_only

    def _handle(self, signum, frame):
        if self.requested is not None and not self.agreed_only:
            raise Interrupted(signum)
        self.requested = self.requested or signum

    def agree(self, signum: int) -> None:
        """Every replica stops before its next batch: on this process's own signal, else on ``signum``."""
        self.agreed = self.requested or signum

    def on_train_begin(self, logs=None):
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}

    def _check(self, *args, **kwargs):
        stop = self.agreed if self.agreed_only else self.requested
        if stop is not None:
            self.restore()
            raise Interrupted(stop)

    # Not at epoch end: the checkpoint, CSV row and backup of a finished epoch come first.
    on_train_batch_begin = on_test_batch_begin = _check

    def restore(self):
        """Put the previous handlers back (call it however ``fit`` ended)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}

    def on_train_end(self, logs=None):
        # With agreed_only the caller restores after its last vote, so that a signal during the callbacks'
        # own train-end work (BatchNorm recalibration, a collective) still waits for that vote.
        if not self.agreed_only:
            self.restore()


@dataclasses.dataclass
class EarlyStoppingState:
    best: float
    best_epoch: int  # 0-based, as Keras counts
    wait: int
    best_weights: list | None


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """``EarlyStopping`` that can start from the state of an interrupted run."""

    def __init__(self, *args, initial_state: EarlyStoppingState | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.initial_state = initial_state

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.initial_state is not None:
            state = self.initial_state
            self.best, self.best_epoch, self.wait = state.best, state.best_epoch, state.wait
            self.best_weights = state.best_weights


class NaNGuard(keras.callbacks.TerminateOnNaN):
    """``TerminateOnNaN`` that remembers where it stopped and guards the checkpoint.

    At the end of an epoch whose loss or weights are not all finite, the
    monitored value (``val_loss``) is set to NaN, which ``ModelCheckpoint``
    never saves, and training stops: a model with non-finite weights is
    never checkpointed. Put it before the checkpoint in ``fit``'s list.

    ``async_safe`` on torch: Keras may run the batch-end check on a worker
    thread (it reads logs already converted there and sets flags), so the
    step's loss is not read back to the host on the main thread; a NaN loss
    then stops training a step or two later at most.
    """

    @property
    def async_safe(self) -> bool:
        return logs_off_the_main_thread()

    def __init__(self, monitor: str = "val_loss"):
        super().__init__()
        self.monitor = monitor
        self.epoch = None
        self.stopped = False

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        values_finite = all(math.isfinite(float(v)) for v in logs.values() if isinstance(v, (int, float)))
        if not (values_finite and _weights_finite(self.model)):
            logs[self.monitor] = float("nan")
            self.model.stop_training = True
            self.stopped, self.epoch = True, epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_batch_end(self, batch, logs=None):
        super().on_batch_end(batch, logs)
        if self.model.stop_training and not self.stopped:
            loss = (logs or {}).get("loss")
            self.stopped = loss is not None and not math.isfinite(float(loss))


def averaged_weights() -> tuple[keras.callbacks.Callback, keras.callbacks.Callback]:
    """Two callbacks that make the optimizer's moving average of the weights (``use_ema``) the model that counts.

    The first is Keras's ``SwapEMAWeights(swap_on_epoch=True)``: the average
    is validated, and it is in the model for the callbacks after it at each
    epoch's end, so ``ModelCheckpoint`` saves it and ``EarlyStopping``
    restores it. The second, put just before ``BackupAndRestore``, puts the
    trained weights back in the model and the average back in the optimizer:
    the backup then holds both where an uninterrupted fit has them, a resumed
    fit continues exactly, and callbacks after it see the trained weights.
    When ``fit`` ends, Keras puts the average in the model
    (``finalize_variable_values``).
    """
    swap = _AverageAtEpochEnd(swap_on_epoch=True)
    return swap, _TrainedWeightsBack(swap)


class _AverageAtEpochEnd(keras.callbacks.SwapEMAWeights):
    """``SwapEMAWeights`` that also keeps a copy of the trained weights it swaps out at each epoch's end.

    (At the last epoch Keras's callback copies the average over the trained
    weights it swapped out, for ``finalize_variable_values``; the copy here
    lets :class:`_TrainedWeightsBack` put them back all the same.)
    """

    def __init__(self, swap_on_epoch: bool = True):
        super().__init__(swap_on_epoch=swap_on_epoch)
        self.trained = []

    def on_epoch_end(self, epoch, logs=None):
        self.trained = [keras.ops.copy(variable.value) for variable in self.model.trainable_variables]
        super().on_epoch_end(epoch, logs)


class _TrainedWeightsBack(keras.callbacks.Callback):
    def __init__(self, swap: _AverageAtEpochEnd):
        super().__init__()
        self.swap = swap

    def on_epoch_end(self, epoch, logs=None):
        self.swap.on_epoch_begin(epoch + 1)  # what the next epoch's start does: the average to the optimizer
        for variable, value in zip(self.model.trainable_variables, self.swap.trained):
            variable.assign(value)  # (the same weights, but at the last epoch, where Keras kept only the average)


def recalibrate_batch_norm(model, x, batch_size: int, max_batches: int = 100, seed: int = 0) -> int:
    """Re-estimate every BatchNormalization layer's moving statistics with the weights as they are.

    The moving statistics of a short run lag behind its weights (they start
    at mean 0, variance 1 and follow the weights with ``momentum``), so its
    inference does not match its training. This runs up to ``max_batches``
    seeded training batches through ``model`` in training mode (as fit does:
    augmentation and dropout on) with each layer's momentum set so that its
    moving statistics become the plain average over those batches; no weight
    is trained. Returns how many batches were used (0 when there is no
    BatchNorm layer).
    """
    from fmnist_keras.models import all_layers

    layers = [layer for layer in all_layers(model) if isinstance(layer, keras.layers.BatchNormalization)]
    if not layers or len(x) == 0:
        return 0
    order = np.random.default_rng(seed).permutation(len(x))
    batches = max(1, min(max_batches, len(x) // batch_size))
    momenta = [layer.momentum for layer in layers]
    try:
        for k in range(batches):
            for layer in layers:
                layer.momentum = k / (k + 1)  # the k-th batch gets weight 1/(k+1): a running average
            model(x[np.sort(order[k * batch_size: (k + 1) * batch_size])], training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return batches


class RecalibrateBatchNorm(keras.callbacks.Callback):
    """When ``fit`` ends: :func:`recalibrate_batch_norm` on the restored best weights, then rewrite the checkpoint.

    Put it after ``EarlyStopping`` (which restores the best weights as fit
    ends) and before :class:`RecordFitEnd`. Skipped when a weight is not
    finite. ``batches`` says how many batches were used. Data-parallel
    replicas pass ``average``, which averages the new statistics over them.
    """

    def __init__(self, x, batch_size: int, checkpoint: AtomicModelCheckpoint | None = None, seed: int = 0,
                 average=None):
        super().__init__()
        self.x, self.batch_size, self.checkpoint, self.seed = x, batch_size, checkpoint, seed
        self.average = average
        self.batches = 0

    def on_train_end(self, logs=None):
        if not _weights_finite(self.model):  # the same on every replica: their weights are equal
            return
        self.batches = recalibrate_batch_norm(self.model, self.x, self.batch_size, seed=self.seed)
        if self.average is not None:
            self.average()
        if not _weights_finite(self.model):  # statistics of a batch that overflowed: keep the checkpoint's
            self.batches = 0
            return
        if self.batches and self.checkpoint is not None and self.checkpoint.final.exists():
            self.checkpoint.replace_statistics(self.model)


def _weights_finite(model) -> bool:
    return all(bool(keras.ops.all(keras.ops.isfinite(w.value))) for w in model.weights if "float" in w.dtype)


class SameHistoryColumns(keras.callbacks.Callback):
    """On resume: the first epoch's logs must have the columns of the history's header, or ``CSVLogger(append=True)``
    would append rows of other columns under it (and the run would fail only once trained).

    ``CSVLogger`` names its columns ``epoch`` and the logs' keys, sorted, with ``val_`` twins when the logs have
    none, and writes no header of its own when the file has a first line, even a blank one. Put this callback
    before the checkpoint: it raises :class:`rundir.RunDirError` before anything of the epoch is written, so the
    run still resumes from its last backup once the history is mended.
    """

    def __init__(self, path: Path, backup_dir: Path):
        super().__init__()
        self.path, self.backup_dir = Path(path), Path(backup_dir)
        self.header = None  # the header's columns; None: nothing to check (no history, or checked already)

    def on_train_begin(self, logs=None):
        lines = _history_lines(self.path) if self.path.exists() else []
        self.header = next(csv.reader(lines[:1]), []) if lines else None

    def on_epoch_end(self, epoch, logs=None):
        if self.header is None:
            return
        keys = sorted(logs or {})
        if keys and not any(key.startswith("val_") for key in keys):
            keys += [f"val_{key}" for key in keys]
        header, self.header, logged = self.header, None, ["epoch", *keys]
        if header == logged:
            return
        extra = [name for name in header if name not in logged]
        missing = [name for name in logged if name not in header]
        differ = ", ".join([*(f"{name} is not logged" for name in extra), *(f"{name} is missing" for name in
                                                                               missing)]) or "in another order"
        mend = (f"remove the column{'s' * (len(extra) > 1)} {', '.join(extra)} from every line"
                if extra and [name for name in header if name in logged] == logged
                else f"make its first line {','.join(logged)} again")
        afresh = (f"move it away and delete {self.backup_dir} to train that model again from its first epoch"
                  if self.backup_dir.exists() else "move it away to start that model's history afresh")
        raise rundir.RunDirError(f"{self.path} has the columns {','.join(header) or '(none: a blank line)'}, but "
                                 f"this training logs {','.join(logged)} ({differ}); {mend}, or {afresh}.")


class RecordFitEnd(keras.callbacks.Callback):
    """Write ``fit.json`` when ``fit`` ends normally, before ``BackupAndRestore`` deletes its backup.

    Keras deletes the backup when ``fit`` ends, after which the backup no
    longer tells how many epochs are done; ``fit.json`` does. Put this
    callback before ``BackupAndRestore`` in ``fit``'s list (callbacks end in
    list order). ``facts`` is a function returning the dict to write.
    """

    def __init__(self, path: Path, facts):
        super().__init__()
        self.path, self.facts = Path(path), facts

    def on_train_end(self, logs=None):
        rundir.write_json(self.path, self.facts())


def read_history(path: Path) -> list[dict]:
    """Rows of a CSVLogger file, values as floats (``epoch`` as int); [] when there is none.

    Raises:
        rundir.RunDirError: the file is not a CSVLogger history.
    """
    path = Path(path)
    if not path.exists():
        return []
    return _parse_history(_history_lines(path), path)


def _history_lines(path: Path) -> list[str]:
    try:
        return rundir.read_run_text(path, "a CSVLogger history", _history_fix(path), newline="").splitlines(
            keepends=True)
    except (OSError, UnicodeDecodeError) as error:
        raise rundir.RunDirError(f"{path} is damaged: not a CSVLogger history ({type(error).__name__}); "
                                 f"{_history_fix(path)}.") from None


def _history_fix(path: Path) -> str:
    return f"move {path} away to start that model's history afresh"


def _parse_history(lines: list[str], path: Path) -> list[dict]:
    fix = _history_fix(path)
    try:
        rows = list(csv.DictReader(lines))
        history = [{k: int(v) if k == "epoch" else float(v) for k, v in row.items()} for row in rows]
    except (ValueError, TypeError, csv.Error) as error:
        raise rundir.RunDirError(f"{path} is damaged: not a CSVLogger history ({type(error).__name__}); {fix}.") from None
    if any("epoch" not in row or "val_loss" not in row for row in history):
        raise rundir.RunDirError(f"{path} is damaged: rows without epoch and val_loss; {fix}.")
    if [row["epoch"] for row in history] != list(range(len(history))):
        raise rundir.RunDirError(f"{path} is damaged: its epochs are not 0, 1, 2, ... in order; {fix}.")
    return history


def backed_up_epochs(backup_dir: Path) -> int:
    """How many epochs ``BackupAndRestore``'s last backup holds (0 when none).

    Reads the ``training_metadata.json`` that Keras's ``BackupAndRestore``
    writes in its ``backup_dir`` (keys ``epoch`` and ``batch``). Keras writes
    it in place, after the weights, so a kill in between leaves it empty or
    cut short. With ``double_checkpoint`` Keras first copies the previous
    backup to ``*.bkp``; when the metadata or the weights are damaged and
    that previous pair is whole, it is put back (its last epoch is trained
    again), as Keras itself does when the weights file is damaged.
    """
    backup_dir = Path(backup_dir)
    metadata = backup_dir / rundir.BACKUP_METADATA
    if not metadata.exists():
        return 0
    try:
        epoch = _backup_epoch(metadata, backup_dir)
        _check_weights(backup_dir / rundir.BACKUP_WEIGHTS, backup_dir)
        return epoch
    except rundir.RunDirError:
        previous = {name: backup_dir / f"{name}.bkp"  # weights first
                    for name in (rundir.BACKUP_WEIGHTS, rundir.BACKUP_METADATA)}
        if not all(path.is_file() and not path.is_symlink() for path in previous.values()):
            raise
        epoch = _backup_epoch(previous[rundir.BACKUP_METADATA], backup_dir)
        _check_weights(previous[rundir.BACKUP_WEIGHTS], backup_dir)
        for name, path in previous.items():
            rundir.write_bytes(backup_dir / name, path.read_bytes())
        return epoch


def _backup_fix(backup_dir: Path) -> str:
    return f"delete {backup_dir} to train that model again from its first epoch"


def _check_weights(weights: Path, backup_dir: Path) -> None:
    """Refuse a backup weights file that HDF5 cannot open (cut short by a kill or a full disk, or missing).

    Keras would load its previous backup instead, while the metadata says the later epoch, so the history
    and the weights would disagree by an epoch.
    """
    import h5py  # Keras's own dependency, for its .weights.h5 files

    try:  # without HDF5's file lock: the run's own lock keeps other processes out, and a lock held by one
        with h5py.File(weights, "r", locking=False):  # would read as damage
            pass
    except (OSError, ValueError) as error:
        detail = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise rundir.RunDirError(f"{weights} is damaged: not an HDF5 file of weights ({detail}); "
                                 f"{_backup_fix(backup_dir)}.") from None


def _backup_epoch(metadata: Path, backup_dir: Path) -> int:
    fix = _backup_fix(backup_dir)
    data = rundir.read_json(metadata, "Keras's BackupAndRestore metadata", fix)
    epoch = data.get("epoch") if isinstance(data, dict) else None
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
        raise rundir.RunDirError(f"{metadata} is damaged: no epoch count; {fix}.")
    return epoch


def truncate_history(path: Path, epochs: int) -> list[dict]:
    """Keep the header and the first ``epochs`` epochs of a CSVLogger file.

    An epoch logged after the last backup will be trained again on resume,
    so its row must go, or the history would hold it twice. A last line
    without its line end is a row that a kill cut short while CSVLogger
    wrote it (before the backup of that epoch, which comes later in
    ``fit``'s callbacks); it goes too, when a whole header line comes
    before it.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = _history_lines(path)
    if len(lines) == 1 and not lines[0].endswith("\n") and lines[0].startswith("epoch,"):
        lines = [lines[0] + "\r\n"]  # a header without its line end (written by hand): CSVLogger would append
        rundir.write_text(path, lines[0])  # the first row to it
    cut_short = len(lines) > 1 and not lines[-1].endswith("\n")
    complete = lines[:-1] if cut_short else lines
    history = _parse_history(complete, path)
    if len(history) > epochs or len(complete) < len(lines):
        rundir.write_text(path, "".join(complete[: 1 + epochs]))
    return history[:epochs]


def resume_state(backup_dir: Path, model_file: Path, history_file: Path) -> EarlyStoppingState | None:
    """The EarlyStopping state after the last backed-up epoch, or None to start afresh.

    Raises:
        rundir.RunDirError: the backup holds more epochs than ``history_file``
            logs (``CSVLogger`` writes each epoch's row before the backup of
            that epoch), so one of the two is damaged or out of place.
    """
    epochs = backed_up_epochs(backup_dir)
    history = truncate_history(history_file, epochs)
    if len(history) < epochs:
        raise rundir.RunDirError(
            f"{Path(backup_dir) / rundir.BACKUP_METADATA} does not match {history_file}: the backup holds {epochs} "
            f"epochs, the history logs {len(history)}; {_backup_fix(backup_dir)}.")
    if not history or not Path(model_file).exists():
        return None
    best_row = min(history, key=lambda row: row["val_loss"] if math.isfinite(row["val_loss"]) else math.inf)
    best_weights = load_model(model_file).get_weights()
    return EarlyStoppingState(
        best=best_row["val_loss"],
        best_epoch=best_row["epoch"],
        wait=history[-1]["epoch"] - best_row["epoch"],
        best_weights=best_weights,
    )

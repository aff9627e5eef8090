"""Keras's built-in callbacks, made safe to interrupt and resume.

- :class:`AtomicModelCheckpoint`: ``ModelCheckpoint`` that writes the best
  model to a temporary file in the same directory, then renames it, so a
  kill during a write leaves the previous best model loadable.
- :class:`ResumableEarlyStopping`: ``EarlyStopping`` whose state (best value,
  best epoch, epochs waited, best weights) can be carried over from the run
  being resumed, instead of starting from scratch.
- :func:`resume_state`: that state, read from the run directory's history
  CSV and best checkpoint, consistent with ``BackupAndRestore``'s last backup.
- :class:`CtrlC`: Ctrl-C during ``fit`` stops at the end of the current
  batch, where Keras cannot swallow it.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import threading
from pathlib import Path

import keras

from fmnist_keras.loading import load_model

BACKUP_DIR = "backup"


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """``ModelCheckpoint`` that never leaves a half-written model file.

    Args:
        save_as: optional function from the model being trained to the model
            to write in its place, e.g. the same weights in the portable
            ``channels_last`` layout (:func:`fmnist_keras.training.portable_copy`).
        *args, **kwargs: as for ``keras.callbacks.ModelCheckpoint``.
    """

    def __init__(self, *args, save_as=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.save_as = save_as

    def _save_model(self, epoch, batch, logs):
        # Overrides a private hook of ModelCheckpoint: redirect the write to a
        # temporary sibling (same directory, so the rename is atomic), and
        # show ModelCheckpoint the model to write (Callback.model reads _model).
        final = Path(self.filepath)
        temporary = final.with_name(f".partial-{final.name}")
        temporary.unlink(missing_ok=True)
        trained = self._model
        self.filepath = str(temporary)
        if self.save_as is not None:
            self._model = self.save_as(self.model)
        try:
            super()._save_model(epoch, batch, logs)
        finally:
            self.filepath, self._model = str(final), trained
        if temporary.exists():
            os.replace(temporary, final)


class CtrlC(keras.callbacks.Callback):
    """Turn Ctrl-C during ``fit`` into a ``KeyboardInterrupt`` at the next batch end.

    Keras's per-step code has bare ``except:`` clauses (matching the loss to
    the targets, for one) that swallow a ``KeyboardInterrupt`` raised inside
    them, and training carries on (seen in 2 of 5 tries on a tiny model).
    While ``fit`` runs, SIGINT only sets a flag; the interrupt is raised from
    the next ``on_train_batch_end`` (or validation batch end), outside Keras's
    code; a Ctrl-C after the last batch is raised by the caller when ``fit``
    returns (see ``requested``). A second Ctrl-C raises at once. Call
    :meth:`restore` when ``fit`` ends, however it ends. Does nothing outside
    the main thread.
    """

    def __init__(self):
        super().__init__()
        self._previous = None
        self.requested = False

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def on_train_begin(self, logs=None):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _check(self, *args, **kwargs):
        if self.requested:
            self.restore()
            raise KeyboardInterrupt

    # Not at epoch end: the checkpoint, CSV row and backup of a finished epoch come first.
    on_train_batch_end = on_test_batch_end = _check

    def restore(self):
        """Put the previous SIGINT handler back (call it however ``fit`` ended)."""
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_train_end(self, logs=None):
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
    """``TerminateOnNaN`` that remembers the batch and epoch where it stopped."""

    def __init__(self):
        super().__init__()
        self.epoch = None
        self.stopped = False

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_batch_end(self, batch, logs=None):
        super().on_batch_end(batch, logs)
        if self.model.stop_training and not self.stopped:
            loss = (logs or {}).get("loss")
            self.stopped = loss is not None and not math.isfinite(float(loss))


def read_history(path: Path) -> list[dict]:
    """Rows of a CSVLogger file, values as floats (``epoch`` as int)."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: int(v) if k == "epoch" else float(v) for k, v in row.items()} for row in rows]


def backed_up_epochs(run_dir: Path) -> int:
    """How many epochs ``BackupAndRestore``'s last backup holds (0 when none)."""
    metadata = Path(run_dir) / BACKUP_DIR / "training_metadata.json"
    if not metadata.exists():
        return 0
    return int(json.loads(metadata.read_text())["epoch"])


def truncate_history(path: Path, epochs: int) -> list[dict]:
    """Keep the header and the first ``epochs`` epochs of a CSVLogger file.

    An epoch logged after the last backup will be trained again on resume,
    so its row must go, or the history would hold it twice.
    """
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().splitlines(keepends=True)
    kept = lines[: 1 + epochs] if lines else []
    temporary = path.with_name(f".partial-{path.name}")
    temporary.write_text("".join(kept))
    os.replace(temporary, path)
    return read_history(path)


def resume_state(run_dir: Path, model_file: Path, history_file: Path) -> EarlyStoppingState | None:
    """The EarlyStopping state after the last backed-up epoch, or None to start afresh."""
    epochs = backed_up_epochs(run_dir)
    history = truncate_history(history_file, epochs)
    if not history or not Path(model_file).exists():
        return None
    best_row = min(history, key=lambda row: row["val_loss"])
    best_weights = load_model(model_file).get_weights()
    return EarlyStoppingState(
        best=best_row["val_loss"],
        best_epoch=best_row["epoch"],
        wait=history[-1]["epoch"] - best_row["epoch"],
        best_weights=best_weights,
    )

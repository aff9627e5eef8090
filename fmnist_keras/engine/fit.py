"""Fit one model with Keras's built-in callbacks.

:func:`fit_model` builds, compiles and fits a model and returns it with its
history; with a :class:`~fmnist_keras.rundir.RunDir` it also checkpoints the
best model, logs the history, backs up every epoch and records the end of
``fit``. The caller evaluates (:mod:`fmnist_keras.engine.evaluation`) and
writes the metrics once.

Imports Keras: import this only after :func:`fmnist_keras.backend.select_backend`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence

import keras
import numpy as np

from fmnist_keras import data as fdata
from fmnist_keras.config import TrainConfig
from fmnist_keras.backend import default_mixed_precision, has_gpu
from fmnist_keras.engine import distributed, fastpath
from fmnist_keras.engine.callbacks import (
    AtomicModelCheckpoint,
    NaNGuard,
    RecalibrateBatchNorm,
    RecordFitEnd,
    ResumableEarlyStopping,
    SameHistoryColumns,
    StopOnSignal,
    averaged_weights,
    backed_up_epochs,
    logs_off_the_main_thread,
    read_history,
    resume_state,
)
from fmnist_keras.engine.device_data import DeviceBatches
from fmnist_keras.engine.host_batches import fit_inputs
from fmnist_keras.engine.recipe import compile_model, dtype_policy, dtype_policy_name, portable_copy
from fmnist_keras.engine.splits import Splits
from fmnist_keras.interrupts import Interrupted
from fmnist_keras.models import build_model
from fmnist_keras.rundir import RunDir


@dataclasses.dataclass
class FitResult:
    """What :func:`fit_model` returns: the trained model, its history and the facts of the fit."""

    model: keras.Model  # with the best epoch's weights (EarlyStopping restores them)
    history: list[dict]  # one row per epoch, as history.csv holds it
    facts: dict  # what fit.json records: epochs run, best epoch, train time, fast path, ...


def run_config(config: TrainConfig, splits: Splits) -> TrainConfig:
    """What ``config.json`` records: ``config`` with the model's defaults filled in, the splits' layout,
    and the precision this machine gets when the configuration leaves it open."""
    if config.data_format not in ("auto", splits.data_format):
        raise ValueError(
            f"the configuration asks to train in {config.data_format} but the splits are {splits.data_format}; "
            f"make them with make_splits(raw, config)."
        )
    mixed = config.mixed_precision
    return dataclasses.replace(
        config.resolved(),
        data_format=splits.data_format,
        mixed_precision=default_mixed_precision(keras.backend.backend(), config.model) if mixed is None else mixed,
    )


def fit_model(
    config: TrainConfig,
    splits: Splits,
    run: RunDir | None = None,
    resume: bool = False,
    verbose="auto",
    replicas: distributed.Replicas = distributed.SINGLE,
    tensorboard: bool = False,
    data_on_device: bool | None = None,
    callbacks: Sequence[keras.callbacks.Callback] = (),
    train_targets: np.ndarray | None = None,
) -> FitResult:
    """Build, compile and fit ``config.model`` with Keras's built-in callbacks.

    Callbacks: EarlyStopping (val_loss, best weights restored), TerminateOnNaN
    (which also keeps non-finite weights out of the checkpoint), and, with a
    ``run`` directory, an atomic ModelCheckpoint (best model as
    ``model.keras``, always ``channels_last``, see :func:`portable_copy`),
    CSVLogger, BackupAndRestore (state after every epoch, so an interrupted
    run resumes where it stopped) and ``fit.json`` when ``fit`` ends.

    Args:
        config: the run configuration.
        splits: model-ready arrays from :func:`make_splits`; the model trains in their layout.
        run: the run directory to write; None writes nothing (notebooks, and
            every torchrun rank but 0).
        resume: continue from the backup in ``run`` (optimizer state, epoch
            counter, EarlyStopping state and history carry over).
        verbose: Keras's progress-bar setting.
        replicas: the data-parallel replicas (:func:`fmnist_keras.engine.distributed.setup`).
        tensorboard: also log every epoch with Keras's ``TensorBoard`` callback
            to ``run/<model>/tensorboard`` (needs a ``run``).
        data_on_device: keep the training split on the compute device
            (:class:`~fmnist_keras.engine.device_data.DeviceBatches`); None:
            on a GPU, in one process. ``config.cutmix`` > 0 uses those
            batches on any device (they do the mixing), except under torchrun.
        callbacks: more callbacks, called after all of the above (at each
            epoch's end they see the trained weights, not their average).
        train_targets: class probabilities to fit the training split to, one
            row per image of ``splits.x_train``, in place of its one-hot
            labels (distillation, ``benchmarks/distill.py``); None: the labels.
            The training loss and accuracy are against them (the accuracy
            against each row's most probable class); validation, and so
            EarlyStopping and the checkpoint, keep the labels.

    Raises:
        callbacks.Interrupted: Ctrl-C or SIGTERM; every completed epoch is kept.
    """
    config = run_config(config, splits)
    if train_targets is not None:  # before anything is written
        train_targets = checked_targets(train_targets, len(splits.x_train))
    name = config.model
    if run is not None:
        run.check_model_dir(name)
        if not run.config_file(name).exists():  # train writes it when it creates the run
            config.save(run.config_file(name))
    # torchrun replicas draw their own dropout masks and augmentations (rank 0's
    # initial weights are broadcast to all); everything else uses config.seed.
    seed = config.seed + replicas.rank
    keras.utils.set_random_seed(seed)
    with dtype_policy(config.mixed_precision):
        model = build_model(name, data_format=config.data_format, seed=seed)
    compile_model(model, config, steps_per_epoch=math.ceil(len(splits.x_train) / config.batch_size))

    state = resume_state(run.backup_dir(name), run.model_file(name), run.history_file(name)) if resume else None
    parts = _Callbacks.make(config, splits, run, resume, state, replicas, tensorboard, quiet=verbose == 0)
    y_train = keras.utils.to_categorical(splits.y_train, fdata.NUM_CLASSES) if train_targets is None else train_targets
    y_val = keras.utils.to_categorical(splits.y_val, fdata.NUM_CLASSES)
    if replicas.mode == "torchrun":
        loader, set_epoch = distributed.shard(splits.x_train, y_train, replicas, config.batch_size, config.seed,
                                              cutmix=config.cutmix, channels_last=splits.data_format == "channels_last")
        training_data = {"x": loader, "shuffle": False}  # the sampler shuffles
        parts.ordered.insert(0, set_epoch)
    elif config.cutmix or (data_on_device if data_on_device is not None else has_gpu() and not replicas.distributed):
        # CutMix mixes images and labels together, so it needs batches of its own (on a CPU too).
        batches = DeviceBatches(splits.x_train, y_train, config.batch_size, seed=config.seed, cutmix=config.cutmix,
                                data_format=splits.data_format)
        training_data = batches.fit_inputs()  # they shuffle themselves, on the device
        parts.data_on_device = True
    else:
        training_data = fit_inputs(splits.x_train, y_train, config.batch_size, seed=config.seed)
    with fastpath.active(model, model.optimizer, enabled=config.fast_path) as fast_path:
        parts.started(fast_path)
        try:
            model.fit(
                **training_data,
                validation_data=(splits.x_val, y_val),
                validation_batch_size=config.batch_size,
                epochs=config.epochs,
                callbacks=[*parts.ordered, *callbacks],
                verbose=verbose if replicas.is_chief else 0,
            )
            if parts.replica_sync is not None:  # a signal after the last epoch's vote stops every rank, or none
                parts.replica_sync.vote_on_stop()
        finally:
            parts.stop_on_signal.restore()
    stop = parts.stop_on_signal.agreed or parts.stop_on_signal.requested
    if stop is not None:  # a signal after the last batch
        raise Interrupted(stop)
    return FitResult(model, parts.history(), parts.facts())


def checked_targets(targets: np.ndarray, images: int) -> np.ndarray:
    """``targets`` as float32 when they are class probabilities, one row per training image.

    Raises:
        ValueError: their shape does not match, or a row is not a probability distribution.
    """
    targets = np.asarray(targets, dtype=np.float32)
    if targets.shape != (images, fdata.NUM_CLASSES):
        raise ValueError(f"the training targets have shape {targets.shape}, not ({images}, {fdata.NUM_CLASSES}): "
                         f"one row of class probabilities per training image; make them for this split")
    rows = targets.sum(axis=1)
    if not (np.isfinite(targets).all() and (targets >= 0).all() and np.allclose(rows, 1.0, atol=1e-3)):
        raise ValueError("the training targets are not class probabilities (each row non-negative, summing to 1); "
                         "give probabilities, not logits")
    return targets


@dataclasses.dataclass
class _Callbacks:
    """The callbacks of one fit, in ``fit``'s order, and the facts they gather."""

    config: TrainConfig
    run: RunDir | None
    resumed: bool
    epochs_before: int  # epochs done before this fit (BackupAndRestore's backup)
    ordered: list
    history_log: keras.callbacks.History
    stop_on_signal: StopOnSignal
    nan_guard: NaNGuard
    early_stopping: ResumableEarlyStopping
    recalibrate: RecalibrateBatchNorm
    replica_callbacks: list
    replica_sync: distributed.ReplicaSync | None = None  # keeps torchrun's replicas in step; None in one process
    start: float = 0.0
    fast_path: dict = dataclasses.field(default_factory=dict)
    data_on_device: bool = False

    @classmethod
    def make(cls, config, splits, run, resume, state, replicas, tensorboard, quiet=False) -> "_Callbacks":
        name = config.model
        early_stopping = ResumableEarlyStopping(  # it prints through Keras, which needs a stdout
            monitor="val_loss", patience=config.patience, restore_best_weights=True,
            verbose=int(run is not None and not quiet), initial_state=state,
        )
        stop_on_signal = StopOnSignal(agreed_only=replicas.mode == "torchrun")  # every rank stops at the same step
        replica_callbacks = distributed.callbacks(replicas, stop_on_signal)
        history_log, nan_guard = keras.callbacks.History(), NaNGuard()
        ordered = [history_log, *replica_callbacks, stop_on_signal, nan_guard]  # NaNGuard before the checkpoint
        swap_in, swap_back = averaged_weights() if config.ema else (None, None)
        if swap_in is not None:  # the average is validated, checkpointed and restored
            ordered.append(swap_in)
        checkpoint = None
        if run is not None:
            checkpoint = AtomicModelCheckpoint(
                run.model_file(name), monitor="val_loss", save_best_only=True,
                initial_value_threshold=state.best if state else None,
                save_as=portable_copy(config) if config.data_format != "channels_last" else None,
            )
            if resume:  # before the checkpoint: nothing of an epoch logged under other columns is written
                ordered.append(SameHistoryColumns(run.history_file(name), run.backup_dir(name)))
            ordered += [checkpoint, keras.callbacks.CSVLogger(str(run.history_file(name)), append=resume)]
            if tensorboard:
                ordered.append(keras.callbacks.TensorBoard(str(run.tensorboard_dir(name))))
        ordered.append(early_stopping)
        # After EarlyStopping restores the best weights as fit ends: statistics that match them.
        sync = next((c for c in replica_callbacks if isinstance(c, distributed.ReplicaSync)), None)
        recalibrate = RecalibrateBatchNorm(splits.x_train, config.batch_size, checkpoint=checkpoint, seed=config.seed,
                                           average=sync.average_statistics if sync is not None else None)
        ordered.append(recalibrate)
        parts = cls(config, run, state is not None, backed_up_epochs(run.backup_dir(name)) if resume else 0, ordered,
                    history_log, stop_on_signal, nan_guard, early_stopping, recalibrate, replica_callbacks, sync)
        if run is not None:
            # fit.json before the backup, which Keras deletes when fit ends; the
            # backup comes last, so it marks an epoch whose checkpoint and CSV row are written.
            ordered.append(RecordFitEnd(run.fit_file(name), parts.facts))
        if swap_back is not None:  # the backup keeps the trained weights and their average apart
            ordered.append(swap_back)
        if run is not None:
            backup = keras.callbacks.BackupAndRestore(str(run.backup_dir(name)), double_checkpoint=True)
            backup.async_safe = logs_off_the_main_thread()  # saving once per epoch, its batch-end hook does nothing
            ordered.append(backup)
        return parts

    def started(self, fast_path: dict) -> None:
        self.start, self.fast_path = time.perf_counter(), fast_path

    def history(self) -> list[dict]:
        """Every epoch of the run: history.csv when there is a run directory, else this fit's."""
        if self.run is not None:
            return read_history(self.run.history_file(self.config.model))
        return [{"epoch": epoch, **{k: float(v[i]) for k, v in self.history_log.history.items()}}
                for i, epoch in enumerate(self.history_log.epoch)]

    def facts(self) -> dict:
        """The facts of the fit so far; RecordFitEnd writes them as fit ends."""
        history = self.history()
        seconds = time.perf_counter() - self.start
        nan = self.nan_guard
        facts = {
            "epochs_run": len(history) if self.run is not None else self.epochs_before + len(history),
            "best_epoch": _best_epoch(history),
            "stopped_early": self.early_stopping.stopped_epoch > 0,
            "terminated_on_nan": nan.stopped,
            "nan_epoch": nan.epoch + 1 if nan.stopped and nan.epoch is not None else None,
            "resumed": self.resumed,
            "train_time_s": round(seconds, 2),
            "seconds_per_epoch": round(seconds / max(1, len(self.history_log.epoch)), 2),
            "training_data_format": self.config.data_format,
            "mixed_precision": dtype_policy_name(self.config.mixed_precision),
            "fast_path": self.fast_path,
            "batch_norm_recalibrated_batches": self.recalibrate.batches,
            "weights_average_momentum": _averaging_momentum(self.history_log.model),
            "training_data_on_device": self.data_on_device,
            "keras_version": keras.__version__,
        }
        averaging = {c.gradient_averaging for c in self.replica_callbacks if hasattr(c, "gradient_averaging")}
        if averaging:
            facts["gradient_averaging"] = averaging.pop()
        return facts


def _averaging_momentum(model) -> float:
    """The momentum of the optimizer's moving average of the weights; 0 when it keeps none."""
    optimizer = getattr(model, "optimizer", None)
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # inside a LossScaleOptimizer (float16)
    return round(float(optimizer.ema_momentum), 6) if getattr(optimizer, "use_ema", False) else 0.0


def _best_epoch(history: list[dict]) -> int | None:
    """The 1-based epoch of the lowest finite val_loss (the one EarlyStopping restores), or None."""
    finite = [row for row in history if math.isfinite(row.get("val_loss", math.nan))]
    return min(finite, key=lambda row: row["val_loss"])["epoch"] + 1 if finite else None

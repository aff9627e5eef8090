"""Data-parallel training with the engines users already run.

* **torch**: ``torchrun --nproc_per_node N -m fmnist_keras.train ...``. Every
  process builds the same model and trains it with ``model.fit`` on its own
  shard of every epoch (PyTorch's ``DistributedSampler``). Gradients are
  averaged over the processes (gloo on CPU, NCCL on GPUs) before the
  optimizer step, in one of two ways, whichever the installed Keras supports:

  - Keras 3.16 and later wrap the model in ``DistributedDataParallel``
    themselves when ``torch.distributed`` is initialised; DDP broadcasts rank
    0's weights and averages the gradients, and Keras sums the metric
    variables over the ranks;
  - older Keras calls the model directly, so :class:`ReplicaSync` broadcasts
    rank 0's weights at the start and averages each gradient from a hook on
    its weight as soon as backward has produced it.

  Either way :class:`ReplicaSync` averages BatchNorm's moving statistics and
  the batch loss after every step and the epoch's logs before any callback
  reads them, so every replica holds the same weights after every step and
  EarlyStopping decides the same everywhere. Only rank 0 writes files. No
  rank calls anything that may enter a collective alone: the final
  evaluation runs after the process group is closed (``train``).

* **JAX**: ``train --backend jax --distribute`` sets
  ``keras.distribution.DataParallel`` over all local devices; Keras splits
  every batch across them and keeps the weights replicated.

The global batch (``--batch-size``) is what one process would use, split
evenly over the replicas, so steps per epoch and the learning rate stay as
in a single-process run: no learning-rate scaling is needed. Grow
``--batch-size`` with the replicas only together with ``--learning-rate``
(the linear scaling rule).

Import this only after :func:`fmnist_keras.backend.select_backend`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import os

import keras
import numpy as np

from fmnist_keras.backend import launched_by_torchrun
from fmnist_keras.engine import device_data

DEFAULT_TIMEOUT_S = 300


class DistributedError(RuntimeError):
    """Distributed training cannot start as asked; the message says how to fix it."""


@dataclasses.dataclass(frozen=True)
class Replicas:
    """Who trains: one process (``single``), torchrun processes, or JAX devices."""

    mode: str = "single"  # "single", "torchrun" or "jax"
    rank: int = 0
    world_size: int = 1
    devices: tuple[str, ...] = ()
    collective_backend: str | None = None  # "gloo" or "nccl" under torchrun

    @property
    def is_chief(self) -> bool:
        """Rank 0: the one process that prints progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def describe(self, global_batch: int) -> dict:
        """What ``metrics.json`` records about the replicas."""
        return {
            "mode": self.mode,
            "world_size": self.world_size,
            "devices": list(self.devices),
            "collective_backend": self.collective_backend,
            "global_batch_size": global_batch,
            "per_replica_batch_size": global_batch // self.world_size,
            "learning_rate_scaling": "none: the global batch is the single-process batch",
        }


SINGLE = Replicas()


def setup(backend: str, distribute: bool, batch_size: int, timeout_s: float = DEFAULT_TIMEOUT_S) -> Replicas:
    """Join the torchrun job or spread over the JAX devices, as asked.

    Args:
        backend: the Keras backend in force.
        distribute: ``--distribute`` (JAX data parallelism over local devices).
        batch_size: the global batch, which must split evenly over the replicas.
        timeout_s: how long any rank waits for the others (rendezvous and
            every collective) before failing instead of hanging.

    Raises:
        DistributedError: a mode the backend does not support, a batch that
            does not split evenly, or a rendezvous that cannot be reached.
    """
    if launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if backend != "torch":
            raise DistributedError(
                f"torchrun started {world} processes but the backend is {backend!r}; torchrun data parallelism "
                f"needs --backend torch (on jax, run one process with --distribute)."
            )
        if distribute:
            raise DistributedError(
                "--distribute is JAX's single-process data parallelism; under torchrun leave it out."
            )
        return _join_torchrun(world, batch_size, timeout_s)
    if not distribute:
        return SINGLE
    if backend != "jax":
        raise DistributedError(
            f"--distribute works on the jax backend, not {backend!r}; on torch launch "
            f"torchrun --nproc_per_node N -m fmnist_keras.train instead."
        )
    return _spread_over_jax_devices(batch_size)


def _check_batch(batch_size: int, world: int, what: str) -> None:
    if batch_size % world:
        raise DistributedError(
            f"--batch-size {batch_size} does not split evenly over {world} {what}; use a multiple of {world}, "
            f"e.g. --batch-size {max(world, batch_size // world * world)}."
        )


def _join_torchrun(world: int, batch_size: int, timeout_s: float) -> Replicas:
    import torch
    import torch.distributed as dist

    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    _check_batch(batch_size, world, "processes")
    on_gpu = torch.cuda.is_available() and os.environ.get("KERAS_TORCH_DEVICE", "") != "cpu"
    if on_gpu:
        torch.cuda.set_device(local_rank)  # Keras's "cuda" device is the current one
        os.environ["KERAS_TORCH_DEVICE"] = f"cuda:{local_rank}"
    collective = "nccl" if on_gpu else "gloo"
    if not dist.is_initialized():
        try:
            dist.init_process_group(collective, timeout=datetime.timedelta(seconds=timeout_s))
        except Exception as error:  # the launcher's store or the peers are unreachable
            address = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise DistributedError(
                f"rank {rank} of {world} could not join the process group at {address} within {timeout_s:g} s "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); check that every "
                f"node can reach the rendezvous address and port, or raise --dist-timeout."
            ) from error
    device = f"cuda:{local_rank}" if on_gpu else "cpu"
    devices = [None] * world
    dist.all_gather_object(devices, f"rank{rank}:{device}")
    return Replicas("torchrun", rank, world, tuple(devices), collective)


def _spread_over_jax_devices(batch_size: int) -> Replicas:
    import jax

    devices = jax.devices()
    _check_batch(batch_size, len(devices), "JAX devices")
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    return Replicas("jax", 0, len(devices), tuple(f"{d.platform}:{d.id}" for d in devices))


def shutdown(replicas: Replicas, in_step: bool = True) -> None:
    """Close the torchrun process group after a final barrier when every rank got here in step.

    A rank that stops on an error leaves the group as it is (a barrier could wait for ranks still in a
    collective, and closing a group whose peer is gone can abort the process): ``train`` then ends the
    process without Python's finalisation (``train.end_process``).
    """
    if replicas.mode == "torchrun" and in_step:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def lost_a_replica(replicas: Replicas, error: BaseException) -> bool:
    """Whether ``error`` is a torchrun collective that failed: a rank that left, or that did not answer in time.

    NCCL and the rendezvous store raise torch.distributed's own errors (``DistError``). gloo raises a plain
    ``RuntimeError`` whose message starts with its transport's source file
    (``[.../gloo/transport/tcp/pair.cc:…] Connection closed by peer``, ``… Timed out waiting …``), so that
    name tells it from any other ``RuntimeError``, which keeps its traceback.
    """
    if replicas.mode != "torchrun" or not replicas.distributed or not isinstance(error, RuntimeError):
        return False
    import torch.distributed as dist

    return isinstance(error, dist.DistError) or "gloo/transport/" in str(error)


def same_on_every_rank(replicas: Replicas, message: str | None) -> str | None:
    """Rank 0's ``message`` on every torchrun rank (a collective); ``message`` itself otherwise.

    For a decision that rank 0 alone can make, such as whether its run
    directory could be opened, so that every rank goes on, or stops, together.
    """
    if replicas.mode != "torchrun":
        return message
    import torch.distributed as dist

    box = [message]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- torch: data sharding and replica synchronisation ---------------------------------------


class _Batches:
    """A map-style dataset whose items are whole batches (one numpy fancy index each), ``cutmix`` of
    them mixed with CutMix (:func:`~fmnist_keras.engine.device_data.cutmix`) within the batch."""

    def __init__(self, x: np.ndarray, y: np.ndarray, cutmix: float = 0.0, seed: int = 0, rank: int = 0,
                 channels_last: bool = True):
        self.x, self.y, self.channels_last = x, y, channels_last
        self.cutmix = device_data.checked_cutmix(cutmix)
        self._rng = np.random.default_rng([seed, 1, rank])  # each rank its own boxes

    def __len__(self):
        return len(self.x)

    def __getitem__(self, indices):
        x, y = self.x[indices], self.y[indices]
        if self.cutmix and self._rng.random() < self.cutmix:
            x, y = device_data.cutmix(x, y, self._rng, self.channels_last)
        return x, y


def shard(x: np.ndarray, y: np.ndarray, replicas: Replicas, batch_size: int, seed: int, cutmix: float = 0.0,
          channels_last: bool = True):
    """This rank's batches of every epoch: a ``DataLoader`` over a
    ``DistributedSampler`` (a new disjoint split each epoch, the same number
    of batches on every rank), ``cutmix`` of them mixed (each rank draws its
    own boxes), and the callback that advances its epoch."""
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    sampler = DistributedSampler(
        range(len(x)), num_replicas=replicas.world_size, rank=replicas.rank, shuffle=True, seed=seed
    )
    batches = BatchSampler(sampler, batch_size=batch_size // replicas.world_size, drop_last=False)
    loader = DataLoader(_Batches(x, y, cutmix, seed, replicas.rank, channels_last), sampler=batches, batch_size=None)

    class SetEpoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            sampler.set_epoch(epoch)

    return loader, SetEpoch()


class ReplicaSync(keras.callbacks.Callback):
    """Keeps torchrun replicas identical and their decisions the same.

    * train begin: unless Keras wrapped the model in DDP itself (which then
      does both), broadcast rank 0's weights and hook every trainable weight
      so its gradient is averaged over the replicas during backward.
    * every batch: average BatchNorm's moving statistics and the logged loss
      (so TerminateOnNaN stops every rank at the same step).
    * every epoch: average the logs before the other callbacks read them
      (put this callback first).
    * both, in the same all-reduce: whether any rank received Ctrl-C or
      SIGTERM. When one did, ``stop`` (a ``StopOnSignal`` with
      ``agreed_only``) stops every rank before its next batch: a rank that
      stopped alone would leave the others waiting in the next collective
      until torchrun kills them. :meth:`vote_on_stop` votes once more when
      ``fit`` returns.
    """

    def __init__(self, replicas: Replicas, stop=None):
        super().__init__()
        self.replicas = replicas
        self.stop = stop
        self._hooks = []
        self.gradient_averaging = None  # how: "keras DistributedDataParallel" or "gradient hooks"

    def _device(self):
        return self.model.trainable_weights[0].value.device  # NCCL reduces GPU tensors only

    def _average(self, tensors):
        import torch
        import torch.distributed as dist

        flat = torch.cat([t.reshape(-1).float() for t in tensors])
        dist.all_reduce(flat)
        flat /= self.replicas.world_size
        offset = 0
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()

    def on_train_begin(self, logs=None):
        import torch
        import torch.distributed as dist

        from fmnist_keras.engine.fastpath import keras_wraps_ddp

        if keras_wraps_ddp(self.model):
            self.gradient_averaging = "keras DistributedDataParallel"
            return
        self.gradient_averaging = "gradient hooks"
        world = self.replicas.world_size
        with torch.no_grad():
            for weight in self.model.weights:
                dist.broadcast(weight.value.data, src=0)

        def average_gradient(parameter):
            dist.all_reduce(parameter.grad)
            parameter.grad.div_(world)

        self._hooks = [w.value.register_post_accumulate_grad_hook(average_gradient) for w in self.model.trainable_weights]

    def _statistics(self):
        return [w.value.data for w in self.model.non_trainable_weights if w.value.is_floating_point()]

    def average_statistics(self):
        """Average BatchNorm's moving statistics over the replicas (a collective: every rank calls it)."""
        import torch

        with torch.no_grad():
            self._average(self._statistics())

    def _stop_votes(self) -> list[float]:
        """One slot per signal ``stop`` handles, 1.0 where this rank received it; averaged, a slot > 0
        means some rank did."""
        if self.stop is None:
            return []
        return [float(self.stop.requested == signum) for signum in self.stop.SIGNALS]

    def _agree_on_stop(self, votes: list[float]) -> None:
        if self.stop is None:
            return
        for signum, vote in zip(self.stop.SIGNALS, votes):
            if vote > 0:
                self.stop.agree(signum)
                return

    def vote_on_stop(self) -> None:
        """Whether any rank received a signal since the last vote, agreed as at a batch's end (a
        collective: every rank calls it, once ``fit`` returns)."""
        import torch

        votes = torch.tensor(self._stop_votes(), device=self._device())
        if len(votes):
            self._average([votes])
            self._agree_on_stop(votes.tolist())

    def on_train_batch_end(self, batch, logs=None):
        import torch

        loss_and_votes = torch.tensor([float((logs or {}).get("loss", 0.0)), *self._stop_votes()],
                                      device=self._device())
        with torch.no_grad():
            self._average([*self._statistics(), loss_and_votes])
        loss, *votes = loss_and_votes.tolist()  # one copy to the host
        if logs is not None and "loss" in logs:
            logs["loss"] = loss
        self._agree_on_stop(votes)

    def on_epoch_end(self, epoch, logs=None):
        import torch

        keys = sorted(logs or {})
        values = torch.tensor([*(float(logs[k]) for k in keys), *self._stop_votes()], device=self._device())
        if not len(values):
            return
        self._average([values])
        values = values.tolist()  # one copy to the host
        if keys:
            logs.update(zip(keys, values))
        self._agree_on_stop(values[len(keys):])

    def on_train_end(self, logs=None):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def callbacks(replicas: Replicas, stop=None) -> list:
    """The callbacks a replica needs, to go first in ``fit``'s list; ``stop``: the fit's ``StopOnSignal``,
    made with ``agreed_only`` under torchrun (see :class:`ReplicaSync`)."""
    return [ReplicaSync(replicas, stop)] if replicas.mode == "torchrun" else []


# --- checking that the replicas agree ------------------------------------------------------------


def _digest(arrays) -> str:
    sha = hashlib.sha256()
    for array in arrays:
        sha.update(np.ascontiguousarray(array).tobytes())
    return sha.hexdigest()[:16]


def replica_digests(model: keras.Model, replicas: Replicas) -> list[str]:
    """A digest of every replica's weights (all equal when the replicas agree).

    torchrun: one per process (gathered on every rank, a collective call);
    JAX: one per device, from each device's own copy of the replicated weights.
    """
    if replicas.mode == "torchrun":
        import torch.distributed as dist

        digests = [None] * replicas.world_size
        dist.all_gather_object(digests, _digest(keras.ops.convert_to_numpy(w) for w in model.weights))
        return digests
    if replicas.mode == "jax":
        per_device = [[] for _ in replicas.devices]
        for weight in model.weights:
            for i, shard_ in enumerate(sorted(weight.value.addressable_shards, key=lambda s: s.device.id)):
                per_device[i].append(np.asarray(shard_.data))
        return [_digest(arrays) for arrays in per_device]
    return [_digest(keras.ops.convert_to_numpy(w) for w in model.weights)]

"""Where the host time of a small-batch training step goes, on the fast path.

Trains one model at a tiny batch as ``overhead.py`` does (``model.fit``, the
fast path on), warms up one epoch, then profiles one epoch twice:

* cProfile: the Python functions with the most own time, and the own time
  per package (Keras's modules by sub-package, torch, this project), in
  ms/step;
* ``torch.profiler``: the aten operators with the most own CPU time, in
  ms/step with calls/step, and the copies (``aten::copy_``, ``to``,
  ``contiguous``, ``clone``) and host reads (``aten::item``,
  ``_local_scalar_dense``: a synchronisation on a GPU) per step.

Profilers slow a step down; compare the shares, not the absolute numbers,
with ``overhead.py``. Without a profiler it then times the pieces of a step
on one batch against the plain-PyTorch twin (``twins.py``): the forward pass,
forward + loss + backward, Keras's ``train_step`` against the twin's step,
and each layer's ``__call__`` against its bare ``call()``.

Usage:
    python benchmarks/profile_overhead.py --model baseline-cnn --threads 1
    python benchmarks/profile_overhead.py --model cnn --subset 2000 --callbacks train
"""

from __future__ import annotations

import early_signals  # first: a Ctrl-C while the imports below load is one line
import argparse
import cProfile
import collections
import os
import pstats
import sys
import time

import outputs  # benchmarks/ is on sys.path when a script there runs
from fmnist_keras.backend import default_backend
from fmnist_keras.cli import add_data_arguments, in_range
from fmnist_keras.config import RANGES

os.environ["KERAS_BACKEND"] = default_backend()  # torch unless $KERAS_BACKEND names one


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="baseline-cnn", choices=["baseline-cnn", "mlp", "cnn"],
                        help="model to profile (default: baseline-cnn)")
    parser.add_argument("--batch-size", type=in_range(*RANGES["batch_size"]), metavar="N", default=8,
                        help="batch size (default: 8)")
    parser.add_argument("--subset", type=in_range(*RANGES["subset"]), metavar="N", default=2000,
                        help="images (90%% train) (default: 2000)")
    parser.add_argument("--threads", type=in_range(int, 1, 1024), metavar="N",
                        help="torch CPU threads (default: torch's)")
    parser.add_argument("--stock", action="store_true", help="profile stock Keras instead of the fast path")
    parser.add_argument("--callbacks", choices=["none", "train"], default="none",
                        help="'train': add the per-step callbacks train passes to fit (NaNGuard, History) (default: none)")
    parser.add_argument("--top", type=in_range(int, 1, 1000), metavar="N", default=15,
                        help="rows per table (default: 15)")
    add_data_arguments(parser)  # --data-dir and --no-verify
    return parser.parse_args(argv)


def _package(filename: str) -> str:
    """A short owner for a profiled function's file: keras/<sub-package>, torch, fmnist_keras, ..."""
    path = filename.replace(os.sep, "/")
    if "/keras/src/" in path:
        return "keras/" + path.split("/keras/src/", 1)[1].split("/", 1)[0]
    for name in ("fmnist_keras", "torch", "numpy", "optree"):
        if f"/{name}/" in path:
            return name
    return "builtins (C calls)" if filename == "~" else "python stdlib/other"


# Phases of a Keras torch training step: (label, file name, function name); cumulative time.
PHASES = (
    ("whole step (Keras's one_step_on_data)", "trainer.py", "one_step_on_data"),
    ("  forward: model __call__ (layers, loss inputs)", "layer.py", "__call__"),
    ("  loss: compute_loss", "trainer.py", "compute_loss"),
    ("  backward: autograd engine", "~", "<method 'run_backward' of 'torch._C._EngineBase' objects>"),
    ("  optimizer: apply (fused AdamW on the fast path)", "base_optimizer.py", "apply"),
    ("  metrics: compute_metrics", "trainer.py", "compute_metrics"),
    ("data: next batch (epoch_iterator)", "epoch_iterator.py", "__next__"),
    ("callbacks: on_train_batch_begin", "callback_list.py", "on_train_batch_begin"),
    ("callbacks: on_train_batch_end", "callback_list.py", "on_train_batch_end"),
)


def phase_table(stats, steps):
    print(f"\n{'cum ms/step':>12}  phase (cProfile, cumulative)")
    for label, file_name, function in PHASES:
        cumulative = [cum for (filename, _line, name), (_cc, _n, _own, cum, _c) in stats.stats.items()
                      if name == function and os.path.basename(filename) == file_name]
        if cumulative:
            print(f"{1000 * max(cumulative) / steps:>12.3f}  {label}")


def cprofile_tables(profile, steps, top):
    stats = pstats.Stats(profile)
    phase_table(stats, steps)
    rows, per_package = [], collections.Counter()
    for (filename, line, function), (_cc, calls, own, cumulative, _callers) in stats.stats.items():
        per_package[_package(filename)] += own
        rows.append((own, cumulative, calls, f"{_package(filename)}: {os.path.basename(filename)}:{line}({function})"))
    total = sum(per_package.values())
    print(f"\ncProfile: {1000 * total / steps:.2f} ms/step of own time in all functions")
    print(f"{'own ms/step':>12}{'share':>7}  package")
    for package, own in per_package.most_common():
        print(f"{1000 * own / steps:>12.3f}{own / total:>7.1%}  {package}")
    print(f"\n{'own ms/step':>12}{'cum ms/step':>12}{'calls/step':>11}  function")
    for own, cumulative, calls, name in sorted(rows, reverse=True)[:top]:
        print(f"{1000 * own / steps:>12.3f}{1000 * cumulative / steps:>12.3f}{calls / steps:>11.1f}  {name}")


def torch_tables(prof, steps, top):
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    print(f"\ntorch.profiler: {total / 1000 / steps:.2f} ms/step of own CPU time in aten ops")
    print(f"{'own ms/step':>12}{'share':>7}{'calls/step':>11}  op")
    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]:
        print(f"{e.self_cpu_time_total / 1000 / steps:>12.3f}{e.self_cpu_time_total / total:>7.1%}"
              f"{e.count / steps:>11.1f}  {e.key}")
    watched = ("aten::copy_", "aten::to", "aten::_to_copy", "aten::contiguous", "aten::clone",
               "aten::item", "aten::_local_scalar_dense")
    print("copies and host reads per step: " + ", ".join(
        f"{e.key} {e.count / steps:.1f}" for e in events if e.key in watched))


def _ms(function, repeats: int = 200) -> float:
    for _ in range(20):
        function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return 1000 * (time.perf_counter() - start) / repeats


def piece_tables(name, model, weights, splits, batch_size: int):
    """ms of each piece of a step on one batch, Keras (as configured) against the twin."""
    import inspect

    import keras
    import torch

    from twins import torch_twin

    x = torch.tensor(splits.x_train[:batch_size])
    y = torch.tensor(keras.utils.to_categorical(splits.y_train[:batch_size], 10))
    x_twin = torch.tensor(splits.in_format("channels_first").x_train[:batch_size])
    x_twin = x_twin.contiguous(memory_format=torch.channels_last)
    y_twin = torch.tensor(splits.y_train[:batch_size])
    net = torch_twin(name, weights)
    net = net.to(memory_format=torch.channels_last).train()
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)

    def keras_backward():
        model.loss(y, model(x, training=True)).backward()

    def twin_backward():
        loss_fn(net(x_twin), y_twin).backward()

    def twin_step():
        optimizer.zero_grad(set_to_none=True)
        twin_backward()
        optimizer.step()

    rows = [
        ("forward", _ms(lambda: model(x, training=True)), _ms(lambda: net(x_twin))),
        ("forward + loss + backward", _ms(keras_backward), _ms(twin_backward)),
        ("train_step / twin step", _ms(lambda: model.train_step((x, y))), _ms(twin_step)),
    ]
    print(f"\npieces of a step on one batch of {batch_size} (no profiler)")
    print(f"{'keras ms':>10}{'twin ms':>10}  piece")
    for label, keras_ms, twin_ms in rows:
        print(f"{keras_ms:>10.3f}{twin_ms:>10.3f}  {label}")
    print(f"\n{'__call__ ms':>12}{'call() ms':>11}  layer (training=True, on its own)")
    inputs, total_call, total_bare = x, 0.0, 0.0
    for layer in model.layers:  # a functional model lists its input first, a Sequential does not
        if isinstance(layer, keras.layers.InputLayer):
            continue
        kwargs = {"training": True} if "training" in inspect.signature(layer.call).parameters else {}
        called = _ms(lambda: layer(inputs, training=True))
        bare = _ms(lambda: layer.call(inputs, **kwargs))
        total_call, total_bare = total_call + called, total_bare + bare
        print(f"{called:>12.3f}{bare:>11.3f}  {layer.name} ({type(layer).__name__})")
        inputs = layer(inputs, training=True).detach()
    print(f"{total_call:>12.3f}{total_bare:>11.3f}  sum over layers; the whole model's forward: {rows[0][1]:.3f} ms")


def main(argv=None) -> int:
    args = parse_args(argv)
    outputs.select_torch("profile_overhead.py")
    import keras
    import torch

    from fmnist_keras import data as fdata
    from fmnist_keras.backend import select_backend
    from fmnist_keras.engine.callbacks import NaNGuard
    from fmnist_keras.config import TrainConfig
    from fmnist_keras.engine.splits import make_splits
    from runner import keras_runner, set_threads

    select_backend("torch")
    threads = set_threads(args.threads)
    splits = make_splits(fdata.load_data(args.data_dir, verify=args.verify), TrainConfig(subset=args.subset))
    runner, model, weights = keras_runner(args.model, splits, 3, args.batch_size, fast=not args.stock)
    y = keras.utils.to_categorical(splits.y_train, 10)
    callbacks = [NaNGuard(), keras.callbacks.History()] if args.callbacks == "train" else []
    steps = -(-len(splits.x_train) // args.batch_size)

    def epoch():
        model.fit(splits.x_train, y, batch_size=args.batch_size, epochs=1, verbose=0, callbacks=callbacks)

    epoch()  # warm-up
    start = time.perf_counter()
    epoch()
    plain = 1000 * (time.perf_counter() - start) / steps
    profile = cProfile.Profile()
    profile.enable()
    epoch()
    profile.disable()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        epoch()
    print(f"{args.model}, {'stock Keras' if args.stock else 'fast path'}, batch {args.batch_size}, {steps} steps, "
          f"{threads} threads, callbacks: {args.callbacks}, keras {keras.__version__}: "
          f"{plain:.2f} ms/step unprofiled")
    cprofile_tables(profile, steps, args.top)
    torch_tables(prof, steps, args.top)
    piece_tables(args.model, model, weights, splits, args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(outputs.run_benchmark(main, "profile_overhead.py"))

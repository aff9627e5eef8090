"""Speed benchmark: the project's Keras training path against stock Keras and a plain-PyTorch twin.

For each model it trains, side by side in one process, on the current backend
(``KERAS_BACKEND``, default torch):

* ``keras stock``: ``model.fit`` on Keras as shipped, NHWC numpy arrays (the
  style of the Keras docs);
* ``keras fast``: the project's ``train`` path, the same ``model.fit`` with
  the torch fast path (:mod:`fmnist_keras.fastpath`); on tensorflow and jax
  the two are the same and one row is printed;
* ``plain torch`` (``mlp`` and ``baseline-cnn``, torch only): the same
  network in plain PyTorch, starting from the *same initial weights* copied
  from the Keras model, with the same batch size and optimiser (AdamW), the
  whole data set held as one tensor in ``channels_last`` memory format.

The paths take turns epoch by epoch (round 1 is warm-up), so a machine that
speeds up or slows down during the run affects them alike. For each path it
reports seconds per epoch (median of the timed rounds), training images/s,
inference images/s, peak memory (GPU: the path's own peak; CPU: the process's
peak resident size, printed once) and test accuracy after the last round, and
the ratio of each Keras path to plain PyTorch.

Usage:
    KERAS_BACKEND=torch python benchmarks/bench.py --models baseline-cnn mlp --epochs 4
    python benchmarks/bench.py --subset 10000 --epochs 2 --json bench.json   # quicker

Prints a table and writes it as JSON (``--json``). Numbers depend on the
machine: the README says which one produced its table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "torch")
if os.environ["KERAS_BACKEND"] == "tensorflow":
    import torch  # noqa: F401  (torch before tensorflow in one process)


def parse_args(argv=None):
    from fmnist_keras.config import DATA_FORMATS  # no Keras import: --help stays fast

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["baseline-cnn", "mlp"],
                        choices=["baseline-cnn", "mlp", "cnn"], help="models to time (default: baseline-cnn mlp)")
    parser.add_argument("--epochs", type=int, default=4, help="rounds: epochs per path, the first one is warm-up (default: 4)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    parser.add_argument("--subset", type=int, help="train on N images instead of the 54k training split")
    parser.add_argument("--data-format", choices=DATA_FORMATS, default="auto",
                        help="layout of the Keras paths ('auto': what train uses, channels_last)")
    parser.add_argument("--no-twin", action="store_true", help="skip the plain-PyTorch twin")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser.parse_args(argv)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Runner:
    """One way of training a model: ``epoch()`` runs one timed epoch, ``result()`` measures the rest."""

    def __init__(self, model, label, epoch, infer):
        self.model, self.label, self._epoch, self._infer = model, label, epoch, infer
        self.times, self.peak_mb = [], 0.0

    def epoch(self):
        gpu = _cuda()
        if gpu:
            gpu.reset_peak_memory_stats()
        start = time.perf_counter()
        self._epoch()
        self.times.append(time.perf_counter() - start)
        if gpu:
            self.peak_mb = max(self.peak_mb, gpu.max_memory_allocated() / 2**20)

    def result(self, num_train, x_test, y_test):
        import numpy as np

        start = time.perf_counter()
        predicted = self._infer(x_test)
        infer = time.perf_counter() - start
        epoch = statistics.median(self.times[1:] or self.times)
        return {
            "model": self.model, "path": self.label, "s_per_epoch": epoch, "epoch_times": self.times,
            "train_img_s": num_train / epoch, "infer_img_s": len(x_test) / infer,
            "peak_mb": self.peak_mb or None, "test_acc": float((np.asarray(predicted) == y_test).mean()),
        }


def _cuda():
    """torch.cuda when Keras computes on a CUDA GPU, else None."""
    import keras

    if keras.backend.backend() != "torch":
        return None
    import torch

    return torch.cuda if torch.cuda.is_available() else None


def keras_path(name, splits, args, fast: bool):
    """A Keras model trained with ``model.fit``; ``fast`` as ``train`` does it, else stock Keras."""
    import contextlib

    import keras
    import numpy as np

    from fmnist_keras import fastpath
    from fmnist_keras.config import TrainConfig
    from fmnist_keras.models import build_model
    from fmnist_keras.training import compile_model

    config = TrainConfig(model=name, epochs=args.epochs, batch_size=args.batch_size, fast_path=fast).resolved()
    keras.utils.set_random_seed(0)
    model = build_model(name, data_format=splits.data_format, seed=0)
    initial_weights = [np.array(w) for w in model.get_weights()]
    compile_model(model, config, -(-len(splits.x_train) // args.batch_size))
    if fast:
        fastpath.enable(model, model.optimizer)
    y = keras.utils.to_categorical(splits.y_train, 10)

    def scope():
        return contextlib.nullcontext() if fast else fastpath.stock_keras()

    def epoch():
        with scope():
            model.fit(splits.x_train, y, batch_size=args.batch_size, epochs=1, verbose=0)

    def infer(x):
        with scope():
            return np.argmax(model.predict(x, batch_size=512, verbose=0), 1)

    label = f"keras {'fast' if fast else 'stock'}" if keras.backend.backend() == "torch" else f"keras/{keras.backend.backend()}"
    return Runner(name, label, epoch, infer), model, initial_weights


def torch_twin(name, keras_model, weights):
    """The same network in plain PyTorch, initialised with the Keras weights."""
    import torch
    from torch import nn

    def dense(layer_w, layer_b=None, in_perm=None):
        kernel = torch.tensor(layer_w)
        if in_perm is not None:
            kernel = kernel[in_perm]
        linear = nn.Linear(kernel.shape[0], kernel.shape[1], bias=layer_b is not None)
        linear.weight.data = kernel.T.contiguous()
        if layer_b is not None:
            linear.bias.data = torch.tensor(layer_b)
        return linear

    def conv(kernel, bias):
        k = torch.tensor(kernel).permute(3, 2, 0, 1).contiguous()  # (kh,kw,in,out) -> (out,in,kh,kw)
        layer = nn.Conv2d(k.shape[1], k.shape[0], k.shape[2], bias=True)
        layer.weight.data, layer.bias.data = k, torch.tensor(bias)
        return layer

    def batch_norm(gamma, beta, mean, var):
        bn = nn.BatchNorm1d(len(gamma), eps=1e-3, momentum=0.01)
        bn.weight.data, bn.bias.data = torch.tensor(gamma), torch.tensor(beta)
        bn.running_mean.data, bn.running_var.data = torch.tensor(mean), torch.tensor(var)
        return bn

    w = list(weights)
    if name == "baseline-cnn":
        # Keras flattens (H, W, C); torch flattens (C, H, W): reorder the Dense rows.
        perm = torch.arange(5 * 5 * 64).reshape(5, 5, 64).permute(2, 0, 1).reshape(-1)
        return nn.Sequential(
            conv(w[0], w[1]), nn.ReLU(), nn.MaxPool2d(2),
            conv(w[2], w[3]), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Dropout(0.3), dense(w[4], w[5], perm), nn.ReLU(), dense(w[6], w[7]),
        )
    if name == "mlp":
        layers = [nn.Flatten()]
        i = 0
        for _ in range(2):
            layers += [dense(w[i]), batch_norm(*w[i + 1: i + 5]), nn.ReLU(), nn.Dropout(0.3)]
            i += 5
        layers.append(dense(w[i], w[i + 1]))
        return nn.Sequential(*layers)
    return None


def twin_path(name, keras_model, weights, splits, args):
    """The plain-PyTorch twin as a Runner, or None for a model without one."""
    import torch

    net = torch_twin(name, keras_model, weights)
    if net is None:
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    nchw = splits.in_format("channels_first")
    x = torch.tensor(nchw.x_train).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.tensor(splits.y_train).to(device)
    net = net.to(device).to(memory_format=torch.channels_last)
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0}], lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def epoch():
        net.train()
        order = torch.randperm(len(x), device=device)
        for i in range(0, len(x), args.batch_size):
            idx = order[i: i + args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def infer(_x_test):
        x_test = torch.tensor(nchw.x_test).to(device).contiguous(memory_format=torch.channels_last)
        net.eval()
        with torch.no_grad():
            return torch.cat([net(x_test[i: i + 512]).argmax(1) for i in range(0, len(x_test), 512)]).cpu().numpy()

    return Runner(name, "plain torch", epoch, infer)


def main(argv=None) -> int:
    args = parse_args(argv)
    import keras

    from fmnist_keras import data as fdata
    from fmnist_keras.backend import describe_device, select_backend
    from fmnist_keras.config import TrainConfig
    from fmnist_keras.training import make_splits

    select_backend(keras.backend.backend())
    torch_backend = keras.backend.backend() == "torch"
    raw = fdata.load_data()
    splits = make_splits(raw, TrainConfig(subset=args.subset, data_format=args.data_format))
    device = describe_device()
    rows = []
    for name in args.models:
        paths = []
        if torch_backend:
            stock, _, _ = keras_path(name, splits, args, fast=False)
            paths.append(stock)
        fast, model, weights = keras_path(name, splits, args, fast=True)
        paths.append(fast)
        twin = None if args.no_twin or not torch_backend else twin_path(name, model, weights, splits, args)
        if twin:
            paths.append(twin)
        for round_ in range(args.epochs):  # the paths take turns, epoch by epoch
            for path in paths:
                path.epoch()
            print(f"{name}: round {round_ + 1}/{args.epochs}: "
                  + ", ".join(f"{p.label} {p.times[-1]:.1f} s" for p in paths), flush=True)
        results = [p.result(len(splits.x_train), splits.x_test, splits.y_test) for p in paths]
        if twin:
            for r in results[:-1]:
                r["keras_over_torch"] = r["s_per_epoch"] / results[-1]["s_per_epoch"]
        rows += results
    print(f"\n{len(splits.x_train)} training images ({splits.data_format}), batch {args.batch_size}, {args.epochs} rounds "
          f"(median after 1 warm-up), device {device}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, peak resident memory {peak_rss_mb():.0f} MB")
    header = f"{'model':<14}{'path':<14}{'s/epoch':>9}{'train img/s':>13}{'infer img/s':>13}{'peak MB':>9}{'test acc':>10}{'keras/torch':>13}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        ratio = f"{r['keras_over_torch']:.2f}x" if "keras_over_torch" in r else ""
        peak = f"{r['peak_mb']:.0f}" if r["peak_mb"] else "-"
        print(f"{r['model']:<14}{r['path']:<14}{r['s_per_epoch']:>9.2f}{r['train_img_s']:>13.0f}"
              f"{r['infer_img_s']:>13.0f}{peak:>9}{r['test_acc']:>10.4f}{ratio:>13}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "backend": keras.backend.backend(), "num_train": len(splits.x_train),
                       "data_format": splits.data_format, "batch_size": args.batch_size, "rounds": args.epochs,
                       "cpus": os.cpu_count(), "peak_rss_mb": peak_rss_mb(), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

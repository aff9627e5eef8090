"""Speed benchmark: the project's Keras training path against a plain-PyTorch twin.

For each model it measures, on the current backend (``KERAS_BACKEND``, default torch):
seconds per epoch (median of the epochs after a warm-up epoch), training
images/s, inference images/s, peak resident memory, and test accuracy after the
timed epochs. For ``mlp`` and ``baseline-cnn`` it then trains a plain-PyTorch
twin of the same network, starting from the *same initial weights* copied from
the Keras model, with the same batch size and optimiser (AdamW), the whole data
set held as one tensor in ``channels_last`` memory format, and prints the
ratio Keras / PyTorch.

Usage:
    KERAS_BACKEND=torch python benchmarks/bench.py --models baseline-cnn mlp --epochs 3
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
    parser.add_argument("--epochs", type=int, default=3, help="epochs per measurement, the first one is warm-up (default: 3)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    parser.add_argument("--subset", type=int, help="train on N images instead of the 54k training split")
    parser.add_argument("--data-format", choices=DATA_FORMATS, default="auto",
                        help="layout of the Keras path ('auto': what train uses, channels_first on torch)")
    parser.add_argument("--no-twin", action="store_true", help="skip the plain-PyTorch twin")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    return parser.parse_args(argv)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class EpochTimer:
    """Wall time of every epoch of model.fit (a Keras callback built lazily)."""

    def __new__(cls):
        import keras

        class _Timer(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.times = []

            def on_epoch_begin(self, epoch, logs=None):
                self._start = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.times.append(time.perf_counter() - self._start)

        return _Timer()


def time_keras(name, splits, args):
    import keras
    import numpy as np

    from fmnist_keras.config import TrainConfig
    from fmnist_keras.models import build_model
    from fmnist_keras.training import compile_model

    config = TrainConfig(model=name, epochs=args.epochs, batch_size=args.batch_size).resolved()
    keras.utils.set_random_seed(0)
    model = build_model(name, data_format=splits.data_format, seed=0)
    initial_weights = [np.array(w) for w in model.get_weights()]
    steps = -(-len(splits.x_train) // args.batch_size)
    compile_model(model, config, steps)
    y = keras.utils.to_categorical(splits.y_train, 10)
    timer = EpochTimer()
    model.fit(splits.x_train, y, epochs=args.epochs, batch_size=args.batch_size, verbose=0,
              callbacks=[timer, keras.callbacks.EarlyStopping(monitor="loss", patience=100)])
    start = time.perf_counter()
    probs = model.predict(splits.x_test, batch_size=512, verbose=0)
    infer = time.perf_counter() - start
    epoch = statistics.median(timer.times[1:] or timer.times)
    return model, initial_weights, {
        "s_per_epoch": epoch,
        "train_img_s": len(splits.x_train) / epoch,
        "infer_img_s": len(splits.x_test) / infer,
        "test_acc": float((np.argmax(probs, 1) == splits.y_test).mean()),
    }


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


def time_twin(name, keras_model, weights, splits, args):
    import numpy as np
    import torch

    net = torch_twin(name, keras_model, weights)
    if net is None:
        return None
    nchw = splits.in_format("channels_first")
    x = torch.tensor(nchw.x_train).contiguous(memory_format=torch.channels_last)
    y = torch.tensor(splits.y_train)
    x_test = torch.tensor(nchw.x_test).contiguous(memory_format=torch.channels_last)
    net = net.to(memory_format=torch.channels_last)
    decay = [p for n, p in net.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in net.named_parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0}], lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    times = []
    for _ in range(args.epochs):
        start = time.perf_counter()
        net.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), args.batch_size):
            idx = order[i: i + args.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(x[idx]), y[idx])
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    net.eval()
    start = time.perf_counter()
    with torch.no_grad():
        pred = torch.cat([net(x_test[i: i + 512]).argmax(1) for i in range(0, len(x_test), 512)])
    infer = time.perf_counter() - start
    epoch = statistics.median(times[1:] or times)
    return {
        "s_per_epoch": epoch,
        "train_img_s": len(x) / epoch,
        "infer_img_s": len(x_test) / infer,
        "test_acc": float((pred.numpy() == splits.y_test).mean()),
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    import keras

    from fmnist_keras import data as fdata
    from fmnist_keras.backend import describe_device, select_backend
    from fmnist_keras.config import TrainConfig
    from fmnist_keras.training import make_splits

    select_backend(keras.backend.backend())
    raw = fdata.load_data()
    splits = make_splits(raw, TrainConfig(subset=args.subset, data_format=args.data_format))
    device = describe_device()
    rows = []
    for name in args.models:
        model, weights, result = time_keras(name, splits, args)
        rows.append({"model": name, "path": f"keras/{keras.backend.backend()}", **result, "peak_rss_mb": peak_rss_mb()})
        if not args.no_twin and keras.backend.backend() == "torch":
            twin = time_twin(name, model, weights, splits, args)
            if twin:
                rows.append({"model": name, "path": "plain torch", **twin, "peak_rss_mb": peak_rss_mb(),
                             "keras_over_torch": result["s_per_epoch"] / twin["s_per_epoch"]})
    print(f"\n{len(splits.x_train)} training images ({splits.data_format}), batch {args.batch_size}, {args.epochs} epochs "
          f"(median after 1 warm-up), device {device}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs")
    header = f"{'model':<14}{'path':<15}{'s/epoch':>9}{'train img/s':>13}{'infer img/s':>13}{'peak MB':>9}{'test acc':>10}{'keras/torch':>13}"
    print(header + "\n" + "-" * len(header))
    for r in rows:
        ratio = f"{r['keras_over_torch']:.2f}x" if "keras_over_torch" in r else ""
        print(f"{r['model']:<14}{r['path']:<15}{r['s_per_epoch']:>9.1f}{r['train_img_s']:>13.0f}"
              f"{r['infer_img_s']:>13.0f}{r['peak_rss_mb']:>9.0f}{r['test_acc']:>10.4f}{ratio:>13}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device, "num_train": len(splits.x_train), "data_format": splits.data_format, "batch_size": args.batch_size,
                       "epochs": args.epochs, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

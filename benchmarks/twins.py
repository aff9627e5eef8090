"""Plain-PyTorch twins of the project's models, for the speed benchmarks.

A twin is the same network as the Keras model, built from ``torch.nn`` and
initialised with the Keras model's weights (``model.get_weights()`` order), so
the two start from the same point. :func:`twin_runner` trains it the way a
PyTorch user would: the whole data set as one tensor in ``channels_last``
memory format, AdamW (weight decay on the weight matrices only), label-smoothed
cross-entropy, no per-step host synchronisation (but for the float16 loss scaler).

Twins exist for ``mlp``, ``baseline-cnn`` and ``cnn`` (the default CNN, with
its training-only flips and shifts done batched on the device).
"""

from __future__ import annotations

if __name__ == "__main__":  # before the imports, which load Keras
    import outputs  # benchmarks/ is on sys.path when a script there runs

    raise SystemExit(outputs.not_a_script("twins.py"))

import torch
from torch import nn

from fmnist_keras.engine.recipe import dtype_policy_name
from runner import Runner  # benchmarks/ is on sys.path when a script there runs

TWINS = ("mlp", "baseline-cnn", "cnn")


def _layers():
    def dense(kernel, bias=None, in_perm=None):
        kernel = torch.tensor(kernel)
        if in_perm is not None:
            kernel = kernel[in_perm]
        linear = nn.Linear(kernel.shape[0], kernel.shape[1], bias=bias is not None)
        linear.weight.data = kernel.T.contiguous()
        if bias is not None:
            linear.bias.data = torch.tensor(bias)
        return linear

    def conv(kernel, bias=None, padding=0):
        k = torch.tensor(kernel).permute(3, 2, 0, 1).contiguous()  # (kh,kw,in,out) -> (out,in,kh,kw)
        layer = nn.Conv2d(k.shape[1], k.shape[0], k.shape[2], padding=padding, bias=bias is not None)
        layer.weight.data = k
        if bias is not None:
            layer.bias.data = torch.tensor(bias)
        return layer

    def batch_norm(gamma, beta, mean, var, dims=1):
        # Keras: epsilon 1e-3, momentum 0.9 (models.BN_MOMENTUM); PyTorch counts momentum the other way.
        bn = (nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d)(len(gamma), eps=1e-3, momentum=0.1)
        bn.weight.data, bn.bias.data = torch.tensor(gamma), torch.tensor(beta)
        bn.running_mean.data, bn.running_var.data = torch.tensor(mean), torch.tensor(var)
        return bn

    return dense, conv, batch_norm


class Augment(nn.Module):
    """Flips and shifts as ``models.augmentation()`` (shift 0.08, nearest, zero fill), batched; training only."""

    def __init__(self, shift: float = 0.08):
        super().__init__()
        self.shift = shift

    def forward(self, x):
        if not self.training:
            return x
        n = x.shape[0]
        flip = torch.rand(n, device=x.device) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0] = theta[:, 1, 1] = 1.0
        # A shift of `shift` of the image is 2 * shift in grid units, which span [-1, 1].
        theta[:, :, 2] = (torch.rand(n, 2, device=x.device) * 2 - 1) * (2 * self.shift)
        grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
        return nn.functional.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


def torch_twin(name: str, weights):
    """The plain-PyTorch network of model ``name`` with the Keras ``weights``, or None."""
    dense, conv, batch_norm = _layers()
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
    if name == "cnn":
        # build_cnn defaults: blocks 32-32 and 64-64 of (3x3 conv "same", no bias, BatchNorm, ReLU), 2x2 pooling.
        layers, i = [Augment()], 0
        for _block in range(2):
            for _conv in range(2):
                layers += [conv(w[i], padding=1), batch_norm(*w[i + 1: i + 5], dims=2), nn.ReLU()]
                i += 5
            layers.append(nn.MaxPool2d(2))
        perm = torch.arange(7 * 7 * 64).reshape(7, 7, 64).permute(2, 0, 1).reshape(-1)
        layers += [nn.Flatten(), dense(w[i], in_perm=perm), batch_norm(*w[i + 1: i + 5]), nn.ReLU(), nn.Dropout(0.1)]
        layers.append(dense(w[i + 5], w[i + 6]))
        return nn.Sequential(*layers)
    return None


def twin_runner(name, weights, splits, batch_size: int, mixed_precision: bool = False):
    """The plain-PyTorch twin of ``name`` as a :class:`Runner`, or None for a model without one.

    ``mixed_precision`` runs it under ``torch.autocast`` (bfloat16 on a CPU; on
    a GPU float16 with a ``GradScaler``, as Keras scales the loss, whose check
    for inf reads the GPU once a step), the loss in float32, as Keras's mixed
    policies do.
    """
    net = torch_twin(name, weights)
    if net is None:
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The compute dtype of train's mixed policy: mixed_float16 on a GPU, mixed_bfloat16 on a CPU.
    half = getattr(torch, dtype_policy_name(True).removeprefix("mixed_")) if mixed_precision else None
    scaler = torch.amp.GradScaler(device.type, enabled=half == torch.float16)

    def forward(batch):
        with torch.autocast(device.type, dtype=half, enabled=half is not None):
            return net(batch).float()
    nchw = splits.in_format("channels_first")
    x = torch.tensor(nchw.x_train).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.tensor(splits.y_train).to(device)
    net = net.to(device).to(memory_format=torch.channels_last)
    decay = [p for p in net.parameters() if p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.ndim <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 1e-4}, {"params": no_decay, "weight_decay": 0}], lr=1e-3
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def epoch():
        net.train()
        order = torch.randperm(len(x), device=device)
        for i in range(0, len(x), batch_size):
            idx = order[i: i + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(forward(x[idx]), y[idx])
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()

    def infer(_x_test):
        x_test = torch.tensor(nchw.x_test).to(device).contiguous(memory_format=torch.channels_last)
        net.eval()
        with torch.no_grad():
            return torch.cat([forward(x_test[i: i + 512]).argmax(1) for i in range(0, len(x_test), 512)]).cpu().numpy()

    return Runner(name, "plain torch", epoch, infer)

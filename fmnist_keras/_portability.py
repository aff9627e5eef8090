"""Worker of the cross-backend portability checks, run in a fresh process per backend.

Keras fixes its backend at first import, so saving under one backend and
loading under another takes separate processes. ``tests/test_portability.py``
and ``benchmarks/portability.py`` start this module with ``python -m`` once
per backend and per step, never once per (model, backend) pair, because a
backend import costs seconds.

Usage:
    python -m fmnist_keras._portability save --backend torch --inputs X.npy --out-dir DIR
    python -m fmnist_keras._portability predict --backend jax --inputs X.npy --output P.npz A.keras B.keras

``save`` trains the tiny models of :func:`tiny_models` for a few steps,
saves each as ``DIR/<name>.keras`` and writes the in-memory model's softmax
outputs on the images of ``X.npy`` to ``DIR/reference.npz`` (key: name).
``predict`` loads each model and writes its outputs on ``X.npy`` to
``P.npz`` (keys ``"0"``, ``"1"``, ... in the order given).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fmnist_keras.backend import DEVICES
from fmnist_keras.config import BACKENDS

REFERENCE_FILE = "reference.npz"


def tiny_models() -> dict:
    """Small versions of both architectures, with the same layer types as the real ones, and the CNN under
    mixed precision.

    The CNN keeps its training-only augmentation layers and its BatchNorm
    layers, whose moving statistics must survive the trip between backends.
    """
    from fmnist_keras.engine.recipe import dtype_policy
    from fmnist_keras.models import build_cnn, build_mlp

    with dtype_policy(True):  # as train builds the CNN on a CPU with bfloat16 instructions (float16 on a GPU)
        mixed = build_cnn(filters=(4, 8), convs_per_block=1, dense_units=16, seed=0, name="cnn_mixed")
    return {
        "cnn": build_cnn(filters=(4, 8), convs_per_block=1, dense_units=16, seed=0),
        "mlp": build_mlp(units=(32, 16), augment=True, seed=0),
        "cnn-mixed": mixed,
    }


def _train_a_few_steps(model, seed: int = 0) -> None:
    """Move weights, optimizer state and BatchNorm statistics away from their initial values."""
    import keras

    rng = np.random.default_rng(seed)
    x = rng.random((64, *model.input_shape[1:]), dtype=np.float32)
    y = rng.integers(0, 10, size=64)
    # AdamW with a moving average of the weights, as the recipe trains: its extra
    # variables travel in the file too.
    model.compile(optimizer=keras.optimizers.AdamW(use_ema=True, ema_momentum=0.5),
                  loss="sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)


def save(inputs: np.ndarray, out_dir: Path) -> dict[str, Path]:
    """Train and save the tiny models; write their outputs on ``inputs`` as the reference."""
    import keras

    out_dir.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(0)
    paths, reference = {}, {}
    for name, model in tiny_models().items():
        _train_a_few_steps(model)
        paths[name] = out_dir / f"{name}.keras"
        model.save(paths[name])
        reference[name] = keras.ops.convert_to_numpy(model.predict(inputs, verbose=0))
    np.savez(out_dir / REFERENCE_FILE, **reference)
    return paths


def predict(inputs: np.ndarray, model_paths: list[Path], batch_size: int = 512) -> list[np.ndarray]:
    """Softmax outputs on ``inputs`` of each saved model, loaded in this process."""
    import keras

    from fmnist_keras.loading import load_model

    outputs = []
    for path in model_paths:
        model = load_model(path)
        outputs.append(keras.ops.convert_to_numpy(model.predict(inputs, batch_size=batch_size, verbose=0)))
    return outputs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fmnist_keras._portability", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("save", "predict"):
        step = sub.add_parser(name)
        step.add_argument("--backend", choices=BACKENDS, required=True, help="Keras backend of this process")
        step.add_argument("--device", choices=DEVICES, default="cpu",
                          help="where to compute; CPU keeps the comparison about the file format (default: cpu)")
        step.add_argument("--inputs", type=Path, required=True, help=".npy of model-ready images (N, 28, 28, 1)")
    sub.choices["save"].add_argument("--out-dir", type=Path, required=True, help="where the .keras files go")
    sub.choices["predict"].add_argument("--output", type=Path, required=True, help=".npz of the outputs")
    sub.choices["predict"].add_argument("models", type=Path, nargs="+", help=".keras files to load")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from fmnist_keras.backend import select_backend

    select_backend(args.backend, args.device)
    inputs = np.load(args.inputs, allow_pickle=False)
    if args.command == "save":
        for name, path in save(inputs, args.out_dir).items():
            print(f"saved {name} under {args.backend}: {path}")
    else:
        outputs = predict(inputs, args.models)
        np.savez(args.output, **{str(i): out for i, out in enumerate(outputs)})
        print(f"predicted {len(outputs)} models under {args.backend}: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

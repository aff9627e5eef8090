"""The run configuration: one dataclass, saved next to the model it produced.

No Keras import here, so ``--help`` and config handling stay fast.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

MODEL_NAMES = ("mlp", "cnn", "cnn-large", "baseline-cnn")
BACKENDS = ("torch", "tensorflow", "jax")
DATA_FORMATS = ("auto", "channels_last", "channels_first")

# Per-model defaults, used where the user gives no value. Each recipe was
# measured on the full data (README, "Results").
# "flip_tta": average the predictions of each image and its mirror image
# (for models trained with horizontal flips: for the CNN over 3 seeds, +0.34
# points of validation accuracy in float32 with 20 epochs, +0.27 of validation
# and +0.15 of test accuracy with its default recipe in bfloat16, every seed's
# accuracy higher). "shift_tta": average over the image's copies shifted by
# one pixel too (for the CNN over 5 seeds, +0.03 points of validation and
# +0.08 of test accuracy over flip alone, with its default recipe in bfloat16;
# docs/ablations.md, "Test-time augmentation with shifts"). "ema": momentum of the moving average of
# the weights that is validated, checkpointed and saved; 0 keeps the trained
# weights, which scored higher on validation (docs/ablations.md, "Ablation: flip TTA and the moving
# average of the weights").
MODEL_DEFAULTS = {
    # The MLP is cheap per epoch, so it gets many; BatchNorm, dropout and
    # weight decay keep it from overfitting, and EarlyStopping keeps the best.
    "mlp": {"epochs": 20, "learning_rate": 2e-3, "weight_decay": 1e-4, "flip_tta": False, "shift_tta": False,
            "ema": 0.0, "patience": 5},
    # 24 epochs of the warm-up + cosine schedule at a peak rate of 0.003 with
    # weight decay 0.05: +0.29 points of validation accuracy on 3 of 3 seeds
    # over 20 epochs at 0.002 and 1e-4, for 1.2x the time (docs/ablations.md,
    # "Ablation in bfloat16").
    "cnn": {"epochs": 24, "learning_rate": 3e-3, "weight_decay": 0.05, "flip_tta": True, "shift_tta": True,
            "ema": 0.0, "patience": 5},
    # Opt-in: about 6x the CNN's multiply-adds, for a GPU or a long CPU run.
    # The CNN's rate, decay and test-time augmentation over 40 epochs, with a
    # patience that lets the cosine schedule finish: +0.38 points of validation
    # accuracy on seed 42 over 30 epochs at 0.002 and 1e-4 with flips alone
    # (docs/ablations.md, "`cnn-large`"); 95.50% ± 0.20 test accuracy over 3
    # seeds (docs/results.md, "Results on the 2-core CPU").
    "cnn-large": {"epochs": 40, "learning_rate": 3e-3, "weight_decay": 0.05, "flip_tta": True, "shift_tta": True,
                  "ema": 0.0, "patience": 10},
    "baseline-cnn": {"epochs": 15, "learning_rate": 1e-3, "weight_decay": 1e-4, "flip_tta": False, "shift_tta": False,
                     "ema": 0.0, "patience": 5},
}
# Fields whose None means "the model's default" (MODEL_DEFAULTS).
PER_MODEL = ("epochs", "learning_rate", "weight_decay", "flip_tta", "shift_tta", "ema", "patience")
# Fields whose None means "decided by the model and the hardware when the run
# starts" (fmnist_keras.engine.fit.run_config); config.json records the decision.
PER_MACHINE = ("mixed_precision",)
# The models that compute in bfloat16 by default on a CPU with bfloat16
# instructions, per backend; backend.default_mixed_precision says where and the
# speed-ups measured there. The MLP gains no speed and lost 0.2 points, and JAX
# trains the CNN no faster in bfloat16 (docs/backends.md, "Mixed precision").
BFLOAT16_BY_DEFAULT = {"torch": ("cnn", "cnn-large"), "tensorflow": ("cnn",)}


# The valid range of every number in a TrainConfig: (type, lowest, highest).
# The train flags and the check of a saved config.json both use it.
RANGES = {
    "epochs": (int, 1, 10_000),
    "batch_size": (int, 1, 60_000),  # at most the whole training set
    "learning_rate": (float, 1e-7, 10.0),  # AdamW diverges long before 10
    "weight_decay": (float, 0.0, 1.0),  # decoupled: lr * wd <= lr
    "label_smoothing": (float, 0.0, 0.99),  # 1.0 would make every target uniform
    "warmup_epochs": (float, 0.0, 10_000.0),
    "patience": (int, 0, 10_000),
    "val_split": (float, 0.001, 0.999),
    "seed": (int, 0, 2**32 - 1),  # numpy's seed range
    "split_seed": (int, 0, 2**32 - 1),
    "subset": (int, 1, 60_000),
    "ema": (float, 0.0, 0.99999),  # 0 turns the average off; 1 would never move
    "cutmix": (float, 0.0, 1.0),  # a fraction of the training batches
}
CHOICES = {"model": MODEL_NAMES, "backend": BACKENDS, "data_format": DATA_FORMATS, "device": ("auto", "cpu", "gpu")}
FLAGS = ("verify", "mixed_precision", "fast_path", "flip_tta", "shift_tta")


@dataclasses.dataclass
class TrainConfig:
    """Everything needed to rebuild and reproduce one training run."""

    model: str = "cnn"
    epochs: int | None = None  # None: the model's default (MODEL_DEFAULTS)
    batch_size: int = 128  # small enough to generalise well, large enough to keep 2 cores busy
    learning_rate: float | None = None  # peak of the warm-up + cosine schedule; None: model default
    weight_decay: float | None = None  # AdamW decoupled weight decay; None: the model's default
    label_smoothing: float = 0.1  # softens targets; helps the shirt/T-shirt/pullover confusions
    warmup_epochs: float = 1.0  # linear warm-up to the peak learning rate, then cosine decay
    patience: int | None = None  # epochs without val_loss improvement before EarlyStopping stops; None: model default
    val_split: float = 0.1  # stratified fraction of the 60k training images held out
    seed: int = 42
    # Draws the validation split and the subset in place of seed, so that runs
    # of different seeds share one split (an ensemble is chosen on it); None:
    # seed draws them too.
    split_seed: int | None = None
    subset: int | None = None  # train on this many (stratified) training images; None: all
    data_dir: str | None = None  # None: $FMNIST_DATA_DIR, Keras cache, /usr/share/datasets, download
    verify: bool = True  # SHA-256 check of the data files
    backend: str = "torch"
    device: str = "auto"  # "auto": GPU if present; "cpu": force CPU; "gpu": fail without one
    # bfloat16 (CPU) / float16 (GPU) compute, float32 weights and outputs;
    # None: on where measured to pay (fmnist_keras.backend.default_mixed_precision).
    mixed_precision: bool | None = None
    # Image layout while training: "auto" picks the backend's fast one
    # (channels_last, or channels_first on torch without the fast path);
    # saved models are channels_last either way.
    data_format: str = "auto"
    # On torch, run Keras's layers and optimizer through PyTorch's fused
    # kernels (fmnist_keras.engine.fastpath); no effect on tensorflow and jax.
    fast_path: bool = True
    # Evaluate and predict with the mean of each image's and its mirror
    # image's probabilities; None: the model's default (MODEL_DEFAULTS).
    flip_tta: bool | None = None
    # Average over the image's copies shifted by one pixel up, down, left and
    # right too (each with its mirror image under flip_tta); None: the
    # model's default.
    shift_tta: bool | None = None
    # Keep an exponential moving average of the weights with this momentum
    # (Keras's optimizer use_ema), validate, checkpoint and save it; 0: off;
    # None: the model's default.
    ema: float | None = None
    # Mix this fraction of the training batches with CutMix: a box of each
    # image pasted from another image of the batch, the labels mixed by its
    # area (fmnist_keras.engine.device_data); 0: off. Opt-in: on cnn-large its
    # validation accuracy was +0.04 on seed 42 and -0.13 on seed 1, no
    # consistent gain (docs/ablations.md, "`cnn-large`").
    cutmix: float = 0.0

    def resolved(self) -> "TrainConfig":
        """A copy with the per-model defaults filled in."""
        defaults = MODEL_DEFAULTS[self.model]
        return dataclasses.replace(
            self, **{name: defaults[name] for name in PER_MODEL if getattr(self, name) is None}
        )

    @property
    def splitting_seed(self) -> int:
        """The seed that draws the validation split and the subset: ``split_seed``, else ``seed``."""
        return self.seed if self.split_seed is None else self.split_seed

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data) -> "TrainConfig":
        """A checked TrainConfig from a dict (e.g. a saved config.json).

        Raises:
            ValueError: not a dict, unknown keys, or a value of the wrong type or out of range.
        """
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object of settings, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown configuration keys {sorted(unknown)}; expected some of {sorted(fields)}")
        config = cls(**data)
        config.check()
        return config

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        return cls.from_dict(json.loads(text))

    def check(self) -> "TrainConfig":
        """``self`` if every field has the right type and lies in its range (RANGES, CHOICES), else ValueError."""
        for name, (kind, low, high) in RANGES.items():
            value = getattr(self, name)
            if value is None and name in (*PER_MODEL, "subset", "split_seed"):
                continue
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or (kind is int and not isinstance(value, int)) or not low <= value <= high:
                raise ValueError(f"{name} is {value!r}; expected {'a whole number' if kind is int else 'a number'} "
                                 f"from {low} to {high}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} is {getattr(self, name)!r}; expected one of {', '.join(allowed)}")
        for name in FLAGS:
            if getattr(self, name) is None and name in (*PER_MODEL, *PER_MACHINE):
                continue
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} is {getattr(self, name)!r}; expected true or false")
        if self.data_dir is not None and not (isinstance(self.data_dir, str) and self.data_dir.strip()):
            raise ValueError(f"data_dir is {self.data_dir!r}; expected a path or null")
        return self

    def save(self, path: Path) -> None:
        from fmnist_keras.rundir import write_text

        write_text(Path(path), self.to_json() + "\n")


def saved_data_dir(data_dir: str | None) -> str | None:
    """``--data-dir`` as a run's ``config.json`` records it: an absolute path, so ``--resume`` finds the data from
    any directory (None, the default lookup, stays None)."""
    return os.path.abspath(os.path.expanduser(data_dir)) if data_dir else None


def load_config(path: Path) -> TrainConfig:
    """The checked TrainConfig saved in ``path``; a damaged file is one RunDirError line."""
    from fmnist_keras.rundir import RunDirError, read_json

    fix = "restore it from a copy, or start a new run"
    data = read_json(path, "the run's configuration", fix)
    if isinstance(data, dict):
        # A configuration without these keys describes a run that used neither.
        data = {"flip_tta": False, "shift_tta": False, "ema": 0.0, **data}
    try:
        return TrainConfig.from_dict(data)
    except (TypeError, ValueError) as error:
        raise RunDirError(f"{path} is damaged: {error}; {fix}.") from None

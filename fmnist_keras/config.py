"""The run configuration: one dataclass, saved next to the model it produced.

No Keras import here, so ``--help`` and config handling stay fast.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

MODEL_NAMES = ("mlp", "cnn", "cnn-large", "baseline-cnn")
BACKENDS = ("torch", "tensorflow", "jax")
DATA_FORMATS = ("auto", "channels_last", "channels_first")

# Per-model defaults, used where the user gives no value. Each recipe was
# measured on the full data (README, "Results").
MODEL_DEFAULTS = {
    # The MLP is cheap per epoch, so it gets many; BatchNorm, dropout and
    # weight decay keep it from overfitting, and EarlyStopping keeps the best.
    "mlp": {"epochs": 20, "learning_rate": 2e-3},
    # About 28 s per epoch on two CPU cores with the torch fast path: 20
    # epochs of the warm-up + cosine schedule take about 10 minutes (94.6%).
    "cnn": {"epochs": 20, "learning_rate": 2e-3},
    # Opt-in: about 6x the CNN's multiply-adds, for a GPU or a long CPU run.
    "cnn-large": {"epochs": 30, "learning_rate": 2e-3},
    "baseline-cnn": {"epochs": 15, "learning_rate": 1e-3},
}


@dataclasses.dataclass
class TrainConfig:
    """Everything needed to rebuild and reproduce one training run."""

    model: str = "cnn"
    epochs: int | None = None  # None: the model's default (MODEL_DEFAULTS)
    batch_size: int = 128  # small enough to generalise well, large enough to keep 2 cores busy
    learning_rate: float | None = None  # peak of the warm-up + cosine schedule; None: model default
    weight_decay: float = 1e-4  # AdamW decoupled weight decay
    label_smoothing: float = 0.1  # softens targets; helps the shirt/T-shirt/pullover confusions
    warmup_epochs: float = 1.0  # linear warm-up to the peak learning rate, then cosine decay
    patience: int = 5  # epochs without val_loss improvement before EarlyStopping stops
    val_split: float = 0.1  # stratified fraction of the 60k training images held out
    seed: int = 42
    subset: int | None = None  # train on this many (stratified) training images; None: all
    data_dir: str | None = None  # None: $FMNIST_DATA_DIR, Keras cache, /usr/share/datasets, download
    verify: bool = True  # SHA-256 check of the data files
    backend: str = "torch"
    device: str = "auto"  # "auto": GPU if present; "cpu": force CPU; "gpu": fail without one
    mixed_precision: bool = False  # bfloat16 (CPU) / float16 (GPU) compute, float32 weights and outputs
    # Image layout while training: "auto" picks the backend's fast one
    # (channels_last, or channels_first on torch without the fast path);
    # saved models are channels_last either way.
    data_format: str = "auto"
    # On torch, run Keras's layers and optimizer through PyTorch's fused
    # kernels (fmnist_keras.fastpath); no effect on tensorflow and jax.
    fast_path: bool = True

    def resolved(self) -> "TrainConfig":
        """A copy with the per-model defaults filled in."""
        defaults = MODEL_DEFAULTS[self.model]
        return dataclasses.replace(
            self,
            epochs=self.epochs if self.epochs is not None else defaults["epochs"],
            learning_rate=self.learning_rate if self.learning_rate is not None else defaults["learning_rate"],
        )

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TrainConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        data = json.loads(text)
        unknown = set(data) - fields
        if unknown:
            raise ValueError(f"unknown configuration keys {sorted(unknown)}; expected some of {sorted(fields)}.")
        return cls(**data)

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

"""Lightning adapter for `import pytorch_lightning`: the same `CheckpointIOPlugin` and `CheckpointCallback`
as `ckpt_callbacks.lightning`, built on `pytorch_lightning`'s base classes (which `pytorch_lightning.Trainer`
requires; the `lightning.pytorch` ones are different classes)."""

from __future__ import annotations

from ckpt_callbacks.lightning.arguments import adapter_classes, missing_framework

try:
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.plugins.io import CheckpointIO
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_framework("pytorch-lightning", "ckpt_callbacks.pytorch_lightning", "lightning.pytorch", "ckpt_callbacks.lightning") from exc

CheckpointIOPlugin, CheckpointCallback = adapter_classes(__name__, ModelCheckpoint, CheckpointIO)

__all__ = ["CheckpointCallback", "CheckpointIOPlugin"]

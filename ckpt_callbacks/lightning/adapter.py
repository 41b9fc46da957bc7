"""The adapter's classes on `lightning.pytorch` base classes (behaviour in `plugin.py` and `callback.py`)."""

from __future__ import annotations

from ckpt_callbacks.lightning.arguments import adapter_classes, missing_framework

try:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins.io import CheckpointIO
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise missing_framework("lightning", "ckpt_callbacks.lightning", "pytorch_lightning", "ckpt_callbacks.pytorch_lightning") from exc

CheckpointIOPlugin, CheckpointCallback = adapter_classes(__name__, ModelCheckpoint, CheckpointIO)

__all__ = ["CheckpointCallback", "CheckpointIOPlugin"]
